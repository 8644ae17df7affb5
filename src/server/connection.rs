//! One client connection from hand-over to close, on a serving worker.
//!
//! The connection ends gracefully (HTTP/1: after the response in progress; HTTP/2: GOAWAY,
//! streams in flight finish) when shutdown begins, or when no request has been in flight for
//! `idle_timeout` — an HTTP/2 connection kept open by a client that only pings, or one the
//! client forgot, gives its resources back. An idle HTTP/1 connection is also closed by the
//! header read timeout while it waits for the next request. It ends at once when its client
//! takes nothing of an answer for `send_timeout` (see [`super::send`]).

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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Whether a connection is serving requests, and since when it has not been.
pub(super) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request was answered.
    last: AtomicU64,
}

/// One request in flight; answered when dropped (also when the request is cancelled).
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let at = self.0.opened.elapsed().as_millis();
        self.0
            .last
            .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }

    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Acquire);
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `timeout`.
    pub(super) async fn idle(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let quiet_since =
                self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if quiet_since.elapsed() >= timeout {
                return;
            }
            tokio::time::sleep_until(quiet_since + timeout).await;
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
    let activity = Arc::new(Activity::new());
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
            drop(busy);
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
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = stalls.closed() => {
                tracing::debug!(%ip, "closing a connection whose client took nothing of an answer for send_timeout");
                break;
            }
            _ = activity.idle(timeouts.idle), if !closing => {
                tracing::debug!(%ip, "closing an idle connection");
                closing = true;
                idle = true;
                conn.as_mut().graceful_shutdown();
            }
            () = stalls.unsent(), if idle => {
                tracing::debug!(%ip, "closing an idle HTTP/2 connection whose client has not taken the end of its answers");
                break;
            }
        }
    }
}
