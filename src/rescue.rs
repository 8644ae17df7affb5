//! Why a request failed, and the one place that turns it into a response.
//!
//! The access stage and the BFF endpoints return a [`RequestError`] carrying the typed cause
//! (the store's, the provider's, a refresh's); [`RequestError::respond`] picks the stable
//! [`ErrorCode`] by source — the client's fault 4xx, no session 401 or a login redirect, the
//! store or provider 503, else 500 — and logs the cause once, at the level its source deserves.
//! Nothing here is shown to the browser but the code, its message and fixed fields such as
//! `login_url`; causes go to the log only, and never hold a token, code or secret.

use crate::oidc::{GrantError, RandomError};
use crate::reply::{Body, ErrorCode, Reader, json_response, redirect};
use crate::session::manager::SessionError;
use crate::session::store::StoreError;
use http::{HeaderValue, Response, StatusCode, header};

/// Why a request gets no token. Cloned to the requests that queued behind the refresh.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    /// `invalid_grant`, a refreshed ID token for another subject, no refresh token, or the
    /// session is gone: the session has ended (and was deleted).
    #[error("the session has ended")]
    Ended,
    /// The provider refused this route's resource, scopes or token exchange; other routes and
    /// the session are unaffected.
    #[error("the provider refused the route's token ({code})")]
    Refused { code: String },
    /// The provider is down or slow, refuses Vestibule's own client (`invalid_client`,
    /// `unauthorized_client`), or answered something unusable. The session is kept.
    #[error("no token for now: {reason}")]
    Unavailable { reason: TokenUnavailable },
    /// The session store could not be read or written. The session is kept.
    #[error("{0}")]
    Store(SessionError),
    /// The system random source failed: no lease token can be made.
    #[error("the random source failed")]
    Random,
}

/// Why no token could be had just now (the session is kept).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenUnavailable {
    /// The grant failed at the provider (down, slow, unusable answer, or Vestibule's own client
    /// refused).
    #[error(transparent)]
    Grant(GrantError),
    /// A refresh that succeeded brought no token for this route.
    #[error("the refresh brought no token for the route")]
    NoToken,
    /// This session's refresh in another request took longer than a grant may.
    #[error("waited too long for this session's refresh")]
    WaitedTooLong,
    /// Another replica holds this session's refresh lease and did not finish.
    #[error("another replica's refresh of this session did not end")]
    OtherReplicaStalled,
    /// Another refresh (on a replica whose lease ran out) is spending the session's refresh
    /// token, or spent it and has not saved its answer yet (the session kept changing under
    /// the save): spending it again would have it refused.
    #[error("another refresh is spending this session's refresh token")]
    SpendInProgress,
    /// The refresh token was spent by another refresh whose result this one cannot see.
    #[error("the refresh token was spent by another refresh")]
    SpentElsewhere,
    /// The refreshed ID token failed validation; nothing of the answer is kept.
    #[error("invalid refreshed ID token: {0}")]
    InvalidIdToken(crate::jose::JoseError),
}

