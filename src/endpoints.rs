//! The BFF endpoints under `bff_prefix`: login, callback, user, logout, back-channel logout,
//! session listing and the session-ended event stream.

use crate::access::Tokens;
use crate::cookies;
use crate::limits::{Endpoint, Verdict, client_address};
use crate::oidc::response::check_authorization_iss;
use crate::oidc::userinfo::UserinfoError;
use crate::oidc::{
    GrantError, LoginState, PROMPTS, TokenResponse, USER_ENDED_ERRORS, local_return_url, os_random,
    with_login_error,
};
use crate::reply::{Body, ErrorCode, Inbound, Reader, json_response, redirect};
use crate::rescue::RequestError;
use crate::session::manager::{OpenSession, Woken};
use crate::session::model::{AccessToken, Session};
use crate::state::{LiveConfig, Shared};
use crate::telemetry::trace::TARGET;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use sha2::Digest;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tracing::Instrument;

const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Logins a browser may have begun and not finished at once (tabs signing in side by side).
const PENDING_LOGINS: usize = 4;
/// The longest `returnUrl`: it travels in the login cookie, which browsers keep only up to
/// 4096 bytes of name and value.
pub const MAX_RETURN_URL_LEN: usize = 2048;
/// Browsers drop a cookie whose name and value exceed this.
const MAX_COOKIE_LEN: usize = 4096;
/// How long the way out of a script's logout (see [`logout_end`]) waits for the browser.
const LOGOUT_END_TTL: Duration = Duration::from_secs(60);

fn query_param(req: &Request<Inbound>, name: &str) -> Option<String> {
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The first of `names` that the request's query carries more than once. RFC 6749 §3.1: request
/// and response parameters MUST NOT be included more than once; a repeated one is tampering
/// (which copy counts would depend on who reads it), never a choice to make.
fn repeated<'n>(req: &Request<Inbound>, names: &[&'n str]) -> Option<&'n str> {
    let query = req.uri().query().unwrap_or_default();
    names.iter().copied().find(|name| {
        url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == name)
            .nth(1)
            .is_some()
    })
}

/// The parameters of an authorization response the callback reads.
const CALLBACK_PARAMETERS: [&str; 4] = ["code", "state", "iss", "error"];

/// The step-up parameters of `/bff/login` ([`crate::oidc::step_up::from_params`]).
const STEP_UP_PARAMETERS: [&str; 2] = ["acr_values", "max_age"];

fn hash_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Answers a request below `bff_prefix`; `peer` is the address of the connection. An endpoint's
/// error is a page for the endpoints a browser navigates to (login, the callback, the logout
/// link), JSON for the others.
pub async fn handle(
    app: &Shared,
    tokens: &Tokens,
    live: &LiveConfig,
    req: Request<Inbound>,
    rest: &str,
    peer: IpAddr,
) -> Response<Body> {
    let reader = Reader::of(req.headers());
    if let Some(limited) = over_limit(app, live, &req, rest, peer) {
        return limited;
    }
    let (reader, answer) = match (req.method().clone(), rest) {
        (Method::GET, "/login") => {
            let span = tracing::trace_span!(target: TARGET, "login");
            let answer = login(app, live, &req);
            let answer = counted(span, "vestibule_logins_total", &[], answer);
            (reader, answer.await)
        }
        (Method::GET, "/callback") => {
            let span = tracing::trace_span!(target: TARGET, "callback");
            let answer = callback(app, live, &req);
            let answer = counted(span, "vestibule_callbacks_total", &[], answer);
            (Reader::Page, answer.await)
        }
        (Method::GET, "/user") => (Reader::Script, user(app, live, &req).await),
        // A link the browser follows, or the SPA's script.
        (method @ (Method::GET | Method::POST), "/logout") => {
            let (via, label, reader) = if method == Method::GET {
                (LogoutVia::Link, "link", Reader::Page)
            } else {
                (LogoutVia::Script, "script", Reader::Script)
            };
            let span = tracing::trace_span!(target: TARGET, "logout");
            let answer = logout(app, tokens, live, &req, via);
            let labels = [("via", label)];
            let answer = counted(span, "vestibule_logouts_total", &labels, answer);
            (reader, answer.await)
        }
        (Method::GET, "/logout/end") => (Reader::Page, Ok(logout_end(app, live, &req))),
        (Method::POST, "/backchannel-logout") => {
            let pace = crate::state::body_pace(&live.config);
            let span = tracing::trace_span!(target: TARGET, "backchannel logout");
            let answer = backchannel_logout(app, req, pace);
            let labels = [("via", "backchannel")];
            let answer = counted(span, "vestibule_logouts_total", &labels, answer);
            (Reader::Script, answer.await)
        }
        (Method::GET, "/sessions") => (Reader::Script, list_sessions(app, live, &req).await),
        (Method::DELETE, path) if path.starts_with("/sessions/") => {
            let handle = &path["/sessions/".len()..];
            (Reader::Script, end_session(app, live, &req, handle).await)
        }
        (Method::GET, "/session-events") => (Reader::Script, session_events(app, live, &req).await),
        _ => (reader, Err(RequestError::NotFound)),
    };
    answer.unwrap_or_else(|error| error.respond(reader))
}

/// Runs an endpoint's `work` in its trace `span` and counts the answer (see [`count`]).
async fn counted(
    span: tracing::Span,
    series: &'static str,
    labels: &[(&'static str, &'static str)],
    work: impl Future<Output = Result<Response<Body>, RequestError>>,
) -> Result<Response<Body>, RequestError> {
    let answer = work.instrument(span).await;
    count(series, labels, &answer);
    answer
}

/// Counts one answer of an endpoint in `series`, by outcome (`ok` or why not, from a fixed
/// list: the label never carries request data).
fn count(
    series: &'static str,
    labels: &[(&'static str, &'static str)],
    answer: &Result<Response<Body>, RequestError>,
) {
    let outcome = match answer {
        Ok(_) => "ok",
        Err(error) => outcome(error),
    };
    let mut all: Vec<metrics::Label> = labels
        .iter()
        .map(|(k, v)| metrics::Label::from_static_parts(k, v))
        .collect();
    all.push(metrics::Label::from_static_parts("outcome", outcome));
    metrics::counter!(series, all).increment(1);
}

/// The reasons a login fails that the metrics name (docs/errors.md); others count as
/// `login_failed`.
const LOGIN_FAILURES: &[&str] = &[
    "provider_error",
    "callback_incomplete",
    "callback_parameter_repeated",
    "login_state_missing",
    "login_state_expired",
    "state_replayed",
    "iss_mismatch",
    "iss_missing",
    "code_rejected",
    "id_token_missing",
    "provider_session_ended",
];

