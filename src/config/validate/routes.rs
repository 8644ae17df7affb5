//! `[[routes]]`: what is proxied, checked against `[features]` and `bff_prefix`.

use super::*;

/// Why a route path (already local) is not in the canonical form requests are matched in, if it
/// is not: no empty, `.` or `..` segment, and only characters a canonical path shows as they are.
fn not_canonical(prefix: &str) -> Option<String> {
    let segments: Vec<&str> = prefix.trim_start_matches('/').split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        if *segment == "." || *segment == ".." {
            return Some("it has a \".\" or \"..\" segment".into());
        }
        if segment.is_empty() && i != last {
            return Some("it has an empty segment".into());
        }
    }
    prefix
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '%' | ';' | '?' | '#' | '\\'))
        .map(|c| format!("it has {c:?}"))
}

/// Why a route at `prefix` is refused below `bff`, if it is.
pub(super) fn inside_bff(prefix: &str, bff: &str) -> Option<String> {
    (prefix == bff || prefix.starts_with(&format!("{bff}/")))
        .then(|| format!("{prefix:?} is inside bff_prefix {bff:?}, which Vestibule serves itself"))
}

pub(super) fn routes_config(
    routes: Vec<(String, raw::Route)>,
    base: &Path,
    features: &BTreeMap<String, FeatureConfig>,
    (server, admin): (Option<&ServerConfig>, SocketAddr),
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    let mut seen = std::collections::HashSet::new();
    // Prefixes without their trailing `/`: a route `/x/` also owns `/x`.
    let mut owned = std::collections::HashSet::new();
    let mut out = Vec::new();
    // Each route's TOML path (`routes[0]`), for problems between routes.
    let mut keys = Vec::new();
    for (path, raw) in routes {
        let raw::Route {
            path: prefix,
            upstream,
            static_dir,
            spa_fallback,
            strip_prefix,
            auth,
            token,
            csrf,
            resource,
            scopes,
            exchange,
            require,
            feature,
            timeout,
            allow_encoded_slash,
            allow_path_params,
            identity_headers,
            assertion,
            assertion_header,
            assertion_claims,
            assertion_lifetime,
            token_binding,
            ca_file,
            tls_client_cert,
            tls_client_key,
            acr_values,
            max_age,
        } = raw;
        let Some(prefix) = prefix else {
            problems.add(
                format!("{path}.path"),
                "is required: the path prefix this route serves, e.g. \"/api/\"",
            );
            continue;
        };
        if !is_local_path(&prefix) {
            problems.add(
                format!("{path}.path"),
                format!("{prefix:?} must start with a single /"),
            );
        } else if let Some(why) = not_canonical(&prefix) {
            problems.add(
                format!("{path}.path"),
                format!(
                    "{prefix:?} is not a canonical path ({why}); requests are matched in canonical form, so write it as they arrive, e.g. \"/api/\""
                ),
            );
        }
        if !seen.insert(prefix.clone()) {
            problems.add(
                format!("{path}.path"),
                format!("{prefix:?} is used by an earlier route; each path may appear once"),
            );
        } else if !owned.insert(prefix.trim_end_matches('/').to_string()) {
            problems.add(
                format!("{path}.path"),
                format!("{prefix:?} serves the same paths as an earlier route (a route \"/x/\" also owns \"/x\"); keep one of them"),
            );
        }
        if let Some(why) = server.and_then(|server| inside_bff(&prefix, &server.bff_prefix)) {
            problems.add(format!("{path}.path"), why);
        }
        let target = match (upstream, static_dir) {
            (Some(u), None) => match url::Url::parse(&u)
                .ok()
                .filter(|url| url.query().is_none() && url.fragment().is_none())
                .filter(|url| url.username().is_empty() && url.password().is_none())
                .and_then(UpstreamBase::new)
            {
                Some(base) => Some(Target::Upstream(base)),
                None => {
                    // Credentials in the URL would not be sent (they were once taken silently).
                    problems.add(
                        format!("{path}.upstream"),
                        format!(
                            "{} is not an http(s) URL without credentials or query; write e.g. \"http://127.0.0.1:5001\"",
                            super::shown_url(&u)
                        ),
                    );
                    None
                }
            },
            (None, Some(dir)) => {
                let resolved = base.join(&dir);
                if !resolved.is_dir() {
                    problems.add(
                        format!("{path}.static_dir"),
                        format!("directory {dir:?} does not exist"),
                    );
                }
                Some(Target::Static {
                    dir: resolved,
                    spa_fallback: spa_fallback.clone(),
                })
            }
            (Some(_), Some(_)) => {
                problems.add(
                    path.clone(),
                    "sets both upstream and static_dir; a route has exactly one of them",
                );
                None
            }
            (None, None) => {
                problems.add(
                    path.clone(),
                    "needs upstream = \"http://…\" or static_dir = \"./public\"",
                );
                None
            }
        };
        if spa_fallback.is_some() && !matches!(target, Some(Target::Static { .. })) {
            problems.add(
                format!("{path}.spa_fallback"),
                "only applies to routes with static_dir",
            );
        }
        let token = one_of(token, &format!("{path}.token"), TokenMode::None, problems);
        let default_auth = if token == TokenMode::User {
            AuthMode::Required
        } else {
            AuthMode::None
        };
        let auth = one_of(auth, &format!("{path}.auth"), default_auth, problems);
        if token == TokenMode::User && auth != AuthMode::Required {
            problems.add(format!("{path}.auth"), "must be \"required\" when token = \"user\" (use token = \"user_or_client\" for optional sign-in)");
        }
        let is_static = matches!(target, Some(Target::Static { .. }));
        if is_static && token != TokenMode::None {
            problems.add(
                format!("{path}.token"),
                "a static_dir route sends no token; remove token or use an upstream",
            );
        }
        if let Some(r) = &resource {
            // The URL parser drops controls and spaces it meets at the ends (and tabs and
            // newlines anywhere) and percent-encodes others, so a value it accepts may still not
            // be the URI sent to the provider, and the raw text is the token's cache key.
            if !r.bytes().all(|b| b.is_ascii_graphic()) {
                problems.add(
                    format!("{path}.resource"),
                    format!("{r:?} holds a space, a control or a non-ASCII character, which a URI cannot; percent-encode it"),
                );
            } else if url::Url::parse(r).is_err() {
                problems.add(
                    format!("{path}.resource"),
                    format!("{r:?} is not an absolute URI; write e.g. \"https://api.example.com\""),
                );
            } else if r.contains('#') {
                // RFC 8707 §2; in a URI a `#` can only start the fragment.
                problems.add(
                    format!("{path}.resource"),
                    format!("{r:?} holds a fragment (`#`), which a resource indicator cannot (RFC 8707); leave it out"),
                );
            }
            if token == TokenMode::None && assertion != Some(true) {
                problems.add(
                    format!("{path}.resource"),
                    "needs a token mode: set token = \"user\", \"client\" or \"user_or_client\" (or assertion = true, whose audience it names)",
                );
            }
        }
        let token_binding = one_of(
            token_binding,
            &format!("{path}.token_binding"),
            TokenBinding::None,
            problems,
        );
        if token_binding != TokenBinding::None && token == TokenMode::None {
            problems.add(
                format!("{path}.token_binding"),
                "binds the access token sent upstream: set token = \"user\", \"client\" or \"user_or_client\"",
            );
        }
        let exchange = exchange.unwrap_or(false);
        if exchange && resource.is_none() {
            problems.add(
                format!("{path}.exchange"),
                "needs resource = \"…\": token exchange asks for a token for that audience",
            );
        }
        if let Some(name) = &feature
            && !features.contains_key(name)
        {
            let names: Vec<&str> = features.keys().map(String::as_str).collect();
            let hint = match nearest(name, &names) {
                Some(n) => format!("did you mean {n:?}?"),
                None => format!("add a [features.{name}] section"),
            };
            problems.add(
                format!("{path}.feature"),
                format!("{name:?} is not defined; {hint}"),
            );
        }
        let require: Vec<(String, Vec<String>)> = require.unwrap_or_default().into_iter().collect();
        if !require.is_empty() && auth == AuthMode::None {
            problems.add(
                format!("{path}.require"),
                "needs a signed-in user: set auth = \"required\"",
            );
        }
        let acr_values = acr_values.unwrap_or_default();
        for (i, acr) in acr_values.iter().enumerate() {
            if !crate::config::is_acr_value(acr) {
                problems.add(
                    format!("{path}.acr_values[{i}]"),
                    format!(
                        "{acr:?} is not an acr value: printable characters, no spaces or quotes"
                    ),
                );
            }
        }
        let max_age = max_age.map(|text| {
            let age = duration(
                Some(text.clone()),
                &format!("{path}.max_age"),
                Duration::from_secs(1),
                problems,
            );
            if age < Duration::from_secs(1) {
                // Every request would fall short again by the time it arrives: a login loop.
                problems.add(
                    format!("{path}.max_age"),
                    format!(
                        "{text:?} is shorter than 1s: no sign-in is that recent by the time a request arrives; write e.g. \"10m\""
                    ),
                );
            }
            age.as_secs()
        });
        let step_up = (!acr_values.is_empty() || max_age.is_some()).then_some(StepUp {
            acr_values,
            max_age,
        });
        if step_up.is_some() && auth != AuthMode::Required {
            problems.add(
                format!("{path}.acr_values"),
                "acr_values and max_age need a signed-in user: set auth = \"required\"",
            );
        }
        let timeout = timeout.map(|t| {
            duration(
                Some(t),
                &format!("{path}.timeout"),
                Duration::from_secs(30),
                problems,
            )
        });
        let identity_headers = identity_headers_config(&path, identity_headers, problems);
        let assertion = assertion_config(
            &path,
            AssertionRaw {
                on: assertion,
                header: assertion_header,
                claims: assertion_claims,
                lifetime: assertion_lifetime,
            },
            token,
            &identity_headers,
            problems,
        );
        if is_static && (!identity_headers.is_empty() || assertion.is_some()) {
            problems.add(
                path.clone(),
                "a static_dir route forwards nothing; identity_headers and assertion need an upstream",
            );
        }
        let https = matches!(&target, Some(Target::Upstream(u)) if u.url.scheme() == "https");
        for (key, set) in [
            ("ca_file", ca_file.is_some()),
            ("tls_client_cert", tls_client_cert.is_some()),
        ] {
            if set && !https && target.is_some() {
                problems.add(
                    format!("{path}.{key}"),
                    "only applies to an https:// upstream",
                );
            }
        }
        let ca_file = super::tls::ca_bundle(ca_file, &format!("{path}.ca_file"), base, problems);
        let tls_client = super::tls::client_identity(
            tls_client_cert,
            tls_client_key,
            &path,
            ("tls_client_cert", "tls_client_key"),
            base,
            problems,
        );
        let scopes = scopes.unwrap_or_default();
        scope_tokens(&scopes, &format!("{path}.scopes"), problems);
        let Some(target) = target else { continue };
        // Identity headers and an assertion speak for the user as the user's token does: a
        // same-site page sending the session cookie must not make them speak.
        let acts_as_user =
            token != TokenMode::None || !identity_headers.is_empty() || assertion.is_some();
        let token_key = super::super::token_key_of(resource.as_deref(), &scopes, exchange);
        keys.push(path);
        out.push(RouteConfig {
            path: prefix,
            target,
            strip_prefix: strip_prefix.unwrap_or(false),
            auth,
            token,
            csrf: csrf.unwrap_or(acts_as_user),
            resource,
            scopes,
            exchange,
            require,
            feature,
            timeout,
            allow_encoded_slash: allow_encoded_slash.unwrap_or(false),
            allow_path_params: allow_path_params.unwrap_or(false),
            identity_headers,
            assertion,
            token_binding,
            ca_file,
            tls_client,
            step_up,
            token_key,
        });
    }
    for (key, route) in keys.iter().zip(&out) {
        problems
            .0
            .extend(super::admin_reach::problem(key, route, admin));
        if let Some(server) = server {
            problems
                .0
                .extend(super::admin_reach::loop_problem(key, route, server.listen));
        }
    }
    super::overlap::overlapping_upstreams(&out, &keys, problems);
    out
}

