//! The application, the composition root: one long-lived [`App`] made of the shared state
//! ([`Shared`]: the pooled clients, the OpenID Connect client, the session manager and the
//! hot-swappable [`LiveConfig`] each request reads once) and the access stage's token caches; the
//! request pipeline that routes to the access stage, the BFF endpoints and the proxy; reloads.

use crate::access::{self, Tokens};
use crate::clock::Clock;
use crate::config::Config;
use crate::oidc::Oidc;
use crate::oidc::client_auth::Credential;
use crate::proxy::routing::{Destination, Resolved};
use crate::proxy::{self, Peer, Upstreams};
use crate::reply::{Body, ErrorCode, Reader};
use crate::rescue::RequestError;
use crate::session::manager::{SessionSettings, Sessions};
use crate::session::seal::Keyring;
use crate::session::store::{self, Store};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

mod worker;
pub use worker::Worker;

pub use crate::clock::now;
pub use crate::state::{LiveConfig, Shared, body_pace};

/// The composition root: the shared state every stage reads, and what only this pipeline and
/// the access stage hold. Reads of the shared state go through it (`app.sessions`).
pub struct App {
    shared: Shared,
    /// The access stage's token caches and refresh queues.
    tokens: Tokens,
    request_metrics: crate::telemetry::RequestMetrics,
    /// The file reloads read.
    config_path: std::path::PathBuf,
}

impl std::ops::Deref for App {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl App {
    /// Builds the application: connects the store and starts loading provider metadata in the
    /// background (`/readyz` stays unready until it is loaded).
    pub async fn start(config: Config, path: std::path::PathBuf) -> anyhow::Result<Arc<App>> {
        Self::start_with_clock(config, path, Clock::system()).await
    }

    /// [`App::start`] on the given clock (tests move it to reach expiries without waiting).
    pub async fn start_with_clock(
        config: Config,
        path: std::path::PathBuf,
        clock: Clock,
    ) -> anyhow::Result<Arc<App>> {
        crate::telemetry::metrics();
        crate::telemetry::spawn_upkeep();
        let keyring = Keyring::new(config.session.keys.clone())
            .map_err(|e| anyhow::anyhow!("session.keys: {e}"))?;
        let store = Store::connect(&store::StoreConfig::from_config(&config.session))
            .await
            .map_err(|e| anyhow::anyhow!("session store: {e}"))?;
        let settings = SessionSettings {
            cookie_name: config.session.cookie_name.clone(),
            idle_timeout: config.session.idle_timeout,
            absolute_timeout: config.session.absolute_timeout,
            keyring: Keyring::new(config.session.keys.clone())
                .map_err(|e| anyhow::anyhow!("session.keys: {e}"))?,
            cache_ttl: config.session.cache_ttl,
        };
        let sessions = Arc::new(Sessions::new(settings, store));
        let oidc = Oidc::new(config.oidc.clone(), config.redirect_uri())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokio::spawn(
            oidc.provider
                .clone()
                .keep_fresh(config.oidc.metadata_refresh),
        );
        let limiter = crate::limits::RateLimiter::new(config.limits.tracked_addresses);
        let app = Arc::new(App {
            shared: Shared {
                live: ArcSwap::from_pointee(LiveConfig::new(config)),
                upstreams: Upstreams::new(),
                oidc,
                sessions,
                clock,
                limiter,
                keyring: Arc::new(keyring),
                stopping: tokio_util::sync::CancellationToken::new(),
            },
            tokens: Tokens::default(),
            request_metrics: crate::telemetry::RequestMetrics::new(),
            config_path: path.clone(),
        });
        watch_config(&app, path);
        Ok(app)
    }

