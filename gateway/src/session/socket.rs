//! The TCP socket of one session, shared by its reader and writer without a lock.
//!
//! tokio's `TcpStream` can be read and written through `&self` (`poll_*_ready` +
//! `try_*`), so both halves hold an `Arc<SessionSocket>`. Sharing, rather than splitting,
//! lets the reader drop its frame parser (and the parser's 8 KiB buffer) while the
//! connection is idle and build a new one when bytes arrive: see `session::reader`.

use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A session's TCP connection and a count of the bytes read from it.
pub struct SessionSocket {
    tcp: TcpStream,
    /// Bytes handed to the frame parser so far (including bytes left over from the HTTP
    /// upgrade). Compared with the bytes of the frames parsed to know the parser is empty.
    bytes_read: AtomicU64,
}

impl SessionSocket {
    pub fn new(tcp: TcpStream) -> Arc<SessionSocket> {
        Arc::new(SessionSocket {
            tcp,
            bytes_read: AtomicU64::new(0),
        })
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Read what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.try_read(buf)
    }

    /// Count bytes read outside the parser (the small-frame fast path).
    pub fn count_read(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Wait until the socket has bytes (or EOF/error) without reading them.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is consumed.
    ///
    /// This waits in the socket's reader slot (`poll_read_ready`), the slot hyper's
    /// finished connection task last waited in, so that task's waker is replaced and its
    /// memory freed; `TcpStream::readable` would wait in another list and leave it behind.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.tcp.poll_read_ready(cx)).await
    }
}

/// The read side handed to the frame parser.
pub struct SocketReader {
    socket: Arc<SessionSocket>,
    /// Bytes the HTTP layer read past the upgrade request; served before the socket.
    prefix: Option<Bytes>,
}

impl SocketReader {
    pub fn new(socket: Arc<SessionSocket>, prefix: Option<Bytes>) -> SocketReader {
        SocketReader {
            socket,
            prefix: prefix.filter(|p| !p.is_empty()),
        }
    }
}

impl AsyncRead for SocketReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(prefix) = self.prefix.as_mut() {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix.split_to(n));
            if prefix.is_empty() {
                self.prefix = None;
            }
            self.socket
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.socket.tcp.poll_read_ready(cx))?;
            match self.socket.tcp.try_read_buf(buf) {
                Ok(n) => {
                    self.socket
                        .bytes_read
                        .fetch_add(n as u64, Ordering::Relaxed);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The write side handed to the frame writer.
pub struct SocketWriter {
    socket: Arc<SessionSocket>,
}

impl SocketWriter {
    pub fn new(socket: Arc<SessionSocket>) -> SocketWriter {
        SocketWriter { socket }
    }
}

impl AsyncWrite for SocketWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket.tcp.poll_write_ready(cx))?;
            match self.socket.tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.socket.tcp.poll_write_ready(cx))?;
            match self.socket.tcp.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the last `Arc` drops; the close frame precedes it.
        Poll::Ready(Ok(()))
    }
}
