//! Pools of authenticated server connections, one per node and user (bb8).

pub mod server;

use std::time::Duration;

pub use server::{BackendError, LoginInfo, ServerConn};

pub struct BackendManager {
    pub login: LoginInfo,
    pub connect_timeout: Duration,
}

impl bb8::ManageConnection for BackendManager {
    type Connection = ServerConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<ServerConn, BackendError> {
        let conn = ServerConn::connect(&self.login, self.connect_timeout).await;
        if let Err(e) = &conn {
            tracing::warn!(node = %self.login.addr, user = %self.login.user, "backend connection failed: {e}");
        }
        conn
    }

    async fn is_valid(&self, conn: &mut ServerConn) -> Result<(), BackendError> {
        if conn.check_idle() {
            Ok(())
        } else {
            conn.broken = true;
            Err(BackendError::Protocol {
                addr: self.login.addr.to_string(),
                source: crate::protocol::ProtocolError::Closed,
            })
        }
    }

    fn has_broken(&self, conn: &mut ServerConn) -> bool {
        conn.broken
    }
}

pub type Pool = bb8::Pool<BackendManager>;
pub type Pooled = bb8::PooledConnection<'static, BackendManager>;

pub fn build_pool(login: LoginInfo, size: u32, connect_timeout: Duration, idle_timeout: Duration) -> Pool {
    bb8::Pool::builder()
        .max_size(size.max(1))
        .min_idle(None)
        .connection_timeout(connect_timeout)
        // Report the real connect error to the waiting client instead of retrying until
        // the timeout hides it.
        .retry_connection(false)
        .test_on_check_out(true)
        .idle_timeout(Some(idle_timeout))
        .build_unchecked(BackendManager { login, connect_timeout })
}

/// Turns a bb8 failure into the error the client sees.
pub fn checkout_error(e: bb8::RunError<BackendError>, node: &str) -> BackendError {
    match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => BackendError::Timeout(format!("{node} (pool exhausted or node unreachable)")),
    }
}
