//! Server messages decoded into typed views that borrow the frame's bytes: the one
//! place where the fields of a ReadyForQuery, CommandComplete, ErrorResponse,
//! NoticeResponse, ParameterStatus, an authentication request or BackendKeyData are
//! read. Everything else (rows, descriptions, COPY data) is only its tag: the data path
//! never decodes a row. Decoding never fails: a server's malformed field reads as
//! empty, as the proxy cannot judge it better than the client will; only where an
//! empty value would mean nothing (an authentication request, a cancel key) is the
//! message `Malformed`.

use std::borrow::Cow;

use super::messages::{self as msg, ErrorFields, Fields, TxStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend<'a> {
    ReadyForQuery(TxStatus),
    CommandComplete {
        /// e.g. `COMMIT`, `INSERT 0 1`.
        tag: &'a [u8],
    },
    Error(Report<'a>),
    Notice(Report<'a>),
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// A row, undecoded (see `first_column` for the proxy's own one-value queries).
    DataRow(&'a [u8]),
    Authentication(Authentication<'a>),
    BackendKeyData {
        pid: i32,
        secret: i32,
    },
    /// A message too short for the fields the proxy must read from it, by its tag.
    Malformed(u8),
    /// Any other message, by its tag.
    Other(u8),
}

/// An authentication request (`R`), by the method the server asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// SASL, with the mechanisms the server offers.
    Sasl(Mechanisms<'a>),
    /// The server's SCRAM message.
    SaslContinue(&'a [u8]),
    /// The server's SCRAM signature.
    SaslFinal(&'a [u8]),
    /// A method the proxy does not speak (Kerberos, GSS, SSPI), by its code.
    Other(i32),
}

/// The list of SASL mechanisms of an AuthenticationSASL request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms<'a>(&'a [u8]);

impl<'a> Mechanisms<'a> {
    pub fn names(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .split(|&b| b == 0)
            .take_while(|name| !name.is_empty())
            .filter_map(|name| std::str::from_utf8(name).ok())
    }

    pub fn offers(&self, mechanism: &str) -> bool {
        self.names().any(|name| name == mechanism)
    }
}

impl Authentication<'_> {
    /// The request's code, as the protocol numbers it (what `require_auth` checks).
    pub fn code(&self) -> i32 {
        match self {
            Authentication::Ok => 0,
            Authentication::CleartextPassword => 3,
            Authentication::Md5Password { .. } => 5,
            Authentication::Sasl(_) => 10,
            Authentication::SaslContinue(_) => 11,
            Authentication::SaslFinal(_) => 12,
            Authentication::Other(code) => *code,
        }
    }

    fn decode(body: &[u8]) -> Option<Authentication<'_>> {
        let code = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        let data = &body[4..];
        Some(match code {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => Authentication::Md5Password {
                salt: data.get(..4)?.try_into().ok()?,
            },
            10 => Authentication::Sasl(Mechanisms(data)),
            11 => Authentication::SaslContinue(data),
            12 => Authentication::SaslFinal(data),
            other => Authentication::Other(other),
        })
    }
}

/// An ErrorResponse or NoticeResponse: the fields the proxy reads, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report<'a> {
    pub severity: &'a [u8],
    pub code: &'a [u8],
    pub message: &'a [u8],
}

impl<'a> Backend<'a> {
    pub fn decode(frame: &'a [u8]) -> Backend<'a> {
        let body = frame.get(5..).unwrap_or(&[]);
        match frame.first().copied().unwrap_or(0) {
            msg::READY_FOR_QUERY => Backend::ReadyForQuery(TxStatus::of_ready_frame(frame)),
            msg::COMMAND_COMPLETE => Backend::CommandComplete {
                tag: body.strip_suffix(&[0]).unwrap_or(body),
            },
            msg::ERROR_RESPONSE => Backend::Error(Report::decode(body)),
            msg::NOTICE_RESPONSE => Backend::Notice(Report::decode(body)),
            msg::PARAMETER_STATUS => {
                let mut f = Fields::new(body);
                match (f.cstr_bytes(), f.cstr_bytes()) {
                    (Ok(name), Ok(value)) => Backend::ParameterStatus { name, value },
                    _ => Backend::ParameterStatus {
                        name: b"",
                        value: b"",
                    },
                }
            }
            msg::DATA_ROW => Backend::DataRow(body),
            msg::AUTHENTICATION => match Authentication::decode(body) {
                Some(request) => Backend::Authentication(request),
                None => Backend::Malformed(msg::AUTHENTICATION),
            },
            msg::BACKEND_KEY_DATA => match (body.get(..4), body.get(4..8)) {
                (Some(pid), Some(secret)) => Backend::BackendKeyData {
                    pid: i32::from_be_bytes(pid.try_into().unwrap_or_default()),
                    secret: i32::from_be_bytes(secret.try_into().unwrap_or_default()),
                },
                _ => Backend::Malformed(msg::BACKEND_KEY_DATA),
            },
            other => Backend::Other(other),
        }
    }
}

impl<'a> Report<'a> {
    fn decode(body: &'a [u8]) -> Report<'a> {
        let mut report = Report::default();
        let mut fields = Fields::new(body);
        while let Ok(kind) = fields.u8() {
            if kind == 0 {
                break;
            }
            let Ok(value) = fields.cstr_bytes() else {
                break;
            };
            match kind {
                // The non-localized severity, when the server sends it, wins.
                b'V' => report.severity = value,
                b'S' if report.severity.is_empty() => report.severity = value,
                b'C' => report.code = value,
                b'M' => report.message = value,
                _ => {}
            }
        }
        report
    }

    /// The server is about to close the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity, b"FATAL" | b"PANIC")
    }

    /// The SQLSTATE ("" when the server sent none readable).
    pub fn code(&self) -> &'a str {
        std::str::from_utf8(self.code).unwrap_or("")
    }

    pub fn message(&self) -> Cow<'a, str> {
        String::from_utf8_lossy(self.message)
    }

    /// An owned copy, for an error that outlives its frame.
    pub fn to_fields(&self) -> ErrorFields {
        ErrorFields {
            severity: String::from_utf8_lossy(self.severity).into_owned(),
            code: String::from_utf8_lossy(self.code).into_owned(),
            message: self.message().into_owned(),
        }
    }
}

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            String::from_utf8_lossy(self.severity),
            self.message(),
            self.code()
        )
    }
}

