//! Vestibule's own HTTP/1.1 server side for the common case on plain connections: bodiless
//! requests with nothing unusual in their heads (`GET`, `HEAD`, `DELETE`, `OPTIONS`, a `POST`
//! with `Content-Length: 0`…). The head is read into one buffer and parsed once with
//! `httparse`; the request's header values are slices of that buffer; the answer's head is
//! encoded into a buffer kept for the connection and sent with the start of its body in one
//! write. One task per connection, no dispatcher, no per-request timer entry.
//!
//! Anything else hands the connection to hyper for the rest of its life, every byte read so
//! far given back first through the framing guard ([`super::framing::Guarded::after`]), as a
//! connection hyper serves from its first byte: a request with a body or `Transfer-Encoding`, an upgrade,
//! `Expect`, `TE`, `CONNECT` or a target that is not a path, HTTP/1.0, HTTP/2's preface, a head
//! `httparse` refuses, a bare LF, too many header lines, or a head larger than hyper's buffer.
//! hyper then gives its own answer (400, 431, the upgrade, the body), so the lane never has to
//! judge a framing it does not take.
//!
//! The lane keeps what the connection meets under hyper: the head must arrive within
//! `header_read_timeout` (on the worker's coarse deadlines) and a quiet kept-alive connection
//! is closed after the shorter of that and `idle_timeout`; a client that closes its connection
//! cancels its request; once shutdown begins an idle connection closes and a busy one closes
//! after its answer (which carries `Connection: close`, from [`App::handle`]);
//! `Connection: close` from the client closes after the answer and is echoed.

