//! Routing decisions cached by statement text, so each distinct text is parsed once.
//!
//! Drivers send the same few statement texts over and over; sqlparser costs tens of
//! microseconds per statement, a hash lookup well under one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::classify::classify;
use super::decision::Decision;

pub struct DecisionCache {
    map: RwLock<HashMap<Box<str>, Arc<Decision>>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn decide(&self, sql: &str) -> Arc<Decision> {
        if let Ok(map) = self.map.read()
            && let Some(decision) = map.get(sql)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return decision.clone();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let decision = Arc::new(classify(sql));
        if let Ok(mut map) = self.map.write() {
            // Applications with unbounded distinct texts (literals inlined) would grow
            // the map forever; starting over is simple and keeps memory bounded.
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(sql.into(), decision.clone());
        }
        decision
    }

    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    pub fn len(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lookup_is_a_hit_and_capacity_is_bounded() {
        let cache = DecisionCache::new(2);
        cache.decide("SELECT 1");
        cache.decide("SELECT 1");
        assert_eq!(cache.stats(), (1, 1));
        cache.decide("SELECT 2");
        cache.decide("SELECT 3");
        assert!(cache.len() <= 2);
    }
}
