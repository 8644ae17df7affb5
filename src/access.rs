//! The access stage for proxied routes: feature flags (hidden → 404), sign-in (401 or a login
//! redirect), CSRF and origin checks (403), the claims policy (403), and the access token to
//! attach — refreshed before it expires, exactly once per session across requests and replicas.

use crate::config::{AuthMode, RouteConfig, TokenBinding, TokenMode};
use crate::reply::{Body, ErrorCode, Inbound};
use crate::rescue::RequestError;
use crate::session::manager::{OpenSession, Sessions};
use crate::session::model::Session;
use crate::state::{Found, LiveConfig, Shared};
use http::{HeaderValue, Request, Response, header};
use std::sync::Arc;

pub mod identity;
mod tokens;
pub use tokens::{TokenAsk, Tokens};

/// What the access stage decided for a request allowed through.
pub struct Admitted {
    /// The access token to send, if the route sends one.
    pub token: Option<Token>,
    /// `Set-Cookie` values to add to the response (a re-sealed session cookie).
    pub set_cookies: Vec<HeaderValue>,
    /// Identity headers and the assertion for the upstream (see [`identity`]); empty for routes
    /// that set none, and without a session.
    pub identity: Vec<(http::HeaderName, HeaderValue)>,
    /// The session the request was admitted with: its tunnel, or its answer's body still
    /// streaming, ends when the session ends; the access log names its user.
    pub session: Option<OpenSession>,
}

/// Where a request's access token is kept until it is written into the upstream's head.
#[derive(Clone)]
pub enum Token {
    /// The session's own, for the route's resource: lent from it ([`Token::text`]), never copied.
    Session(Arc<Session>),
    /// A token obtained for this request (a refresh) or the client-credentials grant's.
    Owned(String),
}

impl Token {
    /// The token's text, for `route` (whose [`RouteConfig::token_key`] picks the session's
    /// token).
    pub fn text(&self, route: &RouteConfig) -> Option<&str> {
        match self {
            Token::Session(session) => session
                .tokens
                .get(route.token_key())
                .map(|t| t.value.as_str()),
            Token::Owned(text) => Some(text),
        }
    }
}

/// The user's roles under `[oidc] roles_claim` (a dotted path; string or array).
pub fn roles(live: &LiveConfig, session: &Session) -> Vec<String> {
    crate::jose::claim_path(session.claims.map(), &live.config.oidc.roles_claim)
        .map(crate::jose::claim_strings)
        .unwrap_or_default()
}

/// `public || (beta && user has role)`, the rule from the project's origin.
pub fn feature_visible(live: &LiveConfig, name: &str, session: Option<&Session>) -> bool {
    let Some(feature) = live.config.features.get(name) else {
        return false;
    };
    if feature.public {
        return true;
    }
    if !feature.beta {
        return false;
    }
    match (&feature.role, session) {
        (None, Some(_)) => true,
        (Some(role), Some(session)) => roles(live, session).iter().any(|r| r == role),
        _ => false,
    }
}

/// CSRF: `X-CSRF: 1`, and no cross-site origin. Upgrades (which cannot carry custom headers)
/// must come with `Origin` equal to `public_url` or one of `cors_origins`.
// As `HeaderName` values: looked up by text, a name is parsed on every call.
const X_CSRF: http::HeaderName = http::HeaderName::from_static("x-csrf");
const SEC_FETCH_SITE: http::HeaderName = http::HeaderName::from_static("sec-fetch-site");

pub fn csrf_ok<B>(live: &LiveConfig, req: &Request<B>) -> bool {
    let server = &live.config.server;
    // The four fields in one pass over the names (the first value of each, as `get` gives):
    // three lookups by name hashed two custom names on every call.
    let (mut origin, mut csrf, mut fetch_site, mut upgrade) = (None, None, None, false);
    for (name, value) in req.headers() {
        if *name == header::ORIGIN {
            origin = origin.or(Some(value));
        } else if *name == X_CSRF {
            csrf = csrf.or(Some(value));
        } else if *name == SEC_FETCH_SITE {
            fetch_site = fetch_site.or(Some(value));
        } else if *name == header::UPGRADE {
            upgrade = true;
        }
    }
    let origin = origin.and_then(|v| v.to_str().ok());
    let allowed_origin =
        |o: &str| o == server.public_origin || server.cors_origins.iter().any(|c| c == o);
    // A WebSocket handshake (a `GET`) cannot carry `X-CSRF`: the `Origin` alone decides. Any
    // other method asking to switch protocols is held to the same rule as every request.
    if upgrade
        && req.method() == http::Method::GET
        && crate::proxy::headers::upgrade_protocol(req.headers()).is_some()
    {
        return origin.is_some_and(allowed_origin);
    }
    if csrf.is_none_or(|v| v.as_bytes() != b"1") {
        return false;
    }
    match origin {
        Some(o) => allowed_origin(o),
        None => fetch_site.is_none_or(|v| v.as_bytes() != b"cross-site"),
    }
}

