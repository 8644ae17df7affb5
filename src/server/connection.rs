//! One client connection from hand-over to close, on a serving worker.
//!
//! The connection ends gracefully (HTTP/1: after the response in progress; HTTP/2: GOAWAY,
//! streams in flight finish) when shutdown begins, or when no request has been in flight for
//! `idle_timeout` — an HTTP/2 connection kept open by a client that only pings, or one the
//! client forgot, gives its resources back. An idle HTTP/1 connection is also closed by the
//! header read timeout while it waits for the next request, and every connection must carry its
//! first request within it: over HTTP/2 no head timeout of hyper's applies, and a connection
//! that sent only the preface held its place for `idle_timeout`. It ends at once when its client
//! takes nothing of an answer for `send_timeout` (see [`super::send`]).
//!
//! A client that cancels its requests before their answers (over HTTP/2, by resetting their
//! streams: "rapid reset") is let go too. Each cancelled stream frees its place under
//! `http2_max_concurrent_streams` at once, while the upstream it was sent to goes on working on
//! it; unchecked, one connection with nothing to read could start upstream requests as fast as
//! it writes frames. A connection may cancel as many requests as `http2_max_concurrent_streams`
//! beyond those it has had answered, and twice that many in any ten seconds however many were
//! answered (else a cheap answered request bought each cancel); the next cancel closes it
//! gracefully (`GOAWAY`: streams in flight finish), and one more closes it at once (a client may
//! hold a graceful close open by never answering its ping, and go on opening streams
//! meanwhile).

use super::send::{SendTimeout, Stalls, Timed};
use crate::app::{App, Worker};
use crate::proxy::forward::ConnectionHold;
use crate::proxy::headers::Client;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Answered requests buy cancels, but no more than twice the allowance of them in this long
/// (a client interleaving a cheap request with each one it cancels).
const CANCEL_WINDOW: Duration = Duration::from_secs(10);

/// Whether a connection is serving requests, and since when it has not been.
pub(super) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request was answered.
    last: AtomicU64,
    /// Requests answered, and requests cancelled before their answer (their futures dropped).
    answered: AtomicUsize,
    cancelled: AtomicUsize,
    /// Cancels allowed beyond the requests answered (`http2_max_concurrent_streams`), and
    /// twice as many in any [`CANCEL_WINDOW`].
    cancel_allowance: usize,
    /// When the current [`CANCEL_WINDOW`] began, and the cancels in it.
    cancel_window: Mutex<(Instant, usize)>,
    /// Told of every cancel beyond the allowance.
    too_many_cancels: Notify,
}

/// One request in flight, until it is answered ([`Busy::answered`]) or cancelled (dropped).
pub(super) struct Busy {
    activity: Arc<Activity>,
    answered: bool,
}

impl Busy {
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.activity;
        let at = activity.opened.elapsed().as_millis();
        activity
            .last
            .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Release);
        if self.answered {
            activity.answered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cancelled = activity.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let answered = activity.answered.load(Ordering::Relaxed);
        let allowance = activity.cancel_allowance;
        if cancelled > answered.saturating_add(allowance)
            || activity.cancels_lately() > allowance.saturating_mul(2)
        {
            activity.too_many_cancels.notify_one();
        }
    }
}

impl Activity {
    pub(super) fn new(cancel_allowance: usize) -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            answered: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            cancel_allowance,
            cancel_window: Mutex::new((Instant::now(), 0)),
            too_many_cancels: Notify::new(),
        }
    }

    /// Counts a cancel: the cancels in the current [`CANCEL_WINDOW`], this one too.
    fn cancels_lately(&self) -> usize {
        let mut window = self
            .cancel_window
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (began, cancels) = &mut *window;
        if began.elapsed() >= CANCEL_WINDOW {
            *began = Instant::now();
            *cancels = 0;
        }
        *cancels += 1;
        *cancels
    }

    /// Resolves at the next cancel beyond the allowance.
    pub(super) async fn too_many_cancels(&self) {
        self.too_many_cancels.notified().await;
    }

    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Acquire);
        Busy {
            activity: self.clone(),
            answered: false,
        }
    }

    /// Whether no request has begun on the connection yet.
    pub(super) fn unused(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.answered.load(Ordering::Relaxed) == 0
            && self.cancelled.load(Ordering::Relaxed) == 0
    }

    /// Resolves once no request has been in flight for `timeout`, or, while none has begun
    /// yet, for the shorter of `timeout` and `first`.
    pub(super) async fn idle(&self, timeout: Duration, first: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let limit = if self.unused() {
                timeout.min(first)
            } else {
                timeout
            };
            let quiet_since =
                self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if quiet_since.elapsed() >= limit {
                return;
            }
            tokio::time::sleep_until(quiet_since + limit).await;
        }
    }
}

