//! Writing a grant's answer into the session, and keeping it when the store fails at that moment.
//!
//! Once the provider has answered a refresh, the refresh token it was given is spent: with a
//! rotating provider the answer holds the only copy of the new one, and presenting the spent one
//! again is refused with `invalid_grant`, which ends the session. So an answer the store did not
//! take — it failed, or other writes of the session came first at every attempt — is never
//! thrown away: it is kept in the process's refresh memory ([`Unsaved`]) and its
//! refresh task tries the save again until the store answers ([`Job::keep_saving`]), holding the
//! lease, for [`KEEP_SAVING_FOR`]. Every later refresh of the session in this process saves it
//! before it does anything else ([`Job::save_unsaved`]), so no grant — and no `invalid_grant` —
//! can follow an answer still unsaved here.
//!
//! An answer whose session ended meanwhile has its tokens revoked, not dropped: by the save
//! that finds the session gone, by a logout in this process ([`super::Tokens::forget_ended`]),
//! or, once its refresh task has given up, by the watch of its session that the task leaves
//! behind ([`super::orphan`]), which sees the session end by any path, on any instance.

use super::orphan::Orphan;
use super::refresh::{ClaimsUpdate, Job, Keeper, LEASE, release};
use super::{RefreshError, RefreshMemory, TokenUnavailable};
use crate::oidc::{Oidc, TokenResponse};
use crate::session::manager::OpenSession;
use crate::session::model::{AccessToken, Session};
use crate::session::store::Store;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Attempts to write refreshed tokens when other writes (idle-timeout touches) interleave; after
/// that the answer is kept and saved again later, like one the store failed to take.
const SAVE_ATTEMPTS: usize = 5;
/// How long a refresh task keeps trying to save an answer the store did not take; afterwards the
/// answer waits in memory for the session's next refresh in this process, or its end
/// ([`super::orphan`]). Long enough for a
/// store restart or failover, short enough that a shutdown or an outage does not pile up tasks.
pub(super) const KEEP_SAVING_FOR: Duration = Duration::from_secs(300);
/// The first pause between two attempts; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// Whether the warning about a `refresh_skew` longer than token lifetimes was logged.
static SKEW_WARNED: AtomicBool = AtomicBool::new(false);

/// Past this many answers waiting unsaved in the process, a warning is logged (once, again only
/// after they fell to half of it). Nothing drops them: each holds its session's only rotated
/// refresh token, and dropping it would end the session at its next refresh. What bounds them
/// is one per session refreshing on this instance during the outage.
pub(super) const MANY_UNSAVED: usize = 1_000;

/// The answers waiting unsaved in this process (`vestibule_refresh_answers_unsaved`).
static UNSAVED: Tally = Tally::new(MANY_UNSAVED);

/// A count of the answers waiting unsaved, as a gauge, with a warning once past `many`.
pub(super) struct Tally {
    now: AtomicUsize,
    many: usize,
    warned: AtomicBool,
}

/// One answer in a [`Tally`]: counted until dropped with its [`Unsaved`].
pub(super) struct Counted(&'static Tally);

impl Tally {
    pub(super) const fn new(many: usize) -> Tally {
        Tally {
            now: AtomicUsize::new(0),
            many,
            warned: AtomicBool::new(false),
        }
    }

    pub(super) fn count(&'static self) -> Counted {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("vestibule_refresh_answers_unsaved").set(now as f64);
        if now > self.many && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                unsaved = now,
                "more than {} refresh answers wait unsaved in memory: the session store has not \
                 taken writes for a while. Each holds a session's only rotated refresh token and \
                 is kept until it is saved or its session ends",
                self.many
            );
        }
        Counted(self)
    }

    /// How many answers are counted now, and whether the warning stands.
    #[cfg(test)]
    fn read(&self) -> (usize, bool) {
        (
            self.now.load(Ordering::Relaxed),
            self.warned.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let now = self.0.now.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("vestibule_refresh_answers_unsaved").set(now as f64);
        if now <= self.0.many / 2 {
            self.0.warned.store(false, Ordering::Relaxed);
        }
    }
}

