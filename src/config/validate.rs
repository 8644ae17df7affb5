//! Turns the raw file into typed settings, collecting every problem instead of stopping at the
//! first. Each message names the TOML path, the bad value (never a secret's) and the fix.

use super::interpolate::{InterpolationError, interpolate};
use super::keys::{Schema, join};
use super::raw;
use super::units::{parse_duration, parse_size};
use super::*;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use toml::{Table, Value};

/// Paths whose values are secret: their values never appear in a message.
/// `oidc.provider_timeout` when unset: long enough for a slow provider to answer a grant it has
/// already carried out, so a rotated refresh token is not lost to an early give-up.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(25);
const SECRET_PATHS: &[&str] = &["oidc.client_secret", "session.keys", "session.redis"];

#[derive(Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

pub(super) fn parse(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut problems = Problems::default();
    let mut table: Table = match text.parse() {
        Ok(table) => table,
        Err(e) => {
            let e: toml::de::Error = e;
            let at = e.span().map(|span| line_col(text, span.start));
            let message = match at {
                Some((line, col)) => format!("line {line}, column {col}: {}", e.message().trim()),
                None => e.message().trim().to_string(),
            };
            return Err(ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("not valid TOML: {message}"),
            }]));
        }
    };
    interpolate_all(&mut table, "", env, &mut problems);
    check_keys(&mut table, &mut problems);
    let config = build(table, base, &mut problems);
    match config {
        Some(config) if problems.0.is_empty() => Ok(config),
        _ => Err(ConfigErrors(problems.0)),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn interpolate_all(
    table: &mut Table,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    for (key, value) in table.iter_mut() {
        interpolate_value(value, &join(path, key), env, problems);
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    match value {
        Value::String(s) => match interpolate(s, env) {
            Ok(expanded) => *s = expanded,
            Err(InterpolationError::Missing(name)) => problems.add(
                path,
                format!("environment variable {name} is not set; export it, or write ${{{name}:-default}}"),
            ),
            Err(InterpolationError::BadName(name)) => problems.add(
                path,
                format!("${{{name}}} is not a valid variable name; use letters, digits and _"),
            ),
            Err(InterpolationError::Unclosed) => {
                problems.add(path, "a ${ has no closing }; write ${NAME}, or $$ for a literal $")
            }
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Table(t) => interpolate_all(t, path, env, problems),
        _ => {}
    }
}

/// Reports and removes unknown keys, so the typed pass can still find the other problems. The
/// accepted keys of each table come from the raw structs ([`Schema`]).
fn check_keys(root: &mut Table, problems: &mut Problems) {
    prune(root, "", "", &Schema::of_file(), problems);
}

/// Checks `table` (shown as `path`, described by `schema_path`) and every table under it.
fn prune(
    table: &mut Table,
    path: &str,
    schema_path: &str,
    schema: &Schema,
    problems: &mut Problems,
) {
    let keys = schema.keys(schema_path).unwrap_or_default();
    let unknown: Vec<String> = table
        .keys()
        .filter(|k| !keys.contains(&k.as_str()))
        .cloned()
        .collect();
    for key in unknown {
        table.remove(&key);
        let hint = match nearest(&key, keys) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!("valid keys here: {}", keys.join(", ")),
        };
        problems.add(join(path, &key), format!("unknown key; {hint}"));
    }
    for (key, value) in table.iter_mut() {
        let (at, inner) = (join(path, key), join(schema_path, key));
        match value {
            Value::Table(t) if schema.keys(&inner).is_some() => {
                prune(t, &at, &inner, schema, problems);
            }
            Value::Table(t) if schema.keys(&format!("{inner}.*")).is_some() => {
                let each = format!("{inner}.*");
                for (name, item) in t.iter_mut() {
                    if let Value::Table(t) = item {
                        prune(t, &join(&at, name), &each, schema, problems);
                    }
                }
            }
            Value::Array(items) if schema.keys(&format!("{inner}[]")).is_some() => {
                let each = format!("{inner}[]");
                for (i, item) in items.iter_mut().enumerate() {
                    if let Value::Table(t) = item {
                        prune(t, &format!("{at}[{i}]"), &each, schema, problems);
                    }
                }
            }
            _ => {}
        }
    }
}

fn nearest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            let affix =
                c.len() >= 4 && (key.starts_with(c) || c.starts_with(key) && key.len() >= 4);
            (if affix { 1 } else { distance(key, c) }, *c)
        })
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Deserializes one table; a type error is reported against `path` with serde's words.
fn section<T: DeserializeOwned + Default>(
    value: Option<Value>,
    path: &str,
    problems: &mut Problems,
) -> T {
    let Some(value) = value else {
        return T::default();
    };
    match value.try_into::<T>() {
        Ok(v) => v,
        Err(e) => {
            let secret = SECRET_PATHS
                .iter()
                .any(|s| path.starts_with(s) || s.starts_with(path));
            let message = if secret {
                "has a value of the wrong type (value not shown: section holds secrets); check the types against docs/configuration.md".to_string()
            } else {
                format!(
                    "{}; check the types against docs/configuration.md",
                    e.message().trim()
                )
            };
            problems.add(path, message);
            T::default()
        }
    }
}

