//! A client connection's two directions, in clear text or TLS. Clear text keeps
//! tokio's lock-free TCP halves, so the common case costs one branch per call; TLS
//! halves share the rustls state through `tokio::io::split`.
//!
//! rustls may accept bytes into its own buffer without getting them onto the socket
//! (the socket was full). A write half remembers that and [`ClientWrite::has_unflushed`]
//! tells the session loop to keep flushing, or those bytes would wait forever.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

type Tls = TlsStream<TcpStream>;

pub enum ClientRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<Tls>),
}

pub enum ClientWrite {
    Plain(OwnedWriteHalf),
    Tls {
        half: WriteHalf<Tls>,
        unflushed: bool,
    },
}

/// Splits a clear-text connection.
pub fn plain(stream: TcpStream) -> (ClientRead, ClientWrite) {
    let (read, write) = stream.into_split();
    (ClientRead::Plain(read), ClientWrite::Plain(write))
}

/// Splits an encrypted connection.
pub fn tls(stream: Tls) -> (ClientRead, ClientWrite) {
    let (read, write) = tokio::io::split(stream);
    (
        ClientRead::Tls(read),
        ClientWrite::Tls {
            half: write,
            unflushed: false,
        },
    )
}

impl ClientWrite {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientWrite::Tls { .. })
    }

    /// Writes what the socket takes now without waiting (`WouldBlock` when nothing).
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientWrite::Plain(half) => half.try_write(buf),
            tls => {
                // A waker that does nothing: when the socket is full this only learns
                // so; the session loop then waits on the socket with its real waker.
                let mut cx = Context::from_waker(Waker::noop());
                match Pin::new(tls).poll_write(&mut cx, buf) {
                    Poll::Ready(result) => result,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Writes `buf` (some of it) or, when it is empty, pushes out what TLS holds back:
    /// one future for both, so that the session loop borrows the writer once.
    pub async fn send(&mut self, buf: &[u8]) -> io::Result<Sent> {
        use tokio::io::AsyncWriteExt;
        if buf.is_empty() {
            self.flush().await.map(|()| Sent::Flushed)
        } else {
            self.write(buf).await.map(Sent::Wrote)
        }
    }

    /// TLS bytes accepted but not yet on the socket.
    pub fn has_unflushed(&self) -> bool {
        matches!(
            self,
            ClientWrite::Tls {
                unflushed: true,
                ..
            }
        )
    }
}

/// What [`ClientWrite::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Wrote(usize),
    Flushed,
}

impl AsyncRead for ClientRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientRead::Plain(half) => Pin::new(half).poll_read(cx, buf),
            ClientRead::Tls(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWrite::Plain(half) => Pin::new(half).poll_write(cx, buf),
            ClientWrite::Tls { half, unflushed } => {
                let written = match Pin::new(&mut *half).poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => n,
                    other => return other,
                };
                // Push the records out now; what the socket does not take is flushed
                // later (has_unflushed).
                *unflushed = match Pin::new(half).poll_flush(cx) {
                    Poll::Ready(Ok(())) => false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => true,
                };
                Poll::Ready(Ok(written))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(half) => Pin::new(half).poll_flush(cx),
            ClientWrite::Tls { half, unflushed } => {
                let result = Pin::new(half).poll_flush(cx);
                if result.is_ready() {
                    *unflushed = false;
                }
                result
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWrite::Plain(half) => Pin::new(half).poll_shutdown(cx),
            ClientWrite::Tls { half, .. } => Pin::new(half).poll_shutdown(cx),
        }
    }
}
