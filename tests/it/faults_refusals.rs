//! Redis answering with errors rather than going away: out of memory under `noeviction` (every
//! command that would grow the data set is answered `-OOM`, deletes and expiries still run), busy
//! with a long script (`-BUSY` to everything), and a master demoted to a replica by a failover
//! (`-READONLY`). An answer refused is an outage like a lost connection — 503
//! `store_unavailable`, nobody signed out, a refresh's answer kept and saved later — but one that
//! deletes still work through, so a logout still ends its session and a login ends the previous
//! one only once the new one is stored; and a replica's `-READONLY` sends the next command to
//! what the address leads to now. A Redis that would rather evict keys than refuse them is
//! warned about at startup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::now;
use crate::faults_redis::{
    STORE_TIMEOUT, due_session, presented_refresh_tokens, redis_proxy, redis_proxy_timed,
    refresh_held_at_the_provider, token_proxy,
};
use crate::logout::{post_logout_token, revoked_tokens, revoking_idp, script_logout};
use crate::support::late_replies::LateReplies;
use crate::support::redis::{RedisServer, count_keys};
use crate::support::*;
use std::time::{Duration, Instant};
use vestibule::jose::testing::{TestKey, TestSigner};
use vestibule::session::Session;

/// With `true`, a `maxmemory` far below what Redis holds (the default policy is `noeviction`):
/// every write that may grow memory is refused with `-OOM`; with `false`, no limit.
fn out_of_memory(redis: &RedisServer, on: bool) {
    let limit = if on { "1" } else { "0" };
    let reply = redis.command(&["CONFIG", "SET", "maxmemory", limit]);
    assert!(reply.starts_with("+OK"), "CONFIG SET maxmemory: {reply}");
}

/// The provider rotated the refresh token (rt-1 gives rt-2) and Redis, out of memory, refused
/// the save with `-OOM`: as when the connection is lost at that moment, that request is a 503,
/// the answer is kept and saved once Redis takes writes again, and the spent rt-1 is never
/// presented again — not by the other replica meanwhile, not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_answered_while_redis_is_out_of_memory_is_saved_once_it_takes_writes_again() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let a = token_proxy(&redis.url(), &idp, &up).await;
    let b = token_proxy(&redis.url(), &idp, &up).await;
    let refused = (400, serde_json::json!({"error": "invalid_grant"}));
    let cookie = due_session(&a, &idp, &[refused]).await;

    let (release, first) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    out_of_memory(&redis, true);
    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(
        (first.status, first.json()["error"].clone()),
        (503, "store_unavailable".into()),
        "{}",
        first.text()
    );
    let meanwhile = get(&b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
    assert_eq!(meanwhile.status, 503, "{}", meanwhile.text());

    out_of_memory(&redis, false);
    let url = b.url("/tok/x");
    let second = eventually(
        "replica a saves the answer it kept",
        Duration::from_secs(15),
        || async {
            let r = get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await;
            (r.status != 503).then_some(r)
        },
    )
    .await;
    assert_eq!(
        (second.status, presented_refresh_tokens(&idp)),
        (200, vec!["rt-1".to_string()]),
        "after an -OOM at the save, the spent refresh token was presented again: {}",
        second.text()
    );
    assert_eq!(up.last().headers["authorization"], "Bearer at-2");
}

/// The provider rotated the refresh token (rt-1 gives rt-2) and Redis, out of memory, refused
/// the save: rt-2 is only in the memory of the replica that refreshed. A logout then (deletes
/// still run) ends the session and revokes rt-1, which the session held; the kept answer finds
/// the session gone, and its rt-2 is revoked too rather than left valid at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_a_rotated_refresh_token_waits_unsaved_revokes_it_too() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let proxy = token_proxy(&redis.url(), &idp, &up).await;
    let cookie = due_session(&proxy, &idp, &[]).await;

    let (release, first) = refresh_held_at_the_provider(&proxy, &idp, &cookie).await;
    out_of_memory(&redis, true);
    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 503, "{}", first.text());
    let logout = script_logout(&proxy, &cookie).await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    out_of_memory(&redis, false);

    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    let revoked = eventually(
        "the rotated refresh token is revoked",
        Duration::from_secs(10),
        || async {
            let revoked = revoked_tokens(&idp);
            revoked.contains(&"rt-2".to_string()).then_some(revoked)
        },
    )
    .await;
    assert!(revoked.contains(&"rt-1".to_string()), "{revoked:?}");
    assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1".to_string()]);
}

