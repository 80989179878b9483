//! Shared helpers for the integration tests: one real cluster per test binary, and a
//! proxy per test on a free port in front of it.
#![allow(dead_code)]

pub mod certs;
pub mod failover;
pub mod process;
pub mod wire;

use std::sync::OnceLock;
use std::time::Duration;

use replicator::config::Config;
use replicator::server::Proxy;
use replicator::testbed::{Cluster, ClusterOptions};
use tokio_postgres::{Client, NoTls};

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The cluster shared by the tests of one binary (started on first use).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| Cluster::start(ClusterOptions::default()).expect("start test cluster"))
}

/// Extra users every test config has, one per backend authentication method the test
/// bed configures (see testbed: md5_user, plain_user, trust_user).
pub const EXTRA_USERS: &str = "
[[users]]
name = \"md5_user\"
password = \"secret\"

[[users]]
name = \"plain_user\"
password = \"secret\"

[[users]]
name = \"trust_user\"
password = \"secret\"
";

pub fn config_text(cluster: &Cluster, project_extra: &str, proxy_extra: &str) -> String {
    let toml = cluster.proxy_toml("127.0.0.1:0", "127.0.0.1:0", project_extra);
    let toml = toml.replacen("[proxy]\n", &format!("[proxy]\n{proxy_extra}\n"), 1);
    format!("{toml}\n{EXTRA_USERS}")
}

/// Proxy logs show up with the failing test's output (RUST_LOG=debug for more).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start_proxy_with(text: &str) -> Proxy {
    init_logs();
    let config =
        Config::parse(text).unwrap_or_else(|e| panic!("invalid test config: {e:?}\n{text}"));
    Proxy::start(config, None).await.expect("start proxy")
}

pub async fn start_proxy(project_extra: &str, proxy_extra: &str) -> Proxy {
    start_proxy_with(&config_text(cluster(), project_extra, proxy_extra)).await
}

pub fn proxy_url(proxy: &Proxy, user: &str, password: &str, database: &str) -> String {
    format!(
        "postgresql://{user}:{password}@127.0.0.1:{}/{database}",
        proxy.addr.port()
    )
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub async fn app_client(proxy: &Proxy) -> Client {
    connect(&proxy_url(proxy, "app", "secret", "app"))
        .await
        .expect("connect through proxy")
}

/// A superuser connection straight to the primary, for setup and checks.
pub async fn primary_client() -> Client {
    let c = cluster();
    connect(&c.primary.url(
        replicator::testbed::SUPERUSER,
        replicator::testbed::SUPERUSER_PASSWORD,
        "app",
    ))
    .await
    .expect("connect to primary")
}

pub fn replica_ports() -> Vec<u16> {
    cluster().replicas.iter().map(|r| r.port).collect()
}

pub fn primary_port() -> u16 {
    cluster().primary.port
}

/// Creates a table owned by `app` on the primary and waits for replicas to have it.
pub async fn create_table(name: &str, columns: &str) {
    let primary = primary_client().await;
    primary
        .batch_execute(&format!("DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); ALTER TABLE {name} OWNER TO app;"))
        .await
        .expect("create table");
    wait_replicas().await;
}

pub async fn wait_replicas() {
    tokio::task::spawn_blocking(|| {
        cluster()
            .wait_caught_up(Duration::from_secs(20))
            .expect("replicas catch up")
    })
    .await
    .expect("join");
}

/// Port of the server that answered, and whether it is a replica.
pub async fn who(client: &Client, sql: &str) -> (u16, bool) {
    let row = client.query_one(sql, &[]).await.expect("who query");
    let port: i32 = row.get(0);
    let recovery: bool = row.get(1);
    (port as u16, recovery)
}

pub const WHO: &str = "SELECT inet_server_port(), pg_is_in_recovery()";

/// Fails with the whole error when it does not carry the expected SQLSTATE.
pub fn assert_sqlstate(err: &tokio_postgres::Error, expected: tokio_postgres::error::SqlState) {
    assert_eq!(err.code(), Some(&expected), "{err:?}");
}

/// The admin HTTP endpoints at `addr`, with the token of the testbed's configs.
pub fn admin_http(addr: &str) -> replicator::admin::http::AdminClient {
    replicator::admin::http::AdminClient::new(addr, Some(replicator::testbed::ADMIN_TOKEN))
}

/// The proxy's `/status`, as `replicator status` reads it.
pub async fn status(proxy: &Proxy) -> replicator::admin::status::Status {
    let addr = proxy.admin_addr.expect("admin address").to_string();
    let (code, body) = admin_http(&addr).get("/status").await.expect("GET /status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// Polls `/status` until `check` holds for it, or fails after `timeout` with the last one.
pub async fn wait_status(
    proxy: &Proxy,
    timeout: Duration,
    what: &str,
    check: impl Fn(&replicator::admin::status::Status) -> bool,
) -> replicator::admin::status::Status {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = status(proxy).await;
        if check(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