/// Headers Vestibule owns or that would change how the request is framed or routed; identity
/// headers may not be any of them.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "forwarded",
    "x-real-ip",
    "x-request-id",
    "x-csrf",
];

/// Why `name` cannot be a header Vestibule sets for a route, if it cannot.
fn unusable_header(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Some("is not a valid header name");
    }
    if RESERVED_HEADERS.contains(&lower.as_str())
        || lower.starts_with("x-forwarded-")
        || lower.starts_with("proxy-")
        || lower.starts_with("content-")
    {
        return Some(
            "is a header Vestibule or HTTP itself sets; pick another name, e.g. \"X-User\"",
        );
    }
    None
}

fn identity_headers_config(
    path: &str,
    raw: Option<BTreeMap<String, String>>,
    problems: &mut Problems,
) -> Vec<(http::HeaderName, String)> {
    let mut out: Vec<(http::HeaderName, String)> = Vec::new();
    for (name, claim) in raw.unwrap_or_default() {
        let key = format!("{path}.identity_headers.{name}");
        if let Some(why) = unusable_header(&name) {
            problems.add(key, format!("{name:?} {why}"));
            continue;
        }
        if claim.is_empty() || claim.split('.').any(str::is_empty) {
            problems.add(
                key,
                format!("{claim:?} is not a claim path; write e.g. \"sub\", \"email\" or \"realm_access.roles\""),
            );
            continue;
        }
        let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if out.iter().any(|(h, _)| *h == header) {
            problems.add(
                key,
                "names the same header as another entry (header names ignore case); keep one",
            );
            continue;
        }
        out.push((header, claim));
    }
    out
}

