//! Builders for the few messages the proxy writes itself, and zero-copy readers for the
//! few fields it inspects (statement text, statement names, error codes). Everything
//! else is forwarded as opaque bytes.

use bytes::{BufMut, BytesMut};

use super::ProtocolError;

// Frontend (client → server) tags.
pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD: u8 = b'p';

// Backend (server → client) tags.
pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION: u8 = b'A';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const NO_DATA: u8 = b'n';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';

// Startup-phase request codes.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// Starts a tagged message in `buf`; returns the offset of its length field.
fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the peer; strip it rather than corrupt framing.
    for part in s.split('\0') {
        buf.put_slice(part.as_bytes());
    }
    buf.put_u8(0);
}

/// ErrorResponse (or NoticeResponse with `tag = b'N'`).
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    notice_like(buf, ERROR_RESPONSE, severity, code, message);
}

pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    notice_like(buf, NOTICE_RESPONSE, "NOTICE", code, message);
}

fn notice_like(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    let at = begin(buf, tag);
    buf.put_u8(b'S');
    put_cstr(buf, severity);
    buf.put_u8(b'V');
    put_cstr(buf, severity);
    buf.put_u8(b'C');
    put_cstr(buf, code);
    buf.put_u8(b'M');
    put_cstr(buf, message);
    buf.put_u8(0);
    finish(buf, at);
}

/// The transaction status a ReadyForQuery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    #[default]
    Idle,
    /// 'T': in a transaction block.
    InBlock,
    /// 'E': in a failed transaction block (only its end is accepted).
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }

    /// The status of a server's ReadyForQuery frame (tag, length, status byte). A
    /// frame without one, or with an unknown one, reads as idle: what a server that
    /// sent it would accept next.
    pub fn of_ready_frame(frame: &[u8]) -> TxStatus {
        match frame.get(5) {
            Some(b'T') => TxStatus::InBlock,
            Some(b'E') => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }

    pub fn is_idle(self) -> bool {
        self == TxStatus::Idle
    }
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    let at = begin(buf, READY_FOR_QUERY);
    buf.put_u8(status.byte());
    finish(buf, at);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, PARAMETER_STATUS);
    put_cstr(buf, name);
    put_cstr(buf, value);
    finish(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(buf, BACKEND_KEY_DATA);
    buf.put_i32(pid);
    buf.put_i32(secret);
    finish(buf, at);
}

pub fn authentication(buf: &mut BytesMut, code: i32, data: &[u8]) {
    let at = begin(buf, AUTHENTICATION);
    buf.put_i32(code);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn empty_message(buf: &mut BytesMut, tag: u8) {
    let at = begin(buf, tag);
    finish(buf, at);
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters(buf: &mut BytesMut) {
    let at = begin(buf, PARAMETER_DESCRIPTION);
    buf.put_i16(0);
    finish(buf, at);
}

pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    let at = begin(buf, ROW_DESCRIPTION);
    buf.put_i16(columns.len() as i16);
    for name in columns {
        put_cstr(buf, name);
        buf.put_i32(0); // table oid
        buf.put_i16(0); // attribute number
        buf.put_i32(25); // text
        buf.put_i16(-1);
        buf.put_i32(-1);
        buf.put_i16(0); // text format
    }
    finish(buf, at);
}

pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    let at = begin(buf, b'D');
    buf.put_i16(values.len() as i16);
    for value in values {
        match value {
            Some(v) => {
                buf.put_i32(v.len() as i32);
                buf.put_slice(v.as_bytes());
            }
            None => buf.put_i32(-1),
        }
    }
    finish(buf, at);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let at = begin(buf, COMMAND_COMPLETE);
    put_cstr(buf, tag);
    finish(buf, at);
}

// ---- frontend messages the proxy sends to servers ----

/// SSLRequest: asks a server for TLS before the startup message.
pub fn ssl_request(out: &mut BytesMut) {
    out.put_u32(8);
    out.put_u32(SSL_REQUEST);
}

