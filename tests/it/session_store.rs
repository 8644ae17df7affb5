//! One contract suite for every session store (memory; Redis standalone, Cluster and Sentinel,
//! each a real `redis-server` started by the harness), plus what only a real Redis can show:
//! a dump holds no secret, a restart is an error and not a logout, and an instance sees another
//! instance's logout at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::redis::RedisServer;
use tokio::sync::Barrier;
use vestibule::config::{RedisConfig, Secret, SentinelConfig};
use vestibule::session::manager::INVALIDATION_CHANNEL;
use vestibule::session::store::RESYNC;
use vestibule::session::{
    AccessToken, Keyring, MemoryStore, Session, SessionSettings, Sessions, Store, StoreConfig,
    StoreError, TokenMap,
};

const PREFIX: &str = "test:";
const DEADLINE: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(60);

/// A store and whatever keeps it alive.
struct Backend {
    store: Store,
    _servers: Vec<RedisServer>,
}

fn redis_config(url: String) -> RedisConfig {
    RedisConfig {
        url: Secret::new(url),
        sentinel: None,
        cluster: vec![],
        key_prefix: PREFIX.into(),
        timeout: Duration::from_secs(2),
        ca_file: None,
    }
}

async fn connect(config: RedisConfig) -> Store {
    Store::connect(&StoreConfig::Redis(config), 0)
        .await
        .unwrap()
}

async fn memory() -> Backend {
    Backend {
        store: Store::Memory(MemoryStore::new(10_000)),
        _servers: vec![],
    }
}

async fn redis() -> Backend {
    let server = RedisServer::start();
    let store = connect(redis_config(server.url())).await;
    Backend {
        store,
        _servers: vec![server],
    }
}

/// The cluster node is shared (it takes two seconds to accept writes); each test gets its own
/// key and channel prefix instead.
async fn redis_cluster(test: &str) -> Backend {
    let server = RedisServer::shared_cluster();
    let store = connect(RedisConfig {
        cluster: vec![Secret::new(server.url())],
        key_prefix: format!("{PREFIX}{test}:"),
        ..redis_config(String::new())
    })
    .await;
    Backend {
        store,
        _servers: vec![],
    }
}

async fn redis_sentinel() -> Backend {
    let master = RedisServer::start();
    let sentinel = RedisServer::start_sentinel(&master, "main");
    let store = connect(RedisConfig {
        sentinel: Some(SentinelConfig {
            master: "main".into(),
            nodes: vec![Secret::new(sentinel.url())],
        }),
        ..redis_config(String::new())
    })
    .await;
    Backend {
        store,
        _servers: vec![sentinel, master],
    }
}

/// Polls `check` until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod memory_store { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::memory().await).await }
        )* }
        mod redis_store { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::redis().await).await }
        )* }
        mod redis_cluster_store { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::redis_cluster(stringify!($test)).await).await }
        )* }
        mod redis_sentinel_store { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::redis_sentinel().await).await }
        )* }
    };
}

contract!(
    created_record_reads_back_at_version_one,
    binary_values_round_trip,
    missing_keys_read_as_absent,
    record_expires_after_its_ttl,
    touch_extends_the_ttl,
    delete_removes_the_record,
    delete_at_removes_only_the_version_read,
    compare_and_set_bumps_the_version_and_rejects_stale_versions,
    version_reads_follow_every_change_and_delete,
    no_write_brings_a_deleted_or_expired_record_back,
    exactly_one_of_many_concurrent_writers_wins,
    index_adds_removes_and_lists_members,
    index_lists_members_soonest_deadline_first,
    adding_to_an_index_removes_its_members_past_their_deadline,
    index_expires_after_its_latest_deadline,
    remember_once_is_true_only_the_first_time,
    lock_is_exclusive_extendable_and_released_only_by_its_holder,
    lock_lease_expires,
    a_lease_not_renewed_lately_is_shortened,
    published_messages_reach_subscribers_of_that_channel_only,
    announced_changes_are_made_and_published_together,
    ping_answers,
);

async fn created_record_reads_back_at_version_one(b: Backend) {
    assert!(b.store.put_new("k", b"one", LONG).await.unwrap());
    let record = b.store.get("k").await.unwrap().unwrap();
    assert_eq!((record.version, record.value.as_slice()), (1, &b"one"[..]));
    assert!(
        !b.store.put_new("k", b"two", LONG).await.unwrap(),
        "put_new never overwrites"
    );
    assert_eq!(b.store.get("k").await.unwrap().unwrap().value, b"one");
}

