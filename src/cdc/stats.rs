//! Per-rule figures for SHOW RULES, /status and /metrics. Counters are atomics the
//! rule's task bumps; the few strings sit behind a mutex touched once per batch.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub struct RuleStats {
    pub inserted: AtomicU64,
    pub updated: AtomicU64,
    pub deleted: AtomicU64,
    pub snapshot_rows: AtomicU64,
    /// Writes the position guard or `target-wins` turned away.
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
    pub runs: AtomicU64,
    /// Last position confirmed to the source slot (everything before is in the target).
    pub position: AtomicU64,
    /// When the source was last known to be at a position we have confirmed.
    pub caught_up_at_ms: AtomicU64,
    pub last_run_started_ms: AtomicU64,
    pub last_run_finished_ms: AtomicU64,
    info: Mutex<Info>,
}

#[derive(Default, Clone)]
struct Info {
    state: String,
    last_error: Option<String>,
    snapshot: Option<SnapshotProgress>,
    /// (time ms, rows applied in total) samples for the throughput figure.
    previous_sample: (u64, u64),
    latest_sample: (u64, u64),
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotProgress {
    pub table: String,
    pub tables_done: usize,
    pub tables_total: usize,
    pub rows_copied: u64,
}

/// What one run did, returned by SYNC.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub rule: String,
    pub snapshot: bool,
    pub snapshot_rows: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub position: String,
    pub duration_ms: u64,
}

impl RuleStats {
    fn info(&self) -> std::sync::MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_state(&self, state: &str) {
        let mut info = self.info();
        if info.state != state {
            info.state = state.to_string();
        }
    }

    pub fn state(&self) -> String {
        self.info().state.clone()
    }

    pub fn record_error(&self, error: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.info().last_error = Some(error.to_string());
    }

    pub fn clear_error(&self) {
        self.info().last_error = None;
    }

    pub fn last_error(&self) -> Option<String> {
        self.info().last_error.clone()
    }

    pub fn set_snapshot(&self, progress: Option<SnapshotProgress>) {
        self.info().snapshot = progress;
    }

    pub fn snapshot(&self) -> Option<SnapshotProgress> {
        self.info().snapshot.clone()
    }

    pub fn total_rows(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
            + self.updated.load(Ordering::Relaxed)
            + self.deleted.load(Ordering::Relaxed)
            + self.snapshot_rows.load(Ordering::Relaxed)
    }

    /// Takes a throughput sample at most once a second.
    pub fn sample(&self) {
        let now = now_ms();
        let total = self.total_rows();
        let mut info = self.info();
        if now.saturating_sub(info.latest_sample.0) >= 1000 {
            info.previous_sample = info.latest_sample;
            info.latest_sample = (now, total);
        }
    }

    /// Rows per second between the last two samples (0 when idle).
    pub fn rows_per_second(&self) -> f64 {
        let info = self.info();
        let (t0, r0) = info.previous_sample;
        let (t1, r1) = info.latest_sample;
        if t0 == 0 || t1 <= t0 || now_ms().saturating_sub(t1) > 5000 {
            return 0.0;
        }
        (r1.saturating_sub(r0)) as f64 * 1000.0 / (t1 - t0) as f64
    }
}
