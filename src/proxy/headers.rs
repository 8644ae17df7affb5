//! Header rewriting for forwarded requests and relayed responses: hop-by-hop removal,
//! `X-Forwarded-*`, request ids, and removal of Vestibule's own cookies.

use crate::field::Made;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

// Names as constants: `HeaderName::from_static` in a function checks its text on every call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Fields that concern one connection only (RFC 9110 §7.6.1, and the two older ones still seen).
/// [`hop_by_hop_index`] gives a name's place in this list.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers, including every header named in `Connection`.
///
/// One pass over the names present marks which of the nine are there, as bits: nothing is
/// cloned or allocated, and a message with none of them (most requests) is left at once. Only
/// a `Connection` token that is not itself a hop-by-hop name is parsed into a header name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = hop_by_hop_present(headers, |_| {});
    remove_hop_by_hop(headers, present);
}

/// [`strip_hop_by_hop`] for an upstream's answer, found in the same pass: a `Content-Length`
/// beside `Transfer-Encoding` goes too (the body was framed by its chunks, which the client
/// does not get; RFC 9112 §6.3).
pub fn strip_answer_hop_by_hop(headers: &mut HeaderMap) {
    let present = hop_by_hop_present(headers, |_| {});
    if present & (1 << TRANSFER_ENCODING_AT) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(headers, present);
}

/// `Transfer-Encoding`'s place in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_AT: usize = 3;

/// What a request on its way to `route`'s upstream loses of the client's fields: the hop-by-hop
/// ones ([`strip_hop_by_hop`]) and the lookalikes ([`strip_lookalikes`]), found in one pass
/// over the names.
pub fn strip_for_upstream(headers: &mut HeaderMap, route: &crate::config::RouteConfig) {
    let mut suspect = false;
    let present = hop_by_hop_present(headers, |name| {
        // The name's text once: a standard name's is looked up in a table.
        let text = name.as_str();
        suspect |= may_be_lookalike(text) || names_another_path(text);
    });
    remove_hop_by_hop(headers, present);
    if suspect {
        strip_lookalikes(headers, route);
    }
}

/// Which of [`HOP_BY_HOP`] are present, as bits; `each` sees every name on the way.
fn hop_by_hop_present(headers: &HeaderMap, mut each: impl FnMut(&HeaderName)) -> u16 {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(at) = hop_by_hop_index(name) {
            present |= 1 << at;
        }
        each(name);
    }
    present
}

fn remove_hop_by_hop(headers: &mut HeaderMap, present: u16) {
    if present == 0 {
        return;
    }
    // Fields named in `Connection` that are not hop-by-hop by name (rare): parsed only then.
    // Tokens are split and compared as bytes: a token with a byte no field name may hold is
    // no name, and the common `keep-alive` or `close` costs a few comparisons.
    let mut listed: Vec<HeaderName> = Vec::new();
    if present & 1 != 0 {
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() || is_hop_by_hop_token(token) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    listed.push(name);
                }
            }
        }
    }
    for (at, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << at) != 0 {
            headers.remove(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
}

/// `name`'s place in [`HOP_BY_HOP`], as one `match` on its text (a test keeps the two alike):
/// the compiler sorts it by length first, so a name that cannot be one costs a comparison or
/// two. It runs for every field of every request and answer.
pub(crate) fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "te" => Some(1),
        "trailer" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authenticate" => Some(5),
        "proxy-authorization" => Some(6),
        "keep-alive" => Some(7),
        "proxy-connection" => Some(8),
        _ => None,
    }
}

/// `close`, or one of [`HOP_BY_HOP`], in any case: a `Connection` token that names nothing
/// more to remove. By length first (a test keeps it and the list alike): the common
/// `keep-alive` or `close` costs one comparison, not one per name.
pub(crate) fn is_hop_by_hop_token(token: &[u8]) -> bool {
    let first = token.first().map_or(0, |b| b.to_ascii_lowercase());
    let name: &[u8] = match (token.len(), first) {
        (2, _) => b"te",
        (5, _) => b"close",
        (7, b't') => b"trailer",
        (7, _) => b"upgrade",
        (10, b'c') => b"connection",
        (10, _) => b"keep-alive",
        (16, _) => b"proxy-connection",
        (17, _) => b"transfer-encoding",
        (18, _) => b"proxy-authenticate",
        (19, _) => b"proxy-authorization",
        _ => return false,
    };
    // The names are lowercase letters and `-`: a byte matches in any case when, with the
    // lowercase bit set, it equals the name's (`-` has the bit already; the one other byte that
    // turns into it, CR, is refused). Folded over all the bytes, without a branch per byte
    // (`eq_ignore_ascii_case` cost ~190 instructions for `keep-alive`).
    let differs = token.iter().zip(name).fold(0u8, |differs, (&t, &n)| {
        differs | ((t | 0x20) ^ n) | u8::from(t == b'\r')
    });
    differs == 0
}

/// The field names of the last head read on one connection, by position. A client or an
/// upstream sends the same fields in the same order, head after head: a name whose bytes spell
/// the one at its place (in any case of its letters) is that name, taken without parsing it
/// again (a table lookup per byte, and an allocation for a name `http` does not know). Only the
/// names are kept, not the bytes they were read from: a known name's text is `http`'s static
/// table, shared by every connection, so a connection's memory of its last head is one small
/// vector (each name's bytes in an allocation of their own spread it over as many cache lines,
/// which at a few hundred connections no longer fit in the core's cache).
#[derive(Debug, Default)]
pub struct RecentNames(Vec<HeaderName>);

/// Places remembered: more than a head usually has.
const RECENT_NAMES: usize = 32;

