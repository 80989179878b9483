//! The first bytes of a client connection decide whether it is encrypted: an
//! SSLRequest (answered 'S' and followed by a TLS handshake, or 'N'), a GSSENCRequest
//! (always 'N'), a TLS ClientHello straight away (PostgreSQL 17's
//! `sslnegotiation=direct`, which must name the `postgresql` ALPN protocol), or
//! anything else, which is the start of a clear-text startup packet.
//!
//! The request is read with exact reads off the socket, so nothing a client sends
//! after an SSLRequest can be buffered in clear text and taken for part of the
//! encrypted conversation (CVE-2021-23214's class of bug): the TLS handshake reads
//! those bytes itself and fails on them.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ServerTls;
use super::stream::{self, ClientRead, ClientWrite};
use crate::protocol::messages as msg;

/// A client connection after negotiation.
pub struct Negotiated {
    pub read: ClientRead,
    pub write: ClientWrite,
    /// Bytes of the startup packet already read (clear-text connections).
    pub prefix: Vec<u8>,
    /// The certificate hash for SCRAM-SHA-256-PLUS (encrypted connections).
    pub channel_binding: Option<Vec<u8>>,
}

/// Why a connection ended during negotiation (no Postgres error can be sent: the
/// client may be in the middle of a TLS handshake).
#[derive(Debug)]
pub struct NegotiationFailed(pub String);

/// The TLS record type of a handshake message: a ClientHello starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

pub async fn negotiate(
    mut stream: TcpStream,
    tls: Option<&ServerTls>,
) -> Result<Negotiated, NegotiationFailed> {
    let failed = |what: &str, e: std::io::Error| NegotiationFailed(format!("{what}: {e}"));
    for _ in 0..3 {
        let mut first = [0u8; 1];
        let n = stream
            .peek(&mut first)
            .await
            .map_err(|e| failed("reading the first byte", e))?;
        if n == 0 {
            return Err(NegotiationFailed("closed by peer".into()));
        }
        if first[0] == TLS_HANDSHAKE {
            let Some(tls) = tls else {
                return Err(NegotiationFailed(
                    "direct TLS from a client, but the proxy has no certificate (tls_cert_file)"
                        .into(),
                ));
            };
            return accept(stream, tls, true).await;
        }
        // The length first: only an 8-byte packet can be a negotiation request, and a
        // bad length is the startup reader's to refuse, without waiting for more.
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header[..4])
            .await
            .map_err(|e| failed("reading the startup packet", e))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let code = if len == 8 {
            stream
                .read_exact(&mut header[4..])
                .await
                .map_err(|e| failed("reading the startup packet", e))?;
            u32::from_be_bytes([header[4], header[5], header[6], header[7]])
        } else {
            0
        };
        match (len, code) {
            (8, msg::SSL_REQUEST) if tls.is_some() => {
                stream
                    .write_all(b"S")
                    .await
                    .map_err(|e| failed("answering SSLRequest", e))?;
                if let Some(tls) = tls {
                    return accept(stream, tls, false).await;
                }
            }
            (8, msg::SSL_REQUEST | msg::GSSENC_REQUEST) => {
                // The client may go on in clear text or give up.
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|e| failed("answering an encryption request", e))?;
            }
            _ => {
                let (read, write) = stream::plain(stream);
                let taken = if len == 8 { 8 } else { 4 };
                return Ok(Negotiated {
                    read,
                    write,
                    prefix: header[..taken].to_vec(),
                    channel_binding: None,
                });
            }
        }
    }
    Err(NegotiationFailed(
        "too many encryption negotiation requests".into(),
    ))
}

async fn accept(
    stream: TcpStream,
    tls: &ServerTls,
    direct: bool,
) -> Result<Negotiated, NegotiationFailed> {
    let stream = tls
        .acceptor
        .accept(stream)
        .await
        .map_err(|e| NegotiationFailed(format!("TLS handshake failed: {e}")))?;
    if direct && stream.get_ref().1.alpn_protocol() != Some(super::ALPN_POSTGRESQL) {
        // Direct TLS without the ALPN name could be any protocol aimed at this port.
        return Err(NegotiationFailed(
            "direct TLS connection without ALPN protocol \"postgresql\"".into(),
        ));
    }
    let (read, write) = stream::tls(stream);
    Ok(Negotiated {
        read,
        write,
        prefix: Vec::new(),
        channel_binding: Some(tls.end_point.clone()),
    })
}
