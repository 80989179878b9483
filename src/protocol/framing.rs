//! Splits a byte stream into PostgreSQL protocol messages without decoding them.
//!
//! Every message after the startup phase is `tag (1 byte) | length (4 bytes, includes
//! itself) | payload`. The reader keeps one growing buffer per socket and hands out
//! whole frames as `BytesMut` slices of it, so forwarding a frame costs no parsing and
//! at most one copy into the peer's output buffer.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;

/// What a read reserves when its buffer is nearly full: as much as a lent buffer holds
/// (a buffer starts as one of `spare`'s, and grows on demand for large rows).
const READ_CHUNK: usize = super::spare::BUFFER;

/// A source that can tell when bytes have arrived without taking them: a reader
/// without a buffer waits on it before taking one (see [`MessageReader::park`]).
pub trait ReadReady {
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

pub struct MessageReader<R> {
    inner: R,
    buf: BytesMut,
    /// Largest frame accepted whole from this peer (clients get a limit, servers do
    /// not).
    max_len: usize,
    /// Bytes of a large frame handed out in pieces (`next_piece`) still to come.
    streaming_left: usize,
}

/// What `next_piece` hands out: whole frames, except that a frame too large to hold
/// whole comes as its start and then the rest as it arrives, so that a 500 MB row or
/// COPY line costs the proxy a read buffer, not 500 MB.
#[derive(Debug)]
pub enum Piece {
    Frame(BytesMut),
    /// The first bytes of a large frame: its tag and length and what followed them.
    Head {
        tag: u8,
        bytes: BytesMut,
    },
    /// More of that frame; `last` when this completes it.
    Body {
        bytes: BytesMut,
        last: bool,
    },
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            // Taken from the spares at the first read (see `make_room`).
            buf: BytesMut::new(),
            max_len,
            streaming_left: 0,
        }
    }

    /// A reader whose first bytes were already taken off the socket.
    pub fn with_prefix(inner: R, max_len: usize, prefix: &[u8]) -> Self {
        let mut reader = Self::new(inner, max_len);
        if !prefix.is_empty() {
            reader.buf = super::spare::take();
            reader.buf.extend_from_slice(prefix);
        }
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

    /// Returns the next complete tagged frame already in the buffer, if any. The rest
    /// of a frame `next_piece` began handing out is skipped first.
    pub fn next_frame(&mut self) -> Result<Option<BytesMut>, ProtocolError> {
        if self.streaming_left > 0 {
            let skip = self.streaming_left.min(self.buf.len());
            self.buf.advance(skip);
            self.streaming_left -= skip;
            if self.streaming_left > 0 {
                return Ok(None);
            }
        }
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = self.front_len()?;
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

    /// The length field of the frame at the front of the buffer (5 bytes present).
    fn front_len(&self) -> Result<usize, ProtocolError> {
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(ProtocolError::Violation(format!(
                "message '{}' has invalid length {len}",
                printable_tag(self.buf[0])
            )));
        }
        Ok(len)
    }

    /// Like `next_frame`, except that a frame longer than `stream_over` bytes whose tag
    /// `streamable` accepts, and which has not fully arrived, is handed out in pieces
    /// as it arrives. Such a frame is not held to the whole-frame limit: its size costs
    /// nothing here, and the peer it goes to judges it.
    pub fn next_piece(
        &mut self,
        stream_over: usize,
        streamable: impl FnOnce(u8) -> bool,
    ) -> Result<Option<Piece>, ProtocolError> {
        if self.streaming_left > 0 {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let n = self.streaming_left.min(self.buf.len());
            self.streaming_left -= n;
            return Ok(Some(Piece::Body {
                bytes: self.buf.split_to(n),
                last: self.streaming_left == 0,
            }));
        }
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = self.front_len()?;
        let tag = self.buf[0];
        if self.buf.len() < len + 1 && len > stream_over && streamable(tag) {
            self.streaming_left = len + 1 - self.buf.len();
            let bytes = self.buf.split();
            return Ok(Some(Piece::Head { tag, bytes }));
        }
        Ok(self.next_frame()?.map(Piece::Frame))
    }

    /// Takes the whole frames at the front of the buffer as one buffer, up to and
    /// including the first tagged `last` (ReadyForQuery: what follows it can belong to
    /// a later owner of the connection, and stays). `None` when the front frame is not
    /// whole, is being handed out in pieces or has a bad length (`next_piece` deals
    /// with those). When the frames fill the buffer (the usual case: a read ends on a
    /// frame boundary) the buffer itself is handed over, so that the caller can walk
    /// the frames with [`Frames`] without splitting each off, and give it back with
    /// [`MessageReader::lend_back`]. Also says where the last frame starts.
    pub fn take_whole_frames(&mut self, last: u8) -> Option<(BytesMut, usize)> {
        if self.streaming_left > 0 {
            return None;
        }
        let mut end = 0;
        let mut last_at = 0;
        while let Some(len) = whole_frame_len(&self.buf[end..], self.max_len) {
            last_at = end;
            end += len;
            if self.buf[last_at] == last {
                break;
            }
        }
        let batch = match end {
            0 => return None,
            _ if end == self.buf.len() => std::mem::take(&mut self.buf),
            _ => self.buf.split_to(end),
        };
        Some((batch, last_at))
    }

    /// Puts bytes taken by `take_whole_frames` and not used back in front of what
    /// arrived since.
    pub fn unread(&mut self, mut rest: BytesMut) {
        if rest.is_empty() {
            return self.lend_back(rest);
        }
        // Free when `rest` was split off the front of the buffer.
        rest.unsplit(std::mem::take(&mut self.buf));
        self.buf = rest;
    }

    /// Gives back a buffer handed over by `take_whole_frames`, once used, if the
    /// reader has none (saving the spares a round trip); otherwise to the spares.
    pub fn lend_back(&mut self, mut buf: BytesMut) {
        buf.clear();
        if self.buf.capacity() == 0 {
            self.buf = buf;
        } else {
            super::spare::give_back(&mut buf);
        }
    }

    /// Gives back a buffer that grew past `keep` bytes for a large message, once it
    /// holds nothing: a connection that carried one big row once should not keep
    /// its memory while it sits in a pool or an idle session.
    pub fn release_excess(&mut self, keep: usize) {
        if self.buf.is_empty() && self.buf.capacity() > keep {
            self.buf = BytesMut::new();
        }
    }

    /// Lends an empty buffer back (see `spare`): an idle connection keeps none. The
    /// next read takes one again.
    pub fn park(&mut self) {
        if self.streaming_left == 0 {
            super::spare::give_back(&mut self.buf);
        }
    }

    /// A large frame is being handed out in pieces and is not complete yet.
    pub fn mid_frame(&self) -> bool {
        self.streaming_left > 0
    }

    /// Reads more bytes from the socket. Returns 0 at end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        self.make_room();
        self.inner.read_buf(&mut self.buf).await
    }

    /// `fill` as a poll, for a loop that waits on several sockets at once without
    /// keeping a future for each.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.make_room();
        tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf)
    }

    /// Like `poll_fill`, except that a parked reader first waits for bytes to arrive,
    /// so that a connection waiting for its next request holds no buffer.
    pub fn poll_fill_when_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>>
    where
        R: ReadReady,
    {
        if self.buf.capacity() == 0 {
            ready!(self.inner.poll_ready(cx))?;
        }
        self.poll_fill(cx)
    }

    fn make_room(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = super::spare::take();
        } else if self.buf.is_empty() {
            // Nothing left to parse: start again at the front of the allocation (when
            // no handed-out frame still points into it), so that each read lands on
            // the same cache lines instead of walking through the whole buffer. When a
            // frame still does, reading simply goes on where it is.
            let _reclaimed = self.buf.try_reclaim(self.buf.capacity() + 1);
        }
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
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

