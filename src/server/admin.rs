//! The admin listener: `/healthz` (liveness), `/readyz` (store reachable, provider metadata
//! loaded) and `/metrics` (Prometheus text). Never on the public listener.

use crate::app::App;
use crate::reply::{Body, full, json_response};
use http::{Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn handle<B>(app: &App, req: Request<B>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
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
            let text = crate::telemetry::metrics().render();
            let mut response = Response::new(full(text));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found"}),
        ),
    }
}