/// Whether `bytes` is `name`'s text (lowercase) with any of its letters in uppercase: exactly
/// the texts `HeaderName::from_bytes` makes `name` of. Only a letter of the name is matched in
/// both cases (`@` never passes for a name's `` ` ``). Eight bytes at a time (the last eight,
/// or two overlapping fours, cover the rest), so a name costs a few instructions.
fn spells(bytes: &[u8], name: &str) -> bool {
    let name = name.as_bytes();
    let len = name.len();
    if bytes.len() != len {
        return false;
    }
    let eight = |text: &[u8], at: usize| {
        text.get(at..at + 8)
            .and_then(|s| s.first_chunk::<8>())
            .map_or(0, |w| u64::from_le_bytes(*w))
    };
    let four = |text: &[u8], at: usize| {
        text.get(at..at + 4)
            .and_then(|s| s.first_chunk::<4>())
            .map_or(0, |w| u64::from(u32::from_le_bytes(*w)))
    };
    let differs = if len >= 8 {
        let mut differs = 0;
        let mut at = 0;
        while at + 8 < len {
            differs |= word_differs(eight(bytes, at), eight(name, at));
            at += 8;
        }
        differs | word_differs(eight(bytes, len - 8), eight(name, len - 8))
    } else if len >= 4 {
        let halves = |text: &[u8]| four(text, 0) | four(text, len - 4) << 32;
        word_differs(halves(bytes), halves(name))
    } else {
        let word = |text: &[u8]| text.iter().fold(0, |w, &b| w << 8 | u64::from(b));
        word_differs(word(bytes), word(name))
    };
    differs == 0
}

/// [`spells`] for eight bytes of text `b` and of a name `n` (each byte of a name is below 0x80):
/// nonzero where they differ.
fn word_differs(b: u64, n: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES << 7;
    // The top bit of each byte of the name from 'a' (0x61) on, then from '{' (0x7b) on: the
    // letters are where the first is set and the second not; their case bit, 0x20, is set in
    // the text's bytes at those places.
    let from_a = (n + 0x1f * ONES) & HIGH;
    let past_z = (n + 0x05 * ONES) & HIGH;
    let letters = (from_a & !past_z) >> 2;
    (b | letters) ^ n
}

impl RecentNames {
    /// The name whose text is `bytes`, for the field at place `at` of a head; `None` when
    /// `bytes` is no header name.
    pub fn name(&mut self, at: usize, bytes: &[u8]) -> Option<HeaderName> {
        if let Some(known) = self.0.get(at)
            && spells(bytes, known.as_str())
        {
            return Some(known.clone());
        }
        let name = HeaderName::from_bytes(bytes).ok()?;
        if let Some(slot) = self.0.get_mut(at) {
            *slot = name.clone();
        } else if at == self.0.len() && at < RECENT_NAMES {
            self.0.push(name.clone());
        }
        Some(name)
    }
}

/// The `Upgrade` protocol of a request asking to switch protocols (never `h2c`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    // `Upgrade` first: nearly every request has none, and many carry `Connection: keep-alive`.
    let protocol = headers.get(header::UPGRADE)?;
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let is_h2c = protocol
        .to_str()
        .is_ok_and(|p| p.trim().eq_ignore_ascii_case("h2c"));
    (wants && !is_h2c).then(|| protocol.clone())
}

/// Vestibule's own cookies: the session cookie, every login-state cookie (a prefix) and the
/// way out of a script's logout.
#[derive(Debug, Clone, Copy)]
pub struct OwnCookies<'a> {
    pub session: &'a str,
    pub login_prefix: &'a str,
    pub logout: &'a str,
}

impl OwnCookies<'_> {
    fn matches(&self, name: &[u8]) -> bool {
        name == self.session.as_bytes()
            || name.starts_with(self.login_prefix.as_bytes())
            || name == self.logout.as_bytes()
    }

    /// Whether a cookie an upstream sets would be one of ours, with or without a `__Host-` or
    /// `__Secure-` prefix (browsers match those prefixes case-insensitively).
    fn names_ours(&self, name: &[u8]) -> bool {
        let name = without_prefix(name);
        name == without_prefix(self.session.as_bytes())
            || name.starts_with(without_prefix(self.login_prefix.as_bytes()))
            || name == without_prefix(self.logout.as_bytes())
    }
}

fn without_prefix(name: &[u8]) -> &[u8] {
    for prefix in [&b"__Host-"[..], b"__Secure-"] {
        if let Some(head) = name.get(..prefix.len())
            && head.eq_ignore_ascii_case(prefix)
        {
            return &name[prefix.len()..];
        }
    }
    name
}

/// The name of the cookie a `Set-Cookie` value sets, as bytes: browsers keep bytes that are
/// not UTF-8 (nor ASCII) in a cookie, so its value must not keep its name from being read (an
/// upstream's `__Host-vestibule=\x80; Max-Age=0` would otherwise pass and delete the session
/// cookie). A nameless cookie (`=name=value`) is sent back by browsers as `name=value`, so the
/// name inside its value is the one that counts.
fn set_cookie_name(value: &HeaderValue) -> Option<&[u8]> {
    let pair = value.as_bytes().split(|&b| b == b';').next()?;
    let at = memchr::memchr(b'=', pair)?;
    let (name, rest) = (pair[..at].trim_ascii(), &pair[at + 1..]);
    if !name.is_empty() {
        return Some(name);
    }
    memchr::memchr(b'=', rest).map(|at| rest[..at].trim_ascii())
}

/// Drops every `Set-Cookie` of an upstream's response that would set one of Vestibule's own
/// cookies (the session cookie or a login-state cookie), logging each at warn with `route`.
/// Other cookies pass in order; a response setting none of ours is left untouched.
pub fn remove_set_cookies(headers: &mut HeaderMap, own: OwnCookies<'_>, route: &str) {
    let ours = |v: &HeaderValue| set_cookie_name(v).is_some_and(|n| own.names_ours(n));
    if !headers.get_all(header::SET_COOKIE).iter().any(ours) {
        return;
    }
    let values: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in values {
        if ours(&value) {
            tracing::warn!(
                route,
                cookie = %String::from_utf8_lossy(set_cookie_name(&value).unwrap_or_default()),
                "the upstream's Set-Cookie for one of Vestibule's own cookies was dropped"
            );
        } else {
            headers.append(header::SET_COOKIE, value);
        }
    }
}

/// The `name=value` pairs of one `Cookie` header's text, trimmed, empty ones skipped.
/// The name of a `Cookie` pair (the whole pair when it has no `=`), trimmed.
fn cookie_name(pair: &[u8]) -> &[u8] {
    match memchr::memchr(b'=', pair) {
        Some(at) => pair[..at].trim_ascii(),
        None => pair,
    }
}

