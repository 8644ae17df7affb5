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

mod admin_reach;
mod limits;
mod oidc;
mod overlap;
mod routes;
mod server;
mod session;
mod tls;

use oidc::oidc_config;
use routes::routes_config;
use server::server_config;
use session::session_config;

/// `oidc.provider_timeout` when unset: long enough for a slow provider to answer a grant it has
/// already carried out, so a rotated refresh token is not lost to an early give-up.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(25);
/// Paths whose values are secret: their values never appear in a message.
const SECRET_PATHS: &[&str] = &["oidc.client_secret", "session.keys", "session.redis"];

/// What a pass over the file found: every problem, and the secret files it read with their
/// bytes (the configuration's [`Sources`]).
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigError>, Vec<(PathBuf, Vec<u8>)>);

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// The rules between sections that a reload can break by taking a live key from the new file
/// and a restart-only one from the running configuration: checked on the configuration a reload
/// would put in effect. [`parse`] reports the same rules, with the same words, on the file.
pub(super) fn cross_check(config: &Config) -> Vec<ConfigError> {
    let mut problems = Problems::default();
    for (i, route) in config.routes.iter().enumerate() {
        if route.token_binding == TokenBinding::Dpop && !config.oidc.dpop {
            problems.add(format!("routes[{i}].token_binding"), DPOP_ROUTE_NEEDS_DPOP);
        }
        if let Some(why) = routes::inside_bff(&route.path, &config.server.bff_prefix) {
            problems.add(format!("routes[{i}].path"), why);
        }
        let key = format!("routes[{i}]");
        problems
            .0
            .extend(admin_reach::problem(&key, route, config.admin.listen));
        problems
            .0
            .extend(admin_reach::loop_problem(&key, route, config.server.listen));
    }
    problems.0
}

const DPOP_ROUTE_NEEDS_DPOP: &str = "\"dpop\" needs DPoP-bound tokens: set oidc.dpop = true";

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
    let mut empty = Vec::new();
    interpolate_all(&mut table, "", env, &mut problems, &mut empty);
    check_keys(&mut table, &mut problems);
    let config = build(table, base, &mut problems).map(|mut config| {
        config.egress = tls::egress(env, &mut problems);
        config
    });
    let config = config.map(|mut config| {
        config.sources = std::sync::Arc::new(Sources {
            text: text.to_string(),
            files: std::mem::take(&mut problems.1),
        });
        config
    });
    match config {
        Some(config) if problems.0.is_empty() => Ok(config),
        _ => Err(ConfigErrors(name_empty_variables(problems.0, &empty))),
    }
}