/// Why a request was not answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The session store could not be read or written (or, rarely, a session not sealed).
    #[error(transparent)]
    Store(#[from] SessionError),
    /// The provider's metadata is not loaded, or its token endpoint is unavailable.
    #[error(transparent)]
    Provider(GrantError),
    /// No access token for the route; `login_url` is where a session that ended starts again.
    #[error("{error}")]
    Refresh {
        error: RefreshError,
        login_url: String,
    },
    /// The system random source failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// Something that cannot happen did (always answered as JSON).
    #[error("{0}")]
    Internal(&'static str),
    /// No session. `redirect`: a navigation is sent to `login_url` rather than answered with
    /// JSON naming it.
    #[error("sign-in is required")]
    Unauthenticated { login_url: String, redirect: bool },
    /// The session's sign-in falls short of what the route or its upstream requires (`step`):
    /// a navigation (when `redirect`) is sent to `login_url`, an API call told what to do.
    #[error("step-up authentication is required")]
    StepUp {
        login_url: String,
        step: crate::config::StepUp,
        redirect: bool,
    },
    /// A missing `X-CSRF: 1` header or a cross-site origin (always JSON).
    #[error("CSRF check failed")]
    Csrf,
    /// The claims policy refused the session; `missing` names the claims it lacked (none: no
    /// session to check).
    #[error("forbidden (missing: {missing:?})")]
    Forbidden { missing: Vec<String> },
    #[error("not found")]
    NotFound,
    /// A malformed parameter (e.g. `/login`'s `acr_values` or `max_age`).
    #[error("malformed request parameter")]
    BadRequest,
    /// `returnUrl` is not a local path, or does not fit in the login cookie.
    #[error("invalid returnUrl")]
    InvalidReturnUrl,
    /// `prompt` of `/bff/login` is not one OpenID Connect defines, or is given twice.
    #[error("invalid prompt")]
    InvalidPrompt,
    /// The logout link names another session (or none, or one more than once): answered as the request asked
    /// (`navigation`), whatever the endpoint's other errors are.
    #[error("the logout link names another session")]
    SidMismatch { reader: Reader },
    /// The login could not be completed: the page names `reason`, a stable identifier
    /// (docs/errors.md); `detail` goes to the log only and holds no token, code or state.
    #[error("login failed ({reason}): {detail}")]
    LoginFailed { reason: String, detail: String },
    /// A back-channel logout token was refused (OpenID Connect Back-Channel Logout §2.8:
    /// `400` with an OAuth error body).
    #[error("back-channel logout rejected: {0}")]
    LogoutRejected(String),
    /// A back-channel logout whose body is not a form (its `Content-Type` is not
    /// `application/x-www-form-urlencoded`): `415`, with the body of [`Self::LogoutRejected`].
    #[error("back-channel logout rejected: the body is not application/x-www-form-urlencoded")]
    LogoutNotForm,
    /// A back-channel logout token could not be checked now (the provider's key set could not
    /// be fetched): `503` with `Retry-After`, so that the provider sends it again.
    #[error("back-channel logout deferred: {0}")]
    LogoutDeferred(String),
    /// The user's access token, whose claims a route's `require` reads, could not be checked
    /// now (the provider's key set or metadata unavailable): `503` with `Retry-After`.
    #[error("the access token could not be checked: {0}")]
    KeySetUnavailable(crate::jose::KeySetFault),
    /// A request body arrived too slowly (always JSON).
    #[error("the request body arrived too slowly")]
    BodyTimeout,
}

impl From<StoreError> for RequestError {
    fn from(error: StoreError) -> Self {
        RequestError::Store(error.into())
    }
}

impl RequestError {
    pub fn login_failed(reason: impl Into<String>, detail: impl Into<String>) -> RequestError {
        RequestError::LoginFailed {
            reason: reason.into(),
            detail: detail.into(),
        }
    }

    /// The one place that turns an error into a response, logging its cause once. `reader`: an
    /// HTML page (a browser navigation) or JSON, for the errors whose form follows the endpoint's.
    pub fn respond(self, reader: Reader) -> Response<Body> {
        self.log();
        match self {
            RequestError::Store(_) => retry_later(ErrorCode::StoreUnavailable.respond(reader)),
            RequestError::Provider(_) => ErrorCode::ProviderUnavailable.respond(reader),
            RequestError::Refresh { error, login_url } => refresh_response(&error, login_url),
            RequestError::Random(_) => ErrorCode::Internal.respond(reader),
            RequestError::Internal(_) => ErrorCode::Internal.json(&[]),
            RequestError::Unauthenticated {
                login_url,
                redirect: true,
            } if reader == Reader::Page => redirect(&login_url),
            RequestError::Unauthenticated { login_url, .. } => {
                ErrorCode::Unauthenticated.json(&[("login_url", login_url.into())])
            }
            RequestError::StepUp {
                login_url,
                redirect: true,
                ..
            } if reader == Reader::Page => redirect(&login_url),
            RequestError::StepUp {
                login_url, step, ..
            } => {
                let mut extra = vec![("login_url", login_url.into())];
                if !step.acr_values.is_empty() {
                    extra.push(("acr_values", step.acr_values.into()));
                }
                if let Some(max_age) = step.max_age {
                    extra.push(("max_age", max_age.into()));
                }
                ErrorCode::StepUpRequired.json(&extra)
            }
            RequestError::Csrf => ErrorCode::Csrf.json(&[]),
            RequestError::Forbidden { missing } if missing.is_empty() => {
                ErrorCode::Forbidden.json(&[])
            }
            RequestError::Forbidden { missing } => {
                ErrorCode::Forbidden.json(&[("missing", missing.into())])
            }
            RequestError::NotFound => ErrorCode::NotFound.respond(reader),
            RequestError::InvalidReturnUrl => ErrorCode::InvalidReturnUrl.respond(reader),
            RequestError::InvalidPrompt => ErrorCode::InvalidPrompt.respond(reader),
            RequestError::BadRequest => ErrorCode::BadRequest.respond(reader),
            RequestError::SidMismatch { reader } => ErrorCode::BadRequest.respond(reader),
            RequestError::LoginFailed { reason, .. } => {
                ErrorCode::LoginFailed.html_with_reason(&reason)
            }
            RequestError::LogoutRejected(_) => {
                let mut r = json_response(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "invalid_request", "message": "The logout token is invalid."}),
                );
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            RequestError::LogoutNotForm => {
                let mut r = json_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &serde_json::json!({"error": "invalid_request", "message": "The logout token must be sent as application/x-www-form-urlencoded."}),
                );
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            RequestError::LogoutDeferred(_) => {
                let mut r = retry_later(ErrorCode::ProviderUnavailable.json(&[]));
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            RequestError::BodyTimeout => ErrorCode::RequestTimeout.json(&[]),
            RequestError::KeySetUnavailable(_) => {
                retry_later(ErrorCode::ProviderUnavailable.respond(reader))
            }
        }
    }

    /// The cause, once: the store, the provider and the random source at warn or error (their
    /// outage is the operator's business), rejected logins at warn, the client's own mistakes at
    /// debug. Refresh failures from the provider were logged where they were classified.
    fn log(&self) {
        match self {
            RequestError::Store(error)
            | RequestError::Refresh {
                error: RefreshError::Store(error),
                ..
            } => tracing::warn!(%error, "session store unavailable"),
            RequestError::Provider(error) => {
                tracing::warn!(%error, "identity provider unavailable")
            }
            RequestError::Refresh { error, .. } => tracing::debug!(%error, "no access token"),
            RequestError::Random(error) => tracing::error!(%error, "random source failed"),
            RequestError::Internal(error) => tracing::error!(error, "internal error"),
            RequestError::LoginFailed { reason, detail } => {
                tracing::warn!(reason, detail, "login failed");
            }
            RequestError::LogoutRejected(reason) => {
                tracing::warn!(reason, "back-channel logout rejected");
            }
            RequestError::LogoutNotForm => {
                let reason = "body not application/x-www-form-urlencoded";
                tracing::warn!(reason, "back-channel logout rejected");
            }
            RequestError::LogoutDeferred(reason) => {
                tracing::warn!(
                    reason,
                    "back-channel logout deferred: the key set is unavailable"
                );
            }
            RequestError::BodyTimeout => tracing::info!("request body too slow"),
            RequestError::KeySetUnavailable(fault) => {
                tracing::warn!(%fault, "access token not checked for the route's policy: the key set is unavailable");
            }
            RequestError::Unauthenticated { .. }
            | RequestError::StepUp { .. }
            | RequestError::Csrf
            | RequestError::Forbidden { .. }
            | RequestError::NotFound
            | RequestError::InvalidReturnUrl
            | RequestError::InvalidPrompt
            | RequestError::BadRequest
            | RequestError::SidMismatch { .. } => {
                tracing::debug!(error = %self, "request refused");
            }
        }
    }
}

/// A request that got no access token: always JSON (the routes' callers are API calls).
fn refresh_response(error: &RefreshError, login_url: String) -> Response<Body> {
    match error {
        RefreshError::Ended => ErrorCode::SessionExpired.json(&[("login_url", login_url.into())]),
        RefreshError::Refused { .. } => ErrorCode::TokenRefused.json(&[]),
        RefreshError::Unavailable { .. } => retry_later(ErrorCode::ProviderUnavailable.json(&[])),
        RefreshError::Store(_) => retry_later(ErrorCode::StoreUnavailable.json(&[])),
        RefreshError::Random => ErrorCode::Internal.json(&[]),
    }
}

/// A 503 for an outage (the store's or the provider's) says when to try again: the page's
/// script, and the provider whose back-channel logout it was, retry.
fn retry_later(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::session::store::Outage;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Everything logged while `f` runs, one line per event.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    async fn body(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_store_outage_is_a_503_whose_cause_is_logged_once_at_warn() {
        let error: RequestError =
            StoreError::Unavailable(Outage::TimedOut(Duration::from_millis(2500))).into();
        let mut response = None;
        let log = logged(|| response = Some(error.respond(Reader::Script)));
        let response = response.unwrap();
        assert_eq!(response.status(), 503);
        let text = body(response).await;
        assert!(text.contains("\"error\":\"store_unavailable\""), "{text}");
        assert!(!text.contains("2.5s"), "the cause reached the body: {text}");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("no answer within 2.5s"))
            .collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].contains("WARN"), "{log}");
    }

    #[tokio::test]
    async fn a_store_failure_during_a_refresh_is_logged_with_its_cause() {
        let error = RequestError::Refresh {
            error: RefreshError::Store(StoreError::Unavailable(Outage::UnexpectedPing).into()),
            login_url: "/bff/login".into(),
        };
        let mut response = None;
        let log = logged(|| response = Some(error.respond(Reader::Page)));
        let response = response.unwrap();
        assert_eq!(response.status(), 503);
        // API routes' token errors are JSON even for a navigation.
        assert!(body(response).await.contains("store_unavailable"));
        assert_eq!(log.matches("PING was not answered").count(), 1, "{log}");
        assert!(log.contains("WARN"), "{log}");
    }

    #[tokio::test]
    async fn client_errors_are_logged_at_debug_only() {
        let mut response = None;
        let log = logged(|| response = Some(RequestError::Csrf.respond(Reader::Page)));
        assert_eq!(response.unwrap().status(), 403);
        assert!(log.contains("DEBUG"), "{log}");
        assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
    }

    #[tokio::test]
    async fn an_ended_session_names_the_login_url() {
        let error = RequestError::Refresh {
            error: RefreshError::Ended,
            login_url: "/bff/login".into(),
        };
        let response = error.respond(Reader::Script);
        assert_eq!(response.status(), 401);
        let text = body(response).await;
        assert!(text.contains("\"error\":\"session_expired\""), "{text}");
        assert!(text.contains("\"login_url\":\"/bff/login\""), "{text}");
    }
}
