//! Access tokens for upstreams: the user's, refreshed before they expire with exactly one refresh
//! per session in flight (a per-process queue plus a store lease shared by every replica), and
//! cached client-credentials tokens.
//!
//! A refresh runs as its own task ([`refresh::Job`]): the grant, the compare-and-set save and the
//! unlock finish even when the request that started it is dropped (the browser aborted, the
//! HTTP/2 stream was reset), and a graceful shutdown waits for it ([`Tokens::finished`]): once
//! the provider has rotated the refresh token, the answer exists nowhere else. Requests that queue behind it read its result from the store, or
//! share its failure. Only `invalid_grant` and a refreshed ID token for another subject end a
//! session (a store failure at the save does not: the answer is kept and saved later, see
//! [`save`]); a [`RefreshError`] reaches the browser through [`RequestError::respond`].

mod orphan;
mod refresh;
mod save;

use crate::config::RouteConfig;
use crate::oidc::GrantError;
use crate::rescue::{RefreshError, RequestError, TokenUnavailable};
use crate::session::manager::{OpenSession, Sessions};
use crate::session::model::Session;
use crate::state::{LiveConfig, Shared};
use refresh::{Job, Target};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// A refresh's failure as the request's error; an ended session starts again at the login.
fn rescue(bff_prefix: &str, error: RefreshError) -> RequestError {
    RequestError::Refresh {
        error,
        login_url: format!("{bff_prefix}/login"),
    }
}

/// The grants made here, as `vestibule_token_grants_total` labels them.
#[derive(Debug, Clone, Copy)]
enum Grant {
    Refresh,
    Exchange,
    ClientCredentials,
}

impl Grant {
    fn label(self) -> &'static str {
        match self {
            Grant::Refresh => "refresh_token",
            Grant::Exchange => "token_exchange",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// Counts a grant's outcome (`vestibule_token_grants_total{grant, outcome}`): `ok`,
/// `invalid_grant`, `refused`, `client_refused`, `unavailable`, `id_token_invalid` or
/// `subject_changed`.
fn count(grant: Grant, outcome: &'static str) {
    metrics::counter!("vestibule_token_grants_total", "grant" => grant.label(), "outcome" => outcome)
        .increment(1);
}

/// What a failed grant means: only a refresh's `invalid_grant` ends the session; a route's own
/// refused resource or scope (and a refused token exchange) is that route's problem; everything
/// else — the client refused, 5xx, timeouts, unusable answers — is the provider's, and passes.
/// Counts the outcome and logs the provider's error code (never a token).
fn classify(grant: Grant, error: GrantError) -> RefreshError {
    let code = error.code().unwrap_or_default().to_string();
    let (outcome, classified) = match (grant, code.as_str()) {
        (Grant::Refresh, "invalid_grant") => ("invalid_grant", RefreshError::Ended),
        (_, "invalid_scope" | "invalid_target")
        | (Grant::Exchange, "invalid_grant" | "invalid_request") => {
            ("refused", RefreshError::Refused { code: code.clone() })
        }
        (_, "invalid_client" | "unauthorized_client") => (
            "client_refused",
            RefreshError::Unavailable {
                reason: TokenUnavailable::Grant(error.clone()),
            },
        ),
        _ => (
            "unavailable",
            RefreshError::Unavailable {
                reason: TokenUnavailable::Grant(error.clone()),
            },
        ),
    };
    count(grant, outcome);
    let grant = grant.label();
    match outcome {
        "invalid_grant" => {
            tracing::info!(grant, provider_error = %code, "the provider rejected the refresh token; ending the session");
        }
        "refused" => {
            tracing::info!(grant, provider_error = %code, "the provider refused the route's resource or scopes");
        }
        "client_refused" => tracing::error!(
            grant,
            provider_error = %code,
            "the provider refused Vestibule's own client: check oidc.client_id and \
             oidc.client_secret; sessions are kept"
        ),
        _ => {
            tracing::warn!(grant, provider_error = %code, %error, "token grant failed; sessions are kept")
        }
    }
    classified
}

/// The session's token for `key` unless it is due for refresh at `now` (`skew` seconds before
/// expiry, see [`crate::session::model::AccessToken::refresh_at`]), is the `rejected` one, or,
/// with `signing` (the thumbprint of the DPoP key that signs now, on a `token_binding = "dpop"`
/// route), was bound to another key: the API would refuse it. A token stored without the
/// thumbprint of its key (before it was recorded) is not checked.
fn fresh<'a>(
    now: u64,
    skew: u64,
    session: &'a Session,
    key: &str,
    rejected: Option<&str>,
    signing: Option<&str>,
) -> Option<&'a str> {
    session
        .tokens
        .get(key)
        .filter(|t| now < t.refresh_at(skew))
        .filter(|t| rejected != Some(t.value.as_str()))
        .filter(|t| match (signing, &t.jkt) {
            (Some(signing), Some(bound)) => signing == bound,
            _ => true,
        })
        .map(|t| t.value.as_str())
}

