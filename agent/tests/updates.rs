//! New revisions: they replace the old instances, rollback brings an old
//! one back, and a rolling update keeps the app available while it runs.
//!
//! The rolling-update tests state the manifest's contract (manifest
//! REFERENCE, `update`): during an update at least `instances -
//! max_unavailable` instances are ready, at most `instances + max_surge`
//! exist, and a new revision that never becomes ready does not take the old
//! one down.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use keel_agent::eventually;
use keel_agent::testing::{Admin, ClusterConfig, Instance, SimCluster, nodes_in_zones};
use support::{CONVERGE, ZONES, all_up, app, in_runtimes};
use tokio::sync::watch;

#[tokio::test]
async fn a_new_revision_replaces_every_old_instance_and_the_same_manifest_changes_nothing() {
    let cluster = SimCluster::start(&nodes_in_zones(24, &ZONES))
        .await
        .unwrap();
    let admin = cluster.admin();
    admin.apply(&app("web", "shop/web:1", 6)).await.unwrap();
    let first = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 6, Some(1))
    });

    // The same manifest again: no revision, nothing restarted.
    let again = admin.apply(&app("web", "shop/web:1", 6)).await.unwrap();
    assert_eq!(again["changed"], false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let same = admin.instances("shop", "web").await.unwrap();
    assert_eq!(
        same.iter().map(|i| &i.id).collect::<BTreeSet<_>>(),
        first.iter().map(|i| &i.id).collect::<BTreeSet<_>>()
    );

    let applied = admin.apply(&app("web", "shop/web:2", 6)).await.unwrap();
    assert_eq!(applied["revision"]["revision"], 2);
    let second = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 6, Some(2))
    });
    let old: BTreeSet<&String> = first.iter().map(|i| &i.id).collect();
    assert!(second.iter().all(|i| !old.contains(&i.id)));
    eventually!(CONVERGE, {
        let images: Vec<String> = in_runtimes(&cluster, "web")
            .into_iter()
            .map(|(_, i)| i.image)
            .collect();
        if images.len() == 6 && images.iter().all(|i| i == "shop/web:2") {
            Ok(())
        } else {
            Err(format!("the nodes run {images:?}"))
        }
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn rollback_runs_the_previous_revision_again() {
    let cluster = SimCluster::start(&nodes_in_zones(24, &ZONES))
        .await
        .unwrap();
    let admin = cluster.admin();
    admin.apply(&app("web", "shop/web:1", 4)).await.unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 4, Some(1))
    });
    admin
        .apply(&app("web", "shop/web:2-broken", 4))
        .await
        .unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 4, Some(2))
    });

    let rolled = admin.rollback("shop", "web").await.unwrap();
    assert_eq!(rolled["revision"]["revision"], 3, "{rolled}");
    assert_eq!(rolled["revision"]["manifest"]["image"], "shop/web:1");
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 4, Some(3))
    });
    eventually!(CONVERGE, {
        let images: Vec<String> = in_runtimes(&cluster, "web")
            .into_iter()
            .map(|(_, i)| i.image)
            .collect();
        if images.len() == 4 && images.iter().all(|i| i == "shop/web:1") {
            Ok(())
        } else {
            Err(format!("the nodes run {images:?}"))
        }
    });
    cluster.shutdown().await.unwrap();
}

/// What an observer polling the API saw during an update.
#[derive(Debug, Default)]
struct Seen {
    samples: usize,
    /// The fewest ready instances at one moment, and the list then.
    min_ready: Option<(usize, Vec<Instance>)>,
    /// The most instances at one moment, and the list then.
    max_total: Option<(usize, Vec<Instance>)>,
}

