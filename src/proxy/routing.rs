//! Route table: prefix match on segment boundaries, longest prefix wins, decided on the
//! canonical path ([`super::path`]). Compiled once per configuration.

use super::path::{self, BadPath, PathOptions};
use crate::config::RouteConfig;
use std::borrow::Cow;
use std::sync::Arc;

/// Routes sorted by descending prefix length, so the first match is the longest.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<RouteConfig>>,
}

/// Where a request goes.
#[derive(Debug)]
pub enum Destination<'t> {
    /// Vestibule's own endpoints below `bff_prefix`.
    Bff,
    Route(&'t Arc<RouteConfig>),
    NoRoute,
}

/// A request path resolved: its canonical form (borrowed when the raw path already was) and
/// where it goes.
#[derive(Debug)]
pub struct Resolved<'t, 'p> {
    pub path: Cow<'p, str>,
    pub to: Destination<'t>,
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.iter().cloned().map(Arc::new).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.trim_end_matches('/').len()));
        RouteTable { routes }
    }

    /// The route owning a canonical path: a prefix `/api/` owns `/api` and `/api/…`, not
    /// `/apix`.
    pub fn find(&self, path: &str) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| owns(r, path))
    }

    /// Canonicalises a raw request path and decides where it goes. `%2F` and `;` parameters
    /// are refused unless the route they would reach allows them; that route is chosen by the
    /// path with them resolved (see [`path::routing_view`]), so they can never hide another
    /// route's prefix, and they may only appear below the route's own prefix.
    pub fn resolve<'t, 'p>(
        &'t self,
        raw: &'p str,
        bff_prefix: &str,
    ) -> Result<Resolved<'t, 'p>, BadPath> {
        let refused = match path::canonicalize(raw, PathOptions::STRICT) {
            Ok(path) => {
                let to = if in_bff(&path, bff_prefix) {
                    Destination::Bff
                } else {
                    let route = self.find(&path);
                    self.same_route_folded(&path, route)?;
                    route.map_or(Destination::NoRoute, Destination::Route)
                };
                return Ok(Resolved { path, to });
            }
            Err(refused) if refused.is_switchable() => refused,
            Err(refused) => return Err(refused),
        };
        // Rare: a route may allow what the strict form refused.
        let lenient = path::canonicalize(raw, PathOptions::LENIENT)?;
        let view = path::routing_view(&lenient)?;
        if in_bff(&view, bff_prefix) {
            return Err(refused);
        }
        let route = self.find(&view).ok_or(refused)?;
        // The path an upstream could take it for, read with folding letters as ASCII too.
        self.same_route_folded(&view, Some(route))?;
        let path = path::canonicalize(raw, options(route))?;
        if !owns(route, &path) {
            return Err(refused);
        }
        self.same_route_folded(&path, Some(route))?;
        Ok(Resolved {
            path,
            to: Destination::Route(route),
        })
    }
}

impl RouteTable {
    /// Refuses a canonical path that, with the letters case-insensitive servers read as ASCII
    /// ones ([`folded`]) taken as those, belongs to another route than `route`: Java's
    /// `equalsIgnoreCase` and `Character.toLowerCase` (Spring's matchers with case-insensitive
    /// matching), Python's `casefold`, a JavaScript `/iu` regex take `/api/adm%C4%B1n/` for
    /// `/api/admin/`, which must not meet the weaker `/api/` route's policy. Paths holding
    /// those letters below a route that does not spell with them are left alone (`ı` and `İ`
    /// are everyday Turkish letters).
    fn same_route_folded(
        &self,
        path: &str,
        route: Option<&Arc<RouteConfig>>,
    ) -> Result<(), BadPath> {
        let Some(folded) = folded(path) else {
            return Ok(());
        };
        match (self.find(&folded), route) {
            (None, None) => Ok(()),
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => Ok(()),
            _ => Err(BadPath::FoldsToAnotherRoute),
        }
    }
}

