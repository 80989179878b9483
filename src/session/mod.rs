//! One client connection: its state machine over the wire protocol.
//!
//! The client's messages are grouped into units (up to a Sync, a simple Query, a
//! FunctionCall or a Flush). Each unit is routed once, sent to a server connection
//! checked out from the chosen node's pool, and the server's answers are forwarded as
//! they come. In transaction pooling the connection goes back to the pool when the
//! server reports ReadyForQuery(Idle) and nothing else is in flight. One loop
//! serves both directions, so COPY, pipelining and notifications need no special threads.
//!
//! `admit.rs` takes a client from its first byte to a session (or the console, or a
//! refusal). This file holds the session loop, the client's framing and the dispatch of
//! units;
//! `backend.rs` chooses and holds a server, `requests.rs` rewrites the client's messages
//! for it, and `responses.rs` handles what the server answers.

mod admit;
pub mod auth_query;
mod backend;
pub mod cancel;
pub mod clients;
mod expect;
pub mod limits;
mod passthrough;
mod pending;
mod requests;
mod responses;
pub mod startup;
pub mod statements;
mod timeouts;
pub(crate) mod transaction;

pub use admit::{Admission, Admitted, admit, serve};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

use crate::tls::stream::{ClientRead, ClientWrite, Sent};
use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::cluster::{Node, NodeRole, Project, health};
use crate::config::PoolMode;
use crate::pool::{BackendError, Pooled};
use crate::protocol::messages::{self as msg, Fields, TxStatus};
use crate::protocol::settings::{self, Settings};
use crate::protocol::{MessageReader, Piece, ProtocolError, STREAM_FRAME_OVER, spare};
use crate::router::{Decision, Route, SessionEffect, TxEffect};
use crate::state::Shared;
use crate::users::UserEntry;
use cancel::CancelSlot;
use clients::{ClientInfo, ClientState};
use expect::{Expect, ExpectQueue};
use pending::Pending;
use startup::Login;
use statements::PreparedStatement;
use timeouts::{Expired, Phase, SessionClock, Timeouts};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a closing session may take to hand its client the last messages.
const FINAL_WRITE: Duration = Duration::from_secs(5);
/// Client messages read ahead of the server before the proxy stops reading (backpressure).
const MAX_PENDING: usize = 4096;
/// Bytes of client messages read ahead of the server before the proxy stops reading.
const MAX_PENDING_BYTES: usize = 1024 * 1024;
/// A batch without Sync is sent on once it grows this long (JDBC batches, COPY-less
/// bulk), in messages or in bytes.
const PARTIAL_UNIT: usize = 512;
const PARTIAL_UNIT_BYTES: usize = 256 * 1024;
/// Bytes waiting for a slow server beyond which the client is not read, and bytes
/// waiting for a slow client beyond which the server is not read: the session keeps
/// reading each side while it writes to the other, with bounded buffers, so that a
/// client that pipelines and a server that streams results never wait on each other.
const SERVER_OUT_LIMIT: usize = 256 * 1024;
const CLIENT_OUT_LIMIT: usize = 256 * 1024;
/// Proxy-named statements one server connection may accumulate before it is cleared.
const MAX_PREPARED_PER_SERVER: usize = 2000;
/// How often one read is sent again elsewhere after its server failed before answering.
const MAX_READ_REPLAYS: u8 = 2;
/// Where the WAL ends right after a client's write committed: an upper bound of that
/// commit's position, which is what read-your-writes needs.
const COMMIT_LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()";
/// How often a write waiting for a primary (write_wait_ms) looks again.
const WRITE_WAIT_POLL: Duration = Duration::from_millis(50);
/// How often a read waiting for a replica to catch up (causal_wait_ms) asks it again.
const CAUSAL_POLL: Duration = Duration::from_millis(1);

/// Why a session ended.
enum End {
    ClientGone,
    ClientIo(std::io::Error),
    /// The server of a session-mode client closed the connection (after its own FATAL
    /// error, if it sent one): the client's connection closes too, as it would directly.
    ServerGone(String),
    Fatal {
        code: String,
        message: String,
    },
    /// The client took nothing of what was sent to it for client_write_timeout_ms.
    WriteTimeout(Duration),
}

impl End {
    fn fatal(code: &str, message: impl Into<String>) -> End {
        End::Fatal {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Closed => End::ClientGone,
            ProtocolError::Io(e) => End::ClientIo(e),
            ProtocolError::Violation(m) => End::fatal("08P01", m),
        }
    }
}

