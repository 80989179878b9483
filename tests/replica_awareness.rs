//! Replica awareness on a real cluster: lag measured and acted on, least-lag, health
//! checks, retries when a replica goes away, and read-your-writes. Each test that stops
//! or pauses a server gets a cluster of its own, so that tests can run side by side.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use replicator::admin::status::{NodeStatus, Status};
use replicator::server::Proxy;
use replicator::testbed::{Cluster, ClusterOptions, Node, SUPERUSER, SUPERUSER_PASSWORD};

async fn own_cluster() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await
        .expect("join")
        .expect("start cluster")
}

/// A proxy in front of `cluster`; every replica gets `replica_extra` (e.g. a tolerance).
async fn proxy_for(cluster: &Cluster, project_extra: &str, replica_extra: &str) -> Proxy {
    let text = config_text(cluster, project_extra, "").replace(
        "role = \"replica\"\n",
        &format!("role = \"replica\"\n{replica_extra}\n"),
    );
    start_proxy_with(&text).await
}

fn node<'a>(status: &'a Status, name: &str) -> &'a NodeStatus {
    status.projects[0]
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name} in {status:?}"))
}

async fn superuser_sql(node: &Node, sql: &str) {
    let url = node.url(SUPERUSER, SUPERUSER_PASSWORD, "app");
    let client = connect(&url).await.expect("superuser connection");
    client.batch_execute(sql).await.expect(sql);
}

