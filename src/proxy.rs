//! The request pipeline for everything outside `bff_prefix`.
//!
//! Stages, in order (each may answer early):
//! 1. **limits** — header block size (431) and declared body size (413); the body streamed
//!    to the upstream must keep a pace (408 when it does not, see [`crate::limits::Paced`]);
//! 2. **route** — the canonical path ([`path`]; an ambiguous one is 400 `bad_path`), then the
//!    longest prefix on segment boundaries; no match is 404; a WebDAV `Destination` naming
//!    no path of that route is 400 ([`webdav`]);
//! 3. **access** (in [`crate::access`]) — feature flag (404 when hidden), session (401 or a
//!    login redirect), CSRF (403), claims policy (403), access token for the upstream;
//! 4. **forward** — static files, or the upstream through the pooled client with rewritten
//!    headers, streaming bodies (without the request's trailers, [`trailers`]) and upgrades.

pub mod forward;
pub mod headers;
pub mod path;
pub mod routing;
pub mod static_files;
pub mod trailers;
pub mod webdav;

use crate::config::{RouteConfig, Target};
use crate::reply::{Body, ErrorCode, Inbound, Reader};
use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use std::time::Duration;

pub use forward::Upstreams;
pub use headers::Peer;
pub use routing::RouteTable;

/// Total size of the request's header block as sent (names, values and separators).
pub fn header_bytes(req: &Request<crate::reply::Inbound>) -> usize {
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + uri_len(req.uri())
}

/// The length of `uri.to_string()`, without building it.
fn uri_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// Replaces the request's path with its canonical form, keeping scheme, authority and the query
/// as sent. `false` if the result is not a valid URI.
pub fn set_path<B>(req: &mut Request<B>, path: &str) -> bool {
    let query = req.uri().query();
    let mut text = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    text.push_str(path);
    if let Some(q) = query {
        text.push('?');
        text.push_str(q);
    }
    let Ok(path_and_query) = http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(text))
    else {
        return false;
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// Binds the body of an answer still streaming from its upstream ([`forward::Streamed`]), told
/// the request's own (canonical) path as well.
pub type Streamed<'a> = Option<&'a (dyn Fn(Body, &str) -> Body + Sync)>;

/// Forwards a request that passed the access stage. The request is lent: rewritten where it
/// is (the same way on every send, so that it can be sent again: the hop-by-hop fields and the
/// ones that speak for the client removed, the identity fields set; the fields the proxy sets
/// in their place go beside it, [`headers::Replaced`]) and given back with its own URI. A
/// request moved instead would be written again into memory the request had not touched yet
/// (once per move: ~0.25 KB), and one to be sent again copied beforehand. `upgrade`: the
/// protocol the request asks to switch to ([`headers::upgrade_protocol`] of its fields as they
/// came, which this rewriting removes).
#[allow(clippy::too_many_arguments)]
pub async fn dispatch(
    upstreams: &Upstreams,
    route: &RouteConfig,
    req: &mut Request<Inbound>,
    (peer, request_id): (Peer, &crate::field::Made),
    own_cookies: headers::OwnCookies<'_>,
    public: &headers::PublicSide,
    credential: Option<headers::Credential<'_>>,
    identity: Vec<(http::HeaderName, HeaderValue)>,
    upgrade: Option<HeaderValue>,
    max_body: u64,
    pace: crate::limits::Pace,
    (default_timeout, streamed): (Duration, Streamed<'_>),
) -> Response<Body> {
    match &route.target {
        Target::Static { dir, spa_fallback } => {
            let upstream_path = routing::upstream_path(route, req.uri().path()).into_owned();
            let req = std::mem::replace(req, Request::new(forward::no_body())).map(|_| ());
            // Boxed: file serving's future is large and would grow every proxied request's.
            let private = route.auth != crate::config::AuthMode::None || route.feature.is_some();
            crate::reply::in_box(|| {
                static_files::serve(dir, spa_fallback.as_deref(), &upstream_path, &req, private)
            })
            .await
        }
        Target::Upstream(base) => {
            // A body already known to be empty declares nothing to refuse (no lookup).
            let declared = (!http_body::Body::is_end_stream(req.body()))
                .then(|| req.headers().get(header::CONTENT_LENGTH))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max_body) {
                return ErrorCode::PayloadTooLarge.json(&[]);
            }
            let upstream_path = routing::upstream_path(route, req.uri().path());
            let uri = if base.path().is_empty() && upstream_path == req.uri().path() {
                // The request's own path and query, as they are: nothing to build or parse.
                forward::origin_uri(base, req.uri().path_and_query().cloned())
            } else {
                forward::upstream_uri(base, &upstream_path, req.uri().query())
            };
            let Some(uri) = uri else {
                return ErrorCode::BadRequest.json(&[]);
            };
            drop(upstream_path);
            let upgrade = upgrade.map(|protocol| {
                let extensions = req.extensions_mut();
                let (hold, end) = (extensions.remove(), extensions.remove());
                forward::Upgrade {
                    protocol,
                    downstream: hyper::upgrade::on(&mut *req),
                    hold,
                    end,
                }
            });
            let fields = req.headers_mut();
            headers::strip_for_upstream(fields, route);
            if route.sets_identity() {
                headers::strip_identity(fields, route);
                for (name, value) in identity {
                    fields.insert(name, value);
                }
            }
            let (forwarded_for, [forwarded_proto, forwarded_host]) =
                headers::forwarded(fields, peer, public);
            let replaced = headers::Replaced {
                host: base.host.clone(),
                owns_authorization: route.token != crate::config::TokenMode::None,
                authorization: credential,
                forwarded_for,
                forwarded_proto,
                forwarded_host,
                cookie: headers::kept_cookies(req.headers(), own_cookies),
                request_id,
            };
            let body = std::mem::replace(req.body_mut(), forward::no_body());
            let body = if http_body::Body::is_end_stream(&body) {
                // Nothing to read, limit or pace (and nothing to allocate).
                crate::reply::empty()
            } else {
                // Marked as the client's, so that a body hyper refuses (bad chunking) or a
                // client that goes away is told apart from an upstream failure. Its trailers
                // stay here: they were never vetted as the head was ([`trailers`]).
                let body =
                    trailers::WithoutTrailers::new(body).map_err(|e| -> crate::reply::BoxError {
                        Box::new(forward::ClientBodyError(e))
                    });
                // Held to a pace, so that a client trickling its body cannot hold the upstream
                // connection it is streamed into.
                let limited = http_body_util::Limited::new(
                    body,
                    usize::try_from(max_body).unwrap_or(usize::MAX),
                );
                crate::limits::Paced::new(limited, pace).boxed_unsync()
            };
            let timeout = route.timeout.unwrap_or(default_timeout);
            let Ok(upstreams) = upstreams.for_route(route) else {
                tracing::error!(route = %route.path, "the route's TLS settings cannot be used");
                return ErrorCode::UpstreamUnavailable.json(&[]);
            };
            // Sent to the upstream's URI; the request keeps its own.
            let own_uri = std::mem::replace(req.uri_mut(), uri);
            // A streamed answer is bound with the request's own path.
            let path = own_uri.path();
            let bind = streamed.map(|bind| move |body: Body| bind(body, path));
            let streamed = bind
                .as_ref()
                .map(|bind| bind as &(dyn Fn(Body) -> Body + Sync));
            let mut response = upstreams
                .forward(
                    (&mut *req, body),
                    &replaced,
                    (upgrade, streamed),
                    timeout,
                    &route.path,
                )
                .await;
            *req.uri_mut() = own_uri;
            headers::remove_set_cookies(response.headers_mut(), own_cookies, &route.path);
            // Credentials are Vestibule's to grant (`cors_origins`, added when the answer
            // leaves): an upstream built for bearer tokens may allow any origin with them,
            // harmless there, but here the browser's cookie makes the request.
            // Looked for by walking the names: a removal by name hashes it, and nearly every
            // answer has none.
            if response
                .headers()
                .keys()
                .any(|name| *name == header::ACCESS_CONTROL_ALLOW_CREDENTIALS)
            {
                response
                    .headers_mut()
                    .remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
            }
            response
        }
    }
}

/// Where a request for `path` on `route` is forwarded, without its query (a DPoP proof's
/// `htu`), and the upstream's origin, `scheme://host[:port]` (the server whose DPoP nonce
/// applies: not the authority alone, which `http://api` and `https://api` share). `None` for
/// static routes.
pub fn upstream_target<'r>(route: &'r RouteConfig, path: &str) -> Option<(http::Uri, &'r str)> {
    let Target::Upstream(base) = &route.target else {
        return None;
    };
    let upstream_path = routing::upstream_path(route, path);
    let uri = forward::upstream_uri(base, &upstream_path, None)?;
    Some((uri, &base.origin))
}

