//! The OpenID Connect client: provider metadata, the authorization-code flow with PKCE,
//! token grants (code, refresh, client credentials, token exchange), revocation, and the URLs
//! for RP-initiated logout. [`challenge`] reads what an API's 401 asks of the client
//! (RFC 6750, RFC 9449, RFC 9470).
//!
//! Token validation itself lives in [`crate::jose`]. We use our own small HTTP calls rather than
//! the `openidconnect` crate: it cannot refetch a rotated key set, does not check `azp`, has no
//! leeway, no logout tokens and no token exchange, and would bring a second JOSE stack.

pub mod challenge;
pub mod client_auth;
pub mod dpop;
pub mod http;
pub mod metadata;
pub mod response;
pub mod step_up;
pub mod userinfo;

use crate::config::{OidcConfig, Par};
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
    /// `prompt` for the provider (`none`: silent sign-in), as `/bff/login` was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
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
            .field("prompt", &self.prompt)
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
            prompt: None,
            step_up: None,
        })
    }
}

/// The `prompt` values of OpenID Connect Core §3.1.2.1 a login may ask for, one at a time.
pub const PROMPTS: &[&str] = &["none", "login", "consent", "select_account"];

/// The errors an authorization response carries when the user, not the protocol, ended the
/// login: declined or cancelled (`access_denied`, RFC 6749 §4.1.2.1), or a silent sign-in
/// (`prompt=none`) that needs the user (OpenID Connect Core §3.1.2.6). The app is told which,
/// rather than shown a dead end.
pub const USER_ENDED_ERRORS: &[&str] = &[
    "access_denied",
    "login_required",
    "interaction_required",
    "consent_required",
    "account_selection_required",
];

/// `return_url` (a local path) with `login_error=<code>` added to its query, before any fragment.
pub fn with_login_error(return_url: &str, code: &str) -> String {
    let (path, fragment) = match return_url.split_once('#') {
        Some((path, fragment)) => (path, Some(fragment)),
        None => (return_url, None),
    };
    let joiner = if path.contains('?') { '&' } else { '?' };
    let code: String = url::form_urlencoded::byte_serialize(code.as_bytes()).collect();
    match fragment {
        Some(fragment) => format!("{path}{joiner}login_error={code}#{fragment}"),
        None => format!("{path}{joiner}login_error={code}"),
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

/// Accepts only local paths: one leading `/`, not `//`, no `\`, no control characters, no `.`
/// or `..` segment — checked on the raw value and again after percent-decoding, so encoded
/// variants are refused too. A dot segment would let a browser resolve `/..//evil.example/x`
/// to the path `//evil.example/x` of this origin, which a page reading its own path as a URL
/// takes for another host.
pub fn local_return_url(raw: &str) -> Option<String> {
    fn ok(path: &str) -> bool {
        let mut segments = path.split(['?', '#']).next().unwrap_or_default().split('/');
        path.starts_with('/')
            && !path.starts_with("//")
            && !path.contains('\\')
            && !path.chars().any(|c| c.is_control())
            && !segments.any(|s| s == "." || s == "..")
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
    /// Refused unless [`crate::field::sendable_token`].
    #[serde(deserialize_with = "crate::field::sendable")]
    pub access_token: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// Refused unless [`crate::field::refresh_token_ok`].
    #[serde(default, deserialize_with = "crate::field::refresh_token")]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub token_type: Option<String>,
    /// With DPoP: the thumbprint of the key whose proof went with the request, the key the
    /// provider bound the access token to. Not the provider's to say: set by the grant.
    #[serde(skip)]
    pub jkt: Option<String>,
}

/// A grant's successful answer as sent, and the thumbprint of the DPoP key that proved the
/// request (see [`TokenResponse::jkt`]).
pub struct Granted {
    pub body: serde_json::Value,
    pub jkt: Option<String>,
}

/// The longest `request_uri` a pushed authorization request's answer may name (RFC 9126 §2.2:
/// a short reference, e.g. `urn:ietf:params:oauth:request_uri:` and a random part); the browser
/// carries it in the authorization URL.
const MAX_REQUEST_URI_LEN: usize = 1024;

/// RFC 8693 §3: the token type identifier of an OAuth access token, which a token exchange
/// presents and asks for.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// An access token's lifetime when the token response names none (`expires_in` is optional,
/// RFC 6749 §5.1).
pub const DEFAULT_TOKEN_LIFETIME: u64 = 300;

/// The longest access token lifetime believed. `expires_in` may be any JSON integer up to
/// `u64::MAX`; added to the clock it would overflow (a crash, or in release builds a token that
/// expired long ago, refreshed on every request), so a longer one is taken as this.
pub const MAX_TOKEN_LIFETIME: u64 = 366 * 24 * 60 * 60;

/// The shortest access token lifetime believed. An `expires_in` of 0 (which RFC 6749 does not
/// forbid) or a few seconds would make a token due for refresh as it arrives, and every request
/// would send the provider a grant; a token is used for at least half of this instead (see
/// [`crate::session::model::AccessToken::refresh_at`]). One that truly expired sooner is
/// refused by its upstream (`invalid_token`), which replaces it early.
pub const MIN_TOKEN_LIFETIME: u64 = 5;

/// Whether a lifetime under [`MIN_TOKEN_LIFETIME`] was logged (once per process).
static SHORT_LIFETIME_WARNED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl TokenResponse {
    /// How long the access token lives, in seconds: `expires_in`, or
    /// [`DEFAULT_TOKEN_LIFETIME`] without one, at least [`MIN_TOKEN_LIFETIME`] and at most
    /// [`MAX_TOKEN_LIFETIME`]. The same for every grant: login, refresh, exchange, client.
    pub fn lifetime(&self) -> u64 {
        let stated = self.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME);
        if stated < MIN_TOKEN_LIFETIME
            && !SHORT_LIFETIME_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                expires_in = stated,
                taken_as = MIN_TOKEN_LIFETIME,
                "the provider issues access tokens that live less than {MIN_TOKEN_LIFETIME} s; \
                 each is used for {} s rather than refreshed at every request",
                MIN_TOKEN_LIFETIME / 2
            );
        }
        stated.clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME)
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("token_type", &self.token_type)
            .field("jkt", &self.jkt)
            .finish_non_exhaustive()
    }
}

