//! Per-address token buckets for the endpoints anyone may call.
//!
//! Each bucket holds up to `per_minute` requests and refills at `per_minute` a minute, so a
//! bucket untouched for a minute is full again and can be forgotten. The map is split into
//! shards, each under its own lock and holding at most its share of `tracked` addresses: a spray
//! of addresses costs bounded memory. When a shard is full, buckets that have refilled are
//! dropped first, then an arbitrary one (its address starts afresh: one that has as many
//! addresses as the bound already has that much budget). IPv6 addresses count by /64, the
//! block one subscriber usually holds.
//!
//! Per process: each replica counts on its own.

use super::client::client_key;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// A bucket untouched this long is full, whatever its rate.
const REFILL: Duration = Duration::from_secs(60);

/// The endpoints with a limit of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Login,
    Callback,
    BackchannelLogout,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Login => "login",
            Endpoint::Callback => "callback",
            Endpoint::BackchannelLogout => "backchannel_logout",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the limit; a request may succeed again after this long (whole seconds, at least 1).
    Limited {
        retry_after: Duration,
    },
}

type Key = (Endpoint, u128);

struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<Key, Bucket>,
}

impl Shard {
    fn make_room(&mut self, now: Instant, bound: usize) {
        if self.buckets.len() < bound {
            return;
        }
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.updated) < REFILL);
        if self.buckets.len() >= bound
            && let Some(victim) = self.buckets.keys().next().copied()
        {
            self.buckets.remove(&victim);
        }
    }
}

/// Token buckets by endpoint and client address. Shared by every worker.
pub struct RateLimiter {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateLimiter(tracked: {})", self.per_shard * SHARDS)
    }
}

impl RateLimiter {
    /// Tracks at most about `tracked` addresses (rounded up to a multiple of the shard count).
    pub fn new(tracked: usize) -> Self {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: tracked.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// Takes one request from the bucket of `addr` at `endpoint`; `per_minute = 0` is no limit.
    pub fn check(
        &self,
        endpoint: Endpoint,
        addr: IpAddr,
        per_minute: u32,
        now: Instant,
    ) -> Verdict {
        if per_minute == 0 {
            return Verdict::Allowed;
        }
        let key = (endpoint, client_key(addr));
        let index = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(index) else {
            return Verdict::Allowed;
        };
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let capacity = f64::from(per_minute);
        let per_second = capacity / REFILL.as_secs_f64();
        if !shard.buckets.contains_key(&key) {
            shard.make_room(now, self.per_shard);
        }
        let bucket = shard.buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Allowed;
        }
        let wait = ((1.0 - bucket.tokens) / per_second).ceil().max(1.0);
        Verdict::Limited {
            retry_after: Duration::from_secs_f64(wait),
        }
    }

    /// Addresses tracked now, over all endpoints.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .buckets
                    .len()
            })
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_burst_of_per_minute_passes_then_the_next_waits_for_a_token() {
        let limiter = RateLimiter::new(100);
        let t0 = Instant::now();
        let a = ip("203.0.113.1");
        for _ in 0..3 {
            assert_eq!(limiter.check(Endpoint::Login, a, 3, t0), Verdict::Allowed);
        }
        // 3 a minute: one token every 20 s.
        assert_eq!(
            limiter.check(Endpoint::Login, a, 3, t0),
            Verdict::Limited {
                retry_after: Duration::from_secs(20)
            }
        );
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            limiter.check(Endpoint::Login, a, 3, later),
            Verdict::Allowed
        );
        assert!(matches!(
            limiter.check(Endpoint::Login, a, 3, later),
            Verdict::Limited { .. }
        ));
    }

    #[test]
    fn addresses_and_endpoints_have_their_own_buckets_and_zero_is_no_limit() {
        let limiter = RateLimiter::new(100);
        let t0 = Instant::now();
        assert_eq!(
            limiter.check(Endpoint::Login, ip("203.0.113.1"), 1, t0),
            Verdict::Allowed
        );
        assert_eq!(
            limiter.check(Endpoint::Login, ip("203.0.113.2"), 1, t0),
            Verdict::Allowed
        );
        assert_eq!(
            limiter.check(Endpoint::Callback, ip("203.0.113.1"), 1, t0),
            Verdict::Allowed
        );
        for _ in 0..100 {
            assert_eq!(
                limiter.check(Endpoint::Login, ip("203.0.113.1"), 0, t0),
                Verdict::Allowed
            );
        }
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_bucket() {
        let limiter = RateLimiter::new(100);
        let t0 = Instant::now();
        assert_eq!(
            limiter.check(Endpoint::Login, ip("2001:db8:1:2::1"), 1, t0),
            Verdict::Allowed
        );
        assert!(matches!(
            limiter.check(Endpoint::Login, ip("2001:db8:1:2:ffff::9"), 1, t0),
            Verdict::Limited { .. }
        ));
        assert_eq!(
            limiter.check(Endpoint::Login, ip("2001:db8:1:3::1"), 1, t0),
            Verdict::Allowed
        );
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(
            limiter.check(Endpoint::Login, ip("198.51.100.1"), 1, t0),
            Verdict::Allowed
        );
        assert!(matches!(
            limiter.check(Endpoint::Login, ip("::ffff:198.51.100.1"), 1, t0),
            Verdict::Limited { .. }
        ));
    }

    #[test]
    fn a_spray_of_addresses_never_tracks_more_than_the_bound() {
        let limiter = RateLimiter::new(64);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limiter.check(Endpoint::Callback, addr, 10, t0);
            assert!(limiter.tracked() <= 64, "{} after {i}", limiter.tracked());
        }
    }
}