/// Adds to each problem of a key whose value came from a variable set but empty (`empty`: the
/// key's path and what to say) that it did: the problem alone ("is required", "is not an
/// address") reads as if the file lacked what it holds.
fn name_empty_variables(
    mut problems: Vec<ConfigError>,
    empty: &[(String, String)],
) -> Vec<ConfigError> {
    for problem in &mut problems {
        let at = |path: &str| {
            problem.path == path
                || problem.path.starts_with(&format!("{path}."))
                || problem.path.starts_with(&format!("{path}["))
        };
        if let Some((_, note)) = empty.iter().find(|(path, _)| at(path)) {
            problem.message = format!("{} ({note})", problem.message);
        }
    }
    problems
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Expands every string of `table` (at `path`); `empty` gets the path of each one that named a
/// variable set but empty, and what to say about it.
fn interpolate_all(
    table: &mut Table,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
    empty: &mut Vec<(String, String)>,
) {
    for (key, value) in table.iter_mut() {
        interpolate_value(value, &join(path, key), env, problems, empty);
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
    empty: &mut Vec<(String, String)>,
) {
    match value {
        Value::String(s) => match interpolate(s, env) {
            Ok((expanded, unset)) => {
                if let Some(name) = unset.first() {
                    // As for a missing variable: a secret's is named only when the value is
                    // nothing but the reference to it.
                    let secret = SECRET_PATHS.iter().any(|p| path.starts_with(p));
                    let note = if !secret || *s == format!("${{{name}}}") {
                        format!("environment variable {name} is set but empty")
                    } else {
                        "a variable it names is set but empty".to_string()
                    };
                    empty.push((path.to_string(), note));
                }
                *s = expanded;
            }
            Err(error) => problems.add(path, interpolation_message(s, path, error)),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(item, &format!("{path}[{i}]"), env, problems, empty);
            }
        }
        Value::Table(t) => interpolate_all(t, path, env, problems, empty),
        _ => {}
    }
}

/// What is wrong with the `${…}` in the string `value` at `path`. In a secret (one of
/// [`SECRET_PATHS`]) no part of the value is quoted: a literal secret may hold `${` by chance,
/// and what follows it is the secret. The missing variable is named only when the value is
/// nothing but a reference to it, the case of a variable meant to hold the secret.
fn interpolation_message(value: &str, path: &str, error: InterpolationError) -> String {
    let secret = SECRET_PATHS.iter().any(|s| path.starts_with(s));
    match error {
        InterpolationError::Missing(name) if !secret || value == format!("${{{name}}}") => {
            format!("environment variable {name} is not set; export it, or write ${{{name}:-default}}")
        }
        InterpolationError::Missing(_) => "names an environment variable that is not set (value not shown: it is secret); export it, or write $$ for a literal $".to_string(),
        InterpolationError::BadName(name) if !secret => {
            format!("${{{name}}} is not a valid variable name; use letters, digits and _")
        }
        InterpolationError::BadName(_) => "holds a ${…} that is not a valid variable name (value not shown: it is secret); use letters, digits and _, or $$ for a literal $".to_string(),
        InterpolationError::Unclosed => {
            "a ${ has no closing }; write ${NAME}, or $$ for a literal $".to_string()
        }
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

/// Deserializes one table; each value of the wrong type is reported at its own key with serde's
/// words (a secret's value not shown) and left out, so the rest of the table is still read.
fn section<T: DeserializeOwned + Default>(
    value: Option<Value>,
    path: &str,
    problems: &mut Problems,
) -> T {
    let Some(mut value) = value else {
        return T::default();
    };
    loop {
        let e = match value.clone().try_into::<T>() {
            Ok(v) => return v,
            Err(e) => e,
        };
        // toml names the key inside the table: "…\nin `tls.cert`".
        let key = e.to_string().rsplit_once("\nin `").and_then(|(_, rest)| {
            let key = rest.trim_end().strip_suffix('`')?;
            (!key.is_empty()).then(|| key.to_string())
        });
        let at = key
            .as_deref()
            .map_or(path.to_string(), |key| join(path, key));
        let secret = SECRET_PATHS
            .iter()
            .any(|s| at.starts_with(s) || (key.is_none() && s.starts_with(path)));
        let message = if secret {
            "has a value of the wrong type (value not shown: it is secret); check the types against docs/configuration.md".to_string()
        } else {
            format!(
                "{}; check the types against docs/configuration.md",
                e.message().trim()
            )
        };
        problems.add(at, message);
        // Left out, and the rest read again; a key that cannot be found drops the table.
        if !key.is_some_and(|key| remove_key(&mut value, &key)) {
            return T::default();
        }
    }
}

/// Removes the value at the dotted `key` (as toml names it) from the table `value`.
fn remove_key(value: &mut Value, key: &str) -> bool {
    let mut table = value;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Table(t) = table else { return false };
        if parts.peek().is_none() {
            return t.remove(part).is_some();
        }
        let Some(next) = t.get_mut(part) else {
            return false;
        };
        table = next;
    }
    false
}

fn build(mut root: Table, base: &Path, problems: &mut Problems) -> Option<Config> {
    let server: raw::Server = section(root.remove("server"), "server", problems);
    let admin: raw::Admin = section(root.remove("admin"), "admin", problems);
    let log: raw::Log = section(root.remove("log"), "log", problems);
    let mut oidc: raw::Oidc = section(root.remove("oidc"), "oidc", problems);
    let mut session: raw::Session = section(root.remove("session"), "session", problems);
    let outbound: raw::OutboundTls = section(root.remove("tls"), "tls", problems);
    let limits: raw::Limits = section(root.remove("limits"), "limits", problems);
    let telemetry: raw::Telemetry = section(root.remove("telemetry"), "telemetry", problems);
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
        max_connections: limits::admin_max_connections(admin_max_connections, problems),
    };
    let limits = limits::limits_config(limits, problems);
    let log = log_config(log, problems);
    let telemetry = telemetry_config(telemetry, problems);
    let tls = tls::outbound_tls(outbound, base, problems);
    let oidc_ca = tls::ca_bundle(oidc.ca_file.take(), "oidc.ca_file", base, problems);
    let oidc_client = tls::client_identity(
        oidc.tls_client_cert.take(),
        oidc.tls_client_key.take(),
        "oidc",
        ("tls_client_cert", "tls_client_key"),
        base,
        problems,
    );
    let redis_ca = session
        .redis
        .as_mut()
        .and_then(|r| r.ca_file.take())
        .and_then(|f| tls::ca_bundle(Some(f), "session.redis.ca_file", base, problems));
    let mut oidc = oidc_config(oidc, base, problems).map(|mut oidc| {
        oidc.ca_file = oidc_ca;
        if oidc.client_auth.is_mtls() && oidc_client.is_none() {
            problems.add(
                "oidc.tls_client_cert",
                "is required for client_auth = \"tls_client_auth\" or \"self_signed_tls_client_auth\": the PEM file of the client certificate (and tls_client_key its key)",
            );
        }
        oidc.tls_client = oidc_client;
        oidc
    });
    if let Some(file) = oidc
        .as_mut()
        .filter(|o| o.dpop)
        .and_then(|o| o.dpop_key_file.as_mut())
    {
        *file = base.join(&*file);
        if let Some(missing) = no_secret_file(file) {
            problems.add("oidc.dpop_key_file", missing);
        } else if let Err(why) = oidc::check_dpop_key(file) {
            problems.add("oidc.dpop_key_file", format!("{}: {why}", file.display()));
        }
    }
    let session = session_config(session, base, problems).map(|mut session| {
        if let StoreConfig::Redis(redis) = &mut session.store {
            redis.ca_file = redis_ca.or_else(|| tls.ca_file.clone());
            if redis.ca_file.is_some() && redis.sentinel.is_some() {
                problems.add(
                    "session.redis.ca_file",
                    "is not supported with sentinel yet (a [tls] ca_file applies to Redis too)",
                );
            }
        }
        session
    });
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
    if let Some(oidc) = &oidc
        && !oidc.dpop
    {
        for (path, _) in routes
            .iter()
            .filter(|(_, r)| r.token_binding.as_deref() == Some("dpop"))
        {
            problems.add(format!("{path}.token_binding"), DPOP_ROUTE_NEEDS_DPOP);
        }
    }
    let listeners = (server.as_ref(), admin.listen);
    let routes = routes_config(routes, base, &features, listeners, problems);

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
        telemetry,
        routes,
        features,
        tls,
        egress: Egress::default(),
        sources: Default::default(),
    })
}

