//! The single-instance failover holes, each on a cluster of its own: a crash or a failed
//! write between pg_promote and the record of the decision, a replica promoted outside
//! the proxy, a replica that streams from a sibling rather than from the primary, and a
//! proxy that starts while the primary is already down (no lag knowledge).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::failover::*;
use common::process::{ProxyProcess, proxy_dir};
use common::*;
use replicator::testbed::Cluster;

const FAST_CHECKS: &str = "health_check_interval_ms = 200\nfailure_threshold = 2\n";

fn fast_config(cluster: &Cluster) -> String {
    config_for(cluster, "lag_check_interval_ms = 100", "", FAST_CHECKS)
}

/// The proxy binary with `failpoint` armed, all nodes seen up (and lag known), then the
/// primary killed.
async fn kill_primary_under(
    test: &str,
    cluster: &Cluster,
    failpoint: &str,
) -> (ProxyProcess, PathBuf) {
    let dir = proxy_dir("failover_safety", test);
    let proxy = ProxyProcess::start(
        "proxy",
        &dir,
        &fast_config(cluster),
        &[("REPLICATOR_FAILPOINT", failpoint)],
    );
    proxy
        .wait_status(Duration::from_secs(30), "all up", all_up)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_primary(cluster).await;
    (proxy, dir)
}

fn all_up(s: &replicator::admin::status::Status) -> bool {
    s.projects[0].nodes.iter().all(|n| n.state == "up")
}

