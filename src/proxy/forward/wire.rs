//! A bodiless, idempotent request's exchange with a plain-`http` upstream, written and read in
//! the request's own task on one of the worker's connections.
//!
//! hyper's client drives each connection from a task of its own: a request goes to it through a
//! channel, its response head comes back through another and its body through a third, and each
//! hop wakes a task. For the requests most API traffic is made of (`GET`, `HEAD`, `DELETE`,
//! `OPTIONS` without a body or an upgrade) the head is written here, the response head parsed
//! here (`httparse`, as hyper does), and the body read by the response body itself, which the
//! client connection's task polls; a body already read with its head is handed over whole and
//! the connection is back in the pool before the response leaves.
//!
//! The reading is strict, since an upstream that frames its answers badly must not get the next
//! request's answer taken for this one's: anything unusual (`Connection: close`, HTTP/1.0, a body
//! framed by the connection's end, `Transfer-Encoding` next to `Content-Length`, bytes beyond
//! the answer) means the connection is not reused, and malformed framing is an error (502).

use crate::proxy::headers::{RecentNames, Replaced, hop_by_hop_index, is_hop_by_hop_token};
use crate::reply::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use std::fmt;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Header fields of a response head, as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// Bytes of a response head (status line and fields), and of a chunked body's trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Bytes of a chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Free space asked of the read buffer before each read.
const READ_SPACE: usize = 8 * 1024;

/// Whether a request takes this path: a method the upstream may see twice (a request lost on a
/// reused connection is sent again), no body, no upgrade, no framing of its own.
/// `req`'s own body is not looked at: `body` is the one to send.
pub(super) fn takes<B>(req: &http::Request<B>, body: &crate::reply::Body) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    ) && http_body::Body::is_end_stream(body)
        // One pass over the few names (two lookups hashed each name: ~170 instructions).
        && !req
            .headers()
            .keys()
            .any(|name| name == header::UPGRADE || name == header::TRANSFER_ENCODING)
}

/// One upstream connection and what has been read from it but not yet used.
pub(super) struct Conn {
    pub(super) tcp: TcpStream,
    buf: BytesMut,
    /// The last answer's field names.
    names: RecentNames,
}

impl Conn {
    pub(super) fn new(tcp: TcpStream) -> Conn {
        Conn {
            tcp,
            buf: BytesMut::with_capacity(READ_SPACE),
            names: RecentNames::default(),
        }
    }

    /// Room for the next read; the buffer's allocation is taken back once the bytes handed out
    /// of it (the last response's head and body) are gone.
    fn make_room(&mut self) {
        if self.buf.is_empty() {
            // Every answer read into the same cache lines while the last one's bytes are gone.
            let _ = self.buf.try_reclaim(READ_SPACE);
        }
        if self.buf.capacity() - self.buf.len() < READ_SPACE / 2 {
            self.buf.reserve(READ_SPACE);
        }
    }

    /// The whole body, when its length is known and all of it has been read with the head.
    pub(super) fn whole(&mut self, framing: &mut Framing) -> Option<Bytes> {
        match *framing {
            Framing::Length(0) => Some(Bytes::new()),
            Framing::Length(n) if n <= self.buf.len() as u64 => {
                *framing = Framing::Length(0);
                Some(self.buf.split_to(n as usize).freeze())
            }
            _ => None,
        }
    }

    /// Whether nothing beyond the last answer has been read: the connection can carry another
    /// request.
    pub(super) fn drained(&self) -> bool {
        self.buf.is_empty()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.make_room();
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                read => return Poll::Ready(read),
            }
        }
    }
}

