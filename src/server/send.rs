//! `server.send_timeout`: an answer must keep making progress towards its client. A client that
//! stops reading (a "slow read") would otherwise hold its connection's place, the upstream
//! connection its answer comes from and the upstream's worker for as long as it likes: writes to
//! a socket have no deadline of their own, and over HTTP/2 a client may keep a stream's
//! flow-control window shut while it answers pings. Like nginx's `send_timeout`, the time counts
//! from the last progress, never from the start of the answer, so a long download that keeps
//! moving is never cut.
//!
//! Three places wait on the client, each watched on the worker's coarse deadlines, and only while
//! it waits (a write the socket takes at once arms nothing):
//! - the HTTP/1 lane's writes ([`write_all`]);
//! - every write, flush and shutdown of a connection hyper serves ([`Timed`]);
//! - over HTTP/2, the pause between handing a stream a piece of its answer and being asked for
//!   the next ([`Watched`]): hyper asks only once the client made room. Such a stall closes the
//!   whole connection — hyper has no way to reset one stream it is not polling. The last piece
//!   of an answer is not watched so (hyper asks for the end at once, and keeps the rest in its
//!   buffer until the client makes room): a stream stuck there holds no upstream, and once the
//!   connection is closing for idleness, it is closed when no answer has been in the making
//!   for `send_timeout` ([`Stalls::unsent`]) instead of waiting for such streams forever.
//!
//! A write that timed out fails with `TimedOut`; the lane then resets the connection (what is
//! still unsent in the kernel's buffer is dropped, not retried for minutes), hyper drops it.

use crate::clock::deadline::{Deadlines, Taken};
use crate::reply::{Body, BoxError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The worker's deadlines and `server.send_timeout`.
#[derive(Clone)]
pub(super) struct SendTimeout {
    pub deadlines: Arc<Deadlines>,
    pub timeout: Duration,
}

impl SendTimeout {
    fn arm(&self) -> Taken {
        self.deadlines.arm(Instant::now() + self.timeout)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client took nothing for send_timeout",
    )
}

/// Writes all of `bytes` to the lane's `tcp`, waiting at most `send.timeout` each time the
/// socket has no room; on a timeout the connection is set to be reset when it is dropped.
pub(super) async fn write_all(
    tcp: &mut TcpStream,
    mut bytes: &[u8],
    send: &SendTimeout,
) -> io::Result<()> {
    while !bytes.is_empty() {
        match tcp.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match send
                    .deadlines
                    .within(send.timeout, pin!(tcp.writable()))
                    .await
                {
                    Ok(room) => room?,
                    Err(()) => {
                        let _ = tcp.set_zero_linger();
                        return Err(timed_out());
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connection hyper serves, whose writes fail once one has waited `send_timeout` without the
/// client taking a byte.
pub(super) struct Timed<T> {
    inner: T,
    send: SendTimeout,
    /// Since the first write that found no room (and nothing written since).
    stalled: Option<Taken>,
}

impl<T> Timed<T> {
    pub(super) fn new(inner: T, send: SendTimeout) -> Self {
        Timed {
            inner,
            send,
            stalled: None,
        }
    }

    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let send = &self.send;
        let stalled = self.stalled.get_or_insert_with(|| send.arm());
        ready!(stalled.poll_fired(cx));
        Poll::Ready(Err(timed_out()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Closes an HTTP/2 connection once one of its streams has waited `send_timeout` for its
/// client: the connection's task waits on [`Stalls::closed`].
#[derive(Clone)]
pub(super) struct Stalls {
    send: SendTimeout,
    close: CancellationToken,
    /// Woken by the sweeper when a stream's deadline passes: cancels `close`.
    alarm: Waker,
    /// Answers being made (watched bodies not yet dropped), and whether the connection has
    /// carried an HTTP/1 request.
    live: Arc<(AtomicUsize, AtomicBool)>,
}

struct Alarm(CancellationToken);

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.0.cancel();
    }
}

impl Stalls {
    pub(super) fn new(send: SendTimeout) -> Self {
        let close = CancellationToken::new();
        let alarm = Waker::from(Arc::new(Alarm(close.clone())));
        let live = Arc::new((AtomicUsize::new(0), AtomicBool::new(false)));
        Stalls {
            send,
            close,
            alarm,
            live,
        }
    }

    /// Resolves once a stream has stalled.
    pub(super) async fn closed(&self) {
        self.close.cancelled().await;
    }

    /// Notes that the connection carries HTTP/1: [`Stalls::unsent`] then never resolves.
    pub(super) fn serving_http1(&self) {
        self.live.1.store(true, Ordering::Relaxed);
    }

    /// Over HTTP/2, resolves once no answer has been in the making for `send_timeout`: what
    /// streams still have to send then is the end of answers in hyper's buffer, waiting for a
    /// client to make room. Also for a connection that has carried no request yet: HTTP/2's
    /// graceful close waits for the client to answer a ping, which a client that answers every
    /// other ping may never do, keeping the connection open for good. Never for a connection
    /// that has carried HTTP/1 (an HTTP/1 answer still streaming is watched by its writes, and
    /// hyper closes an idle one at once).
    pub(super) async fn unsent(&self) {
        let (live, http1) = &*self.live;
        if http1.load(Ordering::Relaxed) {
            return std::future::pending().await;
        }
        loop {
            while live.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(self.send.timeout).await;
            }
            tokio::time::sleep(self.send.timeout).await;
            if live.load(Ordering::Relaxed) == 0 {
                return;
            }
        }
    }

    /// `body`, watched: an empty one needs no watching.
    pub(super) fn watch(&self, body: Body) -> Body {
        if http_body::Body::is_end_stream(&body) {
            return body;
        }
        self.live.0.fetch_add(1, Ordering::Relaxed);
        let mut watched = Watched {
            inner: body,
            stalls: self.clone(),
            waiting: None,
        };
        // hyper polls it once the stream has room for data.
        watched.arm();
        Body::new(watched)
    }
}

/// An HTTP/2 answer's body, with a deadline armed from each piece handed to hyper until hyper
/// asks for the next one.
struct Watched {
    inner: Body,
    stalls: Stalls,
    waiting: Option<Taken>,
}

impl Watched {
    fn arm(&mut self) {
        let waiting = self.waiting.insert(self.stalls.send.arm());
        // Registers the alarm; the deadline has not passed yet.
        let _ = waiting.poll_fired(&mut Context::from_waker(&self.stalls.alarm));
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.waiting = None;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_data()
        {
            this.arm();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.stalls.live.0.fetch_sub(1, Ordering::Relaxed);
    }
}
