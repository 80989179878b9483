//! What the proxy expects back from the server for each message it sent, in order.
//!
//! The queue is what lets the proxy add messages of its own (a Parse for a statement
//! the server lacks, a batch of SETs) and answer some client messages itself (a Parse
//! the server already has, a Close of a proxy-named statement) while the client sees
//! exactly the responses a direct connection would give, in the same order.

use std::collections::{HashSet, VecDeque};
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
    /// The client's Parse of a name it already holds, sent as a Parse of that
    /// statement's shared name, which the server refuses (42P05) as Postgres refuses
    /// the client's; the error gets the client's name back.
    ParseDuplicate(Box<str>),
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
    /// Not an answer but a marker: the client's CopyDone or CopyFail went to the server
    /// here. A Sync sent before it reached the server during COPY, which ignores it.
    CopyEnd,
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
            | Expect::ParseChecked
            | Expect::ParseDuplicate(_) => tag == msg::PARSE_COMPLETE,
            Expect::Bind => tag == msg::BIND_COMPLETE,
            Expect::Describe => tag == msg::ROW_DESCRIPTION || tag == msg::NO_DATA,
            Expect::Execute => matches!(
                tag,
                msg::COMMAND_COMPLETE | msg::EMPTY_QUERY | msg::PORTAL_SUSPENDED
            ),
            Expect::Close | Expect::InjectedClose => tag == msg::CLOSE_COMPLETE,
            Expect::Synthetic(_)
            | Expect::UndoNamed(_)
            | Expect::UndoUnnamed(_)
            | Expect::CopyEnd => false,
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
            Expect::Synthetic(_) | Expect::UndoNamed(_) | Expect::UndoUnnamed(_) | Expect::CopyEnd
        )
    }

    pub fn survives_error(&self) -> bool {
        matches!(
            self,
            Expect::Injected | Expect::CommitLsn | Expect::FunctionCall | Expect::Ready { .. }
        )
    }
}

impl Expect {
    /// Whether this entry can leave the server's or the client's prepared statements
    /// other than the proxy assumed when it sent the message: a Parse or Close (the
    /// server may refuse or skip it), a change of the client's names, a simple Query
    /// (it drops the unnamed statement, unless an earlier error makes the server skip
    /// it), and a request whose statements forget prepared ones (`DEALLOCATE ALL`).
    fn changes_statements(&self) -> bool {
        match self {
            Expect::Parse
            | Expect::ParseNamed { .. }
            | Expect::ParseChecked
            | Expect::InjectedParse { .. }
            | Expect::Close
            | Expect::UndoNamed(_)
            | Expect::UndoUnnamed(_) => true,
            Expect::Ready { effects, sync } => !*sync || !effects.is_empty(),
            _ => false,
        }
    }

    fn is_ready(&self) -> bool {
        matches!(self, Expect::Ready { .. })
    }
}

/// The entries in flight, oldest first, with a count of those whose outcome can still
/// change the statements a later request relies on.
///
/// An error makes the server skip everything up to the next Sync, so messages behind
/// the same Sync share one fate: a request in that stretch may rely on what an earlier
/// message of it will have done. A request behind an unanswered Sync (or simple Query)
/// may not: whether the Parse before it succeeded is not known yet. `uncertain()` says
/// when such an outcome is pending.
#[derive(Debug, Default)]
pub struct ExpectQueue {
    queue: VecDeque<Expect>,
    /// Entries for which `changes_statements` holds.
    changes: usize,
    /// Those of them behind the last `Ready` (in the stretch still being sent).
    open_changes: usize,
}

impl ExpectQueue {
    pub const fn new() -> ExpectQueue {
        ExpectQueue {
            queue: VecDeque::new(),
            changes: 0,
            open_changes: 0,
        }
    }

    pub fn push_back(&mut self, entry: Expect) {
        if entry.changes_statements() {
            self.changes += 1;
            self.open_changes += 1;
        }
        if entry.is_ready() {
            self.open_changes = 0;
        }
        self.queue.push_back(entry);
    }

    pub fn pop_front(&mut self) -> Option<Expect> {
        let entry = self.queue.pop_front()?;
        if entry.changes_statements() {
            // The oldest change is a closed one while any closed one is left.
            if self.changes == self.open_changes {
                self.open_changes -= 1;
            }
            self.changes -= 1;
        }
        Some(entry)
    }

