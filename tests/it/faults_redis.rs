//! Redis outages with real `redis-server` processes failing on purpose, under a bounded load of
//! concurrent requests on two proxy replicas: killed (SIGKILL) and back with its append-only
//! file, stalled (SIGSTOP), its pub/sub connection lost, and a Sentinel and a Cluster master
//! failover. While Redis is out, a request is 503 `store_unavailable` within the store timeout —
//! never 401, never 500, never a hang — and `/readyz` says the store is down; afterwards every
//! session works again and none was lost. A refresh the provider has answered is never lost:
//! not to a store failure at its save, not to a replica shutting down while it is under way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::fake_idp;
use crate::support::late_replies::LateReplies;
use crate::support::redis::{RedisCluster, RedisServer, count_keys};
use crate::support::*;
use http_body_util::BodyExt as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vestibule::jose::testing::{TestKey, TestSigner};
use vestibule::session::Session;

/// `[session.redis] timeout` in these tests.
pub(crate) const STORE_TIMEOUT: Duration = Duration::from_millis(300);
/// What a loaded 2-core machine may add to it (scheduling, the reply itself).
const SLACK: Duration = Duration::from_millis(600);
/// A request that takes this long is a hang.
const HANG: Duration = Duration::from_secs(5);
const PREFIX: &str = "vestibule:";
const SESSIONS: usize = 12;

/// The store section of a proxy's configuration.
#[derive(Clone)]
enum Backend {
    Url(String),
    Sentinel(String, String),
    Cluster(Vec<String>),
}

impl Backend {
    fn toml(&self) -> String {
        let quoted = |v: &[String]| {
            v.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let target = match self {
            Backend::Url(url) => format!("url = \"{url}\""),
            Backend::Sentinel(master, node) => {
                format!("sentinel = {{ master = \"{master}\", nodes = [\"{node}\"] }}")
            }
            Backend::Cluster(nodes) => format!("cluster = [{}]", quoted(nodes)),
        };
        format!(
            "store = \"redis\"\ncache_ttl = \"{cache}\"\n[session.redis]\n{target}\ntimeout = \"{ms}ms\"\n",
            cache = "30s",
            ms = STORE_TIMEOUT.as_millis()
        )
    }
}

/// Two replicas on one store, behind a provider that is up (so `/readyz` is about the store).
struct Replicas {
    proxies: Vec<Proxy>,
    _idp: fake_idp::FakeIdp,
    _upstream: upstream::Upstream,
}

async fn replicas(backend: &Backend) -> Replicas {
    replicas_on([backend.clone(), backend.clone()]).await
}

/// Replicas (two, mostly), each with its own view of the store (e.g. another Redis user).
async fn replicas_on<const N: usize>(backends: [Backend; N]) -> Replicas {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let upstream = upstream::start().await;
    let mut proxies = Vec::new();
    for backend in backends {
        let extra = format!(
            "{}[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\nauth = \"required\"\n",
            backend.toml(),
            upstream.url()
        );
        let text = config_toml(&extra).set("oidc.issuer", idp.issuer.as_str());
        let proxy = start_proxy(&text).await;
        wait_ready(&proxy).await;
        proxies.push(proxy);
    }
    Replicas {
        proxies,
        _idp: idp,
        _upstream: upstream,
    }
}

impl Replicas {
    /// `SESSIONS` new sessions (through the first replica); their `Cookie` headers.
    async fn sessions(&self) -> Vec<String> {
        let app = &self.proxies[0].app;
        let mut cookies = Vec::new();
        for i in 0..SESSIONS {
            let session = Session {
                sub: format!("user-{i}"),
                ..Session::default()
            };
            cookies.push(session_cookie(app, session).await);
        }
        cookies
    }

    fn urls(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.url("/api/x")).collect()
    }

    /// `/readyz`'s store check on every replica; `/healthz` (liveness) answers 200 all the same,
    /// so that a Redis outage never has the orchestrator restart every replica.
    async fn store_ready(&self) -> Vec<bool> {
        let mut all = Vec::new();
        for proxy in &self.proxies {
            let live = get(&format!("http://{}/healthz", proxy.admin), &[]).await;
            assert_eq!(live.status, 200, "healthz: {}", live.text());
            let reply = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
            let store = reply.json()["checks"]["store"].as_bool().unwrap();
            assert_eq!(
                reply.status == 200,
                store,
                "readyz: {} (the provider is up)",
                reply.text()
            );
            all.push(store);
        }
        all
    }

    /// Waits until every session answers 200 on every replica.
    async fn all_sessions_work(&self, cookies: &[String], within: Duration) {
        eventually("every session works on every replica", within, || async {
            for url in self.urls() {
                for cookie in cookies {
                    if get(&url, &[("cookie", cookie)]).await.status != 200 {
                        return None;
                    }
                }
            }
            Some(())
        })
        .await;
    }
}

/// What one request of the load got.
#[derive(Debug, Clone)]
struct Outcome {
    /// 0: no answer within `HANG`; 1: the connection failed.
    status: u16,
    code: String,
    took: Duration,
    ended: Instant,
    /// Which of the load's cookies it presented.
    session: usize,
    /// Whether the answer set (or cleared) a cookie.
    set_cookie: bool,
}

/// A bounded loop of concurrent requests, round robin over replicas and sessions.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(urls: Vec<String>, cookies: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let tasks = (0..6)
            .map(|_| {
                let (urls, cookies) = (urls.clone(), cookies.clone());
                let (stop, outcomes, next) = (stop.clone(), outcomes.clone(), next.clone());
                tokio::spawn(async move {
                    let client = client();
                    // Bounded: at most this many requests per task, whatever happens.
                    for _ in 0..5_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let session = (i / urls.len()) % cookies.len();
                        let req = http::Request::get(&urls[i % urls.len()])
                            .header("cookie", &cookies[session])
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        let started = Instant::now();
                        let mut set_cookie = false;
                        let outcome = match tokio::time::timeout(HANG, client.request(req)).await {
                            Err(_) => (0, String::new()),
                            Ok(Err(_)) => (1, String::new()),
                            Ok(Ok(response)) => {
                                use http_body_util::BodyExt;
                                let status = response.status().as_u16();
                                set_cookie = response.headers().contains_key("set-cookie");
                                let body = response.into_body().collect().await;
                                let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                                let code = serde_json::from_slice::<serde_json::Value>(&body)
                                    .ok()
                                    .and_then(|v| v["error"].as_str().map(String::from))
                                    .unwrap_or_default();
                                (status, code)
                            }
                        };
                        outcomes.lock().unwrap().push(Outcome {
                            status: outcome.0,
                            code: outcome.1,
                            took: started.elapsed(),
                            ended: Instant::now(),
                            session,
                            set_cookie,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            tasks,
        }
    }

    fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Waits until `more` further requests have completed.
    async fn run_for(&self, more: usize) {
        let target = self.count() + more;
        eventually("the load makes progress", HANG * 2, || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.outcomes)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// Every outcome is a 200 or a 503 `store_unavailable`, answered within the store timeout (plus
/// slack); returns how many were 503.
fn assert_only_ok_or_store_unavailable(outcomes: &[Outcome]) -> usize {
    let mut unavailable = 0;
    for o in outcomes {
        match (o.status, o.code.as_str()) {
            (200, _) => {}
            (503, "store_unavailable") => unavailable += 1,
            _ => panic!("a request got {} {:?} after {:?}", o.status, o.code, o.took),
        }
        assert!(
            o.took <= STORE_TIMEOUT + SLACK,
            "a request took {:?} ({} {})",
            o.took,
            o.status,
            o.code
        );
    }
    unavailable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_is_503_fast_and_every_session_comes_back_with_its_aof() {
    let mut redis = RedisServer::start_durable();
    let replicas = replicas(&Backend::Url(redis.url())).await;
    let cookies = replicas.sessions().await;
    let sessions_before = count_keys(redis.port(), &format!("{PREFIX}s:*"));
    assert_eq!(sessions_before, SESSIONS);

    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(50).await;
    redis.kill();
    eventually("both replicas report the store down", HANG, || async {
        (replicas.store_ready().await == [false, false]).then_some(())
    })
    .await;
    let down = Instant::now();
    load.run_for(60).await;
    // Down until the restart begins: `restart` returns once the server answers, and requests
    // that the restarted server served in between must not count as answered while down.
    let restarting = Instant::now();
    redis.restart();
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(2))
        .await;
    assert_eq!(replicas.store_ready().await, [true, true]);
    load.run_for(30).await;
    let outcomes = load.finish().await;

    let unavailable = assert_only_ok_or_store_unavailable(&outcomes);
    let while_down: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.ended > down + STORE_TIMEOUT + SLACK && o.ended < restarting)
        .collect();
    assert!(
        while_down.len() >= 30,
        "too few requests while down: {}",
        while_down.len()
    );
    assert!(
        while_down.iter().all(|o| o.status == 503),
        "a request succeeded while Redis was down: the session cache answered without the store"
    );
    assert!(unavailable >= while_down.len());
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}s:*")),
        sessions_before,
        "sessions before and after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_answers_503_within_the_store_timeout_and_recovers() {
    let redis = RedisServer::start();
    let replicas = replicas(&Backend::Url(redis.url())).await;
    let cookies = replicas.sessions().await;
    // Half the sessions are in use (and so in the replicas' caches), half are not.
    let (busy, idle) = cookies.split_at(SESSIONS / 2);
    let load = Load::start(replicas.urls(), busy.to_vec());
    load.run_for(30).await;

    redis.signal("STOP");
    let stalled = Instant::now();
    eventually("both replicas report the store down", HANG, || async {
        (replicas.store_ready().await == [false, false]).then_some(())
    })
    .await;
    for url in replicas.urls() {
        for cookie in idle {
            let started = Instant::now();
            let reply = get(&url, &[("cookie", cookie)]).await;
            assert_eq!(
                (reply.status, reply.json()["error"].as_str()),
                (503, Some("store_unavailable"))
            );
            assert!(started.elapsed() <= STORE_TIMEOUT + SLACK);
        }
    }
    load.run_for(20).await;
    assert!(stalled.elapsed() > STORE_TIMEOUT);
    redis.signal("CONT");
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(2))
        .await;
    assert_eq!(replicas.store_ready().await, [true, true]);
    let outcomes = load.finish().await;
    assert_only_ok_or_store_unavailable(&outcomes);
}

/// Redis across a real network link that goes dead — a partition, a failed switch: packets
/// lost both ways, no RST, no FIN, new connections unanswered — for longer than TCP's first
/// retransmissions. Meanwhile requests are 503 within the store timeout (a connection attempt
/// into the dead link included); once the link is back, every session works again within a
/// couple of seconds, not whenever the backed-off retransmission timer of a connection opened
/// before the cut next fires, and none was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_behind_a_dead_link_is_503_fast_and_every_session_is_back_soon_after_the_link() {
    let mut host = crate::support::netns::NetHost::start();
    let url = host.start_redis();
    let replicas = replicas(&Backend::Url(url)).await;
    let cookies = replicas.sessions().await;
    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(50).await;
    host.partition();
    eventually("both replicas report the store down", HANG, || async {
        (replicas.store_ready().await == [false, false]).then_some(())
    })
    .await;
    // Long enough for the retransmission timer of a connection opened before the cut to back
    // off past several seconds.
    tokio::time::sleep(Duration::from_secs(8)).await;
    load.run_for(30).await;
    host.heal();
    let healed = Instant::now();
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(10))
        .await;
    let back = healed.elapsed();
    assert!(
        back <= Duration::from_secs(2),
        "every session worked again only {back:?} after the link was back"
    );
    eventually(
        "both replicas report the store up",
        Duration::from_secs(2),
        || async { (replicas.store_ready().await == [true, true]).then_some(()) },
    )
    .await;
    load.run_for(30).await;
    let outcomes = load.finish().await;
    assert_only_ok_or_store_unavailable(&outcomes);
}