/// A grant's answer, as it is written into the session.
pub(super) struct Answer {
    /// The session's token map key it is for (a route's resource, or `""`).
    pub(super) key: String,
    pub(super) tokens: TokenResponse,
    pub(super) update: ClaimsUpdate,
    /// The refresh token the grant presented; none for a token exchange, which spends nothing.
    pub(super) spent: Option<String>,
    /// Unix seconds when the provider answered: the access token's lifetime runs from then, not
    /// from a save that came late.
    pub(super) at: u64,
    /// Only the rotated refresh token is written (the answer is otherwise not to be used: its ID
    /// token did not validate, or its token is of another type than asked for), not the access
    /// token.
    pub(super) rotation_only: bool,
}

/// What became of an attempt to write an answer ([`Job::write`]).
enum Saved {
    /// Written, or left out for another refresh's answer saved first.
    Written,
    /// Other writes of the session came first at every attempt: nothing was written.
    Contended,
}

/// A refresh's answer that the store did not take, and the lease of the refresh that got it
/// (released by whoever saves it, or revokes it: [`Unsaved::revoke`]).
pub(super) struct Unsaved {
    answer: Answer,
    lease: String,
    /// The session's refresh lease and the spend record of the refresh token the answer spent,
    /// both held with `lease`.
    lock_key: String,
    spend_key: String,
    /// Keep the session's refresh lease and the spend record of the refresh token the answer
    /// spent held while it waits (for [`KEEP_SAVING_FOR`]), taking them again if they ran out
    /// during the outage: no replica presents that token again meanwhile.
    _keepers: [Keeper; 2],
    /// Stops the watch of the session started once the refresh task gives up
    /// ([`super::orphan`]) when the answer leaves the memory by any other path.
    stop: CancellationToken,
    _stopping: DropGuard,
    /// In `vestibule_refresh_answers_unsaved` while it waits.
    _counted: Counted,
}

impl Unsaved {
    /// Whether it is the answer of the refresh that holds `lease`.
    pub(super) fn is_of(&self, lease: &str) -> bool {
        self.lease == lease
    }

    /// Its session ended, and a logout in this process, or the watch of its session, took it
    /// out of the refresh memory:
    /// revokes the tokens the answer brought ([`revoke_answer`]) and lets go of what it held.
    pub(super) async fn revoke(self, store: &Store, oidc: &Oidc) {
        let answer = self.let_go(store).await;
        revoke_answer(oidc, &answer).await;
    }

    /// Saved, or no session is left to save it into: the lease and the spend record (held
    /// with the same token) have nothing more to guard. Left behind, the record would hold
    /// back every refresh presenting the same refresh token (one the provider did not rotate)
    /// until it runs out. Their keepers stop first.
    async fn let_go(self, store: &Store) -> Answer {
        let Unsaved {
            answer,
            lease,
            lock_key,
            spend_key,
            _keepers,
            stop: _,
            _stopping,
            _counted,
        } = self;
        drop(_keepers);
        release(store, &spend_key, &lease).await;
        release(store, &lock_key, &lease).await;
        answer
    }
}

impl Job {
    /// Writes `answer` onto `current`. When the store failed, or other writes of the session
    /// came first at every attempt, a refresh's answer is kept in `memory` (with this job's
    /// lease, which then stays held) and saved later: the request gets the store's error, or,
    /// when only other writes came in between, the answer's access token, which is as good
    /// as saved.
    pub(super) async fn save(
        &self,
        memory: &mut RefreshMemory,
        current: OpenSession,
        answer: Answer,
    ) -> Result<String, RefreshError> {
        let token = answer.tokens.access_token.clone();
        let written = match self.write(current, &answer).await {
            Ok(Saved::Written) => return Ok(token),
            Ok(Saved::Contended) => Ok(token),
            Err(RefreshError::Store(error)) => Err(RefreshError::Store(error)),
            Err(other) => return Err(other),
        };
        let Some(spent) = answer.spent.as_deref() else {
            // A token exchange spent nothing: its token serves this request, and the next
            // exchange gets another.
            return written;
        };
        match &written {
            Err(error) => tracing::warn!(
                %error,
                "the store failed while saving a refresh; the answer is kept and saved when the \
                 store is back"
            ),
            Ok(_) => tracing::warn!(
                "the session kept changing while saving a refresh; the answer is kept and saved \
                 again shortly"
            ),
        }
        let store = self.sessions.store();
        let spend = self.sessions.spend_key(&self.loaded, spent);
        let keepers = [
            (self.lock_key.as_str(), LEASE),
            (spend.as_str(), self.spend_lasts()),
        ]
        .map(|(key, lasts)| {
            Keeper::start(store.clone(), key, &self.lease, lasts, self.keep_saving_for)
        });
        let stop = CancellationToken::new();
        memory.unsaved = Some(Unsaved {
            answer,
            lease: self.lease.clone(),
            lock_key: self.lock_key.clone(),
            spend_key: spend,
            _keepers: keepers,
            _stopping: stop.clone().drop_guard(),
            stop,
            _counted: UNSAVED.count(),
        });
        written
    }

