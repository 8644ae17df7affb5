//! A serving worker's own HTTP/1.1 connections to plain-`http` upstreams.
//!
//! Only the worker's thread touches it, so a checkout is a scan of a short vector under a lock
//! that is never contended (nor held across an `await`), and a connection goes back to the pool as soon as its response head arrives (it is skipped
//! until its response body has been read). hyper_util's pooled client instead locks a shared
//! pool and spawns a task per request to return the connection; `https` upstreams (TLS, and
//! HTTP/2 by ALPN) still go through that client.
//!
//! A kept-alive connection may be closed by the upstream just as it is reused. A request it
//! refused unsent is sent again on another connection; one that was sent and got no answer is
//! sent again (once, on a new connection) only if it is idempotent and has no body, since the
//! upstream may have acted on it.

use super::wire;
use crate::clock::deadline::Deadlines;
use crate::reply::{Body, BoxError};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tower::Service;

/// Idle connections kept per upstream.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Sends on pooled connections that turned out to be closing, before a fresh one is tried.
const STALE_RETRIES: usize = 3;

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// One worker's pool. The lock is only ever taken by the worker's own thread, for a scan or a
/// push, so it is uncontended; it makes the pool `Sync`, which the request futures borrowing it
/// need in order to stay `Send`.
pub(super) struct LocalPool {
    connector: HttpConnector,
    /// By authority (`host:port`); a deployment has a handful of upstreams.
    idle: Mutex<Vec<(String, Vec<Idle>)>>,
    /// Connections for [`wire`] exchanges, by authority. Kept apart from `idle`: a connection
    /// hyper's client drives cannot be read or written by anything else.
    bare: Mutex<Vec<(Arc<str>, Vec<Bare>)>>,
    /// The worker's coarse clock ([`Deadlines::coarse_now`]) for idle times: counted in tens of
    /// seconds, they need no clock read per request.
    clock: Arc<Deadlines>,
    /// The worker's buffer for request heads ([`wire::exchange`]): written into from the lines
    /// the last head used, not a connection's own, which with a few hundred connections are out
    /// of the core's cache by the time it is used again.
    head: Mutex<bytes::BytesMut>,
}

struct Bare {
    conn: wire::Conn,
    since: Instant,
}

impl LocalPool {
    pub(super) fn new(connector: HttpConnector, clock: Arc<Deadlines>) -> LocalPool {
        LocalPool {
            connector,
            idle: Mutex::new(Vec::new()),
            bare: Mutex::new(Vec::new()),
            clock,
            head: Mutex::new(bytes::BytesMut::new()),
        }
    }

    fn now(&self) -> Instant {
        self.clock.coarse_now().into_std()
    }
}

/// Sends `req` (bodiless and idempotent: [`wire::takes`]), whose URI is absolute, on a pooled or
/// new connection of `pool` without hyper's client ([`wire`]). A request lost on a reused
/// connection (it ended before answering) is sent once more, on a new connection.
pub(super) async fn exchange(
    pool: &Arc<LocalPool>,
    req: &mut Request<crate::reply::Inbound>,
    replaced: &crate::proxy::headers::Replaced<'_>,
    streamed: super::Streamed<'_>,
) -> Result<Response<Body>, BoxError> {
    let authority = req
        .uri()
        .authority()
        .ok_or("upstream URI without authority")?
        .as_str();
    let to_head = req.method() == Method::HEAD;
    let mut fresh = false;
    loop {
        let pooled = if fresh {
            None
        } else {
            checkout_bare(pool, authority)
        };
        let (mut conn, reused) = match pooled {
            Some(conn) => (conn, true),
            None => {
                let io = pool.connector.clone().call(req.uri().clone()).await?;
                (wire::Conn::new(io.into_inner()), false)
            }
        };
        match wire::exchange(&mut conn, (&*req, replaced), (to_head, &pool.head)).await {
            Ok(answer) => return Ok(respond(pool, authority, conn, answer, streamed)),
            Err(error) if reused && error.lost() => {
                tracing::debug!(%error, "upstream closed a reused connection; sending again");
                fresh = true;
            }
            Err(error) => return Err(Box::new(error)),
        }
    }
}

/// The response to send on: a body already read whole goes with it, and the connection back to
/// the pool at once; otherwise the body reads on (bound by `streamed`), and returns the
/// connection when done.
fn respond(
    pool: &Arc<LocalPool>,
    authority: &str,
    mut conn: wire::Conn,
    answer: wire::Head,
    streamed: super::Streamed<'_>,
) -> Response<Body> {
    let wire::Head {
        response,
        mut framing,
        keep,
        ..
    } = answer;
    if let Some(body) = conn.whole(&mut framing) {
        if keep && conn.drained() {
            checkin_bare(pool, authority, conn);
        }
        let body = if body.is_empty() {
            crate::reply::empty()
        } else {
            crate::reply::full(body)
        };
        return response.map(|()| body);
    }
    let pool = pool.clone();
    let key = authority.to_owned();
    let home: wire::Home = Box::new(move |conn| checkin_bare(&pool, &key, conn));
    let body = wire::WireBody::new(conn, framing, keep, home).boxed_unsync();
    response.map(|()| super::bind(body, streamed))
}

