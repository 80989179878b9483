//! The operator's surfaces: the SQL admin console (database `replicator` on the client
//! port), HTTP `/status`, `/metrics` and `/health` on `admin_listen`, and the status
//! snapshot they all render.

pub mod access;
pub mod commands;
pub mod console;
pub mod http;
pub mod metrics;
pub mod status;
