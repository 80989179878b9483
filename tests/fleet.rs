//! Fleet mode on a real etcd and three proxy processes in front of one cluster with
//! synchronous replication: one promotion however many proxies see the primary die,
//! every proxy following it, nothing promoted and no write sent while cut off from
//! etcd, and a restarted proxy that knows the new primary without its state file.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::failover::*;
use common::process::{ProxyProcess, proxy_dir};
use common::*;
use replicator::admin::status::Status;
use replicator::testbed::Cluster;
use replicator::testbed::etcd::Etcd;

/// A short lease so that the tests see leadership move within seconds.
const LEASE_TTL_MS: u64 = 3000;

fn start_etcd() -> Etcd {
    Etcd::start(&PathBuf::from(env!("CARGO_TARGET_TMPDIR"))).expect("etcd")
}

async fn synchronous_cluster() -> Cluster {
    let cluster = own_cluster(&[]).await;
    create_log_table(&cluster).await;
    make_synchronous(&cluster).await;
    cluster
}

fn fleet_config(cluster: &Cluster, etcd: &Etcd, prefix: &str) -> String {
    let text = config_for(
        cluster,
        "lag_check_interval_ms = 200",
        "",
        "health_check_interval_ms = 500\nfailure_threshold = 2\nwrite_wait_ms = 8000\n",
    );
    format!(
        "{text}\n[coordination]\netcd = [\"{}\"]\nprefix = \"{prefix}\"\nlease_ttl_ms = {LEASE_TTL_MS}\n",
        etcd.endpoint()
    )
}

/// Three proxies of one fleet; the first is started first so it leads.
async fn start_fleet(test: &str, text: &str, first_env: &[(&str, &str)]) -> Vec<ProxyProcess> {
    let mut proxies = Vec::new();
    for i in 0..3 {
        let name = format!("proxy-{}", i + 1);
        let env = if i == 0 { first_env } else { &[] };
        let proxy = ProxyProcess::start(&name, &proxy_dir(test, &name), text, env);
        if i == 0 {
            proxy
                .wait_status(Duration::from_secs(30), "the first proxy leads", |s| {
                    s.fleet.as_ref().is_some_and(|f| f.is_leader)
                })
                .await;
        }
        proxies.push(proxy);
    }
    for proxy in &proxies {
        proxy
            .wait_status(
                Duration::from_secs(30),
                "a fleet of three, all nodes up",
                |s| {
                    s.fleet
                        .as_ref()
                        .is_some_and(|f| f.members.len() == 3 && f.writes_allowed)
                        && s.projects[0].nodes.iter().all(|n| n.state == "up")
                },
            )
            .await;
    }
    proxies
}

