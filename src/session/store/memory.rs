//! The in-process store for a single instance: a map with expiry, swept on every access, bounded
//! by `max_entries` (the entry that would expire soonest is evicted first).
//!
//! Records, indexes and locks share that bound. One-time markers (login states, logout-token
//! `jti`s), which anonymous callers can make the store write, have a bound of their own (also
//! `max_entries`) and evict only other markers: a flood of them can never push out a session or
//! a refresh lock. Pub/sub reaches only subscribers in this process, which is all there is when
//! sessions live here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Corruption, Record, StoreError};

/// Messages buffered per channel for a slow subscriber before it sees `Lagged`.
const CHANNEL_CAPACITY: usize = 1024;

/// A store in this process's memory. Clones share the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryStore(max_entries: {})", self.inner.max_entries)
    }
}

struct Inner {
    max_entries: usize,
    state: Mutex<State>,
    channels: Mutex<HashMap<String, super::Channel>>,
    /// Tests only: holds the next `get` after it has read, until the test lets it answer.
    #[cfg(test)]
    held_get: Mutex<Option<HeldGet>>,
}

/// The two ends a test holds a `get` with: told when it has read, it answers when let go.
#[cfg(test)]
struct HeldGet {
    read: tokio::sync::oneshot::Sender<()>,
    go: tokio::sync::oneshot::Receiver<()>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Records, indexes and locks by expiry.
    by_expiry: BTreeSet<(Instant, String)>,
    /// Markers by expiry: their own partition of the bound.
    markers_by_expiry: BTreeSet<(Instant, String)>,
}

struct Entry {
    expires_at: Instant,
    kind: Kind,
}

enum Kind {
    Record(Record),
    Set(HashSet<String>),
    Marker,
    Lock(String),
}

impl State {
    fn sweep(&mut self, now: Instant) {
        for markers in [false, true] {
            while let Some((at, _)) = self.queue(markers).first() {
                if *at > now {
                    break;
                }
                if let Some((_, key)) = self.queue(markers).pop_first() {
                    self.entries.remove(&key);
                }
            }
        }
    }

    /// The expiry queue of markers, or of everything else.
    fn queue(&mut self, markers: bool) -> &mut BTreeSet<(Instant, String)> {
        if markers {
            &mut self.markers_by_expiry
        } else {
            &mut self.by_expiry
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.sweep(Instant::now());
        self.entries.get_mut(key)
    }

    /// Inserts `entry`, first evicting the entry of the same partition that expires soonest
    /// while that partition holds `max_entries`.
    fn insert(&mut self, key: &str, entry: Entry, max_entries: usize) {
        self.remove(key);
        let markers = matches!(entry.kind, Kind::Marker);
        while self.queue(markers).len() >= max_entries {
            match self.queue(markers).pop_first() {
                Some((_, evicted)) => {
                    self.entries.remove(&evicted);
                }
                None => break,
            }
        }
        self.queue(markers)
            .insert((entry.expires_at, key.to_owned()));
        self.entries.insert(key.to_owned(), entry);
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        let markers = matches!(entry.kind, Kind::Marker);
        self.queue(markers)
            .remove(&(entry.expires_at, key.to_owned()));
        Some(entry)
    }

    fn set_expiry(&mut self, key: &str, expires_at: Instant) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut entry.expires_at, expires_at);
        let markers = matches!(entry.kind, Kind::Marker);
        let queue = self.queue(markers);
        queue.remove(&(old, key.to_owned()));
        queue.insert((expires_at, key.to_owned()));
    }
}

