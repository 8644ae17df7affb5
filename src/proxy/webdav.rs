//! WebDAV's `Destination` (RFC 4918 §10.3): `MOVE` and `COPY` name a second path, which the
//! upstream acts on as on the request's own. It must be held to the request's route as that
//! path is: canonical, on `public_url`, owned by the same route; then it is written as the
//! upstream's URL for that path (`strip_prefix` and the base path applied), as the request's
//! target is. The other way, a `Location` the upstream names one of its own paths with (a
//! 201 after `PUT` or `MKCOL`, a redirect) is written back as the public path the route maps
//! to it ([`public_location`]). Owns nothing else of WebDAV.

use super::path;
use super::routing::{self, Destination, Resolved, RouteTable};
use crate::config::{RouteConfig, Target};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::borrow::Cow;
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

/// Whether the upstream of `route` sees other paths than the public ones (`strip_prefix`, or a
/// base path): only then can what it names (`Location`, `Content-Location`) need writing back.
pub fn maps_paths(route: &RouteConfig) -> bool {
    match &route.target {
        Target::Upstream(base) => route.strip_prefix || !base.path().is_empty(),
        Target::Static { .. } => false,
    }
}

/// The public form of an upstream's `Location` (or `Content-Location`) on a route whose paths the upstream sees
/// otherwise (`strip_prefix`, or a base path): a path, or a URL on the upstream itself (scheme,
/// host and port), below the upstream's base path, becomes the path the route maps to it (a
/// URL on `public_origin` for a URL), query and fragment kept. `None`: leave it as it came
/// (another host, a relative reference, a path outside the base, a route that maps paths as
/// they are).
pub fn public_location(
    route: &RouteConfig,
    location: &HeaderValue,
    public_origin: &str,
) -> Option<HeaderValue> {
    let Target::Upstream(base) = &route.target else {
        return None;
    };
    let base_path = base.path();
    if !route.strip_prefix && base_path.is_empty() {
        return None;
    }
    let text = location.to_str().ok()?;
    let (origin, rest) = if text.starts_with('/') && !text.starts_with("//") {
        ("", text)
    } else {
        let upstream = format!("{}://{}", base.scheme, base.authority);
        let head = text.get(..upstream.len())?;
        let rest = &text[upstream.len()..];
        if !head.eq_ignore_ascii_case(&upstream)
            || !(rest.is_empty() || rest.starts_with(['/', '?', '#']))
        {
            return None;
        }
        (public_origin, rest)
    };
    let split = rest.find(['?', '#']).unwrap_or(rest.len());
    let (path, suffix) = rest.split_at(split);
    let below = path.get(base_path.len()..)?;
    if !path[..base_path.len()].eq(base_path) || !(below.is_empty() || below.starts_with('/')) {
        return None;
    }
    let below = if below.is_empty() { "/" } else { below };
    let prefix = if route.strip_prefix {
        route.path.trim_end_matches('/')
    } else {
        ""
    };
    let path = format!("{prefix}{below}");
    // Only a canonical path the route owns: cut off its base, the upstream's own
    // `/store//evil.example` (or `/\evil`, `/.`, `/..`) would read as another site, and
    // `/store/other` as another route's path. Those pass as they came.
    if !routing::owns(route, &path)
        || !matches!(
            path::canonicalize(&path, routing::options(route)),
            Ok(Cow::Borrowed(_))
        )
    {
        return None;
    }
    let public = format!("{origin}{path}{suffix}");
    HeaderValue::from_str(&public).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dav(strip: bool, upstream: &str) -> RouteConfig {
        crate::proxy::routing::tests::route_to("/dav/", upstream, strip)
    }

    fn public(route: &RouteConfig, location: &str) -> Option<String> {
        public_location(
            route,
            &HeaderValue::from_str(location).unwrap(),
            "https://app.example",
        )
        .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn an_upstream_location_below_its_base_names_the_routes_public_path() {
        let route = dav(true, "http://files.internal:8080/store");
        for (sent, expected) in [
            ("/store/a.txt", Some("/dav/a.txt")),
            ("/store", Some("/dav/")),
            ("/store?x#y", Some("/dav/?x#y")),
            (
                "HTTP://Files.Internal:8080/store/n/",
                Some("https://app.example/dav/n/"),
            ),
            ("http://files.internal:8080", None),
            ("/storefront/a", None),
            ("/other", None),
            ("//files.internal:8080/store/a", None),
            ("http://files.internal:8081/store/a", None),
            ("http://files.internal:8080@evil.example/store/a", None),
            ("a.txt", None),
        ] {
            assert_eq!(public(&route, sent).as_deref(), expected, "{sent}");
        }
        // A route whose upstream sees the public paths as they are: nothing to map.
        assert_eq!(
            public(&dav(false, "http://files.internal:8080"), "/dav/a"),
            None
        );
        // A base path alone, without `strip_prefix`.
        let based = dav(false, "http://files.internal:8080/store");
        assert_eq!(public(&based, "/store/dav/a").as_deref(), Some("/dav/a"));
        // Never a path that leaves the site or the route once the base is cut off.
        let everything = crate::proxy::routing::tests::route_to("/", "http://f:8080/store", false);
        for hostile in [
            "/store//evil.example/x",
            "/store/\\evil.example",
            "/store/\t/evil.example",
            "/store/./x",
            "/store/a/../x",
            "http://f:8080/store//evil.example",
        ] {
            assert_eq!(public(&everything, hostile), None, "{hostile:?}");
        }
        assert_eq!(public(&based, "/store/other/x"), None);
        assert_eq!(public(&based, "/store/dav/../x"), None);
    }
}