use super::send::{SendTimeout, write_all};
use crate::app::{App, Worker};
use crate::clock::http_date::HttpDate;
use crate::proxy::forward::ConnectionHold;
use crate::proxy::headers::{Client, RecentNames, hop_by_hop_index, is_hop_by_hop_token};
use crate::reply::{Body, Inbound, in_box};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::ops::Range;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Header lines a head may have before it goes to hyper (hyper's own limit).
const MAX_HEADERS: usize = 100;
/// A connection's read buffer to start with; it grows for a larger head.
const READ_SPACE: usize = 4096;

/// What a connection's lane needs beyond the app.
pub(super) struct Limits {
    /// Time for a head to arrive once the connection waits for one.
    pub head_timeout: Duration,
    /// Idle time after which a connection with no request in flight closes, and the time an
    /// answer may wait for the client to take more of it.
    pub timeouts: super::connection::Timeouts,
    /// hyper's read buffer limit: a head that has not ended within it goes to hyper (431).
    pub max_head: usize,
    /// `server.max_header_size`, for [`parse`].
    pub max_fields: usize,
}

/// Serves `tcp` in the lane until the client closes it, a head times out, shutdown, or a
/// request the lane does not take: then hyper serves the rest of the connection (`hold` goes
/// with it, for a tunnel).
pub(super) async fn serve(
    builder: &auto::Builder<TokioExecutor>,
    mut tcp: TcpStream,
    (app, worker): (Arc<App>, Arc<Worker>),
    ip: IpAddr,
    limits: &Limits,
    shutdown: &CancellationToken,
    hold: ConnectionHold,
) {
    let mut buf = BytesMut::with_capacity(READ_SPACE);
    let mut fields: Vec<(HeaderName, Range<usize>)> = Vec::with_capacity(16);
    let mut names = RecentNames::default();
    let mut date = HttpDate::default();
    let wait = limits.head_timeout.min(limits.timeouts.idle);
    let timed = SendTimeout {
        deadlines: worker.deadlines.clone(),
        timeout: limits.timeouts.send,
    };
    let mut stopping = pin!(shutdown.cancelled());
    // A request has been answered here: what follows is HTTP/1.1, whatever it looks like.
    let mut served = false;
    loop {
        if buf.is_empty() {
            // Back to the start of the allocation (the last head's bytes are gone with its
            // request): every request is read into the same few cache lines, instead of each
            // into the next ones until the buffer runs out.
            let _ = buf.try_reclaim(READ_SPACE);
        }
        // 1. A complete head, from what is buffered or within the deadline.
        let mut parsed = parse(&buf, &mut fields, &mut names, limits.max_fields);
        if matches!(parsed, Parsed::Partial) {
            if buf.is_empty() && shutdown.is_cancelled() {
                return;
            }
            let reading = read_head(
                &mut tcp,
                &mut buf,
                (&mut fields, &mut names),
                limits,
                &mut stopping,
            );
            match worker.deadlines.within(wait, pin!(reading)).await {
                Ok(Some(done)) => parsed = done,
                // The client closed, the read failed, shutdown found it idle, or time is up.
                Ok(None) | Err(()) => return,
            }
        }
        let Parsed::Complete {
            len,
            method,
            target,
            close,
        } = parsed
        else {
            // Boxed (as below): hyper's connection is 2.5 KB of future that every connection
            // of the lane would otherwise carry for its whole life.
            if served && is_h2_preface(&buf) {
                // hyper's choice of version looks for the preface at the first bytes it is
                // given: handed over, this connection would turn into HTTP/2 halfway, which no
                // server reading it from its start does (and a proxy in front may not expect).
                let _ = write_all(&mut tcp, REFUSED_PREFACE, &timed).await;
                let _ = tcp.shutdown().await;
                return;
            }
            let rest = buf.freeze();
            let conn = (tcp, rest, hold);
            return in_box(|| hand_over(builder, conn, (app, worker), ip, limits, shutdown)).await;
        };
        let head = buf.split_to(len).freeze();
        let Some(req) = request(&head, method, target, &mut fields) else {
            // A target or a value `http` refuses: hyper answers it.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(&buf);
            let whole = whole.freeze();
            let conn = (tcp, whole, hold);
            return in_box(|| hand_over(builder, conn, (app, worker), ip, limits, shutdown)).await;
        };
        drop(head);
        let head_only = req.method() == Method::HEAD;
        // 2. The answer, cancelled if the client goes away meanwhile.
        let answer = app.answer(req, Client { ip, tls: false }, &worker);
        let mut answer = pin!(answer);
        // Meanwhile the client is watched ([`client_gone`]).
        let answered = poll_fn(|cx| match answer.as_mut().poll(cx) {
            Poll::Ready(answered) => Poll::Ready(Some(answered)),
            Poll::Pending => client_gone(&tcp, cx, (&mut buf, limits.max_head)).map(|()| None),
        });
        // `None`: the client closed (or its connection failed) first; its request is cancelled.
        let Some((response, request_id)) = answered.await else {
            return;
        };
        // 3. The answer sent; the connection kept unless either side closes it.
        let keep = send(
            (&mut tcp, &timed, (&mut buf, limits.max_head)),
            (&worker.buffers, &mut date),
            (response, &request_id),
            head_only,
            close,
        )
        .await;
        if !keep || shutdown.is_cancelled() {
            let _ = tcp.shutdown().await;
            return;
        }
        served = true;
    }
}

/// HTTP/2's connection preface (RFC 9113 §3.4), which hyper looks for at the start of what it is
/// given.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The answer to HTTP/2's preface on a connection that has carried an HTTP/1.1 request.
const REFUSED_PREFACE: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Whether `buf` is HTTP/2's preface, or the start of it (the lane finds it unusual once it
/// reads `PRI * HTTP/2`, before the rest has come).
fn is_h2_preface(buf: &[u8]) -> bool {
    !buf.is_empty() && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())])
}

/// What the buffered bytes hold.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// Not yet a whole head.
    Partial,
    /// A head the lane does not take (or no HTTP/1.1 at all): hyper's.
    Unusual,
    /// A head of `len` bytes for the lane; `fields` holds its header lines.
    Complete {
        len: usize,
        method: Method,
        target: Range<usize>,
        close: bool,
    },
}

/// Reads until the buffer holds a complete head, or gives up: `None` when the client closed or
/// the read failed (or shutdown began before a byte of a new head); a head too large for the
/// lane is [`Parsed::Unusual`].
async fn read_head(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    (fields, names): (&mut Vec<(HeaderName, Range<usize>)>, &mut RecentNames),
    limits: &Limits,
    stopping: &mut Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
) -> Option<Parsed> {
    loop {
        if buf.len() >= limits.max_head {
            return Some(Parsed::Unusual);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_SPACE);
        }
        let read = tokio::select! {
            biased;
            read = tcp.read_buf(buf) => read,
            () = stopping.as_mut(), if buf.is_empty() => return None,
        };
        match read {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match parse(buf, fields, names, limits.max_fields) {
            Parsed::Partial => {}
            parsed => return Some(parsed),
        }
    }
}