fn wrong_type() -> StoreError {
    StoreError::Corrupt(Corruption::WrongType)
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                max_entries: max_entries.max(1),
                state: Mutex::new(State::default()),
                channels: Mutex::new(HashMap::new()),
                #[cfg(test)]
                held_get: Mutex::new(None),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than refusing service would.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, key: &str, kind: Kind, ttl: Duration) {
        let entry = Entry {
            expires_at: Instant::now() + ttl,
            kind,
        };
        self.state().insert(key, entry, self.inner.max_entries);
    }

    /// Number of live entries (sweeps first).
    pub fn len(&self) -> usize {
        let mut state = self.state();
        state.sweep(Instant::now());
        state.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let read = match self.state().get_mut(key) {
            None => Ok(None),
            Some(Entry {
                kind: Kind::Record(record),
                ..
            }) => Ok(Some(record.clone())),
            Some(_) => Err(wrong_type()),
        };
        #[cfg(test)]
        {
            let held = self.inner.held_get.lock().ok().and_then(|mut h| h.take());
            if let Some(HeldGet { read, go }) = held {
                let _ = read.send(());
                let _ = go.await;
            }
        }
        read
    }

    /// Tests only: the next `get` reads, says so on the first receiver, then waits for the
    /// second end to be sent to (or dropped) before it answers what it read.
    #[cfg(test)]
    pub fn hold_next_get(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (read, has_read) = tokio::sync::oneshot::channel();
        let (let_go, go) = tokio::sync::oneshot::channel();
        if let Ok(mut held) = self.inner.held_get.lock() {
            *held = Some(HeldGet { read, go });
        }
        (has_read, let_go)
    }

    pub async fn put_new(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        if self.state().get_mut(key).is_some() {
            return Ok(false);
        }
        self.put(
            key,
            Kind::Record(Record {
                version: 1,
                value: value.to_vec(),
            }),
            ttl,
        );
        Ok(true)
    }

    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state();
        let version = match state.get_mut(key) {
            None => return Ok(false),
            Some(Entry {
                kind: Kind::Record(record),
                ..
            }) => record.version,
            Some(_) => return Err(wrong_type()),
        };
        if version != expected_version {
            return Ok(false);
        }
        let record = Record {
            version: version.saturating_add(1),
            value: value.to_vec(),
        };
        let entry = Entry {
            expires_at: Instant::now() + ttl,
            kind: Kind::Record(record),
        };
        state.insert(key, entry, self.inner.max_entries);
        Ok(true)
    }

    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.get_mut(key).is_none() {
            return Ok(false);
        }
        state.set_expiry(key, Instant::now() + ttl);
        Ok(true)
    }

    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut state = self.state();
        state.sweep(Instant::now());
        Ok(state.remove(key).is_some())
    }

    pub async fn delete_at(&self, key: &str, version: u64) -> Result<bool, StoreError> {
        let mut state = self.state();
        match state.get_mut(key) {
            None => return Ok(false),
            Some(Entry {
                kind: Kind::Record(record),
                ..
            }) => {
                if record.version != version {
                    return Ok(false);
                }
            }
            Some(_) => return Err(wrong_type()),
        }
        Ok(state.remove(key).is_some())
    }

    /// The process's subscribers are sent the message once the change is made (the lock let
    /// go): nothing else holds the data, so nothing can come between.
    pub async fn compare_and_set_announced(
        &self,
        key: &str,
        expected_version: u64,
        value: &[u8],
        ttl: Duration,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let written = self
            .compare_and_set(key, expected_version, value, ttl)
            .await?;
        if written {
            self.publish(channel_suffix, payload).await?;
        }
        Ok(written)
    }

    pub async fn delete_announced(
        &self,
        key: &str,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let removed = self.delete(key).await?;
        self.publish(channel_suffix, payload).await?;
        Ok(removed)
    }

    pub async fn delete_at_announced(
        &self,
        key: &str,
        version: u64,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let removed = self.delete_at(key, version).await?;
        if removed {
            self.publish(channel_suffix, payload).await?;
        }
        Ok(removed)
    }

    pub async fn index_add(
        &self,
        index_key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut state = self.state();
        let expires_at = Instant::now() + ttl;
        let current = match state.get_mut(index_key) {
            Some(Entry {
                kind: Kind::Set(members),
                expires_at: current,
            }) => {
                members.insert(member.to_owned());
                Some(*current)
            }
            Some(_) => return Err(wrong_type()),
            None => None,
        };
        match current {
            Some(current) if current >= expires_at => {}
            Some(_) => state.set_expiry(index_key, expires_at),
            None => {
                let members = HashSet::from([member.to_owned()]);
                let entry = Entry {
                    expires_at,
                    kind: Kind::Set(members),
                };
                state.insert(index_key, entry, self.inner.max_entries);
            }
        }
        Ok(())
    }

    pub async fn index_members(&self, index_key: &str) -> Result<Vec<String>, StoreError> {
        match self.state().get_mut(index_key) {
            None => Ok(Vec::new()),
            Some(Entry {
                kind: Kind::Set(members),
                ..
            }) => Ok(members.iter().cloned().collect()),
            Some(_) => Err(wrong_type()),
        }
    }

    pub async fn index_remove(&self, index_key: &str, member: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        let now_empty = match state.get_mut(index_key) {
            None => false,
            Some(Entry {
                kind: Kind::Set(members),
                ..
            }) => {
                members.remove(member);
                members.is_empty()
            }
            Some(_) => return Err(wrong_type()),
        };
        if now_empty {
            state.remove(index_key);
        }
        Ok(())
    }

    pub async fn remember_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.get_mut(key).is_some() {
            return Ok(false);
        }
        let entry = Entry {
            expires_at: Instant::now() + ttl,
            kind: Kind::Marker,
        };
        state.insert(key, entry, self.inner.max_entries);
        Ok(true)
    }

    pub async fn remembered(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.state().get_mut(key).is_some())
    }

    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.get_mut(key).is_some() {
            return Ok(false);
        }
        let entry = Entry {
            expires_at: Instant::now() + lease,
            kind: Kind::Lock(token.to_owned()),
        };
        state.insert(key, entry, self.inner.max_entries);
        Ok(true)
    }

    pub async fn extend_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state();
        match state.get_mut(key) {
            Some(Entry {
                kind: Kind::Lock(holder),
                ..
            }) if holder == token => {
                state.set_expiry(key, Instant::now() + lease);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub async fn shorten_lock(
        &self,
        key: &str,
        below: Duration,
        to: Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state();
        let now = Instant::now();
        let left = match state.get_mut(key) {
            Some(Entry {
                kind: Kind::Lock(_),
                expires_at,
            }) => expires_at.saturating_duration_since(now),
            _ => return Ok(false),
        };
        if left <= to || left >= below {
            return Ok(false);
        }
        state.set_expiry(key, now + to);
        Ok(true)
    }

    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        let held = matches!(state.get_mut(key), Some(Entry { kind: Kind::Lock(holder), .. }) if holder == token);
        if held {
            state.remove(key);
        }
        Ok(())
    }

    pub async fn publish(&self, channel_suffix: &str, payload: &str) -> Result<(), StoreError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(channel_suffix)
            && !channel.send(payload.to_owned())
        {
            channels.remove(channel_suffix);
        }
        Ok(())
    }

    pub fn subscribe(&self, channel_suffix: &str) -> super::Subscription {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        channels
            .entry(channel_suffix.to_owned())
            .or_insert_with(|| super::Channel::new(CHANNEL_CAPACITY))
            .subscribe()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn full_store_evicts_the_entry_expiring_soonest() {
        let store = MemoryStore::new(3);
        store.put_new("long", b"1", MINUTE * 10).await.unwrap();
        store.put_new("short", b"2", MINUTE).await.unwrap();
        store.put_new("middle", b"3", MINUTE * 5).await.unwrap();
        store.put_new("new", b"4", MINUTE * 2).await.unwrap();
        assert_eq!(store.len(), 3);
        assert!(store.get("short").await.unwrap().is_none());
        for key in ["long", "middle", "new"] {
            assert!(store.get(key).await.unwrap().is_some(), "{key}");
        }
    }

    #[tokio::test]
    async fn rewriting_a_key_does_not_evict_another() {
        let store = MemoryStore::new(2);
        store.put_new("a", b"1", MINUTE).await.unwrap();
        store.put_new("b", b"1", MINUTE).await.unwrap();
        assert!(store.compare_and_set("a", 1, b"2", MINUTE).await.unwrap());
        assert!(store.touch("b", MINUTE).await.unwrap());
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_without_being_read() {
        let store = MemoryStore::new(10);
        store
            .put_new("a", b"1", Duration::from_secs(1))
            .await
            .unwrap();
        store
            .remember_once("b", Duration::from_secs(1))
            .await
            .unwrap();
        store
            .index_add("c", "m", Duration::from_secs(1))
            .await
            .unwrap();
        store.put_new("d", b"1", MINUTE).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn index_lives_as_long_as_its_longest_member_asked() {
        let store = MemoryStore::new(10);
        store.index_add("i", "a", MINUTE * 2).await.unwrap();
        store.index_add("i", "b", MINUTE).await.unwrap();
        tokio::time::advance(MINUTE + Duration::from_secs(1)).await;
        assert_eq!(store.index_members("i").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_flood_of_markers_never_evicts_sessions_or_locks() {
        let store = MemoryStore::new(3);
        store.put_new("session", b"1", MINUTE).await.unwrap();
        store.index_add("index", "session", MINUTE).await.unwrap();
        assert!(
            store
                .try_lock("lock", "me", Duration::from_secs(5))
                .await
                .unwrap()
        );
        // Markers that outlive all three, as login markers outlive a refresh lease.
        for i in 0..100 {
            assert!(
                store
                    .remember_once(&format!("login:{i}"), MINUTE * 10)
                    .await
                    .unwrap()
            );
        }
        assert!(store.get("session").await.unwrap().is_some());
        assert_eq!(store.index_members("index").await.unwrap().len(), 1);
        assert!(!store.try_lock("lock", "other", MINUTE).await.unwrap());
        assert!(store.extend_lock("lock", "me", MINUTE).await.unwrap());
        // The markers are bounded too: the oldest went, the newest are remembered.
        assert_eq!(store.len(), 3 + 3);
        assert!(!store.remember_once("login:99", MINUTE).await.unwrap());
        assert!(store.remember_once("login:0", MINUTE).await.unwrap());
    }

    #[tokio::test]
    async fn using_a_key_as_the_wrong_kind_is_an_error() {
        let store = MemoryStore::new(10);
        store.index_add("i", "a", MINUTE).await.unwrap();
        assert!(matches!(store.get("i").await, Err(StoreError::Corrupt(_))));
    }
}