    /// Whether `memory` holds this job's own unsaved answer.
    pub(super) fn kept_unsaved(&self, memory: &RefreshMemory) -> bool {
        memory
            .unsaved
            .as_ref()
            .is_some_and(|u| u.is_of(&self.lease))
    }

    /// Saves the session's unsaved answer, if there is one, and releases its lease and its spend
    /// record. Keeps it while the store fails or other writes keep coming first (then a 503:
    /// its refresh token is spent, and no grant may follow it); revokes and drops it when the
    /// session has ended meanwhile.
    pub(super) async fn save_unsaved(
        &self,
        memory: &mut RefreshMemory,
    ) -> Result<(), RefreshError> {
        let Some(unsaved) = memory.unsaved.take() else {
            return Ok(());
        };
        let written = match self.reload(&self.loaded).await {
            Ok(current) => self.write(current, &unsaved.answer).await,
            Err(error) => Err(error),
        };
        let written = match written {
            Ok(Saved::Contended) => {
                // Still unsaved: its refresh token must not be presented again meanwhile.
                memory.unsaved = Some(unsaved);
                let reason = TokenUnavailable::SpendInProgress;
                return Err(RefreshError::Unavailable { reason });
            }
            Err(RefreshError::Store(error)) => {
                memory.unsaved = Some(unsaved);
                return Err(RefreshError::Store(error));
            }
            other => other.map(drop),
        };
        let answer = unsaved.let_go(self.sessions.store()).await;
        match &written {
            Ok(()) => tracing::info!("a refresh the store had failed to save is saved"),
            Err(RefreshError::Ended) => revoke_answer(&self.oidc, &answer).await,
            Err(_) => {}
        }
        written
    }

    /// After this job's answer was kept unsaved (and the waiting request answered): tries the
    /// save again with growing pauses for `keep_saving_for` ([`KEEP_SAVING_FOR`]), while the
    /// [`Unsaved`] answer's keepers hold the lease and the spend record so that no replica
    /// spends the refresh token again. The queue is let go between attempts: requests of the
    /// session then try the save themselves, and answer 503 while the store is down rather
    /// than wait for this task; a logout here takes the answer and revokes it. Given up, it
    /// leaves the answer to the session's next refresh here and a watch of the session's end
    /// ([`super::orphan`]).
    pub(super) async fn keep_saving(&self, memory: OwnedMutexGuard<RefreshMemory>) {
        let queue = OwnedMutexGuard::mutex(&memory).clone();
        drop(memory);
        let until = Instant::now() + self.keep_saving_for;
        let mut pause = FIRST_PAUSE;
        while Instant::now() < until {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
            let mut memory = queue.lock().await;
            if !self.kept_unsaved(&memory) {
                return; // a request's refresh saved it
            }
            // Kept again only while the store fails or the session keeps changing.
            let _ = self.save_unsaved(&mut memory).await;
            if !self.kept_unsaved(&memory) {
                return;
            }
        }
        tracing::warn!(
            "the store did not take a refreshed session for {:?}; the answer stays in memory \
             for the session's next refresh on this instance, and is revoked if the session ends",
            self.keep_saving_for
        );
        let memory = queue.lock().await;
        let Some(unsaved) = memory.unsaved.as_ref().filter(|u| u.is_of(&self.lease)) else {
            return;
        };
        let stop = unsaved.stop.clone();
        drop(memory);
        Orphan {
            sessions: self.sessions.clone(),
            oidc: self.oidc.clone(),
            clock: self.clock.clone(),
            loaded: self.loaded.clone(),
            memory: queue,
            memories: self.memories.clone(),
            lease: self.lease.clone(),
            stop,
            ended_check: self.ended_check,
        }
        .watch();
    }