/// The test's own connection to Redis.
fn redis_connection(redis: &RedisServer) -> ::redis::Connection {
    ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn pubsub_clients(con: &mut ::redis::Connection) -> usize {
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(con)
        .unwrap();
    list.lines().filter(|l| !l.trim().is_empty()).count()
}

fn acl(con: &mut ::redis::Connection, args: &[&str]) {
    let _: () = ::redis::cmd("ACL").arg(args).query(con).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pubsub_connection_keeps_sessions_out_of_the_cache_until_it_is_back() {
    let redis = RedisServer::start();
    let mut con = redis_connection(&redis);
    // Each replica is its own Redis user, so that one can lose its subscription alone.
    acl(
        &mut con,
        &["SETUSER", "a", "on", ">pa", "~*", "&*", "+@all"],
    );
    acl(
        &mut con,
        &["SETUSER", "b", "on", ">pb", "~*", "&*", "+@all"],
    );
    let user = |name: &str| {
        Backend::Url(
            redis
                .url()
                .replace("redis://", &format!("redis://{name}:p{name}@")),
        )
    };
    let replicas = replicas_on([user("a"), user("b")]).await;
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookies = replicas.sessions().await;
    let cookie = &cookies[0];
    let url = a.url("/api/x");
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);
    assert_eq!(pubsub_clients(&mut con), 2);

    // Revoking a's channels drops its subscription and refuses new ones, while its commands keep
    // working: the invalidation messages are lost to it, the store is not.
    acl(&mut con, &["SETUSER", "a", "resetchannels"]);
    eventually(
        "replica a tries to subscribe again and is refused",
        HANG,
        || {
            let log: Vec<::redis::Value> = ::redis::cmd("ACL").arg("LOG").query(&mut con).unwrap();
            async move { (!log.is_empty()).then_some(()) }
        },
    )
    .await;
    assert_eq!(pubsub_clients(&mut con), 1);

    // Read again while messages cannot arrive, then ended on the other replica.
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);
    assert_eq!(b.app.sessions.end_by_sub("user-0").await.unwrap(), 1);
    let reply = get(&url, &[("cookie", cookie)]).await;
    assert_eq!(
        reply.status, 401,
        "an ended session was served from the cache while pub/sub was down"
    );

    // Back: the cache is used again (a session removed behind its back is still served).
    acl(&mut con, &["SETUSER", "a", "allchannels"]);
    eventually("replica a subscribes again", HANG, || {
        let n = pubsub_clients(&mut con);
        async move { (n == 2).then_some(()) }
    })
    .await;
    eventually("the cache is in use again", HANG, || async {
        let session = Session {
            sub: "carol".into(),
            ..Session::default()
        };
        let cookie = b.session_cookie(session).await;
        let mut direct = redis_connection(&redis);
        served_from_cache(&url, &cookie, &mut direct)
            .await
            .then_some(())
    })
    .await;
}

