//! A connection's two directions, in clear text or TLS (client connections with the
//! proxy's certificate, server connections with the server's). Clear text keeps
//! tokio's lock-free TCP halves, so the common case costs one branch per call; TLS
//! halves share the rustls state through `tokio::io::split`.
//!
//! rustls may accept bytes into its own buffer without getting them onto the socket
//! (the socket was full). A write half remembers that and [`WriteHalf::has_unflushed`]
//! tells the session loop to keep flushing, or those bytes would wait forever.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The read half of a connection whose TLS stream type is `T`.
pub enum ReadHalf<T> {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<T>),
}

/// The write half of a connection whose TLS stream type is `T`.
pub enum WriteHalf<T> {
    Plain(OwnedWriteHalf),
    Tls {
        half: tokio::io::WriteHalf<T>,
        unflushed: bool,
    },
}

/// A client's connection to the proxy.
pub type ClientRead = ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>;
pub type ClientWrite = WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>;
/// The proxy's connection to a server.
pub type ServerRead = ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;
pub type ServerWrite = WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>;

/// Splits a clear-text connection.
pub fn plain<T>(stream: TcpStream) -> (ReadHalf<T>, WriteHalf<T>) {
    let (read, write) = stream.into_split();
    (ReadHalf::Plain(read), WriteHalf::Plain(write))
}

/// Splits an encrypted connection.
pub fn tls<T: AsyncRead + AsyncWrite>(stream: T) -> (ReadHalf<T>, WriteHalf<T>) {
    let (read, write) = tokio::io::split(stream);
    (
        ReadHalf::Tls(read),
        WriteHalf::Tls {
            half: write,
            unflushed: false,
        },
    )
}

impl<T: AsyncRead + AsyncWrite> ReadHalf<T> {
    /// Reads what has arrived without waiting (`WouldBlock` when nothing has).
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(half) => half.try_read(buf),
            ReadHalf::Tls(half) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut read = ReadBuf::new(buf);
                match Pin::new(half).poll_read(&mut cx, &mut read) {
                    Poll::Ready(Ok(())) => Ok(read.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

impl<T> crate::protocol::framing::ReadReady for ReadHalf<T> {
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ReadHalf::Plain(half) => half.as_ref().poll_read_ready(cx),
            // rustls may hold decrypted bytes the socket no longer shows: read at once.
            ReadHalf::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite> WriteHalf<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, WriteHalf::Tls { .. })
    }

    /// Writes what the socket takes now without waiting (`WouldBlock` when nothing).
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(half) => half.try_write(buf),
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

    /// `send` as a poll (see `MessageReader::poll_fill`).
    pub fn poll_send(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<Sent>> {
        if buf.is_empty() {
            Pin::new(self).poll_flush(cx).map_ok(|()| Sent::Flushed)
        } else {
            Pin::new(self).poll_write(cx, buf).map_ok(Sent::Wrote)
        }
    }

    /// TLS bytes accepted but not yet on the socket.
    pub fn has_unflushed(&self) -> bool {
        matches!(
            self,
            WriteHalf::Tls {
                unflushed: true,
                ..
            }
        )
    }
}

/// What [`WriteHalf::send`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Wrote(usize),
    Flushed,
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for ReadHalf<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Tls(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncWrite for WriteHalf<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Tls { half, unflushed } => {
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
            WriteHalf::Plain(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Tls { half, unflushed } => {
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
            WriteHalf::Plain(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Tls { half, .. } => Pin::new(half).poll_shutdown(cx),
        }
    }
}