/// Polls the app's instances every 20 ms until told to stop.
fn observe(
    admin: Admin,
    app: &'static str,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        loop {
            let instances = admin.instances("shop", app).await.unwrap();
            let ready = instances.iter().filter(|i| i.is_up()).count();
            seen.samples += 1;
            if seen.min_ready.as_ref().is_none_or(|(n, _)| ready < *n) {
                seen.min_ready = Some((ready, instances.clone()));
            }
            if seen
                .max_total
                .as_ref()
                .is_none_or(|(n, _)| instances.len() > *n)
            {
                seen.max_total = Some((instances.len(), instances));
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return seen,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
}

/// Slow starts, so that "placed" and "ready" are far apart.
async fn slow_cluster() -> SimCluster {
    let config = ClusterConfig {
        start_delay: Duration::from_millis(500),
        ..ClusterConfig::default()
    };
    SimCluster::start_with(config, &nodes_in_zones(24, &ZONES))
        .await
        .unwrap()
}

fn with_update(manifest: String, max_surge: u32, max_unavailable: u32) -> String {
    format!("{manifest}update:\n  max_surge: {max_surge}\n  max_unavailable: {max_unavailable}\n")
}

/// Updates `web` (6 instances) from image `:1` to `:2` and checks the
/// contract at every sample.
async fn rolling_update(max_surge: u32, max_unavailable: u32) {
    const N: usize = 6;
    let cluster = slow_cluster().await;
    let admin = cluster.admin().clone();
    admin
        .apply(&with_update(
            app("web", "shop/web:1", N as u32),
            max_surge,
            max_unavailable,
        ))
        .await
        .unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), N, Some(1))
    });

    let (stop, stopped) = watch::channel(false);
    let observer = observe(admin.clone(), "web", stopped);
    admin
        .apply(&with_update(
            app("web", "shop/web:2", N as u32),
            max_surge,
            max_unavailable,
        ))
        .await
        .unwrap();
    eventually!(Duration::from_secs(30), {
        all_up(admin.instances("shop", "web").await.unwrap(), N, Some(2))
    });
    stop.send(true).unwrap();
    let seen = observer.await.unwrap();

    let floor = N - max_unavailable as usize;
    let (min_ready, at_min) = seen.min_ready.unwrap();
    assert!(
        min_ready >= floor,
        "with {N} instances and max_unavailable {max_unavailable}, at least {floor} must be ready at every moment of the update; {min_ready} were ({} samples). The instances then: {at_min:#?}",
        seen.samples
    );
    let ceiling = N + max_surge as usize;
    let (max_total, at_max) = seen.max_total.unwrap();
    assert!(
        max_total <= ceiling,
        "with {N} instances and max_surge {max_surge}, at most {ceiling} may exist at once; {max_total} did. The instances then: {at_max:#?}"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rolling_update_keeps_all_but_max_unavailable_ready_throughout() {
    rolling_update(1, 1).await;
}

#[tokio::test]
async fn a_rolling_update_with_the_defaults_never_dips_below_the_instance_count() {
    // The defaults: max_surge 1, max_unavailable 0.
    rolling_update(1, 0).await;
}

#[tokio::test]
async fn an_update_that_never_becomes_ready_leaves_the_old_revision_serving() {
    const N: usize = 4;
    let cluster = slow_cluster().await;
    let admin = cluster.admin().clone();
    admin
        .apply(&app("web", "shop/web:1", N as u32))
        .await
        .unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), N, Some(1))
    });

    let (stop, stopped) = watch::channel(false);
    let observer = observe(admin.clone(), "web", stopped);
    // The simulation runs `unready` images but never passes their
    // readiness check.
    admin
        .apply(&app("web", "shop/web:2-unready", N as u32))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.send(true).unwrap();
    let seen = observer.await.unwrap();

    let (min_ready, at_min) = seen.min_ready.unwrap();
    assert!(
        min_ready >= N,
        "a revision that never becomes ready must not take ready instances away (max_unavailable 0): {min_ready} of {N} were ready at worst: {at_min:#?}"
    );
    let now = admin.instances("shop", "web").await.unwrap();
    let old_up = now.iter().filter(|i| i.revision == 1 && i.is_up()).count();
    assert_eq!(old_up, N, "the old revision still serves: {now:#?}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn scale_keeps_the_running_instances_and_restart_replaces_every_one() {
    let cluster = SimCluster::start(&nodes_in_zones(6, &ZONES)).await.unwrap();
    let admin = cluster.admin();
    admin.apply(&app("web", "shop/web:1", 3)).await.unwrap();
    let first = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 3, Some(1))
    });
    let ids = |instances: &[Instance]| -> BTreeSet<String> {
        instances.iter().map(|i| i.id.clone()).collect()
    };

    // Scale: the three stay, two more join.
    let scale = |instances: u32| {
        admin.call(
            reqwest::Method::POST,
            "/v1/projects/shop/apps/web/scale",
            Some((
                "application/json",
                format!("{{\"instances\": {instances}}}"),
            )),
        )
    };
    scale(5).await.unwrap();
    let scaled = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 5, Some(2))
    });
    assert!(
        ids(&first).is_subset(&ids(&scaled)),
        "no instance was replaced"
    );
    let nodes = admin.get("/v1/nodes").await.unwrap();
    let allocated = |field: &str| -> u64 {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["allocated"][field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(allocated("instances"), 5, "{nodes}");
    assert_eq!(allocated("cpu_millis"), 5 * 100, "the default 100m each");

    // Restart: every one is replaced, by a rolling update.
    let restarted = admin
        .call(
            reqwest::Method::POST,
            "/v1/projects/shop/apps/web/restart",
            None,
        )
        .await
        .unwrap();
    assert_eq!(restarted["revision"]["revision"], 3);
    let replaced = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 5, Some(3))
    });
    assert!(
        ids(&replaced).is_disjoint(&ids(&scaled)),
        "every instance was replaced"
    );

    // A scale after the restart keeps the restarted ones.
    scale(4).await.unwrap();
    let after = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 4, Some(4))
    });
    assert!(
        ids(&after).is_subset(&ids(&replaced)),
        "the scale restarted nothing"
    );
    cluster.shutdown().await.unwrap();
}