/// What a token for `route` must be bound to: nothing on a route without DPoP, the key that
/// signs now on a `token_binding = "dpop"` route.
enum Binding {
    Unchecked,
    /// `None` before a key is loaded: then no token with a recorded thumbprint passes, and the
    /// refresh task, which waits for the key, decides.
    Key(Option<Arc<crate::oidc::dpop::DpopKey>>),
}

impl Binding {
    /// Without waiting: the key as loaded now (a lock and a pointer copy), on DPoP routes only.
    fn of(app: &Shared, route: &RouteConfig) -> Binding {
        match (route.token_binding, &app.oidc.dpop) {
            (crate::config::TokenBinding::Dpop, Some(dpop)) => Binding::Key(dpop.loaded_key()),
            _ => Binding::Unchecked,
        }
    }

    fn jkt(&self) -> Option<&str> {
        match self {
            Binding::Unchecked => None,
            Binding::Key(key) => Some(key.as_deref().map_or("", |k| k.thumbprint())),
        }
    }
}

/// The session's access token for `route` while it is fresh (and, on a DPoP route, bound to
/// the key that signs now): what [`Tokens::user_token`] lends without waiting. Asked first, a
/// request with a fresh token writes no future for it.
pub fn fresh_user_token<'a>(
    app: &Shared,
    live: &LiveConfig,
    loaded: &'a OpenSession,
    route: &RouteConfig,
    now: u64,
) -> Option<&'a str> {
    let skew = live.config.oidc.refresh_skew.as_secs();
    let binding = Binding::of(app, route);
    fresh(
        now,
        skew,
        &loaded.session,
        route.token_key(),
        None,
        binding.jkt(),
    )
}

/// The number of refresh memories kept before the first prune of the unused ones.
const PRUNE_FROM: usize = 10_000;

/// Access tokens: per-session refresh with single flight (in process and across replicas),
/// and a cache of client-credentials tokens.
#[derive(Default)]
pub struct Tokens {
    /// Per session: the in-process queue for refreshing, held by the running refresh task.
    /// Shared with the watches of answers given up on ([`orphan`]), which take their entry out.
    local: Arc<orphan::Memories>,
    /// The size past which [`Self::local_lock`] next prunes `local` (0: [`PRUNE_FROM`]). Twice
    /// what the last prune kept: memories that must stay (an unsaved answer, in use) are not
    /// scanned again at every refresh while many of them are kept, in a long store outage.
    /// Changed only under `local`'s lock.
    prune_above: std::sync::atomic::AtomicUsize,
    /// The refresh tasks under way, which a shutdown waits for.
    refreshes: TaskTracker,
    client: Mutex<HashMap<String, Arc<tokio::sync::Mutex<ClientSlot>>>>,
    /// Tests only: a time other than [`save::KEEP_SAVING_FOR`] to keep saving an answer for.
    #[cfg(any(test, feature = "test-support"))]
    keep_saving_for: Mutex<Option<Duration>>,
    /// Tests only: a time other than [`orphan::ENDED_CHECK`] between two reads of a session
    /// whose answer was given up on.
    #[cfg(any(test, feature = "test-support"))]
    ended_check: Mutex<Option<Duration>>,
    /// Tests only: how many times [`Self::local_lock`] scanned the whole map to prune it.
    #[cfg(any(test, feature = "test-support"))]
    prunes: std::sync::atomic::AtomicUsize,
}