thread_local! {
    /// Vectors lent to sessions (see `protocol::spare`): for the frames of a unit and
    /// for the statements its Parse messages name.
    static SPARE_UNITS: spare::SpareVecs<BytesMut> = const { std::cell::RefCell::new(Vec::new()) };
    static SPARE_PARSED: spare::SpareVecs<Arc<PreparedStatement>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Drops the `n` bytes of `buf` a socket took. A buffer written whole is cleared, not
/// advanced, so that the next message is written at its front again.
fn consume(buf: &mut BytesMut, n: usize) {
    if n >= buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

fn is_copy_frame(frame: &[u8]) -> bool {
    matches!(frame[0], msg::COPY_DATA | msg::COPY_DONE | msg::COPY_FAIL)
}

fn invalid_message(tag: u8) -> End {
    End::fatal(
        "08P01",
        format!(
            "invalid frontend message type '{}'",
            crate::protocol::framing::printable_tag(tag)
        ),
    )
}

fn malformed_message(tag: u8) -> End {
    End::fatal(
        "08P01",
        format!(
            "invalid message format: '{}' carries no data",
            crate::protocol::framing::printable_tag(tag)
        ),
    )
}

/// Where the pieces of a large frame being passed on go (see `Piece`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streamed {
    No,
    /// A server's row or COPY data, to the client.
    ToClient,
    /// The answer to a request of the proxy's own: dropped.
    Dropped,
    /// A client's message (COPY data; in session pooling, any), to the server that
    /// was held when it began.
    ToServer,
}

/// A server connection working for this client.
struct Held {
    node: Arc<Node>,
    conn: Pooled,
}

struct Session {
    shared: Arc<Shared>,
    client: MessageReader<ClientRead>,
    writer: ClientWrite,
    /// Bytes waiting to go to the client / to the server.
    client_out: BytesMut,
    server_out: BytesMut,
    user: Arc<UserEntry>,
    project: Arc<Project>,
    session_mode: bool,
    key: (i32, i32),
    cancel_slot: Arc<CancelSlot>,

    /// Settings from the startup packet (what RESET returns to) and the current ones.
    startup_settings: Box<Settings>,
    settings: Settings,
    /// Effects of statements inside the open transaction, applied at COMMIT.
    tx_effects: Vec<SessionEffect>,
    /// Effects of the extended-protocol group being sent (applied at its Sync).
    group_effects: Vec<SessionEffect>,
    /// Decisions of statements with session effects bound to open portals, by portal
    /// name: a statement changes the session when it is executed, not when it is bound.
    portal_effects: Vec<(Box<[u8]>, Arc<Decision>)>,
    statements: HashMap<String, Arc<PreparedStatement>>,
    unnamed: Option<Arc<PreparedStatement>>,
    /// A `DEALLOCATE ALL` (or `DISCARD ALL`) was executed since the last Sync sent: the
    /// names the client parsed after it, the only ones the server still knows.
    deallocated_in_stretch: Option<Vec<String>>,

    server: Option<Held>,
    pinned: Option<&'static str>,
    pending: Pending,
    expect: ExpectQueue,
    tx_status: TxStatus,
    copy_in: bool,
    /// Extended-protocol messages were sent since the last Sync.
    mid_batch: bool,
    /// Session mode: Syncs, Queries and FunctionCalls forwarded and not yet answered
    /// with ReadyForQuery (an over-count after a Query the server skipped only makes
    /// the session look busy).
    awaiting_ready: usize,
    /// Session mode: the cancel slot names the server (something was sent since the
    /// server last became idle).
    cancel_armed: bool,
    group_error: bool,
    saw_rollback: bool,
    /// After a failure without a server, drop client messages up to Sync (as Postgres
    /// does) and answer the Sync here.
    skip_until_sync: bool,
    /// The held server answered an extended-protocol message with an error before the
    /// client's Sync was sent: it discards everything up to that Sync, so the proxy
    /// drops the client's messages up to it and sends the Sync on (see `abandon_group`).
    server_skips_until_sync: bool,

    /// Read-your-writes is on for this client (and can matter: the project has replicas).
    ryw: bool,
    /// Replicas must have replayed this far to serve this client's reads (0: any).
    min_lsn: u64,
    /// A write went to the primary since the last time the server was idle.
    wrote: bool,
    /// The WAL position the pending CommitLsn query returned.
    commit_lsn: Option<u64>,
    /// When the request now running on the server was sent (latency histogram).
    started: Option<Instant>,
    /// Reads in flight whose answers have not reached the client's socket yet, kept
    /// to be sent again elsewhere if their server fails first.
    replay: Option<Box<Replay>>,
    replays: u8,
    /// The unit being forwarded had its Parse answered by the proxy.
    skipped_parse: bool,
    /// Such a unit, kept until its first answer (see `Reparse`).
    reparse: Option<Box<Reparse>>,
    /// Registry ids of the proxy-named statements bound or described since the server
    /// last had nothing in flight: the ones to retire if it refuses a cached plan.
    group_named: Vec<u64>,
    /// A `BEGIN` the proxy answered itself, not yet sent to any server (see
    /// `transaction.rs`).
    deferred_begin: Option<Box<DeferredBegin>>,
    /// This client's entry in the registry behind SHOW CLIENTS.
    info: Arc<ClientInfo>,
    /// The idle, transaction, query and write timeouts (see `timeouts.rs`).
    clock: SessionClock,
    /// Its place under the project's and the user's client limits.
    _login_seat: limits::LoginSeat,
    /// A large frame is being passed on in pieces: where the pieces go.
    streamed: Streamed,
    /// The same for a large client message.
    streamed_in: Streamed,
}

/// A transaction the client started that no server has seen yet: its `BEGIN` goes out
/// with the first statement, to the node the `BEGIN` itself routes to.
struct DeferredBegin {
    /// Its text (no NUL: checked by `transaction::deferrable_begin`).
    sql: BytesMut,
    route: Route,
    /// Its first statement found no server: the client sees an aborted transaction,
    /// which only its end leaves, as on Postgres.
    aborted: bool,
    /// It came as a simple query, which leaves no portal behind on Postgres: the
    /// unnamed portal it is run through is closed again.
    simple: bool,
}

/// A unit sent without its Parse because the server's unnamed statement was the same
/// one. After a schema change the server may refuse to reuse it ("cached plan must not
/// change result type", 0A000) where a fresh Parse would have worked; the unit is then
/// sent again with its Parse, and the client never sees the refusal. Kept until the
/// unit's first answer; only for units outside a transaction block, where the refusal
/// rolls back nothing the client did.
struct Reparse {
    frames: Vec<BytesMut>,
    client_mark: usize,
}

struct Replay {
    frames: Vec<BytesMut>,
    /// Length of `client_out` before the first answer to these frames: what a replay
    /// takes back.
    client_mark: usize,
    /// Statement changes of these frames already answered (their undo markers reached
    /// the front of the queue): a replay undoes them too, since it runs the frames
    /// again from the first (a Parse of the name would otherwise find it taken).
    settled: Vec<Expect>,
}

/// How other parts of the proxy find this session: its cancel key and its entry in
/// the client registry.
struct Registration {
    cancel_slot: Arc<CancelSlot>,
    key: (i32, i32),
    info: Arc<ClientInfo>,
    login_seat: limits::LoginSeat,
}

/// Why applying a client's startup settings on a server failed.
enum Greeting {
    /// The server refused a setting: the login fails, as it would on Postgres.
    Refused(End),
    /// The server connection died: another one may do.
    ServerLost(String),
}

/// What becomes of a simple-query `DEALLOCATE name` (see `Session::deallocated_here`).
enum Deallocate {
    NotHere,
    Answered,
    /// Answers still to come decide it.
    Wait,
}

enum Dispatch {
    Done,
    /// The unit needs another node than the one still answering earlier units.
    Later(Vec<BytesMut>),
}

impl Session {
    /// Registers an admitted client (its cancel key, its entry behind SHOW CLIENTS) and
    /// makes its session.
    fn start(shared: Arc<Shared>, admitted: Admitted, peer: SocketAddr) -> Session {
        let Admitted {
            reader,
            writer,
            login,
            project,
            _login_seat,
        } = admitted;
        let (key_pid, key_secret, cancel_slot) = shared.cancels.register();
        shared
            .active_clients
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(%peer, user = %login.user.name, project = %project.name, "client connected");
        let info = shared
            .clients
            .register(&login.user.name, &project.name, peer);
        Session::new(
            shared,
            reader,
            writer,
            login,
            project,
            Registration {
                cancel_slot,
                key: (key_pid, key_secret),
                info,
                login_seat: _login_seat,
            },
        )
    }

    /// Undoes what `start` registered.
    fn leave(self) {
        self.shared.clients.unregister(self.info.id);
        // Session mode gives the client its server's process id: the key may have
        // changed.
        self.shared.cancels.unregister(self.key.0, self.key.1);
        self.shared
            .active_clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn new(
        shared: Arc<Shared>,
        client: MessageReader<ClientRead>,
        writer: ClientWrite,
        login: Login,
        project: Arc<Project>,
        registration: Registration,
    ) -> Session {
        let Registration {
            cancel_slot,
            key,
            info,
            login_seat,
        } = registration;
        let startup_settings = settings::from_startup(&login.params);
        let config = shared.config.load();
        let session_mode = config.proxy.pool_mode == PoolMode::Session;
        let clock = SessionClock::new(Timeouts::from_settings(&config.proxy));
        drop(config);
        let ryw = project.read_your_writes_applies(session_mode);
        let mut session = Session {
            shared,
            client,
            writer,
            // Grown on demand: an idle client keeps only what it used.
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            user: login.user,
            project,
            session_mode,
            key,
            cancel_slot,
            settings: startup_settings.clone(),
            startup_settings: Box::new(startup_settings),
            tx_effects: Vec::new(),
            group_effects: Vec::new(),
            portal_effects: Vec::new(),
            statements: HashMap::new(),
            unnamed: None,
            deallocated_in_stretch: None,
            server: None,
            pinned: None,
            pending: Pending::default(),
            expect: ExpectQueue::default(),
            tx_status: TxStatus::Idle,
            copy_in: false,
            mid_batch: false,
            awaiting_ready: 0,
            cancel_armed: true,
            group_error: false,
            saw_rollback: false,
            skip_until_sync: false,
            server_skips_until_sync: false,
            ryw: false,
            min_lsn: 0,
            wrote: false,
            commit_lsn: None,
            started: None,
            replay: None,
            replays: 0,
            skipped_parse: false,
            reparse: None,
            group_named: Vec::new(),
            deferred_begin: None,
            info,
            clock,
            _login_seat: login_seat,
            streamed: Streamed::No,
            streamed_in: Streamed::No,
        };
        session.ryw = ryw;
        session
    }

    /// The held server must stay with this client (its state lives there).
    fn is_sticky(&self) -> bool {
        self.session_mode
            || self.pinned.is_some()
            || !self.tx_status.is_idle()
            || self.mid_batch
            || self.copy_in
    }

    async fn run(&mut self) -> Result<(), End> {
        // Boxed, as the rare paths below: a task keeps the space of its largest await
        // point for its whole life, idle or not.
        Box::pin(self.greet()).await?;
        if *self.shared.shutdown.borrow() {
            self.info.request_stop();
        }
        // A task's waker does not change, so the session registers it once, and again
        // after each notice (a wake uses the registration up).
        let mut stop_registered = false;
        loop {
            if !self.pending.is_empty() {
                // Boxed for the task's size, as `acquire`: a few hundred bytes per
                // request, from the thread's allocation cache.
                Box::pin(self.dispatch_pending()).await?;
            }
            self.write_ready()?;
            if self.server.is_none() && !self.skip_until_sync && self.next_unit_len().is_some() {
                // A failed write to the server sent a read back to the queue.
                continue;
            }
            enum Event {
                Client(std::io::Result<usize>),
                Server(std::io::Result<usize>),
                ClientWrote(std::io::Result<Sent>),
                ServerWrote(std::io::Result<Sent>),
                /// A stop or a reload.
                Notice,
                Timer,
            }
            let phase = self.phase();
            if phase == Phase::Idle {
                self.park_buffers();
            } else if self.clock.phase() == Phase::Idle {
                // A request begins: it runs under the timeouts of the latest reload.
                self.refresh_timeouts();
            }
            self.clock.set_phase(phase);
            if !self.client_out.is_empty() {
                // write_ready could not write it all: the client's socket is full.
                self.clock.client_write_waiting();
            }
            self.clock.arm(self.started);
            let timed = self.clock.is_armed();
            let read_client = self.pending.len() < MAX_PENDING
                && self.pending.bytes() < MAX_PENDING_BYTES
                && self.server_out.len() < SERVER_OUT_LIMIT;
            let read_server = self.client_out.len() < CLIENT_OUT_LIMIT;
            let flush_client = self.writer.has_unflushed();
            let client = &mut self.client;
            let writer = &mut self.writer;
            let server = &mut self.server;
            let (client_out, server_out) = (&self.client_out, &self.server_out);
            let info = &self.info;
            let clock = &mut self.clock;
            let registered = &mut stop_registered;
            // One poll function over both sockets, the notices and the timer, rather
            // than a future per socket: the loop keeps no state between passes (an idle
            // client's task stays small). The order is fixed: it does not matter for
            // fairness here (one client, one server). Writes come first, so that what
            // is ready goes out before more is read; each side is read only while what
            // waits for the other side is below its limit. Notices (a shutdown, a
            // reload, the end of the shutdown's grace period) and the session's timer
            // come last.
            let event = std::future::poll_fn(|cx| {
                if let Some(held) = server.as_mut() {
                    let conn = &mut *held.conn;
                    if (!server_out.is_empty() || conn.writer.has_unflushed())
                        && let Poll::Ready(r) = conn.writer.poll_send(cx, server_out)
                    {
                        return Poll::Ready(Event::ServerWrote(r));
                    }
                }
                if (!client_out.is_empty() || flush_client)
                    && let Poll::Ready(r) = writer.poll_send(cx, client_out)
                {
                    return Poll::Ready(Event::ClientWrote(r));
                }
                if let Some(held) = server.as_mut()
                    && read_server
                    && let Poll::Ready(r) = held.conn.reader.poll_fill(cx)
                {
                    return Poll::Ready(Event::Server(r));
                }
                if read_client && let Poll::Ready(r) = client.poll_fill_when_ready(cx) {
                    return Poll::Ready(Event::Client(r));
                }
                if info.poll_notice(cx, registered).is_ready() {
                    return Poll::Ready(Event::Notice);
                }
                if timed && clock.poll_fired(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Client(Ok(0)) => return Err(End::ClientGone),
                Event::Client(Err(e)) => return Err(End::ClientIo(e)),
                Event::Client(Ok(_)) => {
                    self.unpark_buffers();
                    self.take_client_frames()?
                }
                Event::Server(Ok(0)) => self.server_lost("server closed the connection")?,
                Event::Server(Err(e)) => self.server_lost(&e.to_string())?,
                Event::Server(Ok(_)) if self.session_mode => self.pass_server_frames()?,
                Event::Server(Ok(_)) => self.take_server_frames()?,
                Event::ClientWrote(Ok(Sent::Wrote(0))) => return Err(End::ClientGone),
                Event::ClientWrote(Ok(Sent::Wrote(n))) => self.client_wrote(n),
                Event::ClientWrote(Ok(Sent::Flushed)) => {}
                Event::ClientWrote(Err(e)) => return Err(End::ClientIo(e)),
                Event::ServerWrote(Ok(Sent::Wrote(n))) if n > 0 => consume(&mut self.server_out, n),
                Event::ServerWrote(Ok(Sent::Flushed)) => {}
                Event::ServerWrote(Ok(Sent::Wrote(n))) => self.server_write_failed(Ok(n))?,
                Event::ServerWrote(Err(e)) => self.server_write_failed(Err(e))?,
                Event::Notice => {
                    self.info.take_notice();
                    // The wake that brought the notice used the registered waker up.
                    stop_registered = false;
                    if self.info.take_reconfigured() {
                        self.refresh_timeouts();
                    }
                    if self.info.terminate_requested() {
                        return Err(End::fatal(
                            "57P01",
                            "terminating connection: the proxy is shutting down and shutdown_timeout_ms is over",
                        ));
                    }
                }
                Event::Timer => self.on_timer().await?,
            }
            // Shutting down: a client leaves as soon as it holds no server (between
            // transactions); one inside a transaction may finish it first. (The phase
            // is worked out only then: it is not free, and this runs every pass.)
            if self.info.stop_requested() && self.phase() == Phase::Idle && self.pending.is_empty()
            {
                return Err(End::fatal(
                    "57P01",
                    "terminating connection: the proxy is shutting down",
                ));
            }
        }
    }

    /// What the session is doing, for its timeouts and for a shutdown.
    fn phase(&self) -> Phase {
        if self.session_mode {
            if self.awaiting_ready > 0 || self.copy_in {
                Phase::Busy
            } else if !self.tx_status.is_idle() {
                Phase::IdleInTransaction
            } else {
                Phase::Idle
            }
        } else if !self.expect.is_empty() || (!self.pending.is_empty() && self.server.is_some()) {
            Phase::Busy
        } else if !self.pending.is_empty() && self.next_unit_len().is_none() {
            // Part of a batch, waiting for the rest of it.
            Phase::IdleInTransaction
        } else if !self.pending.is_empty() {
            Phase::Busy
        } else if !self.tx_status.is_idle() || self.mid_batch || self.copy_in {
            Phase::IdleInTransaction
        } else {
            Phase::Idle
        }
    }

    /// Between requests the session lends its empty buffers back (see
    /// `protocol::spare`): an idle client keeps none, and one that grew for a large
    /// message does not keep that memory.
    fn park_buffers(&mut self) {
        self.client.park();
        spare::give_back(&mut self.client_out);
        spare::give_back(&mut self.server_out);
    }

    /// A request arrived: the output buffers are taken again from the spares rather
    /// than grown from nothing.
    fn unpark_buffers(&mut self) {
        for buf in [&mut self.client_out, &mut self.server_out] {
            if buf.capacity() == 0 {
                *buf = spare::take();
            }
        }
    }

    fn refresh_timeouts(&mut self) {
        self.clock
            .update(Timeouts::from_settings(&self.shared.config.load().proxy));
    }

    /// The session's timer fired: act on the timeout that ran out, if one did.
    async fn on_timer(&mut self) -> Result<(), End> {
        let Some(expired) = self.clock.expired(self.started) else {
            return Ok(());
        };
        let counters = &self.shared.limits.timeouts;
        match expired {
            Expired::ClientWrite(limit) => {
                counters
                    .client_write
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(End::WriteTimeout(limit))
            }
            Expired::ClientIdle(limit) => {
                counters
                    .client_idle
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(End::fatal(
                    "57P05",
                    format!(
                        "terminating connection due to client_idle_timeout ({} ms)",
                        limit.as_millis()
                    ),
                ))
            }
            Expired::IdleTransaction(limit) => {
                counters
                    .idle_transaction
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(End::fatal(
                    "25P03",
                    format!(
                        "terminating connection due to idle_transaction_timeout ({} ms)",
                        limit.as_millis()
                    ),
                ))
            }
            Expired::Query(limit) => {
                self.clock.query_cancel_sent();
                let Some(held) = self.server.as_mut() else {
                    return Ok(());
                };
                counters
                    .query
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(user = %self.user.name, node = %held.node.name, "query ran past query_timeout_ms ({} ms); cancelling it", limit.as_millis());
                // Awaited here, before the server can go back to the pool: a cancel
                // still on its way could otherwise hit the next client's query.
                let conn = &mut held.conn;
                if let Err(e) = Box::pin(crate::pool::recover::send_cancel(
                    &conn.addr,
                    conn.pid,
                    conn.secret,
                ))
                .await
                {
                    warn!(node = %held.node.name, "cannot cancel a query past query_timeout_ms: {e}; the server connection will be closed");
                    conn.broken = true;
                }
                Ok(())
            }
        }
    }

    /// Writes what each socket accepts now without waiting: the server's bytes first,
    /// then the client's. The rest waits for the socket in the session loop.
    fn write_ready(&mut self) -> Result<(), End> {
        while !self.server_out.is_empty() {
            let Some(held) = self.server.as_mut() else {
                self.server_out.clear();
                break;
            };
            match held.conn.writer.try_write(&self.server_out) {
                Ok(n) if n > 0 => consume(&mut self.server_out, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                failed => self.server_write_failed(failed)?,
            }
        }
        while !self.client_out.is_empty() {
            match self.writer.try_write(&self.client_out) {
                Ok(0) => return Err(End::ClientGone),
                Ok(n) => self.client_wrote(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(End::ClientIo(e)),
            }
        }
        Ok(())
    }

    /// A write to the server failed (or took nothing): what was waiting for it is
    /// dropped and the server is lost.
    fn server_write_failed(&mut self, failed: std::io::Result<usize>) -> Result<(), End> {
        self.server_out.clear();
        let reason = match failed {
            Err(e) => format!("write failed: {e}"),
            Ok(_) => "write failed: the server accepts no more data".to_string(),
        };
        self.server_lost(&reason)
    }

    /// `n` bytes of `client_out` reached the client's socket. Once answers to the reads
    /// in flight are among them, those reads can no longer be replayed elsewhere.
    fn client_wrote(&mut self, n: usize) {
        self.clock.client_write_progressed();
        if let Some(replay) = self.replay.as_mut() {
            if n > replay.client_mark {
                self.forget_replay();
            } else {
                replay.client_mark -= n;
            }
        }
        if let Some(reparse) = self.reparse.as_mut() {
            reparse.client_mark = reparse.client_mark.saturating_sub(n);
        }
        consume(&mut self.client_out, n);
    }

    /// Finishes the login: ParameterStatus from a real server with the client's
    /// settings applied, then BackendKeyData and ReadyForQuery.
    async fn greet(&mut self) -> Result<(), End> {
        // A server connection can die under the login (terminated while it sat in the
        // pool, its node restarting): the client has no state yet, so take another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut nodes: Vec<Arc<Node>> = self.project.primary().cloned().into_iter().collect();
            nodes.extend(self.project.read_candidates(0, false));
            if let Err(e) = self.attach_first(nodes).await {
                return Err(End::fatal(
                    e.sqlstate(),
                    format!(
                        "no server of project \"{}\" is available: {e}",
                        self.project.name
                    ),
                ));
            }
            match self.settle_login_settings().await {
                Ok(()) => break,
                Err(Greeting::Refused(end)) => return Err(end),
                Err(Greeting::ServerLost(reason)) => {
                    if let Some(held) = self.server.as_mut() {
                        held.conn.broken = true;
                    }
                    self.release();
                    self.expect.clear();
                    self.server_out.clear();
                    if attempt >= 3 {
                        return Err(End::fatal("08006", reason));
                    }
                    debug!(user = %self.user.name, "server connection failed during login ({reason}); trying another");
                }
            }
        }
        let Some(held) = self.server.as_mut() else {
            return Err(End::fatal("08006", "no server available"));
        };
        for (name, value) in &held.conn.params {
            msg::parameter_status(&mut self.client_out, name, value);
        }
        if self.session_mode {
            // The client keeps this server: it gets the server's real process id, so
            // that pg_backend_pid(), pg_terminate_backend() and NOTIFY's sender agree
            // with what the driver reports. Cancel requests still come to the proxy.
            self.key = self.shared.cancels.rekey(self.key, held.conn.pid);
        }
        msg::backend_key_data(&mut self.client_out, self.key.0, self.key.1);
        msg::ready_for_query(&mut self.client_out, TxStatus::Idle);
        if !self.is_sticky() {
            self.release();
        }
        Ok(())
    }

    /// Applies the client's startup settings on the attached server and records the
    /// ParameterStatus values it reports.
    async fn settle_login_settings(&mut self) -> Result<(), Greeting> {
        self.prepare_server();
        let Some(held) = self.server.as_mut() else {
            return Err(Greeting::ServerLost("no server available".into()));
        };
        if self.server_out.is_empty() {
            return Ok(());
        }
        held.conn
            .send(&self.server_out)
            .await
            .map_err(|e| Greeting::ServerLost(e.to_string()))?;
        self.server_out.clear();
        while !self.expect.is_empty() {
            let frame = held
                .conn
                .reader
                .read_frame()
                .await
                .map_err(|e| Greeting::ServerLost(e.to_string()))?;
            match frame[0] {
                msg::PARAMETER_STATUS => held.conn.record_parameter(&frame),
                msg::ERROR_RESPONSE => {
                    let fields = msg::parse_error_fields(&frame);
                    if fields.severity == "FATAL" || fields.severity == "PANIC" {
                        return Err(Greeting::ServerLost(fields.to_string()));
                    }
                    // An invalid startup parameter: Postgres refuses such a login too.
                    held.conn.needs_reset = true;
                    self.expect.clear();
                    return Err(Greeting::Refused(End::Fatal {
                        code: fields.code,
                        message: fields.message,
                    }));
                }
                msg::READY_FOR_QUERY => {
                    self.expect.pop_front();
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ---- client side ----

    fn take_client_frames(&mut self) -> Result<(), End> {
        loop {
            // Large messages the proxy need not look inside go on in pieces: in session
            // pooling every one, in transaction pooling COPY data going straight to
            // the server.
            let session_mode = self.session_mode;
            let straight_to_server = self.pending.is_empty() && self.server.is_some();
            let piece = self.client.next_piece(STREAM_FRAME_OVER, |tag| {
                session_mode || (straight_to_server && tag == msg::COPY_DATA)
            })?;
            let frame = match piece {
                None => return Ok(()),
                Some(Piece::Frame(frame)) => frame,
                Some(Piece::Head { tag, bytes }) => {
                    if session_mode {
                        self.note_client_message(tag)?;
                    }
                    self.streamed_in = Streamed::ToServer;
                    self.server_out.extend_from_slice(&bytes);
                    continue;
                }
                Some(Piece::Body { bytes, last }) => {
                    // With the server lost meanwhile, the rest goes nowhere, as COPY
                    // data with no COPY running does.
                    if self.streamed_in == Streamed::ToServer {
                        self.server_out.extend_from_slice(&bytes);
                    }
                    if last {
                        self.streamed_in = Streamed::No;
                    }
                    continue;
                }
            };
            if self.session_mode {
                self.pass_client_frame(frame)?;
                continue;
            }
            if frame.len() != 5
                && matches!(
                    frame[0],
                    msg::SYNC | msg::FLUSH | msg::COPY_DONE | msg::TERMINATE
                )
            {
                // These carry no body. The server would refuse one that does without
                // the answer the proxy waits for (a Sync's ReadyForQuery), and the
                // session would hang behind it.
                return Err(malformed_message(frame[0]));
            }
            if is_copy_frame(&frame) && self.pending.is_empty() {
                self.forward_copy_frame(&frame);
                continue;
            }
            match frame[0] {
                msg::TERMINATE => return Err(End::ClientGone),
                msg::QUERY
                | msg::PARSE
                | msg::BIND
                | msg::DESCRIBE
                | msg::EXECUTE
                | msg::CLOSE
                | msg::SYNC
                | msg::FLUSH
                | msg::FUNCTION_CALL
                | msg::COPY_DATA
                | msg::COPY_DONE
                | msg::COPY_FAIL => {}
                other => return Err(invalid_message(other)),
            }
            self.pending.push_back(frame);
        }
    }

    /// COPY FROM STDIN data, CopyDone or CopyFail, with nothing queued before it: it goes
    /// to the held server in order, whether the server's CopyInResponse has arrived or
    /// not (asyncpg sends the data right behind the COPY statement). A server that is
    /// not copying ignores it, as Postgres does with COPY messages outside COPY; with
    /// no server held, no COPY can be running and it is dropped for the same reason.
    fn forward_copy_frame(&mut self, frame: &[u8]) {
        if self.server.is_some() {
            self.server_out.extend_from_slice(frame);
            self.note_copy_end(frame[0]);
        }
    }

    /// Marks where the client's CopyDone or CopyFail went, among the answers expected.
    fn note_copy_end(&mut self, tag: u8) {
        if matches!(tag, msg::COPY_DONE | msg::COPY_FAIL) && !self.expect.is_empty() {
            self.expect.push_back(Expect::CopyEnd);
        }
    }

    /// Number of pending messages that form the next complete unit.
    fn next_unit_len(&self) -> Option<usize> {
        let end = self.pending.iter().position(|f| {
            matches!(
                f[0],
                msg::SYNC | msg::QUERY | msg::FUNCTION_CALL | msg::FLUSH
            )
        });
        match end {
            Some(i) => Some(i + 1),
            None if self.pending.len() >= PARTIAL_UNIT
                || self.pending.bytes() >= PARTIAL_UNIT_BYTES =>
            {
                Some(self.pending.len())
            }
            None => None,
        }
    }

    async fn dispatch_pending(&mut self) -> Result<(), End> {
        loop {
            // Postgres discards every message up to Sync after an extended-protocol
            // error, simple Queries included.
            if self.skip_until_sync {
                while let Some(frame) = self.pending.pop_front() {
                    if frame[0] == msg::SYNC {
                        self.skip_until_sync = false;
                        self.deallocated_in_stretch = None;
                        msg::ready_for_query(&mut self.client_out, self.tx_status);
                        break;
                    }
                }
                if self.skip_until_sync {
                    return Ok(());
                }
            }
            if self.server_skips_until_sync {
                while let Some(frame) = self.pending.front() {
                    if frame[0] == msg::SYNC {
                        self.server_skips_until_sync = false;
                        break;
                    }
                    self.pending.pop_front();
                }
                if self.server_skips_until_sync {
                    return Ok(());
                }
            }
            while self.pending.front().is_some_and(|f| is_copy_frame(f)) {
                if let Some(frame) = self.pending.pop_front() {
                    self.forward_copy_frame(&frame);
                }
            }
            // The server is not reading fast enough: more would only pile up here.
            if self.server_out.len() >= SERVER_OUT_LIMIT {
                return Ok(());
            }
            let Some(len) = self.next_unit_len() else {
                return Ok(());
            };
            let mut unit = spare::take_vec(&SPARE_UNITS);
            self.pending.take_front(len, &mut unit);
            match self.dispatch(unit).await? {
                Dispatch::Done => {}
                Dispatch::Later(unit) => {
                    self.pending.put_back(unit);
                    return Ok(());
                }
            }
        }
    }

    /// The combined routing decision of a unit's statements.
    /// Also returns the session effects of the unit's simple Query, if it has one, and
    /// fills `parsed` with the statement of each well-formed Parse, in order (looked up
    /// once here, used again when the Parse is forwarded).
    fn unit_decision(
        &self,
        unit: &[BytesMut],
        parsed: &mut Vec<Arc<PreparedStatement>>,
    ) -> (Decision, Vec<SessionEffect>) {
        let mut decision = Decision::replica();
        let mut query_effects = Vec::new();
        let mut parsed_unnamed: Option<Arc<Decision>> = None;
        for frame in unit {
            let d = match frame[0] {
                msg::QUERY => {
                    let d = self.decide(Fields::of_frame(frame).cstr_bytes().unwrap_or(b""));
                    query_effects.clone_from(&d.effects);
                    Some(d)
                }
                msg::PARSE => {
                    let mut f = Fields::of_frame(frame);
                    let name = f.cstr_bytes();
                    let tail = f.rest();
                    match (name, Fields::new(tail).cstr_bytes()) {
                        (Ok(name), Ok(query)) => {
                            let statement =
                                self.shared.statements.register(tail, || self.decide(query));
                            let d = statement.decision.clone();
                            if name.is_empty() {
                                parsed_unnamed = Some(d.clone());
                            }
                            parsed.push(statement);
                            Some(d)
                        }
                        // Malformed: refused when forwarded.
                        _ => Some(Arc::new(Decision::primary())),
                    }
                }
                msg::BIND => {
                    let mut f = Fields::of_frame(frame);
                    let _portal = f.cstr_bytes();
                    match f.cstr() {
                        Ok("") => parsed_unnamed
                            .clone()
                            .or_else(|| self.unnamed.as_ref().map(|s| s.decision.clone())),
                        Ok(name) => self.statements.get(name).map(|s| s.decision.clone()),
                        Err(_) => None,
                    }
                }
                msg::FUNCTION_CALL => Some(Arc::new(Decision::primary())),
                _ => None,
            };
            if let Some(d) = d {
                decision.merge(&d);
            }
        }
        (decision, query_effects)
    }

    /// `DEALLOCATE name` of a statement this client prepared through the protocol: the
    /// servers know it only by its proxy-wide name (shared with other clients), so the
    /// proxy forgets the client's name and answers itself, as Postgres would. Only when
    /// nothing is in flight (the answer goes straight out; a pipelined one waits for
    /// the answers before it, which decide whether the name exists and whether the
    /// transaction failed) and the transaction is not aborted (where Postgres refuses
    /// every statement); otherwise, and for names the proxy does not know (SQL
    /// `PREPARE`), the server answers.
    fn deallocated_here(&mut self, unit: &[BytesMut], effects: &[SessionEffect]) -> Deallocate {
        let [query] = unit else {
            return Deallocate::NotHere;
        };
        if query[0] != msg::QUERY || !effects.contains(&SessionEffect::ForgetPrepared) {
            return Deallocate::NotHere;
        }
        let Some(name) = Fields::of_frame(query)
            .cstr_bytes()
            .ok()
            .and_then(statements::deallocate_target)
        else {
            return Deallocate::NotHere;
        };
        if !self.expect.is_empty() {
            return if self.statements.contains_key(&name) || self.expect.uncertain() {
                Deallocate::Wait
            } else {
                Deallocate::NotHere
            };
        }
        if self.tx_status == TxStatus::Failed || self.statements.remove(&name).is_none() {
            return Deallocate::NotHere;
        }
        debug!(user = %self.user.name, statement = %name, "DEALLOCATE answered by the proxy");
        // A simple query drops the unnamed statement on Postgres, this one too.
        self.unnamed = None;
        msg::command_complete(&mut self.client_out, "DEALLOCATE");
        msg::ready_for_query(&mut self.client_out, self.tx_status);
        Deallocate::Answered
    }

    /// Transaction control the proxy answers without a server (see `transaction.rs`):
    /// a `BEGIN` it can defer; the plain end of a transaction no server has seen; any
    /// other statement in such a transaction once it is aborted. Only for a lone
    /// statement (or, when aborted, any unit) with nothing in flight.
    fn transaction_answered_here(
        &mut self,
        unit: &mut [BytesMut],
        decision: &Decision,
        parsed: &[Arc<PreparedStatement>],
    ) -> bool {
        if !self.expect.is_empty() || self.server.is_some() {
            return false;
        }
        if let Some(begin) = &self.deferred_begin {
            if let Some(lone) = transaction::lone_statement(unit)
                && let Some(end) = transaction::plain_end(lone.sql)
            {
                // Postgres reports the end of an aborted transaction as a rollback.
                let tag = if begin.aborted { "ROLLBACK" } else { end.tag() };
                transaction::answer(&mut self.client_out, lone.extended, tag, TxStatus::Idle);
                self.deferred_begin = None;
                self.tx_status = TxStatus::Idle;
                self.info.set_state(ClientState::Idle);
                self.note_unnamed(lone.extended, parsed);
                return true;
            }
            if begin.aborted {
                self.unit_failed(
                    unit,
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                );
                return true;
            }
            return false;
        }
        if !self.tx_status.is_idle()
            || self.session_mode
            || self.pinned.is_some()
            || decision.tx != TxEffect::Begin
        {
            return false;
        }
        let Some(lone) = transaction::lone_statement(unit) else {
            return false;
        };
        let Some(tag) = transaction::deferrable_begin(lone.sql) else {
            return false;
        };
        let (extended, sql_len) = (lone.extended, lone.sql.len());
        // The text, cut out of its frame without copying: after tag and length, and for
        // a Parse the unnamed statement's empty name.
        let mut sql = unit[0].split_off(if extended.is_some() { 6 } else { 5 });
        sql.truncate(sql_len);
        debug!(user = %self.user.name, "BEGIN answered by the proxy; sent with the first statement");
        transaction::answer(&mut self.client_out, extended, tag, TxStatus::InBlock);
        self.deferred_begin = Some(Box::new(DeferredBegin {
            sql,
            route: decision.route,
            aborted: false,
            simple: extended.is_none(),
        }));
        self.tx_status = TxStatus::InBlock;
        self.info.set_state(ClientState::InTransaction);
        self.note_unnamed(extended, parsed);
        true
    }

    /// A Parse the proxy answered itself still makes its statement the client's
    /// unnamed one (a later Bind without Parse runs it); a simple query leaves none, as
    /// on Postgres.
    fn note_unnamed(&mut self, extended: Option<u8>, parsed: &[Arc<PreparedStatement>]) {
        if extended.is_none() {
            self.unnamed = None;
        } else if let Some(statement) = parsed.first() {
            self.unnamed = Some(statement.clone());
        }
    }

    /// Queues the deferred `BEGIN`, if any, in front of the unit about to be sent. It
    /// goes as Parse/Bind/Execute without a Sync: were the server to refuse it, it would
    /// skip everything up to a Sync (a simple query included) rather than run the
    /// client's statements outside a transaction, and it sends the error at once.
    fn send_deferred_begin(&mut self) {
        let Some(begin) = self.deferred_begin.take() else {
            return;
        };
        msg::run_unnamed(&mut self.server_out, &begin.sql);
        self.push_expect(Expect::DeferredBegin);
        if begin.simple {
            msg::close(&mut self.server_out, b'P', "");
            self.push_expect(Expect::InjectedClose);
        }
        self.forget_server_unnamed();
    }

    fn decide(&self, sql: &[u8]) -> Arc<Decision> {
        self.shared.cache.decide_bytes(sql)
    }

    async fn dispatch(&mut self, mut unit: Vec<BytesMut>) -> Result<Dispatch, End> {
        if unit.iter().all(|f| is_copy_frame(f)) {
            for frame in &unit {
                self.forward_copy_frame(frame);
            }
            return Ok(Dispatch::Done);
        }
        if self.expect.uncertain() && requests::relies_on_statements(&unit) {
            // What its statement names mean depends on an answer still to come.
            return Ok(Dispatch::Later(unit));
        }
        let mut parsed = spare::take_vec(&SPARE_PARSED);
        let (decision, mut query_effects) = self.unit_decision(&unit, &mut parsed);
        match self.deallocated_here(&unit, &query_effects) {
            Deallocate::NotHere => {}
            Deallocate::Answered => {
                spare::give_back_vec(&SPARE_PARSED, parsed, 64);
                return Ok(Dispatch::Done);
            }
            Deallocate::Wait => {
                parsed.clear();
                spare::give_back_vec(&SPARE_PARSED, parsed, 64);
                return Ok(Dispatch::Later(unit));
            }
        }
        if self.transaction_answered_here(&mut unit, &decision, &parsed) {
            parsed.clear();
            spare::give_back_vec(&SPARE_PARSED, parsed, 64);
            self.recycle_unit(unit);
            return Ok(Dispatch::Done);
        }
        // A deferred BEGIN decides where its transaction runs, as it would have sent it.
        let mut route = match &self.deferred_begin {
            Some(begin) => begin.route,
            None => decision.route,
        };
        if decision.pin.is_some() || self.pinned.is_some() {
            route = Route::Primary;
        }
        match &self.server {
            // Still answering earlier units: queue behind them if this unit needs another
            // node, or if that server is going away (it sent a FATAL error).
            // A read right after a write waits for that write's commit position, so
            // that it can be routed by it rather than pile onto the primary.
            Some(held)
                if !self.is_sticky()
                    && (held.conn.broken
                        || (route == Route::Primary && held.node.role() != NodeRole::Primary)
                        || (route == Route::Replica
                            && self.expect.iter().any(|e| matches!(e, Expect::CommitLsn)))) =>
            {
                return Ok(Dispatch::Later(unit));
            }
            Some(_) => {}
            None => {
                let executes = unit
                    .iter()
                    .any(|f| matches!(f[0], msg::QUERY | msg::EXECUTE | msg::FUNCTION_CALL));
                let hinted = decision.hinted && self.deferred_begin.is_none();
                // Boxed: checking out (and, on its slow paths, waiting) is a large
                // future that the client's task would keep while idle; a box of a few
                // hundred bytes per transaction is what a thread's cache serves fastest.
                if let Err(e) = Box::pin(self.acquire(route, hinted, executes)).await {
                    if let Some(begin) = self.deferred_begin.as_mut() {
                        begin.aborted = true;
                        self.tx_status = TxStatus::Failed;
                    }
                    parsed.clear();
                    spare::give_back_vec(&SPARE_PARSED, parsed, 64);
                    self.unit_failed(
                        &unit,
                        e.sqlstate(),
                        &format!(
                            "no server available for project \"{}\": {e}",
                            self.project.name
                        ),
                    );
                    return Ok(Dispatch::Done);
                }
            }
        }
        if let Some(reason) = decision.pin
            && self.pinned.is_none()
        {
            info!(user = %self.user.name, project = %self.project.name, reason, "client pinned to its primary connection");
            self.pinned = Some(reason);
            self.info.set_pinned(reason);
        }
        let fresh_server = self.expect.is_empty();
        if let Some(held) = &self.server {
            let counter = if route == Route::Primary {
                &held.node.stats.writes
            } else {
                &held.node.stats.reads
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.ryw
                && self.pinned.is_none()
                && route == Route::Primary
                && held.node.role() == NodeRole::Primary
            {
                self.wrote = true;
            }
        }
        if self.started.is_none() {
            self.started = Some(Instant::now());
            self.clock.query_started();
        }
        self.info.set_state(ClientState::Active);
        self.info
            .statements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.prepare_server();
        self.send_deferred_begin();
        let mut parsed_unnamed = false;
        let answered_before = self.client_out.len();
        let idle_before = self.tx_status.is_idle();
        self.skipped_parse = false;
        if fresh_server {
            self.group_named.clear();
        }
        let mut statements = parsed.drain(..);
        for frame in &unit {
            let statement = if frame[0] == msg::PARSE {
                statements.next()
            } else {
                None
            };
            self.forward_client_frame(frame, statement, &mut parsed_unnamed, &mut query_effects)?;
        }
        drop(statements);
        spare::give_back_vec(&SPARE_PARSED, parsed, 64);
        let keep_for_reparse = self.skipped_parse
            && fresh_server
            && idle_before
            && matches!(unit.last().map(|f| f[0]), Some(msg::SYNC));
        self.reparse = None;
        // Answers the proxy gives itself wait for the server's first answer, unless the
        // server owes nothing.
        if self.expect.iter().all(Expect::is_local) {
            self.emit_synthetics();
        }
        // A read that the server has not started answering can be sent again elsewhere
        // if that server fails: nothing of it reached the client, and it changed nothing.
        // Pipelined reads (a driver's Close, then its next query) are kept together
        // while none of them has been answered.
        let replayable = route == Route::Replica
            && decision.tx == TxEffect::None
            && !self.is_sticky()
            && self.replays < MAX_READ_REPLAYS
            && self.client_out.len() == answered_before
            && matches!(unit.last().map(|f| f[0]), Some(msg::SYNC | msg::QUERY));
        match (fresh_server, replayable, self.replay.as_mut()) {
            (true, true, _) => {
                self.forget_replay();
                if keep_for_reparse {
                    self.reparse = Some(Box::new(Reparse {
                        frames: unit.clone(),
                        client_mark: answered_before,
                    }));
                }
                self.replay = Some(Box::new(Replay {
                    frames: unit,
                    client_mark: answered_before,
                    settled: Vec::new(),
                }))
            }
            (false, true, Some(earlier)) => {
                earlier.frames.append(&mut unit);
                self.recycle_unit(unit);
            }
            _ => {
                self.forget_replay();
                // Kept whole rather than copied: nothing else needs these frames.
                if keep_for_reparse {
                    self.reparse = Some(Box::new(Reparse {
                        frames: unit,
                        client_mark: answered_before,
                    }));
                } else {
                    self.recycle_unit(unit);
                }
            }
        }
        Ok(Dispatch::Done)
    }

    /// Keeps a unit's vector for the next unit: no allocation per statement.
    fn recycle_unit(&mut self, unit: Vec<BytesMut>) {
        spare::give_back_vec(&SPARE_UNITS, unit, 64);
    }

    fn forget_replay(&mut self) {
        if let Some(replay) = self.replay.take() {
            self.recycle_unit(replay.frames);
        }
    }

    /// A unit could not be sent anywhere: answer it with an error, as the server would.
    /// Without a server the client is outside a transaction, unless its `BEGIN` was
    /// deferred (then aborted, see `DeferredBegin`).
    fn unit_failed(&mut self, unit: &[BytesMut], code: &str, message: &str) {
        msg::error_response(&mut self.client_out, "ERROR", code, message);
        match unit.last().map(|f| f[0]) {
            Some(msg::SYNC | msg::QUERY | msg::FUNCTION_CALL) => {
                msg::ready_for_query(&mut self.client_out, self.tx_status)
            }
            _ => self.skip_until_sync = true,
        }
    }

    /// Ends the session: tells the client why if it is still there, and leaves the
    /// server connection clean for the next client (or discards it).
    async fn finish(&mut self, end: Result<(), End>) {
        let mut reachable = true;
        match end {
            Ok(()) | Err(End::ClientGone) => debug!(user = %self.user.name, "client disconnected"),
            Err(End::ClientIo(e)) => debug!(user = %self.user.name, "client connection error: {e}"),
            Err(End::ServerGone(reason)) => {
                info!(user = %self.user.name, "server connection of a session-mode client ended ({reason}); closing the client's")
            }
            Err(End::Fatal { code, message }) => {
                warn!(user = %self.user.name, code, "closing client connection: {message}");
                msg::error_response(&mut self.client_out, "FATAL", &code, &message);
            }
            Err(End::WriteTimeout(limit)) => {
                warn!(user = %self.user.name, "closing client connection: it read nothing of its results for client_write_timeout_ms ({} ms)", limit.as_millis());
                reachable = false;
            }
        }
        // The last words are bounded in time: a client that stopped reading must not
        // keep this task, or its server connection, forever.
        let writer = &mut self.writer;
        let last_words = &self.client_out;
        let _ = tokio::time::timeout(FINAL_WRITE, async {
            if reachable && !last_words.is_empty() {
                let _ = writer.write_all(last_words).await;
            }
            let _ = writer.shutdown().await;
        })
        .await;
        if let Some(held) = self.server.take() {
            let busy = !self.expect.is_empty()
                || !self.tx_status.is_idle()
                || self.copy_in
                || self.mid_batch
                || (self.session_mode && !self.passthrough_idle());
            if busy && !held.conn.broken {
                // The client left in the middle of something: the server connection is
                // brought back to idle in the background and returned (or closed).
                let leftover = crate::pool::recover::Leftover {
                    in_flight: !self.expect.is_empty() || self.awaiting_ready > 0 || self.copy_in,
                };
                let unsent = std::mem::take(&mut self.server_out);
                crate::pool::recover::recover(held.conn, unsent, leftover);
            } else if self.pinned.is_some() || self.session_mode {
                let mut held = held;
                held.conn.needs_reset = true;
            }
        }
        self.cancel_slot.clear();
    }
}

#[cfg(test)]
mod task_size {
    /// Every idle client keeps its session (see `server::serve_connection`'s test for
    /// the whole task).
    #[test]
    fn a_session_stays_small() {
        let session = std::mem::size_of::<Session>();
        assert!(session <= 900, "a session takes {session} bytes");
    }

    use super::*;
}
