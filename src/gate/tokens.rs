//! Access tokens for upstreams: the user's, refreshed before they expire with exactly one refresh
//! per session in flight (a per-process mutex plus a store lease shared by every replica), and
//! cached client-credentials tokens.

use crate::app::{App, Runtime, now};
use crate::config::RouteConfig;
use crate::oidc::GrantError;
use crate::reply::{Body, ErrorCode};
use crate::session::manager::Loaded;
use crate::session::model::{AccessToken, Session};
use http::{HeaderValue, Response, StatusCode, header};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn provider_unavailable() -> Response<Body> {
    let mut r = ErrorCode::ProviderUnavailable.json(&[]);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

fn session_expired(runtime: &Runtime) -> Response<Body> {
    ErrorCode::SessionExpired.json(&[(
        "login_url",
        format!("{}/login", runtime.config.server.bff_prefix).into(),
    )])
}

/// Access tokens: per-session refresh with single flight (in process and across replicas),
/// and a cache of client-credentials tokens.
#[derive(Default)]
pub struct Tokens {
    /// Per session: the in-process queue for refreshing.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Flight>>>>,
    client: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<ClientToken>>>>>,
}

/// What this process remembers of a session's refreshes.
#[derive(Default)]
struct Flight {
    /// When a refresh last failed for want of the provider or the store.
    failed: Option<Instant>,
    /// When a token an upstream rejected was last replaced before its time.
    forced: Option<Instant>,
}

/// A cached client-credentials token.
struct ClientToken {
    value: String,
    /// Unix seconds: `refresh_skew` before expiry, but never before half its lifetime, so
    /// short-lived tokens are not fetched anew for every request.
    refresh_at: u64,
}

/// Counts a grant at the token endpoint by type and outcome (`vestibule_token_grants_total`).
fn count_grant<T>(grant: &'static str, outcome: &Result<T, GrantError>) {
    let outcome = match outcome {
        Ok(_) => "ok",
        Err(GrantError::Rejected(_)) => "rejected",
        Err(GrantError::Unavailable(_)) => "unavailable",
    };
    metrics::counter!("vestibule_token_grants_total", "grant" => grant, "outcome" => outcome)
        .increment(1);
}

/// The refresh lease; the holder renews it every third of it for as long as the grant takes.
const LEASE: Duration = Duration::from_secs(10);
/// How long a request waits for another one's refresh: longer than a grant may take.
const WAIT_FOR_WINNER: Duration =
    Duration::from_secs(crate::oidc::http::POST_TIMEOUT.as_secs() + 5);
const POLL: Duration = Duration::from_millis(25);
/// At most one early refresh per session this often: an upstream that rejects every token must
/// not turn each request into a grant.
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Attempts to write refreshed tokens when other writes (idle-timeout touches) interleave.
const SAVE_ATTEMPTS: usize = 5;
/// Whether the warning about a `refresh_skew` longer than token lifetimes was logged.
static SKEW_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// ID token claims that describe the token rather than the user; kept from the login.
const TOKEN_CLAIMS: [&str; 11] = [
    "iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp", "jti", "sid",
];

impl Tokens {
    /// The session's token for `key` unless it is due for refresh or is the `rejected` one.
    fn fresh<'a>(
        runtime: &Runtime,
        session: &'a Session,
        key: &str,
        rejected: Option<&str>,
    ) -> Option<&'a str> {
        let skew = runtime.config.oidc.refresh_skew.as_secs();
        session
            .tokens
            .get(key)
            .filter(|t| now() < t.refresh_at(skew))
            .filter(|t| rejected != Some(t.value.as_str()))
            .map(|t| t.value.as_str())
    }

    fn local_lock(&self, handle: &str) -> Arc<tokio::sync::Mutex<Flight>> {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, m| Arc::strong_count(m) > 1);
        }
        map.entry(handle.to_string()).or_default().clone()
    }

    /// The user's access token for the route's resource, refreshed when it is about to expire.
    pub async fn user_token(
        &self,
        app: &App,
        runtime: &Runtime,
        loaded: &Loaded,
        route: &RouteConfig,
    ) -> Result<String, Response<Body>> {
        self.user_token_except(app, runtime, loaded, route, None)
            .await?
            .ok_or_else(provider_unavailable)
    }

    /// A user access token other than `rejected`, which an upstream refused (`invalid_token`):
    /// refreshed now whatever its expiry, unless another request already replaced it. `None`
    /// when this session had such an early refresh less than [`FORCED_REFRESH_INTERVAL`] ago.
    pub async fn replace_user_token(
        &self,
        app: &App,
        runtime: &Runtime,
        loaded: &Loaded,
        route: &RouteConfig,
        rejected: &str,
    ) -> Result<Option<String>, Response<Body>> {
        self.user_token_except(app, runtime, loaded, route, Some(rejected))
            .await
    }

    /// Single flight: requests of one session queue on a local mutex, then on the store lease
    /// (shared by every instance); whoever holds the lease re-reads the session and refreshes
    /// only if no one did meanwhile, so a rotating refresh token is spent exactly once.
    async fn user_token_except(
        &self,
        app: &App,
        runtime: &Runtime,
        loaded: &Loaded,
        route: &RouteConfig,
        rejected: Option<&str>,
    ) -> Result<Option<String>, Response<Body>> {
        let key = route.resource.as_deref().unwrap_or_default();
        if let Some(t) = Self::fresh(runtime, &loaded.session, key, rejected) {
            return Ok(Some(t.to_string()));
        }
        // Boxed: the single flight's future is large and rarely needed, and would otherwise
        // grow the future of every request on a token route.
        Box::pin(self.single_flight(app, runtime, loaded, route, key, rejected)).await
    }

    /// The slow path of [`Self::user_token_except`]: wait for, or become, the one request that
    /// refreshes this session's tokens.
    async fn single_flight(
        &self,
        app: &App,
        runtime: &Runtime,
        loaded: &Loaded,
        route: &RouteConfig,
        key: &str,
        rejected: Option<&str>,
    ) -> Result<Option<String>, Response<Body>> {
        let lock = self.local_lock(&loaded.handle);
        let arrived = Instant::now();
        let deadline = arrived + WAIT_FOR_WINNER;
        let Ok(mut flight) = tokio::time::timeout_at(deadline, lock.lock()).await else {
            return Err(provider_unavailable());
        };
        let lock_key = app.sessions.refresh_lock_key(loaded);
        let lease_token = crate::oidc::random_token(16).map_err(|e| {
            tracing::error!(error = %e, "no refresh lock token could be made");
            ErrorCode::Internal.json(&[])
        })?;
        let store = app.sessions.store();
        loop {
            let current = app
                .reload_session(loaded)
                .await
                .map_err(|_| ErrorCode::StoreUnavailable.json(&[]))?;
            let Some(current) = current else {
                return Err(session_expired(runtime));
            };
            if let Some(t) = Self::fresh(runtime, &current.session, key, rejected) {
                return Ok(Some(t.to_string()));
            }
            // The refresh this request queued behind failed: share its answer rather than
            // have every queued request try an unavailable provider in turn.
            if flight.failed.is_some_and(|failed| failed >= arrived) {
                return Err(provider_unavailable());
            }
            let early =
                rejected.is_some() && Self::fresh(runtime, &current.session, key, None).is_some();
            if early
                && flight
                    .forced
                    .is_some_and(|at| at.elapsed() < FORCED_REFRESH_INTERVAL)
            {
                return Ok(None);
            }
            match store.try_lock(&lock_key, &lease_token, LEASE).await {
                Ok(true) => {
                    // Re-read under the lease: the previous holder may have saved just before
                    // releasing it, after our read above.
                    let current = match app.reload_session(loaded).await {
                        Ok(Some(c)) => c,
                        Ok(None) => {
                            let _ = store.unlock(&lock_key, &lease_token).await;
                            return Err(session_expired(runtime));
                        }
                        Err(_) => {
                            let _ = store.unlock(&lock_key, &lease_token).await;
                            return Err(ErrorCode::StoreUnavailable.json(&[]));
                        }
                    };
                    let result = match Self::fresh(runtime, &current.session, key, rejected) {
                        Some(t) => Ok(t.to_string()),
                        None => {
                            if early {
                                flight.forced = Some(Instant::now());
                            }
                            self.refresh_holding_lease(
                                app,
                                runtime,
                                current,
                                route,
                                key,
                                &lock_key,
                                &lease_token,
                            )
                            .await
                        }
                    };
                    let _ = store.unlock(&lock_key, &lease_token).await;
                    if result
                        .as_ref()
                        .is_err_and(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
                    {
                        flight.failed = Some(Instant::now());
                    }
                    return result.map(Some);
                }
                Ok(false) => {
                    if Instant::now() + POLL > deadline {
                        return Err(provider_unavailable());
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(_) => return Err(ErrorCode::StoreUnavailable.json(&[])),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn refresh_holding_lease(
        &self,
        app: &App,
        runtime: &Runtime,
        current: Loaded,
        route: &RouteConfig,
        key: &str,
        lock_key: &str,
        lease_token: &str,
    ) -> Result<String, Response<Body>> {
        let store = app.sessions.store().clone();
        let (lock_key_owned, lease_owned) = (lock_key.to_string(), lease_token.to_string());
        // Keep the lease alive while the provider is slow, so no one else spends the token.
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                match store
                    .extend_lock(&lock_key_owned, &lease_owned, LEASE)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!("the refresh lease was lost while refreshing");
                        break;
                    }
                    // A store hiccup: try again at the next tick, the lease is still running.
                    Err(_) => {}
                }
            }
        });
        let result = self.refresh(app, runtime, current, route, key).await;
        keeper.abort();
        result
    }

    async fn refresh(
        &self,
        app: &App,
        runtime: &Runtime,
        current: Loaded,
        route: &RouteConfig,
        key: &str,
    ) -> Result<String, Response<Body>> {
        let resource = route.resource.as_deref();
        let outcome = if route.exchange {
            let subject = match Self::fresh(runtime, &current.session, "", None) {
                Some(t) => t.to_string(),
                None => return Err(session_expired(runtime)),
            };
            app.oidc
                .exchange_token(&subject, resource.unwrap_or_default(), &route.scopes)
                .await
        } else {
            let Some(refresh_token) = current.session.refresh_token.clone() else {
                let _ = app.sessions.delete(&current).await;
                return Err(session_expired(runtime));
            };
            app.oidc
                .refresh(&refresh_token, resource, &route.scopes)
                .await
        };
        count_grant(
            if route.exchange {
                "token_exchange"
            } else {
                "refresh_token"
            },
            &outcome,
        );
        let tokens = match outcome {
            Ok(t) => t,
            Err(GrantError::Rejected(reason)) => {
                tracing::info!(%reason, "refresh rejected; ending the session");
                let _ = app.sessions.delete(&current).await;
                return Err(session_expired(runtime));
            }
            Err(GrantError::Unavailable(reason)) => {
                tracing::warn!(%reason, "refresh failed: provider unavailable");
                return Err(provider_unavailable());
            }
        };
        let now = now();
        let lifetime = tokens.expires_in.unwrap_or(300);
        if lifetime <= runtime.config.oidc.refresh_skew.as_secs()
            && !SKEW_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                lifetime_s = lifetime,
                "oidc.refresh_skew is not shorter than the access token lifetime: tokens are \
                 refreshed at half their lifetime instead; lower refresh_skew"
            );
        }
        let claims = match &tokens.id_token {
            Some(id_token) => {
                let expect = app.oidc.expect(&app.oidc.config.client_id, now);
                let original = original_with_sub(&current.session.claims, &current.session.sub);
                crate::jose::validate_refreshed_id_token(
                    &app.oidc.provider.jwks,
                    id_token,
                    &expect,
                    &original,
                )
                .await
                .ok()
            }
            None => None,
        };
        let apply = |session: &mut Session| {
            session.tokens.insert(
                key.to_string(),
                AccessToken {
                    value: tokens.access_token.clone(),
                    expires_at: now + lifetime,
                    issued_at: now,
                    scope: tokens.scope.clone(),
                },
            );
            if let Some(rotated) = &tokens.refresh_token {
                session.refresh_token = Some(rotated.clone());
            }
            if let (Some(claims), Some(id_token)) = (&claims, &tokens.id_token) {
                for (k, v) in claims {
                    if !TOKEN_CLAIMS.contains(&k.as_str()) {
                        session.claims.insert(k.clone(), v.clone());
                    }
                }
                session.id_token = Some(id_token.clone());
            }
        };
        // The new refresh token must not be lost: if another write (an idle-timeout touch)
        // came in between, re-read and apply the new tokens again; we still hold the lease.
        let mut base = current;
        for _ in 0..SAVE_ATTEMPTS {
            let mut session = Session::clone(&base.session);
            apply(&mut session);
            match app.sessions.save(&base, session, now).await {
                Ok(true) => return Ok(tokens.access_token),
                Ok(false) => {}
                Err(_) => return Err(ErrorCode::StoreUnavailable.json(&[])),
            }
            base = match app.reload_session(&base).await {
                Ok(Some(reloaded)) => reloaded,
                Ok(None) => return Err(session_expired(runtime)),
                Err(_) => return Err(ErrorCode::StoreUnavailable.json(&[])),
            };
        }
        tracing::warn!("the session kept changing while refreshing; the new tokens were not kept");
        Ok(tokens.access_token)
    }

    /// A client-credentials token for the route's resource and scopes, cached until near expiry.
    pub async fn client_token(
        &self,
        app: &App,
        route: &RouteConfig,
    ) -> Result<String, Response<Body>> {
        let key = format!(
            "{}|{}",
            route.resource.as_deref().unwrap_or(""),
            route.scopes.join(" ")
        );
        let slot = {
            let mut map = self.client.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let outcome = app
            .oidc
            .client_credentials(route.resource.as_deref(), &route.scopes)
            .await;
        count_grant("client_credentials", &outcome);
        match outcome {
            Ok(t) => {
                let lifetime = t.expires_in.unwrap_or(300);
                let skew = app.oidc.config.refresh_skew.as_secs().min(lifetime / 2);
                *cached = Some(ClientToken {
                    value: t.access_token.clone(),
                    refresh_at: now() + lifetime - skew,
                });
                Ok(t.access_token)
            }
            Err(GrantError::Rejected(reason)) => {
                tracing::error!(%reason, "client credentials rejected");
                Err(ErrorCode::ProviderUnavailable.json(&[]))
            }
            Err(GrantError::Unavailable(_)) => Err(provider_unavailable()),
        }
    }
}

fn original_with_sub(
    claims: &serde_json::Map<String, serde_json::Value>,
    sub: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut c = claims.clone();
    c.insert("sub".into(), sub.into());
    c
}
