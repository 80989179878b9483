//! Client messages decoded into typed views that borrow the frame's bytes: the one
//! place where the fields of a startup packet, a Query, Parse, Bind, Describe, Close,
//! Execute or a password message are read.
//! Decoding checks the fields the proxy uses (names and texts) and leaves the rest as
//! the bytes that were sent (parameter types, a Bind's parameters, an Execute's row
//! limit): nothing is copied, and what the proxy does not use is for the server to
//! judge, with Postgres's own errors.

use super::ProtocolError;
use super::messages::{self as msg, Fields};

/// What a Describe or a Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
    /// Another kind byte: the server refuses it.
    Unknown(u8),
}

/// A client message of the query phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend<'a> {
    Query { sql: &'a [u8] },
    Parse(Parse<'a>),
    Bind(Bind<'a>),
    Describe { target: Target, name: &'a str },
    Close { target: Target, name: &'a str },
    Execute { portal: &'a [u8] },
    Sync,
    Flush,
    FunctionCall,
    CopyData,
    CopyDone,
    CopyFail,
    Terminate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    /// The statement's name ("" for the unnamed one).
    pub name: &'a str,
    pub sql: &'a [u8],
    /// Everything after the name, as sent: the text and the parameter types. What a
    /// statement is registered by, and what a Parse under another name repeats.
    pub tail: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    /// The statement's name ("" for the unnamed one).
    pub statement: &'a str,
    /// Everything after the statement's name, as sent: formats, parameters, result
    /// formats. A Bind under another statement name repeats it.
    pub rest: &'a [u8],
}

/// The first packet of a connection (after any encryption negotiation), without its
/// length word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    /// A protocol 3.x login: the minor version and the parameters.
    Login {
        minor: u16,
        params: StartupParams<'a>,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// An SSLRequest or GSSENCRequest where none may come (inside TLS, or a second).
    EncryptionRequest,
    /// Another protocol version (or a cancel request too short to read).
    Unsupported {
        code: u32,
    },
}

/// A startup packet's parameters: name and value pairs up to an empty name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupParams<'a> {
    body: &'a [u8],
}

impl<'a> StartupPacket<'a> {
    pub fn decode(packet: &'a [u8]) -> StartupPacket<'a> {
        let Some(code) = packet.get(..4) else {
            return StartupPacket::Unsupported { code: 0 };
        };
        let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
        let body = &packet[4..];
        match code {
            msg::SSL_REQUEST | msg::GSSENC_REQUEST => StartupPacket::EncryptionRequest,
            msg::CANCEL_REQUEST => match (body.get(..4), body.get(4..8)) {
                (Some(pid), Some(secret)) => StartupPacket::Cancel {
                    pid: i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]),
                    secret: i32::from_be_bytes([secret[0], secret[1], secret[2], secret[3]]),
                },
                _ => StartupPacket::Unsupported { code },
            },
            code if code >> 16 == 3 => StartupPacket::Login {
                minor: (code & 0xffff) as u16,
                params: StartupParams { body },
            },
            code => StartupPacket::Unsupported { code },
        }
    }
}

impl<'a> StartupParams<'a> {
    /// The pairs in order; an error for a name or value not terminated (or not UTF-8).
    pub fn pairs(&self) -> impl Iterator<Item = Result<(&'a str, &'a str), ProtocolError>> + 'a {
        let mut f = Fields::new(self.body);
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let name = match f.cstr() {
                Ok("") => {
                    done = true;
                    return None;
                }
                Ok(name) => name,
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            };
            let value = f.cstr();
            done = value.is_err();
            Some(value.map(|value| (name, value)))
        })
    }
}

/// A client's answer during authentication (`p`). What it holds depends on what the
/// proxy asked for: the message does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordMessage<'a> {
    body: &'a [u8],
}

/// The client's first SCRAM message, with the mechanism it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitial<'a> {
    pub mechanism: &'a str,
    pub data: &'a [u8],
}

impl<'a> PasswordMessage<'a> {
    pub fn of_frame(frame: &'a [u8]) -> PasswordMessage<'a> {
        PasswordMessage {
            body: frame.get(5..).unwrap_or(&[]),
        }
    }

    /// A password, or an md5 response (the proxy asked for one of those).
    pub fn password(&self) -> Result<&'a [u8], ProtocolError> {
        Fields::new(self.body).cstr_bytes()
    }

