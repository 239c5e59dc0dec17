//! The versioned REST API (`/v1/...`): HTTP in, calls on [`Apps`] out.
//!
//! Handlers only translate: they read the request (path, query, body), call
//! the logic, and turn the result into JSON. Every failure is an
//! [`ApiError`], mapped to a status in `error.rs` and nowhere else.
//!
//! Each handler's `#[utoipa::path]` is both its route (the router is built
//! from them with `routes!`) and its entry in the OpenAPI document (see
//! `openapi.rs`).

mod error;
pub(crate) mod openapi;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use keel_manifest::Format;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, FieldProblem};
pub use openapi::openapi_json;

use crate::agents::{Agents, InstanceView};
use crate::apps::{Applied, Apps};
use crate::auth::Auth;
use crate::changes::{Changed, Changes};
use crate::nodes::{NodeView, Nodes, Registered, Registration};
use crate::records::{AppRecord, EventRecord, ProjectRecord, RevisionRecord};
use crate::routes::Routes;
use error::ErrorBody;
use openapi::{Internal, TooLarge, Unauthorized, Unavailable};

/// How often a stream with nothing to say sends a blank line.
pub const STREAM_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 1 << 20;

/// Every route of the API: its method, a concrete path that reaches it,
/// and its path template as the router and the OpenAPI document write it.
/// The tests prove that each one requires a token and that the document
/// has exactly these. Keep in step with `admin_routes` and
/// `agent_routes`.
pub const ROUTES: &[(Method, &str, &str)] = &[
    (Method::GET, "/v1/certs", "/v1/certs"),
    (Method::POST, "/v1/certs", "/v1/certs"),
    (
        Method::DELETE,
        "/v1/certs/h.example.com",
        "/v1/certs/{host}",
    ),
    (Method::GET, "/v1/routes", "/v1/routes"),
    (Method::GET, "/v1/routes/watch", "/v1/routes/watch"),
    (Method::GET, "/v1/instances", "/v1/instances"),
    (
        Method::GET,
        "/v1/projects/p/apps/a/instances",
        "/v1/projects/{project}/apps/{app}/instances",
    ),
    (
        Method::GET,
        "/v1/nodes/n/instances/watch",
        "/v1/nodes/{node}/instances/watch",
    ),
    (
        Method::POST,
        "/v1/nodes/n/status",
        "/v1/nodes/{node}/status",
    ),
    (
        Method::POST,
        "/v1/nodes/n/logs/r",
        "/v1/nodes/{node}/logs/{request}",
    ),
    (
        Method::GET,
        "/v1/projects/p/apps/a/logs",
        "/v1/projects/{project}/apps/{app}/logs",
    ),
    (Method::GET, "/v1/projects", "/v1/projects"),
    (Method::POST, "/v1/projects", "/v1/projects"),
    (Method::GET, "/v1/projects/p", "/v1/projects/{project}"),
    (Method::GET, "/v1/apps", "/v1/apps"),
    (Method::POST, "/v1/apps", "/v1/apps"),
    (
        Method::GET,
        "/v1/projects/p/apps/a",
        "/v1/projects/{project}/apps/{app}",
    ),
    (
        Method::DELETE,
        "/v1/projects/p/apps/a",
        "/v1/projects/{project}/apps/{app}",
    ),
    (
        Method::GET,
        "/v1/projects/p/apps/a/revisions",
        "/v1/projects/{project}/apps/{app}/revisions",
    ),
    (
        Method::GET,
        "/v1/projects/p/apps/a/revisions/1",
        "/v1/projects/{project}/apps/{app}/revisions/{revision}",
    ),
    (
        Method::POST,
        "/v1/projects/p/apps/a/rollback",
        "/v1/projects/{project}/apps/{app}/rollback",
    ),
    (
        Method::POST,
        "/v1/projects/p/apps/a/scale",
        "/v1/projects/{project}/apps/{app}/scale",
    ),
    (
        Method::POST,
        "/v1/projects/p/apps/a/restart",
        "/v1/projects/{project}/apps/{app}/restart",
    ),
    (Method::GET, "/v1/events", "/v1/events"),
    (Method::GET, "/v1/watch", "/v1/watch"),
    (Method::POST, "/v1/nodes", "/v1/nodes"),
    (Method::GET, "/v1/nodes", "/v1/nodes"),
    (Method::GET, "/v1/nodes/n", "/v1/nodes/{node}"),
    (
        Method::POST,
        "/v1/nodes/n/heartbeat",
        "/v1/nodes/{node}/heartbeat",
    ),
    (Method::POST, "/v1/nodes/n/drain", "/v1/nodes/{node}/drain"),
    (
        Method::POST,
        "/v1/nodes/n/undrain",
        "/v1/nodes/{node}/undrain",
    ),
];

