//! Configuration: the TOML schema, `${VAR}` interpolation and validation.
//!
//! This is the only module that knows TOML. [`Config::load`] reads a file, interpolates
//! environment variables, checks every key and value, and returns either typed settings or
//! *all* problems found, each naming its TOML path and the fix. Secret values are held in
//! [`Secret`] and never printed back, not even in errors.

mod interpolate;
mod keys;
mod raw;
pub mod reload;
mod units;
mod validate;

pub use units::{parse_duration, parse_size};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default path of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub oidc: OidcConfig,
    pub session: SessionConfig,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
    pub routes: Vec<RouteConfig>,
    pub features: BTreeMap<String, FeatureConfig>,
    /// `[tls]`: what outbound TLS trusts besides the compiled-in web PKI roots.
    pub tls: OutboundTls,
    /// The egress proxy for calls to the provider, from `HTTPS_PROXY` / `NO_PROXY`.
    pub egress: Egress,
    /// What it was built from.
    pub sources: std::sync::Arc<Sources>,
}

/// What a configuration was built from: the text of its file and the bytes of each secret file
/// it read (`oidc.client_secret_file`, `session.keys_file`). The watcher compares the files on
/// disk with these, so a change made after they were read, however soon, is a change.
#[derive(Clone, Default)]
pub struct Sources {
    pub text: String,
    pub files: Vec<(PathBuf, Vec<u8>)>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both may hold secrets.
        let files: Vec<&Path> = self.files.iter().map(|(path, _)| path.as_path()).collect();
        f.debug_struct("Sources")
            .field("text", &format_args!("[{} bytes]", self.text.len()))
            .field("files", &files)
            .finish()
    }
}

/// A secret file a configuration reads, and what it holds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFile {
    /// `oidc.client_secret_file`: the client secret.
    ClientSecret,
    /// `session.keys_file`: the session key ring.
    SessionKeys,
}

/// `[tls]`: trust for outbound TLS (the provider, `https://` upstreams, `rediss://`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundTls {
    /// Extra roots, added to the web PKI ones; a per-use `ca_file` replaces this one.
    pub ca_file: Option<CaBundle>,
    /// Also trust the operating system's store.
    pub system_roots: bool,
}

/// A PEM bundle of CA certificates, read and checked when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaBundle {
    pub path: PathBuf,
    pub certs: std::sync::Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

/// A client certificate chain and its private key (PEM files), for mutual TLS.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: std::sync::Arc<Vec<rustls_pki_types::CertificateDer<'static>>>,
    pub key: std::sync::Arc<rustls_pki_types::PrivateKeyDer<'static>>,
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.chain == other.chain
            && self.key.secret_der() == other.key.secret_der()
    }
}

impl Eq for ClientIdentity {}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// `HTTPS_PROXY` / `NO_PROXY` (or their lowercase forms) as read at start: calls to the provider
/// go through an HTTP CONNECT tunnel unless the host is excluded.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Egress {
    /// An `http://` proxy URL; may carry credentials, hence secret.
    pub https_proxy: Option<Secret>,
    pub no_proxy: Option<String>,
}

impl fmt::Debug for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Egress")
            .field(
                "https_proxy",
                &self.https_proxy.as_ref().map(|_| "[redacted]"),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub public_url: url::Url,
    /// `scheme://host[:port]` of `public_url`, as browsers send it in `Origin`.
    pub public_origin: String,
    pub bff_prefix: String,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub request_timeout: Duration,
    pub max_body: u64,
    pub tls: Option<TlsConfig>,
    pub cors_origins: Vec<String>,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    /// Serving threads, each with its own event loop and upstream connections; `None`: one
    /// per CPU available to the process.
    pub workers: Option<usize>,
    pub connections: ConnectionLimits,
}

impl ServerConfig {
    /// How many serving threads run: `workers`, or one per CPU available to the process.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// What one client connection may hold: the listener's share, idle time, the pace of request
/// bodies, and HTTP/2 streams and pings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections on the public listener; beyond it, new ones wait to be accepted.
    pub max_connections: usize,
    /// Open connections on the public listener from one client address (an IPv6 one by its
    /// /64), trusted proxies exempt; beyond it, a new one is closed at once. 0: no cap.
    pub max_connections_per_client: usize,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// The longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    /// Bytes a second a request body must average after `body_read_timeout`; 0: no minimum.
    pub body_min_rate: u64,
    /// The longest a response may make no progress towards the client (its socket or, over
    /// HTTP/2, its stream's flow-control window not taking more) before the connection closes.
    pub send_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    /// `None`: no pings.
    pub http2_keep_alive_interval: Option<Duration>,
    pub http2_keep_alive_timeout: Duration,
}