/// A pooled connection for `authority`, the most recently used first; expired ones are closed,
/// and so is one the upstream wrote to or closed while it sat in the pool ([`is_quiet`]).
fn checkout_bare(pool: &LocalPool, authority: &str) -> Option<wire::Conn> {
    let mut bare = pool.bare.lock().unwrap_or_else(PoisonError::into_inner);
    let (_, list) = bare.iter_mut().find(|(k, _)| &**k == authority)?;
    let now = pool.now();
    while let Some(idle) = list.pop() {
        if now.duration_since(idle.since) < IDLE_TIMEOUT && is_quiet(&idle.conn) {
            return Some(idle.conn);
        }
    }
    None
}

/// Whether nothing has arrived on an idle connection since its last answer was read whole. Bytes
/// sent after an answer (a second answer, a `HEAD` answer's body written after its head) would
/// otherwise be read as the answer to the next request on it — anyone's. hyper's pooled
/// connections notice the same (their task reads while idle) and close.
///
/// Always asks the kernel (one `recv` with `MSG_PEEK`), never the runtime's idea of the
/// socket's readiness: a read that did not fill the buffer (the last answer's, nearly always)
/// clears that, and only a turn of the event loop sets it again. Bytes that arrive while the
/// worker is busy (the next pipelined request, or another task woken by the same turn, asks for
/// a connection before the loop turns) would be missed by `TcpStream::try_read`.
fn is_quiet(conn: &wire::Conn) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(&conn.tcp).peek(&mut probe),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

fn checkin_bare(pool: &LocalPool, authority: &str, conn: wire::Conn) {
    let mut bare = pool.bare.lock().unwrap_or_else(PoisonError::into_inner);
    let at = match bare.iter().position(|(k, _)| &**k == authority) {
        Some(at) => at,
        None => {
            bare.push((Arc::from(authority), Vec::new()));
            bare.len() - 1
        }
    };
    let list = &mut bare[at].1;
    if list.len() < MAX_IDLE {
        list.push(Bare {
            conn,
            since: pool.now(),
        });
    }
}

/// Sends `req`, whose URI is absolute (`http://authority/path?query`), in origin form on a
/// pooled or new connection of `pool`. A request refused unsent by a pooled connection that was
/// closing is sent again on another.
pub(super) async fn send(
    pool: &LocalPool,
    req: Request<Body>,
) -> Result<Response<Incoming>, BoxError> {
    let (mut parts, body) = req.into_parts();
    let target = parts.uri.clone();
    let key = target
        .authority()
        .ok_or("upstream URI without authority")?
        .as_str();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let mut replay = Replay::of(&parts, &body);
    let mut req = Request::from_parts(parts, body);
    let mut stale = 0;
    let mut fresh = false;
    loop {
        let pooled = if fresh { None } else { checkout(pool, key) };
        let (mut sender, reused) = match pooled {
            Some(sender) => (sender, true),
            None => (connect(pool, &target).await?, false),
        };
        match sender.try_send_request(req).await {
            Ok(response) => {
                // Not pooled after an upgrade, nor after a bodiless answer announcing a body
                // (dropped, the connection closes once the answer is read).
                if response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                    && !super::announces_a_body_it_has_not(&response)
                {
                    checkin(pool, key, sender);
                }
                return Ok(response);
            }
            Err(mut error) => match error.take_message() {
                Some(unsent) if reused && stale < STALE_RETRIES => {
                    stale += 1;
                    req = unsent;
                }
                None if reused && lost_on_reuse(error.error()) => match replay.take() {
                    Some(again) => {
                        tracing::debug!("upstream closed a reused connection; sending again");
                        fresh = true;
                        req = again.request();
                    }
                    None => return Err(Box::new(error.into_error())),
                },
                _ => return Err(Box::new(error.into_error())),
            },
        }
    }
}

/// The head of an idempotent request without a body, kept to send it once more.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(parts: &http::request::Parts, body: &Body) -> Option<Replay> {
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent && http_body::Body::is_end_stream(body)).then(|| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        })
    }

    fn request(self) -> Request<Body> {
        let mut req = Request::new(crate::reply::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The connection ended before any answer: closed, reset or broken while the request went out.
fn lost_on_reuse(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        cause = e.source();
    }
    false
}

/// A pooled connection ready for a request; closed and expired ones are dropped on the way.
fn checkout(pool: &LocalPool, key: &str) -> Option<http1::SendRequest<Body>> {
    let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
    let (_, list) = idle.iter_mut().find(|(k, _)| k == key)?;
    let now = pool.now();
    list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
    // The most recently used first: its socket is warm, and older ones may expire.
    let at = list.iter().rposition(|c| c.sender.is_ready())?;
    Some(list.swap_remove(at).sender)
}

/// Back to the pool right after the response head: the connection is ready again (and picked
/// by [`checkout`]) once the response body has been read.
fn checkin(pool: &LocalPool, key: &str, sender: http1::SendRequest<Body>) {
    let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
    let at = match idle.iter().position(|(k, _)| k == key) {
        Some(at) => at,
        None => {
            idle.push((key.to_owned(), Vec::new()));
            idle.len() - 1
        }
    };
    let list = &mut idle[at].1;
    if list.len() < MAX_IDLE {
        list.push(Idle {
            sender,
            since: pool.now(),
        });
    }
}

async fn connect(pool: &LocalPool, target: &Uri) -> Result<http1::SendRequest<Body>, BoxError> {
    let mut connector = pool.connector.clone();
    let io = connector.call(target.clone()).await?;
    let io = hyper_util::rt::TokioIo::new(crate::net::Probed(io.into_inner()));
    let (mut sender, connection) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended");
        }
    });
    sender.ready().await?;
    Ok(sender)
}

#[cfg(test)]
mod tests;
