//! Projects, apps and their revisions: the desired state users declare.
//!
//! Nothing here runs containers or places instances; it only records what
//! users asked for, atomically, so that the reconcilers (which wake on
//! store watches) can act on it. Every write is a compare-and-swap on the
//! records it read, so two concurrent applies never lose one another.

use std::collections::BTreeSet;
use std::sync::Arc;

use keel_manifest::{AppManifest, Instances, Route};
use keel_store::{Compare, CompareOp, KeyValue, Op, RangeRequest, Revision, Store, Txn};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ApiError, FieldProblem};
use crate::records::{
    AppRecord, EventRecord, ProjectRecord, RevisionCause, RevisionRecord, keys, now_ms,
};

/// How many times a write that lost a race is retried before the caller
/// is told of the conflict.
const CAS_ATTEMPTS: usize = 5;

/// The most writes one conditional transaction of split work (the
/// revisions of a deleted or pruned app, each chunk guarded by a compare)
/// carries: below [`crate::writes::MAX_TXN_OPS`], leaving room for the
/// compares and extra writes that go with a chunk. (Unconditional split
/// writes go through [`crate::writes::write_split`].)
pub const TXN_CHUNK: usize = 100;

/// How many revisions of each app are kept by default (see
/// [`Apps::with_revision_history`]).
pub const DEFAULT_REVISION_HISTORY: usize = 50;

#[derive(Debug, Clone)]
pub struct Apps {
    store: Arc<dyn Store>,
    /// How many of each app's newest revisions are kept; at least 1.
    revision_history: usize,
}

/// What an apply did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Applied {
    pub app: AppRecord,
    pub revision: RevisionRecord,
    /// False when the manifest was identical to the current revision's.
    pub changed: bool,
    /// True when the app did not exist before.
    pub created: bool,
}

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("stored record {} does not decode: {e}", kv.key)))
}

/// Every record under a prefix, with the mod revision it was read at, page
/// by page.
pub(crate) async fn list_records<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<(T, Revision)>, ApiError> {
    let mut out = Vec::new();
    let mut request = Some(RangeRequest::prefix(prefix).limit(1000));
    while let Some(current) = request {
        let page = store.range(&current).await?;
        for kv in &page.kvs {
            out.push((decode(kv)?, kv.mod_revision));
        }
        request = page.next(&current);
    }
    Ok(out)
}

/// Every key under a prefix, in key order, page by page.
async fn list_keys(store: &dyn Store, prefix: &str) -> Result<Vec<String>, ApiError> {
    let mut keys = Vec::new();
    let mut request = Some(RangeRequest::prefix(prefix).limit(1000));
    while let Some(current) = request {
        let page = store.range(&current).await?;
        keys.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        request = page.next(&current);
    }
    Ok(keys)
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|e| ApiError::Internal(format!("cannot encode record: {e}")))
}

/// Checks a name used in a URL path the way the manifest checks names, so a
/// bad name is a 400 and never becomes part of a store key.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if keel_manifest::is_dns_label(name) {
        return Ok(());
    }
    Err(ApiError::Invalid(vec![FieldProblem::new(
        field,
        format!(
            "{name:?} is not a valid name: 1 to 63 lowercase letters, digits or '-', starting with a letter and not ending with '-'"
        ),
    )]))
}