/// Requests a minute per client address (after trusted proxies) for the endpoints anyone may
/// call; 0 is no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub login_per_minute: u32,
    pub callback_per_minute: u32,
    pub backchannel_logout_per_minute: u32,
    /// Addresses the rate limiter remembers at most.
    pub tracked_addresses: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// Traces and what the access log says about the user (`[telemetry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector's base URL (spans go to `<endpoint>/v1/traces`); `None`: no traces.
    pub otlp_endpoint: Option<url::Url>,
    /// The share of new traces recorded, 0.0–1.0; a trusted proxy's decision overrides it.
    pub sample_ratio: f64,
    pub log_user: LogUser,
}

/// How the access log names the user of a request with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogUser {
    /// The `sub` claim as is.
    Sub,
    /// A keyed hash of `sub` (the same user, the same value; not reversible without the key).
    Hash,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    /// A JWT signed by the client (RFC 7523, OpenID Connect Core §9).
    PrivateKeyJwt,
    /// RFC 8705 §2.1: the client certificate (`[oidc] tls_client_cert`), issued by a CA the
    /// provider trusts, authenticates the client; no secret is sent.
    TlsClientAuth,
    /// RFC 8705 §2.2: a self-signed client certificate registered at the provider.
    SelfSignedTlsClientAuth,
}

impl ClientAuth {
    /// Whether the client authenticates with its certificate rather than a secret.
    pub fn is_mtls(self) -> bool {
        matches!(
            self,
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
        )
    }

    /// The name registered at the provider (`token_endpoint_auth_method`).
    pub fn name(self) -> &'static str {
        match self {
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: url::Url,
    pub client_id: String,
    /// The secret in effect: `client_secret`, or the contents of `client_secret_file`.
    pub client_secret: Option<Secret>,
    /// Where the secret was read from; read again on every reload.
    pub client_secret_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// `private_key_jwt`: the PEM private key that signs client assertions (re-read on reload).
    pub client_key_file: Option<PathBuf>,
    /// `private_key_jwt`: more keys published at the admin `/jwks` but not used to sign — the
    /// next key before a rotation, the previous one after it.
    pub client_published_key_files: Vec<PathBuf>,
    /// `private_key_jwt`: a file holding a ready client assertion that the platform keeps fresh
    /// (e.g. a Kubernetes projected service-account token); read when it changes.
    pub client_assertion_file: Option<PathBuf>,
    pub scopes: Vec<String>,
    pub extra_auth_params: Vec<(String, String)>,
    pub roles_claim: String,
    pub refresh_skew: Duration,
    pub post_logout_redirect: String,
    pub allow_http_issuer: bool,
    pub metadata_refresh: Duration,
    pub clock_skew: Duration,
    /// How long a call to the token endpoint (and revocation) may take. A grant we stop waiting
    /// for may still be carried out by the provider, so this is waited out, never cut short.
    pub provider_timeout: Duration,
    /// Fetch the UserInfo endpoint after login and after each refresh, and merge its claims.
    pub userinfo: bool,
    /// DPoP (RFC 9449): every token request carries a proof and asks for DPoP-bound tokens.
    pub dpop: bool,
    /// The DPoP key (PEM, EC P-256); `None` with `dpop`: a key generated once and kept, sealed,
    /// in the session store for every replica.
    pub dpop_key_file: Option<std::path::PathBuf>,
    /// Pushed authorization requests (RFC 9126).
    pub par: Par,
    /// Roots for the provider instead of `[tls] ca_file`.
    pub ca_file: Option<CaBundle>,
    /// The client certificate presented to the provider (RFC 8705): it authenticates the client
    /// with `tls_client_auth`, and binds access tokens to it when the provider does so.
    pub tls_client: Option<ClientIdentity>,
}

/// When the authorization request is pushed (RFC 9126) rather than carried by the browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// When the provider advertises a `pushed_authorization_request_endpoint`.
    Auto,
    /// Always; a provider without the endpoint is an error.
    Always,
    Never,
}

/// How a route's access token is bound to Vestibule when it is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBinding {
    /// `Authorization: Bearer <token>`.
    None,
    /// `Authorization: DPoP <token>` with a fresh proof of possession per request (RFC 9449).
    Dpop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
}