/// As above, but Redis refuses writes for longer than the refresh task keeps trying to save
/// the answer (shortened to nothing here): the answer, with the only copy of rt-2, waits in the
/// memory of the replica that refreshed, and nothing of the session comes to save it. Redis
/// takes writes again and the user logs out on that replica: the logout revokes rt-2 with
/// the session's rt-1, and nothing of the session is left in the replica's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_after_the_refresh_task_gave_up_saving_revokes_the_rotated_refresh_token() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let (proxy, cookie) = given_up_session(&redis, &idp, &up).await;

    let logout = script_logout(&proxy, &cookie).await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    let revoked = revoked_tokens(&idp);
    assert!(
        revoked.contains(&"rt-2".to_string()),
        "the rotated refresh token outlives the logout at the provider; revoked: {revoked:?}"
    );
    assert!(revoked.contains(&"rt-1".to_string()), "{revoked:?}");
    assert_eq!(
        proxy.app.unsaved_refresh_answers().await,
        0,
        "the answer outlives its session in memory"
    );
    assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1".to_string()]);
}

/// A token proxy on `redis` whose refresh task gives up saving at once, and a session of it
/// whose refresh answer (rt-2) waits given up on in its memory ([`rotated_and_given_up`]).
async fn given_up_session(
    redis: &RedisServer,
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
) -> (Proxy, String) {
    let proxy = token_proxy(&redis.url(), idp, up).await;
    proxy.app.keep_saving_for(Duration::ZERO);
    let cookie = due_session(&proxy, idp, &[]).await;
    rotated_and_given_up(&proxy, redis, idp, &cookie).await;
    (proxy, cookie)
}

/// Redis refuses writes for longer than `proxy`'s refresh task keeps trying to save (which
/// must be shortened to nothing first): the refresh of `cookie`'s session gets rt-2, the answer
/// waits unsaved in `proxy`'s memory with nothing left trying to save it, and Redis takes
/// writes again.
async fn rotated_and_given_up(
    proxy: &Proxy,
    redis: &RedisServer,
    idp: &fake_idp::FakeIdp,
    cookie: &str,
) {
    let (release, first) = refresh_held_at_the_provider(proxy, idp, cookie).await;
    out_of_memory(redis, true);
    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, 503, "{}", first.text());
    assert_eq!(
        proxy.app.unsaved_refresh_answers().await,
        1,
        "the answer was not kept"
    );
    out_of_memory(redis, false);
}

/// Once the session is found ended: rt-2, which only the kept answer held, is revoked at the
/// provider, and nothing of the answer stays in `proxy`'s memory.
async fn the_kept_answer_is_revoked(proxy: &Proxy, idp: &fake_idp::FakeIdp, how: &str) {
    let revoked = eventually(
        &format!("the rotated refresh token is revoked after {how}"),
        Duration::from_secs(10),
        || async {
            let revoked = revoked_tokens(idp);
            revoked.contains(&"rt-2".to_string()).then_some(revoked)
        },
    )
    .await;
    assert!(!revoked.is_empty());
    eventually(
        &format!("the answer is forgotten after {how}"),
        Duration::from_secs(5),
        || async { (proxy.app.unsaved_refresh_answers().await == 0).then_some(()) },
    )
    .await;
    assert_eq!(presented_refresh_tokens(idp), vec!["rt-1".to_string()]);
}