/// `path` (canonical: escapes in upper case) with every letter whose case mapping reaches ASCII
/// written as those ASCII letters, if it holds any. The simple mappings: `ı` U+0131 and `İ`
/// U+0130 as `i`, `ſ` U+017F as `s`, the Kelvin sign U+212A as `k`. The full ones (Python's
/// `casefold` and `upper`, Java's `String.toUpperCase`), one letter for several: `ß` U+00DF and
/// `ẞ` U+1E9E as `ss`, the ligatures `ﬀ` `ﬁ` `ﬂ` `ﬃ` `ﬄ` `ﬅ` `ﬆ` (U+FB00–U+FB06) as `ff`, `fi`,
/// `fl`, `ffi`, `ffl`, `st`, `st`. That is every character outside ASCII whose lower, upper or
/// folded form is all ASCII (Unicode 15). Each escape starts a character (the path is valid
/// UTF-8), so a match is always a whole letter.
fn folded(path: &str) -> Option<String> {
    const FOLDS: [(&str, &str); 13] = [
        ("%C3%9F", "ss"),
        ("%C4%B0", "i"),
        ("%C4%B1", "i"),
        ("%C5%BF", "s"),
        ("%E1%BA%9E", "ss"),
        ("%E2%84%AA", "k"),
        ("%EF%AC%80", "ff"),
        ("%EF%AC%81", "fi"),
        ("%EF%AC%82", "fl"),
        ("%EF%AC%83", "ffi"),
        ("%EF%AC%84", "ffl"),
        ("%EF%AC%85", "st"),
        ("%EF%AC%86", "st"),
    ];
    if !path.contains('%') || !FOLDS.iter().any(|(from, _)| path.contains(from)) {
        return None;
    }
    let mut out = path.to_string();
    for (from, to) in FOLDS {
        out = out.replace(from, to);
    }
    Some(out)
}

/// The path options a route's switches ask for.
pub fn options(route: &RouteConfig) -> PathOptions {
    PathOptions {
        allow_encoded_slash: route.allow_encoded_slash,
        allow_path_params: route.allow_path_params,
    }
}

/// Does the route's prefix own this path (on a segment boundary)? Letters match in any case:
/// upstreams that route case-insensitively (ASP.NET, IIS, Spring with its option on) serve
/// `/api/BETA/x` as `/api/beta/x`, so it must meet the `/api/beta/` route's policy. A
/// case-sensitive upstream just answers 404 to the other spelling.
pub(super) fn owns(route: &RouteConfig, path: &str) -> bool {
    strip_prefix_any_case(path, route.path.trim_end_matches('/'))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `path` without `prefix`, compared ASCII case-insensitively (canonical paths are ASCII).
fn strip_prefix_any_case<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let head = path.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &path[prefix.len()..])
}

