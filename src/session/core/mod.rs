//! The session core: one client's protocol state machine, with no I/O.
//!
//! The shell around it (`session/mod.rs`) reads the sockets and hands the core what
//! arrived: the client's messages (`client_piece`), the server's (`server_piece`), a
//! lost server (`server_lost`), bytes the client's socket took (`client_wrote`). The
//! core answers by appending bytes to `client_out` and `server_out`, and by the pool
//! actions it returns or takes itself: a unit that needs a server comes back from
//! `dispatch_pending` as a `Planned` request (the shell checks out a server, `attach`es
//! it and calls `send_unit`); a server the core no longer needs is given back by
//! dropping its handle (`release`). The server is a `ServerHandle`: a pooled
//! connection in the proxy, a bare `ServerState` in the unit tests (`tests.rs`).
//!
//! The client's messages are grouped into units (up to a Sync, a simple Query, a
//! FunctionCall or a Flush). Each unit is routed once and sent to the held server, and
//! the server's answers are matched against what the core expects (`expect.rs`). In
//! transaction pooling the server goes back when it reports ReadyForQuery(Idle) and
//! nothing else is in flight.
//!
//! `client.rs` takes the client's messages in; `dispatch.rs` routes units;
//! `requests.rs` rewrites the client's messages for the server; `server.rs` attaches,
//! releases and prepares the held server; `responses.rs` handles what it answers and
//! `lost.rs` a server that fails; `passthrough.rs` is session pooling, where both
//! directions pass unchanged.

mod client;
mod dispatch;
mod expect;
mod flight;
mod login;
mod lost;
mod passthrough;
mod pending;
mod requests;
mod responses;
mod server;
mod shell;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use tracing::{debug, info, warn};

use super::cancel::CancelSlot;
use super::clients::{ClientInfo, ClientState};
use super::statements::{self, PreparedStatement};
use super::timeouts::{Phase, SessionClock, Timeouts};
use super::transaction;
use crate::cluster::{Node, NodeRole, Project, health};
use crate::pool::{BackendError, ServerState};
use crate::protocol::backend::{self, Backend, Report};
use crate::protocol::framing::Frames;
use crate::protocol::frontend::{Bind, Frontend, Parse, Target};
use crate::protocol::messages::{self as msg, TxStatus};
use crate::protocol::settings::Settings;
use crate::protocol::{Piece, ProtocolError, spare};
use crate::router::{Decision, PinReason, Route, SessionEffect, TxEffect};
use crate::session::Context;
use crate::users::UserEntry;
use expect::{Expect, ExpectQueue};
use flight::Flight;
use pending::Pending;

pub(super) use login::Greeting;

/// A batch without Sync is sent on once it grows this long (JDBC batches, COPY-less
/// bulk), in messages or in bytes.
const PARTIAL_UNIT: usize = 512;
const PARTIAL_UNIT_BYTES: usize = 256 * 1024;
/// Bytes waiting for a slow server beyond which the client is not read (and no more
/// units are sent): the shell keeps reading each side while it writes to the other,
/// with bounded buffers, so that a client that pipelines and a server that streams
/// results never wait on each other.
const SERVER_OUT_LIMIT: usize = 256 * 1024;
/// Proxy-named statements one server connection may accumulate before it is cleared.
const MAX_PREPARED_PER_SERVER: usize = 2000;
/// How often one read is sent again elsewhere after its server failed before answering.
const MAX_READ_REPLAYS: u8 = 2;
/// Where the WAL ends right after a client's write committed: an upper bound of that
/// commit's position, which is what read-your-writes needs.
const COMMIT_LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()";

/// Why a session ended.
#[derive(Debug)]
pub(in crate::session) enum End {
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
    WriteTimeout(std::time::Duration),
}

impl End {
    pub(in crate::session) fn fatal(code: &str, message: impl Into<String>) -> End {
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

/// How the client shares servers (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// A server per transaction, or per request outside one.
    Transaction,
    /// The client keeps the server it logged in with, and messages pass both ways
    /// unchanged (`passthrough.rs`).
    Session(Passthrough),
}

/// What session pooling watches of a pass-through session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Passthrough {
    /// Syncs, Queries and FunctionCalls forwarded and not yet answered with
    /// ReadyForQuery (an over-count after a Query the server skipped only makes the
    /// session look busy).
    awaiting_ready: usize,
    /// The cancel slot names the server (something was sent since the server last
    /// became idle).
    cancel_armed: bool,
}

/// Client messages up to the next Sync that go nowhere, as Postgres discards them after
/// an error in the extended protocol (simple Queries included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipToSync {
    No,
    /// The error was the proxy's (no server could be had, or it was lost): the core
    /// drops them and answers the Sync itself.
    Here,
    /// The held server answered an extended-protocol message with an error before the
    /// client's Sync was sent: it discards everything up to that Sync, so the core
    /// drops the client's messages up to it and sends the Sync on (see
    /// `abandon_group`). The server stays held until then.
    OnServer,
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

