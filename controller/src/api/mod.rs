//! The versioned REST API (`/v1/...`): HTTP in, calls on [`Apps`] out.
//!
//! Handlers only translate: they read the request (path, query, body), call
//! the logic, and turn the result into JSON. Every failure is an
//! [`ApiError`], mapped to a status in `error.rs` and nowhere else.

mod error;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_manifest::Format;
use serde::Deserialize;

pub use error::{ApiError, FieldProblem};

use crate::apps::Apps;
use crate::auth::Auth;
use crate::nodes::{Nodes, Registration};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 1 << 20;

/// Every route of the API, for the test that proves each one requires a
/// token. Keep in step with [`router`].
pub const ROUTES: &[(Method, &str)] = &[
    (Method::GET, "/v1/projects"),
    (Method::POST, "/v1/projects"),
    (Method::GET, "/v1/projects/p"),
    (Method::GET, "/v1/apps"),
    (Method::POST, "/v1/apps"),
    (Method::GET, "/v1/projects/p/apps/a"),
    (Method::DELETE, "/v1/projects/p/apps/a"),
    (Method::GET, "/v1/projects/p/apps/a/revisions"),
    (Method::GET, "/v1/projects/p/apps/a/revisions/1"),
    (Method::POST, "/v1/projects/p/apps/a/rollback"),
    (Method::GET, "/v1/events"),
    (Method::POST, "/v1/nodes"),
    (Method::GET, "/v1/nodes"),
    (Method::GET, "/v1/nodes/n"),
    (Method::POST, "/v1/nodes/n/heartbeat"),
    (Method::POST, "/v1/nodes/n/drain"),
    (Method::POST, "/v1/nodes/n/undrain"),
];

#[derive(Debug, Clone)]
pub struct ApiState {
    pub apps: Apps,
    pub nodes: Arc<Nodes>,
    pub auth: Arc<Auth>,
}

pub fn router(state: ApiState) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/projects", get(list_projects).post(create_project))
        .route("/v1/projects/{project}", get(show_project))
        .route("/v1/apps", get(list_apps).post(apply))
        .route(
            "/v1/projects/{project}/apps/{app}",
            get(show_app).delete(delete_app),
        )
        .route(
            "/v1/projects/{project}/apps/{app}/revisions",
            get(list_revisions),
        )
        .route(
            "/v1/projects/{project}/apps/{app}/revisions/{revision}",
            get(show_revision),
        )
        .route("/v1/projects/{project}/apps/{app}/rollback", post(rollback))
        .route("/v1/events", get(list_events))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(show_node))
        .route("/v1/nodes/{node}/drain", post(drain_node))
        .route("/v1/nodes/{node}/undrain", post(undrain_node))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Agents authenticate with the join token, then their node credential.
    let agents = axum::Router::new()
        .route("/v1/nodes", post(register_node))
        .route("/v1/nodes/{node}/heartbeat", post(heartbeat));
    v1.merge(agents)
        .fallback(|| async { ApiError::NotFound("route".into()) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match bearer(request.headers()) {
        Some(token) if state.auth.is_admin(token) => Ok(next.run(request).await),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The body, or the right error when it is too large or unreadable.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit_bytes: BODY_LIMIT_BYTES,
            }
        } else {
            ApiError::Invalid(vec![FieldProblem::new("body", rejection.body_text())])
        }
    })
}

/// A JSON body into `T`, with serde's complaint (which names the field and
/// the line) as a 400.
fn json_body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::Invalid(vec![FieldProblem {
            path: "body".into(),
            line: Some(e.line()),
            column: Some(e.column()),
            message: e.to_string(),
        }])
    })
}

fn text(bytes: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(bytes)
        .map_err(|e| ApiError::Invalid(vec![FieldProblem::new("body", format!("not UTF-8: {e}"))]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
}

async fn create_project(
    State(state): State<ApiState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: NewProject = json_body(&body(raw)?)?;
    let (project, created) = state.apps.create_project(&request.name).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(project)).into_response())
}

async fn list_projects(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.apps.projects().await?).into_response())
}

