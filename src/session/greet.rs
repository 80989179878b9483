//! The end of a login: a server is attached, the client's startup settings are applied
//! on it (the core reads its answers, `core/login.rs`), and the client is welcomed.

use super::core::Greeting;
use super::*;

impl Session {
    /// Finishes the login: ParameterStatus from a real server with the client's
    /// settings applied, then BackendKeyData and ReadyForQuery.
    pub(super) async fn greet(&mut self) -> Result<(), End> {
        // A server connection can die under the login (terminated while it sat in the
        // pool, its node restarting): the client has no state yet, so take another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let project = self.core.project();
            let mut nodes: Vec<Arc<Node>> = project.primary().cloned().into_iter().collect();
            nodes.extend(project.read_candidates(0, false));
            if let Err(e) = self.attach_first(nodes, None).await {
                return Err(End::fatal(
                    e.sqlstate(),
                    format!(
                        "no server of project \"{}\" is available: {e}",
                        self.core.project().name
                    ),
                ));
            }
            match self.settle_login_settings().await {
                Ok(()) => break,
                Err(Greeting::Refused(end)) => return Err(end),
                Err(Greeting::ServerLost(reason)) => {
                    self.core.login_server_lost();
                    if attempt >= 3 {
                        return Err(End::fatal("08006", reason));
                    }
                    debug!(user = %self.core.user().name, "server connection failed during login ({reason}); trying another");
                }
            }
        }
        let session_mode = self.core.session_mode();
        let Some(held) = self.core.held_mut() else {
            return Err(End::fatal("08006", "no server available"));
        };
        if session_mode {
            // The client keeps this server: it gets the server's real process id, so
            // that pg_backend_pid(), pg_terminate_backend() and NOTIFY's sender agree
            // with what the driver reports. Cancel requests still come to the proxy.
            let pid = held.conn.pid;
            self.key = self.core.context().cancels.rekey(self.key, pid);
        }
        self.core.welcome(self.key);
        Ok(())
    }

    /// Applies the client's startup settings on the attached server; the core records
    /// the ParameterStatus values it reports.
    async fn settle_login_settings(&mut self) -> Result<(), Greeting> {
        self.core.prepare_server();
        let io = self.core.io();
        let Some(conn) = io.server else {
            return Err(Greeting::ServerLost("no server available".into()));
        };
        if io.server_out.is_empty() {
            return Ok(());
        }
        conn.send(io.server_out)
            .await
            .map_err(|e| Greeting::ServerLost(e.to_string()))?;
        let sent = io.server_out.len();
        self.core.server_wrote(sent);
        while self.core.awaits_login_answers() {
            let Some(held) = self.core.held_mut() else {
                return Err(Greeting::ServerLost("no server available".into()));
            };
            let frame = held
                .conn
                .reader
                .read_frame()
                .await
                .map_err(|e| Greeting::ServerLost(e.to_string()))?;
            self.core.login_answer(&frame)?;
        }
        Ok(())
    }
}
