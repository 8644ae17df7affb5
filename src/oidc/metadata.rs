//! Provider metadata: discovery, the key set, periodic refresh, and start-up retries.
//! Unknown or vendor-specific fields in the discovery document are ignored.

use super::http::{CallError, ProviderHttp};
use crate::jose::{Jwks, JwksFetcher};
use crate::reply::Cause;
use arc_swap::ArcSwapOption;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    #[serde(default)]
    pub backchannel_logout_supported: Option<bool>,
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// RFC 9207: the provider sends `iss` in every authorization response.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: Option<bool>,
    /// RFC 9126: where authorization requests are pushed.
    #[serde(default)]
    pub pushed_authorization_request_endpoint: Option<String>,
    #[serde(default)]
    pub require_pushed_authorization_requests: Option<bool>,
    /// RFC 9449 §5.1: the proof algorithms the provider accepts; absent, no DPoP is advertised.
    #[serde(default)]
    pub dpop_signing_alg_values_supported: Option<Vec<String>>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    pub token_endpoint_auth_signing_alg_values_supported: Option<Vec<String>>,
    #[serde(default)]
    pub acr_values_supported: Option<Vec<String>>,
    /// RFC 8705 §5: the endpoints a client presenting a certificate calls instead.
    #[serde(default)]
    pub mtls_endpoint_aliases: Option<MtlsAliases>,
}

/// RFC 8705 §5 `mtls_endpoint_aliases`: the endpoints that take mutual TLS, where they differ.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MtlsAliases {
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    #[serde(default)]
    pub pushed_authorization_request_endpoint: Option<String>,
}

impl Metadata {
    /// Every endpoint the document names is an absolute `https://` URL (RFC 6749 §3.1, §3.2;
    /// OpenID Connect Discovery §3). The client secret, codes, PKCE verifiers and tokens are
    /// sent to them and the browser is sent to two, so a plain one (a provider behind a TLS
    /// proxy that believes it speaks http, or a tampered document) would hand them all to
    /// the network.
    fn check_https_endpoints(&self) -> Result<(), DiscoveryError> {
        let named = [
            ("authorization_endpoint", Some(&self.authorization_endpoint)),
            ("token_endpoint", Some(&self.token_endpoint)),
            ("jwks_uri", Some(&self.jwks_uri)),
            ("userinfo_endpoint", self.userinfo_endpoint.as_ref()),
            ("end_session_endpoint", self.end_session_endpoint.as_ref()),
            ("revocation_endpoint", self.revocation_endpoint.as_ref()),
            (
                "introspection_endpoint",
                self.introspection_endpoint.as_ref(),
            ),
            (
                "pushed_authorization_request_endpoint",
                self.pushed_authorization_request_endpoint.as_ref(),
            ),
        ];
        for (name, url) in named {
            if let Some(url) = url
                && !url::Url::parse(url).is_ok_and(|u| u.scheme() == "https" && u.has_host())
            {
                return Err(DiscoveryError::InsecureEndpoint(name));
            }
        }
        Ok(())
    }

    /// With a client certificate, the `https://` mutual-TLS aliases replace the endpoints they
    /// name, so that token requests (and token use at the provider) happen over mutual TLS.
    fn use_mtls_aliases(&mut self) {
        let Some(aliases) = self.mtls_endpoint_aliases.clone() else {
            return;
        };
        let https = |alias: Option<String>| alias.filter(|a| a.starts_with("https://"));
        if let Some(token) = https(aliases.token_endpoint) {
            self.token_endpoint = token;
        }
        for (alias, endpoint) in [
            (aliases.revocation_endpoint, &mut self.revocation_endpoint),
            (
                aliases.introspection_endpoint,
                &mut self.introspection_endpoint,
            ),
            (aliases.userinfo_endpoint, &mut self.userinfo_endpoint),
            (
                aliases.pushed_authorization_request_endpoint,
                &mut self.pushed_authorization_request_endpoint,
            ),
        ] {
            if let Some(alias) = https(alias) {
                *endpoint = Some(alias);
            }
        }
    }
}

/// What `vestibule check --online` found in the provider's metadata; each line names its TOML
/// key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Support {
    /// What the configuration asks of the provider that its metadata says it does not do: the
    /// check fails.
    pub problems: Vec<String>,
    /// What may not work, or cannot be checked: printed, the check passes.
    pub warnings: Vec<String>,
}