/// Why a grant (or a pushed authorization request) brought nothing back. Safe to log: no
/// token, secret or provider text beyond a checked OAuth error code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GrantError {
    /// The provider refused with HTTP 400 or 401. Only `invalid_grant` means the credential is
    /// dead; what the other codes mean is the caller's decision (see `access::tokens`).
    #[error("the provider rejected the grant: {0}")]
    Rejected(Refusal),
    /// Retry later, keep the session.
    #[error("the provider is unavailable: {0}")]
    Unavailable(Unavailable),
}

impl GrantError {
    /// The provider's OAuth error code when it refused the grant with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            GrantError::Rejected(refusal) => refusal.code.as_deref(),
            GrantError::Unavailable(_) => None,
        }
    }
}

impl From<Unavailable> for GrantError {
    fn from(why: Unavailable) -> Self {
        GrantError::Unavailable(why)
    }
}

/// An error answer: its status and the OAuth error code (RFC 6749 §5.2) when it sent one that
/// is safe to repeat (see [`error_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: Option<String>,
}

impl Refusal {
    fn of(status: u16, body: &serde_json::Value) -> Refusal {
        let code = error_code(body);
        Refusal {
            status,
            code: (!code.is_empty()).then_some(code),
        }
    }
}

impl Refusal {
    /// `HTTP <status>`, and the code when there is one.
    fn with_status(&self) -> String {
        match &self.code {
            Some(code) => format!("HTTP {} {code}", self.status),
            None => format!("HTTP {}", self.status),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => f.write_str(code),
            None => write!(f, "HTTP {}", self.status),
        }
    }
}