/// The fewest sessions the in-process cache holds when `session.cache_entries` is left out
/// (it is then sized from the memory the process may use: `session::manager::sizing`).
pub const DEFAULT_CACHE_ENTRIES: usize = 20_000;
/// The most `session.cache_entries` may say.
pub const MAX_CACHE_ENTRIES: usize = 1_000_000;
/// Sessions one subject may have at once unless `session.max_per_user` says otherwise.
pub const DEFAULT_MAX_PER_USER: usize = 50;
/// The most `session.max_per_user` may say.
pub const MAX_PER_USER: usize = 10_000;

#[derive(Clone)]
pub struct SessionConfig {
    pub store: StoreConfig,
    pub cookie_name: String,
    pub cookie_secure: bool,
    pub same_site: SameSite,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    /// Decoded session keys (`keys`, or the lines of `keys_file`); the first seals, all open.
    pub keys: Vec<[u8; 32]>,
    /// Where the keys were read from; read again on every reload.
    pub keys_file: Option<PathBuf>,
    pub max_entries: usize,
    /// The most sessions one subject has at once; a login beyond it ends the oldest.
    pub max_per_user: usize,
    /// How long an opened session may be served from the in-process cache.
    pub cache_ttl: Duration,
    /// The most opened sessions the in-process cache holds; `None`: sized from the memory the
    /// process may use, at start (`session::manager::sizing`).
    pub cache_entries: Option<usize>,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("store", &self.store)
            .field("cookie_name", &self.cookie_name)
            .field("cookie_secure", &self.cookie_secure)
            .field("same_site", &self.same_site)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_timeout", &self.absolute_timeout)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("keys_file", &self.keys_file)
            .field("max_entries", &self.max_entries)
            .field("max_per_user", &self.max_per_user)
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_entries", &self.cache_entries)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory,
    Redis(RedisConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// May carry a password, hence secret.
    pub url: Secret,
    pub sentinel: Option<SentinelConfig>,
    pub cluster: Vec<Secret>,
    pub key_prefix: String,
    /// Upper bound on one store operation, waiting for a reconnect included.
    pub timeout: Duration,
    /// Roots for `rediss://` instead of `[tls] ca_file`.
    pub ca_file: Option<CaBundle>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    pub master: String,
    pub nodes: Vec<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    None,
    User,
    Client,
    UserOrClient,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Upstream(UpstreamBase),
    Static {
        dir: PathBuf,
        spa_fallback: Option<String>,
    },
}

/// A route's upstream: its base URL, and what every request forwarded there takes from it,
/// made once here instead of parsed again per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBase {
    pub url: url::Url,
    pub scheme: http::uri::Scheme,
    /// `host[:port]`, as sent in `Host` (the port only when it is not the scheme's default).
    pub authority: http::uri::Authority,
    /// The same, as the `Host` header value.
    pub host: http::HeaderValue,
    /// `scheme://host[:port]`: the server itself (`http://api` and `https://api` are two, on
    /// ports 80 and 443, though their `authority` is the same).
    pub origin: Box<str>,
    /// [`UpstreamBase::path`], found once here: every request forwarded asks for it.
    path: Box<str>,
}

impl UpstreamBase {
    /// `None` for a URL that is not `http` or `https` with a host.
    pub fn new(url: url::Url) -> Option<UpstreamBase> {
        let scheme = match url.scheme() {
            "http" => http::uri::Scheme::HTTP,
            "https" => http::uri::Scheme::HTTPS,
            _ => return None,
        };
        url.host()?;
        let text = &url[url::Position::BeforeHost..url::Position::AfterPort];
        let authority = http::uri::Authority::try_from(text).ok()?;
        let host = http::HeaderValue::from_str(text).ok()?;
        let path = url.path().trim_end_matches('/').into();
        let origin = format!("{scheme}://{text}").into();
        Some(UpstreamBase {
            url,
            scheme,
            authority,
            host,
            origin,
            path,
        })
    }

