//! Session stores: versioned opaque records, set indexes, one-time markers, lease locks and
//! pub/sub, in process memory or in Redis, behind one enum.
//!
//! A store sees only bytes the manager has already encrypted, and key names the manager has already
//! hashed. It never decides what a session is. Errors are always [`StoreError`]: a store that cannot
//! be reached says so (`Unavailable`) and never reports "no such key" instead, so a transient
//! outage can never end a session.

mod memory;
mod redis;

use std::fmt;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// A payload delivered to subscribers after the store may have missed messages (for example after
/// the Redis pub/sub connection was re-established): drop everything derived from the channel.
/// Publishers must not send it themselves.
pub const RESYNC: &str = "";

/// Default size of a memory store.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// How to build a store. Built by `config`; this module never parses files.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory {
        max_entries: usize,
    },
    Redis {
        /// `redis://` or `rediss://`. With `sentinel`, only its credentials, database and TLS mode
        /// are used for the master (empty: none); with `cluster`, it is ignored.
        url: String,
        /// `(master name, sentinel URLs)`.
        sentinel: Option<(String, Vec<String>)>,
        /// Seed node URLs.
        cluster: Option<Vec<String>>,
        /// Prepended to every key and channel name.
        key_prefix: String,
        /// Upper bound on one operation, waiting for a reconnect included: a stalled or
        /// unreachable Redis is `Unavailable` after this long, never a hang.
        timeout: Duration,
        /// CA certificates (PEM) that `rediss://` trusts instead of the web PKI roots.
        roots: Option<Vec<u8>>,
    },
}

impl StoreConfig {
    /// The store the file's `[session]` asks for: the one conversion from the validated
    /// `config::StoreConfig` (which keeps URLs as secrets) to what the stores are built from.
    pub fn from_config(session: &crate::config::SessionConfig) -> StoreConfig {
        match &session.store {
            crate::config::StoreConfig::Memory => StoreConfig::Memory {
                max_entries: session.max_entries,
            },
            crate::config::StoreConfig::Redis(redis) => StoreConfig::Redis {
                url: redis.url.expose().to_string(),
                sentinel: redis.sentinel.as_ref().map(|s| {
                    (
                        s.master.clone(),
                        s.nodes.iter().map(|n| n.expose().to_string()).collect(),
                    )
                }),
                cluster: (!redis.cluster.is_empty()).then(|| {
                    redis
                        .cluster
                        .iter()
                        .map(|n| n.expose().to_string())
                        .collect()
                }),
                key_prefix: redis.key_prefix.clone(),
                timeout: redis.timeout,
                roots: redis.ca_file.as_ref().map(|ca| pem_certificates(&ca.certs)),
            },
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory { max_entries } => f
                .debug_struct("Memory")
                .field("max_entries", max_entries)
                .finish(),
            StoreConfig::Redis {
                url,
                sentinel,
                cluster,
                key_prefix,
                timeout,
                roots,
            } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .field(
                    "sentinel",
                    &sentinel.as_ref().map(|(m, nodes)| {
                        (m, nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>())
                    }),
                )
                .field(
                    "cluster",
                    &cluster
                        .as_ref()
                        .map(|nodes| nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>()),
                )
                .field("key_prefix", key_prefix)
                .field("timeout", timeout)
                .field("roots", &roots.as_ref().map(|r| r.len()))
                .finish(),
        }
    }
}

/// DER certificates as one PEM bundle (what the Redis client reads its roots from).
fn pem_certificates(certs: &[rustls_pki_types::CertificateDer<'static>]) -> Vec<u8> {
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
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; retry later, keep the session.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// A key holds something this code did not write.
    #[error("session store holds an unexpected value: {0}")]
    Corrupt(String),
    /// The configuration cannot work (bad URL, empty node list).
    #[error("session store configuration: {0}")]
    Config(String),
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

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Memory($store) => $call.await,
            Store::Redis($store) => $call.await,
        }
    };
}

impl Store {
    /// Builds the store. A Redis store connects lazily: an unreachable server is not an error
    /// here (see [`Store::ping`]), a malformed URL is.
    pub async fn connect(config: &StoreConfig) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Memory { max_entries } => {
                Ok(Store::Memory(MemoryStore::new(*max_entries)))
            }
            StoreConfig::Redis { .. } => Ok(Store::Redis(RedisStore::connect(config).await?)),
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

    pub async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        dispatch!(self, s => s.get(key))
    }

    /// Creates `key` at version 1; `false` if it already exists.
    pub async fn put_new(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.put_new(key, value, ttl))
    }

    /// Atomically replaces the value if the stored version is `expected_version`, bumping it.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.compare_and_set(key, expected_version, value, ttl))
    }

    /// Sets a new time to live; `false` if the key does not exist.
    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, s => s.touch(key, ttl))
    }

    /// `true` if the key existed.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete(key))
    }

    /// Adds `member` to a set; the set lives at least `ttl` from now.
    pub async fn index_add(
        &self,
        index_key: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.index_add(index_key, member, ttl))
    }

    pub async fn index_members(&self, index_key: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.index_members(index_key))
    }

    pub async fn index_remove(&self, index_key: &str, member: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.index_remove(index_key, member))
    }

    /// `true` the first time `key` is seen within `ttl` (replay detection).
    pub async fn remember_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        dispatch!(self, s => s.remember_once(key, ttl))
    }

    /// Takes the lease `key` for `token` if nobody holds it.
    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.try_lock(key, token, lease))
    }

    /// Renews the lease if `token` still holds it.
    pub async fn extend_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.extend_lock(key, token, lease))
    }

    /// Releases the lease if `token` still holds it (compare-and-delete).
    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.unlock(key, token))
    }

    /// Sends `payload` to every subscriber of `channel_suffix`, on every instance.
    pub async fn publish(&self, channel_suffix: &str, payload: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.publish(channel_suffix, payload))
    }

    /// Receives what is published on `channel_suffix` from now on, by any instance. A lagging
    /// receiver or [`RESYNC`] means messages may have been lost.
    pub fn subscribe(&self, channel_suffix: &str) -> broadcast::Receiver<String> {
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

    /// Readiness: `Ok` when the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
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
        let config = StoreConfig::Redis {
            url: "rediss://user:hunter2@redis:6380/0".into(),
            sentinel: Some(("m".into(), vec!["redis://:s3cret@s1:26379".into()])),
            cluster: Some(vec!["redis://:pw-c@n1:6379".into()]),
            key_prefix: "v:".into(),
            timeout: Duration::from_secs(1),
            roots: None,
        };
        let text = format!("{config:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret") && !text.contains("pw-c"),
            "{text}"
        );
        assert!(text.contains("rediss://***@redis:6380/0"), "{text}");
    }

    #[test]
    fn zero_ttl_becomes_one_millisecond() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_secs(2)), 2000);
    }
}
