//! The session's clock: `client_idle_timeout_ms`, `idle_transaction_timeout_ms`,
//! `query_timeout_ms` and `client_write_timeout_ms`.
//!
//! One timer per session, armed lazily: it is set to the earliest deadline that any
//! timeout could have, and only moved earlier, never later. When it fires the session
//! looks at what really happened meanwhile (a deadline that moved on fires once more,
//! for nothing) and arms it again. So a busy session touches the timer wheel about once
//! per timeout period, not once per message, and a session with every timeout off
//! never creates the timer at all. The clock is read only where a state changes that a
//! timeout configured now could measure.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::config::ProxySettings;

/// The timeouts that apply to a session (None: off), taken from the config when the
/// session starts and again whenever it is idle, so that a reload reaches it at its
/// next transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Timeouts {
    pub client_idle: Limit,
    pub idle_transaction: Limit,
    pub query: Limit,
    pub client_write: Limit,
}

/// A timeout in milliseconds, 0 for none: four bytes, as every session keeps these
/// (an `Option<Duration>` takes sixteen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Limit(u32);

impl Limit {
    /// Anything over 49 days is as good as no timeout, and is kept as that long.
    pub fn ms(ms: u64) -> Limit {
        Limit(u32::try_from(ms).unwrap_or(u32::MAX))
    }

    pub fn get(self) -> Option<Duration> {
        (self.0 > 0).then(|| Duration::from_millis(u64::from(self.0)))
    }
}

impl Timeouts {
    pub fn from_settings(proxy: &ProxySettings) -> Timeouts {
        let ms = Limit::ms;
        Timeouts {
            client_idle: ms(proxy.client_idle_timeout_ms),
            idle_transaction: ms(proxy.idle_transaction_timeout_ms),
            query: ms(proxy.query_timeout_ms),
            client_write: ms(proxy.client_write_timeout_ms),
        }
    }

    /// Whether the session needs to know since when it has been idle.
    fn watches_idleness(&self) -> bool {
        self.client_idle.get().is_some() || self.idle_transaction.get().is_some()
    }
}

/// What the session is doing, as far as the timeouts care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Between transactions, nothing in flight.
    Idle,
    /// Inside a transaction (or an unfinished batch or COPY), nothing in flight.
    IdleInTransaction,
    /// Requests sent and not answered to the end.
    Busy,
}

/// Which timeout ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    ClientIdle(Duration),
    IdleTransaction(Duration),
    /// The query running since the given instant is to be cancelled.
    Query(Duration),
    ClientWrite(Duration),
}

pub(super) struct SessionClock {
    pub timeouts: Timeouts,
    phase: Phase,
    /// Since when the session is in `phase` (only kept while idleness is watched).
    phase_since: Option<Instant>,
    /// Since when bytes for the client have waited for its socket without any of them
    /// being taken.
    write_stalled_since: Option<Instant>,
    /// The query now running was already cancelled once.
    query_cancelled: bool,
}

/// The session's one timer: armed at the clock's earliest deadline and only moved
/// earlier (see the module comment). The shell keeps it; the clock in the core is
/// plain state.
#[derive(Default)]
pub(super) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
}

