//! What the proxy knows about one node's health and freshness, and the rules that turn
//! monitor observations into a routing state (with hysteresis, so that a replica near
//! its lag tolerance does not flap in and out of the rotation).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Consecutive good checks a node needs before it re-enters the rotation.
pub const RECOVERY_CHECKS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeState {
    /// Not checked yet: used for reads, as a proxy without a monitor would.
    Unknown = 0,
    Up = 1,
    /// Reachable, but further behind than its `lag_tolerance_ms`.
    Lagging = 2,
    /// Refused connections or did not answer the last check in time.
    Down = 3,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Unknown => "unknown",
            NodeState::Up => "up",
            NodeState::Lagging => "lagging",
            NodeState::Down => "down",
        }
    }

    fn from_u8(v: u8) -> NodeState {
        match v {
            1 => NodeState::Up,
            2 => NodeState::Lagging,
            3 => NodeState::Down,
            _ => NodeState::Unknown,
        }
    }

    pub fn serves_reads(self) -> bool {
        matches!(self, NodeState::Up | NodeState::Unknown)
    }
}

/// One check's result.
#[derive(Debug, Clone, Copy)]
pub enum Observation {
    Unreachable,
    /// `lag_ms` is 0 for the primary.
    Reachable {
        lag_ms: u64,
    },
}

/// Next state from the current one, an observation and the count of consecutive good
/// checks so far (updated in place). A node leaves the rotation on the first bad check
/// and needs [`RECOVERY_CHECKS`] good ones in a row to come back; for lag, "good" means
/// at most half the tolerance, so a replica hovering at its limit stays out.
pub fn next_state(
    current: NodeState,
    observation: Observation,
    tolerance_ms: u64,
    good_streak: &mut u32,
) -> NodeState {
    let lag_ms = match observation {
        Observation::Unreachable => {
            *good_streak = 0;
            return NodeState::Down;
        }
        Observation::Reachable { lag_ms } => lag_ms,
    };
    let too_far = lag_ms > tolerance_ms;
    let comfortably_close = lag_ms <= tolerance_ms / 2;
    match current {
        NodeState::Unknown | NodeState::Up => {
            *good_streak = 0;
            if too_far {
                NodeState::Lagging
            } else {
                NodeState::Up
            }
        }
        NodeState::Lagging | NodeState::Down => {
            if !comfortably_close {
                *good_streak = 0;
                return if too_far { NodeState::Lagging } else { current };
            }
            *good_streak += 1;
            if *good_streak >= RECOVERY_CHECKS {
                *good_streak = 0;
                NodeState::Up
            } else {
                current
            }
        }
    }
}

/// Health facts of a node, written by the monitor and read lock-free by sessions.
pub struct Health {
    state: AtomicU8,
    lag_ms: AtomicU64,
    lag_bytes: AtomicU64,
    /// Replicas: last known replay position. Primary: last known current WAL position.
    lsn: AtomicU64,
    checks_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Lag in ms at the last check that reached the primary: what failover judges by.
    /// `LAG_UNKNOWN` until such a check (a fresh start knows nothing).
    lag_at_primary_seen_ms: AtomicU64,
    /// Primary: the timeline it writes on (0 until known).
    timeline: AtomicU64,
}

const LAG_UNKNOWN: u64 = u64::MAX;

impl Default for Health {
    fn default() -> Self {
        Health {
            state: AtomicU8::new(NodeState::Unknown as u8),
            lag_ms: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lsn: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            last_error: Mutex::new(None),
            lag_at_primary_seen_ms: AtomicU64::new(LAG_UNKNOWN),
            timeline: AtomicU64::new(0),
        }
    }
}

impl Health {
    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: NodeState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }

    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes.load(Ordering::Relaxed)
    }

    pub fn set_lag(&self, ms: u64, bytes: u64) {
        self.lag_ms.store(ms, Ordering::Relaxed);
        self.lag_bytes.store(bytes, Ordering::Relaxed);
    }

    /// `None` when no check reached the primary and this node together yet.
    pub fn lag_at_primary_seen_ms(&self) -> Option<u64> {
        let ms = self.lag_at_primary_seen_ms.load(Ordering::Relaxed);
        (ms != LAG_UNKNOWN).then_some(ms)
    }

    pub fn set_lag_at_primary_seen_ms(&self, ms: u64) {
        self.lag_at_primary_seen_ms
            .store(ms.min(LAG_UNKNOWN - 1), Ordering::Relaxed);
    }

    /// After a promotion: lag against the old primary says nothing about the new one.
    pub fn forget_lag_at_primary_seen(&self) {
        self.lag_at_primary_seen_ms
            .store(LAG_UNKNOWN, Ordering::Relaxed);
    }

    pub fn timeline(&self) -> u64 {
        self.timeline.load(Ordering::Relaxed)
    }

    pub fn set_timeline(&self, timeline: u64) {
        self.timeline.store(timeline, Ordering::Relaxed);
    }

    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }

    /// Positions only move forward; a fresher observation from a session may already
    /// have raised it.
    pub fn advance_lsn(&self, lsn: u64) {
        self.lsn.fetch_max(lsn, Ordering::Relaxed);
    }

    pub fn checks_failed(&self) -> u64 {
        self.checks_failed.load(Ordering::Relaxed)
    }

    pub fn record_failure(&self, error: String) {
        self.checks_failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(error);
        }
    }

    pub fn clear_error(&self) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = None;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// The primary's WAL positions over time, to turn a replica's byte lag into time: a