async fn binary_values_round_trip(b: Backend) {
    let value: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    b.store.put_new("bin", &value, LONG).await.unwrap();
    assert_eq!(b.store.get("bin").await.unwrap().unwrap().value, value);
    assert!(
        b.store
            .compare_and_set("bin", 1, &[0, 0, 0], LONG)
            .await
            .unwrap()
    );
    assert_eq!(b.store.get("bin").await.unwrap().unwrap().value, [0, 0, 0]);
}

async fn missing_keys_read_as_absent(b: Backend) {
    assert_eq!(b.store.get("nothing").await.unwrap(), None);
    assert!(!b.store.touch("nothing", LONG).await.unwrap());
    assert!(!b.store.delete("nothing").await.unwrap());
    assert!(
        !b.store
            .compare_and_set("nothing", 1, b"x", LONG)
            .await
            .unwrap()
    );
    assert!(b.store.index_members("nothing").await.unwrap().is_empty());
}

async fn record_expires_after_its_ttl(b: Backend) {
    b.store.put_new("short", b"x", SHORT).await.unwrap();
    b.store.put_new("long", b"x", LONG).await.unwrap();
    assert!(b.store.get("short").await.unwrap().is_some());
    eventually("the record expired", || async {
        b.store.get("short").await.unwrap().is_none()
    })
    .await;
    assert!(b.store.get("long").await.unwrap().is_some());
}

async fn touch_extends_the_ttl(b: Backend) {
    b.store.put_new("k", b"x", SHORT).await.unwrap();
    assert!(b.store.touch("k", LONG).await.unwrap());
    tokio::time::sleep(SHORT * 2).await;
    assert!(b.store.get("k").await.unwrap().is_some());
    assert!(b.store.touch("k", SHORT).await.unwrap());
    eventually("the shortened record expired", || async {
        b.store.get("k").await.unwrap().is_none()
    })
    .await;
}

async fn delete_removes_the_record(b: Backend) {
    b.store.put_new("k", b"x", LONG).await.unwrap();
    assert!(b.store.delete("k").await.unwrap());
    assert_eq!(b.store.get("k").await.unwrap(), None);
    assert!(!b.store.delete("k").await.unwrap());
    assert!(
        b.store.put_new("k", b"again", LONG).await.unwrap(),
        "the key can be reused"
    );
}

async fn delete_at_removes_only_the_version_read(b: Backend) {
    b.store.put_new("k", b"v1", LONG).await.unwrap();
    assert!(b.store.compare_and_set("k", 1, b"v2", LONG).await.unwrap());
    assert!(
        !b.store.delete_at("k", 1).await.unwrap(),
        "a version written over"
    );
    assert_eq!(b.store.get("k").await.unwrap().unwrap().value, b"v2");
    assert!(b.store.delete_at("k", 2).await.unwrap());
    assert_eq!(b.store.get("k").await.unwrap(), None);
    assert!(!b.store.delete_at("k", 2).await.unwrap(), "already gone");
    assert!(!b.store.delete_at("never", 1).await.unwrap());
}

async fn version_reads_follow_every_change_and_delete(b: Backend) {
    assert_eq!(b.store.version("k").await.unwrap(), None);
    b.store.put_new("k", b"v1", LONG).await.unwrap();
    assert_eq!(b.store.version("k").await.unwrap(), Some(1));
    assert!(b.store.compare_and_set("k", 1, b"v2", LONG).await.unwrap());
    assert_eq!(b.store.version("k").await.unwrap(), Some(2));
    assert!(
        b.store
            .compare_and_set_announced("k", 2, b"v3", LONG, "sessions", "h")
            .await
            .unwrap()
    );
    assert_eq!(b.store.version("k").await.unwrap(), Some(3));
    assert!(b.store.delete("k").await.unwrap());
    assert_eq!(b.store.version("k").await.unwrap(), None);
}

