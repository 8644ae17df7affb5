//! The file's shape, as serde sees it. Everything is optional here so that `validate` can name
//! each missing or bad value itself; durations and sizes stay strings until validated.
//! A key is named once, as a field here: the lists of accepted keys are read off these structs
//! (`keys.rs`).

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file. Only its shape is read (by `keys`, for the keys each table accepts); the
/// sections are deserialized one by one so that each error names its own table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Root {
    pub server: Option<Server>,
    pub admin: Option<Admin>,
    pub log: Option<Log>,
    pub oidc: Option<Oidc>,
    pub session: Option<Session>,
    pub limits: Option<Limits>,
    pub telemetry: Option<Telemetry>,
    pub routes: Option<Vec<Route>>,
    pub features: Option<BTreeMap<String, Feature>>,
    pub tls: Option<OutboundTls>,
}

/// `[tls]`: outbound trust.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundTls {
    pub ca_file: Option<String>,
    pub system_roots: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub bff_prefix: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub request_timeout: Option<String>,
    pub max_body: Option<String>,
    pub tls: Option<Tls>,
    pub cors_origins: Option<Vec<String>>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_header_size: Option<String>,
    pub workers: Option<i64>,
    pub max_connections: Option<i64>,
    pub max_connections_per_client: Option<i64>,
    pub connection_idle_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub body_min_rate: Option<String>,
    pub send_timeout: Option<String>,
    pub http2_max_concurrent_streams: Option<i64>,
    pub http2_keep_alive_interval: Option<String>,
    pub http2_keep_alive_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub login_per_minute: Option<i64>,
    pub callback_per_minute: Option<i64>,
    pub backchannel_logout_per_minute: Option<i64>,
    pub tracked_addresses: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    pub otlp_endpoint: Option<String>,
    pub sample_ratio: Option<f64>,
    pub log_user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_auth: Option<String>,
    pub client_key_file: Option<String>,
    pub client_published_key_files: Option<Vec<String>>,
    pub client_assertion_file: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub extra_auth_params: Option<BTreeMap<String, String>>,
    pub roles_claim: Option<String>,
    pub refresh_skew: Option<String>,
    pub post_logout_redirect: Option<String>,
    pub allow_http_issuer: Option<bool>,
    pub metadata_refresh: Option<String>,
    pub clock_skew: Option<String>,
    pub provider_timeout: Option<String>,
    pub userinfo: Option<bool>,
    pub dpop: Option<bool>,
    pub dpop_key_file: Option<String>,
    pub par: Option<String>,
    pub ca_file: Option<String>,
    pub tls_client_cert: Option<String>,
    pub tls_client_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub store: Option<String>,
    pub cookie_name: Option<String>,
    pub cookie_secure: Option<bool>,
    pub same_site: Option<String>,
    pub idle_timeout: Option<String>,
    pub absolute_timeout: Option<String>,
    pub keys: Option<Vec<String>>,
    pub keys_file: Option<String>,
    pub max_entries: Option<i64>,
    pub max_per_user: Option<i64>,
    pub cache_ttl: Option<String>,
    pub cache_entries: Option<i64>,
    pub redis: Option<Redis>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub url: Option<String>,
    pub sentinel: Option<Sentinel>,
    pub cluster: Option<Vec<String>>,
    pub key_prefix: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sentinel {
    pub master: Option<String>,
    pub nodes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub path: Option<String>,
    pub upstream: Option<String>,
    pub static_dir: Option<String>,
    pub spa_fallback: Option<String>,
    pub strip_prefix: Option<bool>,
    pub auth: Option<String>,
    pub token: Option<String>,
    pub csrf: Option<bool>,
    pub resource: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub exchange: Option<bool>,
    pub require: Option<BTreeMap<String, Vec<String>>>,
    pub feature: Option<String>,
    pub timeout: Option<String>,
    pub allow_encoded_slash: Option<bool>,
    pub allow_path_params: Option<bool>,
    pub identity_headers: Option<BTreeMap<String, String>>,
    pub assertion: Option<bool>,
    pub assertion_header: Option<String>,
    pub assertion_claims: Option<Vec<String>>,
    pub assertion_lifetime: Option<String>,
    pub token_binding: Option<String>,
    pub ca_file: Option<String>,
    pub tls_client_cert: Option<String>,
    pub tls_client_key: Option<String>,
    pub acr_values: Option<Vec<String>>,
    pub max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub public: Option<bool>,
    pub beta: Option<bool>,
    pub role: Option<String>,
}
