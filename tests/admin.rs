//! The operator's view: the admin console (database `replicator`), the HTTP endpoints
//! and `replicator status`, checked against what the cluster really is.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
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
    // The application's client, idle between its statements, each of which counts.
    let app_statements = |clients: &[Vec<(String, String)>]| -> u64 {
        let app = clients
            .iter()
            .find(|c| field(c, "project") == "app" && field(c, "user") == "app")
            .unwrap_or_else(|| panic!("{clients:?}"));
        assert_eq!(field(app, "state"), "idle", "{app:?}");
        field(app, "statements").parse().unwrap()
    };
    let before = app_statements(&table(&admin, "SHOW CLIENTS").await);
    assert!(before >= 5, "{before}");
    app.simple_query("SELECT 1").await.unwrap();
    let clients = table(&admin, "SHOW CLIENTS").await;
    assert_eq!(app_statements(&clients), before + 1);
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

    let (code, body) = admin_http(&addr).get("/status").await.unwrap();
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

    let (code, metrics) = admin_http(&addr).get("/metrics").await.unwrap();
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

    let (code, body) = admin_http(&addr).get("/health").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = admin_http(&addr).get("/nope").await.unwrap();
    assert_eq!(code, 404);
}

#[tokio::test]
async fn status_command_prints_the_replica_table() {
    let proxy = start_proxy("lag_check_interval_ms = 100", "").await;
    wait_all_up(&proxy).await;
    let addr = proxy.admin_addr.unwrap().to_string();
    let run = |addr: String, token: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let mut command = Command::new(env!("CARGO_BIN_EXE_replicator"));
            command
                .args(["status", "--admin", &addr])
                .env_remove("REPLICATOR_ADMIN_TOKEN");
            if let Some(token) = token {
                command.env("REPLICATOR_ADMIN_TOKEN", token);
            }
            command.output().expect("run replicator status")
        })
    };
    // Without the token the proxy refuses, and the CLI says what to do.
    let out = run(addr.clone(), None).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("REPLICATOR_ADMIN_TOKEN"),
        "{stderr}"
    );
    let out = run(addr, Some(replicator::testbed::ADMIN_TOKEN))
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

/// A listener standing in for an attacker's server: counts the connections it gets.
async fn fake_server() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, connections)
}

/// A proxy started from a file, so that runtime changes could be written (and would
/// be, if the request were let through).
async fn proxy_from_file(name: &str, text: &str) -> (Proxy, std::path::PathBuf) {
    init_logs();
    let dir = std::env::temp_dir().join(format!("replicator-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = replicator::config::Config::parse(text).unwrap();
    (
        Proxy::start(config, Some(path.clone())).await.unwrap(),
        path,
    )
}

/// The credential-theft path: an unauthenticated `POST /replicas/...` with an
/// attacker's address must change nothing, and the attacker's server must never be
/// contacted. Every endpoint but /health and /metrics asks for the token.
#[tokio::test]
async fn admin_http_without_the_token_changes_nothing() {
    let text = config_text(cluster(), "lag_check_interval_ms = 100", "");
    let (proxy, path) = proxy_from_file("admin-token", &text).await;
    wait_all_up(&proxy).await;
    let addr = proxy.admin_addr.unwrap().to_string();
    let (evil_port, evil_connections) = fake_server().await;
    let evil_uri = format!("postgresql://127.0.0.1:{evil_port}/app");
    for client in [
        replicator::admin::http::AdminClient::new(addr.as_str(), None),
        replicator::admin::http::AdminClient::new(addr.as_str(), Some("not-the-token")),
    ] {
        use hyper::Method;
        for (method, path, body) in [
            (
                Method::POST,
                "/replicas/app/evil/replica",
                evil_uri.as_str(),
            ),
            (Method::POST, "/read_routing/app/random", ""),
            (Method::POST, "/promote/app/slave-1", ""),
            (Method::DELETE, "/replicas/app/slave-1", ""),
            (Method::POST, "/sync/anything", ""),
            (Method::GET, "/status", ""),
        ] {
            let (code, answer) = client
                .request(method.clone(), path, body.to_string())
                .await
                .unwrap();
            assert_eq!(code, 401, "{method} {path}: {answer}");
            assert!(answer.contains("admin token"), "{answer}");
        }
        assert_eq!(client.get("/health").await.unwrap().0, 200);
        assert_eq!(client.get("/metrics").await.unwrap().0, 200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        evil_connections.load(Ordering::SeqCst),
        0,
        "the proxy contacted the attacker's address"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let status = status(&proxy).await;
    let names: Vec<&str> = status.projects[0]
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.contains(&"evil"), "{names:?}");
    assert_eq!(status.projects[0].read_routing, "round-robin");

    // A body past the limit is refused before it is read in full.
    let admin = admin_http(&addr);
    let (code, _) = admin
        .request(
            hyper::Method::POST,
            "/replicas/app/big/replica",
            "x".repeat(200 * 1024),
        )
        .await
        .unwrap();
    assert_eq!(code, 413);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // The token lets the same request through: it is the only thing that stopped it.
    let (code, answer) = admin
        .request(
            hyper::Method::DELETE,
            "/replicas/app/slave-2",
            String::new(),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{answer}");
    assert!(!std::fs::read_to_string(&path).unwrap().contains("slave-2"));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Without a configured token nobody may change anything over HTTP, and the answer
/// says how to enable it; `metrics_auth` closes /metrics too.
#[tokio::test]
async fn admin_http_without_a_configured_token_refuses_and_says_how() {
    let text = config_text(cluster(), "", "metrics_auth = true").replacen(
        &format!("admin_token = \"{}\"\n", replicator::testbed::ADMIN_TOKEN),
        "",
        1,
    );
    assert!(!text.contains("admin_token"));
    let (proxy, path) = proxy_from_file("admin-no-token", &text).await;
    let addr = proxy.admin_addr.unwrap().to_string();
    let admin = admin_http(&addr);
    let (code, answer) = admin.post("/read_routing/app/random").await.unwrap();
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer.contains("admin_token") && answer.contains("REPLICATOR_ADMIN_TOKEN"),
        "{answer}"
    );
    assert_eq!(admin.get("/status").await.unwrap().0, 403);
    assert_eq!(admin.get("/metrics").await.unwrap().0, 403);
    assert_eq!(admin.get("/health").await.unwrap().0, 200);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // A token added to the file applies on reload, without a restart.
    let with_token = text.replacen(
        "[proxy]\n",
        &format!(
            "[proxy]\nadmin_token = \"{}\"\n",
            replicator::testbed::ADMIN_TOKEN
        ),
        1,
    );
    std::fs::write(&path, &with_token).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while admin.get("/metrics").await.unwrap().0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "token not picked up on reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unauthenticated = replicator::admin::http::AdminClient::new(addr.as_str(), None);
    assert_eq!(unauthenticated.get("/metrics").await.unwrap().0, 401);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