/// A refused URL as a problem may quote it: without the credentials and the query it may carry
/// (`${VAR}`s may have put a secret there), saying so when it left them out; `the value` for
/// text that is not a URL but could hold a secret.
fn shown_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return if text.contains(['@', '?', '#']) {
            "the value".to_string()
        } else {
            format!("{text:?}")
        };
    };
    if url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
    {
        return format!("{text:?}");
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    format!("{:?} (its credentials and query not shown)", url.as_str())
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

/// A value written as text, read by `parse`; a bad one is reported and `default` kept.
fn parsed<T>(
    value: Option<String>,
    path: &str,
    default: T,
    parse: fn(&str) -> Result<T, String>,
    problems: &mut Problems,
) -> T {
    match value {
        None => default,
        Some(text) => parse(&text).unwrap_or_else(|e| {
            problems.add(path, e);
            default
        }),
    }
}

/// The longest duration any key takes: a year (`"1y"`). Longer ones serve no purpose, and far
/// longer ones (`"300000000000y"` parses) overflow the arithmetic of expiries and deadlines: a
/// session record's expiry in milliseconds for the store, an `Instant` plus a timeout.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// A duration key; over [`MAX_DURATION`] is reported and `default` kept.
pub(super) fn duration(
    value: Option<String>,
    path: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    duration_at_most(
        value,
        path,
        default,
        (MAX_DURATION, "a year (\"1y\")"),
        "",
        problems,
    )
}

/// A duration key of at most `max` (written `max_text` in the message, followed by `why`);
/// longer is reported and `default` kept.
pub(super) fn duration_at_most(
    value: Option<String>,
    path: &str,
    default: Duration,
    (max, max_text): (Duration, &str),
    why: &str,
    problems: &mut Problems,
) -> Duration {
    let text = value.clone().unwrap_or_default();
    let d = parsed(value, path, default, parse_duration, problems);
    if d > max {
        problems.add(path, format!("{text:?} is longer than {max_text}{why}"));
        return default;
    }
    d
}

pub(super) fn size(
    value: Option<String>,
    path: &str,
    default: u64,
    problems: &mut Problems,
) -> u64 {
    parsed(value, path, default, parse_size, problems)
}

/// An enum key: how each of its values is written in the file, in the order a message lists them.
trait Written: Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

macro_rules! written {
    ($($ty:ident { $($name:literal => $variant:ident),* $(,)? })*) => {
        $(impl Written for $ty {
            const NAMES: &'static [(&'static str, $ty)] = &[$(($name, $ty::$variant)),*];
        })*
    };
}

