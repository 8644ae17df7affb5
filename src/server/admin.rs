//! The admin listener: `/healthz` (liveness: every serving worker's runtime turns, see
//! [`super::heartbeat`]), `/readyz` (store reachable, provider metadata loaded), `/metrics` (Prometheus text) and `/jwks` (Vestibule's public keys: those that sign
//! route assertions, and the client-assertion keys for providers that fetch a client's
//! `jwks_uri`). Never on the public listener. HTTP/2 clients meet the public listener's
//! rapid-reset rule ([`super::connection`]) with a small stream limit of their own.

use super::connection::Activity;
use super::heartbeat::{Heartbeats, STALL};
use crate::app::App;
use crate::reply::{Body, full, json_response};
use http::{Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long an admin connection may take to send a request head, or wait between requests.
const ADMIN_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an idle admin connection told to close may take to do so.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// HTTP/2 streams one admin connection may have open (a probe or a scrape needs one), and the
/// requests it may cancel before their answers beyond those answered (twice as many in ten
/// seconds), as on the public listener: each `/readyz` may wait on the session store.
const ADMIN_MAX_STREAMS: u32 = 8;

/// Serves until `shutdown`; with `admin.max_connections` open, the next waits to be accepted.
/// `beats`: the serving workers' ticks, for `/healthz`.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    beats: Arc<Heartbeats>,
    shutdown: CancellationToken,
) {
    let cap = app.live.load().config.admin.max_connections;
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let beats = beats.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let activity = Arc::new(Activity::new(
                usize::try_from(ADMIN_MAX_STREAMS).unwrap_or(usize::MAX),
            ));
            let tracked = activity.clone();
            let service = service_fn(move |req| {
                let (app, beats) = (app.clone(), beats.clone());
                let busy = tracked.begin();
                async move {
                    let response = handle(&app, &beats, req).await;
                    busy.answered();
                    Ok::<_, Infallible>(response)
                }
            });
            // A slot is held only while requests come: an idle connection is closed, also one
            // that never sent a byte or sent only HTTP/2's preface (the head timeout starts at
            // the first byte of a head, and HTTP/2 has none).
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT);
            builder.http2().max_concurrent_streams(ADMIN_MAX_STREAMS);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = activity.idle(ADMIN_HEADER_READ_TIMEOUT, ADMIN_HEADER_READ_TIMEOUT) => {}
                () = activity.too_many_cancels() => {}
            }
            conn.as_mut().graceful_shutdown();
            // A client that does not take the hint, or goes on cancelling, is cut off.
            tokio::select! {
                _ = tokio::time::timeout(CLOSE_GRACE, conn) => {}
                () = activity.too_many_cancels() => {}
            }
        });
    }
}

async fn handle<B>(app: &App, beats: &Heartbeats, req: Request<B>) -> Response<Body> {
    match req.uri().path() {
        // Writes no log: its answer depends on nothing but the workers' slots.
        "/healthz" => {
            let (status, body) = liveness(beats.workers(), &beats.stalled(STALL));
            json_response(status, &body)
        }
        "/readyz" => {
            let checks = app.readiness().await;
            let ready = checks.iter().all(|(_, ok)| *ok);
            let body: serde_json::Map<String, serde_json::Value> = checks
                .into_iter()
                .map(|(name, ok)| (name.to_string(), serde_json::Value::Bool(ok)))
                .collect();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &serde_json::json!({"ready": ready, "checks": body}))
        }
        "/metrics" => {
            let text = crate::telemetry::render();
            let mut response = Response::new(full(text));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/jwks" => {
            let mut response = json_response(StatusCode::OK, &jwk_set(key_sources(app)));
            // Short, so that a rotation reaches the APIs soon; they refetch on an unknown `kid`.
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("public, max-age=300"),
            );
            response
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found"}),
        ),
    }
}

/// `/healthz`: 200 while every one of the `workers` serving workers ticks; 503 naming those
/// that have been silent for longer than [`STALL`] (wedged, busy without end, or gone).
fn liveness(
    workers: usize,
    stalled: &[super::heartbeat::Stalled],
) -> (StatusCode, serde_json::Value) {
    if stalled.is_empty() {
        let body = serde_json::json!({"status": "ok", "workers": workers});
        return (StatusCode::OK, body);
    }
    let stalled: Vec<serde_json::Value> = stalled
        .iter()
        .map(|s| {
            let silent_ms = u64::try_from(s.silent.as_millis()).unwrap_or(u64::MAX);
            serde_json::json!({"worker": s.worker, "silent_ms": silent_ms})
        })
        .collect();
    let body = serde_json::json!({"status": "stalled", "workers": workers, "stalled": stalled});
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// Every feature that signs with keys of its own contributes its public keys here: the routes'
/// assertions, and the client-assertion keys (`private_key_jwt`). Add a source to publish
/// another kind of key at `/jwks`.
fn key_sources(app: &App) -> Vec<Vec<serde_json::Value>> {
    vec![
        app.live.load().signing_keys.public_jwks(),
        app.oidc.credential().published_keys().to_vec(),
    ]
}

/// The JWK set (RFC 7517 §5) of the keys from every source, in order.
fn jwk_set(sources: Vec<Vec<serde_json::Value>>) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = sources.into_iter().flatten().collect();
    serde_json::json!({ "keys": keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn healthz_names_the_stalled_workers() {
        use super::super::heartbeat::Stalled;
        assert_eq!(
            liveness(2, &[]),
            (StatusCode::OK, json!({"status": "ok", "workers": 2}))
        );
        let stalled = [Stalled {
            worker: 1,
            silent: std::time::Duration::from_millis(6_250),
        }];
        assert_eq!(
            liveness(3, &stalled),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "stalled", "workers": 3, "stalled": [{"worker": 1, "silent_ms": 6250}]})
            )
        );
    }

    #[test]
    fn the_key_set_holds_every_sources_keys_in_order() {
        let set = jwk_set(vec![
            vec![json!({"kid": "assertion-1"}), json!({"kid": "assertion-0"})],
            Vec::new(),
            vec![json!({"kid": "client-auth"})],
        ]);
        assert_eq!(
            set,
            json!({"keys": [{"kid": "assertion-1"}, {"kid": "assertion-0"}, {"kid": "client-auth"}]})
        );
        assert_eq!(jwk_set(Vec::new()), json!({"keys": []}));
    }
}
