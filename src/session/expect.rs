//! What the proxy expects back from the server for each message it sent, in order.
//!
//! The queue is what lets the proxy add messages of its own (a Parse for a statement
//! the server lacks, a batch of SETs) and answer some client messages itself (a Parse
//! the server already has, a Close of a proxy-named statement) while the client sees
//! exactly the responses a direct connection would give, in the same order.

use crate::protocol::messages as msg;
use crate::router::SessionEffect;

#[derive(Debug)]
pub enum Expect {
    /// A simple query the proxy sent itself (session settings); all of it is swallowed.
    Injected,
    /// A Parse the proxy sent itself; its ParseComplete is swallowed.
    InjectedParse {
        id: Option<u64>,
    },
    /// A response the proxy writes itself when everything before it has been answered.
    Synthetic(u8),
    /// The client's own Parse of a proxy-named statement.
    ParseNamed {
        id: u64,
    },
    Parse,
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
}

impl Expect {
    /// True if the server message `tag` is the last one answering this entry.
    pub fn ends_with(&self, tag: u8) -> bool {
        match self {
            Expect::Injected | Expect::CommitLsn | Expect::Ready { .. } | Expect::FunctionCall => {
                tag == msg::READY_FOR_QUERY
            }
            Expect::DeferredBegin => tag == msg::COMMAND_COMPLETE,
            Expect::InjectedParse { .. } | Expect::ParseNamed { .. } | Expect::Parse => {
                tag == msg::PARSE_COMPLETE
            }
            Expect::Bind => tag == msg::BIND_COMPLETE,
            Expect::Describe => tag == msg::ROW_DESCRIPTION || tag == msg::NO_DATA,
            Expect::Execute => matches!(
                tag,
                msg::COMMAND_COMPLETE | msg::EMPTY_QUERY | msg::PORTAL_SUSPENDED
            ),
            Expect::Close => tag == msg::CLOSE_COMPLETE,
            Expect::Synthetic(_) => false,
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

    pub fn survives_error(&self) -> bool {
        matches!(
            self,
            Expect::Injected | Expect::CommitLsn | Expect::FunctionCall | Expect::Ready { .. }
        )
    }
}