    /// A SASLInitialResponse (the proxy offered SASL mechanisms).
    pub fn sasl_initial(&self) -> Result<SaslInitial<'a>, ProtocolError> {
        let mut f = Fields::new(self.body);
        let mechanism = f.cstr()?;
        let data = match usize::try_from(f.i32()?) {
            Ok(len) => f.bytes(len)?,
            // -1: no initial data.
            Err(_) => &[],
        };
        Ok(SaslInitial { mechanism, data })
    }

    /// A SASLResponse (the proxy sent its SCRAM message): the client's next one.
    pub fn sasl_response(&self) -> &'a [u8] {
        self.body
    }
}

impl Parse<'_> {
    /// Whether it gives no parameter types.
    pub fn declares_no_types(&self) -> bool {
        self.tail.get(self.sql.len() + 1..) == Some(&[0, 0][..])
    }
}

impl Bind<'_> {
    /// Whether it binds no parameter values (its format codes may still be given).
    pub fn binds_no_values(&self) -> bool {
        let mut f = Fields::new(self.rest);
        let Ok(formats) = f.i16() else {
            return false;
        };
        let Ok(formats) = usize::try_from(formats) else {
            return false;
        };
        f.bytes(2 * formats).is_ok() && matches!(f.i16(), Ok(0))
    }
}

impl<'a> Frontend<'a> {
    /// Decodes a whole frame (tag, length, body). An unknown tag or a body that does
    /// not hold the fields its tag requires is a protocol violation.
    pub fn decode(frame: &'a [u8]) -> Result<Frontend<'a>, ProtocolError> {
        let Some(&tag) = frame.first() else {
            return Err(violation("invalid message format: an empty message"));
        };
        let mut f = Fields::of_frame(frame);
        Ok(match tag {
            msg::QUERY => Frontend::Query {
                sql: f.cstr_bytes()?,
            },
            msg::PARSE => {
                let name = f.cstr()?;
                let tail = f.rest();
                let sql = f.cstr_bytes()?;
                Frontend::Parse(Parse { name, sql, tail })
            }
            msg::BIND => {
                let portal = f.cstr_bytes()?;
                let statement = f.cstr()?;
                Frontend::Bind(Bind {
                    portal,
                    statement,
                    rest: f.rest(),
                })
            }
            msg::DESCRIBE | msg::CLOSE => {
                let target = match f.u8()? {
                    b'S' => Target::Statement,
                    b'P' => Target::Portal,
                    other => Target::Unknown(other),
                };
                let name = f.cstr()?;
                if tag == msg::DESCRIBE {
                    Frontend::Describe { target, name }
                } else {
                    Frontend::Close { target, name }
                }
            }
            msg::EXECUTE => Frontend::Execute {
                portal: f.cstr_bytes()?,
            },
            msg::SYNC => Frontend::Sync,
            msg::FLUSH => Frontend::Flush,
            msg::FUNCTION_CALL => Frontend::FunctionCall,
            msg::COPY_DATA => Frontend::CopyData,
            msg::COPY_DONE => Frontend::CopyDone,
            msg::COPY_FAIL => Frontend::CopyFail,
            msg::TERMINATE => Frontend::Terminate,
            other => {
                return Err(violation(&format!(
                    "invalid frontend message type '{}'",
                    super::framing::printable_tag(other)
                )));
            }
        })
    }
}

#[cfg(test)]
mod password_tests {
    use super::*;

    #[test]
    fn a_startup_packet_is_read_as_a_login_a_cancel_or_a_refusal() {
        let mut login = 196608u32.to_be_bytes().to_vec();
        login.extend_from_slice(b"user\0app\0database\0db\0\0");
        let StartupPacket::Login { minor: 0, params } = StartupPacket::decode(&login) else {
            panic!("not a login");
        };
        let pairs: Vec<_> = params.pairs().collect::<Result<_, _>>().unwrap();
        assert_eq!(pairs, [("user", "app"), ("database", "db")]);

        let mut cut = 196610u32.to_be_bytes().to_vec();
        cut.extend_from_slice(b"user\0ap");
        let StartupPacket::Login { minor: 2, params } = StartupPacket::decode(&cut) else {
            panic!("not a login");
        };
        assert!(params.pairs().any(|p| p.is_err()), "an unterminated value");

        let mut cancel = msg::CANCEL_REQUEST.to_be_bytes().to_vec();
        cancel.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            StartupPacket::decode(&cancel),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
        assert_eq!(
            StartupPacket::decode(&cancel[..6]),
            StartupPacket::Unsupported {
                code: msg::CANCEL_REQUEST
            }
        );
        assert_eq!(
            StartupPacket::decode(&msg::SSL_REQUEST.to_be_bytes()),
            StartupPacket::EncryptionRequest
        );
        assert_eq!(
            StartupPacket::decode(&131072u32.to_be_bytes()),
            StartupPacket::Unsupported { code: 131072 }
        );
        assert_eq!(
            StartupPacket::decode(b"ab"),
            StartupPacket::Unsupported { code: 0 }
        );
    }

