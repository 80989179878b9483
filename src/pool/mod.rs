//! Pools of authenticated server connections, one per node and user (bb8).

pub mod server;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use server::{BackendError, LoginInfo, ServerConn};

pub struct BackendManager {
    pub login: LoginInfo,
    pub connect_timeout: Duration,
    pub errors: ConnectErrors,
}

impl bb8::ManageConnection for BackendManager {
    type Connection = ServerConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<ServerConn, BackendError> {
        let conn = ServerConn::connect(&self.login, self.connect_timeout).await;
        if let Err(e) = &conn {
            tracing::warn!(node = %self.login.addr, user = %self.login.user, "backend connection failed: {e}");
            self.errors.report(e);
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

/// Connect failures of one node, announced to the sessions waiting for a connection:
/// bb8 hands connect errors to a sink and lets the waiting caller sit until its
/// timeout, whereas a refused connection should send the read elsewhere at once.
#[derive(Debug, Clone, Default)]
pub struct ConnectErrors(Arc<ConnectErrorsInner>);

#[derive(Debug, Default)]
struct ConnectErrorsInner {
    last: Mutex<Option<BackendError>>,
    notify: tokio::sync::Notify,
}

impl ConnectErrors {
    pub fn report(&self, error: &BackendError) {
        if let Ok(mut slot) = self.0.last.lock() {
            *slot = Some(error.duplicate());
        }
        self.0.notify.notify_waiters();
    }

    pub fn latest(&self) -> Option<BackendError> {
        self.0
            .last
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(BackendError::duplicate))
    }

    /// Resolves at the next connect failure reported after this call.
    pub fn next_failure(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.notify.notified()
    }
}

/// bb8 also reports connections that failed their check-out test here; those are
/// replaced transparently, so they are only logged.
#[derive(Debug, Clone)]
struct LogSink;

impl bb8::ErrorSink<BackendError> for LogSink {
    fn sink(&self, error: BackendError) {
        tracing::debug!("pooled server connection discarded: {error}");
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
    errors: ConnectErrors,
) -> Pool {
    bb8::Pool::builder()
        .error_sink(Box::new(LogSink))
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
            errors,
        })
}

/// Turns a bb8 failure into the error the client sees.
pub fn checkout_error(e: bb8::RunError<BackendError>, node: &str) -> BackendError {
    match e {
        bb8::RunError::User(e) => e,
        bb8::RunError::TimedOut => {
            BackendError::Timeout(format!("{node}: every pooled connection stayed busy"))
        }
    }
}
