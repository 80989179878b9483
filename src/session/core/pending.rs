//! The client's messages read but not yet sent to a server, with their size: the
//! session stops reading the client while too much is waiting (backpressure), and
//! sends a long batch without Sync on in parts.

use std::collections::VecDeque;

use bytes::BytesMut;

#[derive(Default)]
pub struct Pending {
    frames: VecDeque<BytesMut>,
    bytes: usize,
}

impl Pending {
    pub const fn new() -> Pending {
        Pending {
            frames: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn push_back(&mut self, frame: BytesMut) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    pub fn push_front(&mut self, frame: BytesMut) {
        self.bytes += frame.len();
        self.frames.push_front(frame);
    }

    pub fn pop_front(&mut self) -> Option<BytesMut> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.len();
        Some(frame)
    }

    pub fn front(&self) -> Option<&BytesMut> {
        self.frames.front()
    }

    /// Moves the first `count` frames to the end of `into`.
    pub fn take_front(&mut self, count: usize, into: &mut Vec<BytesMut>) {
        for frame in self.frames.drain(..count.min(self.frames.len())) {
            self.bytes -= frame.len();
            into.push(frame);
        }
    }

    /// Puts `frames` back in front, in their order.
    pub fn put_back(&mut self, frames: Vec<BytesMut>) {
        for frame in frames.into_iter().rev() {
            self.push_front(frame);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &BytesMut> {
        self.frames.iter()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of all waiting frames.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_through_every_move() {
        let mut p = Pending::default();
        p.push_back(BytesMut::from(&b"S\0\0\0\x04"[..]));
        p.push_back(BytesMut::from(&b"Q\0\0\0\x06x\0"[..]));
        assert_eq!((p.len(), p.bytes()), (2, 12));
        let mut unit = Vec::new();
        p.take_front(1, &mut unit);
        assert_eq!((p.len(), p.bytes()), (1, 7));
        p.put_back(unit);
        assert_eq!(p.front().map(|f| f[0]), Some(b'S'));
        assert_eq!(p.bytes(), 12);
        p.pop_front();
        p.pop_front();
        assert!(p.is_empty() && p.bytes() == 0 && p.pop_front().is_none());
    }
}
