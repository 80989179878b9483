//! Changes on their way to a target, and the batch that carries them.
//!
//! Every change carries the position of its source transaction; the sinks store it with
//! each document or row and refuse to replace a newer one with an older one. That is
//! what makes replays (after a crash, a retry or a re-snapshot) harmless.
//!
//! A position is the commit LSN under the source's timeline: `timeline << 48 | lsn`.
//! After a failover the new primary's timeline is higher, so everything it says beats
//! what the old primary said, even where the old primary had written WAL past the point
//! the new one branched from (writes lost with it).

use std::collections::HashMap;
use std::sync::Arc;

use super::pgoutput::Datum;
use super::schema::Shape;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Insert or update: the whole row (aligned with the shape's columns); TOASTed
    /// values the update did not touch are `Datum::Unchanged` and are left as they are.
    Upsert(Vec<Datum>),
    /// The key values (aligned with the shape's key).
    Delete(Vec<Datum>),
    /// Removes what this rule wrote to the table up to this position.
    Truncate,
}

#[derive(Debug, Clone)]
pub struct Change {
    pub shape: Arc<Shape>,
    /// `position(timeline, commit LSN)` of the source transaction (of the snapshot's
    /// consistent point for snapshot rows).
    pub position: i64,
    pub op: Op,
    /// The source inserted this row and the batch holds nothing earlier for its key:
    /// the target most likely lacks it, so a sink may try a plain insert first (and
    /// fall back to the guarded upsert when the key exists).
    pub insert: bool,
}

/// Low 48 bits: the LSN (256 TiB of WAL); above them the timeline.
const LSN_BITS: u32 = 48;

pub fn position(timeline: u32, lsn: u64) -> i64 {
    let timeline = i64::from(timeline.min(0x7fff));
    (timeline << LSN_BITS) | (lsn & ((1u64 << LSN_BITS) - 1)) as i64
}

impl Change {
    pub fn key(&self) -> Option<Vec<Datum>> {
        match &self.op {
            Op::Upsert(row) => Some(self.shape.key.iter().map(|&i| row[i].clone()).collect()),
            Op::Delete(key) => Some(key.clone()),
            Op::Truncate => None,
        }
    }
}

/// Changes collected for one apply. Several changes to one key collapse into the last
/// one (keeping TOAST values an earlier change carried), so a batch holds each key at
/// most once and the sinks may write keys in any order: per-key commit order holds.
#[derive(Default)]
pub struct Batch {
    changes: Vec<Change>,
    index: HashMap<(String, Vec<Datum>), usize>,
    truncates: Vec<Change>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.changes.len() + self.truncates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, change: Change) {
        let Some(key) = change.key() else {
            self.truncates.push(change);
            return;
        };
        let slot = (change.shape.target.clone(), key);
        match self.index.get(&slot) {
            Some(&at) => {
                let earlier = std::mem::replace(&mut self.changes[at], change);
                let later = &mut self.changes[at];
                later.insert = false;
                if let (Op::Upsert(old), Op::Upsert(new)) = (&earlier.op, &mut later.op)
                    && earlier.shape.columns == later.shape.columns
                {
                    for (new_value, old_value) in new.iter_mut().zip(old) {
                        if *new_value == Datum::Unchanged {
                            *new_value = old_value.clone();
                        }
                    }
                }
            }
            None => {
                self.index.insert(slot, self.changes.len());
                self.changes.push(change);
            }
        }
    }

    /// Upserts and deletes, then truncates: a truncate only removes what was written
    /// at or before its own position, so applying it last is right whatever the batch
    /// holds.
    pub fn into_parts(self) -> (Vec<Change>, Vec<Change>) {
        (self.changes, self.truncates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::schema::Column;
    use crate::cdc::values::{ColumnType, Kind};

    fn shape() -> Arc<Shape> {
        let col = |name: &str| Column {
            name: name.into(),
            type_oid: 25,
            ty: ColumnType {
                kind: Kind::Text,
                array: false,
            },
            sql_type: "text".into(),
        };
        Arc::new(Shape {
            source: "public.t".into(),
            target: "t".into(),
            columns: vec![col("id"), col("body")],
            key: vec![0],
        })
    }

    fn text(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    #[test]
    fn later_changes_win_and_keep_untouched_toast() {
        let s = shape();
        let mut batch = Batch::default();
        batch.push(Change {
            shape: s.clone(),
            position: 1,
            op: Op::Upsert(vec![text("1"), text("big")]),
            insert: true,
        });
        batch.push(Change {
            shape: s.clone(),
            position: 2,
            op: Op::Upsert(vec![text("2"), text("x")]),
            insert: false,
        });
        batch.push(Change {
            shape: s.clone(),
            position: 3,
            op: Op::Upsert(vec![text("1"), Datum::Unchanged]),
            insert: false,
        });
        batch.push(Change {
            shape: s.clone(),
            position: 4,
            op: Op::Delete(vec![text("2")]),
            insert: false,
        });
        batch.push(Change {
            shape: s,
            position: 5,
            op: Op::Truncate,
            insert: false,
        });
        let (changes, truncates) = batch.into_parts();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].position, 3);
        assert_eq!(changes[0].op, Op::Upsert(vec![text("1"), text("big")]));
        assert_eq!(changes[1].op, Op::Delete(vec![text("2")]));
        assert_eq!(truncates.len(), 1);
    }

    #[test]
    fn a_later_timeline_always_wins() {
        assert!(position(2, 0x10) > position(1, 0xFFFF_FFFF));
        assert!(position(1, 0x20) > position(1, 0x10));
        assert!(position(1, 0) > 0);
    }
}