/// Why an exchange or a body failed.
#[derive(Debug)]
pub(super) enum WireError {
    /// The connection ended before a single byte of an answer: a reused connection the upstream
    /// had closed meanwhile.
    Lost(Option<std::io::Error>),
    Io(std::io::Error),
    Malformed(&'static str),
}

impl WireError {
    /// Whether the request may be sent again on a new connection: nothing came back, and the
    /// connection was one kept from before.
    pub(super) fn lost(&self) -> bool {
        matches!(self, WireError::Lost(_))
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Lost(None) => f.write_str("upstream closed the connection before answering"),
            WireError::Lost(Some(e)) => write!(f, "upstream connection lost before answering: {e}"),
            WireError::Io(e) => write!(f, "upstream connection: {e}"),
            WireError::Malformed(what) => write!(f, "malformed upstream answer: {what}"),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WireError::Lost(Some(e)) | WireError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The request head in origin form, as sent: `req`'s headers as they are (the caller has
/// removed hop-by-hop fields), but those `replaced` stands in for, then `replaced`'s. Names,
/// values, method and target were validated when they were made, so none can carry a line
/// break.
pub(super) fn encode_head<B>(req: &http::Request<B>, replaced: &Replaced<'_>, out: &mut BytesMut) {
    let (method, headers) = (req.method(), req.headers());
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let field_len = |(n, v): (&HeaderName, &[u8])| n.as_str().len() + v.len() + 4;
    let authorization = replaced.authorization.map_or(0, |c| {
        "authorization: \r\n".len() + c.scheme.len() + c.token.len()
    });
    let fields: usize = headers
        .iter()
        .map(|(n, v)| field_len((n, v.as_bytes())))
        .sum::<usize>()
        + replaced.fields().map(field_len).sum::<usize>()
        + authorization;
    out.reserve(method.as_str().len() + target.len() + fields + 14);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let own = headers
        .iter()
        .filter(|(name, _)| !replaced.replaces(name))
        .map(|(name, value)| (name, value.as_bytes()));
    for (name, value) in own.chain(replaced.fields()) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    // Checked when the token entered Vestibule (`sendable_token`, every byte; debug builds
    // check again, so that a way in without the check fails the tests). Here only what could
    // end the field and start another is looked for (a vector at a time): a token with a line
    // break is not sent at all.
    if let Some(credential) = replaced
        .authorization
        .filter(|c| memchr::memchr2(b'\r', b'\n', c.token.as_bytes()).is_none())
    {
        debug_assert!(crate::field::sendable_token(credential.token));
        out.extend_from_slice(b"authorization: ");
        out.extend_from_slice(credential.scheme.as_bytes());
        out.extend_from_slice(credential.token.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head: the response without its body, how the body is framed, and whether
/// the connection may carry another request afterwards.
pub(super) struct Head {
    pub(super) response: Response<()>,
    pub(super) framing: Framing,
    pub(super) keep: bool,
    /// The answer said `Transfer-Encoding` (a field not relayed).
    pub(super) coded: bool,
}

/// Writes the head of `req` (with `replaced`'s fields: [`encode_head`]) and reads the answer's
/// head (interim `1xx` answers are skipped). The head is written from the connection's read
/// buffer, which the answer is read into next: no allocation of its own, and the same cache lines.
pub(super) async fn exchange<B>(
    conn: &mut Conn,
    (req, replaced): (&http::Request<B>, &Replaced<'_>),
    (to_head, head): (bool, &std::sync::Mutex<BytesMut>),
) -> Result<Head, WireError> {
    let written = if conn.buf.is_empty() {
        // Written from the worker's own buffer when the socket takes the whole head at once
        // (nearly always): the head (~1.2 KB with a token) is then written into lines the
        // worker used for the request before, not into this connection's, which with a few
        // hundred connections are out of the core's cache by the time it is used again.
        match write_now(&conn.tcp, (req, replaced), head) {
            Ok(Written::All) => Ok(()),
            Ok(Written::Rest(rest)) => {
                conn.make_room();
                conn.buf.extend_from_slice(&rest);
                let written = conn.tcp.write_all(&conn.buf).await;
                conn.buf.clear();
                written
            }
            Err(e) => Err(e),
        }
    } else {
        // Bytes read and not yet taken (a pooled connection is never checked out with any).
        let mut head = BytesMut::new();
        encode_head(req, replaced, &mut head);
        conn.tcp.write_all(&head).await
    };
    if let Err(e) = written {
        return Err(if broken(&e) {
            WireError::Lost(Some(e))
        } else {
            WireError::Io(e)
        });
    }
    let mut received = !conn.buf.is_empty();
    loop {
        if let Some(head) = parse_head(&mut conn.buf, to_head, &mut conn.names)? {
            return Ok(head);
        }
        conn.make_room();
        match conn.tcp.read_buf(&mut conn.buf).await {
            Ok(0) if !received => return Err(WireError::Lost(None)),
            Ok(0) => return Err(WireError::Malformed("connection closed inside the head")),
            Ok(_) => received = true,
            Err(e) if !received && broken(&e) => return Err(WireError::Lost(Some(e))),
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// What [`write_now`] could not write at once.
enum Written {
    All,
    Rest(Vec<u8>),
}

/// The most a worker's head buffer keeps between heads.
const HEAD_KEPT: usize = 16 * 1024;

/// Encodes the head of `req` into `head`, the worker's head buffer, and writes what the socket
/// takes now, without waiting; the rest, if any, is handed back to be written by waiting.
fn write_now<B>(
    tcp: &TcpStream,
    (req, replaced): (&http::Request<B>, &Replaced<'_>),
    head: &std::sync::Mutex<BytesMut>,
) -> std::io::Result<Written> {
    let mut head = head
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let head = &mut *head;
    {
        head.clear();
        encode_head(req, replaced, head);
        let taken = match tcp.try_write(head) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let written = match head.get(taken..) {
            Some(rest) if !rest.is_empty() => Written::Rest(rest.to_vec()),
            _ => Written::All,
        };
        if head.capacity() > HEAD_KEPT {
            *head = BytesMut::new();
        }
        Ok(written)
    }
}

fn broken(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Parses a complete response head off the front of `buf`; `None` while more must be read.
/// `to_head`: the request was a `HEAD`, so the answer has no body whatever it says. `names`: the
/// connection's last answer's field names.
pub(super) fn parse_head(
    buf: &mut BytesMut,
    to_head: bool,
    names: &mut RecentNames,
) -> Result<Option<Head>, WireError> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        // The parser's fields are left uninitialised and the spans kept for a few: zeroing
        // room for `MAX_HEADERS` of each cost ~3,000 instructions (a `memset`) per parse.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let parser = httparse::ParserConfig::default();
        let mut spans = Spans::default();
        let (len, code, minor) = {
            let len = match parser.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields)
            {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
                Ok(httparse::Status::Partial) => {
                    return Err(WireError::Malformed("head too large"));
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(WireError::Malformed("too many header fields"));
                }
                Err(_) => return Err(WireError::Malformed("head")),
            };
            if len > MAX_HEAD {
                return Err(WireError::Malformed("head too large"));
            }
            // Where each field's name and value lie in `buf`, so that the values can be slices
            // of the head's bytes rather than copies.
            let base = buf.as_ptr() as usize;
            for field in parsed.headers.iter() {
                let name = field.name.as_ptr() as usize - base;
                let value = field.value.as_ptr() as usize - base;
                spans.push([
                    name,
                    name + field.name.len(),
                    value,
                    value + field.value.len(),
                ]);
            }
            (len, parsed.code.unwrap_or(0), parsed.version.unwrap_or(1))
        };
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(WireError::Malformed("switching protocols unasked"));
            }
            // An interim answer (100 Continue, 103 Early Hints): the final one follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| WireError::Malformed("status"))?;
        let bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        let mut hops = Hops::default();
        for (at, [ns, ne, vs, ve]) in spans.iter().enumerate() {
            let name = names
                .name(at, &bytes[ns..ne])
                .ok_or(WireError::Malformed("header name"))?;
            // Fields about this connection only are read here and never relayed: the map is
            // spared their insertion and the proxy their removal.
            if hop_by_hop_index(&name).is_some() {
                hops.read(&name, &bytes[vs..ve]);
                continue;
            }
            let value = HeaderValue::from_maybe_shared(bytes.slice(vs..ve))
                .map_err(|_| WireError::Malformed("header value"))?;
            if name == header::CONTENT_LENGTH {
                hops.read_length(&bytes[vs..ve]);
            }
            headers.append(name, value);
        }
        let (framing, keep) = framing(status, &mut headers, &hops, to_head, minor == 1)?;
        // Fields the upstream's `Connection` names concern its connection only, too (after the
        // framing, which a named `Content-Length` still gave).
        for name in &hops.listed {
            headers.remove(name);
        }
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            keep,
            coded: hops.chunked.is_some(),
        }));
    }
}

/// Where a head's fields lie (name start and end, value start and end): the first
/// [`Spans::INLINE`] in place, any more in a vector. An answer has a handful of fields, and a
/// vector for them was an allocation per answer.
struct Spans {
    inline: [[usize; 4]; Spans::INLINE],
    len: usize,
    more: Vec<[usize; 4]>,
}

impl Default for Spans {
    fn default() -> Self {
        Spans {
            inline: [[0; 4]; Spans::INLINE],
            len: 0,
            more: Vec::new(),
        }
    }
}

impl Spans {
    const INLINE: usize = 16;

    fn push(&mut self, span: [usize; 4]) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = span;
                self.len += 1;
            }
            None => self.more.push(span),
        }
    }

    fn len(&self) -> usize {
        self.len + self.more.len()
    }

    fn iter(&self) -> impl Iterator<Item = [usize; 4]> + '_ {
        self.inline[..self.len]
            .iter()
            .chain(self.more.iter())
            .copied()
    }
}

/// What an answer's hop-by-hop fields say ([`crate::proxy::headers::strip_hop_by_hop`]'s
/// list), read as the head is: the fields themselves are not kept. And the length.
#[derive(Default)]
struct Hops {
    /// `Connection: close`.
    close: bool,
    /// `Transfer-Encoding` was sent; whether its last field's last coding is `chunked`.
    chunked: Option<bool>,
    /// Field names `Connection` lists beyond the hop-by-hop ones (rare).
    listed: Vec<HeaderName>,
    /// `Content-Length` fields (kept in the map), and what they said: one length, unless
    /// `bad_length` (a malformed one, or two that differ: an error only where the length
    /// counts).
    length_fields: usize,
    length: Option<u64>,
    bad_length: bool,
}

impl Hops {
    /// A `Content-Length` field: comma-separated decimal lengths, all equal.
    fn read_length(&mut self, value: &[u8]) {
        self.length_fields += 1;
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                self.bad_length = true;
                return;
            }
            let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if self.length.is_some_and(|seen| seen != n) {
                self.bad_length = true;
            }
            self.length = Some(n);
        }
    }

    fn read(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONNECTION {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if !token.is_empty()
                    && !is_hop_by_hop_token(token)
                    && let Ok(listed) = HeaderName::from_bytes(token)
                {
                    self.listed.push(listed);
                }
            }
        } else if *name == header::TRANSFER_ENCODING {
            // The last coding of the last field, of a value `http` would read as text.
            let text = value
                .iter()
                .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t');
            let last = value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            self.chunked = Some(text && last.eq_ignore_ascii_case(b"chunked"));
        }
    }
}