/// Why the provider could not be used just now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// Discovery has not succeeded yet.
    #[error("metadata not loaded yet")]
    NoMetadata,
    #[error(transparent)]
    Call(#[from] http::CallError),
    /// 5xx, 429, or another error answer than 400/401 without a code.
    #[error("{}", .0.with_status())]
    Status(Refusal),
    #[error("the token response is malformed")]
    Malformed,
    /// A Bearer token where DPoP was asked for: one a thief could use (docs/security.md).
    #[error("the provider issued a token of type {found:?}, not {wanted}")]
    WrongTokenType {
        /// At most 16 characters of what it sent.
        found: Option<String>,
        wanted: &'static str,
    },
    /// RFC 8693 §2.2.1: a token exchange's answer must state in `issued_token_type` that it
    /// issued what was asked for, an access token.
    #[error("the token exchange issued {found:?}, not an access token")]
    WrongIssuedTokenType {
        /// At most 64 characters of what it stated (`None`: no string).
        found: Option<String>,
    },
    #[error(
        "oidc.par is \"always\" but the provider advertises no pushed_authorization_request_endpoint"
    )]
    NoParEndpoint,
    #[error("the pushed authorization request failed: {}", .0.with_status())]
    Pushed(Refusal),
    /// RFC 9126 §2.2: the `request_uri` the browser is to carry is empty, longer than
    /// [`MAX_REQUEST_URI_LEN`], or has bytes no URI has.
    #[error("the pushed authorization request's answer has an unusable request_uri")]
    UnusableRequestUri,
    #[error(transparent)]
    Dpop(#[from] dpop::DpopError),
    /// The client's key or assertion file cannot be used (see the error log).
    #[error("the client's credential is unusable: {0}")]
    Credential(String),
    #[error(transparent)]
    Userinfo(#[from] userinfo::UserinfoError),
    /// A login's callback: the provider's calls together (the code exchange, the key set, the
    /// UserInfo endpoint) took longer than `server.request_timeout`, each within its own limit.
    #[error("the provider's answers to the login callback took longer than {0:?} in all")]
    CallbackTimedOut(std::time::Duration),
}

/// The OAuth error code of an error answer (RFC 6749 §5.2), safe to log: printable ASCII
/// without `"` and `\\`, at most 64 characters; anything else is not repeated as it came.
fn error_code(body: &serde_json::Value) -> String {
    match body.get("error").and_then(|e| e.as_str()) {
        None => String::new(),
        Some(c)
            if c.len() <= 64
                && c.bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\') =>
        {
            c.to_string()
        }
        Some(_) => "unreadable_error_code".to_string(),
    }
}

/// The OpenID Connect client for one provider.
pub struct Oidc {
    pub provider: Arc<Provider>,
    /// The section it was started with (its restart-only keys stay in effect until a restart).
    pub config: OidcConfig,
    pub redirect_uri: String,
    /// With `[oidc] dpop`: the key and nonces every token request (and every `token_binding =
    /// "dpop"` route) proves possession with.
    pub dpop: Option<Arc<dpop::Dpop>>,
    /// How this client authenticates; loaded again on reload (a rotated secret or key file).
    credential: ArcSwap<Credential>,
}

/// Why the client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] crate::net::TlsError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

impl Oidc {
    /// The client; with `dpop` and no key file, its DPoP key is made in this process. Fails
    /// when its credential (a key or assertion file) cannot be loaded.
    pub fn new(config: OidcConfig, redirect_uri: String) -> Result<Arc<Oidc>, SetupError> {
        Oidc::build(
            config,
            redirect_uri,
            ProviderHttp::new(),
            Arc::new(dpop::ProcessKey),
        )
    }

    /// The client for a whole configuration, with its outbound trust and egress proxy; with
    /// `dpop` and no key file, its DPoP key comes from `generated` (the state layer passes one
    /// kept in the session store, shared by every replica).
    pub fn for_config(
        config: &crate::config::Config,
        generated: Arc<dyn dpop::KeySource>,
    ) -> Result<Arc<Oidc>, SetupError> {
        let http = ProviderHttp::for_config(config)?;
        Self::build(config.oidc.clone(), config.redirect_uri(), http, generated)
    }

    fn build(
        config: OidcConfig,
        redirect_uri: String,
        http: ProviderHttp,
        generated: Arc<dyn dpop::KeySource>,
    ) -> Result<Arc<Oidc>, SetupError> {
        let credential = Credential::load(&config)?;
        let provider = Provider::new(config.issuer.clone(), http, config.provider_timeout);
        let dpop = config.dpop.then(|| {
            let source: Arc<dyn dpop::KeySource> = match &config.dpop_key_file {
                Some(file) => Arc::new(dpop::KeyFile(file.clone())),
                None => generated,
            };
            Arc::new(dpop::Dpop::new(source))
        });
        Ok(Arc::new(Oidc {
            provider,
            config,
            redirect_uri,
            dpop,
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

    /// The `token_type` token responses must have: `DPoP` when proofs are sent.
    pub fn token_type(&self) -> response::TokenType {
        if self.dpop.is_some() {
            response::TokenType::Dpop
        } else {
            response::TokenType::Bearer
        }
    }

    pub fn metadata(&self) -> Result<Arc<Metadata>, GrantError> {
        self.provider
            .get()
            .ok_or(GrantError::Unavailable(Unavailable::NoMetadata))
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
                GrantError::Unavailable(Unavailable::Credential(e))
            })
    }

    /// The parameters of a login's authorization request.
    fn authorization_params(&self, login: &LoginState) -> Vec<(&str, String)> {
        let mut params = vec![
            ("response_type", "code".to_string()),
            ("client_id", self.config.client_id.clone()),
            ("redirect_uri", self.redirect_uri.clone()),
            ("scope", self.config.scopes.join(" ")),
            ("state", login.state.clone()),
            ("nonce", login.nonce.clone()),
            ("code_challenge", pkce_challenge(&login.verifier)),
            ("code_challenge_method", "S256".to_string()),
        ];
        for (k, v) in &self.config.extra_auth_params {
            // The login's own prompt replaces a configured one.
            if !(k == "prompt" && login.prompt.is_some()) {
                params.push((k, v.clone()));
            }
        }
        if let Some(prompt) = &login.prompt {
            params.push(("prompt", prompt.clone()));
        }
        if let Some(step) = &login.step_up {
            let prompt_set = params.iter().any(|(k, _)| *k == "prompt");
            params.extend(step_up::authorization_params(step, prompt_set));
        }
        params
    }

    /// The provider URL that starts a login, every parameter in its query.
    pub fn authorization_url(&self, metadata: &Metadata, login: &LoginState) -> String {
        self.authorization_endpoint_with(metadata, &self.authorization_params(login))
    }

    fn authorization_endpoint_with(
        &self,
        metadata: &Metadata,
        params: &[(&str, String)],
    ) -> String {
        let mut url = match url::Url::parse(&metadata.authorization_endpoint) {
            Ok(u) => u,
            Err(_) => return metadata.authorization_endpoint.clone(),
        };
        url.query_pairs_mut().extend_pairs(params);
        url.into()
    }

    /// Where to send the browser to log in. With pushed authorization requests (RFC 9126; `par`
    /// is `always`, or `auto` and the provider advertises the endpoint) the parameters go to
    /// the provider server-to-server and the browser carries only `client_id` and the
    /// `request_uri` it answered.
    pub async fn login_url(
        &self,
        metadata: &Metadata,
        login: &LoginState,
        par: Par,
    ) -> Result<String, GrantError> {
        let endpoint = match (par, &metadata.pushed_authorization_request_endpoint) {
            (Par::Never, _) | (Par::Auto, None) => {
                return Ok(self.authorization_url(metadata, login));
            }
            (Par::Always, None) => {
                return Err(Unavailable::NoParEndpoint.into());
            }
            (_, Some(endpoint)) => endpoint,
        };
        let params = self.authorization_params(login);
        let credentials = self.credentials(metadata)?;
        // Credentials in the body carry `client_id` already; providers refuse it twice.
        let in_body = credentials.fields.iter().any(|(k, _)| *k == "client_id");
        let form: Vec<(&str, &str)> = params
            .iter()
            .filter(|(k, _)| !in_body || *k != "client_id")
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let reply = self
            .provider
            .http
            .post_form(endpoint, &form, &credentials, self.config.provider_timeout)
            .await
            .map_err(Unavailable::Call)?;
        let request_uri = reply
            .body
            .get("request_uri")
            .and_then(|v| v.as_str())
            .filter(|_| (200..300).contains(&reply.status))
            .ok_or_else(|| Unavailable::Pushed(Refusal::of(reply.status, &reply.body)))?;
        if request_uri.is_empty()
            || request_uri.len() > MAX_REQUEST_URI_LEN
            || !request_uri.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Unavailable::UnusableRequestUri.into());
        }
        Ok(self.authorization_endpoint_with(
            metadata,
            &[
                ("client_id", self.config.client_id.clone()),
                ("request_uri", request_uri.to_string()),
            ],
        ))
    }

    async fn grant(&self, form: &[(&str, &str)]) -> Result<TokenResponse, GrantError> {
        self.read_grant(self.grant_json(form).await?)
    }

    /// A refresh, client-credentials or exchange grant's successful answer, checked.
    fn read_grant(&self, answer: Granted) -> Result<TokenResponse, GrantError> {
        self.read_grant_kept(answer).map_err(|(error, _)| error)
    }

    /// [`Oidc::read_grant`], and with a refusal of an answer that was read (a token of another
    /// type than asked for) that answer: the refresh token it rotated is still the provider's
    /// latest.
    fn read_grant_kept(
        &self,
        answer: Granted,
    ) -> Result<TokenResponse, (GrantError, Option<Box<TokenResponse>>)> {
        let mut response: TokenResponse = serde_json::from_value(answer.body)
            .map_err(|_| (Unavailable::Malformed.into(), None))?;
        response.jkt = answer.jkt;
        // A token other than the kind asked for, or of no stated kind, is refused, not used
        // (RFC 6749 §5.1: `token_type` is required; §7.1: a token of a type the client does not
        // understand is not used), as at login: a Bearer token where DPoP was asked for is one
        // a thief could use (see docs/security.md), and a DPoP-bound token sent as Bearer fails.
        let wanted = self.token_type();
        if !response
            .token_type
            .as_deref()
            .is_some_and(|t| wanted.matches(t))
        {
            let error = Unavailable::WrongTokenType {
                found: response
                    .token_type
                    .as_deref()
                    .map(|t| t.chars().take(16).collect()),
                wanted: wanted.name(),
            };
            return Err((error.into(), Some(Box::new(response))));
        }
        Ok(response)
    }

    /// A grant's successful answer as sent, or why there is none.
    async fn grant_json(&self, form: &[(&str, &str)]) -> Result<Granted, GrantError> {
        let metadata = self.metadata()?;
        let (mut reply, mut jkt) = self
            .post_token_request(&metadata.token_endpoint, form)
            .await?;
        // RFC 9449 §8: a provider that wants a nonce answers `use_dpop_nonce` with one in
        // `DPoP-Nonce`; the request is sent once more with it.
        if let Some(dpop) = &self.dpop
            && reply.status == 400
            && error_code(&reply.body) == "use_dpop_nonce"
            && reply.dpop_nonce.as_ref().is_some_and(|n| {
                dpop.remember_nonce(&self::dpop::origin(&metadata.token_endpoint), n.as_bytes())
            })
        {
            (reply, jkt) = self
                .post_token_request(&metadata.token_endpoint, form)
                .await?;
        }
        if (200..300).contains(&reply.status) {
            return Ok(Granted {
                body: reply.body,
                jkt,
            });
        }
        let refusal = Refusal::of(reply.status, &reply.body);
        if reply.status >= 500
            || reply.status == 429
            || refusal.code.is_none() && reply.status != 400 && reply.status != 401
        {
            return Err(Unavailable::Status(refusal).into());
        }
        Err(GrantError::Rejected(refusal))
    }

    /// One POST to the token endpoint, with a DPoP proof when DPoP is on (and the thumbprint
    /// of the key that signed it); a nonce the provider sends along is kept for the next proof.
    async fn post_token_request(
        &self,
        endpoint: &str,
        form: &[(&str, &str)],
    ) -> Result<(http::JsonReply, Option<String>), GrantError> {
        let (proof, jkt) = match &self.dpop {
            Some(dpop) => {
                let (proof, jkt) = dpop
                    .provider_proof(endpoint)
                    .await
                    .map_err(Unavailable::Dpop)?;
                (Some(proof), Some(jkt))
            }
            None => (None, None),
        };
        let reply = self
            .provider
            .http
            .post_form_with_proof(
                endpoint,
                form,
                &self.credentials(&*self.metadata()?)?,
                self.config.provider_timeout,
                proof.as_deref(),
            )
            .await
            .map_err(Unavailable::Call)?;
        if let (Some(dpop), Some(nonce)) = (&self.dpop, &reply.dpop_nonce) {
            dpop.remember_nonce(&self::dpop::origin(endpoint), nonce.as_bytes());
        }
        Ok((reply, jkt))
    }

    /// The authorization-code grant. Its answer is returned as sent, for
    /// [`TokenResponse::from_code_grant`] to check.
    pub async fn exchange_code(&self, code: &str, verifier: &str) -> Result<Granted, GrantError> {
        self.grant_json(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.redirect_uri),
            ("code_verifier", verifier),
        ])
        .await
    }

    /// Refresh-token grant, optionally for a resource (RFC 8707) and scopes. A refused answer
    /// that was read (a token of another type than asked for) comes with the error: the
    /// provider has spent `refresh_token`, and the one it rotated is to be kept, nothing else.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        resource: Option<&str>,
        scopes: &[String],
    ) -> Result<TokenResponse, (GrantError, Option<Box<TokenResponse>>)> {
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
        let answer = self.grant_json(&form).await.map_err(|e| (e, None))?;
        self.read_grant_kept(answer)
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
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("resource", resource),
        ];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let answer = self.grant_json(&form).await?;
        // RFC 8693 §2.2.1: `issued_token_type` is required and says what `access_token` holds;
        // anything but the access token asked for (an ID token, a refresh token, an assertion)
        // is not sent upstream as one.
        let issued = answer.body.get("issued_token_type");
        if issued.and_then(|t| t.as_str()) != Some(ACCESS_TOKEN_TYPE) {
            return Err(Unavailable::WrongIssuedTokenType {
                found: issued
                    .and_then(|t| t.as_str())
                    .map(|t| t.chars().take(64).collect()),
            }
            .into());
        }
        self.read_grant(answer)
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

    /// What a token from the provider must say: its `iss` the issuer exactly as the provider's
    /// discovery document states it (which may differ from `[oidc] issuer` by a trailing `/`,
    /// see [`metadata::read_document`]), its `aud` `audience`. Before discovery has succeeded
    /// there is neither that issuer nor a key set to check a signature with.
    pub fn id_token_expectations(
        &self,
        audience: &str,
        now: u64,
    ) -> Result<crate::jose::Expect, crate::jose::JoseError> {
        let metadata = self
            .provider
            .get()
            .ok_or(crate::jose::JoseError::KeySetUnavailable(
                crate::jose::KeySetFault::NotLoaded,
            ))?;
        Ok(crate::jose::Expect {
            issuer: metadata.issuer.clone(),
            audience: audience.to_string(),
            now,
            leeway: self.config.clock_skew.as_secs(),
            max_iat_age: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_urls_must_be_local_paths() {
        for good in [
            "/",
            "/app",
            "/app?tab=1#x",
            "/a/b%20c",
            "/a/..b/c.",
            "/a?x=/../..",
            "/a#/..//x",
        ] {
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
            "/..//evil.example/x",
            "/.//evil.example/x",
            "/a/..//evil.example",
            "/a/.",
            "/%2E%2E//evil.example",
            "/%252e%252e//evil.example",
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
    fn the_login_error_flag_goes_into_the_query_before_the_fragment() {
        assert_eq!(
            with_login_error("/", "access_denied"),
            "/?login_error=access_denied"
        );
        assert_eq!(
            with_login_error("/app?tab=2#top", "login_required"),
            "/app?tab=2&login_error=login_required#top"
        );
        assert_eq!(with_login_error("/a#b?c", "x y"), "/a?login_error=x+y#b?c");
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_logins_prompt_replaces_a_configured_one() {
        let mut config = crate::config::Config::parse(
            "[server]\npublic_url = \"https://app.example.com\"\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\nclient_secret = \"s\"\n\
             extra_auth_params = { prompt = \"consent\", access_type = \"offline\" }\n\
             [session]\nkeys = [\"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n",
            std::path::Path::new("."),
            &|_| None,
        )
        .unwrap();
        config.oidc.scopes = vec!["openid".into()];
        let oidc = Oidc::new(config.oidc.clone(), config.redirect_uri()).unwrap();
        let metadata: Metadata = serde_json::from_value(serde_json::json!({
            "issuer": "https://idp.example.com",
            "authorization_endpoint": "https://idp.example.com/auth",
            "token_endpoint": "https://idp.example.com/token",
            "jwks_uri": "https://idp.example.com/jwks",
        }))
        .unwrap();
        let prompts = |login: &LoginState| -> Vec<String> {
            url::Url::parse(&oidc.authorization_url(&metadata, login))
                .unwrap()
                .query_pairs()
                .filter(|(k, _)| k == "prompt")
                .map(|(_, v)| v.into_owned())
                .collect()
        };
        let mut login = LoginState::new(os_random, "/".into(), 0).unwrap();
        assert_eq!(prompts(&login), ["consent"]);
        login.prompt = Some("none".into());
        assert_eq!(prompts(&login), ["none"]);
    }

    /// A refresh's, a token exchange's or the client-credentials grant's answer: a token that
    /// could break the upstream request's head it is written into is refused with the answer.
    #[test]
    fn a_token_answer_with_an_unsendable_access_token_is_refused() {
        for bad in ["", "at\r\nx-injected: 1", "at x", "at\tx", "at\u{e9}"] {
            let answer = serde_json::json!({"access_token": bad, "token_type": "Bearer"});
            assert!(
                serde_json::from_value::<TokenResponse>(answer).is_err(),
                "{bad:?}"
            );
        }
        for good in ["at", "eyJhbGciOi.eyJzdWIi.c2ln", "a-b_c~d+e/f="] {
            let answer = serde_json::json!({"access_token": good, "token_type": "Bearer"});
            let read = serde_json::from_value::<TokenResponse>(answer).unwrap();
            assert_eq!(read.access_token, good);
        }
    }

    /// A provider's tokens are bounded: a refresh token is 1*VSCHAR (RFC 6749 Appendix A.17),
    /// kept in the session and sent back in a form; an access token goes into every upstream
    /// request's head. Neither may be as large as an answer may be (1 MiB): kept in each
    /// session, they would multiply what a store holds.
    #[test]
    fn a_token_answer_with_an_unusable_refresh_token_or_an_oversized_token_is_refused() {
        let long = "a".repeat(100_000);
        for bad in [
            "",
            "rt\r\nx",
            "rt\u{0}",
            "rt\u{7f}",
            "rt\u{e9}",
            long.as_str(),
        ] {
            let answer = serde_json::json!({"access_token": "at", "token_type": "Bearer",
                                            "refresh_token": bad});
            assert!(
                serde_json::from_value::<TokenResponse>(answer).is_err(),
                "refresh_token {:?}",
                bad.get(..16).unwrap_or(bad)
            );
        }
        let answer = serde_json::json!({"access_token": long, "token_type": "Bearer"});
        assert!(serde_json::from_value::<TokenResponse>(answer).is_err());
        for good in ["rt", "8xLOxBtZp8", "a b~c+d/e=f-g.h_i:j"] {
            let answer = serde_json::json!({"access_token": "at", "token_type": "Bearer",
                                            "refresh_token": good});
            let read = serde_json::from_value::<TokenResponse>(answer).unwrap();
            assert_eq!(read.refresh_token.as_deref(), Some(good));
        }
        let answer = serde_json::json!({"access_token": "at", "token_type": "Bearer",
                                        "refresh_token": null});
        let read = serde_json::from_value::<TokenResponse>(answer).unwrap();
        assert_eq!(read.refresh_token, None);
    }

    /// `expires_in` is believed between [`MIN_TOKEN_LIFETIME`] (0 would make every request
    /// refresh) and [`MAX_TOKEN_LIFETIME`] (beyond, the clock would overflow).
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_lifetime_is_believed_between_the_shortest_and_the_longest() {
        let lifetime = |expires_in: serde_json::Value| {
            let answer = serde_json::json!({"access_token": "at", "token_type": "Bearer",
                                            "expires_in": expires_in});
            serde_json::from_value::<TokenResponse>(answer)
                .unwrap()
                .lifetime()
        };
        assert_eq!(lifetime(serde_json::json!(0)), MIN_TOKEN_LIFETIME);
        assert_eq!(lifetime(serde_json::json!(1)), MIN_TOKEN_LIFETIME);
        assert_eq!(lifetime(serde_json::json!(60)), 60);
        assert_eq!(lifetime(serde_json::Value::Null), DEFAULT_TOKEN_LIFETIME);
        assert_eq!(lifetime(serde_json::json!(u64::MAX)), MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn pkce_challenge_is_base64url_sha256_of_the_verifier() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mJ0kXFyZmMrnALcy8Qm"),
            "U_K8RRfER5wq16W5nORZftRldMswjtNgCJpftOICliE"
        );
    }
}