/// The answer given up on is watched for its session's end, not revoked while the session
/// lives: Redis takes writes again, the session's next request saves it and is sent at-2, and
/// nothing is revoked — not after the save's own invalidation has woken the watch either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_up_on_is_saved_by_the_next_refresh_and_not_revoked() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let (proxy, cookie) = given_up_session(&redis, &idp, &up).await;

    let next = get(
        &proxy.url("/tok/x"),
        &[("cookie", &cookie), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(up.last().headers["authorization"], "Bearer at-2");
    assert_eq!(proxy.app.unsaved_refresh_answers().await, 0);
    // Absence cannot be awaited: a watch woken by the save reads the session within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(proxy.signed_in(&cookie).await, "the saved session ended");
    assert_eq!(revoked_tokens(&idp), Vec::<String>::new());
    assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1".to_string()]);
}

/// As above, but the session ends by the provider's back-channel logout (of every session of
/// alice's) on the replica that holds the answer: that path never looked at the refresh memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_channel_logout_after_the_refresh_task_gave_up_saving_revokes_the_rotated_refresh_token()
 {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let (proxy, cookie) = given_up_session(&redis, &idp, &up).await;

    let mut claims = vestibule::jose::testing::logout_token_claims(&idp.issuer, "vestibule", now());
    claims.as_object_mut().unwrap().remove("sid");
    let token = TestSigner::new()
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims);
    let ended = post_logout_token(&proxy, &token).await;
    assert_eq!(ended.status, 200, "{}", ended.text());
    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived the back-channel logout"
    );
    the_kept_answer_is_revoked(&proxy, &idp, "a back-channel logout").await;
}

/// As above, but the user logs out on the other replica, which never held the answer: the
/// replica that holds it hears of the end only through the session's invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_another_replica_after_the_refresh_task_gave_up_saving_revokes_the_rotated_refresh_token()
 {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let (a, cookie) = given_up_session(&redis, &idp, &up).await;
    let b = token_proxy(&redis.url(), &idp, &up).await;

    let logout = script_logout(&b, &cookie).await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    assert!(
        !a.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    the_kept_answer_is_revoked(&a, &idp, "a logout on the other replica").await;
}

/// As above, but the session ends by its idle or absolute timeout: Redis lets the session's key
/// expire, and no message announces it. The watch of the answer given up on reads the session
/// again periodically (every `ENDED_CHECK`, shortened to a second here), finds it gone and
/// revokes rt-2. The key expires only after the watch's first read, so only a later, periodic
/// read can see the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_timing_out_after_the_refresh_task_gave_up_saving_revokes_the_rotated_refresh_token()
 {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let proxy = token_proxy(&redis.url(), &idp, &up).await;
    proxy.app.keep_saving_for(Duration::ZERO);
    proxy.app.ended_check(Duration::from_secs(1));
    let cookie = due_session(&proxy, &idp, &[]).await;
    rotated_and_given_up(&proxy, &redis, &idp, &cookie).await;
    // Measurable while it waits (other tests in this process may keep answers too).
    let scrape = get(&format!("http://{}/metrics", proxy.admin), &[])
        .await
        .text();
    let unsaved = scrape
        .lines()
        .find_map(|l| l.strip_prefix("vestibule_refresh_answers_unsaved "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert!(unsaved >= Some(1.0), "{unsaved:?} in {scrape}");
    // The watch starts as the refresh task gives up, and reads the session at once.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let keys = session_keys(&redis);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let reply = redis.command(&["PEXPIRE", &keys[0], "1"]);
    assert!(reply.starts_with(":1"), "PEXPIRE: {reply}");
    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived its expiry"
    );
    let started = Instant::now();
    the_kept_answer_is_revoked(&proxy, &idp, "the session timed out").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The names of the session records in `redis`.
fn session_keys(redis: &RedisServer) -> Vec<String> {
    let reply = redis.command(&["KEYS", "vestibule:s:*"]);
    reply
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_string)
        .collect()
}

/// Out of memory, Redis refuses the refresh lease a logout takes (`SET NX`) but still carries out
/// deletes: the logout ends the session and revokes its refresh token rather than answer 503 and
/// leave the user signed in. A request whose idle-timeout touch is refused is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_redis_is_out_of_memory_ends_the_session() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let idle = [("session.idle_timeout", "10s")];
    let proxy = redis_proxy_timed(&redis.url(), "5s", STORE_TIMEOUT, &idle, &idp, &up).await;
    let cookie = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            refresh_token: Some("rt-1".into()),
            ..Session::default()
        })
        .await;
    // A tenth of the idle timeout has passed: the next request slides it (a write).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    out_of_memory(&redis, true);
    let served = get(&proxy.url("/api/x"), &[("cookie", &cookie)]).await;
    assert_eq!(served.status, 200, "{}", served.text());
    let logout = script_logout(&proxy, &cookie).await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    out_of_memory(&redis, false);
    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    assert_eq!(count_keys(redis.port(), "vestibule:s:*"), 0);
    assert_eq!(revoked_tokens(&idp), vec!["rt-1".to_string()]);
}

