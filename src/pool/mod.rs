//! Pools of authenticated server connections, one per node and user.
//!
//! In transaction pooling a session checks a connection out and back in for every
//! transaction, so this is the hottest shared structure of the data path. The fast
//! path is one uncontended mutex around a stack: no timer, no task, no clock read on
//! checkout. (A general-purpose pool arms a timeout, records wait statistics and
//! wakes waiters through extra machinery on every checkout; measured here, that was
//! a third of the proxy's user-space CPU per select-only transaction.)
//!
//! - Idle connections are a LIFO stack: one client keeps hitting the same warm server
//!   process, and the surplus ones sink to the bottom and reach the idle timeout.
//! - A full pool queues checkouts in arrival order; a returned connection is handed
//!   straight to the oldest waiter, which gives up after `query_wait_timeout_ms`. The
//!   pool's own task ends waits that run out, not a timer per checkout: every waiter of
//!   a pool waits the same length of time, so the oldest one's deadline is the next,
//!   and one timer serves them all (a timer armed and disarmed per waiting checkout
//!   cost about 9% of the proxy's instructions per select-only transaction).
//! - A failed connection attempt fails every waiting checkout at once: a session
//!   waiting for a node that just refused a connection should try another node, not
//!   sit out its timeout.
//! - A connection is checked before it is handed out (an idle server that closed or
//!   sent a FATAL is noticed without a round trip, from the socket's readiness), and
//!   one marked broken is closed instead of pooled, as is one older than
//!   `server_lifetime_ms` (so that servers' memory and a changed DNS name or
//!   configuration are taken up over time).

pub mod recover;
pub mod server;

use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use server::{BackendError, LoginInfo, ServerConn, ServerState};

use crate::keepalive::Keepalive;

/// How a pool opens, hands out and retires connections (from `[proxy]` and the
/// project's `pool_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: u32,
    /// Opening one connection, login included.
    pub connect_timeout: Duration,
    /// Waiting for a connection when every one is busy.
    pub wait_timeout: Duration,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Connections are closed when they come back after this long (None: never).
    pub lifetime: Option<Duration>,
    pub keepalive: Keepalive,
}

/// A pooled connection's read buffer beyond this is given back when it returns.
const RETAINED_READ_BUFFER: usize = 128 * 1024;

/// Shortest and longest pause between two passes of the idle-connection reaper.
const REAP_MIN: Duration = Duration::from_millis(100);
const REAP_MAX: Duration = Duration::from_secs(30);

/// A pool for one node and one user. Cloning shares it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    login: LoginInfo,
    settings: PoolSettings,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Most recently returned last.
    idle: Vec<IdleConn>,
    /// Open connections (idle or checked out) plus connection attempts under way.
    total: u32,
    waiters: VecDeque<Waiter>,
}

/// A queued checkout: where its connection goes, and when it gives up.
struct Waiter {
    tx: oneshot::Sender<Handoff>,
    deadline: tokio::time::Instant,
}

struct IdleConn {
    conn: Box<ServerConn>,
    since: Instant,
}

/// What a waiting checkout receives.
enum Handoff {
    Conn(Box<ServerConn>),
    /// A place in the pool was freed for the waiter: it opens its own connection.
    Slot,
    /// A connection attempt to this node just failed.
    Failed(BackendError),
}

/// Connection counts of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub connections: u32,
    pub idle: u32,
}