async fn cluster_client(cluster: &Cluster) -> tokio_postgres::Client {
    connect(&cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app"))
        .await
        .expect("primary")
}

/// Ports that answered `n` plain reads through the proxy.
async fn read_ports(client: &tokio_postgres::Client, n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        ports.push(who(client, WHO).await.0);
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replica_shows_lag_leaves_the_rotation_and_comes_back() {
    let cluster = own_cluster().await;
    let proxy = proxy_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "lag_tolerance_ms = 400",
    )
    .await;
    let paused = &cluster.replicas[0];
    let other = &cluster.replicas[1];
    let primary = cluster_client(&cluster).await;
    primary
        .batch_execute("CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT now()); ALTER TABLE ticks OWNER TO app;")
        .await
        .unwrap();
    wait_status(&proxy, Duration::from_secs(10), "all nodes up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;

    superuser_sql(paused, "SELECT pg_wal_replay_pause()").await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        tokio::spawn(async move {
            while writing.load(Ordering::Relaxed) {
                primary
                    .execute("INSERT INTO ticks DEFAULT VALUES", &[])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            primary
        })
    };
    let s = wait_status(&proxy, Duration::from_secs(10), "slave-1 lagging", |s| {
        node(s, "slave-1").state == "lagging"
    })
    .await;
    let lagging = node(&s, "slave-1");
    assert!(lagging.lag_ms > 400, "{lagging:?}");
    assert!(lagging.lag_bytes > 0, "{lagging:?}");
    assert_eq!(node(&s, "slave-2").state, "up", "{s:#?}");

    let client = app_client(&proxy).await;
    let ports = read_ports(&client, 20).await;
    assert!(
        ports.iter().all(|p| *p == other.port),
        "reads must avoid the lagging replica {}: {ports:?}",
        paused.port
    );

    superuser_sql(paused, "SELECT pg_wal_replay_resume()").await;
    wait_status(&proxy, Duration::from_secs(10), "slave-1 back up", |s| {
        node(s, "slave-1").state == "up"
    })
    .await;
    let ports = read_ports(&client, 20).await;
    assert!(ports.contains(&paused.port), "{ports:?}");
    assert!(ports.contains(&other.port), "{ports:?}");

    // An idle primary: once the replicas have everything, time lag stays at zero
    // however long nothing is written.
    writing.store(false, Ordering::Relaxed);
    let _primary = writer.await.unwrap();
    wait_status(&proxy, Duration::from_secs(10), "replicas caught up", |s| {
        s.projects[0].nodes.iter().all(|n| n.lag_bytes == 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&proxy).await;
    for n in &s.projects[0].nodes {
        assert_eq!(n.lag_ms, 0, "idle primary, no lag expected: {n:?}");
    }
    let metrics = admin_http(&proxy.admin_addr.unwrap().to_string())
        .get("/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains("replicator_replica_lag_milliseconds{project=\"app\",node=\"slave-1\",role=\"replica\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_lag_prefers_the_fresher_replica() {
    let cluster = own_cluster().await;
    let proxy = proxy_for(
        &cluster,
        "read_routing = \"least-lag\"\nlag_check_interval_ms = 100",
        "lag_tolerance_ms = 600000",
    )
    .await;
    let primary = cluster_client(&cluster).await;
    let stale = &cluster.replicas[1];
    let fresh = &cluster.replicas[0];
    wait_status(&proxy, Duration::from_secs(10), "all nodes up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
    // Both fresh: least-lag takes turns between equals.
    let client = app_client(&proxy).await;
    let ports = read_ports(&client, 10).await;
    assert!(
        ports.contains(&stale.port) && ports.contains(&fresh.port),
        "{ports:?}"
    );

    superuser_sql(stale, "SELECT pg_wal_replay_pause()").await;
    primary
        .batch_execute(
            "CREATE TABLE least_lag_marker (x int); INSERT INTO least_lag_marker VALUES (1);",
        )
        .await
        .unwrap();
    wait_status(&proxy, Duration::from_secs(10), "slave-2 behind", |s| {
        node(s, "slave-2").lag_bytes > 0 && node(s, "slave-1").lag_bytes == 0
    })
    .await;
    let ports = read_ports(&client, 20).await;
    assert!(ports.iter().all(|p| *p == fresh.port), "{ports:?}");
    // Still within tolerance, so it stays a candidate: the status says so.
    assert_eq!(node(&status(&proxy).await, "slave-2").state, "up");
    superuser_sql(stale, "SELECT pg_wal_replay_resume()").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_and_restarted_replica_costs_readers_no_errors() {
    let cluster = own_cluster().await;
    let proxy = proxy_for(&cluster, "lag_check_interval_ms = 200", "").await;
    let victim = cluster.replicas[0].clone();
    let survivor = cluster.replicas[1].port;
    wait_status(&proxy, Duration::from_secs(10), "all nodes up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;

    let running = Arc::new(AtomicBool::new(true));
    let errors = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..4 {
        let client = app_client(&proxy).await;
        let (running, errors, reads) = (running.clone(), errors.clone(), reads.clone());
        readers.push(tokio::spawn(async move {
            let mut first_error = None;
            while running.load(Ordering::Relaxed) {
                // Simple and extended protocol both.
                let r = if i % 2 == 0 {
                    client.simple_query(WHO).await.map(|_| ())
                } else {
                    client.query_one(WHO, &[]).await.map(|_| ())
                };
                match r {
                    Ok(()) => reads.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.get_or_insert(format!("{e:?}"));
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            first_error
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopper = victim.clone();
    tokio::task::spawn_blocking(move || stopper.stop())
        .await
        .unwrap()
        .unwrap();
    wait_status(&proxy, Duration::from_secs(5), "slave-1 down", |s| {
        node(s, "slave-1").state == "down"
    })
    .await;
    let client = app_client(&proxy).await;
    let ports = read_ports(&client, 10).await;
    assert!(ports.iter().all(|p| *p == survivor), "{ports:?}");

    let starter = victim.clone();
    tokio::task::spawn_blocking(move || starter.start())
        .await
        .unwrap()
        .unwrap();
    wait_status(&proxy, Duration::from_secs(20), "slave-1 back", |s| {
        node(s, "slave-1").state == "up"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::Relaxed);
    let mut first_errors = Vec::new();
    for r in readers {
        if let Some(e) = r.await.unwrap() {
            first_errors.push(e);
        }
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "readers saw errors: {first_errors:?}"
    );
    assert!(reads.load(Ordering::Relaxed) > 100);
    let ports = read_ports(&client, 10).await;
    assert!(ports.contains(&victim.port), "{ports:?}");
}

/// Writes a row then reads it back through the same connection, `pairs` times, while
/// other clients write. Returns how many reads missed the row just written.
async fn write_then_read(proxy: &Proxy, table: &str, pairs: usize) -> (usize, usize) {
    let client = app_client(proxy).await;
    let busy = Arc::new(AtomicBool::new(true));
    let mut noise = Vec::new();
    for _ in 0..2 {
        let c = app_client(proxy).await;
        let busy = busy.clone();
        let table = table.to_string();
        noise.push(tokio::spawn(async move {
            while busy.load(Ordering::Relaxed) {
                c.execute(&format!("INSERT INTO {table}_noise (v) VALUES (0)"), &[])
                    .await
                    .unwrap();
            }
        }));
    }
    let insert = client
        .prepare(&format!("INSERT INTO {table} (v) VALUES ($1) RETURNING id"))
        .await
        .unwrap();
    let select = client
        .prepare(&format!(
            "SELECT v, pg_is_in_recovery() FROM {table} WHERE id = $1"
        ))
        .await
        .unwrap();
    let mut misses = 0;
    let mut on_replicas = 0;
    for i in 0..pairs {
        let id: i32 = client
            .query_one(&insert, &[&(i as i32)])
            .await
            .unwrap()
            .get(0);
        let rows = client.query(&select, &[&id]).await.unwrap();
        match rows.first() {
            Some(row) => {
                if row.get::<_, bool>(1) {
                    on_replicas += 1;
                }
            }
            None => misses += 1,
        }
    }
    busy.store(false, Ordering::Relaxed);
    for n in noise {
        n.await.unwrap();
    }
    (misses, on_replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_never_misses_a_committed_write() {
    let cluster = own_cluster().await;
    let primary = cluster_client(&cluster).await;
    primary
        .batch_execute(
            "CREATE TABLE ryw (id serial PRIMARY KEY, v int); ALTER TABLE ryw OWNER TO app;
             CREATE TABLE ryw_noise (id serial PRIMARY KEY, v int); ALTER TABLE ryw_noise OWNER TO app;",
        )
        .await
        .unwrap();
    tokio::task::block_in_place(|| cluster.wait_caught_up(Duration::from_secs(20))).unwrap();

    // Without read-your-writes, reading right after writing does miss on replicas:
    // this is what the setting is for (and proves the check below can fail).
    let off = proxy_for(&cluster, "lag_check_interval_ms = 100", "").await;
    let mut missed_without = 0;
    for _ in 0..5 {
        missed_without += write_then_read(&off, "ryw", 2_000).await.0;
        if missed_without > 0 {
            break;
        }
    }
    assert!(
        missed_without > 0,
        "expected stale reads without read_your_writes"
    );

    let on = proxy_for(
        &cluster,
        "read_your_writes = true\nlag_check_interval_ms = 100",
        "",
    )
    .await;
    let (misses, _) = write_then_read(&on, "ryw", 10_000).await;
    assert_eq!(
        misses, 0,
        "read-your-writes let a client miss its own write"
    );

    // A client that never writes keeps the full replica spread.
    let reader = app_client(&on).await;
    let ports = read_ports(&reader, 10).await;
    for r in &cluster.replicas {
        assert!(ports.contains(&r.port), "{ports:?}");
    }

    // With a causal wait, reads after writes may still run on replicas, once they
    // have replayed the write; never stale.
    let waiting = proxy_for(
        &cluster,
        // Checks every 500 ms (and a 500 ms timeout): this debug-build proxy shares its
        // runtime with the load, and a starved check would mark replicas down.
        "read_your_writes = true\ncausal_wait_ms = 2000\nlag_check_interval_ms = 500",
        "",
    )
    .await;
    let (misses, on_replicas) = write_then_read(&waiting, "ryw", 300).await;
    assert_eq!(misses, 0);
    assert!(
        on_replicas > 0,
        "causal wait should let replicas serve these reads"
    );
}
