//! Forwarding to upstreams through pooled clients (one set per serving worker): bodies stream
//! both ways, HTTP/1.1 upgrades (WebSocket) become a byte tunnel, and failures become 502/504
//! with no detail.
//!
//! Upstream connections are per worker because a connection's I/O is driven by the runtime that
//! opened it: a worker using its own never waits on another thread's lock or wakes another
//! thread. The server makes each worker's [`Upstreams`] with [`Upstreams::for_worker`] and
//! passes it down with every request; the process-wide value serves callers off the workers.

use super::headers;
use crate::clock::deadline::Deadlines;
use crate::reply::{Body, BoxError, ErrorCode, Inbound};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::{Connector, connector, http_connector};

type Pooled = Client<Connector, Body>;

/// [`Upstreams::for_route`]'s answer, a pointer either way: the request's future holds it
/// across the forwarding, and an `Upstreams` by value (~370 bytes, as a `Cow` would be) is
/// copied into that future at every request, cold at many connections.
pub enum ForRoute<'a> {
    /// The worker's own (every route without TLS settings of its own).
    Shared(&'a Upstreams),
    /// A route's own client, for its `ca_file` or client certificate.
    Own(Box<Upstreams>),
}

impl std::ops::Deref for ForRoute<'_> {
    type Target = Upstreams;

    fn deref(&self) -> &Upstreams {
        match self {
            ForRoute::Shared(upstreams) => upstreams,
            ForRoute::Own(upstreams) => upstreams,
        }
    }
}

/// Pooled upstream clients, shared by every route. [`Upstreams::new`] makes the process-wide
/// value; [`Upstreams::for_worker`] a serving worker's own, used only from that worker's event
/// loop. Clones share connections.
#[derive(Clone)]
pub struct Upstreams {
    /// For `https` upstreams (TLS, maybe HTTP/2), and for every upstream off the workers.
    client: Pooled,
    /// A worker's lock-free HTTP/1.1 pool for plain-`http` upstreams; `None` off the workers.
    local: Option<Arc<local::LocalPool>>,
    /// A worker's coarse deadlines for upstream answers ([`crate::clock::deadline`]); `None` off the workers,
    /// where each request takes a tokio timer entry.
    deadlines: Option<Arc<Deadlines>>,
    /// Tracks upgraded tunnels, which graceful shutdown must wait for separately. Shared by the
    /// process-wide value and every worker's.
    pub tunnels: TaskTracker,
    /// Outbound trust, and the clients of routes with TLS settings of their own: each worker
    /// has its own ([`Upstreams::for_worker`]), clones share them.
    tls: Arc<OwnTls>,
}

/// The roots every `https://` upstream starts from (`[tls]`, read at start), and the pooled
/// clients of routes with a `ca_file` or a client certificate of their own, made on first use.
struct OwnTls {
    roots: rustls::RootCertStore,
    default_ca: Option<crate::config::CaBundle>,
    clients: std::sync::Mutex<Vec<(RouteTls, Pooled)>>,
    /// The process-wide value's record of every worker's own ([`OwnTls::for_worker`]), whose
    /// clients a reload prunes too ([`Upstreams::keep_route_clients`]); empty in a worker's.
    workers: std::sync::Mutex<Vec<Arc<OwnTls>>>,
}

/// What a route's own client trusts and presents.
#[derive(Clone, PartialEq)]
struct RouteTls {
    ca: Option<crate::config::CaBundle>,
    identity: Option<crate::config::ClientIdentity>,
}

