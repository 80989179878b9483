//! Timeouts and socket limits: each one trips as configured, what the client sees when
//! it does, and what becomes of the server connection (rolled back and returned to the
//! pool, not lost). Each test fails if its limit is taken away: the client would wait
//! or hold its server forever.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::wire::{error_code, login_raw, next_message, query};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::SimpleQueryMessage;

/// A statement the router sends to the primary whatever it is.
const ON_PRIMARY: &str = "/* replicator: primary */ ";

async fn raw_client(proxy: &replicator::server::Proxy) -> TcpStream {
    login_raw(TcpStream::connect(proxy.addr).await.unwrap()).await
}

/// Reads until the proxy closes the connection; returns the SQLSTATEs of the errors
/// it sent on the way. Fails the test if the connection stays open for `limit`.
async fn errors_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut buf = BytesMut::new();
    let mut codes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the proxy kept the connection open");
        match tokio::time::timeout(left, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return codes,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the proxy kept the connection open for {limit:?}"),
        }
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let frame = buf.split_to(len + 1);
            if let Some(code) = error_code(&frame) {
                codes.push(code);
            }
        }
    }
}

async fn first_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}"))
}

/// A connection to a proxy process once it listens; fails the test after 20 s (the
/// process's log says why it did not start).
async fn connect_when_up(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            return stream;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not listen on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` for up to 20 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a backend is doing, from pg_stat_activity on the primary.
async fn backend_state(pid: &str) -> Option<String> {
    let primary = primary_client().await;
    let rows = primary
        .simple_query(&format!(
            "SELECT state FROM pg_stat_activity WHERE pid = {pid}"
        ))
        .await
        .unwrap();
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    })
}

#[tokio::test]
async fn client_idle_timeout_closes_idle_clients_and_spares_busy_ones() {
    let proxy = start_proxy("", "client_idle_timeout_ms = 400").await;
    let mut idle = raw_client(&proxy).await;
    // Inside a transaction the client is not "idle" in this sense (that is
    // idle_transaction_timeout's business, off here).
    let in_transaction = app_client(&proxy).await;
    in_transaction.batch_execute("BEGIN").await.unwrap();
    in_transaction.batch_execute("SELECT 1").await.unwrap();
    // A client that keeps working is never idle for that long.
    let busy = app_client(&proxy).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        busy.batch_execute("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let codes = errors_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert_eq!(codes, ["57P05"], "the idle client is told why");
    in_transaction.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn idle_transaction_timeout_rolls_back_and_returns_the_server() {
    create_table("idle_tx_t", "id int, pid int").await;
    let proxy = start_proxy("pool_size = 1", "idle_transaction_timeout_ms = 400").await;
    let mut client = raw_client(&proxy).await;
    client
        .write_all(&query(
            "BEGIN; INSERT INTO idle_tx_t VALUES (1, pg_backend_pid())",
        ))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        let frame = next_message(&mut client, &mut buf).await;
        assert_ne!(frame[0], b'E', "{frame:?}");
        if frame[0] == b'Z' {
            assert_eq!(frame[5], b'T');
            break;
        }
    }
    let codes = errors_until_closed(&mut client, Duration::from_secs(10)).await;
    assert_eq!(codes, ["25P03"]);
    // Rolled back: the row is not there; and the pool's one primary connection is
    // free for the next client.
    let other = app_client(&proxy).await;
    other
        .batch_execute("INSERT INTO idle_tx_t VALUES (2, pg_backend_pid())")
        .await
        .unwrap();
    let primary = primary_client().await;
    let ids = first_value(&primary, "SELECT string_agg(id::text, ',') FROM idle_tx_t").await;
    assert_eq!(ids, "2");
}

#[tokio::test]
async fn idle_transaction_timeout_returns_the_very_connection_the_client_held() {
    let proxy = start_proxy("pool_size = 1", "idle_transaction_timeout_ms = 300").await;
    let holder = app_client(&proxy).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let pid = first_value(&holder, &format!("{ON_PRIMARY}SELECT pg_backend_pid()")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(holder.batch_execute("SELECT 1").await.is_err());
    let next = app_client(&proxy).await;
    eventually("the rolled-back connection is reused", async || {
        first_value(&next, &format!("{ON_PRIMARY}SELECT pg_backend_pid()")).await == pid
    })
    .await;
}

#[tokio::test]
async fn query_timeout_cancels_the_query_and_the_session_goes_on() {
    for mode in ["transaction", "session"] {
        let proxy = start_proxy(
            "",
            // Long enough that a loaded test machine never makes a quick query look slow.
            &format!("pool_mode = \"{mode}\"\nquery_timeout_ms = 2000"),
        )
        .await;
        let client = app_client(&proxy).await;
        client
            .batch_execute("SET application_name = 'kept'")
            .await
            .unwrap();
        let started = Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            client.batch_execute("SELECT pg_sleep(60)"),
        )
        .await
        .unwrap_or_else(|_| panic!("{mode}: the query was not cancelled"))
        .expect_err("cancelled");
        assert_sqlstate(&err, tokio_postgres::error::SqlState::QUERY_CANCELED);
        assert!(started.elapsed() < Duration::from_secs(20));
        // The session is intact.
        assert_eq!(first_value(&client, "SHOW application_name").await, "kept");
        // Quick queries are not touched, one after another in a pipeline either.
        let quick: Vec<_> = (0..20)
            .map(|_| client.simple_query("SELECT pg_sleep(0.05)"))
            .collect();
        for result in futures_util::future::join_all(quick).await {
            result.unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        }
    }
}

#[tokio::test]
async fn a_reload_brings_a_new_query_timeout_to_connected_clients() {
    let dir = cluster().dir.join("limits-reload");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    let text = config_text(cluster(), "", "");
    std::fs::write(&path, &text).unwrap();
    init_logs();
    let config = replicator::config::Config::load(&path).unwrap();
    let proxy = replicator::server::Proxy::start(config, Some(path.clone()))
        .await
        .unwrap();
    let client = app_client(&proxy).await;
    client.batch_execute("SELECT pg_sleep(0.6)").await.unwrap();
    std::fs::write(&path, config_text(cluster(), "", "query_timeout_ms = 300")).unwrap();
    replicator::reload::reload(&proxy.shared, "test")
        .await
        .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.batch_execute("SELECT pg_sleep(60)"),
    )
    .await
    .expect("the reloaded timeout cancels the query")
    .expect_err("cancelled");
    assert_sqlstate(&err, tokio_postgres::error::SqlState::QUERY_CANCELED);
}

#[tokio::test]
async fn server_lifetime_retires_old_connections() {
    let pid_sql = format!("{ON_PRIMARY}SELECT pg_backend_pid()");
    let proxy = start_proxy("pool_size = 1", "").await;
    let client = app_client(&proxy).await;
    let first = first_value(&client, &pid_sql).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        first_value(&client, &pid_sql).await,
        first,
        "kept without a lifetime"
    );

    let proxy = start_proxy("pool_size = 1", "server_lifetime_ms = 300").await;
    let client = app_client(&proxy).await;
    let first = first_value(&client, &pid_sql).await;
    assert_eq!(first_value(&client, &pid_sql).await, first, "young: reused");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let later = first_value(&client, &pid_sql).await;
    assert_ne!(later, first, "past server_lifetime_ms: a new connection");
    eventually("the old backend is gone", async || {
        backend_state(&first).await.is_none()
    })
    .await;
}

#[tokio::test]
async fn query_wait_timeout_bounds_the_wait_for_a_busy_pool() {
    // The old bound, connect_timeout_ms, is long here: only query_wait_timeout_ms can
    // end the wait.
    let proxy = start_proxy(
        "pool_size = 1",
        "connect_timeout_ms = 60000\nquery_wait_timeout_ms = 300",
    )
    .await;
    let holder = app_client(&proxy).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .batch_execute(&format!("{ON_PRIMARY}SELECT 1"))
        .await
        .unwrap();
    let waiter = app_client(&proxy).await;
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        waiter.batch_execute(&format!("{ON_PRIMARY}SELECT 1")),
    )
    .await
    .expect("the wait is bounded")
    .expect_err("no connection within query_wait_timeout_ms");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .unwrap_or("")
            .contains("query_wait_timeout_ms"),
        "{err:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    waiter
        .batch_execute(&format!("{ON_PRIMARY}SELECT 1"))
        .await
        .unwrap();
}

/// A client that stops reading while a large result streams: after
/// client_write_timeout_ms it is disconnected, its query cancelled, and its server
/// connection comes back to the pool; other clients never notice.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection_not_the_pool() {
    let proxy = start_proxy(
        "pool_size = 2",
        "client_write_timeout_ms = 500\nquery_wait_timeout_ms = 60000",
    )
    .await;
    let other = app_client(&proxy).await;
    let pid_sql = format!("{ON_PRIMARY}SELECT pg_backend_pid()");
    // 500 MB of rows, of which the client reads none.
    let mut slow = raw_client(&proxy).await;
    slow.write_all(&query(&format!(
        "{ON_PRIMARY}SELECT pg_backend_pid(), repeat('x', 1000000) FROM generate_series(1, 500)"
    )))
    .await
    .unwrap();
    let primary = primary_client().await;
    let big_query = "SELECT coalesce(max(pid), 0)::text FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 500)%' AND state = 'active' AND pid <> pg_backend_pid()";
    let mut slow_pid = String::from("0");
    eventually("the big query runs", async || {
        slow_pid = first_value(&primary, big_query).await;
        slow_pid != "0"
    })
    .await;
    // Meanwhile the other client is served (by the pool's second connection).
    for _ in 0..20 {
        let pid = first_value(&other, &pid_sql).await;
        assert_ne!(pid, slow_pid);
    }
    // The slow client's server connection was not closed but cancelled, rolled back
    // and returned (the client is not read from until then: reading would let the
    // result flow again).
    eventually(
        "the slow client's server connection is idle again",
        async || backend_state(&slow_pid).await.as_deref() == Some("idle"),
    )
    .await;
    assert_eq!(first_value(&primary, big_query).await, "0", "cancelled");
    // The slow client was cut off: its socket closes (what reached it before, it may
    // still read).
    errors_until_closed(&mut slow, Duration::from_secs(30)).await;
    let pids: Vec<String> = {
        let mut seen = Vec::new();
        let a = app_client(&proxy).await;
        let b = app_client(&proxy).await;
        a.batch_execute("BEGIN").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        seen.push(first_value(&a, &pid_sql).await);
        seen.push(first_value(&b, &pid_sql).await);
        seen
    };
    assert!(
        pids.contains(&slow_pid),
        "the pool still has the connection the slow client used: {pids:?} vs {slow_pid}"
    );
}

/// One TCP socket of this process, from /proc/net/tcp.
#[derive(Debug)]
struct Socket {
    local_port: u16,
    remote_port: u16,
    /// The keepalive timer is running (tr = 2), and when it fires, in 1/100 s.
    keepalive_in: Option<u64>,
}

/// The established IPv4 TCP sockets this test process holds (the proxy runs in it).
fn own_sockets() -> Vec<Socket> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().to_string();
            t.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
            if f.len() < 10 || f[3] != "01" || !inodes.contains(f[9]) {
                return None;
            }
            let (tr, when) = f[5].split_once(':')?;
            Some(Socket {
                local_port: port(f[1])?,
                remote_port: port(f[2])?,
                keepalive_in: (tr == "02").then(|| u64::from_str_radix(when, 16).unwrap_or(0)),
            })
        })
        .collect()
}

#[tokio::test]
async fn tcp_keepalive_is_on_for_client_and_server_sockets() {
    let proxy = start_proxy(
        "",
        "tcp_keepalive_idle_ms = 3000\ntcp_keepalive_interval_ms = 1000\ntcp_keepalive_count = 3",
    )
    .await;
    let client = app_client(&proxy).await;
    client
        .batch_execute(&format!("{ON_PRIMARY}SELECT 1"))
        .await
        .unwrap();
    let port = proxy.addr.port();
    // Polled: right after traffic a socket may still show its retransmission timer.
    eventually("keepalive set with the configured timing", async || {
        let sockets = own_sockets();
        let accepted: Vec<&Socket> = sockets.iter().filter(|s| s.local_port == port).collect();
        // The configured 3 s, not the kernel's 2 h; on the server side, the control
        // plane's own connections keep tokio-postgres's 2 h, so the data path's is
        // the one with 3 s.
        !accepted.is_empty()
            && accepted
                .iter()
                .all(|s| s.keepalive_in.is_some_and(|due| due <= 300))
            && sockets.iter().any(|s| {
                s.remote_port == primary_port() && s.keepalive_in.is_some_and(|due| due <= 300)
            })
    })
    .await;

    let proxy = start_proxy("", "tcp_keepalive = false").await;
    let client = app_client(&proxy).await;
    client.batch_execute("SELECT 1").await.unwrap();
    let port = proxy.addr.port();
    let sockets = own_sockets();
    let accepted: Vec<&Socket> = sockets.iter().filter(|s| s.local_port == port).collect();
    assert!(!accepted.is_empty());
    for s in accepted {
        assert!(s.keepalive_in.is_none(), "switched off: {s:?}");
    }
}

/// Reads messages off `stream` without keeping them, up to ReadyForQuery; returns each
/// message's tag and length, and the SQLSTATE of any error.
async fn skim_until_ready(stream: &mut TcpStream) -> (Vec<(u8, usize)>, Vec<String>) {
    let mut messages = Vec::new();
    let mut errors = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut header = Vec::with_capacity(5);
    let mut skip = 0usize;
    let mut error_body: Option<Vec<u8>> = None;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(120), stream.read(&mut buf))
            .await
            .expect("the answer keeps coming")
            .unwrap();
        assert!(n > 0, "connection closed");
        let mut at = 0;
        while at < n {
            if skip > 0 {
                let take = skip.min(n - at);
                if let Some(body) = error_body.as_mut() {
                    body.extend_from_slice(&buf[at..at + take]);
                }
                skip -= take;
                at += take;
                if skip == 0
                    && let Some(body) = error_body.take()
                {
                    let mut frame = vec![b'E', 0, 0, 0, 0];
                    frame.extend_from_slice(&body);
                    errors.extend(error_code(&frame));
                }
                continue;
            }
            header.push(buf[at]);
            at += 1;
            if header.len() == 5 {
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
                messages.push((header[0], len));
                skip = len - 4;
                error_body = (header[0] == b'E').then(Vec::new);
                let ready = header[0] == b'Z';
                header.clear();
                if ready && skip == 1 {
                    // Its status byte is the last byte of the answer.
                    return (messages, errors);
                }
            }
        }
    }
}

/// A 512 MB row out of the server and a 256 MB COPY line into it pass through the
/// proxy in pieces: its peak memory grows by a few MB, not by the row's size.
#[tokio::test]
async fn huge_rows_pass_through_in_pieces() {
    create_table("huge_in", "t text").await;
    let dir = common::process::proxy_dir("limits", "huge-rows");
    let proxy =
        common::process::ProxyProcess::start("huge", &dir, &config_text(cluster(), "", ""), &[]);
    let connect = async || login_raw(connect_when_up(proxy.port).await).await;
    let mut client = connect().await;
    client.write_all(&query("SELECT 1")).await.unwrap();
    skim_until_ready(&mut client).await;
    let before_kb = proxy.memory_kb("VmRSS");

    const ROW: usize = 512 << 20;
    client
        .write_all(&query(&format!("SELECT repeat('x', {ROW})")))
        .await
        .unwrap();
    let (messages, errors) = skim_until_ready(&mut client).await;
    assert!(errors.is_empty(), "{errors:?}");
    let row = messages
        .iter()
        .find(|(tag, _)| *tag == b'D')
        .expect("a row");
    // Length, column count, column length, the value.
    assert_eq!(row.1, 4 + 2 + 4 + ROW);

    const LINE: usize = 256 << 20;
    client
        .write_all(&query("COPY huge_in FROM STDIN"))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    loop {
        let frame = next_message(&mut client, &mut buf).await;
        assert_ne!(frame[0], b'E', "{frame:?}");
        if frame[0] == b'G' {
            break;
        }
    }
    let mut head = vec![b'd'];
    head.extend_from_slice(&(4 + LINE as u32 + 1).to_be_bytes());
    client.write_all(&head).await.unwrap();
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..LINE >> 20 {
        client.write_all(&chunk).await.unwrap();
    }
    client.write_all(b"\n").await.unwrap();
    client.write_all(&[b'c', 0, 0, 0, 4]).await.unwrap();
    let (_, errors) = skim_until_ready(&mut client).await;
    assert!(errors.is_empty(), "{errors:?}");
    let primary = primary_client().await;
    assert_eq!(
        first_value(&primary, "SELECT length(t) FROM huge_in").await,
        LINE.to_string()
    );

    let peak_kb = proxy.memory_kb("VmHWM");
    let grown_mb = peak_kb.saturating_sub(before_kb) / 1024;
    assert!(
        grown_mb <= 16,
        "peak memory grew by {grown_mb} MB (from {before_kb} kB to {peak_kb} kB)"
    );
}

/// Statements past the size threshold are routed by a lexical scan, not parsed: they go
/// to the primary, a session change inside one pins the client (so the change is kept),
/// and other clients are served meanwhile.
#[tokio::test]
async fn large_statements_are_routed_without_a_parse() {
    let proxy = start_proxy("", "").await;
    let client = app_client(&proxy).await;
    let big_literal = "x".repeat(1 << 20);
    let row = client
        .query_one(
            &format!("SELECT inet_server_port(), pg_is_in_recovery(), length('{big_literal}')"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as u16, primary_port());
    assert!(!row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i32>(2), 1 << 20);
    // A SET inside a large text: the client keeps its server, and with it the setting.
    client
        .batch_execute(&format!(
            "SET application_name = 'large'; SELECT length('{big_literal}')"
        ))
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(first_value(&client, "SHOW application_name").await, "large");
    }
    let (_, metrics) = admin_http(&proxy.admin_addr.unwrap().to_string())
        .get("/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("replicator_large_statements_total 2"),
        "{metrics}"
    );
}

/// A shutdown: a pinned client idle between transactions gets 57P01 at once; a client
/// that keeps a transaction open gets until shutdown_timeout_ms, then 57P01 too, and
/// its transaction is rolled back; the proxy's stop then returns.
#[tokio::test]
async fn shutdown_closes_pinned_clients_at_once_and_transactions_at_the_deadline() {
    create_table("shutdown_t", "id int").await;
    let proxy = start_proxy("", "").await;
    let mut pinned = raw_client(&proxy).await;
    let mut buf = BytesMut::new();
    pinned.write_all(&query("LISTEN somewhere")).await.unwrap();
    while next_message(&mut pinned, &mut buf).await[0] != b'Z' {}
    let mut in_transaction = raw_client(&proxy).await;
    in_transaction
        .write_all(&query("BEGIN; INSERT INTO shutdown_t VALUES (1)"))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    while next_message(&mut in_transaction, &mut buf).await[0] != b'Z' {}

    // A reload's notice reaches the sessions first: the stop is their second notice,
    // which must wake them as well.
    proxy.shared.clients.notify_reconfigured();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grace = Duration::from_secs(8);
    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop(grace));
    let codes = errors_until_closed(&mut pinned, Duration::from_secs(4)).await;
    assert_eq!(codes, ["57P01"], "the pinned client is closed at once");
    let codes = errors_until_closed(&mut in_transaction, Duration::from_secs(30)).await;
    assert_eq!(codes, ["57P01"]);
    assert!(
        started.elapsed() >= grace,
        "the transaction had its grace period"
    );
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("stop returns")
        .unwrap();
    let primary = primary_client().await;
    eventually("the open transaction is rolled back", async || {
        first_value(&primary, "SELECT count(*) FROM shutdown_t").await == "0"
    })
    .await;
}

/// An idle client keeps no buffers: each one that has logged in and run a query costs
/// the proxy its task and its socket, a few kB, not the 16 kB read buffer and the output
/// buffers of its last query.
#[tokio::test]
async fn idle_clients_keep_no_buffers() {
    let dir = common::process::proxy_dir("limits", "idle-memory");
    let proxy = common::process::ProxyProcess::start(
        "idle",
        &dir,
        &config_text(cluster(), "", "max_client_conn = 2000"),
        &[],
    );
    let connect = async || login_raw(connect_when_up(proxy.port).await).await;
    let mut first = connect().await;
    first.write_all(&query("SELECT 1")).await.unwrap();
    skim_until_ready(&mut first).await;
    let before_kb = proxy.memory_kb("VmRSS");

    const CLIENTS: usize = 500;
    let mut idle = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut client = connect().await;
        // A result of some size, so that the session had buffers to give back.
        client
            .write_all(&query(
                "SELECT repeat('x', 4000) FROM generate_series(1, 4)",
            ))
            .await
            .unwrap();
        let (_, errors) = skim_until_ready(&mut client).await;
        assert!(errors.is_empty(), "{errors:?}");
        idle.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kb = proxy.memory_kb("VmRSS");
    let per_client = after_kb.saturating_sub(before_kb) as f64 / CLIENTS as f64;
    // The test's proxy is the debug build, whose futures are larger than the release
    // build's (about 2 kB a client there); a kept read buffer alone would be 16 kB.
    assert!(
        per_client <= 6.0,
        "{CLIENTS} idle clients cost {per_client:.1} kB each ({before_kb} kB before, {after_kb} kB after)"
    );
    // They are still served.
    for client in idle.iter_mut().step_by(50) {
        client.write_all(&query("SELECT 1")).await.unwrap();
        let (_, errors) = skim_until_ready(client).await;
        assert!(errors.is_empty(), "{errors:?}");
    }
}