fn build(mut root: Table, base: &Path, problems: &mut Problems) -> Option<Config> {
    let server: raw::Server = section(root.remove("server"), "server", problems);
    let admin: raw::Admin = section(root.remove("admin"), "admin", problems);
    let log: raw::Log = section(root.remove("log"), "log", problems);
    let oidc: raw::Oidc = section(root.remove("oidc"), "oidc", problems);
    let session: raw::Session = section(root.remove("session"), "session", problems);
    let limits: raw::Limits = section(root.remove("limits"), "limits", problems);
    let routes: Vec<(String, raw::Route)> = match root.remove("routes") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let path = format!("routes[{i}]");
                let route = section(Some(item), &path, problems);
                (path, route)
            })
            .collect(),
        Some(_) => {
            problems.add(
                "routes",
                "must be an array of tables; write [[routes]] blocks",
            );
            Vec::new()
        }
    };
    let features: Vec<(String, raw::Feature)> = match root.remove("features") {
        None => Vec::new(),
        Some(Value::Table(t)) => t
            .into_iter()
            .map(|(name, item)| {
                let feature = section(Some(item), &format!("features.{name}"), problems);
                (name, feature)
            })
            .collect(),
        Some(_) => {
            problems.add(
                "features",
                "must be a table of features; write [features.NAME] blocks",
            );
            Vec::new()
        }
    };

    let server = server_config(server, base, problems);
    let raw::Admin {
        listen: admin_listen,
        max_connections: admin_max_connections,
    } = admin;
    let admin = AdminConfig {
        listen: socket(admin_listen, "admin.listen", "127.0.0.1:9091", problems),
        max_connections: super::limits::admin_max_connections(admin_max_connections, problems),
    };
    let limits = super::limits::limits_config(limits, problems);
    let log = log_config(log, problems);
    let oidc = oidc_config(oidc, problems);
    let session = session_config(session, problems);
    let features: BTreeMap<String, FeatureConfig> = features
        .into_iter()
        .map(|(name, f)| {
            (
                name,
                FeatureConfig {
                    public: f.public.unwrap_or(false),
                    beta: f.beta.unwrap_or(false),
                    role: f.role,
                },
            )
        })
        .collect();
    let routes = routes_config(routes, base, &features, server.as_ref(), problems);

    if let (Some(server), Some(oidc)) = (&server, &oidc) {
        if server.listen == admin.listen && admin.listen.port() != 0 {
            problems.add(
                "admin.listen",
                "is the same address as server.listen; the admin endpoints need their own listener",
            );
        }
        let _ = oidc;
    }
    Some(Config {
        server: server?,
        admin,
        log,
        oidc: oidc?,
        session: session?,
        limits,
        routes,
        features,
    })
}