/// The raw `assertion*` keys of a route.
struct AssertionRaw {
    on: Option<bool>,
    header: Option<String>,
    claims: Option<Vec<String>>,
    lifetime: Option<String>,
}

/// Claims every assertion carries, set by Vestibule itself.
const ASSERTION_OWN_CLAIMS: &[&str] = &["iss", "aud", "sub", "iat", "nbf", "exp", "jti"];
/// The longest assertion lifetime: an assertion is for one request, not a session.
const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

fn assertion_config(
    path: &str,
    raw: AssertionRaw,
    token: TokenMode,
    identity_headers: &[(http::HeaderName, String)],
    problems: &mut Problems,
) -> Option<AssertionConfig> {
    if raw.on != Some(true) {
        for (set, key) in [
            (raw.header.is_some(), "assertion_header"),
            (raw.claims.is_some(), "assertion_claims"),
            (raw.lifetime.is_some(), "assertion_lifetime"),
        ] {
            if set {
                problems.add(
                    format!("{path}.{key}"),
                    "only applies with assertion = true",
                );
            }
        }
        return None;
    }
    let header = match raw.header {
        None => http::header::AUTHORIZATION,
        Some(name) if name.eq_ignore_ascii_case("authorization") => http::header::AUTHORIZATION,
        Some(name) => {
            if let Some(why) = unusable_header(&name) {
                problems.add(
                    format!("{path}.assertion_header"),
                    format!("{name:?} {why}"),
                );
            }
            http::HeaderName::from_bytes(name.as_bytes()).unwrap_or(http::header::AUTHORIZATION)
        }
    };
    if header == http::header::AUTHORIZATION && token != TokenMode::None {
        problems.add(
            format!("{path}.assertion"),
            "the route already sends an access token in Authorization; set assertion_header = \"X-Assertion\" (or token = \"none\")",
        );
    }
    if identity_headers.iter().any(|(h, _)| *h == header) {
        problems.add(
            format!("{path}.assertion_header"),
            "is also one of identity_headers; use another name",
        );
    }
    let claims = raw.claims.unwrap_or_default();
    for claim in &claims {
        if ASSERTION_OWN_CLAIMS.contains(&claim.as_str()) {
            problems.add(
                format!("{path}.assertion_claims"),
                format!(
                    "{claim:?} is set by Vestibule itself; list only user claims such as \"email\""
                ),
            );
        } else if claim.is_empty() || claim.split('.').any(str::is_empty) {
            problems.add(
                format!("{path}.assertion_claims"),
                format!(
                    "{claim:?} is not a claim path; write e.g. \"email\" or \"realm_access.roles\""
                ),
            );
        }
    }
    let lifetime = duration(
        raw.lifetime,
        &format!("{path}.assertion_lifetime"),
        DEFAULT_ASSERTION_LIFETIME,
        problems,
    );
    if lifetime.is_zero() || lifetime > MAX_ASSERTION_LIFETIME {
        problems.add(
            format!("{path}.assertion_lifetime"),
            "must be between 1s and 1h; an assertion is for one request, e.g. \"60s\"",
        );
    }
    Some(AssertionConfig {
        header,
        claims,
        lifetime,
    })
}

