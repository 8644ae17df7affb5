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

/// Fetches discovery and checks that it describes the configured issuer.
pub async fn discover(http: &ProviderHttp, issuer: &url::Url) -> Result<Metadata, String> {
    let base = issuer.as_str().trim_end_matches('/');
    let url = format!("{base}/.well-known/openid-configuration");
    let document = http.get_json(&url).await.map_err(|e| e.to_string())?;
    let mut metadata: Metadata = serde_json::from_value(document)
        .map_err(|e| format!("the discovery document is incomplete: {e}"))?;
    if metadata.issuer.trim_end_matches('/') != base {
        return Err(format!(
            "the discovery document names issuer {:?}, not the configured one",
            metadata.issuer
        ));
    }
    if let Some(methods) = &metadata.code_challenge_methods_supported
        && !methods.iter().any(|m| m == "S256")
    {
        return Err("the provider does not support PKCE S256".into());
    }
    if http.presents_certificate() {
        metadata.use_mtls_aliases();
    }
    Ok(metadata)
}

/// Fetches the key set from the `jwks_uri` of the current metadata.
pub struct MetadataJwks {
    pub http: ProviderHttp,
    pub metadata: Arc<ArcSwapOption<Metadata>>,
}

impl JwksFetcher for MetadataJwks {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Cause>> + Send + '_>> {
        Box::pin(async move {
            let Some(metadata) = self.metadata.load_full() else {
                return Err(Cause::new(CallError::NoMetadata));
            };
            match self.http.get_bytes(&metadata.jwks_uri).await {
                Ok((200..=299, body)) => Ok(body.to_vec()),
                Ok((status, _)) => Err(Cause::new(CallError::Status(status))),
                Err(e) => Err(Cause::new(e)),
            }
        })
    }
}

/// Metadata and keys of the provider, loaded in the background and refreshed periodically.
pub struct Provider {
    pub issuer: url::Url,
    pub http: ProviderHttp,
    pub metadata: Arc<ArcSwapOption<Metadata>>,
    pub jwks: Jwks,
}

impl Provider {
    pub fn new(issuer: url::Url, http: ProviderHttp) -> Arc<Provider> {
        let metadata = Arc::new(ArcSwapOption::empty());
        let fetcher = Arc::new(MetadataJwks {
            http: http.clone(),
            metadata: metadata.clone(),
        });
        let jwks = Jwks::new(fetcher, Duration::from_secs(10));
        Arc::new(Provider {
            issuer,
            http,
            metadata,
            jwks,
        })
    }

    pub fn get(&self) -> Option<Arc<Metadata>> {
        self.metadata.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.metadata.load().is_some() && self.jwks.is_loaded()
    }

    /// One attempt to load metadata and keys.
    pub async fn refresh(&self) -> Result<(), String> {
        let metadata = discover(&self.http, &self.issuer).await?;
        self.metadata.store(Some(Arc::new(metadata)));
        self.jwks
            .load()
            .await
            .map_err(|e| format!("the key set could not be loaded: {e}"))
    }

    /// Loads with retries until it succeeds, then refreshes every `period`. Runs forever.
    pub async fn keep_fresh(self: Arc<Self>, period: Duration) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.refresh().await {
                Ok(()) => {
                    tracing::info!(issuer = %self.issuer, "provider metadata loaded");
                    break;
                }
                Err(error) => {
                    tracing::warn!(issuer = %self.issuer, %error, retry_in = ?delay, "provider not ready");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        loop {
            tokio::time::sleep(period).await;
            if let Err(error) = self.refresh().await {
                tracing::warn!(issuer = %self.issuer, %error, "provider metadata refresh failed; keeping the previous metadata");
            }
        }
    }
}
