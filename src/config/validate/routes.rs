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

pub(super) fn routes_config(
    routes: Vec<(String, raw::Route)>,
    base: &Path,
    features: &BTreeMap<String, FeatureConfig>,
    server: Option<&ServerConfig>,
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    let mut seen = std::collections::HashSet::new();
    // Prefixes without their trailing `/`: a route `/x/` also owns `/x`.
    let mut owned = std::collections::HashSet::new();
    let mut out = Vec::new();
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
        if let Some(server) = server {
            let bff = &server.bff_prefix;
            if prefix == *bff || prefix.starts_with(&format!("{bff}/")) {
                problems.add(
                    format!("{path}.path"),
                    format!(
                        "{prefix:?} is inside bff_prefix {bff:?}, which Vestibule serves itself"
                    ),
                );
            }
        }
        let target = match (upstream, static_dir) {
            (Some(u), None) => match url::Url::parse(&u) {
                Ok(url)
                    if (url.scheme() == "http" || url.scheme() == "https")
                        && url.host().is_some()
                        && url.query().is_none() =>
                {
                    Some(Target::Upstream(url))
                }
                _ => {
                    problems.add(
                        format!("{path}.upstream"),
                        format!(
                            "{u:?} is not an http(s) URL; write e.g. \"http://127.0.0.1:5001\""
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
        let token = one_of(
            token,
            &format!("{path}.token"),
            TokenMode::None,
            &[
                ("none", TokenMode::None),
                ("user", TokenMode::User),
                ("client", TokenMode::Client),
                ("user_or_client", TokenMode::UserOrClient),
            ],
            problems,
        );
        let default_auth = if token == TokenMode::User {
            AuthMode::Required
        } else {
            AuthMode::None
        };
        let auth = one_of(
            auth,
            &format!("{path}.auth"),
            default_auth,
            &[
                ("none", AuthMode::None),
                ("optional", AuthMode::Optional),
                ("required", AuthMode::Required),
            ],
            problems,
        );
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
            if url::Url::parse(r).is_err() {
                problems.add(
                    format!("{path}.resource"),
                    format!("{r:?} is not an absolute URI; write e.g. \"https://api.example.com\""),
                );
            }
            if token == TokenMode::None {
                problems.add(
                    format!("{path}.resource"),
                    "needs a token mode: set token = \"user\", \"client\" or \"user_or_client\"",
                );
            }
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
        let Some(target) = target else { continue };
        out.push(RouteConfig {
            path: prefix,
            target,
            strip_prefix: strip_prefix.unwrap_or(false),
            auth,
            token,
            csrf: csrf.unwrap_or(token != TokenMode::None),
            resource,
            scopes: scopes.unwrap_or_default(),
            exchange,
            require,
            feature,
            timeout,
            allow_encoded_slash: allow_encoded_slash.unwrap_or(false),
            allow_path_params: allow_path_params.unwrap_or(false),
            step_up,
        });
    }
    let _ = base;
    out
}

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
            None,
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
                    "routes[0].resource: needs a token mode: set token = \"user\", \"client\" or \"user_or_client\"",
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
}