/// The length of the whole frame (tag included) at the front of `bytes`, if it is
/// all there and its length is valid and within `max_len`.
fn whole_frame_len(bytes: &[u8], max_len: usize) -> Option<usize> {
    let header = bytes.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 || len > max_len || bytes.len() <= len {
        return None;
    }
    Some(len + 1)
}

/// The frames of a buffer of whole frames (see `take_whole_frames`), in order. Stops
/// at the first that is not whole, which such a buffer does not have.
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// How many bytes the frames handed out so far took.
    pub fn consumed(&self, of: &[u8]) -> usize {
        of.len() - self.rest.len()
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = whole_frame_len(self.rest, usize::MAX)?;
        let (frame, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(frame)
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

    /// Feeds `data` to a reader `step` bytes at a time and collects what `next_piece`
    /// hands out.
    async fn pieces(data: &[u8], step: usize, stream_over: usize) -> Vec<Piece> {
        use tokio::io::AsyncWriteExt;
        let (mut peer, ours) = tokio::io::duplex(step);
        let mut reader = MessageReader::new(ours, 64);
        let data = data.to_vec();
        let feeder = tokio::spawn(async move {
            for chunk in data.chunks(step) {
                peer.write_all(chunk).await.unwrap();
            }
        });
        let mut out = Vec::new();
        loop {
            while let Some(piece) = reader.next_piece(stream_over, |tag| tag == b'D').unwrap() {
                out.push(piece);
            }
            if reader.fill().await.unwrap() == 0 {
                break;
            }
        }
        feeder.await.unwrap();
        assert!(!reader.mid_frame());
        out
    }

    #[tokio::test]
    async fn large_frames_of_streamable_kinds_come_in_pieces_and_add_up() {
        let mut data = Vec::new();
        let row: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        data.extend_from_slice(b"T\0\0\0\x04");
        data.push(b'D');
        data.extend_from_slice(&(4 + row.len() as u32).to_be_bytes());
        data.extend_from_slice(&row);
        data.extend_from_slice(b"C\0\0\0\x05x");
        let got = pieces(&data, 1000, 100).await;
        assert!(matches!(&got[0], Piece::Frame(f) if f[0] == b'T'));
        let Piece::Head { tag: b'D', bytes } = &got[1] else {
            panic!("{:?}", got[1]);
        };
        let mut row_bytes = bytes.to_vec();
        let mut ended = false;
        for piece in &got[2..got.len() - 1] {
            let Piece::Body { bytes, last } = piece else {
                panic!("{piece:?}");
            };
            assert!(!ended);
            row_bytes.extend_from_slice(bytes);
            ended = *last;
        }
        assert!(ended);
        assert_eq!(&row_bytes[5..], &row[..], "every byte, in order");
        assert!(matches!(got.last(), Some(Piece::Frame(f)) if f[0] == b'C'));
        // No piece held more than a read's worth.
        assert!(got.iter().all(|p| match p {
            Piece::Frame(b) | Piece::Head { bytes: b, .. } | Piece::Body { bytes: b, .. } =>
                b.len() <= 1000,
        }));
    }

    #[tokio::test]
    async fn other_kinds_and_small_frames_come_whole() {
        let mut data = Vec::new();
        // A row under the streaming threshold comes whole even in small reads; a frame
        // of a kind not streamed, over the whole-frame limit of 64, is refused.
        data.push(b'D');
        data.extend_from_slice(&54u32.to_be_bytes());
        data.extend_from_slice(&[7u8; 50]);
        let got = pieces(&data, 7, 100).await;
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Piece::Frame(f) if f.len() == 55));
        let mut reader = MessageReader::new(&b"E\0\0\x10\0"[..], 64);
        assert!(matches!(
            reader.next_piece(100, |tag| tag == b'D'),
            Ok(None)
        ));
        reader.fill().await.unwrap();
        assert!(matches!(
            reader.next_piece(100, |tag| tag == b'D'),
            Err(ProtocolError::Violation(_))
        ));
    }

    #[tokio::test]
    async fn next_frame_skips_the_rest_of_a_frame_begun_in_pieces() {
        let mut data = vec![b'D'];
        data.extend_from_slice(&1004u32.to_be_bytes());
        data.extend_from_slice(&[1u8; 1000]);
        data.extend_from_slice(b"Z\0\0\0\x05I");
        let (mut peer, ours) = tokio::io::duplex(100);
        let mut reader = MessageReader::new(ours, 64);
        use tokio::io::AsyncWriteExt;
        let feeder = tokio::spawn(async move { peer.write_all(&data).await.unwrap() });
        reader.fill().await.unwrap();
        let piece = reader.next_piece(100, |_| true).unwrap();
        assert!(matches!(piece, Some(Piece::Head { tag: b'D', .. })));
        assert!(reader.mid_frame());
        let frame = reader.read_frame().await.unwrap();
        assert_eq!(&frame[..], b"Z\0\0\0\x05I");
        feeder.await.unwrap();
    }

    #[test]
    fn whole_frames_are_taken_up_to_a_ready_for_query_and_walked_in_place() {
        let data: &[u8] = b"T\0\0\0\x04D\0\0\0\x05xZ\0\0\0\x05IC\0\0\0\x04D\0\0";
        let mut reader = MessageReader::with_prefix(tokio::io::empty(), 1024, data);
        let (batch, last_at) = reader.take_whole_frames(b'Z').unwrap();
        // Up to and including the ReadyForQuery; what follows stays.
        assert_eq!(&batch[..], &data[..17]);
        assert_eq!(last_at, 11);
        let frames: Vec<&[u8]> = Frames::new(&batch).collect();
        assert_eq!(frames, [&data[..5], &data[5..11], &data[11..17]]);
        assert_eq!(reader.peek_buffered(), &data[17..]);
        // Put back after its first frame: in front of what stayed, as if never taken.
        let mut batch = batch;
        batch.advance(5);
        reader.unread(batch);
        assert_eq!(reader.peek_buffered(), &data[5..]);
        let (batch, _) = reader.take_whole_frames(b'Z').unwrap();
        assert_eq!(&batch[..], &data[5..17]);
        let (batch, last_at) = reader.take_whole_frames(b'Z').unwrap();
        assert_eq!((&batch[..], last_at), (&data[17..22], 0));
        // The front frame is not whole: nothing is taken.
        assert!(reader.take_whole_frames(b'Z').is_none());
        assert_eq!(reader.peek_buffered(), &data[22..]);
    }

    #[test]
    fn a_buffer_of_whole_frames_is_handed_over_and_lent_back() {
        let data: &[u8] = b"C\0\0\0\x04Z\0\0\0\x05I";
        let mut reader = MessageReader::with_prefix(tokio::io::empty(), 1024, data);
        let at = reader.peek_buffered().as_ptr();
        let (batch, _) = reader.take_whole_frames(b'Z').unwrap();
        assert_eq!(batch.as_ptr(), at, "the buffer itself, not a copy");
        assert_eq!(reader.buffered(), 0);
        reader.lend_back(batch);
        assert_eq!(reader.buffered(), 0, "lent back empty");
        assert!(reader.buf.capacity() >= super::super::spare::BUFFER);
    }

    #[test]
    fn frames_with_bad_lengths_or_over_the_limit_are_left_to_next_piece() {
        for data in [&b"Q\0\0\0\x02"[..], b"D\0\0\x10\0", b"D\0\0\0\x05"] {
            let mut reader = MessageReader::with_prefix(tokio::io::empty(), 64, data);
            assert!(reader.take_whole_frames(b'Z').is_none(), "{data:?}");
            assert_eq!(reader.peek_buffered(), data);
        }
        // A frame over the limit ends a batch of those before it.
        let data: &[u8] = b"C\0\0\0\x04D\0\0\0\x50";
        let mut reader = MessageReader::with_prefix(tokio::io::empty(), 64, data);
        let (batch, _) = reader.take_whole_frames(b'Z').unwrap();
        assert_eq!(&batch[..], &data[..5]);
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