pub fn startup_message(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_u32(16);
    buf.put_u32(CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

pub fn query(buf: &mut BytesMut, sql: &str) {
    let at = begin(buf, QUERY);
    put_cstr(buf, sql);
    finish(buf, at);
}

pub fn copy_fail(buf: &mut BytesMut, reason: &str) {
    let at = begin(buf, COPY_FAIL);
    put_cstr(buf, reason);
    finish(buf, at);
}

pub fn password_message(buf: &mut BytesMut, data: &[u8]) {
    let at = begin(buf, PASSWORD);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let at = begin(buf, PASSWORD);
    put_cstr(buf, mechanism);
    buf.put_i32(data.len() as i32);
    buf.put_slice(data);
    finish(buf, at);
}

/// Parse message with a given statement name and the original `query | types` tail.
pub fn parse_with_name(buf: &mut BytesMut, name: &str, query_and_types: &[u8]) {
    let at = begin(buf, PARSE);
    put_cstr(buf, name);
    buf.put_slice(query_and_types);
    finish(buf, at);
}

/// Close of the prepared statement (`kind` b'S') or portal (b'P') `name`.
pub fn close(buf: &mut BytesMut, kind: u8, name: &str) {
    let at = begin(buf, CLOSE);
    buf.put_u8(kind);
    put_cstr(buf, name);
    finish(buf, at);
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal, without
/// parameters and without a Sync: after an error, the server skips what follows up to
/// the next Sync. `sql` must not contain NUL.
pub fn run_unnamed(buf: &mut BytesMut, sql: &[u8]) {
    let at = begin(buf, PARSE);
    buf.put_u8(0);
    buf.put_slice(sql);
    buf.put_u8(0);
    buf.put_i16(0);
    finish(buf, at);
    let at = begin(buf, BIND);
    buf.put_u8(0); // portal
    buf.put_u8(0); // statement
    buf.put_i16(0); // parameter formats
    buf.put_i16(0); // parameters
    buf.put_i16(0); // result formats
    finish(buf, at);
    let at = begin(buf, EXECUTE);
    buf.put_u8(0);
    buf.put_i32(0);
    finish(buf, at);
}

/// A frame with its statement/portal name replaced: `tag | len | [prefix] name\0 | rest`.
pub fn with_replaced_name(buf: &mut BytesMut, tag: u8, prefix: &[u8], name: &str, rest: &[u8]) {
    let at = begin(buf, tag);
    buf.put_slice(prefix);
    put_cstr(buf, name);
    buf.put_slice(rest);
    finish(buf, at);
}

// ---- readers ----

/// Cursor over a message payload (after tag and length).
pub struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Payload of a tagged frame.
    pub fn of_frame(frame: &'a [u8]) -> Self {
        Self {
            data: frame.get(5..).unwrap_or(&[]),
        }
    }

    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        // memchr scans a word or a vector at a time: the SQL text of every Query and
        // Parse goes through here.
        let end = memchr::memchr(0, self.data)
            .ok_or_else(|| ProtocolError::Violation("unterminated string in message".into()))?;
        let s = &self.data[..end];
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes)
            .map_err(|_| ProtocolError::Violation("string in message is not valid UTF-8".into()))
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (first, rest) = self
            .data
            .split_first()
            .ok_or_else(|| ProtocolError::Violation("message too short".into()))?;
        self.data = rest;
        Ok(*first)
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        if self.data.len() < 4 {
            return Err(ProtocolError::Violation("message too short".into()));
        }
        let v = i32::from_be_bytes([self.data[0], self.data[1], self.data[2], self.data[3]]);
        self.data = &self.data[4..];
        Ok(v)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.data.len() < n {
            return Err(ProtocolError::Violation("message too short".into()));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
}

/// Severity, SQLSTATE and message of an ErrorResponse or NoticeResponse, owned: for an
/// error that outlives its frame (`backend::Report::to_fields`).
#[derive(Debug, Default, Clone)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_status_round_trips_through_ready_for_query() {
        for status in [TxStatus::Idle, TxStatus::InBlock, TxStatus::Failed] {
            let mut buf = BytesMut::new();
            ready_for_query(&mut buf, status);
            assert_eq!(&buf[..5], &[READY_FOR_QUERY, 0, 0, 0, 5]);
            assert_eq!(TxStatus::of_ready_frame(&buf), status);
        }
        // A frame cut short reads as idle rather than panicking.
        assert_eq!(TxStatus::of_ready_frame(&[READY_FOR_QUERY]), TxStatus::Idle);
    }

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, "FATAL", "3D000", "database \"x\" does not exist");
        let super::super::backend::Backend::Error(report) =
            super::super::backend::Backend::decode(&buf)
        else {
            panic!("not an error");
        };
        let fields = report.to_fields();
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "3D000");
        assert_eq!(fields.message, "database \"x\" does not exist");
    }

    #[test]
    fn fields_reject_truncated_input() {
        let mut f = Fields::new(b"abc");
        assert!(f.cstr().is_err());
        let mut f = Fields::new(&[1, 2]);
        assert!(f.i32().is_err());
    }
}