/// `vestibule check --online`: compares the configuration with the provider's metadata. A list
/// the provider does not publish is not held against it, except the default of
/// `token_endpoint_auth_methods_supported` (OpenID Connect Discovery §3: `client_secret_basic`).
/// `acr_values_supported` only warns: `acr_values` is a request a provider may honour without
/// listing the value, and the ID token's `acr` is checked at every step-up login anyway.
pub fn check_support(
    metadata: &Metadata,
    config: &crate::config::Config,
    credential: &super::client_auth::Credential,
) -> Support {
    let mut problems = Vec::new();
    let method = config.oidc.client_auth.name();
    let methods = metadata
        .token_endpoint_auth_methods_supported
        .clone()
        .unwrap_or_else(|| vec!["client_secret_basic".into()]);
    if !methods.iter().any(|m| m == method) {
        problems.push(format!(
            "oidc.client_auth: the provider does not support {method:?} at its token endpoint (token_endpoint_auth_methods_supported: {})",
            methods.join(", ")
        ));
    }
    if let (Some(alg), Some(algs)) = (
        credential.signing_alg(),
        &metadata.token_endpoint_auth_signing_alg_values_supported,
    ) && !algs.iter().any(|a| a == alg)
    {
        problems.push(format!(
            "oidc.client_key_file: the provider does not accept {alg} client assertions (token_endpoint_auth_signing_alg_values_supported: {})",
            algs.join(", ")
        ));
    }
    Support {
        problems,
        warnings: acr_warnings(metadata, config),
    }
}

/// Each route's `acr_values` that the provider does not list in `acr_values_supported`, or one
/// line per route when it publishes no such list.
fn acr_warnings(metadata: &Metadata, config: &crate::config::Config) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let Some(step) = route.step_up.as_ref().filter(|s| !s.acr_values.is_empty()) else {
            continue;
        };
        let Some(supported) = &metadata.acr_values_supported else {
            warnings.push(format!(
                "routes[{i}].acr_values: the provider publishes no acr_values_supported, so whether it knows {} cannot be checked",
                step.acr_values.join(", ")
            ));
            continue;
        };
        for acr in step.acr_values.iter().filter(|a| !supported.contains(a)) {
            warnings.push(format!(
                "routes[{i}].acr_values: the provider does not list {acr:?} in acr_values_supported ({}); a step-up login may come back without it",
                supported.join(", ")
            ));
        }
    }
    warnings
}

/// Why the provider's metadata or keys could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Call(#[from] CallError),
    /// A required field is missing or has the wrong type.
    #[error("the discovery document is incomplete: {0}")]
    Incomplete(Cause),
    /// The document names another issuer than `[oidc] issuer`, by more than one trailing `/`
    /// (shown as the document has it).
    #[error(
        "the discovery document names issuer {0:?}, not the configured one (at most a trailing / may differ)"
    )]
    OtherIssuer(String),
    #[error("the provider does not support PKCE S256")]
    NoPkceS256,
    #[error("the key set could not be loaded: {0}")]
    Keys(crate::jose::JoseError),
    /// The issuer is https but the document names an endpoint that is not (by its name).
    #[error("the discovery document's {0} is not an https URL, as the issuer is")]
    InsecureEndpoint(&'static str),
}

/// Fetches discovery, its whole answer within `timeout`, and checks that it describes the
/// configured issuer.
pub async fn discover(
    http: &ProviderHttp,
    issuer: &url::Url,
    timeout: Duration,
) -> Result<Metadata, DiscoveryError> {
    let base = issuer.as_str().trim_end_matches('/');
    let url = format!("{base}/.well-known/openid-configuration");
    let mut metadata = read_document(http.get_json(&url, timeout).await?, issuer)?;
    if http.presents_certificate() {
        metadata.use_mtls_aliases();
    }
    Ok(metadata)
}

/// The metadata in a discovery `document`, checked to describe `issuer` and to support PKCE S256.
///
/// OpenID Connect Discovery §4.3 wants the document's `issuer` identical to the URL discovery
/// was made for. `[oidc] issuer` may differ from it by one trailing `/` (operators write it
/// either way, and an origin is always read with one); from then on the document's `issuer` is
/// the provider's issuer identifier, which every token's `iss` must equal byte for byte
/// ([`crate::oidc::Oidc::id_token_expectations`]) and the authorization response's `iss` too
/// ([`super::response::check_authorization_iss`]).
pub fn read_document(
    document: serde_json::Value,
    issuer: &url::Url,
) -> Result<Metadata, DiscoveryError> {
    let metadata: Metadata =
        serde_json::from_value(document).map_err(|e| DiscoveryError::Incomplete(Cause::new(e)))?;
    let one_slash_less = |s: &str| s.strip_suffix('/').unwrap_or(s).to_owned();
    if one_slash_less(&metadata.issuer) != one_slash_less(issuer.as_str()) {
        return Err(DiscoveryError::OtherIssuer(metadata.issuer));
    }
    if let Some(methods) = &metadata.code_challenge_methods_supported
        && !methods.iter().any(|m| m == "S256")
    {
        return Err(DiscoveryError::NoPkceS256);
    }
    if issuer.scheme() == "https" {
        metadata.check_https_endpoints()?;
    }
    Ok(metadata)
}

