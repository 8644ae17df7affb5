//! One refresh of a session's tokens, run as a task of its own: it finishes — lease, grant,
//! compare-and-set save, unlock — whatever happens to the request that started it, and owns
//! everything it needs. It holds the session's in-process queue and, while it talks to the
//! provider, the store lease that every replica honours.
//!
//! The lease is renewed by a [`Keeper`] that is aborted when the refresh ends (also by a panic)
//! and that gives up after the longest time the grants may take. If the lease is lost anyway
//! (a store failover, a store outage longer than the lease), another replica may take it: the
//! spend record of the refresh token, taken before the token is presented and kept as long as
//! the refresh or its unsaved answer lives ([`Job::spend_lasts`]), makes that replica wait for
//! this refresh's answer rather than present the token again. Only a store that loses the
//! record (a failover to a replica that had not received it) lets two replicas present it: the
//! first answer saved wins, and a later one is not written over it (see [`Job::save`]); with a
//! rotating provider one of the two is refused.
//!
//! The answer of a refresh the store failed to save is kept and saved later, never thrown away
//! (see [`super::save`]).

use super::save::Answer;
use super::{Failed, Grant, RefreshError, RefreshMemory, TokenUnavailable, classify, count, fresh};
use crate::clock::Clock;
use crate::config::RouteConfig;
use crate::jose::{Claims, JoseError};
use crate::oidc::Oidc;
use crate::oidc::userinfo::{SIGN_IN_CLAIMS, merge, user_claims};
use crate::session::manager::{OpenSession, Sessions};
use crate::session::model::Session;
use crate::session::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, oneshot};
use tokio::time::Instant;

/// The refresh lease; the holder renews it every third of it for as long as its grants take.
pub(super) const LEASE: Duration = Duration::from_secs(10);
/// How long a spend record that its holder has not renewed for a lease still holds once a
/// refresh waiting for it noticed: the holder, if it lives, renews it well within this time of
/// reaching the store again; if it died, the session's refreshes go on after it.
const UNRENEWED_RECORD_HOLDS: Duration = Duration::from_secs(60);
/// How often a refresh waiting for a spend record checks whether it is still renewed.
const RENEWAL_CHECK: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(25);
/// At most one early refresh per session this often: an upstream that rejects every token must
/// not turn each request into a grant.
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// What the UserInfo endpoint said after a refresh.
enum Userinfo {
    /// Not asked: `userinfo` is off, or the token is for another resource.
    NotAsked,
    Fetched(Claims),
    /// Unavailable, refused, invalid or about another subject: the claims stay as they were.
    Failed,
}

/// Whether a refresh may present the session's refresh token.
enum Recorded {
    /// Recorded as this refresh's to spend, on the session as last read.
    Spend(OpenSession),
    /// Another refresh spent it and saved its answer: the token for the target.
    Done(String),
}

/// The claims a refresh brings: a validated ID token's, and the UserInfo answer.
pub(super) struct ClaimsUpdate {
    /// The refreshed ID token's claims, when it came and was valid.
    claims: Option<Claims>,
    userinfo: Userinfo,
}

impl ClaimsUpdate {
    fn none() -> ClaimsUpdate {
        ClaimsUpdate {
            claims: None,
            userinfo: Userinfo::NotAsked,
        }
    }