/// The first column of a row, `None` when it is NULL or the row is malformed.
pub fn first_column(row: &[u8]) -> Option<&[u8]> {
    let columns = u16::from_be_bytes([*row.first()?, *row.get(1)?]);
    if columns == 0 {
        return None;
    }
    let len = i32::from_be_bytes(row.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    row.get(6..6 + len as usize)
}

/// Every column of a row (`None` for NULL), or `None` if the row is malformed. For the
/// control plane's own queries (a replication command's answer); the data path never
/// decodes a row.
pub fn columns(row: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let count = u16::from_be_bytes([*row.first()?, *row.get(1)?]);
    let mut rest = &row[2..];
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        match usize::try_from(len) {
            Ok(len) => {
                out.push(Some(rest.get(..len)?));
                rest = &rest[len..];
            }
            Err(_) => out.push(None),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn errors_are_read_without_copying_and_fatal_ones_are_told_apart() {
        let mut buf = BytesMut::new();
        msg::error_response(&mut buf, "FATAL", "57P01", "terminating connection");
        let Backend::Error(report) = Backend::decode(&buf) else {
            panic!("not an error");
        };
        assert!(report.is_fatal());
        assert_eq!(report.code(), "57P01");
        assert_eq!(report.message(), "terminating connection");
        assert_eq!(report.to_string(), "FATAL: terminating connection (57P01)");

        let mut buf = BytesMut::new();
        msg::notice_response(&mut buf, "01000", "just so you know");
        let Backend::Notice(report) = Backend::decode(&buf) else {
            panic!("not a notice");
        };
        assert!(!report.is_fatal());
    }

    #[test]
    fn ready_complete_status_and_rows() {
        let mut buf = BytesMut::new();
        msg::ready_for_query(&mut buf, TxStatus::Failed);
        assert_eq!(
            Backend::decode(&buf),
            Backend::ReadyForQuery(TxStatus::Failed)
        );
        let mut buf = BytesMut::new();
        msg::command_complete(&mut buf, "INSERT 0 1");
        assert_eq!(
            Backend::decode(&buf),
            Backend::CommandComplete { tag: b"INSERT 0 1" }
        );
        let mut buf = BytesMut::new();
        msg::parameter_status(&mut buf, "TimeZone", "UTC");
        assert_eq!(
            Backend::decode(&buf),
            Backend::ParameterStatus {
                name: b"TimeZone",
                value: b"UTC"
            }
        );
        let mut buf = BytesMut::new();
        msg::data_row(&mut buf, &[Some("0/3000060"), None]);
        let Backend::DataRow(row) = Backend::decode(&buf) else {
            panic!("not a row");
        };
        assert_eq!(first_column(row), Some(&b"0/3000060"[..]));
        assert_eq!(columns(row), Some(vec![Some(&b"0/3000060"[..]), None]));
        assert_eq!(columns(b"\0\x02\0\0\0\x01a\0\0\0\x05ab"), None);
        assert_eq!(Backend::decode(b"T\0\0\0\x06\0\0"), Backend::Other(b'T'));
    }

    #[test]
    fn authentication_requests_and_the_cancel_key() {
        let request = |code: i32, data: &[u8]| {
            let mut buf = BytesMut::new();
            msg::authentication(&mut buf, code, data);
            buf
        };
        let ok = request(0, b"");
        assert_eq!(
            Backend::decode(&ok),
            Backend::Authentication(Authentication::Ok)
        );
        let md5 = request(5, b"salt");
        assert_eq!(
            Backend::decode(&md5),
            Backend::Authentication(Authentication::Md5Password { salt: *b"salt" })
        );
        assert_eq!(
            Backend::decode(&request(5, b"sa")),
            Backend::Malformed(b'R')
        );
        let sasl = request(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let Backend::Authentication(Authentication::Sasl(mechanisms)) = Backend::decode(&sasl)
        else {
            panic!("not a SASL request");
        };
        assert_eq!(
            mechanisms.names().collect::<Vec<_>>(),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert!(mechanisms.offers("SCRAM-SHA-256") && !mechanisms.offers("SCRAM"));
        let next = request(11, b"r=abc");
        assert_eq!(
            Backend::decode(&next),
            Backend::Authentication(Authentication::SaslContinue(b"r=abc"))
        );
        let gss = request(7, b"");
        assert_eq!(
            Backend::decode(&gss),
            Backend::Authentication(Authentication::Other(7))
        );
        assert_eq!(
            Backend::decode(b"R\0\0\0\x06\0\0"),
            Backend::Malformed(b'R')
        );

        let mut buf = BytesMut::new();
        msg::backend_key_data(&mut buf, 4321, -7);
        assert_eq!(
            Backend::decode(&buf),
            Backend::BackendKeyData {
                pid: 4321,
                secret: -7
            }
        );
        assert_eq!(
            Backend::decode(b"K\0\0\0\x08\0\0\0\x01"),
            Backend::Malformed(b'K')
        );
    }

    #[test]
    fn malformed_frames_read_as_empty_rather_than_panicking() {
        for frame in [
            &b""[..],
            b"E",
            b"E\0\0\0\x05",
            b"ES",
            b"S\0\0\0\x06a",
            b"D\0\0\0\x06\0",
        ] {
            let _ = Backend::decode(frame);
        }
        assert_eq!(first_column(b"\0\x01\0\0\0\x09ab"), None);
        let Backend::Error(report) = Backend::decode(b"E\0\0\0\x09SERR") else {
            panic!("not an error");
        };
        assert_eq!(report.code(), "");
    }
}
