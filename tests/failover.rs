//! Failover on a real cluster: the primary killed under write load, a lagging replica
//! passed over, a restarted proxy and a returning old primary, and a planned switchover.
//! Each test has its own cluster.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::failover::*;
use common::*;

/// Kills the primary under write load; returns (seconds to the first write after the
/// kill, acknowledged writes missing on the new primary).
async fn kill_primary_under_load(synchronous: bool) -> (f64, usize) {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    if synchronous {
        make_synchronous(&cluster).await;
    }
    // Default failover settings: 3 failed checks 1 s apart.
    let text = config_for(&cluster, "", "", "");
    let proxy = start_proxy_with(&text).await;
    wait_status(&proxy, Duration::from_secs(10), "all up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    let writers = Writers::start(&[proxy_url(&proxy, "app", "secret", "app")], 4).await;
    // Reads keep flowing from a client that never writes.
    let reader = app_client(&proxy).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(writers.total.load(Ordering::Relaxed) > 10);

    kill_primary(&cluster).await;
    let killed_at = writers.mark();
    let mut read_errors = 0;
    let s = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if reader.simple_query(WHO).await.is_err() {
                read_errors += 1;
            }
            let s = status(&proxy).await;
            if s.projects[0]
                .primary
                .as_deref()
                .is_some_and(|p| p != "master")
            {
                break s;
            }
            assert!(Instant::now() < deadline, "no failover: {s:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let new_primary = s.projects[0].primary.clone().unwrap();
    // Writes go on through the same connection string.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, errors, first_ok) = writers.stop().await;
    let first_ok = first_ok.expect("a write succeeded after the kill");
    let resume = first_ok.duration_since(killed_at).as_secs_f64();
    assert_eq!(read_errors, 0, "reads failed during the failover");

    let s = status(&proxy).await;
    let master = s.projects[0]
        .nodes
        .iter()
        .find(|n| n.name == "master")
        .unwrap();
    assert_eq!(master.role, "fenced", "{s:#?}");
    assert!(s.projects[0].failover.automatic >= 1);
    assert!(
        s.projects[0]
            .failover
            .last_event
            .as_deref()
            .unwrap_or("")
            .contains("promoted"),
        "{s:#?}"
    );
    let new_port = node_port(&cluster, &new_primary);
    let present = rows_on(new_port).await;
    let lost = acked.difference(&present).count();
    eprintln!(
        "failover ({}): first write {resume:.2} s after the kill; {} acknowledged, {lost} lost; {} client errors (in-flight writes)",
        if synchronous {
            "synchronous"
        } else {
            "asynchronous"
        },
        acked.len(),
        errors.len()
    );
    assert!(
        errors.len() <= 8,
        "each writer may lose its in-flight write, no more: {errors:?}"
    );

    // The other replica follows the new primary.
    let other = ["slave-1", "slave-2"]
        .into_iter()
        .find(|n| *n != new_primary)
        .unwrap();
    let other_port = node_port(&cluster, other);
    let follower = superuser(other_port).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = follower
            .query_opt("SELECT sender_port, status FROM pg_stat_wal_receiver", &[])
            .await
            .unwrap();
        if let Some(row) = row
            && row.get::<_, Option<i32>>(0) == Some(new_port as i32)
            && row.get::<_, Option<String>>(1).as_deref() == Some("streaming")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{other} does not stream from {new_primary}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let writer = app_client(&proxy).await;
    writer
        .execute("INSERT INTO failover_log VALUES (99, 1)", &[])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rows_on(other_port).await.contains(&(99, 1)) {
        assert!(
            Instant::now() < deadline,
            "{other} did not replay a write made after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    if synchronous {
        // A proxy restarted from the same files keeps writing to the new primary, and
        // the old primary, back up, is fenced.
        proxy.stop(Duration::from_secs(1)).await;
        let proxy = start_proxy_with(&text).await;
        let client = app_client(&proxy).await;
        let row = client
            .query_one(
                "INSERT INTO failover_log VALUES (99, 2) RETURNING inet_server_port()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), new_port as i32);
        let old = node_named(&cluster, "master").clone();
        tokio::task::spawn_blocking(move || old.start())
            .await
            .unwrap()
            .unwrap();
        let s = wait_status(
            &proxy,
            Duration::from_secs(20),
            "old primary seen again",
            |s| {
                let m = s.projects[0]
                    .nodes
                    .iter()
                    .find(|n| n.name == "master")
                    .unwrap();
                m.role == "fenced" && m.state == "up"
            },
        )
        .await;
        assert_eq!(s.projects[0].primary.as_deref(), Some(new_primary.as_str()));
        for _ in 0..20 {
            let (port, _) = who(&client, WHO).await;
            assert_ne!(port, cluster.primary.port, "the fenced primary got a read");
        }
        let row = client
            .query_one(
                "INSERT INTO failover_log VALUES (99, 3) RETURNING inet_server_port()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), new_port as i32);
    }
    (resume, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_with_synchronous_replication_loses_no_acknowledged_write() {
    let (resume, lost) = kill_primary_under_load(true).await;
    assert_eq!(
        lost, 0,
        "acknowledged writes lost with synchronous replication"
    );
    assert!(resume < 15.0, "writes resumed after {resume} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_with_asynchronous_replication_resumes_writes() {
    let (resume, lost) = kill_primary_under_load(false).await;
    eprintln!("asynchronous replication: {lost} acknowledged write(s) lost");
    assert!(resume < 15.0, "writes resumed after {resume} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_beyond_its_tolerance_is_never_promoted() {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    let text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "lag_tolerance_ms = 500",
        "health_check_interval_ms = 300\nfailure_threshold = 2\n",
    );
    let proxy = start_proxy_with(&text).await;
    wait_status(&proxy, Duration::from_secs(10), "all up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    let paused = superuser(cluster.replicas[0].port).await;
    paused
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let writers = Writers::start(&[proxy_url(&proxy, "app", "secret", "app")], 2).await;
    wait_status(&proxy, Duration::from_secs(10), "slave-1 lagging", |s| {
        s.projects[0]
            .nodes
            .iter()
            .any(|n| n.name == "slave-1" && n.state == "lagging")
    })
    .await;
    kill_primary(&cluster).await;
    writers.mark();
    let s = wait_status(&proxy, Duration::from_secs(30), "failover", |s| {
        s.projects[0]
            .primary
            .as_deref()
            .is_some_and(|p| p != "master")
    })
    .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("slave-2"), "{s:#?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, first_ok) = writers.stop().await;
    assert!(first_ok.is_some(), "writes did not resume on slave-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_loses_nothing_and_fails_no_client() {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    let text = config_for(&cluster, "lag_check_interval_ms = 200", "", "");
    let proxy = start_proxy_with(&text).await;
    wait_status(&proxy, Duration::from_secs(10), "all up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    let writers = Writers::start(&[proxy_url(&proxy, "app", "secret", "app")], 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = connect(&proxy_url(&proxy, "app", "secret", "replicator"))
        .await
        .unwrap();
    let started = Instant::now();
    admin
        .simple_query("PROMOTE app slave-1")
        .await
        .expect("switchover");
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, errors, _) = writers.stop().await;
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    let s = status(&proxy).await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("slave-1"), "{s:#?}");
    let present = rows_on(cluster.replicas[0].port).await;
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "switchover lost {} writes", lost.len());
    eprintln!(
        "switchover took {} ms; {} writes, none lost",
        took.as_millis(),
        acked.len()
    );
    // The CLI does the same on request; promoting back to a fenced node is refused.
    let addr = proxy.admin_addr.unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(["promote", "app", "master", "--admin", &addr])
            .env("REPLICATOR_ADMIN_TOKEN", replicator::testbed::ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fenced"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_eligible_replica_nothing_is_promoted_and_writes_fail_clearly() {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    // Tolerance 0: a replica must have everything the primary was last seen with.
    let text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "lag_tolerance_ms = 0",
        "health_check_interval_ms = 300\nfailure_threshold = 2\nwrite_wait_ms = 1500\n",
    );
    let proxy = start_proxy_with(&text).await;
    wait_status(&proxy, Duration::from_secs(10), "all up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    for replica in &cluster.replicas {
        superuser(replica.port)
            .await
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
    }
    let client = app_client(&proxy).await;
    for i in 0..20 {
        client
            .execute("INSERT INTO failover_log VALUES (1, $1)", &[&i])
            .await
            .unwrap();
    }
    // Let the monitor see the replicas behind while the primary is still up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_primary(&cluster).await;
    let s = wait_status(&proxy, Duration::from_secs(20), "refusal", |s| {
        s.projects[0].failover.state.contains("no eligible replica")
    })
    .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("master"), "{s:#?}");
    let started = Instant::now();
    let err = client
        .execute("INSERT INTO failover_log VALUES (2, 1)", &[])
        .await
        .expect_err("no primary");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "writes wait first"
    );
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("no primary") && message.contains("no eligible replica"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_only_reports_until_an_operator_promotes() {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    let text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "",
        "mode = \"manual\"\nhealth_check_interval_ms = 300\nfailure_threshold = 2\n",
    );
    let proxy = start_proxy_with(&text).await;
    wait_status(&proxy, Duration::from_secs(10), "all up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    kill_primary(&cluster).await;
    let s = wait_status(&proxy, Duration::from_secs(20), "manual report", |s| {
        s.projects[0].failover.state.contains("manual")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        status(&proxy).await.projects[0].primary.as_deref(),
        Some("master"),
        "{s:#?}"
    );

    let addr = proxy.admin_addr.unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(["promote", "app", "slave-2", "--admin", &addr])
            .env("REPLICATOR_ADMIN_TOKEN", replicator::testbed::ADMIN_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slave-2 promoted"));
    let client = app_client(&proxy).await;
    let row = client
        .query_one(
            "INSERT INTO failover_log VALUES (3, 1) RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), cluster.replicas[1].port as i32);
    let s = status(&proxy).await;
    assert_eq!(s.projects[0].failover.manual, 1);
    assert_eq!(s.projects[0].failover.automatic, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_the_proxy_cannot_reach_but_replicas_can_is_not_replaced() {
    let cluster = own_cluster(&[]).await;
    // The proxy's route to the primary is broken (a port nothing listens on), while the
    // replicas keep streaming from the real primary: a network problem, not a failure.
    let dead = replicator::testbed::free_port().unwrap();
    let text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "",
        "health_check_interval_ms = 200\nfailure_threshold = 2\n",
    )
    .replace(
        &format!("127.0.0.1:{}/", cluster.primary.port),
        &format!("127.0.0.1:{dead}/"),
    );
    let proxy = start_proxy_with(&text).await;
    let s = wait_status(&proxy, Duration::from_secs(20), "refusal", |s| {
        s.projects[0].failover.state.contains("still streams")
    })
    .await;
    assert_eq!(s.projects[0].primary.as_deref(), Some("master"), "{s:#?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = status(&proxy).await;
    assert_eq!(s.projects[0].failover.automatic, 0, "{s:#?}");
    for replica in &cluster.replicas {
        let in_recovery: bool = superuser(replica.port)
            .await
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(in_recovery, "a replica was promoted");
    }
}