/// A server connection as the core sees it: its protocol state. Dropping the handle
/// gives the server back to its pool.
pub(in crate::session) trait ServerHandle {
    fn state(&self) -> &ServerState;
    fn state_mut(&mut self) -> &mut ServerState;
    /// The core is about to give the server back: a last look at the connection
    /// (unread bytes mean the proxy lost track of its state).
    fn before_release(&mut self, _node: &Node) {}
}

/// Unit tests hold a bare state: there is no connection behind it.
impl ServerHandle for ServerState {
    fn state(&self) -> &ServerState {
        self
    }
    fn state_mut(&mut self) -> &mut ServerState {
        self
    }
}

/// What becomes of the held server when the session ends (`Core::leave_server`).
pub(in crate::session) enum Leaving<H> {
    /// Back to its pool as it is (reset first by the next client if it held this
    /// client's session state).
    Release(H),
    /// The client left in the middle of something: the server must first be brought
    /// back to idle (`unsent`: bytes for it that were never written; `in_flight`: it
    /// owes answers).
    Recover {
        conn: H,
        unsent: BytesMut,
        in_flight: bool,
    },
}

/// A server connection working for this client.
pub(in crate::session) struct Held<H> {
    pub node: Arc<Node>,
    pub conn: H,
}

/// What the core starts from: the client's login, its project and its registrations.
pub(in crate::session) struct CoreParts {
    pub shared: Arc<Context>,
    pub user: Arc<UserEntry>,
    pub project: Arc<Project>,
    pub startup_settings: Settings,
    pub session_mode: bool,
    pub cancel_slot: Arc<CancelSlot>,
    pub info: Arc<ClientInfo>,
    pub timeouts: Timeouts,
}

pub(in crate::session) struct Core<H> {
    shared: Arc<Context>,
    /// Bytes waiting to go to the client / to the server.
    client_out: BytesMut,
    server_out: BytesMut,
    user: Arc<UserEntry>,
    project: Arc<Project>,
    pooling: Pooling,
    cancel_slot: Arc<CancelSlot>,

    /// Settings from the startup packet (what RESET returns to) and the current ones.
    startup_settings: Box<Settings>,
    settings: Settings,
    statements: HashMap<String, Arc<PreparedStatement>>,
    unnamed: Option<Arc<PreparedStatement>>,

    server: Option<Held<H>>,
    pinned: Option<PinReason>,
    /// What the session holds only while something is in flight (see `InFlight`).
    flight: Flight,
    tx_status: TxStatus,
    copy_in: bool,
    /// Extended-protocol messages were sent since the last Sync.
    mid_batch: bool,
    group_error: bool,
    saw_rollback: bool,
    /// Client messages up to the next Sync that go nowhere after an error.
    skipping: SkipToSync,

    /// Read-your-writes is on for this client (and can matter: the project has replicas).
    ryw: bool,
    /// Replicas must have replayed this far to serve this client's reads (0: any).
    min_lsn: u64,
    /// A write went to the primary since the last time the server was idle.
    wrote: bool,
    replays: u8,
    /// The unit being forwarded had its Parse answered by the proxy.
    skipped_parse: bool,
    /// This client's entry in the registry behind SHOW CLIENTS.
    info: Arc<ClientInfo>,
    /// The idle, transaction, query and write timeouts (see `timeouts.rs`).
    clock: SessionClock,
    /// A large frame is being passed on in pieces: where the pieces go.
    streamed: Streamed,
    /// The same for a large client message.
    streamed_in: Streamed,
}

/// A transaction the client started that no server has seen yet: its `BEGIN` goes out
/// with the first statement, to the node the `BEGIN` itself routes to.
pub(super) struct DeferredBegin {
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
pub(super) struct Reparse {
    frames: Vec<BytesMut>,
    client_mark: usize,
}

pub(super) struct Replay {
    frames: Vec<BytesMut>,
    /// Length of `client_out` before the first answer to these frames: what a replay
    /// takes back.
    client_mark: usize,
    /// Statement changes of these frames already answered (their undo markers reached
    /// the front of the queue): a replay undoes them too, since it runs the frames
    /// again from the first (a Parse of the name would otherwise find it taken).
    settled: Vec<Expect>,
}

/// What becomes of a simple-query `DEALLOCATE name` (see `Session::deallocated_here`).
pub(super) enum Deallocate {
    NotHere,
    Answered,
    /// Answers still to come decide it.
    Wait,
}

pub(super) enum Dispatch {
    Done,
    /// The unit needs another node than the one still answering earlier units.
    Later(Vec<BytesMut>),
    /// The unit needs a server and none is held.
    NeedServer(Planned),
}

/// A unit routed and ready to send once a server is held: what `dispatch` worked out
/// before it found none.
pub(in crate::session) struct Planned {
    unit: Vec<BytesMut>,
    decision: Decision,
    query_effects: Vec<SessionEffect>,
    parsed: Vec<Arc<PreparedStatement>>,
    route: Route,
    hinted: bool,
}

impl Planned {
    pub(in crate::session) fn checkout(&self) -> Checkout {
        Checkout {
            route: self.route,
            hinted: self.hinted,
            executes: self
                .unit
                .iter()
                .any(|f| matches!(f[0], msg::QUERY | msg::EXECUTE | msg::FUNCTION_CALL)),
        }
    }
}

/// Where a planned unit may run: what the shell checks out a server for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::session) struct Checkout {
    pub route: Route,
    /// Routed by a hint in the statement, which overrides read-your-writes.
    pub hinted: bool,
    /// The unit runs a statement (not only Parse or Describe): a replica too far
    /// behind is not good enough.
    pub executes: bool,
}