/// How the body of an answer is framed (RFC 9112, section 6.3), and whether the connection
/// stays usable after it. `headers`: the answer's end-to-end fields; `hops`: what its
/// hop-by-hop ones said.
fn framing(
    status: StatusCode,
    headers: &mut HeaderMap,
    hops: &Hops,
    to_head: bool,
    http11: bool,
) -> Result<(Framing, bool), WireError> {
    let mut keep = http11 && !hops.close;
    if hops.chunked.is_some() && hops.length_fields > 0 {
        // Both: the length is not to be trusted, nor the connection afterwards.
        headers.remove(header::CONTENT_LENGTH);
        keep = false;
    }
    if to_head {
        // Never reused: an upstream that writes a `HEAD` answer's body anyway may write it only
        // once the next request has reached it, too late for any check before reuse, and that
        // request (anyone's) would take the body as its answer: a stored file that is itself an
        // HTTP answer would answer it. `HEAD` is rare enough for a connection of its own.
        return Ok((Framing::Length(0), false));
    }
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        // No body, whatever the head says. One that announces a body anyway (a length other
        // than 0, a coding) comes from a handler that may write that body, maybe only once the
        // next request has reached the upstream: not reused, as after a `HEAD`.
        let announced =
            hops.chunked.is_some() || hops.bad_length || hops.length.is_some_and(|n| n > 0);
        return Ok((Framing::Length(0), keep && !announced));
    }
    if let Some(chunked) = hops.chunked {
        if chunked {
            return Ok((Framing::Chunked(Chunked::Size), keep));
        }
        return Ok((Framing::UntilClose, false));
    }
    if hops.bad_length {
        return Err(WireError::Malformed("content-length"));
    }
    match hops.length {
        Some(n) => Ok((Framing::Length(n), keep)),
        None => Ok((Framing::UntilClose, false)),
    }
}