/// Is this path one of Vestibule's own endpoints (`<bff_prefix>/…`)?
fn in_bff(path: &str, bff_prefix: &str) -> bool {
    path.strip_prefix(bff_prefix)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// The path the upstream sees: with `strip_prefix`, the route's prefix is removed, keeping a
/// leading `/`.
pub fn upstream_path<'a>(route: &RouteConfig, path: &'a str) -> std::borrow::Cow<'a, str> {
    if !route.strip_prefix {
        return path.into();
    }
    let prefix = route.path.trim_end_matches('/');
    let rest = strip_prefix_any_case(path, prefix).unwrap_or(path);
    if rest.starts_with('/') {
        rest.into()
    } else {
        format!("/{rest}").into()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{AuthMode, Target, TokenMode};

    /// A route at `path` to `upstream` with every setting at its most open: the routing and
    /// WebDAV tests' fixture.
    pub(crate) fn route_to(path: &str, upstream: &str, strip: bool) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            target: Target::Upstream(
                crate::config::UpstreamBase::new(url::Url::parse(upstream).unwrap()).unwrap(),
            ),
            strip_prefix: strip,
            auth: AuthMode::None,
            token: TokenMode::None,
            csrf: false,
            resource: None,
            scopes: vec![],
            exchange: false,
            require: vec![],
            feature: None,
            timeout: None,
            allow_encoded_slash: false,
            allow_path_params: false,
            identity_headers: vec![],
            assertion: None,
            token_binding: crate::config::TokenBinding::None,
            ca_file: None,
            tls_client: None,
            step_up: None,
            token_key: String::new(),
        }
    }

    fn route(path: &str, strip: bool) -> RouteConfig {
        route_to(path, "http://127.0.0.1:1", strip)
    }

    #[test]
    fn longest_prefix_wins() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/v2/", false),
        ]);
        assert_eq!(table.find("/api/v2/x").unwrap().path, "/api/v2/");
        assert_eq!(table.find("/api/x").unwrap().path, "/api/");
        assert_eq!(table.find("/other").unwrap().path, "/");
    }

    #[test]
    fn letters_in_another_case_meet_the_policy_of_the_route_they_spell() {
        let table = RouteTable::new(&[route("/api/", false), route("/api/beta/", true)]);
        for path in ["/api/BETA/x", "/API/beta/x", "/api/Beta", "/Api/bEtA/"] {
            assert_eq!(table.find(path).unwrap().path, "/api/beta/", "{path}");
        }
        let strip = route("/api/beta/", true);
        assert_eq!(upstream_path(&strip, "/API/Beta/x"), "/x");
    }

    /// Upstreams that match case-insensitively fold more than ASCII: Java's `equalsIgnoreCase`
    /// and `Character.toLowerCase` (Spring's matchers), Python's `casefold`, a JavaScript `/iu`
    /// regex take `ı`, `İ` for `i`, `ſ` for `s` and the Kelvin sign for `k`. Such a spelling of
    /// a route's prefix is refused, never given the policy of the route above it; those letters
    /// elsewhere pass.
    #[test]
    fn letters_that_fold_to_ascii_never_spell_another_routes_prefix() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/admin/", false),
            route("/api/users/", false),
            route("/api/keys/", false),
        ]);
        refused_as_folding(
            &table,
            &[
                "/api/adm%C4%B1n/x",
                "/api/adm%c4%b0n/x",
                "/api/u%C5%BFers/x",
                "/api/%E2%84%AAeys/x",
                "/api/%E2%84%AAeys",
            ],
        );
        owned_by(
            &table,
            &[
                ("/api/admin/%C4%B1", "/api/admin/"),
                ("/api/s%C4%B1cak", "/api/"),
                ("/%C4%B1lik", "/"),
                ("/api/u%C5%BFer", "/api/"),
            ],
        );
    }

    /// Each of `raws` is refused: it spells another route's prefix by folding.
    fn refused_as_folding(table: &RouteTable, raws: &[&str]) {
        for raw in raws {
            let resolved = table.resolve(raw, "/bff");
            assert!(
                matches!(resolved, Err(BadPath::FoldsToAnotherRoute)),
                "{raw}: {resolved:?}"
            );
        }
    }

    /// Each path of `cases` goes to the route its owner names.
    fn owned_by(table: &RouteTable, cases: &[(&str, &str)]) {
        for (raw, owner) in cases {
            match table.resolve(raw, "/bff") {
                Ok(Resolved {
                    to: Destination::Route(r),
                    ..
                }) => assert_eq!(r.path, *owner, "{raw}"),
                other => panic!("{raw}: {other:?}"),
            }
        }
    }

    /// Full case folding (Python's `casefold`, Java's `String.toUpperCase`) also turns one
    /// letter into two or three ASCII ones: `ß` and `ẞ` into `ss`, the Latin ligatures `ﬀ`
    /// `ﬁ` `ﬂ` `ﬃ` `ﬄ` `ﬅ` `ﬆ` into `ff`, `fi`, `fl`, `ffi`, `ffl`, `st`. Such a spelling of a
    /// route's prefix is refused like the one-letter folds; the letters elsewhere pass.
    #[test]
    fn letters_that_fold_to_several_ascii_ones_never_spell_another_routes_prefix() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/staff/", false),
            route("/api/class/", false),
            route("/api/first/", false),
            route("/api/flow/", false),
            route("/api/offline/", false),
            route("/api/waffle/", false),
        ]);
        refused_as_folding(
            &table,
            &[
                "/api/sta%EF%AC%80/x",
                "/api/STA%EF%AC%80",
                "/api/cla%C3%9F/x",
                "/api/cla%E1%BA%9E/x",
                "/api/cla\u{df}/x",
                "/api/%EF%AC%81rst/x",
                "/api/%EF%AC%82ow/x",
                "/api/o%EF%AC%84ine/x",
                "/api/wa%EF%AC%84e/x",
                "/api/o%EF%AC%80line/x",
                "/api/%EF%AC%81r%EF%AC%85/x",
                "/api/%EF%AC%81r%EF%AC%86/x",
            ],
        );
        owned_by(
            &table,
            &[
                ("/api/stra%C3%9Fe", "/api/"),
                ("/api/staff/stra%C3%9Fe", "/api/staff/"),
                ("/%EF%AC%81le", "/"),
                ("/api/o%EF%AC%83ce", "/api/"),
            ],
        );
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/beta/", false),
            route("/health", false),
        ]);
        for (path, want) in [
            ("/api/beta/x", "/api/beta/"),
            ("/api/beta/", "/api/beta/"),
            ("/api/beta", "/api/beta/"),
            ("/api/betax", "/api/"),
            ("/api/beta-old/x", "/api/"),
            ("/api", "/api/"),
            ("/apix", "/"),
            ("/health", "/health"),
            ("/health/x", "/health"),
            ("/healthz", "/"),
        ] {
            assert_eq!(table.find(path).unwrap().path, want, "{path}");
        }
    }

    fn switched(path: &str, slash: bool, params: bool) -> RouteConfig {
        RouteConfig {
            allow_encoded_slash: slash,
            allow_path_params: params,
            token_binding: crate::config::TokenBinding::None,
            ..route(path, false)
        }
    }

    /// Where `raw` goes and the path that is forwarded, or why it is refused.
    fn resolve(table: &RouteTable, raw: &str) -> Result<(String, String), BadPath> {
        let resolved = table.resolve(raw, "/bff")?;
        let to = match resolved.to {
            Destination::Bff => "bff".to_string(),
            Destination::Route(r) => r.path.clone(),
            Destination::NoRoute => "none".to_string(),
        };
        Ok((to, resolved.path.into_owned()))
    }

    #[test]
    fn the_switches_apply_only_below_the_prefix_of_the_route_that_sets_them() {
        let table = RouteTable::new(&[
            switched("/files/", true, false),
            switched("/files/private/", false, false),
            switched("/java/", false, true),
            switched("/api/", false, false),
        ]);
        let ok = |to: &str, path: &str| Ok((to.to_string(), path.to_string()));
        for (raw, want) in [
            // allow_encoded_slash
            ("/files/a%2fb", ok("/files/", "/files/a%2Fb")),
            ("/files/./a%2Fb/", ok("/files/", "/files/a%2Fb/")),
            ("/files/private%2Fx", Err(BadPath::EncodedSlash)),
            ("/files%2Fx", Err(BadPath::EncodedSlash)),
            ("/files/a;v=1", Err(BadPath::PathParameter)),
            ("/api/a%2Fb", Err(BadPath::EncodedSlash)),
            ("/files/a%2F..%2Fb", Err(BadPath::EncodedSlash)),
            // allow_path_params
            ("/java/x;jsessionid=1", ok("/java/", "/java/x;jsessionid=1")),
            ("/java/x;v=1/%79", ok("/java/", "/java/x;v=1/y")),
            ("/java;v=1/x", Err(BadPath::PathParameter)),
            ("/java/..;/api/x", Err(BadPath::PathParameter)),
            ("/java/x%2Fy", Err(BadPath::EncodedSlash)),
            ("/api/x;v=1", Err(BadPath::PathParameter)),
            // Never into the BFF endpoints, nor where no route is.
            ("/bff;v=1/user", Err(BadPath::PathParameter)),
            ("/other/x;v=1", Err(BadPath::PathParameter)),
        ] {
            assert_eq!(resolve(&table, raw), want, "{raw}");
        }
    }

    /// The two defences together: a route that lets `;` parameters or `%2F` through is chosen
    /// by the path an upstream could take the request for (parameters dropped, `%2F` as `/`),
    /// and that path, too, must not spell another route's prefix with a letter that folds to
    /// ASCII. Tomcat drops `;jsessionid=…` and Spring may match case-insensitively, reading
    /// `/java/adm%C4%B1n;v=1/x` as `/java/admin/x`.
    #[test]
    fn a_folding_letter_hidden_by_a_switch_never_spells_another_routes_prefix() {
        let table = RouteTable::new(&[
            switched("/files/", true, false),
            switched("/files/private/", false, false),
            switched("/java/", false, true),
            switched("/java/admin/", false, false),
        ]);
        for raw in [
            "/files/pr%C4%B1vate%2Fy",
            "/files/PR%C4%B0VATE%2Fy",
            "/java/adm%C4%B1n;v=1/x",
            "/java/adm%C4%B1n;jsessionid=1",
            "/java/x/..;v=1/adm%C4%B1n/x",
        ] {
            let got = resolve(&table, raw);
            assert!(
                matches!(
                    got,
                    Err(BadPath::FoldsToAnotherRoute | BadPath::PathParameter)
                ),
                "{raw}: {got:?}"
            );
        }
        let ok = |to: &str, path: &str| Ok((to.to_string(), path.to_string()));
        assert_eq!(
            resolve(&table, "/java/s%C4%B1cak;v=1/x"),
            ok("/java/", "/java/s%C4%B1cak;v=1/x")
        );
        assert_eq!(
            resolve(&table, "/files/s%C4%B1cak%2Fy"),
            ok("/files/", "/files/s%C4%B1cak%2Fy")
        );
    }

    #[test]
    fn the_bff_prefix_is_decided_on_the_canonical_path() {
        let table = RouteTable::new(&[route("/", false), route("/api/", false)]);
        let ok = |to: &str, path: &str| Ok((to.to_string(), path.to_string()));
        assert_eq!(resolve(&table, "/x/../bff/user"), ok("bff", "/bff/user"));
        assert_eq!(resolve(&table, "/%62ff//user"), ok("bff", "/bff/user"));
        assert_eq!(resolve(&table, "/bff/../api/x"), ok("/api/", "/api/x"));
        assert_eq!(resolve(&table, "/bff"), ok("/", "/bff"));
        assert_eq!(resolve(&table, "/bffx/user"), ok("/", "/bffx/user"));
        assert_eq!(resolve(&table, "/bff%2Fuser"), Err(BadPath::EncodedSlash));
        assert_eq!(
            resolve(&table, "/bff/%2e%2e/x"),
            Err(BadPath::EncodedDotSegment)
        );
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        assert_eq!(upstream_path(&route("/api/", true), "/api/users"), "/users");
        assert_eq!(upstream_path(&route("/api/", true), "/api/"), "/");
        assert_eq!(
            upstream_path(&route("/api/", false), "/api/users"),
            "/api/users"
        );
    }
}