async fn show_project(
    State(state): State<ApiState>,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.project(&project).await?).into_response())
}

/// The manifest's format: JSON when the client says so, YAML otherwise
/// (YAML is what people write).
fn manifest_format(headers: &HeaderMap) -> Format {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/json") {
        Format::Json
    } else {
        Format::Yaml
    }
}

async fn apply(
    State(state): State<ApiState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(raw)?;
    let manifest =
        keel_manifest::parse(text(&bytes)?, manifest_format(&headers)).map_err(|errors| {
            ApiError::Invalid(
                errors
                    .into_problems()
                    .into_iter()
                    .map(|p| FieldProblem {
                        path: p.path,
                        line: Some(p.line),
                        column: Some(p.column),
                        message: p.message,
                    })
                    .collect(),
            )
        })?;
    let applied = state.apps.apply(manifest).await?;
    let status = if applied.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(applied)).into_response())
}

/// A query string into `T`, or a 400 in the API's error shape.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(|rejection| {
        ApiError::Invalid(vec![FieldProblem::new("query", rejection.body_text())])
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppsQuery {
    project: Option<String>,
}

async fn list_apps(
    State(state): State<ApiState>,
    raw: Result<Query<AppsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query(raw)?;
    Ok(Json(state.apps.apps(query.project.as_deref()).await?).into_response())
}

async fn show_app(
    State(state): State<ApiState>,
    Path((project, app)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let record = state.apps.app(&project, &app).await?;
    let revision = state.apps.revision(&project, &app, record.revision).await?;
    Ok(Json(serde_json::json!({ "app": record, "revision": revision })).into_response())
}

async fn delete_app(
    State(state): State<ApiState>,
    Path((project, app)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.delete(&project, &app).await?).into_response())
}

async fn list_revisions(
    State(state): State<ApiState>,
    Path((project, app)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.revisions(&project, &app).await?).into_response())
}

async fn show_revision(
    State(state): State<ApiState>,
    Path((project, app, revision)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let number: u64 = revision.parse().map_err(|_| {
        ApiError::Invalid(vec![FieldProblem::new(
            "revision",
            format!("{revision:?} is not a revision number"),
        )])
    })?;
    state.apps.app(&project, &app).await?;
    Ok(Json(state.apps.revision(&project, &app, number).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    revision: Option<u64>,
}

async fn rollback(
    State(state): State<ApiState>,
    Path((project, app)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(raw)?;
    let request: RollbackRequest = if bytes.is_empty() {
        RollbackRequest::default()
    } else {
        json_body(&bytes)?
    };
    Ok(Json(
        state
            .apps
            .rollback(&project, &app, request.revision)
            .await?,
    )
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    project: Option<String>,
    app: Option<String>,
    limit: Option<usize>,
}

async fn list_events(
    State(state): State<ApiState>,
    raw: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query(raw)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let events = state
        .apps
        .events(query.project.as_deref(), query.app.as_deref(), limit)
        .await?;
    Ok(Json(events).into_response())
}

async fn register_node(
    State(state): State<ApiState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    match bearer(&headers) {
        Some(token) if state.auth.is_join(token) || state.auth.is_admin(token) => {}
        _ => return Err(ApiError::Unauthorized),
    }
    let registration: Registration = json_body(&body(raw)?)?;
    let registered = state.nodes.register(registration).await?;
    Ok((StatusCode::CREATED, Json(registered)).into_response())
}

async fn heartbeat(
    State(state): State<ApiState>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = bearer(&headers).ok_or(ApiError::Unauthorized)?;
    if !state.auth.is_admin(token) {
        state.nodes.authenticate(&node, token).await?;
    }
    state.nodes.heartbeat_alive(&node).await?;
    Ok(Json(state.nodes.show(&node).await?).into_response())
}

async fn list_nodes(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.list().await?).into_response())
}

async fn show_node(
    State(state): State<ApiState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.show(&node).await?).into_response())
}

async fn drain_node(
    State(state): State<ApiState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.set_draining(&node, true).await?).into_response())
}

async fn undrain_node(
    State(state): State<ApiState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.set_draining(&node, false).await?).into_response())
}
