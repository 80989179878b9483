//! The end of a login, in the core: the answers of the first server to the client's
//! startup settings, and the client's welcome (the server's ParameterStatus values,
//! the cancel key, the first ReadyForQuery), as from Postgres.

use super::*;

/// Why applying a client's startup settings on a server failed.
pub(in crate::session) enum Greeting {
    /// The server refused a setting: the login fails, as it would on Postgres.
    Refused(End),
    /// The server connection died: another one may do.
    ServerLost(String),
}

impl<H: ServerHandle> Core<H> {
    /// The server still owes answers to the settings `prepare_server` queued.
    pub(in crate::session) fn awaits_login_answers(&self) -> bool {
        !self.flight.expect.is_empty()
    }

    /// One answer of the server to the client's startup settings: the values it
    /// reports are recorded for the client's welcome.
    pub(in crate::session) fn login_answer(&mut self, frame: &[u8]) -> Result<(), Greeting> {
        let Some(held) = self.server.as_mut() else {
            return Err(Greeting::ServerLost("no server available".into()));
        };
        let conn = held.conn.state_mut();
        match Backend::decode(frame) {
            Backend::ParameterStatus { name, value } => conn.set_parameter(name, value),
            Backend::Error(report) if report.is_fatal() => {
                return Err(Greeting::ServerLost(report.to_string()));
            }
            Backend::Error(report) => {
                // An invalid startup parameter: Postgres refuses such a login too.
                conn.needs_reset = true;
                self.flight.expect.clear();
                return Err(Greeting::Refused(End::fatal(
                    report.code(),
                    report.message(),
                )));
            }
            Backend::ReadyForQuery(_) => {
                self.flight.expect.pop_front();
            }
            _ => {}
        }
        Ok(())
    }

    /// The server died under the login: it is dropped with what was queued for it.
    pub(in crate::session) fn login_server_lost(&mut self) {
        if let Some(held) = self.server.as_mut() {
            held.conn.state_mut().broken = true;
        }
        self.release();
        self.flight.expect.clear();
        self.server_out.clear();
    }

    /// The client's welcome, from the held server: its ParameterStatus values, the
    /// cancel key `key` and ReadyForQuery. The server goes back unless the client
    /// keeps it (session pooling).
    pub(in crate::session) fn welcome(&mut self, key: (i32, i32)) {
        if let Some(held) = self.server.as_ref() {
            for (name, value) in &held.conn.state().params {
                msg::parameter_status(&mut self.client_out, name, value);
            }
        }
        msg::backend_key_data(&mut self.client_out, key.0, key.1);
        msg::ready_for_query(&mut self.client_out, TxStatus::Idle);
        if !self.is_sticky() {
            self.release();
        }
    }
}