    pub fn front(&self) -> Option<&Expect> {
        self.queue.front()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Expect> {
        self.queue.iter()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.changes = 0;
        self.open_changes = 0;
    }

    /// Everything in flight, oldest first; the queue is left empty.
    pub fn take_all(&mut self) -> Vec<Expect> {
        self.changes = 0;
        self.open_changes = 0;
        self.queue.drain(..).collect()
    }

    /// Removes the entry at `index` (rare: a Sync the server ignores during COPY).
    pub fn remove(&mut self, index: usize) -> Option<Expect> {
        let entry = self.queue.remove(index);
        self.recount();
        entry
    }

    /// Replaces the first entry that ends at ReadyForQuery with `entry`, removing and
    /// returning what stood before it.
    pub fn replace_first_ready(&mut self, entry: Expect) -> Vec<Expect> {
        let mut before = Vec::new();
        while let Some(front) = self.queue.front() {
            if front.is_ready() {
                self.queue[0] = entry;
                break;
            }
            if let Some(e) = self.queue.pop_front() {
                before.push(e);
            }
        }
        self.recount();
        before
    }

    /// True while a change of statements behind an unanswered Sync or simple Query is
    /// still in flight: its outcome is unknown until that request is answered.
    pub fn uncertain(&self) -> bool {
        self.changes > self.open_changes
    }

    /// The next change in flight of the client's statement `name` (`None`: the
    /// unnamed statement): where an undone change hands on what it replaced.
    pub fn next_change_of(
        &mut self,
        name: Option<&str>,
    ) -> Option<&mut Option<Arc<PreparedStatement>>> {
        self.queue.iter_mut().find_map(|entry| match (entry, name) {
            (Expect::UndoUnnamed(previous), None) => Some(previous),
            (Expect::UndoNamed(change), Some(name)) if change.0 == name => Some(&mut change.1),
            _ => None,
        })
    }

    /// For a `DEALLOCATE ALL` that ran just now: the client's names and the server's
    /// statements that messages still in flight (behind it) prepare, which survive it.
    /// Each such name's earliest change in flight now replaces nothing: should it be
    /// undone, the name is gone.
    pub fn forget_before_in_flight(&mut self) -> (HashSet<String>, HashSet<u64>) {
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for entry in self.queue.iter_mut() {
            match entry {
                Expect::UndoNamed(change) if names.insert(change.0.clone()) => change.1 = None,
                Expect::ParseNamed { id } | Expect::InjectedParse { id: Some(id) } => {
                    ids.insert(*id);
                }
                _ => {}
            }
        }
        (names, ids)
    }

    fn recount(&mut self) {
        self.changes = 0;
        self.open_changes = 0;
        for entry in &self.queue {
            if entry.changes_statements() {
                self.changes += 1;
                self.open_changes += 1;
            }
            if entry.is_ready() {
                self.open_changes = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(sync: bool) -> Expect {
        Expect::Ready {
            effects: Vec::new(),
            sync,
        }
    }

    #[test]
    fn a_change_behind_an_unanswered_sync_is_uncertain_until_answered() {
        let mut q = ExpectQueue::default();
        q.push_back(Expect::Parse);
        q.push_back(Expect::UndoUnnamed(None));
        q.push_back(Expect::Bind);
        // Same stretch: whatever the Parse does, later messages of it share its fate.
        assert!(!q.uncertain());
        q.push_back(ready(true));
        assert!(q.uncertain());
        q.push_back(Expect::Parse);
        assert!(q.uncertain());
        q.pop_front(); // the Parse answered
        assert!(q.uncertain());
        q.pop_front(); // its change settled: what is left of the stretch changes nothing
        assert!(!q.uncertain());
        q.pop_front();
        q.pop_front(); // the Ready: the first stretch is answered
        assert!(!q.uncertain());
        q.push_back(ready(true));
        assert!(q.uncertain());
        q.pop_front();
        assert!(!q.uncertain());
        q.pop_front();
        assert!(q.is_empty() && !q.uncertain());
    }

    #[test]
    fn a_simple_query_closes_its_stretch_and_drops_the_unnamed_statement() {
        let mut q = ExpectQueue::default();
        q.push_back(Expect::Execute);
        q.push_back(ready(false));
        assert!(q.uncertain());
        let plain_sync = ready(true);
        let mut r = ExpectQueue::default();
        r.push_back(Expect::Bind);
        r.push_back(Expect::Execute);
        r.push_back(plain_sync);
        // Nothing in it changes statements: a later request may rely on them.
        assert!(!r.uncertain());
    }

    #[test]
    fn removing_the_only_ready_reopens_its_stretch() {
        let mut q = ExpectQueue::default();
        q.push_back(Expect::ParseNamed { id: 1 });
        q.push_back(Expect::Execute);
        q.push_back(ready(true));
        assert!(q.uncertain());
        q.remove(2);
        assert!(!q.uncertain());
        let before = {
            q.push_back(ready(true));
            q.replace_first_ready(Expect::Injected)
        };
        assert_eq!(before.len(), 2);
        assert_eq!(q.len(), 1);
        assert!(!q.uncertain());
    }

    #[test]
    fn the_next_change_of_a_name_is_found_past_other_names() {
        let mut q = ExpectQueue::default();
        q.push_back(Expect::UndoNamed(Box::new(("a".into(), None))));
        q.push_back(Expect::UndoUnnamed(None));
        q.push_back(Expect::UndoNamed(Box::new(("b".into(), None))));
        assert!(q.next_change_of(Some("b")).is_some());
        assert!(q.next_change_of(None).is_some());
        assert!(q.next_change_of(Some("c")).is_none());
    }
}
