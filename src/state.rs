//! The state every request reads: the pooled clients, the OpenID Connect client, the session
//! manager and the hot-swappable [`LiveConfig`], plus the session of a request. Below the access
//! stage and the BFF endpoints, which read it; it knows nothing of them or of the pipeline
//! (`app`) that composes them.

use crate::clock::Clock;
use crate::config::Config;
use crate::jose::signing::SigningKeys;
use crate::oidc::Oidc;
use crate::proxy::{self, RouteTable, Upstreams};
use crate::session::manager::{Cached, OpenSession, Sessions, Stored};
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
    pub(crate) logout_cookie: String,
    /// `public_url` as upstreams are told it (`X-Forwarded-Proto`, `-Host`).
    pub(crate) public_side: proxy::headers::PublicSide,
    /// Signs the routes' assertions; empty when no route sends one (see [`LiveConfig::new`]).
    pub signing_keys: SigningKeys,
    /// `iss` of the assertions: `public_url` without a trailing `/`.
    pub assertion_issuer: String,
    /// Cancelled once another configuration is in effect (a reload): what an open stream
    /// admitted under this one waits on, to be checked against the next.
    pub superseded: tokio_util::sync::CancellationToken,
}

impl LiveConfig {
    pub fn new(config: Config) -> Self {
        let routes = RouteTable::new(&config.routes);
        let own_cookie = config.session.cookie_name.clone();
        let login_prefix = crate::cookies::login_prefix(&config.session);
        let logout_cookie = crate::cookies::logout_name(&config.session);
        let public_side = proxy::headers::PublicSide::new(&config.server.public_url);
        // Derived only when a route sends assertions: a configuration without them does no
        // key work at all. The keys follow the session keys, so every replica has the same.
        let signing_keys = if config.routes.iter().any(|r| r.assertion.is_some()) {
            SigningKeys::derive(&config.session.keys).unwrap_or_else(|error| {
                tracing::error!(%error, "no assertion signing key; assertion routes will answer 500");
                SigningKeys::default()
            })
        } else {
            SigningKeys::default()
        };
        let assertion_issuer = config
            .server
            .public_url
            .as_str()
            .trim_end_matches('/')
            .to_string();
        LiveConfig {
            config: Arc::new(config),
            routes,
            own_cookie,
            login_prefix,
            logout_cookie,
            public_side,
            signing_keys,
            assertion_issuer,
            superseded: tokio_util::sync::CancellationToken::new(),
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
    /// The configuration in effect (shared: what an open stream checks its route against after
    /// a reload).
    pub live: Arc<ArcSwap<LiveConfig>>,
    pub upstreams: Upstreams,
    pub oidc: Arc<Oidc>,
    pub sessions: Arc<Sessions>,
    /// The time every session, token and JWT check of this application reads.
    pub clock: Clock,
    /// Per-address rate limits of the BFF endpoints anyone may call (this process only).
    pub limiter: crate::limits::RateLimiter,
    /// Cancelled when shutdown begins: long-lived responses (session-events streams) end then
    /// rather than hold the drain for the whole grace period.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// Whether one of the request's other session cookies (`others`, before or after the one
/// found) opens to another session than `handle`'s, live or not; then the request has no
/// session. Vestibule's own cookie is host-only with `Path=/`, so a browser holds one; a second
/// of its name was set for a wider domain or a longer path — by a sibling subdomain, say
/// ("cookie tossing"; the `__Host-` prefix forbids it), holding a session of the setter's own,
/// and sent first where its path is longer. Taking the first that opens would then serve the
/// user's requests under that path as someone else. Neither is taken: the request has no
/// session. A value that opens to nothing, or to the same session, changes nothing; one
/// before the one found that opens to an ended session counts as one after it does (the
/// victim's own cookie, older, comes first on the same path, and outlives her session: it
/// was skipped, and the attacker's taken). Asked with the handle, not the session, so
/// that the session is not moved on the way (every request's path).
fn names_another<'h>(
    sessions: &Sessions,
    mut others: impl Iterator<Item = &'h [u8]>,
    handle: &crate::session::manager::Handle,
) -> bool {
    let another = others.any(|value| sessions.names_another_session(value, handle));
    if another {
        tracing::warn!(
            "a request's session cookies name two sessions (a cookie of the session cookie's \
             name set by another site of the domain?); served without a session"
        );
    }
    another
}

/// What [`Shared::cached_session`] tells without the store.
pub enum Found {
    /// The request's session, or none.
    Session(Option<OpenSession>),
    /// The store is to be asked ([`Shared::stored_session`]).
    Ask(Ask),
}

/// A cookie value the store is to be asked about, the how-manieth of the request's session
/// cookies it is (the ones after it are tried next), and the load's trace span.
pub struct Ask(Stored, usize, tracing::Span);

impl Shared {
    /// The key ring in effect, for login-state cookies: the sessions' own, so that a reload's
    /// keys reach both at once.
    pub fn keyring(&self) -> arc_swap::Guard<Arc<Keyring>> {
        self.sessions.keyring()
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
        self.load_session_at(sessions, live, headers, self.clock.now())
            .await
    }

    /// [`Self::load_session`] with the time the caller read from the clock (`now`, Unix
    /// seconds): a request's access stage reads it once for everything it checks.
    pub async fn load_session_at(
        &self,
        sessions: &Sessions,
        live: &LiveConfig,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<Option<OpenSession>, StoreError> {
        match self.cached_session(sessions, live, headers, now) {
            Found::Session(loaded) => Ok(loaded),
            Found::Ask(stored) => {
                self.stored_session(sessions, live, headers, stored, now)
                    .await
            }
        }
    }

    /// [`Self::load_session_at`] as far as it goes without the store (see
    /// [`Sessions::load_cached`]): the answer when no cookie needs the store to tell, else the
    /// first one that does, for [`Self::stored_session`].
    pub fn cached_session(
        &self,
        sessions: &Sessions,
        live: &LiveConfig,
        headers: &HeaderMap,
        now: u64,
    ) -> Found {
        let span = tracing::trace_span!(target: crate::telemetry::trace::TARGET, "session load");
        let _in = span.enter();
        let name = &live.config.session.cookie_name;
        let mut values = crate::cookies::raw_values(headers, name).enumerate();
        while let Some((at, value)) = values.next() {
            match sessions.load_cached(value, now) {
                Cached::Known(None) => {}
                Cached::Known(Some(found)) => {
                    // The cookies before it, looked up again only when there are any (a
                    // request's one cookie costs no second lookup of its field).
                    let earlier = (at > 0)
                        .then(|| crate::cookies::raw_values(headers, name).take(at))
                        .into_iter()
                        .flatten();
                    let others = earlier.chain(values.map(|(_, v)| v));
                    let another = names_another(sessions, others, &found.handle);
                    return Found::Session((!another).then_some(found));
                }
                // The span goes on with the store's read: one span for the whole load.
                Cached::Ask(stored) => return Found::Ask(Ask(stored, at, span.clone())),
            }
        }
        Found::Session(None)
    }

    /// The rest of [`Self::load_session_at`] from the cookie the store is to be asked about.
    pub async fn stored_session(
        &self,
        sessions: &Sessions,
        live: &LiveConfig,
        headers: &HeaderMap,
        Ask(stored, at, span): Ask,
        now: u64,
    ) -> Result<Option<OpenSession>, StoreError> {
        use tracing::Instrument;
        async {
            let name = &live.config.session.cookie_name;
            let all = || crate::cookies::raw_values(headers, name);
            // The cookies before the one at `at`, looked up again only when there are any.
            let before = |at: usize| (at > 0).then(|| all().take(at)).into_iter().flatten();
            let Some(loaded) = sessions.load_stored(stored, now).await? else {
                // No later cookie is asked about: one of another session would be a second
                // session beside this one (no session, live or not), one of the same session
                // its copy, read just now. So a request costs the store one read however many
                // copies of an ended session's cookie, or cookies of ended sessions, it carries
                // (a head holds hundreds).
                return Ok(None);
            };
            let after = all().skip(at + 1);
            let another = names_another(sessions, before(at).chain(after), &loaded.handle);
            Ok((!another).then_some(loaded))
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

/// The DPoP key generated for every replica (`[oidc] dpop` without a key file): made by the
/// first instance that needs it, stored with set-if-absent, sealed with the session key ring
/// like session data, and read by every other instance. A stored key that the ring no longer
/// opens (its sealing key left `[session] keys`) is replaced by a new one: rotating the session
/// keys rotates this key too. So is one that opens but holds no key (corrupt), logged as an
/// error. Replacing is a compare-and-set on the version read, so a key another replica has just
/// written is read, never overwritten, and replicas agree on one new key.
pub struct StoredDpopKey {
    pub store: crate::session::store::Store,
    /// The session key ring, swapped on reload (`session.keys`, `keys_file`).
    pub keyring: Arc<arc_swap::ArcSwap<Keyring>>,
}

/// The store key of [`StoredDpopKey`]; also the associated data it is sealed with.
pub const DPOP_KEY_NAME: &str = "dpop-key";
/// Kept as long as a store keeps anything: until replaced.
const DPOP_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);

impl crate::oidc::dpop::KeySource for StoredDpopKey {
    fn load(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<crate::oidc::dpop::DpopKey, crate::oidc::dpop::DpopError>,
                > + Send
                + '_,
        >,
    > {
        crate::reply::in_box(|| self.load_or_create())
    }

    fn ring(&self) -> Option<crate::oidc::dpop::Ring> {
        Some(self.keyring.load_full())
    }
}

impl StoredDpopKey {
    async fn load_or_create(
        &self,
    ) -> Result<crate::oidc::dpop::DpopKey, crate::oidc::dpop::DpopError> {
        use crate::oidc::dpop::{DpopError, DpopKey};
        let unavailable = |e: StoreError| DpopError::Unavailable(e.to_string());
        // Two rounds: a lost race reads the winner's key in the second.
        for _ in 0..2 {
            let stored = self.store.get(DPOP_KEY_NAME).await.map_err(unavailable)?;
            let opened = stored.as_ref().and_then(|record| {
                let text = std::str::from_utf8(&record.value).ok()?;
                self.keyring.load().open(DPOP_KEY_NAME, text)
            });
            match opened.map(|o| (DpopKey::from_der(&o.plaintext), o)) {
                Some((Ok(key), opened)) => {
                    if opened.stale_key
                        && let Some(record) = &stored
                    {
                        self.reseal(record.version, &opened.plaintext).await;
                    }
                    return Ok(key);
                }
                // Every release has stored `DpopKey::to_pkcs8`, which `from_der` reads: this
                // one opened, so it was written whole by none of them. Kept, it would leave
                // DPoP broken on every replica for good.
                Some((Err(_), _)) => tracing::error!(
                    "the stored DPoP key opens with the session keys but is not an EC P-256 \
                     private key (corrupt); replacing it"
                ),
                None if stored.is_some() => tracing::warn!(
                    "the stored DPoP key is sealed with a session key no longer configured; \
                     replacing it (tokens bound to the old key are refreshed as APIs refuse them)"
                ),
                None => {}
            }
            let key = DpopKey::generate()?;
            let sealed = self
                .keyring
                .load()
                .seal(DPOP_KEY_NAME, &key.to_pkcs8()?)
                .map_err(|e| DpopError::Unavailable(e.to_string()))?;
            let won = match &stored {
                None => self
                    .store
                    .put_new(DPOP_KEY_NAME, sealed.as_bytes(), DPOP_KEY_TTL)
                    .await
                    .map_err(unavailable)?,
                Some(record) => self
                    .store
                    .compare_and_set(
                        DPOP_KEY_NAME,
                        record.version,
                        sealed.as_bytes(),
                        DPOP_KEY_TTL,
                    )
                    .await
                    .map_err(unavailable)?,
            };
            if won {
                tracing::info!(jkt = key.thumbprint(), "DPoP key generated and stored");
                return Ok(key);
            }
        }
        Err(DpopError::Unavailable(
            "the stored DPoP key changed while it was read".into(),
        ))
    }
}

impl StoredDpopKey {
    /// Seals the stored key again with the ring's first key (it opened with an older one: a
    /// rotation is under way), so that it still opens once the old key is removed, on a replica
    /// started then too. Best effort: a replica that loses the race finds it resealed.
    async fn reseal(&self, version: u64, der: &[u8]) {
        let Ok(sealed) = self.keyring.load().seal(DPOP_KEY_NAME, der) else {
            return;
        };
        match self
            .store
            .compare_and_set(DPOP_KEY_NAME, version, sealed.as_bytes(), DPOP_KEY_TTL)
            .await
        {
            Ok(true) => tracing::info!("the stored DPoP key is sealed with the first session key"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "the stored DPoP key could not be sealed again"),
        }
    }
}

/// The pace request bodies must keep (read per request, so a reload reaches it).
pub fn body_pace(config: &Config) -> crate::limits::Pace {
    crate::limits::Pace {
        read_timeout: config.server.connections.body_read_timeout,
        min_rate: config.server.connections.body_min_rate,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::oidc::dpop::{Dpop, DpopKey};
    use crate::session::seal::Keyring;
    use crate::session::store::{MemoryStore, Store};

    fn ring(keys: &[u8]) -> Arc<arc_swap::ArcSwap<Keyring>> {
        let keys = keys.iter().map(|b| [*b; 32]).collect();
        Arc::new(arc_swap::ArcSwap::from_pointee(Keyring::new(keys).unwrap()))
    }

    fn dpop(store: &Store, keyring: &Arc<arc_swap::ArcSwap<Keyring>>) -> Dpop {
        Dpop::new(Arc::new(StoredDpopKey {
            store: store.clone(),
            keyring: keyring.clone(),
        }))
    }

    /// A stored key that opens but is no key is replaced once, by the first replica to read it;
    /// one written as every release writes it (`to_pkcs8`, sealed) is never replaced.
    #[tokio::test]
    async fn a_stored_dpop_key_that_opens_but_is_corrupt_is_replaced_once_and_a_whole_one_never() {
        let store = Store::Memory(MemoryStore::new(100));
        let keyring = ring(&[1]);
        let whole = DpopKey::generate().unwrap();
        let sealed = keyring
            .load()
            .seal(DPOP_KEY_NAME, &whole.to_pkcs8().unwrap());
        assert!(
            store
                .put_new(DPOP_KEY_NAME, sealed.unwrap().as_bytes(), DPOP_KEY_TTL)
                .await
                .unwrap()
        );
        let version = || async { store.get(DPOP_KEY_NAME).await.unwrap().unwrap().version };
        let kept = dpop(&store, &keyring).key().await.unwrap();
        assert_eq!(kept.thumbprint(), whole.thumbprint());
        assert_eq!(version().await, 1);

        let der = whole.to_pkcs8().unwrap();
        let corrupt = keyring.load().seal(DPOP_KEY_NAME, &der[..der.len() - 1]);
        let corrupt = corrupt.unwrap();
        assert!(
            store
                .compare_and_set(DPOP_KEY_NAME, 1, corrupt.as_bytes(), DPOP_KEY_TTL)
                .await
                .unwrap()
        );
        let first = dpop(&store, &keyring).key().await.unwrap();
        assert_ne!(first.thumbprint(), whole.thumbprint());
        assert_eq!(version().await, 3, "replaced once");
        let second = dpop(&store, &keyring).key().await.unwrap();
        assert_eq!(second.thumbprint(), first.thumbprint());
        assert_eq!(version().await, 3, "the new key was replaced again");
    }

    /// Every replica signs with one DPoP key across a session key rotation done by hot reload
    /// (the new key first, then the old one removed): a replica running through it and one
    /// started after it agree, so a token bound by one is accepted when the other presents it.
    #[tokio::test]
    async fn replicas_keep_one_dpop_key_across_a_reloaded_key_rotation() {
        let store = Store::Memory(MemoryStore::new(100));
        let running_ring = ring(&[1]);
        let running = dpop(&store, &running_ring);
        let before = running.key().await.unwrap().thumbprint().to_string();
        // The rotation, as reloads swap the ring: the new key first, then the old one gone.
        running_ring.store(Arc::new(Keyring::new(vec![[2; 32], [1; 32]]).unwrap()));
        assert_eq!(running.key().await.unwrap().thumbprint(), before);
        running_ring.store(Arc::new(Keyring::new(vec![[2; 32]]).unwrap()));
        assert_eq!(running.key().await.unwrap().thumbprint(), before);
        let started_after = dpop(&store, &ring(&[2]));
        assert_eq!(
            started_after.key().await.unwrap().thumbprint(),
            before,
            "a replica started after the rotation signs with another key"
        );
    }
}
