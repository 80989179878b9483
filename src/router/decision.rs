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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    /// Why this statement ties the client to one backend for good, if it does.
    pub pin: Option<&'static str>,
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
