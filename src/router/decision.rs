//! What the router concludes about one statement text.

/// Which kind of node must run a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica,
}

/// How a statement changes the client's transaction state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    None,
    Begin,
    End,
}

/// Session state a statement changes, which the proxy must carry to other backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    /// `SET name = value` (session scope). `value` is SQL text, ready to be re-sent.
    Set {
        name: String,
        value: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    /// `DEALLOCATE` / `DISCARD`: the backend's prepared statements are gone.
    ForgetPrepared,
    /// `DEALLOCATE ALL` / `DISCARD ALL`: so are the client's, whatever their names.
    ForgetClientStatements,
}

/// Why a statement ties its client to one server connection for good: what it leaves
/// behind lives in that server's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    Listen,
    SqlPrepare,
    TemporaryTable,
    TemporaryObject,
    CursorWithHold,
    SessionAuthorization,
    SessionAdvisoryLock,
    SetConfig,
    DblinkConnection,
    /// A statement too large to parse that names something of the session's.
    LargeStatement,
}

impl PinReason {
    /// As SHOW CLIENTS and the log say it.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "LISTEN",
            PinReason::SqlPrepare => "PREPARE in SQL",
            PinReason::TemporaryTable => "temporary table",
            PinReason::TemporaryObject => "temporary object",
            PinReason::CursorWithHold => "cursor WITH HOLD",
            PinReason::SessionAuthorization => "SET SESSION AUTHORIZATION",
            PinReason::SessionAdvisoryLock => "session advisory lock",
            PinReason::SetConfig => "set_config() changes session state",
            PinReason::DblinkConnection => "dblink connection",
            PinReason::LargeStatement => "a large statement that changes session state",
        }
    }
}

impl std::fmt::Display for PinReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    /// Why this statement ties the client to one backend for good, if it does.
    pub pin: Option<PinReason>,
    pub tx: TxEffect,
    pub effects: Vec<SessionEffect>,
    /// The route came from a `/* replicator: ... */` hint.
    pub hinted: bool,
}

impl Decision {
    pub fn primary() -> Self {
        Self::with_route(Route::Primary)
    }

    pub fn replica() -> Self {
        Self::with_route(Route::Replica)
    }

    fn with_route(route: Route) -> Self {
        Self {
            route,
            pin: None,
            tx: TxEffect::None,
            effects: Vec::new(),
            hinted: false,
        }
    }

    /// Combines the decisions of several statements sent together (they run on one backend).
    pub fn merge(&mut self, other: &Decision) {
        if other.route == Route::Primary {
            self.route = Route::Primary;
        }
        if self.pin.is_none() {
            self.pin = other.pin;
        }
        if other.tx != TxEffect::None {
            self.tx = other.tx;
        }
        self.effects.extend(other.effects.iter().cloned());
    }
}
