//! The in-process store for a single instance: a map with expiry, swept on every access, bounded
//! by `max_entries` (the entry that would expire soonest is evicted first).
//!
//! Each kind of entry has its own part of that bound (`state.rs`): records, one-time markers
//! (login states, logout-token `jti`s, which anonymous callers can make the store write), index
//! members and refresh leases hold at most `max_entries` each, and none pushes out another kind:
//! a flood of markers or of index members can never push out a session, and nothing pushes out a
//! lease that is held (a full part of leases refuses a new one). Pub/sub reaches only subscribers
//! in this process, which is all there is when sessions live here.

mod state;

use std::collections::HashMap;
#[cfg(test)]
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use self::state::{Entry, Kind, State, expiry_after};
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
    /// Tests only: holds the next `get` or `version` after it has read, until the test lets
    /// it answer.
    #[cfg(test)]
    held_get: Mutex<Option<HeldGet>>,
    /// Tests only: how many `get`s and `version`s have read.
    #[cfg(test)]
    record_reads: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    version_reads: std::sync::atomic::AtomicUsize,
    /// Tests only: how many of the next compare-and-sets find another write came first.
    #[cfg(any(test, feature = "test-support"))]
    lost_writes: std::sync::atomic::AtomicUsize,
}

/// The two ends a test holds a `get` with: told when it has read, it answers when let go.
#[cfg(test)]
struct HeldGet {
    read: tokio::sync::oneshot::Sender<()>,
    go: tokio::sync::oneshot::Receiver<()>,
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
                #[cfg(test)]
                record_reads: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(test)]
                version_reads: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(any(test, feature = "test-support"))]
                lost_writes: std::sync::atomic::AtomicUsize::new(0),
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
            expires_at: expiry_after(ttl),
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
            self.inner.record_reads.fetch_add(1, Ordering::Relaxed);
            self.held().await;
        }
        read
    }

    /// The version of the record at `key`, without its value.
    pub async fn version(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let read = match self.state().get_mut(key) {
            None => Ok(None),
            Some(Entry {
                kind: Kind::Record(record),
                ..
            }) => Ok(Some(record.version)),
            Some(_) => Err(wrong_type()),
        };
        #[cfg(test)]
        {
            self.inner.version_reads.fetch_add(1, Ordering::Relaxed);
            self.held().await;
        }
        read
    }

    /// Tests only: a read held by [`MemoryStore::hold_next_get`] waits here.
    #[cfg(test)]
    async fn held(&self) {
        let held = self.inner.held_get.lock().ok().and_then(|mut h| h.take());
        if let Some(HeldGet { read, go }) = held {
            let _ = read.send(());
            let _ = go.await;
        }
    }

    /// Tests only: how many records (`get`) have been read.
    #[cfg(test)]
    pub fn record_reads(&self) -> usize {
        self.inner.record_reads.load(Ordering::Relaxed)
    }

    /// Tests only: how many versions alone (`version`) have been read.
    #[cfg(test)]
    pub fn version_reads(&self) -> usize {
        self.inner.version_reads.load(Ordering::Relaxed)
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

    /// Tests only: each of the next `n` compare-and-sets of a record finds it written by someone
    /// else just before (its version moved on, its value the same, as an idle-timeout touch of
    /// another request leaves it) and loses.
    #[cfg(any(test, feature = "test-support"))]
    pub fn lose_next_writes(&self, n: usize) {
        self.inner
            .lost_writes
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Tests only: whether this compare-and-set is one [`MemoryStore::lose_next_writes`] made lose.
    #[cfg(any(test, feature = "test-support"))]
    fn loses(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let lost = &self.inner.lost_writes;
        lost.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
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
        #[cfg(any(test, feature = "test-support"))]
        if version == expected_version && self.loses() {
            if let Some(Entry {
                kind: Kind::Record(record),
                ..
            }) = state.get_mut(key)
            {
                record.version = version.saturating_add(1);
            }
            return Ok(false);
        }
        if version != expected_version {
            return Ok(false);
        }
        let record = Record {
            version: version.saturating_add(1),
            value: value.to_vec(),
        };
        let entry = Entry {
            expires_at: expiry_after(ttl),
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
        state.set_expiry(key, expiry_after(ttl));
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
        deadline: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        let mut state = self.state();
        if let Some(entry) = state.get_mut(index_key)
            && !matches!(entry.kind, Kind::Index(_))
        {
            return Err(wrong_type());
        }
        let held = state.index_add(index_key, member, (deadline, now), self.inner.max_entries);
        Ok(u64::try_from(held).unwrap_or(u64::MAX))
    }

    pub async fn index_members(&self, index_key: &str) -> Result<Vec<(String, u64)>, StoreError> {
        match self.state().get_mut(index_key) {
            None => Ok(Vec::new()),
            Some(Entry {
                kind: Kind::Index(index),
                ..
            }) => Ok(index.ranked()),
            Some(_) => Err(wrong_type()),
        }
    }

    pub async fn index_remove(&self, index_key: &str, member: &str) -> Result<(), StoreError> {
        let mut state = self.state();
        match state.get_mut(index_key) {
            None
            | Some(Entry {
                kind: Kind::Index(_),
                ..
            }) => {
                state.index_remove(index_key, member);
                Ok(())
            }
            Some(_) => Err(wrong_type()),
        }
    }

    /// Indexes of the format before deadlines live only in a store that outlives the process:
    /// a memory store never holds one.
    pub async fn old_index_members(&self, _index_key: &str) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    pub async fn old_index_remove(
        &self,
        _index_key: &str,
        _member: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.state().get_mut(key).is_some())
    }

    pub async fn remember_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.get_mut(key).is_some() {
            return Ok(false);
        }
        let entry = Entry {
            expires_at: expiry_after(ttl),
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
            expires_at: expiry_after(lease),
            kind: Kind::Lock(token.to_owned()),
        };
        // Never by evicting another: a lease pushed out from under its holder lets a second
        // refresh spend the same refresh token. The caller waits, as for a lease held.
        if state.full(&entry.kind, self.inner.max_entries) {
            return Ok(false);
        }
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
                state.set_expiry(key, expiry_after(lease));
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
        state.set_expiry(key, now.checked_add(to).unwrap_or(now));
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

    /// Tests only: drops the channel `channel_suffix` (its sender): its subscribers are told
    /// it is closed once they have taken in what was sent before. A later subscriber gets a
    /// new channel.
    #[cfg(test)]
    pub fn close_channel(&self, channel_suffix: &str) {
        let closed = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(channel_suffix);
        drop(closed);
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