impl Pool {
    /// A pool of at most `settings.size` connections. Needs a tokio runtime: it starts
    /// the task that closes connections idle longer than `idle_timeout`.
    pub fn new(login: LoginInfo, mut settings: PoolSettings) -> Pool {
        settings.size = settings.size.max(1);
        let inner = Arc::new(PoolInner {
            login,
            settings,
            state: Mutex::new(PoolState::default()),
        });
        tokio::spawn(maintain(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// Who this pool logs in as.
    pub fn login(&self) -> &LoginInfo {
        &self.inner.login
    }

    /// Whether the pool logs in with `user`'s current credentials (an auth_query
    /// user's password can change; the old pool's connections finish and go).
    pub fn serves(&self, user: &crate::users::UserEntry) -> bool {
        let login = &self.inner.login;
        login.password == user.backend_password
            && login.scram_keys.as_ref() == user.backend_keys_ref()
    }

    /// An idle connection, if the pool has a usable one.
    pub fn take_idle(&self) -> Option<Pooled> {
        let conn = self.inner.lock().pop_usable()?;
        Some(self.inner.pooled(conn))
    }

    /// A connection from the pool, a new one if there is room, or the next one returned
    /// within the wait timeout.
    ///
    /// A plain future rather than an `async fn`: a checkout that waits, the common case
    /// under load, is a few words (the receiver of its handoff), not a state machine
    /// sized for opening a connection (that one is boxed, made only when needed).
    pub fn get(&self) -> Checkout {
        let mut state = self.inner.lock();
        if let Some(conn) = state.pop_usable() {
            return Checkout::Ready(Some(self.inner.pooled(conn)));
        }
        if state.total < self.inner.settings.size {
            state.total += 1;
            drop(state);
            return Checkout::connecting(self.inner.clone());
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(Waiter {
            tx,
            deadline: tokio::time::Instant::now() + self.inner.settings.wait_timeout,
        });
        Checkout::Waiting(Waiting {
            pool: self.inner.clone(),
            rx,
        })
    }

    pub fn counts(&self) -> PoolCounts {
        let state = self.inner.lock();
        PoolCounts {
            connections: state.total,
            idle: state.idle.len() as u32,
        }
    }
}

impl PoolState {
    /// The most recently returned idle connection that is still usable; ones the
    /// server closed or spoke on while idle are let go.
    fn pop_usable(&mut self) -> Option<Box<ServerConn>> {
        while let Some(IdleConn { mut conn, .. }) = self.idle.pop() {
            if conn.check_idle() {
                return Some(conn);
            }
            self.total -= 1;
        }
        None
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state stays consistent across a panic elsewhere (every update is a
        // single step), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pooled(self: &Arc<Self>, conn: Box<ServerConn>) -> Pooled {
        Pooled {
            conn: Some(conn),
            pool: self.clone(),
        }
    }

    /// Opens a connection in a place already counted in `total`.
    async fn connect_reserved(self: Arc<Self>) -> Result<Pooled, BackendError> {
        let reservation = Reservation(Some(self.clone()));
        let settings = &self.settings;
        match ServerConn::connect(&self.login, settings.connect_timeout, &settings.keepalive).await
        {
            Ok(conn) => {
                std::mem::forget(reservation);
                Ok(self.pooled(Box::new(conn)))
            }
            Err(e) => {
                tracing::warn!(node = %self.login.addr, user = %self.login.user, "backend connection failed: {e}");
                let waiters = std::mem::take(&mut self.lock().waiters);
                for waiter in waiters {
                    let _ = waiter.tx.send(Handoff::Failed(e.duplicate()));
                }
                drop(reservation);
                Err(e)
            }
        }
    }

    /// A checked-out connection comes back: to the oldest waiter, else onto the stack.
    fn put_back(&self, mut conn: Box<ServerConn>) {
        if conn.broken || self.past_lifetime(&conn) {
            drop(conn);
            self.release_place();
            return;
        }
        conn.reader.release_excess(RETAINED_READ_BUFFER);
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.tx.send(Handoff::Conn(conn)) {
                Ok(()) => return,
                Err(Handoff::Conn(back)) => conn = back,
                Err(_) => return,
            }
        }
        state.idle.push(IdleConn {
            conn,
            since: Instant::now(),
        });
    }

    fn past_lifetime(&self, conn: &ServerConn) -> bool {
        self.settings
            .lifetime
            .is_some_and(|lifetime| conn.opened.elapsed() >= lifetime)
    }

    /// A place in the pool is free: the oldest waiter takes it, or the pool shrinks.
    fn release_place(&self) {
        let mut state = self.lock();
        while let Some(waiter) = state.waiters.pop_front() {
            if waiter.tx.send(Handoff::Slot).is_ok() {
                return;
            }
        }
        state.total = state.total.saturating_sub(1);
    }

    /// Closes connections idle for longer than the idle timeout (the oldest are at the
    /// bottom of the stack), and idle ones past their lifetime.
    fn reap(&self) {
        let expired: Vec<IdleConn> = {
            let mut state = self.lock();
            let n = state
                .idle
                .iter()
                .take_while(|c| c.since.elapsed() >= self.settings.idle_timeout)
                .count();
            let mut expired: Vec<IdleConn> = state.idle.drain(..n).collect();
            if self.settings.lifetime.is_some() {
                let mut i = 0;
                while i < state.idle.len() {
                    if self.past_lifetime(&state.idle[i].conn) {
                        expired.push(state.idle.remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            state.total -= expired.len() as u32;
            expired
        };
        drop(expired);
    }

    /// Ends the waits that ran out (the oldest waiters are at the front, and all wait
    /// equally long): their senders are dropped, which the waiting checkout reads as
    /// the timeout. The next deadline, if a checkout still waits.
    fn expire_waiters(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let mut state = self.lock();
        while let Some(front) = state.waiters.front() {
            if front.deadline > now && !front.tx.is_closed() {
                return Some(front.deadline);
            }
            state.waiters.pop_front();
        }
        None
    }
}

/// The pool's own task: closes idle connections past their time, and ends checkouts
/// that waited `query_wait_timeout_ms`. It holds the pool only while it works.
async fn maintain(pool: Weak<PoolInner>) {
    let (reap_pause, wait_timeout) = match pool.upgrade() {
        Some(p) => {
            let settings = &p.settings;
            let shortest = match settings.lifetime {
                Some(lifetime) => settings.idle_timeout.min(lifetime),
                None => settings.idle_timeout,
            };
            (
                (shortest / 2).clamp(REAP_MIN, REAP_MAX),
                settings.wait_timeout,
            )
        }
        None => return,
    };
    let mut next_reap = tokio::time::Instant::now() + reap_pause;
    loop {
        let now = tokio::time::Instant::now();
        let next_expiry = {
            let Some(p) = pool.upgrade() else { return };
            if now >= next_reap {
                p.reap();
                next_reap = now + reap_pause;
            }
            p.expire_waiters(now)
        };
        // With nobody waiting, a checkout queued from now on runs out no sooner than
        // one wait from now: looking again then is early enough.
        let next = next_expiry.unwrap_or(now + wait_timeout).min(next_reap);
        tokio::time::sleep_until(next).await;
    }
}

/// A place counted in the pool for a connection being opened; given back if the
/// attempt fails or its caller goes away.
struct Reservation(Option<Arc<PoolInner>>);

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.release_place();
        }
    }
}

/// A checkout under way (see `Pool::get`).
pub enum Checkout {
    Ready(Option<Pooled>),
    Waiting(Waiting),
    /// Opening a connection in a place already counted in the pool.
    Connecting(Pin<Box<dyn Future<Output = Result<Pooled, BackendError>> + Send>>),
}

impl Checkout {
    fn connecting(pool: Arc<PoolInner>) -> Checkout {
        Checkout::Connecting(Box::pin(pool.connect_reserved()))
    }
}

impl Future for Checkout {
    type Output = Result<Pooled, BackendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = &mut *self;
            let handoff = match this {
                Checkout::Ready(conn) => {
                    return match conn.take() {
                        Some(conn) => Poll::Ready(Ok(conn)),
                        None => Poll::Pending,
                    };
                }
                Checkout::Connecting(connecting) => return connecting.as_mut().poll(cx),
                Checkout::Waiting(waiting) => match Pin::new(&mut waiting.rx).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(handoff) => (handoff.ok(), waiting.pool.clone()),
                },
            };
            match handoff {
                (Some(Handoff::Conn(conn)), pool) => {
                    *this = Checkout::Ready(None);
                    return Poll::Ready(Ok(pool.pooled(conn)));
                }
                // The place is this checkout's now: the waiting ends without handing
                // anything back, and the connection attempt owns the place.
                (Some(Handoff::Slot), pool) => *this = Checkout::connecting(pool),
                (Some(Handoff::Failed(e)), _) => {
                    *this = Checkout::Ready(None);
                    return Poll::Ready(Err(e));
                }
                // The pool's task dropped the sender: the wait ran out.
                (None, pool) => {
                    *this = Checkout::Ready(None);
                    return Poll::Ready(Err(BackendError::Timeout(format!(
                        "{}: every pooled connection stayed busy for query_wait_timeout_ms ({} ms)",
                        pool.login.addr,
                        pool.settings.wait_timeout.as_millis()
                    ))));
                }
            }
        }
    }
}

/// A checkout waiting for a connection. If the caller gives up (timeout, or its
/// future is dropped), a connection or place handed to it meanwhile goes back.
pub struct Waiting {
    pool: Arc<PoolInner>,
    rx: oneshot::Receiver<Handoff>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Handoff::Conn(conn)) => self.pool.put_back(conn),
            Ok(Handoff::Slot) => self.pool.release_place(),
            Ok(Handoff::Failed(_)) | Err(_) => {}
        }
    }
}