/// One resource's and scopes' client-credentials token, and the last grant of it that failed.
#[derive(Default)]
struct ClientSlot {
    token: Option<ClientToken>,
    /// Requests that queued behind a failed grant share its answer rather than each try an
    /// unavailable provider in turn, one after another.
    failed: Option<(Instant, RefreshError)>,
}

/// What this process remembers of a session's refreshes.
#[derive(Default)]
struct RefreshMemory {
    /// The last refresh that failed: requests that queued behind it share its answer rather
    /// than each try an unavailable provider in turn.
    failed: Option<Failed>,
    /// When a token was last replaced before its time: one an upstream rejected, one bound to
    /// a key that no longer signs, or a subject token a token exchange was refused for.
    forced: Option<Instant>,
    /// A refresh's answer the store did not take: saved before this session's next grant.
    unsaved: Option<save::Unsaved>,
}

struct Failed {
    at: Instant,
    /// What it was for: a refused route's answer is not another route's.
    target: Target,
    error: RefreshError,
}

/// A cached client-credentials token.
struct ClientToken {
    value: String,
    /// Unix seconds: `refresh_skew` before expiry, but never before half its lifetime, so
    /// short-lived tokens are not fetched anew for every request.
    refresh_at: u64,
}

/// Whose token, for which route: the request's session and what it is read against.
#[derive(Clone, Copy)]
pub struct TokenAsk<'a> {
    pub app: &'a Shared,
    pub sessions: &'a Arc<Sessions>,
    pub live: &'a LiveConfig,
    pub loaded: &'a OpenSession,
    pub route: &'a RouteConfig,
}

