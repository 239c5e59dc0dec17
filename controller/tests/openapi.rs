//! The OpenAPI document: generated from the code, checked in at
//! `controller/openapi.json`, and in step with the routes the controller
//! serves. When the code changes the API, the checked-in document must
//! change with it, in the same commit.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::collections::BTreeSet;

use keel_controller::api::{self, PUBLIC_ROUTES, ROUTES};
use serde_json::Value;

const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
const UPDATE_VAR: &str = "KEEL_UPDATE_OPENAPI";
const REGENERATE: &str = "KEEL_UPDATE_OPENAPI=1 cargo test -p keel-controller --test openapi";

fn document() -> Value {
    serde_json::from_str(&api::openapi_json()).unwrap()
}

/// (METHOD, path template) of every operation in the document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// ("METHOD path", path template, operation object) of every operation.
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    documented_operations(doc)
        .into_iter()
        .map(|(method, path)| {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            (format!("{method} {path}"), path, operation)
        })
        .collect()
}

/// The `{name}`s of a path template.
fn template_parameters(template: &str) -> BTreeSet<String> {
    template
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_checked_in_document_is_the_one_the_code_generates() {
    let generated = api::openapi_json();
    let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
    if std::env::var_os(UPDATE_VAR).is_some() {
        if checked_in != generated {
            std::fs::write(CHECKED_IN, &generated).unwrap();
            eprintln!("wrote {CHECKED_IN}");
        }
        return;
    }
    if checked_in == generated {
        return;
    }
    let (line, ours, theirs) = checked_in
        .lines()
        .map(Some)
        .chain(std::iter::repeat(None))
        .zip(generated.lines().map(Some).chain(std::iter::repeat(None)))
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, a, b))
        .unwrap_or((0, None, None));
    panic!(
        "{CHECKED_IN} is not the document the code generates (first difference at line \
         {line}: checked in {ours:?}, generated {theirs:?}).\n\
         If the API change is intended, regenerate it and commit it with the change:\n    \
         {REGENERATE}"
    );
}

#[test]
fn the_document_has_exactly_the_routes_of_api_routes() {
    let documented = documented_operations(&document());
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .chain(PUBLIC_ROUTES)
        .map(|(method, _, template)| (method.as_str().to_owned(), (*template).to_owned()))
        .collect();
    assert_eq!(
        listed.len(),
        ROUTES.len() + PUBLIC_ROUTES.len(),
        "api::ROUTES and api::PUBLIC_ROUTES have a duplicate"
    );
    let undocumented: Vec<_> = listed.difference(&documented).collect();
    let unlisted: Vec<_> = documented.difference(&listed).collect();
    assert!(
        undocumented.is_empty() && unlisted.is_empty(),
        "in api::ROUTES but not in the document: {undocumented:?}; \
         in the document but not in api::ROUTES: {unlisted:?}"
    );
}

#[test]
fn every_sample_path_in_api_routes_fits_its_template() {
    for (method, sample, template) in ROUTES.iter().chain(PUBLIC_ROUTES) {
        let samples: Vec<&str> = sample.split('/').collect();
        let templates: Vec<&str> = template.split('/').collect();
        assert_eq!(
            samples.len(),
            templates.len(),
            "{method} {sample} does not fit {template}"
        );
        for (s, t) in samples.iter().zip(&templates) {
            let fits = if t.starts_with('{') && t.ends_with('}') {
                !s.is_empty()
            } else {
                s == t
            };
            assert!(fits, "{method} {sample} does not fit {template}");
        }
    }
}

#[test]
fn every_operation_names_its_path_parameters_and_a_known_token_and_a_401() {
    let doc = document();
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let public: BTreeSet<&str> = PUBLIC_ROUTES.iter().map(|(_, _, t)| *t).collect();
    for (label, template, operation) in operations(&doc) {
        if public.contains(template.as_str()) {
            assert!(
                operation.get("security").is_none(),
                "{label}: a public route names no token"
            );
            assert!(
                operation["responses"].get("401").is_none(),
                "{label}: a public route never answers 401"
            );
            continue;
        }
        let declared: BTreeSet<String> = operation["parameters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            declared,
            template_parameters(&template),
            "{label}: path parameters"
        );
        let security = operation["security"].as_array();
        assert!(
            security.is_some_and(|s| !s.is_empty()),
            "{label}: every route takes a token, so every operation says which"
        );
        for requirement in security.unwrap() {
            for name in requirement.as_object().unwrap().keys() {
                assert!(
                    schemes.contains_key(name),
                    "{label}: security scheme {name:?} is not in components.securitySchemes"
                );
            }
        }
        assert!(
            operation["responses"].get("401").is_some(),
            "{label}: no 401 response"
        );
    }
}

#[test]
fn every_reference_in_the_document_resolves() {
    fn walk<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    refs.push(target);
                }
                map.values().for_each(|v| walk(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
            _ => {}
        }
    }
    let doc = document();
    let mut refs = Vec::new();
    walk(&doc, &mut refs);
    assert!(!refs.is_empty());
    for target in refs {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{target}: not a reference inside the document"));
        assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
    }
}

#[tokio::test]
async fn the_controller_serves_the_document_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::start_server(dir.path()).await;
    let url = format!("http://{}{}", server.addr, api::OPENAPI_PATH);
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content type"
    );
    assert_eq!(response.text().await.unwrap(), api::openapi_json());
    server.shutdown().await.unwrap();
}