/// Reads of session records, whole or their version alone, that Redis has answered so far.
fn record_reads(con: &mut ::redis::Connection) -> u64 {
    let stats: String = ::redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    ["cmdstat_hget:calls=", "cmdstat_hmget:calls="]
        .iter()
        .filter_map(|name| stats.lines().find_map(|line| line.strip_prefix(name)))
        .map(|rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Whether `url` serves `cookie`'s session from the proxy's cache: 200, then 200 again with no
/// read of a session record at the store (`con`) in between. (A session removed behind the
/// proxies' backs is no test of that: Redis announces the removal.)
async fn served_from_cache(url: &str, cookie: &str, con: &mut ::redis::Connection) -> bool {
    if get(url, &[("cookie", cookie)]).await.status != 200 {
        return false;
    }
    let before = record_reads(con);
    get(url, &[("cookie", cookie)]).await.status == 200 && record_reads(con) == before
}

/// Reads an event stream until `needle` appears; panics at the deadline.
async fn wait_for_event(body: &mut hyper::body::Incoming, needle: &str, within: Duration) {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + within;
    while !seen.contains(needle) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in time; got {seen:?}"));
        let Some(frame) = frame else {
            panic!("the stream ended without {needle:?}; got {seen:?}");
        };
        if let Ok(data) = frame.unwrap().into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

/// A stream waits on its own session's messages only (`session/manager/watches.rs`); one lost
/// while the subscription was down is made up for by the "anything may have changed" message
/// of the reconnection, which has every watch read its session: the stream of a session ended
/// meanwhile ends then, not at its next 15 s check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_session_ended_while_pubsub_was_down_ends_once_it_is_back() {
    let redis = RedisServer::start();
    let mut con = redis_connection(&redis);
    acl(
        &mut con,
        &["SETUSER", "a", "on", ">pa", "~*", "&*", "+@all"],
    );
    let user = |name: &str| {
        Backend::Url(
            redis
                .url()
                .replace("redis://", &format!("redis://{name}:p{name}@")),
        )
    };
    let replicas = replicas_on([user("a"), Backend::Url(redis.url())]).await;
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookies = replicas.sessions().await;
    // Another session's stream, open throughout: it must not end.
    let open = |cookie: &str| {
        let request = http::Request::get(a.url("/bff/session-events"))
            .header("cookie", cookie)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        client().request(request)
    };
    let mut other = open(&cookies[1]).await.unwrap().into_body();
    wait_for_event(&mut other, ": connected", HANG).await;

    acl(&mut con, &["SETUSER", "a", "resetchannels"]);
    eventually("replica a is refused its subscription", HANG, || {
        let log: Vec<::redis::Value> = ::redis::cmd("ACL").arg("LOG").query(&mut con).unwrap();
        async move { (!log.is_empty()).then_some(()) }
    })
    .await;
    let opened = Instant::now();
    let mut events = open(&cookies[0]).await.unwrap().into_body();
    wait_for_event(&mut events, ": connected", HANG).await;
    // Ended through the other replica: the message does not reach a.
    assert_eq!(b.app.sessions.end_by_sub("user-0").await.unwrap(), 1);

    acl(&mut con, &["SETUSER", "a", "allchannels"]);
    wait_for_event(&mut events, "event: ended", Duration::from_secs(10)).await;
    assert!(
        opened.elapsed() < Duration::from_secs(15),
        "ended by its 15 s check, not by the reconnection"
    );
    // The other stream read its session too, found it, and goes on.
    let mut seen = String::new();
    while let Ok(Some(Ok(frame))) =
        tokio::time::timeout(Duration::from_millis(500), other.frame()).await
    {
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(
        !seen.contains("ended"),
        "another session's stream ended: {seen:?}"
    );
}

/// Two replicas on one Redis, the first through the test relay, and their sessions.
async fn relayed_replicas() -> (RedisServer, LateReplies, Replicas, Vec<String>) {
    let redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let replicas = replicas_on([Backend::Url(relay.url()), Backend::Url(redis.url())]).await;
    let cookies = replicas.sessions().await;
    (redis, relay, replicas, cookies)
}

/// A subscription that dies without a word — its socket half-open, the connection still there
/// and silent, so neither Redis nor the replica notices — loses every invalidation message. A
/// session ended on the other replica must not stay served from this one's cache for the
/// cache's time to live (30 s here): the cache trusts a copy only while the subscription has
/// lately proven that it delivers (an answered check, every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_gone_silent_does_not_keep_an_ended_session_served_from_the_cache() {
    let (_redis, relay, replicas, cookies) = relayed_replicas().await;
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookie = &cookies[0];
    let url = a.url("/api/x");
    // Replica a reads the session and keeps a copy.
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);

    // a's subscription goes silent; its commands still get through.
    assert_eq!(relay.silence(b"PSUBSCRIBE", Duration::from_secs(60)), 1);
    let silenced = Instant::now();
    assert_eq!(b.app.sessions.end_by_sub("user-0").await.unwrap(), 1);
    // Past the proof's age limit (2 s) from the silence, well within the time to live, and
    // (before the check ran every second) within the check's 10 s.
    tokio::time::sleep_until((silenced + Duration::from_millis(2300)).into()).await;
    let reply = get(&url, &[("cookie", cookie)]).await;
    assert_eq!(
        reply.status, 401,
        "a session ended on another replica was served from the cache of a replica whose \
         subscription had gone silent"
    );
    // Another session, never ended, is still served.
    assert_eq!(get(&url, &[("cookie", &cookies[1])]).await.status, 200);
}

/// A logout whose delete is carried out, the connection lost right after it: the message that
/// tells the other replicas to drop their copies must not be lost with it. It is published in
/// the same step as the delete, not as a command of its own after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_just_after_a_logout_does_not_leave_the_session_cached_elsewhere() {
    let (redis, relay, replicas, cookies) = relayed_replicas().await;
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookie = &cookies[0];
    let url = b.url("/api/x");
    // Replica b reads the session and keeps a copy (for 30 s).
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);
    assert_eq!(get(&url, &[("cookie", cookie)]).await.status, 200);

    // Replica a ends it; its connection to Redis fails just before a PUBLISH command would go.
    relay.cut_before(b"$7\r\nPUBLISH\r\n");
    let _ = a.app.sessions.end_by_sub("user-0").await;
    assert_eq!(
        session_keys(&redis).len(),
        SESSIONS - 1,
        "the session was ended"
    );
    let reply = get(&url, &[("cookie", cookie)]).await;
    assert_eq!(
        reply.status,
        401,
        "a session ended on another replica stayed served from this one's cache (the message \
         was lost with the connection: cut {})",
        relay.was_cut()
    );
}

fn session_keys(redis: &RedisServer) -> Vec<String> {
    let mut con = redis_connection(redis);
    ::redis::cmd("KEYS")
        .arg(format!("{PREFIX}s:*"))
        .query(&mut con)
        .unwrap()
}

/// Once `replica` is in sync with the master at `master`: a Sentinel watching that master as
/// `main` and knowing the replica, two proxy replicas on it, and sessions that reached the
/// replica (their cookies).
async fn sentinel_over(
    (host, port): (&str, u16),
    replica: &RedisServer,
) -> (RedisServer, Replicas, Vec<String>) {
    eventually("the replica is in sync", HANG, || async {
        replica.in_sync().then_some(())
    })
    .await;
    let sentinel =
        RedisServer::start_quick_sentinel_at(host, port, "main", Duration::from_millis(500));
    eventually("the sentinel knows the replica", HANG, || async {
        let replicas = sentinel.command(&["SENTINEL", "REPLICAS", "main"]);
        replicas.contains(&replica.port().to_string()).then_some(())
    })
    .await;
    let replicas = replicas(&Backend::Sentinel("main".into(), sentinel.url())).await;
    let cookies = replicas.sessions().await;
    eventually("the sessions reached the replica", HANG, || async {
        (count_keys(replica.port(), &format!("{PREFIX}s:*")) == SESSIONS).then_some(())
    })
    .await;
    (sentinel, replicas, cookies)
}

/// Waits for the Sentinel to make `replica` the master.
async fn promoted(replica: &RedisServer) {
    eventually(
        "the sentinel promoted the replica",
        Duration::from_secs(20),
        || async { replica.command(&["ROLE"]).contains("master").then_some(()) },
    )
    .await;
}