/// The request's `Origin` when it is one of `[server] cors_origins`: such origins may call
/// Vestibule (and the routes behind it) with credentials from the browser.
pub fn cors_origin(live: &LiveConfig, headers: &http::HeaderMap) -> Option<HeaderValue> {
    // No origin listed (the default): nothing to look up.
    if live.config.server.cors_origins.is_empty() {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    live.config
        .server
        .cors_origins
        .iter()
        .any(|c| c == text)
        .then(|| origin.clone())
}

/// Adds the CORS headers for an allowed origin to any response (also error responses, so the
/// calling app can read them).
pub fn add_cors_headers(headers: &mut http::HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Answers a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
/// itself: 204 for an origin listed in `cors_origins`, 403 for any other. `None`: not a
/// preflight, route it normally.
pub fn preflight<B>(live: &LiveConfig, req: &Request<B>) -> Option<Response<Body>> {
    let headers = req.headers();
    if req.method() != http::Method::OPTIONS
        || !headers.contains_key(header::ORIGIN)
        || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let Some(origin) = cors_origin(live, headers) else {
        return Some(ErrorCode::Csrf.json(&[]));
    };
    let mut response = Response::new(crate::reply::empty());
    *response.status_mut() = http::StatusCode::NO_CONTENT;
    let h = response.headers_mut();
    add_cors_headers(h, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE"),
    );
    // The custom CSRF header is the reason for the preflight; the others are what SPAs send.
    let mut allowed = String::from("X-CSRF, Content-Type, Accept, Accept-Language");
    if let Some(requested) = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
    {
        for name in requested
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            if !allowed.split(", ").any(|a| a.eq_ignore_ascii_case(name)) {
                allowed.push_str(", ");
                allowed.push_str(name);
            }
        }
    }
    if let Ok(value) = HeaderValue::from_str(&allowed) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(response)
}

/// Claims the policy is checked against: the user's validated JWT access token for the route's
/// resource when it is one, else the ID token claims kept in the session. `token` is the
/// user's own token or `None`: a client-credentials token (a `token = "client"` route's) speaks
/// for Vestibule's service account, and its roles are never the user's. Which claims decide
/// depends on the token alone, never on the provider being reachable: a token that cannot be
/// checked now (no metadata, the key set unavailable) is a 503, not the session's claims, which
/// may say what the token no longer does.
async fn policy_claims(
    oidc: &crate::oidc::Oidc,
    now: u64,
    route: &RouteConfig,
    session: &Session,
    token: Option<&str>,
) -> Result<serde_json::Map<String, serde_json::Value>, RequestError> {
    if let (Some(resource), Some(token)) = (&route.resource, token)
        && crate::jose::looks_like_jwt(token)
    {
        let checked = match oidc.id_token_expectations(resource, now) {
            Ok(expect) => {
                crate::jose::validate_access_token(&oidc.provider.jwks, token, &expect).await
            }
            Err(error) => Err(error),
        };
        match checked {
            Ok(claims) => return Ok(claims),
            Err(crate::jose::JoseError::KeySetUnavailable(fault)) => {
                return Err(RequestError::KeySetUnavailable(fault));
            }
            // Not a token of the provider's for this resource: the session's claims decide.
            Err(_) => {}
        }
    }
    Ok(session.claims.map().clone())
}

/// Whether a request of an open stream of `route` (a tunnel, a streamed answer) would still be
/// let through with `session` (the latest a read of it found; `None`: the stream was opened
/// without one): its `feature` (404), a sign-in (401: `auth = "required"`, a route sending the
/// user's token), its step-up (`acr_values`, `max_age` at `now`) and its `require` (403). The
/// stream closes once it would not. The claims are those a request would be checked against:
/// the user's token for the route as the session holds it, else the session's. A check that
/// cannot be made now (the key set unavailable) closes nothing.
pub async fn still_admits(
    oidc: &crate::oidc::Oidc,
    live: &LiveConfig,
    route: &RouteConfig,
    session: Option<&Session>,
    now: u64,
) -> bool {
    if let Some(feature) = &route.feature
        && !feature_visible(live, feature, session)
    {
        return false;
    }
    let Some(session) = session else {
        // A step-up route requires a sign-in too.
        return route.auth != AuthMode::Required
            && route.token != TokenMode::User
            && route.require.is_empty();
    };
    if let Some(step) = &route.step_up {
        let skew = live.config.oidc.clock_skew.as_secs();
        if crate::oidc::step_up::check(step, session.claims.map(), now, now, skew).is_err() {
            return false;
        }
    }
    if route.require.is_empty() {
        return true;
    }
    let users = matches!(route.token, TokenMode::User | TokenMode::UserOrClient);
    let token = users
        .then(|| session.tokens.get(route.token_key()))
        .flatten()
        .map(|t| t.value.as_str());
    match policy_claims(oidc, now, route, session, token).await {
        Ok(claims) => missing_requirements(live, route, &claims).is_empty(),
        Err(_) => true,
    }
}

/// Whether the same claims say their `email` was verified: `email_verified` true (OpenID
/// Connect Core §5.1), or `"true"` as some providers write it (Cognito).
fn email_verified(claims: &serde_json::Map<String, serde_json::Value>) -> bool {
    match claims.get("email_verified") {
        Some(serde_json::Value::Bool(verified)) => *verified,
        Some(serde_json::Value::String(text)) => text == "true",
        _ => false,
    }
}

fn missing_requirements(
    live: &LiveConfig,
    route: &RouteConfig,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Vec<String> {
    route
        .require
        .iter()
        .filter(|(claim, wanted)| {
            let path = if claim == "roles" {
                live.config.oidc.roles_claim.as_str()
            } else {
                claim.as_str()
            };
            // An address nobody confirmed is whatever the user typed in at many providers.
            if claim == "email" && !email_verified(claims) {
                return true;
            }
            let have = crate::jose::claim_path(claims, path)
                .map(crate::jose::claim_strings)
                .unwrap_or_default();
            !wanted.iter().any(|w| have.contains(w))
        })
        .map(|(claim, _)| claim.clone())
        .collect()
}

/// How the route's access token is introduced in `Authorization`, space included: `DPoP `
/// for `token_binding = "dpop"` (RFC 9449 §7.1), `Bearer ` otherwise.
pub fn authorization_scheme(route: &RouteConfig) -> &'static str {
    match route.token_binding {
        TokenBinding::None => "Bearer ",
        TokenBinding::Dpop => "DPoP ",
    }
}

/// The access stage: who may pass, and the token to attach. The caller turns a refusal into its
/// response ([`RequestError::respond`]), a page for navigations.
pub async fn admit(
    app: &Shared,
    tokens: &Tokens,
    sessions: &Arc<Sessions>,
    live: &LiveConfig,
    route: &RouteConfig,
    req: &Request<Inbound>,
) -> Result<Admitted, RequestError> {
    let needs_session = route.auth != AuthMode::None
        || route.feature.is_some()
        || route.sets_identity()
        || matches!(route.token, TokenMode::User | TokenMode::UserOrClient);
    // The clock read once for the whole stage (~25 ns a read): the session's expiry, its
    // touch, a step-up's age, the token's freshness and identity headers all take this time.
    let now = needs_session.then(|| app.clock.now());
    let clock = |now: Option<u64>| now.unwrap_or_else(|| app.clock.now());
    // A cached session is had without a future: only a load from the store writes one (and
    // nothing of the lookup is held across that await).
    // (`ask` is moved out where it is read: taken, all of it would be copied, once per
    // request, into this future's state, cold at many connections.)
    let (mut loaded, mut ask) = (None, None);
    if let Some(now) = now {
        match app.cached_session(sessions, live, req.headers(), now) {
            Found::Session(found) => loaded = found,
            Found::Ask(store) => ask = Some((store, now)),
        }
    }
    if let Some((store, now)) = ask {
        loaded = app
            .stored_session(sessions, live, req.headers(), store, now)
            .await?;
    }
    if let Some(feature) = &route.feature
        && !feature_visible(live, feature, loaded.as_ref().map(|l| &*l.session))
    {
        return Err(RequestError::NotFound);
    }
    // A route that requires a step-up asks for it on its first login too.
    let login_url = || {
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        crate::oidc::step_up::login_url(
            &live.config.server.bff_prefix,
            path_and_query,
            route.step_up.as_ref(),
        )
    };
    if route.auth == AuthMode::Required && loaded.is_none() {
        return Err(RequestError::Unauthenticated {
            login_url: login_url(),
            redirect: true,
        });
    }
    if let (Some(step), Some(l)) = (&route.step_up, &loaded)
        && let at = clock(now)
        && crate::oidc::step_up::check(
            step,
            l.session.claims.map(),
            at,
            at,
            live.config.oidc.clock_skew.as_secs(),
        )
        .is_err()
    {
        return Err(RequestError::StepUp {
            login_url: login_url(),
            step: step.clone(),
            redirect: true,
        });
    }
    if route.csrf && !csrf_ok(live, req) {
        return Err(RequestError::Csrf);
    }
    let mut set_cookies = Vec::new();
    if let Some(l) = &mut loaded {
        if l.reseal
            && let Ok(value) = sessions.reseal(l)
        {
            let s = &live.config.session;
            set_cookies.extend(crate::cookies::set_cookie(
                s,
                &s.cookie_name,
                &value,
                Some(s.absolute_timeout),
                false,
            ));
        }
        if sessions.touch_due(l, clock(now)) {
            let _ = sessions.touch(l, clock(now)).await;
        }
    }
    // Whether the token below is the user's (else Vestibule's own, or none): only the user's
    // may stand for the user's claims in the policy.
    let users_token =
        loaded.is_some() && matches!(route.token, TokenMode::User | TokenMode::UserOrClient);
    let token = match (route.token, &loaded) {
        (TokenMode::None, _) => None,
        (TokenMode::User, Some(l)) | (TokenMode::UserOrClient, Some(l)) => Some(
            match tokens::fresh_user_token(app, live, l, route, clock(now)) {
                Some(fresh) => std::borrow::Cow::Borrowed(fresh),
                None => {
                    let ask = tokens::TokenAsk {
                        app,
                        sessions,
                        live,
                        loaded: l,
                        route,
                    };
                    tokens.user_token(&ask, clock(now)).await?
                }
            },
        ),
        (TokenMode::User, None) => {
            return Err(RequestError::Unauthenticated {
                login_url: login_url(),
                redirect: false,
            });
        }
        (TokenMode::Client, _) | (TokenMode::UserOrClient, None) => {
            // Boxed: the client-credentials future (2.4 KB) would otherwise size every
            // request's `admit`, which is moved as the request's future is built.
            Some(std::borrow::Cow::Owned(
                crate::reply::in_box(|| tokens.client_token(app, route)).await?,
            ))
        }
    };
    if !route.require.is_empty() {
        let Some(l) = &loaded else {
            return Err(RequestError::Forbidden {
                missing: Vec::new(),
            });
        };
        let users = token.as_deref().filter(|_| users_token);
        let claims = policy_claims(&app.oidc, app.clock.now(), route, &l.session, users).await?;
        let missing = missing_requirements(live, route, &claims);
        if !missing.is_empty() {
            return Err(RequestError::Forbidden { missing });
        }
    }
    // The session's token is lent, not copied: the request writes it from the session.
    let token = token.map(|t| match (t, &loaded) {
        (std::borrow::Cow::Borrowed(_), Some(l)) => Token::Session(l.session.clone()),
        (t, _) => Token::Owned(t.into_owned()),
    });
    let identity = match &loaded {
        Some(l) if route.sets_identity() => identity::headers(live, route, &l.session, clock(now))?,
        _ => Vec::new(),
    };
    Ok(Admitted {
        token,
        set_cookies,
        identity,
        session: loaded,
    })
}
