//! The wire protocol by hand, for tests that must control every byte a client sends:
//! frames, a SCRAM login over a raw socket, reading whole messages, and a small seeded
//! generator for fuzzed and differential tests.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u32(196_608);
    for (k, v) in [("user", user), ("database", database)] {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut packet = Vec::new();
    packet.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    packet.extend_from_slice(&body);
    packet
}

pub fn error_code(bytes: &[u8]) -> Option<String> {
    let at = bytes.iter().position(|b| *b == b'E')?;
    let body = &bytes[at + 5..];
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let kind = body[i];
        let end = body[i + 1..].iter().position(|b| *b == 0)? + i + 1;
        if kind == b'C' {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

/// The next whole message from the server, reading more into `buf` as needed; fails
/// the test if the socket closes or nothing comes for 10 s.
pub async fn next_message(stream: &mut TcpStream, buf: &mut BytesMut) -> BytesMut {
    while buf.len() < 5
        || buf.len() < 1 + u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize
    {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(buf));
        let n = read.await.expect("no answer").unwrap();
        assert!(n > 0, "connection closed");
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    buf.split_to(len + 1)
}

/// Logs in over a raw socket with SCRAM, returning the socket after ReadyForQuery.
pub async fn login_raw(stream: TcpStream) -> TcpStream {
    login_raw_with_key(stream).await.0
}

/// `login_raw`, also returning the BackendKeyData the client got: process id, secret.
pub async fn login_raw_with_key(mut stream: TcpStream) -> (TcpStream, (i32, i32)) {
    let mut key = (0, 0);
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    stream
        .write_all(&startup_packet("app", "app"))
        .await
        .unwrap();
    let mut scram = ScramSha256::new(b"secret", ChannelBinding::unrequested());
    let mut buf = BytesMut::new();
    loop {
        let frame = next_message(&mut stream, &mut buf).await;
        match frame[0] {
            b'R' => {
                let code = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                let mut out = BytesMut::new();
                match code {
                    10 => {
                        let m = scram.message();
                        out.put_u8(b'p');
                        out.put_u32((4 + 14 + 4 + m.len()) as u32);
                        out.put_slice(b"SCRAM-SHA-256\0");
                        out.put_i32(m.len() as i32);
                        out.put_slice(m);
                    }
                    11 => {
                        scram.update(&frame[9..]).unwrap();
                        let m = scram.message();
                        out.put_u8(b'p');
                        out.put_u32((4 + m.len()) as u32);
                        out.put_slice(m);
                    }
                    _ => {}
                }
                if !out.is_empty() {
                    stream.write_all(&out).await.unwrap();
                }
            }
            b'K' => {
                key = (
                    i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]),
                    i32::from_be_bytes([frame[9], frame[10], frame[11], frame[12]]),
                )
            }
            b'Z' => return (stream, key),
            b'E' => panic!("login failed"),
            _ => {}
        }
    }
}

/// A small deterministic generator (xorshift64*), so that a failing case can be replayed.
pub struct Fuzz(pub u64);

impl Fuzz {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// A 16-bit count: usually small and right, sometimes negative or absurd.
    pub fn count(&mut self, right: i16) -> i16 {
        *self.pick(&[right, right, right, 0, 1, 2, -1, i16::MAX, i16::MIN])
    }
    pub fn string(&mut self, out: &mut BytesMut, choices: &[&[u8]]) {
        let chosen: &[u8] = choices[self.below(choices.len() as u64) as usize];
        out.put_slice(chosen);
        out.put_u8(0);
    }
}

/// A frontend message: type, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    message(b'Q', &body)
}

pub fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A CancelRequest for the key a client got in BackendKeyData.
pub fn cancel_packet(pid: i32, secret: i32) -> Vec<u8> {
    let mut packet = Vec::new();
    packet.extend_from_slice(&16u32.to_be_bytes());
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    packet
}

/// Reads up to ReadyForQuery; the SQLSTATE of the last error before it, if any.
pub async fn error_until_ready(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<String> {
    let mut code = None;
    loop {
        let frame = next_message(stream, buf).await;
        match frame[0] {
            b'E' => code = error_code(&frame),
            b'Z' => return code,
            _ => {}
        }
    }
}