/// Runs the load a little longer and ends it: nothing but 200 or 503 `store_unavailable`, and
/// every session is on the promoted `replica`.
async fn every_session_kept(load: Load, replica: &RedisServer) {
    load.run_for(30).await;
    let outcomes = load.finish().await;
    assert_only_ok_or_store_unavailable(&outcomes);
    assert_eq!(
        count_keys(replica.port(), &format!("{PREFIX}s:*")),
        SESSIONS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_sentinel_failover_and_requests_resume() {
    // Without the default 5 s wait for more replicas before a diskless sync, the replica is in
    // sync at once rather than after about 5 s.
    let mut master =
        RedisServer::start_with(&["--appendonly", "yes", "--repl-diskless-sync-delay", "0"]);
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    let (_sentinel, replicas, cookies) =
        sentinel_over(("127.0.0.1", master.port()), &replica).await;

    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(30).await;
    master.kill();
    let killed = Instant::now();
    promoted(&replica).await;
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(10))
        .await;
    eprintln!(
        "sentinel failover: requests resumed {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(replicas.store_ready().await, [true, true]);
    every_session_kept(load, &replica).await;
}

/// A Sentinel setup whose master is cut off by a dead link (a partition: no RST, no FIN) while
/// the Sentinel and a replica are on this side. The Sentinel fails over to the replica; the
/// connections into the dead link are let go of within the store timeout rather than waited on
/// until TCP gives up, so every session works again within a couple of seconds of the
/// promotion, none lost, and nothing but 200 or 503 `store_unavailable` meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_cut_off_by_a_dead_link_fails_over_and_no_session_is_lost() {
    let mut host = crate::support::netns::NetHost::start();
    host.start_redis_with(&["--repl-diskless-sync-delay", "0"]);
    let master = host.address.to_string();
    let replica = RedisServer::start_with(&[
        "--replicaof",
        &master,
        "6379",
        "--replica-announce-ip",
        "127.0.0.1",
    ]);
    let (_sentinel, replicas, cookies) = sentinel_over((&master, 6379), &replica).await;

    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(30).await;
    host.partition();
    let cut = Instant::now();
    promoted(&replica).await;
    let promoted = Instant::now();
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(10))
        .await;
    let back = promoted.elapsed();
    eprintln!(
        "sentinel failover across a dead link: promoted {:?} after the cut, sessions back {back:?} \
         after that",
        promoted - cut
    );
    assert!(
        back <= Duration::from_secs(3),
        "every session worked again only {back:?} after the promotion"
    );
    eventually(
        "both replicas report the store up",
        Duration::from_secs(2),
        || async { (replicas.store_ready().await == [true, true]).then_some(()) },
    )
    .await;
    every_session_kept(load, &replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_cluster_master_failover_and_requests_resume() {
    let mut cluster = RedisCluster::start(3, Duration::from_millis(1000));
    let replicas = replicas(&Backend::Cluster(cluster.urls())).await;
    let cookies = replicas.sessions().await;
    let count = |cluster: &RedisCluster| -> usize {
        cluster
            .masters()
            .into_iter()
            .map(|i| count_keys(cluster.nodes[i].port(), &format!("{PREFIX}s:*")))
            .sum()
    };
    assert_eq!(count(&cluster), SESSIONS);
    eventually("the replicas are in sync", HANG, || async {
        cluster.settled().then_some(())
    })
    .await;

    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(30).await;
    // The master holding the most sessions.
    let victim = cluster
        .masters()
        .into_iter()
        .max_by_key(|&i| count_keys(cluster.nodes[i].port(), &format!("{PREFIX}s:*")))
        .unwrap();
    cluster.nodes[victim].kill();
    let killed = Instant::now();
    eventually("a replica took over", Duration::from_secs(20), || async {
        (cluster.masters().len() == 3 && cluster.settled()).then_some(())
    })
    .await;
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(10))
        .await;
    eprintln!(
        "cluster failover: requests resumed {:?} after the kill",
        killed.elapsed()
    );
    eventually(
        "both replicas report the store up",
        Duration::from_secs(5),
        || async { (replicas.store_ready().await == [true, true]).then_some(()) },
    )
    .await;
    eprintln!(
        "cluster failover: ready again {:?} after the kill",
        killed.elapsed()
    );
    load.run_for(30).await;
    let outcomes = load.finish().await;
    assert_only_ok_or_store_unavailable(&outcomes);
    assert_eq!(
        count(&cluster),
        SESSIONS,
        "sessions before and after the failover"
    );
}

/// Sessions made through the first replica until at least four are on the far node of
/// `cluster` and four on the near ones: their cookies, far ones first, and how many are far.
async fn sessions_far_and_near(
    replicas: &Replicas,
    cluster: &crate::support::netns::LinkedCluster,
) -> (Vec<String>, usize) {
    let pattern = format!("{PREFIX}s:*");
    let (mut far, mut near) = (Vec::new(), Vec::new());
    for i in 0..200 {
        if far.len() >= 4 && near.len() >= 4 {
            break;
        }
        let before = cluster.count_keys(cluster.far(), &pattern);
        let session = Session {
            sub: format!("user-{i}"),
            ..Session::default()
        };
        let cookie = session_cookie(&replicas.proxies[0].app, session).await;
        if cluster.count_keys(cluster.far(), &pattern) > before {
            far.push(cookie);
        } else if near.len() < 8 {
            near.push(cookie);
        }
    }
    assert!(far.len() >= 4 && near.len() >= 4, "sessions on both sides");
    let on_far = far.len();
    far.extend(near);
    (far, on_far)
}

/// The number of sessions on every node of `cluster`.
fn cluster_sessions(cluster: &crate::support::netns::LinkedCluster) -> usize {
    let pattern = format!("{PREFIX}s:*");
    cluster
        .addresses()
        .into_iter()
        .map(|a| cluster.count_keys(a, &pattern))
        .sum()
}

/// A session of `sub` made through `proxy` whose record is on the far node of `cluster`: its
/// cookie. (Those made on the way, on the near nodes, are of `sub` too.)
async fn far_session(
    proxy: &Proxy,
    cluster: &crate::support::netns::LinkedCluster,
    sub: &str,
) -> String {
    let pattern = format!("{PREFIX}s:*");
    for _ in 0..100 {
        let before = cluster.count_keys(cluster.far(), &pattern);
        let session = Session {
            sub: sub.to_owned(),
            ..Session::default()
        };
        let cookie = proxy.session_cookie(session).await;
        if cluster.count_keys(cluster.far(), &pattern) > before {
            return cookie;
        }
    }
    panic!("no session on the far node");
}

/// A Redis Cluster master across a real network link that goes dead — a partition, a failed
/// switch: packets lost both ways, no RST, no FIN — and heals before the cluster fails it over.
/// The replicas' subscriptions are to that node (the first of the list), so the cut takes them
/// down, and the session caches with them, until they are made again to a node this side.
/// Meanwhile a request for a session on the far node is 503 within the store timeout, one on
/// the other nodes is served, and no answer sets or clears a cookie. Once the link is back,
/// every session works again within a couple of seconds — not whenever the backed-off
/// retransmission timer of the node's connection, opened before the cut, next fires — and none
/// was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_behind_a_dead_link_is_503_fast_and_its_sessions_are_back_soon_after_the_link()
 {
    let cluster = crate::support::netns::LinkedCluster::start();
    let replicas = replicas(&Backend::Cluster(cluster.urls())).await;
    let (cookies, on_far) = sessions_far_and_near(&replicas, &cluster).await;
    let made = cluster_sessions(&cluster);
    let mut live: Vec<_> = replicas
        .proxies
        .iter()
        .map(|p| p.app.sessions.store().subscription_live())
        .collect();
    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(50).await;

    cluster.host.partition();
    let cut = Instant::now();
    for live in &mut live {
        tokio::time::timeout(HANG, live.wait_for(|up| !*up))
            .await
            .expect("the subscription's check notices the dead link")
            .unwrap();
    }
    // From here on no cache holds a session on the far node: every request for one reads the
    // store.
    let lost = Instant::now();
    let resubscribed: Vec<_> = live
        .into_iter()
        .map(|mut live| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), live.wait_for(|up| *up))
                    .await
                    .expect("the subscription is back")
                    .map(drop)
                    .unwrap();
                Instant::now()
            })
        })
        .collect();
    // Long enough for the retransmission timer of a connection opened before the cut to back
    // off past several seconds.
    tokio::time::sleep(Duration::from_secs(8)).await;
    load.run_for(30).await;
    cluster.host.heal();
    let healed = Instant::now();
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(20))
        .await;
    let back = healed.elapsed();
    let mut subscribed = Vec::new();
    for at in resubscribed {
        subscribed.push(at.await.unwrap());
    }
    load.run_for(30).await;
    let outcomes = load.finish().await;

    // Not asserted, told: how soon after the heal a logout on the far node reaches the cache
    // of the other replica, whose subscription is now to a node this side (Redis passes the
    // message on over its cluster bus, across the link that was cut).
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookie = far_session(b, &cluster, "dave").await;
    let at_a = a.url("/api/x");
    assert_eq!(get(&at_a, &[("cookie", &cookie)]).await.status, 200);
    let ended = Instant::now();
    assert!(b.app.sessions.end_by_sub("dave").await.unwrap() >= 1);
    while get(&at_a, &[("cookie", &cookie)]).await.status == 200
        && ended.elapsed() < Duration::from_secs(40)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let invalidated = ended.elapsed();

    assert_only_ok_or_store_unavailable(&outcomes);
    let while_cut: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.ended > lost + STORE_TIMEOUT + SLACK && o.ended < healed)
        .collect();
    let far: Vec<&Outcome> = while_cut
        .iter()
        .copied()
        .filter(|o| o.session < on_far)
        .collect();
    // Before, during and after the cut, the replacement of the cluster connection included.
    let near: Vec<&Outcome> = outcomes.iter().filter(|o| o.session >= on_far).collect();
    let served = |all: &[&Outcome]| all.iter().filter(|o| o.status == 200).count();
    eprintln!(
        "cluster node behind a dead link: subscriptions lost {:?} after the cut, back {:?} after \
         that ({:?} before the heal); while cut, {}/{} requests for the far node's sessions \
         served; {}/{} for the others' in all; every session back {back:?} after the heal; a \
         logout on the far node reached the other replica's cache {invalidated:?} after it, \
         {:?} after the heal",
        lost - cut,
        subscribed.iter().map(|&at| at - lost).collect::<Vec<_>>(),
        subscribed
            .iter()
            .map(|&at| healed.saturating_duration_since(at))
            .collect::<Vec<_>>(),
        served(&far),
        far.len(),
        served(&near),
        near.len(),
        ended + invalidated - healed,
    );
    assert!(
        far.len() >= 10 && near.len() >= 10,
        "too few requests while cut"
    );
    assert_eq!(
        served(&far),
        0,
        "a session on the far node was served while cut off and uncached"
    );
    assert_eq!(
        served(&near),
        near.len(),
        "a session on a node still reachable was refused (another node cut off, or the \
         connection replaced)"
    );
    assert!(
        outcomes.iter().all(|o| !o.set_cookie),
        "an answer set or cleared a cookie"
    );
    assert_eq!(
        cluster_sessions(&cluster),
        made,
        "sessions before and after"
    );
    assert!(
        back <= Duration::from_secs(2),
        "every session worked again only {back:?} after the link was back"
    );
    assert!(
        subscribed.iter().all(|&at| at < healed),
        "a subscription was down for the whole cut, though the nodes this side carry every \
         message: back only {:?} after the heal",
        subscribed.iter().map(|&at| at - healed).collect::<Vec<_>>()
    );
}

