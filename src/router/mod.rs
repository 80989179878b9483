//! Statement classification (which kind of node may run a statement) and the choice of
//! a node among the healthy ones.

pub mod cache;
pub mod classify;
pub mod decision;
pub mod fingerprint;
pub mod functions;
pub mod large;

pub use cache::DecisionCache;
pub use decision::{Decision, PinReason, Route, SessionEffect, TxEffect};
