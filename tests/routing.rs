//! Read/write splitting as a client sees it: which node answered each statement.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;

fn simple_who(messages: &[SimpleQueryMessage]) -> (u16, bool) {
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            let port: u16 = row.get(0).unwrap().parse().unwrap();
            return (port, row.get(1) == Some("t"));
        }
    }
    panic!("no row");
}

#[tokio::test]
async fn reads_spread_over_replicas_and_writes_reach_the_primary() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    let mut ports = HashSet::new();
    for _ in 0..10 {
        // Extended protocol (tokio-postgres prepares every statement).
        let (port, replica) = who(&client, WHO).await;
        assert!(replica, "a plain read must run on a replica");
        ports.insert(port);
        // Simple protocol.
        let (port, replica) = simple_who(&client.simple_query(WHO).await.unwrap());
        assert!(replica);
        ports.insert(port);
    }
    let expected: HashSet<u16> = replica_ports().into_iter().collect();
    assert_eq!(ports, expected, "round-robin uses every replica");

    create_table("rw_split", "id serial primary key, port int").await;
    let row = client
        .query_one(
            "INSERT INTO rw_split (port) VALUES (inet_server_port()) RETURNING port",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as u16, primary_port());
    for sql in [
        "SELECT inet_server_port(), pg_is_in_recovery() FROM rw_split FOR UPDATE",
        "WITH x AS (INSERT INTO rw_split (port) VALUES (1) RETURNING 1) SELECT inet_server_port(), pg_is_in_recovery() FROM x",
        "SELECT inet_server_port(), pg_is_in_recovery() FROM (SELECT nextval('rw_split_id_seq')) s",
        "/* replicator: primary */ SELECT inet_server_port(), pg_is_in_recovery()",
    ] {
        let (port, replica) = who(&client, sql).await;
        assert_eq!((port, replica), (primary_port(), false), "{sql}");
    }
    let (_, replica) = who(
        &client,
        "/* replicator: replica */ SELECT inet_server_port(), pg_is_in_recovery()",
    )
    .await;
    assert!(replica);
}

