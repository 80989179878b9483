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
//! - The handoff itself goes through the pool's own state, under the lock the return
//!   takes anyway: a waiting checkout is a ticket in the queue and its task's waker,
//!   and what it is handed waits under its ticket until it looks. No channel is made
//!   per wait (with more clients than connections, every checkout waits, and a
//!   channel was an allocation and a few cache lines of its own each time).
//! - A failed connection attempt fails every waiting checkout at once: a session
//!   waiting for a node that just refused a connection should try another node, not
//!   sit out its timeout.
//! - A connection is checked before it is handed out (an idle server that closed or
//!   sent a FATAL is noticed without a round trip, from the socket's readiness), and
//!   one marked broken is closed instead of pooled, as is one older than
//!   `server_lifetime_ms` (so that servers' memory and a changed DNS name or
//!   configuration are taken up over time).

mod checkout;
pub mod recover;
pub mod server;

use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub use checkout::Checkout;
use checkout::{Stage, Waiting};
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
    /// Queued checkouts, oldest first (so in ticket order).
    waiters: VecDeque<Waiter>,
    /// What was handed to queued checkouts that have not looked yet, by ticket: at
    /// most one entry per connection or place of the pool, so a short list.
    handed: Vec<(u64, Handoff)>,
    /// The last failed connection attempt and the first ticket it did not fail: every
    /// checkout queued before it was waiting on that attempt, and gets its error.
    failed: Option<(u64, BackendError)>,
    next_ticket: u64,
}

/// A queued checkout: its ticket, how to wake it, and when it gives up.
struct Waiter {
    ticket: u64,
    waker: Waker,
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

    /// A connection from the pool, a new one if there is room, or the next one returned
    /// within the wait timeout. Decided when first polled (a waiting checkout needs
    /// its task's waker); the caller awaits it at once.
    ///
    /// A plain future rather than an `async fn`: a checkout that waits, the common case
    /// under load, is a few words (its ticket), not a state machine sized for opening
    /// a connection (that one is boxed, made only when needed).
    pub fn get(&self) -> Checkout {
        Checkout(Stage::Start(self.inner.clone()))
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

    /// Hands `handoff` to the oldest waiter and returns its waker (to wake once the
    /// lock is let go), or gives `handoff` back if nobody waits.
    fn hand_to_oldest(&mut self, handoff: Handoff) -> Result<Waker, Handoff> {
        match self.waiters.pop_front() {
            Some(waiter) => {
                self.handed.push((waiter.ticket, handoff));
                Ok(waiter.waker)
            }
            None => Err(handoff),
        }
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

    /// The first poll of a checkout: an idle connection, a place to open one, or a
    /// place in the queue.
    fn start(self: Arc<Self>, waker: &Waker) -> Stage {
        let mut state = self.lock();
        if let Some(conn) = state.pop_usable() {
            drop(state);
            return Stage::Ready(Some(Pooled {
                conn: Some(conn),
                pool: self,
            }));
        }
        if state.total < self.settings.size {
            state.total += 1;
            drop(state);
            return Stage::connecting(self);
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiters.push_back(Waiter {
            ticket,
            waker: waker.clone(),
            deadline: tokio::time::Instant::now() + self.settings.wait_timeout,
        });
        drop(state);
        Stage::Waiting(Waiting {
            pool: self,
            ticket: Some(ticket),
        })
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
                let waiters = {
                    let mut state = self.lock();
                    state.failed = Some((state.next_ticket, e.duplicate()));
                    std::mem::take(&mut state.waiters)
                };
                for waiter in waiters {
                    waiter.waker.wake();
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
        match state.hand_to_oldest(Handoff::Conn(conn)) {
            Ok(waker) => {
                drop(state);
                waker.wake();
            }
            Err(Handoff::Conn(conn)) => state.idle.push(IdleConn {
                conn,
                since: Instant::now(),
            }),
            Err(Handoff::Slot) => {}
        }
    }

    fn past_lifetime(&self, conn: &ServerConn) -> bool {
        self.settings
            .lifetime
            .is_some_and(|lifetime| conn.opened.elapsed() >= lifetime)
    }

    /// A place in the pool is free: the oldest waiter takes it, or the pool shrinks.
    fn release_place(&self) {
        let mut state = self.lock();
        match state.hand_to_oldest(Handoff::Slot) {
            Ok(waker) => {
                drop(state);
                waker.wake();
            }
            Err(_) => state.total = state.total.saturating_sub(1),
        }
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
    /// equally long): they leave the queue with nothing handed to them, which the
    /// waiting checkout reads as the timeout. The next deadline, if a checkout still
    /// waits.
    fn expire_waiters(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut state = self.lock();
            loop {
                match state.waiters.front() {
                    Some(front) if front.deadline > now => break Some(front.deadline),
                    Some(_) => expired.extend(state.waiters.pop_front()),
                    None => break None,
                }
            }
        };
        for waiter in expired {
            waiter.waker.wake();
        }
        next
    }

    /// Where a queued checkout stands: handed something, still queued, or out of the
    /// queue with nothing (its connection attempt failed, or its wait ran out).
    fn look(&self, ticket: u64, waker: &Waker) -> Poll<Result<Handoff, BackendError>> {
        let mut state = self.lock();
        if let Some(i) = state.handed.iter().position(|(t, _)| *t == ticket) {
            return Poll::Ready(Ok(state.handed.swap_remove(i).1));
        }
        if let Ok(i) = state.waiters.binary_search_by_key(&ticket, |w| w.ticket) {
            // Still waiting (this poll was for something else of the task's).
            let waiter = &mut state.waiters[i];
            if !waiter.waker.will_wake(waker) {
                waiter.waker = waker.clone();
            }
            return Poll::Pending;
        }
        if let Some((before, e)) = &state.failed
            && ticket < *before
        {
            return Poll::Ready(Err(e.duplicate()));
        }
        Poll::Ready(Err(BackendError::Timeout(format!(
            "{}: every pooled connection stayed busy for query_wait_timeout_ms ({} ms)",
            self.login.addr,
            self.settings.wait_timeout.as_millis()
        ))))
    }

    /// A queued checkout gives up: it leaves the queue, and what it was handed
    /// meanwhile goes back.
    fn abandon(&self, ticket: u64) {
        let handed = {
            let mut state = self.lock();
            if let Ok(i) = state.waiters.binary_search_by_key(&ticket, |w| w.ticket) {
                state.waiters.remove(i);
            }
            state
                .handed
                .iter()
                .position(|(t, _)| *t == ticket)
                .map(|i| state.handed.swap_remove(i).1)
        };
        match handed {
            Some(Handoff::Conn(conn)) => self.put_back(conn),
            Some(Handoff::Slot) => self.release_place(),
            None => {}
        }
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
mod tests;