    /// Handles one request from the public listener, on the serving worker `worker`.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        ip: IpAddr,
        tls: bool,
        worker: &Worker,
    ) -> Response<Body> {
        let started = Instant::now();
        let live = self.live.load_full();
        let method = req.method().clone();
        // A cheap clone (shared bytes), read only if the access log is on.
        let uri = req.uri().clone();
        let peer = Peer {
            ip,
            tls,
            trusted: live.is_trusted(ip),
        };
        // Only a trusted proxy's request id is kept; anyone else's is replaced.
        let request_id = proxy::headers::ensure_request_id(req.headers_mut(), peer.trusted);
        let in_flight = crate::telemetry::InFlight::enter(self.request_metrics.in_flight());
        let cors = access::cors_origin(&live, req.headers());
        let (route_name, mut response) = match access::preflight(&live, &req) {
            Some(answer) => ("preflight", answer),
            None => self.route(&live, req, peer, worker).await,
        };
        if let Some(origin) = cors {
            access::add_cors_headers(response.headers_mut(), origin);
        } else if !live.config.server.cors_origins.is_empty() {
            // The answer depends on Origin: caches must not serve this one to a listed origin.
            response
                .headers_mut()
                .append(header::VARY, http::HeaderValue::from_static("Origin"));
        }
        drop(in_flight);
        response
            .headers_mut()
            .insert("x-request-id", request_id.clone());
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        let upstream_ms = response
            .extensions()
            .get::<proxy::forward::UpstreamLatency>()
            .map(|l| l.0.as_secs_f64() * 1000.0);
        self.request_metrics.record(route_name, status, elapsed);
        tracing::info!(
            target: "vestibule::access",
            route = %route_name,
            %method,
            path = %uri.path(),
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_ms,
            request_id = request_id.to_str().unwrap_or(""),
        );
        response
    }