impl OwnTls {
    fn new(roots: rustls::RootCertStore, default_ca: Option<crate::config::CaBundle>) -> Self {
        OwnTls {
            roots,
            default_ca,
            clients: std::sync::Mutex::new(Vec::new()),
            workers: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The same trust, with no route's client yet: a worker's own. A route's pooled client is
    /// then used from one thread only, as the worker's other clients are. Shared, a connection
    /// goes back to the pool (an answer without a body, say) before the request that got it has
    /// looked at the answer, and another thread could take it in between, before it is kept out
    /// of the pool for bytes the answer may leave on it; and every request would wake the thread
    /// whose runtime drives the connection.
    fn for_worker(&self) -> Arc<Self> {
        let own = Arc::new(OwnTls::new(self.roots.clone(), self.default_ca.clone()));
        lock(&self.workers).push(own.clone());
        own
    }

    /// This value's clients and every worker's, each list under its own lock in turn.
    fn each_clients(&self, mut f: impl FnMut(&mut Vec<(RouteTls, Pooled)>)) {
        f(&mut lock(&self.clients));
        for worker in lock(&self.workers).iter() {
            f(&mut lock(&worker.clients));
        }
    }

    fn client_config(
        &self,
        ca: Option<&crate::config::CaBundle>,
        identity: Option<&crate::config::ClientIdentity>,
    ) -> Result<rustls::ClientConfig, crate::net::TlsError> {
        let ca = ca.or(self.default_ca.as_ref());
        crate::net::client_config(&crate::net::TlsSettings {
            roots: &self.roots,
            extra: ca.map_or(&[][..], |ca| ca.certs.as_slice()),
            identity: identity.map(|i| (i.chain.as_slice(), &*i.key)),
        })
    }

    /// The pooled client for a route's own TLS settings; one per distinct settings, kept across
    /// reloads that leave them alone.
    fn client(&self, wanted: RouteTls) -> Result<Pooled, crate::net::TlsError> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, client)) = clients.iter().find(|(tls, _)| *tls == wanted) {
            return Ok(client.clone());
        }
        let tls = self.client_config(wanted.ca.as_ref(), wanted.identity.as_ref())?;
        let client = pooled(crate::net::connector_with(tls));
        clients.push((wanted, client.clone()));
        Ok(client)
    }
}

/// `mutex`'s guard; a poisoned list of clients is still whole (nothing is left half-done).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

mod local;
mod tunnel;
pub mod wire;

/// A client connection's place among the server's open connections (`server.max_connections`),
/// which the server puts into the extensions of a request that may switch protocols. hyper lets
/// go of an upgraded connection, and the server's task counting it ends; the tunnel keeps this
/// instead, for as long as it is open. `idle`: how long the connection may go without a byte
/// (`server.connection_idle_timeout`), which the tunnel keeps to as well.
#[derive(Clone)]
pub struct ConnectionHold {
    pub place: Arc<dyn std::any::Any + Send + Sync>,
    pub idle: Duration,
}

/// Ends a tunnel before either side closes it: the app puts it into the extensions of a
/// request that may switch protocols and cancels it when the session the tunnel was opened
/// with ends. The tunnel cancels it too when it closes, for whoever watches the session.
#[derive(Clone)]
pub struct TunnelEnd(pub CancellationToken);

/// Binds the body of an answer still streaming from its upstream when the head is relayed (one
/// read whole with its head, or empty, is not): how the caller ends it early (the app: when the
/// session it was admitted with ends, as [`TunnelEnd`] a tunnel).
pub type Streamed<'a> = Option<&'a (dyn Fn(Body) -> Body + Sync)>;

/// `body`, bound by `streamed` unless it is already over.
fn bind(body: Body, streamed: Streamed<'_>) -> Body {
    match streamed {
        Some(bind) if !http_body::Body::is_end_stream(&body) => bind(body),
        _ => body,
    }
}

