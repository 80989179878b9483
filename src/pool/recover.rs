//! Giving back a server connection whose client left in the middle of something: a
//! query still running, a COPY, an open transaction. Closing it would be safe, but
//! costs a new login and, under a flood of slow or vanishing clients, empties the pool
//! faster than it refills. Instead the running query is cancelled, any COPY failed,
//! the transaction rolled back, and everything the server still sends is read and
//! dropped until the answer to a query with a random token shows the connection is
//! idle and in step again; only then does it go back to the pool, marked to be reset
//! (DISCARD ALL) before its next client. Anything unexpected, or no end within
//! `RECOVER_TIMEOUT`, closes it instead.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Pooled, ServerConn};
use crate::config::NodeAddress;
use crate::protocol::backend::{Backend, first_column};
use crate::protocol::messages as msg;
use crate::protocol::{Piece, STREAM_FRAME_OVER};
use crate::tls::stream::Sent;

const RECOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a cancel request may take, connection included.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks `addr` to cancel what backend `pid` is running, and returns once the server
/// has acted on it. Sent over a fresh plain connection, as libpq does: a server checks
/// no pg_hba rule for a cancel request. The server signals the backend and then closes
/// that connection; waiting for the close matters, because a signal still on its way
/// when the backend finishes its query on its own lands on whatever it runs next,
/// which in a pool may be another client's query.
pub async fn send_cancel(addr: &NodeAddress, pid: i32, secret: i32) -> std::io::Result<()> {
    let exchange = async {
        let mut buf = BytesMut::new();
        msg::cancel_request(&mut buf, pid, secret);
        let mut stream = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
        stream.write_all(&buf).await?;
        let mut rest = [0u8; 64];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut rest).await? > 0 {}
        Ok(())
    };
    match tokio::time::timeout(CANCEL_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the server did not finish the cancel request in time",
        )),
    }
}

/// What the client left unfinished on its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leftover {
    /// Requests were sent that the server has not answered to the end.
    pub in_flight: bool,
}

/// Recovers `conn` in the background (see the module comment). `unsent` holds whole
/// messages not yet written to it, the first perhaps partly written: they go first,
/// so that the server's stream stays in step.
pub fn recover(mut conn: Pooled, unsent: BytesMut, leftover: Leftover) {
    tokio::spawn(async move {
        let node = conn.addr.to_string();
        match tokio::time::timeout(RECOVER_TIMEOUT, bring_back(&mut conn, unsent, leftover)).await {
            Ok(Ok(())) => {
                conn.needs_reset = true;
                conn.unnamed = None;
                tracing::debug!(%node, "server connection recovered and returned to the pool");
            }
            Ok(Err(reason)) => {
                conn.broken = true;
                tracing::info!(%node, "closing a server connection its client left busy: {reason}");
            }
            Err(_) => {
                conn.broken = true;
                tracing::info!(%node, "closing a server connection its client left busy: it did not become idle in time");
            }
        }
    });
}

async fn bring_back(
    conn: &mut ServerConn,
    unsent: BytesMut,
    leftover: Leftover,
) -> Result<(), String> {
    if leftover.in_flight
        && let Err(e) = send_cancel(&conn.addr, conn.pid, conn.secret).await
    {
        return Err(format!("cannot send it a cancel request: {e}"));
    }
    let token = format!("replicator-recover-{:016x}", rand::random::<u64>());
    let mut out = unsent;
    // Ends a COPY FROM STDIN (ignored outside one), ends an extended-protocol batch or
    // the skip after its error, rolls back (a warning outside a transaction), then the
    // token: its row followed by ReadyForQuery(Idle) is the end of everything before.
    msg::copy_fail(&mut out, "the client connection ended");
    msg::empty_message(&mut out, msg::SYNC);
    msg::query(&mut out, "ROLLBACK");
    msg::query(&mut out, &format!("SELECT '{token}'"));
    let mut token_seen = false;
    loop {
        let flush = conn.writer.has_unflushed();
        tokio::select! {
            sent = conn.writer.send(&out), if !out.is_empty() || flush => match sent {
                Ok(Sent::Wrote(0)) => return Err("the server takes no more data".into()),
                Ok(Sent::Wrote(n)) => out.advance(n),
                Ok(Sent::Flushed) => {}
                Err(e) => return Err(format!("write failed: {e}")),
            },
            read = conn.reader.fill() => match read {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            },
        }
        // Rows of any size pass in pieces and are dropped (the token's row is small).
        while let Some(piece) = conn
            .reader
            .next_piece(STREAM_FRAME_OVER, |_| true)
            .map_err(|e| e.to_string())?
        {
            let Piece::Frame(frame) = piece else {
                continue;
            };
            match Backend::decode(&frame) {
                Backend::DataRow(row) if first_column(row) == Some(token.as_bytes()) => {
                    token_seen = true
                }
                Backend::ReadyForQuery(status) if token_seen => {
                    return if status.is_idle() && out.is_empty() && conn.reader.buffered() == 0 {
                        Ok(())
                    } else {
                        Err("it was not idle after the rollback".into())
                    };
                }
                Backend::Error(report) if report.is_fatal() => {
                    return Err(format!("the server ended the session: {report}"));
                }
                Backend::ParameterStatus { name, value } => conn.set_parameter(name, value),
                _ => {}
            }
        }
    }
}