/// A Redis Cluster master cut off by a dead link (a partition: no RST, no FIN) and failed over
/// to its replica on this side. No `MOVED` answer can come from a node nobody reaches, so a
/// cluster connection that only follows the redirections of the nodes sends its slots'
/// commands into the dead link until TCP gives up on it, minutes later. A new one, made after
/// the first command that got no answer, reads the slot map again: every session works again
/// within a few seconds of the promotion (one attempt a second, each waiting out the connection
/// timeout of the node cut off, and the nodes' own news of the promotion), none lost, and
/// nothing but 200 or 503 `store_unavailable` meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_cut_off_by_a_dead_link_fails_over_and_its_sessions_are_back_soon_after() {
    let cluster =
        crate::support::netns::LinkedCluster::start_with_far_replica(Duration::from_millis(2_000));
    let replica = cluster.replica().unwrap();
    let replicas = replicas(&Backend::Cluster(cluster.urls())).await;
    let (cookies, on_far) = sessions_far_and_near(&replicas, &cluster).await;
    let pattern = format!("{PREFIX}s:*");
    eventually("the replica has the far node's sessions", HANG, || async {
        (cluster.count_keys(replica, &pattern) == cluster.count_keys(cluster.far(), &pattern))
            .then_some(())
    })
    .await;
    let made = cluster_sessions(&cluster);
    let load = Load::start(replicas.urls(), cookies.clone());
    load.run_for(30).await;

    cluster.host.partition();
    let cut = Instant::now();
    eventually("the replica took over", Duration::from_secs(20), || async {
        cluster.replica_took_over().then_some(())
    })
    .await;
    let promoted = Instant::now();
    replicas
        .all_sessions_work(&cookies, Duration::from_secs(20))
        .await;
    let back = promoted.elapsed();
    eprintln!(
        "cluster failover behind a dead link: promoted {:?} after the cut; every session back \
         {back:?} after that ({on_far} of {} on the far node)",
        promoted - cut,
        cookies.len(),
    );
    load.run_for(30).await;
    let outcomes = load.finish().await;
    assert_only_ok_or_store_unavailable(&outcomes);
    assert!(
        outcomes.iter().all(|o| !o.set_cookie),
        "an answer set or cleared a cookie"
    );
    let after: usize = cluster
        .addresses()
        .into_iter()
        .skip(1)
        .chain([replica])
        .map(|a| cluster.count_keys(a, &pattern))
        .sum();
    assert_eq!(after, made, "sessions before and after the failover");
    assert!(
        back <= Duration::from_secs(3),
        "every session worked again only {back:?} after the promotion"
    );
}

/// A proxy on `redis_url` (store timeout [`STORE_TIMEOUT`]) behind `idp`, with a `/tok/` route
/// that is sent the user's token, to `up`.
pub(crate) async fn token_proxy(
    redis_url: &str,
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
) -> Proxy {
    redis_proxy(redis_url, "5s", idp, up).await
}

/// A proxy on `redis_url` (store timeout [`STORE_TIMEOUT`], session cache `cache_ttl`) behind
/// `idp`, with `/api/` (a session required, no token) and `/tok/` (the user's token) routes to
/// `up`.
pub(crate) async fn redis_proxy(
    redis_url: &str,
    cache_ttl: &str,
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
) -> Proxy {
    redis_proxy_timed(redis_url, cache_ttl, STORE_TIMEOUT, &[], idp, up).await
}

/// [`redis_proxy`] with the store timeout `timeout`, and the configuration keys `added`.
pub(crate) async fn redis_proxy_timed(
    redis_url: &str,
    cache_ttl: &str,
    timeout: Duration,
    added: &[(&str, &str)],
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
) -> Proxy {
    let extra = format!(
        "store = \"redis\"\ncache_ttl = \"{cache_ttl}\"\n[session.redis]\nurl = \"{redis_url}\"\n\
         timeout = \"{ms}ms\"\n\
         [[routes]]\npath = \"/api/\"\nupstream = \"{u}\"\nauth = \"required\"\n\
         [[routes]]\npath = \"/tok/\"\nupstream = \"{u}\"\ntoken = \"user\"\n",
        ms = timeout.as_millis(),
        u = up.url()
    );
    let mut text = config_toml(&extra)
        .set("oidc.issuer", idp.issuer.as_str())
        .set("server.request_timeout", "30s");
    for (path, value) in added {
        text = text.add(path, *value);
    }
    let proxy = start_proxy(&text).await;
    wait_ready(&proxy).await;
    proxy
}

/// Alice's session, made in the store, whose access token `at-1` is due and whose refresh token
/// is `rt-1`; the provider rotates it: rt-1 gives `at-2` and `rt-2`, then `rotated_then` (the
/// answer to any later refresh).
pub(crate) async fn due_session(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    rotated_then: &[(u16, serde_json::Value)],
) -> String {
    let rotated = serde_json::json!({"access_token": "at-2", "token_type": "Bearer",
                                     "expires_in": 300, "refresh_token": "rt-2"});
    let mut answers = vec![(200, rotated)];
    answers.extend_from_slice(rotated_then);
    due_session_answered(proxy, idp, &answers).await
}

/// Alice's session, made in the store, whose access token `at-1` is due and whose refresh token
/// is `rt-1`; the provider's answers to the refreshes are `answers`, in order.
async fn due_session_answered(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    answers: &[(u16, serde_json::Value)],
) -> String {
    let now = vestibule::app::now();
    let mut tokens = std::collections::BTreeMap::new();
    tokens.insert(
        String::new(),
        vestibule::session::model::AccessToken {
            value: "at-1".into(),
            expires_at: now,
            issued_at: now.saturating_sub(300),
            scope: None,
            jkt: None,
        },
    );
    let cookie = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            tokens: tokens.into(),
            refresh_token: Some("rt-1".into()),
            ..Session::default()
        })
        .await;
    for (status, body) in answers {
        idp.state.script("refresh_token", *status, body.clone());
    }
    cookie
}

/// Two replicas on one Redis behind a rotating provider, and Alice's session on them (see
/// [`due_session`]): rt-1 gives rt-2 once, and is refused with `invalid_grant` after that.
struct Rotation {
    idp: fake_idp::FakeIdp,
    up: upstream::Upstream,
    a: Proxy,
    b: Proxy,
    cookie: String,
}

impl Rotation {
    async fn start(redis: &RedisServer) -> Rotation {
        let signer = TestSigner::new();
        let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
        let up = upstream::start().await;
        let a = token_proxy(&redis.url(), &idp, &up).await;
        let b = token_proxy(&redis.url(), &idp, &up).await;
        let refused = (400, serde_json::json!({"error": "invalid_grant"}));
        let cookie = due_session(&a, &idp, &[refused]).await;
        Rotation {
            idp,
            up,
            a,
            b,
            cookie,
        }
    }
}

/// Stops Redis for longer than the 10 s refresh lease (Redis's clock runs it out while it is
/// stopped), then sends `cookie`'s request to `/tok/x` on replica `b` in the background.
async fn stalled_past_the_lease(
    redis: &RedisServer,
    b: &Proxy,
    cookie: &str,
) -> tokio::task::JoinHandle<Reply> {
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(11)).await;
    redis.signal("CONT");
    let (url, cookie) = (b.url("/tok/x"), cookie.to_string());
    tokio::spawn(async move { get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await })
}

/// Awaits the requests of replicas a (`first`) and b (`second`) and checks that rt-1 was
/// presented once and both were served.
async fn spent_once_and_both_served(
    idp: &fake_idp::FakeIdp,
    first: tokio::task::JoinHandle<Reply>,
    second: tokio::task::JoinHandle<Reply>,
) {
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(
        presented_refresh_tokens(idp),
        vec!["rt-1".to_string()],
        "the refresh token was spent twice (replica b: {} {})",
        second.status,
        second.text()
    );
    assert_eq!(
        (first.status, second.status),
        (200, 200),
        "a: {}; b: {}",
        first.text(),
        second.text()
    );
}

/// The refresh tokens the provider was presented, in order.
pub(crate) fn presented_refresh_tokens(idp: &fake_idp::FakeIdp) -> Vec<String> {
    let requests = idp.state.token_requests.lock().unwrap();
    requests
        .iter()
        .filter_map(|form| form.iter().find(|(k, _)| k == "refresh_token"))
        .map(|(_, v)| v.clone())
        .collect()
}

