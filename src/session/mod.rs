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
//! refusal). This file is the shell around the session's core (`core/`, the protocol
//! state machine, which does no I/O): one loop that reads and writes the client's and
//! the server's sockets, hands what arrives to the core, and runs what the core asks
//! for that needs waiting: a server checked out (`backend.rs`), the login's settings
//! applied, a query cancelled, the last words to a leaving client.

mod admit;
pub mod auth_query;
mod backend;
pub mod cancel;
pub mod clients;
pub mod context;
mod core;
mod greet;
mod intake;
pub mod limits;
pub mod startup;
pub mod statements;
mod timeouts;
pub(crate) mod transaction;

pub use admit::{Admission, Admitted, admit, serve};
pub use context::{Context, Peers};

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::tls::stream::{ClientRead, ClientWrite, Sent};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use self::core::{Core, CoreParts, End, Leaving, Planned};
use crate::cluster::{Node, Project, health};
use crate::config::PoolMode;
use crate::pool::{BackendError, Pooled};
use crate::protocol::messages as msg;
use crate::protocol::settings;
use crate::protocol::{MessageReader, STREAM_FRAME_OVER, spare};
use crate::router::Route;
use cancel::CancelSlot;
use clients::ClientInfo;
use startup::Login;
use timeouts::{Expired, Phase, Timeouts, Timer};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a closing session may take to hand its client the last messages.
const FINAL_WRITE: Duration = Duration::from_secs(5);
/// How often a write waiting for a primary (write_wait_ms) looks again.
const WRITE_WAIT_POLL: Duration = Duration::from_millis(50);
/// How often a read waiting for a replica to catch up (causal_wait_ms) asks it again.
const CAUSAL_POLL: Duration = Duration::from_millis(1);

/// What woke the session.
enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    ClientWrote(std::io::Result<Sent>),
    ServerWrote(std::io::Result<Sent>),
    /// A stop or a reload.
    Notice,
    Timer,
}

/// What the session waits for in one pass of its loop.
#[derive(Clone, Copy)]
struct Wants {
    read_client: bool,
    read_server: bool,
    flush_client: bool,
    timed: bool,
}

struct Session {
    core: Core<Pooled>,
    client: MessageReader<ClientRead>,
    writer: ClientWrite,
    /// The cancel key the client was given.
    key: (i32, i32),
    /// Its place under the project's and the user's client limits.
    _login_seat: limits::LoginSeat,
    /// The one timer of the session's timeouts (`core.deadline()` says when it is due).
    timer: Timer,
    /// Checkouts still to go straight to the pool's queue, without first looking for
    /// an idle connection: after a look that found none, the next few do not look
    /// (under load a pool has none, and each look costs a lock and a lookup).
    skip_idle_looks: u8,
}

/// Checkouts that do not look for an idle connection after a look found none.
const SKIPPED_IDLE_LOOKS: u8 = 8;

/// What became of a unit that needs a server: sent at once on an idle connection; or
/// a checkout that may wait, the common one (a pool's queue) in a box the thread lends,
/// or a rare one (a wait for a primary or a caught-up replica first).
enum Later {
    Sent,
    Waiting(Box<backend::Waiting>),
    /// (Boxed, as it is rare: this is matched in the client's task.)
    Rare(Box<(Planned, backend::Wait)>),
}

/// How other parts of the proxy find this session: its cancel key and its entry in
/// the client registry.
struct Registration {
    cancel_slot: Arc<CancelSlot>,
    key: (i32, i32),
    info: Arc<ClientInfo>,
    login_seat: limits::LoginSeat,
}

