//! The OpenID Connect client: provider metadata, the authorization-code flow with PKCE,
//! token grants (code, refresh, client credentials, token exchange), revocation, and the URLs
//! for RP-initiated logout.
//!
//! Token validation itself lives in [`crate::jose`]. We use our own small HTTP calls rather than
//! the `openidconnect` crate: it cannot refetch a rotated key set, does not check `azp`, has no
//! leeway, no logout tokens and no token exchange, and would bring a second JOSE stack.

pub mod client_auth;
pub mod http;
pub mod metadata;
pub mod response;
pub mod step_up;

use crate::config::OidcConfig;
use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use client_auth::{ClientCredentials, Credential, CredentialError};
use http::ProviderHttp;
use metadata::{Metadata, Provider};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::sync::Arc;

/// What the login cookie carries between `/login` and `/callback`.
#[derive(Clone, Serialize, Deserialize)]
pub struct LoginState {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub return_url: String,
    pub created: u64,
    /// A step-up login: what the sign-in must satisfy, asked of the provider and checked on
    /// the returned ID token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_up: Option<crate::config::StepUp>,
}

impl std::fmt::Debug for LoginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginState")
            .field("return_url", &self.return_url)
            .field("step_up", &self.step_up)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl LoginState {
    /// A new login's state, nonce and PKCE verifier, drawn from `random`.
    pub fn new(
        random: FillRandom,
        return_url: String,
        created: u64,
    ) -> Result<LoginState, RandomError> {
        Ok(LoginState {
            state: random_token_from(random, 32)?,
            nonce: random_token_from(random, 32)?,
            verifier: random_token_from(random, 48)?,
            return_url,
            created,
            step_up: None,
        })
    }
}

/// The random source failed: nothing that must be unguessable can be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random source failed")]
pub struct RandomError;

/// A source of random bytes: [`os_random`], or a failing one in tests.
pub type FillRandom = fn(&mut [u8]) -> Result<(), RandomError>;

/// The operating system's random source.
pub fn os_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(|_| RandomError)
}

/// A random URL-safe string of `bytes` random bytes from the operating system.
pub fn random_token(bytes: usize) -> Result<String, RandomError> {
    random_token_from(os_random, bytes)
}

/// A random URL-safe string of `bytes` random bytes from `random`.
pub fn random_token_from(random: FillRandom, bytes: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; bytes];
    random(&mut buf)?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// Accepts only local paths: one leading `/`, not `//`, no `\`, no control characters — checked
/// on the raw value and again after percent-decoding, so encoded variants are refused too.
pub fn local_return_url(raw: &str) -> Option<String> {
    fn ok(path: &str) -> bool {
        path.starts_with('/')
            && !path.starts_with("//")
            && !path.contains('\\')
            && !path.chars().any(|c| c.is_control())
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    let twice = percent_encoding::percent_decode_str(&decoded)
        .decode_utf8()
        .ok()?;
    (ok(raw) && ok(&decoded) && ok(&twice)).then(|| raw.to_string())
}

/// A successful token endpoint answer.
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The provider refused the grant with HTTP 400 or 401: the OAuth error code (RFC 6749
    /// §5.2), or `HTTP 4xx` without one. Only `invalid_grant` means the credential is dead;
    /// what the other codes mean is the caller's decision (see `access::tokens`).
    #[error("the provider rejected the grant: {0}")]
    Rejected(String),
    /// The provider is down, slow, answered 5xx or 429, or answered something unparsable: retry
    /// later, keep the session. The text names the provider's error code when it sent one.
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
}

impl GrantError {
    /// The provider's OAuth error code when it refused the grant with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            GrantError::Rejected(code) if !code.starts_with("HTTP ") => Some(code),
            _ => None,
        }
    }
}

/// The OpenID Connect client for one provider.
pub struct Oidc {
    pub provider: Arc<Provider>,
    pub config: OidcConfig,
    pub redirect_uri: String,
    /// How this client authenticates; replaced on reload (a rotated key file).
    credential: ArcSwap<Credential>,
}

impl Oidc {
    /// The client for `config`; fails when its credential (a key or assertion file) cannot be
    /// loaded.
    pub fn new(config: OidcConfig, redirect_uri: String) -> Result<Arc<Oidc>, CredentialError> {
        let credential = Credential::load(&config)?;
        let provider = Provider::new(config.issuer.clone(), ProviderHttp::new());
        Ok(Arc::new(Oidc {
            provider,
            config,
            redirect_uri,
            credential: ArcSwap::from_pointee(credential),
        }))
    }

