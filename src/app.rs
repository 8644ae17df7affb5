//! The application, the composition root: one long-lived [`App`] made of the shared state
//! ([`Shared`]: the pooled clients, the OpenID Connect client, the session manager and the
//! hot-swappable [`LiveConfig`] each request reads once) and the access stage's token caches; the
//! request pipeline that routes to the access stage, the BFF endpoints and the proxy; reloads.

use crate::access::{self, Tokens};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, ConfigErrors, SecretFile, TokenBinding};
use crate::field::Made;
use crate::oidc::client_auth::Credential;
use crate::oidc::{GrantError, Oidc};
use crate::proxy::headers::Client;
use crate::proxy::routing::{Destination, Resolved};
use crate::proxy::{self, Peer, Upstreams};
use crate::reply::{Body, ErrorCode, Inbound, Reader, in_box};
use crate::rescue::RequestError;
use crate::session::manager::{SessionSettings, Sessions, sizing};
use crate::session::seal::Keyring;
use crate::session::store::Store;
use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

mod readiness;
mod session_end;
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
    /// Spans to the OTLP collector; `None` without `[telemetry] otlp_endpoint` (no tracing work).
    tracer: Option<crate::telemetry::trace::Tracer>,
    /// The file reloads read.
    config_path: std::path::PathBuf,
    /// Held while a reload puts a configuration in effect: a SIGHUP and the watcher each read
    /// the running configuration and store the next one, and of two at once one would be lost
    /// (until the watcher's next look at the files, a second later).
    reloading: std::sync::Mutex<()>,
    /// `/readyz`'s store check, one PING at a time for every probe.
    store_ping: readiness::SharedPing,
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
        let store = Store::connect(&config.session.store, config.session.max_entries)
            .await
            .map_err(|e| anyhow::anyhow!("session store: {e}"))?;
        store.check_eviction();
        let cache_entries = config.session.cache_entries.unwrap_or_else(|| {
            let limit = sizing::memory_limit();
            let entries = sizing::entries_for(limit, config.server.worker_count());
            if !config.session.cache_ttl.is_zero() {
                tracing::info!(
                    cache_entries = entries,
                    memory_limit_mib = limit.map(|bytes| bytes >> 20),
                    "session cache sized from the memory the process may use (a quarter of it \
                     at most; session.cache_entries sets it)"
                );
            }
            entries
        });
        let settings = SessionSettings {
            cookie_name: config.session.cookie_name.clone(),
            idle_timeout: config.session.idle_timeout,
            absolute_timeout: config.session.absolute_timeout,
            keyring: Keyring::new(config.session.keys.clone())
                .map_err(|e| anyhow::anyhow!("session.keys: {e}"))?,
            cache_ttl: config.session.cache_ttl,
            cache_entries,
            max_per_user: config.session.max_per_user,
            // `oidc.issuer` is not reloaded: the sessions' issuer is fixed for the process.
            issuer: config.oidc.issuer.as_str().to_owned(),
        };
        let sessions = Arc::new(Sessions::new(settings, store));
        let dpop_key = crate::state::StoredDpopKey {
            store: sessions.store().clone(),
            keyring: sessions.shared_keyring(),
        };
        let oidc = Oidc::for_config(&config, Arc::new(dpop_key))?;
        if let Some(dpop) = oidc.dpop.clone() {
            // Loaded ahead of the first login; a store that is down now is retried on use.
            tokio::spawn(async move {
                if let Err(error) = dpop.key().await {
                    tracing::warn!(%error, "DPoP key not loaded yet; retried when needed");
                }
            });
        }
        tokio::spawn(
            oidc.provider
                .clone()
                .keep_fresh(config.oidc.metadata_refresh),
        );
        let limiter = crate::limits::RateLimiter::new(config.limits.tracked_addresses);
        let upstreams = Upstreams::for_config(&config)?;
        // Log events inside traced requests go on to the subscriber in effect now.
        // The collector is trusted as upstreams are: the roots `[tls]` names, and its `ca_file`.
        let collector_tls = crate::net::client_config(&crate::net::TlsSettings {
            roots: &crate::net::base_roots(config.tls.system_roots),
            extra: config
                .tls
                .ca_file
                .as_ref()
                .map_or(&[][..], |ca| ca.certs.as_slice()),
            identity: None,
        })?;
        let tracer = config.telemetry.otlp_endpoint.as_ref().map(|endpoint| {
            crate::telemetry::trace::Tracer::new(
                crate::telemetry::otlp::start(endpoint, crate::net::connector_with(collector_tls)),
                tracing::dispatcher::get_default(Clone::clone),
            )
        });
        let app = Arc::new(App {
            shared: Shared {
                live: Arc::new(ArcSwap::from_pointee(LiveConfig::new(config))),
                upstreams,
                oidc,
                sessions,
                clock,
                limiter,
                stopping: tokio_util::sync::CancellationToken::new(),
            },
            tokens: Tokens::default(),
            tracer,
            config_path: path.clone(),
            reloading: std::sync::Mutex::new(()),
            store_ping: readiness::SharedPing::default(),
        });
        watch_config(&app, path);
        Ok(app)
    }

    /// Resolves once every refresh under way has saved its answer and released its lease (a
    /// graceful shutdown waits for this within `shutdown_grace`).
    pub async fn refreshes_finished(&self) {
        self.tokens.finished().await;
    }

    /// Tests only: see [`Tokens::set_keep_saving_for`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn keep_saving_for(&self, time: std::time::Duration) {
        self.tokens.set_keep_saving_for(time);
    }

    /// Tests only: see [`Tokens::set_ended_check`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn ended_check(&self, time: std::time::Duration) {
        self.tokens.set_ended_check(time);
    }

    /// Tests only: see [`Tokens::unsaved_answers`].
    #[cfg(any(test, feature = "test-support"))]
    pub async fn unsaved_refresh_answers(&self) -> usize {
        self.tokens.unsaved_answers().await
    }

    /// Handles one request from the public listener, on the serving worker `worker`; while
    /// shutting down, an HTTP/1 answer also closes its connection.
    pub async fn handle(
        &self,
        req: Box<Request<Inbound>>,
        client: Client,
        worker: &Worker,
    ) -> Response<Body> {
        let (mut response, request_id) = self.answer(req, client, worker).await;
        response
            .headers_mut()
            .insert(X_REQUEST_ID, request_id.value());
        response
    }

    /// [`App::handle`]'s answer, and the request id it is to carry in `X-Request-Id` (in
    /// place of any the upstream sent): Vestibule's own server side writes the field as it
    /// encodes the head, without a map insertion.
    pub async fn answer(
        &self,
        mut req: Box<Request<Inbound>>,
        Client { ip, tls }: Client,
        worker: &Worker,
    ) -> (Response<Body>, Made) {
        let started = Instant::now();
        let live = worker.live(&self.live);
        let method = req.method().clone();
        let version = req.version();
        let peer = Peer {
            ip,
            tls,
            trusted: live.is_trusted(ip),
        };
        // Only a trusted proxy's request id is kept; anyone else's is replaced.
        let request_id =
            proxy::headers::request_id(req.headers(), peer.trusted, &worker.request_ids);
        // Only a trusted proxy may continue a trace (and decide its sampling); anyone else's
        // trace context reaches neither our spans nor the upstreams, and a trusted proxy's only
        // as W3C Trace Context allows it (`vet_trusted`: what breaks it is removed). Looked for
        // by walking the names (a removal by name hashes it, whether or not the field is
        // there; nearly every request has none). `baggage` crosses the same boundary, and is
        // vetted the same way: upstreams' SDKs take its entries into their context (and spans,
        // and logs).
        if peer.trusted {
            if req
                .headers()
                .keys()
                .any(|name| *name == TRACEPARENT || *name == TRACESTATE || *name == BAGGAGE)
            {
                crate::telemetry::trace::vet_trusted(req.headers_mut());
            }
        } else if req
            .headers()
            .keys()
            .any(|name| *name == TRACEPARENT || *name == TRACESTATE || *name == BAGGAGE)
        {
            req.headers_mut().remove(TRACEPARENT);
            req.headers_mut().remove(TRACESTATE);
            req.headers_mut().remove(BAGGAGE);
        }
        let remote = match &self.tracer {
            Some(_) if peer.trusted => req
                .headers()
                .get(TRACEPARENT)
                .and_then(|v| crate::telemetry::trace::SpanContext::parse(v.as_bytes())),
            _ => None,
        };
        let logging = tracing::enabled!(target: "vestibule::access", tracing::Level::INFO);
        // Cheap clones (shared bytes), taken only if the access log is on.
        let (client, user_agent, uri) = if logging {
            let trusted = &live.config.server.trusted_proxies;
            (
                crate::limits::client_address(ip, req.headers(), trusted),
                req.headers().get(header::USER_AGENT).cloned(),
                Some(req.uri().clone()),
            )
        } else {
            (ip, None, None)
        };
        let in_flight = worker.metrics.enter();
        let cors = access::cors_origin(&live, req.headers());
        let span = match &self.tracer {
            Some(tracer) => {
                tracer.request_span(&method, remote, live.config.telemetry.sample_ratio)
            }
            None => tracing::Span::none(),
        };
        let mut routed = match access::preflight(&live, &req) {
            Some(answer) => Routed::answer("preflight", answer),
            // Boxed: the pipeline's future is several KiB; kept inline, the request's future
            // (which hyper moves into its connection state) would be as large. Built in its box:
            // `Box::pin` would build it on the stack and copy all of it, once per request.
            None => match &self.tracer {
                None => in_box(|| self.route(&live, req, (peer, &request_id), worker)).await,
                Some(tracer) => {
                    use tracing::Instrument;
                    use tracing::instrument::WithSubscriber;
                    let span = span.clone();
                    in_box(|| {
                        self.route(&live, req, (peer, &request_id), worker)
                            .instrument(span)
                            .with_subscriber(tracer.dispatch().clone())
                    })
                    .await
                }
            },
        };
        let response = &mut routed.response;
        if let Some(origin) = cors {
            access::add_cors_headers(response.headers_mut(), origin);
        } else if !live.config.server.cors_origins.is_empty() {
            // The answer depends on Origin: caches must not serve this one to a listed origin.
            response
                .headers_mut()
                .append(header::VARY, http::HeaderValue::from_static("Origin"));
        }
        drop(in_flight);
        if self.stopping.is_cancelled() && version < http::Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        let upstream_ms = response
            .extensions()
            .get::<proxy::forward::UpstreamLatency>()
            .map(|l| l.0.as_secs_f64() * 1000.0);
        worker.metrics.record(routed.label, status, elapsed);
        let trace_id = crate::telemetry::trace::context(&span).map(|c| {
            span.record("http.route", routed.label);
            span.record("http.response.status_code", status);
            if status >= 500 {
                span.record("error.type", status);
            }
            tracing::field::display(crate::telemetry::trace::TraceId(c.trace_id))
        });
        drop(span);
        if logging {
            let config = &live.config;
            let user = routed.user.as_ref().and_then(|session| {
                let key = config.session.keys.first().map_or(&[][..], |k| &k[..]);
                crate::telemetry::logged_user(config.telemetry.log_user, key, &session.sub)
            });
            let raw = uri.as_ref().map_or("", |u| u.path());
            let path = routed.canonical.as_deref().unwrap_or(raw);
            tracing::info!(
                target: "vestibule::access",
                route = %routed.label,
                // A client's own method is a token up to `max_header_size` long: cut as the path.
                method = %crate::telemetry::logged_path(method.as_str()),
                path = %crate::telemetry::access_logged_path(path, &config.server.bff_prefix),
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                upstream_ms,
                request_id = request_id.as_str(),
                trace_id,
                client = %client,
                user = user.as_deref(),
                user_agent = user_agent.as_ref().and_then(|v| v.to_str().ok()).map(|ua| crate::telemetry::logged_path(ua)).as_deref(),
            );
        }
        (routed.response, request_id)
    }

    /// Answers the request; also returns what metrics and the access log say about it.
    async fn route<'r>(
        &self,
        live: &'r LiveConfig,
        mut req: Box<Request<Inbound>>,
        (peer, request_id): (Peer, &Made),
        worker: &Worker,
    ) -> Routed<'r> {
        let config = &live.config;
        if proxy::header_bytes(&req) > config.server.max_header_size {
            let mut refused = ErrorCode::HeadersTooLarge.json(&[]);
            // Pending logins' cookies may be what made it too large (another site can send a
            // browser to log in again and again): they go, so the browser's next request passes.
            let logins = crate::cookies::with_prefix(req.headers(), &live.login_prefix);
            for gone in crate::cookies::deletions(&config.session, logins.map(|(name, _)| name)) {
                refused.headers_mut().append(http::header::SET_COOKIE, gone);
            }
            return Routed::answer("-", refused);
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
                return Routed::answer("-", ErrorCode::BadPath.respond(Reader::of(req.headers())));
            }
        };
        if let Some(path) = &canonical
            && !proxy::set_path(&mut req, path)
        {
            return Routed::answer("-", ErrorCode::BadPath.json(&[]));
        }
        let routed = |label, response| Routed {
            label,
            canonical,
            user: None,
            response,
        };
        let route = match to {
            Destination::Route(route) => route,
            Destination::NoRoute => return routed("-", proxy::no_route(&req)),
            Destination::Bff => {
                let rest = req
                    .uri()
                    .path()
                    .get(prefix.len()..)
                    .unwrap_or("/")
                    .to_string();
                // Boxed: the BFF endpoints' futures are large and rare next to proxied calls,
                // and would otherwise grow every request's future (moved on each request).
                let label = crate::endpoints::label(req.method(), &rest);
                let answer = in_box(|| {
                    crate::endpoints::handle(self, &self.tokens, live, *req, &rest, peer.ip)
                })
                .await;
                return routed(label, answer);
            }
        };
        // RFC 9110 §9.3.8: the answer to a `TRACE` is the request as the upstream received it,
        // and a client MUST NOT put stored credentials or cookies into one. Here they would be
        // the user's access token, identity fields and assertion, shown to the browser.
        if proxy::echoes_the_request(req.method()) {
            let refused = ErrorCode::MethodNotAllowed.respond(Reader::of(req.headers()));
            return routed(route.path.as_str(), refused);
        }
        // `MOVE` and `COPY` name a second path, held to the route as the request's own is. GET
        // and HEAD move nothing: they are spared the lookup.
        if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
            let server = &config.server;
            match proxy::webdav::destination(
                &live.routes,
                route,
                req.headers(),
                &server.public_origin,
                prefix,
            ) {
                Ok(None) => {}
                Ok(Some(rewritten)) => {
                    req.headers_mut()
                        .insert(proxy::webdav::DESTINATION, rewritten);
                }
                Err(proxy::webdav::Refused) => {
                    tracing::debug!("a Destination naming no path of the route refused");
                    let refused = ErrorCode::BadRequest.respond(Reader::of(req.headers()));
                    return routed(route.path.as_str(), refused);
                }
            }
        }
        let admitted =
            match access::admit(self, &self.tokens, &worker.sessions, live, route, &req).await {
                Ok(a) => a,
                Err(error) => {
                    let reader = Reader::of(req.headers());
                    return routed(route.path.as_str(), error.respond(reader));
                }
            };
        // Read where it is (a move would copy it into more of this future's state).
        let session = &admitted.session;
        // Looked up once: the tunnel, the replay and the proxy ask it of the same fields (the
        // proxy's rewriting removes them, and the steps before it touch only DPoP's).
        let upgrade = proxy::headers::upgrade_protocol(req.headers());
        // A tunnel lasts no longer than the session it was opened with, nor than its route lets
        // it through (a reload may shut it, for a tunnel opened without a session too).
        let tunnel = upgrade.is_some().then(|| {
            let end = CancellationToken::new();
            req.extensions_mut()
                .insert(proxy::forward::TunnelEnd(end.clone()));
            (session.as_ref().map(|loaded| Box::new(loaded.clone())), end)
        });
        // Nor does an answer's body still streaming: bound only when the upstream's answer
        // was not read whole with its head (the session is copied then, not before). A request
        // that asks for a tunnel is bound too: an upstream that ignores the `Upgrade` answers
        // with a body of its own (an event stream), and only a `101` becomes the tunnel above.
        let bind_to_session = move |body: Body, path: &str| -> Body {
            let watcher = session_end::Watcher {
                sessions: worker.sessions.clone(),
                clock: self.clock.clone(),
                loaded: session.clone(),
                deadlines: worker.deadlines.clone(),
                gate: Some(session_end::Gate::of(
                    &self.oidc, &self.live, live, route, path,
                )),
            };
            http_body_util::BodyExt::boxed_unsync(session_end::SessionBound::new(body, watcher))
        };
        let streamed: proxy::Streamed<'_> = Some(&bind_to_session);
        let own = proxy::headers::OwnCookies {
            session: &live.own_cookie,
            login_prefix: &live.login_prefix,
            logout: &live.logout_cookie,
        };
        // DPoP routes prove possession afresh on every send (boxed: other routes never pay).
        let bound = route.token_binding == TokenBinding::Dpop;
        // The token goes with each send (a session's: a reference to it) and is written into the
        // upstream's head from where it is kept.
        let scheme = access::authorization_scheme(route);
        // The request stays here and is lent to each send, which rewrites it in place the same
        // way every time and gives it back: a request sent again (another token, a fresh proof)
        // is the same one, and none is copied beforehand in case it is.
        let asks_upgrade = upgrade.as_ref();
        let forward = async |req: &mut Request<Inbound>,
                             token: Option<access::Token>,
                             identity,
                             proof: Option<HeaderValue>| {
            if bound {
                // The browser's own proof never passes: only Vestibule's key proves possession.
                req.headers_mut().remove(crate::oidc::dpop::DPOP);
            }
            if let Some(proof) = proof {
                req.headers_mut().insert(crate::oidc::dpop::DPOP, proof);
            }
            // Built in a box of its own: inline, its 3.5 KB would be copied into this future
            // (and, for a replayable request, into the send's future around it) on every call.
            in_box(|| async move {
                let credential = token
                    .as_ref()
                    .and_then(|t| t.text(route))
                    .map(|token| proxy::headers::Credential { scheme, token });
                proxy::dispatch(
                    &worker.upstreams,
                    route,
                    req,
                    (peer, request_id),
                    own,
                    &live.public_side,
                    credential,
                    identity,
                    asks_upgrade.cloned(),
                    config.server.max_body,
                    body_pace(config),
                    (config.server.request_timeout, streamed),
                )
                .await
            })
            .await
        };
        // For an RFC 9470 step-up answer (only on routes that send the user's token): where the
        // login brings the user back, and whether the request is a navigation (sent to the
        // login) or an API call (told what to do).
        let steps_up = matches!(
            route.token,
            crate::config::TokenMode::User | crate::config::TokenMode::UserOrClient
        );
        let (mut response, step_up_return) = if !(admitted.token.is_some()
            && replayable(route, &req, upgrade.is_some()))
        {
            // Sent once: a request with a body (or an upgrade) is not the lender's afterwards.
            let step_up_return = steps_up.then(|| (req.uri().clone(), Reader::of(req.headers())));
            let proof = match bound {
                false => Ok(None),
                true => {
                    in_box(|| {
                        self.dpop_proof(
                            route,
                            req.method(),
                            req.uri().path(),
                            admitted.token.as_ref().and_then(|t| t.text(route)),
                        )
                    })
                    .await
                }
            };
            let response = match proof {
                Ok(proof) => {
                    let response =
                        forward(&mut req, admitted.token, admitted.identity, proof).await;
                    if bound {
                        self.keep_dpop_nonce(route, &response);
                    }
                    response
                }
                Err(error) => error.respond(Reader::of(req.headers())),
            };
            (response, step_up_return)
        } else {
            // No body: the request can be sent again with another token or proof.
            let identity = &admitted.identity;
            let send = async |req: &mut Request<Inbound>, token: Option<access::Token>| {
                if !bound {
                    return forward(req, token, identity.clone(), None).await;
                }
                // A fresh proof for each send (it carries the latest nonce).
                let prove_and_send = async |req: &mut Request<Inbound>| match in_box(|| {
                    self.dpop_proof(
                        route,
                        req.method(),
                        req.uri().path(),
                        token.as_ref().and_then(|t| t.text(route)),
                    )
                })
                .await
                {
                    Ok(proof) => forward(req, token.clone(), identity.clone(), proof).await,
                    Err(error) => error.respond(Reader::Script),
                };
                let response = prove_and_send(req).await;
                // RFC 9449 §9: an API that wants a nonce refuses with one; once more with it.
                if !(self.keep_dpop_nonce(route, &response) && asks_for_dpop_nonce(&response)) {
                    return response;
                }
                let again = prove_and_send(req).await;
                self.keep_dpop_nonce(route, &again);
                again
            };
            let first = send(&mut req, admitted.token.clone()).await;
            let response = if route.token == crate::config::TokenMode::User
                && rejects_token(route.token_binding, &first)
            {
                // Rare: boxed so that it does not grow every request's future.
                in_box(|| async {
                    let rejected = admitted.token.as_ref().and_then(|t| t.text(route));
                    let rejected = rejected.unwrap_or_default();
                    match self
                        .replace_token(worker, live, route, req.headers(), rejected)
                        .await
                    {
                        Ok(Some(fresh)) => send(&mut req, Some(access::Token::Owned(fresh))).await,
                        Ok(None) => first,
                        // A replayed API call: its errors are JSON.
                        Err(refused) => refused.respond(Reader::Script),
                    }
                })
                .await
            } else {
                first
            };
            let step_up_return = (steps_up && response.status() == http::StatusCode::UNAUTHORIZED)
                .then(|| (req.uri().clone(), Reader::of(req.headers())));
            (response, step_up_return)
        };
        if response.status() == http::StatusCode::UNAUTHORIZED
            && let Some((uri, reader)) = step_up_return
            && let Some(step) = crate::oidc::step_up::from_challenge(
                route.token_binding,
                response.headers().get_all(header::WWW_AUTHENTICATE).iter(),
            )
            && !self.session_satisfies(live, session.as_ref(), &step)
        {
            // The upstream wants a stronger or more recent sign-in (RFC 9470): the same answer
            // as a route's own step-up requirement (a navigation goes to the login).
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            response = RequestError::StepUp {
                login_url: crate::oidc::step_up::login_url(
                    &config.server.bff_prefix,
                    path_and_query,
                    Some(&step),
                ),
                step,
                redirect: true,
            }
            .respond(reader);
        }
        if let Some((loaded, end)) = tunnel
            && response.status() == http::StatusCode::SWITCHING_PROTOCOLS
        {
            let gate = session_end::Gate::of(&self.oidc, &self.live, live, route, req.uri().path());
            match loaded {
                Some(loaded) => {
                    // Read once at the start: the session was read at the request's admission,
                    // and an end announced while the upstream took its time to switch came
                    // before this watch listened (else the tunnel would outlive it by up to a
                    // timed read's 15 s). One store read per tunnel opened.
                    let what = ("an open tunnel", true);
                    tokio::spawn(session_end::close_with_session(
                        self.sessions.clone(),
                        self.clock.clone(),
                        loaded,
                        end,
                        what,
                        Some(gate),
                    ));
                }
                None => {
                    let what = "an open tunnel";
                    let clock = self.clock.clone();
                    tokio::spawn(session_end::close_unless_admitted(gate, clock, end, what));
                }
            }
        }
        // An upstream under `strip_prefix` (or a base path) names its own paths in a 201's or
        // a redirect's `Location`, and in any answer's `Content-Location`: written back as the
        // public path (routes that map paths as they are look at neither).
        if proxy::webdav::maps_paths(route) {
            let status = response.status();
            let origin = &config.server.public_origin;
            if (status.is_redirection() || status == http::StatusCode::CREATED)
                && let Some(location) = response.headers().get(header::LOCATION)
                && let Some(public) = proxy::webdav::public_location(route, location, origin)
            {
                response.headers_mut().insert(header::LOCATION, public);
            }
            if let Some(location) = response.headers().get(header::CONTENT_LOCATION)
                && let Some(public) = proxy::webdav::public_location(route, location, origin)
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_LOCATION, public);
            }
        }
        // A cache between the browser and Vestibule sees the cookie, not the token the
        // upstream was sent: an answer about the user stays out of shared caches unless the
        // upstream shared it itself (RFC 9111 §3.5, as for a request with `Authorization`). An
        // answer only some sessions may reach stays out whatever the upstream says: the cache
        // keys on the URL, not on the cookie Vestibule decided by, and the upstream never saw
        // that gate, so its `public`, `s-maxage` or a CDN's own field would open it to anyone.
        if session.is_some() && response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            if route.reached_by_some() {
                private_to_shared_caches(response.headers_mut(), Sharing::Never);
            } else if steps_up || route.sets_identity() {
                private_to_shared_caches(response.headers_mut(), Sharing::AsTheUpstreamSays);
            }
        }
        for cookie in admitted.set_cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        let mut routed = routed(route.path.as_str(), response);
        routed.user = admitted
            .session
            .filter(|_| live.config.telemetry.log_user != crate::config::LogUser::None)
            .map(|l| l.session);
        routed
    }

    /// Whether the request's session already has the sign-in an upstream's RFC 9470 challenge
    /// asks for: another login would bring back the same and return to the same answer (with a
    /// provider that keeps the stronger sign-in, at once), so the upstream's answer stands.
    fn session_satisfies(
        &self,
        live: &LiveConfig,
        session: Option<&crate::session::manager::OpenSession>,
        step: &crate::config::StepUp,
    ) -> bool {
        let Some(loaded) = session else {
            return false;
        };
        let now = self.clock.now();
        let met = crate::oidc::step_up::check(
            step,
            loaded.session.claims.map(),
            now,
            now,
            live.config.oidc.clock_skew.as_secs(),
        )
        .is_ok();
        if met {
            tracing::warn!(
                "the upstream asked for a sign-in the session already has \
                 (insufficient_user_authentication); its answer is passed on, not a step-up"
            );
        }
        met
    }

    /// Another access token for a request whose token the upstream refused: refreshed now (once
    /// per session, like any refresh), unless another request already replaced it. `None`: no
    /// new token (no session, or one was forced moments ago); the first answer stands.
    async fn replace_token(
        &self,
        worker: &Worker,
        live: &LiveConfig,
        route: &crate::config::RouteConfig,
        headers: &HeaderMap,
        rejected: &str,
    ) -> Result<Option<String>, RequestError> {
        let Some(loaded) = self.load_session(&worker.sessions, live, headers).await? else {
            return Ok(None);
        };
        let Some(token) = self
            .tokens
            .replace_user_token(
                &access::TokenAsk {
                    app: self,
                    sessions: &worker.sessions,
                    live,
                    loaded: &loaded,
                    route,
                },
                rejected,
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(token.into_owned()))
    }

    /// A fresh DPoP proof (RFC 9449 §7) for one send of a request to a `token_binding = "dpop"`
    /// route: `htm`, `htu` (the upstream URL without query), `ath` of the token in
    /// `authorization`, and the upstream's latest nonce. `None` without a token to bind.
    async fn dpop_proof(
        &self,
        route: &crate::config::RouteConfig,
        method: &Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<Option<HeaderValue>, RequestError> {
        let (Some(dpop), Some(token)) = (&self.oidc.dpop, token) else {
            return Ok(None);
        };
        let Some((htu, origin)) = proxy::upstream_target(route, path) else {
            return Ok(None);
        };
        let unavailable = |e: crate::oidc::dpop::DpopError| {
            RequestError::Provider(GrantError::from(crate::oidc::Unavailable::Dpop(e)))
        };
        let key = dpop.key().await.map_err(unavailable)?;
        let nonce = dpop.nonce(origin);
        let proof = key
            .proof(
                method.as_str(),
                &htu.to_string(),
                crate::clock::now(),
                Some(token),
                nonce.as_deref(),
            )
            .map_err(unavailable)?;
        HeaderValue::from_str(&proof)
            .map(Some)
            .map_err(|_| RequestError::Internal("a DPoP proof is not a header value"))
    }

    /// Keeps the `DPoP-Nonce` an upstream sent for its next proofs; `true` if there was one.
    fn keep_dpop_nonce(
        &self,
        route: &crate::config::RouteConfig,
        response: &Response<Body>,
    ) -> bool {
        let (Some(dpop), Some(nonce)) = (
            &self.oidc.dpop,
            response.headers().get(crate::oidc::dpop::DPOP_NONCE),
        ) else {
            return false;
        };
        let Some((_, origin)) = proxy::upstream_target(route, "/") else {
            return false;
        };
        dpop.remember_nonce(origin, nonce.as_bytes())
    }

    /// Readiness checks by name; all must pass for `/readyz` to answer 200. `accepting` fails as
    /// soon as shutdown begins, so load balancers stop sending before the listener closes.
    /// `store`: a PING shared by the probes that come while it is under way, its PONG reused
    /// for a second ([`readiness`]).
    pub async fn readiness(&self) -> Vec<(&'static str, bool)> {
        let store = self
            .store_ping
            .check(self.sessions.store().outages(), || {
                let store = self.sessions.store().clone();
                async move { store.ping().await.is_ok() }
            })
            .await;
        vec![
            ("store", store),
            ("provider", self.oidc.provider.is_ready()),
            ("accepting", !self.stopping.is_cancelled()),
        ]
    }

    /// Re-reads the configuration file; a bad file is rejected, logged, and the running
    /// configuration kept (its secret files are read again all the same). It reads files, which
    /// may block (a hung mount): call it off the runtime that accepts connections.
    pub fn reload(&self, trigger: &str) {
        let applied = self.apply_or_rotate(Config::load(&self.config_path), trigger);
        if let Err(errors) = &applied {
            log_rejected(trigger, errors);
        }
    }

    /// Puts `loaded`, the configuration file as read, in effect; if it is refused (an error, or
    /// a file that only a restart can apply), the secret files of the running configuration are
    /// read again on their own ([`App::rotate_secrets`]): a rotated secret never waits for the
    /// configuration file. The problems of both, each once.
    fn apply_or_rotate(
        &self,
        loaded: Result<Config, ConfigErrors>,
        trigger: &str,
    ) -> Result<(), ConfigErrors> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Err(mut errors) = loaded.and_then(|config| self.apply(config, trigger)) else {
            return Ok(());
        };
        if let Err(ConfigErrors(more)) = self.rotate_secrets(trigger) {
            for error in more {
                if !errors.0.contains(&error) {
                    errors.0.push(error);
                }
            }
        }
        Err(errors)
    }

    /// Puts `config`, loaded from the configuration file, in effect over the running one, or
    /// refuses it (nothing is swapped before every part has been loaded).
    fn apply(&self, config: Config, trigger: &str) -> Result<(), ConfigErrors> {
        let old = self.live.load_full();
        // Restart-only keys keep their running value: one snapshot is in effect.
        let mut reloaded = crate::config::reload::reload(&old.config, config, &self.config_path)?;
        // The credential follows `oidc.client_auth`: a change of method keeps the running one
        // whole until a restart (the reloaded configuration holds its keys and its secret file,
        // which is read again here at its running path, as the file's own would have been).
        let credential_kept = reloaded.restart_needed.contains(&"oidc.client_auth");
        if credential_kept {
            reloaded
                .config
                .read_secret_again(SecretFile::ClientSecret)?;
        }
        self.swap_secrets(&old.config, &reloaded.config, true, trigger)?;
        for key in &reloaded.restart_needed {
            tracing::warn!(trigger, "{key} changed; this takes effect after a restart");
        }
        if credential_kept {
            tracing::warn!(
                trigger,
                "the client keeps its running credential until a restart, as oidc.client_auth does: the client_secret, client_secret_file, client_key_file, client_published_key_files and client_assertion_file of this file are not used (the running ones are read again)"
            );
        }
        self.put_in_effect(LiveConfig::new(reloaded.config));
        self.upstreams
            .keep_route_clients(&self.live.load().config.routes);
        tracing::info!(trigger, "configuration reloaded");
        Ok(())
    }

    /// Puts `next` in effect: every request from now on reads it, and every open stream checks
    /// its route against it ([`LiveConfig::superseded`]).
    fn put_in_effect(&self, next: LiveConfig) {
        let previous = self.live.swap(Arc::new(next));
        previous.superseded.cancel();
    }

    /// The secret files of the running configuration (`oidc.client_secret_file`,
    /// `session.keys_file`) read again at its paths, and each one that changed put in effect
    /// with the rest of the running configuration: what a reload does for them when the
    /// configuration file is refused, whatever paths that file names. A bad secret file is
    /// refused, named, and its running secret kept; a good one is applied all the same.
    fn rotate_secrets(&self, trigger: &str) -> Result<(), ConfigErrors> {
        let old = self.live.load_full();
        let mut config = Config::clone(&old.config);
        let mut errors = Vec::new();
        let mut secret_changed = false;
        let mut changed = false;
        for which in [SecretFile::ClientSecret, SecretFile::SessionKeys] {
            match config.read_secret_again(which) {
                Ok(read) => {
                    changed |= read;
                    secret_changed |= read && which == SecretFile::ClientSecret;
                }
                Err(ConfigErrors(problems)) => errors.extend(problems),
            }
        }
        if changed {
            match self.swap_secrets(&old.config, &config, secret_changed, trigger) {
                Ok(()) => {
                    self.put_in_effect(LiveConfig::new(config));
                    tracing::info!(
                        trigger,
                        "secret files applied with the running configuration, the configuration file being refused"
                    );
                }
                Err(ConfigErrors(problems)) => errors.extend(problems),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Hands the secrets of `new` to the parts built at start that hold a copy: the OpenID
    /// client's credential (loaded again from `new` when `credential`: its secret, key and
    /// assertion files are read, so rotating one needs no restart) and the session key ring
    /// when it differs from `old`'s. Refused, with nothing swapped, if either cannot be loaded.
    fn swap_secrets(
        &self,
        old: &Config,
        new: &Config,
        credential: bool,
        trigger: &str,
    ) -> Result<(), ConfigErrors> {
        let refused = |key: &str, message: String| {
            ConfigErrors(vec![ConfigError {
                path: key.to_string(),
                message,
            }])
        };
        let credential = if credential {
            Some(Credential::load(&new.oidc).map_err(|e| refused(&e.key, e.message))?)
        } else {
            None
        };
        let keyring = if new.session.keys != old.session.keys {
            let ring = Keyring::new(new.session.keys.clone());
            Some(ring.map_err(|e| refused("session.keys", e.to_string()))?)
        } else {
            None
        };
        if let Some(keyring) = keyring {
            self.sessions.replace_keyring(keyring);
            tracing::info!(
                trigger,
                keys = new.session.keys.len(),
                "session keys replaced"
            );
            // The stored DPoP key is read again under the new ring now, which seals it with the
            // new first key while the old one is still listed: it must not wait for DPoP
            // traffic, or the old key may be gone by then and the key replaced.
            if let Some(dpop) = self.oidc.dpop.clone() {
                tokio::spawn(async move {
                    if let Err(error) = dpop.key().await {
                        tracing::warn!(%error, "DPoP key not read again after the session keys changed; retried when needed");
                    }
                });
            }
        }
        if let Some(credential) = credential {
            self.oidc.set_credential(credential);
            if new.oidc.client_secret != old.oidc.client_secret {
                tracing::info!(trigger, "client secret replaced");
            }
        }
        Ok(())
    }
}

fn log_rejected(trigger: &str, errors: &ConfigErrors) {
    for error in &errors.0 {
        tracing::error!(
            trigger,
            "configuration rejected, keeping the previous one: {error}"
        );
    }
}

/// The `traceparent` and `tracestate` headers (W3C trace context).
// Header names as `HeaderName` values: looked up by text, a name is parsed and checked on
// every call (a few hundred instructions each, several times per request).
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// W3C Baggage, which travels with the trace context.
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the pipeline answered, with what the metrics and the access log say about it.
struct Routed<'r> {
    /// The name for metrics and the log: a route's path, `bff:/login`, `preflight`, `-`.
    label: &'r str,
    /// The canonical path, when it differs from the request's.
    canonical: Option<String>,
    /// The session's user on a proxied route (read by the access log).
    user: Option<Arc<crate::session::model::Session>>,
    response: Response<Body>,
}

impl<'r> Routed<'r> {
    fn answer(label: &'r str, response: Response<Body>) -> Routed<'r> {
        Routed {
            label,
            canonical: None,
            user: None,
            response,
        }
    }
}

/// Whether an upstream may open an answer to shared caches that Vestibule marks `private`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharing {
    /// The upstream saw who asked (the user's token, identity fields, an assertion) and may
    /// share the answer on purpose: `public`, `s-maxage` (RFC 9111 §3.5).
    AsTheUpstreamSays,
    /// Vestibule's gate (`auth = "required"`, `require`, `feature`, step-up) decided who reads
    /// it, which the upstream never sees: its sharing directives and the fields CDNs and caching
    /// proxies obey over `Cache-Control` are dropped.
    Never,
}

/// Marks an answer `private` for caches (RFC 9111 §5.2.2.7) unless its `Cache-Control` already
/// keeps it from shared caches (`private`, `no-store`) or, where [`Sharing`] lets it, lets them
/// keep it on purpose (`public`, `s-maxage`). The upstream's other directives stay, after
/// `private`.
fn private_to_shared_caches(headers: &mut HeaderMap, sharing: Sharing) {
    if sharing == Sharing::Never {
        drop_cdn_fields(headers);
    }
    let fields: Vec<&[u8]> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let (mut private, mut kept_out, mut shared) = (false, false, false);
    for (name, directive) in fields.iter().flat_map(|field| directives(field)) {
        let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
        // `private="field"` keeps only the fields it names from shared caches.
        private |= is("private") && name.len() == directive.len();
        kept_out |= is("no-store");
        shared |= is("public") || is("s-maxage");
    }
    let private = private || kept_out;
    match sharing {
        Sharing::AsTheUpstreamSays if private || shared => return,
        Sharing::Never if private && !shared => return,
        _ => {}
    }
    if fields.is_empty() {
        // Most answers: nothing to keep, nothing to allocate.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
        return;
    }
    let mut value = b"private".to_vec();
    if shared {
        // Only with `Sharing::Never`: the directives one by one, without those sharing it.
        // An unqualified `private` is the one in front.
        let kept = fields
            .iter()
            .flat_map(|field| directives(field))
            .filter(|(name, directive)| {
                let is = |d: &str| name.eq_ignore_ascii_case(d.as_bytes());
                !(is("public")
                    || is("s-maxage")
                    || (is("private") && name.len() == directive.len()))
            });
        for (_, directive) in kept {
            value.extend_from_slice(b", ");
            value.extend_from_slice(directive);
        }
    } else {
        for field in fields.iter().filter(|f| !f.trim_ascii().is_empty()) {
            value.extend_from_slice(b", ");
            value.extend_from_slice(field);
        }
    }
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

/// The directives of a `Cache-Control` field: (name, whole directive), trimmed, empty ones
/// skipped. A comma inside a quoted argument (`no-cache="a, private"`, RFC 9110 §5.6.4, with
/// its `\` escapes) is the argument's: what it holds is no directive, as caches read it.
fn directives(field: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let (mut quoted, mut escaped) = (false, false);
    field
        .split(move |&b| {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' => return !quoted,
                _ => {}
            }
            false
        })
        .map(<[u8]>::trim_ascii)
        .filter(|d| !d.is_empty())
        .map(|directive| {
            let name = directive.split(|b| *b == b'=').next().unwrap_or_default();
            (name.trim_ascii(), directive)
        })
}

/// Fields a CDN or a caching proxy in front obeys over `Cache-Control` (RFC 9213's
/// `CDN-Cache-Control` and the `<vendor>-CDN-Cache-Control` family, `Surrogate-Control`,
/// Akamai's `Edge-Control`, nginx's `X-Accel-Expires`). Looked for by comparing the names the
/// answer has, so an answer without them costs no lookup and no allocation.
fn drop_cdn_fields(headers: &mut HeaderMap) {
    // Every gated answer's names pass through it: told apart by length and last byte first
    // (every such name but nginx's ends in `-control`), with no call for most names.
    fn is_cdn_field(name: &http::HeaderName) -> bool {
        let name = name.as_str().as_bytes();
        match name.len() {
            0..12 => false,
            12 => name == b"edge-control",
            15 if name[0] == b'x' => name == b"x-accel-expires",
            _ => {
                name.last() == Some(&b'l')
                    && (name.ends_with(b"-cache-control") || name == b"surrogate-control")
            }
        }
    }
    if !headers.keys().any(is_cdn_field) {
        return;
    }
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| is_cdn_field(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether a request can be sent again with a new token when the upstream answers that the
/// token is invalid (RFC 6750), or with a fresh DPoP proof when it asks for a nonce: a bodiless
/// GET or HEAD, no upgrade, to a `token = "user"` or DPoP-bound route.
/// `upgrade`: the request asks to switch protocols ([`proxy::headers::upgrade_protocol`]).
fn replayable(route: &crate::config::RouteConfig, req: &Request<Inbound>, upgrade: bool) -> bool {
    (route.token == crate::config::TokenMode::User || route.token_binding == TokenBinding::Dpop)
        && (req.method() == Method::GET || req.method() == Method::HEAD)
        && http_body::Body::is_end_stream(req.body())
        && !upgrade
}

/// `401` with a challenge whose `error` is `invalid_token` (RFC 6750 §3.1) in a scheme the
/// token went with ([`crate::oidc::challenge::schemes_for`]). The code in a description, a
/// realm or another scheme's challenge is not the upstream refusing the token, and must not
/// cost the session an early refresh.
fn rejects_token(binding: TokenBinding, response: &Response<Body>) -> bool {
    response.status() == http::StatusCode::UNAUTHORIZED
        && crate::oidc::challenge::find(
            response.headers().get_all(header::WWW_AUTHENTICATE),
            crate::oidc::challenge::schemes_for(binding),
            "invalid_token",
        )
        .is_some()
}

/// `401` with `WWW-Authenticate: DPoP error="use_dpop_nonce"` (RFC 9449 §9: the nonce request
/// is a `DPoP` challenge's).
fn asks_for_dpop_nonce(response: &Response<Body>) -> bool {
    response.status() == http::StatusCode::UNAUTHORIZED
        && crate::oidc::challenge::find(
            response.headers().get_all(header::WWW_AUTHENTICATE),
            &["DPoP"],
            "use_dpop_nonce",
        )
        .is_some()
}

/// `vestibule check --online`: fetch the discovery document and the key set, and compare the
/// configuration with the metadata (client authentication, PAR, DPoP, step-up `acr` values).
/// `Ok` carries the warnings to print.
pub async fn check_provider(config: &Config) -> anyhow::Result<Vec<String>> {
    let oidc = Oidc::for_config(config, Arc::new(crate::oidc::dpop::ProcessKey))?;
    oidc.provider
        .refresh()
        .await
        .map_err(|e| anyhow::anyhow!("oidc.issuer: {e}"))?;
    let metadata = oidc
        .provider
        .get()
        .ok_or_else(|| anyhow::anyhow!("the provider metadata did not load"))?;
    let mut support = crate::oidc::metadata::check_support(&metadata, config, &oidc.credential());
    if let Err(offers) = provider_offers(&config.oidc, &metadata) {
        support.problems.extend(offers.lines().map(String::from));
    }
    if support.problems.is_empty() {
        Ok(support.warnings)
    } else {
        Err(anyhow::anyhow!(support.problems.join("\n")))
    }
}

/// What the configuration needs of the provider's metadata, as `check --online` reports it.
pub fn provider_offers(
    oidc: &crate::config::OidcConfig,
    metadata: &crate::oidc::metadata::Metadata,
) -> Result<(), String> {
    let mut problems = Vec::new();
    if oidc.par == crate::config::Par::Always
        && metadata.pushed_authorization_request_endpoint.is_none()
    {
        problems.push(
            "oidc.par: \"always\", but the provider advertises no \
             pushed_authorization_request_endpoint; use \"auto\" or \"never\""
                .to_string(),
        );
    }
    if oidc.par == crate::config::Par::Never
        && metadata.require_pushed_authorization_requests == Some(true)
    {
        problems.push(
            "oidc.par: \"never\", but the provider requires pushed authorization requests; \
             use \"auto\""
                .to_string(),
        );
    }
    if oidc.dpop {
        match &metadata.dpop_signing_alg_values_supported {
            None => problems.push(
                "oidc.dpop: the provider advertises no dpop_signing_alg_values_supported: \
                 it does not issue DPoP-bound tokens"
                    .to_string(),
            ),
            Some(algs) if !algs.iter().any(|a| a == "ES256") => problems.push(format!(
                "oidc.dpop: the provider accepts DPoP proofs signed with {algs:?}, not ES256"
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// How often the configuration file is checked for changes.
const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the configuration when the file, or a secret file the running configuration was
/// read from (`oidc.client_secret_file`, `session.keys_file`), no longer holds what it was
/// built from (its [`Sources`](crate::config::Sources), the bytes read at load, so a change
/// made while the app was starting counts): a rotated Kubernetes Secret reaches the running
/// process without a signal. Polling the contents is simpler and sturdier than file-system
/// events, which editors, atomic renames and Kubernetes ConfigMap symlink swaps deliver in many
/// different shapes; the files are small.
///
/// A change is loaded once two looks a second apart find the same bytes: a tool
/// that truncates a file and writes it in parts leaves it half-written for a moment, and a file
/// cut after a complete route (or a keys file holding the new key but not yet the old one) is
/// valid, so it would be put in effect until the next look. A refused file is tried again on
/// every tick until it is applied: one naming a file or directory that appears later (a volume
/// updated after the ConfigMap) is applied then. Its problems are logged once for each new
/// content or new problems, not every tick. While it is refused, a changed secret file is
/// applied on its own, at the running path. Stops with the app.
fn watch_config(app: &Arc<App>, path: std::path::PathBuf) {
    let weak = Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // What the files held when a reload was last refused, and why.
        let mut refused: Option<(Vec<Option<Vec<u8>>>, ConfigErrors)> = None;
        // What the files held at the last look, if it was not what the running configuration
        // was read from: a change is loaded only when the next look finds the same bytes.
        let mut last_look: Option<Vec<Option<Vec<u8>>>> = None;
        loop {
            tick.tick().await;
            let Some(sources) = weak
                .upgrade()
                .map(|app| app.live.load().config.sources.clone())
            else {
                break;
            };
            let path = path.clone();
            let looked = last_look.take();
            let Ok((seen, loaded)) = tokio::task::spawn_blocking(move || {
                let seen = read_sources(&path, &sources);
                let running = std::iter::once(Some(sources.text.as_bytes())).chain(
                    sources
                        .files
                        .iter()
                        .map(|(_, bytes)| Some(bytes.as_slice())),
                );
                if running.eq(seen.iter().map(Option::as_deref)) {
                    return (None, None);
                }
                if looked.as_ref() != Some(&seen) {
                    // Changed since the last look (or first seen changed): look again.
                    return (Some(seen), None);
                }
                let loaded = Config::load(&path);
                // Loaded from what was looked at twice, not from a write begun since.
                let same = loaded.as_ref().map_or(true, |config| {
                    Some(config.sources.text.as_bytes()) == seen[0].as_deref()
                        && (config.sources.files.iter()).all(|(file, bytes)| {
                            let at = sources.files.iter().position(|(f, _)| f == file);
                            at.is_none_or(|at| Some(bytes) == seen[at + 1].as_ref())
                        })
                });
                (Some(seen), same.then_some(loaded))
            })
            .await
            else {
                continue;
            };
            let Some(seen) = seen else {
                refused = None;
                continue;
            };
            last_look = Some(seen.clone());
            let Some(loaded) = loaded else { continue };
            let Some(app) = weak.upgrade() else { break };
            // Off the runtime's thread, as the look: putting it in effect reads files too.
            let applied =
                tokio::task::spawn_blocking(move || app.apply_or_rotate(loaded, "file change"));
            let Ok(applied) = applied.await else { continue };
            match applied {
                Ok(()) => refused = None,
                Err(errors) => {
                    let again = Some((seen, errors));
                    if refused != again
                        && let Some((_, errors)) = &again
                    {
                        log_rejected("file change", errors);
                    }
                    refused = again;
                }
            }
        }
    });
}

/// The configuration file at `path` and the secret files of `sources`, as they are now
/// (`None`: unreadable). Bounded reads of regular files only: a file swapped for a FIFO or a
/// device must not block or fill the watcher (the reload it starts refuses such a file, named).
fn read_sources(path: &std::path::Path, sources: &crate::config::Sources) -> Vec<Option<Vec<u8>>> {
    let read =
        |file: &std::path::Path| crate::config::read_file(file, crate::config::MAX_FILE).ok();
    std::iter::once(read(path))
        .chain(sources.files.iter().map(|(file, _)| read(file)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cache_control(fields: &[&[u8]]) -> Vec<Vec<u8>> {
        cache_control_as(fields, Sharing::AsTheUpstreamSays)
    }

    fn cache_control_as(fields: &[&[u8]], sharing: Sharing) -> Vec<Vec<u8>> {
        let mut headers = HeaderMap::new();
        for field in fields {
            headers.append(
                header::CACHE_CONTROL,
                HeaderValue::from_bytes(field).unwrap(),
            );
        }
        private_to_shared_caches(&mut headers, sharing);
        headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn a_gated_answer_loses_every_word_that_would_share_it() {
        let never = |fields: &[&[u8]]| cache_control_as(fields, Sharing::Never);
        assert_eq!(never(&[]), [b"private".to_vec()]);
        assert_eq!(
            never(&[b"PUBLIC, max-age=60", b"S-MaxAge = 30, must-revalidate"]),
            [b"private, max-age=60, must-revalidate".to_vec()]
        );
        assert_eq!(
            never(&[b"public, private, max-age=5"]),
            [b"private, max-age=5".to_vec()]
        );
        // A qualified `private` stays as the upstream's; the answer is private as a whole.
        assert_eq!(
            never(&[b"s-maxage=9, private=\"set-cookie\""]),
            [b"private, private=\"set-cookie\"".to_vec()]
        );
        for kept in [&b"no-store"[..], b"private, max-age=60"] {
            assert_eq!(never(&[kept]), [kept.to_vec()]);
        }
        let mut headers = HeaderMap::new();
        for name in [
            "cdn-cache-control",
            "cloudflare-cdn-cache-control",
            "surrogate-control",
            "edge-control",
            "x-accel-expires",
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                HeaderValue::from_static("max-age=600"),
            );
        }
        headers.insert(header::ETAG, HeaderValue::from_static("\"1\""));
        private_to_shared_caches(&mut headers, Sharing::AsTheUpstreamSays);
        assert_eq!(headers.len(), 7, "the upstream saw who asked: {headers:?}");
        private_to_shared_caches(&mut headers, Sharing::Never);
        let mut names: Vec<&str> = headers.keys().map(http::HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["cache-control", "etag"]);
    }

    /// A `private` or `no-store` inside a quoted argument (`no-cache="a, private, b"`: field
    /// names) is no directive: a cache reads `max-age=600` alone, and stores the answer for
    /// everyone. Nor is a quoted `public` one.
    #[test]
    fn a_word_inside_a_quoted_argument_is_no_directive() {
        let text = |fields: Vec<Vec<u8>>| -> Vec<String> {
            fields
                .into_iter()
                .map(|f| String::from_utf8(f).unwrap())
                .collect()
        };
        let never = |fields: &[&[u8]]| text(cache_control_as(fields, Sharing::Never));
        for quoted in [
            &b"max-age=600, no-cache=\"a, private, b\""[..],
            b"max-age=600, no-cache=\"a,no-store,b\"",
            b"max-age=600, x=\"\\\", private, \\\"\"",
        ] {
            let expected = format!("private, {}", std::str::from_utf8(quoted).unwrap());
            assert_eq!(never(&[quoted]), std::slice::from_ref(&expected));
            assert_eq!(text(cache_control(&[quoted])), [expected]);
        }
        assert_eq!(
            never(&[b"no-cache=\"a, public, b\", max-age=5"]),
            ["private, no-cache=\"a, public, b\", max-age=5"]
        );
    }

    /// A `401` with these `WWW-Authenticate` fields.
    fn challenged(fields: &[&str]) -> Response<Body> {
        let mut response = Response::new(crate::reply::empty());
        *response.status_mut() = http::StatusCode::UNAUTHORIZED;
        for field in fields {
            let value = HeaderValue::from_str(field).unwrap();
            response
                .headers_mut()
                .append(header::WWW_AUTHENTICATE, value);
        }
        response
    }

    #[test]
    fn only_an_invalid_token_error_asks_for_a_new_token() {
        for fields in [
            &[r#"Bearer error="invalid_token""#][..],
            &[r#"Bearer realm="api", error=invalid_token, error_description="expired""#],
            &[r#"Basic realm="x""#, r#"bearer ERROR="invalid_token""#],
            &[r#"Basic realm="x", Bearer error="invalid_token""#],
        ] {
            assert!(
                rejects_token(TokenBinding::None, &challenged(fields)),
                "{fields:?}"
            );
            assert!(
                rejects_token(TokenBinding::Dpop, &challenged(fields)),
                "{fields:?}"
            );
        }
        for fields in [
            &[r#"Bearer error="insufficient_scope", error_description="the invalid_token flag""#][..],
            &[r#"Bearer realm="invalid_token""#],
            &[r#"Bearer error="invalid_token_not""#],
            &[r#"Bearer error="insufficient_scope", scope="invalid_token""#],
            &[r#"Basic realm="x", error="invalid_token""#],
            &[r#"Newauth error="invalid_token""#],
            &[r#"Bearer error="insufficient_scope", error_description="a \"invalid_token\" b""#],
        ] {
            assert!(
                !rejects_token(TokenBinding::None, &challenged(fields)),
                "{fields:?}"
            );
            assert!(
                !rejects_token(TokenBinding::Dpop, &challenged(fields)),
                "{fields:?}"
            );
        }
        let mut forbidden = challenged(&[r#"Bearer error="invalid_token""#]);
        *forbidden.status_mut() = http::StatusCode::FORBIDDEN;
        assert!(!rejects_token(TokenBinding::None, &forbidden));
        // RFC 9449 §7.1: a DPoP-bound token is refused in a DPoP challenge, which is not about
        // a bearer token.
        let dpop = challenged(&[r#"Bearer realm="api", DPoP error="invalid_token""#]);
        assert!(rejects_token(TokenBinding::Dpop, &dpop));
        assert!(!rejects_token(TokenBinding::None, &dpop));
    }

    #[test]
    fn only_a_dpop_challenge_with_use_dpop_nonce_asks_for_a_nonce() {
        for fields in [
            &[r#"DPoP error="use_dpop_nonce""#][..],
            &[r#"DPoP algs="ES256 PS256", error="use_dpop_nonce", error_description="x""#],
            &[r#"Bearer realm="api", dpop error=use_dpop_nonce"#],
        ] {
            assert!(asks_for_dpop_nonce(&challenged(fields)), "{fields:?}");
        }
        for fields in [
            &[r#"Bearer realm="use_dpop_nonce""#][..],
            &[r#"Bearer error="use_dpop_nonce""#],
            &[r#"DPoP error="invalid_dpop_proof", error_description="use_dpop_nonce next""#],
            &[r#"DPoP realm="api""#, r#"Bearer error="use_dpop_nonce""#],
        ] {
            assert!(!asks_for_dpop_nonce(&challenged(fields)), "{fields:?}");
        }
    }

    #[test]
    fn an_answer_is_private_unless_its_upstream_decided_about_shared_caches() {
        assert_eq!(cache_control(&[]), [b"private".to_vec()]);
        assert_eq!(
            cache_control(&[b"max-age=60", b"must-revalidate"]),
            [b"private, max-age=60, must-revalidate".to_vec()]
        );
        assert_eq!(cache_control(&[b""]), [b"private".to_vec()]);
        // A byte outside ASCII is kept as it came.
        assert_eq!(
            cache_control(&[b"max-age=1, x=\xe9"]),
            [b"private, max-age=1, x=\xe9".to_vec()]
        );
        for decided in [
            &b"PUBLIC, max-age=60"[..],
            b"max-age=60, S-MaxAge = 30",
            b"no-store",
            b"Private",
        ] {
            assert_eq!(cache_control(&[decided]), [decided.to_vec()]);
        }
        // Private for one field only: shared caches may keep the rest.
        assert_eq!(
            cache_control(&[b"max-age=60, private=\"set-cookie\""]),
            [b"private, max-age=60, private=\"set-cookie\"".to_vec()]
        );
    }
}