#[tokio::test]
async fn a_transaction_stays_on_one_backend() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    client.batch_execute("BEGIN").await.unwrap();
    for _ in 0..5 {
        assert_eq!(who(&client, WHO).await, (primary_port(), false));
    }
    client.batch_execute("COMMIT").await.unwrap();

    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let first = who(&client, WHO).await;
    assert!(first.1, "BEGIN READ ONLY runs on a replica");
    for _ in 0..5 {
        assert_eq!(
            who(&client, WHO).await,
            first,
            "same backend for the whole transaction"
        );
    }
    client.batch_execute("COMMIT").await.unwrap();

    // The implicit transaction of a multi-statement simple query goes where its writes can run.
    create_table("rw_multi", "id int").await;
    let messages = client
        .simple_query(
            "INSERT INTO rw_multi VALUES (1); SELECT inet_server_port(), pg_is_in_recovery()",
        )
        .await
        .unwrap();
    assert_eq!(simple_who(&messages), (primary_port(), false));

    // A rolled back transaction leaves nothing behind and the client carries on.
    let mut tx_client = app_client(&proxy).await;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute("INSERT INTO rw_multi VALUES (2)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = tx_client
        .query_one(
            "/* replicator: primary */ SELECT count(*) FROM rw_multi WHERE id = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn pipelined_statements_are_answered_in_order() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    create_table("rw_pipeline", "id int").await;
    let insert = client
        .prepare("INSERT INTO rw_pipeline VALUES ($1) RETURNING inet_server_port()")
        .await
        .unwrap();
    let read = client.prepare(WHO).await.unwrap();
    // tokio-postgres pipelines requests polled together: several Syncs in flight at once.
    let (a, b, c, d) = tokio::join!(
        client.query_one(&read, &[]),
        client.query_one(&insert, &[&1i32]),
        client.query_one(&read, &[]),
        client.query_one(&insert, &[&2i32]),
    );
    assert!(a.unwrap().get::<_, bool>(1));
    assert_eq!(b.unwrap().get::<_, i32>(0) as u16, primary_port());
    // A read pipelined behind a write may run on the primary (it then sees that write).
    c.unwrap();
    assert_eq!(d.unwrap().get::<_, i32>(0) as u16, primary_port());
}

#[tokio::test]
async fn prepared_statements_follow_the_client_across_backends() {
    let proxy = start_proxy("pool_size = 4", "").await;
    let clients = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(app_client(&proxy).await);
        }
        v
    };
    create_table("rw_prepared", "id int primary key, v text").await;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare("INSERT INTO rw_prepared VALUES ($1, $2)")
                .await
                .unwrap();
            let select = client
                .prepare("SELECT v, pg_is_in_recovery() FROM rw_prepared WHERE id = $1")
                .await
                .unwrap();
            let who = client.prepare(WHO).await.unwrap();
            for j in 0..50 {
                let id = (i * 1000 + j) as i32;
                client
                    .execute(&insert, &[&id, &format!("v{id}")])
                    .await
                    .unwrap();
                // Same statement objects, any backend: re-prepared where missing.
                let (_, replica) = {
                    let row = client.query_one(&who, &[]).await.unwrap();
                    (row.get::<_, i32>(0), row.get::<_, bool>(1))
                };
                assert!(replica);
                let rows = client.query(&select, &[&id]).await.unwrap();
                assert!(rows.len() <= 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn settings_survive_transaction_pooling_and_stay_private() {
    let proxy = start_proxy("pool_size = 2", "").await;
    let a = app_client(&proxy).await;
    let b = app_client(&proxy).await;
    a.batch_execute("SET application_name = 'client_a'")
        .await
        .unwrap();
    a.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    for _ in 0..8 {
        let row = a
            .query_one(
                "SELECT current_setting('application_name'), current_setting('statement_timeout')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "client_a");
        assert_eq!(row.get::<_, String>(1), "7s");
        let row = b
            .query_one("SELECT current_setting('statement_timeout')", &[])
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, String>(0),
            "0",
            "b must not inherit a's settings"
        );
    }
    // A SET rolled back with its transaction does not stick.
    a.batch_execute("BEGIN; SET statement_timeout = '9s'; ROLLBACK")
        .await
        .unwrap();
    let v: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "7s");
    a.batch_execute("RESET statement_timeout").await.unwrap();
    for _ in 0..4 {
        let v: String = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "0");
    }
    // A failed SET changes nothing.
    assert!(
        a.batch_execute("SET statement_timeout = 'nonsense'")
            .await
            .is_err()
    );
    let v: String = a
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "client_a");
    // DISCARD PLANS, unlike DISCARD ALL, keeps the session's settings: they still follow
    // the client, and the server it ran on still holds them for the proxy to undo.
    a.batch_execute("DISCARD PLANS").await.unwrap();
    for _ in 0..4 {
        let v: String = a
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "client_a");
        let v: String = b
            .query_one(
                "/* replicator: primary */ SELECT current_setting('application_name')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_ne!(v, "client_a", "b must not inherit a's settings");
    }
}

#[tokio::test]
async fn startup_parameters_are_applied_and_reported() {
    let proxy = start_proxy("", "").await;
    let url = format!(
        "{}?application_name=from_startup&options=-c%20search_path%3Dpg_catalog",
        proxy_url(&proxy, "app", "secret", "app")
    );
    let client = connect(&url).await.unwrap_or_else(|e| panic!("{e:?}"));
    for _ in 0..4 {
        let row = client
            .query_one(
                "SELECT current_setting('application_name'), current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "from_startup");
        assert_eq!(row.get::<_, String>(1), "pg_catalog");
    }
    // An invalid startup setting is refused, as Postgres refuses it.
    let bad = format!(
        "{}?options=-c%20statement_timeout%3Dbanana",
        proxy_url(&proxy, "app", "secret", "app")
    );
    let err = connect(&bad).await.expect_err("bad setting refused");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("statement_timeout"), "{err:?}");
}