impl Session {
    /// Registers an admitted client (its cancel key, its entry behind SHOW CLIENTS) and
    /// makes its session.
    fn start(shared: Arc<Context>, admitted: Admitted, peer: SocketAddr) -> Session {
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
        let context = self.core.context();
        context.clients.unregister(self.core.info().id);
        // Session mode gives the client its server's process id: the key may have
        // changed.
        context.cancels.unregister(self.key.0, self.key.1);
        context
            .active_clients
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn new(
        shared: Arc<Context>,
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
        let config = shared.config.load();
        let session_mode = config.proxy.pool_mode == PoolMode::Session;
        let timeouts = Timeouts::from_settings(&config.proxy);
        drop(config);
        let core = Core::new(CoreParts {
            startup_settings: settings::from_startup(&login.params),
            shared,
            user: login.user,
            project,
            session_mode,
            cancel_slot,
            info,
            timeouts,
        });
        Session {
            core,
            client,
            writer,
            key,
            _login_seat: login_seat,
            timer: Timer::default(),
            skip_idle_looks: 0,
        }
    }

    async fn run(&mut self) -> Result<(), End> {
        // Boxed, as the rare paths below: a task keeps the space of its largest await
        // point for its whole life, idle or not.
        Box::pin(self.greet()).await?;
        if *self.core.context().shutdown.borrow() {
            self.core.info().request_stop();
        }
        // A task's waker does not change, so the session registers it once, and again
        // after each notice (a wake uses the registration up).
        let mut stop_registered = false;
        loop {
            if self.core.has_pending() {
                // (Each in its own statement: a temporary of a statement with an
                // await, a `while let`'s scrutinee among them, would keep its place in
                // the task across the await.)
                loop {
                    let Some(planned) = self.core.dispatch_pending()? else {
                        break;
                    };
                    let waiting = match self.send_now_or_later(planned)? {
                        Later::Sent => continue,
                        Later::Waiting(waiting) => waiting,
                        // Boxed: the rare waits are large futures that the client's
                        // task would otherwise keep while idle.
                        Later::Rare(rare) => {
                            let (planned, wait) = *rare;
                            Box::pin(self.send_with_server(planned, wait)).await?;
                            continue;
                        }
                    };
                    self.send_after_wait(waiting).await?;
                }
            }
            self.write_ready()?;
            if !self.core.holds_server()
                && !self.core.skips_here()
                && self.core.next_unit_len().is_some()
            {
                // A failed write to the server sent a read back to the queue.
                continue;
            }
            if self.core.before_wait() == Phase::Idle {
                // An idle client keeps no buffers (the core lent its own back).
                self.client.park();
            }
            self.timer.arm(self.core.deadline());
            let wants = Wants {
                read_client: self.core.reads_client(),
                read_server: self.core.reads_server(),
                flush_client: self.writer.has_unflushed(),
                timed: self.timer.is_armed(),
            };
            // The poll function holds one reference to the session (and the notice's
            // registration flag): it is kept in the task while the session waits.
            let this = &mut *self;
            let registered = &mut stop_registered;
            let event = std::future::poll_fn(|cx| this.poll_event(cx, wants, registered)).await;
            match event {
                Event::Client(Ok(0)) => return Err(End::ClientGone),
                Event::Client(Err(e)) => return Err(End::ClientIo(e)),
                Event::Client(Ok(_)) => {
                    self.core.unpark_buffers();
                    self.take_client_frames()?
                }
                Event::Server(Ok(0)) => self.core.server_lost("server closed the connection")?,
                Event::Server(Err(e)) => self.core.server_lost(&e.to_string())?,
                Event::Server(Ok(_)) => self.take_server_frames()?,
                Event::ClientWrote(Ok(Sent::Wrote(0))) => return Err(End::ClientGone),
                Event::ClientWrote(Ok(Sent::Wrote(n))) => self.core.client_wrote(n),
                Event::ClientWrote(Ok(Sent::Flushed)) => {}
                Event::ClientWrote(Err(e)) => return Err(End::ClientIo(e)),
                Event::ServerWrote(Ok(Sent::Wrote(n))) if n > 0 => self.core.server_wrote(n),
                Event::ServerWrote(Ok(Sent::Flushed)) => {}
                Event::ServerWrote(Ok(Sent::Wrote(n))) => self.server_write_failed(Ok(n))?,
                Event::ServerWrote(Err(e)) => self.server_write_failed(Err(e))?,
                Event::Notice => {
                    // The wake that brought the notice used the registered waker up.
                    stop_registered = false;
                    if self.core.take_notice() {
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
            if self.core.info().stop_requested()
                && self.core.phase() == Phase::Idle
                && !self.core.has_pending()
            {
                return Err(End::fatal(
                    "57P01",
                    "terminating connection: the proxy is shutting down",
                ));
            }
        }
    }

    /// One poll over both sockets, the notices and the timer, rather than a future per
    /// socket: the loop keeps no state between passes (an idle client's task stays
    /// small). The order is fixed: it does not matter for fairness here (one client,
    /// one server). Writes come first, so that what is ready goes out before more is
    /// read; each side is read only while what waits for the other side is below its
    /// limit. Notices (a shutdown, a reload, the end of the shutdown's grace period)
    /// and the session's timer come last.
    fn poll_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
        wants: Wants,
        registered: &mut bool,
    ) -> Poll<Event> {
        let io = self.core.io();
        let mut server = io.server;
        if let Some(conn) = server.as_deref_mut()
            && (!io.server_out.is_empty() || conn.writer.has_unflushed())
            && let Poll::Ready(r) = conn.writer.poll_send(cx, io.server_out)
        {
            return Poll::Ready(Event::ServerWrote(r));
        }
        if (!io.client_out.is_empty() || wants.flush_client)
            && let Poll::Ready(r) = self.writer.poll_send(cx, io.client_out)
        {
            return Poll::Ready(Event::ClientWrote(r));
        }
        if let Some(conn) = server
            && wants.read_server
            && let Poll::Ready(r) = conn.reader.poll_fill(cx)
        {
            return Poll::Ready(Event::Server(r));
        }
        if wants.read_client
            && let Poll::Ready(r) = self.client.poll_fill_when_ready(cx)
        {
            return Poll::Ready(Event::Client(r));
        }
        if self.core.info().poll_notice(cx, registered).is_ready() {
            return Poll::Ready(Event::Notice);
        }
        if wants.timed && self.timer.poll_fired(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        Poll::Pending
    }

    /// The session's timer fired: act on the timeout that ran out, if one did.
    async fn on_timer(&mut self) -> Result<(), End> {
        let Some(expired) = self.core.timer_fired() else {
            return Ok(());
        };
        let counters = &self.core.context().limits.timeouts;
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
                counters
                    .query
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let user = self.core.user().clone();
                let Some(held) = self.core.held_mut() else {
                    return Ok(());
                };
                info!(user = %user.name, node = %held.node.name, "query ran past query_timeout_ms ({} ms); cancelling it", limit.as_millis());
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
        self.core.drop_orphan_output();
        loop {
            let io = self.core.io();
            let Some(conn) = io.server else { break };
            if io.server_out.is_empty() {
                break;
            }
            match conn.writer.try_write(io.server_out) {
                Ok(n) if n > 0 => self.core.server_wrote(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                failed => self.server_write_failed(failed)?,
            }
        }
        loop {
            let client_out = self.core.client_out();
            if client_out.is_empty() {
                break;
            }
            match self.writer.try_write(client_out) {
                Ok(0) => return Err(End::ClientGone),
                Ok(n) => self.core.client_wrote(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(End::ClientIo(e)),
            }
        }
        Ok(())
    }

    /// A write to the server failed (or took nothing): what was waiting for it is
    /// dropped and the server is lost.
    fn server_write_failed(&mut self, failed: std::io::Result<usize>) -> Result<(), End> {
        let reason = match failed {
            Err(e) => format!("write failed: {e}"),
            Ok(_) => "write failed: the server accepts no more data".to_string(),
        };
        self.core.server_write_failed(&reason)
    }

    /// Sends a planned unit at once on an idle connection of the first node to try,
    /// if it has one; otherwise returns the checkout that may wait, to be awaited.
    /// (Decided here rather than in `run`: what is decided is not kept in the
    /// client's task across the wait, which every idle client pays for.)
    fn send_now_or_later(&mut self, planned: Planned) -> Result<Later, End> {
        let checkout = planned.checkout();
        let mut candidates = self.candidates(checkout);
        if self.skip_idle_looks == 0 {
            match self.attach_idle(candidates) {
                Ok(()) => {
                    self.core.send_unit(planned)?;
                    return Ok(Later::Sent);
                }
                Err(back) => candidates = back,
            }
            self.skip_idle_looks = SKIPPED_IDLE_LOOKS;
        } else {
            self.skip_idle_looks -= 1;
        }
        Ok(match candidates {
            backend::Candidates::Nodes(nodes, begun) => {
                Later::Waiting(backend::Waiting::lend(Some(planned), nodes, begun))
            }
            backend::Candidates::Wait(wait) => Later::Rare(Box::new((planned, wait))),
        })
    }

    /// Waits as `wait` says, then sends a unit on the server it found, or answers it
    /// with the reason there is none.
    async fn send_with_server(&mut self, planned: Planned, wait: backend::Wait) -> Result<(), End> {
        match self.acquire_after(wait).await {
            Ok(()) => self.core.send_unit(planned),
            Err(e) => {
                self.core.checkout_failed(planned, &e);
                Ok(())
            }
        }
    }

    /// Ends the session: tells the client why if it is still there, and leaves the
    /// server connection clean for the next client (or discards it).
    async fn finish(&mut self, end: Result<(), End>) {
        let mut reachable = true;
        match end {
            Ok(()) | Err(End::ClientGone) => {
                debug!(user = %self.core.user().name, "client disconnected")
            }
            Err(End::ClientIo(e)) => {
                debug!(user = %self.core.user().name, "client connection error: {e}")
            }
            Err(End::ServerGone(reason)) => {
                info!(user = %self.core.user().name, "server connection of a session-mode client ended ({reason}); closing the client's")
            }
            Err(End::Fatal { code, message }) => {
                warn!(user = %self.core.user().name, code, "closing client connection: {message}");
                self.core.say_fatal(&code, &message);
            }
            Err(End::WriteTimeout(limit)) => {
                warn!(user = %self.core.user().name, "closing client connection: it read nothing of its results for client_write_timeout_ms ({} ms)", limit.as_millis());
                reachable = false;
            }
        }
        // The last words are bounded in time: a client that stopped reading must not
        // keep this task, or its server connection, forever.
        let writer = &mut self.writer;
        let last_words = self.core.client_out();
        let _ = tokio::time::timeout(FINAL_WRITE, async {
            if reachable && !last_words.is_empty() {
                let _ = writer.write_all(last_words).await;
            }
            let _ = writer.shutdown().await;
        })
        .await;
        match self.core.leave_server() {
            Some(Leaving::Recover {
                conn,
                unsent,
                in_flight,
            }) => {
                // The client left in the middle of something: the server connection is
                // brought back to idle in the background and returned (or closed).
                crate::pool::recover::recover(
                    conn,
                    unsent,
                    crate::pool::recover::Leftover { in_flight },
                );
            }
            Some(Leaving::Release(conn)) => drop(conn),
            None => {}
        }
    }
}

#[cfg(test)]
mod task_size {
    /// Every idle client keeps its session (see `server::serve_connection`'s test for
    /// the whole task).
    #[test]
    fn a_session_stays_small() {
        let session = std::mem::size_of::<Session>();
        assert!(session <= 520, "a session takes {session} bytes");
    }

    use super::*;
}
