//! The operator's view: the admin console (database `replicator`), the HTTP endpoints
//! and `replicator status`, checked against what the cluster really is.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use replicator::admin::http;
use replicator::admin::status::Status;
use replicator::server::Proxy;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

async fn admin_client(proxy: &Proxy) -> tokio_postgres::Client {
    connect(&proxy_url(proxy, "app", "secret", "replicator"))
        .await
        .expect("admin console")
}

/// Rows of a console command as column-name → value maps.
async fn table(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<(String, String)>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn field<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

async fn wait_all_up(proxy: &Proxy) {
    wait_status(proxy, Duration::from_secs(10), "all nodes up", |s| {
        s.projects[0].nodes.iter().all(|n| n.state == "up")
    })
    .await;
}

#[tokio::test]
async fn console_shows_the_cluster_and_changes_routing() {
    let proxy = start_proxy("lag_check_interval_ms = 100", "").await;
    wait_all_up(&proxy).await;
    let app = app_client(&proxy).await;
    for _ in 0..4 {
        who(&app, WHO).await;
    }
    app.execute("SELECT pg_is_in_recovery() FOR SHARE", &[])
        .await
        .ok();
    let admin = admin_client(&proxy).await;

    let replicas = table(&admin, "SHOW REPLICAS").await;
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let by_name = |name: &str| {
        replicas
            .iter()
            .find(|r| field(r, "name") == name)
            .unwrap_or_else(|| panic!("{name} missing: {replicas:?}"))
            .clone()
    };
    let master = by_name("master");
    assert_eq!(field(&master, "role"), "primary");
    assert_eq!(
        field(&master, "address"),
        format!("127.0.0.1:{}", primary_port())
    );
    let mut replica_reads = 0;
    for (i, port) in replica_ports().iter().enumerate() {
        let r = by_name(&format!("slave-{}", i + 1));
        assert_eq!(field(&r, "role"), "replica");
        assert_eq!(field(&r, "state"), "up");
        assert_eq!(field(&r, "address"), format!("127.0.0.1:{port}"));
        assert!(field(&r, "lag_ms").parse::<u64>().is_ok());
        assert!(field(&r, "lag_bytes").parse::<u64>().is_ok());
        replica_reads += field(&r, "reads").parse::<u64>().unwrap();
    }
    assert!(replica_reads >= 4, "{replicas:?}");

    let pools = table(&admin, "SHOW POOLS").await;
    assert!(
        pools
            .iter()
            .any(|p| field(p, "user") == "app" && field(p, "node") == "master"),
        "{pools:?}"
    );
    let clients = table(&admin, "SHOW CLIENTS").await;
    assert!(
        clients
            .iter()
            .any(|c| field(c, "project") == "app" && field(c, "user") == "app"),
        "{clients:?}"
    );
    assert!(clients.iter().any(|c| field(c, "project") == "replicator"));
    let config = table(&admin, "SHOW CONFIG").await;
    let password = config
        .iter()
        .find(|r| field(r, "key") == "users[0].password")
        .expect("password row");
    assert_eq!(field(password, "value"), "********");

    admin
        .simple_query("SET READ_ROUTING app least-lag")
        .await
        .expect("set routing");
    let stats = table(&admin, "SHOW STATS").await;
    assert_eq!(field(&stats[0], "read_routing"), "least-lag");
    let config = table(&admin, "SHOW CONFIG").await;
    assert!(config.iter().any(
        |r| field(r, "key") == "projects.app.read_routing" && field(r, "value") == "least-lag"
    ));

    let bad = admin
        .simple_query("SET READ_ROUTING app fastest")
        .await
        .unwrap_err();
    assert_sqlstate(&bad, SqlState::INVALID_PARAMETER_VALUE);
    let bad = admin
        .simple_query("SET READ_ROUTING nope random")
        .await
        .unwrap_err();
    assert_sqlstate(&bad, SqlState::UNDEFINED_OBJECT);
    let bad = admin
        .simple_query("DROP TABLE everything")
        .await
        .unwrap_err();
    assert_sqlstate(&bad, SqlState::SYNTAX_ERROR);
    // The console stays usable after errors.
    assert_eq!(table(&admin, "SHOW STATS").await.len(), 1);
}

#[tokio::test]
async fn console_refuses_non_admin_users() {
    let proxy = start_proxy("", "").await;
    let Err(err) = connect(&proxy_url(&proxy, "plain_user", "secret", "replicator")).await else {
        panic!("plain_user is not an admin");
    };
    assert_sqlstate(&err, SqlState::INSUFFICIENT_PRIVILEGE);
}

#[tokio::test]
async fn psql_shows_console_tables() {
    let proxy = start_proxy("", "").await;
    let psql = replicator::testbed::bindir().unwrap().join("psql");
    let url = proxy_url(&proxy, "app", "secret", "replicator");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(psql)
            .args([url.as_str(), "-X", "-c", "SHOW REPLICAS"])
            .output()
            .expect("run psql")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = text.lines().next().unwrap_or_default();
    for column in [
        "project",
        "name",
        "role",
        "state",
        "lag_ms",
        "lag_bytes",
        "reads",
    ] {
        assert!(header.contains(column), "{text}");
    }
    assert!(text.contains("slave-2"), "{text}");
    assert!(text.contains("(3 rows)"), "{text}");
}

#[tokio::test]
async fn http_status_metrics_and_health_tell_the_truth() {
    let proxy = start_proxy("lag_check_interval_ms = 100", "").await;
    wait_all_up(&proxy).await;
    let app = app_client(&proxy).await;
    for _ in 0..4 {
        who(&app, WHO).await;
    }
    app.batch_execute("SELECT 1").await.unwrap();
    let addr = proxy.admin_addr.unwrap().to_string();

    let (code, body) = http::get(&addr, "/status").await.unwrap();
    assert_eq!(code, 200);
    let status: Status = serde_json::from_str(&body).unwrap();
    let project = &status.projects[0];
    assert_eq!(project.name, "app");
    assert_eq!(project.nodes.len(), 3);
    let primary = project.nodes.iter().find(|n| n.role == "primary").unwrap();
    assert_eq!(primary.address, format!("127.0.0.1:{}", primary_port()));
    let ports: Vec<String> = project
        .nodes
        .iter()
        .filter(|n| n.role == "replica")
        .map(|n| n.address.clone())
        .collect();
    for port in replica_ports() {
        assert!(ports.contains(&format!("127.0.0.1:{port}")), "{ports:?}");
    }
    assert!(status.clients >= 1);

    let (code, metrics) = http::get(&addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for needle in [
        "# TYPE replicator_queries_total counter",
        "replicator_queries_total{project=\"app\",node=\"slave-1\",role=\"replica\",kind=\"read\"}",
        "replicator_replica_lag_bytes{project=\"app\",node=\"slave-2\",role=\"replica\"}",
        "replicator_query_duration_seconds_bucket{project=\"app\",node=\"slave-1\",role=\"replica\",le=\"0.0001\"}",
        "replicator_query_duration_seconds_count{project=\"app\",node=\"slave-2\",role=\"replica\"}",
        "replicator_fallback_reads_total{project=\"app\"} 0",
        "replicator_pool_connections{",
        "replicator_node_up{project=\"app\",node=\"master\",role=\"primary\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
    let reads: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("replicator_queries_total") && l.contains("kind=\"read\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(reads >= 4, "{metrics}");

    let (code, body) = http::get(&addr, "/health").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = http::get(&addr, "/nope").await.unwrap();
    assert_eq!(code, 404);
}

#[tokio::test]
async fn status_command_prints_the_replica_table() {
    let proxy = start_proxy("lag_check_interval_ms = 100", "").await;
    wait_all_up(&proxy).await;
    let addr = proxy.admin_addr.unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(["status", "--admin", &addr])
            .output()
            .expect("run replicator status")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("project"), "{text}");
    for (i, port) in replica_ports().iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("slave-{}", i + 1)))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("replica") && line.contains(" up "), "{line}");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    }
    assert!(text.contains("read_routing=round-robin"), "{text}");

    // A proxy that is not there: a clear error, not a hang.
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
