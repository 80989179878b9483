//! TLS towards servers: a cluster whose pg_hba.conf accepts TCP logins only over TLS
//! (`hostssl`), with the proxy's node URIs in libpq's words (`sslmode=verify-full`,
//! `sslrootcert=`). Routing, the monitor, failover and a CDC rule (walsender, snapshot
//! and a Postgres target) must all work, every connection encrypted.

mod common;

use std::time::{Duration, Instant};

use common::certs::TestCerts;
use common::failover::{config_for, kill_primary, write_port};
use common::*;
use replicator::testbed::{Cluster, ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD};

/// Polls `sql` on `node` over its Unix socket until it prints `want`.
async fn wait_for(node: &replicator::testbed::Node, database: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node = node.clone();
        let (database, sql_owned) = (database.to_string(), sql.to_string());
        let got = tokio::task::spawn_blocking(move || node.psql(&database, &sql_owned))
            .await
            .unwrap();
        if got.as_deref().ok() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got:?}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostssl_only_cluster_routes_fails_over_and_mirrors_over_tls() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("replicator-tls-servers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = TestCerts::make(&dir, &["127.0.0.1", "localhost"]);
    let tls = Some((certs.cert.clone(), certs.key.clone()));
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterOptions {
            tls_only: tls,
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("a hostssl-only cluster");
    // The servers themselves refuse clear-text logins.
    let err = connect(&cluster.primary.url("app", "secret", "app"))
        .await
        .expect_err("a clear-text login to a hostssl-only server");
    assert!(format!("{err:?}").contains("no encryption"), "{err:?}");

    let primary = &cluster.primary;
    primary
        .psql(
            "app",
            "CREATE TABLE tls_t (id int PRIMARY KEY, v text);
             INSERT INTO tls_t SELECT g, 'snapshot' FROM generate_series(1, 50) g;
             GRANT ALL ON tls_t TO app",
        )
        .unwrap();
    primary
        .psql("postgres", "CREATE DATABASE tls_mirror")
        .unwrap();
    let words = format!("sslmode=verify-full&sslrootcert={}", certs.ca.display());
    let mut text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "",
        "health_check_interval_ms = 200\nfailure_threshold = 2\n",
    )
    .replace("/app\"\n", &format!("/app?{words}\"\n"));
    text.push_str(&format!(
        "\n[targets.sink]\nkind = \"postgres\"\nuri = \"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@localhost:{}/tls_mirror?{words}\"\n\n\
         [[rules]]\nname = \"tls-mirror\"\nsource = \"app\"\ntarget = \"sink\"\ncollections = [\"tls_t\"]\ninterval_ms = 0\n",
        primary.port
    ));
    let proxy = start_proxy_with(&text).await;

    // Routing: reads on replicas, writes on the primary.
    let app = app_client(&proxy).await;
    for _ in 0..4 {
        let (port, replica) = who(&app, WHO).await;
        assert!(replica && port != primary.port);
    }
    let url = proxy_url(&proxy, "app", "secret", "app");
    assert_eq!(write_port(&url).await, Ok(primary.port));
    app.batch_execute("INSERT INTO tls_t VALUES (51, 'streamed')")
        .await
        .unwrap();
    // Every login the proxy made on the primary is encrypted (data path, monitor,
    // CDC walsender and target), and there are some.
    wait_for(
        primary,
        "postgres",
        "SELECT count(*) > 2 AND bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL AND a.backend_type IN ('client backend', 'walsender')",
        "t",
    )
    .await;
    // The CDC rule copied the snapshot and streamed the new row, over TLS both ways.
    wait_for(primary, "tls_mirror", "SELECT count(*) FROM tls_t", "51").await;

    // Failover: the monitor sees the primary die, a replica is promoted over TLS, and
    // writes land there with the data intact.
    kill_primary(&cluster).await;
    let replica_ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let new_primary = loop {
        if let Ok(port) = write_port(&url).await
            && replica_ports.contains(&port)
        {
            break port;
        }
        assert!(Instant::now() < deadline, "no failover over TLS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = app_client(&proxy).await;
    let row = client
        .query_one(
            "/* replicator: primary */ SELECT count(*)::int, inet_server_port() FROM tls_t",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 51);
    assert_eq!(row.get::<_, i32>(1) as u16, new_primary);
    proxy.stop(Duration::from_secs(2)).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