/// Holds the provider's next answer until the returned sender is used or dropped; returns once
/// the refresh of `cookie` on `proxy`, started in the background, has reached the provider.
pub(crate) async fn refresh_held_at_the_provider(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    cookie: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Reply>,
) {
    let (release, hold) = tokio::sync::oneshot::channel();
    *idp.state.hold.lock().unwrap() = Some(hold);
    let request = {
        let (url, cookie) = (proxy.url("/tok/x"), cookie.to_string());
        tokio::spawn(async move { get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await })
    };
    eventually("the refresh reaches the provider", HANG, || async {
        (idp.state.token_requests.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    (release, request)
}

/// Replica `a`'s refresh of `cookie` reaches the provider, Redis dies, then the provider
/// answers: the request is 503 `store_unavailable` and a keeps the answer. Returns when the
/// refresh had reached the provider (its spend record taken).
async fn answered_as_redis_dies(
    redis: &mut RedisServer,
    a: &Proxy,
    idp: &fake_idp::FakeIdp,
    cookie: &str,
) -> Instant {
    let (release, first) = refresh_held_at_the_provider(a, idp, cookie).await;
    let reached = Instant::now();
    redis.kill();
    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 503, "{}", first.text());
    assert_eq!(first.json()["error"], "store_unavailable");
    reached
}

/// The provider rotated the refresh token (rt-1 gives rt-2) and Redis died before replica a
/// saved the answer: that request is a 503, but a keeps the answer and saves it once Redis is
/// back, so the spent rt-1 is never presented again, not even by replica b (a rotating provider
/// would refuse it with `invalid_grant`, and a store outage would have signed the user out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_saved_once_redis_is_back_after_failing_at_the_save() {
    let mut redis = RedisServer::start_durable();
    let Rotation {
        idp,
        up,
        a,
        b,
        cookie,
    } = Rotation::start(&redis).await;

    // The provider carries out the grant (rt-1 is spent); Redis dies before the save.
    answered_as_redis_dies(&mut redis, &a, &idp, &cookie).await;

    redis.restart();
    served_the_kept_answer(&b, &cookie, &idp, &up).await;
}

/// Once the store is back, `cookie`'s request on replica `b` is served the token of the answer
/// replica a kept (at-2), and rt-1 was presented only once.
async fn served_the_kept_answer(
    b: &Proxy,
    cookie: &str,
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
) {
    let url = b.url("/tok/x");
    let second = eventually(
        "the store answers again",
        Duration::from_secs(20),
        || async {
            let r = get(&url, &[("cookie", cookie), ("x-csrf", "1")]).await;
            (r.status != 503 || r.json()["error"] != "store_unavailable").then_some(r)
        },
    )
    .await;
    assert_eq!(
        (second.status, presented_refresh_tokens(idp)),
        (200, vec!["rt-1".to_string()]),
        "after a store failure at the save, the spent refresh token was presented again: {}",
        second.text()
    );
    assert_eq!(
        up.last().headers["authorization"],
        "Bearer at-2",
        "the upstream was sent the token of the answer that was kept"
    );
}

/// As above, but Redis stays away longer than rt-1's spend record was made to last (twice
/// `provider_timeout` plus 70 s) while replica a keeps trying to save the answer (for 300 s):
/// the record must outlast those attempts. Otherwise the first request of the session on
/// replica b once Redis is back finds neither the refresh lease (run out) nor the record, and
/// presents the spent rt-1 before a's next attempt saves rt-2: refused with `invalid_grant`,
/// and the user is signed out by the outage (a provider that detects reuse revokes the grant).
/// It sleeps 76 s: `scripts/test` runs it by this name beside the rest of the fault suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_kept_unsaved_through_a_long_outage_is_not_spent_again_when_redis_is_back() {
    let mut redis = RedisServer::start_durable();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    // The shortest record the old lifetime allowed: 2 x 2 s + 70 s.
    let timeout = [("oidc.provider_timeout", "2s")];
    let a = redis_proxy_timed(&redis.url(), "5s", STORE_TIMEOUT, &timeout, &idp, &up).await;
    let b = redis_proxy_timed(&redis.url(), "5s", STORE_TIMEOUT, &timeout, &idp, &up).await;
    let refused = (400, serde_json::json!({"error": "invalid_grant"}));
    let cookie = due_session(&a, &idp, &[refused]).await;

    let recorded = answered_as_redis_dies(&mut redis, &a, &idp, &cookie).await;
    // Redis's clock runs the lease and the old record out while it is away (the append-only
    // file keeps their expiry times).
    tokio::time::sleep(Duration::from_secs(76).saturating_sub(recorded.elapsed())).await;
    redis.restart();
    served_the_kept_answer(&b, &cookie, &idp, &up).await;
}

/// A refresh whose request was cancelled (the browser went elsewhere) runs on as a task of its
/// own; a rolling restart (graceful shutdown) lets it finish and save within `shutdown_grace`,
/// or the provider's rotated refresh token would be lost and the other replica would present the
/// spent one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_under_way_at_shutdown_is_saved_before_the_replica_stops() {
    let redis = RedisServer::start();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let mut a = token_proxy(&redis.url(), &idp, &up).await;
    let b = token_proxy(&redis.url(), &idp, &up).await;
    let cookie = due_session(&a, &idp, &[]).await;

    let (release, request) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    request.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.shutdown.cancel(); // SIGTERM: a rolling restart (shutdown_grace 5 s)
    // The provider answers well within shutdown_grace, after the connections have drained.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !a.task.is_finished(),
        "replica a stopped with a refresh under way"
    );
    let _ = release.send(());
    tokio::time::timeout(HANG, &mut a.task)
        .await
        .expect("replica a stops")
        .unwrap()
        .unwrap();
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}l:*")),
        0,
        "the refresh lease was released before replica a stopped"
    );
    let r = get(&b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
    assert_eq!(
        (r.status, presented_refresh_tokens(&idp)),
        (200, vec!["rt-1".to_string()]),
        "the refresh under way at shutdown was dropped: its answer was never saved and the \
         spent refresh token was presented again"
    );
}

/// Redis stalls longer than the refresh lease while replica a's refresh is at the provider: the
/// lease runs out, and replica b takes it for a request of the same session. The refresh token
/// a presented is not presented again by b (a rotating provider refuses a spent one with
/// `invalid_grant`, and one that detects reuse revokes the whole grant): b waits for a's answer
/// and serves the token a saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_is_spent_once_when_redis_stalls_past_the_refresh_lease() {
    let redis = RedisServer::start();
    let Rotation {
        idp,
        up,
        a,
        b,
        cookie,
    } = Rotation::start(&redis).await;

    let (release, first) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    let second = stalled_past_the_lease(&redis, &b, &cookie).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.send(()).unwrap();
    spent_once_and_both_served(&idp, first, second).await;
    assert_eq!(up.last().headers["authorization"], "Bearer at-2");
    let r = get(&b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
    assert_eq!(r.status, 200, "the session ended: {}", r.text());
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}r:*")),
        0,
        "a saved refresh left its spend record behind"
    );
}