/// Why an endpoint refused, as a metric label.
fn outcome(error: &RequestError) -> &'static str {
    match error {
        RequestError::LoginFailed { reason, .. } => {
            if let Some(known) = LOGIN_FAILURES.iter().find(|r| **r == reason) {
                known
            } else if reason.starts_with("id_token_") {
                "id_token_invalid"
            } else {
                "token_response_invalid"
            }
        }
        RequestError::Store(_) => "store_unavailable",
        RequestError::Provider(_) => "provider_unavailable",
        RequestError::InvalidReturnUrl => "invalid_return_url",
        RequestError::LogoutRejected(_) | RequestError::LogoutNotForm => "logout_token_rejected",
        RequestError::Csrf => "csrf",
        RequestError::SidMismatch { .. } => "sid_mismatch",
        RequestError::Random(_) | RequestError::Internal(_) => "internal",
        _ => "refused",
    }
}

/// The name of the endpoint `rest` (the path below `bff_prefix`) for metrics and the access
/// log: one label per endpoint, whatever the request's path says.
pub fn label(method: &Method, rest: &str) -> &'static str {
    match (method, rest) {
        (_, "/login") => "bff:/login",
        (_, "/callback") => "bff:/callback",
        (_, "/user") => "bff:/user",
        (_, "/logout") => "bff:/logout",
        (_, "/logout/end") => "bff:/logout/end",
        (_, "/backchannel-logout") => "bff:/backchannel-logout",
        (_, "/sessions") => "bff:/sessions",
        (&Method::DELETE, path) if path.starts_with("/sessions/") => "bff:/sessions/*",
        (_, "/session-events") => "bff:/session-events",
        _ => "bff:other",
    }
}

/// 429 with `Retry-After` when the client (after trusted proxies) has used up its budget for
/// one of the endpoints anyone may call; `None` for every other request.
fn over_limit(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
    rest: &str,
    peer: IpAddr,
) -> Option<Response<Body>> {
    let limits = &live.config.limits;
    let (endpoint, per_minute) = match (req.method(), rest) {
        (&Method::GET, "/login") => (Endpoint::Login, limits.login_per_minute),
        (&Method::GET, "/callback") => (Endpoint::Callback, limits.callback_per_minute),
        (&Method::POST, "/backchannel-logout") => (
            Endpoint::BackchannelLogout,
            limits.backchannel_logout_per_minute,
        ),
        _ => return None,
    };
    let trusted = &live.config.server.trusted_proxies;
    let client = client_address(peer, req.headers(), trusted);
    let Verdict::Limited { retry_after } =
        app.limiter
            .check(endpoint, client, per_minute, Instant::now())
    else {
        return None;
    };
    metrics::counter!("vestibule_rate_limited_total", "endpoint" => endpoint.name()).increment(1);
    tracing::debug!(endpoint = endpoint.name(), %client, "rate limited");
    let mut response = ErrorCode::RateLimited.respond(Reader::of(req.headers()));
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs()),
    );
    Some(response)
}