impl<H: ServerHandle> Core<H> {
    pub(in crate::session) fn new(parts: CoreParts) -> Core<H> {
        let CoreParts {
            shared,
            user,
            project,
            startup_settings,
            session_mode,
            cancel_slot,
            info,
            timeouts,
        } = parts;
        let ryw = project.read_your_writes_applies(session_mode);
        Core {
            shared,
            // Grown on demand: an idle client keeps only what it used.
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            user,
            project,
            pooling: if session_mode {
                Pooling::Session(Passthrough {
                    awaiting_ready: 0,
                    cancel_armed: true,
                })
            } else {
                Pooling::Transaction
            },
            cancel_slot,
            settings: startup_settings.clone(),
            startup_settings: Box::new(startup_settings),
            statements: HashMap::new(),
            unnamed: None,
            server: None,
            pinned: None,
            flight: Flight::default(),
            tx_status: TxStatus::Idle,
            copy_in: false,
            mid_batch: false,
            group_error: false,
            saw_rollback: false,
            skipping: SkipToSync::No,
            ryw,
            min_lsn: 0,
            wrote: false,
            replays: 0,
            skipped_parse: false,
            info,
            clock: SessionClock::new(timeouts),
            streamed: Streamed::No,
            streamed_in: Streamed::No,
        }
    }

    /// The held server must stay with this client (its state lives there).
    fn is_sticky(&self) -> bool {
        self.session_mode()
            || self.pinned.is_some()
            || !self.tx_status.is_idle()
            || self.mid_batch
            || self.copy_in
    }

    /// What the session is doing, for its timeouts and for a shutdown.
    pub(in crate::session) fn phase(&self) -> Phase {
        if let Pooling::Session(passthrough) = self.pooling {
            if passthrough.awaiting_ready > 0 || self.copy_in {
                Phase::Busy
            } else if !self.tx_status.is_idle() {
                Phase::IdleInTransaction
            } else {
                Phase::Idle
            }
        } else if !self.flight.expect.is_empty()
            || (!self.flight.pending.is_empty() && self.server.is_some())
        {
            Phase::Busy
        } else if !self.flight.pending.is_empty() && self.next_unit_len().is_none() {
            // Part of a batch, waiting for the rest of it.
            Phase::IdleInTransaction
        } else if !self.flight.pending.is_empty() {
            Phase::Busy
        } else if !self.tx_status.is_idle() || self.mid_batch || self.copy_in {
            Phase::IdleInTransaction
        } else {
            Phase::Idle
        }
    }

    /// Between requests the core lends its empty output buffers back (see
    /// `protocol::spare`): an idle client keeps none, and one that grew for a large
    /// message does not keep that memory.
    fn park_buffers(&mut self) {
        spare::give_back(&mut self.client_out);
        spare::give_back(&mut self.server_out);
        self.flight.settle();
    }

    /// A request arrived: the output buffers are taken again from the spares rather
    /// than grown from nothing.
    pub(in crate::session) fn unpark_buffers(&mut self) {
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

    /// Keeps a unit's vector for the next unit: no allocation per statement.
    pub(super) fn recycle_unit(&mut self, unit: Vec<BytesMut>) {
        spare::give_back_vec(&SPARE_UNITS, unit, 64);
    }

    pub(super) fn forget_replay(&mut self) {
        if let Some(replay) = self.flight.replay.take() {
            self.recycle_unit(replay.frames);
        }
    }

    /// A unit could not be sent anywhere: answer it with an error, as the server would.
    /// Without a server the client is outside a transaction, unless its `BEGIN` was
    /// deferred (then aborted, see `DeferredBegin`).
    pub(super) fn unit_failed(&mut self, unit: &[BytesMut], code: &str, message: &str) {
        msg::error_response(&mut self.client_out, "ERROR", code, message);
        match unit.last().map(|f| f[0]) {
            Some(msg::SYNC | msg::QUERY | msg::FUNCTION_CALL) => {
                msg::ready_for_query(&mut self.client_out, self.tx_status)
            }
            _ => self.skipping = SkipToSync::Here,
        }
    }

    pub(super) fn decide(&self, sql: &[u8]) -> Arc<Decision> {
        self.shared.cache.decide_bytes(sql)
    }

    /// Client messages are being dropped up to a Sync the core answers itself.
    pub(in crate::session) fn skips_here(&self) -> bool {
        self.skipping == SkipToSync::Here
    }

    /// Session pooling: the client keeps its server.
    pub(in crate::session) fn session_mode(&self) -> bool {
        matches!(self.pooling, Pooling::Session(_))
    }
}