/// Room left under `server.max_header_size` below which a head's hop-by-hop fields cannot
/// decide the size check (which counts the request's fields and its target).
const SIZE_SLACK: usize = 512;

/// Parses the head at the start of `bytes`, if it is whole, and decides whether the lane takes
/// it. On [`Parsed::Complete`], `fields` holds the header lines' names and where their values
/// are in `bytes`: all but the hop-by-hop ones (read here, and never forwarded; a
/// `Connection` that names other fields stays, for the proxy to remove those by it).
/// `names`: the connection's last head's names. `max_fields`: `server.max_header_size`, which
/// the request's fields are checked against (431) once they are a request: a head whose
/// left-out fields could decide that check is hyper's.
fn parse(
    bytes: &[u8],
    fields: &mut Vec<(HeaderName, Range<usize>)>,
    names: &mut RecentNames,
    max_fields: usize,
) -> Parsed {
    if bytes.is_empty() {
        return Parsed::Partial;
    }
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match head.parse_with_uninit_headers(bytes, &mut lines) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Malformed, or more header lines than hyper allows: hyper's answer.
        Err(_) => return Parsed::Unusual,
    };
    // hyper takes a bare LF as a line end; the framing guard refuses it, so hyper must see it.
    if has_bare_lf(&bytes[..len]) || head.version != Some(1) {
        return Parsed::Unusual;
    }
    let (Some(method), Some(path)) = (head.method, head.path) else {
        return Parsed::Unusual;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Unusual;
    };
    if method == Method::CONNECT || !path.starts_with('/') {
        return Parsed::Unusual;
    }
    let base = bytes.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    fields.clear();
    let mut close = false;
    let mut length_seen = false;
    let mut left_out = false;
    for (at, line) in head.headers.iter().enumerate() {
        let Some(name) = names.name(at, line.name.as_bytes()) else {
            return Parsed::Unusual;
        };
        match name {
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT | header::TE => {
                return Parsed::Unusual;
            }
            // Only an empty body, said once.
            header::CONTENT_LENGTH => {
                if length_seen || line.value != b"0" {
                    return Parsed::Unusual;
                }
                length_seen = true;
            }
            header::CONNECTION => {
                let mut names_others = false;
                for token in line.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::Unusual;
                    } else if !token.is_empty() && !is_hop_by_hop_token(token) {
                        names_others = true;
                    }
                }
                if !names_others {
                    left_out = true;
                    continue;
                }
            }
            _ if hop_by_hop_index(&name).is_some() => {
                left_out = true;
                continue;
            }
            _ => {}
        }
        fields.push((name, span(line.value)));
    }
    if left_out {
        // What the size check would count with them (names, values, `: ` and CRLF each, and
        // the target).
        let size = head
            .headers
            .iter()
            .map(|line| line.name.len() + line.value.len() + 4)
            .sum::<usize>()
            + path.len();
        if size + SIZE_SLACK > max_fields {
            return Parsed::Unusual;
        }
    }
    Parsed::Complete {
        len,
        method,
        target: span(path.as_bytes()),
        close,
    }
}

/// Whether a line feed in `head` is not preceded by a carriage return. The line feeds are found
/// with `memchr` (a head has a dozen or so, found a vector at a time); counting every byte of
/// the head, twice, cost ~6 instructions a byte, ~1,800 for a browser's 300-byte head.
fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|at| at == 0 || head[at - 1] != b'\r')
}

