//! A refresh's answer that its refresh task gave up saving ([`super::save::KEEP_SAVING_FOR`]):
//! kept in the refresh memory until the session's next refresh here saves it, and watched
//! meanwhile so that it is revoked and forgotten once its session ends.
//!
//! The answer holds the provider's only copy of the rotated refresh token. A session ends by
//! many paths — a logout or a back-channel logout, "sign out everywhere", the end of one of its
//! sessions, a login past `max_per_user`, on this instance or another, or its idle or absolute
//! timeout — and only a logout here looked at the memory ([`super::Tokens::forget_ended`]).
//! Every other end would leave the token valid at the provider until it expires, and the answer
//! in memory for the life of the process. One watch covers them all: every end is a session
//! gone from the store, announced on the session's invalidation channel from every instance
//! (a timeout, announced by nothing, is caught by a read every [`ENDED_CHECK`]).
//!
//! Bounded: one task and one session watch per answer given up on, none for anything else;
//! the task ends when the answer leaves the memory by any path ([`Orphan::stop`]).

use super::RefreshMemory;
use super::save::Unsaved;
use crate::clock::Clock;
use crate::oidc::Oidc;
use crate::session::manager::{OpenSession, Sessions, Woken};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a session with an answer given up on is read again, for the idle and absolute
/// timeouts, which no message announces. Slow: an outage this long is rare, and the tokens
/// at stake outlive it.
pub(super) const ENDED_CHECK: Duration = Duration::from_secs(60);

/// Per session: what this process remembers of its refreshes ([`super::Tokens`]'s map).
pub(super) type Memories = Mutex<HashMap<String, Arc<tokio::sync::Mutex<RefreshMemory>>>>;

/// An answer given up on, and what is needed to revoke it once its session ends.
pub(super) struct Orphan {
    pub(super) sessions: Arc<Sessions>,
    pub(super) oidc: Arc<Oidc>,
    pub(super) clock: Clock,
    pub(super) loaded: OpenSession,
    /// The session's refresh memory, which holds the answer, and the map that holds it.
    pub(super) memory: Arc<tokio::sync::Mutex<RefreshMemory>>,
    pub(super) memories: Arc<Memories>,
    /// The lease of the refresh that got the answer: it names the answer in the memory.
    pub(super) lease: String,
    /// Cancelled when the answer leaves the memory by another path (saved, or revoked by a
    /// logout here or by the refresh that found the session ended): the watch has nothing left
    /// to do ([`Unsaved`] holds the guard).
    pub(super) stop: CancellationToken,
    /// How often the session is read: [`ENDED_CHECK`] (shorter in tests).
    pub(super) ended_check: Duration,
}

impl Orphan {
    /// Watches the session in a task of its own, not tracked by the refreshes a shutdown waits
    /// for: it lasts as long as the answer waits, which may be the life of the process.
    pub(super) fn watch(self) {
        use tracing::instrument::WithSubscriber;
        tokio::spawn(self.until_ended().with_current_subscriber());
    }

    /// Waits until the session is found gone from the store (an unreachable store ends
    /// nothing), then takes the answer out of the memory and revokes it.
    async fn until_ended(self) {
        let mut changed = self.sessions.watch(self.loaded.handle);
        // Its first tick is at once: the session may have ended before the watch began.
        let mut check = tokio::time::interval(self.ended_check);
        loop {
            let turn = tokio::select! {
                () = self.stop.cancelled() => return,
                woken = changed.changed() => match woken {
                    Woken::Read(turn) => Some(turn),
                    Woken::Ended => break,
                },
                _ = check.tick() => None,
            };
            let read = self.sessions.reload(&self.loaded, self.clock.now()).await;
            if let Some(turn) = turn {
                turn.done();
            }
            if let Ok(None) = read {
                changed.wake_session();
                break;
            }
        }
        drop(changed);
        if let Some(unsaved) = self.take().await {
            unsaved.revoke(self.sessions.store(), &self.oidc).await;
        }
    }

    /// Takes the answer out of the memory, and the memory out of the map. A refresh of the
    /// session holding the memory meanwhile saves the answer first, finds the session ended
    /// and revokes it itself: then there is nothing to take.
    async fn take(&self) -> Option<Unsaved> {
        let mut held = tokio::select! {
            () = self.stop.cancelled() => return None,
            held = self.memory.lock() => held,
        };
        if !held.unsaved.as_ref().is_some_and(|u| u.is_of(&self.lease)) {
            return None;
        }
        let unsaved = held.unsaved.take();
        forget(&self.memories, &self.loaded.handle, &self.memory);
        unsaved
    }
}

/// Removes `handle`'s entry from `memories` if it still is `memory`: a request that read the
/// session before it ended and queues for its refresh makes a memory of its own, and finds the
/// session ended.
pub(super) fn forget(
    memories: &Memories,
    handle: &str,
    memory: &Arc<tokio::sync::Mutex<RefreshMemory>>,
) {
    let mut map = memories.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(handle).is_some_and(|m| Arc::ptr_eq(m, memory)) {
        map.remove(handle);
    }
}