    /// A validated ID token replaces the stored one, and the provider session (`sid`) it names,
    /// if any, the session's. The user claims become the ID token's (the
    /// new one, else the stored one) with the UserInfo answer merged over them; without
    /// `userinfo`, the new ID token's alone; when UserInfo failed, they stay as they were, but
    /// for the sign-in (`acr`, `amr`, `auth_time`), which a new ID token that names it replaces
    /// (never with a later `auth_time`).
    pub(super) fn apply(&self, session: &mut Session, id_token: Option<&str>) {
        // OpenID Connect Core §12.2: a refresh is the same sign-in; a refreshed ID token may
        // leave out how and when it happened, and the session keeps that.
        let before: Vec<(String, serde_json::Value)> = SIGN_IN_CLAIMS
            .iter()
            .filter_map(|name| Some((name.to_string(), session.claims.get(name)?.clone())))
            .collect();
        let new_id_token = match (&self.claims, id_token) {
            (Some(claims), Some(token)) => {
                session.id_token = Some(token.to_string());
                // A provider session named anew is the one whose back-channel logout must end
                // this session: the write indexes it under that `sid` (and keeps the entry of
                // the one before, whose logout still ends it).
                if let Some(sid) = claims.get("sid").and_then(|v| v.as_str()) {
                    session.sid = Some(sid.to_string());
                }
                Some(claims)
            }
            _ => None,
        };
        match (&self.userinfo, new_id_token) {
            (Userinfo::Failed, _) | (Userinfo::NotAsked, None) => {}
            (Userinfo::NotAsked, Some(claims)) => session.claims = user_claims(claims).into(),
            (Userinfo::Fetched(info), _) => {
                let base = match new_id_token {
                    Some(claims) => Some(user_claims(claims)),
                    None => session
                        .id_token
                        .as_deref()
                        .and_then(|t| crate::jose::jws::stored_claims(t).ok())
                        .map(|c| user_claims(&c)),
                };
                // Without an ID token to start from, the claims kept so far are the base.
                let base = base.unwrap_or_else(|| session.claims.map().clone());
                session.claims = merge(base, info.clone()).into();
            }
        }
        // The sign-in is the new ID token's word where it names it, whatever became of the
        // UserInfo call: claims kept because that call failed must not keep a stronger `acr`
        // (or a later `auth_time`) than the provider now vouches for, which a step-up route
        // would go on accepting.
        // OpenID Connect Core §12.2: `auth_time` stays that of the original sign-in. A refresh
        // happens without the user, so one that dates the sign-in later is not believed: a
        // route with `max_age` would take the session for a recent sign-in.
        let sign_in: Vec<(String, serde_json::Value)> = SIGN_IN_CLAIMS
            .iter()
            .filter_map(|name| {
                let named = new_id_token.and_then(|claims| claims.get(*name));
                let kept = before.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                let value = match (named, kept) {
                    (Some(new), Some(old))
                        if *name == "auth_time"
                            && new
                                .as_u64()
                                .is_none_or(|n| old.as_u64().is_some_and(|o| n > o)) =>
                    {
                        tracing::warn!(
                            "a refreshed ID token dates the sign-in later than the session's; \
                             the session keeps its auth_time"
                        );
                        old
                    }
                    (named, kept) => named.or(kept)?,
                };
                Some((name.to_string(), value.clone()))
            })
            .collect();
        if sign_in
            .iter()
            .any(|(name, value)| session.claims.get(name) != Some(value))
        {
            let mut claims = session.claims.map().clone();
            claims.extend(sign_in);
            session.claims = claims.into();
        }
    }
}

/// What a token is for: a route's resource (the key of the session's token map), scopes, and
/// whether it comes from a token exchange.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Target {
    key: String,
    resource: Option<String>,
    scopes: Vec<String>,
    exchange: bool,
}

impl Target {
    pub(super) fn of(route: &RouteConfig) -> Target {
        Target {
            key: route.token_key().to_string(),
            resource: route.resource.clone(),
            scopes: route.scopes.clone(),
            exchange: route.exchange,
        }
    }

    /// The session's own token, as the login got it: the subject of token exchanges.
    fn base() -> Target {
        Target {
            key: String::new(),
            resource: None,
            scopes: Vec::new(),
            exchange: false,
        }
    }
}

/// One request's turn in its session's queue, with everything the refresh needs.
pub(super) struct Job {
    pub(super) sessions: Arc<Sessions>,
    pub(super) oidc: Arc<Oidc>,
    pub(super) clock: Clock,
    /// `oidc.refresh_skew` in seconds.
    pub(super) skew: u64,
    pub(super) loaded: OpenSession,
    pub(super) target: Target,
    /// A token an upstream refused: replace it even if it is not due.
    pub(super) rejected: Option<String>,
    /// On a `token_binding = "dpop"` route, the thumbprint of the DPoP key that signs now: a
    /// token recorded as bound to another key is replaced even if it is not due.
    pub(super) signing: Option<String>,
    pub(super) arrived: Instant,
    /// When to stop waiting for another replica's lease.
    pub(super) deadline: Instant,
    /// The session's refresh lease in the store, and this job's token for it.
    pub(super) lock_key: String,
    pub(super) lease: String,
    /// How long an answer the store did not take is tried again
    /// ([`super::save::KEEP_SAVING_FOR`]).
    pub(super) keep_saving_for: Duration,
    /// How often the watch of an answer given up on reads the session ([`super::orphan`]).
    pub(super) ended_check: Duration,
    /// The refresh memories of every session, for the watch of an answer given up on
    /// ([`super::orphan`]).
    pub(super) memories: Arc<super::orphan::Memories>,
}