/// replica that has replayed up to `p` is as old as the moment the primary first went
/// past `p`. On an idle primary nothing is pending, so the lag stays 0 however long ago
/// the last write was.
#[derive(Default)]
pub struct WalHistory {
    samples: VecDeque<(Instant, u64)>,
}

/// Enough samples for several minutes at the default interval.
const HISTORY_LIMIT: usize = 4096;

impl WalHistory {
    pub fn record(&mut self, at: Instant, lsn: u64) {
        if self.samples.back().is_some_and(|&(_, last)| lsn <= last) {
            return;
        }
        if self.samples.len() == HISTORY_LIMIT {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|&(_, lsn)| lsn)
    }

    /// (milliseconds, bytes) a replica at `replay` is behind, as of `now`.
    pub fn lag(&self, now: Instant, replay: u64) -> (u64, u64) {
        let Some(latest) = self.latest() else {
            return (0, 0);
        };
        if replay >= latest {
            return (0, 0);
        }
        let since = self
            .samples
            .iter()
            .find(|&&(_, lsn)| lsn > replay)
            .map(|&(at, _)| at)
            .unwrap_or(now);
        let ms = now.saturating_duration_since(since).as_millis() as u64;
        (ms, latest - replay)
    }
}

/// Parses Postgres' textual LSN (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// How long a check may take before the node counts as not answering.
pub fn check_timeout(interval: Duration) -> Duration {
    interval.max(Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("garbage"), None);
    }

    #[test]
    fn idle_primary_means_no_lag() {
        let t0 = Instant::now();
        let mut h = WalHistory::default();
        h.record(t0, 100);
        // Nothing written for a long time; the replica has everything.
        h.record(t0 + Duration::from_secs(600), 100);
        assert_eq!(h.lag(t0 + Duration::from_secs(600), 100), (0, 0));
    }

    #[test]
    fn lag_counts_from_the_first_unreplayed_position() {
        let t0 = Instant::now();
        let mut h = WalHistory::default();
        h.record(t0, 100);
        h.record(t0 + Duration::from_millis(500), 200);
        h.record(t0 + Duration::from_millis(1000), 300);
        let now = t0 + Duration::from_millis(1200);
        // Replayed up to 150: behind since the primary first passed 150 (t0 + 500).
        assert_eq!(h.lag(now, 150), (700, 150));
        assert_eq!(h.lag(now, 300), (0, 0));
        assert_eq!(h.lag(now, 350), (0, 0));
    }

    #[test]
    fn replicas_leave_at_once_and_return_after_good_checks() {
        let mut streak = 0;
        let far = Observation::Reachable { lag_ms: 6000 };
        let near_limit = Observation::Reachable { lag_ms: 4000 };
        let fresh = Observation::Reachable { lag_ms: 0 };
        let s = next_state(NodeState::Up, far, 5000, &mut streak);
        assert_eq!(s, NodeState::Lagging);
        // Just under the tolerance is not enough to come back: no flapping.
        let s = next_state(s, near_limit, 5000, &mut streak);
        assert_eq!(s, NodeState::Lagging);
        let s = next_state(s, fresh, 5000, &mut streak);
        assert_eq!(s, NodeState::Lagging);
        let s = next_state(s, fresh, 5000, &mut streak);
        assert_eq!(s, NodeState::Up);
        // An unreachable node is down on the first failed check.
        let s = next_state(s, Observation::Unreachable, 5000, &mut streak);
        assert_eq!(s, NodeState::Down);
        let s = next_state(s, fresh, 5000, &mut streak);
        assert_eq!(s, NodeState::Down);
        let s = next_state(s, Observation::Unreachable, 5000, &mut streak);
        let s = next_state(s, fresh, 5000, &mut streak);
        assert_eq!(
            s,
            NodeState::Down,
            "a failure in between restarts the count"
        );
        let s = next_state(s, fresh, 5000, &mut streak);
        assert_eq!(s, NodeState::Up);
    }

    #[test]
    fn zero_tolerance_means_caught_up() {
        let mut streak = 0;
        let s = next_state(
            NodeState::Unknown,
            Observation::Reachable { lag_ms: 1 },
            0,
            &mut streak,
        );
        assert_eq!(s, NodeState::Lagging);
    }
}