/// A body's framing, and how far reading it has got.
#[derive(Debug, PartialEq)]
pub(super) enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// Where a chunked body's reading stands.
#[derive(Debug, PartialEq)]
pub(super) enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// What the buffered bytes gave.
#[derive(Debug, PartialEq)]
pub(super) enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl Framing {
    /// The next piece of the body out of `buf`; `None` while more must be read.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Piece>, WireError> {
        match self {
            Framing::Length(0) => Ok(Some(Piece::End)),
            Framing::Length(rest) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*rest).map_or(buf.len(), |rest| rest.min(buf.len()));
                *rest -= take as u64;
                Ok(Some(Piece::Data(buf.split_to(take).freeze())))
            }
            Framing::UntilClose if buf.is_empty() => Ok(None),
            Framing::UntilClose => Ok(Some(Piece::Data(buf.split().freeze()))),
            Framing::Chunked(state) => state.decode(buf),
        }
    }

    /// Whether the whole body has been read.
    pub(super) fn done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunked::Done))
    }

    /// At the connection's end: only a body framed by it is complete there.
    fn at_close(&self) -> Result<(), WireError> {
        match self {
            Framing::UntilClose => Ok(()),
            _ if self.done() => Ok(()),
            _ => Err(WireError::Malformed("connection closed inside the body")),
        }
    }
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Piece>, WireError> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(rest) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(*rest).map_or(buf.len(), |rest| rest.min(buf.len()));
                    *rest -= take as u64;
                    if *rest == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Some(Piece::Data(buf.split_to(take).freeze())));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Malformed("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Chunked::Done;
                        return Ok(Some(Piece::End));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                let name = HeaderName::from_bytes(field.name.as_bytes());
                                let value = HeaderValue::from_bytes(field.value);
                                let (Ok(name), Ok(value)) = (name, value) else {
                                    return Err(WireError::Malformed("trailer field"));
                                };
                                map.append(name, value);
                            }
                            (len, map)
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
                        Ok(httparse::Status::Partial) => {
                            return Err(WireError::Malformed("trailers too large"));
                        }
                        Err(_) => return Err(WireError::Malformed("trailers")),
                    };
                    buf.advance(len);
                    *self = Chunked::Done;
                    return Ok(Some(Piece::Trailers(trailers)));
                }
                Chunked::Done => return Ok(Some(Piece::End)),
            }
        }
    }
}

