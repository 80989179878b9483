//! Counters the data path bumps per statement: plain atomics, read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A lock-free latency histogram (the Prometheus client's own takes a lock per sample).
#[derive(Default)]
pub struct Latency {
    /// One counter per bucket plus the overflow bucket; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    pub fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let i = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Cumulative (upper bound in seconds, count) pairs, ending with +Inf.
    pub fn cumulative_buckets(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            acc += bucket.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS_US
                .get(i)
                .map(|&us| us as f64 / 1e6)
                .unwrap_or(f64::INFINITY);
            out.push((bound, acc));
        }
        out
    }
}

#[derive(Default)]
pub struct NodeStats {
    /// Statements routed here as reads / as writes (everything the primary runs for a
    /// reason other than read fallback).
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Parse messages answered by the proxy because the server's unnamed statement
    /// already was that statement.
    pub parses_saved: AtomicU64,
    /// From sending a request to the server until its ReadyForQuery.
    pub latency: Latency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let l = Latency::default();
        l.observe(Duration::from_micros(50));
        l.observe(Duration::from_micros(100));
        l.observe(Duration::from_micros(101));
        l.observe(Duration::from_secs(60));
        let b = l.cumulative_buckets();
        assert_eq!(b[0], (0.0001, 2));
        assert_eq!(b[1], (0.00025, 3));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 4)));
        assert_eq!(l.count(), 4);
    }
}