/// The routes that take no token, in the form of [`ROUTES`]: a
/// supervisor's liveness and readiness probes, which reveal nothing about
/// the cluster.
pub const PUBLIC_ROUTES: &[(Method, &str, &str)] = &[
    (Method::GET, "/healthz", "/healthz"),
    (Method::GET, "/readyz", "/readyz"),
];

/// How long `/readyz` waits for the store before it says not ready.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the OpenAPI document is served, without a token (it is public and
/// says nothing about the cluster). Not in [`ROUTES`], which are the
/// routes that require one.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

#[derive(Debug, Clone)]
pub struct ApiState {
    pub apps: Apps,
    pub nodes: Arc<Nodes>,
    pub agents: Agents,
    pub routes: Routes,
    pub certs: crate::certs::Certs,
    pub changes: Changes,
    pub auth: Arc<Auth>,
    /// The cluster store itself, for `/readyz`.
    pub store: Arc<dyn keel_store::Store>,
    /// Becomes true when the controller stops: open streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The routes that take the admin token. Each handler's path and method
/// come from its `#[utoipa::path]`; handlers in one `routes!` share a path.
fn admin_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_projects, create_project))
        .routes(routes!(show_project))
        .routes(routes!(list_apps, apply))
        .routes(routes!(show_app, delete_app))
        .routes(routes!(list_revisions))
        .routes(routes!(show_revision))
        .routes(routes!(rollback))
        .routes(routes!(scale))
        .routes(routes!(restart))
        .routes(routes!(list_events))
        .routes(routes!(watch))
        .routes(routes!(list_nodes))
        .routes(routes!(show_node))
        .routes(routes!(drain_node))
        .routes(routes!(undrain_node))
        .routes(routes!(list_instances))
        .routes(routes!(route_table))
        .routes(routes!(list_certs, add_cert))
        .routes(routes!(delete_cert))
        .routes(routes!(app_instances))
        .routes(routes!(app_logs))
}

/// The routes agents call: they authenticate with the join token, then
/// with their node credential, and check the token themselves.
fn agent_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(register_node))
        .routes(routes!(heartbeat))
        .routes(routes!(watch_instances))
        .routes(routes!(report_status))
        .routes(routes!(answer_logs))
        .routes(routes!(watch_routes))
}

/// The routes that take no token (see [`PUBLIC_ROUTES`]).
fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

pub fn router(state: ApiState) -> axum::Router {
    let (public, _) = public_routes().split_for_parts();
    let (admin, _) = admin_routes()
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .split_for_parts();
    let (agents, _) = agent_routes().split_for_parts();
    let document = Bytes::from(openapi_json());
    let serve_document = get(move || {
        let document = document.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], document) }
    });
    admin
        .merge(agents)
        .merge(public)
        .merge(crate::console::router())
        .route(OPENAPI_PATH, serve_document)
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

/// What `/healthz` and `/readyz` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `not_ready`.
    pub status: &'static str,
    /// Why the controller is not ready (503 only; absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub reason: Option<String>,
}

/// Says the process serves
///
/// A liveness probe: 200 whenever the controller answers HTTP at all; it
/// looks at nothing else. Takes no token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "The controller serves requests.", body = Health),
    ),
)]
async fn healthz() -> Response {
    Json(Health {
        status: "ok",
        reason: None,
    })
    .into_response()
}

/// Says whether the controller can do its work
///
/// A readiness probe: 200 when the cluster store answers and can accept
/// writes, 503 with a short `reason` when it does not answer within 2
/// seconds, fails, or says it cannot write. Writes nothing. Takes no token.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "The cluster store answers and can write.", body = Health),
        (status = 503, description = "The cluster store does not answer or cannot write; `reason` says which.", body = Health),
    ),
)]
async fn readyz(State(state): State<ApiState>) -> Response {
    let reason = match tokio::time::timeout(READY_TIMEOUT, state.store.status()).await {
        Ok(Ok(status)) => status.write_error.map(|error| {
            format!(
                "the cluster store ({}) cannot write: {error}",
                status.location
            )
        }),
        Ok(Err(error)) => Some(format!(
            "the cluster store does not answer: {}",
            error_chain(&error)
        )),
        Err(_) => Some(format!(
            "the cluster store did not answer within {} s",
            READY_TIMEOUT.as_secs()
        )),
    };
    match reason {
        None => Json(Health {
            status: "ok",
            reason: None,
        })
        .into_response(),
        Some(reason) => {
            tracing::warn!(%reason, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "not_ready",
                    reason: Some(reason),
                }),
            )
                .into_response()
        }
    }
}

/// An error and its sources, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        if !text.contains(&words) {
            text = format!("{text}: {words}");
        }
        source = cause.source();
    }
    text
}