/// The `Cookie` field to send instead of the client's when they carry any of Vestibule's own
/// cookies, or come as several fields: the others' pairs in order, in one field (`None` when
/// nothing is left). Every pair whose name is one of ours goes, whatever bytes it holds (a
/// superset of what [`crate::cookies::values`] reads as ours, which takes only visible ASCII);
/// the others stay, whatever bytes they hold. An HTTP/2 client sends each cookie in
/// a field of its own, which an HTTP/1.1 upstream must get joined (RFC 9113 §8.2.3; RFC 6265
/// allows a request one `Cookie` line). `None` when the client's are one field with none of
/// ours (the common case on routes without a session; a token route's requests always carry
/// the session cookie), and it stands as it is.
///
/// Read as bytes, as [`crate::cookies::values`] reads them: as `str` (`to_str` with its early
/// exit, `split` and `trim`, twice over) it cost ~1.5k instructions per token request.
pub fn kept_cookies(headers: &HeaderMap, own: OwnCookies<'_>) -> Option<Option<HeaderValue>> {
    let ours = |pair: &&[u8]| own.matches(cookie_name(pair));
    let mut fields = 0;
    // Looked up once, read twice.
    let all = headers.get_all(header::COOKIE);
    let present = all.iter().any(|value| {
        fields += 1;
        crate::cookies::pairs(value.as_bytes()).any(|p| ours(&p))
    });
    if !present && fields < 2 {
        return None;
    }
    let mut kept = Vec::new();
    for value in &all {
        for pair in crate::cookies::pairs(value.as_bytes()).filter(|p| !ours(p)) {
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    if kept.is_empty() {
        return Some(None);
    }
    Some(HeaderValue::from_maybe_shared(bytes::Bytes::from(kept)).ok())
}

/// Removes Vestibule's own cookies from every `Cookie` header, keeping the others in order
/// ([`kept_cookies`], as [`Replaced`] applies it).
#[cfg(test)]
fn remove_cookies(headers: &mut HeaderMap, own: OwnCookies<'_>) {
    if let Some(kept) = kept_cookies(headers, own) {
        headers.remove(header::COOKIE);
        if let Some(value) = kept {
            headers.insert(header::COOKIE, value);
        }
    }
}

/// What the proxy knows about the client connection.
///
/// Aligned to 8 bytes like the other arguments of the request's async functions: with its
/// fields' alignment of 1 it was laid out at the end of their futures, behind the room for
/// their later states, and moving a future into its box then copied that room too (1.7 KB per
/// request for `App::route`).
#[derive(Debug, Clone, Copy)]
#[repr(align(8))]
pub struct Peer {
    pub ip: IpAddr,
    pub tls: bool,
    /// The peer is a trusted proxy (`server.trusted_proxies`), so what it says about the client
    /// (`Forwarded`, `X-Real-IP`, `X-Forwarded-*`, `X-Request-Id`) is believed.
    pub trusted: bool,
}

/// The client connection as the server side knows it, before the configuration says whether it
/// is a trusted proxy (aligned for the reason [`Peer`] is).
#[derive(Debug, Clone, Copy)]
#[repr(align(8))]
pub struct Client {
    pub ip: IpAddr,
    pub tls: bool,
}

/// Vestibule's public side as upstreams are told it: `X-Forwarded-Proto` and `-Host` from
/// `public_url`, built once per configuration.
#[derive(Debug, Clone)]
pub struct PublicSide {
    proto: HeaderValue,
    host: HeaderValue,
}

impl PublicSide {
    pub fn new(public_url: &url::Url) -> Self {
        let proto = if public_url.scheme() == "https" {
            HeaderValue::from_static("https")
        } else {
            HeaderValue::from_static("http")
        };
        let host = HeaderValue::from_str(super::forward::authority(public_url))
            .unwrap_or(HeaderValue::from_static(""));
        PublicSide { proto, host }
    }
}

/// Headers through which a client could speak for itself, other than the three that
/// [`forwarded`] always writes: removed from an untrusted peer's requests.
fn speaks_for_client(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "forwarded"
        || name == "x-real-ip"
        || (name.starts_with("x-forwarded-")
            && !matches!(
                name,
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
            ))
}

/// What the proxy writes on a forwarded request in place of anything the client sent under
/// the same names: `Host`, `X-Forwarded-For`, `-Proto`, `-Host`, and on a route that sends a
/// token, `Authorization`. Kept beside the request's map, not inserted in it: the plain-HTTP
/// path to an upstream writes these after the map's fields and leaves out the map's own of
/// these names ([`Replaced::replaces`]), so a request spends no map insertion (hashing a name,
/// probing, maybe replacing) on them; the other paths insert them ([`Replaced::apply`]).
#[derive(Debug, Clone)]
pub struct Replaced<'a> {
    pub host: HeaderValue,
    /// The route sends a token of its own: the client's `Authorization` never passes, whether
    /// or not there is a token to send.
    pub owns_authorization: bool,
    pub authorization: Option<Credential<'a>>,
    /// `None`: the client's value (or its absence) stands.
    pub forwarded_for: Option<Made>,
    pub forwarded_proto: Option<HeaderValue>,
    pub forwarded_host: Option<HeaderValue>,
    /// `Some`: the client's `Cookie` fields give way to this one, or to none
    /// ([`kept_cookies`]: they carried Vestibule's own).
    pub cookie: Option<Option<HeaderValue>>,
    /// [`request_id`]'s: always in place of the client's (lent: the answer carries it too).
    pub request_id: &'a Made,
}

/// The token a request carries to the upstream, as `Authorization: <scheme><token>`. Lent from
/// the session (or the client-credentials cache) and written straight into the upstream's head:
/// no field value is made for it on the way. Its text was checked when it entered Vestibule
/// ([`crate::field::sendable_token`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Credential<'a> {
    /// `"Bearer "` or `"DPoP "` ([`crate::access::authorization_scheme`]).
    pub scheme: &'static str,
    pub token: &'a str,
}