    #[test]
    fn a_password_message_reads_as_what_was_asked_for() {
        let mut buf = bytes::BytesMut::new();
        msg::password_message(&mut buf, b"md5abc\0");
        assert_eq!(
            PasswordMessage::of_frame(&buf).password().unwrap(),
            b"md5abc"
        );

        let mut buf = bytes::BytesMut::new();
        msg::sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=xyz");
        let initial = PasswordMessage::of_frame(&buf).sasl_initial().unwrap();
        assert_eq!(initial.mechanism, "SCRAM-SHA-256");
        assert_eq!(initial.data, b"n,,n=,r=xyz");

        // A length beyond the message, and no data at all (-1).
        let short = b"p\0\0\0\x16SCRAM-SHA-256\0\0\0\0\x09ab";
        assert!(PasswordMessage::of_frame(short).sasl_initial().is_err());
        let none = b"p\0\0\0\x16SCRAM-SHA-256\0\xff\xff\xff\xff";
        assert_eq!(
            PasswordMessage::of_frame(none).sasl_initial().unwrap().data,
            b""
        );
        assert!(PasswordMessage::of_frame(b"p").password().is_err());
    }
}

fn violation(what: &str) -> ProtocolError {
    ProtocolError::Violation(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u8(tag);
        buf.put_i32(body.len() as i32 + 4);
        buf.extend_from_slice(body);
        buf
    }

    #[test]
    fn parse_and_bind_borrow_their_fields() {
        let parse = frame(b'P', b"s1\0SELECT $1\0\0\x01\0\0\0\x17");
        let Frontend::Parse(p) = Frontend::decode(&parse).unwrap() else {
            panic!("not a Parse");
        };
        assert_eq!(p.name, "s1");
        assert_eq!(p.sql, b"SELECT $1");
        assert_eq!(p.tail, b"SELECT $1\0\0\x01\0\0\0\x17");
        assert!(!p.declares_no_types());

        let bind = frame(b'B', b"p\0s1\0\0\0\0\x01\0\0\0\x011\0\0");
        let Frontend::Bind(b) = Frontend::decode(&bind).unwrap() else {
            panic!("not a Bind");
        };
        assert_eq!((b.portal, b.statement), (&b"p"[..], "s1"));
        assert_eq!(b.rest, b"\0\0\0\x01\0\0\0\x011\0\0");
        assert!(!b.binds_no_values());

        let parse = frame(b'P', b"\0BEGIN\0\0\0");
        let Ok(Frontend::Parse(p)) = Frontend::decode(&parse) else {
            panic!("not a Parse");
        };
        assert!(p.declares_no_types());
        let bind = frame(b'B', b"\0\0\0\x01\0\x01\0\0\0\0");
        let Ok(Frontend::Bind(b)) = Frontend::decode(&bind) else {
            panic!("not a Bind");
        };
        assert!(b.binds_no_values());
    }

    #[test]
    fn describe_close_and_execute_say_what_they_name() {
        let describe = frame(b'D', b"Ss1\0");
        assert_eq!(
            Frontend::decode(&describe).unwrap(),
            Frontend::Describe {
                target: Target::Statement,
                name: "s1"
            }
        );
        let close = frame(b'C', b"P\0");
        assert_eq!(
            Frontend::decode(&close).unwrap(),
            Frontend::Close {
                target: Target::Portal,
                name: ""
            }
        );
        let execute = frame(b'E', b"\0\0\0\0\x0a");
        assert_eq!(
            Frontend::decode(&execute).unwrap(),
            Frontend::Execute { portal: b"" }
        );
        // A kind Postgres does not know is the server's to refuse.
        assert_eq!(
            Frontend::decode(&frame(b'D', b"Xname\0")).unwrap(),
            Frontend::Describe {
                target: Target::Unknown(b'X'),
                name: "name"
            }
        );
    }

    #[test]
    fn truncated_or_unknown_messages_are_violations() {
        for bad in [
            frame(b'P', b"s1\0SELECT 1"),
            frame(b'P', b"\xff\0SELECT 1\0\0\0"),
            frame(b'B', b"\0s1"),
            frame(b'D', b""),
            frame(b'C', b"S"),
            frame(b'E', b""),
            frame(b'Q', b"SELECT 1"),
            frame(b'?', b""),
        ] {
            assert!(
                matches!(Frontend::decode(&bad), Err(ProtocolError::Violation(_))),
                "{bad:?}"
            );
        }
        assert!(Frontend::decode(&[]).is_err());
    }
}