/// Where the line at the front of `buf` ends (the index of its CR), if it has all arrived; a
/// line longer than `max` or with a bare CR or LF in it is an error.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    let window = &buf[..buf.len().min(max + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(WireError::Malformed("bare LF in chunk size")),
        Some(lf) if window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(WireError::Malformed("bare LF in chunk size")),
        None if buf.len() >= max + 2 => Err(WireError::Malformed("chunk size line too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line (without its CRLF): hexadecimal digits, then optional
/// extensions, which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(WireError::Malformed("chunk size"));
    }
    let rest = &line[digits..];
    let extensions = rest.trim_ascii_start();
    if !rest.is_empty() && !extensions.starts_with(b";") {
        return Err(WireError::Malformed("chunk size"));
    }
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(WireError::Malformed("chunk extension"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from(char::from(d).to_digit(16).unwrap_or(0))
    }))
}

/// What [`read_answer`] made of an upstream's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The header fields as they will be relayed (hop-by-hop ones, and the ones `Connection`
    /// names, left out), in order.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Whether the answer said `Transfer-Encoding` (not relayed, but it decides the framing).
    pub transfer_encoding: bool,
    pub body: Vec<u8>,
    pub trailers: usize,
    /// Whether the connection would carry another request: a clean, complete answer with no
    /// byte after it.
    pub reusable: bool,
}