/// How long an assertion is valid unless the route says otherwise.
pub const DEFAULT_ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(route: raw::Route) -> Vec<String> {
        let mut problems = Problems::default();
        let features = BTreeMap::from([("dash".to_string(), FeatureConfig::default())]);
        let _ = routes_config(
            vec![("routes[0]".into(), route)],
            Path::new("."),
            &features,
            (
                None,
                "127.0.0.1:9091"
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9091))),
            ),
            &mut problems,
        );
        printed(problems)
    }

    fn upstream(path: &str) -> raw::Route {
        raw::Route {
            path: Some(path.into()),
            upstream: Some("http://a:1".into()),
            ..Default::default()
        }
    }

    /// RFC 6749 §3.3: a scope is visible ASCII without `"` or `\\`, and one entry is one scope
    /// (a space would make it two at the provider); a resource is a URI, which holds no space
    /// or control character. `"\u{1f}"` is also the separator of `token_key_of`: a resource
    /// holding it could share another route's cached token.
    #[test]
    fn scopes_and_resources_that_cannot_travel_are_refused_with_their_route_and_value() {
        let route = raw::Route {
            token: Some("client".into()),
            resource: Some("https://api.example.com/\u{1f}refresh\u{1f}read".into()),
            scopes: Some(vec![
                "read".into(),
                "read write".into(),
                "".into(),
                "a\u{1f}b".into(),
                "say\"hi".into(),
                "back\\slash".into(),
                "caf\u{e9}".into(),
            ]),
            ..upstream("/api/")
        };
        assert_eq!(
            check(route),
            [
                r#"routes[0].resource: "https://api.example.com/\u{1f}refresh\u{1f}read" holds a space, a control or a non-ASCII character, which a URI cannot; percent-encode it"#,
                r#"routes[0].scopes[1]: "read write" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"routes[0].scopes[2]: "" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"routes[0].scopes[3]: "a\u{1f}b" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"routes[0].scopes[4]: "say\"hi" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"routes[0].scopes[5]: "back\\slash" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"routes[0].scopes[6]: "café" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
            ]
        );
        let fine = raw::Route {
            token: Some("client".into()),
            resource: Some("https://api.example.com/v1?tenant=a%20b".into()),
            scopes: Some(vec![
                "read".into(),
                "urn:x:write!#$%&'()*+,-./:;<=>?@[]^_`{|}~".into(),
            ]),
            ..upstream("/api/")
        };
        assert_eq!(check(fine), Vec::<String>::new());
    }

    /// RFC 8707 §2: a resource indicator is an absolute URI without a fragment. A provider
    /// refuses one with a fragment (`invalid_target`) at every token request of the route.
    #[test]
    fn a_resource_with_a_fragment_is_refused_with_its_route() {
        for resource in ["https://api.example.com/#v1", "https://api.example.com/v1#"] {
            let route = raw::Route {
                token: Some("client".into()),
                resource: Some(resource.into()),
                ..upstream("/api/")
            };
            assert_eq!(
                check(route),
                vec![format!(
                    "routes[0].resource: {resource:?} holds a fragment (`#`), which a resource indicator cannot (RFC 8707); leave it out"
                )]
            );
        }
    }

    #[test]
    fn golden_route_messages() {
        let cases = [
            (
                raw::Route {
                    acr_values: Some(vec!["mfa".into(), "two words".into(), "".into()]),
                    max_age: Some("soon".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].acr_values[1]: \"two words\" is not an acr value: printable characters, no spaces or quotes",
                    "routes[0].acr_values[2]: \"\" is not an acr value: printable characters, no spaces or quotes",
                    "routes[0].max_age: \"soon\" is not a duration; write e.g. \"500ms\", \"30s\", \"10m\" or \"12h\"",
                    "routes[0].acr_values: acr_values and max_age need a signed-in user: set auth = \"required\"",
                ],
            ),
            (
                raw::Route {
                    auth: Some("required".into()),
                    max_age: Some("500ms".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].max_age: \"500ms\" is shorter than 1s: no sign-in is that recent by the time a request arrives; write e.g. \"10m\"",
                ],
            ),
            (
                raw::Route {
                    spa_fallback: Some("index.html".into()),
                    resource: Some("https://api.example.com".into()),
                    exchange: Some(true),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].spa_fallback: only applies to routes with static_dir",
                    "routes[0].resource: needs a token mode: set token = \"user\", \"client\" or \"user_or_client\" (or assertion = true, whose audience it names)",
                ],
            ),
            (
                raw::Route {
                    exchange: Some(true),
                    token: Some("client".into()),
                    require: Some([("roles".to_string(), vec!["a".to_string()])].into()),
                    feature: Some("dsh".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].exchange: needs resource = \"…\": token exchange asks for a token for that audience",
                    "routes[0].feature: \"dsh\" is not defined; did you mean \"dash\"?",
                    "routes[0].require: needs a signed-in user: set auth = \"required\"",
                ],
            ),
            (
                raw::Route {
                    static_dir: Some("./no-such-dir".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0]: sets both upstream and static_dir; a route has exactly one of them",
                ],
            ),
            (
                raw::Route {
                    path: None,
                    ..upstream("/")
                },
                vec![
                    "routes[0].path: is required: the path prefix this route serves, e.g. \"/api/\"",
                ],
            ),
        ];
        for (route, expected) in cases {
            assert_eq!(check(route), expected);
        }
    }

    #[test]
    fn golden_identity_messages() {
        let headers = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(h, c)| (h.to_string(), c.to_string()))
                    .collect(),
            )
        };
        let cases = [
            (
                raw::Route {
                    identity_headers: headers(&[
                        ("X-User", "sub"),
                        ("x-user", "email"),
                        ("Authorization", "sub"),
                        ("X-Forwarded-User", "sub"),
                        ("X Bad", "sub"),
                        ("X-Groups", "groups."),
                    ]),
                    assertion_header: Some("X-Assertion".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].identity_headers.Authorization: \"Authorization\" is a header Vestibule or HTTP itself sets; pick another name, e.g. \"X-User\"",
                    "routes[0].identity_headers.X Bad: \"X Bad\" is not a valid header name",
                    "routes[0].identity_headers.X-Forwarded-User: \"X-Forwarded-User\" is a header Vestibule or HTTP itself sets; pick another name, e.g. \"X-User\"",
                    "routes[0].identity_headers.X-Groups: \"groups.\" is not a claim path; write e.g. \"sub\", \"email\" or \"realm_access.roles\"",
                    "routes[0].identity_headers.x-user: names the same header as another entry (header names ignore case); keep one",
                    "routes[0].assertion_header: only applies with assertion = true",
                ],
            ),
            (
                raw::Route {
                    token: Some("user".into()),
                    assertion: Some(true),
                    assertion_claims: Some(vec!["email".into(), "aud".into()]),
                    assertion_lifetime: Some("2h".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].assertion: the route already sends an access token in Authorization; set assertion_header = \"X-Assertion\" (or token = \"none\")",
                    "routes[0].assertion_claims: \"aud\" is set by Vestibule itself; list only user claims such as \"email\"",
                    "routes[0].assertion_lifetime: must be between 1s and 1h; an assertion is for one request, e.g. \"60s\"",
                ],
            ),
            (
                raw::Route {
                    identity_headers: headers(&[("X-Assertion", "sub")]),
                    assertion: Some(true),
                    assertion_header: Some("x-assertion".into()),
                    resource: Some("https://api.example.com".into()),
                    ..upstream("/api/")
                },
                vec![
                    "routes[0].assertion_header: is also one of identity_headers; use another name",
                ],
            ),
        ];
        for (route, expected) in cases {
            assert_eq!(check(route), expected);
        }
    }
}