/// A client's request to switch protocols, as the proxy forwards it.
pub struct Upgrade {
    /// The `Upgrade` field's protocol.
    pub protocol: HeaderValue,
    /// The client's connection, once hyper lets go of it.
    pub downstream: hyper::upgrade::OnUpgrade,
    pub hold: Option<ConnectionHold>,
    pub end: Option<TunnelEnd>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

fn pooled(connector: Connector) -> Pooled {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(256)
        .timer(TokioTimer::new())
        // An HTTP/2 connection carries every request to its upstream, and one whose request
        // timed out stays pooled: into a dead link (a partition, no RST, no FIN) it would fail
        // every request until TCP's backed-off retransmission resumed it, seconds after the link
        // is back. A connection with requests open is pinged every second and closed when a
        // ping goes unanswered for a second (idle ones are not pinged: servers may count pings
        // without streams as abuse).
        .http2_keep_alive_interval(Duration::from_secs(1))
        .http2_keep_alive_timeout(Duration::from_secs(1))
        .build(connector)
}

impl Upstreams {
    /// Trusting the compiled-in web PKI roots only.
    pub fn new() -> Self {
        Upstreams {
            client: pooled(connector()),
            local: None,
            deadlines: None,
            tunnels: TaskTracker::new(),
            tls: Arc::new(OwnTls::new(crate::net::base_roots(false), None)),
        }
    }

    /// Trusting what `[tls]` says: the system store when `system_roots`, and `ca_file`.
    pub fn for_config(config: &crate::config::Config) -> Result<Self, crate::net::TlsError> {
        let tls = OwnTls::new(
            crate::net::base_roots(config.tls.system_roots),
            config.tls.ca_file.clone(),
        );
        let client = pooled(crate::net::connector_with(tls.client_config(None, None)?));
        Ok(Upstreams {
            client,
            local: None,
            deadlines: None,
            tunnels: TaskTracker::new(),
            tls: Arc::new(tls),
        })
    }

    /// The upstreams to reach `route` with: these, or for a route with TLS settings of its own
    /// (`ca_file`, a client certificate) its own client. Routes without them pay nothing.
    pub fn for_route(
        &self,
        route: &crate::config::RouteConfig,
    ) -> Result<ForRoute<'_>, crate::net::TlsError> {
        if route.ca_file.is_none() && route.tls_client.is_none() {
            return Ok(ForRoute::Shared(self));
        }
        let client = self.tls.client(RouteTls {
            ca: route.ca_file.clone(),
            identity: route.tls_client.clone(),
        })?;
        Ok(ForRoute::Own(Box::new(Upstreams {
            client,
            local: None,
            deadlines: None,
            tunnels: self.tunnels.clone(),
            tls: self.tls.clone(),
        })))
    }

    /// Lets go of the clients (and their pools) of TLS settings no route of `routes` has any
    /// more: called when a reload puts `routes` in effect, so that each rotation of a route's CA
    /// or client certificate does not leave its old client behind. A request still under way
    /// with an old client holds it until it ends.
    /// Each worker keeps its own clients; the process-wide value reaches them all.
    pub fn keep_route_clients(&self, routes: &[crate::config::RouteConfig]) {
        self.tls.each_clients(|clients| {
            clients.retain(|(tls, _)| {
                routes
                    .iter()
                    .any(|r| r.ca_file == tls.ca && r.tls_client == tls.identity)
            });
        });
    }

    /// How many clients of routes with TLS settings of their own are kept (each with its pool
    /// of connections), the workers' included: at most one per such route of the running
    /// configuration and worker.
    pub fn route_clients(&self) -> usize {
        let mut count = 0;
        self.tls.each_clients(|clients| count += clients.len());
        count
    }

    /// Upstream connections of its own for a serving worker (a single-threaded runtime), to be
    /// used only from that worker: a request then never waits on another thread's lock or wakes
    /// another thread to use a connection. Upgraded tunnels are still tracked with this value's.
    pub fn for_worker(&self, deadlines: Arc<Deadlines>) -> Self {
        let client = self
            .tls
            .client_config(None, None)
            .map_or_else(|_| connector(), crate::net::connector_with);
        Upstreams {
            client: pooled(client),
            local: Some(Arc::new(local::LocalPool::new(
                http_connector(),
                deadlines.clone(),
            ))),
            deadlines: Some(deadlines),
            tunnels: self.tunnels.clone(),
            tls: self.tls.for_worker(),
        }
    }