impl Job {
    /// Answers the request through `reply`; then, if the store failed to take the provider's
    /// answer, goes on trying to save it (the request is not kept waiting for that).
    pub(super) async fn run(
        self,
        mut memory: OwnedMutexGuard<RefreshMemory>,
        reply: oneshot::Sender<Result<Option<String>, RefreshError>>,
    ) {
        let answer = self.answer(&mut memory).await;
        let _ = reply.send(answer);
        if self.kept_unsaved(&memory) {
            self.keep_saving(memory).await;
        }
    }

    /// Saves an answer an earlier refresh could not, before anything else; then reads the
    /// session as the store has it: the token if someone refreshed meanwhile, the failure of
    /// the refresh this request queued behind, or a refresh under the lease.
    async fn answer(&self, memory: &mut RefreshMemory) -> Result<Option<String>, RefreshError> {
        let store = self.sessions.store().clone();
        let (lock_key, lease) = (&self.lock_key, &self.lease);
        self.save_unsaved(memory).await?;
        loop {
            let current = self.reload(&self.loaded).await?;
            let rejected = self.rejected.as_deref();
            if let Some(t) = self.target_token(&current, rejected) {
                return Ok(Some(t));
            }
            let shared = memory.failed.as_ref().filter(|f| {
                f.at >= self.arrived
                    && (f.target == self.target || !matches!(f.error, RefreshError::Refused { .. }))
            });
            if let Some(failed) = shared {
                return Err(failed.error.clone());
            }
            // Fresh, but bound to a key that no longer signs (a key file replaced, the stored key
            // replaced): replaced now, at most once per session per interval like a token an
            // upstream refused, so replicas that sign with different keys (a rolling restart
            // onto a new key file) do not turn every request into a grant; in between, and
            // without a refresh token, it is sent as it is and the upstream decides.
            let rebind = self.rebind_token(&current, rejected);
            if let Some(token) = rebind.as_ref().filter(|_| {
                (!self.target.exchange && current.session.refresh_token.is_none())
                    || memory
                        .forced
                        .is_some_and(|at| at.elapsed() < FORCED_REFRESH_INTERVAL)
            }) {
                return Ok(Some(token.clone()));
            }
            // The token refused was valid by its lifetime (whatever key it was bound to).
            let early = rebind.is_some()
                || rejected.is_some() && self.any_key_token(&current, None).is_some();
            if early && !self.target.exchange && current.session.refresh_token.is_none() {
                // Nothing to get another token with, and the token is valid by its lifetime:
                // one upstream's refusal does not end the session (every route's, and
                // `/bff/user`); its answer stands.
                return Ok(None);
            }
            if early
                && memory
                    .forced
                    .is_some_and(|at| at.elapsed() < FORCED_REFRESH_INTERVAL)
            {
                return Ok(None);
            }
            match store.try_lock(lock_key, lease, LEASE).await {
                Ok(true) => {
                    let result = self.under_lease(memory, early, &store).await;
                    // An answer kept unsaved keeps the lease: the refresh token is spent.
                    if !self.kept_unsaved(memory) {
                        release(&store, lock_key, lease).await;
                    }
                    if let Err(error) = &result
                        && !matches!(error, RefreshError::Ended)
                    {
                        memory.failed = Some(Failed {
                            at: Instant::now(),
                            target: self.target.clone(),
                            error: error.clone(),
                        });
                    }
                    return result.map(Some);
                }
                Ok(false) => {
                    if Instant::now() + POLL > self.deadline {
                        return Err(RefreshError::Unavailable {
                            reason: TokenUnavailable::OtherReplicaStalled,
                        });
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    // Taken perhaps (its answer lost or late): let it go rather than hold the
                    // session's refreshes back until it runs out.
                    release_later(&store, lock_key, lease);
                    return Err(RefreshError::Store(e.into()));
                }
            }
        }
    }

    /// The session's token for this refresh's target if it is fresh now (not `rejected`, and
    /// bound to the key that signs now, see [`Job::signing`]).
    fn target_token(&self, current: &OpenSession, rejected: Option<&str>) -> Option<String> {
        fresh(
            self.clock.now(),
            self.skew,
            &current.session,
            &self.target.key,
            rejected,
            self.signing.as_deref(),
        )
        .map(str::to_string)
    }

    /// The session's token for this refresh's target if it is fresh by its lifetime but bound
    /// to another key than the one that signs now.
    fn rebind_token(&self, current: &OpenSession, rejected: Option<&str>) -> Option<String> {
        self.any_key_token(current, rejected)
            .filter(|_| self.target_token(current, rejected).is_none())
    }

    /// `current`'s token for `key` if it is fresh by its lifetime, whatever key it was bound to.
    fn lifetime_fresh<'s>(&self, current: &'s OpenSession, key: &str) -> Option<&'s str> {
        fresh(
            self.clock.now(),
            self.skew,
            &current.session,
            key,
            None,
            None,
        )
    }

    /// The session's token for this refresh's target if it is fresh by its lifetime (and not
    /// `rejected`), whatever key it was bound to.
    fn any_key_token(&self, current: &OpenSession, rejected: Option<&str>) -> Option<String> {
        let now = self.clock.now();
        fresh(
            now,
            self.skew,
            &current.session,
            &self.target.key,
            rejected,
            None,
        )
        .map(str::to_string)
    }

    /// The longest a refresh's grants take: three (an exchange refused for its subject token,
    /// the subject's refresh and the exchange again), each bounded by the provider timeout, and
    /// a lease to spare.
    fn grants_take(&self) -> Duration {
        self.oidc.config.provider_timeout * 3 + LEASE
    }

    /// How long a spend record lasts from its last renewal: through the grants and every
    /// attempt to save their answer through a store outage (`keep_saving_for`), and a minute
    /// more. Were it to run out first, another replica could present the refresh token spent
    /// while the store was away before the answer is saved. A holder that died leaves it
    /// unrenewed, and the next refresh waiting for it cuts it short.
    pub(super) fn spend_lasts(&self) -> Duration {
        self.grants_take() + self.keep_saving_for + Duration::from_secs(60)
    }

    pub(super) async fn reload(&self, loaded: &OpenSession) -> Result<OpenSession, RefreshError> {
        match self.sessions.reload(loaded, self.clock.now()).await {
            Ok(Some(current)) => Ok(current),
            Ok(None) => Err(RefreshError::Ended),
            Err(e) => Err(RefreshError::Store(e.into())),
        }
    }

    async fn under_lease(
        &self,
        memory: &mut RefreshMemory,
        early: bool,
        store: &Store,
    ) -> Result<String, RefreshError> {
        // Re-read under the lease: the previous holder may have saved just before releasing it.
        let current = self.reload(&self.loaded).await?;
        let rejected = self.rejected.as_deref();
        if let Some(t) = self.target_token(&current, rejected) {
            return Ok(t);
        }
        if early {
            memory.forced = Some(Instant::now());
        }
        // At most three grants (see `grants_take`), each bounded.
        let keeper = Keeper::start(
            store.clone(),
            &self.lock_key,
            &self.lease,
            LEASE,
            self.grants_take(),
        );
        let result = self.grant(memory, current, early).await;
        if keeper.lost() {
            tracing::warn!(
                "the refresh lease was lost while refreshing; another replica may have refreshed \
                 too, and the first answer saved stands"
            );
        }
        result
    }

    /// The grant for the target: a refresh, or a token exchange whose subject token is the
    /// session's own one, refreshed first if it is due or, with DPoP, bound to another key than
    /// the one the exchange is proved with.
    /// `early`: this grant replaces a token before its time, and already counted as the
    /// session's early refresh of the interval.
    async fn grant(
        &self,
        memory: &mut RefreshMemory,
        current: OpenSession,
        early: bool,
    ) -> Result<String, RefreshError> {
        if !self.target.exchange {
            let (rejected, signing) = (self.rejected.as_deref(), self.signing.as_deref());
            return self
                .refresh(memory, current, &self.target, rejected, signing)
                .await;
        }
        // With DPoP the exchange is proved with the key that signs now, whatever the route's
        // binding: a subject token bound to another key (a key file replaced, the stored key
        // replaced) is one the provider may refuse as not bound to the proof's key, and every
        // exchange would then be refused until it expired. It is refreshed first, as it is
        // before it is sent to a DPoP route, and at the same pace: once per session per interval
        // (or as part of this grant's early refresh), so replicas signing with different keys
        // meanwhile do not refresh at every exchange a provider refuses for good. Otherwise,
        // and without a refresh token, it is presented as it is and the provider decides (the
        // session is not ended for it).
        let signing = match &self.oidc.dpop {
            Some(dpop) => dpop
                .key()
                .await
                .ok()
                .map(|key| key.thumbprint().to_string()),
            None => None,
        };
        let now = self.clock.now();
        let forced = |memory: &RefreshMemory| {
            memory
                .forced
                .is_some_and(|at| at.elapsed() < FORCED_REFRESH_INTERVAL)
        };
        let may_rebind = current.session.refresh_token.is_some() && (early || !forced(memory));
        let bound = fresh(
            now,
            self.skew,
            &current.session,
            "",
            None,
            signing.as_deref(),
        );
        let valid = fresh(now, self.skew, &current.session, "", None, None);
        if bound.is_none() && valid.is_some() && may_rebind {
            memory.forced = Some(Instant::now());
        }
        let subject = bound.or(valid.filter(|_| !may_rebind)).map(str::to_string);
        let base = Target::base();
        let (mut subject, mut current, mut refreshed) = match subject {
            Some(t) => (t, current, false),
            None => {
                let subject = self
                    .refresh(memory, current, &base, None, signing.as_deref())
                    .await?;
                (subject, self.reload(&self.loaded).await?, true)
            }
        };
        let resource = self.target.resource.as_deref().unwrap_or_default();
        let tokens = loop {
            let error = match self
                .oidc
                .exchange_token(&subject, resource, &self.target.scopes)
                .await
            {
                Ok(tokens) => break tokens,
                Err(error) => classify(Grant::Exchange, error),
            };
            // Refused for its subject token (RFC 8693 §2.2.2: `invalid_request`; some providers
            // say `invalid_grant`) though it is valid here: bound to a replaced key in a session
            // that recorded no thumbprint, revoked, or expired early at the provider. It is
            // refreshed and the exchange asked for once more, as an upstream's `invalid_token`
            // replaces the token it refused; at most once per session per interval (and not
            // after an early refresh), so a provider that refuses a route's exchanges for good
            // does not turn each request into a refresh. Otherwise the refusal stands, for this
            // route only: no answer to an exchange ends the session.
            let subject_refused = matches!(
                &error,
                RefreshError::Refused { code } if code == "invalid_request" || code == "invalid_grant"
            );
            if !subject_refused
                || refreshed
                || forced(memory)
                || current.session.refresh_token.is_none()
            {
                return Err(error);
            }
            memory.forced = Some(Instant::now());
            tracing::info!(
                "the provider refused the token exchange's subject token; refreshing it and \
                 asking once more"
            );
            let refused = std::mem::take(&mut subject);
            subject = self
                .refresh(memory, current, &base, Some(&refused), signing.as_deref())
                .await?;
            current = self.reload(&self.loaded).await?;
            refreshed = true;
        };
        count(Grant::Exchange, "ok");
        let answer = Answer {
            key: self.target.key.clone(),
            // A refresh token in an exchange's answer (RFC 8693 §2.2.1 allows one) is for the
            // exchanged audience: it never takes the place of the session's own, which the
            // next refresh presents and a logout revokes.
            tokens: crate::oidc::TokenResponse {
                refresh_token: None,
                id_token: None,
                ..tokens
            },
            update: ClaimsUpdate::none(),
            spent: None,
            at: self.clock.now(),
            rotation_only: false,
        };
        self.save(memory, current, answer).await
    }

    /// A refresh-token grant. `invalid_grant` or an ID token for another subject ends the
    /// session; of an answer with an invalid ID token, or with a token of another type than
    /// asked for, only the rotated refresh token is kept.
    /// The token for `target` it replaces is `rejected`, or bound to another DPoP key than
    /// `signing` (see [`Job::settled`]), or due.
    async fn refresh(
        &self,
        memory: &mut RefreshMemory,
        current: OpenSession,
        target: &Target,
        rejected: Option<&str>,
        signing: Option<&str>,
    ) -> Result<String, RefreshError> {
        let Some(spent) = current.session.refresh_token.clone() else {
            let _ = self.sessions.delete(&current).await;
            return Err(RefreshError::Ended);
        };
        let spend = self.sessions.spend_key(&current, &spent);
        let current = match self
            .record_spend(current, &spend, target, rejected, signing)
            .await?
        {
            Recorded::Spend(current) => current,
            Recorded::Done(token) => return Ok(token),
        };
        let store = self.sessions.store().clone();
        let keeper = Keeper::start(
            store,
            &spend,
            &self.lease,
            self.spend_lasts(),
            self.grants_take(),
        );
        let result = self.present(memory, current, target, spent).await;
        drop(keeper);
        // Saved, refused or failed: the record has nothing left to guard. An answer kept unsaved
        // keeps it until it runs out.
        if !self.kept_unsaved(memory) {
            release(self.sessions.store(), &spend, &self.lease).await;
        }
        result
    }

    /// Presents the refresh token `spent` and saves the answer.
    async fn present(
        &self,
        memory: &mut RefreshMemory,
        current: OpenSession,
        target: &Target,
        spent: String,
    ) -> Result<String, RefreshError> {
        let outcome = self
            .oidc
            .refresh(&spent, target.resource.as_deref(), &target.scopes)
            .await;
        let at = self.clock.now();
        let tokens = match outcome {
            Ok(tokens) => tokens,
            Err((error, Some(refused))) => {
                // Answered with a token of another type than asked for (a Bearer token where a
                // DPoP-bound one was): refused, but the provider has spent the refresh token
                // presented, so the one it rotated is kept, and nothing else of the answer.
                let error = classify(Grant::Refresh, error);
                self.keep_rotation(memory, current, target, *refused, spent, at)
                    .await?;
                return Err(error);
            }
            Err((error, None)) => {
                let error = classify(Grant::Refresh, error);
                if matches!(error, RefreshError::Ended) {
                    // Refused because another holder of a lost lease spent it first and saved
                    // the new one: that session lives on.
                    let now = self.reload(&current).await?;
                    if now.session.refresh_token.as_deref() != Some(spent.as_str()) {
                        return self
                            .lifetime_fresh(&now, &target.key)
                            .map(str::to_string)
                            .ok_or(RefreshError::Unavailable {
                                reason: TokenUnavailable::SpentElsewhere,
                            });
                    }
                    let _ = self.sessions.delete(&now).await;
                }
                return Err(error);
            }
        };
        let claims = match &tokens.id_token {
            None => None,
            Some(id_token) => match self.check_id_token(&current.session, id_token).await {
                Ok(claims) => Some(claims),
                Err(JoseError::SubjectChanged) => {
                    count(Grant::Refresh, "subject_changed");
                    tracing::warn!(
                        "the refreshed ID token names another subject; ending the session"
                    );
                    let _ = self.sessions.delete(&current).await;
                    return Err(RefreshError::Ended);
                }
                Err(error) => {
                    count(Grant::Refresh, "id_token_invalid");
                    tracing::warn!(
                        %error,
                        "the refreshed ID token is invalid; of the answer only a rotated refresh \
                         token is kept"
                    );
                    self.keep_rotation(memory, current, target, tokens, spent, at)
                        .await?;
                    return Err(RefreshError::Unavailable {
                        reason: TokenUnavailable::InvalidIdToken(error),
                    });
                }
            },
        };
        count(Grant::Refresh, "ok");
        // The default access token is the one the UserInfo endpoint takes (a token for another
        // resource may be refused there).
        let userinfo = if self.oidc.config.userinfo && target.key.is_empty() {
            match self
                .oidc
                .userinfo(&tokens.access_token, &current.session.sub, &self.clock)
                .await
            {
                Ok(info) => Userinfo::Fetched(info),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        reason = error.reason(),
                        "userinfo after a refresh failed; the session keeps its claims"
                    );
                    Userinfo::Failed
                }
            }
        } else {
            Userinfo::NotAsked
        };
        let answer = Answer {
            key: target.key.clone(),
            tokens,
            update: ClaimsUpdate { claims, userinfo },
            spent: Some(spent),
            at,
            rotation_only: false,
        };
        self.save(memory, current, answer).await
    }

    /// Saves the refresh token an answer rotated, and nothing else of it (its ID token did not
    /// validate, or its token was of another type than asked for): the provider has spent the
    /// one presented, which a rotating provider refuses the next time with `invalid_grant`,
    /// ending the session. Like any refresh's answer, it is kept and saved later if the store
    /// fails now.
    async fn keep_rotation(
        &self,
        memory: &mut RefreshMemory,
        current: OpenSession,
        target: &Target,
        tokens: crate::oidc::TokenResponse,
        spent: String,
        at: u64,
    ) -> Result<(), RefreshError> {
        if tokens.refresh_token.as_deref().is_none_or(|r| r == spent) {
            return Ok(());
        }
        let answer = Answer {
            key: target.key.clone(),
            tokens: crate::oidc::TokenResponse {
                id_token: None,
                ..tokens
            },
            update: ClaimsUpdate::none(),
            spent: Some(spent),
            at,
            rotation_only: true,
        };
        self.save(memory, current, answer).await.map(drop)
    }

    /// Records in the store that this refresh spends the session's refresh token, before it is
    /// presented. The lease makes one refresh at a time the rule; the record still holds when
    /// the lease ran out under a refresh at the provider (a store stalled longer than the
    /// lease, a failover): another replica then waits for that refresh's answer rather than
    /// present the refresh token again, which a rotating provider refuses with `invalid_grant`
    /// (ending the session) and one that detects reuse answers by revoking the whole grant.
    /// Waits until the record is free, the session has a fresh token (the other refresh saved
    /// it), or this request's deadline.
    async fn record_spend(
        &self,
        current: OpenSession,
        spend: &str,
        target: &Target,
        rejected: Option<&str>,
        signing: Option<&str>,
    ) -> Result<Recorded, RefreshError> {
        let store = self.sessions.store();
        let lasts = self.spend_lasts();
        let mut current = current;
        let mut warned = false;
        let mut check_renewal = Instant::now();
        loop {
            match store.try_lock(spend, &self.lease, lasts).await {
                Ok(true) => {
                    // Held; but the refresh that held it before may have saved its answer after
                    // this one last read the session, then let it go: read the session again.
                    let now = match self.reload(&current).await {
                        Ok(now) => now,
                        Err(error) => {
                            release(store, spend, &self.lease).await;
                            return Err(error);
                        }
                    };
                    return match self.settled(&current, &now, target, rejected, signing) {
                        None => Ok(Recorded::Spend(now)),
                        Some(settled) => {
                            release(store, spend, &self.lease).await;
                            settled
                        }
                    };
                }
                Ok(false) => {
                    // Its holder renews it every third of a lease while it lives; one not
                    // renewed for a whole lease (a holder that died, or that has not reached the
                    // store since it came back) is cut short, and its holder, if it lives,
                    // renews it again in time.
                    if Instant::now() >= check_renewal {
                        check_renewal = Instant::now() + RENEWAL_CHECK;
                        let below = lasts.saturating_sub(LEASE);
                        if let Ok(true) = store
                            .shorten_lock(spend, below, UNRENEWED_RECORD_HOLDS)
                            .await
                        {
                            tracing::warn!(
                                "the spend record of this session's refresh token has not been \
                                 renewed for {LEASE:?}; it holds {UNRENEWED_RECORD_HOLDS:?} \
                                 more unless its refresh renews it"
                            );
                        }
                    }
                }
                Err(e) => {
                    // The record may have been set all the same (its answer lost or late); this
                    // refresh presents nothing, so it takes it back, or every refresh of the
                    // session would wait for it until it runs out.
                    release_later(store, spend, &self.lease);
                    return Err(RefreshError::Store(e.into()));
                }
            }
            if !warned {
                warned = true;
                tracing::warn!(
                    "another refresh is spending this session's refresh token (its lease ran \
                     out); waiting for its answer"
                );
            }
            if Instant::now() + POLL > self.deadline {
                return Err(RefreshError::Unavailable {
                    reason: TokenUnavailable::SpendInProgress,
                });
            }
            tokio::time::sleep(POLL).await;
            let now = self.reload(&current).await?;
            if let Some(settled) = self.settled(&current, &now, target, rejected, signing) {
                return settled;
            }
            current = now;
        }
    }

    /// What another refresh's answer, saved since `before` was read, leaves to this refresh in
    /// `now`: a fresh token for `target`, or a 503 when the refresh token changed but left no
    /// fresh token for `target`; `None` when nothing was saved, and the refresh token is still
    /// to be spent. The token `rejected`, or one bound to another key than `signing` (the
    /// thumbprint of the key the token for `target` must be bound to: the route's on a DPoP
    /// route, the exchange's for an exchange's subject), is no answer: it is what this refresh
    /// is to replace.
    fn settled(
        &self,
        before: &OpenSession,
        now: &OpenSession,
        target: &Target,
        rejected: Option<&str>,
        signing: Option<&str>,
    ) -> Option<Result<Recorded, RefreshError>> {
        let token = fresh(
            self.clock.now(),
            self.skew,
            &now.session,
            &target.key,
            rejected,
            signing,
        );
        if let Some(token) = token {
            return Some(Ok(Recorded::Done(token.to_string())));
        }
        if now.session.refresh_token == before.session.refresh_token {
            return None;
        }
        let token = self.lifetime_fresh(now, &target.key);
        Some(
            token
                .map(|t| Recorded::Done(t.to_string()))
                .ok_or(RefreshError::Unavailable {
                    reason: TokenUnavailable::SpentElsewhere,
                }),
        )
    }

    /// OpenID Connect Core §12.2: against the session's ID token (from the login, or the last
    /// refresh, which repeats its `iss`, `sub` and `aud`), and the session's subject.
    async fn check_id_token(&self, session: &Session, id_token: &str) -> Result<Claims, JoseError> {
        let client_id = &self.oidc.config.client_id;
        let expect = self
            .oidc
            .id_token_expectations(client_id, self.clock.now())?;
        let mut original = session
            .id_token
            .as_deref()
            .and_then(|t| crate::jose::jws::stored_claims(t).ok())
            .unwrap_or_else(|| {
                // A session without its ID token: what the login checked.
                let mut c = Claims::new();
                c.insert("iss".into(), expect.issuer.clone().into());
                c.insert("aud".into(), client_id.clone().into());
                c
            });
        original.insert("sub".into(), session.sub.clone().into());
        crate::jose::validate_refreshed_id_token(
            &self.oidc.provider.jwks,
            id_token,
            &expect,
            &original,
        )
        .await
    }
}

