//! replicator: a PostgreSQL wire-protocol proxy that sends writes to the primary and
//! reads to replicas. See docs/architecture.md for how a statement flows through it.

pub mod admin;
pub mod atomic_file;
pub mod cdc;
pub mod cluster;
pub mod config;
pub mod failpoint;
pub mod fleet;
pub mod fuzz;
pub mod keepalive;
pub mod logging;
pub mod pool;
pub mod protocol;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod state;
pub mod testbed;
pub mod tls;
pub mod users;