/// Path parameters naming a project.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct ProjectPath {
    /// The project's name (a DNS label).
    project: String,
}

/// Path parameters naming an app.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct AppPath {
    /// The project's name (a DNS label).
    project: String,
    /// The app's name (a DNS label).
    app: String,
}

/// Path parameters naming one revision of an app.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct RevisionPath {
    /// The project's name (a DNS label).
    project: String,
    /// The app's name (a DNS label).
    app: String,
    /// The revision's number.
    // A string, so that a bad number gets this API's 400 (from the
    // handler) rather than the framework's.
    #[param(value_type = u64)]
    revision: String,
}

/// Path parameters naming a node.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct NodePath {
    /// The node's name (a DNS label).
    node: String,
}

/// A project to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewProject {
    /// A DNS label: 1 to 63 lowercase letters, digits or '-', starting with
    /// a letter and not ending with '-'.
    name: String,
}

/// Creates a project
///
/// Idempotent: creating a project that exists changes nothing and returns
/// it with 200.
#[utoipa::path(
    post,
    path = "/v1/projects",
    tag = "projects",
    security(("admin_token" = [])),
    request_body = NewProject,
    responses(
        (status = 201, description = "The project was created.", body = ProjectRecord),
        (status = 200, description = "The project already existed; nothing changed.", body = ProjectRecord),
        (status = 400, description = "The body is not a `NewProject`, or the name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 413, response = TooLarge),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
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

/// Lists every project
#[utoipa::path(
    get,
    path = "/v1/projects",
    tag = "projects",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every project, by name.", body = Vec<ProjectRecord>),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_projects(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.apps.projects().await?).into_response())
}

/// Shows a project
#[utoipa::path(
    get,
    path = "/v1/projects/{project}",
    tag = "projects",
    security(("admin_token" = [])),
    params(ProjectPath),
    responses(
        (status = 200, description = "The project.", body = ProjectRecord),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such project.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn show_project(
    State(state): State<ApiState>,
    Path(ProjectPath { project }): Path<ProjectPath>,
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

/// Applies an app manifest
///
/// Records the manifest as the app's desired state: a new revision when it
/// means something different from the current revision's manifest, none
/// when it means the same (key order and defaults written out or left out
/// do not count). The app's project is created on first use.
#[utoipa::path(
    post,
    path = "/v1/apps",
    tag = "apps",
    security(("admin_token" = [])),
    params(ApplyQuery),
    request_body(
        description = "The manifest, as YAML (any content type but \
            `application/json`) or JSON (`application/json`).",
        content(
            (openapi::AppManifest = "application/yaml", example = json!(
                "name: web\nproject: shop\nimage: nginx:1.27\ninstances: 2\nports:\n  - name: http\n    port: 80\n"
            )),
            (openapi::AppManifest = "application/json", example = json!({
                "name": "web",
                "project": "shop",
                "image": "nginx:1.27",
                "instances": 2,
                "ports": [{"name": "http", "port": 80}]
            })),
        ),
    ),
    responses(
        (status = 201, description = "The app did not exist; it was created with revision 1.", body = Applied),
        (status = 200, description = "The app existed; `changed` says whether the manifest made a new revision.", body = Applied),
        (status = 400, description = "The manifest is invalid: every problem, with its field path, line and column.", body = ErrorBody, example = json!({
            "error": "invalid",
            "message": "invalid request: ports[0].port: must be 1..65535, got 70000",
            "problems": [{"path": "ports[0].port", "line": 7, "column": 11, "message": "must be 1..65535, got 70000"}]
        })),
        (status = 401, response = Unauthorized),
        (status = 409, description = "`expected_revision` is stale (the app is at another revision), or other writes to the app kept winning the race; fetch it and try again. A route already served by another app is also a 409.", body = ErrorBody),
        (status = 413, response = TooLarge),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn apply(
    State(state): State<ApiState>,
    headers: HeaderMap,
    raw_query: Result<Query<ApplyQuery>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let expected = query(raw_query)?.expected_revision;
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
    let applied = state.apps.apply(manifest, expected).await?;
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

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AppsQuery {
    /// Only this project's apps.
    project: Option<String>,
}

/// Optimistic concurrency for an apply.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ApplyQuery {
    /// Apply only if the app is at this revision now (0: only if it does
    /// not exist yet); otherwise 409, and nothing changes.
    expected_revision: Option<u64>,
}

/// Lists apps
#[utoipa::path(
    get,
    path = "/v1/apps",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppsQuery),
    responses(
        (status = 200, description = "The apps, by project and name.", body = Vec<AppRecord>),
        (status = 400, description = "An unknown query parameter, or a project name that is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_apps(
    State(state): State<ApiState>,
    raw: Result<Query<AppsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query(raw)?;
    Ok(Json(state.apps.apps(query.project.as_deref()).await?).into_response())
}

/// An app and the revision it runs now.
#[derive(Serialize, ToSchema)]
struct AppView {
    app: AppRecord,
    revision: RevisionRecord,
}

/// Shows an app and its current revision
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/apps/{app}",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    responses(
        (status = 200, description = "The app and its current revision.", body = AppView),
        (status = 400, description = "A name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn show_app(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
) -> Result<Response, ApiError> {
    let record = state.apps.app(&project, &app).await?;
    let revision = state.apps.revision(&project, &app, record.revision).await?;
    Ok(Json(AppView {
        app: record,
        revision,
    })
    .into_response())
}

/// Deletes an app and its revisions
#[utoipa::path(
    delete,
    path = "/v1/projects/{project}/apps/{app}",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    responses(
        (status = 200, description = "The app as it was before it was deleted.", body = AppRecord),
        (status = 400, description = "A name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 409, description = "The app changed while it was being deleted; try again.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn delete_app(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.delete(&project, &app).await?).into_response())
}

/// Lists an app's revisions
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/apps/{app}/revisions",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    responses(
        (status = 200, description = "Every revision of the app, oldest first.", body = Vec<RevisionRecord>),
        (status = 400, description = "A name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_revisions(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.revisions(&project, &app).await?).into_response())
}

/// Shows one revision of an app
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/apps/{app}/revisions/{revision}",
    tag = "apps",
    security(("admin_token" = [])),
    params(RevisionPath),
    responses(
        (status = 200, description = "The revision.", body = RevisionRecord),
        (status = 400, description = "A name is not a DNS label, or the revision is not a number.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app, or no such revision of it.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn show_revision(
    State(state): State<ApiState>,
    Path(RevisionPath {
        project,
        app,
        revision,
    }): Path<RevisionPath>,
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

/// Which revision to roll back to. Listed in the document's components by
/// `openapi::ApiDoc`, since `rollback` refers to it by name.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// The revision whose manifest to deploy again. Default: the one
    /// before the current revision.
    revision: Option<u64>,
}

/// Rolls an app back
///
/// Deploys an older revision's manifest again, as a new revision (the
/// history is never rewritten). The body is optional: without it, or
/// without `revision`, the target is the revision before the current one.
#[utoipa::path(
    post,
    path = "/v1/projects/{project}/apps/{app}/rollback",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    // A `ref` rather than the type, which would make the body required
    // (or, as an `Option`, allow `null`, which the handler refuses).
    request_body(
        content = ref("#/components/schemas/RollbackRequest"),
        content_type = "application/json",
        description = "Optional: without a body, or without `revision`, the \
            target is the revision before the current one.",
    ),
    responses(
        (status = 200, description = "The app and the new revision, whose `cause` names the target.", body = Applied),
        (status = 400, description = "A name is not a DNS label, or the body is not a `RollbackRequest`.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app, or no such revision of it.", body = ErrorBody),
        (status = 409, description = "Other writes to the app kept winning the race; try again.", body = ErrorBody),
        (status = 413, response = TooLarge),
        (status = 422, description = "There is no revision before the current one, or the app already runs the target.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn rollback(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
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

/// The instance count to scale to.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    /// How many instances run: 0..1000 (0 keeps the app defined but
    /// stopped).
    #[schema(value_type = u32)]
    instances: serde_json::Value,
}

/// Scales an app
///
/// Changes only the instance count: a new revision with the current
/// manifest and `instances` changed (none when the count is already that).
/// Running instances stay; only the difference is started or stopped.
#[utoipa::path(
    post,
    path = "/v1/projects/{project}/apps/{app}/scale",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    request_body = ScaleRequest,
    responses(
        (status = 200, description = "The app and its revision; `changed` says whether the count was new.", body = Applied),
        (status = 400, description = "A name is not a DNS label, the body is not a `ScaleRequest`, or `instances` is out of range; nothing changed.", body = ErrorBody, example = json!({
            "error": "invalid",
            "message": "invalid request: instances: must be 0..1000, got 5000",
            "problems": [{"path": "instances", "message": "must be 0..1000, got 5000"}]
        })),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 409, description = "Other writes to the app kept winning the race; try again.", body = ErrorBody),
        (status = 413, response = TooLarge),
        (status = 422, description = "The app is global: it has no count.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn scale(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ScaleRequest = json_body(&body(raw)?)?;
    let instances = request.instances.as_u64().ok_or_else(|| {
        ApiError::Invalid(vec![FieldProblem::new(
            "instances",
            format!(
                "must be a whole number of instances, got {}",
                request.instances
            ),
        )])
    })?;
    Ok(Json(state.apps.scale(&project, &app, instances).await?).into_response())
}

/// Restarts an app's instances, rolling
///
/// A new revision with the same manifest whose instances replace every
/// running one, as a new manifest's would: under the app's update strategy
/// (`max_surge`, `max_unavailable`, `min_ready`), so the app stays up.
/// Takes no body.
#[utoipa::path(
    post,
    path = "/v1/projects/{project}/apps/{app}/restart",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    responses(
        (status = 200, description = "The app and the new revision, whose `cause` is `restart`.", body = Applied),
        (status = 400, description = "A name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 409, description = "Other writes to the app kept winning the race; try again.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn restart(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.apps.restart(&project, &app).await?).into_response())
}

/// Streams which kinds of resource change
///
/// Newline-delimited JSON, one `Changed` a line: first one with nothing
/// changed (read everything now), then one per burst of changes naming
/// the kinds that changed, for as long as the connection lasts; a blank
/// line when quiet. For views that show the cluster live and re-read what
/// they show. When it breaks, connect again and re-read.
#[utoipa::path(
    get,
    path = "/v1/watch",
    tag = "events",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The stream, one `Changed` per line.", body = Changed, content_type = "application/x-ndjson"),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn watch(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(ndjson(state.changes.watch().await?, state.stopping.clone()))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only this project's events.
    project: Option<String>,
    /// Only this app's events (an app name; combine with `project`).
    app: Option<String>,
    /// At most this many events, the newest (default 100; clamped to
    /// 1..=10000).
    limit: Option<usize>,
}

/// Lists events
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    security(("admin_token" = [])),
    params(EventsQuery),
    responses(
        (status = 200, description = "The newest matching events, oldest first.", body = Vec<EventRecord>),
        (status = 400, description = "An unknown query parameter, or a `limit` that is not a number.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
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

/// Registers a node
///
/// What an agent calls to join, with the join token. The response carries
/// the node's credential, shown only here. Registering a name again (an
/// agent reinstalled on the same machine) replaces the credential, so the
/// old one stops working; a draining node stays draining.
#[utoipa::path(
    post,
    path = "/v1/nodes",
    tag = "nodes",
    security(("join_token" = []), ("admin_token" = [])),
    request_body = Registration,
    responses(
        (status = 201, description = "The node is registered, and alive until its heartbeats stop.", body = Registered),
        (status = 400, description = "The body is not a `Registration`, or every problem with its values.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 409, description = "The node is registering from elsewhere at the same time.", body = ErrorBody),
        (status = 413, response = TooLarge),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
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

/// Lets a node act for itself, or the admin for any node that exists.
async fn authorize_node(state: &ApiState, node: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    if state.auth.is_admin(token) {
        state.nodes.show_brief(node).await?;
    } else {
        state.nodes.authenticate(node, token).await?;
    }
    Ok(())
}

/// Records a node's heartbeat
///
/// Keeps the node alive for the controller's `node_lost_after` from now;
/// a node whose heartbeats stop for that long is `lost`. Takes the node's
/// own credential (or the admin token).
#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/heartbeat",
    tag = "nodes",
    security(("node_credential" = []), ("admin_token" = [])),
    params(NodePath),
    responses(
        (status = 200, description = "The node, as it is now (without `allocated`).", body = NodeView),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "With the admin token: there is no such node.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn heartbeat(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize_node(&state, &node, &headers).await?;
    state.nodes.heartbeat_alive(&node).await?;
    Ok(Json(state.nodes.show_brief(&node).await?).into_response())
}

/// Lists every node
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "nodes",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every node, by name, with its status.", body = Vec<NodeView>),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_nodes(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let mut nodes = state.nodes.list().await?;
    for node in &mut nodes {
        node.streams = Some(state.agents.open_streams(Some(&node.name)));
    }
    Ok(Json(nodes).into_response())
}

/// Shows a node
#[utoipa::path(
    get,
    path = "/v1/nodes/{node}",
    tag = "nodes",
    security(("admin_token" = [])),
    params(NodePath),
    responses(
        (status = 200, description = "The node, with its status.", body = NodeView),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such node.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn show_node(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
) -> Result<Response, ApiError> {
    let mut view = state.nodes.show(&node).await?;
    view.streams = Some(state.agents.open_streams(Some(&node)));
    Ok(Json(view).into_response())
}

/// Drains a node
///
/// No new instances are placed on a draining node. Idempotent.
#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/drain",
    tag = "nodes",
    security(("admin_token" = [])),
    params(NodePath),
    responses(
        (status = 200, description = "The node, now draining (unless it is lost).", body = NodeView),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such node.", body = ErrorBody),
        (status = 409, description = "The node kept changing; try again.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn drain_node(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.set_draining(&node, true).await?).into_response())
}

/// Stops draining a node
///
/// The node takes new instances again. Idempotent.
#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/undrain",
    tag = "nodes",
    security(("admin_token" = [])),
    params(NodePath),
    responses(
        (status = 200, description = "The node, no longer draining.", body = NodeView),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such node.", body = ErrorBody),
        (status = 409, description = "The node kept changing; try again.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn undrain_node(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.nodes.set_draining(&node, false).await?).into_response())
}

/// Streams the instances a node should run
///
/// Newline-delimited JSON, one `StreamMessage` a line: first a `snapshot`
/// of every instance placed on the node with the generation (store
/// revision) it was read at, then a `put` or `delete` per change, for as
/// long as the connection lasts. When it breaks, connect again for a new
/// snapshot. Takes the node's own credential (or the admin token).
#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/instances/watch",
    tag = "nodes",
    security(("node_credential" = []), ("admin_token" = [])),
    params(NodePath),
    responses(
        (status = 200, description = "The stream, one `StreamMessage` per line.", body = keel_protocol::StreamMessage, content_type = "application/x-ndjson"),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "With the admin token: there is no such node.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn watch_instances(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize_node(&state, &node, &headers).await?;
    Ok(ndjson(
        state.agents.watch(&node).await?,
        state.stopping.clone(),
    ))
}

/// A stream of messages as a newline-delimited JSON response, open until
/// the stream ends or the client goes.
fn ndjson<T: Serialize + Send + 'static>(
    messages: impl futures::Stream<Item = T> + Send + 'static,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let lines = messages.map(|message| {
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    });
    ndjson_lines(lines, stopping)
}

/// As [`ndjson`], for messages already written as lines (one shared
/// serialization for every client of a hub).
fn ndjson_lines(
    lines: impl futures::Stream<Item = Bytes> + Send + 'static,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Response {
    // A stream never ends by itself; it ends when the controller stops, so
    // that a graceful stop does not wait on agents and routers for ever.
    let stopped = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
    };
    // A blank line every so often when nothing else is said, so that a
    // client can tell a quiet stream from a dead connection.
    let mut tick = tokio::time::interval(STREAM_KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keepalive = tokio_stream::wrappers::IntervalStream::new(tick)
        .skip(1)
        .map(|_| Bytes::from_static(b"\n"));
    let lines = futures::stream::select(
        lines.map(Some).chain(futures::stream::once(async { None })),
        keepalive.map(Some),
    )
    .take_while(|line| futures::future::ready(line.is_some()))
    .filter_map(futures::future::ready)
    .take_until(stopped)
    .map(Ok::<_, std::convert::Infallible>);
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// What a status report changed.
#[derive(Serialize, ToSchema)]
struct Reported {
    /// How many instances' states changed and were written.
    written: usize,
}

/// Reports what a node runs
///
/// The whole state of every instance the node runs, each time; unchanged
/// states are not written again, and instances not placed on the node are
/// ignored. Takes the node's own credential (or the admin token).
#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/status",
    tag = "nodes",
    security(("node_credential" = []), ("admin_token" = [])),
    params(NodePath),
    request_body = keel_protocol::StatusReport,
    responses(
        (status = 200, description = "The report is recorded.", body = Reported),
        (status = 400, description = "The body is not a `StatusReport`.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "With the admin token: there is no such node.", body = ErrorBody),
        (status = 413, response = TooLarge),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn report_status(
    State(state): State<ApiState>,
    Path(NodePath { node }): Path<NodePath>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize_node(&state, &node, &headers).await?;
    let report: keel_protocol::StatusReport = json_body(&body(raw)?)?;
    let written = state.agents.report(&node, report).await?;
    Ok(Json(Reported { written }).into_response())
}

/// Which instances to list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct InstancesQuery {
    /// Only this project's instances (with `app`: only that app's).
    project: Option<String>,
    /// Only this app's instances; needs `project`.
    app: Option<String>,
}

/// Lists instances
///
/// Every instance, or those of one project or app, with where it is placed
/// and the state its agent reported.
#[utoipa::path(
    get,
    path = "/v1/instances",
    tag = "apps",
    security(("admin_token" = [])),
    params(InstancesQuery),
    responses(
        (status = 200, description = "The instances.", body = Vec<InstanceView>),
        (status = 400, description = "An unknown query parameter, or `app` without `project`.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_instances(
    State(state): State<ApiState>,
    raw: Result<Query<InstancesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query(raw)?;
    let instances = match (&query.project, &query.app) {
        (Some(project), Some(app)) => {
            state.apps.app(project, app).await?;
            state.agents.instances(Some((project, app))).await?
        }
        (Some(project), None) => {
            state.apps.project(project).await?;
            let all = state.agents.instances(None).await?;
            all.into_iter().filter(|i| &i.project == project).collect()
        }
        (None, Some(_)) => {
            return Err(ApiError::Invalid(vec![FieldProblem::new(
                "app",
                "name the project too (project=...&app=...)",
            )]));
        }
        (None, None) => state.agents.instances(None).await?,
    };
    Ok(Json(instances).into_response())
}

/// Lists an app's instances
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/apps/{app}/instances",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath),
    responses(
        (status = 200, description = "The app's instances.", body = Vec<InstanceView>),
        (status = 400, description = "A name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn app_instances(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
) -> Result<Response, ApiError> {
    state.apps.app(&project, &app).await?;
    Ok(Json(state.agents.instances(Some((&project, &app))).await?).into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// The last this many lines of each instance; all when absent.
    tail: Option<u32>,
    /// Keep the response open and send new lines as they are written,
    /// until the client goes away. Default false.
    #[serde(default)]
    follow: bool,
}

/// Streams an app's logs
///
/// The logs of every placed instance of the app, on whatever node, merged
/// as lines arrive, each prefixed with `[instance-id] `. The controller
/// asks each instance's agent on its node's stream; an agent that is not
/// connected, or does not answer within 10 s, gives one `keel: ...` line
/// instead. Without `follow` the response ends when every instance's log
/// has been sent.
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/apps/{app}/logs",
    tag = "apps",
    security(("admin_token" = [])),
    params(AppPath, LogsQuery),
    responses(
        (status = 200, description = "Log lines, `[instance-id] line`.", body = String, content_type = "text/plain"),
        (status = 400, description = "A name is not a DNS label, or a bad query parameter.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "There is no such app.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn app_logs(
    State(state): State<ApiState>,
    Path(AppPath { project, app }): Path<AppPath>,
    raw: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query(raw)?;
    state.apps.app(&project, &app).await?;
    let (parts, requests) = state
        .agents
        .request_logs(&project, &app, query.tail, query.follow)
        .await?;
    let streams = parts.into_iter().map(|part| {
        let prefix = format!("[{}] ", part.instance.id);
        // Each part's bytes into whole lines, each with its prefix; a last
        // line without its newline is sent when the part ends. The splitter
        // holds at most a line's limit, whatever the node sends.
        let chunks = tokio_stream::wrappers::ReceiverStream::new(part.bytes)
            .map(Some)
            .chain(futures::stream::once(async { None }));
        let mut splitter = keel_protocol::logs::LineSplitter::default();
        chunks
            .map(move |chunk| {
                let lines = match chunk {
                    Some(chunk) => splitter.push(&chunk),
                    None => splitter.finish().into_iter().collect(),
                };
                let mut out = Vec::new();
                for line in lines {
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(line.as_bytes());
                    out.push(b'\n');
                }
                Bytes::from(out)
            })
            .filter(|bytes| futures::future::ready(!bytes.is_empty()))
            .boxed()
    });
    let mut stopping = state.stopping.clone();
    let stopped = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
    };
    let merged = futures::stream::select_all(streams)
        .take_until(stopped)
        .map(move |bytes| {
            // The requests live as long as the response: when the client
            // goes, they are withdrawn and their agents stop sending.
            let _ = &requests;
            Ok::<_, std::convert::Infallible>(bytes)
        });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(merged),
    )
        .into_response())
}

/// How much of a log answer was passed on.
#[derive(Serialize, ToSchema)]
struct LogAnswered {
    /// Bytes passed on to the client.
    forwarded_bytes: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct LogAnswerPath {
    /// The node's name.
    node: String,
    /// The request id from the node's `logs` stream message.
    request: String,
}

/// Answers a log request
///
/// An agent's answer to a `logs` message of its stream: the instance's
/// log as a streamed plain-text body, passed on to the client that asked
/// as it arrives. The controller ends it (answers before the body is
/// complete) when that client goes away. Takes the node's own credential
/// (or the admin token).
#[utoipa::path(
    post,
    path = "/v1/nodes/{node}/logs/{request}",
    tag = "nodes",
    security(("node_credential" = []), ("admin_token" = [])),
    params(LogAnswerPath),
    request_body(content = String, content_type = "text/plain"),
    responses(
        (status = 200, description = "The answer ended: its body is complete, or its client went away.", body = LogAnswered),
        (status = 400, description = "The name is not a DNS label.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No such request is waiting for this node (answered, withdrawn, or never made).", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn answer_logs(
    State(state): State<ApiState>,
    Path(LogAnswerPath { node, request }): Path<LogAnswerPath>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    authorize_node(&state, &node, &headers).await?;
    let sink = state
        .agents
        .log_answer(&node, &request)
        .ok_or_else(|| ApiError::NotFound(format!("log request {request}")))?;
    let mut chunks = body.into_data_stream();
    let mut forwarded_bytes = 0u64;
    let mut stopping = state.stopping.clone();
    loop {
        let chunk = tokio::select! {
            chunk = chunks.next() => chunk,
            () = sink.closed() => break,
            _ = stopping.wait_for(|stopping| *stopping) => break,
        };
        let Some(Ok(chunk)) = chunk else { break };
        forwarded_bytes += chunk.len() as u64;
        if sink.send(chunk).await.is_err() {
            break;
        }
    }
    Ok(Json(LogAnswered { forwarded_bytes }).into_response())
}

/// Shows the route table
///
/// Every route of every app with the addresses of its ready instances, as
/// routers receive it.
#[utoipa::path(
    get,
    path = "/v1/routes",
    tag = "routes",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The route table.", body = keel_protocol::RouteTable),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn route_table(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.routes.table().await?).into_response())
}

/// Which node's router is asking.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RouterQuery {
    /// The router's node, which must have the `router` role.
    node: String,
}

/// Streams the route table to a router
///
/// Newline-delimited JSON, one whole `RouteTable` a line: the table now,
/// then again each time it changes. Takes the credential of a node with the
/// `router` role (or the admin token).
#[utoipa::path(
    get,
    path = "/v1/routes/watch",
    tag = "routes",
    security(("node_credential" = []), ("admin_token" = [])),
    params(RouterQuery),
    responses(
        (status = 200, description = "The stream, one `RouteTable` per line.", body = keel_protocol::RouteTable, content_type = "application/x-ndjson"),
        (status = 400, description = "No `node`, or an unknown query parameter.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "With the admin token: there is no such node.", body = ErrorBody),
        (status = 422, description = "The node does not have the `router` role.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn watch_routes(
    State(state): State<ApiState>,
    headers: HeaderMap,
    raw: Result<Query<RouterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let token = bearer(&headers).ok_or(ApiError::Unauthorized)?;
    // Without a node to check the credential against, only the admin
    // learns what was wrong with the query.
    let query = match query(raw) {
        Ok(query) => query,
        Err(error) if state.auth.is_admin(token) => return Err(error),
        Err(_) => return Err(ApiError::Unauthorized),
    };
    authorize_node(&state, &query.node, &headers).await?;
    if !state.auth.is_admin(token)
        && !state
            .nodes
            .show_brief(&query.node)
            .await?
            .roles
            .iter()
            .any(|r| r == "router")
    {
        return Err(ApiError::Unprocessable(format!(
            "node {} does not have the router role; register it with --roles router",
            query.node
        )));
    }
    Ok(ndjson_lines(
        state.routes.watch().await?,
        state.stopping.clone(),
    ))
}

/// Stores a TLS certificate for a host
///
/// Checked first: the chain and key parse, the key is the first
/// certificate's, and the host (a wildcard host: a name under it) is among
/// the certificate's names. Replaces the host's previous certificate.
/// Routers get it with the route table; the API never shows the key again.
#[utoipa::path(
    post,
    path = "/v1/certs",
    tag = "certs",
    security(("admin_token" = [])),
    request_body = crate::certs::NewCert,
    responses(
        (status = 201, description = "The certificate is stored.", body = crate::certs::CertSummary),
        (status = 400, description = "The body is not a `NewCert`, or the certificate, key or host is wrong (each problem by field).", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 413, response = TooLarge),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn add_cert(
    State(state): State<ApiState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: crate::certs::NewCert = json_body(&body(raw)?)?;
    let summary = state.certs.put(request).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// Lists stored TLS certificates
///
/// Host, expiry and fingerprint of each; never the key.
#[utoipa::path(
    get,
    path = "/v1/certs",
    tag = "certs",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every stored certificate, by host.", body = Vec<crate::certs::CertSummary>),
        (status = 401, response = Unauthorized),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn list_certs(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(Json(state.certs.list().await?).into_response())
}

/// The host of a stored certificate.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct CertPath {
    /// The host name (`*.example.com` for a wildcard).
    host: String,
}

/// Deletes a host's stored TLS certificate
///
/// Its routes fall back to a self-signed certificate.
#[utoipa::path(
    delete,
    path = "/v1/certs/{host}",
    tag = "certs",
    security(("admin_token" = [])),
    params(CertPath),
    responses(
        (status = 200, description = "The certificate as it was before it was deleted.", body = crate::certs::CertSummary),
        (status = 400, description = "The host is not a host name.", body = ErrorBody),
        (status = 401, response = Unauthorized),
        (status = 404, description = "No certificate is stored for the host.", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
async fn delete_cert(
    State(state): State<ApiState>,
    Path(CertPath { host }): Path<CertPath>,
) -> Result<Response, ApiError> {
    Ok(Json(state.certs.delete(&host).await?).into_response())
}