#[tokio::test]
async fn session_state_that_cannot_move_pins_the_client() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    client
        .batch_execute("CREATE TEMP TABLE scratch (id int)")
        .await
        .unwrap();
    for i in 0..5 {
        client
            .execute("INSERT INTO scratch VALUES ($1)", &[&i])
            .await
            .unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i as i64 + 1);
    }
    // Pinned to the primary: even plain reads run there now.
    assert_eq!(who(&client, WHO).await, (primary_port(), false));

    // Session advisory locks held by the pinned connection stay held.
    let other = app_client(&proxy).await;
    let locker = app_client(&proxy).await;
    let got: bool = locker
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(got);
    for _ in 0..3 {
        let again: bool = other
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!again, "lock must still be held by the pinned client");
    }
    drop(locker);
    // When the pinned client leaves, its server is reset before reuse: the lock is released.
    let mut released = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let fresh = app_client(&proxy).await;
        if fresh
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
        {
            released = true;
            break;
        }
    }
    assert!(released);
}

#[tokio::test]
async fn listen_notify_reaches_a_pinned_client() {
    use futures_util::StreamExt;
    let proxy = start_proxy("", "").await;
    let url = proxy_url(&proxy, "app", "secret", "app");
    let (client, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
            let _ = tx.send(n.payload().to_string());
        }
        futures_util::future::ready(())
    }));
    client.batch_execute("LISTEN jobs").await.unwrap();
    let sender = app_client(&proxy).await;
    sender.batch_execute("NOTIFY jobs, 'hello'").await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "hello");
}

#[tokio::test]
async fn session_pool_mode_keeps_one_backend() {
    let proxy = start_proxy("", "pool_mode = \"session\"").await;
    let client = app_client(&proxy).await;
    let first = who(&client, WHO).await;
    for _ in 0..5 {
        assert_eq!(who(&client, WHO).await, first);
    }
}

