//! Routes whose forwarded paths meet at one upstream: a route that strips its prefix (or
//! forwards below a base path) can reach, through its own prefix, upstream paths that another
//! route to the same upstream guards (`/api/` stripped: `/api/admin/x` arrives as `/admin/x`,
//! the `/admin/` route's). Refused when it would reach them with a laxer policy.

use super::*;

/// One upstream route as this check reads it.
struct Forwarding<'a> {
    key: &'a str,
    route: &'a RouteConfig,
    /// Scheme, host and port: one path space.
    origin: (&'a str, Option<&'a str>, Option<u16>),
    /// The request prefix the route takes off ("" without `strip_prefix`)…
    taken: String,
    /// …and what it puts in its place (the base URL's path, "" for none).
    put: String,
    /// Every upstream path the route forwards starts with this (on a segment boundary).
    space: String,
}

fn forwarding<'a>(key: &'a str, route: &'a RouteConfig) -> Option<Forwarding<'a>> {
    let Target::Upstream(base) = &route.target else {
        return None;
    };
    let prefix = route.path.trim_end_matches('/');
    let put = base.path().to_string();
    let (taken, space) = if route.strip_prefix {
        (prefix.to_string(), put.clone())
    } else {
        (String::new(), format!("{put}{prefix}"))
    };
    Some(Forwarding {
        key,
        route,
        origin: (
            base.url.scheme(),
            base.url.host_str(),
            base.url.port_or_known_default(),
        ),
        taken,
        put,
        space,
    })
}

/// `path` without `prefix` when `prefix` owns it on a segment boundary (any case, as upstreams
/// that match case-insensitively read it).
fn below<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let head = path.get(..prefix.len())?;
    let rest = &path[prefix.len()..];
    (head.eq_ignore_ascii_case(prefix) && (rest.is_empty() || rest.starts_with('/')))
        .then_some(rest)
}

/// The route requests for `path` go to: the longest prefix that owns it.
fn owner<'a>(routes: &'a [RouteConfig], path: &str) -> Option<&'a RouteConfig> {
    routes
        .iter()
        .filter(|r| below(path, r.path.trim_end_matches('/')).is_some())
        .max_by_key(|r| r.path.trim_end_matches('/').len())
}

/// What `guard` asks of a request that `other` does not (empty: `other` is as strict).
fn laxer(other: &RouteConfig, guard: &RouteConfig) -> Vec<&'static str> {
    let rank = |a: AuthMode| match a {
        AuthMode::None => 0,
        AuthMode::Optional => 1,
        AuthMode::Required => 2,
    };
    let mut lacking = Vec::new();
    if rank(other.auth) < rank(guard.auth) {
        lacking.push("auth");
    }
    if guard.csrf && !other.csrf {
        lacking.push("csrf");
    }
    // Each of the guard's requirements must be one of the other's, with no more values allowed.
    let covered = |(claim, wanted): &(String, Vec<String>)| {
        other
            .require
            .iter()
            .any(|(c, w)| c == claim && !w.is_empty() && w.iter().all(|v| wanted.contains(v)))
    };
    if !guard.require.iter().all(covered) {
        lacking.push("require");
    }
    if guard.feature.is_some() && guard.feature != other.feature {
        lacking.push("feature");
    }
    if guard.step_up.is_some() && guard.step_up != other.step_up {
        lacking.push("acr_values/max_age");
    }
    // The browser's copies of the guard's identity and assertion headers are removed only on
    // routes that set them (the browser's `Authorization` on token routes): through one that
    // does not, `X-User: admin` reaches the guard's upstream paths as if Vestibule said it.
    let removed = |name: &http::HeaderName| {
        other.identity_headers.iter().any(|(n, _)| n == name)
            || other.assertion.as_ref().is_some_and(|a| a.header == name)
            || (name == http::header::AUTHORIZATION && other.token != TokenMode::None)
    };
    if !guard.identity_headers.iter().all(|(name, _)| removed(name)) {
        lacking.push("identity_headers");
    }
    if guard
        .assertion
        .as_ref()
        .is_some_and(|a| !removed(&a.header))
    {
        lacking.push("assertion");
    }
    lacking
}

/// Refuses a route that reaches upstream paths another route to the same upstream guards (its
/// forwarded space is within the first one's) with a policy the first one lacks. `keys` are
/// the routes' TOML paths (`routes[0]`), one for each route.
pub(super) fn overlapping_upstreams(
    routes: &[RouteConfig],
    keys: &[String],
    problems: &mut Problems,
) {
    let all: Vec<Forwarding> = keys
        .iter()
        .zip(routes)
        .filter_map(|(key, route)| forwarding(key, route))
        .collect();
    for wide in &all {
        for narrow in &all {
            if std::ptr::eq(wide, narrow) || wide.origin != narrow.origin {
                continue;
            }
            if below(&narrow.space, &wide.space).is_none() {
                continue;
            }
            // The requests `wide` would forward into `narrow`'s space: their prefix, unless a
            // longer route takes them (`narrow` itself, for routes that map alike).
            let Some(inner) = below(&narrow.space, &wide.put) else {
                continue;
            };
            let requests = format!("{}{inner}", wide.taken);
            if !owner(routes, &requests).is_some_and(|o| std::ptr::eq(o, wide.route)) {
                continue;
            }
            let lacking = laxer(wide.route, narrow.route);
            if lacking.is_empty() {
                continue;
            }
            let field = if wide.route.strip_prefix {
                "strip_prefix"
            } else {
                "upstream"
            };
            problems.add(
                format!("{}.{field}", wide.key),
                format!(
                    "forwards \"{requests}/…\" to the upstream as \"{}/…\", which {} ({:?}) guards with {} it does not have; give \"{requests}/\" a route of its own with {}'s policy, or send them to different upstreams",
                    narrow.space,
                    narrow.key,
                    narrow.route.path,
                    lacking.join(", "),
                    narrow.key,
                ),
            );
        }
    }
}