impl Timer {
    /// Arms the timer for `deadline` (from `SessionClock::deadline`): only ever earlier.
    pub fn arm(&mut self, deadline: Option<Instant>) {
        let Some(deadline) = deadline else {
            return;
        };
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        self.armed = Some(deadline);
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Ready when the armed deadline passes; disarms the timer then.
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(sleep) = self.sleep.as_mut() else {
            return Poll::Pending;
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.armed = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl SessionClock {
    pub fn new(timeouts: Timeouts) -> SessionClock {
        SessionClock {
            timeouts,
            phase: Phase::Idle,
            phase_since: None,
            write_stalled_since: None,
            query_cancelled: false,
        }
    }

    /// The session's phase after an event; the clock is read only when it changed
    /// and an idle timeout is on.
    pub fn set_phase(&mut self, phase: Phase) {
        if phase != self.phase {
            self.phase = phase;
            self.phase_since = self.timeouts.watches_idleness().then(Instant::now);
        } else if self.phase_since.is_none() && self.timeouts.watches_idleness() {
            // A timeout switched on by a reload starts counting now.
            self.phase_since = Some(Instant::now());
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes for the client wait for its socket (it took none of them just now).
    pub fn client_write_waiting(&mut self) {
        if self.write_stalled_since.is_none() && self.timeouts.client_write.get().is_some() {
            self.write_stalled_since = Some(Instant::now());
        }
    }

    /// The client's socket took bytes.
    pub fn client_write_progressed(&mut self) {
        self.write_stalled_since = None;
    }

    /// A new query started on the server: it may be cancelled again.
    pub fn query_started(&mut self) {
        self.query_cancelled = false;
    }

    pub fn query_cancel_sent(&mut self) {
        self.query_cancelled = true;
    }

    /// The earliest instant at which a timeout could run out, given the state;
    /// `query_since` is when the query now running was sent (None: none runs).
    pub fn deadline(&self, query_since: Option<Instant>) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| {
            next = Some(next.map_or(at, |n| n.min(at)));
        };
        if let (Some(limit), Some(since)) =
            (self.timeouts.client_write.get(), self.write_stalled_since)
        {
            consider(since + limit);
        }
        match (self.phase, self.phase_since) {
            (Phase::Idle, Some(since)) => {
                if let Some(limit) = self.timeouts.client_idle.get() {
                    consider(since + limit);
                }
            }
            (Phase::IdleInTransaction, Some(since)) => {
                if let Some(limit) = self.timeouts.idle_transaction.get() {
                    consider(since + limit);
                }
            }
            _ => {}
        }
        if let (Phase::Busy, Some(limit), Some(since), false) = (
            self.phase,
            self.timeouts.query.get(),
            query_since,
            self.query_cancelled,
        ) {
            consider(since + limit);
        }
        next
    }

    /// The timeout that really ran out, if one did, after the timer fired.
    pub fn expired(&self, query_since: Option<Instant>) -> Option<Expired> {
        let now = Instant::now();
        let past = |since: Instant, limit: Duration| now >= since + limit;
        if let (Some(limit), Some(since)) =
            (self.timeouts.client_write.get(), self.write_stalled_since)
            && past(since, limit)
        {
            return Some(Expired::ClientWrite(limit));
        }
        match (self.phase, self.phase_since) {
            (Phase::Idle, Some(since)) => {
                if let Some(limit) = self.timeouts.client_idle.get()
                    && past(since, limit)
                {
                    return Some(Expired::ClientIdle(limit));
                }
            }
            (Phase::IdleInTransaction, Some(since)) => {
                if let Some(limit) = self.timeouts.idle_transaction.get()
                    && past(since, limit)
                {
                    return Some(Expired::IdleTransaction(limit));
                }
            }
            (Phase::Busy, _) => {
                if let (Some(limit), Some(since), false) =
                    (self.timeouts.query.get(), query_since, self.query_cancelled)
                    && past(since, limit)
                {
                    return Some(Expired::Query(limit));
                }
            }
            _ => {}
        }
        None
    }

    /// New timeouts from a reload.
    pub fn update(&mut self, timeouts: Timeouts) {
        if timeouts != self.timeouts {
            self.timeouts = timeouts;
            if !timeouts.watches_idleness() {
                self.phase_since = None;
            }
            if timeouts.client_write.get().is_none() {
                self.write_stalled_since = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(timeouts: Timeouts) -> SessionClock {
        SessionClock::new(timeouts)
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_timeout_off_nothing_is_ever_armed() {
        let mut c = clock(Timeouts::default());
        let mut t = Timer::default();
        for phase in [Phase::Busy, Phase::IdleInTransaction, Phase::Idle] {
            c.set_phase(phase);
            c.client_write_waiting();
            t.arm(c.deadline(Some(Instant::now())));
            assert!(!t.is_armed());
            assert!(t.sleep.is_none());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_idle_in_transaction_count_from_when_the_phase_began() {
        let mut c = clock(Timeouts {
            client_idle: Limit::ms(10000),
            idle_transaction: Limit::ms(3000),
            ..Timeouts::default()
        });
        let mut t = Timer::default();
        c.set_phase(Phase::Busy);
        c.set_phase(Phase::IdleInTransaction);
        t.arm(c.deadline(None));
        assert!(t.is_armed());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.expired(None), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            c.expired(None),
            Some(Expired::IdleTransaction(Duration::from_secs(3)))
        );
        // Back to idle: the idle clock starts again from zero.
        c.set_phase(Phase::Idle);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(c.expired(None), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            c.expired(None),
            Some(Expired::ClientIdle(Duration::from_secs(10)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_only_moves_earlier_and_fires_for_the_earliest_deadline() {
        let mut c = clock(Timeouts {
            query: Limit::ms(5000),
            client_write: Limit::ms(1000),
            ..Timeouts::default()
        });
        let mut t = Timer::default();
        c.set_phase(Phase::Busy);
        let sent = Instant::now();
        t.arm(c.deadline(Some(sent)));
        assert_eq!(t.armed, Some(Instant::now() + Duration::from_secs(5)));
        c.client_write_waiting();
        t.arm(c.deadline(Some(sent)));
        assert_eq!(t.armed, Some(Instant::now() + Duration::from_secs(1)));
        // A later deadline leaves the timer where it is.
        tokio::time::advance(Duration::from_millis(500)).await;
        c.client_write_progressed();
        c.client_write_waiting();
        t.arm(c.deadline(Some(sent)));
        assert_eq!(
            t.armed,
            Some(Instant::now() + Duration::from_millis(500)),
            "not moved later"
        );
        // It fires; nothing ran out yet (the write progressed), and it is armed again.
        std::future::poll_fn(|cx| t.poll_fired(cx)).await;
        assert!(!t.is_armed());
        assert_eq!(c.expired(Some(sent)), None);
        t.arm(c.deadline(Some(sent)));
        assert!(t.is_armed());
        std::future::poll_fn(|cx| t.poll_fired(cx)).await;
        assert_eq!(
            c.expired(Some(sent)),
            Some(Expired::ClientWrite(Duration::from_secs(1)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_is_cancelled_once() {
        let mut c = clock(Timeouts {
            query: Limit::ms(2000),
            ..Timeouts::default()
        });
        let mut t = Timer::default();
        c.set_phase(Phase::Busy);
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            c.expired(Some(sent)),
            Some(Expired::Query(Duration::from_secs(2)))
        );
        c.query_cancel_sent();
        assert_eq!(c.expired(Some(sent)), None);
        t.arm(c.deadline(Some(sent)));
        assert!(!t.is_armed(), "nothing left to time");
        c.query_started();
        assert!(c.expired(Some(sent)).is_some());
    }
}
