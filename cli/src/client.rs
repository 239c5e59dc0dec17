//! The client verbs: everything a user does to a running cluster, through
//! its public API. Each verb prints a table for people and the API's own
//! objects with `-o json|yaml`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::api::{Api, ApiError, encode};
use crate::config::{self, Config, Context};
use crate::output::{self, Format, Table, age, text};

/// What every client verb needs: the API, how to print, and the context
/// (for the router's address).
#[derive(Debug)]
pub struct Session {
    pub api: Api,
    pub format: Format,
    pub context: Context,
}

impl Session {
    /// `KEEL_URL` and `KEEL_TOKEN` when both are set, else the context.
    pub fn open(context_name: Option<&str>, format: Format) -> anyhow::Result<Self> {
        let context = match (std::env::var("KEEL_URL"), std::env::var("KEEL_TOKEN")) {
            (Ok(url), Ok(token)) if context_name.is_none() => Context {
                url,
                token,
                router_http: std::env::var("KEEL_ROUTER").ok(),
            },
            _ => Config::load(&config::path())?.context(context_name)?.1,
        };
        Ok(Self {
            api: Api::new(&context.url, &context.token)?,
            format,
            context,
        })
    }
}

// ---- login and contexts ----

pub async fn login(url: &str, token: &str, name: Option<String>) -> anyhow::Result<()> {
    let api = Api::new(url, token)?;
    // Proves both that the URL answers and that the token is accepted.
    let _: Value = api.get("/v1/projects").await?;
    let name = name.unwrap_or_else(|| context_name_for(api.url()));
    let path = config::path();
    let mut config = Config::load(&path)?;
    let router_http = config
        .contexts
        .get(&name)
        .filter(|c| c.url == api.url())
        .and_then(|c| c.router_http.clone());
    config.contexts.insert(
        name.clone(),
        Context {
            url: api.url().to_owned(),
            token: token.to_owned(),
            router_http,
        },
    );
    config.current = Some(name.clone());
    config.save(&path)?;
    println!(
        "Logged in to {} (context {name:?}, saved in {})",
        api.url(),
        path.display()
    );
    Ok(())
}

