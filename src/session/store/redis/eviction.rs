//! Whether Redis may evict Vestibule's keys to make room: asked once at startup, warned about.
//!
//! Every key Vestibule writes has a time to live, so every `maxmemory-policy` but `noeviction`
//! (`allkeys-*` and `volatile-*` alike) may drop them once Redis reaches `maxmemory`: sessions
//! (users signed out), and the refresh lease and spend record that keep a refresh token from
//! being presented twice (`volatile-ttl` drops those first: they live the shortest). Under
//! `noeviction` a full Redis refuses what adds data instead: 503s, nobody signed out, a
//! refresh's answer kept. A warning, not a refusal to start: eviction may be the operator's
//! choice. A Redis that does not tell (most managed services refuse `CONFIG`) is taken as it is,
//! silently.

use std::collections::HashMap;
use std::time::Duration;

use super::{Op, RedisStore};
use crate::session::store::{Outage, StoreError};

/// How many times a store that does not answer yet (started after Vestibule) is asked, and the
/// pause between two attempts.
const ATTEMPTS: usize = 12;
const PAUSE: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Asks Redis, in a task of its own, for its `maxmemory` and `maxmemory-policy`, and warns
    /// if it evicts keys when full.
    pub fn check_eviction(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                match store.memory_settings().await {
                    Ok(settings) => return warn_if_evicting(&settings),
                    Err(StoreError::Unavailable(Outage::TimedOut(_) | Outage::Redis(_))) => {
                        tokio::time::sleep(PAUSE).await;
                    }
                    // Refused (CONFIG disabled, or not allowed to this user) or not understood.
                    Err(_) => return,
                }
            }
        });
    }

    async fn memory_settings(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut cmd = Self::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory*");
        self.run("config", Op::Cmd(cmd)).await
    }
}

fn warn_if_evicting(settings: &HashMap<String, String>) {
    let setting = |name: &str, default| settings.get(name).map_or(default, String::as_str);
    let (policy, limit) = (
        setting("maxmemory-policy", "noeviction"),
        setting("maxmemory", "0"),
    );
    if evicts(policy, limit) {
        tracing::warn!(
            maxmemory_policy = policy,
            maxmemory = limit,
            "Redis evicts keys when it reaches maxmemory: sessions may end early, and an evicted \
             refresh lease or spend record may let a refresh token be presented twice (which a \
             rotating provider refuses, ending the session); set maxmemory-policy noeviction (a \
             full Redis then refuses new data: 503, nobody signed out)"
        );
    }
}

/// Whether a Redis with this `maxmemory-policy` and `maxmemory` (`0`: no limit) drops keys to
/// make room.
fn evicts(policy: &str, limit: &str) -> bool {
    policy != "noeviction" && limit != "0"
}

#[cfg(test)]
mod tests {
    use super::evicts;

    #[test]
    fn every_policy_but_noeviction_evicts_once_memory_is_limited() {
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(evicts(policy, "104857600"), "{policy}");
            assert!(!evicts(policy, "0"), "{policy} without a limit");
        }
        assert!(!evicts("noeviction", "104857600"));
    }
}