/// Reads one answer out of `bytes` the way an upstream connection is read, the bytes arriving
/// `step` at a time and the connection ending after the last (`to_head`: the request was a
/// `HEAD`). For the fuzz target and the tests: how the bytes are split must change nothing.
/// `names`: kept from answer to answer by the caller, as a connection keeps them.
pub fn read_answer(
    bytes: &[u8],
    step: usize,
    to_head: bool,
    names: &mut RecentNames,
) -> Result<Answer, String> {
    let step = step.max(1);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut feed = |buf: &mut BytesMut| {
        if fed == bytes.len() {
            return false;
        }
        let next = bytes.len().min(fed + step);
        buf.extend_from_slice(&bytes[fed..next]);
        fed = next;
        true
    };
    let head = loop {
        match parse_head(&mut buf, to_head, names) {
            Err(e) => return Err(e.to_string()),
            Ok(Some(head)) => break head,
            Ok(None) if feed(&mut buf) => {}
            Ok(None) => return Err(WireError::Lost(None).to_string()),
        }
    };
    let Head {
        response,
        mut framing,
        keep,
        coded,
    } = head;
    let mut body = Vec::new();
    let mut trailers = 0;
    let mut closed = false;
    loop {
        match framing.decode(&mut buf).map_err(|e| e.to_string())? {
            Some(Piece::Data(data)) => body.extend_from_slice(&data),
            Some(Piece::Trailers(fields)) => trailers = fields.len(),
            Some(Piece::End) => break,
            None if feed(&mut buf) => {}
            None => {
                framing.at_close().map_err(|e| e.to_string())?;
                closed = true;
                break;
            }
        }
    }
    let fields = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    Ok(Answer {
        status: response.status().as_u16(),
        fields,
        transfer_encoding: coded,
        body,
        trailers,
        reusable: keep && !closed && buf.is_empty() && fed == bytes.len(),
    })
}

/// Where a connection goes once the body on it has been read: its worker's pool.
pub(super) type Home = Box<dyn FnOnce(Conn) + Send>;

/// A response body read from the upstream connection as the client connection asks for it.
/// When it has been read to its end and the connection may carry another request, the
/// connection goes home; dropped early (the client went away), the connection is closed.
pub(super) struct WireBody {
    conn: Option<Conn>,
    framing: Framing,
    keep: bool,
    home: Option<Home>,
}

impl WireBody {
    pub(super) fn new(conn: Conn, framing: Framing, keep: bool, home: Home) -> WireBody {
        WireBody {
            conn: Some(conn),
            framing,
            keep,
            home: Some(home),
        }
    }

    /// The body has been read: the connection goes home if it can carry another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep
            && conn.buf.is_empty()
            && let Some(home) = self.home.take()
        {
            home(conn);
        }
    }
}

impl http_body::Body for WireBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.decode(&mut conn.buf) {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Ok(Some(Piece::End)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Some(Piece::Data(data))) => {
                    if this.framing.done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Ok(Some(Piece::Trailers(mut trailers))) => {
                    // Relayed by hyper's server to a client that asked for them (`TE: trailers`),
                    // without the fields only a head may carry.
                    crate::proxy::trailers::vet_answer_trailers(&mut trailers);
                    this.finish();
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
                }
                Ok(None) => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    let ended = this.framing.at_close();
                    this.conn = None;
                    if let Err(e) = ended {
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(WireError::Io(e)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(rest) if self.conn.is_some() => http_body::SizeHint::with_exact(rest),
            _ if self.conn.is_none() => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