/// The session cache keeps a copy whose record is still at the copy's version: only sound if
/// a version, once the record is gone, never names another record under the same key. No
/// write at an old version brings a deleted or expired record back (only `put_new` creates,
/// and the manager calls it once per random key).
async fn no_write_brings_a_deleted_or_expired_record_back(b: Backend) {
    b.store.put_new("k", b"v1", LONG).await.unwrap();
    assert!(b.store.compare_and_set("k", 1, b"v2", LONG).await.unwrap());
    assert!(b.store.delete("k").await.unwrap());
    b.store.put_new("short", b"v1", SHORT).await.unwrap();
    eventually("the record expired", || async {
        b.store.version("short").await.unwrap().is_none()
    })
    .await;
    for (key, last) in [("k", 2), ("short", 1)] {
        for version in [1, last, last + 1] {
            assert!(
                !b.store
                    .compare_and_set(key, version, b"again", LONG)
                    .await
                    .unwrap()
            );
            assert!(
                !b.store
                    .compare_and_set_announced(key, version, b"again", LONG, "sessions", "h")
                    .await
                    .unwrap()
            );
            assert!(!b.store.delete_at(key, version).await.unwrap());
            assert!(
                !b.store
                    .delete_at_announced(key, version, "sessions", "h")
                    .await
                    .unwrap()
            );
        }
        assert!(!b.store.touch(key, LONG).await.unwrap());
        assert!(!b.store.delete(key).await.unwrap());
        assert!(
            !b.store
                .delete_announced(key, "sessions", "h")
                .await
                .unwrap()
        );
        assert_eq!(b.store.version(key).await.unwrap(), None, "{key}");
        assert!(b.store.get(key).await.unwrap().is_none(), "{key}");
        assert!(!b.store.exists(key).await.unwrap(), "{key}");
    }
}

async fn compare_and_set_bumps_the_version_and_rejects_stale_versions(b: Backend) {
    b.store.put_new("k", b"v1", LONG).await.unwrap();
    assert!(b.store.compare_and_set("k", 1, b"v2", LONG).await.unwrap());
    assert!(
        !b.store
            .compare_and_set("k", 1, b"stale", LONG)
            .await
            .unwrap()
    );
    assert!(
        !b.store
            .compare_and_set("k", 3, b"future", LONG)
            .await
            .unwrap()
    );
    assert!(b.store.compare_and_set("k", 2, b"v3", LONG).await.unwrap());
    let record = b.store.get("k").await.unwrap().unwrap();
    assert_eq!((record.version, record.value.as_slice()), (3, &b"v3"[..]));
    assert!(b.store.compare_and_set("k", 3, b"v4", SHORT).await.unwrap());
    eventually("the ttl given to compare_and_set applied", || async {
        b.store.get("k").await.unwrap().is_none()
    })
    .await;
}