    /// Answers the request; also returns the route's name for metrics and the access log.
    async fn route<'r>(
        &self,
        live: &'r LiveConfig,
        mut req: Request<Incoming>,
        peer: Peer,
        worker: &Worker,
    ) -> (&'r str, Response<Body>) {
        let config = &live.config;
        if proxy::header_bytes(&req) > config.server.max_header_size {
            return ("-", ErrorCode::HeadersTooLarge.json(&[]));
        }
        let prefix = config.server.bff_prefix.as_str();
        // One canonical path decides everything below: the BFF endpoints, the route, its
        // policy, the login return URL, the static file and the upstream's path.
        let (canonical, to) = match live.routes.resolve(req.uri().path(), prefix) {
            Ok(Resolved { path, to }) => {
                (matches!(path, Cow::Owned(_)).then(|| path.into_owned()), to)
            }
            Err(bad) => {
                tracing::debug!(reason = %bad, "ambiguous request path refused");
                return ("-", ErrorCode::BadPath.respond(Reader::of(req.headers())));
            }
        };
        if let Some(path) = canonical
            && !proxy::set_path(&mut req, &path)
        {
            return ("-", ErrorCode::BadPath.json(&[]));
        }
        let route = match to {
            Destination::Route(route) => route,
            Destination::NoRoute => return ("-", proxy::no_route(&req)),
            Destination::Bff => {
                let rest = req
                    .uri()
                    .path()
                    .get(prefix.len()..)
                    .unwrap_or("/")
                    .to_string();
                // Boxed: the BFF endpoints' futures are large and rare next to proxied calls,
                // and would otherwise grow every request's future (moved on each request).
                let answer =
                    Box::pin(crate::endpoints::handle(self, live, req, &rest, peer.ip)).await;
                return (prefix, answer);
            }
        };
        let admitted =
            match access::admit(self, &self.tokens, &worker.sessions, live, route, &req).await {
                Ok(a) => a,
                Err(error) => {
                    let reader = Reader::of(req.headers());
                    return (route.path.as_str(), error.respond(reader));
                }
            };
        let own = proxy::headers::OwnCookies {
            session: &live.own_cookie,
            login_prefix: &live.login_prefix,
        };
        let forward = |req, bearer| {
            proxy::dispatch(
                &worker.upstreams,
                route,
                req,
                peer,
                own,
                &live.public_side,
                bearer,
                config.server.max_body,
                body_pace(config),
                config.server.request_timeout,
            )
        };
        // Kept for an RFC 9470 step-up answer: where the login brings the user back (a
        // reference-counted copy, only for routes that send the user's token).
        let uri = matches!(
            route.token,
            crate::config::TokenMode::User | crate::config::TokenMode::UserOrClient
        )
        .then(|| req.uri().clone());
        let mut response = match Replay::capture(route, req, admitted.bearer.as_ref()) {
            Captured::Once(req) => forward(req.map(Either::Left), admitted.bearer).await,
            Captured::Replay(replay) => {
                // No body: the request can be sent again with another token.
                let first = forward(replay.request(), admitted.bearer).await;
                if rejects_token(&first) {
                    // Rare: boxed so that it does not grow every request's future.
                    Box::pin(async {
                        match self.replace_token(worker, live, route, &replay).await {
                            Ok(Some(bearer)) => forward(replay.request(), Some(bearer)).await,
                            Ok(None) => first,
                            // A replayed API call: its errors are JSON.
                            Err(refused) => refused.respond(Reader::Script),
                        }
                    })
                    .await
                } else {
                    first
                }
            }
        };
        if response.status() == http::StatusCode::UNAUTHORIZED
            && let Some(uri) = uri
            && let Some(step) = crate::oidc::step_up::from_challenge(
                response.headers().get_all(header::WWW_AUTHENTICATE).iter(),
            )
        {
            // The upstream wants a stronger or more recent sign-in (RFC 9470): the same answer
            // as a route's own step-up requirement, as JSON (the caller is an API call).
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            response = RequestError::StepUp {
                login_url: crate::oidc::step_up::login_url(
                    &config.server.bff_prefix,
                    path_and_query,
                    Some(&step),
                ),
                step,
                redirect: false,
            }
            .respond(Reader::Script);
        }
        for cookie in admitted.set_cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        (route.path.as_str(), response)
    }

    /// Another access token for a request whose token the upstream refused: refreshed now (once
    /// per session, like any refresh), unless another request already replaced it. `None`: no
    /// new token (no session, or one was forced moments ago); the first answer stands.
    async fn replace_token(
        &self,
        worker: &Worker,
        live: &LiveConfig,
        route: &crate::config::RouteConfig,
        replay: &Replay,
    ) -> Result<Option<HeaderValue>, RequestError> {
        let Some(loaded) = self
            .load_session(&worker.sessions, live, &replay.headers)
            .await?
        else {
            return Ok(None);
        };
        let Some(token) = self
            .tokens
            .replace_user_token(self, &worker.sessions, live, &loaded, route, replay.token())
            .await?
        else {
            return Ok(None);
        };
        Ok(HeaderValue::from_str(&format!("Bearer {token}"))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            }))
    }

    /// Readiness checks by name; all must pass for `/readyz` to answer 200. `accepting` fails as
    /// soon as shutdown begins, so load balancers stop sending before the listener closes.
    pub async fn readiness(&self) -> Vec<(&'static str, bool)> {
        let store = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.sessions.store().ping(),
        )
        .await;
        vec![
            ("store", matches!(store, Ok(Ok(())))),
            ("provider", self.oidc.provider.is_ready()),
            ("accepting", !self.stopping.is_cancelled()),
        ]
    }

    /// Re-reads the configuration file; a bad file is rejected and the old one kept.
    pub fn reload(&self, trigger: &str) {
        match Config::load(&self.config_path) {
            Ok(config) => {
                let old = self.live.load_full();
                // Restart-only keys keep their running value: one snapshot is in effect.
                let reloaded = crate::config::reload::reload(&old.config, config);
                // Key and assertion files are read again: a rotated key needs no restart.
                let credential = match Credential::load(&reloaded.config.oidc) {
                    Ok(credential) => credential,
                    Err(error) => {
                        tracing::error!(
                            trigger,
                            "configuration rejected, keeping the previous one: {error}"
                        );
                        return;
                    }
                };
                self.oidc.set_credential(credential);
                for key in reloaded.restart_needed {
                    tracing::warn!(trigger, "{key} changed; this takes effect after a restart");
                }
                self.live.store(Arc::new(LiveConfig::new(reloaded.config)));
                tracing::info!(trigger, "configuration reloaded");
            }
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(
                        trigger,
                        "configuration rejected, keeping the previous one: {error}"
                    );
                }
            }
        }
    }
}

