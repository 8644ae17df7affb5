//! WebDAV's `Destination` (RFC 4918 §10.3): `MOVE` and `COPY` name a second path, which the
//! upstream acts on as on the request's own. It must be held to the request's route as that
//! path is: canonical, on `public_url`, owned by the same route; then it is written as the
//! upstream's URL for that path (`strip_prefix` and the base path applied), as the request's
//! target is. Owns nothing else of WebDAV.

use super::routing::{self, Destination, Resolved, RouteTable};
use crate::config::{RouteConfig, Target};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;

pub const DESTINATION: HeaderName = HeaderName::from_static("destination");

/// Why a `Destination` is refused (400): it names no path of the request's route as sent.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused;

/// The `Destination` to forward for a request to `route`: `Ok(None)` when it has none. One
/// field only, an absolute path or a URL on `public_origin` (scheme and host in any case),
/// without query or fragment, whose canonical path `table` gives to `route` itself.
pub fn destination(
    table: &RouteTable,
    route: &Arc<RouteConfig>,
    headers: &HeaderMap,
    public_origin: &str,
    bff_prefix: &str,
) -> Result<Option<HeaderValue>, Refused> {
    let mut fields = headers.get_all(DESTINATION).iter();
    let Some(field) = fields.next() else {
        return Ok(None);
    };
    if fields.next().is_some() {
        return Err(Refused);
    }
    let text = field.to_str().map_err(|_| Refused)?;
    let path = match text.get(..public_origin.len()) {
        Some(origin) if origin.eq_ignore_ascii_case(public_origin) => &text[origin.len()..],
        _ => text,
    };
    // A path of its own: `/x`, never `//host/x`, nor a query or fragment beside it.
    if !path.starts_with('/') || path.starts_with("//") || path.contains(['?', '#']) {
        return Err(Refused);
    }
    let Ok(Resolved {
        path,
        to: Destination::Route(owner),
    }) = table.resolve(path, bff_prefix)
    else {
        return Err(Refused);
    };
    let Target::Upstream(base) = &route.target else {
        return Err(Refused);
    };
    if !Arc::ptr_eq(owner, route) {
        return Err(Refused);
    }
    let forwarded = routing::upstream_path(route, &path);
    let uri = super::forward::upstream_uri(base, &forwarded, None).ok_or(Refused)?;
    HeaderValue::from_maybe_shared(bytes::Bytes::from(uri.to_string()))
        .map_err(|_| Refused)
        .map(Some)
}
