//! TLS towards clients: libpq (psql) and tokio-postgres with sslmode=require and
//! verify-full, SCRAM-SHA-256-PLUS (channel_binding=require), PostgreSQL 17's direct
//! TLS, client_tls = "require", a proxy without a certificate, and a certificate
//! renewed by a reload while connections stay open.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::certs::TestCerts;
use common::*;
use replicator::server::Proxy;
use replicator::tls::connect::{MakeRustlsConnect, ServerTlsSettings, SslMode};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("replicator-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tls_settings(certs: &TestCerts, client_tls: &str) -> String {
    format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_tls = \"{client_tls}\"",
        certs.cert.display(),
        certs.key.display()
    )
}

/// psql with a conninfo string; PGPASSWORD from `password`.
async fn psql(conninfo: String, password: &str, sql: &str) -> Output {
    let psql = replicator::testbed::bindir().unwrap().join("psql");
    let password = password.to_string();
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(psql)
            .args([conninfo.as_str(), "-X", "-A", "-t", "-c", sql.as_str()])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn conninfo(proxy: &Proxy, host: &str, extra: &str) -> String {
    format!(
        "host={host} port={} user=app dbname=app {extra}",
        proxy.addr.port()
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[tokio::test]
async fn psql_verifies_the_proxy_and_binds_its_login_to_the_certificate() {
    let dir = scratch("psql");
    let certs = TestCerts::make(&dir, &["127.0.0.1", "localhost"]);
    let proxy = start_proxy("", &tls_settings(&certs, "allow")).await;
    let ca = certs.ca.display().to_string();
    for host in ["127.0.0.1", "localhost"] {
        let extra = format!("sslmode=verify-full sslrootcert={ca} channel_binding=require");
        let out = psql(
            conninfo(&proxy, host, &extra),
            "secret",
            "SELECT pg_is_in_recovery()",
        )
        .await;
        assert_eq!(stdout(&out), "t", "{host}: {}", stderr(&out));
    }
    // Writes go to the primary over the same encrypted client connection.
    let out = psql(
        conninfo(&proxy, "127.0.0.1", "sslmode=require"),
        "secret",
        "SELECT inet_server_port() FROM (SELECT txid_current()) t",
    )
    .await;
    assert_eq!(stdout(&out), primary_port().to_string(), "{}", stderr(&out));
    // client_tls = "allow": clear text still works.
    let out = psql(
        conninfo(&proxy, "127.0.0.1", "sslmode=disable"),
        "secret",
        "SELECT 1",
    )
    .await;
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));
    // A wrong password over TLS with channel binding: the usual 28P01.
    let out = psql(
        conninfo(
            &proxy,
            "127.0.0.1",
            "sslmode=require channel_binding=require",
        ),
        "wrong",
        "SELECT 1",
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    // Another CA: libpq refuses the proxy's certificate.
    let other = TestCerts::make(&dir.join("other"), &["127.0.0.1"]);
    let extra = format!("sslmode=verify-full sslrootcert={}", other.ca.display());
    let out = psql(conninfo(&proxy, "127.0.0.1", &extra), "secret", "SELECT 1").await;
    assert!(!out.status.success());
    // (OpenSSL words it "certificate verify failed" or, for this key type, "EVP lib".)
    assert!(stderr(&out).contains("SSL error"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "no query ran");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn require_refuses_clear_text_and_a_proxy_without_certificate_says_so() {
    let dir = scratch("require");
    let certs = TestCerts::make(&dir, &["127.0.0.1"]);
    let proxy = start_proxy("", &tls_settings(&certs, "require")).await;
    let out = psql(
        conninfo(&proxy, "127.0.0.1", "sslmode=disable"),
        "secret",
        "SELECT 1",
    )
    .await;
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.contains("accepts only encrypted connections")
            && message.contains("sslmode=require"),
        "{message}"
    );
    // With sslmode=prefer (libpq's default) the same client gets in, encrypted.
    let out = psql(
        conninfo(&proxy, "127.0.0.1", "sslmode=prefer"),
        "secret",
        "SELECT 1",
    )
    .await;
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));

    // No certificate: a client that requires TLS gets libpq's clear refusal.
    let plain = start_proxy("", "").await;
    let out = psql(
        conninfo(&plain, "127.0.0.1", "sslmode=require"),
        "secret",
        "SELECT 1",
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not support SSL"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rustls client config that checks the proxy's certificate against `ca` and its name.
fn verify_full(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    ServerTlsSettings {
        mode: SslMode::VerifyFull,
        root_cert: Some(ca.display().to_string()),
        cert: None,
        key: None,
    }
    .client_config()
    .unwrap()
    .unwrap()
}

/// tokio-postgres over rustls, verify-full against the test CA.
async fn rustls_client(
    proxy: &Proxy,
    ca: &std::path::Path,
    direct: bool,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = MakeRustlsConnect::new(verify_full(ca));
    let mut config: tokio_postgres::Config =
        proxy_url(proxy, "app", "secret", "app").parse().unwrap();
    config
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .channel_binding(tokio_postgres::config::ChannelBinding::Require);
    if direct {
        config.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    }
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test]
async fn a_second_driver_with_direct_tls_big_results_and_pipelines() {
    let dir = scratch("driver");
    let certs = TestCerts::make(&dir, &["127.0.0.1"]);
    let proxy = start_proxy("", &tls_settings(&certs, "require")).await;
    for direct in [false, true] {
        let client = rustls_client(&proxy, &certs.ca, direct)
            .await
            .unwrap_or_else(|e| panic!("direct={direct}: {e:?}"));
        // Results far bigger than the TLS buffers, so that writes to the client wait
        // on the socket and must be flushed later.
        let row = client
            .query_one(
                "SELECT repeat('x', 8000000) AS big, pg_is_in_recovery()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0).len(), 8_000_000);
        assert!(row.get::<_, bool>(1));
        // A pipeline of many queries in flight at once.
        let statement = client.prepare("SELECT $1::int * 2").await.unwrap();
        let queries: Vec<_> = (0..200)
            .map(|i| {
                let client = &client;
                let statement = &statement;
                async move {
                    client
                        .query_one(statement, &[&i])
                        .await
                        .map(|r| r.get::<_, i32>(0))
                }
            })
            .collect();
        let answers = futures_util::future::join_all(queries).await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), 2 * i as i32);
        }
    }
    // Direct TLS that does not name the postgresql ALPN protocol is not Postgres.
    let config = verify_full(&certs.ca);
    let mut without_alpn = (*config).clone();
    without_alpn.alpn_protocols.clear();
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(without_alpn));
    let name = replicator::tls::connect::server_name("127.0.0.1").unwrap();
    if let Ok(mut tls) = connector.connect(name, stream).await {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = tls.write_all(&wire::startup_packet("app", "app")).await;
        let mut buf = [0u8; 16];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a direct TLS client without ALPN was served: {read:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_renews_the_certificate_and_open_connections_stay() {
    let dir = scratch("reload");
    let first = TestCerts::make(&dir.join("first"), &["127.0.0.1"]);
    let live_cert = dir.join("live.pem");
    let live_key = dir.join("live.key");
    std::fs::copy(&first.cert, &live_cert).unwrap();
    std::fs::copy(&first.key, &live_key).unwrap();
    let text = config_text(
        cluster(),
        "",
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            live_cert.display(),
            live_key.display()
        ),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    init_logs();
    let proxy = Proxy::start(
        replicator::config::Config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let open = rustls_client(&proxy, &first.ca, false).await.unwrap();

    let second = TestCerts::make(&dir.join("second"), &["127.0.0.1"]);
    std::fs::copy(&second.cert, &live_cert).unwrap();
    std::fs::copy(&second.key, &live_key).unwrap();
    replicator::reload::reload(&proxy.shared, "test")
        .await
        .unwrap();
    rustls_client(&proxy, &second.ca, false)
        .await
        .expect("new connections get the new certificate");
    assert!(
        rustls_client(&proxy, &first.ca, false).await.is_err(),
        "the old certificate is still served"
    );
    let row = open.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        42,
        "the open connection was disturbed"
    );

    // A broken key file: the reload is refused and the running certificate stays.
    std::fs::write(&live_key, "not a key").unwrap();
    assert!(
        replicator::reload::reload(&proxy.shared, "test")
            .await
            .is_err()
    );
    rustls_client(&proxy, &second.ca, false)
        .await
        .expect("the running certificate stays after a refused reload");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a certificate, the admin endpoints speak HTTPS; in clear text they serve only
/// what needs no token. The CLI pins the proxy's own certificate from --config.
#[tokio::test]
async fn the_admin_endpoints_use_the_same_certificate() {
    let dir = scratch("admin");
    let certs = TestCerts::make(&dir, &["127.0.0.1"]);
    let text = config_text(cluster(), "", &tls_settings(&certs, "allow"));
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    init_logs();
    let proxy = Proxy::start(
        replicator::config::Config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let addr = proxy.admin_addr.unwrap().to_string();
    let pinned =
        replicator::tls::connect::pinned_client_config(&certs.cert.display().to_string()).unwrap();
    let https = admin_http(&addr).with_tls(pinned);
    let addr_for_cli = addr.clone();
    let (code, body) = https.get("/status").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let plain = admin_http(&addr);
    let (code, body) = plain.get("/status").await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("https"), "{body}");
    assert_eq!(plain.get("/health").await.unwrap().0, 200);
    // Another certificate is not the pinned one.
    let other = TestCerts::make(&dir.join("other"), &["127.0.0.1"]);
    let wrong =
        replicator::tls::connect::pinned_client_config(&other.cert.display().to_string()).unwrap();
    assert!(
        admin_http(&addr)
            .with_tls(wrong)
            .get("/status")
            .await
            .is_err()
    );
    // The CLI, given the config: HTTPS to the pinned certificate, with the token.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(["status", "--admin", &addr_for_cli, "--config"])
            .arg(&path)
            .env_remove("REPLICATOR_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("slave-1"), "{}", stdout(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