impl Credential<'_> {
    /// The field value, for a request that goes through hyper's client (made and checked there,
    /// as every field value is; marked sensitive, so HTTP/2 never indexes it). `None` if the
    /// text is not a field value (never, for a token that entered through the checks).
    pub fn value(&self) -> Option<HeaderValue> {
        let mut text = String::with_capacity(self.scheme.len() + self.token.len());
        text.push_str(self.scheme);
        text.push_str(self.token);
        let mut value = HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl Replaced<'_> {
    /// Whether the client's field `name` gives way to one of these.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == header::HOST
            || (self.owns_authorization && *name == header::AUTHORIZATION)
            || (self.forwarded_for.is_some() && *name == X_FORWARDED_FOR)
            || (self.forwarded_proto.is_some() && *name == X_FORWARDED_PROTO)
            || (self.forwarded_host.is_some() && *name == X_FORWARDED_HOST)
            || (self.cookie.is_some() && *name == header::COOKIE)
            || *name == X_REQUEST_ID
    }

    /// The fields to write, after the request's own (minus those [`Replaced::replaces`]), but for
    /// the `Authorization` of [`Replaced::authorization`], written from its parts.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> {
        static NAMES: [HeaderName; 6] = [
            header::HOST,
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            header::COOKIE,
            X_REQUEST_ID,
        ];
        let values = [
            Some(self.host.as_bytes()),
            self.forwarded_for.as_ref().map(Made::as_bytes),
            self.forwarded_proto.as_ref().map(HeaderValue::as_bytes),
            self.forwarded_host.as_ref().map(HeaderValue::as_bytes),
            self.cookie
                .as_ref()
                .and_then(Option::as_ref)
                .map(HeaderValue::as_bytes),
            Some(self.request_id.as_bytes()),
        ];
        NAMES
            .iter()
            .zip(values)
            .filter_map(|(name, value)| Some((name, value?)))
    }

    /// Puts them in `headers`, in place of the client's.
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(header::HOST, self.host);
        headers.insert(X_REQUEST_ID, self.request_id.value());
        if self.owns_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(kept) = self.cookie {
            headers.remove(header::COOKIE);
            if let Some(value) = kept {
                headers.insert(header::COOKIE, value);
            }
        }
        let set = [
            (
                header::AUTHORIZATION,
                self.authorization.and_then(|c| c.value()),
            ),
            (X_FORWARDED_FOR, self.forwarded_for.map(|f| f.value())),
            (X_FORWARDED_PROTO, self.forwarded_proto),
            (X_FORWARDED_HOST, self.forwarded_host),
        ];
        for (name, value) in set {
            if let Some(value) = value {
                headers.insert(name, value);
            }
        }
    }
}

/// Who the client is, as the upstream is told: `X-Forwarded-For`, `-Proto` and `-Host`, each
/// `None` where the client's own stands ([`Replaced`]).
///
/// From a trusted proxy, everything it says stands: the peer is appended to its
/// `X-Forwarded-For`, and `-Proto`/`-Host` are set from `public_url` only where it sent none.
/// From any other peer, `Forwarded`, `X-Real-IP` and every `X-Forwarded-*` header are removed
/// from `headers` and the three are set: the peer's address, and `public_url`'s scheme and host
/// (never the client's `Host`). Requests with nothing to remove (the common case) allocate
/// nothing here: the peer's address alone is kept in place ([`Made`]).
pub fn forwarded(
    headers: &mut HeaderMap,
    peer: Peer,
    public: &PublicSide,
) -> (Option<Made>, [Option<HeaderValue>; 2]) {
    let xff = X_FORWARDED_FOR;
    if !peer.trusted && headers.keys().any(speaks_for_client) {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| speaks_for_client(n))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
    // A trusted proxy's list, every field line of it (RFC 9110 §5.3: several lines are one
    // list; HAProxy adds its entry as a line of its own), as `limits::client_address` reads it.
    let mut prior: Vec<&[u8]> = Vec::new();
    if peer.trusted {
        prior.extend(
            headers
                .get_all(&xff)
                .iter()
                .map(|line| line.as_bytes().trim_ascii())
                .filter(|line| !line.is_empty()),
        );
    }
    let mut buffer = [0u8; 64];
    let ip = address_text(peer.ip, &mut buffer);
    let value = match prior.as_slice() {
        _ if ip.is_empty() => None,
        [] => Made::new(ip),
        lines => {
            let mut text = lines.join(&b", "[..]);
            text.extend_from_slice(b", ");
            text.extend_from_slice(ip);
            Made::new(&text)
        }
    };
    if value.is_none() {
        // No address to tell: nobody else's stands in for it.
        headers.remove(&xff);
    }
    let unless_sent = |name: &HeaderName, ours: &HeaderValue| {
        (!(peer.trusted && headers.contains_key(name))).then(|| ours.clone())
    };
    (
        value,
        [
            unless_sent(&X_FORWARDED_PROTO, &public.proto),
            unless_sent(&X_FORWARDED_HOST, &public.host),
        ],
    )
}

/// `ip` as text, written into `buffer` (an address is at most 45 bytes,
/// "ffff:...:255.255.255.255"); empty if it does not fit. IPv4, the common case, is written
/// digit by digit: through `Display` it cost ~1,000 instructions per request.
fn address_text(ip: IpAddr, buffer: &mut [u8; 64]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut at = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buffer[at] = b'.';
                    at += 1;
                }
                if octet >= 100 {
                    buffer[at] = b'0' + octet / 100;
                    at += 1;
                }
                if octet >= 10 {
                    buffer[at] = b'0' + octet / 10 % 10;
                    at += 1;
                }
                buffer[at] = b'0' + octet % 10;
                at += 1;
            }
            &buffer[..at]
        }
        IpAddr::V6(_) => {
            let mut rest = &mut buffer[..];
            let written = std::io::Write::write_fmt(&mut rest, format_args!("{ip}"));
            let unused = rest.len();
            match written {
                Ok(()) => &buffer[..64 - unused],
                Err(_) => &[],
            }
        }
    }
}

/// The request id: a trusted proxy's when it sent a usable one (at most 128 visible ASCII
/// characters), otherwise a new one. It replaces whatever the client sent on the way to an
/// upstream ([`Replaced::request_id`]) and in the answer.
pub fn request_id(headers: &HeaderMap, trusted: bool, ids: &RequestIds) -> Made {
    if trusted && let Some(v) = headers.get(X_REQUEST_ID) {
        let ok = v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return Made::Value(v.clone());
        }
    }
    new_request_id(ids)
}

/// The request numbers of one serving worker: taken from the process-wide counter a block at a
/// time, so that a request writes no counter that another worker writes (one shared counter was
/// a cache line moved between the cores on every request).
#[derive(Debug, Default)]
pub struct RequestIds(std::sync::Mutex<(u64, u64)>);

/// Request numbers a worker takes at a time.
const ID_BLOCK: u64 = 1 << 16;

impl RequestIds {
    fn next(&self) -> u64 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut block = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (next, end) = &mut *block;
        if next == end {
            *next = COUNTER.fetch_add(ID_BLOCK, Ordering::Relaxed);
            *end = *next + ID_BLOCK;
        }
        *next += 1;
        *next - 1
    }
}

