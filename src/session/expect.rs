//! What the proxy expects back from the server for each message it sent, in order.
//!
//! The queue is what lets the proxy add messages of its own (a Parse for a statement
//! the server lacks, a batch of SETs) and answer some client messages itself (a Parse
//! the server already has, a Close of a proxy-named statement) while the client sees
//! exactly the responses a direct connection would give, in the same order.

use std::sync::Arc;

use crate::protocol::messages as msg;
use crate::router::SessionEffect;

use super::statements::PreparedStatement;

#[derive(Debug)]
pub enum Expect {
    /// A simple query the proxy sent itself (session settings); all of it is swallowed.
    Injected,
    /// A Parse the proxy sent itself; its ParseComplete is swallowed.
    InjectedParse {
        id: Option<u64>,
    },
    /// A Close of the server's unnamed statement the proxy sent itself, so that the
    /// server answers a client's Bind or Describe of an unnamed statement it does not
    /// have as Postgres would (26000); its CloseComplete is swallowed.
    InjectedClose,
    /// A response the proxy writes itself when everything before it has been answered.
    Synthetic(u8),
    /// The client's own Parse of a proxy-named statement.
    ParseNamed {
        id: u64,
    },
    /// The client's unnamed Parse.
    Parse,
    /// The client's Parse of a name whose statement the server holds already, sent as
    /// the unnamed statement so that the server judges it (in a failed transaction).
    ParseChecked,
    Bind,
    Describe,
    Execute,
    Close,
    /// Sync or simple Query: ends at ReadyForQuery; carries the session effects of the
    /// statements in its group, applied once the group succeeded. `sync` tells the two
    /// apart: a server skipping messages after an extended-protocol error skips a
    /// simple Query too, and only a Sync ends the skipping.
    Ready {
        effects: Vec<SessionEffect>,
        sync: bool,
    },
    FunctionCall,
    /// The proxy's own query for the WAL position after a client's write committed
    /// (read-your-writes); all of it is swallowed.
    CommitLsn,
    /// The client's `BEGIN`, answered by the proxy and sent (Parse, Bind, Execute)
    /// with the transaction's first statement; swallowed up to its CommandComplete.
    DeferredBegin,
    /// Not an answer but a marker behind a client's Parse or Close: what the client's
    /// statement name pointed at before (`None`: nothing). Reaching the front of the
    /// queue means the message was answered and the change stands; abandoned after an
    /// error (the server refused the message or skipped it on the way to Sync), the
    /// name is put back, since on Postgres the message changed nothing.
    UndoNamed(Box<(String, Option<Arc<PreparedStatement>>)>),
    /// The same for the client's unnamed statement.
    UndoUnnamed(Option<Arc<PreparedStatement>>),
}

impl Expect {
    /// True if the server message `tag` is the last one answering this entry.
    pub fn ends_with(&self, tag: u8) -> bool {
        match self {
            Expect::Injected | Expect::CommitLsn | Expect::Ready { .. } | Expect::FunctionCall => {
                tag == msg::READY_FOR_QUERY
            }
            Expect::DeferredBegin => tag == msg::COMMAND_COMPLETE,
            Expect::InjectedParse { .. }
            | Expect::ParseNamed { .. }
            | Expect::Parse
            | Expect::ParseChecked => tag == msg::PARSE_COMPLETE,
            Expect::Bind => tag == msg::BIND_COMPLETE,
            Expect::Describe => tag == msg::ROW_DESCRIPTION || tag == msg::NO_DATA,
            Expect::Execute => matches!(
                tag,
                msg::COMMAND_COMPLETE | msg::EMPTY_QUERY | msg::PORTAL_SUSPENDED
            ),
            Expect::Close | Expect::InjectedClose => tag == msg::CLOSE_COMPLETE,
            Expect::Synthetic(_) | Expect::UndoNamed(_) | Expect::UndoUnnamed(_) => false,
        }
    }

    /// Entries that end at ReadyForQuery still get it after an ErrorResponse; the other
    /// extended-protocol entries are abandoned by the server up to the next Sync.
    /// Answers to this entry are the proxy's business, not the client's.
    pub fn is_injected(&self) -> bool {
        matches!(
            self,
            Expect::Injected | Expect::CommitLsn | Expect::DeferredBegin
        )
    }

    /// Entries the proxy resolves itself once they reach the front of the queue.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Expect::Synthetic(_) | Expect::UndoNamed(_) | Expect::UndoUnnamed(_)
        )
    }

    pub fn survives_error(&self) -> bool {
        matches!(
            self,
            Expect::Injected | Expect::CommitLsn | Expect::FunctionCall | Expect::Ready { .. }
        )
    }
}