async fn login(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<Response<Body>, RequestError> {
    if repeated(req, &["returnUrl"]).is_some() {
        return Err(RequestError::InvalidReturnUrl);
    }
    // Which copy of a step-up parameter counts is not Vestibule's to pick either (a link whose
    // first copy asks for the strong sign-in): refused, no login begun. (`prompt`: below.)
    if let Some(name) = repeated(req, &STEP_UP_PARAMETERS) {
        tracing::debug!(parameter = name, "login refused: a parameter repeated");
        return Err(RequestError::BadRequest);
    }
    let raw = query_param(req, "returnUrl").unwrap_or_else(|| "/".into());
    let Some(return_url) = local_return_url(&raw).filter(|u| u.len() <= MAX_RETURN_URL_LEN) else {
        return Err(RequestError::InvalidReturnUrl);
    };
    let prompt = prompt_param(req)?;
    // A step-up login (a route's or an upstream's login_url): what the sign-in must satisfy.
    let step_up = crate::oidc::step_up::from_params(
        query_param(req, "acr_values").as_deref(),
        query_param(req, "max_age").as_deref(),
    )
    .map_err(|_| RequestError::BadRequest)?;
    let metadata = app.oidc.metadata().map_err(RequestError::Provider)?;
    let mut login = LoginState::new(os_random, return_url, app.clock.now())?;
    login.prompt = prompt;
    login.step_up = step_up;
    let session_config = &live.config.session;
    let name = format!(
        "{}{}",
        cookies::login_prefix(session_config),
        &hash_hex(&login.state)[..12]
    );
    let plain = serde_json::to_vec(&login)
        .map_err(|_| RequestError::Internal("the login state could not be serialized"))?;
    let sealed = match app.keyring().seal(&name, &plain) {
        // Escaped characters can make a short returnUrl long: the cookie must still fit.
        Ok(sealed) if name.len() + sealed.len() <= MAX_COOKIE_LEN => sealed,
        Ok(_) | Err(crate::session::seal::SealError::TooLarge) => {
            return Err(RequestError::InvalidReturnUrl);
        }
        Err(crate::session::seal::SealError::Random) => {
            return Err(RequestError::Internal(
                "the login cookie could not be sealed: the random source failed",
            ));
        }
    };
    let location = app
        .oidc
        .login_url(&metadata, &login, live.config.oidc.par)
        .await
        .map_err(RequestError::Provider)?;
    let mut response = redirect(&location);
    let prefix = cookies::login_prefix(session_config);
    for gone in cookies::deletions(session_config, logins_to_forget(app, req, &prefix)) {
        response.headers_mut().append(header::SET_COOKIE, gone);
    }
    if let Some(cookie) = cookies::set_cookie(session_config, &name, &sealed, Some(LOGIN_TTL), true)
    {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// The login cookies a new login asks the browser to delete, so that with the new one it holds
/// at most [`PENDING_LOGINS`]: those that no longer open or have expired, then the oldest.
/// `/bff/login` needs no session and its cookie is `SameSite=Lax`, so another site can send a
/// browser there again and again; kept all, the cookies would outgrow the head limit within ten
/// minutes and every request of the user's, logins included, would be refused (431).
fn logins_to_forget<'h>(app: &Shared, req: &'h Request<Inbound>, prefix: &'h str) -> Vec<&'h str> {
    let now = app.clock.now();
    let mut pending: Vec<(Option<u64>, &str)> = cookies::with_prefix(req.headers(), prefix)
        .map(|(name, value)| {
            let created = app
                .keyring()
                .open(name, value)
                .and_then(|opened| serde_json::from_slice::<LoginState>(&opened.plaintext).ok())
                .map(|login| login.created)
                .filter(|&created| now.saturating_sub(created) <= LOGIN_TTL.as_secs());
            (created, name)
        })
        .collect();
    // Unusable first (`None`), then the oldest.
    pending.sort_unstable();
    let keep = PENDING_LOGINS - 1;
    let usable = pending
        .iter()
        .filter(|(created, _)| created.is_some())
        .count();
    let forget = pending.len() - usable + usable.saturating_sub(keep);
    pending.truncate(forget);
    pending.into_iter().map(|(_, name)| name).collect()
}

/// `prompt` of `/bff/login`: absent, or once one of [`PROMPTS`] (`none`: silent sign-in).
fn prompt_param(req: &Request<Inbound>) -> Result<Option<String>, RequestError> {
    let query = req.uri().query().unwrap_or_default();
    let mut given = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "prompt")
        .map(|(_, v)| v);
    let Some(prompt) = given.next() else {
        return Ok(None);
    };
    if given.next().is_some() {
        return Err(RequestError::InvalidPrompt);
    }
    PROMPTS
        .iter()
        .find(|p| **p == prompt)
        .map(|p| Some((*p).to_string()))
        .ok_or(RequestError::InvalidPrompt)
}

/// The login-failed page naming `reason`, a stable identifier (docs/errors.md); `detail` goes to
/// the log only and must hold no token, code or state.
fn login_failed(reason: &str, detail: &str) -> Result<Response<Body>, RequestError> {
    Err(RequestError::login_failed(reason, detail))
}

async fn callback(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<Response<Body>, RequestError> {
    // Refused before anything is read, as a callback lacking `state` is: the login state stays
    // unspent and the code unused. The log names the parameter, never a value.
    if let Some(name) = repeated(req, &CALLBACK_PARAMETERS) {
        return login_failed(
            "callback_parameter_repeated",
            &format!("the callback carries {name} more than once"),
        );
    }
    if let Some(error) = query_param(req, "error") {
        return ended_at_provider(app, live, req, &error).await;
    }
    let (Some(code), Some(state)) = (query_param(req, "code"), query_param(req, "state")) else {
        return login_failed("callback_incomplete", "the callback lacks code or state");
    };
    // The provider's part — the code exchange, the key set, the UserInfo endpoint — within
    // `request_timeout` in all, each call within `provider_timeout`: several slow calls in a row
    // must not hold the browser longer than any other request. The login state is spent by
    // then (the code too, perhaps), so the browser starts the login again; its session from
    // before is untouched, as nothing has been stored yet.
    let limit = live.config.server.request_timeout;
    let signed = tokio::time::timeout(limit, at_provider(app, live, req, &code, &state)).await;
    let FromProvider {
        login,
        name,
        now,
        tokens,
        id_token,
        claims,
        user_claims,
    } = match signed {
        Ok(signed) => signed?,
        Err(_) => {
            return Err(RequestError::Provider(
                crate::oidc::Unavailable::CallbackTimedOut(limit).into(),
            ));
        }
    };
    let session_config = &live.config.session;
    let sub = claims
        .get("sub")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let sid = claims.get("sid").and_then(|v| v.as_str()).map(String::from);
    // This issuer's marks, then those of the previous release, whose keys name no issuer: one
    // of its replicas may have taken the logout during an upgrade.
    let issuer = mark_issuer(app);
    let marks =
        [Some(issuer.as_str()), None].map(|issuer| LoginMarks::of(issuer, sid.as_deref(), &sub));
    let mut session = Session {
        sub,
        sid,
        // Validated: the provider's issuer.
        issuer: claims.get("iss").and_then(|v| v.as_str()).map(String::from),
        claims: user_claims.into(),
        id_token: Some(id_token),
        refresh_token: tokens.refresh_token.clone(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(200).collect()),
        ..Session::default()
    };
    session.tokens.insert(
        String::new(),
        AccessToken {
            value: tokens.access_token.clone(),
            expires_at: now + tokens.lifetime(),
            issued_at: now,
            scope: tokens.scope.clone(),
            jkt: tokens.jkt.clone(),
        },
    );
    // A login always starts a brand-new session; the browser's previous one ends, once the new
    // one is stored, and is never counted against `max_per_user` (see `create_replacing`).
    let previous = app
        .load_session(&app.sessions, live, req.headers())
        .await
        .ok()
        .flatten();
    let (cookie_value, created) = app
        .sessions
        .create_replacing(session, now, previous.as_ref())
        .await?;
    // A back-channel logout of this provider session, or of every session of this user, that
    // came before the session was stored found nothing to end, and left a mark; read now that
    // the session is stored, so that either the logout ends the session or the login sees the
    // mark.
    let mut ended = false;
    for marks in &marks {
        ended = marks.found(app, login.created).await?;
        if ended {
            break;
        }
    }
    if ended {
        if let Err(error) = app.sessions.delete(&created).await {
            tracing::warn!(%error, "a session of an ended provider session could not be ended");
        }
        return login_failed(
            "provider_session_ended",
            "the provider ended this sign-in's session (back-channel logout) before the callback",
        );
    }
    let mut response = redirect(&login.return_url);
    let headers = response.headers_mut();
    if let Some(c) = cookies::set_cookie(
        session_config,
        &session_config.cookie_name,
        &cookie_value,
        Some(live.config.session.absolute_timeout),
        false,
    ) {
        headers.append(header::SET_COOKIE, c);
    }
    if let Some(c) = cookies::set_cookie(session_config, &name, "", None, true) {
        headers.append(header::SET_COOKIE, c);
    }
    Ok(response)
}

/// What a login's callback learned from the provider, checked: the login state it spent, the
/// tokens, and the user's claims.
struct FromProvider {
    login: LoginState,
    /// The login cookie's name.
    name: String,
    /// When the callback began.
    now: u64,
    tokens: TokenResponse,
    id_token: String,
    /// The ID token's claims.
    claims: crate::jose::Claims,
    /// The claims the session keeps (with the UserInfo endpoint's, when asked for).
    user_claims: crate::jose::Claims,
}

/// The callback's part at the provider: spends the login state, exchanges `code`, validates
/// the ID token (fetching the key set when it names a new key) and reads the UserInfo endpoint
/// when configured.
async fn at_provider(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
    code: &str,
    state: &str,
) -> Result<FromProvider, RequestError> {
    let (login, name) = spend_login_state(app, live, req, state).await?;
    let now = app.clock.now();
    let answer = match app.oidc.exchange_code(code, &login.verifier).await {
        Ok(a) => a,
        Err(GrantError::Rejected(e)) => {
            return Err(RequestError::login_failed(
                "code_rejected",
                format!("the code was rejected: {e}"),
            ));
        }
        Err(e @ GrantError::Unavailable(_)) => return Err(RequestError::Provider(e)),
    };
    let tokens = match TokenResponse::from_code_grant(answer.body, app.oidc.token_type()) {
        Ok(t) => TokenResponse {
            jkt: answer.jkt,
            ..t
        },
        Err(e) => return Err(RequestError::login_failed(e.reason(), e.to_string())),
    };
    let Some(id_token) = tokens.id_token.clone() else {
        return Err(RequestError::login_failed(
            "id_token_missing",
            "the provider returned no ID token",
        ));
    };
    // Checked against the time the answer came, not `now`: the provider issued the ID token
    // while answering, possibly more than the allowed skew after the callback arrived.
    let claims = match async {
        let expect = app
            .oidc
            .id_token_expectations(&app.oidc.config.client_id, app.clock.now())?;
        crate::jose::validate_id_token(&app.oidc.provider.jwks, &id_token, &expect, &login.nonce)
            .await
    }
    .await
    .and_then(|claims| {
        crate::jose::check_at_hash(&id_token, &claims, &tokens.access_token).map(|()| claims)
    }) {
        Ok(c) => c,
        Err(e) => {
            return Err(RequestError::login_failed(
                format!("id_token_{}", e.code()),
                format!("the ID token is invalid: {e}"),
            ));
        }
    };
    // A step-up login must bring back what it asked for; the browser's session stays as it was.
    // Its age is taken from when the login started, as the provider's is (a slow user, or a
    // fresh sign-in asked with `max_age=0`, is no failure).
    if let Some(step) = &login.step_up
        && let Err(shortfall) = crate::oidc::step_up::check(
            step,
            &claims,
            login.created,
            app.clock.now(),
            live.config.oidc.clock_skew.as_secs(),
        )
    {
        return Err(RequestError::login_failed(
            shortfall.reason(),
            shortfall.to_string(),
        ));
    }
    let mut user_claims = crate::oidc::userinfo::user_claims(&claims);
    if app.oidc.config.userinfo {
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        match app
            .oidc
            .userinfo(&tokens.access_token, sub, &app.clock)
            .await
        {
            Ok(info) => user_claims = crate::oidc::userinfo::merge(user_claims, info),
            Err(e @ UserinfoError::Unavailable(_)) => {
                return Err(RequestError::Provider(
                    crate::oidc::Unavailable::Userinfo(e).into(),
                ));
            }
            Err(e) => {
                if e == UserinfoError::SubjectMismatch {
                    tracing::warn!("the userinfo answer names another subject; login refused");
                }
                return Err(RequestError::login_failed(e.reason(), e.to_string()));
            }
        }
    }
    Ok(FromProvider {
        login,
        name,
        now,
        tokens,
        id_token,
        claims,
        user_claims,
    })
}

/// The login state of this browser that `state` names, checked (sealed by us, for this state,
/// not expired) and spent (single use, on every instance), with its cookie's name; and the
/// authorization response checked to come from our provider (RFC 9207: a response naming another
/// issuer, a mix-up, is never acted on).
async fn spend_login_state(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
    state: &str,
) -> Result<(LoginState, String), RequestError> {
    let name = format!(
        "{}{}",
        cookies::login_prefix(&live.config.session),
        &hash_hex(state)[..12]
    );
    let login = cookies::values(req.headers(), &name)
        .filter_map(|v| app.keyring().open(&name, v))
        .filter_map(|opened| serde_json::from_slice::<LoginState>(&opened.plaintext).ok())
        .find(|l| bool::from(l.state.as_bytes().ct_eq(state.as_bytes())));
    let Some(login) = login else {
        return Err(RequestError::login_failed(
            "login_state_missing",
            "no login cookie matches the state (another browser, expired, or replayed)",
        ));
    };
    if app.clock.now().saturating_sub(login.created) > LOGIN_TTL.as_secs() {
        return Err(RequestError::login_failed(
            "login_state_expired",
            "the login state expired",
        ));
    }
    match app
        .sessions
        .store()
        .remember_once(&format!("login:{}", hash_hex(state)), LOGIN_TTL)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return Err(RequestError::login_failed(
                "state_replayed",
                "the state was already used",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let metadata = app.oidc.metadata().map_err(RequestError::Provider)?;
    if let Err(e) = check_authorization_iss(&metadata, query_param(req, "iss").as_deref()) {
        return Err(RequestError::login_failed(e.reason(), e.to_string()));
    }
    Ok((login, name))
}

/// The issuer part of the keys of a back-channel logout's marks (below): the configured issuer
/// (one trailing `/` aside, as sessions compare theirs), hashed. A `sid` or `sub` is unique only
/// per issuer: while replicas of two issuers share a store (a change of issuer), one's logout
/// must not refuse the other's login of the same `sid` or `sub`. Both the logout token and the
/// ID token a callback reads were checked to be this issuer's.
fn mark_issuer(app: &Shared) -> String {
    let issuer = app.oidc.config.issuer.as_str();
    hash_hex(issuer.strip_suffix('/').unwrap_or(issuer))
}

/// The store key of the mark `kind` for `id` (a `sid` or `sub`) of `issuer` ([`mark_issuer`]);
/// with no issuer, the key the previous release wrote it under, which a callback still reads
/// (the mark holds for [`LOGIN_TTL`]: a later release can stop).
fn mark_key(kind: &str, issuer: Option<&str>, id: &str) -> String {
    match issuer {
        Some(issuer) => format!("{kind}:{issuer}:{}", hash_hex(id)),
        None => format!("{kind}:{}", hash_hex(id)),
    }
}

/// The store key marking that the provider ended provider session `sid` (back-channel logout),
/// kept for [`LOGIN_TTL`]: a login into that session began after it was made and its callback
/// comes within that time of the login's start, so within it of the logout too.
fn ended_provider_session(issuer: Option<&str>, sid: &str) -> String {
    mark_key("ended-sid", issuer, sid)
}

/// The store key holding when the provider last ended every session of `sub` (a back-channel
/// logout naming the user and no `sid`), as Unix seconds, kept for [`LOGIN_TTL`] as the mark of
/// [`ended_provider_session`] is.
fn ended_subject(issuer: Option<&str>, sub: &str) -> String {
    mark_key("ended-sub", issuer, sub)
}

/// The store key holding when the provider last ended, with a logout naming both a `sid` and
/// `sub`, a provider session of `sub` that her sessions stored without a `sid` may belong to,
/// as Unix seconds, kept as [`ended_subject`]'s is. Read only by a login whose ID token names no
/// `sid`: one naming another provider session is none of that logout's business.
fn ended_sidless_subject(issuer: Option<&str>, sub: &str) -> String {
    mark_key("ended-sub-sidless", issuer, sub)
}

/// The marks a login's callback reads, under one issuer's keys (or the previous release's):
/// a back-channel logout that came before the callback ended what the login signed into.
struct LoginMarks {
    provider_session: Option<String>,
    subject: String,
    /// No sid: the provider session the login signed into is unknown, and may be one a logout
    /// naming its sid and this user ended (which ends her sessions stored without a sid, too).
    sidless_subject: Option<String>,
}

impl LoginMarks {
    fn of(issuer: Option<&str>, sid: Option<&str>, sub: &str) -> LoginMarks {
        LoginMarks {
            provider_session: sid.map(|sid| ended_provider_session(issuer, sid)),
            subject: ended_subject(issuer, sub),
            sidless_subject: sid.is_none().then(|| ended_sidless_subject(issuer, sub)),
        }
    }

    /// Whether one of them ends the login begun at `login_created`.
    async fn found(
        &self,
        app: &Shared,
        login_created: u64,
    ) -> Result<bool, crate::session::store::StoreError> {
        if let Some(mark) = &self.provider_session
            && app.sessions.store().remembered(mark).await?
        {
            return Ok(true);
        }
        if subject_ended_since(app, &self.subject, login_created).await? {
            return Ok(true);
        }
        match &self.sidless_subject {
            Some(mark) => subject_ended_since(app, mark, login_created).await,
            None => Ok(false),
        }
    }
}

/// The time an [`ended_subject`] (or [`ended_sidless_subject`]) record holds; `None` when it
/// holds none.
fn ended_at(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Records `now` in the time record `key` ([`ended_subject`], [`ended_sidless_subject`]), unless
/// a later time is recorded already. Logouts of the same user racing each other: one of them is
/// recorded.
async fn mark_subject_ended(
    app: &Shared,
    key: &str,
    now: u64,
) -> Result<(), crate::session::store::StoreError> {
    let store = app.sessions.store();
    let value = now.to_string();
    // Each failed attempt is another logout's write in between.
    for _ in 0..3 {
        let done = match store.get(key).await? {
            None => store.put_new(key, value.as_bytes(), LOGIN_TTL).await?,
            Some(record) if ended_at(&record.value).is_some_and(|at| at >= now) => true,
            Some(record) => {
                store
                    .compare_and_set(key, record.version, value.as_bytes(), LOGIN_TTL)
                    .await?
            }
        };
        if done {
            break;
        }
    }
    Ok(())
}

/// Whether the provider ended every session of the user [`ended_subject`] `key` names after the
/// second `login_created` in which the login began (on the clock the mark was made with): the
/// user's sign-in at the provider, which came after the login began, may have come before that
/// logout. A login begun after the logout is never refused, so the user can sign in again at
/// once (across replicas, give or take the difference between their clocks); one begun in the
/// same second as the logout is not refused either, the price of that.
async fn subject_ended_since(
    app: &Shared,
    key: &str,
    login_created: u64,
) -> Result<bool, crate::session::store::StoreError> {
    Ok(match app.sessions.store().get(key).await? {
        None => false,
        // Not one of ours: taken as a logout now, failing closed.
        Some(record) => ended_at(&record.value).is_none_or(|at| login_created < at),
    })
}

/// A callback carrying `error` from the provider. When the user ended the login (cancelled,
/// declined, or a silent sign-in needs them: [`USER_ENDED_ERRORS`]) and the callback carries this
/// browser's own login state, the browser goes back to the app's `returnUrl` — the one validated
/// and sealed at `/bff/login`, nothing from this request — with `login_error=<error>`. Anything
/// else is the login-failed page: no redirect that a forged callback could aim.
async fn ended_at_provider(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
    error: &str,
) -> Result<Response<Body>, RequestError> {
    let safe: String = error
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect();
    let by_user = USER_ENDED_ERRORS.iter().find(|e| **e == error);
    let (Some(code), Some(state)) = (by_user, query_param(req, "state")) else {
        return login_failed(
            "provider_error",
            &format!("the provider answered error={safe}"),
        );
    };
    let (login, name) = spend_login_state(app, live, req, &state).await?;
    tracing::info!(error = code, "login ended at the provider; back to the app");
    let mut response = redirect(&with_login_error(&login.return_url, code));
    if let Some(c) = cookies::set_cookie(&live.config.session, &name, "", None, true) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

/// The request's session; none is `Unauthenticated` (401), a store failure `Store` (503).
async fn signed_in(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<OpenSession, RequestError> {
    app.load_session(&app.sessions, live, req.headers())
        .await?
        .ok_or_else(|| RequestError::Unauthenticated {
            login_url: format!("{}/login", live.config.server.bff_prefix),
            redirect: false,
        })
}

/// [`signed_in`] for a script's call, which must carry the CSRF header first (`Csrf`, 403).
async fn script_signed_in(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<OpenSession, RequestError> {
    if !crate::access::csrf_ok(live, req) {
        return Err(RequestError::Csrf);
    }
    signed_in(app, live, req).await
}

async fn user(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<Response<Body>, RequestError> {
    let mut loaded = script_signed_in(app, live, req).await?;
    // The app asking who is signed in is activity: slide the idle timeout.
    let _ = app.sessions.touch(&mut loaded, app.clock.now()).await;
    let mut body = loaded.session.claims.map().clone();
    body.insert("sub".into(), loaded.session.sub.clone().into());
    let prefix = &live.config.server.bff_prefix;
    body.insert(
        "bff:logout_url".into(),
        format!("{prefix}/logout?sid={}", loaded.handle).into(),
    );
    body.insert(
        "bff:session_expires_in".into(),
        app.sessions
            .expires_in(&loaded.session, app.clock.now())
            .as_secs()
            .into(),
    );
    let features: Vec<serde_json::Value> = live
        .config
        .features
        .keys()
        .filter(|name| crate::access::feature_visible(live, name, Some(&loaded.session)))
        .map(|n| n.clone().into())
        .collect();
    body.insert("bff:features".into(), features.into());
    let mut response = json_response(StatusCode::OK, &serde_json::Value::Object(body));
    if loaded.reseal {
        let s = &live.config.session;
        let resealed = app.sessions.reseal(&loaded).ok().and_then(|v| {
            cookies::set_cookie(s, &s.cookie_name, &v, Some(s.absolute_timeout), false)
        });
        if let Some(cookie) = resealed {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
    Ok(response)
}

/// How a logout was asked for: a link the browser follows (`GET`, carries the session's `sid`
/// against cross-site logout) or the SPA's script (`POST`, CSRF header).
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogoutVia {
    Link,
    Script,
}

/// How many times a logout reads a session that changed under it before it ends it regardless.
const LOGOUT_ATTEMPTS: usize = 5;

/// Ends the session as read (with its ID token, for `id_token_hint`, which a loaded session
/// lacks), and returns what it held. Should a refresh save new tokens in between anyway (the
/// logout could not hold the refresh lease), it is read again; a few times, then ended whatever
/// it holds.
async fn end_as_read(app: &Shared, loaded: OpenSession) -> Result<OpenSession, RequestError> {
    let mut loaded = app.reload_session(&loaded).await?.unwrap_or(loaded);
    for _ in 0..LOGOUT_ATTEMPTS {
        if app.sessions.delete_as_read(&loaded).await? {
            return Ok(loaded);
        }
        match app.reload_session(&loaded).await? {
            Some(newer) => loaded = newer,
            None => return Ok(loaded), // ended by another logout meanwhile
        }
    }
    app.sessions.delete(&loaded).await?;
    Ok(loaded)
}

/// The most sessions one logout reads: a browser sends its own session's cookie and, where a
/// page of a sibling subdomain tossed some, one or two more.
const LOGOUT_SESSIONS: usize = 8;

/// The sessions each of the request's session cookies opens, each once (for a logout whose
/// cookies name different sessions). Each session is read once however many copies of its
/// cookie come (the cookie tells its session without the store), and a request naming more
/// than [`LOGOUT_SESSIONS`] is refused before any is read: a head holds hundreds of cookies, and
/// anyone may call the logout with the cookies of sessions long ended.
async fn every_cookies_session(
    app: &Shared,
    live: &LiveConfig,
    headers: &http::HeaderMap,
) -> Result<Vec<OpenSession>, RequestError> {
    let now = app.clock.now();
    let mut named = Vec::new();
    for value in cookies::raw_values(headers, &live.config.session.cookie_name) {
        let Some(handle) = app.sessions.handle_of(value) else {
            continue;
        };
        if named.iter().any(|(h, _)| *h == handle) {
            continue;
        }
        if named.len() == LOGOUT_SESSIONS {
            tracing::debug!(
                most = LOGOUT_SESSIONS,
                "logout refused: its cookies name more sessions"
            );
            return Err(RequestError::BadRequest);
        }
        named.push((handle, value));
    }
    let mut found: Vec<OpenSession> = Vec::new();
    for (_, value) in named {
        if let Some(loaded) = app.sessions.load(value, now).await? {
            found.push(loaded);
        }
    }
    Ok(found)
}

/// A logout's ending of one session: its refreshes held, the session ended as read, its
/// refresh token and opaque access tokens revoked, and a refresh answer kept unsaved revoked too.
async fn end_for_logout(
    app: &Shared,
    tokens: &Tokens,
    loaded: OpenSession,
) -> Result<OpenSession, RequestError> {
    // No refresh saves while the session is read and ended (one under way is waited for), so
    // the tokens revoked below are the ones it held: a refresh's rotated refresh token is the
    // grant's only one.
    let within = app.oidc.config.provider_timeout + Duration::from_secs(5);
    let hold = app.sessions.hold_refreshes(&loaded, within).await?;
    let ended = end_as_read(app, loaded).await;
    if let Some(hold) = hold {
        app.sessions.let_refreshes_go(hold).await;
    }
    let loaded = ended?;
    if let Some(refresh) = &loaded.session.refresh_token {
        app.oidc.revoke(refresh, "refresh_token").await;
    }
    // JWT access tokens are self-contained and cannot be revoked; opaque ones can.
    for token in loaded
        .session
        .tokens
        .values()
        .filter(|t| !crate::jose::looks_like_jwt(&t.value))
    {
        app.oidc.revoke(&token.value, "access_token").await;
    }
    // A refresh's answer that this process holds unsaved (the store refused it for longer than
    // the refresh kept trying) brought tokens the session never held: revoked too.
    tokens.forget_ended(app, &loaded.handle, within).await;
    Ok(loaded)
}

async fn logout(
    app: &Shared,
    tokens: &Tokens,
    live: &LiveConfig,
    req: &Request<Inbound>,
    via: LogoutVia,
) -> Result<Response<Body>, RequestError> {
    if via == LogoutVia::Script && !crate::access::csrf_ok(live, req) {
        return Err(RequestError::Csrf);
    }
    // `sid` twice is no link Vestibule made (`bff:logout_url` names it once), whichever copy
    // would match: refused before the session is read, nothing ended.
    if via == LogoutVia::Link && repeated(req, &["sid"]).is_some() {
        tracing::debug!(parameter = "sid", "logout refused: a parameter repeated");
        return Err(RequestError::SidMismatch {
            reader: Reader::of(req.headers()),
        });
    }
    let config = &live.config;
    let post_logout_uri = format!(
        "{}{}",
        config.server.public_origin, config.oidc.post_logout_redirect
    );
    let mut opened = match app.load_session(&app.sessions, live, req.headers()).await? {
        Some(loaded) => vec![loaded],
        // No one session: none, or cookies naming different ones (one tossed beside the user's
        // own by a sibling subdomain's page). The logout ends each of them: answered "logged
        // out", the user's own would live on, and work again once the tossed one is gone.
        None => every_cookies_session(app, live, req.headers()).await?,
    };
    if opened.is_empty() {
        return Ok(if via == LogoutVia::Script {
            json_response(
                StatusCode::OK,
                &serde_json::json!({"redirect": config.oidc.post_logout_redirect}),
            )
        } else {
            redirect(&config.oidc.post_logout_redirect)
        });
    }
    // A link ends the session it names only (a tossed cookie's author knows his own handle,
    // never hers); the page's script (X-CSRF) ends every one.
    let sid = query_param(req, "sid").unwrap_or_default();
    if via == LogoutVia::Link {
        opened.retain(|loaded| bool::from(sid.as_bytes().ct_eq(loaded.handle.as_bytes())));
        if opened.is_empty() {
            return Err(RequestError::SidMismatch {
                reader: Reader::of(req.headers()),
            });
        }
    }
    let one = opened.len() == 1;
    let mut hinted = None;
    for loaded in opened {
        let loaded = end_for_logout(app, tokens, loaded).await?;
        // The provider is given a hint only when one session ended: whose would it be?
        hinted = one.then_some(loaded);
    }
    let id_token = hinted.as_ref().and_then(|l| l.session.id_token.as_deref());
    let target = app.oidc.end_session_url(id_token, &post_logout_uri);
    let mut way_out = None;
    let mut response = match via {
        LogoutVia::Link => redirect(&target),
        // The page's script reads this answer: it gets the way out, which the browser then
        // navigates to, and the ID token travels in that navigation's redirect only.
        LogoutVia::Script => {
            let shown = match id_token.filter(|t| target.contains(t)) {
                None => target,
                Some(_) => match seal_way_out(app, live, &target) {
                    Some(cookie) => {
                        way_out = Some(cookie);
                        format!("{}/logout/end", config.server.bff_prefix)
                    }
                    // Too large for a cookie: the provider is not given the hint.
                    None => app.oidc.end_session_url(None, &post_logout_uri),
                },
            };
            json_response(StatusCode::OK, &serde_json::json!({"redirect": shown}))
        }
    };
    if let Some(cookie) = way_out {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if let Some(c) = cookies::set_cookie(
        &config.session,
        &config.session.cookie_name,
        "",
        None,
        false,
    ) {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(response)
}

/// The cookie that keeps a script's logout's way out (the provider's end-session URL, with the
/// ID token as `id_token_hint`) for [`logout_end`]: sealed, and for [`LOGOUT_END_TTL`]. One of
/// Vestibule's own cookies: never sent to an upstream, nor set by one.
fn way_out_cookie(live: &LiveConfig) -> String {
    live.logout_cookie.clone()
}

/// The way out and when it was made, sealed in a `Set-Cookie`; `None` when it does not fit.
fn seal_way_out(app: &Shared, live: &LiveConfig, target: &str) -> Option<HeaderValue> {
    let name = way_out_cookie(live);
    let plain = serde_json::to_vec(&(app.clock.now(), target)).ok()?;
    let sealed = app.keyring().seal(&name, &plain).ok()?;
    if name.len() + sealed.len() > MAX_COOKIE_LEN {
        return None;
    }
    cookies::set_cookie(
        &live.config.session,
        &name,
        &sealed,
        Some(LOGOUT_END_TTL),
        false,
    )
}

/// `GET /bff/logout/end`, where the page's script sends the browser after `POST /bff/logout`:
/// a redirect to the way out that logout sealed in a cookie (the provider's end-session
/// endpoint with `id_token_hint`), once; without it (missing, expired, used) to
/// `post_logout_redirect`. The ID token so never reaches the page's script, only a navigation's
/// `Location`, as with `GET /bff/logout`.
fn logout_end(app: &Shared, live: &LiveConfig, req: &Request<Inbound>) -> Response<Body> {
    let name = way_out_cookie(live);
    let now = app.clock.now();
    let target = cookies::values(req.headers(), &name)
        .filter_map(|value| app.keyring().open(&name, value))
        .filter_map(|opened| serde_json::from_slice::<(u64, String)>(&opened.plaintext).ok())
        .find(|(made, _)| now.saturating_sub(*made) <= LOGOUT_END_TTL.as_secs())
        .map(|(_, target)| target);
    let mut response = match target {
        Some(target) => redirect(&target),
        None => redirect(&live.config.oidc.post_logout_redirect),
    };
    for gone in cookies::deletions(&live.config.session, [name.as_str()]) {
        response.headers_mut().append(header::SET_COOKIE, gone);
    }
    response
}

fn logout_rejected(reason: impl Into<String>) -> Result<Response<Body>, RequestError> {
    Err(RequestError::LogoutRejected(reason.into()))
}

async fn backchannel_logout(
    app: &Shared,
    req: Request<Inbound>,
    pace: crate::limits::Pace,
) -> Result<Response<Body>, RequestError> {
    // The provider posts a form (Back-Channel Logout 1.0 §2.5): a body of another type, or of
    // none named, is not read as one.
    if !is_form(req.headers()) {
        return Err(RequestError::LogoutNotForm);
    }
    let body = http_body_util::Limited::new(req.into_body(), 64 * 1024);
    let body = match crate::limits::Paced::new(body, pace).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<crate::limits::BodyTimeout>() => return Err(RequestError::BodyTimeout),
        Err(_) => return logout_rejected("body unreadable or too large"),
    };
    let mut given = url::form_urlencoded::parse(&body)
        .filter(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned());
    let Some(token) = given.next() else {
        return logout_rejected("no logout_token");
    };
    // One logout_token (Back-Channel Logout 1.0 §2.5; RFC 6749 §3.1): which of two counts is
    // not for Vestibule to pick.
    if given.next().is_some() {
        return logout_rejected("logout_token more than once");
    }
    let mut expect = match app
        .oidc
        .id_token_expectations(&app.oidc.config.client_id, app.clock.now())
    {
        Ok(expect) => expect,
        // No discovery yet, so no issuer or keys to check it with: sent again after a 503.
        Err(e) => return Err(RequestError::LogoutDeferred(e.to_string())),
    };
    expect.max_iat_age = Some(crate::jose::DEFAULT_LOGOUT_MAX_IAT_AGE);
    let logout =
        match crate::jose::validate_logout_token(&app.oidc.provider.jwks, &token, &expect).await {
            Ok(l) => l,
            // The provider's keys could not be fetched: not an invalid token. 503 makes the
            // provider send it again (400 is final, and the session would live on).
            Err(crate::jose::JoseError::KeySetUnavailable(fault)) => {
                return Err(RequestError::LogoutDeferred(fault.to_string()));
            }
            Err(e) => return logout_rejected(e.to_string()),
        };
    let replay_ttl = crate::jose::logout_replay_ttl(expect.leeway);
    // A `jti` is unique per issuer only: keyed by the issuer, so that another provider's
    // token numbered alike is no replay. The previous release's key (no issuer) is still read,
    // for the replay window of a token it took.
    let issuer = mark_issuer(app);
    let marker = mark_key("jti", Some(&issuer), &logout.jti);
    // Checked first, recorded only once the sessions have ended: a marker written before them
    // would turn the provider's retry of a logout whose ending failed (or whose marker's write
    // was carried out but answered too late) into a "replay", and the logout would be lost.
    // Two deliveries at once both end the sessions, which is harmless.
    for seen in [marker.as_str(), &mark_key("jti", None, &logout.jti)] {
        match app.sessions.store().remembered(seen).await {
            Ok(false) => {}
            Ok(true) => return logout_rejected("jti replayed"),
            Err(e) => return Err(e.into()),
        }
    }
    // With both, the sid's sessions end, and the subject's sessions stored without a sid (any
    // of them may be that provider session); never one of another provider session, even when
    // none has this sid any more (the user signed out here first: Back-Channel Logout 1.0
    // §2.7 counts that as done).
    // Marked before anything is ended: a login into this provider session whose callback has
    // not stored its session yet finds the mark (see `callback`).
    let issuer = Some(issuer.as_str());
    if let Some(sid) = &logout.sid {
        app.sessions
            .store()
            .remember_once(&ended_provider_session(issuer, sid), LOGIN_TTL)
            .await?;
    }
    // Only the user named: every session of hers at the provider ended, so a login of hers
    // begun before now, whose callback has not stored its session yet, signs nobody in. With a
    // sid too, only such a login whose ID token names no sid (it may have signed into the ended
    // provider session, as the sessions stored without one that end below may have).
    match (&logout.sid, &logout.sub) {
        (None, Some(sub)) => {
            mark_subject_ended(app, &ended_subject(issuer, sub), app.clock.now()).await?;
        }
        (Some(_), Some(sub)) => {
            mark_subject_ended(app, &ended_sidless_subject(issuer, sub), app.clock.now()).await?;
        }
        _ => {}
    }
    let ended = match (&logout.sid, &logout.sub) {
        (Some(sid), Some(sub)) => match app.sessions.end_by_sid(sid).await {
            Ok(n) => app.sessions.end_sidless_by_sub(sub).await.map(|m| n + m),
            other => other,
        },
        (Some(sid), None) => app.sessions.end_by_sid(sid).await,
        (None, Some(sub)) => app.sessions.end_by_sub(sub).await,
        (None, None) => return logout_rejected("neither sid nor sub"),
    };
    let n = ended?;
    tracing::info!(sessions = n, "back-channel logout ended sessions");
    if let Err(e) = app
        .sessions
        .store()
        .remember_once(&marker, replay_ttl)
        .await
    {
        // The logout took effect; only a replay of this token is not refused until the store
        // answers again (and then only while the token is young enough to be taken).
        tracing::warn!(error = %e, "the back-channel logout's token could not be recorded");
    }
    let mut r = Response::new(crate::reply::empty());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// One `Content-Type` whose media type is `application/x-www-form-urlencoded`, in any case,
/// with any parameters.
fn is_form(headers: &http::HeaderMap) -> bool {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    match (types.next(), types.next()) {
        (Some(only), None) => only
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| {
                media
                    .trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            }),
        _ => false,
    }
}

async fn list_sessions(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<Response<Body>, RequestError> {
    let loaded = script_signed_in(app, live, req).await?;
    let list = app
        .sessions
        .list_for_sub(&loaded.session.sub, app.clock.now())
        .await?;
    let items: Vec<serde_json::Value> = list
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "id": s.handle,
                "created_at": s.created_at,
                "last_seen": s.last_seen,
                "user_agent": s.user_agent,
                "current": *s.handle == *loaded.handle,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"sessions": items}),
    ))
}

async fn end_session(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
    handle: &str,
) -> Result<Response<Body>, RequestError> {
    let loaded = script_signed_in(app, live, req).await?;
    match app
        .sessions
        .end_by_handle(&loaded.session.sub, handle)
        .await?
    {
        true => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"ended": true}),
        )),
        false => Err(RequestError::NotFound),
    }
}

/// Server-Sent Events: `event: ended` once this session ends by any path, on any instance.
/// Checked when an invalidation for it arrives (or any may have been lost; other sessions'
/// do not wake the stream: [`crate::session::manager::Sessions::watch`]) and on every
/// keep-alive ping (which catches the idle and absolute timeouts); the check bypasses the
/// session cache, which may still hold a copy when the invalidation reaches this stream first.
/// An unreachable store ends nothing.
async fn session_events(
    app: &Shared,
    live: &LiveConfig,
    req: &Request<Inbound>,
) -> Result<Response<Body>, RequestError> {
    let loaded = signed_in(app, live, req).await?;
    let sessions = app.sessions.clone();
    let stopping = app.stopping.clone();
    let clock = app.clock.clone();
    let mut invalidated = sessions.watch(loaded.handle);
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, crate::reply::BoxError>,
    >(4);
    let frame = |text: &'static [u8]| Ok(http_body::Frame::data(bytes::Bytes::from_static(text)));
    tokio::spawn(async move {
        if tx.send(frame(b": connected\n\n")).await.is_err() {
            return;
        }
        let mut ping = tokio::time::interval(Duration::from_secs(15));
        ping.reset();
        loop {
            let turn = tokio::select! {
                woken = invalidated.changed() => match woken {
                    // One read per message, whichever of the session's watches comes first.
                    Woken::Read(turn) => Some(turn),
                    Woken::Ended => {
                        let _ = tx.send(frame(b"event: ended\ndata: {}\n\n")).await;
                        break;
                    }
                },
                _ = ping.tick() => {
                    if tx.send(frame(b": ping\n\n")).await.is_err() { break; }
                    // One timed read per session, whichever of its watches comes first.
                    if !invalidated.read_due(Duration::from_secs(15)) { continue; }
                    None
                }
                _ = tx.closed() => break,
                // Shutting down: end the stream; the browser's EventSource reconnects, to
                // another replica.
                _ = stopping.cancelled() => break,
            };
            let read = sessions.reload(&loaded, clock.now()).await;
            if let Some(turn) = turn {
                turn.done();
            }
            if let Ok(None) = read {
                invalidated.wake_session();
                let _ = tx.send(frame(b"event: ended\ndata: {}\n\n")).await;
                break;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(http_body_util::StreamBody::new(stream).boxed_unsync());
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
