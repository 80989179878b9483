//! Splits a byte stream into PostgreSQL protocol messages without decoding them.
//!
//! Every message after the startup phase is `tag (1 byte) | length (4 bytes, includes
//! itself) | payload`. The reader keeps one growing buffer per socket and hands out
//! whole frames as `BytesMut` slices of it, so forwarding a frame costs no parsing and
//! at most one copy into the peer's output buffer.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;

/// Initial buffer capacity; grows on demand for large rows.
const READ_CHUNK: usize = 16 * 1024;

pub struct MessageReader<R> {
    inner: R,
    buf: BytesMut,
    /// Largest frame accepted from this peer (clients get a limit, servers do not).
    max_len: usize,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_len,
        }
    }

    /// A reader whose first bytes were already taken off the socket.
    pub fn with_prefix(inner: R, max_len: usize, prefix: &[u8]) -> Self {
        let mut reader = Self::new(inner, max_len);
        reader.buf.extend_from_slice(prefix);
        reader
    }

    /// Changes the largest frame accepted from now on (a client gets more once it has
    /// logged in).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The bytes received but not yet returned as frames.
    pub fn peek_buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Returns the next complete tagged frame already in the buffer, if any.
    pub fn next_frame(&mut self) -> Result<Option<BytesMut>, ProtocolError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(ProtocolError::Violation(format!(
                "message '{}' has invalid length {len}",
                printable_tag(self.buf[0])
            )));
        }
        if len > self.max_len {
            return Err(ProtocolError::Violation(format!(
                "message '{}' of {len} bytes exceeds the limit of {} bytes",
                printable_tag(self.buf[0]),
                self.max_len
            )));
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(len + 1)))
    }

    /// Reads more bytes from the socket. Returns 0 at end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            // Nothing left to parse: start again at the front of the allocation (when
            // no handed-out frame still points into it), so that each read lands on
            // the same cache lines instead of walking through the whole buffer. When a
            // frame still does, reading simply goes on where it is.
            let _reclaimed = self.buf.try_reclaim(self.buf.capacity() + 1);
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.inner.read_buf(&mut self.buf).await
    }

    /// Waits for one complete tagged frame.
    pub async fn read_frame(&mut self) -> Result<BytesMut, ProtocolError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(frame);
            }
            if self.fill().await? == 0 {
                return Err(ProtocolError::Closed);
            }
        }
    }

    /// Reads an untagged startup-phase packet: `length (4) | payload`.
    pub async fn read_startup_packet(&mut self) -> Result<BytesMut, ProtocolError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if !(8..=10_000).contains(&len) {
                    return Err(ProtocolError::Violation(format!(
                        "invalid startup packet length {len}"
                    )));
                }
                if self.buf.len() >= len {
                    let mut packet = self.buf.split_to(len);
                    packet.advance(4);
                    return Ok(packet);
                }
            }
            if self.fill().await? == 0 {
                return Err(ProtocolError::Closed);
            }
        }
    }
}

pub fn printable_tag(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_frames_across_reads() {
        let data: &[u8] = &[b'Q', 0, 0, 0, 6, b'x', 0, b'S', 0, 0, 0, 4];
        let mut reader = MessageReader::new(data, 1024);
        let first = reader.read_frame().await.unwrap();
        assert_eq!(&first[..], &data[..7]);
        let second = reader.read_frame().await.unwrap();
        assert_eq!(&second[..], b"S\0\0\0\x04");
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::Closed)
        ));
    }

    #[tokio::test]
    async fn reads_start_again_at_the_front_once_every_frame_is_released() {
        use tokio::io::AsyncWriteExt;
        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut reader = MessageReader::new(ours, 1024);
        let message: &[u8] = b"Q\0\0\0\x06x\0";
        peer.write_all(message).await.unwrap();
        let first = reader.read_frame().await.unwrap();
        let front = first.as_ptr();
        // A frame still in use keeps its bytes: the next read goes after them.
        peer.write_all(message).await.unwrap();
        let second = reader.read_frame().await.unwrap();
        assert_eq!(&second[..], message);
        assert_ne!(second.as_ptr(), front);
        assert_eq!(&first[..], message);
        drop((first, second));
        // Once released, the next read lands where the first one did.
        peer.write_all(message).await.unwrap();
        let third = reader.read_frame().await.unwrap();
        assert_eq!(&third[..], message);
        assert_eq!(third.as_ptr(), front);
    }

    #[tokio::test]
    async fn rejects_bad_lengths() {
        let data: &[u8] = &[b'Q', 0, 0, 0, 2];
        let mut reader = MessageReader::new(data, 1024);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::Violation(_))
        ));
        let big: &[u8] = &[b'Q', 0x7f, 0, 0, 0];
        let mut reader = MessageReader::new(big, 1024);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::Violation(_))
        ));
    }
}