/// A new request id: 32 hex digits, unique per process (a random 64-bit process prefix and a
/// number unique in the process, scrambled by a bijective mix with a random key), with no system
/// call per request; kept in place, not allocated.
fn new_request_id(ids: &RequestIds) -> Made {
    static SEED: OnceLock<[u64; 2]> = OnceLock::new();
    let [prefix, key] = *SEED.get_or_init(|| {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
        }
        let (a, b) = bytes.split_at(8);
        [
            u64::from_le_bytes(a.try_into().unwrap_or_default()),
            u64::from_le_bytes(b.try_into().unwrap_or_default()),
        ]
    });
    let n = ids.next();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&prefix.to_be_bytes());
    id[8..].copy_from_slice(&mix64(n ^ key).to_be_bytes());
    let mut bytes = [0u8; crate::field::SHORT];
    let (text, _) = bytes.split_at_mut(32);
    if hex::encode_to_slice(id, text).is_err() {
        return Made::Value(HeaderValue::from_static("0"));
    }
    Made::Short { bytes, len: 32 }
}

/// The SplitMix64 finaliser: a bijection on `u64`, so distinct inputs give distinct ids.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Removes the client's fields that would reach the upstream as one Vestibule writes or removes:
/// a name that differs from such a header only by `_` in place of `-` (`X_User`,
/// `X_Forwarded_For`, `X_Request_Id`), and `Proxy`. Many servers behind a proxy (CGI, WSGI,
/// Rack, PHP) turn both spellings into one variable (`HTTP_X_USER`), so the lookalike would
/// stand beside Vestibule's own value, or before it; `Proxy` becomes `HTTP_PROXY`, which some
/// HTTP clients there take for their outgoing proxy ("httpoxy"). Whoever the peer is: a trusted
/// proxy passes its client's fields on, and no proxy writes these spellings itself.
///
/// The fields that name another request path than the one Vestibule matched and forwards
/// ([`names_another_path`]) go too, in either spelling.
///
/// Other names with `_` pass, as any field does. Called only when [`may_be_lookalike`] or
/// [`names_another_path`] found one in [`strip_for_upstream`]'s pass (nearly no request has one).
fn strip_lookalikes(headers: &mut HeaderMap, route: &crate::config::RouteConfig) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            names_another_path(name.as_str())
                || (may_be_lookalike(name.as_str()) && is_lookalike(name, route))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// A field some upstream frameworks take the request's path from instead of its request line:
/// `X-Original-URL` and `X-Rewrite-URL` (set by IIS's rewrite modules; read by Yii, and by
/// Symfony, Zend and Drupal before 2018), `X-Original-URI`, `X-Override-URL`. A client's would
/// have such an upstream serve another route's resource under the policy of the route the
/// request line matched; no proxy in front of Vestibule writes them for Vestibule's use.
fn names_another_path(name: &str) -> bool {
    // All four are 13 or 14 bytes long: most names are told apart by their length alone.
    (13..=14).contains(&name.len())
        && matches!(
            name,
            "x-original-url" | "x-rewrite-url" | "x-original-uri" | "x-override-url"
        )
}

/// `Proxy`, or a name with `_` in it: only such a name can be a lookalike. Eight bytes at a
/// time (it runs for every field of every request).
fn may_be_lookalike(name: &str) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Whether a byte of `word` is `_`: a zero byte in `word ^ "________"` (exact for "any").
    let has_underscore = |word: u64| {
        let x = word ^ (u64::from(b'_') * ONES);
        x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
    };
    let text = name.as_bytes();
    let mut words = text.chunks_exact(8);
    let mut found = false;
    for word in &mut words {
        found |= word
            .first_chunk::<8>()
            .is_some_and(|w| has_underscore(u64::from_le_bytes(*w)));
    }
    // The last bytes, in a word whose other bytes are zeros (no underscore).
    let rest = (words.remainder().iter().rev()).fold(0, |w, &b| w << 8 | u64::from(b));
    found || has_underscore(rest) || text == b"proxy"
}

/// Whether `name` (`Proxy`, or a name with `_`) is one [`strip_lookalikes`] removes.
fn is_lookalike(name: &HeaderName, route: &crate::config::RouteConfig) -> bool {
    if name.as_str() == "proxy" {
        return true;
    }
    let Ok(dashed) = HeaderName::from_bytes(name.as_str().replace('_', "-").as_bytes()) else {
        return false;
    };
    speaks_for_client(&dashed)
        || names_another_path(dashed.as_str())
        || [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_REQUEST_ID,
        ]
        .contains(&dashed)
        || route
            .identity_headers
            .iter()
            .any(|(ours, _)| *ours == dashed)
        || route.assertion.as_ref().is_some_and(|a| a.header == dashed)
}