/// A failover to a Redis replica that had not received them loses replica a's refresh lease and
/// the spend record of rt-1 while a's refresh is at the provider. a takes both again (its
/// keepers renew them every third of a lease and take them again when they are gone), so that
/// replica b, asked for the same session meanwhile, waits for a's answer instead of presenting
/// rt-1 a second time, which a rotating provider refuses with `invalid_grant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_and_spend_record_lost_while_the_refresh_is_at_the_provider_are_taken_again() {
    let redis = RedisServer::start();
    let Rotation {
        idp,
        up: _up,
        a,
        b,
        cookie,
    } = Rotation::start(&redis).await;

    let (release, first) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    let (lease, record) = (format!("{PREFIX}l:*"), format!("{PREFIX}r:*"));
    assert_eq!(
        (
            count_keys(redis.port(), &lease),
            count_keys(redis.port(), &record)
        ),
        (1, 1)
    );
    let mut con = redis_connection(&redis);
    for pattern in [&lease, &record] {
        let keys: Vec<String> = ::redis::cmd("KEYS").arg(pattern).query(&mut con).unwrap();
        let _: i64 = ::redis::cmd("DEL").arg(&keys).query(&mut con).unwrap();
    }
    eventually("replica a holds both again", HANG, || async {
        (count_keys(redis.port(), &lease) == 1 && count_keys(redis.port(), &record) == 1)
            .then_some(())
    })
    .await;
    let second = {
        let (url, cookie) = (b.url("/tok/x"), cookie.clone());
        tokio::spawn(async move { get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    release.send(()).unwrap();
    spent_once_and_both_served(&idp, first, second).await;
}

/// With a provider that does not rotate refresh tokens (its answers carry none), an answer that
/// Redis failed to take at the save is kept and saved once Redis is back, and with it the spend
/// record of `rt-1` must go: it is deleted once the answer is saved. Left behind (it lasts twice
/// the provider timeout + 70 s), every refresh of the session in that time, on any replica,
/// waits for a refresh that is over and answers 503 once its deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_saved_after_a_store_failure_leaves_no_spend_record_behind() {
    let mut redis = RedisServer::start_durable();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let a = token_proxy(&redis.url(), &idp, &up).await;
    let b = token_proxy(&redis.url(), &idp, &up).await;
    // at-2 is due 4 s after the provider gave it (refresh_skew 5 s, cut to half its 8 s
    // lifetime); rt-1 stays.
    let short =
        serde_json::json!({"access_token": "at-2", "token_type": "Bearer", "expires_in": 8});
    let long =
        serde_json::json!({"access_token": "at-3", "token_type": "Bearer", "expires_in": 300});
    let cookie = due_session_answered(&a, &idp, &[(200, short), (200, long)]).await;

    answered_as_redis_dies(&mut redis, &a, &idp, &cookie).await;
    // The provider has answered by now (Unix seconds, as the proxy counts them).
    let answered = vestibule::app::now();
    redis.restart();
    eventually(
        "replica a saves the answer it kept",
        Duration::from_secs(20),
        || async {
            let r = get(&b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
            (r.status != 503 || r.json()["error"] != "store_unavailable").then_some(())
        },
    )
    .await;
    // Once at-2 is due, the session refreshes again, presenting rt-1 (never rotated). Its
    // lifetime counts whole seconds from the second of the answer, which may have ended just
    // after the provider answered: the wait is for the clock's second, not a span of time.
    let due = UNIX_EPOCH + Duration::from_secs(answered + 4);
    tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let r = get(&b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().headers["authorization"], "Bearer at-3");
    assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1", "rt-1"]);
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}r:*")),
        0,
        "a spend record was left behind"
    );
}

/// Replica b waits on the spend record of replica a's refresh (a's lease ran out under a Redis
/// stall), reading the session between its attempts to take the record. a saves its answer,
/// then deletes the record: a read of b's made just before a's save and answered after the
/// deletion (slow, not failed) must not let b present the refresh token a spent. b reads the
/// session again once it holds the record; otherwise it presents rt-1 a second time, which a
/// rotating provider refuses and one that detects reuse answers by revoking the whole grant
/// (rt-2 with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_record_taken_just_after_its_refresh_saved_does_not_spend_the_token_again() {
    let redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let a = token_proxy(&redis.url(), &idp, &up).await;
    // b talks to Redis through the relay, with a store timeout longer than the late answer.
    let b = redis_proxy_timed(&relay.url(), "5s", Duration::from_secs(3), &[], &idp, &up).await;
    let refused = (400, serde_json::json!({"error": "invalid_grant"}));
    let cookie = due_session(&a, &idp, &[refused]).await;

    let (release, first) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    let second = stalled_past_the_lease(&redis, &b, &cookie).await;
    // b takes the lapsed lease and polls a's spend record.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // b's next read of the session is carried out now, and answered 0.7 s late (within its
    // timeout: slow, not failed).
    relay.arm(format!("{PREFIX}s:").as_bytes(), Duration::from_millis(700));
    eventually("b reads the session", HANG, || async {
        relay.fired().then_some(())
    })
    .await;
    // Meanwhile a saves rt-2 and deletes its spend record.
    release.send(()).unwrap();
    spent_once_and_both_served(&idp, first, second).await;
}

/// Redis, and with it the session cache's pub/sub subscription, across a real network link that
/// goes dead. Once the last proof of delivery is older than the cache trusts (2 s), a session
/// the cache holds is no longer served from it: 503 within the store timeout, like any other.
/// Once the link is back, the subscriptions are back within about a second: each cache is used
/// again, and an invalidation published from the other replica reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_behind_a_dead_link_keeps_the_cache_unused_until_it_is_back_soon_after() {
    let mut host = crate::support::netns::NetHost::start();
    let url = host.start_redis();
    let replicas = replicas(&Backend::Url(url.clone())).await;
    let (a, b) = (&replicas.proxies[0], &replicas.proxies[1]);
    let cookies = replicas.sessions().await;
    let at_a = a.url("/api/x");
    for cookie in &cookies {
        assert_eq!(get(&at_a, &[("cookie", cookie)]).await.status, 200);
    }
    let mut live = a.app.sessions.store().subscription_live();
    host.partition();
    let cut = Instant::now();
    tokio::time::timeout(HANG, live.wait_for(|up| !*up))
        .await
        .expect("the subscription's check notices the dead link")
        .unwrap();
    let lost = Instant::now();
    // Past the cache's trust in its last proof of delivery.
    tokio::time::sleep_until((cut + Duration::from_millis(2_500)).into()).await;
    for cookie in &cookies[..4] {
        let started = Instant::now();
        let reply = get(&at_a, &[("cookie", cookie)]).await;
        assert_eq!(
            (reply.status, reply.json()["error"].as_str()),
            (503, Some("store_unavailable")),
            "{:?} after the cut: served from a cache whose messages cannot arrive",
            cut.elapsed()
        );
        assert!(started.elapsed() <= STORE_TIMEOUT + SLACK);
    }
    // Back when the subscriber's attempts have backed off, in the second half of one: its
    // connection attempt's first retransmission (after 1 s) has gone out into the dead link,
    // the next would go out only after the attempt gave up.
    tokio::time::sleep_until((lost + Duration::from_millis(8_050)).into()).await;
    host.heal();
    let healed = Instant::now();
    tokio::time::timeout(HANG, live.wait_for(|up| *up))
        .await
        .expect("the subscription is back")
        .unwrap();
    let subscribed = healed.elapsed();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    // The cache of `reader` is used again: a session made on `writer` is served by the one
    // that holds it without a store read.
    let cache_in_use = |reader: &'static str| {
        let (reader, writer) = if reader == "a" { (a, b) } else { (b, a) };
        let client = client.clone();
        async move {
            let cookie = writer
                .session_cookie(Session {
                    sub: "carol".into(),
                    ..Session::default()
                })
                .await;
            let mut direct = client.get_connection().unwrap();
            served_from_cache(&reader.url("/api/x"), &cookie, &mut direct)
                .await
                .then_some(())
        }
    };
    eventually("a's cache is in use again", HANG, || cache_in_use("a")).await;
    eventually("b's cache is in use again", HANG, || cache_in_use("b")).await;
    let back = healed.elapsed();
    // And invalidations reach each: a session ended on the other replica is gone at once.
    for (reader, writer) in [(a, b), (b, a)] {
        let cookie = writer
            .session_cookie(Session {
                sub: "dave".into(),
                ..Session::default()
            })
            .await;
        let url = reader.url("/api/x");
        assert_eq!(get(&url, &[("cookie", &cookie)]).await.status, 200);
        assert_eq!(writer.app.sessions.end_by_sub("dave").await.unwrap(), 1);
        let reply = get(&url, &[("cookie", &cookie)]).await;
        assert_eq!(reply.status, 401, "an ended session served from the cache");
    }
    // A subscription attempt into the dead link that got no answer is followed at once by
    // another (a new connection attempt, not the old one's retransmission seconds later).
    assert!(
        subscribed <= Duration::from_secs(1),
        "subscribed again only {subscribed:?} after the link was back"
    );
    assert!(
        back <= Duration::from_secs(2),
        "the caches were used again only {back:?} after the link was back"
    );
}

/// How long a PONG stands for at `/readyz` (`src/app/readiness.rs`).
const PONG_REUSED: Duration = Duration::from_secs(1);