/// A request as [`Replay::capture`] leaves it.
enum Captured {
    /// Sent once, as it came.
    Once(Request<Incoming>),
    /// Kept apart, to be sent again if the token is refused.
    Replay(Replay),
}

/// A bodiless GET or HEAD to a `token = "user"` route, kept so that it can be sent once more
/// with a new token when the upstream answers that the token is invalid (RFC 6750).
struct Replay {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    /// `Bearer <access token>` as the first attempt carries it.
    bearer: HeaderValue,
}

impl Replay {
    /// Takes the request apart when it can be replayed (its head is all there is); gives it
    /// back otherwise.
    fn capture(
        route: &crate::config::RouteConfig,
        req: Request<Incoming>,
        bearer: Option<&HeaderValue>,
    ) -> Captured {
        let replayable = route.token == crate::config::TokenMode::User
            && (req.method() == Method::GET || req.method() == Method::HEAD)
            && http_body::Body::is_end_stream(req.body())
            && proxy::headers::upgrade_protocol(req.headers()).is_none();
        let (true, Some(bearer)) = (replayable, bearer) else {
            return Captured::Once(req);
        };
        let (parts, _) = req.into_parts();
        Captured::Replay(Replay {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            bearer: bearer.clone(),
        })
    }

    /// The access token the first attempt carried.
    fn token(&self) -> &str {
        self.bearer
            .to_str()
            .ok()
            .and_then(|b| b.strip_prefix("Bearer "))
            .unwrap_or_default()
    }

    fn request(&self) -> Request<Either<Incoming, Empty<Bytes>>> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// `401` with `WWW-Authenticate: Bearer error="invalid_token"`.
fn rejects_token(response: &Response<Body>) -> bool {
    response.status() == http::StatusCode::UNAUTHORIZED
        && response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("invalid_token")))
}

/// `vestibule check --online`: fetch the discovery document and the key set, and compare the
/// configuration with the metadata. `Ok` carries the warnings to print.
pub async fn check_provider(config: &Config) -> anyhow::Result<Vec<String>> {
    let oidc =
        Oidc::new(config.oidc.clone(), config.redirect_uri()).map_err(|e| anyhow::anyhow!(e))?;
    oidc.provider
        .refresh()
        .await
        .map_err(|e| anyhow::anyhow!("oidc.issuer: {e}"))?;
    let metadata = oidc
        .metadata()
        .map_err(|e| anyhow::anyhow!("oidc.issuer: {e}"))?;
    let support = crate::oidc::metadata::check_support(&metadata, config, &oidc.credential());
    if support.problems.is_empty() {
        Ok(support.warnings)
    } else {
        Err(anyhow::anyhow!(support.problems.join("\n")))
    }
}

/// How often the configuration file is checked for changes.
const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the configuration when the file's contents change on disk. Polling the contents is
/// simpler and sturdier than file-system events, which editors, atomic renames and Kubernetes
/// ConfigMap symlink swaps deliver in many different shapes; the file is small. A half-written
/// file is rejected by `reload` and picked up complete on the next tick. Stops with the app.
fn watch_config(app: &Arc<App>, path: std::path::PathBuf) {
    let weak = Arc::downgrade(app);
    let mut last = std::fs::read(&path).ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if weak.strong_count() == 0 {
                break;
            }
            let Ok(current) = tokio::fs::read(&path).await else {
                continue;
            };
            if last.as_ref() == Some(&current) {
                continue;
            }
            last = Some(current);
            let Some(app) = weak.upgrade() else { break };
            app.reload("file change");
        }
    });
}