    /// Writes the answer of a grant, all of it or nothing: the access token under its key, a
    /// rotated refresh token, and a validated ID token with the claims it brings (replacing the
    /// previous ones). Other writes (idle-timeout touches) that came in between are re-read and
    /// the answer applied again, [`SAVE_ATTEMPTS`] times at most: `Contended` when they came
    /// first every time, and the answer is to be kept ([`Job::save`]). A refresh whose `spent`
    /// token was already replaced in the store (another holder of a lost lease saved first)
    /// does not overwrite that one (`Written`: there is nothing of it to keep).
    async fn write(&self, current: OpenSession, answer: &Answer) -> Result<Saved, RefreshError> {
        let Answer {
            key,
            tokens,
            update,
            spent,
            at,
            rotation_only,
        } = answer;
        let lifetime = tokens.lifetime();
        if lifetime <= self.skew && !SKEW_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                lifetime_s = lifetime,
                "oidc.refresh_skew is not shorter than the access token lifetime: tokens are \
                 refreshed at half their lifetime instead; lower refresh_skew"
            );
        }
        let apply = |session: &mut Session| {
            if let (true, Some(rotated)) = (rotation_only, &tokens.refresh_token) {
                session.refresh_token = Some(rotated.clone());
                return;
            }
            session.tokens.insert(
                key.clone(),
                AccessToken {
                    value: tokens.access_token.clone(),
                    expires_at: at + lifetime,
                    issued_at: *at,
                    scope: tokens.scope.clone(),
                    jkt: tokens.jkt.clone(),
                },
            );
            if let Some(rotated) = &tokens.refresh_token {
                session.refresh_token = Some(rotated.clone());
            }
            update.apply(session, tokens.id_token.as_deref());
        };
        let mut base = current;
        for _ in 0..SAVE_ATTEMPTS {
            if spent.is_some() && base.session.refresh_token != *spent {
                tracing::warn!("another refresh of this session was saved first; its tokens stand");
                return Ok(Saved::Written);
            }
            let mut session = Session::clone(&base.session);
            apply(&mut session);
            match self.sessions.save(&base, session, self.clock.now()).await {
                Ok(true) => return Ok(Saved::Written),
                Ok(false) => {}
                Err(e) => return Err(RefreshError::Store(e)),
            }
            base = self.reload(&base).await?;
        }
        Ok(Saved::Contended)
    }
}

/// Revokes what a refresh's answer brought once it can no longer be saved: its session ended
/// while it waited unsaved. A logout then (on any replica) revoked only the refresh token the
/// session held, the spent one; the rotated one, held nowhere else, would stay valid at the
/// provider until it expires. An opaque access token goes too, as a logout's does.
async fn revoke_answer(oidc: &Oidc, answer: &Answer) {
    let tokens = &answer.tokens;
    if let Some(rotated) = tokens.refresh_token.as_deref()
        && answer.spent.as_deref() != Some(rotated)
    {
        oidc.revoke(rotated, "refresh_token").await;
    }
    if !answer.rotation_only && !crate::jose::looks_like_jwt(&tokens.access_token) {
        oidc.revoke(&tokens.access_token, "access_token").await;
    }
    tracing::info!(
        "the session ended before a refresh's answer could be saved; its tokens are revoked"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long outage with many users keeps many answers (nothing drops them): they are counted
    /// while they wait, a warning stands once more than the bound do, and it is armed again
    /// once they fell to half of it.
    #[test]
    fn answers_kept_unsaved_are_counted_and_warned_about_past_the_bound() {
        let tally: &'static Tally = Box::leak(Box::new(Tally::new(4)));
        let mut kept: Vec<_> = (0..4).map(|_| tally.count()).collect();
        assert_eq!(tally.read(), (4, false));
        kept.push(tally.count());
        assert_eq!(tally.read(), (5, true), "no warning past the bound");
        kept.truncate(3);
        assert_eq!(tally.read(), (3, true), "warned again while still many");
        kept.truncate(2);
        assert_eq!(tally.read(), (2, false), "the warning is not armed again");
        drop(kept);
        assert_eq!(tally.read(), (0, false), "answers gone are still counted");
    }
}