/// The request for a head the lane takes; its header values share the head's bytes. `None` if
/// `http` refuses the target. Made in its box: returned by value, its ~0.25 KB would be
/// written into the connection's future first and then copied into the box the pipeline takes
/// (two more places in memory per request, at a few hundred connections out of the cache).
fn request(
    head: &Bytes,
    method: Method,
    target: Range<usize>,
    fields: &mut Vec<(HeaderName, Range<usize>)>,
) -> Option<Box<Request<Inbound>>> {
    let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
    // A little room for what some routes add (a DPoP proof, identity headers, trace
    // context); `Host`, `X-Forwarded-*`, `X-Request-Id`, the token and the filtered cookies go
    // beside the map on the way to a plain-HTTP upstream (`proxy::headers::Replaced`). Sized
    // tight: a map of up to 6 entries is a 624-byte block, which mimalloc serves from its small
    // sizes; the next size up (12 entries, 1,248 bytes) goes through its slower aligned path.
    let mut headers = HeaderMap::with_capacity(fields.len() + 2);
    for (name, value) in fields.drain(..) {
        // httparse has checked the value's bytes, which `HeaderValue` accepts alike.
        let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
        headers.append(name, value);
    }
    let mut req = Box::write(Box::new_uninit(), Request::new(Either::Right(Empty::new())));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Some(req)
}

/// The request the lane makes of the head at the start of `bytes`, and the head's length; `None`
/// when the lane would not take it (hyper's) or it is not whole. For the differential fuzz
/// target `lane_head`, which gives the same bytes to hyper's server.
#[cfg(feature = "test-support")]
/// `names`: kept from head to head by the caller, as a connection keeps them.
pub fn take(bytes: &[u8], names: &mut RecentNames) -> Option<(usize, Request<Inbound>)> {
    let mut fields = Vec::new();
    let Parsed::Complete {
        len,
        method,
        target,
        ..
    } = parse(bytes, &mut fields, names, usize::MAX)
    else {
        return None;
    };
    let head = Bytes::copy_from_slice(&bytes[..len]);
    request(&head, method, target, &mut fields).map(|req| (len, *req))
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// No body at all (`HEAD`, `1xx`, `204`, `304`).
    None,
    Length(u64),
    Chunked,
}

/// `Ready` once the client has closed its connection (or it failed), read while its request is
/// answered: only once the socket says it has something (a pipelined head, or the end), each
/// wake-up of the answer would otherwise also build and poll a read. What it sends meanwhile
/// goes to `buf`, up to `max_head` bytes (then the socket is no longer watched).
#[inline]
fn client_gone(
    tcp: &TcpStream,
    cx: &mut std::task::Context<'_>,
    (buf, max_head): (&mut BytesMut, usize),
) -> Poll<()> {
    while buf.len() < max_head {
        match tcp.poll_read_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => match tcp.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => {}
                // Readiness is cleared: the next poll waits for more.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            },
        }
    }
    Poll::Pending
}

/// Writes `response` and its body; whether the connection can carry another request. A write
/// the client takes nothing of for `server.send_timeout` ends the connection. While the body
/// waits on its upstream, the client is watched ([`client_gone`], what it sends going to
/// `buf`): one that goes away during a quiet stream (a long poll, an event stream between
/// events) ends the answer then, and with it the upstream request, not at the upstream's next
/// write.
async fn send(
    (tcp, timed, (buf, max_head)): (&mut TcpStream, &SendTimeout, (&mut BytesMut, usize)),
    (buffers, date): (&crate::reply::Buffers, &mut HttpDate),
    (response, request_id): (Response<Body>, &crate::field::Made),
    head_only: bool,
    client_close: bool,
) -> bool {
    let (parts, mut body) = response.into_parts();
    let mut lent = buffers.lend();
    let out = &mut lent.buf;
    let (framing, mut close) = encode_head(
        (out, date),
        (&parts, Some(request_id.as_bytes())),
        &body,
        head_only,
        client_close,
    );
    if framing == Framing::None {
        return write_all(tcp, out, timed).await.is_ok() && !close;
    }
    let mut sent = 0u64;
    loop {
        // Frames that are ready join the head (or the previous ones) in one write.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    if write_all(tcp, out, timed).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                let waited = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(frame) => Poll::Ready(Some(frame)),
                    Poll::Pending => client_gone(tcp, cx, (&mut *buf, max_head)).map(|()| None),
                })
                .await;
                // The client has gone: so has the answer (dropped here, its upstream request
                // with it).
                let Some(frame) = waited else {
                    return false;
                };
                frame
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers: dropped, as hyper does for a client that did not ask for them.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                match framing {
                    Framing::Length(length) => {
                        if sent + data.len() as u64 > length {
                            // More than the head announced: the connection cannot go on.
                            let room = usize::try_from(length - sent).unwrap_or(0);
                            out.extend_from_slice(&data[..room]);
                            let _ = write_all(tcp, out, timed).await;
                            return false;
                        }
                        sent += data.len() as u64;
                        out.extend_from_slice(&data);
                    }
                    Framing::Chunked => {
                        write_chunk_size(out, data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    Framing::None => {}
                }
                if out.len() >= 64 * 1024 {
                    if write_all(tcp, out, timed).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
            }
            Some(Err(error)) => {
                // The answer cannot be finished: end the connection so that the client sees
                // it cut short instead of a complete message.
                tracing::debug!(%error, "answer body failed; closing the connection");
                let _ = write_all(tcp, out, timed).await;
                return false;
            }
            None => {
                match framing {
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    Framing::Length(length) if sent < length => close = true,
                    _ => {}
                }
                return write_all(tcp, out, timed).await.is_ok() && !close;
            }
        }
    }
}