    /// The base URL's path without its trailing slash ("" for none): forwarded paths go below it.
    pub fn path(&self) -> &str {
        &self.path
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    pub target: Target,
    pub strip_prefix: bool,
    pub auth: AuthMode,
    pub token: TokenMode,
    pub csrf: bool,
    pub resource: Option<String>,
    pub scopes: Vec<String>,
    pub exchange: bool,
    pub require: Vec<(String, Vec<String>)>,
    pub feature: Option<String>,
    pub timeout: Option<Duration>,
    /// Pass `%2F` inside a segment through (encoded) instead of answering 400 `bad_path`.
    pub allow_encoded_slash: bool,
    /// Pass `;` segment parameters through instead of answering 400 `bad_path`.
    pub allow_path_params: bool,
    /// Headers set from the session's claims (header, claim path); incoming copies are always
    /// removed first. Empty: the route does no identity work at all.
    pub identity_headers: Vec<(http::HeaderName, String)>,
    /// A JWT signed by Vestibule for the upstream, if the route sends one.
    pub assertion: Option<AssertionConfig>,
    pub token_binding: TokenBinding,
    /// Roots for an `https://` upstream instead of `[tls] ca_file`.
    pub ca_file: Option<CaBundle>,
    /// The client certificate presented to an `https://` upstream.
    pub tls_client: Option<ClientIdentity>,
    /// Step-up authentication: the session must satisfy this (`None`: any session will do).
    pub step_up: Option<StepUp>,
    /// What [`RouteConfig::token_key`] gives, made once ([`token_key_of`]).
    pub token_key: String,
}

/// A route's assertion: a short-lived JWT signed by Vestibule, naming the user to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionConfig {
    /// `Authorization` (sent as `Bearer <jwt>`) or another header (the JWT alone).
    pub header: http::HeaderName,
    /// Session claims copied into the assertion (`sub` is always there).
    pub claims: Vec<String>,
    pub lifetime: Duration,
}

impl RouteConfig {
    /// Header names this route sets itself, so a browser's copies must never pass.
    pub fn sets_identity(&self) -> bool {
        !self.identity_headers.is_empty() || self.assertion.is_some()
    }

    /// Whether only some sessions may reach this route (`auth = "required"`, a `require`
    /// policy, a `feature`): its answers are about who asked, whatever the upstream was sent.
    pub fn reached_by_some(&self) -> bool {
        self.auth == AuthMode::Required || !self.require.is_empty() || self.feature.is_some()
    }

    /// The key of the session's token map this route's user token is kept under
    /// ([`token_key_of`]).
    pub fn token_key(&self) -> &str {
        &self.token_key
    }
}

/// The key of the session's token map a route's user token is kept under: its `resource` (`""`
/// for none, the login's own token); with `scopes` of its own or a token exchange, those too
/// (sorted), so that a token granted for one route's scopes or by one grant is never sent to a
/// route that asked for others. The client-credentials cache keys the same way.
pub fn token_key_of(resource: Option<&str>, scopes: &[String], exchange: bool) -> String {
    let resource = resource.unwrap_or_default();
    if scopes.is_empty() && !exchange {
        return resource.to_string();
    }
    let mut scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
    scopes.sort_unstable();
    scopes.dedup();
    let grant = if exchange { "exchange" } else { "refresh" };
    // A unit separator: neither a resource (a URI) nor a scope holds one.
    format!("{resource}\u{1f}{grant}\u{1f}{}", scopes.join(" "))
}

/// What a sign-in must have been like (OpenID Connect Core §3.1.2.1): one of `acr_values` (any
/// when empty), and no longer than `max_age` seconds ago. Required by a route, asked for by an
/// upstream (RFC 9470), carried through a login in its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepUp {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acr_values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureConfig {
    pub public: bool,
    pub beta: bool,
    pub role: Option<String>,
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`, visible ASCII but `"` and
/// `\\`.
pub fn is_scope_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// An `acr` value as it may travel in `acr_values` (space-separated) and in a quoted
/// `WWW-Authenticate` parameter: 1–200 printable ASCII characters, no space, `"` or `\`.
pub fn is_acr_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// One problem in the file: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The most a file Vestibule reads (configuration, keys, certificates) may hold.
pub const MAX_FILE: u64 = 1024 * 1024;

/// The bytes of the file at `path` (symbolic links followed), if it is a regular file of at
/// most `max` bytes. Anything else is an error before a byte is read: a FIFO would block the
/// reader (a reload, and with it the signal handling) until someone writes to it, and a device
/// such as `/dev/zero` has no length to check and no end.
pub fn read_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "it is larger than {} KiB; is it the right file?",
            max / 1024
        )));
    }
    Ok(bytes)
}

/// [`read_file`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_file(path, max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