written! {
    LogFormat { "pretty" => Pretty, "json" => Json }
    LogUser { "sub" => Sub, "hash" => Hash, "none" => None }
    ClientAuth {
        "client_secret_basic" => ClientSecretBasic,
        "client_secret_post" => ClientSecretPost,
        "private_key_jwt" => PrivateKeyJwt,
        "tls_client_auth" => TlsClientAuth,
        "self_signed_tls_client_auth" => SelfSignedTlsClientAuth,
    }
    Par { "auto" => Auto, "always" => Always, "never" => Never }
    SameSite { "lax" => Lax, "strict" => Strict }
    TokenMode { "none" => None, "user" => User, "client" => Client, "user_or_client" => UserOrClient }
    AuthMode { "none" => None, "optional" => Optional, "required" => Required }
    TokenBinding { "none" => None, "dpop" => Dpop }
}

/// The value of an enum key written `value` (`default` when it is not written).
fn one_of<T: Written>(value: Option<String>, path: &str, default: T, problems: &mut Problems) -> T {
    let Some(text) = value else { return default };
    match T::NAMES.iter().find(|(name, _)| *name == text) {
        Some((_, v)) => *v,
        None => {
            let names: Vec<String> = T::NAMES.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            problems.add(
                path,
                format!("{text:?} is not allowed; use one of {}", names.join(", ")),
            );
            default
        }
    }
}

/// Each entry of a `scopes` list at `path` is one RFC 6749 §3.3 scope-token: the list is
/// joined with spaces on the wire, so an entry with a space would be two scopes at the
/// provider, and one with a control character could pass for another in a token's cache key
/// ([`super::token_key_of`]).
fn scope_tokens(scopes: &[String], path: &str, problems: &mut Problems) {
    for (i, scope) in scopes.iter().enumerate() {
        if !super::is_scope_token(scope) {
            problems.add(
                format!("{path}[{i}]"),
                format!("{scope:?} is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"),
            );
        }
    }
}

/// The largest secret file read (a client secret, or a list of session keys).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// What a problem of a key naming a secret file (`client_secret_file`, `keys_file`, a private
/// key) says when nothing is at its path `file`; `None` when something is there (the value is a
/// path then, and quoted as usual). The value is not quoted: it may be the secret itself (the
/// client secret, a session key, a PEM private key) written where the path of its file belongs.
pub(super) fn no_secret_file(file: &Path) -> Option<&'static str> {
    std::fs::symlink_metadata(file).is_err().then_some(
        "names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it",
    )
}

/// Reads the secret file named at `path` (resolved against `base`); every failure is a problem
/// naming the file ([`no_secret_file`] when nothing is there), never its contents. Read at
/// load, so again on every reload.
pub(super) fn secret_file(
    name: &str,
    base: &Path,
    path: &str,
    problems: &mut Problems,
) -> Option<(PathBuf, String)> {
    let file = base.join(name);
    if let Some(missing) = no_secret_file(&file) {
        problems.add(path, missing);
        return None;
    }
    let text = secret_file_at(&file, name, path, problems)?;
    Some((file, text))
}

/// Records `bytes`, what `file` holds, among the files the configuration was read from: the
/// watcher applies a change of it on disk as it does one of the configuration file (a key or
/// certificate rotated in a Secret volume, without SIGHUP).
pub(super) fn watched(file: &Path, bytes: &[u8], problems: &mut Problems) {
    problems.1.push((file.to_path_buf(), bytes.to_vec()));
}

/// [`secret_file`] at the resolved `file`, named `name` in problems.
fn secret_file_at(file: &Path, name: &str, path: &str, problems: &mut Problems) -> Option<String> {
    match super::read_text(file, MAX_SECRET_FILE) {
        Ok(text) => {
            problems
                .1
                .push((file.to_path_buf(), text.as_bytes().to_vec()));
            Some(text)
        }
        Err(e) => {
            problems.add(path, format!("cannot read {name:?}: {e}"));
            None
        }
    }
}

