//! Pools of authenticated server connections, one per node and user (bb8).

pub mod server;

use std::sync::{Arc, Mutex};
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

/// Keeps the latest connect error of a node: bb8 hands connect errors to a sink, not to
/// the waiting caller, who would otherwise only learn that it timed out.
#[derive(Debug, Clone, Default)]
pub struct LastError(Arc<Mutex<Option<BackendError>>>);

impl LastError {
    pub fn take(&self) -> Option<BackendError> {
        self.0.lock().ok().and_then(|mut e| e.take())
    }
}

impl bb8::ErrorSink<BackendError> for LastError {
    fn sink(&self, error: BackendError) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(error);
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<BackendError>> {
        Box::new(self.clone())
    }
}

pub fn build_pool(
    login: LoginInfo,
    size: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    errors: LastError,
) -> Pool {
    bb8::Pool::builder()
        .error_sink(Box::new(errors))
        .max_size(size.max(1))
        .min_idle(None)
        .connection_timeout(connect_timeout)
        // A failed connect is reported (through the sink) instead of retried until the
        // timeout hides it.
        .retry_connection(false)
        .test_on_check_out(true)
        .idle_timeout(Some(idle_timeout))
        // Most recently used first: a lightly loaded pool keeps hitting the same warm
        // server processes (as PgBouncer does), and the surplus ones reach the idle
        // timeout and close instead of being kept alive by rotation.
        .queue_strategy(bb8::QueueStrategy::Lifo)
        .build_unchecked(BackendManager {
            login,
            connect_timeout,
        })
}

/// Turns a bb8 failure into the error the client sees: the connect error behind a
/// timeout when there was one, else a plain timeout (all connections busy).
pub fn checkout_error(
    e: bb8::RunError<BackendError>,
    node: &str,
    errors: &LastError,
) -> BackendError {
    match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => errors.take().unwrap_or_else(|| {
            BackendError::Timeout(format!("{node}: every pooled connection stayed busy"))
        }),
    }
}