/// `host:port` of the URL: the default name of its context.
pub fn context_name_for(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

pub fn contexts(format: Format) -> anyhow::Result<()> {
    let config = Config::load(&config::path())?;
    let value = json!({
        "current": config.current,
        "contexts": config.contexts.iter().map(|(name, c)| json!({
            "name": name, "url": c.url, "router_http": c.router_http,
        })).collect::<Vec<_>>(),
    });
    output::print(format, &value, |_| {
        let mut table = Table::new(&["current", "name", "url", "router"])
            .empty("No contexts: run `keel login URL --token TOKEN` or `keel up`.");
        for (name, context) in &config.contexts {
            let current = if config.current.as_deref() == Some(name) {
                "*"
            } else {
                ""
            };
            table.row(vec![
                current.into(),
                name.clone(),
                context.url.clone(),
                context.router_http.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        table
    });
    Ok(())
}

pub fn use_context(name: &str) -> anyhow::Result<()> {
    let path = config::path();
    let mut config = Config::load(&path)?;
    config.context(Some(name))?;
    config.current = Some(name.to_owned());
    config.save(&path)?;
    println!("Now using context {name:?}");
    Ok(())
}

pub fn remove_context(name: &str) -> anyhow::Result<()> {
    let path = config::path();
    let mut config = Config::load(&path)?;
    config.context(Some(name))?;
    config.contexts.remove(name);
    if config.current.as_deref() == Some(name) {
        config.current = None;
    }
    config.save(&path)?;
    println!("Removed context {name:?}");
    Ok(())
}

// ---- finding apps ----

/// Which app a user means: `project` when given, else the only project
/// with an app of that name. An unknown name suggests close ones.
pub async fn resolve_app(
    api: &Api,
    name: &str,
    project: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let apps: Vec<Value> = match project {
        Some(project) => {
            api.get(&format!("/v1/apps?project={}", encode(project)))
                .await?
        }
        None => api.get("/v1/apps").await?,
    };
    let matching: Vec<String> = apps
        .iter()
        .filter(|a| a["name"] == name)
        .map(|a| text(a, "project"))
        .collect();
    match matching.as_slice() {
        [project] => Ok((project.clone(), name.to_owned())),
        [] => {
            let mut names: Vec<String> = apps.iter().map(|a| text(a, "name")).collect();
            names.sort();
            names.dedup();
            let close = suggestions(name, &names);
            let place = project
                .map(|p| format!(" in project {p}"))
                .unwrap_or_default();
            if close.is_empty() {
                bail!("app {name:?} not found{place} (see `keel apps`)")
            }
            bail!(
                "app {name:?} not found{place}; did you mean {}?",
                close.join(" or ")
            )
        }
        many => bail!(
            "an app named {name:?} exists in projects {}: say which with --project",
            many.join(", ")
        ),
    }
}

/// Names within a small edit distance of `wanted`, or that contain it.
pub fn suggestions(wanted: &str, names: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|name| {
            let distance = strsim::osa_distance(wanted, name);
            let close = distance <= 1.max(wanted.len() / 3)
                || (wanted.len() >= 3 && (name.contains(wanted) || wanted.contains(name.as_str())));
            close.then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, n)| format!("{n:?}"))
        .collect()
}

fn app_path(project: &str, app: &str) -> String {
    format!("/v1/projects/{}/apps/{}", encode(project), encode(app))
}

fn events_path(project: &str, app: &str, limit: u32) -> String {
    format!(
        "/v1/events?project={}&app={}&limit={limit}",
        encode(project),
        encode(app)
    )
}

/// The newest `limit` events of one app.
async fn app_events(
    api: &Api,
    project: &str,
    app: &str,
    limit: u32,
) -> Result<Vec<Value>, ApiError> {
    api.get(&events_path(project, app, limit)).await
}

// ---- deploy ----

#[derive(Debug)]
pub struct DeployOptions {
    pub file: PathBuf,
    pub follow: WaitOptions,
}

pub async fn deploy(session: &Session, options: DeployOptions) -> anyhow::Result<()> {
    let shown = options.file.display().to_string();
    let text = if shown == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the manifest from stdin")?
    } else {
        std::fs::read_to_string(&options.file).with_context(|| format!("cannot read {shown}"))?
    };
    let json = shown.ends_with(".json") || text.trim_start().starts_with('{');
    let format = if json {
        keel_manifest::Format::Json
    } else {
        keel_manifest::Format::Yaml
    };
    // Checked here first, so the problems name the file and need no server.
    let manifest = match keel_manifest::parse(&text, format) {
        Ok(manifest) => manifest,
        Err(errors) => {
            let lines: Vec<String> = errors
                .problems()
                .iter()
                .map(|p| format!("{shown}:{p}"))
                .collect();
            bail!("{shown} is not a valid app manifest:\n{}", lines.join("\n"));
        }
    };
    let before = Events::before(&session.api, &manifest.project, &manifest.name).await?;
    let applied = match session.api.apply(text, json).await {
        Ok(applied) => applied,
        Err(ApiError::Api {
            message, problems, ..
        }) if !problems.is_empty() => {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| match (p.line, p.column) {
                    (Some(line), Some(column)) => {
                        format!("{shown}:{line}:{column}: {}: {}", p.path, p.message)
                    }
                    _ => format!("{shown}: {}: {}", p.path, p.message),
                })
                .collect();
            bail!("{message}\n{}", lines.join("\n"));
        }
        Err(error) => return Err(error.into()),
    };
    let revision = applied["revision"]["revision"].as_u64().unwrap_or(0);
    let (project, app) = (manifest.project.clone(), manifest.name.clone());
    if session.format != Format::Table {
        if !options.follow.wait {
            output::print(session.format, &applied, |_| Table::default());
            return Ok(());
        }
    } else if applied["changed"] == true || applied["created"] == true {
        println!("{project}/{app}: revision {revision} created");
    } else {
        println!("{project}/{app}: unchanged, still at revision {revision}");
    }
    if !options.follow.wait {
        return Ok(());
    }
    let outcome = wait_for_rollout(
        session,
        &project,
        &app,
        revision,
        before,
        options.follow.timeout,
    )
    .await;
    if session.format != Format::Table {
        output::print(session.format, &applied, |_| Table::default());
    }
    outcome?;
    for route in &manifest.routes {
        let route = match route {
            keel_manifest::Route::Host(route) => route,
            keel_manifest::Route::Tcp(route) => {
                let mut line = format!("  tcp port {} on every router", route.listen_port);
                // The router's TCP listeners default to its HTTP address's IP.
                if let Some(router) = &session.context.router_http
                    && let Ok(addr) = router.parse::<std::net::SocketAddr>()
                {
                    line.push_str(&format!(
                        "   (from here: {})",
                        std::net::SocketAddr::new(addr.ip(), route.listen_port)
                    ));
                }
                println!("{line}");
                continue;
            }
        };
        let scheme = match route.tls {
            keel_manifest::TlsMode::Off => "http",
            _ => "https",
        };
        let path = if route.path == "/" {
            ""
        } else {
            route.path.as_str()
        };
        let mut line = format!("  {scheme}://{}{path}", route.host);
        if let Some(router) = &session.context.router_http
            && scheme == "http"
        {
            line.push_str(&format!(
                "   (from here: curl -H 'Host: {}' http://{router}{})",
                route.host,
                if path.is_empty() { "/" } else { path }
            ));
        }
        println!("{line}");
    }
    Ok(())
}

/// Follows a rollout until every instance runs `revision` and is ready,
/// printing each step once; fails with the reason when the controller
/// gives up (unschedulable, crash loop) or an instance cannot start.
async fn wait_for_rollout(
    session: &Session,
    project: &str,
    app: &str,
    revision: u64,
    before: Events,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let api = &session.api;
    let quiet = session.format != Format::Table;
    let mut seen_events = before.0;
    let mut last_line = String::new();
    loop {
        let view: Value = api.get(&app_path(project, app)).await?;
        let current = view["app"]["revision"].as_u64().unwrap_or(0);
        if current != revision {
            bail!("{project}/{app} moved on to revision {current} while this rollout was waiting");
        }
        let desired = view["revision"]["manifest"]["instances"].as_u64();
        let instances: Vec<Value> = api
            .get(&format!("{}/instances", app_path(project, app)))
            .await?;
        let events = app_events(api, project, app, 50).await?;
        for event in &events {
            if seen_events.insert(Events::key(event)) {
                if !quiet {
                    println!("  {}: {}", text(event, "reason"), text(event, "message"));
                }
                if matches!(event["reason"].as_str(), Some("degraded" | "unschedulable")) {
                    bail!(
                        "the rollout of {project}/{app} revision {revision} failed: {}",
                        text(event, "message")
                    );
                }
            }
        }
        let new: Vec<&Value> = instances
            .iter()
            .filter(|i| i["revision"].as_u64() == Some(revision))
            .collect();
        if let Some(failed) = new.iter().find(|i| i["state"] == "failed") {
            bail!(
                "instance {} of {project}/{app} failed: {}",
                text(failed, "id"),
                text(failed, "reason")
            );
        }
        let ready = new.iter().filter(|i| i["ready"] == true).count();
        let old = instances.len() - new.len();
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for instance in &new {
            let state = if instance["node"].is_null() {
                "pending".to_owned()
            } else if instance["ready"] == true {
                continue;
            } else {
                text(instance, "state")
            };
            *states.entry(state).or_default() += 1;
        }
        let target = desired.map(|d| d as usize).unwrap_or(new.len().max(1));
        let mut line = format!("  ready {ready}/{target}");
        for (state, count) in &states {
            line.push_str(&format!(", {count} {state}"));
        }
        if old > 0 {
            line.push_str(&format!(", {old} old"));
        }
        if line != last_line {
            if !quiet {
                println!("{line}");
            }
            last_line = line;
        }
        if ready >= target && old == 0 && new.len() == ready {
            if !quiet {
                println!(
                    "{project}/{app} is ready: {ready}/{target} instances at revision {revision}"
                );
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let why = new
                .iter()
                .find_map(|i| i["pending_reason"].as_str().or(i["reason"].as_str()))
                .map(|why| format!(" (last reason: {why})"))
                .unwrap_or_default();
            bail!(
                "the rollout of {project}/{app} revision {revision} did not finish within {}s: {}{why}",
                timeout.as_secs(),
                last_line.trim()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The app's events that happened before a change: a rollout reports
/// (and fails on) only the ones that come after. Kept by content, not by
/// time, so neither clock skew nor a failure just before counts.
#[derive(Debug, Default)]
struct Events(std::collections::BTreeSet<(u64, String, String)>);

impl Events {
    async fn before(api: &Api, project: &str, app: &str) -> anyhow::Result<Self> {
        let events = app_events(api, project, app, 50).await?;
        Ok(Self(events.iter().map(Self::key).collect()))
    }

    fn key(event: &Value) -> (u64, String, String) {
        (
            event["time_ms"].as_u64().unwrap_or(0),
            text(event, "reason"),
            text(event, "message"),
        )
    }
}

// ---- apps ----

pub async fn apps(session: &Session, project: Option<&str>) -> anyhow::Result<()> {
    let api = &session.api;
    let path = match project {
        Some(project) => format!("/v1/apps?project={}", encode(project)),
        None => "/v1/apps".into(),
    };
    let apps: Vec<Value> = api.get(&path).await?;
    let instances: Vec<Value> = api.get("/v1/instances").await?;
    let mut views = Vec::new();
    for app in &apps {
        let view: Value = api
            .get(&app_path(&text(app, "project"), &text(app, "name")))
            .await?;
        views.push(view);
    }
    output::print(session.format, &Value::Array(apps.clone()), |_| {
        let mut table = Table::new(&[
            "project", "name", "revision", "ready", "image", "routes", "age",
        ])
        .empty("No apps. Deploy one with `keel deploy -f app.yaml`.");
        for view in &views {
            let (project, name) = (text(&view["app"], "project"), text(&view["app"], "name"));
            let manifest = &view["revision"]["manifest"];
            let mine: Vec<&Value> = instances
                .iter()
                .filter(|i| i["project"] == project.as_str() && i["app"] == name.as_str())
                .collect();
            let ready = mine.iter().filter(|i| i["ready"] == true).count();
            let desired = match manifest["instances"].as_u64() {
                Some(n) => n.to_string(),
                None => format!("{} (global)", mine.len()),
            };
            let routes: Vec<String> = manifest["routes"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .map(|r| {
                            let path = text(r, "path");
                            if let Some(port) = r["listen_port"].as_u64() {
                                format!("tcp:{port}")
                            } else if path == "/" {
                                text(r, "host")
                            } else {
                                format!("{}{path}", text(r, "host"))
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            table.row(vec![
                project,
                name,
                view["app"]["revision"].to_string(),
                format!("{ready}/{desired}"),
                text(manifest, "image"),
                if routes.is_empty() {
                    "-".into()
                } else {
                    routes.join(",")
                },
                age(view["app"]["created_at_ms"].as_u64()),
            ]);
        }
        table
    });
    Ok(())
}

pub async fn app_show(session: &Session, name: &str, project: Option<&str>) -> anyhow::Result<()> {
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let view: Value = api.get(&app_path(&project, &app)).await?;
    let instances: Vec<Value> = api
        .get(&format!("{}/instances", app_path(&project, &app)))
        .await?;
    let revisions: Vec<Value> = api
        .get(&format!("{}/revisions", app_path(&project, &app)))
        .await?;
    let events: Vec<Value> = app_events(api, &project, &app, 10).await?;
    let value = json!({
        "app": view["app"], "revision": view["revision"], "instances": instances,
        "revisions": revisions, "events": events,
    });
    output::print(session.format, &value, |_| {
        let manifest = &view["revision"]["manifest"];
        let mut out = String::new();
        out.push_str(&format!("App:        {project}/{app}\n"));
        out.push_str(&format!(
            "Revision:   {} (latest {})\n",
            view["app"]["revision"], view["app"]["latest_revision"]
        ));
        out.push_str(&format!("Image:      {}\n", text(manifest, "image")));
        let desired = manifest["instances"]
            .as_u64()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "global".into());
        let ready = instances.iter().filter(|i| i["ready"] == true).count();
        out.push_str(&format!("Instances:  {ready} ready of {desired}\n"));
        if let Some(routes) = manifest["routes"].as_array() {
            for route in routes {
                if let Some(port) = route["listen_port"].as_u64() {
                    out.push_str(&format!(
                        "Route:      tcp port {port} (every router) -> port {}\n",
                        text(route, "port"),
                    ));
                    continue;
                }
                out.push_str(&format!(
                    "Route:      {}{} -> port {} (tls {})\n",
                    text(route, "host"),
                    if route["path"] == "/" {
                        String::new()
                    } else {
                        text(route, "path")
                    },
                    text(route, "port"),
                    text(route, "tls"),
                ));
            }
        }
        out.push('\n');
        out.push_str(&instances_table(&instances).to_string());
        out.push_str("\nRevisions:\n");
        let mut table = Table::new(&["revision", "cause", "image", "age"]);
        for revision in revisions.iter().rev().take(5) {
            let cause = match revision["cause"]["kind"].as_str() {
                Some("rollback") => format!("rollback to {}", revision["cause"]["to_revision"]),
                Some(kind) => kind.to_owned(),
                None => "-".into(),
            };
            table.row(vec![
                revision["revision"].to_string(),
                cause,
                text(&revision["manifest"], "image"),
                age(revision["created_at_ms"].as_u64()),
            ]);
        }
        out.push_str(&table.to_string());
        out.push_str("\nEvents:\n");
        out.push_str(&events_table(&events).to_string());
        Table::message(out.trim_end().to_owned())
    });
    Ok(())
}

fn instances_table(instances: &[Value]) -> Table {
    let mut table = Table::new(&[
        "instance", "app", "rev", "node", "state", "ready", "restarts", "cpu", "memory", "address",
        "reason",
    ])
    .empty("No instances.");
    for instance in instances {
        let ports: Vec<String> = instance["ports"]
            .as_object()
            .map(|p| {
                p.values()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let cpu = instance["cpu_millis"]
            .as_u64()
            .map(|m| format!("{m}m"))
            .unwrap_or_else(|| "-".into());
        let memory = instance["memory_bytes"]
            .as_u64()
            .map(|b| format!("{:.1}Mi", b as f64 / 1_048_576.0))
            .unwrap_or_else(|| "-".into());
        let reason = instance["pending_reason"]
            .as_str()
            .or(instance["reason"].as_str())
            .unwrap_or("-");
        table.row(vec![
            text(instance, "id"),
            format!("{}/{}", text(instance, "project"), text(instance, "app")),
            instance["revision"].to_string(),
            text(instance, "node"),
            if instance["node"].is_null() {
                "pending".into()
            } else {
                text(instance, "state")
            },
            if instance["ready"] == true {
                "yes".into()
            } else {
                "no".into()
            },
            instance["restarts"].to_string(),
            cpu,
            memory,
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            reason.to_owned(),
        ]);
    }
    table
}

fn events_table(events: &[Value]) -> Table {
    let mut sorted: Vec<&Value> = events.iter().collect();
    sorted.sort_by_key(|e| e["time_ms"].as_u64());
    let mut table = Table::new(&["age", "app", "reason", "message"]).empty("No events.");
    for event in sorted {
        let app = match (event["project"].as_str(), event["app"].as_str()) {
            (Some(p), Some(a)) => format!("{p}/{a}"),
            (Some(p), None) => p.to_owned(),
            _ => "-".into(),
        };
        table.row(vec![
            age(event["time_ms"].as_u64()),
            app,
            text(event, "reason"),
            text(event, "message"),
        ]);
    }
    table
}

pub async fn ps(session: &Session, app: Option<&str>, project: Option<&str>) -> anyhow::Result<()> {
    let api = &session.api;
    let instances: Vec<Value> = match app {
        Some(name) => {
            let (project, app) = resolve_app(api, name, project).await?;
            api.get(&format!("{}/instances", app_path(&project, &app)))
                .await?
        }
        None => match project {
            Some(project) => {
                api.get(&format!("/v1/instances?project={}", encode(project)))
                    .await?
            }
            None => api.get("/v1/instances").await?,
        },
    };
    output::print(session.format, &Value::Array(instances.clone()), |_| {
        instances_table(&instances)
    });
    Ok(())
}

/// Changes only the instance count (a new revision; running instances
/// stay).
pub async fn scale(
    session: &Session,
    name: &str,
    project: Option<&str>,
    count: u32,
) -> anyhow::Result<()> {
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let applied: Value = api
        .post(
            &format!("{}/scale", app_path(&project, &app)),
            &json!({ "instances": count }),
        )
        .await?;
    let revision = applied["revision"]["revision"].clone();
    output::print(session.format, &applied, |_| {
        Table::message(if applied["changed"] == true {
            format!("{project}/{app} scaled to {count} (revision {revision})")
        } else {
            format!("{project}/{app} already has {count} instances")
        })
    });
    Ok(())
}

/// Replaces every instance under the app's update strategy (a new
/// revision with the same manifest), so the app stays up.
pub async fn restart(
    session: &Session,
    name: &str,
    project: Option<&str>,
    options: WaitOptions,
) -> anyhow::Result<()> {
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let before = Events::before(api, &project, &app).await?;
    let applied: Value = api
        .post(&format!("{}/restart", app_path(&project, &app)), &json!({}))
        .await?;
    let revision = applied["revision"]["revision"].as_u64().unwrap_or(0);
    if session.format == Format::Table {
        println!("{project}/{app}: restarting as revision {revision}");
    }
    if options.wait {
        wait_for_rollout(session, &project, &app, revision, before, options.timeout).await?;
    }
    if session.format != Format::Table {
        output::print(session.format, &applied, |_| Table::default());
    }
    Ok(())
}

/// Whether to follow a rollout, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    pub wait: bool,
    pub timeout: Duration,
}

pub async fn rollback(
    session: &Session,
    name: &str,
    project: Option<&str>,
    revision: Option<u64>,
    options: WaitOptions,
) -> anyhow::Result<()> {
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let body = match revision {
        Some(revision) => json!({ "revision": revision }),
        None => json!({}),
    };
    let before = Events::before(api, &project, &app).await?;
    let applied: Value = api
        .post(&format!("{}/rollback", app_path(&project, &app)), &body)
        .await?;
    let now = applied["revision"]["revision"].as_u64().unwrap_or(0);
    if session.format == Format::Table {
        let to = applied["revision"]["cause"]["to_revision"].to_string();
        println!(
            "{project}/{app} rolled back to the manifest of revision {to} (now revision {now})"
        );
    }
    if options.wait {
        wait_for_rollout(session, &project, &app, now, before, options.timeout).await?;
    }
    if session.format != Format::Table {
        output::print(session.format, &applied, |_| Table::default());
    }
    Ok(())
}

pub async fn remove(session: &Session, name: &str, project: Option<&str>) -> anyhow::Result<()> {
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let removed: Value = api.delete(&app_path(&project, &app)).await?;
    output::print(session.format, &removed, |_| {
        Table::message(format!(
            "{project}/{app} deleted: its instances stop and its routes go"
        ))
    });
    Ok(())
}

pub async fn logs(
    session: &Session,
    name: &str,
    project: Option<&str>,
    follow: bool,
    tail: u32,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let api = &session.api;
    let (project, app) = resolve_app(api, name, project).await?;
    let path = format!(
        "{}/logs?follow={follow}&tail={tail}",
        app_path(&project, &app)
    );
    let mut response = api.stream(&path).await?;
    let mut stdout = std::io::stdout();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| anyhow!("the log stream from {} broke: {error}", api.url()))?
    {
        stdout.write_all(&chunk)?;
        stdout.flush()?;
    }
    Ok(())
}

pub async fn events(
    session: &Session,
    app: Option<&str>,
    project: Option<&str>,
    limit: u32,
) -> anyhow::Result<()> {
    let api = &session.api;
    let path = match app {
        Some(name) => {
            let (project, app) = resolve_app(api, name, project).await?;
            events_path(&project, &app, limit)
        }
        None => match project {
            Some(project) => format!("/v1/events?project={}&limit={limit}", encode(project)),
            None => format!("/v1/events?limit={limit}"),
        },
    };
    let events: Vec<Value> = api.get(&path).await?;
    output::print(session.format, &Value::Array(events.clone()), |_| {
        events_table(&events)
    });
    Ok(())
}

pub async fn projects(session: &Session) -> anyhow::Result<()> {
    let projects: Vec<Value> = session.api.get("/v1/projects").await?;
    let apps: Vec<Value> = session.api.get("/v1/apps").await?;
    output::print(session.format, &Value::Array(projects.clone()), |_| {
        let mut table = Table::new(&["name", "apps", "age"])
            .empty("No projects: deploying an app creates its project.");
        for project in &projects {
            let name = text(project, "name");
            let count = apps
                .iter()
                .filter(|a| a["project"] == name.as_str())
                .count();
            table.row(vec![
                name,
                count.to_string(),
                age(project["created_at_ms"].as_u64()),
            ]);
        }
        table
    });
    Ok(())
}

// ---- nodes and routes ----

pub async fn nodes(session: &Session) -> anyhow::Result<()> {
    let nodes: Vec<Value> = session.api.get("/v1/nodes").await?;
    let instances: Vec<Value> = session.api.get("/v1/instances").await?;
    output::print(session.format, &Value::Array(nodes.clone()), |_| {
        let mut table = Table::new(&[
            "name",
            "status",
            "region",
            "zone",
            "roles",
            "address",
            "cpu",
            "memory",
            "instances",
        ])
        .empty("No nodes have joined: start `keel agent` on a machine (or use `keel up`).");
        for node in &nodes {
            let name = text(node, "name");
            let mine = instances
                .iter()
                .filter(|i| i["node"] == name.as_str())
                .count();
            let roles: Vec<String> = node["roles"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|r| r.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let capacity = &node["capacity"];
            table.row(vec![
                name,
                text(node, "status"),
                text(node, "region"),
                text(node, "zone"),
                if roles.is_empty() {
                    "-".into()
                } else {
                    roles.join(",")
                },
                text(node, "address"),
                format!("{}m", capacity["cpu_millis"]),
                format!("{}Mi", capacity["memory_mb"]),
                format!("{mine}/{}", capacity["max_instances"]),
            ]);
        }
        table
    });
    Ok(())
}

pub async fn node_show(session: &Session, name: &str) -> anyhow::Result<()> {
    let api = &session.api;
    let node: Value = match api.get(&format!("/v1/nodes/{}", encode(name))).await {
        Err(error) if error.is_not_found() => {
            let nodes: Vec<Value> = api.get("/v1/nodes").await?;
            let names: Vec<String> = nodes.iter().map(|n| text(n, "name")).collect();
            let close = suggestions(name, &names);
            if close.is_empty() {
                bail!("node {name:?} not found (see `keel nodes`)");
            }
            bail!(
                "node {name:?} not found; did you mean {}?",
                close.join(" or ")
            );
        }
        other => other?,
    };
    let instances: Vec<Value> = api.get("/v1/instances").await?;
    let mine: Vec<Value> = instances
        .into_iter()
        .filter(|i| i["node"] == name)
        .collect();
    let value = json!({ "node": node, "instances": mine });
    output::print(session.format, &value, |_| {
        let mut out = String::new();
        for (label, key) in [
            ("Node", "name"),
            ("Status", "status"),
            ("Region", "region"),
            ("Zone", "zone"),
            ("Address", "address"),
        ] {
            out.push_str(&format!(
                "{:<11} {}\n",
                format!("{label}:"),
                text(&node, key)
            ));
        }
        out.push_str(&format!("Roles:      {}\n", node["roles"]));
        out.push_str(&format!("Labels:     {}\n", node["labels"]));
        out.push_str(&format!(
            "Capacity:   {}m cpu, {}Mi memory, {} instances\n\n",
            node["capacity"]["cpu_millis"],
            node["capacity"]["memory_mb"],
            node["capacity"]["max_instances"]
        ));
        out.push_str(&instances_table(&mine).to_string());
        Table::message(out.trim_end().to_owned())
    });
    Ok(())
}

pub async fn node_drain(session: &Session, name: &str, drain: bool) -> anyhow::Result<()> {
    let verb = if drain { "drain" } else { "undrain" };
    let node: Value = session
        .api
        .post(&format!("/v1/nodes/{}/{verb}", encode(name)), &json!({}))
        .await?;
    output::print(session.format, &node, |_| {
        Table::message(if drain {
            format!("{name} is draining: its instances move to other nodes")
        } else {
            format!("{name} takes new instances again")
        })
    });
    Ok(())
}

pub async fn routes(session: &Session) -> anyhow::Result<()> {
    let table_value: Value = session.api.get("/v1/routes").await?;
    output::print(session.format, &table_value, |value| {
        let mut table = Table::new(&["host", "path", "tls", "app", "port", "backends"])
            .empty("No routes: give an app `routes:` in its manifest.");
        for route in value["routes"].as_array().into_iter().flatten() {
            let backends = route["backends"].as_array().map(Vec::len).unwrap_or(0);
            // A plain TCP route has no host, path or TLS: it is its port on
            // every router.
            let (host, path, tls) = match route["listen_port"].as_u64() {
                Some(port) => (format!("tcp:{port}"), "-".to_owned(), "-".to_owned()),
                None => (text(route, "host"), text(route, "path"), text(route, "tls")),
            };
            table.row(vec![
                host,
                path,
                tls,
                format!("{}/{}", text(route, "project"), text(route, "app")),
                text(route, "port"),
                if backends == 0 {
                    "none ready".into()
                } else {
                    backends.to_string()
                },
            ]);
        }
        table
    });
    Ok(())
}

// ---- certificates ----

pub async fn certs_add(
    session: &Session,
    host: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let body = json!({ "host": host, "cert_pem": read(cert)?, "key_pem": read(key)? });
    let stored: Value = session.api.post("/v1/certs", &body).await?;
    output::print(session.format, &stored, |value| {
        Table::message(format!(
            "Certificate for {} stored (expires {}); routers serve it within seconds",
            text(value, "host"),
            text(value, "not_after")
        ))
    });
    Ok(())
}

pub async fn certs_list(session: &Session) -> anyhow::Result<()> {
    let certs: Vec<Value> = session.api.get("/v1/certs").await?;
    output::print(session.format, &Value::Array(certs.clone()), |_| {
        let mut table = Table::new(&["host", "expires", "sha-256"])
            .empty("No certificates: routes with tls: terminate get a self-signed one.");
        for cert in &certs {
            table.row(vec![
                text(cert, "host"),
                text(cert, "not_after"),
                text(cert, "fingerprint_sha256"),
            ]);
        }
        table
    });
    Ok(())
}

pub async fn certs_remove(session: &Session, host: &str) -> anyhow::Result<()> {
    let removed: Value = session
        .api
        .delete(&format!("/v1/certs/{}", encode(host)))
        .await?;
    output::print(session.format, &removed, |_| {
        Table::message(format!(
            "Certificate for {host} removed; its routes fall back to a self-signed one"
        ))
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_typos_and_fragments() {
        let names: Vec<String> = ["web", "worker", "shop-api", "db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(suggestions("wbe", &names), vec!["\"web\""]);
        assert_eq!(suggestions("shop-apj", &names), vec!["\"shop-api\""]);
        assert_eq!(suggestions("shop", &names), vec!["\"shop-api\""]);
        assert!(suggestions("zzzzzz", &names).is_empty());
    }

    #[test]
    fn context_names_come_from_the_url() {
        assert_eq!(context_name_for("http://127.0.0.1:7070"), "127.0.0.1:7070");
        assert_eq!(
            context_name_for("https://keel.example.com/"),
            "keel.example.com"
        );
    }
}
