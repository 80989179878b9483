//! PostgreSQL wire protocol: framing for both directions, the messages the proxy
//! builds itself, and the authentication exchanges (client side and server side).

pub mod auth;
pub mod auth_policy;
pub mod backend;
pub mod framing;
pub mod frontend;
pub mod messages;
pub mod settings;
pub mod spare;

pub use framing::{MessageReader, Piece};

/// Frames longer than this, of the kinds the proxy need not look inside (rows, COPY
/// data; in session pooling, every client message), are passed on in pieces as they
/// arrive instead of being held whole.
pub const STREAM_FRAME_OVER: usize = 64 * 1024;

/// Largest message a client may send (a Bind with big parameters, a CopyData chunk).
pub const MAX_CLIENT_MESSAGE: usize = 256 * 1024 * 1024;
/// Largest message a client may send before it has logged in (password and SASL
/// messages are a few hundred bytes): nothing bigger is reserved for a stranger.
pub const MAX_LOGIN_MESSAGE: usize = 64 * 1024;
/// Servers may send anything Postgres itself allows (1 GB field plus framing).
pub const MAX_SERVER_MESSAGE: usize = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by peer")]
    Closed,
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
