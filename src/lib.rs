//! replicator: a PostgreSQL wire-protocol proxy that sends writes to the primary and
//! reads to replicas. See docs/architecture.md for how a statement flows through it.

pub mod config;
pub mod testbed;
pub mod protocol;
pub mod router;
