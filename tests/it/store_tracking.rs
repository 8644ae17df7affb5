//! Changes made to session records behind Vestibule's back — an operator's `DEL`, a `FLUSHDB`,
//! a `PEXPIRE`, Redis's own eviction — reach every proxy's session cache as Redis announces them
//! (client tracking on the subscription's connection), with a `cache_ttl` far longer than the
//! test: a cached copy is dropped within about a second, not a time to live later. While Redis
//! announces every change, a cached copy past `cache_ttl` is served without reading its
//! record's version; a server that refuses tracking (an ACL) keeps the version reads, and the
//! subscription, as before.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::faults_redis::redis_proxy;
use crate::support::fake_idp;
use crate::support::redis::RedisServer;
use crate::support::*;
use std::time::{Duration, Instant};
use vestibule::jose::testing::{TestKey, TestSigner};
use vestibule::session::Session;

const PREFIX: &str = "vestibule:";
/// How long an announced change may take to reach a cache on a loaded 2-core machine.
const ANNOUNCED_WITHIN: Duration = Duration::from_secs(2);

struct Stack {
    redis: RedisServer,
    proxies: Vec<Proxy>,
    _idp: fake_idp::FakeIdp,
    _up: upstream::Upstream,
}

/// `count` proxies on one Redis (the one given, or a new one), with `cache_ttl`.
async fn stack_on(redis: RedisServer, url: &str, count: usize, cache_ttl: &str) -> Stack {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let mut proxies = Vec::new();
    for _ in 0..count {
        proxies.push(redis_proxy(url, cache_ttl, &idp, &up).await);
    }
    Stack {
        redis,
        proxies,
        _idp: idp,
        _up: up,
    }
}

async fn stack(count: usize, cache_ttl: &str) -> Stack {
    let redis = RedisServer::start();
    let url = redis.url();
    stack_on(redis, &url, count, cache_ttl).await
}

impl Stack {
    /// A new session (made through the first proxy); its `Cookie` header and its record's key.
    async fn session(&self, sub: &str) -> (String, String) {
        let before = self.record_keys();
        let cookie = self.proxies[0]
            .session_cookie(Session {
                sub: sub.into(),
                ..Session::default()
            })
            .await;
        let mut added: Vec<String> = self
            .record_keys()
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        assert_eq!(added.len(), 1, "one record per session");
        (cookie, added.remove(0))
    }

    fn record_keys(&self) -> Vec<String> {
        let keys = self.redis.command(&["KEYS", &format!("{PREFIX}s:*")]);
        // The raw reply: an array of bulk strings, one line each after its length's.
        keys.lines()
            .map(str::trim)
            .filter(|k| k.starts_with(PREFIX))
            .map(str::to_owned)
            .collect()
    }

    /// Every proxy serves `cookie`'s session, from its cache from the second request on.
    async fn cached_everywhere(&self, cookie: &str) {
        for proxy in &self.proxies {
            for _ in 0..2 {
                let reply = get(&proxy.url("/api/x"), &[("cookie", cookie)]).await;
                assert_eq!(reply.status, 200);
            }
        }
    }