    /// Plain-`http` upstreams on a worker use the worker's own HTTP/1.1 connections ([`local`];
    /// bodiless idempotent requests without hyper's client, [`wire`]);
    /// `https` ones (TLS, maybe HTTP/2) and other callers the pooled client.
    /// `replaced`: the fields the proxy sets in place of the client's, written by the wire
    /// path beside the map and put into it for the others.
    ///
    /// Both are borrowed from the caller's future: each async function on the way would
    /// otherwise hold its own copy (the request and the fields are ~0.5 KB), written into
    /// memory the request had not touched yet. hyper's paths take the request out.
    async fn request(
        &self,
        (req, body): (&mut Request<Inbound>, Body),
        replaced: &headers::Replaced<'_>,
        streamed: Streamed<'_>,
    ) -> Result<Response<Body>, BoxError> {
        if let Some(local) = &self.local
            && req.uri().scheme() == Some(&http::uri::Scheme::HTTP)
        {
            if wire::takes(req, &body) {
                return local::exchange(local, req, replaced, streamed).await;
            }
            let mut req = outgoing(req, body);
            replaced.clone().apply(req.headers_mut());
            close_after_head(&mut req);
            // Boxed: hyper's client (1.3 KB of future) would otherwise size every request's
            // future, and the wire path's too; it carries only bodies and upgrades.
            return Ok(crate::reply::in_box(|| local::send(local, req))
                .await?
                .map(|body| bind(boxed(body), streamed)));
        }
        let mut req = outgoing(req, body);
        replaced.clone().apply(req.headers_mut());
        close_after_head(&mut req);
        // The pooled connection, to keep from the pool after an answer that may leave bytes on
        // it ([`announces_a_body_it_has_not`]): poisoned before this task yields, so on a worker
        // (one thread, whose pools, a route's own too, no other thread uses) no other request
        // can have taken it from the pool in between; the pool checks the mark at every checkout.
        let connection = hyper_util::client::legacy::connect::capture_connection(&mut req);
        let response = self.client.request(req).await?;
        if announces_a_body_it_has_not(&response)
            && let Some(connected) = connection.connection_metadata().as_ref()
        {
            connected.poison();
        }
        Ok(response.map(|body| bind(boxed(body), streamed)))
    }