fn socket(value: Option<String>, path: &str, default: &str, problems: &mut Problems) -> SocketAddr {
    let text = value.unwrap_or_else(|| default.to_string());
    match text.parse() {
        Ok(addr) => addr,
        Err(_) => {
            problems.add(
                path,
                format!("{text:?} is not an address; write host:port such as \"0.0.0.0:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    }
}

pub(super) fn duration(
    value: Option<String>,
    path: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    match value {
        None => default,
        Some(text) => parse_duration(&text).unwrap_or_else(|e| {
            problems.add(path, e);
            default
        }),
    }
}

pub(super) fn size(
    value: Option<String>,
    path: &str,
    default: u64,
    problems: &mut Problems,
) -> u64 {
    match value {
        None => default,
        Some(text) => parse_size(&text).unwrap_or_else(|e| {
            problems.add(path, e);
            default
        }),
    }
}

fn one_of<T: Copy>(
    value: Option<String>,
    path: &str,
    default: T,
    choices: &[(&str, T)],
    problems: &mut Problems,
) -> T {
    let Some(text) = value else { return default };
    match choices.iter().find(|(name, _)| *name == text) {
        Some((_, v)) => *v,
        None => {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            problems.add(
                path,
                format!("{text:?} is not allowed; use one of {}", names.join(", ")),
            );
            default
        }
    }
}

/// A local path: one leading `/`, not `//`, no backslash.
pub(crate) fn is_local_path(path: &str) -> bool {
    path.starts_with('/') && !path.starts_with("//") && !path.contains('\\')
}

fn server_config(raw: raw::Server, base: &Path, problems: &mut Problems) -> Option<ServerConfig> {
    let raw::Server {
        listen,
        public_url,
        bff_prefix,
        trusted_proxies,
        request_timeout,
        max_body,
        tls,
        cors_origins,
        shutdown_grace,
        header_read_timeout,
        max_header_size,
        workers,
        max_connections,
        connection_idle_timeout,
        body_read_timeout,
        body_min_rate,
        http2_max_concurrent_streams,
        http2_keep_alive_interval,
        http2_keep_alive_timeout,
    } = raw;
    let connections = super::limits::connections(
        super::limits::ConnectionKeys {
            max_connections,
            connection_idle_timeout,
            body_read_timeout,
            body_min_rate,
            http2_max_concurrent_streams,
            http2_keep_alive_interval,
            http2_keep_alive_timeout,
        },
        problems,
    );
    let listen = socket(listen, "server.listen", "0.0.0.0:8080", problems);
    let public_url = match public_url {
        None => {
            problems.add(
                "server.public_url",
                "is required: the origin browsers use, e.g. \"https://app.example.com\"",
            );
            None
        }
        Some(text) => match url::Url::parse(&text) {
            Ok(u)
                if (u.scheme() == "https" || u.scheme() == "http")
                    && u.host().is_some()
                    && (u.path() == "/" || u.path().is_empty())
                    && u.query().is_none() =>
            {
                Some(u)
            }
            Ok(_) => {
                problems.add("server.public_url", format!("{text:?} must be an http(s) origin without path or query, e.g. \"https://app.example.com\""));
                None
            }
            Err(_) => {
                problems.add(
                    "server.public_url",
                    format!("{text:?} is not a URL; write e.g. \"https://app.example.com\""),
                );
                None
            }
        },
    };
    let bff_prefix = bff_prefix.unwrap_or_else(|| "/bff".into());
    if !is_local_path(&bff_prefix) || bff_prefix.ends_with('/') || bff_prefix.len() < 2 {
        problems.add(
            "server.bff_prefix",
            format!("{bff_prefix:?} must start with / and not end with /, e.g. \"/bff\""),
        );
    }
    let trusted_proxies = trusted_proxies
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            parsed
                .map_err(|_| {
                    problems.add(
                        format!("server.trusted_proxies[{i}]"),
                        format!(
                            "{text:?} is not a CIDR; write e.g. \"10.0.0.0/8\" or \"192.0.2.1\""
                        ),
                    )
                })
                .ok()
        })
        .collect();
    let tls = tls.and_then(|tls| {
        let resolve = |v: Option<String>, key: &str, problems: &mut Problems| match v {
            None => {
                problems.add(
                    format!("server.tls.{key}"),
                    "is required when [server] tls is set: a PEM file path",
                );
                None
            }
            Some(p) => {
                let path = base.join(&p);
                if !path.is_file() {
                    problems.add(
                        format!("server.tls.{key}"),
                        format!("file {p:?} does not exist"),
                    );
                }
                Some(path)
            }
        };
        let cert = resolve(tls.cert, "cert", problems);
        let key = resolve(tls.key, "key", problems);
        Some(TlsConfig {
            cert: cert?,
            key: key?,
        })
    });
    let cors_origins = cors_origins
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, text)| match url::Url::parse(&text) {
            Ok(u) if u.host().is_some() && (u.path() == "/" || u.path().is_empty()) => {
                Some(u.origin().ascii_serialization())
            }
            _ => {
                problems.add(
                    format!("server.cors_origins[{i}]"),
                    format!("{text:?} is not an origin; write e.g. \"https://admin.example.com\""),
                );
                None
            }
        })
        .collect();
    let max_header_size = size(
        max_header_size,
        "server.max_header_size",
        64 << 10,
        problems,
    );
    if max_header_size < 1024 {
        problems.add("server.max_header_size", "must be at least 1KiB");
    }
    let workers = match workers {
        None => None,
        Some(n @ 1..=1024) => usize::try_from(n).ok(),
        Some(n) => {
            problems.add(
                "server.workers",
                format!("{n} is out of range; use 1 to 1024, or leave it out for one per CPU"),
            );
            None
        }
    };
    let server = ServerConfig {
        listen,
        workers,
        public_origin: public_url
            .as_ref()
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default(),
        public_url: public_url?,
        bff_prefix,
        trusted_proxies,
        request_timeout: duration(
            request_timeout,
            "server.request_timeout",
            Duration::from_secs(30),
            problems,
        ),
        max_body: size(max_body, "server.max_body", 10 << 20, problems),
        tls,
        cors_origins,
        shutdown_grace: duration(
            shutdown_grace,
            "server.shutdown_grace",
            Duration::from_secs(30),
            problems,
        ),
        header_read_timeout: duration(
            header_read_timeout,
            "server.header_read_timeout",
            Duration::from_secs(10),
            problems,
        ),
        max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
        connections,
    };
    Some(server)
}