/// Reads the secret file `which` of `config` again at the path `config` holds, for
/// [`Config::read_secret_again`].
pub(super) fn read_secret_again(
    config: &mut Config,
    which: SecretFile,
) -> Result<bool, ConfigErrors> {
    let (file, key) = match which {
        SecretFile::ClientSecret => (&config.oidc.client_secret_file, "oidc.client_secret_file"),
        SecretFile::SessionKeys => (&config.session.keys_file, "session.keys_file"),
    };
    let Some(file) = file.clone() else {
        return Ok(false);
    };
    let name = file.display().to_string();
    let mut problems = Problems::default();
    let Some(text) = secret_file_at(&file, &name, key, &mut problems) else {
        return Err(ConfigErrors(problems.0));
    };
    let running = (config.sources.files.iter()).find(|(path, _)| *path == file);
    if running.is_some_and(|(_, bytes)| text.as_bytes() == bytes.as_slice()) {
        return Ok(false);
    }
    match which {
        SecretFile::ClientSecret => {
            let secret = oidc::client_secret_text(&name, &text, &mut problems);
            if problems.0.is_empty() {
                config.oidc.client_secret = secret;
            }
        }
        SecretFile::SessionKeys => {
            let keys = session::keys_from_text(&name, &text, &mut problems);
            if problems.0.is_empty() {
                config.session.keys = keys;
            }
        }
    }
    if !problems.0.is_empty() {
        return Err(ConfigErrors(problems.0));
    }
    let sources = std::sync::Arc::make_mut(&mut config.sources);
    for (path, bytes) in problems.1 {
        match sources
            .files
            .iter_mut()
            .find(|(running, _)| *running == path)
        {
            Some((_, running)) => *running = bytes,
            None => sources.files.push((path, bytes)),
        }
    }
    Ok(true)
}

/// A local path: one leading `/`, not `//`, no backslash.
pub(crate) fn is_local_path(path: &str) -> bool {
    path.starts_with('/') && !path.starts_with("//") && !path.contains('\\')
}

fn log_config(raw: raw::Log, problems: &mut Problems) -> LogConfig {
    let raw::Log { level, format } = raw;
    let level = level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        problems.add("log.level", format!("{level:?} is not a log filter; use \"error\", \"warn\", \"info\", \"debug\" or e.g. \"info,vestibule=debug\""));
    }
    let format = one_of(format, "log.format", LogFormat::Pretty, problems);
    LogConfig { level, format }
}

fn telemetry_config(raw: raw::Telemetry, problems: &mut Problems) -> TelemetryConfig {
    let raw::Telemetry {
        otlp_endpoint,
        sample_ratio,
        log_user,
    } = raw;
    let otlp_endpoint = otlp_endpoint.and_then(|text| match url::Url::parse(&text) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.query().is_none()
                && url.username().is_empty()
                && url.password().is_none() =>
        {
            Some(url)
        }
        _ => {
            problems.add(
                "telemetry.otlp_endpoint",
                format!("{} is not an http(s) URL without credentials or query; use the collector's OTLP/HTTP base URL, e.g. \"http://otel-collector:4318\"", shown_url(&text)),
            );
            None
        }
    });
    let sample_ratio = sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        problems.add(
            "telemetry.sample_ratio",
            format!("{sample_ratio} is not between 0.0 and 1.0; use e.g. 0.1 to record one new trace in ten"),
        );
    }
    let log_user = one_of(log_user, "telemetry.log_user", LogUser::Sub, problems);
    TelemetryConfig {
        otlp_endpoint,
        sample_ratio: sample_ratio.clamp(0.0, 1.0),
        log_user,
    }
}

/// `client_auth` is written as the name registered at the provider.
#[test]
fn client_auth_is_written_as_its_registered_name() {
    for (written, value) in ClientAuth::NAMES {
        assert_eq!(*written, value.name());
    }
}