/// Fetches the key set from the `jwks_uri` of the current metadata, the whole answer within
/// `timeout`.
pub struct MetadataJwks {
    pub http: ProviderHttp,
    pub metadata: Arc<ArcSwapOption<Metadata>>,
    pub timeout: Duration,
}

impl JwksFetcher for MetadataJwks {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Cause>> + Send + '_>> {
        Box::pin(async move {
            let Some(metadata) = self.metadata.load_full() else {
                return Err(Cause::new(CallError::NoMetadata));
            };
            match self.http.get_bytes(&metadata.jwks_uri, self.timeout).await {
                Ok((200..=299, body)) => Ok(body.to_vec()),
                Ok((status, _)) => Err(Cause::new(CallError::Status(status))),
                Err(e) => Err(Cause::new(e)),
            }
        })
    }
}

/// The first wait after a failed load of the metadata and keys; it doubles after each failure
/// in a row, up to [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// The longest time between the starts of two attempts while loads fail (a provider that
/// refuses or errs; one that does not answer takes the timeout per attempt anyway).
const RETRY_AT_MOST: Duration = Duration::from_secs(5);

/// Metadata and keys of the provider, loaded in the background and refreshed periodically.
pub struct Provider {
    pub issuer: url::Url,
    pub http: ProviderHttp,
    pub metadata: Arc<ArcSwapOption<Metadata>>,
    pub jwks: Jwks,
    /// How long one fetch of the discovery document or of the key set may take.
    timeout: Duration,
}

impl Provider {
    /// Each fetch of the discovery document or of the key set — at start-up, periodic, or for
    /// a token naming a key not yet seen, whose lookup waits no longer — is given up after
    /// `timeout` (the provider timeout), and after 10 s at most: a provider behind a dead link
    /// holds nothing up longer than the configuration says.
    pub fn new(issuer: url::Url, http: ProviderHttp, timeout: Duration) -> Arc<Provider> {
        let timeout = timeout.min(crate::jose::jwks::DEFAULT_FETCH_TIMEOUT);
        let metadata = Arc::new(ArcSwapOption::empty());
        let fetcher = Arc::new(MetadataJwks {
            http: http.clone(),
            metadata: metadata.clone(),
            timeout,
        });
        let jwks = Jwks::new(fetcher, Duration::from_secs(10)).with_fetch_timeout(timeout);
        Arc::new(Provider {
            issuer,
            http,
            metadata,
            jwks,
            timeout,
        })
    }

    pub fn get(&self) -> Option<Arc<Metadata>> {
        self.metadata.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.metadata.load().is_some() && self.jwks.is_loaded()
    }

    /// One attempt to load metadata and keys.
    pub async fn refresh(&self) -> Result<(), DiscoveryError> {
        let metadata = discover(&self.http, &self.issuer, self.timeout).await?;
        self.metadata.store(Some(Arc::new(metadata)));
        self.jwks.load().await.map_err(DiscoveryError::Keys)
    }