    /// Puts a credential loaded again (on reload) in effect for the next request.
    pub fn set_credential(&self, credential: Credential) {
        self.credential.store(Arc::new(credential));
    }

    /// The credential in effect.
    pub fn credential(&self) -> Arc<Credential> {
        self.credential.load_full()
    }

    pub fn metadata(&self) -> Result<Arc<Metadata>, GrantError> {
        self.provider
            .get()
            .ok_or_else(|| GrantError::Unavailable("metadata not loaded yet".into()))
    }

    /// The authentication parts of one request; an assertion we sign names the token endpoint
    /// as its audience (OpenID Connect Core §9; also for revocation, which most providers
    /// accept). Its time is the system's: the provider checks it against its own clock.
    fn credentials(&self, metadata: &Metadata) -> Result<ClientCredentials, GrantError> {
        self.credential
            .load()
            .request_parts(
                &self.config.client_id,
                &metadata.token_endpoint,
                crate::clock::now(),
            )
            .map_err(|e| {
                tracing::error!(error = %e, "the client's credential is unusable");
                GrantError::Unavailable(e)
            })
    }

    /// The provider URL that starts a login.
    pub fn authorization_url(&self, metadata: &Metadata, login: &LoginState) -> String {
        let mut url = match url::Url::parse(&metadata.authorization_endpoint) {
            Ok(u) => u,
            Err(_) => return metadata.authorization_endpoint.clone(),
        };
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.config.client_id)
                .append_pair("redirect_uri", &self.redirect_uri)
                .append_pair("scope", &self.config.scopes.join(" "))
                .append_pair("state", &login.state)
                .append_pair("nonce", &login.nonce)
                .append_pair("code_challenge", &pkce_challenge(&login.verifier))
                .append_pair("code_challenge_method", "S256");
            for (k, v) in &self.config.extra_auth_params {
                q.append_pair(k, v);
            }
            if let Some(step) = &login.step_up {
                let prompt_set = self
                    .config
                    .extra_auth_params
                    .iter()
                    .any(|(k, _)| k == "prompt");
                for (k, v) in step_up::authorization_params(step, prompt_set) {
                    q.append_pair(k, &v);
                }
            }
        }
        url.into()
    }

    async fn grant(&self, form: &[(&str, &str)]) -> Result<TokenResponse, GrantError> {
        serde_json::from_value(self.grant_json(form).await?)
            .map_err(|_| GrantError::Unavailable("the token response is malformed".into()))
    }

    /// A grant's successful answer as sent, or why there is none.
    async fn grant_json(&self, form: &[(&str, &str)]) -> Result<serde_json::Value, GrantError> {
        let metadata = self.metadata()?;
        let credentials = self.credentials(&metadata)?;
        let reply = self
            .provider
            .http
            .post_form(
                &metadata.token_endpoint,
                form,
                &credentials,
                self.config.provider_timeout,
            )
            .await
            .map_err(|e| GrantError::Unavailable(e.to_string()))?;
        if (200..300).contains(&reply.status) {
            return Ok(reply.body);
        }
        // RFC 6749 §5.2 limits the code to printable ASCII without `"` and `\`; anything else,
        // or anything long, is not logged as it came.
        let code = match reply.body.get("error").and_then(|e| e.as_str()) {
            None => String::new(),
            Some(c)
                if c.len() <= 64
                    && c.bytes()
                        .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\') =>
            {
                c.to_string()
            }
            Some(_) => "unreadable_error_code".to_string(),
        };
        if reply.status >= 500
            || reply.status == 429
            || code.is_empty() && reply.status != 400 && reply.status != 401
        {
            return Err(GrantError::Unavailable(
                format!("HTTP {} {code}", reply.status)
                    .trim_end()
                    .to_string(),
            ));
        }
        Err(GrantError::Rejected(if code.is_empty() {
            format!("HTTP {}", reply.status)
        } else {
            code
        }))
    }

    /// The authorization-code grant. Its answer is returned as sent, for
    /// [`TokenResponse::from_code_grant`] to check.
    pub async fn exchange_code(
        &self,
        code: &str,
        verifier: &str,
    ) -> Result<serde_json::Value, GrantError> {
        self.grant_json(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.redirect_uri),
            ("code_verifier", verifier),
        ])
        .await
    }

    /// Refresh-token grant, optionally for a resource (RFC 8707) and scopes.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        resource: Option<&str>,
        scopes: &[String],
    ) -> Result<TokenResponse, GrantError> {
        let scope = scopes.join(" ");
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        if let Some(r) = resource {
            form.push(("resource", r));
        }
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        self.grant(&form).await
    }

    pub async fn client_credentials(
        &self,
        resource: Option<&str>,
        scopes: &[String],
    ) -> Result<TokenResponse, GrantError> {
        let scope = scopes.join(" ");
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(r) = resource {
            form.push(("resource", r));
        }
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        self.grant(&form).await
    }

    /// RFC 8693 token exchange: trade the user's access token for one with `resource` audience.
    pub async fn exchange_token(
        &self,
        subject_token: &str,
        resource: &str,
        scopes: &[String],
    ) -> Result<TokenResponse, GrantError> {
        let scope = scopes.join(" ");
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject_token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("resource", resource),
        ];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        self.grant(&form).await
    }

    /// RFC 7009 revocation; failures are logged, never fatal.
    pub async fn revoke(&self, token: &str, hint: &str) {
        let Some(metadata) = self.provider.get() else {
            return;
        };
        let Some(endpoint) = &metadata.revocation_endpoint else {
            return;
        };
        let Ok(credentials) = self.credentials(&metadata) else {
            return;
        };
        match self
            .provider
            .http
            .post_form(
                endpoint,
                &[("token", token), ("token_type_hint", hint)],
                &credentials,
                self.config.provider_timeout,
            )
            .await
        {
            Ok(reply) if (200..300).contains(&reply.status) => {}
            Ok(reply) => tracing::warn!(status = reply.status, hint, "token revocation refused"),
            Err(error) => tracing::warn!(%error, hint, "token revocation failed"),
        }
    }

    /// Where to send the browser after logout: the provider's end-session endpoint when it has
    /// one, else the configured local page.
    pub fn end_session_url(&self, id_token: Option<&str>, post_logout_uri: &str) -> String {
        let Some(metadata) = self.provider.get() else {
            return self.config.post_logout_redirect.clone();
        };
        let Some(endpoint) = &metadata.end_session_endpoint else {
            return self.config.post_logout_redirect.clone();
        };
        let Ok(mut url) = url::Url::parse(endpoint) else {
            return self.config.post_logout_redirect.clone();
        };
        {
            let mut q = url.query_pairs_mut();
            if let Some(hint) = id_token {
                q.append_pair("id_token_hint", hint);
            }
            q.append_pair("post_logout_redirect_uri", post_logout_uri);
            q.append_pair("client_id", &self.config.client_id);
        }
        url.into()
    }

    pub fn id_token_expectations(&self, audience: &str, now: u64) -> crate::jose::Expect {
        crate::jose::Expect {
            issuer: self
                .config
                .issuer
                .as_str()
                .trim_end_matches('/')
                .to_string(),
            audience: audience.to_string(),
            now,
            leeway: self.config.clock_skew.as_secs(),
            max_iat_age: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_urls_must_be_local_paths() {
        for good in ["/", "/app", "/app?tab=1#x", "/a/b%20c"] {
            assert!(local_return_url(good).is_some(), "{good}");
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "javascript:alert(1)",
            "evil",
            "",
            "/%2F%2Fevil.example",
            "%2F%2Fevil.example",
            "/%5Cevil.example",
            "/%252F%252Fevil.example",
            "/\tevil",
            "\\\\evil",
        ] {
            assert!(local_return_url(bad).is_none(), "{bad}");
        }
    }

    fn failing(_: &mut [u8]) -> Result<(), RandomError> {
        Err(RandomError)
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_failing_random_source_makes_no_token_and_no_login() {
        assert_eq!(random_token_from(failing, 32), Err(RandomError));
        assert!(LoginState::new(failing, "/".into(), 0).is_err());
        let login = LoginState::new(os_random, "/".into(), 0).unwrap();
        assert_eq!(login.state.len(), 43);
        assert_ne!(login.state, login.nonce);
        assert_ne!(login.state, URL_SAFE_NO_PAD.encode([0u8; 32]));
    }

    #[test]
    fn pkce_challenge_is_base64url_sha256_of_the_verifier() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mJ0kXFyZmMrnALcy8Qm"),
            "U_K8RRfER5wq16W5nORZftRldMswjtNgCJpftOICliE"
        );
    }
}
