//! Writes the store carried out but answered too late (Redis `CLIENT PAUSE ... WRITE` holds them
//! past the store timeout, then runs them): Vestibule answers 503, and what it does next must
//! hold whether or not the write happened — a logout leaves no copy served from any cache, and
//! a back-channel logout the provider retries is not taken for a replay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::faults_redis::{due_session, presented_refresh_tokens, redis_proxy};
use crate::logout::post_logout_token;
use crate::support::fake_idp;
use crate::support::late_replies::LateReplies;
use crate::support::redis::{RedisServer, count_keys};
use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use std::time::Duration;
use vestibule::jose::testing::{TestKey, TestSigner, logout_token_claims};
use vestibule::session::Session;

const PREFIX: &str = "vestibule:";

fn now() -> u64 {
    vestibule::app::now()
}

/// A back-channel logout whose writes were carried out but answered too late: the provider gets
/// a 503 and sends the same logout token again, which must be taken (not refused as a replay of
/// itself) and leave the session ended; a replay after that is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backchannel_logout_retried_after_a_late_store_answer_is_not_a_replay() {
    let redis = RedisServer::start();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let proxy = redis_proxy(&redis.url(), "5s", &idp, &up).await;
    let cookie = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            sid: Some("session-1".into()),
            ..Session::default()
        })
        .await;
    assert!(proxy.signed_in(&cookie).await);
    let mut claims = logout_token_claims(&idp.issuer, "vestibule", now());
    claims["jti"] = "j-late".into();
    let token = signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims);

    // Writes wait 1.5 s (longer than the store timeout), then are carried out; reads go on.
    redis.command(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    let first = post_logout_token(&proxy, &token).await;
    assert_eq!(first.status, 503, "{}", first.text());
    tokio::time::sleep(Duration::from_millis(1800)).await;

    // The provider retries the logout it was refused.
    let retry = post_logout_token(&proxy, &token).await;
    assert_eq!(
        retry.status,
        200,
        "the provider's retry was refused: {}",
        retry.text()
    );
    assert!(
        !proxy.signed_in(&cookie).await,
        "the back-channel logout was lost: the session lives on"
    );
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}jti:*")),
        1,
        "the token is recorded once the logout took effect"
    );
    let replay = post_logout_token(&proxy, &token).await;
    assert_eq!(replay.status, 400, "a replay: {}", replay.text());
}

/// A logout whose delete was carried out but answered too late: the session is gone from the
/// store, yet both replicas keep serving it from their caches (no invalidation was sent, not
/// even on the instance that did the logout). Replica a talks to Redis through a relay that
/// answers the delete (a compare-and-delete script, `EVALSHA`) 1.5 s late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_whose_delete_answered_late_leaves_no_cached_copy() {
    let redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let a = redis_proxy(&relay.url(), "30s", &idp, &up).await;
    let b = redis_proxy(&redis.url(), "30s", &idp, &up).await;
    let logout = |cookie: String| {
        send(
            http::Request::post(a.url("/bff/logout"))
                .header("cookie", cookie)
                .header("x-csrf", "1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    };
    // A first logout (of another session) has Redis know the logout's scripts: answered late,
    // an EVALSHA Redis does not know yet is refused (NOSCRIPT) and never carried out.
    let other = a
        .session_cookie(Session {
            sub: "bob".into(),
            ..Session::default()
        })
        .await;
    let warm = logout(other).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let cookie = a
        .session_cookie(Session {
            sub: "alice".into(),
            ..Session::default()
        })
        .await;
    for p in [&a, &b] {
        assert_eq!(
            get(&p.url("/api/x"), &[("cookie", &cookie)]).await.status,
            200
        );
    }

    relay.arm(b"EVALSHA", Duration::from_millis(1500));
    let late = logout(cookie.clone()).await;
    assert!(relay.fired());
    assert_eq!(late.status, 503, "{}", late.text());
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        count_keys(redis.port(), &format!("{PREFIX}s:*")),
        0,
        "the delete was carried out after all"
    );
    let mut statuses = Vec::new();
    for p in [&a, &b] {
        statuses.push(get(&p.url("/api/x"), &[("cookie", &cookie)]).await.status);
    }
    assert_eq!(
        statuses,
        [401, 401],
        "replicas [a (did the logout), b] still serve the session deleted from the store"
    );
}

/// A refresh's lease or spend record written but answered too late (the store timed out): the
/// refresh stops before it presents the refresh token (a 503), and what it leaves in the store
/// must not hold the session back. Left there, a lease lasts 10 s and a spend record twice the
/// provider timeout + 70 s, and every request of the session in that time waits for a refresh
/// that never happens (and, for the record, is a 503 too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_lease_or_spend_record_answered_late_does_not_hold_the_session_back() {
    let redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let proxy = redis_proxy(&relay.url(), "5s", &idp, &up).await;
    let url = proxy.url("/tok/x");
    // The spend record's keys start `r:`, the lease's `l:`.
    for (what, marker) in [("spend record", "r:"), ("lease", "l:")] {
        idp.state.token_requests.lock().unwrap().clear();
        let cookie = due_session(&proxy, &idp, &[]).await;
        let headers = [("cookie", cookie.as_str()), ("x-csrf", "1")];
        // Its SET NX is carried out; the answer comes 1.5 s late.
        relay.arm(
            format!("{PREFIX}{marker}").as_bytes(),
            Duration::from_millis(1500),
        );
        let first = get(&url, &headers).await;
        assert!(relay.fired(), "{what}: never set");
        assert_eq!(first.status, 503, "{what}: {}", first.text());
        assert_eq!(first.json()["error"], "store_unavailable", "{what}");
        assert!(presented_refresh_tokens(&idp).is_empty(), "{what}");
        tokio::time::sleep(Duration::from_millis(1800)).await;

        let started = std::time::Instant::now();
        let second = get(&url, &headers).await;
        let waited = started.elapsed();
        assert_eq!(
            second.status,
            200,
            "{what}: after {waited:?}: {}",
            second.text()
        );
        assert!(
            waited < Duration::from_secs(5),
            "{what}: the refresh waited {waited:?} for what the failed one left behind"
        );
        assert_eq!(up.last().headers["authorization"], "Bearer at-2", "{what}");
        assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1"], "{what}");
        assert_eq!(
            count_keys(redis.port(), &format!("{PREFIX}r:*")),
            0,
            "{what}"
        );
        assert_eq!(
            count_keys(redis.port(), &format!("{PREFIX}l:*")),
            0,
            "{what}"
        );
    }
}
