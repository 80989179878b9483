//! A replication connection (`replication=database`) to the source primary: slot
//! creation with an exported snapshot, and the logical stream itself.
//!
//! Why our own walsender client rather than the SQL functions or a crate: a snapshot
//! that is consistent with the stream needs `CREATE_REPLICATION_SLOT ... (SNAPSHOT
//! 'export')` and the connection kept idle while another session copies the tables,
//! which only the replication protocol offers. The streaming protocol also decodes
//! each change once, where `pg_logical_slot_peek_binary_changes` decodes again from the
//! slot's restart position on every call; and it lets us confirm a position exactly
//! when the target has acknowledged it (`flush` in the standby status update), never
//! before. The proxy already speaks the wire protocol and authenticates to servers
//! (SCRAM, md5), so this is a thin layer over `ServerConn`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

use crate::pool::server::{BackendError, LoginInfo, ServerConn};
use crate::protocol::ProtocolError;
use crate::protocol::backend::{self, Backend};
use crate::protocol::messages as msg;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub fn pg_now() -> i64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_OFFSET_US
}

/// PostgreSQL timestamp (µs since 2000) to milliseconds since the Unix epoch.
pub fn pg_time_to_unix_ms(pg: i64) -> i64 {
    (pg + PG_EPOCH_OFFSET_US) / 1000
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{0}")]
    Connect(#[from] BackendError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Server(String),
    #[error("unexpected reply from the source: {0}")]
    Unexpected(String),
}

/// A created slot: where the stream will start and the snapshot that matches it.
pub struct CreatedSlot {
    pub consistent_point: u64,
    pub snapshot_name: String,
}

/// One frame of the stream.
pub enum StreamEvent {
    /// A pgoutput message starting at `wal_start`.
    Data { wal_start: u64, payload: BytesMut },
    /// The server's position; it asks for a status update when `reply` is set.
    Keepalive { wal_end: u64, reply: bool },
    /// The server ended the stream.
    End,
}

pub struct WalSender {
    conn: ServerConn,
    streaming: bool,
}

/// Rows of a simple replication command, as text.
type Rows = Vec<Vec<Option<String>>>;

impl WalSender {
    pub async fn connect(
        mut login: LoginInfo,
        application_name: &str,
        timeout: Duration,
    ) -> Result<WalSender, WalError> {
        login.extra_params = vec![
            ("replication".into(), "database".into()),
            ("application_name".into(), application_name.into()),
            // pgoutput prints values with the walsender's settings: make them
            // unambiguous for the type conversions.
            (
                "options".into(),
                "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex"
                    .into(),
            ),
        ];
        // A replication stream idles between changes: keepalive notices a vanished
        // server on it too.
        let keepalive = crate::keepalive::Keepalive::default();
        let conn = ServerConn::connect(&login, timeout, &keepalive).await?;
        Ok(WalSender {
            conn,
            streaming: false,
        })
    }

    /// Runs one replication command and returns its rows.
    async fn command(&mut self, sql: &str) -> Result<Rows, WalError> {
        let mut out = BytesMut::new();
        msg::query(&mut out, sql);
        self.conn.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.conn.reader.read_frame().await?;
            match Backend::decode(&frame) {
                Backend::DataRow(row) => rows.push(data_row(row)?),
                Backend::Error(report) => error = Some(report.to_string()),
                Backend::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(WalError::Server(e)),
            None => Ok(rows),
        }
    }

    /// The server's current timeline (it grows with every promotion).
    pub async fn timeline(&mut self) -> Result<u32, WalError> {
        let rows = self.command("IDENTIFY_SYSTEM").await?;
        rows.first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| WalError::Unexpected("IDENTIFY_SYSTEM gave no timeline".into()))
    }

    /// Creates a logical slot using pgoutput and exports its snapshot. The snapshot
    /// stays importable only while this connection stays open and idle.
    pub async fn create_slot(&mut self, slot: &str) -> Result<CreatedSlot, WalError> {
        let rows = self
            .command(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(slot)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            WalError::Unexpected("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = crate::cluster::health::parse_lsn(&field(1))
            .ok_or_else(|| WalError::Unexpected(format!("bad consistent point {:?}", field(1))))?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name: field(2),
        })
    }

    pub async fn drop_slot(&mut self, slot: &str) -> Result<(), WalError> {
        self.command(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(slot)))
            .await
            .map(|_| ())
    }

    /// Starts streaming from the slot's confirmed position.
    pub async fn start(&mut self, slot: &str, publication: &str) -> Result<(), WalError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        let mut out = BytesMut::new();
        msg::query(&mut out, &sql);
        self.conn.send(&out).await?;
        loop {
            let frame = self.conn.reader.read_frame().await?;
            match Backend::decode(&frame) {
                Backend::Other(msg::COPY_BOTH_RESPONSE) => {
                    self.streaming = true;
                    return Ok(());
                }
                Backend::Error(report) => return Err(WalError::Server(report.to_string())),
                Backend::Notice(_) => {}
                _ => {
                    let other = frame[0];
                    return Err(WalError::Unexpected(format!(
                        "'{}' instead of CopyBothResponse",
                        crate::protocol::framing::printable_tag(other)
                    )));
                }
            }
        }
    }

    /// The next frame of the stream. Cancel-safe: a frame is consumed only when returned.
    pub async fn next(&mut self) -> Result<StreamEvent, WalError> {
        loop {
            let mut frame = self.conn.reader.read_frame().await?;
            if let Backend::Error(report) = Backend::decode(&frame) {
                self.streaming = false;
                return Err(WalError::Server(report.to_string()));
            }
            match frame[0] {
                msg::COPY_DATA => {
                    let body = frame.split_off(5);
                    return parse_copy_data(body);
                }
                msg::COPY_DONE | msg::COMMAND_COMPLETE | msg::READY_FOR_QUERY => {
                    self.streaming = false;
                    return Ok(StreamEvent::End);
                }
                _ => {} // notices, parameter changes
            }
        }
    }

    /// More of the stream has already arrived and waits to be read.
    pub fn has_buffered(&self) -> bool {
        self.conn.reader.buffered() > 0
    }

    /// Whether more of the stream arrives within `wait` (it is then buffered, and the
    /// next `next()` returns it). A closed stream answers false; `next()` reports it.
    pub async fn more_within(&mut self, wait: Duration) -> bool {
        if self.has_buffered() {
            return true;
        }
        matches!(
            tokio::time::timeout(wait, self.conn.reader.fill()).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// Standby status update: everything up to `flush` is safely in the target, so
    /// the slot may move there.
    pub async fn confirm(&mut self, flush: u64, want_reply: bool) -> Result<(), WalError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(flush);
        body.put_u64(flush);
        body.put_u64(flush);
        body.put_i64(pg_now());
        body.put_u8(want_reply as u8);
        let mut out = BytesMut::with_capacity(40);
        out.put_u8(msg::COPY_DATA);
        out.put_u32(4 + body.len() as u32);
        out.put_slice(&body);
        self.conn.send(&out).await?;
        Ok(())
    }

    /// Ends the stream cleanly: the server processes every status update sent before
    /// our CopyDone, so the last confirmation is in the slot when this returns.
    pub async fn finish(mut self) -> Result<(), WalError> {
        if self.streaming {
            let mut out = BytesMut::new();
            msg::empty_message(&mut out, msg::COPY_DONE);
            self.conn.send(&out).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let frame = tokio::time::timeout_at(deadline, self.conn.reader.read_frame())
                    .await
                    .map_err(|_| WalError::Unexpected("no answer to CopyDone".into()))??;
                if frame[0] == msg::READY_FOR_QUERY {
                    break;
                }
            }
        }
        let mut out = BytesMut::new();
        msg::empty_message(&mut out, msg::TERMINATE);
        let _ = self.conn.send(&out).await;
        Ok(())
    }
}

fn parse_copy_data(body: BytesMut) -> Result<StreamEvent, WalError> {
    let short = || WalError::Unexpected("short replication message".into());
    let kind = *body.first().ok_or_else(short)?;
    let u64_at = |at: usize| -> Result<u64, WalError> {
        let bytes = body.get(at..at + 8).ok_or_else(short)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(a))
    };
    match kind {
        b'w' => {
            let wal_start = u64_at(1)?;
            if body.len() < 25 {
                return Err(short());
            }
            let mut body = body;
            let payload = body.split_off(25);
            Ok(StreamEvent::Data { wal_start, payload })
        }
        b'k' => {
            let wal_end = u64_at(1)?;
            let reply = body.get(17).copied().ok_or_else(short)? == 1;
            Ok(StreamEvent::Keepalive { wal_end, reply })
        }
        other => Err(WalError::Unexpected(format!(
            "replication message kind {other}"
        ))),
    }
}

fn data_row(row: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let columns = backend::columns(row)
        .ok_or_else(|| ProtocolError::Violation("malformed DataRow".into()))?;
    Ok(columns
        .into_iter()
        .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
        .collect())
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