/// The claim keys of a manifest's routes: host and path, or listen port.
fn claims(manifest: Option<&AppManifest>) -> BTreeSet<String> {
    manifest
        .map(|m| {
            m.routes
                .iter()
                .map(|r| match r {
                    Route::Host(r) => keys::route_claim(&r.host, &r.path),
                    Route::Tcp(r) => keys::listen_port_claim(r.listen_port),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What a claim key claims, as a user reads it in a conflict.
fn claimed(key: &str) -> String {
    if let Some(route) = key.strip_prefix(&keys::route_claims()) {
        format!("route {route}")
    } else if let Some(port) = key.strip_prefix(&keys::listen_port_claims()) {
        format!("listen port {port} (a plain TCP route on every router)")
    } else {
        key.to_owned()
    }
}

fn event_ops(sequence: Revision, events: &[EventRecord]) -> Result<Vec<Op>, ApiError> {
    let nonce = getrandom::u32().map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            Ok(Op::put(
                keys::event(sequence as u64, nonce, i),
                encode(event)?,
            ))
        })
        .collect()
}

fn event(project: &str, app: Option<&str>, reason: &str, message: String) -> EventRecord {
    EventRecord {
        time_ms: now_ms(),
        project: Some(project.to_owned()),
        app: app.map(str::to_owned),
        reason: reason.to_owned(),
        message,
    }
}

/// What an apply expects of the revision the app is at.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Nothing.
    Any,
    /// Exactly this one (0: no app yet); another is the caller's conflict
    /// (the user's `expected_revision`).
    Exactly(u64),
    /// The one the change was derived from (scale, restart); another means
    /// a write won the race, and the change is derived again.
    Base(u64),
}

fn busy(project: &str, name: &str) -> ApiError {
    ApiError::Conflict(format!(
        "app {project}/{name} is being changed by others; try again"
    ))
}

impl Apps {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            revision_history: DEFAULT_REVISION_HISTORY,
        }
    }

    /// Keeps each app's newest `history` revisions (0 counts as 1); older
    /// ones are deleted after each new revision, except the current one and
    /// the one a plain rollback goes back to, which are always kept.
    pub fn with_revision_history(self, history: usize) -> Self {
        Self {
            revision_history: history.max(1),
            ..self
        }
    }

    async fn list<T: DeserializeOwned>(&self, prefix: String) -> Result<Vec<T>, ApiError> {
        let records = list_records(self.store.as_ref(), &prefix).await?;
        Ok(records.into_iter().map(|(record, _)| record).collect())
    }

    /// The compares and writes that move an app's route claims from those
    /// of `old` to those of `new`, or a conflict naming the app that holds
    /// a route already.
    async fn claim_routes(
        &self,
        project: &str,
        name: &str,
        old: Option<&AppManifest>,
        new: Option<&AppManifest>,
    ) -> Result<(Vec<Compare>, Vec<Op>), ApiError> {
        let owner = format!("{project}/{name}");
        let (old, new) = (claims(old), claims(new));
        let (mut compares, mut ops) = (Vec::new(), Vec::new());
        for key in &new {
            match self.store.get(key).await? {
                Some(kv) if kv.value != owner.as_bytes() => {
                    return Err(ApiError::Conflict(format!(
                        "{} is already served by app {}",
                        claimed(key),
                        String::from_utf8_lossy(&kv.value)
                    )));
                }
                Some(_) => compares.push(Compare::value(key, CompareOp::Equal, owner.as_bytes())),
                None => {
                    compares.push(Compare::missing(key));
                    ops.push(Op::put(key, owner.as_bytes()));
                }
            }
        }
        for key in old.difference(&new) {
            ops.push(Op::delete(key));
        }
        Ok((compares, ops))
    }

    /// Writes `ops` plus the events, with the events keyed after the store's
    /// current revision so that they sort in time order. The store revision
    /// of the write, or `None` when a compare failed.
    async fn commit(
        &self,
        compare: Vec<Compare>,
        mut ops: Vec<Op>,
        events: &[EventRecord],
    ) -> Result<Option<Revision>, ApiError> {
        let sequence = self.store.status().await?.revision + 1;
        ops.extend(event_ops(sequence, events)?);
        let response = self
            .store
            .txn(Txn::new().when(compare).and_then(ops))
            .await?;
        Ok(response.succeeded.then_some(response.revision))
    }

    pub async fn create_project(&self, name: &str) -> Result<(ProjectRecord, bool), ApiError> {
        check_name("name", name)?;
        let key = keys::project(name);
        if let Some(kv) = self.store.get(&key).await? {
            return Ok((decode(&kv)?, false));
        }
        let record = ProjectRecord {
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        let events = [event(
            name,
            None,
            "project-created",
            format!("project {name} created"),
        )];
        let created = self
            .commit(
                vec![Compare::missing(&key)],
                vec![Op::put(&key, encode(&record)?)],
                &events,
            )
            .await?
            .is_some();
        if !created {
            // Someone else created it between our read and our write.
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("project {name}")))?;
            return Ok((decode(&kv)?, false));
        }
        Ok((record, true))
    }

    pub async fn projects(&self) -> Result<Vec<ProjectRecord>, ApiError> {
        self.list(keys::projects()).await
    }

    pub async fn project(&self, name: &str) -> Result<ProjectRecord, ApiError> {
        check_name("project", name)?;
        let kv = self.store.get(&keys::project(name)).await?;
        decode(&kv.ok_or_else(|| ApiError::NotFound(format!("project {name}")))?)
    }

    /// Records a manifest as the app's desired state. An identical manifest
    /// makes no new revision. The project is created on first use.
    /// With `expected`, only if the app is at that revision now (0: only if
    /// it does not exist); otherwise a conflict that says where it is.
    pub async fn apply(
        &self,
        manifest: AppManifest,
        expected: Option<u64>,
    ) -> Result<Applied, ApiError> {
        self.create_project(&manifest.project).await?;
        let expect = expected.map_or(Expect::Any, Expect::Exactly);
        for _ in 0..CAS_ATTEMPTS {
            if let Some(applied) = self
                .try_apply(&manifest, expect, RevisionCause::Apply)
                .await?
            {
                return Ok(applied);
            }
        }
        Err(busy(&manifest.project, &manifest.name))
    }

    /// Changes only the app's instance count, as a new revision (none when
    /// the count is already `instances`). Instances that run stay: the
    /// reconciler adopts them, since their template is unchanged.
    pub async fn scale(
        &self,
        project: &str,
        name: &str,
        instances: u64,
    ) -> Result<Applied, ApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let (app, _) = self.app_kv(project, name).await?;
            let current = self.revision(project, name, app.revision).await?;
            if current.manifest.instances == Instances::Global {
                return Err(ApiError::Unprocessable(format!(
                    "app {project}/{name} is global: it runs one instance on every node its placement matches, so it has no count to scale"
                )));
            }
            // Through the manifest's own validator, so that the limits and
            // their words are the manifest's.
            let mut json = serde_json::to_value(&current.manifest)
                .map_err(|e| ApiError::Internal(format!("cannot encode the manifest: {e}")))?;
            json["instances"] = instances.into();
            let manifest = keel_manifest::parse(&json.to_string(), keel_manifest::Format::Json)
                .map_err(|errors| {
                    ApiError::Invalid(
                        errors
                            .into_problems()
                            .into_iter()
                            .map(|p| FieldProblem::new(p.path, p.message))
                            .collect(),
                    )
                })?;
            let Instances::Count(count) = manifest.instances else {
                return Err(ApiError::Internal("a scaled manifest is global".into()));
            };
            let cause = RevisionCause::Scale { instances: count };
            if let Some(applied) = self
                .try_apply(&manifest, Expect::Base(app.revision), cause)
                .await?
            {
                return Ok(applied);
            }
        }
        Err(busy(project, name))
    }

    /// A rolling restart: a new revision with the same manifest whose
    /// instances replace every running one, under the app's update strategy.
    pub async fn restart(&self, project: &str, name: &str) -> Result<Applied, ApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let (app, _) = self.app_kv(project, name).await?;
            let current = self.revision(project, name, app.revision).await?;
            if let Some(applied) = self
                .try_apply(
                    &current.manifest,
                    Expect::Base(app.revision),
                    RevisionCause::Restart,
                )
                .await?
            {
                return Ok(applied);
            }
        }
        Err(busy(project, name))
    }

    /// One compare-and-swap attempt; `None` when another write won the race.
    async fn try_apply(
        &self,
        manifest: &AppManifest,
        expect: Expect,
        cause: RevisionCause,
    ) -> Result<Option<Applied>, ApiError> {
        let (project, name) = (manifest.project.as_str(), manifest.name.as_str());
        let app_key = keys::app(project, name);
        let now = now_ms();
        let mut current_manifest = None;
        let existing = self.store.get(&app_key).await?;
        let at = match &existing {
            Some(kv) => decode::<AppRecord>(kv)?.revision,
            None => 0,
        };
        match expect {
            Expect::Exactly(expected) if at != expected => {
                return Err(ApiError::Conflict(format!(
                    "stale revision: app {project}/{name} is at revision {at}, not {expected}; fetch it and apply again"
                )));
            }
            Expect::Base(base) if at != base => return Ok(None),
            _ => {}
        }
        let restart = cause == RevisionCause::Restart;
        let (app, compare, created, restarts) = match existing {
            Some(kv) => {
                let app: AppRecord = decode(&kv)?;
                let current = self.revision(project, name, app.revision).await?;
                current_manifest = Some(current.manifest.clone());
                if !restart && current.manifest.canonical_json() == manifest.canonical_json() {
                    return Ok(Some(Applied {
                        app,
                        revision: current,
                        changed: false,
                        created: false,
                    }));
                }
                let compare = Compare::mod_revision(&app_key, CompareOp::Equal, kv.mod_revision);
                let restarts = current.restarts + u64::from(restart);
                (app, compare, false, restarts)
            }
            None => {
                // Revisions an interrupted delete of an earlier app of this
                // name left must not become this app's history.
                self.remove_orphan_revisions(project, name).await?;
                let app = AppRecord {
                    project: project.to_owned(),
                    name: name.to_owned(),
                    revision: 0,
                    latest_revision: 0,
                    created_at_ms: now,
                    updated_at_ms: now,
                };
                (app, Compare::missing(&app_key), true, 0)
            }
        };
        let number = app.latest_revision + 1;
        let mut events = Vec::new();
        if created {
            events.push(event(
                project,
                Some(name),
                "app-created",
                format!("app {project}/{name} created"),
            ));
        }
        events.push(match &cause {
            RevisionCause::Scale { instances } => event(
                project,
                Some(name),
                "scaled",
                format!(
                    "app {project}/{name} scaled to {instances} instances as revision {number}"
                ),
            ),
            RevisionCause::Restart => event(
                project,
                Some(name),
                "restart",
                format!("rolling restart of app {project}/{name} as revision {number}"),
            ),
            _ => event(
                project,
                Some(name),
                "revision-created",
                format!(
                    "revision {number} of {project}/{name} created (image {})",
                    manifest.image
                ),
            ),
        });
        let revision = RevisionRecord {
            revision: number,
            created_at_ms: now,
            cause,
            manifest: manifest.clone(),
            restarts,
        };
        let app = AppRecord {
            revision: number,
            latest_revision: number,
            updated_at_ms: now,
            ..app
        };
        let (mut compares, mut ops) = self
            .claim_routes(project, name, current_manifest.as_ref(), Some(manifest))
            .await?;
        compares.push(compare);
        ops.push(Op::put(&app_key, encode(&app)?));
        ops.push(Op::put(
            keys::revision(project, name, number),
            encode(&revision)?,
        ));
        if created {
            // The deletion this name had, if any, is over.
            ops.push(Op::delete(keys::app_deletion(project, name)));
        }
        let Some(written) = self.commit(compares, ops, &events).await? else {
            return Ok(None);
        };
        self.prune_revisions_after(&app, written).await;
        Ok(Some(Applied {
            app,
            revision,
            changed: true,
            created,
        }))
    }

    pub async fn apps(&self, project: Option<&str>) -> Result<Vec<AppRecord>, ApiError> {
        if let Some(project) = project {
            check_name("project", project)?;
        }
        self.list(keys::apps(project)).await
    }

    pub async fn app(&self, project: &str, name: &str) -> Result<AppRecord, ApiError> {
        Ok(self.app_kv(project, name).await?.0)
    }

    async fn app_kv(&self, project: &str, name: &str) -> Result<(AppRecord, KeyValue), ApiError> {
        check_name("project", project)?;
        check_name("app", name)?;
        let kv = self.store.get(&keys::app(project, name)).await?;
        let kv = kv.ok_or_else(|| ApiError::NotFound(format!("app {project}/{name}")))?;
        Ok((decode(&kv)?, kv))
    }

    pub async fn revision(
        &self,
        project: &str,
        name: &str,
        number: u64,
    ) -> Result<RevisionRecord, ApiError> {
        let kv = self
            .store
            .get(&keys::revision(project, name, number))
            .await?;
        decode(&kv.ok_or_else(|| {
            ApiError::NotFound(format!("revision {number} of app {project}/{name}"))
        })?)
    }

    pub async fn revisions(
        &self,
        project: &str,
        name: &str,
    ) -> Result<Vec<RevisionRecord>, ApiError> {
        self.app(project, name).await?;
        self.list(keys::revisions(project, name)).await
    }

    /// Deploys an older revision again as a new revision. Without a number,
    /// the revision before the current one.
    pub async fn rollback(
        &self,
        project: &str,
        name: &str,
        to: Option<u64>,
    ) -> Result<Applied, ApiError> {
        for _ in 0..CAS_ATTEMPTS {
            let (app, kv) = self.app_kv(project, name).await?;
            let target = match to {
                Some(number) => number,
                None if app.revision > 1 => app.revision - 1,
                None => {
                    return Err(ApiError::Unprocessable(format!(
                        "app {project}/{name} has no revision before {} to roll back to",
                        app.revision
                    )));
                }
            };
            if target == 0 || target > app.latest_revision {
                return Err(ApiError::NotFound(format!(
                    "revision {target} of app {project}/{name} (revisions are 1..={})",
                    app.latest_revision
                )));
            }
            if target == app.revision {
                return Err(ApiError::Unprocessable(format!(
                    "app {project}/{name} already runs revision {target}"
                )));
            }
            let old = match self.revision(project, name, target).await {
                Err(ApiError::NotFound(_)) => {
                    return Err(ApiError::NotFound(format!(
                        "revision {target} of app {project}/{name} (pruned: the controller keeps the newest {} revisions of each app)",
                        self.revision_history
                    )));
                }
                other => other?,
            };
            let current = self.revision(project, name, app.revision).await?;
            let (mut compares, mut ops) = self
                .claim_routes(project, name, Some(&current.manifest), Some(&old.manifest))
                .await?;
            let now = now_ms();
            let number = app.latest_revision + 1;
            let revision = RevisionRecord {
                revision: number,
                created_at_ms: now,
                cause: RevisionCause::Rollback {
                    to_revision: target,
                },
                manifest: old.manifest,
                restarts: current.restarts,
            };
            let app = AppRecord {
                revision: number,
                latest_revision: number,
                updated_at_ms: now,
                ..app
            };
            let events = [event(
                project,
                Some(name),
                "rollback",
                format!(
                    "app {project}/{name} rolled back to revision {target} as revision {number}"
                ),
            )];
            let app_key = keys::app(project, name);
            ops.push(Op::put(&app_key, encode(&app)?));
            ops.push(Op::put(
                keys::revision(project, name, number),
                encode(&revision)?,
            ));
            compares.push(Compare::mod_revision(
                &app_key,
                CompareOp::Equal,
                kv.mod_revision,
            ));
            if let Some(written) = self.commit(compares, ops, &events).await? {
                self.prune_revisions_after(&app, written).await;
                return Ok(Applied {
                    app,
                    revision,
                    changed: true,
                    created: false,
                });
            }
        }
        Err(busy(project, name))
    }

    /// Deletes an app and its revisions.
    ///
    /// The app record's removal is the commit point: one transaction
    /// removes it and its route claims, writes the event, and marks the
    /// deletion under `keys::app_deletion`. The revisions, as many as the
    /// history keeps, go after it in chunks of [`TXN_CHUNK`] (etcd limits a
    /// transaction's size), and then the mark. A crash between chunks
    /// leaves revisions no read reaches (every read starts at the app
    /// record); [`Apps::finish_deletions`] and the next create of the name
    /// remove them.
    pub async fn delete(&self, project: &str, name: &str) -> Result<AppRecord, ApiError> {
        let (app, kv) = self.app_kv(project, name).await?;
        let current = self.revision(project, name, app.revision).await.ok();
        let (_, mut ops) = self
            .claim_routes(project, name, current.as_ref().map(|r| &r.manifest), None)
            .await?;
        ops.push(Op::delete(keys::app(project, name)));
        ops.push(Op::put(keys::app_deletion(project, name), Vec::new()));
        let events = [event(
            project,
            Some(name),
            "app-deleted",
            format!("app {project}/{name} deleted"),
        )];
        let compare =
            Compare::mod_revision(keys::app(project, name), CompareOp::Equal, kv.mod_revision);
        if self.commit(vec![compare], ops, &events).await?.is_none() {
            return Err(ApiError::Conflict(format!(
                "app {project}/{name} changed while it was being deleted; try again"
            )));
        }
        // Past the commit point the app is gone: what is left is cleanup
        // that the housekeeping finishes, not the caller's failure.
        if let Err(error) = self.finish_deletion(project, name).await {
            tracing::warn!(app = %format!("{project}/{name}"), error = %error, "app deleted; its revisions go later");
        }
        Ok(app)
    }

    /// Removes the revisions of an app that no longer exists, chunk by
    /// chunk, each chunk only while the app is still absent (so a new app
    /// of the same name keeps its own); returns how many went.
    async fn remove_orphan_revisions(&self, project: &str, name: &str) -> Result<usize, ApiError> {
        let app_key = keys::app(project, name);
        let prefix = keys::revisions(project, name);
        let mut removed = 0;
        loop {
            let page = self
                .store
                .range(&RangeRequest::prefix(&prefix).limit(TXN_CHUNK))
                .await?;
            if page.kvs.is_empty() {
                return Ok(removed);
            }
            let txn = Txn::new()
                .when([Compare::missing(&app_key)])
                .and_then(page.kvs.iter().map(|kv| Op::delete(&kv.key)));
            if !self.store.txn(txn).await?.succeeded {
                // The name was taken again: what is left is the new app's.
                return Ok(removed);
            }
            removed += page.kvs.len();
        }
    }

    /// The part of a deletion after its commit point: the revisions, then
    /// the mark that says the deletion is unfinished.
    async fn finish_deletion(&self, project: &str, name: &str) -> Result<(), ApiError> {
        self.remove_orphan_revisions(project, name).await?;
        self.store
            .delete(&keys::app_deletion(project, name))
            .await?;
        Ok(())
    }

    /// Finishes the app deletions a crash or a store outage interrupted
    /// (see [`Apps::delete`]); returns how many there were.
    pub async fn finish_deletions(&self) -> Result<usize, ApiError> {
        let marks = list_keys(self.store.as_ref(), &keys::app_deletions()).await?;
        let mut finished = 0;
        for mark in &marks {
            let Some((project, name)) = mark
                .strip_prefix(&keys::app_deletions())
                .and_then(|rest| rest.split_once('/'))
            else {
                tracing::warn!(key = %mark, "an app deletion mark that names no app; left alone");
                continue;
            };
            self.finish_deletion(project, name).await?;
            finished += 1;
        }
        Ok(finished)
    }

    /// [`Apps::prune_revisions`] after a write that succeeded: a failure
    /// is logged, not the caller's, and the next write prunes again.
    async fn prune_revisions_after(&self, app: &AppRecord, written: Revision) {
        if let Err(error) = self.prune_revisions(app, written).await {
            tracing::warn!(app = %format!("{}/{}", app.project, app.name), error = %error, "cannot prune old revisions");
        }
    }

    /// Deletes the app's revisions older than its newest
    /// `revision_history`, keeping the current one and the one before it
    /// (what a plain rollback goes back to) whatever the history. Chunks of
    /// [`TXN_CHUNK`], each only while the app record is still the one
    /// written at `written`: a newer write prunes by its own numbers, and
    /// a deleted and re-created app keeps its own revisions.
    async fn prune_revisions(&self, app: &AppRecord, written: Revision) -> Result<usize, ApiError> {
        let (project, name) = (app.project.as_str(), app.name.as_str());
        let cutoff = app
            .latest_revision
            .saturating_sub(self.revision_history as u64)
            .min(app.revision.saturating_sub(2));
        if cutoff == 0 {
            return Ok(0);
        }
        let app_key = keys::app(project, name);
        let prefix = keys::revisions(project, name);
        let number = |key: &str| key.rsplit('/').next().and_then(|n| n.parse::<u64>().ok());
        // Usually exactly one revision is due: look at the oldest first, so
        // that a write reads one record, not a page of manifests.
        let mut limit = 1;
        let mut pruned = 0;
        loop {
            let page = self
                .store
                .range(&RangeRequest::prefix(&prefix).limit(limit))
                .await?;
            let due: Vec<&str> = page
                .kvs
                .iter()
                .map(|kv| kv.key.as_str())
                .take_while(|key| number(key).is_some_and(|n| n <= cutoff))
                .collect();
            if due.is_empty() {
                return Ok(pruned);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(&app_key, CompareOp::Equal, written)])
                .and_then(due.iter().map(|key| Op::delete(*key)));
            if !self.store.txn(txn).await?.succeeded {
                return Ok(pruned);
            }
            pruned += due.len();
            limit = TXN_CHUNK;
        }
    }

    /// Deletes all but the newest `keep` events; returns how many went.
    /// Events are independent records, so the deletes are split to fit a
    /// transaction ([`crate::writes::write_split`]): an interrupted prune
    /// leaves only events that the next one removes.
    ///
    /// The reconciler runs this every minute, so it also finishes the app
    /// deletions that were interrupted (see [`Apps::finish_deletions`]).
    pub async fn prune_events(&self, keep: usize) -> Result<usize, ApiError> {
        if let Err(error) = self.finish_deletions().await {
            tracing::warn!(error = %error, "cannot finish interrupted app deletions");
        }
        let keys = list_keys(self.store.as_ref(), &keys::events()).await?;
        let excess = keys.len().saturating_sub(keep);
        let deletes = keys[..excess].iter().map(Op::delete).collect();
        crate::writes::write_split(self.store.as_ref(), deletes).await?;
        Ok(excess)
    }

    /// Events, oldest first, optionally of one project or app; at most
    /// `limit`, the newest ones.
    pub async fn events(
        &self,
        project: Option<&str>,
        app: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, ApiError> {
        let all: Vec<EventRecord> = self.list(keys::events()).await?;
        let matching: Vec<EventRecord> = all
            .into_iter()
            .filter(|e| project.is_none_or(|p| e.project.as_deref() == Some(p)))
            .filter(|e| app.is_none_or(|a| e.app.as_deref() == Some(a)))
            .collect();
        let skip = matching.len().saturating_sub(limit);
        Ok(matching.into_iter().skip(skip).collect())
    }
}