impl Config {
    /// What is allowed but unwise, as `key: advice` lines: `vestibule check` prints them, and
    /// the server logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let session = &self.session;
        if session.cookie_secure && !session.cookie_name.starts_with("__Host-") {
            warnings.push(format!(
                "session.cookie_name: {:?} lacks the __Host- prefix, so a page on any other \
                 subdomain of the site's domain can set a cookie of that name for this site \
                 (cookie tossing: a login of its own slipped into the user's browser); name it \
                 \"__Host-...\"",
                session.cookie_name
            ));
        }
        warnings
    }

    /// Reads, interpolates and validates the file at `path` using the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_text(path, MAX_FILE).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let config = Config::parse(&text, base, &|name| std::env::var(name).ok())?;
        let exposed = config.exposed_files(path);
        if exposed.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(exposed))
        }
    }

    /// Reads the secret file `which` again, at the path this configuration names, and puts what
    /// it holds in this configuration: the secret, and the bytes in [`Sources`] that the
    /// watcher compares the file with. Returns whether the file changed since it was read
    /// (`false` and nothing done for a secret written inline). A bad file (unreadable, empty,
    /// a line that is not a key) is an error naming it, and the configuration is left as it
    /// was: the running secret stays.
    pub fn read_secret_again(&mut self, which: SecretFile) -> Result<bool, ConfigErrors> {
        validate::read_secret_again(self, which)
    }

    /// The rules between sections, on a configuration as a reload would put it in effect (the
    /// live keys of a new file, the restart-only keys running), read from the file at `path`:
    /// each file passed them on its own, the mix may not.
    pub fn check_effective(&self, path: &Path) -> Result<(), ConfigErrors> {
        let mut problems = validate::cross_check(self);
        problems.extend(self.exposed_files(path));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// A `static_dir` holding the configuration file at `path` or a secret file would serve it
    /// to anyone: the client secret, the session keys, every private key (the server's TLS
    /// key, the client's keys for assertions and mutual TLS, the DPoP key) and the client
    /// assertion file. One problem per such route and file.
    fn exposed_files(&self, path: &Path) -> Vec<ConfigError> {
        let oidc = &self.oidc;
        let secret = [
            Some(path),
            oidc.client_secret_file.as_deref(),
            self.session.keys_file.as_deref(),
            self.server.tls.as_ref().map(|tls| tls.key.as_path()),
            oidc.client_key_file.as_deref(),
            oidc.client_assertion_file.as_deref(),
            oidc.dpop_key_file.as_deref(),
            oidc.tls_client.as_ref().map(|id| id.key_path.as_path()),
        ];
        let published = oidc.client_published_key_files.iter().map(PathBuf::as_path);
        let routes_own = (self.routes.iter())
            .filter_map(|route| route.tls_client.as_ref().map(|id| id.key_path.as_path()));
        let secret: Vec<PathBuf> = secret
            .into_iter()
            .flatten()
            .chain(published)
            .chain(routes_own)
            .filter_map(|file| std::fs::canonicalize(file).ok())
            .collect();
        let mut problems = Vec::new();
        for (at, route) in self.routes.iter().enumerate() {
            let Target::Static { dir, .. } = &route.target else {
                continue;
            };
            let Ok(dir) = std::fs::canonicalize(dir) else {
                continue;
            };
            for file in secret.iter().filter(|file| file.starts_with(&dir)) {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                problems.push(ConfigError {
                    path: format!("routes[{at}].static_dir"),
                    message: format!(
                        "it holds {name:?}, which it would serve to anyone; serve a directory of \
                         the site's files only"
                    ),
                });
            }
        }
        problems
    }

    /// Parses `text`; relative file paths are resolved against `base`; `env` looks up variables.
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        validate::parse(text, base, env)
    }

    /// The routes' callback URL registered at the provider.
    pub fn redirect_uri(&self) -> String {
        format!(
            "{}{}/callback",
            self.server.public_origin, self.server.bff_prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::token_key_of;

    /// Routes that ask for no scopes of their own keep the key sessions already hold (the
    /// resource, or `""` for the login's token); scopes in any order or repeated give one key;
    /// different scopes, or an exchange, another.
    #[test]
    fn token_keys_tell_routes_apart_by_resource_scopes_and_grant() {
        let s = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(token_key_of(None, &[], false), "");
        assert_eq!(token_key_of(Some("https://api"), &[], false), "https://api");
        let read = token_key_of(Some("https://api"), &s(&["b", "a", "a"]), false);
        assert_eq!(
            read,
            token_key_of(Some("https://api"), &s(&["a", "b"]), false)
        );
        let keys = [
            read,
            token_key_of(Some("https://api"), &s(&["a"]), false),
            token_key_of(Some("https://api"), &s(&["a", "b"]), true),
            token_key_of(Some("https://api"), &[], true),
            token_key_of(None, &s(&["a", "b"]), false),
            token_key_of(Some("https://api"), &[], false),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
