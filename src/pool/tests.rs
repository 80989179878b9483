//! The pool's queue, handoff and timeouts, without a server.

use super::*;

/// A checkout that waits (every one, with more clients than connections) carries
/// its future, a few words; opening a connection, kilobytes, is boxed apart.
#[tokio::test]
async fn a_checkout_that_waits_stays_small() {
    let pool = test_pool(Duration::from_secs(1));
    let checkout = pool.get();
    let size = std::mem::size_of_val(&checkout);
    assert!(size <= 32, "a checkout's future takes {size} bytes");
}

/// The pool's task ends a wait at its deadline, not before, oldest first; a
/// checkout that gave up has left the queue on the way.
#[tokio::test]
async fn waits_run_out_in_order_at_their_deadline() {
    let pool = test_pool(Duration::from_millis(300));
    let start = tokio::time::Instant::now();
    let waker = Waker::noop();
    let queue = |at_ms: u64| {
        let mut state = pool.inner.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiters.push_back(Waiter {
            ticket,
            waker: waker.clone(),
            deadline: start + Duration::from_millis(at_ms),
        });
        ticket
    };
    let first = queue(300);
    let gave_up = queue(350);
    let third = queue(400);
    pool.inner.abandon(gave_up);
    let at = |ms: u64| start + Duration::from_millis(ms);

    assert_eq!(pool.inner.expire_waiters(at(299)), Some(at(300)));
    assert!(pool.inner.look(first, waker).is_pending());

    // The first runs out; the third waits on.
    assert_eq!(pool.inner.expire_waiters(at(300)), Some(at(400)));
    assert!(
        matches!(pool.inner.look(first, waker), Poll::Ready(Err(BackendError::Timeout(e))) if e.contains("query_wait_timeout_ms")),
    );
    assert!(pool.inner.look(third, waker).is_pending());
    assert_eq!(pool.inner.lock().waiters.len(), 1);

    assert_eq!(pool.inner.expire_waiters(at(450)), None);
    assert!(pool.inner.look(third, waker).is_ready());
}

/// A returned connection goes to the oldest waiter, which finds it under its
/// ticket; one that gives up after being handed a connection gives it back, to
/// the next waiter.
#[tokio::test]
async fn a_handed_connection_reaches_its_waiter_or_the_next_one() {
    let pool = test_pool(Duration::from_secs(60));
    pool.inner.lock().total = 1;
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut first = pool.get();
    let mut second = pool.get();
    assert!(Pin::new(&mut first).poll(&mut cx).is_pending());
    assert!(Pin::new(&mut second).poll(&mut cx).is_pending());
    assert_eq!(pool.inner.lock().waiters.len(), 2);

    // The pool's place is freed: the first waiter is handed it.
    pool.inner.release_place();
    {
        let state = pool.inner.lock();
        assert_eq!(state.waiters.len(), 1);
        assert_eq!(state.handed.len(), 1);
    }
    // The first gives up before looking: the place goes on to the second.
    drop(first);
    {
        let state = pool.inner.lock();
        assert!(state.waiters.is_empty());
        assert_eq!(state.handed.len(), 1);
        assert_eq!(state.total, 1);
    }
    // The second now opens a connection in that place (to a closed port: the
    // attempt fails), and the place is given back.
    let result = tokio::time::timeout(Duration::from_secs(5), second).await;
    assert!(matches!(result, Ok(Err(_))), "the attempt should fail");
    let state = pool.inner.lock();
    assert!(state.handed.is_empty());
    assert_eq!(state.total, 0);
}

/// A failed connection attempt fails every checkout waiting at that moment, at
/// once, with its error; a checkout queued afterwards waits on.
#[tokio::test]
async fn a_failed_attempt_fails_the_waiting_checkouts_only() {
    let pool = test_pool(Duration::from_secs(60));
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    // The first checkout takes the pool's one place and tries to connect (to a
    // closed port); the second waits behind it.
    let mut connecting = pool.get();
    let mut waiting = pool.get();
    // (A checkout takes its turn when first polled.)
    let _ = Pin::new(&mut connecting).poll(&mut cx);
    assert!(Pin::new(&mut waiting).poll(&mut cx).is_pending());
    assert_eq!(pool.inner.lock().waiters.len(), 1);
    let first = tokio::time::timeout(Duration::from_secs(5), &mut connecting).await;
    assert!(
        matches!(first, Ok(Err(BackendError::Connect { .. }))),
        "the attempt should fail"
    );
    match Pin::new(&mut waiting).poll(&mut cx) {
        Poll::Ready(Err(BackendError::Connect { .. })) => {}
        Poll::Ready(Err(e)) => panic!("another error: {e}"),
        Poll::Ready(Ok(_)) => panic!("a connection from a pool that has none"),
        Poll::Pending => panic!("still waiting after the attempt failed"),
    }
    // The place came back: a later checkout gets its own attempt, not the old
    // error.
    pool.inner.lock().total = 1;
    let mut later = pool.get();
    assert!(Pin::new(&mut later).poll(&mut cx).is_pending());
}

/// A checkout of a full pool ends with the timeout error after the wait, through
/// the pool's own task (on tokio's paused clock: no real time passes).
#[tokio::test(start_paused = true)]
async fn a_checkout_of_a_full_pool_times_out_after_the_wait() {
    let pool = test_pool(Duration::from_millis(300));
    // The pool is full: its one place is taken by a connection being opened.
    pool.inner.lock().total = 1;
    let start = tokio::time::Instant::now();
    let err = match tokio::time::timeout(Duration::from_secs(5), pool.get()).await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("a full pool handed out a connection"),
        Err(_) => panic!("the wait did not end at query_wait_timeout_ms"),
    };
    assert!(
        err.to_string().contains("query_wait_timeout_ms (300 ms)"),
        "{err}"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
        "waited {waited:?}"
    );
    assert!(pool.inner.lock().waiters.is_empty());
}

fn test_pool(wait_timeout: Duration) -> Pool {
    let addr =
        crate::config::NodeAddress::parse("postgresql://127.0.0.1:1/app").expect("a test address");
    Pool::new(
        LoginInfo {
            addr: Arc::new(addr),
            database: "app".into(),
            user: "app".into(),
            password: "secret".into(),
            scram_keys: None,
            extra_params: Vec::new(),
        },
        PoolSettings {
            size: 1,
            connect_timeout: Duration::from_secs(1),
            wait_timeout,
            idle_timeout: Duration::from_secs(60),
            lifetime: None,
            keepalive: Keepalive::default(),
        },
    )
}

/// Looking for an idle connection without waiting finds none in an empty pool, and
/// leaves the checkout to take its turn as usual (here: a place in the queue).
#[tokio::test]
async fn a_look_without_waiting_leaves_the_checkout_whole() {
    let pool = test_pool(Duration::from_secs(60));
    pool.inner.lock().total = 1;
    let mut checkout = pool.get();
    assert!(checkout.now().is_none());
    assert!(
        pool.inner.lock().waiters.is_empty(),
        "a look queues nothing"
    );
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(Pin::new(&mut checkout).poll(&mut cx).is_pending());
    assert_eq!(pool.inner.lock().waiters.len(), 1);
    // Polled, it no longer looks: its turn is in the queue.
    assert!(checkout.now().is_none());
}