fn log_config(raw: raw::Log, problems: &mut Problems) -> LogConfig {
    let raw::Log { level, format } = raw;
    let level = level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        problems.add("log.level", format!("{level:?} is not a log filter; use \"error\", \"warn\", \"info\", \"debug\" or e.g. \"info,vestibule=debug\""));
    }
    let format = one_of(
        format,
        "log.format",
        LogFormat::Pretty,
        &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
        problems,
    );
    LogConfig { level, format }
}

fn oidc_config(raw: raw::Oidc, problems: &mut Problems) -> Option<OidcConfig> {
    let raw::Oidc {
        issuer,
        client_id,
        client_secret,
        client_auth,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew,
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh,
        clock_skew,
        provider_timeout,
    } = raw;
    let provider_timeout = duration(
        provider_timeout,
        "oidc.provider_timeout",
        DEFAULT_PROVIDER_TIMEOUT,
        problems,
    );
    if provider_timeout.is_zero() {
        problems.add(
            "oidc.provider_timeout",
            "must be longer than 0s; write e.g. \"25s\"",
        );
    }
    let allow_http_issuer = allow_http_issuer.unwrap_or(false);
    let issuer = match issuer {
        None => {
            problems.add("oidc.issuer", "is required: the provider's issuer URL, e.g. \"https://idp.example.com/realms/app\"");
            None
        }
        Some(text) => match url::Url::parse(&text) {
            Ok(u) if u.scheme() == "https" => Some(u),
            Ok(u) if u.scheme() == "http" => {
                let loopback = match u.host() {
                    Some(url::Host::Domain(d)) => d == "localhost",
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if !allow_http_issuer {
                    problems.add("oidc.issuer", format!("{text:?} uses plain http; use https, or set allow_http_issuer = true for a loopback issuer in development"));
                } else if !loopback {
                    problems.add("oidc.issuer", format!("{text:?} uses plain http on a non-loopback host; allow_http_issuer only permits 127.0.0.1, ::1 or localhost"));
                }
                Some(u)
            }
            _ => {
                problems.add(
                    "oidc.issuer",
                    format!("{text:?} is not an https URL; write e.g. \"https://idp.example.com\""),
                );
                None
            }
        },
    };
    let client_id = client_id.filter(|c| !c.is_empty());
    if client_id.is_none() {
        problems.add(
            "oidc.client_id",
            "is required: the client id registered at the provider",
        );
    }
    let client_auth = match client_auth.as_deref() {
        Some("private_key_jwt") => {
            problems.add("oidc.client_auth", "\"private_key_jwt\" is not supported yet; use \"client_secret_basic\" or \"client_secret_post\"");
            ClientAuth::ClientSecretBasic
        }
        _ => one_of(
            client_auth,
            "oidc.client_auth",
            ClientAuth::ClientSecretBasic,
            &[
                ("client_secret_basic", ClientAuth::ClientSecretBasic),
                ("client_secret_post", ClientAuth::ClientSecretPost),
            ],
            problems,
        ),
    };
    let client_secret = client_secret.filter(|s| !s.is_empty()).map(Secret::new);
    if client_secret.is_none() {
        problems.add(
            "oidc.client_secret",
            format!(
                "is required for {}; write client_secret = \"${{VESTIBULE_CLIENT_SECRET}}\"",
                match client_auth {
                    ClientAuth::ClientSecretBasic => "client_secret_basic",
                    ClientAuth::ClientSecretPost => "client_secret_post",
                }
            ),
        );
    }
    let scopes = scopes.unwrap_or_else(|| {
        ["openid", "profile", "email", "offline_access"]
            .map(String::from)
            .to_vec()
    });
    if !scopes.iter().any(|s| s == "openid") {
        problems.add("oidc.scopes", "must include \"openid\"");
    }
    let post_logout_redirect = post_logout_redirect.unwrap_or_else(|| "/".into());
    if !is_local_path(&post_logout_redirect) {
        problems.add(
            "oidc.post_logout_redirect",
            format!("{post_logout_redirect:?} must be a local path such as \"/\""),
        );
    }
    let reserved = [
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    ];
    let extra_auth_params: Vec<(String, String)> =
        extra_auth_params.unwrap_or_default().into_iter().collect();
    for (key, _) in &extra_auth_params {
        if reserved.contains(&key.as_str()) {
            problems.add(
                format!("oidc.extra_auth_params.{key}"),
                "is set by Vestibule itself and cannot be overridden",
            );
        }
    }
    let roles_claim = roles_claim.unwrap_or_else(|| "roles".into());
    if roles_claim.is_empty() || roles_claim.split('.').any(str::is_empty) {
        problems.add("oidc.roles_claim", format!("{roles_claim:?} is not a claim path; write e.g. \"roles\" or \"realm_access.roles\""));
    }
    Some(OidcConfig {
        issuer: issuer?,
        client_id: client_id?,
        client_secret,
        client_auth,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew: duration(
            refresh_skew,
            "oidc.refresh_skew",
            Duration::from_secs(60),
            problems,
        ),
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh: duration(
            metadata_refresh,
            "oidc.metadata_refresh",
            Duration::from_secs(3600),
            problems,
        ),
        clock_skew: duration(
            clock_skew,
            "oidc.clock_skew",
            Duration::from_secs(60),
            problems,
        ),
        provider_timeout,
    })
}

fn session_config(raw: raw::Session, problems: &mut Problems) -> Option<SessionConfig> {
    use base64::Engine;
    let raw::Session {
        store,
        cookie_name,
        cookie_secure,
        same_site,
        idle_timeout,
        absolute_timeout,
        keys,
        max_entries,
        cache_ttl,
        redis,
    } = raw;
    let cookie_secure = cookie_secure.unwrap_or(true);
    let mut cookie_name = cookie_name.unwrap_or_else(|| "__Host-vestibule".into());
    if !cookie_secure && let Some(rest) = cookie_name.strip_prefix("__Host-") {
        cookie_name = rest.to_string();
    }
    if cookie_name.is_empty()
        || !cookie_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.add(
            "session.cookie_name",
            format!("{cookie_name:?} is not a cookie name; use letters, digits, - _ ."),
        );
    }
    let same_site = one_of(
        same_site,
        "session.same_site",
        SameSite::Lax,
        &[("lax", SameSite::Lax), ("strict", SameSite::Strict)],
        problems,
    );
    let idle_timeout = duration(
        idle_timeout,
        "session.idle_timeout",
        Duration::from_secs(30 * 60),
        problems,
    );
    let absolute_timeout = duration(
        absolute_timeout,
        "session.absolute_timeout",
        Duration::from_secs(12 * 3600),
        problems,
    );
    if idle_timeout > absolute_timeout {
        problems.add(
            "session.idle_timeout",
            "is longer than session.absolute_timeout; make it shorter",
        );
    }
    let keys: Vec<[u8; 32]> = match keys {
        None => {
            problems.add("session.keys", "is required: keys = [\"${VESTIBULE_SESSION_KEY}\"], each made by `vestibule keygen`");
            Vec::new()
        }
        Some(list) if list.is_empty() => {
            problems.add("session.keys", "is empty; add at least one key made by `vestibule keygen`");
            Vec::new()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim()));
                match decoded.ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
                    Some(key) => Some(key),
                    None => {
                        problems.add(format!("session.keys[{i}]"), "is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`");
                        None
                    }
                }
            })
            .collect(),
    };
    let max_entries = match max_entries {
        None => 100_000,
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            problems.add(
                "session.max_entries",
                format!("{n} must be a positive number"),
            );
            100_000
        }
    };
    let store = match store.as_deref().unwrap_or("memory") {
        "memory" => Some(StoreConfig::Memory),
        "redis" => redis_config(redis, problems).map(StoreConfig::Redis),
        other => {
            problems.add(
                "session.store",
                format!("{other:?} is not allowed; use one of \"memory\", \"redis\""),
            );
            None
        }
    };
    Some(SessionConfig {
        store: store?,
        cookie_name,
        cookie_secure,
        same_site,
        idle_timeout,
        absolute_timeout,
        keys,
        max_entries,
        cache_ttl: duration(
            cache_ttl,
            "session.cache_ttl",
            Duration::from_secs(5),
            problems,
        ),
    })
}

