//! Outbound TCP connections for hyper's clients whose reads ask the kernel when the runtime
//! says there is nothing to read.
//!
//! hyper's connection task reads an idle kept-alive connection before it writes the next
//! request on it, and closes the connection if anything arrived: bytes sent after an answer (a
//! second, unasked answer; a `HEAD` or `204` body written after its head) must never be read as
//! the answer to the next request, which may be another user's. But tokio answers a read from
//! its own record of the socket's readiness, which a read that did not fill the buffer (the last
//! answer's, nearly always) clears, and which only a turn of the event loop sets again. Bytes
//! that arrive while the worker is busy, before the next request is written, would be missed by
//! that check and read as the next request's answer. So a read tokio finds nothing for is tried
//! once more on the socket itself (a `recv` with `MSG_PEEK` first, so that the common case
//! costs no copy).

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP connection whose reads fall back on the socket itself (see the module's notes).
pub struct Probed(pub TcpStream);

impl AsyncRead for Probed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let tcp = &mut self.0;
        if let Poll::Ready(read) = Pin::new(&mut *tcp).poll_read(cx, buf) {
            return Poll::Ready(read);
        }
        if buf.remaining() == 0 {
            // Nothing could be read into it (and an empty read is no end of the stream).
            return Poll::Pending;
        }
        // Pending: the waker is registered. Does the kernel hold bytes (or the end) anyway?
        let socket = socket2::SockRef::from(&*tcp);
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket.peek(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
            Ok(_) => {}
        }
        let mut socket: &socket2::Socket = &socket;
        match socket.read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Probed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for Probed {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

/// Plain TCP connections ([`super::http_connector`]'s) as [`Probed`] ones.
#[derive(Clone)]
pub struct Probing(pub HttpConnector);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Probing {
    type Response = TokioIo<Probed>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move { Ok(TokioIo::new(Probed(connecting.await?.into_inner()))) })
    }
}