impl Tokens {
    fn local_lock(&self, handle: &str) -> Arc<tokio::sync::Mutex<RefreshMemory>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > self.prune_above.load(Relaxed).max(PRUNE_FROM) {
            #[cfg(any(test, feature = "test-support"))]
            self.prunes.fetch_add(1, Relaxed);
            // Unused entries go, except those holding an answer still to be saved.
            map.retain(|_, m| {
                Arc::strong_count(m) > 1 || m.try_lock().map_or(true, |m| m.unsaved.is_some())
            });
            // Amortised: the next scan waits until the map has doubled.
            self.prune_above.store(map.len().saturating_mul(2), Relaxed);
        }
        map.entry(handle.to_string()).or_default().clone()
    }

    /// The user's access token for the route's resource, refreshed when it is about to expire.
    /// `now`: Unix seconds, as the request's access stage read them.
    pub async fn user_token<'a>(
        &self,
        ask: &TokenAsk<'a>,
        now: u64,
    ) -> Result<std::borrow::Cow<'a, str>, RequestError> {
        self.user_token_except(ask, None, now)
            .await?
            .ok_or_else(|| {
                let reason = TokenUnavailable::NoToken;
                rescue("", RefreshError::Unavailable { reason })
            })
    }

    /// A user access token other than `rejected`, which an upstream refused (`invalid_token`):
    /// refreshed now whatever its expiry, unless another request already replaced it. `None`
    /// when this session had such an early refresh less than a few seconds ago.
    pub async fn replace_user_token<'a>(
        &self,
        ask: &TokenAsk<'a>,
        rejected: &str,
    ) -> Result<Option<std::borrow::Cow<'a, str>>, RequestError> {
        // Read again: the upstream has answered since the request read the clock.
        self.user_token_except(ask, Some(rejected), ask.app.clock.now())
            .await
    }

    /// Single flight: requests of one session queue on a local mutex; the refresh task each
    /// one starts in turn holds it, then the store lease (shared by every instance), re-reads
    /// the session and refreshes only if no one did meanwhile, so a rotating refresh token is
    /// spent exactly once.
    /// A token still fresh is lent from the session, not copied (it is copied once, into the
    /// `Authorization` value).
    async fn user_token_except<'a>(
        &self,
        ask: &TokenAsk<'a>,
        rejected: Option<&str>,
        now: u64,
    ) -> Result<Option<std::borrow::Cow<'a, str>>, RequestError> {
        let skew = ask.live.config.oidc.refresh_skew.as_secs();
        let key = ask.route.token_key();
        let binding = Binding::of(ask.app, ask.route);
        if let Some(t) = fresh(now, skew, &ask.loaded.session, key, rejected, binding.jkt()) {
            return Ok(Some(std::borrow::Cow::Borrowed(t)));
        }
        // Boxed: the single flight's future is large and rarely needed, and would otherwise
        // grow the future of every request on a token route.
        crate::reply::in_box(|| self.single_flight(ask, rejected))
            .await
            .map(|t| t.map(std::borrow::Cow::Owned))
            .map_err(|e| rescue(&ask.live.config.server.bff_prefix, e))
    }

    /// The slow path of [`Self::user_token_except`]: queue for this session's refresh, then
    /// start a task that finishes it whatever becomes of this request, and wait for its answer.
    async fn single_flight(
        &self,
        ask: &TokenAsk<'_>,
        rejected: Option<&str>,
    ) -> Result<Option<String>, RefreshError> {
        let TokenAsk {
            app,
            sessions,
            live,
            loaded,
            route,
        } = *ask;
        let arrived = Instant::now();
        // Longer than a grant may take: a refresh already sent is waited out, never repeated.
        let deadline = arrived + app.oidc.config.provider_timeout + Duration::from_secs(5);
        let gave_up = || RefreshError::Unavailable {
            reason: TokenUnavailable::WaitedTooLong,
        };
        let lock = self.local_lock(&loaded.handle);
        let waited = {
            use tracing::Instrument;
            let span =
                tracing::trace_span!(target: crate::telemetry::trace::TARGET, "refresh lock wait");
            tokio::time::timeout_at(deadline, lock.lock_owned())
                .instrument(span)
                .await
        };
        metrics::histogram!("vestibule_refresh_lock_wait_seconds")
            .record(arrived.elapsed().as_secs_f64());
        let Ok(memory) = waited else {
            return Err(gave_up());
        };
        // On a DPoP route, the key that signs (waited for if not loaded yet): a token bound to
        // another is refreshed. One that cannot be loaded leaves tokens unchecked, as before
        // thumbprints were recorded (the proof fails anyway).
        let signing = match (route.token_binding, &app.oidc.dpop) {
            (crate::config::TokenBinding::Dpop, Some(dpop)) => dpop
                .key()
                .await
                .ok()
                .map(|key| key.thumbprint().to_string()),
            _ => None,
        };
        let lease = crate::oidc::random_token(16).map_err(|e| {
            tracing::error!(error = %e, "no refresh lease token could be made");
            RefreshError::Random
        })?;
        let job = Job {
            sessions: sessions.clone(),
            oidc: app.oidc.clone(),
            clock: app.clock.clone(),
            skew: live.config.oidc.refresh_skew.as_secs(),
            loaded: loaded.clone(),
            target: Target::of(route),
            rejected: rejected.map(str::to_string),
            signing,
            arrived,
            deadline,
            lock_key: sessions.refresh_lock_key(loaded),
            lease,
            keep_saving_for: self.keep_saving_for(),
            ended_check: self.ended_check(),
            memories: self.local.clone(),
        };
        // Not aborted when this request is dropped: the task holds the queue and the lease
        // until the grant is saved and the lease released. Tracked, so that a shutdown lets it
        // finish rather than drop an answer the provider has already given.
        // It carries the request's trace along (its grant and its Redis commands are spans of it).
        // It answers as soon as it knows, and may then go on saving an answer the store did not
        // take.
        let (reply, answer) = tokio::sync::oneshot::channel();
        {
            use tracing::Instrument;
            use tracing::instrument::WithSubscriber;
            let job = job.run(memory, reply);
            self.refreshes
                .spawn(job.in_current_span().with_current_subscriber());
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) | Err(_) => Err(gave_up()),
        }
    }

    /// After a logout in this process ended the session `handle`: forgets what this process
    /// remembers of its refreshes, and revokes the tokens of an answer still waiting there
    /// unsaved (see [`save`]) before the logout answers. An answer its refresh task gave up
    /// saving is also watched ([`orphan`]) and revoked when its session ends by any path; this
    /// is the prompt path for the logout, which also catches an answer still being retried.
    /// A refresh of the session that holds the memory for longer than `within` is left to it:
    /// it finds the session ended and revokes the answer itself.
    pub async fn forget_ended(&self, app: &Shared, handle: &str, within: Duration) {
        let memory = {
            let map = self.local.lock().unwrap_or_else(|p| p.into_inner());
            map.get(handle).cloned()
        };
        let Some(memory) = memory else {
            return;
        };
        let Ok(mut held) = tokio::time::timeout(within, memory.lock()).await else {
            tracing::warn!(
                "a refresh of a session that ended here is still under way; an answer of it left \
                 unsaved is revoked by its refresh, which finds the session ended"
            );
            return;
        };
        let unsaved = held.unsaved.take();
        orphan::forget(&self.local, handle, &memory);
        drop(held);
        if let Some(unsaved) = unsaved {
            unsaved.revoke(app.sessions.store(), &app.oidc).await;
        }
    }

    /// How long a refresh task keeps trying to save an answer the store did not take.
    fn keep_saving_for(&self) -> Duration {
        #[cfg(any(test, feature = "test-support"))]
        if let Some(shorter) = *self
            .keep_saving_for
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            return shorter;
        }
        save::KEEP_SAVING_FOR
    }

    /// Tests only: refresh tasks started from now on keep trying to save an answer the store
    /// did not take for `time` rather than [`save::KEEP_SAVING_FOR`], which no test waits out.
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_keep_saving_for(&self, time: Duration) {
        *self
            .keep_saving_for
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(time);
    }

    /// How often the watch of an answer given up on reads its session, for the timeouts.
    fn ended_check(&self) -> Duration {
        #[cfg(any(test, feature = "test-support"))]
        if let Some(shorter) = *self.ended_check.lock().unwrap_or_else(|p| p.into_inner()) {
            return shorter;
        }
        orphan::ENDED_CHECK
    }

    /// Tests only: refresh tasks started from now on leave a watch that reads the session every
    /// `time` rather than every [`orphan::ENDED_CHECK`], which no test waits out.
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_ended_check(&self, time: Duration) {
        *self.ended_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(time);
    }

    /// Tests only: how many sessions have a refresh's answer waiting unsaved in this process.
    #[cfg(any(test, feature = "test-support"))]
    pub async fn unsaved_answers(&self) -> usize {
        let memories: Vec<_> = {
            let map = self.local.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        let mut unsaved = 0;
        for memory in memories {
            unsaved += usize::from(memory.lock().await.unsaved.is_some());
        }
        unsaved
    }

    /// Resolves once no refresh is under way, for a graceful shutdown: refreshes started by the
    /// requests still draining are waited for too.
    pub async fn finished(&self) {
        self.refreshes.close();
        self.refreshes.wait().await;
    }

    /// A client-credentials token for the route's resource and scopes, cached until near expiry.
    /// Routes share one when they ask for the same resource and the same set of scopes (RFC 6749
    /// §3.3: order and repeats do not matter), keyed as user tokens are
    /// ([`crate::config::token_key_of`]); the provider is sent the first such route's scopes
    /// as written.
    pub async fn client_token(
        &self,
        app: &Shared,
        route: &RouteConfig,
    ) -> Result<String, RequestError> {
        let key = crate::config::token_key_of(route.resource.as_deref(), &route.scopes, false);
        let slot = {
            let mut map = self.client.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        let prefix = || app.live.load().config.server.bff_prefix.clone();
        let arrived = Instant::now();
        // As long as a grant may take, and a little more: a grant under way is waited out,
        // but a request never waits for one grant after another.
        let deadline = arrived + app.oidc.config.provider_timeout + Duration::from_secs(5);
        let Ok(mut cached) = tokio::time::timeout_at(deadline, slot.lock()).await else {
            let reason = TokenUnavailable::WaitedTooLong;
            return Err(rescue(&prefix(), RefreshError::Unavailable { reason }));
        };
        if let Some(t) = cached
            .token
            .as_ref()
            .filter(|t| app.clock.now() < t.refresh_at)
        {
            return Ok(t.value.clone());
        }
        if let Some((_, error)) = cached.failed.as_ref().filter(|(at, _)| *at >= arrived) {
            return Err(rescue(&prefix(), error.clone()));
        }
        let outcome = app
            .oidc
            .client_credentials(route.resource.as_deref(), &route.scopes)
            .await;
        match outcome {
            Ok(t) => {
                count(Grant::ClientCredentials, "ok");
                let lifetime = t.lifetime();
                let skew = app.oidc.config.refresh_skew.as_secs().min(lifetime / 2);
                cached.token = Some(ClientToken {
                    value: t.access_token.clone(),
                    refresh_at: app.clock.now() + lifetime - skew,
                });
                cached.failed = None;
                Ok(t.access_token)
            }
            Err(error) => {
                let error = classify(Grant::ClientCredentials, error);
                cached.failed = Some((Instant::now(), error.clone()));
                Err(rescue(&prefix(), error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;
    use crate::session::model::AccessToken;

    /// A session whose token for `key` was issued at `now` and lives `lifetime` seconds.
    fn session(key: &str, now: u64, lifetime: u64) -> Session {
        let mut session = Session::default();
        session.tokens.insert(
            key.to_string(),
            AccessToken {
                value: "at".into(),
                expires_at: now + lifetime,
                issued_at: now,
                scope: None,
                jkt: None,
            },
        );
        session
    }

    /// A long store outage: more than 10,000 sessions each keep a memory that may not go (here
    /// in use; an unsaved answer is kept the same way). Refreshes of further sessions must not
    /// each scan the whole map under the process-wide mutex: pruning is amortised.
    #[test]
    fn memories_that_must_stay_are_not_scanned_at_every_refresh() {
        use std::sync::atomic::Ordering;
        let tokens = Tokens::default();
        let held: Vec<_> = (0..10_001)
            .map(|i| tokens.local_lock(&format!("kept-{i}")))
            .collect();
        let before = tokens.prunes.load(Ordering::Relaxed);
        for i in 0..1_000 {
            drop(tokens.local_lock(&format!("other-{i}")));
        }
        let scans = tokens.prunes.load(Ordering::Relaxed) - before;
        assert!(
            scans <= 1,
            "{scans} full scans of the refresh memories for 1,000 refreshes"
        );
        // Unused memories still go once the map has grown enough; nothing in use does.
        let mut i = 1_000;
        while tokens.prunes.load(Ordering::Relaxed) - before < 2 {
            assert!(i < 30_000, "never pruned again");
            drop(tokens.local_lock(&format!("other-{i}")));
            i += 1;
        }
        let map = tokens.local.lock().unwrap();
        assert!(!map.contains_key("other-0"), "an unused memory was kept");
        assert!((0..10_001).all(|i| map.contains_key(&format!("kept-{i}"))));
        drop(map);
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_due_skew_before_expiry_on_the_clock_without_waiting() {
        let clock = TestClock::new().clock();
        let session = session("", clock.now(), 300);
        assert_eq!(fresh(clock.now(), 60, &session, "", None, None), Some("at"));
        assert_eq!(fresh(clock.now(), 60, &session, "other", None, None), None);
        assert_eq!(fresh(clock.now(), 60, &session, "", Some("at"), None), None);
        tokio::time::advance(Duration::from_secs(239)).await;
        assert_eq!(fresh(clock.now(), 60, &session, "", None, None), Some("at"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(fresh(clock.now(), 60, &session, "", None, None), None);
    }

    /// On a DPoP route, a token recorded as bound to another key than the one signing now is
    /// not fresh; one stored without a thumbprint (before it was recorded) is, as before.
    #[tokio::test(start_paused = true)]
    async fn a_token_bound_to_another_dpop_key_is_not_fresh() {
        let clock = TestClock::new().clock();
        let mut session = session("", clock.now(), 300);
        let now = clock.now();
        assert_eq!(fresh(now, 60, &session, "", None, Some("B")), Some("at"));
        session.tokens.get_mut("").unwrap().jkt = Some("A".into());
        assert_eq!(fresh(now, 60, &session, "", None, Some("B")), None);
        assert_eq!(fresh(now, 60, &session, "", None, Some("")), None);
        assert_eq!(fresh(now, 60, &session, "", None, Some("A")), Some("at"));
        assert_eq!(fresh(now, 60, &session, "", None, None), Some("at"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_skew_longer_than_the_lifetime_refreshes_at_half_of_it() {
        let test = TestClock::new();
        let clock = test.clock();
        let session = session("", clock.now(), 8);
        test.advance(Duration::from_secs(3));
        assert_eq!(fresh(clock.now(), 30, &session, "", None, None), Some("at"));
        test.advance(Duration::from_secs(1));
        assert_eq!(fresh(clock.now(), 30, &session, "", None, None), None);
    }
}