    /// How long until every proxy answers `cookie` with 401, at most [`ANNOUNCED_WITHIN`] and
    /// a little more (`None`: some proxy still served it).
    async fn signed_out_everywhere(&self, cookie: &str) -> Option<Duration> {
        let started = Instant::now();
        loop {
            let mut out = true;
            for proxy in &self.proxies {
                let reply = get(&proxy.url("/api/x"), &[("cookie", cookie)]).await;
                out &= reply.status == 401;
            }
            if out {
                return Some(started.elapsed());
            }
            if started.elapsed() > ANNOUNCED_WITHIN {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Store reads of session records (whole, or their version) Redis has answered so far.
    fn record_reads(&self) -> u64 {
        let stats = self.redis.command(&["INFO", "commandstats"]);
        ["cmdstat_hget:", "cmdstat_hmget:"]
            .iter()
            .map(|name| {
                stats
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .and_then(|rest| rest.strip_prefix("calls="))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.parse::<u64>().unwrap())
            })
            .sum()
    }

    /// Clients whose tracking is in broadcast mode (`CLIENT LIST` flag `B`).
    fn tracking_clients(&self) -> usize {
        let list = self.redis.command(&["CLIENT", "LIST"]);
        list.lines()
            .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("flags=")))
            .filter(|flags| flags.contains('B'))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deleted_behind_the_proxies_backs_is_signed_out_at_once_everywhere() {
    let stack = stack(2, "30s").await;
    let (cookie, key) = stack.session("alice").await;
    let (other, _) = stack.session("bob").await;
    stack.cached_everywhere(&cookie).await;
    stack.cached_everywhere(&other).await;
    stack.redis.command(&["DEL", &key]);
    let took = stack.signed_out_everywhere(&cookie).await;
    assert!(
        took.is_some(),
        "a session deleted in Redis stayed served from a cache (cache_ttl 30 s)"
    );
    // Only that one.
    stack.cached_everywhere(&other).await;
    assert_eq!(
        stack.tracking_clients(),
        2,
        "each proxy's subscription tracks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_database_signs_every_cached_session_out() {
    let stack = stack(2, "30s").await;
    let (cookie, _) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    stack.redis.command(&["FLUSHDB"]);
    assert!(
        stack.signed_out_everywhere(&cookie).await.is_some(),
        "a session flushed from Redis stayed served from a cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_made_to_expire_behind_the_proxies_backs_is_signed_out_once_redis_expires_it() {
    let stack = stack(2, "30s").await;
    let (cookie, key) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    stack.redis.command(&["PEXPIRE", &key, "300"]);
    // Redis deletes an expired key within about a second (active expiry) and announces it then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut out = None;
    while started.elapsed() < Duration::from_secs(4) {
        if stack.signed_out_everywhere(&cookie).await.is_some() {
            out = Some(started.elapsed());
            break;
        }
    }
    assert!(
        out.is_some(),
        "a session expired in Redis stayed served from a cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_evicted_by_redis_is_signed_out() {
    let stack = stack(1, "30s").await;
    let (cookie, _) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    // Every key may be evicted, and the memory allowed is far below what is used: the next
    // write evicts the session.
    stack
        .redis
        .command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]);
    stack.redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    for i in 0..20 {
        stack.redis.command(&["SET", &format!("other:{i}"), "x"]);
        if stack.record_keys().is_empty() {
            break;
        }
    }
    assert!(stack.record_keys().is_empty(), "the record was evicted");
    stack.redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    assert!(
        stack.signed_out_everywhere(&cookie).await.is_some(),
        "a session evicted by Redis stayed served from a cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_session_past_cache_ttl_is_served_without_a_version_read_while_redis_announces_changes()
 {
    let stack = stack(1, "1s").await;
    let (cookie, key) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let before = stack.record_reads();
    stack.cached_everywhere(&cookie).await;
    assert_eq!(
        stack.record_reads(),
        before,
        "a copy past cache_ttl was checked with a store read though Redis announces changes"
    );
    // And it is still told of a change.
    stack.redis.command(&["DEL", &key]);
    assert!(stack.signed_out_everywhere(&cookie).await.is_some());
}

/// The subscription's connection killed: a new one tracks again, and the changes after it
/// reach the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_connection_killed_is_made_again_and_tracks() {
    let stack = stack(1, "30s").await;
    let mut live = stack.proxies[0].app.sessions.store().subscription_live();
    assert!(*live.borrow_and_update());
    let killed = stack.redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(
        killed.trim(),
        ":1",
        "the subscription was one pubsub client"
    );
    tokio::time::timeout(Duration::from_secs(5), live.wait_for(|up| !*up))
        .await
        .expect("the subscriber notices its connection's end")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), live.wait_for(|up| *up))
        .await
        .expect("and subscribes again")
        .unwrap();
    assert_eq!(stack.tracking_clients(), 1);
    let (cookie, key) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    stack.redis.command(&["DEL", &key]);
    assert!(
        stack.signed_out_everywhere(&cookie).await.is_some(),
        "a change after the new subscription did not reach the cache"
    );
}

/// The URL of a user of `redis` who may do everything but `CLIENT TRACKING` (an ACL, as some
/// managed services set).
fn untracked_user(redis: &RedisServer) -> String {
    let acl = ["ACL", "SETUSER", "plain", "on", ">pw", "~*", "&*", "+@all"];
    redis.command(&[&acl[..], &["-client|tracking"]].concat());
    redis.url().replace("redis://", "redis://plain:pw@")
}

/// A Redis user that may not track (an ACL, as some managed services set): the subscription is
/// the plain one, and a cached copy is checked with a version read every `cache_ttl` as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_tracking_keeps_the_plain_subscription_and_the_version_reads() {
    let redis = RedisServer::start();
    let url = untracked_user(&redis);
    let stack = stack_on(redis, &url, 1, "1s").await;
    assert_eq!(stack.tracking_clients(), 0);
    let list = stack.redis.command(&["CLIENT", "LIST", "TYPE", "pubsub"]);
    assert_eq!(list.lines().filter(|l| l.starts_with("id=")).count(), 1);
    let (cookie, key) = stack.session("alice").await;
    stack.cached_everywhere(&cookie).await;
    // Within the time to live, the cache serves it: no read.
    let before = stack.record_reads();
    stack.cached_everywhere(&cookie).await;
    assert_eq!(stack.record_reads(), before, "the cache is in use");
    stack.redis.command(&["DEL", &key]);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        stack.signed_out_everywhere(&cookie).await.is_some(),
        "past cache_ttl, the version read finds the record gone"
    );
}

/// The real binary tells the operator whether Redis announces changes: a line at start (a
/// warning, with Redis's reason, when refused) and `vestibule_session_store_tracking`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tells_whether_redis_announces_changes() {
    let redis = RedisServer::start();
    let refused = untracked_user(&redis);
    for (url, announced) in [(redis.url(), true), (refused, false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = config_toml(&format!(
            "store = \"redis\"\n[session.redis]\nurl = \"{url}\"\n"
        ));
        let (mut child, log) = spawn_binary(dir.path(), &config);
        let listening = logged(&log, "listening").await;
        let admin = listening
            .split(' ')
            .find_map(|field| field.strip_prefix("admin="))
            .expect("the admin address")
            .to_owned();
        let gauge = eventually("the gauge is exported", Duration::from_secs(10), || async {
            let metrics = get(&format!("http://{admin}/metrics"), &[]).await.text();
            metrics
                .lines()
                .find(|l| l.starts_with("vestibule_session_store_tracking "))
                .map(String::from)
        })
        .await;
        let text = std::fs::read_to_string(&log).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let warning = text
            .lines()
            .find(|l| l.contains("refused to announce changes"));
        if announced {
            assert_eq!(gauge, "vestibule_session_store_tracking 1", "{text}");
            assert!(text.contains("Redis announces every change"), "{text}");
            assert!(warning.is_none(), "{text}");
        } else {
            assert_eq!(gauge, "vestibule_session_store_tracking 0", "{text}");
            let warning = warning.expect("a warning says tracking was refused");
            assert!(
                warning.contains("WARN") && warning.contains("NOPERM"),
                "{warning}"
            );
            assert!(!warning.contains("pw@"), "{warning}");
        }
    }
}
