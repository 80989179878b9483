//! Where a rule's changes go: MongoDB or Postgres. Both store the source commit
//! position with every document or row and write only over an older one.

pub mod mongo;
pub mod postgres;

use std::sync::Arc;

use super::change::Change;
use super::schema::Shape;
use crate::config::ConflictResolution;

/// The field (MongoDB) or column (Postgres) that holds the commit position of the
/// change that last wrote a document or row.
pub const POSITION_FIELD: &str = "_replicator_lsn";

#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The target cannot be reached or dropped the connection: retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The target refused a write (a type it cannot take, a missing privilege).
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Config(String),
}

/// Counts of one apply.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub written: u64,
    /// Writes the position guard or `target-wins` turned away.
    pub skipped: u64,
}

pub enum Sink {
    Mongo(mongo::MongoSink),
    Postgres(postgres::PostgresSink),
}

impl Sink {
    pub async fn prepare(&mut self, shapes: &[Arc<Shape>]) -> Result<(), SinkError> {
        match self {
            Sink::Mongo(_) => Ok(()),
            Sink::Postgres(sink) => sink.prepare(shapes).await,
        }
    }

    pub async fn apply(
        &mut self,
        changes: &[Change],
        truncates: &[Change],
        mode: ConflictResolution,
    ) -> Result<Applied, SinkError> {
        match self {
            Sink::Mongo(sink) => sink.apply(changes, truncates, mode).await,
            Sink::Postgres(sink) => sink.apply(changes, truncates, mode).await,
        }
    }

    /// Removes what this rule wrote before `position` in each table: after a snapshot
    /// at `position`, those are rows the source no longer has. Documents or rows
    /// without a position (not written by the rule) are never touched.
    pub async fn sweep(&mut self, shapes: &[Arc<Shape>], position: i64) -> Result<u64, SinkError> {
        match self {
            Sink::Mongo(sink) => sink.sweep(shapes, position).await,
            Sink::Postgres(sink) => sink.sweep(shapes, position).await,
        }
    }

    /// A Postgres connection that died is known without a round trip.
    pub fn is_broken(&self) -> bool {
        match self {
            Sink::Mongo(_) => false,
            Sink::Postgres(sink) => sink.is_closed(),
        }
    }
}
