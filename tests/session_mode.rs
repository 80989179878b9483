//! Session pooling, as a driver sees it: indistinguishable from a direct connection.
//! The process id in BackendKeyData is the server's, so pg_backend_pid(),
//! pg_stat_activity, pg_terminate_backend() and NOTIFY's sender agree with it; cancel
//! requests still go through the proxy; statement names are the client's own; and when
//! the server ends the session, the client gets the server's error and a closed
//! connection instead of a quiet move to another server.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::wire::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SESSION: &str = "pool_mode = \"session\"";

/// Sends a simple query and returns the first column of each data row, the error's
/// SQLSTATE if any, and the other messages' types in order (notifications as `A<pid>`).
async fn simple(stream: &mut TcpStream, sql: &str) -> (Vec<String>, Option<String>, Vec<String>) {
    stream.write_all(&query(sql)).await.unwrap();
    let mut buf = BytesMut::new();
    let (mut rows, mut error, mut other) = (Vec::new(), None, Vec::new());
    loop {
        let frame = next_message(stream, &mut buf).await;
        match frame[0] {
            b'D' => {
                let len = i32::from_be_bytes([frame[7], frame[8], frame[9], frame[10]]);
                rows.push(String::from_utf8_lossy(&frame[11..11 + len as usize]).into_owned());
            }
            b'E' => error = error_code(&frame),
            b'A' => other.push(format!(
                "A{}",
                i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]])
            )),
            b'Z' => return (rows, error, other),
            tag => other.push((tag as char).to_string()),
        }
    }
}

/// Waits (up to 5 s) until server process `pid` runs a statement.
async fn wait_until_running(admin: &tokio_postgres::Client, pid: i32) {
    for _ in 0..200 {
        let running = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if running == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn one_value(stream: &mut TcpStream, sql: &str) -> String {
    let (rows, error, _) = simple(stream, sql).await;
    assert_eq!(error, None, "{sql}");
    rows.into_iter().next().unwrap_or_default()
}

#[tokio::test]
async fn the_client_knows_its_server_by_its_real_process_id() {
    let proxy = start_proxy("", SESSION).await;
    let (mut client, (pid, _secret)) =
        login_raw_with_key(TcpStream::connect(proxy.addr).await.unwrap()).await;
    assert_eq!(
        one_value(&mut client, "SELECT pg_backend_pid()").await,
        pid.to_string()
    );
    // Another session finds it in pg_stat_activity by that process id.
    let admin = primary_client().await;
    let row = admin
        .query_one(
            "SELECT usename::text, datname::text FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("app".to_string(), "app".to_string())
    );
    // A notification it sends itself names that process.
    let (_, error, _) = simple(&mut client, "LISTEN session_mode_jobs").await;
    assert_eq!(error, None);
    let (_, error, other) = simple(&mut client, "NOTIFY session_mode_jobs, 'x'").await;
    assert_eq!(error, None);
    assert!(other.contains(&format!("A{pid}")), "{other:?}");
    // Statement names are the client's own, as on the server.
    let mut request = Vec::new();
    let mut body = Vec::new();
    cstr(&mut body, "my_statement");
    cstr(&mut body, "SELECT 1");
    body.extend_from_slice(&0i16.to_be_bytes());
    request.extend(message(b'P', &body));
    request.extend(message(b'S', &[]));
    client.write_all(&request).await.unwrap();
    let mut buf = BytesMut::new();
    while next_message(&mut client, &mut buf).await[0] != b'Z' {}
    assert_eq!(
        one_value(
            &mut client,
            "SELECT string_agg(name, ',') FROM pg_prepared_statements"
        )
        .await,
        "my_statement"
    );
}

#[tokio::test]
async fn a_cancel_with_the_real_process_id_reaches_the_statement_through_the_proxy() {
    let proxy = start_proxy("", SESSION).await;
    let (mut client, (pid, secret)) =
        login_raw_with_key(TcpStream::connect(proxy.addr).await.unwrap()).await;
    client
        .write_all(&query("SELECT pg_sleep(30)"))
        .await
        .unwrap();
    // Wait until it runs, then cancel through the proxy with the key the client got.
    let admin = primary_client().await;
    wait_until_running(&admin, pid).await;
    let mut cancel = TcpStream::connect(proxy.addr).await.unwrap();
    cancel.write_all(&cancel_packet(pid, secret)).await.unwrap();
    let mut buf = BytesMut::new();
    let code = error_until_ready(&mut client, &mut buf).await;
    assert_eq!(code.as_deref(), Some("57014"));
    // The session goes on, on the same server.
    assert_eq!(
        one_value(&mut client, "SELECT pg_backend_pid()").await,
        pid.to_string()
    );
}

/// Reads until the proxy closes the connection; returns the SQLSTATEs of the errors.
async fn errors_until_closed(stream: &mut TcpStream) -> Vec<String> {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all))
        .await
        .expect("the connection stays open")
        .unwrap();
    let mut codes = Vec::new();
    let mut at = 0;
    while at + 5 <= all.len() {
        let len = u32::from_be_bytes([all[at + 1], all[at + 2], all[at + 3], all[at + 4]]);
        let end = at + 1 + len as usize;
        if all[at] == b'E' {
            codes.push(error_code(&all[at..end]).unwrap_or_default());
        }
        at = end;
    }
    codes
}

#[tokio::test]
async fn a_terminated_server_closes_its_session_mode_client_with_the_servers_error() {
    let proxy = start_proxy("", SESSION).await;
    let admin = primary_client().await;
    // Idle: the server's FATAL reaches the client, then the connection closes.
    let (mut idle, (pid, _)) =
        login_raw_with_key(TcpStream::connect(proxy.addr).await.unwrap()).await;
    let terminated: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    assert_eq!(errors_until_closed(&mut idle).await, vec!["57P01"]);
    // Busy: the statement's client gets the same, not an answer from another server.
    let (mut busy, (pid, _)) =
        login_raw_with_key(TcpStream::connect(proxy.addr).await.unwrap()).await;
    busy.write_all(&query("SELECT pg_sleep(30)")).await.unwrap();
    wait_until_running(&admin, pid).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert_eq!(errors_until_closed(&mut busy).await, vec!["57P01"]);
    // A new client is served by a live server.
    let (mut next, (pid, _)) =
        login_raw_with_key(TcpStream::connect(proxy.addr).await.unwrap()).await;
    assert_eq!(
        one_value(&mut next, "SELECT pg_backend_pid()").await,
        pid.to_string()
    );
}