fn redis_url(text: &str, path: &str, problems: &mut Problems) -> bool {
    let ok = text.starts_with("redis://") || text.starts_with("rediss://");
    if !ok {
        problems.add(
            path,
            "must start with redis:// or rediss:// (value not shown: it may hold a password)",
        );
    }
    ok
}

/// `session.redis.timeout` when unset: long enough for a reconnect, short enough that a user
/// waiting on a stalled Redis gets a 503 rather than a hang.
const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_STORE_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(30);

fn redis_config(raw: Option<raw::Redis>, problems: &mut Problems) -> Option<RedisConfig> {
    let Some(raw::Redis {
        url,
        sentinel,
        cluster,
        key_prefix,
        timeout,
    }) = raw
    else {
        problems.add("session.redis", "is required when store = \"redis\": add [session.redis] with url = \"redis://127.0.0.1:6379\"");
        return None;
    };
    let cluster: Vec<Secret> = cluster
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter(|(i, u)| redis_url(u, &format!("session.redis.cluster[{i}]"), problems))
        .map(|(_, u)| Secret::new(u))
        .collect();
    let sentinel = sentinel.and_then(|s| {
        let master = s.master.filter(|m| !m.is_empty());
        if master.is_none() {
            problems.add(
                "session.redis.sentinel.master",
                "is required: the name of the monitored master",
            );
        }
        let nodes: Vec<Secret> = s
            .nodes
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter(|(i, u)| redis_url(u, &format!("session.redis.sentinel.nodes[{i}]"), problems))
            .map(|(_, u)| Secret::new(u))
            .collect();
        if nodes.is_empty() {
            problems.add(
                "session.redis.sentinel.nodes",
                "needs at least one sentinel address, e.g. \"redis://s1:26379\"",
            );
        }
        Some(SentinelConfig {
            master: master?,
            nodes,
        })
    });
    if sentinel.is_some() && !cluster.is_empty() {
        problems.add(
            "session.redis",
            "sets both sentinel and cluster; choose one",
        );
    }
    let url = url.unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    redis_url(&url, "session.redis.url", problems);
    let timeout = duration(
        timeout,
        "session.redis.timeout",
        DEFAULT_STORE_TIMEOUT,
        problems,
    );
    if !(MIN_STORE_TIMEOUT..=MAX_STORE_TIMEOUT).contains(&timeout) {
        problems.add(
            "session.redis.timeout",
            "must be between 50ms and 30s: a request waits this long for Redis before it gets a 503",
        );
    }
    Some(RedisConfig {
        url: Secret::new(url),
        sentinel,
        cluster,
        key_prefix: key_prefix.unwrap_or_else(|| "vestibule:".into()),
        timeout: timeout.clamp(MIN_STORE_TIMEOUT, MAX_STORE_TIMEOUT),
    })
}

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

fn routes_config(
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
        });
    }
    let _ = base;
    out
}
