//! The wire protocol at its edges: COPY, large results, errors, cancel, authentication,
//! unreachable nodes, and malformed input that must never hang or crash the proxy.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::wire::*;
use common::*;
use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn copy_in_and_out_pass_through_intact() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    create_table("proto_copy", "id int, payload text").await;
    let sink = client.copy_in("COPY proto_copy FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let mut expected = 0i64;
    for chunk in 0..20 {
        let mut buf = BytesMut::new();
        for i in 0..1000 {
            let id = chunk * 1000 + i;
            expected += id as i64;
            buf.put_slice(format!("{id}\trow-{id}-{}\n", "x".repeat(50)).as_bytes());
        }
        sink.send(buf.freeze()).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 20_000);

    let stream = client
        .copy_out("/* replicator: primary */ COPY proto_copy TO STDOUT")
        .await
        .unwrap();
    pin_mut!(stream);
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(data).unwrap();
    let sum: i64 = text
        .lines()
        .map(|l| l.split('\t').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(text.lines().count(), 20_000);
    assert_eq!(sum, expected);

    // COPY through the simple protocol with psql, both directions.
    let url = proxy_url(&proxy, "app", "secret", "app");
    let out = tokio::process::Command::new(replicator::testbed::bindir().unwrap().join("psql"))
        .args([
            &url,
            "-X",
            "-q",
            "-c",
            "COPY (SELECT g, md5(g::text) FROM generate_series(1, 5000) g) TO STDOUT",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5000);

    // A failing COPY leaves the connection usable.
    let sink = client.copy_in("COPY proto_copy FROM STDIN").await.unwrap();
    pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn large_results_and_errors_mid_stream() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    let rows = client
        .query(
            "SELECT g, repeat('y', 100) FROM generate_series(1, 200000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 200_000);
    assert_eq!(rows[199_999].get::<_, i32>(0), 200_000);
    let big: String = client
        .query_one("SELECT repeat('z', 8000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(big.len(), 8_000_000);

    // The error arrives after thousands of rows were already sent.
    let err = client
        .query(
            "SELECT 1 / (5000 - g) FROM generate_series(1, 10000) g",
            &[],
        )
        .await
        .unwrap_err();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::DIVISION_BY_ZERO);
    let err = client
        .simple_query("SELECT 1 / (5000 - g) FROM generate_series(1, 10000) g")
        .await
        .unwrap_err();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::DIVISION_BY_ZERO);
    // Errors in the middle of a transaction abort it, and ROLLBACK recovers.
    client.batch_execute("BEGIN").await.unwrap();
    assert!(
        client
            .batch_execute("SELECT * FROM no_such_table")
            .await
            .is_err()
    );
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_sqlstate(
        &err,
        tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION,
    );
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

/// Waits until a statement containing `marker` runs on some node, then cancels it.
async fn cancel_when_running(token: tokio_postgres::CancelToken, marker: &'static str) {
    let c = cluster();
    let urls: Vec<String> = std::iter::once(&c.primary)
        .chain(c.replicas.iter())
        .map(|n| {
            n.url(
                replicator::testbed::SUPERUSER,
                replicator::testbed::SUPERUSER_PASSWORD,
                "app",
            )
        })
        .collect();
    let mut watchers = Vec::new();
    for url in &urls {
        watchers.push(connect(url).await.unwrap());
    }
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    for _ in 0..400 {
        for w in &watchers {
            let n: i64 = w.query_one(sql.as_str(), &[]).await.unwrap().get(0);
            if n > 0 {
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("statement {marker} never started");
}

#[tokio::test]
async fn cancel_reaches_the_running_statement() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    let started = Instant::now();
    let canceller = tokio::spawn(cancel_when_running(client.cancel_token(), "pg_sleep(20.1)"));
    let err = client
        .query("SELECT pg_sleep(20.1)", &[])
        .await
        .unwrap_err();
    canceller.await.unwrap();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::QUERY_CANCELED);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Inside a transaction on the primary, through the simple protocol.
    client.batch_execute("BEGIN").await.unwrap();
    let canceller = tokio::spawn(cancel_when_running(client.cancel_token(), "pg_sleep(20.2)"));
    let err = client
        .batch_execute("SELECT pg_sleep(20.2)")
        .await
        .unwrap_err();
    canceller.await.unwrap();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::QUERY_CANCELED);
    client.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn authentication_failures_get_the_right_sqlstate() {
    let proxy = start_proxy("", "").await;
    let cases = [
        (proxy_url(&proxy, "app", "wrong", "app"), "28P01"),
        (proxy_url(&proxy, "nobody", "secret", "app"), "28P01"),
        (
            proxy_url(&proxy, "app", "secret", "no_such_project"),
            "3D000",
        ),
    ];
    for (url, code) in cases {
        let err = connect(&url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{url} must fail"));
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn md5_clients_and_every_backend_auth_method() {
    // A user configured with an md5 hash logs in to the proxy with md5.
    let md5 = postgres_protocol::password::md5(b"secret", "md5_user");
    let text = config_text(cluster(), "", "").replace(
        "name = \"md5_user\"\npassword = \"secret\"",
        &format!("name = \"md5_user\"\npassword = \"{md5}\""),
    );
    // Without require_auth a server asking for the clear-text password over an
    // unencrypted connection gets nothing, and the client learns why.
    let refusing = start_proxy_with(&text).await;
    let err = connect(&proxy_url(&refusing, "plain_user", "secret", "app"))
        .await
        .expect_err("clear text over an unencrypted connection");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("clear text") && m.contains("require_auth")),
        "{err:?}"
    );
    // The nodes' URIs allow it (and every other method the test bed uses).
    let text = text.replace(
        "/app\"\n",
        "/app?require_auth=password,md5,scram-sha-256,none\"\n",
    );
    assert!(text.contains("require_auth"));
    let proxy = start_proxy_with(&text).await;
    // Backends: app uses SCRAM, md5_user md5, plain_user clear text, trust_user trust.
    for user in ["app", "md5_user", "plain_user", "trust_user"] {
        let client = connect(&proxy_url(&proxy, user, "secret", "app"))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let (_, replica) = common::who(&client, WHO).await;
        assert!(replica);
    }
    let err = connect(&proxy_url(&proxy, "md5_user", "bad", "app"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
}

#[tokio::test]
async fn unreachable_nodes_cost_reads_nothing_and_writes_a_clear_error() {
    let dead = replicator::testbed::free_port().unwrap();
    let c = cluster();
    // One live replica and one that refuses connections.
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nconnect_timeout_ms = 1000\n\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n\n\
         [projects.app]\n\
         [[projects.app.replicas]]\nname = \"master\"\nrole = \"primary\"\nuri = \"postgresql://127.0.0.1:{}/app\"\n\
         [[projects.app.replicas]]\nname = \"dead\"\nrole = \"replica\"\nuri = \"postgresql://127.0.0.1:{dead}/app\"\n\
         [[projects.app.replicas]]\nname = \"live\"\nrole = \"replica\"\nuri = \"postgresql://127.0.0.1:{}/app\"\n\n\
         [projects.gone]\n\
         [[projects.gone.replicas]]\nname = \"master\"\nrole = \"primary\"\nuri = \"postgresql://127.0.0.1:{dead}/app\"\n",
        c.primary.port, c.replicas[0].port
    );
    let proxy = start_proxy_with(&text).await;
    let client = app_client(&proxy).await;
    for _ in 0..10 {
        let (port, replica) = who(&client, WHO).await;
        assert_eq!((port, replica), (c.replicas[0].port, true));
    }
    let started = Instant::now();
    let err = connect(&proxy_url(&proxy, "app", "secret", "gone"))
        .await
        .expect_err("no node");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "error within the connect timeout"
    );
    assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{err:?}");
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(
        message.contains("gone") && message.contains(&dead.to_string()),
        "{message}"
    );
}

/// Reads everything the proxy sends until it closes, failing if it takes too long.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(result.is_ok(), "proxy left the client hanging");
    out
}

#[tokio::test]
async fn malformed_input_gets_an_error_and_a_closed_socket() {
    let proxy = start_proxy("", "").await;
    let addr = proxy.addr;
    let garbage: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 3],                              // impossible length
        vec![0, 0, 0, 8, 0, 2, 0, 0],                  // protocol 2.0
        vec![0x7f, 0xff, 0xff, 0xff],                  // absurd length
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // wrong protocol entirely
        {
            // startup packet whose parameters are not NUL-terminated
            let mut p = vec![0, 0, 0, 12];
            p.extend_from_slice(&196_608u32.to_be_bytes());
            p.extend_from_slice(b"user");
            p
        },
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let _ = stream.shutdown().await;
        let reply = read_until_closed(&mut stream).await;
        if !reply.is_empty() {
            assert_eq!(
                error_code(&reply).as_deref(),
                Some("08P01"),
                "{bytes:?} -> {reply:?}"
            );
        }
    }
    // SSL request: answered 'N', then a normal login can follow.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    // Then a password message where a SASL response is expected: violation.
    stream
        .write_all(&startup_packet("app", "app"))
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(
        buf[0],
        b'R',
        "authentication request expected, got {:?}",
        &buf[..n]
    );
    stream.write_all(&[b'Q', 0, 0, 0, 5, 0]).await.unwrap();
    let reply = read_until_closed(&mut stream).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));

    // After login: a message with a bad length, and an unknown message type.
    for bad in [vec![b'Q', 0, 0, 0, 1], vec![b'!', 0, 0, 0, 4]] {
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut stream = login_raw(client).await;
        stream.write_all(&bad).await.unwrap();
        let reply = read_until_closed(&mut stream).await;
        assert_eq!(
            error_code(&reply).as_deref(),
            Some("08P01"),
            "{bad:?} -> {reply:?}"
        );
    }
    // A client that connects and says nothing is not a problem for anyone else.
    let _idle = TcpStream::connect(addr).await.unwrap();
    let client = app_client(&proxy).await;
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn broken_server_connections_are_replaced() {
    let proxy = start_proxy("", "").await;
    // Its application_name marks this test's server connections, so that killing them
    // leaves the other tests' alone.
    let client = connect(&format!(
        "{}?application_name=broken_conns",
        proxy_url(&proxy, "app", "secret", "app")
    ))
    .await
    .unwrap();
    // Warm the pools, then kill every server connection of `app` behind the proxy's back.
    for _ in 0..6 {
        who(&client, WHO).await;
    }
    client
        .batch_execute("/* replicator: primary */ SELECT 1")
        .await
        .unwrap();
    let c = cluster();
    let nodes: Vec<_> = std::iter::once(&c.primary)
        .chain(c.replicas.iter())
        .cloned()
        .collect();
    tokio::task::spawn_blocking(move || {
        for node in nodes {
            node.psql(
                "postgres",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = 'app' AND application_name = 'broken_conns'",
            )
            .unwrap();
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client's own connection to the proxy survives; every statement still works.
    for _ in 0..6 {
        let (_, replica) = who(&client, WHO).await;
        assert!(replica);
    }
    let fresh = app_client(&proxy).await;
    fresh
        .batch_execute("/* replicator: primary */ SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_server_dying_mid_statement_costs_only_that_statement() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    let killer = primary_client().await;
    let kill = |killer: tokio_postgres::Client| async move {
        // Wait until the statement runs, then terminate its server process.
        for _ in 0..100 {
            let n = killer
                .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()", &[])
                .await
                .unwrap();
            if n > 0 {
                return killer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("statement never started");
    };
    // Outside a transaction: an error for that statement, then business as usual.
    let killing = tokio::spawn(kill(killer));
    let err = client
        .simple_query("/* replicator: primary */ SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    assert!(err.as_db_error().is_some(), "{err:?}");
    let killer = killing.await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 3", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );

    // Inside a transaction: the client is told and disconnected, never left hanging.
    client.batch_execute("BEGIN").await.unwrap();
    let killing = tokio::spawn(kill(killer));
    let started = Instant::now();
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    killing.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(err.as_db_error().is_some() || err.is_closed(), "{err:?}");
    let next = client.simple_query("COMMIT").await;
    assert!(
        next.is_err(),
        "COMMIT must not pretend to succeed after the transaction was lost"
    );
}

/// Sum of `replicator_parses_saved_total` over all nodes.
async fn parses_saved(proxy: &replicator::server::Proxy) -> u64 {
    let addr = proxy.admin_addr.expect("admin address").to_string();
    let (code, metrics) = admin_http(&addr)
        .get("/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(code, 200);
    metrics
        .lines()
        .filter(|l| l.starts_with("replicator_parses_saved_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn unnamed_statements_are_parsed_once_per_server_and_survive_schema_changes() {
    use tokio_postgres::types::Type;
    // One connection per node, so every execution meets the statement the last one left.
    let proxy = start_proxy("pool_size = 1", "").await;
    let client = app_client(&proxy).await;
    create_table("proto_unnamed", "id int primary key, a int").await;
    client
        .batch_execute("INSERT INTO proto_unnamed VALUES (1, 10), (2, 20)")
        .await
        .unwrap();
    let sql = "/* replicator: primary */ SELECT * FROM proto_unnamed WHERE id = $1";
    let run = |id: i32| {
        let client = &client;
        async move { client.query_typed(sql, &[(&id, Type::INT4)]).await.unwrap() }
    };
    let before = parses_saved(&proxy).await;
    for id in [1, 2, 1, 2, 1] {
        let rows = run(id).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].len(), 2);
        assert_eq!(rows[0].get::<_, i32>(1), id * 10);
    }
    let saved = parses_saved(&proxy).await - before;
    assert!(
        saved >= 4,
        "only {saved} of 4 repeated Parse messages were saved"
    );

    // A simple query drops the server's unnamed statement; the next Parse goes through.
    client
        .batch_execute("/* replicator: primary */ SELECT 1")
        .await
        .unwrap();
    assert_eq!(run(2).await[0].get::<_, i32>(1), 20);

    // A schema change: the server refuses to reuse its plan ("cached plan must not
    // change result type"); the proxy parses again and the client sees the new shape.
    run(1).await;
    primary_client()
        .await
        .batch_execute("ALTER TABLE proto_unnamed ADD COLUMN b int DEFAULT 7")
        .await
        .unwrap();
    let rows = run(1).await;
    assert_eq!(rows[0].len(), 3);
    assert_eq!(rows[0].get::<_, i32>(2), 7);

    // An error between two executions changes nothing for the next one.
    let err = client
        .query_typed(
            "/* replicator: primary */ SELECT 1 / $1",
            &[(&0i32, Type::INT4)],
        )
        .await
        .unwrap_err();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::DIVISION_BY_ZERO);
    assert_eq!(run(2).await[0].get::<_, i32>(1), 20);
    assert_eq!(run(2).await[0].get::<_, i32>(1), 20);

    // Inside a transaction block too.
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(run(1).await[0].get::<_, i32>(1), 10);
    assert_eq!(run(1).await[0].get::<_, i32>(1), 10);
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn named_statements_prepared_again_after_a_schema_change_see_the_new_shape() {
    // One connection per node: every client meets the statements earlier ones left.
    let proxy = start_proxy("pool_size = 1", "").await;
    let client = app_client(&proxy).await;
    create_table("proto_named_ddl", "id int primary key, a int").await;
    client
        .batch_execute("INSERT INTO proto_named_ddl VALUES (1, 10)")
        .await
        .unwrap();
    let sql = "/* replicator: primary */ SELECT * FROM proto_named_ddl WHERE id = $1";
    let old = client.prepare(sql).await.unwrap();
    assert_eq!(client.query_one(&old, &[&1i32]).await.unwrap().len(), 2);

    primary_client()
        .await
        .batch_execute("ALTER TABLE proto_named_ddl ADD COLUMN b int DEFAULT 7")
        .await
        .unwrap();
    // The statement prepared before the change fails as it does on Postgres itself...
    let err = client.query_one(&old, &[&1i32]).await.unwrap_err();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED);
    // ...and preparing it again (what drivers do on that error) gives the new shape,
    // in this client and in the next one on the same server connection.
    let again = client.prepare(sql).await.unwrap();
    let row = client.query_one(&again, &[&1i32]).await.unwrap();
    assert_eq!(row.len(), 3);
    assert_eq!(row.get::<_, i32>(2), 7);
    drop(client);
    let next = app_client(&proxy).await;
    let fresh = next.prepare(sql).await.unwrap();
    assert_eq!(next.query_one(&fresh, &[&1i32]).await.unwrap().len(), 3);
}

/// DDL through the proxy: a statement prepared before it keeps the parameter types it
/// was analysed with, so the next Parse of the same text must be a fresh one, as on a
/// direct connection (asyncpg's codec tests recreate a table with another column type
/// and insert into it with the same text).
#[tokio::test]
async fn a_parse_after_ddl_sees_the_new_parameter_types() {
    use tokio_postgres::types::Type;
    // One connection per node: the second Parse meets what the first one left.
    let proxy = start_proxy("pool_size = 1", "").await;
    let client = app_client(&proxy).await;
    let sql = "INSERT INTO proto_ddl_types VALUES ($1)";
    for (column, expected) in [
        ("date", Type::DATE),
        ("time", Type::TIME),
        ("text", Type::TEXT),
    ] {
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS proto_ddl_types; CREATE TABLE proto_ddl_types (v {column})"
            ))
            .await
            .unwrap();
        let statement = client.prepare(sql).await.unwrap();
        assert_eq!(
            statement.params(),
            std::slice::from_ref(&expected),
            "{column}"
        );
        // A second client on the same server connection too.
        let other = app_client(&proxy).await;
        let again = other.prepare(sql).await.unwrap();
        assert_eq!(again.params(), &[expected], "{column}, another client");
    }
    client
        .batch_execute("DROP TABLE proto_ddl_types")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_refused_statement_is_prepared_anew_on_every_pooled_connection() {
    // Two connections to the primary, both holding the statement when the schema changes.
    let proxy = start_proxy("pool_size = 2", "").await;
    let first = app_client(&proxy).await;
    let second = app_client(&proxy).await;
    create_table("proto_named_pool", "id int primary key, a int").await;
    first
        .batch_execute("INSERT INTO proto_named_pool VALUES (1, 10)")
        .await
        .unwrap();
    let sql = "/* replicator: primary */ SELECT * FROM proto_named_pool WHERE id = $1";
    let hold = "/* replicator: primary */ SELECT 1";
    let on_first = first.prepare(sql).await.unwrap();
    let on_second = second.prepare(sql).await.unwrap();
    // The first client's transaction holds one connection, so the second uses the other.
    first.batch_execute("BEGIN").await.unwrap();
    first.batch_execute(hold).await.unwrap();
    assert_eq!(first.query_one(&on_first, &[&1i32]).await.unwrap().len(), 2);
    assert_eq!(
        second.query_one(&on_second, &[&1i32]).await.unwrap().len(),
        2
    );
    first.batch_execute("COMMIT").await.unwrap();

    primary_client()
        .await
        .batch_execute("ALTER TABLE proto_named_pool ADD COLUMN b int DEFAULT 7")
        .await
        .unwrap();
    // Again one connection held by the first client; the second meets the refusal on
    // the other one...
    first.batch_execute("BEGIN").await.unwrap();
    first.batch_execute(hold).await.unwrap();
    let err = second.query_one(&on_second, &[&1i32]).await.unwrap_err();
    assert_sqlstate(&err, tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED);
    // ...and the first client, preparing the text again on the connection that never
    // refused anything yet, gets the new shape there too.
    let again = first.prepare(sql).await.unwrap();
    let row = first.query_one(&again, &[&1i32]).await.unwrap();
    assert_eq!(row.len(), 3);
    assert_eq!(row.get::<_, i32>(2), 7);
    first.batch_execute("COMMIT").await.unwrap();
    let again = second.prepare(sql).await.unwrap();
    assert_eq!(second.query_one(&again, &[&1i32]).await.unwrap().len(), 3);
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query_frame(sql: &str) -> Vec<u8> {
    frame(b'Q', format!("{sql}\0").as_bytes())
}

/// Parse of `name` (no parameter types), Bind of it to the unnamed portal, Execute,
/// Sync, as one write.
fn parse_and_run(name: &str, sql: &str) -> Vec<u8> {
    let mut out = frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    out.extend(run_named(name));
    out
}

fn run_named(name: &str) -> Vec<u8> {
    let mut out = frame(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    out.extend(frame(b'E', b"\0\0\0\0\0"));
    out.extend(frame(b'S', b""));
    out
}

/// Writes `request` and reads the answers up to ReadyForQuery: each message's tag,
/// the SQLSTATE of any ErrorResponse, and the transaction status.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> (Vec<u8>, Option<String>, u8) {
    stream.write_all(request).await.unwrap();
    let mut buf = BytesMut::new();
    let mut tags = Vec::new();
    let mut code = None;
    loop {
        let message = next_message(stream, &mut buf).await;
        tags.push(message[0]);
        if message[0] == b'E' {
            code = error_code(&message);
        }
        if message[0] == b'Z' {
            return (tags, code, message[5]);
        }
    }
}

#[tokio::test]
async fn deallocate_in_sql_drops_a_protocol_prepared_statement() {
    // psycopg 3 and pgx evict statements from their caches with `DEALLOCATE name`: the
    // name is the client's, which the servers never see.
    let proxy = start_proxy("", "").await;
    let mut c = login_raw(TcpStream::connect(proxy.addr).await.unwrap()).await;
    for (name, sql) in [
        ("_pg3_0", "SELECT 1"),
        ("Cached", "SELECT 2"),
        ("third", "SELECT 3"),
    ] {
        let (_, error, _) = exchange(&mut c, &parse_and_run(name, sql)).await;
        assert_eq!(error, None, "{name}");
    }
    for sql in ["DEALLOCATE _pg3_0", "deallocate prepare \"Cached\";"] {
        let (tags, error, status) = exchange(&mut c, &query_frame(sql)).await;
        assert_eq!((error, status), (None, b'I'), "{sql}");
        assert_eq!(tags, b"CZ", "{sql}");
    }
    for gone in ["_pg3_0", "Cached"] {
        let (_, error, _) = exchange(&mut c, &run_named(gone)).await;
        assert_eq!(error.as_deref(), Some("26000"), "{gone} was deallocated");
    }
    let (_, error, _) = exchange(&mut c, &run_named("third")).await;
    assert_eq!(error, None, "the other statements stay");
    // The name may be prepared again, with another text.
    let (_, error, _) = exchange(&mut c, &parse_and_run("_pg3_0", "SELECT 4")).await;
    assert_eq!(error, None);
    // A name nobody prepared: Postgres's own error.
    let (_, error, _) = exchange(&mut c, &query_frame("DEALLOCATE nothing_here")).await;
    assert_eq!(error.as_deref(), Some("26000"));
    // Inside a transaction block the transaction goes on.
    exchange(&mut c, &query_frame("BEGIN")).await;
    let (_, error, status) = exchange(&mut c, &query_frame("DEALLOCATE third")).await;
    assert_eq!((error, status), (None, b'T'));
    let (_, _, status) = exchange(&mut c, &query_frame("COMMIT")).await;
    assert_eq!(status, b'I');
    let (_, error, _) = exchange(&mut c, &run_named("third")).await;
    assert_eq!(error.as_deref(), Some("26000"));
    // DEALLOCATE ALL and DISCARD ALL forget every name the client prepared; the names
    // can be prepared again.
    for forget_all in ["DEALLOCATE ALL", "DISCARD ALL"] {
        for (name, sql) in [("p1", "SELECT 5"), ("p2", "SELECT 6")] {
            let (_, error, _) = exchange(&mut c, &parse_and_run(name, sql)).await;
            assert_eq!(error, None, "{forget_all}: {name}");
        }
        let (_, error, status) = exchange(&mut c, &query_frame(forget_all)).await;
        assert_eq!((error, status), (None, b'I'), "{forget_all}");
        for gone in ["p1", "p2"] {
            let (_, error, _) = exchange(&mut c, &run_named(gone)).await;
            assert_eq!(error.as_deref(), Some("26000"), "{forget_all}: {gone}");
        }
    }
    let (_, error, _) = exchange(&mut c, &parse_and_run("p1", "SELECT 7")).await;
    assert_eq!(error, None);
}

#[tokio::test]
async fn a_begin_sent_through_the_extended_protocol_is_answered_as_the_server_would() {
    // pgbench -M extended and drivers that run `BEGIN` as a one-off statement send it
    // as Parse/Bind/[Describe]/Execute/Sync; the proxy answers and defers it as it does
    // a simple-query BEGIN.
    let proxy = start_proxy("", "").await;
    create_table("extended_begin", "id int").await;
    let count = || async {
        primary_client()
            .await
            .query_one("SELECT count(*) FROM extended_begin", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut c = login_raw(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let (tags, error, status) = exchange(&mut c, &parse_and_run("", "BEGIN")).await;
    assert_eq!((tags.as_slice(), error, status), (&b"12CZ"[..], None, b'T'));
    let (_, error, status) = exchange(
        &mut c,
        &parse_and_run("", "INSERT INTO extended_begin VALUES (1)"),
    )
    .await;
    assert_eq!((error, status), (None, b'T'));
    assert_eq!(count().await, 0, "inside a transaction until it commits");
    let (tags, error, status) = exchange(&mut c, &parse_and_run("", "COMMIT")).await;
    assert_eq!((tags.as_slice(), error, status), (&b"12CZ"[..], None, b'I'));
    assert_eq!(count().await, 1);

    // With a Describe of the portal, then of the statement.
    for (kind, answers) in [(b'P', &b"12nCZ"[..]), (b'S', &b"12tnCZ"[..])] {
        let mut request = frame(b'P', b"\0START TRANSACTION READ ONLY\0\0\0");
        request.extend(frame(b'B', b"\0\0\0\0\0\0\0\0"));
        request.extend(frame(b'D', &[kind, 0]));
        request.extend(frame(b'E', b"\0\0\0\0\0"));
        request.extend(frame(b'S', b""));
        let (tags, error, status) = exchange(&mut c, &request).await;
        assert_eq!((tags.as_slice(), error, status), (answers, None, b'T'));
        // The client's unnamed statement is now that BEGIN: a Bind without Parse runs
        // it again, on the server, which warns that a transaction is in progress.
        let (tags, error, status) = exchange(&mut c, &run_named("")).await;
        assert_eq!((error, status), (None, b'T'));
        assert!(tags.contains(&b'N') && tags.ends_with(b"CZ"), "{tags:?}");
        let (_, error, status) = exchange(&mut c, &parse_and_run("", "ROLLBACK")).await;
        assert_eq!((error, status), (None, b'I'));
    }

    // A BEGIN and its end with nothing between: no server needed.
    exchange(&mut c, &parse_and_run("", "BEGIN")).await;
    let (tags, error, status) = exchange(&mut c, &parse_and_run("", "ROLLBACK")).await;
    assert_eq!((tags.as_slice(), error, status), (&b"12CZ"[..], None, b'I'));
    let (_, error, status) = exchange(&mut c, &query_frame("SELECT 1")).await;
    assert_eq!((error, status), (None, b'I'));
}

/// A frontend message of a type the proxy knows, with a body that is plausible, truncated
/// or random: the bodies the proxy itself must read (statement and portal names, parameter
/// counts) and the ones only the server reads.
fn fuzzed_message(rng: &mut Fuzz) -> Vec<u8> {
    let tag = *rng.pick(b"QPBEDCHSFdcfp");
    let names: &[&[u8]] = &[b"", b"s1", b"s2", b"__rp_1", b"nope", b"\xff\xfe"];
    let texts: &[&[u8]] = &[
        b"SELECT 1",
        b"SELECT $1::int",
        b"",
        b"SELECT 'unterminated",
        b"BEGIN",
        b"COMMIT",
        b"SELECT 1; SELECT 2",
        b"INSERT INTO nowhere VALUES (1)",
        b"SELECT \xc3\x28",
        b"DEALLOCATE ALL",
        b"SET application_name = 'fuzz'",
    ];
    let mut body = BytesMut::new();
    if rng.below(4) == 0 {
        for _ in 0..rng.below(48) {
            body.put_u8(rng.next() as u8);
        }
    } else {
        match tag {
            b'Q' => rng.string(&mut body, texts),
            b'P' => {
                rng.string(&mut body, names);
                rng.string(&mut body, texts);
                let n = rng.count(1);
                body.put_i16(n);
                for _ in 0..n.clamp(0, 4) {
                    body.put_u32(*rng.pick(&[23, 25, 0, 999_999]));
                }
            }
            b'B' => {
                rng.string(&mut body, names);
                rng.string(&mut body, names);
                let formats = rng.count(1);
                body.put_i16(formats);
                for _ in 0..formats.clamp(0, 4) {
                    body.put_i16(*rng.pick(&[0, 1, 7, -1]));
                }
                let params = rng.count(1);
                body.put_i16(params);
                for _ in 0..params.clamp(0, 4) {
                    let len = *rng.pick(&[-1, 0, 1, 4, 1_000_000, -7]);
                    body.put_i32(len);
                    for _ in 0..len.clamp(0, 8) {
                        body.put_u8(b'7');
                    }
                }
                let results = rng.count(1);
                body.put_i16(results);
                for _ in 0..results.clamp(0, 4) {
                    body.put_i16(*rng.pick(&[0, 1, 9]));
                }
            }
            b'E' => {
                rng.string(&mut body, names);
                body.put_i32(*rng.pick(&[0, 1, -1, i32::MAX]));
            }
            b'D' | b'C' => {
                body.put_u8(*rng.pick(b"SPX\0"));
                rng.string(&mut body, names);
            }
            b'F' => {
                body.put_u32(*rng.pick(&[1299, 0, 4_000_000_000])); // 1299 = now()
                let formats = rng.count(0);
                body.put_i16(formats);
                for _ in 0..formats.clamp(0, 4) {
                    body.put_i16(0);
                }
                let args = rng.count(0);
                body.put_i16(args);
                for _ in 0..args.clamp(0, 4) {
                    body.put_i32(-1);
                }
                body.put_i16(0);
            }
            _ => {
                for _ in 0..rng.below(16) {
                    body.put_u8(rng.next() as u8);
                }
            }
        }
        if rng.below(3) == 0 && !body.is_empty() {
            let keep = rng.below(body.len() as u64) as usize;
            body.truncate(keep);
        }
    }
    message(tag, &body)
}

/// How a fuzzed case ended, as the client saw it.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The session went on and answered the probe.
    Answered,
    /// An ErrorResponse, then a closed socket: a clean refusal.
    Refused,
    /// The socket closed without an ErrorResponse.
    ClosedSilently,
    /// Nothing more came for 10 s.
    Hung,
}

/// Reads until the probe's row and the ReadyForQuery after it, or the end of the socket.
async fn answer_to_probe(stream: &mut TcpStream) -> Outcome {
    let mut buf = BytesMut::new();
    let mut saw_error = false;
    let mut saw_probe = false;
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let frame = buf.split_to(len + 1);
            match frame[0] {
                b'E' => saw_error = true,
                b'D' if frame.ends_with(b"4242") => saw_probe = true,
                b'Z' if saw_probe => return Outcome::Answered,
                _ => {}
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf));
        match read.await {
            Err(_) => return Outcome::Hung,
            Ok(Ok(0) | Err(_)) if saw_error => return Outcome::Refused,
            Ok(Ok(0) | Err(_)) => return Outcome::ClosedSilently,
            Ok(Ok(_)) => {}
        }
    }
}

/// Hundreds of well-framed messages with broken or random bodies, one to three at a time
/// followed by a Sync
/// and a probe query. Every one must end in an answer (the session goes on and answers
/// the probe) or in an ErrorResponse and a closed socket: never a hang, never a socket
/// closed without a word (what a panicking session would leave), and the proxy keeps
/// serving everyone else.
#[tokio::test]
async fn fuzzed_messages_get_an_answer_or_an_error_never_a_hang() {
    let proxy = start_proxy("", "").await;
    let mut rng = Fuzz(0x9e37_79b9_7f4a_7c15);
    let probe = query("ROLLBACK; SELECT '4242'::text");
    let mut stream = login_raw(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let mut history: Vec<Vec<Vec<u8>>> = Vec::new();
    let (mut answered, mut refused) = (0, 0);
    for case in 0..400 {
        // One to three messages before the Sync: a pipeline the proxy must keep apart.
        let mut bytes = Vec::new();
        let mut sent = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let message = fuzzed_message(&mut rng);
            bytes.extend_from_slice(&message);
            sent.push(message);
        }
        history.push(sent);
        bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        bytes.extend_from_slice(&probe);
        if stream.write_all(&bytes).await.is_err() {
            panic!(
                "case {case}: the proxy closed the socket early; since the last reconnect: {history:?}"
            );
        }
        match answer_to_probe(&mut stream).await {
            Outcome::Answered => answered += 1,
            Outcome::Refused => {
                refused += 1;
                history.clear();
                stream = login_raw(TcpStream::connect(proxy.addr).await.unwrap()).await;
            }
            other => panic!(
                "case {case}: {other:?}; the messages of each case since the last reconnect, \
                 each case followed by a Sync and the probe: {history:?}"
            ),
        }
    }
    eprintln!("answered {answered}, refused {refused}");
    // Both outcomes occur: the generator reaches the proxy's own checks and the server's.
    assert!(
        answered > 50 && refused > 50,
        "answered {answered}, refused {refused}"
    );
    let client = app_client(&proxy).await;
    let row = client.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// The frames a raw connection receives up to its `count`-th ReadyForQuery, as (tag,
/// SQLSTATE or data row text), leaving out ParameterStatus and notices.
async fn frames_until_ready(stream: &mut TcpStream, count: usize) -> Vec<(char, String)> {
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let mut ready = 0;
    while ready < count {
        let frame = next_message(stream, &mut buf).await;
        let detail = match frame[0] {
            b'E' => error_code(&frame).unwrap_or_default(),
            b'D' => String::from_utf8_lossy(&frame[11..]).into_owned(),
            b'S' | b'N' => continue,
            _ => String::new(),
        };
        if frame[0] == b'Z' {
            ready += 1;
        }
        seen.push((frame[0] as char, detail));
    }
    seen
}

/// After an error in the extended protocol, Postgres discards every message up to the
/// next Sync, a simple Query among them. The proxy must agree, or it waits for answers
/// that never come and the session hangs: the same bytes get the same answers through
/// the proxy as from the primary directly.
#[tokio::test]
async fn an_extended_protocol_error_skips_to_sync_as_on_postgres() {
    let proxy = start_proxy("", "").await;
    // Describe of a portal that does not exist, then a Flush: the error comes at once,
    // and the simple Query behind it is discarded by the server.
    let mut bytes = vec![b'D', 0, 0, 0, 10, b'P', b'n', b'o', b'p', b'e', 0];
    bytes.extend_from_slice(&[b'H', 0, 0, 0, 4]);
    bytes.extend_from_slice(&query("SELECT 'discarded'"));
    bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    bytes.extend_from_slice(&query("SELECT 'answered'"));
    let direct = TcpStream::connect(("127.0.0.1", primary_port()))
        .await
        .unwrap();
    let through = TcpStream::connect(proxy.addr).await.unwrap();
    let mut answers = Vec::new();
    let mut open = Vec::new();
    for stream in [direct, through] {
        let mut stream = login_raw(stream).await;
        // Twice: once as sent in one write, once with the Query and the Sync arriving
        // after the error did.
        let mut seen = Vec::new();
        stream.write_all(&bytes).await.unwrap();
        seen.extend(frames_until_ready(&mut stream, 2).await);
        stream.write_all(&bytes[..16]).await.unwrap();
        seen.extend(frames_until_ready_or_nothing(&mut stream).await);
        stream.write_all(&bytes[16..]).await.unwrap();
        seen.extend(frames_until_ready(&mut stream, 2).await);
        answers.push(seen);
        open.push(stream);
    }
    let expected: Vec<(char, String)> = [
        ('E', "34000"),
        ('Z', ""),
        ('T', ""),
        ('D', "answered"),
        ('C', ""),
        ('Z', ""),
    ]
    .iter()
    .map(|(t, d)| (*t, d.to_string()))
    .collect();
    let twice: Vec<_> = expected.iter().chain(expected.iter()).cloned().collect();
    assert_eq!(answers[0], twice, "direct");
    assert_eq!(answers[1], twice, "through the proxy");
    // All answered, so the client, still connected, holds no server: in transaction
    // pooling its server went back to the pool for the others.
    wait_status(
        &proxy,
        Duration::from_secs(5),
        "every server back in its pool",
        |s| {
            s.projects[0]
                .nodes
                .iter()
                .all(|n| n.pools.iter().all(|p| p.active == 0))
        },
    )
    .await;
    drop(open);
}

/// Reads the error a Describe + Flush gets, which comes without a ReadyForQuery.
async fn frames_until_ready_or_nothing(stream: &mut TcpStream) -> Vec<(char, String)> {
    let mut buf = BytesMut::new();
    let frame = next_message(stream, &mut buf).await;
    assert!(buf.is_empty(), "more than the error arrived: {buf:?}");
    vec![(frame[0] as char, error_code(&frame).unwrap_or_default())]
}

/// The salt and mechanisms the proxy offers `user`: the start of a SCRAM exchange,
/// abandoned after the server-first-message.
async fn offered_salt(addr: std::net::SocketAddr, user: &str) -> (Vec<u8>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&startup_packet(user, "app"))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let request = next_message(&mut stream, &mut buf).await;
    assert_eq!(request[0], b'R');
    let mechanisms = request[5..].to_vec();
    let code = i32::from_be_bytes([request[5], request[6], request[7], request[8]]);
    assert_eq!(code, 10, "{user}: SASL expected, got {request:?}");
    let first = b"n,,n=,r=abcdefghijklmnop";
    let mut out = BytesMut::new();
    out.put_u8(b'p');
    let body_len = "SCRAM-SHA-256".len() + 1 + 4 + first.len();
    out.put_u32(4 + body_len as u32);
    out.put_slice(b"SCRAM-SHA-256\0");
    out.put_u32(first.len() as u32);
    out.put_slice(first);
    stream.write_all(&out).await.unwrap();
    let answer = next_message(&mut stream, &mut buf).await;
    let text = String::from_utf8_lossy(&answer[9..]).to_string();
    let salt = text
        .split(',')
        .find_map(|a| a.strip_prefix("s="))
        .unwrap_or_else(|| panic!("no salt in {text}"))
        .to_string();
    (mechanisms, salt)
}

/// No user enumeration by method or salt; nothing big is reserved for a client that
/// has not logged in; allow-lists refuse other addresses with 28000.
#[tokio::test]
async fn login_reveals_nothing_and_reserves_nothing_for_strangers() {
    let proxy = start_proxy("", "").await;
    let (app_mechanisms, app_salt) = offered_salt(proxy.addr, "app").await;
    let (nobody_mechanisms, nobody_salt) = offered_salt(proxy.addr, "nobody").await;
    assert_eq!(app_mechanisms, nobody_mechanisms);
    assert_eq!(offered_salt(proxy.addr, "app").await.1, app_salt);
    assert_eq!(
        offered_salt(proxy.addr, "nobody").await.1,
        nobody_salt,
        "an unknown user's salt changes between attempts: it gives the user away"
    );
    assert_ne!(app_salt, nobody_salt);
    assert_ne!(offered_salt(proxy.addr, "nobody2").await.1, nobody_salt);
    // The same config in another proxy (a restart, a fleet member) offers the same salts.
    let twin = start_proxy("", "").await;
    assert_eq!(offered_salt(twin.addr, "app").await.1, app_salt);
    assert_eq!(offered_salt(twin.addr, "nobody").await.1, nobody_salt);

    // A SASL message announcing 100 MB: refused at once, not waited for.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(&startup_packet("app", "app"))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    assert_eq!(next_message(&mut stream, &mut buf).await[0], b'R');
    stream
        .write_all(&[b'p', 0x06, 0x40, 0x00, 0x00])
        .await
        .unwrap();
    let reply = read_until_closed(&mut stream).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply).contains("65536"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // A startup packet over 10,000 bytes: refused the same way.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&10_001u32.to_be_bytes()).await.unwrap();
    let reply = read_until_closed(&mut stream).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");

    // Allow-lists: a user only from 10/8, a project only from 192.0.2.0/24.
    let text = config_text(cluster(), "", "")
        .replacen(
            "name = \"plain_user\"\npassword = \"secret\"",
            "name = \"plain_user\"\npassword = \"secret\"\nallow = [\"10.0.0.0/8\"]",
            1,
        )
        .replacen(
            "[projects.app]\n",
            "[projects.app]\nallow = [\"127.0.0.1/32\", \"::1\"]\n",
            1,
        );
    let listed = start_proxy_with(&text).await;
    let err = connect(&proxy_url(&listed, "plain_user", "secret", "app"))
        .await
        .expect_err("plain_user is allowed from 10/8 only");
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err:?}");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message.as_deref().is_some_and(|m| m.contains("127.0.0.1")),
        "{message:?}"
    );
    connect(&proxy_url(&listed, "app", "secret", "app"))
        .await
        .expect("app may connect from loopback");
    let closed =
        start_proxy_with(&text.replace("\"127.0.0.1/32\", \"::1\"", "\"192.0.2.0/24\"")).await;
    let err = connect(&proxy_url(&closed, "app", "secret", "app"))
        .await
        .expect_err("the project allows 192.0.2.0/24 only");
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err:?}");
}

/// max_client_conn, a project's and a user's max_clients: the client over a limit gets
/// 53300 at once, seats come back when clients leave, and the refusals are counted.
#[tokio::test]
async fn client_limits_refuse_with_53300_at_once() {
    let text = config_text(cluster(), "max_clients = 3", "max_client_conn = 5").replacen(
        "name = \"trust_user\"\npassword = \"secret\"",
        "name = \"trust_user\"\npassword = \"secret\"\nmax_clients = 1",
        1,
    );
    assert!(text.contains("max_clients = 1"));
    let proxy = start_proxy_with(&text).await;
    let refused = |url: String, what: &'static str| async move {
        let started = Instant::now();
        let err = connect(&url).await.expect_err(what);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: not at once"
        );
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("53300"),
            "{what}: {err:?}"
        );
        err.as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default()
    };
    let trust = connect(&proxy_url(&proxy, "trust_user", "secret", "app"))
        .await
        .unwrap();
    let message = refused(
        proxy_url(&proxy, "trust_user", "secret", "app"),
        "user limit",
    )
    .await;
    assert!(message.contains("user \"trust_user\""), "{message}");
    let app1 = app_client(&proxy).await;
    let _app2 = app_client(&proxy).await;
    let message = refused(proxy_url(&proxy, "app", "secret", "app"), "project limit").await;
    assert!(message.contains("project \"app\""), "{message}");
    // The console counts toward max_client_conn only.
    let console = connect(&proxy_url(&proxy, "app", "secret", "replicator"))
        .await
        .unwrap();
    let _console2 = connect(&proxy_url(&proxy, "app", "secret", "replicator"))
        .await
        .unwrap();
    let message = refused(
        proxy_url(&proxy, "app", "secret", "replicator"),
        "max_client_conn",
    )
    .await;
    assert!(message.contains("max_client_conn = 5"), "{message}");
    // Seats come back when clients leave.
    drop(app1);
    drop(trust);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if connect(&proxy_url(&proxy, "trust_user", "secret", "app"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the seats were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = console.simple_query("SHOW STATS").await.unwrap();
    let refusals = stats
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                row.get("clients_refused").map(str::to_string)
            }
            _ => None,
        })
        .expect("SHOW STATS row");
    assert_eq!(refusals, "2", "a project and a user refusal");
    let addr = proxy.admin_addr.unwrap().to_string();
    let (_, metrics) = admin_http(&addr).get("/metrics").await.unwrap();
    for needle in [
        "replicator_clients_refused_total{limit=\"max_client_conn\"} 1",
        "replicator_clients_refused_total{limit=\"project\"} 1",
        "replicator_clients_refused_total{limit=\"user\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}
