//! Session stores: versioned opaque records, indexes whose members expire, one-time markers,
//! lease locks and pub/sub, in process memory or in Redis, behind one enum.
//!
//! A store sees only bytes the manager has already encrypted, and key names the manager has already
//! hashed. It never decides what a session is. Errors are always [`StoreError`]: a store that cannot
//! be reached says so (`Unavailable`) and never reports "no such key" instead, so a transient
//! outage can never end a session.

mod channel;
mod memory;
mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub(crate) use self::channel::Channel;
pub use self::channel::{Freshness, Proof, Subscription};
pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

pub use crate::config::StoreConfig;

/// A payload delivered to subscribers after the store may have missed messages (for example after
/// the Redis pub/sub connection was re-established): drop everything derived from the channel.
/// Publishers must not send it themselves.
pub const RESYNC: &str = "";

/// Default size of a memory store.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// DER certificates as one PEM bundle (what the Redis client reads its roots from).
pub(crate) fn pem_certificates(certs: &[rustls_pki_types::CertificateDer<'static>]) -> Vec<u8> {
    use base64::Engine;
    let mut out = String::new();
    for cert in certs {
        let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// Hides the user-info part (`user:password@`) of a URL.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error, Clone)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; retry later, keep the session.
    #[error("session store unavailable: {0}")]
    Unavailable(Outage),
    /// A key holds something this code did not write.
    #[error("session store holds an unexpected value: {0}")]
    Corrupt(Corruption),
    /// The configuration cannot work.
    #[error("session store configuration: {0}")]
    Config(Misconfiguration),
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum Outage {
    /// `[session.redis] timeout` passed, waiting for a reconnect included.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("PING was not answered with PONG")]
    UnexpectedPing,
    /// Redis received the command and answered it with an error instead of carrying it out:
    /// out of memory (`-OOM`, which refuses only what adds data: deletes still run), a
    /// read-only replica, loading its data, busy with a script, or a failed snapshot. Not lost
    /// on the way: a single command answered so was not carried out.
    #[error("refused: {0}")]
    Refused(Arc<::redis::RedisError>),
    #[error(transparent)]
    Redis(Arc<::redis::RedisError>),
}

/// What the store holds that this code did not write.
#[derive(Debug, thiserror::Error, Clone)]
pub enum Corruption {
    /// A key written as one kind (record, set, lock) read as another.
    #[error("a key holds another kind of value")]
    WrongType,
    /// A record with a version but no value, or the reverse.
    #[error("a record is incomplete")]
    Incomplete,
    /// A fresh random session id was already taken.
    #[error("session id collision")]
    IdCollision,
    #[error(transparent)]
    Redis(Arc<::redis::RedisError>),
}

/// A store configuration that cannot work.
#[derive(Debug, thiserror::Error, Clone)]
pub enum Misconfiguration {
    #[error("choose either sentinel or cluster, not both")]
    SentinelAndCluster,
    #[error("the sentinel node list is empty")]
    NoSentinels,
    #[error("a CA file is not supported with sentinel yet")]
    SentinelWithCaFile,
    #[error(transparent)]
    Redis(Arc<::redis::RedisError>),
}

/// A stored value and its version (1 when created, +1 on every successful compare-and-set).
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub version: u64,
    pub value: Vec<u8>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Record {{ version: {}, value: <{} bytes> }}",
            self.version,
            self.value.len()
        )
    }
}

/// A session store. Cheap to clone; clones share the same data and connections.
#[derive(Clone, Debug)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// The methods of [`Store`] that only hand the call to the backend: each is written once, as
/// the signature it has in both backends (`Result<_, StoreError>` and `async` are added).
macro_rules! delegate {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        $(
            $(#[$doc])*
            pub async fn $name(&self, $($arg: $ty),*) -> Result<$out, StoreError> {
                match self {
                    Store::Memory(s) => s.$name($($arg),*).await,
                    // Boxed: a Redis call's future is some 4 KiB, and every future that may
                    // await one (a request's, on every route) would carry that size and be
                    // copied whole when moved; the box is paid only with the network call.
                    Store::Redis(s) => crate::reply::in_box(|| s.$name($($arg),*)).await,
                }
            }
        )*
    };
}

