//! The OpenAPI 3 document of the `/v1` API, generated from the code.
//!
//! The paths come from the `#[utoipa::path]` annotation on each handler,
//! which is also where the router takes the handler's route from
//! (`routes!` in `api::admin_routes`, `api::agent_routes` and
//! `api::public_routes`, the probes that take no token), so the two cannot
//! differ. (The one route added without `routes!` is `/v1/openapi.json`
//! itself, which is not in the document.) The schemas come from `#[derive(ToSchema)]` on the types the
//! handlers send and receive. What is left is here: the document's info,
//! the security schemes, and the error responses every route shares.
//!
//! The document is checked in as `controller/openapi.json`; the test
//! `controller/tests/openapi.rs` fails when the two differ.

use std::borrow::Cow;

use utoipa::openapi::schema::{AdditionalProperties, Object, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToResponse, ToSchema};
use utoipa_axum::router::OpenApiRouter;

use super::error::ErrorBody;

const DESCRIPTION: &str = "\
The controller's REST API: projects, apps and their revisions, events, and \
nodes.

Every route but `/healthz` and `/readyz` (probes for a supervisor, which \
reveal nothing else) takes a bearer token (`Authorization: Bearer \
<token>`); which one is in each operation's `security`. Users use the admin token. Agents \
register a node with the join token and then heartbeat with the node \
credential that registration returns.

Every error has the same body, `ErrorBody`: a stable `error` word for \
scripts, a `message` for people and, for 400, every `problems[]` found, each \
with its field path (and, in a manifest, its line and column). Request \
bodies over the size limit are refused with 413.

This document is served without a token at `GET /v1/openapi.json`.";

/// Info, security schemes and shared responses; the paths are added from
/// the router in [`document`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel controller API",
        version = "v1",
        description = DESCRIPTION,
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(
        schemas(ErrorBody, super::RollbackRequest, super::Health),
        responses(Unauthorized, TooLarge, Unavailable, Internal),
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "projects", description = "Projects: the tenants apps belong to."),
        (name = "apps", description = "Apps, their revisions, rollback and deletion."),
        (name = "events", description = "What happened, oldest first."),
        (name = "nodes", description = "Nodes: registration and heartbeats (by agents), listing and draining (by operators)."),
        (name = "routes", description = "The route table routers serve."),
        (name = "certs", description = "TLS certificates for terminated routes."),
        (name = "health", description = "Liveness and readiness probes for a supervisor; no token."),
    ),
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        // These names are the ones handlers write in `security(...)`, which
        // takes only literals; the drift test checks that they match.
        let schemes = [
            (
                "admin_token",
                "keel-admin-<64 hex digits>",
                "The admin token: made at the controller's first start and \
                 written to `admin.token` in its data directory (mode 0600; never \
                 printed). Every route that takes a token accepts it.",
            ),
            (
                "join_token",
                "keel-join-<64 hex digits>",
                "The join token (`join.token` in the controller's data \
                 directory): lets an agent register a node, and nothing else.",
            ),
            (
                "node_credential",
                "keel-node-<64 hex digits>",
                "A node's credential, returned once by `POST /v1/nodes` \
                 (`token`): authenticates that node's heartbeats, and only \
                 that node's. Registering the node again replaces it.",
            ),
        ];
        for (name, format, description) in schemes {
            let scheme = Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format(format)
                .description(Some(description))
                .build();
            components
                .security_schemes
                .insert(name.to_owned(), SecurityScheme::Http(scheme));
        }
    }
}

/// A response whose body is an [`ErrorBody`].
fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build(),
        )
        .build()
        .into()
}

/// Error responses whose meaning is the same on every route, referenced
/// from `components/responses` rather than repeated. Errors whose meaning
/// depends on the route (400, 404, 409, 422) are written at the route.
macro_rules! shared_error_responses {
    ($($name:ident: $description:expr;)*) => {$(
        pub(super) struct $name;

        impl<'r> ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<Response>) {
                (stringify!($name), error_response(&$description))
            }
        }
    )*};
}

shared_error_responses! {
    Unauthorized: "The bearer token is missing, or is not one this route accepts (`unauthorized`).";
    TooLarge: format!(
        "The request body is larger than {} bytes (`too_large`).",
        super::BODY_LIMIT_BYTES
    );
    Unavailable: "The cluster store cannot be reached; the message names it (`unavailable`). Safe to retry.";
    Internal: "A bug or a damaged stored record (`internal`).";
}

/// Stands for `keel_manifest::AppManifest`, which this document describes
/// only as an object: its fields, defaults and rules are in
/// `manifest/REFERENCE.md`, and one description is better than two that
/// drift apart.
pub(crate) struct AppManifest;

impl PartialSchema for AppManifest {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .description(Some(
                "An app manifest: the app's name, project, image, instances, ports, \
                 routes, health checks, placement and rollout. Its fields, their \
                 defaults and every rule are in `manifest/REFERENCE.md` in the Keel \
                 repository. Unknown fields are errors. In a revision, it is the \
                 manifest as validated, with every default written out.",
            ))
            .build()
            .into()
    }
}

impl ToSchema for AppManifest {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("AppManifest")
    }
}

/// The schema of `NodeView::status`, which is a `&'static str` in the code.
pub(crate) fn node_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ready", "draining", "lost"]))
        .description(Some(
            "`ready`: heartbeating and taking work; `draining`: heartbeating, \
             but an operator asked for no new work here; `lost`: heartbeats \
             stopped.",
        ))
        .build()
}

/// The whole document: [`ApiDoc`] plus every route the router serves.
fn document() -> utoipa::openapi::OpenApi {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(super::admin_routes())
        .merge(super::agent_routes())
        .merge(super::public_routes())
        .into_openapi()
}

/// The document as pretty JSON with a final newline, exactly as checked in
/// at `controller/openapi.json`. Keys are in a stable order (maps are
/// sorted, structs keep their field order), so the text changes only when
/// the API does.
pub fn openapi_json() -> String {
    let mut json = document()
        .to_pretty_json()
        .expect("the document is plain data with string keys, so it always serializes");
    json.push('\n');
    json
}