    /// Loads, then refreshes every `period`. Runs forever. A load that fails — at start-up
    /// or periodic — is tried again soon, not a period later: attempts in a row start at least
    /// 200 ms apart, doubling to at most [`RETRY_AT_MOST`] (an attempt that waited out the
    /// timeout is followed at once), until one succeeds.
    pub async fn keep_fresh(self: Arc<Self>, period: Duration) {
        let mut delay = RETRY_FIRST;
        let mut loaded = false;
        loop {
            let started = tokio::time::Instant::now();
            match self.refresh().await {
                Ok(()) => {
                    if !loaded || delay > RETRY_FIRST {
                        // The issuer as the provider states it (`[oidc] issuer` may differ by a
                        // trailing `/`) is what every token must name, byte for byte.
                        let stated = self.get().map(|m| m.issuer.clone()).unwrap_or_default();
                        tracing::info!(issuer = %stated, configured = %self.issuer, "provider metadata loaded");
                    }
                    loaded = true;
                    delay = RETRY_FIRST;
                    tokio::time::sleep(period).await;
                }
                Err(error) if !loaded => {
                    tracing::warn!(issuer = %self.issuer, %error, retry_in = ?delay, "provider not ready");
                    tokio::time::sleep_until(started + delay).await;
                    delay = (delay * 2).min(RETRY_AT_MOST);
                }
                Err(error) => {
                    tracing::warn!(issuer = %self.issuer, %error, retry_in = ?delay, "provider metadata refresh failed; keeping the previous metadata");
                    tokio::time::sleep_until(started + delay).await;
                    delay = (delay * 2).min(RETRY_AT_MOST);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const ENDPOINTS: [&str; 8] = [
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "userinfo_endpoint",
        "end_session_endpoint",
        "revocation_endpoint",
        "introspection_endpoint",
        "pushed_authorization_request_endpoint",
    ];

    fn document(origin: &str) -> Value {
        let mut document = json!({ "issuer": origin });
        for name in ENDPOINTS {
            document[name] = json!(format!("{origin}/{name}"));
        }
        document
    }

    /// OAuth 2.0 (RFC 6749 §3.1, §3.2) and OpenID Connect Discovery §3: the endpoints of an
    /// https issuer are https. The client secret, codes, PKCE verifiers and refresh tokens go
    /// to them, and the browser is sent to two: plain http would hand all of it to the network.
    #[test]
    fn an_https_issuer_whose_document_names_a_plain_endpoint_is_refused() {
        let issuer = url::Url::parse("https://idp.example.com").unwrap();
        assert!(read_document(document("https://idp.example.com"), &issuer).is_ok());
        for name in ENDPOINTS {
            for bad in [
                "http://idp.example.com/x",
                "HTTP://idp.example.com/x",
                "javascript:alert(1)",
                "//idp.example.com/x",
                "not a url",
            ] {
                let mut doc = document("https://idp.example.com");
                doc[name] = json!(bad);
                let err = read_document(doc, &issuer).map(|_| ()).unwrap_err();
                assert!(
                    matches!(err, DiscoveryError::InsecureEndpoint(n) if n == name),
                    "{name} = {bad}: {err}"
                );
            }
        }
    }

    /// A loopback issuer over plain http (`allow_http_issuer`, development) may name plain
    /// endpoints; endpoints that are absent are not held against anyone.
    #[test]
    fn a_plain_development_issuer_may_name_plain_endpoints() {
        let issuer = url::Url::parse("http://127.0.0.1:8080").unwrap();
        assert!(read_document(document("http://127.0.0.1:8080"), &issuer).is_ok());
        let issuer = url::Url::parse("https://idp.example.com").unwrap();
        let minimal = json!({
            "issuer": "https://idp.example.com",
            "authorization_endpoint": "https://idp.example.com/auth",
            "token_endpoint": "https://login.example.net/token",
            "jwks_uri": "https://keys.example.org/jwks",
        });
        assert!(read_document(minimal, &issuer).is_ok());
    }

    /// OpenID Connect Discovery §4.3: the document's `issuer` is the issuer URL it was fetched
    /// for. One trailing `/` of difference from `[oidc] issuer` is forgiven (operators write it
    /// either way, and an origin is always read with one); two or more, or another host or path,
    /// are another issuer.
    #[test]
    fn a_document_whose_issuer_has_extra_trailing_slashes_is_refused() {
        for (configured, stated) in [
            ("https://idp.example.com", "https://idp.example.com//"),
            ("https://idp.example.com", "https://idp.example.com///"),
            ("https://idp.example.com/", "https://idp.example.com///"),
            (
                "https://idp.example.com/realm",
                "https://idp.example.com/realm//",
            ),
            (
                "https://idp.example.com/realm//",
                "https://idp.example.com/realm",
            ),
            (
                "https://idp.example.com/realm",
                "https://idp.example.com/realm2",
            ),
            ("https://idp.example.com/realm", "https://idp.example.com"),
            ("https://idp.example.com", "https://idp.example.net"),
            ("https://idp.example.com", "https://IDP.example.com"),
            ("https://idp.example.com", ""),
        ] {
            let issuer = url::Url::parse(configured).unwrap();
            let mut doc = document("https://idp.example.com");
            doc["issuer"] = json!(stated);
            assert!(
                matches!(
                    read_document(doc, &issuer),
                    Err(DiscoveryError::OtherIssuer(_))
                ),
                "{stated:?} taken for {configured}"
            );
        }
    }

    /// The one trailing `/` of difference that is forgiven; the metadata keeps the document's
    /// form, which every token's `iss` must then be, byte for byte.
    #[test]
    fn a_document_whose_issuer_differs_by_one_trailing_slash_is_taken_as_it_states_it() {
        for (configured, stated) in [
            ("https://idp.example.com", "https://idp.example.com"),
            ("https://idp.example.com", "https://idp.example.com/"),
            ("https://idp.example.com/", "https://idp.example.com"),
            (
                "https://idp.example.com/realm",
                "https://idp.example.com/realm/",
            ),
            (
                "https://idp.example.com/realm/",
                "https://idp.example.com/realm",
            ),
            (
                "https://idp.example.com/realm/",
                "https://idp.example.com/realm/",
            ),
        ] {
            let issuer = url::Url::parse(configured).unwrap();
            let mut doc = document("https://idp.example.com");
            doc["issuer"] = json!(stated);
            let metadata = read_document(doc, &issuer)
                .unwrap_or_else(|e| panic!("{stated:?} refused for {configured}: {e}"));
            assert_eq!(metadata.issuer, stated);
        }
    }
}
