//! Buffers lent to busy connections. An idle client should cost a socket and a small
//! task, not 16 kB of read buffer and the output buffers of its last query: so a
//! session that goes idle hands its empty buffers back here, and takes one again when
//! its next request arrives. Each worker thread keeps a few, so that a request costs a
//! pop and a push instead of an allocation and, with it, fresh pages.

use std::cell::RefCell;
use std::thread::LocalKey;

use bytes::BytesMut;

/// The size of a buffer handed out when the thread has none to spare.
pub const BUFFER: usize = 16 * 1024;
/// Buffers kept per thread: enough for the clients one thread serves at once.
const KEPT_PER_THREAD: usize = 64;
/// Buffers smaller than this are not worth keeping (what is left of a buffer whose
/// front went out as frames); larger ones grew for one large message.
const KEEP_MIN: usize = 4 * 1024;
const KEEP_MAX: usize = 64 * 1024;

thread_local! {
    static SPARES: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least `BUFFER` bytes, or of what a kept one has.
pub fn take() -> BytesMut {
    SPARES
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER))
}

/// Takes `buf`'s allocation away from it (leaving it empty, without capacity) and
/// keeps it for the next taker when it is worth keeping. Only an empty buffer is
/// given back: its bytes would otherwise be lost.
pub fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut buf = std::mem::take(buf);
    // Back to the front of its allocation when no frame cut from it is alive.
    let _whole = buf.try_reclaim(buf.capacity() + 1);
    if !(KEEP_MIN..=KEEP_MAX).contains(&buf.capacity()) {
        return;
    }
    let _ = SPARES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < KEPT_PER_THREAD {
            spares.push(buf);
        }
    });
}

/// A thread's spare vectors of one kind, for the same reason: a session takes one for
/// a request and gives it back after, so that an idle session keeps none.
pub type SpareVecs<T> = RefCell<Vec<Vec<T>>>;

/// An empty vector from `spares`, or a new one.
pub fn take_vec<T>(spares: &'static LocalKey<SpareVecs<T>>) -> Vec<T> {
    spares
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Empties `vec` and keeps it in `spares`, unless it grew past `max_capacity`.
pub fn give_back_vec<T>(
    spares: &'static LocalKey<SpareVecs<T>>,
    mut vec: Vec<T>,
    max_capacity: usize,
) {
    vec.clear();
    if vec.capacity() == 0 || vec.capacity() > max_capacity {
        return;
    }
    let _ = spares.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < KEPT_PER_THREAD {
            spares.push(vec);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_and_leaves_nothing_behind() {
        let mut buf = take();
        assert!(buf.capacity() >= BUFFER);
        buf.extend_from_slice(b"a message");
        // Not empty: kept by its owner.
        give_back(&mut buf);
        assert_eq!(&buf[..], b"a message");
        buf.clear();
        let at = buf.as_ptr();
        give_back(&mut buf);
        assert_eq!(buf.capacity(), 0, "the owner keeps no allocation");
        let again = take();
        assert_eq!(again.as_ptr(), at, "the same allocation is lent again");
        assert!(again.is_empty());
    }

    thread_local! {
        static NUMBERS: SpareVecs<u64> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn vectors_come_back_empty_and_only_when_small() {
        let mut v = take_vec(&NUMBERS);
        v.extend([1, 2, 3]);
        let at = v.as_ptr();
        give_back_vec(&NUMBERS, v, 16);
        let again = take_vec(&NUMBERS);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), at);
        give_back_vec(&NUMBERS, Vec::with_capacity(1000), 16);
        assert_eq!(take_vec(&NUMBERS).capacity(), 0);
    }

    #[test]
    fn buffers_that_grew_for_a_large_message_are_not_kept() {
        let mut big = BytesMut::with_capacity(KEEP_MAX * 4);
        give_back(&mut big);
        assert_eq!(big.capacity(), 0);
        assert!(
            take().capacity() < KEEP_MAX * 4,
            "a fresh buffer, not the big one"
        );
    }

    #[test]
    fn a_buffer_with_frames_still_alive_is_lent_only_for_what_is_left() {
        let mut buf = BytesMut::with_capacity(BUFFER);
        buf.extend_from_slice(&[7; 100]);
        let frame = buf.split_to(100);
        give_back(&mut buf);
        let lent = take();
        // Writing into what was lent cannot touch the frame.
        let mut lent = lent;
        lent.extend_from_slice(&[1; 200]);
        assert!(frame.iter().all(|b| *b == 7));
    }
}
