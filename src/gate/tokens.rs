//! Access tokens for upstreams: the user's, refreshed before they expire with exactly one refresh
//! per session in flight (a per-process mutex plus a store lease shared by every replica), and
//! cached client-credentials tokens.

use crate::app::{App, Runtime, now};
use crate::config::RouteConfig;
use crate::oidc::GrantError;
use crate::reply::{Body, ErrorCode};
use crate::session::manager::Loaded;
use crate::session::model::{AccessToken, Session};
use http::{HeaderValue, Response, header};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn provider_unavailable() -> Response<Body> {
    let mut r = ErrorCode::ProviderUnavailable.json(&[]);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// Access tokens: per-session refresh with single flight (in process and across replicas),
/// and a cache of client-credentials tokens.
#[derive(Default)]
pub struct Tokens {
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    client: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<AccessToken>>>>>,
}

const LEASE: Duration = Duration::from_secs(10);
const WAIT_FOR_WINNER: Duration = Duration::from_secs(30);

impl Tokens {
    fn fresh<'a>(runtime: &Runtime, session: &'a Session, key: &str) -> Option<&'a str> {
        let skew = runtime.config.oidc.refresh_skew.as_secs();
        session
            .tokens
            .get(key)
            .filter(|t| now() + skew < t.expires_at)
            .map(|t| t.value.as_str())
    }

    fn local_lock(&self, handle: &str) -> Arc<tokio::sync::Mutex<()>> {
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
        let key = route.resource.clone().unwrap_or_default();
        if let Some(t) = Self::fresh(runtime, &loaded.session, &key) {
            return Ok(t.to_string());
        }
        let lock = self.local_lock(&loaded.handle);
        let _local = lock.lock().await;
        let lock_key = app.sessions.refresh_lock_key(loaded);
        let lease_token = crate::oidc::random_token(16);
        let store = app.sessions.store();
        let deadline = tokio::time::Instant::now() + WAIT_FOR_WINNER;
        loop {
            let current = app
                .reload_session(loaded)
                .await
                .map_err(|_| ErrorCode::StoreUnavailable.json(&[]))?;
            let Some(current) = current else {
                return Err(ErrorCode::SessionExpired.json(&[]));
            };
            if let Some(t) = Self::fresh(runtime, &current.session, &key) {
                return Ok(t.to_string());
            }
            match store.try_lock(&lock_key, &lease_token, LEASE).await {
                Ok(true) => {
                    let result = self
                        .refresh_holding_lease(
                            app,
                            runtime,
                            current,
                            route,
                            &key,
                            &lock_key,
                            &lease_token,
                        )
                        .await;
                    let _ = store.unlock(&lock_key, &lease_token).await;
                    return result;
                }
                Ok(false) => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(provider_unavailable());
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
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
                if !matches!(
                    store
                        .extend_lock(&lock_key_owned, &lease_owned, LEASE)
                        .await,
                    Ok(true)
                ) {
                    break;
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
            let subject = match Self::fresh(runtime, &current.session, "") {
                Some(t) => t.to_string(),
                None => return Err(ErrorCode::SessionExpired.json(&[])),
            };
            app.oidc
                .exchange_token(&subject, resource.unwrap_or_default(), &route.scopes)
                .await
        } else {
            let Some(refresh_token) = current.session.refresh_token.clone() else {
                let _ = app.sessions.delete(&current).await;
                return Err(ErrorCode::SessionExpired.json(&[]));
            };
            app.oidc
                .refresh(&refresh_token, resource, &route.scopes)
                .await
        };
        let tokens = match outcome {
            Ok(t) => t,
            Err(GrantError::Rejected(reason)) => {
                tracing::info!(%reason, "refresh rejected; ending the session");
                let _ = app.sessions.delete(&current).await;
                return Err(ErrorCode::SessionExpired.json(&[(
                    "login_url",
                    format!("{}/login", runtime.config.server.bff_prefix).into(),
                )]));
            }
            Err(GrantError::Unavailable(reason)) => {
                tracing::warn!(%reason, "refresh failed: provider unavailable");
                return Err(provider_unavailable());
            }
        };
        let now = now();
        let mut session = current.session.clone();
        session.tokens.insert(
            key.to_string(),
            AccessToken {
                value: tokens.access_token.clone(),
                expires_at: now + tokens.expires_in.unwrap_or(300),
                scope: tokens.scope.clone(),
            },
        );
        if let Some(rotated) = tokens.refresh_token {
            session.refresh_token = Some(rotated);
        }
        if let Some(id_token) = tokens.id_token {
            let expect = app.oidc.expect(&app.oidc.config.client_id, now);
            let original = current.session.claims.clone();
            if let Ok(claims) = crate::jose::validate_refreshed_id_token(
                &app.oidc.provider.jwks,
                &id_token,
                &expect,
                &original_with_sub(&original, &session.sub),
            )
            .await
            {
                for (k, v) in claims {
                    if ![
                        "iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp",
                        "jti", "sid",
                    ]
                    .contains(&k.as_str())
                    {
                        session.claims.insert(k, v);
                    }
                }
                session.id_token = Some(id_token);
            }
        }
        match app.sessions.save(&current, session, now).await {
            Ok(true) => Ok(tokens.access_token),
            Ok(false) => {
                tracing::warn!(
                    "session changed while refreshing; the new tokens are kept for this request only"
                );
                Ok(tokens.access_token)
            }
            Err(_) => Err(ErrorCode::StoreUnavailable.json(&[])),
        }
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
        let skew = app.oidc.config.refresh_skew.as_secs();
        if let Some(t) = cached.as_ref().filter(|t| now() + skew < t.expires_at) {
            return Ok(t.value.clone());
        }
        match app
            .oidc
            .client_credentials(route.resource.as_deref(), &route.scopes)
            .await
        {
            Ok(t) => {
                *cached = Some(AccessToken {
                    value: t.access_token.clone(),
                    expires_at: now() + t.expires_in.unwrap_or(300),
                    scope: t.scope,
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