/// Removes every copy of the headers `route` sets itself (its identity headers and its
/// assertion's header): only Vestibule speaks for the user there, with or without a session.
pub fn strip_identity(headers: &mut HeaderMap, route: &crate::config::RouteConfig) {
    for (name, _) in &route.identity_headers {
        headers.remove(name);
    }
    if let Some(assertion) = &route.assertion {
        headers.remove(&assertion.header);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TEST_REQUEST_ID: Made = Made::Value(HeaderValue::from_static("id-1"));

    /// Aligned to 8, they sit among the other arguments of an async function's first state
    /// instead of after the room for its later states (which moving the future into its box
    /// would copy, ~2.4 KB per request; measured with callgrind).
    /// Eight bytes at a time, it answers as reading each byte would: every length from 1 to 40,
    /// an underscore at every place or none, among bytes one off from it (`^`, `` ` ``) and `-`.
    #[test]
    fn a_name_may_be_a_lookalike_exactly_when_it_has_an_underscore_or_is_proxy() {
        for len in 1..=40 {
            for at in 0..=len {
                let text: String = (0..len)
                    .map(|i| match (i == at, i % 4) {
                        (true, _) => '_',
                        (_, 0) => '^',
                        (_, 1) => '`',
                        (_, 2) => '-',
                        _ => 'x',
                    })
                    .collect();
                let name = HeaderName::from_bytes(text.as_bytes()).unwrap();
                assert_eq!(may_be_lookalike(name.as_str()), at < len, "{text}");
            }
        }
        assert!(may_be_lookalike("proxy"));
        for name in [
            header::HOST,
            header::COOKIE,
            header::PROXY_AUTHORIZATION,
            X_FORWARDED_FOR,
        ] {
            assert!(!may_be_lookalike(name.as_str()), "{name}");
        }
    }

    #[test]
    fn connection_facts_are_aligned_like_the_other_arguments() {
        assert_eq!(std::mem::align_of::<Peer>(), 8);
        assert_eq!(std::mem::align_of::<Client>(), 8);
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        let mut addresses: Vec<IpAddr> = Vec::new();
        for octet in 0..=255u8 {
            for at in 0..4 {
                let mut octets = [1, 22, 133, 4];
                octets[at] = octet;
                addresses.push(IpAddr::from(octets));
            }
        }
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            addresses.push(text.parse().unwrap());
        }
        for ip in addresses {
            let mut buffer = [0u8; 64];
            assert_eq!(
                address_text(ip, &mut buffer),
                ip.to_string().as_bytes(),
                "{ip}"
            );
        }
    }

    #[test]
    fn generated_request_ids_are_32_hex_digits_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        let ids = RequestIds::default();
        for _ in 0..1000 {
            let id = request_id(&HeaderMap::new(), true, &ids);
            let text = id.as_str().to_string();
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(text));
        }
    }

    #[test]
    fn request_ids_made_by_several_workers_at_once_are_distinct() {
        let threads: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    // A worker's numbers, more than one block of them.
                    let ids = RequestIds::default();
                    (0..ID_BLOCK + 100)
                        .map(|_| new_request_id(&ids).as_str().to_string())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for thread in threads {
            for id in thread.join().unwrap() {
                assert!(seen.insert(id));
            }
        }
    }

    #[test]
    fn a_name_at_a_remembered_place_is_the_name_its_text_makes() {
        let mut names = RecentNames::default();
        let heads: [&[&[u8]]; 8] = [
            &[b"Host", b"X-CSRF", b"Cookie"],
            &[b"host", b"x-csrf", b"COOKIE", b"X-Extra"],
            // Other names at the same places, and a byte that makes no name.
            &[b"Hosts", b"X-CSRG", b"Cookie", b"X-Extra"],
            &[b"Host", b"X CSRF"],
            // Only a letter matches in either case: `@` is `` ` `` with the case bit cleared,
            // `\r` is `-`, `[` is `{`.
            &[b"x`a", b"x-b", b"x{c"],
            &[b"X@A", b"x\rb", b"X[C"],
            &[b"x`a", b"x-b", b"x{c"],
            &[b"x`A", b"X-B", b"x{C"],
        ];
        for head in heads {
            for (at, bytes) in head.iter().enumerate() {
                assert_eq!(
                    names.name(at, bytes),
                    HeaderName::from_bytes(bytes).ok(),
                    "{}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn a_remembered_name_answers_any_text_as_parsing_it_would() {
        // Texts over bytes that differ from each other by the case bit alone, letters or not;
        // half of them the text last read at their place with the case of some bytes changed.
        // `^` and `~` are both name bytes; `@`, `\\`, CR and 0xe1 none.
        let alphabet = b"aAbBzZmM`^~|-0P@\\\r\xe1";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut names = RecentNames::default();
        let mut last: [Vec<u8>; 3] = Default::default();
        let (mut remembered, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let at = (next() % 3) as usize;
            let text: Vec<u8> = if next() % 2 == 0 && !last[at].is_empty() {
                last[at]
                    .iter()
                    .map(|&b| b ^ ((next() % 2) as u8 * 0x20))
                    .collect()
            } else {
                let len = 1 + (next() % 12) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            };
            let parsed = HeaderName::from_bytes(&text).ok();
            assert_eq!(
                names.name(at, &text),
                parsed,
                "{:?} at {at}",
                String::from_utf8_lossy(&text)
            );
            match parsed {
                Some(_) => remembered += 1,
                None => refused += 1,
            }
            last[at] = text;
        }
        // Both outcomes came up often enough to have been tried.
        assert!(
            remembered > 2_000 && refused > 2_000,
            "{remembered} {refused}"
        );
    }

    #[test]
    fn an_answer_framed_by_chunks_loses_its_length_and_one_framed_by_length_keeps_it() {
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_AT], header::TRANSFER_ENCODING);
        let mut chunked = HeaderMap::new();
        chunked.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        chunked.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        chunked.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_answer_hop_by_hop(&mut chunked);
        assert_eq!(chunked.keys().collect::<Vec<_>>(), [header::CONTENT_TYPE]);
        let mut length = HeaderMap::new();
        length.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        length.insert(header::CONNECTION, "keep-alive, x-hop".parse().unwrap());
        length.insert("x-hop", "1".parse().unwrap());
        strip_answer_hop_by_hop(&mut length);
        assert_eq!(length.keys().collect::<Vec<_>>(), [header::CONTENT_LENGTH]);
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), "x".parse().unwrap());
            h.insert("x-end-to-end", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}");
        }
        // All nine at once, some twice, and one more named in `Connection`.
        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP {
            h.append(name.clone(), "x".parse().unwrap());
            h.append(name.clone(), "y".parse().unwrap());
        }
        h.append(header::CONNECTION, "close, X-Listed".parse().unwrap());
        h.insert("x-listed", "1".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-end-to-end"]);
        // Tokens in any case, with spaces, tabs and empty ones around them, over two values;
        // a token no name can be is skipped, and the fields the others name still go.
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            "Keep-Alive ,\tX-One,, CLOSE ,TE".parse().unwrap(),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-two, caf\xc3\xa9 ,x three, Proxy-Connection").unwrap(),
        );
        for name in ["x-one", "x-two", "keep-alive", "te", "x-end-to-end"] {
            h.insert(name, "1".parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-end-to-end"]);
        for token in ["close", "Close", "KEEP-ALIVE", "te", "Upgrade"] {
            assert!(is_hop_by_hop_token(token.as_bytes()), "{token}");
        }
        for token in [
            "closed",
            "keep-alive2",
            "t",
            "x-one",
            "",
            "trailex",
            "connectiox",
        ] {
            assert!(!is_hop_by_hop_token(token.as_bytes()), "{token}");
        }
        // Every name of the list is a token naming nothing more, in any case; a name of the
        // same length that differs by one byte is not.
        for name in HOP_BY_HOP.iter().map(HeaderName::as_str).chain(["close"]) {
            let upper = name.to_ascii_uppercase();
            assert!(is_hop_by_hop_token(name.as_bytes()), "{name}");
            assert!(is_hop_by_hop_token(upper.as_bytes()), "{upper}");
            for at in 0..name.len() {
                // Any other byte at any place, the name's own in the other case aside.
                for byte in 0..=u8::MAX {
                    let mut other = name.as_bytes().to_vec();
                    if other[at].eq_ignore_ascii_case(&byte) {
                        continue;
                    }
                    other[at] = byte;
                    assert!(!is_hop_by_hop_token(&other), "{name} with {byte} at {at}");
                }
            }
        }
        // The list and the `match` agree, place by place (the bits stand for places).
        for (at, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(at), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::COOKIE), None);
    }

    #[test]
    fn own_cookies_are_removed_and_others_kept() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; __Host-vestibule=x; b=2".parse().unwrap(),
        );
        h.append(header::COOKIE, "vestibule-login=y".parse().unwrap());
        remove_cookies(
            &mut h,
            OwnCookies {
                session: "__Host-vestibule",
                login_prefix: "vestibule-login",
                logout: "vestibule-logout",
            },
        );
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");

        let own = OwnCookies {
            session: "__Host-vestibule",
            login_prefix: "vestibule-login",
            logout: "vestibule-logout",
        };
        // Only ours: no `Cookie` header is left at all.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, " __Host-vestibule=x ;".parse().unwrap());
        remove_cookies(&mut h, own);
        assert!(h.get(header::COOKIE).is_none());
        // Ours go whatever bytes they hold; the others' pairs stay, whatever bytes they hold.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"__Host-vestibule=\xff; p=\xc3\xa9").unwrap(),
        );
        h.append(header::COOKIE, "b=2;; c=3".parse().unwrap());
        remove_cookies(&mut h, own);
        assert_eq!(
            h.get_all(header::COOKIE)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect::<Vec<_>>(),
            [b"a=1; p=\xc3\xa9; b=2; c=3"]
        );
        // None of ours, in one header: left exactly as it came.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1;; vestibule=2".parse().unwrap());
        remove_cookies(&mut h, own);
        let kept: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(kept, ["a=1;; vestibule=2"]);
        // None of ours, in two headers (an HTTP/2 client's way): joined in one.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "vestibule=2".parse().unwrap());
        remove_cookies(&mut h, own);
        let kept: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(kept, ["a=1; vestibule=2"]);
    }

    /// Vestibule's own cookies under `__Host-` names.
    const HOST_OWN: OwnCookies<'static> = OwnCookies {
        session: "__Host-vestibule",
        login_prefix: "__Host-vestibule-login-",
        logout: "__Host-vestibule-logout",
    };

    #[test]
    fn upstream_set_cookies_for_our_cookies_are_dropped() {
        let own = HOST_OWN;
        let mut h = HeaderMap::new();
        for value in [
            "vestibule=1; Path=/",
            "__Host-vestibule=2",
            "__host-vestibule=3",
            "__Secure-vestibule-login-x=4",
            "vestibule-login-y=5; HttpOnly",
            "__Secure-vestibule-logout=10",
            " =vestibule=6",
            "app=7; Path=/",
            "vestibule-other=8",
            "Vestibule=9",
        ] {
            h.append(header::SET_COOKIE, value.parse().unwrap());
        }
        remove_set_cookies(&mut h, own, "/api/");
        let kept: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(kept, ["app=7; Path=/", "vestibule-other=8", "Vestibule=9"]);
    }

    /// Bytes that are not UTF-8 (which browsers keep in a cookie's value, and `HeaderValue`
    /// allows) must not hide the name: an upstream could otherwise delete or overwrite the
    /// session cookie in the browser (`Max-Age=0`), logging its user out.
    #[test]
    fn upstream_set_cookies_for_our_cookies_are_dropped_whatever_bytes_they_carry() {
        let own = HOST_OWN;
        let mut h = HeaderMap::new();
        for value in [
            &b"__Host-vestibule=\x80; Path=/; Secure; Max-Age=0"[..],
            b"__Host-vestibule=x\x80y; Path=/; Secure",
            b"__Host-vestibule-login-x=\xff; Path=/; Secure",
            b"__Host-vestibule-login-\xe9=1; Path=/; Secure",
            b"__Host-vestibule-logout=\xc3\xa9",
            b"=__Host-vestibule=\x80; Path=/",
            b"\t__Host-vestibule\t=\x80",
            b"app=\xc3\xa9; Path=/",
            b"\xe9=1",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_bytes(value).unwrap());
        }
        remove_set_cookies(&mut h, own, "/api/");
        let kept: Vec<_> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(kept, [&b"app=\xc3\xa9; Path=/"[..], b"\xe9=1"]);
    }

    #[test]
    fn untrusted_forwarded_for_is_replaced() {
        let set = |h: &mut HeaderMap, peer: Peer, public: &PublicSide| {
            let (forwarded_for, [forwarded_proto, forwarded_host]) = forwarded(h, peer, public);
            Replaced {
                host: HeaderValue::from_static("up.test"),
                owns_authorization: false,
                authorization: None,
                forwarded_for,
                forwarded_proto,
                forwarded_host,
                cookie: None,
                request_id: &TEST_REQUEST_ID,
            }
            .apply(h);
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        let peer = Peer {
            ip: "10.0.0.1".parse().unwrap(),
            tls: false,
            trusted: false,
        };
        let public = PublicSide::new(&url::Url::parse("https://app.example.test").unwrap());
        set(&mut h, peer, &public);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1");
        let mut h2 = HeaderMap::new();
        h2.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h2.insert("x-forwarded-proto", "gopher".parse().unwrap());
        let trusted = Peer {
            trusted: true,
            ..peer
        };
        set(&mut h2, trusted, &public);
        assert_eq!(h2.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.1");
        assert_eq!(h2.get("x-forwarded-proto").unwrap(), "gopher");
        assert_eq!(h2.get("x-forwarded-host").unwrap(), "app.example.test");
    }

    #[test]
    fn replaced_fields_stand_in_for_the_clients_own() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("host", "evil.test"),
            ("authorization", "Basic abc"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil.test"),
            ("x-request-id", "abc-123"),
            ("accept", "*/*"),
        ] {
            h.append(name, value.parse().unwrap());
        }
        let mut set = Replaced {
            host: HeaderValue::from_static("up.test"),
            owns_authorization: true,
            authorization: None,
            forwarded_for: Made::new(b"10.0.0.1"),
            forwarded_proto: None,
            forwarded_host: Some(HeaderValue::from_static("app.test")),
            cookie: None,
            request_id: &TEST_REQUEST_ID,
        };
        // What the plain path writes: the client's fields that stand, then the proxy's.
        let written = |set: &Replaced| {
            let mut fields = h
                .iter()
                .filter(|(name, _)| !set.replaces(name))
                .map(|(n, v)| (n, v.as_bytes()))
                .chain(set.fields())
                .map(|(n, v)| format!("{n}: {}", std::str::from_utf8(v).unwrap()))
                .collect::<Vec<_>>();
            fields.extend(
                set.authorization
                    .map(|c| format!("authorization: {}{}", c.scheme, c.token)),
            );
            fields
        };
        let want = [
            "x-forwarded-proto: gopher",
            "accept: */*",
            "host: up.test",
            "x-forwarded-for: 10.0.0.1",
            "x-forwarded-host: app.test",
            "x-request-id: id-1",
        ];
        assert_eq!(written(&set), want, "a token route without a token");
        // What the other paths send: the same fields.
        let mut applied = h.clone();
        set.clone().apply(&mut applied);
        let mut sent: Vec<_> = applied
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        sent.sort();
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(sent, want);
        // A token: it alone is sent.
        set.authorization = Some(Credential {
            scheme: "Bearer ",
            token: "t",
        });
        assert!(written(&set).contains(&"authorization: Bearer t".to_string()));
        assert!(!written(&set).iter().any(|f| f.contains("Basic")));
        // The other paths put the same in the map, marked sensitive (never indexed in HTTP/2).
        let mut applied = h.clone();
        set.clone().apply(&mut applied);
        let sent: Vec<_> = applied.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(sent, ["Bearer t"]);
        assert!(sent[0].is_sensitive());
        // A route without a token of its own: the client's stands.
        set.owns_authorization = false;
        set.authorization = None;
        assert!(written(&set).contains(&"authorization: Basic abc".to_string()));
    }

    /// `kept_cookies` as it was written first (as `str`: `to_str`, `split`, `trim`), for the
    /// byte-wise one to be held to.
    /// [`kept_cookies`] as text: each byte one character (Latin-1, so that bytes outside ASCII
    /// stay themselves), `str`'s splitting, and trimming of spaces and tabs.
    fn kept_cookies_as_text(h: &HeaderMap, own: OwnCookies<'_>) -> Option<Option<HeaderValue>> {
        fn pairs(text: &str) -> impl Iterator<Item = &str> {
            let blank = |c: char| c == ' ' || c == '\t';
            text.split(';')
                .map(move |p| p.trim_matches(blank))
                .filter(|p| !p.is_empty())
        }
        let ours = |pair: &str| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            let name = name.trim_matches(|c: char| c == ' ' || c == '\t');
            name == own.session || name.starts_with(own.login_prefix)
        };
        let texts: Vec<String> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes().iter().map(|&b| char::from(b)).collect())
            .collect();
        let present = texts.iter().any(|t| pairs(t).any(ours));
        if !present && texts.len() < 2 {
            return None;
        }
        let kept: Vec<&str> = texts
            .iter()
            .flat_map(|t| pairs(t))
            .filter(|p| !ours(p))
            .collect();
        if kept.is_empty() {
            return Some(None);
        }
        let bytes: Vec<u8> = kept.join("; ").chars().map(|c| c as u8).collect();
        Some(HeaderValue::from_bytes(&bytes).ok())
    }

    #[test]
    fn kept_cookies_reads_bytes_as_a_text_reading_does() {
        let own = OwnCookies {
            session: "vestibule",
            login_prefix: "vestibule-login",
            logout: "vestibule-logout",
        };
        let parts: [&[u8]; 14] = [
            b"vestibule",
            b"vestibule-login",
            b"vestibule-login-x",
            b"a",
            b"vestibulex",
            b"=",
            b"=",
            b";",
            b";",
            b" ",
            b"\t",
            b"\"",
            b"\xff",
            b"x1",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap()
        };
        let mut removed = 0;
        for _ in 0..20_000 {
            let mut h = HeaderMap::new();
            for _ in 0..1 + next(3) {
                let mut value = Vec::new();
                for _ in 0..next(12) {
                    value.extend_from_slice(parts[next(parts.len())]);
                }
                h.append(header::COOKIE, HeaderValue::from_bytes(&value).unwrap());
            }
            let want = kept_cookies_as_text(&h, own);
            removed += usize::from(want.is_some());
            assert_eq!(kept_cookies(&h, own), want, "{h:?}");
        }
        // Both outcomes were met many times.
        assert!((2_000..18_000).contains(&removed), "{removed}");
    }

    #[test]
    fn the_clients_cookies_give_way_to_the_ones_kept() {
        let own = OwnCookies {
            session: "vestibule",
            login_prefix: "vestibule-login",
            logout: "vestibule-logout",
        };
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; vestibule=s".parse().unwrap());
        h.append(header::COOKIE, "vestibule-login-x=y; b=2".parse().unwrap());
        let kept = kept_cookies(&h, own);
        assert_eq!(kept, Some(Some(HeaderValue::from_static("a=1; b=2"))));
        let set = Replaced {
            host: HeaderValue::from_static("up.test"),
            owns_authorization: false,
            authorization: None,
            forwarded_for: None,
            forwarded_proto: None,
            forwarded_host: None,
            cookie: kept,
            request_id: &TEST_REQUEST_ID,
        };
        let written = |set: &Replaced| {
            h.iter()
                .filter(|(name, _)| !set.replaces(name))
                .map(|(n, v)| (n, v.as_bytes()))
                .chain(set.fields())
                .filter(|(name, _)| **name == header::COOKIE)
                .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(written(&set), ["a=1; b=2"]);
        let mut applied = h.clone();
        set.clone().apply(&mut applied);
        let sent: Vec<_> = applied.get_all(header::COOKIE).iter().collect();
        assert_eq!(sent, ["a=1; b=2"]);
        // Only ours: no Cookie at all, either way.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "vestibule=s".parse().unwrap());
        let set = Replaced {
            cookie: kept_cookies(&h, own),
            ..set
        };
        assert_eq!(set.cookie, Some(None));
        assert!(!h.iter().any(|(name, _)| !set.replaces(name)));
        assert_eq!(set.fields().count(), 2, "Host and the request id alone");
        set.apply(&mut h);
        assert!(h.get(header::COOKIE).is_none());
        // None of ours: the client's stand as they came.
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1".parse().unwrap());
        assert_eq!(kept_cookies(&h, own), None);
    }
}
