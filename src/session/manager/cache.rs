//! A short-lived, in-process cache of opened sessions, keyed by handle.
//!
//! It saves a store round trip and a decryption per request. Every write on any instance publishes
//! the session's handle; pending messages are drained before each lookup, so an instance forgets a
//! session as soon as the message arrives. A lagging receiver or a `RESYNC` empties the cache, and
//! no entry outlives its time to live even if messages are lost. While the store says its
//! subscription is down (`live` is `false`), messages cannot arrive at all: the cache then holds
//! nothing and every lookup goes to the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::session::model::Session;

/// Entries kept before expired ones are swept (and, if that is not enough, all are dropped).
const MAX_ENTRIES: usize = 10_000;

pub(super) struct Cache {
    ttl: Duration,
    /// Whether invalidation messages are being delivered.
    live: watch::Receiver<bool>,
    state: Mutex<State>,
}

struct State {
    entries: HashMap<String, Entry>,
    invalidations: broadcast::Receiver<String>,
}

struct Entry {
    stored: Instant,
    version: u64,
    /// Shared with the requests that read it: a hit costs a reference count, not a copy.
    session: Arc<Session>,
}

impl Cache {
    pub(super) fn new(
        ttl: Duration,
        invalidations: broadcast::Receiver<String>,
        live: watch::Receiver<bool>,
    ) -> Cache {
        Cache {
            ttl,
            live,
            state: Mutex::new(State {
                entries: HashMap::new(),
                invalidations,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.drain();
        if !*self.live.borrow() {
            state.entries.clear();
        }
        state
    }

    pub(super) fn get(&self, handle: &str) -> Option<(u64, Arc<Session>)> {
        let state = self.state();
        let entry = state.entries.get(handle)?;
        (entry.stored.elapsed() < self.ttl).then(|| (entry.version, entry.session.clone()))
    }

    pub(super) fn put(&self, handle: &str, version: u64, session: &Arc<Session>) {
        let mut state = self.state();
        if !*self.live.borrow() {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            state
                .entries
                .retain(|_, entry| entry.stored.elapsed() < ttl);
            if state.entries.len() >= MAX_ENTRIES {
                state.entries.clear();
            }
        }
        let entry = Entry {
            stored: Instant::now(),
            version,
            session: session.clone(),
        };
        state.entries.insert(handle.to_owned(), entry);
    }

    pub(super) fn remove(&self, handle: &str) {
        self.state().entries.remove(handle);
    }
}

impl State {
    fn drain(&mut self) {
        loop {
            match self.invalidations.try_recv() {
                Ok(handle) if handle.is_empty() => self.entries.clear(),
                Ok(handle) => {
                    self.entries.remove(&handle);
                }
                Err(TryRecvError::Lagged(_)) => self.entries.clear(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn session() -> Arc<Session> {
        Arc::new(Session {
            sub: "u".into(),
            ..Session::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let (_tx, rx) = broadcast::channel(4);
        let cache = Cache::new(Duration::from_secs(1), rx, watch::channel(true).1);
        cache.put("h", 3, &session());
        assert_eq!(cache.get("h").map(|(v, _)| v), Some(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get("h").is_none());
    }

    #[test]
    fn messages_remove_entries_and_resync_or_lag_clears_all() {
        let (tx, rx) = broadcast::channel(2);
        let cache = Cache::new(Duration::from_secs(60), rx, watch::channel(true).1);
        cache.put("a", 1, &session());
        cache.put("b", 1, &session());
        tx.send("a".into()).unwrap();
        assert!(cache.get("a").is_none() && cache.get("b").is_some());
        tx.send(String::new()).unwrap();
        assert!(cache.get("b").is_none());
        cache.put("c", 1, &session());
        for _ in 0..5 {
            tx.send("unrelated".into()).unwrap();
        }
        assert!(
            cache.get("c").is_none(),
            "a lagged receiver drops everything"
        );
    }

    #[test]
    fn nothing_is_cached_while_messages_cannot_arrive() {
        let (_tx, rx) = broadcast::channel(4);
        let (live, watching) = watch::channel(true);
        let cache = Cache::new(Duration::from_secs(60), rx, watching);
        cache.put("kept", 1, &session());
        live.send_replace(false);
        assert!(
            cache.get("kept").is_none(),
            "dropped when the subscription is lost"
        );
        cache.put("new", 1, &session());
        assert!(cache.get("new").is_none(), "not refilled until it is back");
        live.send_replace(true);
        assert!(
            cache.get("kept").is_none(),
            "what was dropped stays dropped"
        );
        cache.put("new", 2, &session());
        assert_eq!(cache.get("new").map(|(v, _)| v), Some(2));
    }
}
