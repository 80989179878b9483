//! A checkout as a plain future: taking an idle connection, opening one in a free
//! place, or waiting in the pool's queue for one (see `Pool::get`).

use super::*;

/// A checkout under way (see `Pool::get`).
pub struct Checkout(pub(super) Stage);

pub(super) enum Stage {
    /// Not polled yet.
    Start(Arc<PoolInner>),
    Ready(Option<Pooled>),
    Waiting(Waiting),
    /// Opening a connection in a place already counted in the pool.
    Connecting(Pin<Box<dyn Future<Output = Result<Pooled, BackendError>> + Send>>),
}

impl Checkout {
    /// The connection, if one is idle now; the checkout is left to be awaited (and
    /// to wait) otherwise. Only before the first poll.
    pub fn now(&mut self) -> Option<Pooled> {
        let Stage::Start(pool) = &self.0 else {
            return None;
        };
        let conn = pool.lock().pop_usable()?;
        Some(pool.pooled(conn))
    }
}

impl Stage {
    pub(super) fn connecting(pool: Arc<PoolInner>) -> Stage {
        Stage::Connecting(Box::pin(pool.connect_reserved()))
    }
}

impl Future for Checkout {
    type Output = Result<Pooled, BackendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = &mut self.0;
            let (looked, pool) = match this {
                Stage::Start(pool) => {
                    *this = pool.clone().start(cx.waker());
                    continue;
                }
                Stage::Ready(conn) => {
                    return match conn.take() {
                        Some(conn) => Poll::Ready(Ok(conn)),
                        None => Poll::Pending,
                    };
                }
                Stage::Connecting(connecting) => return connecting.as_mut().poll(cx),
                Stage::Waiting(waiting) => {
                    let Some(ticket) = waiting.ticket else {
                        return Poll::Pending;
                    };
                    match waiting.pool.look(ticket, cx.waker()) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(looked) => {
                            // Settled: nothing to give back when it is dropped.
                            waiting.ticket = None;
                            (looked, waiting.pool.clone())
                        }
                    }
                }
            };
            match looked {
                Ok(Handoff::Conn(conn)) => {
                    *this = Stage::Ready(None);
                    return Poll::Ready(Ok(pool.pooled(conn)));
                }
                // The place is this checkout's now, and the connection attempt owns it.
                Ok(Handoff::Slot) => *this = Stage::connecting(pool),
                Err(e) => {
                    *this = Stage::Ready(None);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

/// A checkout waiting for a connection. If the caller gives up (timeout, or its
/// future is dropped), a connection or place handed to it meanwhile goes back.
pub struct Waiting {
    pub(super) pool: Arc<PoolInner>,
    /// Its place in the pool's queue; none once settled.
    pub(super) ticket: Option<u64>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            self.pool.abandon(ticket);
        }
    }
}