/// How long [`release_later`] keeps trying.
const RELEASE_FOR: Duration = Duration::from_secs(30);

/// Releases the lease or spend record `key` if `token` holds it; if the store fails to answer,
/// tries again later ([`release_later`]) rather than leave it to hold the session's refreshes
/// back until it runs out.
pub(super) async fn release(store: &Store, key: &str, token: &str) {
    if store.unlock(key, token).await.is_err() {
        release_later(store, key, token);
    }
}

/// Releases `key` if `token` holds it, in a task of its own that tries again until the store
/// answers (for [`RELEASE_FOR`] at most): after an attempt to take it or let it go that failed
/// while the store is failing, and which the store may have carried out all the same (its
/// answer lost or late). A compare-and-delete: it never releases what another refresh took
/// since.
fn release_later(store: &Store, key: &str, token: &str) {
    let (store, key, token) = (store.clone(), key.to_string(), token.to_string());
    tokio::spawn(async move {
        let until = Instant::now() + RELEASE_FOR;
        let mut pause = Duration::from_millis(100);
        while store.unlock(&key, &token).await.is_err() && Instant::now() + pause < until {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    });
}

/// Renews a refresh's lease or spend record while its grants take, or while its answer waits to
/// be saved. Aborted when dropped (before the refresh lets the key go: the same connection then
/// carries its last command before the release); gives up by itself after `longest`, so nothing
/// is held for a refresh that is over. A key found gone (run out during a store outage longer
/// than it lasts, or cut short by a refresh waiting for it) is taken again if nobody else took
/// it meanwhile.
pub(super) struct Keeper {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

impl Keeper {
    /// Keeps `key` held for `token`, `lasts` from each renewal, every third of a [`LEASE`].
    pub(super) fn start(
        store: Store,
        key: &str,
        token: &str,
        lasts: Duration,
        longest: Duration,
    ) -> Keeper {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let (key, token) = (key.to_string(), token.to_string());
        let task = tokio::spawn(async move {
            let until = Instant::now() + longest;
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if Instant::now() >= until {
                    tracing::warn!("a refresh outlasted its time; its lease runs out");
                    return;
                }
                // A store error: try again at the next tick.
                if let Ok(false) = store.extend_lock(&key, &token, lasts).await {
                    flag.store(true, Ordering::Relaxed);
                    if let Ok(true) = store.try_lock(&key, &token, lasts).await {
                        tracing::info!("a refresh's lease ran out under it and is taken again");
                    }
                }
            }
        });
        Keeper { task, lost }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