    /// Sends `req` (already rewritten, but for the fields in `replaced`) with `body` in place
    /// of its own, and relays the response. `timeout` bounds the wait for the response head;
    /// the body then streams without a deadline (`streamed` may end it).
    pub async fn forward(
        &self,
        (req, body): (&mut Request<Inbound>, Body),
        replaced: &headers::Replaced<'_>,
        (upgrade, streamed): (Option<Upgrade>, Streamed<'_>),
        timeout: Duration,
        route: &str,
    ) -> Response<Body> {
        *req.version_mut() = Version::HTTP_11;
        // The hop as a client span of the request's trace; the upstream continues it.
        let span = tracing::trace_span!(
            target: crate::telemetry::trace::TARGET,
            "upstream hop",
            "otel.kind" = "client",
            "http.route" = route,
            "server.address" = req.uri().host(),
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        if let Some(traceparent) = crate::telemetry::trace::traceparent(&span) {
            req.headers_mut().insert(TRACEPARENT, traceparent);
        }
        let (protocol, downstream) = match upgrade {
            Some(Upgrade {
                protocol,
                downstream,
                hold,
                end,
            }) => (Some(protocol), Some((downstream, hold, end))),
            None => (None, None),
        };
        if let Some(protocol) = &protocol {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, protocol.clone());
        }
        // The upstream's latency is for the access log only: without it, no clock is read for
        // it and no extension allocated (two clock reads and a map per request).
        let started = tracing::enabled!(target: "vestibule::access", tracing::Level::INFO)
            .then(std::time::Instant::now);
        let sent = if http_body::Body::is_end_stream(&body) {
            // No body to send: the deadline starts now.
            match &self.deadlines {
                Some(deadlines) => {
                    let request = std::pin::pin!(self.request((req, body), replaced, streamed));
                    deadlines.within(timeout, request).await
                }
                // Off the workers (boxed, as the rare branches below: only the common one
                // sizes the future every request builds).
                None => crate::reply::in_box(|| {
                    tokio::time::timeout(timeout, self.request((req, body), replaced, streamed))
                })
                .await
                .map_err(|_| ()),
            }
        } else {
            // The deadline counts from the end of the request body, so long uploads are not cut
            // off.
            let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
            let body = Tracked {
                inner: body,
                done: Some(done_tx),
            }
            .boxed_unsync();
            let deadline = async move {
                let _ = done_rx.wait_for(|done| *done).await;
                tokio::time::sleep(timeout).await;
            };
            crate::reply::in_box(|| async move {
                tokio::select! {
                    response = self.request((req, body), replaced, streamed) => Ok(response),
                    _ = deadline => Err(()),
                }
            })
            .await
        };
        let mut response = match sent {
            Err(_) => {
                span.record("error.type", "timeout");
                metrics::counter!("vestibule_upstream_errors_total", "route" => route.to_string(), "kind" => "timeout").increment(1);
                tracing::warn!(route, "upstream timed out");
                return ErrorCode::UpstreamTimeout.json(&[]);
            }
            Ok(Err(error)) => {
                let too_large = find_cause::<http_body_util::LengthLimitError>(&*error);
                if too_large {
                    return ErrorCode::PayloadTooLarge.json(&[]);
                }
                if find_cause::<crate::limits::BodyTimeout>(&*error) {
                    tracing::info!(route, "request body too slow; upstream request abandoned");
                    return ErrorCode::RequestTimeout.json(&[]);
                }
                if find_cause::<ClientBodyError>(&*error) {
                    tracing::info!(route, error = %error, "the request body failed");
                    return ErrorCode::BadRequest.json(&[]);
                }
                span.record("error.type", "unavailable");
                metrics::counter!("vestibule_upstream_errors_total", "route" => route.to_string(), "kind" => "unavailable").increment(1);
                tracing::warn!(route, error = %error, "upstream unavailable");
                return ErrorCode::UpstreamUnavailable.json(&[]);
            }
            Ok(Ok(response)) => response,
        };
        span.record("http.response.status_code", response.status().as_u16());
        drop(span);
        if let Some(started) = started {
            response
                .extensions_mut()
                .insert(UpstreamLatency(started.elapsed()));
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some((downstream, hold, end)) = downstream {
                let upstream = hyper::upgrade::on(&mut response);
                self.tunnels.spawn(async move {
                    let idle = hold.as_ref().map(|hold| hold.idle);
                    let _hold = hold;
                    let end = end.map_or_else(CancellationToken::new, |end| end.0);
                    let _closed = end.clone().drop_guard();
                    let moved = tunnel::Moved::new();
                    let tunnel = async {
                        match tokio::try_join!(downstream, upstream) {
                            Ok((down, up)) => {
                                let mut down = moved.noting(TokioIo::new(down));
                                let mut up = moved.noting(TokioIo::new(up));
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                            Err(error) => tracing::debug!(%error, "upgrade failed"),
                        }
                    };
                    tokio::select! {
                        () = tunnel => {}
                        () = end.cancelled() => tracing::debug!("tunnel closed: its session ended"),
                        () = moved.idle_for(idle) => tracing::debug!("tunnel closed: idle"),
                    }
                });
                let (parts, _) = response.into_parts();
                return Response::from_parts(parts, crate::reply::empty());
            }
            return ErrorCode::UpstreamUnavailable.json(&[]);
        }
        // Framed by its chunks, which hyper has decoded: a length beside them says nothing of
        // the body relayed and must not reach the client (RFC 9112 §6.3).
        headers::strip_answer_hop_by_hop(response.headers_mut());
        response
    }
}

/// The request with `body`, for hyper's client, which takes it whole: a copy of the head of a
/// bodiless request (the lender may send it again: `App::route`), the request itself, out of
/// the lender's place, otherwise (a body, or an upgrade, can go only once).
/// A `HEAD` request asks for its connection to close after the answer (hyper then never pools
/// it; over HTTP/2 the field is left out): an upstream that writes a `HEAD` answer's body
/// anyway may write it only once the next request on the connection has reached it, too late
/// for any check before reuse, and that request (anyone's) would take it as its answer. The
/// workers' own path does the same by itself (`wire`).
fn close_after_head(req: &mut Request<Body>) {
    if req.method() == http::Method::HEAD {
        req.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// Whether an HTTP/1 answer has no body (`204`, `304`: RFC 9112 §6.3) but its head announces
/// one (a `Content-Length` other than 0, a `Transfer-Encoding`): its upstream's handler may
/// write that body, perhaps only once the next request on the connection has reached it, and
/// that request (anyone's) would take it as its answer. Such a connection is not reused, as one
/// that carried a `HEAD` ([`close_after_head`]); the workers' own path decides the same
/// (`wire::framing`). A `304` may carry the length its `200` would have had (RFC 9110 §8.6):
/// that costs a connection, not an answer.
fn announces_a_body_it_has_not<B>(response: &Response<B>) -> bool {
    if !matches!(
        response.status(),
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    ) || response.version() == Version::HTTP_2
    {
        return false;
    }
    let headers = response.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers.get_all(header::CONTENT_LENGTH).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|n| n.trim_ascii().iter().any(|&d| d != b'0') || n.trim_ascii().is_empty())
        })
}

fn outgoing(req: &mut Request<Inbound>, body: Body) -> Request<Body> {
    if http_body::Body::is_end_stream(&body) && !req.headers().contains_key(header::UPGRADE) {
        let mut copy = Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        return copy;
    }
    std::mem::replace(req, Request::new(no_body())).map(|_| body)
}

/// A request body that is not there: what a request lent to [`Upstreams::forward`] holds in
/// place of the body it is sent with.
pub fn no_body() -> Inbound {
    http_body_util::Either::Right(http_body_util::Empty::new())
}

/// A body read by hyper's client, as the body of a response Vestibule sends (its trailers
/// vetted: [`crate::proxy::trailers::vet_answer_trailers`]).
fn boxed(body: Incoming) -> Body {
    body.map_frame(crate::proxy::trailers::answer_frame)
        .map_err(|e| -> BoxError { Box::new(e) })
        .boxed_unsync()
}

fn find_cause<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The upstream URI for `path_and_query` under `base` (whose own path is kept as a prefix).
pub fn upstream_uri(
    base: &crate::config::UpstreamBase,
    path: &str,
    query: Option<&str>,
) -> Option<Uri> {
    let base_path = base.path();
    let authority = base.authority.as_str();
    let base = &base.url;
    let mut text = String::with_capacity(
        base.scheme().len()
            + 3
            + authority.len()
            + base_path.len()
            + path.len()
            + query.map_or(0, |q| q.len() + 1),
    );
    text.push_str(base.scheme());
    text.push_str("://");
    text.push_str(authority);
    text.push_str(base_path);
    text.push_str(path);
    if let Some(q) = query {
        text.push('?');
        text.push_str(q);
    }
    // From a String: the bytes are moved, not copied.
    Uri::try_from(text).ok()
}

/// The upstream URI for a request whose path and query go to `base` unchanged (a base without a
/// path of its own, no prefix stripped): made from parts already parsed, with no text built.
pub fn origin_uri(
    base: &crate::config::UpstreamBase,
    path_and_query: Option<http::uri::PathAndQuery>,
) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query =
        Some(path_and_query.unwrap_or(http::uri::PathAndQuery::from_static("/")));
    Uri::from_parts(parts).ok()
}