/// `/readyz`'s store check is shared: probes that come while a PING is under way wait for its
/// answer, and a PONG stands for a second. Sixteen probes at once are one PING at the store
/// (they were sixteen). Once the store is gone, `/readyz` is 503 within that second and the
/// store timeout, and stays so (a failure is never reused); once it is back, the first probe
/// that finds it answering is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_probes_share_one_store_ping_and_follow_the_store_down_and_back() {
    let mut redis = RedisServer::start();
    let replicas = replicas_on([Backend::Url(redis.url())]).await;
    let readyz = format!("http://{}/readyz", replicas.proxies[0].admin);
    // Past the second that `wait_ready`'s PONG stands for.
    tokio::time::sleep(PONG_REUSED + Duration::from_millis(100)).await;
    let subscriber = pubsub_addresses(&redis);
    assert!(!subscriber.is_empty(), "no subscription to leave out");
    let monitor = Monitor::start(redis.port()).await;
    let probes: Vec<_> = (0..16)
        .map(|_| {
            let url = readyz.clone();
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    for probe in probes {
        let reply = probe.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let answered = Instant::now();
    let pings = monitor.pings(&subscriber).await;
    assert_eq!(pings.len(), 1, "16 probes at once: PINGs {pings:?}");

    // Down: 503 within the second the last PONG stands for and the store timeout.
    redis.kill();
    eventually("readyz says the store is down", HANG, || async {
        let reply = get(&readyz, &[]).await;
        (reply.status == 503 && reply.json()["checks"]["store"] == false).then_some(())
    })
    .await;
    assert!(
        answered.elapsed() < PONG_REUSED + STORE_TIMEOUT + SLACK,
        "readyz said 503 {:?} after its last PONG",
        answered.elapsed()
    );
    // A failure is not reused: each probe asks again, and the store is still down.
    for _ in 0..3 {
        assert_eq!(get(&readyz, &[]).await.status, 503);
    }

    // Back: 200 as soon as a PING finds it.
    redis.restart();
    let back = Instant::now();
    eventually(
        "readyz says the store is back",
        Duration::from_secs(5),
        || async { (get(&readyz, &[]).await.status == 200).then_some(()) },
    )
    .await;
    assert!(
        back.elapsed() < PONG_REUSED,
        "readyz said 200 {:?} after the store was back",
        back.elapsed()
    );
}

/// The addresses (`ip:port`) of the store's subscribed connections: their PINGs check the
/// subscription every second, they are not `/readyz`'s.
fn pubsub_addresses(redis: &RedisServer) -> Vec<String> {
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis_connection(redis))
        .unwrap();
    list.split_whitespace()
        .filter_map(|field| field.strip_prefix("addr="))
        .map(String::from)
        .collect()
}

/// Every command Redis carries out from now on, as `MONITOR` shows them.
struct Monitor {
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    async fn start(port: u16) -> Monitor {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"MONITOR\r\n").await.unwrap();
        let mut ok = [0u8; 5];
        tcp.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n");
        let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
        let into = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Monitor { seen, task }
    }

    /// The PINGs seen so far (after a moment for the last to arrive), as their lines, but for
    /// those from `except`.
    async fn pings(self, except: &[String]) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.task.abort();
        let seen = String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned();
        seen.lines()
            .filter(|line| line.to_ascii_uppercase().ends_with("\"PING\""))
            .filter(|line| {
                !except
                    .iter()
                    .any(|addr| line.contains(&format!(" {addr}]")))
            })
            .map(String::from)
            .collect()
    }
}

/// A proxy on `store` (a Redis URL) in front of a fake provider that signs with `signer`.
async fn login_stack(store: &str, signer: &TestSigner) -> (Proxy, fake_idp::FakeIdp) {
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let text = config_toml(&Backend::Url(store.into()).toml())
        .set("oidc.issuer", idp.issuer.as_str())
        .add("limits.login_per_minute", 100_000)
        .add("limits.callback_per_minute", 100_000);
    let proxy = start_proxy(&text).await;
    wait_ready(&proxy).await;
    (proxy, idp)
}

/// A login on `proxy` up to its callback, whose ID token `idp` will issue: the callback's URL
/// and the login cookie.
async fn login_up_to_callback(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    signer: &TestSigner,
) -> (String, String) {
    let (query, login_cookie) = begin_login(proxy).await;
    let claims = vestibule::jose::testing::id_token_claims(
        &idp.issuer,
        "vestibule",
        &query["nonce"],
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    *idp.state.id_token.lock().unwrap() = signer.token(TestKey::Rsa1).kid("k1").sign(&claims);
    let url = proxy.url(&format!("/bff/callback?code=abc&state={}", query["state"]));
    (url, login_cookie)
}

/// The callback at `url` sent again with `cookie` until the store answers (as a user retries a
/// 503 page): the first answer that is no 503 `store_unavailable`.
async fn retried_until_the_store_answers(url: &str, cookie: &str) -> Reply {
    let deadline = Instant::now() + HANG * 4;
    loop {
        let reply = get(url, &[("cookie", cookie)]).await;
        if reply.status != 503 || Instant::now() > deadline {
            return reply;
        }
        assert_store_unavailable(&reply, "a retry while the store is away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `reply` sets a session cookie.
fn sets_session(reply: &Reply) -> bool {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("vestibule="))
}

/// Asserts that `reply` is the store's 503 with no session for anybody; `when` names the case.
fn assert_store_unavailable(reply: &Reply, when: &str) {
    assert_eq!(reply.status, 503, "{when}: {}", reply.text());
    assert!(
        reply.text().contains("store_unavailable"),
        "{when}: {}",
        reply.text()
    );
    assert!(!sets_session(reply), "{when}: a session cookie with a 503");
}

/// Asserts that `reply` is the login-failed page of a spent login state, with no session.
fn assert_replay_refused(reply: &Reply, when: &str) {
    assert!(
        reply.status == 400 && reply.text().contains("reason: state_replayed"),
        "{when}: a retry of a callback whose login state was spent was answered {}: {}",
        reply.status,
        reply.text()
    );
    assert!(!sets_session(reply), "{when}: a session cookie");
}

/// A login's callback spends its login state first (`SET NX` in the store, once on every
/// replica): the store failing right there — its reply lost after the command was carried out,
/// Redis stalled with the command in its socket, Redis down — is the store's 503, before the
/// code is exchanged and with no session for anybody. The same callback sent again is let
/// through only if the state was not spent: once the `SET NX` landed, a retry is the login-failed
/// page (the user starts again), never a second sign-in; one that never landed signs in once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_whose_login_state_cannot_be_spent_is_a_503_and_is_never_taken_twice() {
    let mut redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let signer = TestSigner::new();
    let (proxy, idp) = login_stack(&relay.url(), &signer).await;
    let exchanges = || idp.state.token_requests.lock().unwrap().len();
    let spent_states = || count_keys(redis.port(), &format!("{PREFIX}login:*"));
    let sessions = |redis: &RedisServer| session_keys(redis).len();

    // The `SET NX` carried out, its reply lost (held back past the store timeout).
    let (url, cookie) = login_up_to_callback(&proxy, &idp, &signer).await;
    relay.arm(b"login:", Duration::from_secs(3));
    let first = get(&url, &[("cookie", &cookie)]).await;
    assert!(relay.fired(), "the login state's SET NX never went out");
    assert_store_unavailable(&first, "its reply lost");
    assert_eq!(spent_states(), 1, "the SET NX was carried out");
    assert_eq!(
        exchanges(),
        0,
        "the code was exchanged though the state was not spent"
    );
    let again = retried_until_the_store_answers(&url, &cookie).await;
    assert_replay_refused(&again, "its reply lost");
    assert_eq!(sessions(&redis), 0);

    // Redis stalled (SIGSTOP) as the state is spent: the command waits in its socket and is
    // carried out once Redis runs again, after the 503.
    let (url, cookie) = login_up_to_callback(&proxy, &idp, &signer).await;
    redis.signal("STOP");
    let first = get(&url, &[("cookie", &cookie)]).await;
    redis.signal("CONT");
    assert_store_unavailable(&first, "Redis stalled");
    assert_eq!(exchanges(), 0);
    let again = retried_until_the_store_answers(&url, &cookie).await;
    if spent_states() == 2 {
        assert_replay_refused(&again, "Redis stalled");
        assert_eq!(sessions(&redis), 0);
    } else {
        assert_eq!(
            again.status,
            302,
            "Redis stalled, its SET NX lost: {}",
            again.text()
        );
        assert_eq!(sessions(&redis), 1);
    }
    let before = sessions(&redis);

    // Redis down as the state is spent: the `SET NX` never lands, so the retry once Redis is
    // back signs in — once.
    let (url, cookie) = login_up_to_callback(&proxy, &idp, &signer).await;
    redis.stop();
    let first = get(&url, &[("cookie", &cookie)]).await;
    assert_store_unavailable(&first, "Redis down");
    redis.restart();
    let again = retried_until_the_store_answers(&url, &cookie).await;
    assert_eq!(
        again.status,
        302,
        "the retry once Redis is back: {}",
        again.text()
    );
    assert!(sets_session(&again));
    assert_eq!(sessions(&redis), before + 1);
    let third = get(&url, &[("cookie", &cookie)]).await;
    assert_replay_refused(&third, "a second retry");
    assert_eq!(
        sessions(&redis),
        before + 1,
        "a second session from one callback"
    );
}