/// A server connection checked out of a pool; goes back when dropped.
pub struct Pooled {
    /// Boxed: a connection changes hands on every transaction, and moving a pointer
    /// is cheaper than moving the whole connection state.
    conn: Option<Box<ServerConn>>,
    pool: Arc<PoolInner>,
}

impl Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        // Present from construction until drop.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkout that waits (every one, with more clients than connections) carries
    /// its future, a few words; opening a connection, kilobytes, is boxed apart.
    #[tokio::test]
    async fn a_checkout_that_waits_stays_small() {
        let pool = test_pool(Duration::from_secs(1));
        let checkout = pool.get();
        let size = std::mem::size_of_val(&checkout);
        assert!(size <= 32, "a checkout's future takes {size} bytes");
    }

    /// The pool's task ends a wait at its deadline, not before, oldest first; a
    /// checkout that gave up is dropped from the queue on the way.
    #[tokio::test]
    async fn waits_run_out_in_order_at_their_deadline() {
        let pool = test_pool(Duration::from_millis(300));
        let start = tokio::time::Instant::now();
        let queue = |at_ms: u64| {
            let (tx, rx) = oneshot::channel();
            pool.inner.lock().waiters.push_back(Waiter {
                tx,
                deadline: start + Duration::from_millis(at_ms),
            });
            rx
        };
        let mut first = queue(300);
        let gave_up = queue(350);
        let mut third = queue(400);
        drop(gave_up);
        let at = |ms: u64| start + Duration::from_millis(ms);

        assert_eq!(pool.inner.expire_waiters(at(299)), Some(at(300)));
        assert!(
            first
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );

        // The first runs out; the one that gave up goes with it; the third waits on.
        assert_eq!(pool.inner.expire_waiters(at(300)), Some(at(400)));
        assert!(
            first
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert!(
            third
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(pool.inner.lock().waiters.len(), 1);

        assert_eq!(pool.inner.expire_waiters(at(450)), None);
        assert!(
            third
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
    }

    /// A checkout of a full pool ends with the timeout error after the wait, through
    /// the pool's own task (on tokio's paused clock: no real time passes).
    #[tokio::test(start_paused = true)]
    async fn a_checkout_of_a_full_pool_times_out_after_the_wait() {
        let pool = test_pool(Duration::from_millis(300));
        // The pool is full: its one place is taken by a connection being opened.
        pool.inner.lock().total = 1;
        let start = tokio::time::Instant::now();
        let err = match tokio::time::timeout(Duration::from_secs(5), pool.get()).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("a full pool handed out a connection"),
            Err(_) => panic!("the wait did not end at query_wait_timeout_ms"),
        };
        assert!(
            err.to_string().contains("query_wait_timeout_ms (300 ms)"),
            "{err}"
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
            "waited {waited:?}"
        );
        assert!(pool.inner.lock().waiters.is_empty());
    }

    fn test_pool(wait_timeout: Duration) -> Pool {
        let addr = crate::config::NodeAddress::parse("postgresql://127.0.0.1:1/app")
            .expect("a test address");
        Pool::new(
            LoginInfo {
                addr: Arc::new(addr),
                database: "app".into(),
                user: "app".into(),
                password: "secret".into(),
                scram_keys: None,
                extra_params: Vec::new(),
            },
            PoolSettings {
                size: 1,
                connect_timeout: Duration::from_secs(1),
                wait_timeout,
                idle_timeout: Duration::from_secs(60),
                lifetime: None,
                keepalive: Keepalive::default(),
            },
        )
    }
}