/// The messages `problems` holds, as printed.
#[cfg(test)]
fn printed(problems: Problems) -> Vec<String> {
    problems.0.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod telemetry_tests {
    use super::*;

    #[test]
    fn golden_telemetry_messages() {
        let mut problems = Problems::default();
        let telemetry = telemetry_config(
            raw::Telemetry {
                otlp_endpoint: Some("grpc://collector:4317".into()),
                sample_ratio: Some(1.5),
                log_user: Some("email".into()),
            },
            &mut problems,
        );
        assert_eq!(telemetry.otlp_endpoint, None);
        assert_eq!(telemetry.sample_ratio, 1.0);
        for endpoint in [
            "https://user:s3cret@collector",
            "https://collector:4318/?token=s3cret",
            "not a url?token=s3cret",
        ] {
            let _ = telemetry_config(
                raw::Telemetry {
                    otlp_endpoint: Some(endpoint.into()),
                    ..Default::default()
                },
                &mut problems,
            );
        }
        assert_eq!(
            printed(problems),
            [
                "telemetry.otlp_endpoint: \"grpc://collector:4317\" is not an http(s) URL without credentials or query; use the collector's OTLP/HTTP base URL, e.g. \"http://otel-collector:4318\"",
                "telemetry.sample_ratio: 1.5 is not between 0.0 and 1.0; use e.g. 0.1 to record one new trace in ten",
                "telemetry.log_user: \"email\" is not allowed; use one of \"sub\", \"hash\", \"none\"",
                "telemetry.otlp_endpoint: \"https://collector/\" (its credentials and query not shown) is not an http(s) URL without credentials or query; use the collector's OTLP/HTTP base URL, e.g. \"http://otel-collector:4318\"",
                "telemetry.otlp_endpoint: \"https://collector:4318/\" (its credentials and query not shown) is not an http(s) URL without credentials or query; use the collector's OTLP/HTTP base URL, e.g. \"http://otel-collector:4318\"",
                "telemetry.otlp_endpoint: the value is not an http(s) URL without credentials or query; use the collector's OTLP/HTTP base URL, e.g. \"http://otel-collector:4318\"",
            ]
        );
        let defaults = telemetry_config(raw::Telemetry::default(), &mut Problems::default());
        assert_eq!(
            defaults,
            TelemetryConfig {
                otlp_endpoint: None,
                sample_ratio: 1.0,
                log_user: LogUser::Sub,
            }
        );
    }
}

/// Values that parse but would do harm: each is refused with its path and the bound.
#[cfg(test)]
mod harmful_values {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    /// The problems of a minimal valid file with `oidc` and `session` lines added.
    fn problems(oidc: &str, session: &str) -> Vec<String> {
        let text = format!(
            "[server]\npublic_url = \"https://app.example.com\"\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n{oidc}\n\
             [session]\nkeys = [\"{KEY}\"]\n{session}\n"
        );
        match Config::parse(&text, Path::new("."), &|_| None) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// `keep_fresh` (oidc/metadata.rs) sleeps this long between fetches of the discovery
    /// document and the key set: "0s" fetched them back to back, forever, from every instance.
    #[test]
    fn a_metadata_refresh_under_a_minute_is_refused() {
        let secret = "client_secret = \"s\"\n";
        for short in ["0s", "1ms", "59s"] {
            assert_eq!(
                problems(&format!("{secret}metadata_refresh = \"{short}\""), ""),
                [format!(
                    "oidc.metadata_refresh: \"{short}\" is shorter than 1m: every instance would fetch the provider's discovery document and keys that often; write e.g. \"1h\""
                )]
            );
        }
        assert!(problems(&format!("{secret}metadata_refresh = \"1m\""), "").is_empty());
    }

    /// The leeway of the `exp` and `iat` checks of ID tokens, logout tokens and validated access
    /// tokens: ten years of it accepted any expired token, and "60m" for "60s" an hour late.
    #[test]
    fn a_clock_skew_over_five_minutes_is_refused() {
        let secret = "client_secret = \"s\"\n";
        for long in ["3650d", "60m", "301s"] {
            assert_eq!(
                problems(&format!("{secret}clock_skew = \"{long}\""), ""),
                [format!(
                    "oidc.clock_skew: \"{long}\" is longer than 5m: an expired ID token, logout token or access token would be accepted that long after it expired; write e.g. \"60s\""
                )]
            );
        }
        assert!(problems(&format!("{secret}clock_skew = \"5m\""), "").is_empty());
    }

    /// "300000000000y" parses, and overflows the arithmetic of expiries and deadlines (a
    /// session's expiry in milliseconds, an `Instant` plus a timeout): a year at most.
    #[test]
    fn a_duration_over_a_year_is_refused_before_it_can_overflow() {
        let secret = "client_secret = \"s\"\n";
        assert_eq!(
            problems(
                secret,
                "idle_timeout = \"300000000000y\"\nabsolute_timeout = \"300000000000y\"\n\
                 cache_ttl = \"366d\""
            ),
            [
                "session.idle_timeout: \"300000000000y\" is longer than a year (\"1y\")",
                "session.absolute_timeout: \"300000000000y\" is longer than a year (\"1y\")",
                "session.cache_ttl: \"366d\" is longer than a year (\"1y\")",
            ]
        );
        assert!(problems(secret, "idle_timeout = \"1y\"\nabsolute_timeout = \"1y\"").is_empty());
    }

    /// A variable that is set but empty (a Kubernetes Secret key or an `.env` line with no
    /// value) gave `oidc.client_secret: is required …; write client_secret =
    /// "${VESTIBULE_CLIENT_SECRET}"` to a file that says exactly that. The problem of a key
    /// whose value came from an empty variable names it (a secret's only when the value is
    /// nothing but the reference, as for a missing one); a value that passes is left alone.
    #[test]
    fn a_variable_set_but_empty_is_named_in_the_problem_of_its_key() {
        let text = format!(
            "[server]\nlisten = \"${{EMPTY}}\"\npublic_url = \"https://app.example.com\"\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n\
             client_secret = \"${{VESTIBULE_CLIENT_SECRET}}\"\nroles_claim = \"a.${{EMPTY}}\"\n\
             [session]\nkeys = [\"{KEY}\", \"x${{EMPTY}}\"]\n\
             [telemetry]\nlog_user = \"${{EMPTY:-sub}}\"\n\
             [[routes]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:5001\"\n"
        );
        let env = |name: &str| {
            ["EMPTY", "VESTIBULE_CLIENT_SECRET"]
                .contains(&name)
                .then(String::new)
        };
        let found = match Config::parse(&text, Path::new("."), &env) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        };
        assert_eq!(
            found,
            [
                "server.listen: \"\" is not an address; write host:port such as \"0.0.0.0:8080\" (environment variable EMPTY is set but empty)",
                "oidc.client_secret: is required for client_secret_basic; write client_secret = \"${VESTIBULE_CLIENT_SECRET}\", or client_secret_file = \"/run/secrets/client-secret\" (environment variable VESTIBULE_CLIENT_SECRET is set but empty)",
                "oidc.roles_claim: \"a.\" is not a claim path; write e.g. \"roles\" or \"realm_access.roles\" (environment variable EMPTY is set but empty)",
                "session.keys[1]: is not 32 bytes of base64 (value not shown); make one with `vestibule keygen` (a variable it names is set but empty)",
            ]
        );
    }

    /// A value of the wrong type named only its table (`oidc: has a value of the wrong type`),
    /// and the whole table was dropped: every other key of it then read as missing
    /// (`oidc.issuer: is required` for a file that has it). The key is named, the rest of its
    /// table kept; a secret's value is not shown (`keys = "<key>"` for `keys = ["<key>"]`).
    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key_and_its_table_kept() {
        let text = format!(
            "[server]\npublic_url = \"https://app.example.com\"\nmax_connections = \"10\"\n\
             [server.tls]\ncert = 5\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n\
             client_secret = \"s\"\nuserinfo = \"yes\"\n\
             [session]\nkeys = \"{KEY}\"\ncookie_secure = \"true\"\n\
             [session.redis]\nurl = [\"redis://:s3cr3t@r\"]\n\
             [[routes]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:5001\"\ncsrf = \"no\"\n"
        );
        let found = match Config::parse(&text, Path::new("."), &|_| None) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        };
        let types = "; check the types against docs/configuration.md";
        let secret = "has a value of the wrong type (value not shown: it is secret)";
        assert_eq!(
            found,
            [
                format!("server.max_connections: invalid type: string \"10\", expected i64{types}"),
                format!("server.tls.cert: invalid type: integer `5`, expected a string{types}"),
                format!("oidc.userinfo: invalid type: string \"yes\", expected a boolean{types}"),
                format!("session.cookie_secure: invalid type: string \"true\", expected a boolean{types}"),
                format!("session.keys: {secret}{types}"),
                format!("session.redis.url: {secret}{types}"),
                format!("routes[0].csrf: invalid type: string \"no\", expected a boolean{types}"),
                "server.tls.cert: is required when [server] tls is set: a PEM file path".to_string(),
                "server.tls.key: is required when [server] tls is set: a PEM file path".to_string(),
                "session.keys: is required: keys = [\"${VESTIBULE_SESSION_KEY}\"], each made by `vestibule keygen`, or keys_file = \"/run/secrets/session-keys\"".to_string(),
            ]
        );
    }

    /// A secret written where the path of its file belongs (the client secret in
    /// `client_secret_file`, a session key in `keys_file`, a PEM private key in a `*_key` or
    /// `*_key_file` key) was printed back: `cannot read "<the secret>": No such file …`. Where
    /// nothing is at the path, the value is not quoted; the key is named. A real path that is
    /// wrong in another way (a directory) is still quoted.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_secret_written_where_its_file_path_belongs_is_not_printed_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        let pem = "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAS3CR3T\\n-----END PRIVATE KEY-----";
        let parse = |oidc: &str, rest: &str| {
            let text = format!(
                "[server]\npublic_url = \"https://app.example.com\"\n\
                 [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n{oidc}\n{rest}"
            );
            match Config::parse(&text, dir.path(), &|_| None) {
                Ok(_) => panic!("accepted"),
                Err(errors) => errors.0,
            }
        };
        let found = [
            parse(
                &format!(
                    "client_secret_file = \"s3cr3t-CLIENT\"\ndpop = true\n\
                     dpop_key_file = \"{pem}\"\ntls_client_cert = \"cert.pem\"\ntls_client_key = \"{pem}\""
                ),
                &format!(
                    "[server.tls]\ncert = \"cert.pem\"\nkey = \"{pem}\"\n\
                     [session]\nkeys_file = \"{KEY}\"\n\
                     [[routes]]\npath = \"/api/\"\nupstream = \"https://api.example\"\n\
                     tls_client_cert = \"cert.pem\"\ntls_client_key = \"{pem}\""
                ),
            ),
            parse(
                &format!(
                    "client_auth = \"private_key_jwt\"\nclient_key_file = \"{pem}\"\n\
                     client_published_key_files = [\"{pem}\"]"
                ),
                &format!("[session]\nkeys = [\"{KEY}\"]"),
            ),
            parse(
                "client_auth = \"private_key_jwt\"\nclient_assertion_file = \"eyJS3CR3T.x.y\"",
                &format!("[session]\nkeys = [\"{KEY}\"]"),
            ),
        ]
        .concat();
        let named: Vec<&str> = found.iter().map(|e| e.path.as_str()).collect();
        for key in [
            "oidc.client_secret_file",
            "oidc.dpop_key_file",
            "oidc.tls_client_key",
            "server.tls.key",
            "session.keys_file",
            "routes[0].tls_client_key",
            "oidc.client_key_file",
            "oidc.client_published_key_files[0]",
            "oidc.client_assertion_file",
        ] {
            assert!(named.contains(&key), "{key} not named: {found:?}");
        }
        for error in &found {
            let shown = error.to_string();
            for secret in ["s3cr3t-CLIENT", "S3CR3T", KEY] {
                assert!(!shown.contains(secret), "{secret} printed: {shown}");
            }
        }
        // A path where something is, but not a file: quoted, to find the mistake.
        let found = parse(
            "client_secret_file = \".\"",
            &format!("[session]\nkeys = [\"{KEY}\"]"),
        );
        assert!(
            found[0]
                .to_string()
                .starts_with("oidc.client_secret_file: cannot read \".\": "),
            "{found:?}"
        );
    }

    /// "Secrets are never printed back, not even in errors": a literal client secret, key or
    /// Redis password may hold `${` by chance (any generator with `$`, `{` and `}` in its
    /// alphabet), and what follows it is the secret.
    #[test]
    fn an_interpolation_error_in_a_secret_prints_no_part_of_it() {
        let found = problems("client_secret = \"Xk9${q!Z/7t}mP\"", "");
        assert_eq!(
            found,
            [
                "oidc.client_secret: holds a ${…} that is not a valid variable name (value not shown: it is secret); use letters, digits and _, or $$ for a literal $"
            ]
        );
        let found = problems("client_secret = \"Xk9${QZ7t}mP\"", "");
        assert_eq!(
            found,
            [
                "oidc.client_secret: names an environment variable that is not set (value not shown: it is secret); export it, or write $$ for a literal $"
            ]
        );
        // The value meant to name a variable: the variable is named.
        let found = problems("client_secret = \"${QZ7t}\"", "");
        assert_eq!(
            found,
            [
                "oidc.client_secret: environment variable QZ7t is not set; export it, or write ${QZ7t:-default}"
            ]
        );
        // Elsewhere the reference is quoted, to find the typo.
        let found = problems("client_secret = \"s\"\nroles_claim = \"${a-b}\"", "");
        assert_eq!(
            found,
            ["oidc.roles_claim: ${a-b} is not a valid variable name; use letters, digits and _"]
        );
    }
}
