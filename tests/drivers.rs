//! Clients other than tokio-postgres: libpq's pgbench in every protocol mode, and
//! node-postgres, a JavaScript implementation of the protocol with its own habits
//! (unnamed statements per query, named statements by the application).

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use replicator::testbed::{SUPERUSER, SUPERUSER_PASSWORD, bindir};

#[tokio::test]
async fn pgbench_runs_clean_in_every_mode() {
    let proxy = start_proxy("", "").await;
    let c = cluster();
    let pgbench = bindir().unwrap().join("pgbench");
    let init = tokio::process::Command::new(&pgbench)
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            &c.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    primary_client()
        .await
        .batch_execute("GRANT ALL ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app")
        .await
        .unwrap();
    wait_replicas().await;
    let url = proxy_url(&proxy, "app", "secret", "app");
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-n", "-c", "4", "-j", "2", "-t", "200", "-M", mode];
            args.extend_from_slice(script);
            args.push(&url);
            let out = tokio::process::Command::new(&pgbench)
                .args(&args)
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "pgbench {args:?}: {stderr}{stdout}");
            assert!(
                stdout.contains("number of failed transactions: 0 "),
                "{args:?}: {stdout}"
            );
            assert!(
                stdout.contains("number of transactions actually processed: 800/800"),
                "{args:?}: {stdout}"
            );
            assert!(!stderr.contains("aborted"), "{args:?}: {stderr}");
        }
    }
}

/// Installs node-postgres once per target folder.
async fn node_pg_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-drivers");
    if !dir.join("node_modules/pg/package.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = tokio::process::Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir)
            .arg("pg@8")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("npm is needed for the node-postgres driver test");
        assert!(
            out.status.success(),
            "npm install pg: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[tokio::test]
async fn node_postgres_works_through_the_proxy() {
    let proxy = start_proxy("", "").await;
    create_table("node_driver", "id int").await;
    let dir = node_pg_dir().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers/node_pg.js");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("NODE_PATH", dir.join("node_modules"))
        .env("PROXY_URL", proxy_url(&proxy, "app", "secret", "app"))
        .output()
        .await
        .expect("node is needed for the node-postgres driver test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fact in [
        "\"simpleOnReplica\":true",
        "\"paramValue\":42",
        "\"paramOnReplica\":true",
        "\"namedOk\":true",
        "\"txCount\":1",
        "\"txOnReplica\":false",
        "\"errorCode\":\"22012\"",
        "\"afterError\":1",
        "\"settingKept\":true",
    ] {
        assert!(stdout.contains(fact), "missing {fact} in {stdout}");
    }
}

/// node-postgres over TLS: verify the proxy's certificate (for 127.0.0.1 and
/// localhost) against the test CA, log in with SCRAM-SHA-256-PLUS, refuse another CA.
#[tokio::test]
async fn node_postgres_over_tls_with_channel_binding() {
    let folder = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-tls");
    let certs = common::certs::TestCerts::make(&folder, &["127.0.0.1", "localhost"]);
    let other = common::certs::TestCerts::make(&folder.join("other"), &["127.0.0.1"]);
    let proxy = start_proxy(
        "",
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nclient_tls = \"require\"",
            certs.cert.display(),
            certs.key.display()
        ),
    )
    .await;
    let dir = node_pg_dir().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers/node_pg_tls.js");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("NODE_PATH", dir.join("node_modules"))
        .env("PROXY_PORT", proxy.addr.port().to_string())
        .env("CA_FILE", &certs.ca)
        .env("OTHER_CA_FILE", &other.ca)
        .output()
        .await
        .expect("node is needed for the node-postgres driver test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fact in [
        "\"127.0.0.1\":{\"rec\":true,\"v\":42,\"encrypted\":true,\"mechanism\":\"SCRAM-SHA-256-PLUS\"}",
        "\"localhost\":{\"rec\":true,\"v\":42,\"encrypted\":true,\"mechanism\":\"SCRAM-SHA-256-PLUS\"}",
        "\"otherCa\":\"refused\"",
    ] {
        assert!(stdout.contains(fact), "missing {fact} in {stdout}");
    }
}

/// libpq's own pipeline mode (pgbench's `\startpipeline`), in both pool modes: 500
/// queries of 10 kB each, each returning 100 kB, in one pipeline. (The hang this shape
/// once caused is reproduced byte for byte, with reads and writes interleaved as
/// libpq-based drivers do, by the deep-pipeline tests in `tests/differential.rs`;
/// pgbench paces its writes so that it did not hang here.)
#[tokio::test]
async fn libpq_pipelines_of_large_queries_and_results_complete() {
    let pgbench = bindir().unwrap().join("pgbench");
    let folder = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libpq-pipeline");
    std::fs::create_dir_all(&folder).unwrap();
    let script = folder.join("pipeline.sql");
    let query = format!(
        "SELECT repeat('x', 100000), length('{}');\n",
        "y".repeat(10_000)
    );
    std::fs::write(
        &script,
        format!("\\startpipeline\n{}\\endpipeline\n", query.repeat(500)),
    )
    .unwrap();
    for mode in ["transaction", "session"] {
        let proxy = start_proxy("", &format!("pool_mode = \"{mode}\"")).await;
        let url = proxy_url(&proxy, "app", "secret", "app");
        let run = tokio::process::Command::new(&pgbench)
            .args(["-n", "-c", "1", "-t", "4", "-M", "extended", "-f"])
            .arg(&script)
            .arg(&url)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("{mode} mode: the pipeline hung"))
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains("number of transactions actually processed: 4/4"),
            "{mode} mode: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
