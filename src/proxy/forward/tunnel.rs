//! What a tunnel (a connection switched to another protocol, a WebSocket) notes about itself:
//! when a byte last went through it either way, so that one left idle gives its place back.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved through a tunnel, in milliseconds from its start.
#[derive(Clone)]
pub(super) struct Moved {
    start: Instant,
    last: Arc<AtomicU64>,
}

impl Moved {
    pub(super) fn new() -> Moved {
        Moved {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `io`, whose reads are noted here (every byte the tunnel writes was read from its other
    /// end first).
    pub(super) fn noting<T>(&self, io: T) -> Noted<T> {
        Noted {
            io,
            moved: self.clone(),
        }
    }

    fn note(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Ready once no byte has moved for `idle`; never without a limit.
    pub(super) async fn idle_for(&self, idle: Option<Duration>) {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let quiet_until = self.last() + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
        }
    }
}

/// One end of a tunnel, noting each read that brought bytes.
pub(super) struct Noted<T> {
    io: T,
    moved: Moved,
}

impl<T: AsyncRead + Unpin> AsyncRead for Noted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved.note();
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Noted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_idle_only_after_nothing_moved_for_the_limit() {
        let moved = Moved::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = moved.noting(a);
        let idle = Some(Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(1500)).await;
        b.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        a.read_exact(&mut byte).await.unwrap();
        // 1.5 s in, a byte: idle from 3.5 s, not from 2 s.
        let started = Instant::now();
        moved.idle_for(idle).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // Without a limit, never.
        let never = tokio::time::timeout(Duration::from_secs(3600), moved.idle_for(None)).await;
        assert!(never.is_err());
    }
}