/// Redis runs out of memory while the login of a signed-in browser is at the provider (its
/// state was recorded just before): the new session cannot be stored, and the browser's session
/// must stay as it was — not be ended first (a full Redis still deletes) and leave the user
/// signed out of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_redis_cannot_store_leaves_the_browsers_session_as_it_was() {
    let redis = RedisServer::start();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let proxy = redis_proxy(&redis.url(), "5s", &idp, &up).await;
    let alice = Session {
        sub: "alice".into(),
        ..Session::default()
    };
    let session = proxy.session_cookie(alice).await;
    let (query, login_cookie) = begin_login(&proxy).await;
    let claims = crate::fake_provider::claims(&idp.issuer, &query["nonce"]);
    *idp.state.id_token.lock().unwrap() = signer.token(TestKey::Rsa1).kid("k1").sign(&claims);
    let (release, hold) = tokio::sync::oneshot::channel();
    *idp.state.hold.lock().unwrap() = Some(hold);
    let callback = {
        let url = proxy.url(&format!("/bff/callback?code=abc&state={}", query["state"]));
        let cookies = format!("{login_cookie}; {session}");
        tokio::spawn(async move { get(&url, &[("cookie", &cookies)]).await })
    };
    eventually(
        "the code reaches the provider",
        Duration::from_secs(5),
        || async { (idp.state.token_requests.lock().unwrap().len() == 1).then_some(()) },
    )
    .await;

    out_of_memory(&redis, true);
    release.send(()).unwrap();
    let callback = callback.await.unwrap();
    out_of_memory(&redis, false);
    assert_eq!(callback.status, 503, "{}", callback.text());
    assert!(
        proxy.signed_in(&session).await,
        "the login ended the browser's session and stored none"
    );
    assert_eq!(count_keys(redis.port(), "vestibule:s:*"), 1);
}

/// Redis busy with a long script (anyone's `EVAL`, past `busy-reply-threshold`) answers every
/// command `-BUSY`, reads too: a request is 503 `store_unavailable` — not 401, which would send
/// the user to sign in again — and is served once the script is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_busy_with_a_script_is_503_and_signs_nobody_out() {
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let proxy = redis_proxy(&redis.url(), "0s", &idp, &up).await;
    let alice = Session {
        sub: "alice".into(),
        ..Session::default()
    };
    let cookie = proxy.session_cookie(alice).await;
    assert!(
        redis
            .command(&["CONFIG", "SET", "busy-reply-threshold", "50"])
            .starts_with("+OK")
    );
    let mut busy = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    let endless = "while true do end";
    let eval = format!(
        "*3\r\n$4\r\nEVAL\r\n${}\r\n{endless}\r\n$1\r\n0\r\n",
        endless.len()
    );
    std::io::Write::write_all(&mut busy, eval.as_bytes()).unwrap();
    eventually("Redis is busy", Duration::from_secs(5), || async {
        redis.command(&["PING"]).starts_with("-BUSY").then_some(())
    })
    .await;

    let refused = get(&proxy.url("/api/x"), &[("cookie", &cookie)]).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"], "store_unavailable");
    assert!(redis.command(&["SCRIPT", "KILL"]).starts_with("+OK"));
    // `+OK` says the script will stop, not that it has: Redis ends it at its next check.
    eventually("the script has ended", Duration::from_secs(5), || async {
        redis.command(&["PING"]).starts_with("+PONG").then_some(())
    })
    .await;
    let served = get(&proxy.url("/api/x"), &[("cookie", &cookie)]).await;
    assert_eq!(served.status, 200, "{}", served.text());
}