/// Encodes the status line and header lines into `out`, with the framing the body takes, a
/// `Date` unless there is one, and `Connection: close` when the client asked for it. Returns
/// the framing and whether the connection closes after this answer.
fn encode_head(
    (out, date): (&mut Vec<u8>, &mut HttpDate),
    (parts, request_id): (&http::response::Parts, Option<&[u8]>),
    body: &Body,
    head_only: bool,
    client_close: bool,
) -> (Framing, bool) {
    let status = parts.status;
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // 1xx answers never reach the lane's requests (no upgrade, no `Expect`); should one come,
    // it is sent without a body and the connection closed.
    let informational = status.is_informational();
    let no_body = head_only
        || informational
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A `HEAD` or `304` answer keeps the length it was given (it describes the `GET`).
    let keeps_length = head_only || status == StatusCode::NOT_MODIFIED;
    let mut close = client_close || informational;
    let mut dated = false;
    let mut connection = false;
    let mut given_length: Option<Option<u64>> = None;
    for (name, value) in &parts.headers {
        match *name {
            header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                let parsed = std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                match given_length {
                    None => given_length = Some(parsed),
                    // Two lengths that differ: trust neither.
                    Some(first) if first != parsed => given_length = Some(None),
                    Some(_) => {}
                }
                continue;
            }
            header::CONNECTION => {
                connection = true;
                if value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    close = true;
                }
            }
            header::DATE => dated = true,
            // The request's own id stands in for any other (written below).
            _ if request_id.is_some() && *name == X_REQUEST_ID => continue,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    let framing = if no_body {
        if keeps_length {
            // The length given, or (for `HEAD`, as hyper does) the length of a body the
            // answer was built with; never an implied zero.
            let from_body = || {
                let exact = body.size_hint().exact();
                (head_only && !body.is_end_stream())
                    .then_some(exact)
                    .flatten()
            };
            match given_length {
                Some(Some(length)) => write_length(out, length),
                Some(None) => {}
                None => {
                    if let Some(length) = from_body() {
                        write_length(out, length);
                    }
                }
            }
        }
        Framing::None
    } else {
        let known = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        match (known, given_length) {
            // What the body will produce wins over a header that says otherwise.
            (Some(length), _) | (None, Some(Some(length))) => {
                write_length(out, length);
                Framing::Length(length)
            }
            (None, _) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if close && !connection {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date.write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, close)
}

fn write_length(out: &mut Vec<u8>, length: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = length;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

fn write_chunk_size(out: &mut Vec<u8>, size: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = size;
    loop {
        at -= 1;
        digits[at] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Gives the connection to hyper, the bytes read so far first, behind the framing guard.
async fn hand_over(
    builder: &auto::Builder<TokioExecutor>,
    (tcp, read, hold): (TcpStream, Bytes, ConnectionHold),
    (app, worker): (Arc<App>, Arc<Worker>),
    ip: IpAddr,
    limits: &Limits,
    shutdown: &CancellationToken,
) {
    let io = super::framing::Guarded::after(tcp, read);
    let peer = (ip, false);
    super::connection::serve(
        builder,
        io,
        (app, worker),
        peer,
        limits.timeouts,
        shutdown,
        hold,
    )
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