/// `host[:port]` of a URL, as sent in `Host` (the port only when it is not the scheme's
/// default, as the URL is serialised).
pub fn authority(url: &url::Url) -> &str {
    &url[url::Position::BeforeHost..url::Position::AfterPort]
}

/// The client's request body failed while it was being forwarded: hyper refused its framing
/// (a malformed chunk, chunk extensions over hyper's limit) or the client went away.
#[derive(Debug)]
pub struct ClientBodyError(pub BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// How long the upstream took to answer with its head; read by the access log.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamLatency(pub Duration);

/// A request body that reports when it has been fully sent (or dropped).
struct Tracked {
    inner: Body,
    done: Option<tokio::sync::watch::Sender<bool>>,
}

impl Tracked {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(true);
        }
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(
            polled,
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_)))
        ) {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamBase;

    /// hyper's client takes the request it sends: a bodiless one stays the lender's, whole, so
    /// that a retry with a new token (`App::route`) sends the same request again, and is never
    /// given what hyper's copy was given (the proxy's fields, the token).
    #[test]
    fn a_bodiless_request_sent_through_hyper_stays_the_lenders() {
        let mut lent = Request::get("https://api.test/a?b=1")
            .header("accept", "x")
            .header("cookie", "a=1")
            .body(no_body())
            .unwrap();
        let mut sent = outgoing(&mut lent, crate::reply::empty());
        assert_eq!(sent.uri(), "https://api.test/a?b=1");
        assert_eq!(sent.headers(), lent.headers());
        sent.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert_eq!(lent.uri(), "https://api.test/a?b=1");
        assert_eq!(lent.method(), http::Method::GET);
        assert_eq!(lent.headers().len(), 2);
        assert!(!lent.headers().contains_key(header::AUTHORIZATION));

        // A body, or an upgrade, goes once: the request itself is taken.
        let sent = outgoing(&mut lent, crate::reply::full("x"));
        assert_eq!(sent.headers().len(), 2);
        assert!(lent.headers().is_empty());
        let mut upgrade = Request::get("https://api.test/ws")
            .header("upgrade", "websocket")
            .body(no_body())
            .unwrap();
        let sent = outgoing(&mut upgrade, crate::reply::empty());
        assert!(sent.headers().contains_key(header::UPGRADE));
        assert!(upgrade.headers().is_empty());
    }

    #[test]
    fn upstream_uris_keep_the_base_path_and_authority() {
        let cases = [
            (
                "http://127.0.0.1:5001",
                "/api/x",
                Some("a=1"),
                "http://127.0.0.1:5001/api/x?a=1",
            ),
            (
                "http://api.test/base/",
                "/x",
                None,
                "http://api.test/base/x",
            ),
            ("https://api.test:443/", "/x", None, "https://api.test/x"),
            ("http://[::1]:8080", "/", None, "http://[::1]:8080/"),
        ];
        for (base, path, query, want) in cases {
            let base = UpstreamBase::new(url::Url::parse(base).unwrap()).unwrap();
            assert_eq!(upstream_uri(&base, path, query).unwrap().to_string(), want);
            if base.path().is_empty() {
                // Built from the parts, the same URI.
                let pq = match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                let uri = origin_uri(&base, Some(pq.parse().unwrap())).unwrap();
                assert_eq!(uri.to_string(), want);
                assert_eq!(
                    uri.authority(),
                    upstream_uri(&base, path, query).unwrap().authority()
                );
            }
        }
        let base = url::Url::parse("http://user:pw@api.test:8080/p").unwrap();
        assert_eq!(authority(&base), "api.test:8080");
        assert_eq!(
            authority(&url::Url::parse("https://api.test:443").unwrap()),
            "api.test"
        );
        assert_eq!(
            authority(&url::Url::parse("http://[::1]:9").unwrap()),
            "[::1]:9"
        );
    }
}

#[cfg(test)]
mod late_answer;
#[cfg(test)]
mod pool_tests;
