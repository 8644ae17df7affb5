//! The state every request reads: the pooled clients, the OpenID Connect client, the session
//! manager and the hot-swappable [`LiveConfig`], plus the session of a request. Below the access
//! stage and the BFF endpoints, which read it; it knows nothing of them or of the pipeline
//! (`app`) that composes them.

use crate::clock::Clock;
use crate::config::Config;
use crate::oidc::Oidc;
use crate::proxy::{self, RouteTable, Upstreams};
use crate::session::manager::{OpenSession, Sessions};
use crate::session::seal::Keyring;
use crate::session::store::StoreError;
use arc_swap::ArcSwap;
use http::HeaderMap;
use std::net::IpAddr;
use std::sync::Arc;

/// What one configuration compiles to. Replaced atomically on reload.
pub struct LiveConfig {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// Vestibule's own cookie names, removed from forwarded requests.
    pub(crate) own_cookie: String,
    pub(crate) login_prefix: String,
    /// `public_url` as upstreams are told it (`X-Forwarded-Proto`, `-Host`).
    pub(crate) public_side: proxy::headers::PublicSide,
}

impl LiveConfig {
    pub fn new(config: Config) -> Self {
        let routes = RouteTable::new(&config.routes);
        let own_cookie = config.session.cookie_name.clone();
        let login_prefix = crate::cookies::login_prefix(&config.session);
        let public_side = proxy::headers::PublicSide::new(&config.server.public_url);
        LiveConfig {
            config: Arc::new(config),
            routes,
            own_cookie,
            login_prefix,
            public_side,
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

/// The long-lived state shared by every request.
pub struct Shared {
    pub live: ArcSwap<LiveConfig>,
    pub upstreams: Upstreams,
    pub oidc: Arc<Oidc>,
    pub sessions: Arc<Sessions>,
    /// The time every session, token and JWT check of this application reads.
    pub clock: Clock,
    /// Per-address rate limits of the BFF endpoints anyone may call (this process only).
    pub limiter: crate::limits::RateLimiter,
    /// Seals login-state cookies; the session keys are read at start (a change needs a restart).
    pub(crate) keyring: Arc<Keyring>,
    /// Cancelled when shutdown begins: long-lived responses (session-events streams) end then
    /// rather than hold the drain for the whole grace period.
    pub stopping: tokio_util::sync::CancellationToken,
}

impl Shared {
    /// The key ring for login-state cookies.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The session of this request, if any cookie of ours opens one. A store failure is an error;
    /// every kind of bad cookie is simply no session. `sessions`: the serving worker's, or the
    /// process-wide `self.sessions`.
    pub async fn load_session(
        &self,
        sessions: &Sessions,
        live: &LiveConfig,
        headers: &HeaderMap,
    ) -> Result<Option<OpenSession>, StoreError> {
        use tracing::Instrument;
        let span = tracing::trace_span!(target: crate::telemetry::trace::TARGET, "session load");
        async {
            for value in crate::cookies::values(headers, &live.config.session.cookie_name) {
                if let Some(loaded) = sessions.load(value, self.clock.now()).await? {
                    return Ok(Some(loaded));
                }
            }
            Ok(None)
        }
        .instrument(span)
        .await
    }

    pub async fn reload_session(
        &self,
        loaded: &OpenSession,
    ) -> Result<Option<OpenSession>, StoreError> {
        self.sessions.reload(loaded, self.clock.now()).await
    }
}

/// The pace request bodies must keep (read per request, so a reload reaches it).
pub fn body_pace(config: &Config) -> crate::limits::Pace {
    crate::limits::Pace {
        read_timeout: config.server.connections.body_read_timeout,
        min_rate: config.server.connections.body_min_rate,
    }
}