fn primary_of(s: &Status) -> Option<String> {
    s.projects[0].primary.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_under_three_proxies_promotes_once_and_moves_them_all() {
    let etcd = start_etcd();
    let cluster = synchronous_cluster().await;
    let text = fleet_config(&cluster, &etcd, "/fleet-kill");
    let proxies = start_fleet("fleet-kill", &text, &[]).await;
    let urls: Vec<String> = proxies
        .iter()
        .map(|p| p.url("app", "secret", "app"))
        .collect();
    let writers = Writers::start(&urls, 6).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while writers.total.load(Ordering::Relaxed) <= 10 {
        assert!(Instant::now() < deadline, "the writers do not get going");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let killed_at = kill_primary(&cluster).await;
    writers.mark();
    let mut moved = Vec::new();
    for proxy in &proxies {
        let s = proxy
            .wait_status(Duration::from_secs(30), "a new primary", |s| {
                primary_of(s).is_some_and(|p| p != "master")
            })
            .await;
        moved.push(primary_of(&s).unwrap());
    }
    assert!(
        moved.iter().all(|p| *p == moved[0]),
        "proxies disagree: {moved:?}"
    );
    let new_primary = moved[0].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, errors, first_ok) = writers.stop().await;
    let resume = first_ok
        .expect("a write succeeded after the kill")
        .duration_since(killed_at);
    assert_eq!(
        out_of_recovery(&cluster).await,
        std::slice::from_ref(&new_primary)
    );
    let new_port = node_port(&cluster, &new_primary);
    for url in &urls {
        assert_eq!(write_port(url).await, Ok(new_port));
    }
    let present = rows_on(new_port).await;
    let lost = acked.difference(&present).count();
    let promotions: u64 = futures_util::future::join_all(proxies.iter().map(|p| p.status()))
        .await
        .into_iter()
        .flatten()
        .map(|s| s.projects[0].failover.automatic)
        .sum();
    eprintln!(
        "fleet failover: first write {:.2} s after the kill; {} acknowledged, {lost} lost; {} client errors",
        resume.as_secs_f64(),
        acked.len(),
        errors.len()
    );
    assert_eq!(promotions, 1, "exactly one promotion in the fleet");
    assert_eq!(
        lost, 0,
        "acknowledged writes lost with synchronous replication"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_etcd_nothing_is_promoted_and_no_write_is_sent_until_it_returns() {
    let mut etcd = start_etcd();
    let cluster = synchronous_cluster().await;
    let text = fleet_config(&cluster, &etcd, "/fleet-cut");
    let proxies = start_fleet("fleet-cut", &text, &[]).await;
    etcd.stop();
    // Past the lease: every proxy knows it may be out of date.
    for proxy in &proxies {
        proxy
            .wait_status(Duration::from_secs(20), "writes held", |s| {
                s.fleet.as_ref().is_some_and(|f| !f.writes_allowed)
            })
            .await;
    }
    kill_primary(&cluster).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        out_of_recovery(&cluster).await.is_empty(),
        "promoted while cut off"
    );
    let url = proxies[1].url("app", "secret", "app");
    let refused = write_port(&url).await.expect_err("no write while cut off");
    assert!(refused.contains("etcd"), "{refused}");
    for proxy in &proxies {
        let s = proxy.status().await.expect("status");
        assert_eq!(primary_of(&s).as_deref(), Some("master"), "{s:#?}");
    }

    etcd.resume().expect("etcd again");
    let mut moved = Vec::new();
    for proxy in &proxies {
        let s = proxy
            .wait_status(
                Duration::from_secs(40),
                "failover after etcd returns",
                |s| {
                    primary_of(s).is_some_and(|p| p != "master")
                        && s.fleet.as_ref().is_some_and(|f| f.writes_allowed)
                },
            )
            .await;
        moved.push(primary_of(&s).unwrap());
    }
    assert!(moved.iter().all(|p| *p == moved[0]), "{moved:?}");
    assert_eq!(out_of_recovery(&cluster).await, [moved[0].clone()]);
    assert_eq!(write_port(&url).await, Ok(node_port(&cluster, &moved[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_between_pg_promote_and_the_commit_is_finished_by_the_next() {
    let etcd = start_etcd();
    let cluster = synchronous_cluster().await;
    let text = fleet_config(&cluster, &etcd, "/fleet-leader");
    let mut proxies = start_fleet(
        "fleet-leader",
        &text,
        &[("REPLICATOR_FAILPOINT", "failover-crash-after-promote")],
    )
    .await;
    kill_primary(&cluster).await;
    let exit = tokio::task::block_in_place(|| proxies[0].wait_exit(Duration::from_secs(30)));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(replicator::failpoint::CRASH_EXIT_CODE),
        "{}",
        proxies[0].log()
    );
    let promoted = out_of_recovery(&cluster).await;
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    for proxy in &proxies[1..] {
        proxy
            .wait_status(
                Duration::from_secs(30),
                "the same promotion finished",
                |s| primary_of(s).as_deref() == Some(promoted[0].as_str()),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        out_of_recovery(&cluster).await,
        promoted,
        "a second promotion"
    );
    // The crashed leader, restarted, follows the recorded topology.
    proxies[0].restart(&[]);
    proxies[0]
        .wait_status(
            Duration::from_secs(30),
            "the restarted proxy follows",
            |s| primary_of(s).as_deref() == Some(promoted[0].as_str()),
        )
        .await;
    let url = proxies[0].url("app", "secret", "app");
    assert_eq!(
        write_port(&url).await,
        Ok(node_port(&cluster, &promoted[0]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_without_its_state_file_writes_to_the_new_primary_first() {
    let etcd = start_etcd();
    let cluster = synchronous_cluster().await;
    let text = fleet_config(&cluster, &etcd, "/fleet-restart");
    let mut proxies = start_fleet("fleet-restart", &text, &[]).await;
    kill_primary(&cluster).await;
    let s = proxies[2]
        .wait_status(Duration::from_secs(30), "a new primary", |s| {
            primary_of(s).is_some_and(|p| p != "master")
        })
        .await;
    let new_primary = primary_of(&s).unwrap();
    proxies[2].kill();
    let _ = std::fs::remove_file(proxies[2].dir.join("state.json"));
    // The old primary is back (as a stale primary): a proxy that trusted proxy.toml
    // would write to it.
    let restarter = cluster.primary.clone();
    tokio::task::spawn_blocking(move || restarter.start())
        .await
        .unwrap()
        .unwrap();
    proxies[2].restart(&[]);
    let url = proxies[2].url("app", "secret", "app");
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        match write_port(&url).await {
            Ok(port) => break port,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}\n{}", proxies[2].log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        port,
        node_port(&cluster, &new_primary),
        "the first write went elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_is_cancelled_whichever_instance_gets_the_cancel_request() {
    use common::wire::{cancel_packet, error_until_ready, login_raw_with_key, query};
    use tokio::io::AsyncWriteExt;
    let etcd = start_etcd();
    let cluster = own_cluster(&[]).await;
    let text = fleet_config(&cluster, &etcd, "/fleet-cancel");
    let proxies = start_fleet("fleet-cancel", &text, &[]).await;
    // The fleet in the metrics: one leader among the three, the topology's generation.
    let mut leaders = 0;
    for proxy in &proxies {
        let (code, metrics) = admin_http(&proxy.admin)
            .get("/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(code, 200);
        assert!(
            metrics.contains("replicator_fleet_topology_generation{"),
            "{metrics}"
        );
        leaders += metrics
            .lines()
            .filter(|l| l.starts_with("replicator_fleet_leader{") && l.ends_with(" 1"))
            .count();
    }
    assert_eq!(leaders, 1);
    for (runs_on, cancelled_through) in [(0, 1), (2, 0)] {
        let address = format!("127.0.0.1:{}", proxies[runs_on].port);
        let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let (mut client, (pid, secret)) = login_raw_with_key(stream).await;
        let started = Instant::now();
        client
            .write_all(&query("SELECT pg_sleep(30)"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let other = format!("127.0.0.1:{}", proxies[cancelled_through].port);
        let mut cancel = tokio::net::TcpStream::connect(&other).await.unwrap();
        cancel.write_all(&cancel_packet(pid, secret)).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        let answer = error_until_ready(&mut client, &mut buf);
        let code = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .expect("the statement was not cancelled");
        assert_eq!(code.as_deref(), Some("57014"));
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}

/// Rows of `table` at `url` as text, sorted (none while the table does not exist).
async fn table_rows(url: &str, table: &str) -> Vec<String> {
    let client = connect(url).await.expect("connect");
    client
        .query(
            &format!("SELECT id::text || ':' || v FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdc_rule_keeps_mirroring_across_the_death_of_the_leader_proxy() {
    use replicator::testbed::{SUPERUSER, SUPERUSER_PASSWORD};
    let etcd = start_etcd();
    let cluster = own_cluster(&[]).await;
    let admin = superuser(cluster.primary.port).await;
    admin
        .batch_execute(
            "CREATE TABLE fleet_cdc (id int PRIMARY KEY, v text);
             ALTER TABLE fleet_cdc OWNER TO app;",
        )
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE fleet_mirror")
        .await
        .unwrap();
    let target = format!(
        "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/fleet_mirror",
        cluster.primary.port
    );
    let text = format!(
        "{}\n[targets.sink]\nkind = \"postgres\"\nuri = \"{target}\"\n\n\
         [[rules]]\nname = \"fleet-mirror\"\nsource = \"app\"\ntarget = \"sink\"\n\
         collections = [\"fleet_cdc\"]\ninterval_ms = 0\n",
        fleet_config(&cluster, &etcd, "/fleet-cdc")
    );
    let mut proxies = start_fleet("fleet-cdc", &text, &[]).await;
    let source = cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app");
    let app = connect(&proxies[1].url("app", "secret", "app"))
        .await
        .unwrap();
    app.batch_execute("INSERT INTO fleet_cdc SELECT g, 'before' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let wait_mirrored = |what: &'static str| {
        let (source, target) = (source.clone(), target.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let want = table_rows(&source, "fleet_cdc").await;
                if table_rows(&target, "fleet_cdc").await == want {
                    return want.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the mirror never caught up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(wait_mirrored("before").await, 100);
    // Only the leader runs the rule.
    for (i, proxy) in proxies.iter().enumerate() {
        let s = proxy.status().await.expect("status");
        assert_eq!(
            s.rules.len(),
            usize::from(i == 0),
            "{}: {:?}",
            proxy.name,
            s.rules
        );
    }
    proxies[0].kill();
    app.batch_execute(
        "INSERT INTO fleet_cdc SELECT g, 'after' FROM generate_series(101, 200) g;
         UPDATE fleet_cdc SET v = 'changed' WHERE id <= 10;
         DELETE FROM fleet_cdc WHERE id BETWEEN 11 AND 20;",
    )
    .await
    .unwrap();
    assert_eq!(wait_mirrored("after the leader died").await, 190);
    let runner = futures_util::future::join_all(proxies[1..].iter().map(|p| p.status()))
        .await
        .into_iter()
        .flatten()
        .filter(|s| !s.rules.is_empty())
        .collect::<Vec<_>>();
    assert_eq!(runner.len(), 1, "one new leader runs the rule");
    assert_eq!(
        runner[0].rules[0].snapshot_rows, 0,
        "the new leader resumed from the slot, without a new snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_on_one_instance_serves_reads_through_the_others() {
    let etcd = start_etcd();
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(replicator::testbed::ClusterOptions {
            replicas: 3,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("cluster");
    // proxy.toml knows two of the three replicas.
    let full = fleet_config(&cluster, &etcd, "/fleet-runtime");
    let third = cluster.replicas[2].port;
    let block_start = full.find("name = \"slave-3\"").expect("slave-3 block");
    let block_start = full[..block_start].rfind("[[projects").unwrap();
    let uri_line = format!("uri = \"postgresql://127.0.0.1:{third}/app\"");
    let block_end = full.find(&uri_line).unwrap() + uri_line.len();
    let text = format!("{}{}", &full[..block_start], &full[block_end..]);
    assert!(!text.contains("slave-3"));
    let mut proxies = start_fleet("fleet-runtime", &text, &[]).await;

    let admin = connect(&proxies[0].url("app", "secret", "replicator"))
        .await
        .unwrap();
    admin
        .simple_query(&format!(
            "ADD REPLICA app slave-3 replica 'postgresql://127.0.0.1:{third}/app'"
        ))
        .await
        .expect("ADD REPLICA");
    let added_at = Instant::now();
    let has_third = |s: &Status| s.projects[0].nodes.iter().any(|n| n.name == "slave-3");
    for proxy in &proxies[1..] {
        proxy
            .wait_status(Duration::from_secs(5), "slave-3 in the topology", has_third)
            .await;
        eprintln!(
            "{} has slave-3 {} ms after ADD REPLICA",
            proxy.name,
            added_at.elapsed().as_millis()
        );
    }
    for proxy in &proxies[1..] {
        let client = connect(&proxy.url("app", "secret", "app")).await.unwrap();
        let mut seen = false;
        for _ in 0..60 {
            if who(&client, WHO).await == (third, true) {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen, "{}: no read reached slave-3", proxy.name);
    }
    let other = connect(&proxies[1].url("app", "secret", "replicator"))
        .await
        .unwrap();
    let rows = other.simple_query("SHOW CONFIG").await.unwrap();
    let source = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("value") == Some("slave-3") => {
                r.get("source").map(str::to_string)
            }
            _ => None,
        })
        .expect("slave-3 in SHOW CONFIG");
    assert!(
        source.starts_with("etcd: ADD REPLICA app slave-3"),
        "{source}"
    );
    // proxy.toml is untouched; a restarted instance still has the node.
    assert!(
        !std::fs::read_to_string(proxies[2].dir.join("proxy.toml"))
            .unwrap()
            .contains("slave-3")
    );
    proxies[2].restart(&[]);
    proxies[2]
        .wait_status(
            Duration::from_secs(30),
            "slave-3 after a restart",
            has_third,
        )
        .await;
}