fn state_file_text(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("state.json")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_pg_promote_and_the_record_is_finished_with_the_same_node() {
    let cluster = own_cluster(&[]).await;
    let (mut proxy, dir) =
        kill_primary_under("crash", &cluster, "failover-crash-after-promote").await;
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(30)));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(replicator::failpoint::CRASH_EXIT_CODE),
        "the proxy did not stop at the failpoint\n{}",
        proxy.log()
    );
    let promoted = out_of_recovery(&cluster).await;
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    assert!(
        state_file_text(&dir).contains("intent"),
        "{}",
        state_file_text(&dir)
    );

    proxy.restart(&[]);
    proxy
        .wait_status(Duration::from_secs(30), "the same node as primary", |s| {
            s.projects[0].primary.as_deref() == Some(promoted[0].as_str())
                && s.projects[0].failover.state == "primary healthy"
        })
        .await;
    // Many monitor rounds later, still one primary.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(out_of_recovery(&cluster).await, promoted, "{}", proxy.log());
    let url = proxy.url("app", "secret", "app");
    assert_eq!(
        write_port(&url).await,
        Ok(node_port(&cluster, &promoted[0]))
    );
    assert!(
        !state_file_text(&dir).contains("intent"),
        "{}",
        state_file_text(&dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_after_pg_promote_never_leads_to_a_second_promotion() {
    let cluster = own_cluster(&[]).await;
    let (mut proxy, dir) =
        kill_primary_under("record-fails", &cluster, "failover-commit-fails").await;
    let s = proxy
        .wait_status(Duration::from_secs(30), "a promotion", |s| {
            s.projects[0]
                .primary
                .as_deref()
                .is_some_and(|p| p != "master")
        })
        .await;
    let primary = s.projects[0].primary.clone().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        out_of_recovery(&cluster).await,
        std::slice::from_ref(&primary),
        "{}",
        proxy.log()
    );
    let s = proxy
        .wait_status(Duration::from_secs(10), "the failed record reported", |s| {
            s.projects[0]
                .failover
                .state
                .contains("recording the decision failed")
        })
        .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some(primary.as_str()));
    let url = proxy.url("app", "secret", "app");
    assert_eq!(write_port(&url).await, Ok(node_port(&cluster, &primary)));

    // Restarted with a working disk: the recorded intent is finished, nothing else.
    proxy.restart(&[]);
    proxy
        .wait_status(Duration::from_secs(30), "the decision recorded", |s| {
            s.projects[0].primary.as_deref() == Some(primary.as_str())
                && s.projects[0].failover.state == "primary healthy"
        })
        .await;
    assert!(
        !state_file_text(&dir).contains("intent"),
        "{}",
        state_file_text(&dir)
    );
    assert_eq!(out_of_recovery(&cluster).await, [primary]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_outside_the_proxy_is_adopted_not_joined_by_a_second_primary() {
    let cluster = own_cluster(&[]).await;
    let proxy = start_proxy_with(&fast_config(&cluster)).await;
    wait_status(&proxy, Duration::from_secs(20), "all up", all_up).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another proxy, or an operator, promoted slave-2 already.
    superuser(cluster.replicas[1].port)
        .await
        .batch_execute("SELECT pg_promote(true, 60)")
        .await
        .unwrap();
    kill_primary(&cluster).await;
    let s = wait_status(&proxy, Duration::from_secs(30), "a new primary", |s| {
        s.projects[0]
            .primary
            .as_deref()
            .is_some_and(|p| p != "master")
    })
    .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("slave-2"), "{s:#?}");
    // The event is written just after traffic moves.
    wait_status(
        &proxy,
        Duration::from_secs(10),
        "the adoption reported",
        |s| {
            s.projects[0]
                .failover
                .last_event
                .as_deref()
                .is_some_and(|e| e.contains("adopted"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(out_of_recovery(&cluster).await, ["slave-2"]);
    let url = proxy_url(&proxy, "app", "secret", "app");
    assert_eq!(write_port(&url).await, Ok(cluster.replicas[1].port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_streaming_from_a_sibling_does_not_hold_failover_back() {
    let cluster = own_cluster(&[]).await;
    // slave-2 cascades from slave-1: it streams, but not from the primary.
    let (sibling, cascading) = (cluster.replicas[0].port, cluster.replicas[1].port);
    let client = superuser(cascading).await;
    let conninfo: String = client
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    let conninfo = replicator::cluster::failover::with_host_port(&conninfo, "127.0.0.1", sibling);
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            conninfo.replace('\'', "''")
        ))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_opt(
                "SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                &[],
            )
            .await
            .unwrap();
        if row.is_some_and(|r| r.get::<_, Option<i32>>(0) == Some(sibling as i32)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slave-2 never cascaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxy = start_proxy_with(&fast_config(&cluster)).await;
    wait_status(&proxy, Duration::from_secs(20), "all up", all_up).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_primary(&cluster).await;
    let s = wait_status(&proxy, Duration::from_secs(30), "a new primary", |s| {
        s.projects[0]
            .primary
            .as_deref()
            .is_some_and(|p| p != "master")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let promoted = out_of_recovery(&cluster).await;
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    assert_eq!(s.projects[0].primary.as_deref(), Some(promoted[0].as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_after_the_primary_died_promotes_nothing_and_says_why() {
    let cluster = own_cluster(&[]).await;
    kill_primary(&cluster).await;
    let proxy = start_proxy_with(&fast_config(&cluster)).await;
    let s = wait_status(&proxy, Duration::from_secs(30), "a refusal", |s| {
        s.projects[0].failover.state.contains("lag is unknown")
    })
    .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("master"), "{s:#?}");
    let admin = connect(&proxy_url(&proxy, "app", "secret", "replicator"))
        .await
        .unwrap();
    let shown = admin.simple_query("SHOW FAILOVER").await.unwrap();
    let state = shown
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("state").map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    assert!(state.contains("lag is unknown"), "{state}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        out_of_recovery(&cluster).await.is_empty(),
        "a replica was promoted"
    );
    // The operator decides.
    admin
        .simple_query("PROMOTE app slave-1")
        .await
        .expect("PROMOTE");
    let url = proxy_url(&proxy, "app", "secret", "app");
    assert_eq!(write_port(&url).await, Ok(cluster.replicas[0].port));
    assert_eq!(out_of_recovery(&cluster).await, ["slave-1"]);
}

/// A SIGTERM that arrives in the middle of a promotion: the proxy finishes it before it
/// exits (one node out of recovery, the decision recorded as done), never leaving a
/// decision half carried out or starting another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_a_promotion_lets_it_finish() {
    let cluster = own_cluster(&[]).await;
    let (mut proxy, dir) = kill_primary_under("sigterm", &cluster, "failover-slow-promotion").await;
    // The decision is recorded, the promotion paused on its way to pg_promote.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !state_file_text(&dir).contains("intent") {
        assert!(
            std::time::Instant::now() < deadline,
            "no promotion started\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.terminate();
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(90)));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "no clean exit\n{}",
        proxy.log()
    );
    let promoted = out_of_recovery(&cluster).await;
    assert_eq!(promoted.len(), 1, "{promoted:?}\n{}", proxy.log());
    let state = state_file_text(&dir);
    assert!(!state.contains("intent"), "{state}");
    assert!(
        state.contains(&format!("\"primary\": \"{}\"", promoted[0])),
        "{state}"
    );
}