async fn exactly_one_of_many_concurrent_writers_wins(b: Backend) {
    const WRITERS: usize = 16;
    b.store.put_new("k", b"start", LONG).await.unwrap();
    let barrier = Arc::new(Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (store, barrier) = (b.store.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let value = format!("writer-{i}");
                (
                    value.clone(),
                    store
                        .compare_and_set("k", 1, value.as_bytes(), LONG)
                        .await
                        .unwrap(),
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (value, won) = task.await.unwrap();
        if won {
            winners.push(value);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let record = b.store.get("k").await.unwrap().unwrap();
    assert_eq!(record.version, 2);
    assert_eq!(record.value, winners[0].as_bytes());
}

/// Index deadlines are Unix seconds on the caller's clock: `T0` is "now" to these tests.
fn until(ttl: Duration) -> u64 {
    T0 + ttl.as_secs().max(1)
}

async fn index_adds_removes_and_lists_members(b: Backend) {
    let store = &b.store;
    assert_eq!(store.index_add("i", "a", until(LONG), T0).await.unwrap(), 1);
    assert_eq!(store.index_add("i", "b", until(LONG), T0).await.unwrap(), 2);
    assert_eq!(store.index_add("i", "a", until(LONG), T0).await.unwrap(), 2);
    store
        .index_add("other", "c", until(LONG), T0)
        .await
        .unwrap();
    let mut members = names(store.index_members("i").await.unwrap());
    members.sort();
    assert_eq!(members, ["a", "b"]);
    store.index_remove("i", "a").await.unwrap();
    store.index_remove("i", "not-there").await.unwrap();
    assert_eq!(names(store.index_members("i").await.unwrap()), ["b"]);
    store.index_remove("i", "b").await.unwrap();
    assert!(store.index_members("i").await.unwrap().is_empty());
    assert_eq!(names(store.index_members("other").await.unwrap()), ["c"]);
    assert!(!store.exists("i").await.unwrap(), "an empty index is gone");
}

fn names(members: Vec<(String, u64)>) -> Vec<String> {
    members.into_iter().map(|(member, _)| member).collect()
}

async fn index_lists_members_soonest_deadline_first(b: Backend) {
    for (member, deadline) in [("late", T0 + 300), ("soon", T0 + 100), ("mid", T0 + 200)] {
        b.store.index_add("i", member, deadline, T0).await.unwrap();
    }
    assert_eq!(
        b.store.index_members("i").await.unwrap(),
        [
            ("soon".to_string(), T0 + 100),
            ("mid".to_string(), T0 + 200),
            ("late".to_string(), T0 + 300)
        ]
    );
}

/// Review 6, C1: stale members are removed when one is added, in the same step, by the caller's
/// clock; no reader needs to.
async fn adding_to_an_index_removes_its_members_past_their_deadline(b: Backend) {
    b.store.index_add("i", "old", T0 + 10, T0).await.unwrap();
    b.store
        .index_add("i", "ends-now", T0 + 20, T0)
        .await
        .unwrap();
    b.store.index_add("i", "kept", T0 + 60, T0).await.unwrap();
    assert_eq!(
        b.store
            .index_add("i", "new", T0 + 100, T0 + 20)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        names(b.store.index_members("i").await.unwrap()),
        ["kept", "new"]
    );
}

async fn index_expires_after_its_latest_deadline(b: Backend) {
    b.store.index_add("i", "a", until(SHORT), T0).await.unwrap();
    b.store
        .index_add("kept", "a", until(SHORT), T0)
        .await
        .unwrap();
    b.store
        .index_add("kept", "b", until(LONG), T0)
        .await
        .unwrap();
    b.store
        .index_add("kept", "c", until(SHORT), T0)
        .await
        .unwrap();
    eventually("the index expired", || async {
        b.store.index_members("i").await.unwrap().is_empty()
    })
    .await;
    let kept = names(b.store.index_members("kept").await.unwrap());
    assert!(kept.contains(&"b".to_string()), "{kept:?}");
}

async fn remember_once_is_true_only_the_first_time(b: Backend) {
    assert!(b.store.remember_once("jti:1", SHORT).await.unwrap());
    assert!(!b.store.remember_once("jti:1", SHORT).await.unwrap());
    assert!(b.store.remember_once("jti:2", SHORT).await.unwrap());
    eventually("the marker expired", || async {
        b.store.remember_once("jti:1", SHORT).await.unwrap()
    })
    .await;
}

async fn lock_is_exclusive_extendable_and_released_only_by_its_holder(b: Backend) {
    assert!(b.store.try_lock("lock", "alpha", LONG).await.unwrap());
    assert!(!b.store.try_lock("lock", "beta", LONG).await.unwrap());
    assert!(
        !b.store.try_lock("lock", "alpha", LONG).await.unwrap(),
        "not re-entrant"
    );
    assert!(!b.store.extend_lock("lock", "beta", LONG).await.unwrap());
    assert!(b.store.extend_lock("lock", "alpha", LONG).await.unwrap());
    b.store.unlock("lock", "beta").await.unwrap();
    assert!(
        !b.store.try_lock("lock", "beta", LONG).await.unwrap(),
        "only the holder unlocks"
    );
    b.store.unlock("lock", "alpha").await.unwrap();
    assert!(b.store.try_lock("lock", "beta", LONG).await.unwrap());
    assert!(!b.store.extend_lock("free", "alpha", LONG).await.unwrap());
}

async fn lock_lease_expires(b: Backend) {
    assert!(b.store.try_lock("lock", "alpha", SHORT).await.unwrap());
    assert!(b.store.extend_lock("lock", "alpha", SHORT).await.unwrap());
    eventually("the lease expired", || async {
        b.store.try_lock("lock", "beta", LONG).await.unwrap()
    })
    .await;
    assert!(
        !b.store.extend_lock("lock", "alpha", LONG).await.unwrap(),
        "the old holder lost it"
    );
}

/// `shorten_lock(key, below, to)` cuts a lease with less than `below` left (its holder has not
/// renewed it lately) down to `to`; it leaves alone a lease renewed lately, one that has less
/// than `to` left (it never lengthens one), and a key nobody holds (it takes nothing).
async fn a_lease_not_renewed_lately_is_shortened(b: Backend) {
    let hour = Duration::from_secs(3600);
    assert!(b.store.try_lock("unrenewed", "alpha", LONG).await.unwrap());
    assert!(
        b.store
            .shorten_lock("unrenewed", hour, SHORT)
            .await
            .unwrap()
    );
    eventually("the shortened lease ran out", || async {
        b.store.try_lock("unrenewed", "beta", LONG).await.unwrap()
    })
    .await;

    assert!(b.store.try_lock("renewed", "alpha", hour).await.unwrap());
    assert!(!b.store.shorten_lock("renewed", LONG, SHORT).await.unwrap());
    assert!(b.store.try_lock("ending", "alpha", SHORT).await.unwrap());
    assert!(!b.store.shorten_lock("ending", hour, LONG).await.unwrap());
    assert!(!b.store.shorten_lock("free", hour, SHORT).await.unwrap());
    tokio::time::sleep(SHORT * 2).await;
    assert!(
        !b.store.try_lock("renewed", "beta", LONG).await.unwrap(),
        "a lease renewed lately was shortened"
    );
    assert!(
        b.store.try_lock("ending", "beta", LONG).await.unwrap(),
        "a lease was lengthened"
    );
    assert!(b.store.try_lock("free", "beta", LONG).await.unwrap());
}

async fn published_messages_reach_subscribers_of_that_channel_only(b: Backend) {
    let mut mine = b.store.subscribe("invalidate");
    let mut also_mine = b.store.subscribe("invalidate");
    let mut other = b.store.subscribe("refresh");
    b.store.publish("invalidate", "hash-1").await.unwrap();
    b.store.publish("invalidate", "hash-2").await.unwrap();
    for receiver in [&mut mine, &mut also_mine] {
        for expected in ["hash-1", "hash-2"] {
            let got = tokio::time::timeout(DEADLINE, receiver.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, expected);
        }
    }
    b.store.publish("refresh", "done").await.unwrap();
    let got = tokio::time::timeout(DEADLINE, other.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "done", "no message from the other channel came first");
}

/// The announcing forms change what their plain forms change and publish the message when
/// (and only when) they do; a delete also when the key was already gone.
async fn announced_changes_are_made_and_published_together(b: Backend) {
    let mut heard = b.store.subscribe("invalidate");
    b.store.put_new("k", b"v1", LONG).await.unwrap();
    assert!(
        b.store
            .compare_and_set_announced("k", 1, b"v2", LONG, "invalidate", "written")
            .await
            .unwrap()
    );
    assert!(
        !b.store
            .compare_and_set_announced("k", 1, b"stale", LONG, "invalidate", "not written")
            .await
            .unwrap()
    );
    assert_eq!(b.store.get("k").await.unwrap().unwrap().value, b"v2");
    assert!(
        !b.store
            .delete_at_announced("k", 1, "invalidate", "not deleted")
            .await
            .unwrap()
    );
    assert!(
        b.store
            .delete_at_announced("k", 2, "invalidate", "deleted at")
            .await
            .unwrap()
    );
    assert_eq!(b.store.get("k").await.unwrap(), None);
    b.store.put_new("j", b"x", LONG).await.unwrap();
    assert!(
        b.store
            .delete_announced("j", "invalidate", "deleted")
            .await
            .unwrap()
    );
    assert_eq!(b.store.get("j").await.unwrap(), None);
    assert!(
        !b.store
            .delete_announced("j", "invalidate", "gone already")
            .await
            .unwrap()
    );
    b.store.publish("invalidate", "end").await.unwrap();
    let mut got = Vec::new();
    loop {
        let message = tokio::time::timeout(DEADLINE, heard.recv())
            .await
            .unwrap()
            .unwrap();
        if message == "end" {
            break;
        }
        got.push(message);
    }
    assert_eq!(got, ["written", "deleted at", "deleted", "gone already"]);
}

async fn ping_answers(b: Backend) {
    b.store.ping().await.unwrap();
}

// ---- Redis only: what the manager leaves in Redis, outages, several instances ----

const T0: u64 = 1_700_000_000;
const COOKIE: &str = "__Host-vestibule";

fn keys() -> Vec<[u8; 32]> {
    vec![[0x5a; 32]]
}

fn sessions(store: Store, cache_ttl: Duration) -> Sessions {
    let mut settings = SessionSettings::new(COOKIE, Keyring::new(keys()).unwrap());
    settings.cache_ttl = cache_ttl;
    Sessions::new(settings, store)
}

fn session_with_tokens() -> Session {
    let mut tokens = TokenMap::default();
    tokens.insert(
        String::new(),
        AccessToken {
            value: "AT-secret-1234".into(),
            expires_at: T0 + 300,
            issued_at: 0,
            scope: None,
            jkt: None,
        },
    );
    tokens.insert(
        "https://api.example.com".into(),
        AccessToken {
            value: "AT-resource-5678".into(),
            expires_at: T0 + 300,
            issued_at: 0,
            scope: Some("api.read".into()),
            jkt: None,
        },
    );
    let mut claims = serde_json::Map::new();
    claims.insert("email".into(), "alice-private@example.com".into());
    Session {
        sub: "alice-subject".into(),
        sid: Some("provider-sid-42".into()),
        claims: claims.into(),
        id_token: Some("ID-token-eyJhbGciOi".into()),
        tokens,
        refresh_token: Some("RT-secret-9999".into()),
        user_agent: Some("Firefox/140".into()),
        ..Session::default()
    }
}

/// Every key name and every value in the server, concatenated.
fn dump(url: &str) -> (Vec<String>, Vec<u8>) {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let mut names = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(100)
            .query(&mut con)
            .unwrap();
        names.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut blob = Vec::new();
    for name in &names {
        blob.extend_from_slice(name.as_bytes());
        let kind: String = redis::cmd("TYPE").arg(name).query(&mut con).unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(name).query(&mut con).unwrap()],
            "hash" => redis::cmd("HGETALL").arg(name).query(&mut con).unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(name).query(&mut con).unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(name)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(&mut con)
                .unwrap(),
            other => panic!("unexpected key type {other} for {name}"),
        };
        for part in parts {
            blob.extend_from_slice(&part);
            blob.push(0);
        }
    }
    (names, blob)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dump_reveals_no_token_session_id_or_cookie() {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    let server = RedisServer::start();
    let store = connect(redis_config(server.url())).await;
    let manager = sessions(store, Duration::ZERO);
    let (cookie, loaded) = manager.create(session_with_tokens(), T0).await.unwrap();
    let mut updated = loaded.session.as_ref().clone();
    updated.refresh_token = Some("RT-rotated-0000".into());
    assert!(manager.save(&loaded, updated, T0 + 1).await.unwrap());
    let lock = manager.refresh_lock_key(&loaded);
    manager
        .store()
        .try_lock(&lock, "lease-token", LONG)
        .await
        .unwrap();

    let ticket = Keyring::new(keys())
        .unwrap()
        .open(COOKIE, &cookie)
        .unwrap()
        .plaintext;
    let (id, data_key) = ticket.split_at(32);
    let (names, blob) = dump(&server.url());
    assert!(
        names.len() >= 4,
        "session, two indexes and a lock: {names:?}"
    );
    assert!(
        names.iter().all(|n| n.starts_with(PREFIX)),
        "unprefixed key in {names:?}"
    );

    let mut needles: Vec<(String, Vec<u8>)> = vec![("cookie".into(), cookie.clone().into_bytes())];
    for secret in [
        "AT-secret-1234",
        "AT-resource-5678",
        "RT-secret-9999",
        "RT-rotated-0000",
        "ID-token-eyJhbGciOi",
        "alice-private@example.com",
        "provider-sid-42",
        "alice-subject",
    ] {
        needles.push((secret.into(), secret.as_bytes().to_vec()));
    }
    for (what, bytes) in [("session id", id), ("data key", data_key)] {
        needles.push((format!("{what} (raw)"), bytes.to_vec()));
        needles.push((format!("{what} (hex)"), hex::encode(bytes).into_bytes()));
        needles.push((
            format!("{what} (base64)"),
            STANDARD.encode(bytes).into_bytes(),
        ));
        needles.push((
            format!("{what} (base64url)"),
            URL_SAFE_NO_PAD.encode(bytes).into_bytes(),
        ));
    }
    for (what, needle) in needles {
        assert!(!contains(&blob, &needle), "{what} found in the Redis dump");
    }
    assert!(
        manager.load(&cookie, T0 + 2).await.unwrap().is_some(),
        "and yet the cookie still works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_an_error_not_a_logout_and_the_session_survives_a_restart() {
    let mut server = RedisServer::start();
    let store = connect(redis_config(server.url())).await;
    let manager = sessions(store.clone(), Duration::ZERO);
    let mut invalidations = manager.subscribe_invalidations();
    let (cookie, _) = manager.create(session_with_tokens(), T0).await.unwrap();

    server.stop();
    let outage = manager.load(&cookie, T0 + 1).await;
    assert!(
        matches!(outage, Err(StoreError::Unavailable(_))),
        "{outage:?}"
    );
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.get("anything").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(manager.end_by_sub("alice-subject").await.is_err());

    server.restart();
    eventually("the session loads again", || async {
        matches!(manager.load(&cookie, T0 + 2).await, Ok(Some(_)))
    })
    .await;
    store.ping().await.unwrap();

    // Subscribers were told they may have missed messages, and the subscription is back.
    let deadline = Instant::now() + DEADLINE;
    let mut saw_resync = false;
    loop {
        assert!(
            Instant::now() < deadline,
            "no message after the restart (resync seen: {saw_resync})"
        );
        store
            .publish(INVALIDATION_CHANNEL, "after-restart")
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_millis(200), invalidations.recv()).await {
            Ok(Ok(message)) if message == RESYNC => saw_resync = true,
            Ok(Ok(message)) if message == "after-restart" && saw_resync => break,
            _ => {}
        }
    }
    assert!(saw_resync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ended_on_one_instance_is_gone_on_another_within_100_ms() {
    let server = RedisServer::start();
    let a = sessions(
        connect(redis_config(server.url())).await,
        Duration::from_secs(30),
    );
    let b = sessions(
        connect(redis_config(server.url())).await,
        Duration::from_secs(30),
    );
    let (cookie, _) = a.create(session_with_tokens(), T0).await.unwrap();
    assert!(
        b.load(&cookie, T0).await.unwrap().is_some(),
        "now cached on b"
    );

    assert_eq!(a.end_by_sid("provider-sid-42").await.unwrap(), 1);
    let ended = Instant::now();
    while b.load(&cookie, T0).await.unwrap().is_some() {
        assert!(
            ended.elapsed() < Duration::from_millis(100),
            "b still serves the ended session"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_speaks_tls_and_fails_closed_on_an_untrusted_certificate() {
    let server = RedisServer::start_tls();
    let store = connect(redis_config(server.tls_url())).await;
    // The self-signed certificate is not among the trusted roots: every operation is an error,
    // never a plain-text fallback, never a panic, never "no such session".
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.get("k").await,
        Err(StoreError::Unavailable(_))
    ));
    let plain = connect(redis_config(server.url())).await;
    plain.put_new("k", b"v", LONG).await.unwrap();
    assert!(matches!(
        store.get("k").await,
        Err(StoreError::Unavailable(_))
    ));
}

/// Connections the Redis server has open, counted by `CLIENT LIST` (the counting one included).
fn redis_clients(url: &str) -> usize {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
    list.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_handle_has_its_own_redis_connection_to_the_same_data() {
    let server = RedisServer::start();
    let url = server.url();
    let store = connect(redis_config(url.clone())).await;
    store.ping().await.unwrap();
    let before = redis_clients(&url);

    let worker = store.for_worker();
    assert!(worker.put_new("k", b"from the worker", LONG).await.unwrap());
    assert_eq!(
        redis_clients(&url),
        before + 1,
        "the worker's handle opened a connection of its own"
    );
    let seen = store.get("k").await.unwrap().unwrap();
    assert_eq!(seen.value, b"from the worker");
    assert!(store.delete("k").await.unwrap());
    assert!(worker.get("k").await.unwrap().is_none());
    assert_eq!(redis_clients(&url), before + 1, "and keeps using it");
}

/// Redis forgets every script on a restart, a `SCRIPT FLUSH`, or a failover to a replica that
/// never ran them: each scripted operation (`EVALSHA`, answered `NOSCRIPT`) loads its script
/// again and is carried out, rather than fail until the process restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scripted_operation_runs_after_redis_forgot_its_scripts() {
    let server = RedisServer::start();
    let store = connect(redis_config(server.url())).await;
    let forget = || assert!(server.command(&["SCRIPT", "FLUSH"]).starts_with("+OK"));
    forget();
    assert!(store.put_new("k", b"v1", LONG).await.unwrap());
    forget();
    assert!(store.compare_and_set("k", 1, b"v2", LONG).await.unwrap());
    forget();
    let set = store.compare_and_set_announced("k", 2, b"v3", LONG, "c", "h");
    assert!(set.await.unwrap());
    forget();
    assert!(store.delete_at("k", 3).await.unwrap());
    assert!(store.put_new("k", b"v1", LONG).await.unwrap());
    forget();
    assert!(store.delete_at_announced("k", 1, "c", "h").await.unwrap());
    assert!(store.put_new("k", b"v1", LONG).await.unwrap());
    forget();
    assert!(store.delete_announced("k", "c", "h").await.unwrap());
    forget();
    store.index_add("i", "m", until(LONG), T0).await.unwrap();
    assert_eq!(
        store.index_members("i").await.unwrap(),
        vec![("m".to_string(), until(LONG))]
    );
    assert!(store.try_lock("l", "t", LONG).await.unwrap());
    forget();
    assert!(store.extend_lock("l", "t", LONG).await.unwrap());
    forget();
    store.unlock("l", "t").await.unwrap();
    assert!(store.try_lock("l", "u", SHORT).await.unwrap(), "unlocked");
}

/// A key name as versions before this one wrote an index: a plain set (`SADD`) named by the
/// hash of its kind and value.
fn old_index(kind: &str, value: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update(b"\0")
        .chain_update(value)
        .finalize();
    format!("{PREFIX}{kind}:{}", hex::encode(digest))
}

/// Deployments upgrade with indexes in Redis in the old format (plain sets, no deadlines),
/// which a sorted set's commands answer with WRONGTYPE: the new indexes have names of their
/// own, and the old sets are still read, until they expire, by the session list, "sign out
/// everywhere" and back-channel logout. A login beside an old set works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_indexes_of_the_old_format_are_still_listed_and_ended() {
    let server = RedisServer::start();
    let manager = sessions(connect(redis_config(server.url())).await, Duration::ZERO);
    let session = session_with_tokens();
    let (sub, sid) = (session.sub.clone(), session.sid.clone().unwrap());
    let mut cookies = Vec::new();
    for _ in 0..2 {
        cookies.push(manager.create(session.clone(), T0).await.unwrap().0);
    }
    // Leave only what an older version would have written: its sets, and no new index.
    let (names, _) = dump(&server.url());
    for name in names
        .iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}s")))
    {
        let kind = server.command(&["TYPE", name]);
        if !kind.contains("zset") {
            continue;
        }
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(name)
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .unwrap();
        for member in &members {
            for old in [old_index("u", &sub), old_index("p", &sid)] {
                server.command(&["SADD", &old, member]);
                server.command(&["PEXPIRE", &old, "60000"]);
            }
        }
        server.command(&["DEL", name]);
    }
    assert_eq!(manager.list_for_sub(&sub, T0).await.unwrap().len(), 2);
    // A new login for the same user and provider session, beside the old sets.
    let (newest, _) = manager.create(session.clone(), T0 + 1).await.unwrap();
    assert_eq!(manager.list_for_sub(&sub, T0 + 1).await.unwrap().len(), 3);

    assert_eq!(manager.end_by_sid(&sid).await.unwrap(), 3);
    for cookie in cookies.iter().chain([&newest]) {
        assert!(manager.load(cookie, T0 + 2).await.unwrap().is_none());
    }
    let again = manager.create(session.clone(), T0 + 3).await.unwrap().0;
    let listed = manager.list_for_sub(&sub, T0 + 3).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        manager
            .end_by_handle(&sub, &listed[0].handle)
            .await
            .unwrap()
    );
    assert!(manager.load(&again, T0 + 4).await.unwrap().is_none());
}

/// With `max_per_user = 1`, two logins of one user at once (two tabs,
/// two replicas) beside the session the user already has each list the user's index after
/// both have written their entries (both see 3 > 1), and each ends the two oldest that are not
/// itself: the old one and the other new one. Both logins answer with a cookie, and the
/// user is left with no session at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logins_at_once_under_a_cap_of_one_leave_the_user_a_session() {
    let server = RedisServer::start();
    let replica = |store: Store| {
        let mut settings = SessionSettings::new(COOKIE, Keyring::new(keys()).unwrap());
        settings.max_per_user = 1;
        Sessions::new(settings, store)
    };
    let a = replica(connect(redis_config(server.url())).await);
    let b = replica(connect(redis_config(server.url())).await);
    let mut signed_out = 0;
    for round in 0..20 {
        let mut session = session_with_tokens();
        session.sub = format!("alice-{round}");
        session.sid = None;
        // The user's session on another device, from ten seconds before.
        a.create(session.clone(), T0 - 10).await.unwrap();
        let (first, second) = tokio::join!(a.create(session.clone(), T0), b.create(session, T0));
        let (first, second) = (first.unwrap().0, second.unwrap().0);
        let alive = [
            a.load(&first, T0).await.unwrap().is_some(),
            a.load(&second, T0).await.unwrap().is_some(),
        ];
        if alive == [false, false] {
            signed_out += 1;
        }
    }
    assert_eq!(
        signed_out, 0,
        "in {signed_out} of 20 rounds both logins succeeded and neither session exists"
    );
}