impl Store {
    /// Builds the store. A Redis store connects lazily: an unreachable server is not an error
    /// here (see [`Store::ping`]), a malformed URL is.
    /// `max_entries` sizes a memory store.
    pub async fn connect(config: &StoreConfig, max_entries: usize) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Memory => Ok(Store::Memory(MemoryStore::new(max_entries))),
            StoreConfig::Redis(redis) => Ok(Store::Redis(RedisStore::connect(redis).await?)),
        }
    }

    /// Warns, once Redis answers, if it may evict keys when full (its `maxmemory-policy`), which
    /// would drop sessions and refresh leases; a Redis that does not tell is not warned about.
    /// Asked in a task of its own; nothing to ask of the memory store.
    pub fn check_eviction(&self) {
        if let Store::Redis(s) = self {
            s.check_eviction();
        }
    }

    /// A handle for one serving worker (a single-threaded runtime): the same data, but on a
    /// standalone Redis server a connection of its own, so that the worker's commands and their
    /// answers stay on its thread. The memory store has no connections: a plain clone.
    pub fn for_worker(&self) -> Store {
        match self {
            Store::Memory(s) => Store::Memory(s.clone()),
            Store::Redis(s) => Store::Redis(s.for_worker()),
        }
    }

    delegate! {
        fn get(key: &str) -> Option<Record>;

        /// The record's version alone (its value stays in the store): every change bumps it, so
        /// for a key never created twice an equal version is the value read before.
        fn version(key: &str) -> Option<u64>;

        /// Creates `key` at version 1; `false` if it already exists.
        fn put_new(key: &str, value: &[u8], ttl: Duration) -> bool;

        /// Atomically replaces the value if the stored version is `expected_version`, bumping it.
        fn compare_and_set(key: &str, expected_version: u64, value: &[u8], ttl: Duration) -> bool;

        /// Sets a new time to live; `false` if the key does not exist.
        fn touch(key: &str, ttl: Duration) -> bool;

        /// `true` if the key existed.
        fn delete(key: &str) -> bool;

        /// Deletes the record if its version is still `version`; `false` when it is not (a write
        /// came in between) or the record does not exist.
        fn delete_at(key: &str, version: u64) -> bool;

        /// [`Store::compare_and_set`] that, when it writes, publishes `payload` on
        /// `channel_suffix` in the same step (see [`Store::publish`]): no write goes
        /// unannounced, whatever happens to the connection or the process after it.
        fn compare_and_set_announced(
            key: &str,
            expected_version: u64,
            value: &[u8],
            ttl: Duration,
            channel_suffix: &str,
            payload: &str
        ) -> bool;

        /// [`Store::delete`] that publishes `payload` on `channel_suffix` in the same step,
        /// also when the key was gone.
        fn delete_announced(key: &str, channel_suffix: &str, payload: &str) -> bool;

        /// [`Store::delete_at`] that, when it deletes, publishes `payload` on `channel_suffix`
        /// in the same step.
        fn delete_at_announced(
            key: &str,
            version: u64,
            channel_suffix: &str,
            payload: &str
        ) -> bool;

        /// Adds `member` to an index until `deadline`, and in the same step removes every
        /// member whose deadline is at or before `now` (both Unix seconds, the caller's clock,
        /// which the manager sets back by a margin for other replicas' clocks); the index lives
        /// until its latest deadline as `now` counts. Returns how many members it then holds.
        fn index_add(index_key: &str, member: &str, deadline: u64, now: u64) -> u64;

        /// An index's members with their deadlines, soonest deadline first.
        fn index_members(index_key: &str) -> Vec<(String, u64)>;

        fn index_remove(index_key: &str, member: &str) -> ();

        /// The members of an index in the format before deadlines (a plain Redis set), still
        /// read until the last ones expire ([`Store::index_add`] writes new names).
        fn old_index_members(index_key: &str) -> Vec<String>;

        /// Takes a member out of an index in the format before deadlines.
        fn old_index_remove(index_key: &str, member: &str) -> ();

        /// Whether `key` holds anything (that has not expired).
        fn exists(key: &str) -> bool;

        /// `true` the first time `key` is seen within `ttl` (replay detection).
        fn remember_once(key: &str, ttl: Duration) -> bool;

        /// Whether `key` was remembered ([`Store::remember_once`]) and has not expired.
        fn remembered(key: &str) -> bool;

        /// Takes the lease `key` for `token` if nobody holds it.
        fn try_lock(key: &str, token: &str, lease: Duration) -> bool;

        /// Renews the lease if `token` still holds it.
        fn extend_lock(key: &str, token: &str, lease: Duration) -> bool;

        /// Shortens the lease `key` to `to` if it has less than `below` left (whoever holds it
        /// has not renewed it lately) and more than `to`; `true` if it did. Never lengthens a
        /// lease, never takes one.
        fn shorten_lock(key: &str, below: Duration, to: Duration) -> bool;

        /// Releases the lease if `token` still holds it (compare-and-delete).
        fn unlock(key: &str, token: &str) -> ();

        /// Sends `payload` to every subscriber of `channel_suffix`, on every instance.
        fn publish(channel_suffix: &str, payload: &str) -> ();

        /// Readiness: `Ok` when the store answers.
        fn ping() -> ();
    }

    /// Receives what is published on `channel_suffix` from now on, by any instance. A lagging
    /// receiver or [`RESYNC`] means messages may have been lost.
    pub fn subscribe(&self, channel_suffix: &str) -> Subscription {
        match self {
            Store::Memory(s) => s.subscribe(channel_suffix),
            Store::Redis(s) => s.subscribe(channel_suffix),
        }
    }

    /// Whether messages published from now on reach the receivers of [`Store::subscribe`]: `false` while the
    /// Redis pub/sub connection is lost (what is derived from the channels may then be stale).
    pub fn subscription_live(&self) -> watch::Receiver<bool> {
        match self {
            Store::Memory(_) => watch::channel(true).1,
            Store::Redis(s) => s.subscription_live(),
        }
    }

    /// How many operations have found the store unavailable so far (never, in memory).
    pub fn outages(&self) -> u64 {
        match self {
            Store::Memory(_) => 0,
            Store::Redis(s) => s.outages(),
        }
    }

    /// How recently the messages of [`Store::subscribe`] were shown to be delivered.
    pub fn freshness(&self) -> Freshness {
        match self {
            Store::Memory(_) => Freshness::Immediate,
            Store::Redis(s) => s.freshness(),
        }
    }
}

/// Milliseconds of a time to live, at least 1 (stores reject 0).
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_redis_config_hides_passwords() {
        use crate::config::{RedisConfig, Secret, SentinelConfig};
        let config = StoreConfig::Redis(RedisConfig {
            url: Secret::new("rediss://user:hunter2@redis:6380/0"),
            sentinel: Some(SentinelConfig {
                master: "m".into(),
                nodes: vec![Secret::new("redis://:s3cret@s1:26379")],
            }),
            cluster: vec![Secret::new("redis://:pw-c@n1:6379")],
            key_prefix: "v:".into(),
            timeout: Duration::from_secs(1),
            ca_file: None,
        });
        let text = format!("{config:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret") && !text.contains("pw-c"),
            "{text}"
        );
        assert!(text.contains("url: [redacted]"), "{text}");
    }

    #[test]
    fn zero_ttl_becomes_one_millisecond() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_secs(2)), 2000);
    }
}
