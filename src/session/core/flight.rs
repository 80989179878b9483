//! A session's in-flight state: what it holds only while something is in flight, in
//! one box that an idle session gives back (see `InFlight`).

use super::*;

/// What a session holds only while something is in flight: client messages waiting,
/// answers expected, effects not yet applied, a deferred `BEGIN`, a read kept for a
/// replay. Boxed and given back when the session is idle (`Core::park`), so that an
/// idle client keeps none of it.
pub(in crate::session) struct InFlight {
    pub(in crate::session) pending: Pending,
    pub(in crate::session) expect: ExpectQueue,
    /// Effects of statements inside the open transaction, applied at COMMIT.
    pub(in crate::session) tx_effects: Vec<SessionEffect>,
    /// Effects of the extended-protocol group being sent (applied at its Sync).
    pub(in crate::session) group_effects: Vec<SessionEffect>,
    /// Decisions of statements with session effects bound to open portals, by portal
    /// name: a statement changes the session when it is executed, not when it is bound.
    pub(in crate::session) portal_effects: Vec<(Box<[u8]>, Arc<Decision>)>,
    /// A `DEALLOCATE ALL` (or `DISCARD ALL`) was executed since the last Sync sent: the
    /// names the client parsed after it, the only ones the server still knows.
    pub(in crate::session) deallocated_in_stretch: Option<Vec<String>>,
    /// The WAL position the pending CommitLsn query returned.
    pub(in crate::session) commit_lsn: Option<u64>,
    /// When the request now running on the server was sent (latency histogram).
    pub(in crate::session) started: Option<Instant>,
    /// Reads in flight whose answers have not reached the client's socket yet, kept
    /// to be sent again elsewhere if their server fails first. Not boxed (unlike the
    /// rare parts): nearly every read keeps one, and this whole state is boxed already.
    pub(in crate::session) replay: Option<Replay>,
    /// A unit whose Parse the proxy answered, kept until its first answer (see
    /// `Reparse`).
    pub(in crate::session) reparse: Option<Box<Reparse>>,
    /// Registry ids of the proxy-named statements bound or described since the server
    /// last had nothing in flight: the ones to retire if it refuses a cached plan.
    pub(in crate::session) group_named: Vec<u64>,
    /// A `BEGIN` the proxy answered itself, not yet sent to any server (see
    /// `transaction.rs`).
    pub(in crate::session) deferred_begin: Option<Box<DeferredBegin>>,
}

impl InFlight {
    pub(super) const VACANT: InFlight = InFlight {
        pending: Pending::new(),
        expect: ExpectQueue::new(),
        tx_effects: Vec::new(),
        group_effects: Vec::new(),
        portal_effects: Vec::new(),
        deallocated_in_stretch: None,
        commit_lsn: None,
        started: None,
        replay: None,
        reparse: None,
        group_named: Vec::new(),
        deferred_begin: None,
    };

    /// Nothing is in flight that the session must remember: what is left (statements
    /// noted for a refused plan, a read kept for a replay, a unit kept for a re-parse)
    /// only matters while a server owes answers.
    fn is_settled(&self) -> bool {
        self.pending.is_empty()
            && self.expect.is_empty()
            && self.tx_effects.is_empty()
            && self.group_effects.is_empty()
            && self.portal_effects.is_empty()
            && self.deallocated_in_stretch.is_none()
            && self.commit_lsn.is_none()
            && self.started.is_none()
            && self.deferred_begin.is_none()
    }
}

/// Read by a session with nothing in flight.
static VACANT: InFlight = InFlight::VACANT;

thread_local! {
    /// In-flight states given back by idle sessions, for the next busy one (see
    /// `protocol::spare`): a busy period costs no allocation. Kept boxed: a session
    /// holds its state in a box, which moves in and out of here as it is.
    #[allow(clippy::vec_box)]
    static SPARE_FLIGHTS: std::cell::RefCell<Vec<Box<InFlight>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The in-flight state of a session: read as empty while there is none, made (or taken
/// from the thread's spares) on the first change.
#[derive(Default)]
pub(in crate::session) struct Flight(Option<Box<InFlight>>);

impl std::ops::Deref for Flight {
    type Target = InFlight;
    fn deref(&self) -> &InFlight {
        self.0.as_deref().unwrap_or(&VACANT)
    }
}

impl std::ops::DerefMut for Flight {
    fn deref_mut(&mut self) -> &mut InFlight {
        self.0.get_or_insert_with(|| {
            SPARE_FLIGHTS
                .with(|spares| spares.borrow_mut().pop())
                .unwrap_or_else(|| Box::new(InFlight::VACANT))
        })
    }
}

impl Flight {
    /// Gives the in-flight state back if nothing in it must be remembered; what is
    /// left is dropped (a replay's frames go back to the thread's spares).
    pub(super) fn settle(&mut self) {
        const KEPT: usize = 64;
        let Some(flight) = self.0.as_mut() else {
            return;
        };
        if !flight.is_settled() {
            return;
        }
        if let Some(replay) = flight.replay.take() {
            spare::give_back_vec(&SPARE_UNITS, replay.frames, 64);
        }
        flight.reparse = None;
        flight.group_named.clear();
        if let Some(flight) = self.0.take() {
            SPARE_FLIGHTS.with(|spares| {
                let mut spares = spares.borrow_mut();
                if spares.len() < KEPT {
                    spares.push(flight);
                }
            });
        }
    }
}
