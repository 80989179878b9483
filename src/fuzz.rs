//! Fuzz targets: the parts of the proxy that read bytes from the network or text from
//! a file, each as a function of arbitrary input that must never panic (nor hang, nor
//! allocate without bound). `fuzz/` runs them under libFuzzer (`cargo fuzz run
//! <target>`); `tests/fuzz.rs` runs them in CI for a bounded time on the checked-in
//! corpus (`fuzz/corpus/<target>/`) and mutations of it, with `mutate` below.

use bytes::BytesMut;

use crate::protocol::messages as msg;
use crate::protocol::{MAX_CLIENT_MESSAGE, MessageReader, Piece, STREAM_FRAME_OVER};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/` and the corpus folders name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("frontend", frontend),
    ("classifier", classifier),
    ("pgoutput", pgoutput),
    ("config", config),
];

/// What the proxy reads from a client: a startup packet's parameters, then messages
/// split by the framing reader (whole or in pieces) and each decoded the way the
/// session decodes it, and the units that the transaction and statement helpers look
/// into.
pub fn frontend(data: &[u8]) {
    let (startup, rest) =
        data.split_at(data.len().min(data.first().copied().unwrap_or(0) as usize));
    // As sent, and as the parameters of a 3.0 login.
    let login = [&[0, 3, 0, 0][..], startup].concat();
    for packet in [startup, &login[..]] {
        if let crate::protocol::frontend::StartupPacket::Login { params, .. } =
            crate::protocol::frontend::StartupPacket::decode(packet)
        {
            let _ = crate::session::startup::startup_params(params);
        }
    }
    frames_in_place_match_frames_split_off(rest);
    let mut reader = MessageReader::with_prefix(tokio::io::empty(), MAX_CLIENT_MESSAGE, rest);
    let mut unit: Vec<BytesMut> = Vec::new();
    loop {
        let piece = reader.next_piece(STREAM_FRAME_OVER, |tag| tag == msg::COPY_DATA);
        let frame = match piece {
            Ok(Some(Piece::Frame(frame))) => frame,
            Ok(Some(Piece::Head { .. } | Piece::Body { .. })) => continue,
            Ok(None) | Err(_) => break,
        };
        decode_frontend(&frame);
        let ends_unit = matches!(frame[0], msg::SYNC | msg::QUERY);
        unit.push(frame);
        if ends_unit || unit.len() > 8 {
            if let Some(lone) = crate::session::transaction::lone_statement(&unit) {
                let _ = crate::session::transaction::deferrable_begin(lone.sql);
                let _ = crate::session::transaction::plain_end(lone.sql);
            }
            unit.clear();
        }
    }
}

/// Server answers are walked in place (`take_whole_frames` and `Frames`), the rest of
/// the proxy splits frames off (`next_frame`): both must see the same frames in the
/// same order, and leave the same bytes unread, whatever the bytes. Each batch is put
/// back after its first frame, as a session does when its server fails mid-batch.
fn frames_in_place_match_frames_split_off(bytes: &[u8]) {
    use crate::protocol::framing::Frames;
    let empty = tokio::io::empty;
    let mut split = MessageReader::with_prefix(empty(), MAX_CLIENT_MESSAGE, bytes);
    let mut walked = MessageReader::with_prefix(empty(), MAX_CLIENT_MESSAGE, bytes);
    while let Some((mut batch, last_at)) = walked.take_whole_frames(msg::READY_FOR_QUERY) {
        let mut frames = Frames::new(&batch);
        let first = frames.next().unwrap_or_default();
        let expected = split.next_frame();
        assert!(
            matches!(&expected, Ok(Some(frame)) if &frame[..] == first),
            "a frame walked in place differs from the one split off: {first:?}, {expected:?}"
        );
        let used = frames.consumed(&batch);
        assert!(
            last_at < batch.len(),
            "the last frame starts inside the batch"
        );
        if used < batch.len() {
            bytes::Buf::advance(&mut batch, used);
            walked.unread(batch);
        } else {
            walked.lend_back(batch);
        }
    }
    assert!(
        !matches!(split.next_frame(), Ok(Some(_))),
        "splitting found a whole frame that the walk in place did not"
    );
    assert_eq!(split.peek_buffered(), walked.peek_buffered());
}

/// One message's fields, read as the proxy reads them: as a client's (the session,
/// the login's password messages) and as a server's (the pool's login, the answers).
fn decode_frontend(frame: &[u8]) {
    use crate::protocol::backend::{Authentication, Backend, first_column};
    use crate::protocol::frontend::{Frontend, PasswordMessage};
    match Backend::decode(frame) {
        Backend::DataRow(row) => {
            let _ = first_column(row);
        }
        Backend::Error(report) => {
            let _ = report.to_string();
        }
        Backend::Authentication(Authentication::Sasl(mechanisms)) => {
            let _ = mechanisms.names().count();
        }
        _ => {}
    }
    match Frontend::decode(frame) {
        Ok(Frontend::Query { sql }) => {
            let _ = crate::session::statements::deallocate_target(sql);
        }
        Ok(Frontend::Parse(parse)) => {
            let _ = parse.declares_no_types();
        }
        Ok(Frontend::Bind(bind)) => {
            let _ = bind.binds_no_values();
        }
        _ => {}
    }
    if frame[0] == msg::PASSWORD {
        let answer = PasswordMessage::of_frame(frame);
        let _ = answer.password();
        let _ = answer.sasl_initial();
    }
}

/// Statement texts: the shape scan (the same with and without its word skip), the
/// routing decision (parse, cache, the scan for large statements).
pub fn classifier(data: &[u8]) {
    let cache = crate::router::DecisionCache::new(64);
    let _ = cache.decide_bytes(data);
    let _ = crate::router::large::decide(data);
    let mut shape = Vec::new();
    crate::router::fingerprint::shape_into(data, &mut shape);
    // The scan that skips words without special bytes finds what the byte loop finds.
    let mut bytewise = Vec::new();
    crate::router::fingerprint::shape_with::<false>(data, &mut bytewise);
    assert_eq!(shape, bytewise, "the word skip changed the shape");
}

/// What a walsender sends: pgoutput messages, and the text values in them converted
/// for the sinks.
pub fn pgoutput(data: &[u8]) {
    let _ = crate::cdc::pgoutput::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        use crate::cdc::values::{ColumnType, Kind, to_bson};
        for kind in [
            Kind::Bool,
            Kind::Int32,
            Kind::Int64,
            Kind::Float,
            Kind::Numeric,
            Kind::Json,
            Kind::Bytea,
            Kind::Uuid,
            Kind::Timestamp,
            Kind::TimestampTz,
            Kind::Date,
            Kind::Text,
        ] {
            for array in [false, true] {
                let _ = to_bson(text, ColumnType { kind, array });
            }
        }
    }
}

/// proxy.toml: parsing and every check on it.
pub fn config(data: &[u8]) {
    let _ = crate::config::Config::parse(&String::from_utf8_lossy(data));
}

/// A small deterministic generator (xorshift64*), so that a failing run can be
/// replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the decoders: message tags, lengths, separators, quotes.
const INTERESTING: &[u8] = b"\0\x01\x04\x05\xff\x7fQPBDESHXCdcf;'\"$-/*\\= \n[]{}(),";

/// A mutation of `input` in the manner of a fuzzer: bit flips, interesting bytes,
/// inserted or deleted runs, big-endian lengths, and splices with `other`.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let byte = INTERESTING[rng.below(INTERESTING.len())];
                let longest = if rng.below(8) == 0 { 4096 } else { 8 };
                let run = 1 + rng.below(longest);
                out.splice(at..at, std::iter::repeat_n(byte, run));
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            4 => {
                let len = match rng.below(4) {
                    0 => 0u32,
                    1 => 4,
                    2 => u32::MAX,
                    _ => rng.next_u64() as u32 % 70_000,
                };
                out.splice(at..at, len.to_be_bytes());
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                let end = (at + rng.below(8)).min(out.len());
                let copy: Vec<u8> = out[at.min(end)..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out.truncate(1 << 20);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_empty_and_odd_input() {
        for (_, target) in TARGETS {
            for input in [
                &b""[..],
                b"\0",
                b"\xff\xff\xff\xff",
                b"Q\0\0\0\x04",
                &[0u8; 64],
            ] {
                target(input);
            }
        }
    }

    #[test]
    fn mutations_stay_bounded_and_vary() {
        let mut rng = Rng(7);
        let seeds: Vec<Vec<u8>> = (0..100)
            .map(|_| mutate(b"SELECT 1", b"INSERT", &mut rng))
            .collect();
        assert!(seeds.iter().all(|s| s.len() <= 1 << 20));
        let distinct: std::collections::HashSet<_> = seeds.iter().collect();
        assert!(distinct.len() > 50);
    }
}