#[tokio::test]
async fn shutdown_closes_idle_clients_and_lets_transactions_finish() {
    let proxy = start_proxy("", "").await;
    create_table("rw_shutdown", "id int").await;
    let idle = app_client(&proxy).await;
    let busy = app_client(&proxy).await;
    busy.batch_execute("BEGIN").await.unwrap();
    busy.execute("INSERT INTO rw_shutdown VALUES (1)", &[])
        .await
        .unwrap();
    let addr = proxy.addr;
    let stopping = tokio::spawn(proxy.stop(std::time::Duration::from_secs(20)));
    // The idle client is told and closed.
    for _ in 0..200 {
        if idle.is_closed() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(idle.is_closed());
    assert!(idle.simple_query("SELECT 1").await.is_err());
    // New clients are refused.
    assert!(
        connect(&format!("postgresql://app:secret@{addr}/app"))
            .await
            .is_err()
    );
    // The client inside a transaction finishes it; the proxy then lets it go.
    busy.execute("INSERT INTO rw_shutdown VALUES (2)", &[])
        .await
        .unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("stop returns")
        .unwrap();
    let n: i64 = primary_client()
        .await
        .query_one("SELECT count(*) FROM rw_shutdown", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the transaction committed during shutdown");
}

/// The primary's entry in `/status`.
fn primary_status(s: &replicator::admin::status::Status) -> replicator::admin::status::NodeStatus {
    s.projects[0]
        .nodes
        .iter()
        .find(|n| n.role == "primary")
        .expect("a primary in /status")
        .clone()
}

#[tokio::test]
async fn a_full_pool_queues_clients_and_hands_connections_over() {
    let proxy = start_proxy("pool_size = 2", "").await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = app_client(&proxy).await;
        tasks.push(tokio::spawn(async move {
            // Transactions on the primary that hold their server connection a while:
            // six clients share two connections, so four always wait for one.
            for _ in 0..3 {
                let tx = format!("BEGIN; SELECT pg_sleep(0.05), {i}; COMMIT");
                client.batch_execute(&tx).await.unwrap();
            }
        }));
    }
    let mut most = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let p = primary_status(&status(&proxy).await);
        most = most.max(p.active_connections + p.idle_connections);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(most >= 1, "the pool was never seen in use");
    assert!(
        most <= 2,
        "pool_size = 2 but {most} server connections were open"
    );
    // Every connection came back.
    let p = primary_status(&status(&proxy).await);
    assert_eq!(p.active_connections, 0);
    assert!(p.idle_connections <= 2);
}

#[tokio::test]
async fn server_connections_idle_past_the_timeout_are_closed() {
    let proxy = start_proxy("", "server_idle_timeout_ms = 300").await;
    let client = app_client(&proxy).await;
    client
        .batch_execute("/* replicator: primary */ SELECT 1")
        .await
        .unwrap();
    assert!(primary_status(&status(&proxy).await).idle_connections >= 1);
    let s = wait_status(
        &proxy,
        Duration::from_secs(10),
        "idle connections closed",
        |s| primary_status(s).idle_connections == 0,
    )
    .await;
    assert_eq!(primary_status(&s).active_connections, 0);
    // And a new one is opened on demand.
    let (port, replica) = who(&client, &format!("/* replicator: primary */ {WHO}")).await;
    assert_eq!((port, replica), (primary_port(), false));
}

/// A count the primary answers directly, past the proxy.
async fn count_on_primary(sql: &str) -> i64 {
    primary_client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_begin_takes_no_server_until_its_first_statement() {
    // One primary connection, and a short wait for it, to see who holds it.
    let text = format!(
        "{}\n[failover]\nwrite_wait_ms = 100\n",
        config_text(
            cluster(),
            "pool_size = 1",
            "connect_timeout_ms = 300\nquery_wait_timeout_ms = 300"
        )
    );
    let proxy = start_proxy_with(&text).await;
    create_table("deferred_begin", "id int").await;
    let a = app_client(&proxy).await;
    let b = app_client(&proxy).await;

    // A transaction that has only begun holds no server: the other client's write
    // still gets the only primary connection.
    a.batch_execute("BEGIN").await.unwrap();
    b.batch_execute("INSERT INTO deferred_begin VALUES (1)")
        .await
        .unwrap();

    // Its statements then run as one transaction on the primary, unseen by others
    // until it commits.
    a.batch_execute("INSERT INTO deferred_begin VALUES (2)")
        .await
        .unwrap();
    let ids =
        "SELECT inet_server_port()::text || ' ' || pg_backend_pid() || ' ' || pg_current_xact_id()";
    let first = a.query_one(ids, &[]).await.unwrap().get::<_, String>(0);
    let second = a.query_one(ids, &[]).await.unwrap().get::<_, String>(0);
    assert_eq!(first, second, "one server, one transaction");
    assert!(
        first.starts_with(&format!("{} ", primary_port())),
        "{first}"
    );
    let seen = count_on_primary("SELECT count(*) FROM deferred_begin WHERE id = 2").await;
    assert_eq!(seen, 0, "uncommitted rows are not visible outside");

    // Meanwhile the other client's transaction finds no server for its first
    // statement: the transaction is aborted, as on Postgres, until it ends.
    b.batch_execute("BEGIN").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap_err();
    let err = b.simple_query("SELECT 1").await.unwrap_err();
    assert_sqlstate(
        &err,
        tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION,
    );
    let ended = b.simple_query("COMMIT").await.unwrap();
    assert!(
        matches!(
            ended.first(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))
        ),
        "{ended:?}"
    );

    a.batch_execute("COMMIT").await.unwrap();
    let rows = count_on_primary("SELECT count(*) FROM deferred_begin").await;
    assert_eq!(rows, 2);

    // BEGIN and its end with nothing between need no server; both clients carry on.
    for end in ["COMMIT", "ROLLBACK", "END", "ABORT"] {
        b.batch_execute("START TRANSACTION").await.unwrap();
        b.batch_execute(end).await.unwrap();
    }
    let mut c = app_client(&proxy).await;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO deferred_begin VALUES (3)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let (_, replica) = who(&b, WHO).await;
    assert!(
        replica,
        "after its transactions the client reads from replicas again"
    );
    let rows = count_on_primary("SELECT count(*) FROM deferred_begin").await;
    assert_eq!(rows, 2, "a rolled back transaction leaves nothing");
}
