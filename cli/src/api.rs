//! The controller's API as the CLI calls it, with errors a person can act
//! on: which URL did not answer, that the token was rejected, and the
//! API's own words (with every field problem) for everything else.

use std::time::Duration;

use anyhow::anyhow;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A failed call, as the CLI reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the Keel API at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the API at {url} rejected the token (run `keel login {url} --token TOKEN`)")]
    Unauthorized { url: String },
    /// The API's answer: its status, its stable code, its message, and the
    /// problems by field.
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
        problems: Vec<Problem>,
    },
}

impl ApiError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Api { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    pub path: String,
    #[serde(default)]
    pub line: Option<u64>,
    #[serde(default)]
    pub column: Option<u64>,
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
    #[serde(default)]
    problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct Api {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: &str) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(anyhow!(
                "{url:?} is not an API URL: it must start with http:// or https://"
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| anyhow!("cannot build the HTTP client: {error}"))?;
        Ok(Self {
            url,
            token: token.to_owned(),
            http,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// Sends a request and turns a non-2xx answer into an [`ApiError`].
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(&error))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ApiError::Unauthorized {
                url: self.url.clone(),
            });
        }
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ApiError::Api {
                status,
                code: body.error,
                message: body.message,
                problems: body.problems,
            },
            Err(_) => ApiError::Api {
                status,
                code: "unknown".into(),
                message: format!("{status}: {}", text.trim()),
                problems: Vec::new(),
            },
        })
    }

    fn unreachable(&self, error: &reqwest::Error) -> ApiError {
        let mut cause = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            cause = format!("{cause}: {inner}");
            source = inner.source();
        }
        ApiError::Unreachable {
            url: self.url.clone(),
            cause,
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let response = self.send(self.request(Method::GET, path)).await?;
        self.decode(response).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ApiError> {
        let response = self
            .send(self.request(Method::POST, path).json(body))
            .await?;
        self.decode(response).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let response = self.send(self.request(Method::DELETE, path)).await?;
        self.decode(response).await
    }

    /// Posts a manifest as the user wrote it (YAML or JSON), so the API's
    /// line numbers are the file's.
    pub async fn apply(&self, text: String, json: bool) -> Result<Value, ApiError> {
        let content_type = if json {
            "application/json"
        } else {
            "application/yaml"
        };
        let request = self
            .request(Method::POST, "/v1/apps")
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(text);
        let response = self.send(request).await?;
        self.decode(response).await
    }

    /// A streamed response, for `logs -f`.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ApiError> {
        self.send(self.request(Method::GET, path)).await
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, ApiError> {
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.unreachable(&error))?;
        serde_json::from_slice(&bytes).map_err(|error| ApiError::Api {
            status,
            code: "unreadable".into(),
            message: format!(
                "the API at {} answered something this CLI cannot read: {error}",
                self.url
            ),
            problems: Vec::new(),
        })
    }
}

/// Percent-encodes one path segment or query value.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
