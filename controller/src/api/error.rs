//! The one error type at the API boundary, and the one place it becomes an
//! HTTP status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// One problem with a request, by field path (and, for manifests, line and
/// column in the text the user sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldProblem {
    /// Where the problem is: a field path such as `ports[1].port`, or
    /// `body`, `query` or a path parameter's name.
    pub path: String,
    /// 1-based line in the request body, when the problem has a place there.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub line: Option<usize>,
    /// 1-based column in the request body, beside `line`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub column: Option<usize>,
    pub message: String,
}

impl FieldProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid request: {}", summary(.0))]
    Invalid(Vec<FieldProblem>),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("request body larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: usize },
    #[error("the cluster store is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

fn summary(problems: &[FieldProblem]) -> String {
    let parts: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect();
    parts.join("; ")
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> ErrorCode {
        match self {
            ApiError::Invalid(_) => ErrorCode::Invalid,
            ApiError::Unauthorized => ErrorCode::Unauthorized,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Unprocessable(_) => ErrorCode::Unprocessable,
            ApiError::TooLarge { .. } => ErrorCode::TooLarge,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// A stable word for scripts, beside the human message.
// An enum rather than strings so that the OpenAPI document lists exactly
// the words that are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Invalid,
    Unauthorized,
    NotFound,
    Conflict,
    Unprocessable,
    TooLarge,
    Unavailable,
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            ApiError::Unavailable(error)
        } else {
            ApiError::Internal(error.to_string())
        }
    }
}

/// The body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    error: ErrorCode,
    /// What went wrong, for people.
    message: String,
    /// Every problem found with the request (400 only; absent otherwise).
    #[serde(skip_serializing_if = "<[FieldProblem]>::is_empty")]
    #[schema(value_type = Vec<FieldProblem>)]
    problems: &'a [FieldProblem],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, status = status.as_u16(), "request failed");
        }
        let problems: &[FieldProblem] = match &self {
            ApiError::Invalid(problems) => problems,
            _ => &[],
        };
        let mut message = self.to_string();
        if let ApiError::Unavailable(source) = &self {
            message = format!("{message}: {source}");
        }
        let body = ErrorBody {
            error: self.code(),
            message,
            problems,
        };
        (status, axum::Json(body)).into_response()
    }
}
