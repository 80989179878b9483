//! The end of a login: a server is attached, the client's startup settings are applied
//! on it, and the client gets the server's ParameterStatus values, its cancel key and
//! its first ReadyForQuery, as from Postgres.

use super::*;
use crate::protocol::backend::Backend;

/// Why applying a client's startup settings on a server failed.
enum Greeting {
    /// The server refused a setting: the login fails, as it would on Postgres.
    Refused(End),
    /// The server connection died: another one may do.
    ServerLost(String),
}

impl Session {
    /// Finishes the login: ParameterStatus from a real server with the client's
    /// settings applied, then BackendKeyData and ReadyForQuery.
    pub(super) async fn greet(&mut self) -> Result<(), End> {
        // A server connection can die under the login (terminated while it sat in the
        // pool, its node restarting): the client has no state yet, so take another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut nodes: Vec<Arc<Node>> =
                self.core.project.primary().cloned().into_iter().collect();
            nodes.extend(self.core.project.read_candidates(0, false));
            if let Err(e) = self.attach_first(nodes).await {
                return Err(End::fatal(
                    e.sqlstate(),
                    format!(
                        "no server of project \"{}\" is available: {e}",
                        self.core.project.name
                    ),
                ));
            }
            match self.settle_login_settings().await {
                Ok(()) => break,
                Err(Greeting::Refused(end)) => return Err(end),
                Err(Greeting::ServerLost(reason)) => {
                    if let Some(held) = self.core.server.as_mut() {
                        held.conn.broken = true;
                    }
                    self.core.release();
                    self.core.flight.expect.clear();
                    self.core.server_out.clear();
                    if attempt >= 3 {
                        return Err(End::fatal("08006", reason));
                    }
                    debug!(user = %self.core.user.name, "server connection failed during login ({reason}); trying another");
                }
            }
        }
        let session_mode = self.core.session_mode();
        let Some(held) = self.core.server.as_mut() else {
            return Err(End::fatal("08006", "no server available"));
        };
        for (name, value) in &held.conn.params {
            msg::parameter_status(&mut self.core.client_out, name, value);
        }
        if session_mode {
            // The client keeps this server: it gets the server's real process id, so
            // that pg_backend_pid(), pg_terminate_backend() and NOTIFY's sender agree
            // with what the driver reports. Cancel requests still come to the proxy.
            self.key = self.core.shared.cancels.rekey(self.key, held.conn.pid);
        }
        msg::backend_key_data(&mut self.core.client_out, self.key.0, self.key.1);
        msg::ready_for_query(&mut self.core.client_out, TxStatus::Idle);
        if !self.core.is_sticky() {
            self.core.release();
        }
        Ok(())
    }

    /// Applies the client's startup settings on the attached server and records the
    /// ParameterStatus values it reports.
    async fn settle_login_settings(&mut self) -> Result<(), Greeting> {
        self.core.prepare_server();
        let Some(held) = self.core.server.as_mut() else {
            return Err(Greeting::ServerLost("no server available".into()));
        };
        if self.core.server_out.is_empty() {
            return Ok(());
        }
        held.conn
            .send(&self.core.server_out)
            .await
            .map_err(|e| Greeting::ServerLost(e.to_string()))?;
        self.core.server_out.clear();
        while !self.core.flight.expect.is_empty() {
            let frame = held
                .conn
                .reader
                .read_frame()
                .await
                .map_err(|e| Greeting::ServerLost(e.to_string()))?;
            match Backend::decode(&frame) {
                Backend::ParameterStatus { name, value } => held.conn.set_parameter(name, value),
                Backend::Error(report) if report.is_fatal() => {
                    return Err(Greeting::ServerLost(report.to_string()));
                }
                Backend::Error(report) => {
                    // An invalid startup parameter: Postgres refuses such a login too.
                    held.conn.needs_reset = true;
                    self.core.flight.expect.clear();
                    return Err(Greeting::Refused(End::fatal(
                        report.code(),
                        report.message(),
                    )));
                }
                Backend::ReadyForQuery(_) => {
                    self.core.flight.expect.pop_front();
                }
                _ => {}
            }
        }
        Ok(())
    }
}