/// How long a connection may wait on its client.
#[derive(Clone, Copy)]
pub(super) struct Timeouts {
    /// With no request in flight: then it closes gracefully.
    pub idle: Duration,
    /// For the client to take more of an answer: then it closes at once.
    pub send: Duration,
    /// `header_read_timeout`: for the first request to begin (then it closes gracefully), and
    /// for a client that sent none to take the hint (then it closes at once).
    pub head: Duration,
    /// Requests the client may cancel before their answers beyond those answered
    /// (`http2_max_concurrent_streams`): then it closes.
    pub cancels: usize,
}

/// Serves `io` on `worker` until the client closes it, or it has been idle for
/// `timeouts.idle`, or `shutdown` is cancelled (then in-flight requests finish first), or an
/// answer waited `timeouts.send` on the client. `hold`: the connection's place among the open
/// connections, which a request that may switch protocols carries, so that its tunnel keeps the
/// place once hyper has let go of the connection.
pub(super) async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    (app, worker): (Arc<App>, Arc<Worker>),
    (ip, tls): (IpAddr, bool),
    timeouts: Timeouts,
    shutdown: &CancellationToken,
    hold: ConnectionHold,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let send = SendTimeout {
        deadlines: worker.deadlines.clone(),
        timeout: timeouts.send,
    };
    let stalls = Stalls::new(send.clone());
    let activity = Arc::new(Activity::new(timeouts.cancels));
    let tracked = activity.clone();
    let watching = stalls.clone();
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let worker = worker.clone();
        let busy = tracked.begin();
        // hyper offers an upgrade only to a request asking for one (or `CONNECT`).
        if req.extensions().get::<OnUpgrade>().is_some() {
            req.extensions_mut().insert(hold.clone());
        }
        // Over HTTP/1 a stalled client stops hyper's writes, which `Timed` watches; over
        // HTTP/2 it may stop one stream only.
        let stalls = if req.version() == http::Version::HTTP_2 {
            Some(watching.clone())
        } else {
            watching.serving_http1();
            None
        };
        async move {
            let req = req.map(http_body_util::Either::Left);
            let response = app.handle(Box::new(req), Client { ip, tls }, &worker).await;
            busy.answered();
            let response = match stalls {
                Some(stalls) => response.map(|body| stalls.watch(body)),
                None => response,
            };
            Ok::<_, Infallible>(response)
        }
    });
    let io = Timed::new(io, send);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    // Closing for idleness (not for shutdown, which the grace period bounds).
    let mut idle = false;
    // Closing for too many cancelled requests.
    let mut cancels = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.too_many_cancels() => {
                if cancels {
                    tracing::debug!(%ip, "closing a connection whose client went on cancelling its requests");
                    break;
                }
                tracing::debug!(%ip, "closing a connection whose client cancelled too many requests before their answers");
                cancels = true;
                if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = stalls.closed() => {
                tracing::debug!(%ip, "closing a connection whose client took nothing of an answer for send_timeout");
                break;
            }
            _ = activity.idle(timeouts.idle, timeouts.head), if !closing => {
                tracing::debug!(%ip, "closing an idle connection");
                closing = true;
                idle = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(timeouts.head), if idle && activity.unused() => {
                tracing::debug!(%ip, "closing a connection that carried no request and has not taken the hint");
                break;
            }
            () = stalls.unsent(), if idle => {
                tracing::debug!(%ip, "closing an idle HTTP/2 connection whose client has not taken the end of its answers");
                break;
            }
        }
    }
}