/// Whether `method` asks the upstream to echo the request back: `TRACE`, or `TRACK` (IIS's), in
/// any case (some servers read methods case-insensitively). Such a request never goes to an
/// upstream: its answer would show the browser what Vestibule added (RFC 9110 §9.3.8).
pub fn echoes_the_request(method: &http::Method) -> bool {
    let name = method.as_str();
    name.len() == 5 && (name.eq_ignore_ascii_case("TRACE") || name.eq_ignore_ascii_case("TRACK"))
}

/// The answer for a request that matched no route.
pub fn no_route(req: &Request<crate::reply::Inbound>) -> Response<Body> {
    ErrorCode::NotFound.respond(Reader::of(req.headers()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_and_track_in_any_case_echo_the_request_and_nothing_else_does() {
        for name in ["TRACE", "TRACK", "trace", "tRaCk"] {
            let method = http::Method::from_bytes(name.as_bytes()).unwrap();
            assert!(echoes_the_request(&method), "{name}");
        }
        for name in [
            "GET", "POST", "OPTIONS", "TRACES", "TRAC", "PATCH", "CONNECT",
        ] {
            let method = http::Method::from_bytes(name.as_bytes()).unwrap();
            assert!(!echoes_the_request(&method), "{name}");
        }
    }

    #[test]
    fn uri_len_matches_the_written_uri() {
        for text in [
            "/",
            "/api/items?x=1&y=2",
            "http://example.test:8080/a/b?q",
            "https://example.test",
            "example.test:443",
            "*",
        ] {
            let uri: http::Uri = text.parse().unwrap();
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{text}");
        }
    }
}
