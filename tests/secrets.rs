//! No secret leaks: with every configured password distinctive, the failover,
//! CDC, reload and failed-login scenarios run on the real binary at debug level, and
//! then no log line, no /status, no SHOW CONFIG and no state file may contain any of
//! them (nor the admin token, nor a wrong password a client tried).

mod common;

use std::time::{Duration, Instant};

use common::failover::{FAILOVER_USER, config_for, kill_primary, write_port};
use common::process::{ProxyProcess, proxy_dir};
use common::*;
use replicator::testbed::{Cluster, ClusterOptions};

const APP_PASSWORD: &str = "Apw-5e9c1d-never-logged";
const CONTROL_PASSWORD: &str = "Cpw-77b2aa-never-logged";
const TARGET_PASSWORD: &str = "Tpw-19f0e3-never-logged";
const WRONG_PASSWORD: &str = "Wpw-c0ffee-never-logged";
const TOKEN: &str = "Tok-4b1d00-never-logged";

fn text_of(messages: Vec<tokio_postgres::SimpleQueryMessage>) -> String {
    let mut out = String::new();
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            for i in 0..row.len() {
                out.push_str(row.get(i).unwrap_or(""));
                out.push('|');
            }
            out.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_token_reaches_a_log_status_or_config_view() {
    init_logs();
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterOptions {
            password: APP_PASSWORD.into(),
            ..ClusterOptions::default()
        })
    })
    .await
    .unwrap()
    .expect("cluster");
    let primary = &cluster.primary;
    primary
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE control_admin SUPERUSER LOGIN PASSWORD '{CONTROL_PASSWORD}';
                 CREATE ROLE mirror_writer LOGIN PASSWORD '{TARGET_PASSWORD}';"
            ),
        )
        .unwrap();
    primary
        .psql("postgres", "CREATE DATABASE mirror OWNER mirror_writer")
        .unwrap();
    primary
        .psql(
            "app",
            "CREATE TABLE secret_t (id int PRIMARY KEY, v text);
             INSERT INTO secret_t SELECT g, 'x' FROM generate_series(1, 20) g;
             GRANT ALL ON secret_t TO app",
        )
        .unwrap();
    // Replicas stream with a password in primary_conninfo, which re-pointing reads
    // and rewrites after the failover.
    for replica in &cluster.replicas {
        replica
            .psql(
                "postgres",
                &format!(
                    "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=control_admin password={CONTROL_PASSWORD}'",
                    primary.port
                ),
            )
            .unwrap();
        replica.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    }
    cluster.wait_streaming(Duration::from_secs(30)).unwrap();

    let mut text = config_for(
        &cluster,
        "lag_check_interval_ms = 100",
        "",
        "health_check_interval_ms = 200\nfailure_threshold = 2\n",
    )
    .replace(
        FAILOVER_USER,
        &format!("[failover]\nuser = \"control_admin\"\npassword = \"{CONTROL_PASSWORD}\"\n"),
    )
    .replace(replicator::testbed::ADMIN_TOKEN, TOKEN);
    // A node URI that carries credentials of its own.
    let slave2 = format!("postgresql://127.0.0.1:{}/app", cluster.replicas[1].port);
    text = text.replace(
        &slave2,
        &format!(
            "postgresql://control_admin:{CONTROL_PASSWORD}@127.0.0.1:{}/app",
            cluster.replicas[1].port
        ),
    );
    text.push_str(&format!(
        "\n[targets.sink]\nkind = \"postgres\"\nuri = \"postgresql://mirror_writer:{TARGET_PASSWORD}@127.0.0.1:{}/mirror\"\n\n\
         [[rules]]\nname = \"secret-mirror\"\nsource = \"app\"\ntarget = \"sink\"\ncollections = [\"secret_t\"]\ninterval_ms = 0\n",
        primary.port
    ));
    assert!(text.contains(CONTROL_PASSWORD) && text.contains(TARGET_PASSWORD));
    let dir = proxy_dir("secrets", "proxy");
    let proxy = ProxyProcess::start("proxy", &dir, &text, &[("RUST_LOG", "debug")]);
    let admin = replicator::admin::http::AdminClient::new(proxy.admin.as_str(), Some(TOKEN));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = match admin.get("/status").await {
            Ok((200, body)) => {
                serde_json::from_str::<replicator::admin::status::Status>(&body).ok()
            }
            _ => None,
        };
        if status.is_some_and(|s| s.projects[0].nodes.iter().all(|n| n.state == "up")) {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never up\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Failed logins: a wrong password, an unknown user.
    for user in ["app", "nobody"] {
        assert!(
            connect(&proxy.url(user, WRONG_PASSWORD, "app"))
                .await
                .is_err()
        );
    }
    let app = connect(&proxy.url("app", APP_PASSWORD, "app"))
        .await
        .unwrap();
    app.batch_execute("INSERT INTO secret_t VALUES (21, 'y')")
        .await
        .unwrap();
    // CDC: the snapshot and the new row reach the target.
    let deadline = Instant::now() + Duration::from_secs(60);
    while primary
        .psql("mirror", "SELECT count(*) FROM secret_t")
        .ok()
        .as_deref()
        != Some("21")
    {
        assert!(
            Instant::now() < deadline,
            "CDC never mirrored\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Runtime changes and a reload with credentials in a URI, and one that fails.
    let console = connect(&proxy.url("app", APP_PASSWORD, "replicator"))
        .await
        .unwrap();
    let dead = replicator::testbed::free_port().unwrap();
    console
        .simple_query(&format!(
            "ADD REPLICA app ghost replica 'postgresql://control_admin:{CONTROL_PASSWORD}@127.0.0.1:{dead}/app'"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut views = text_of(console.simple_query("SHOW CONFIG").await.unwrap());
    views.push_str(&text_of(
        console.simple_query("SHOW REPLICAS").await.unwrap(),
    ));
    console
        .simple_query("REMOVE REPLICA app ghost")
        .await
        .unwrap();
    let _ = console
        .simple_query(&format!(
            "ADD REPLICA app broken replica 'postgresql://control_admin:{CONTROL_PASSWORD}@127.0.0.1:notaport/app'"
        ))
        .await;
    let (code, status) = admin.get("/status").await.unwrap();
    assert_eq!(code, 200);
    views.push_str(&status);

    // Failover: the primary dies, a replica is promoted and the other re-pointed.
    kill_primary(&cluster).await;
    let url = proxy.url("app", APP_PASSWORD, "app");
    let replica_ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(port) = write_port(&url).await
            && replica_ports.contains(&port)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no failover\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, status) = admin.get("/status").await.unwrap();
    views.push_str(&status);
    drop(proxy);

    let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap();
    assert!(log.contains("promot"), "the failover is in the log:\n{log}");
    assert!(log.contains("DEBUG"), "the log is at debug level");
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap_or_default();
    for secret in [
        APP_PASSWORD,
        CONTROL_PASSWORD,
        TARGET_PASSWORD,
        WRONG_PASSWORD,
        TOKEN,
    ] {
        for (what, text) in [("log", &log), ("views", &views), ("state file", &state)] {
            if let Some(line) = text.lines().find(|l| l.contains(secret)) {
                panic!("{secret} in the {what}: {line}");
            }
        }
    }
}
