//! Taking what arrived off the sockets: the client's messages, whole or in pieces,
//! and the held server's answers, walked in place where they came whole (see
//! `MessageReader::take_whole_frames`).

use bytes::{Buf, BytesMut};

use super::*;

impl Session {
    pub(super) fn take_client_frames(&mut self) -> Result<(), End> {
        loop {
            let core = &self.core;
            let piece = self
                .client
                .next_piece(STREAM_FRAME_OVER, |tag| core.streams_client(tag))?;
            match piece {
                None => return Ok(()),
                Some(piece) => self.core.client_piece(piece)?,
            }
        }
    }

    pub(super) fn take_server_frames(&mut self) -> Result<(), End> {
        loop {
            let Some(held) = self.core.held_mut() else {
                return Ok(());
            };
            // Whole frames are handled in place, without a buffer of their own each.
            if let Some((batch, last_at)) = held.conn.reader.take_whole_frames(msg::READY_FOR_QUERY)
            {
                self.server_batch(batch, last_at)?;
                continue;
            }
            let piece = held.conn.reader.next_piece(STREAM_FRAME_OVER, |tag| {
                matches!(tag, msg::DATA_ROW | msg::COPY_DATA)
            });
            match piece {
                Ok(Some(piece)) => self.core.server_piece(piece)?,
                Ok(None) => return Ok(()),
                Err(e) => return self.core.server_lost(&e.to_string()),
            }
        }
    }

    /// Handles a batch of whole server frames from the held server's reader (the last
    /// one starting at `last_at`), and gives the reader back its buffer and whatever
    /// of the batch is left. A ReadyForQuery that ends the batch can release the
    /// server: it is handled, from a copy, once the buffer is back, so that the
    /// connection goes back to its pool with it.
    fn server_batch(&mut self, mut batch: BytesMut, last_at: usize) -> Result<(), End> {
        const READY_LEN: usize = 6;
        let ready: Option<[u8; READY_LEN]> = match batch.get(last_at..) {
            Some(frame) if frame.first() == Some(&msg::READY_FOR_QUERY) => frame.try_into().ok(),
            _ => None,
        };
        let body = if ready.is_some() {
            last_at
        } else {
            batch.len()
        };
        let (used, handled) = self.core.server_frames(&batch[..body]);
        let all_used = used == body && handled.is_ok();
        match self.core.held_mut() {
            Some(held) if !all_used => {
                batch.advance(used);
                held.conn.reader.unread(batch);
            }
            Some(held) => held.conn.reader.lend_back(batch),
            // Dropped as broken: what it sent after goes with it.
            None => {
                batch.clear();
                spare::give_back(&mut batch);
            }
        }
        handled?;
        match ready {
            Some(ready) if all_used && self.core.holds_server() => self.core.server_frame(&ready),
            _ => Ok(()),
        }
    }
}