/// Waits until `redis`, a replica, has its master's data.
fn in_sync(redis: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.in_sync() {
        assert!(Instant::now() < deadline, "the replica did not sync");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A failover behind an address that follows the master (a managed Redis's primary endpoint, a
/// proxy that routes to the master): the old master, now a replica of the new one, keeps its
/// clients connected and answers their writes `-READONLY`. The next write — here a logout's — is
/// carried out on the new master, through a new connection to the address, rather than refused
/// for as long as the connection made before the failover lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_behind_the_same_address_writes_reach_the_new_master() {
    let old = RedisServer::start();
    let new = RedisServer::start();
    let relay = LateReplies::start(old.port()).await;
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let started = Instant::now();
    let proxy = redis_proxy(&relay.url(), "5s", &idp, &up).await;
    let alice = Session {
        sub: "alice".into(),
        refresh_token: Some("rt-1".into()),
        ..Session::default()
    };
    let cookie = proxy.session_cookie(alice.clone()).await;
    assert!(proxy.signed_in(&cookie).await);

    new.command(&["REPLICAOF", "127.0.0.1", &old.port().to_string()]);
    in_sync(&new);
    new.command(&["REPLICAOF", "NO", "ONE"]);
    old.command(&["REPLICAOF", "127.0.0.1", &new.port().to_string()]);
    in_sync(&old);
    relay.retarget(new.port());
    // A connection is replaced at most once a second.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(started.elapsed())).await;

    let logout = script_logout(&proxy, &cookie).await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    assert_eq!(
        count_keys(new.port(), "vestibule:s:*"),
        0,
        "the session outlived the logout on the new master"
    );
    assert_eq!(revoked_tokens(&idp), vec!["rt-1".to_string()]);
    // The process's shared connection follows too.
    let again = proxy.session_cookie(alice).await;
    assert!(proxy.signed_in(&again).await);
    assert_eq!(count_keys(new.port(), "vestibule:s:*"), 1);
}

/// A Redis that evicts keys when full (`allkeys-lru` here, with a `maxmemory`) may drop
/// sessions, and the refresh leases and spend records that keep a refresh token from being
/// presented twice: the binary warns at startup, naming the policy and the fix. A Redis that
/// refuses `CONFIG` to Vestibule's user (as most managed services do) gets no warning.
#[tokio::test]
async fn a_redis_that_evicts_keys_when_full_is_warned_about_at_startup() {
    let evicting =
        RedisServer::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    let dir = tempfile::tempdir().unwrap();
    let store = |url: &str| {
        config_toml(&format!(
            "store = \"redis\"\n[session.redis]\nurl = \"{url}\"\n"
        ))
    };
    let (mut child, log) = spawn_binary(dir.path(), &store(&evicting.url()));
    let line = logged(&log, "maxmemory").await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("allkeys-lru"), "{line}");
    assert!(line.contains("maxmemory-policy noeviction"), "{line}");

    // The same policy, but CONFIG is not allowed to the user Vestibule signs in as.
    let user = ["ACL", "SETUSER", "default", "-config"];
    assert!(evicting.command(&user).starts_with("+OK"));
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log) = spawn_binary(dir.path(), &store(&evicting.url()));
    // A refused CONFIG is answered at once: by the time the proxy listens, the check is over.
    let served = logged(&log, "listening").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!text.contains("maxmemory"), "{served}\n{text}");
}
