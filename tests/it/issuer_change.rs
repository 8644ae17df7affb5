//! Sessions belong to the provider that issued them: after `[oidc] issuer` changes over the same
//! store and `key_prefix`, the previous provider's sessions are signed out, and nothing of theirs
//! (a refresh token above all) reaches the new provider; a logout token ends only its own
//! issuer's sessions (and, come before their callbacks, refuses only its own issuer's logins),
//! and a session list shows only its own issuer's. Against two in-process
//! fake providers (issuers A and B) and a real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::logout::post_logout_token;
use crate::support::redis::{RedisServer, count_keys};
use crate::support::*;
use serde_json::json;
use vestibule::app::now;
use vestibule::jose::testing::{TestKey, TestSigner, id_token_claims, logout_token_claims};

/// A provider (its own key set, signed for by `signer`).
async fn provider(signer: &TestSigner) -> fake_idp::FakeIdp {
    fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await
}

/// Vestibule on `redis` in front of `idp`, a token route `/tok/` to `up`, on `clock`.
async fn proxy_for(
    redis: &RedisServer,
    idp: &fake_idp::FakeIdp,
    up: &upstream::Upstream,
    clock: vestibule::clock::Clock,
) -> Proxy {
    let extra = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{r}\"\n\
         [[routes]]\npath = \"/tok/\"\nupstream = \"{u}\"\ntoken = \"user\"\n",
        r = redis.url(),
        u = up.url()
    );
    let config = config_toml(&extra).set("oidc.issuer", idp.issuer.as_str());
    let proxy = start_proxy_with_clock(config, clock).await;
    wait_metadata(&proxy).await;
    proxy
}

/// Two replicas on one Redis during a change of issuer: `at_a` signs in with provider `a`,
/// `at_b` with `b`, both providers signing with `signer`'s key.
struct TwoIssuers {
    _redis: RedisServer,
    _up: upstream::Upstream,
    signer: TestSigner,
    a: fake_idp::FakeIdp,
    b: fake_idp::FakeIdp,
    at_a: Proxy,
    at_b: Proxy,
}

async fn two_issuers() -> TwoIssuers {
    two_issuers_on(vestibule::clock::Clock::system()).await
}

/// [`two_issuers`], both replicas on `clock`.
async fn two_issuers_on(clock: vestibule::clock::Clock) -> TwoIssuers {
    let redis = RedisServer::start();
    let up = upstream::start().await;
    let signer = TestSigner::new();
    let (a, b) = (provider(&signer).await, provider(&signer).await);
    let at_a = proxy_for(&redis, &a, &up, clock.clone()).await;
    let at_b = proxy_for(&redis, &b, &up, clock).await;
    TwoIssuers {
        _redis: redis,
        _up: up,
        signer,
        a,
        b,
        at_a,
        at_b,
    }
}

/// Signs alice in at `proxy` through `idp` (an ID token of `idp`'s, naming `sid` if given); the
/// login's access token lives the shortest time believed, its refresh token is
/// `refresh-of-a`. Returns the session cookie.
async fn login(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    signer: &TestSigner,
    sid: Option<&str>,
) -> String {
    login_living(proxy, idp, signer, sid, 0).await
}

/// [`login`] with an access token that lives `expires_in` seconds.
async fn login_living(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    signer: &TestSigner,
    sid: Option<&str>,
    expires_in: u64,
) -> String {
    let (q, login_cookie) = begin_login(proxy).await;
    let mut claims = id_token_claims(&idp.issuer, "vestibule", &q["nonce"], now());
    if let Some(sid) = sid {
        claims["sid"] = sid.into();
    }
    let answer = json!({"access_token": "access-of-a", "token_type": "Bearer", "expires_in": expires_in,
                        "refresh_token": "refresh-of-a",
                        "id_token": signer.token(TestKey::Rsa1).kid("k1").sign(&claims)});
    idp.state.script("authorization_code", 200, answer);
    let done = callback(proxy, &q, &login_cookie).await;
    assert_eq!(done.status, 302, "{}", done.text());
    done.session_cookie()
}

async fn stop(proxy: Proxy) {
    proxy.shutdown.cancel();
    let _ = proxy.task.await;
}

/// The key hostile case: a restart onto issuer B over the store of issuer A. With the old
/// cookie, whose access token is due, B's token endpoint must never see A's refresh token (nor
/// any grant), the upstream no token of A's, and the browser is signed out, as with an expired
/// session; the record is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_onto_another_issuer_the_old_sessions_are_signed_out_and_send_nothing() {
    let redis = RedisServer::start();
    let up = upstream::start().await;
    let signer = TestSigner::new();
    let (a, b) = (provider(&signer).await, provider(&signer).await);
    let at_a = proxy_for(&redis, &a, &up, vestibule::clock::Clock::system()).await;
    let cookie = login(&at_a, &a, &signer, Some("op-session")).await;
    assert!(at_a.signed_in(&cookie).await);
    // And one whose access token is still good (no refresh would come first).
    let fresh = login_living(&at_a, &a, &signer, None, 3600).await;
    stop(at_a).await;
    assert_eq!(count_keys(redis.port(), "vestibule:s:*"), 2);

    // B answers any refresh as a provider would: the grant would go through.
    b.state.script(
        "refresh_token",
        200,
        json!({"access_token": "access-of-b", "token_type": "Bearer", "expires_in": 300}),
    );
    *b.state.userinfo.lock().unwrap() = Some((200, "application/json".into(), "{}".into()));
    // The access token of A's login is due on B's clock: a refresh would be attempted.
    let clock = vestibule::clock::TestClock::new();
    clock.advance(std::time::Duration::from_secs(60));
    let at_b = proxy_for(&redis, &b, &up, clock.clock()).await;

    let api = get(&at_b.url("/tok/x"), &[("cookie", &cookie), ("x-csrf", "1")]).await;
    let grants = b.state.token_requests.lock().unwrap().clone();
    assert!(
        grants.is_empty(),
        "the new issuer's token endpoint was sent the old issuer's session's grants: {grants:?}"
    );
    assert_eq!(api.status, 401, "{}", api.text());
    assert_eq!(
        up.count(),
        0,
        "the upstream was reached with the old issuer's session"
    );
    assert!(
        !at_b.signed_in(&cookie).await,
        "/bff/user knows the old issuer's session"
    );
    assert!(b.state.userinfo_requests.lock().unwrap().is_empty());

    let api = get(&at_b.url("/tok/x"), &[("cookie", &fresh), ("x-csrf", "1")]).await;
    assert_eq!(
        (api.status, up.count()),
        (401, 0),
        "the old issuer's access token was sent upstream: {}",
        api.text()
    );
    assert!(b.state.token_requests.lock().unwrap().is_empty());
    assert_eq!(
        count_keys(redis.port(), "vestibule:s:*"),
        0,
        "the old issuer's session record was left in the store"
    );
}

/// Two replicas during a change of issuer (A, then B), one user `alice` at each: a `sub` or
/// `sid` is only unique per issuer, so B's logout tokens end B's sessions only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_token_ends_only_the_sessions_of_its_own_issuer() {
    let TwoIssuers {
        _redis,
        _up,
        signer,
        a,
        b,
        at_a,
        at_b,
    } = two_issuers().await;
    let a_sidless = login(&at_a, &a, &signer, None).await;
    let a_in_session = login(&at_a, &a, &signer, Some("op-session")).await;
    let b_in_session = login(&at_b, &b, &signer, Some("op-session")).await;

    let logout = |sid: Option<&str>, jti: &str| logout_token(&signer, &b.issuer, sid, jti);
    // Naming B's provider session and alice: ends B's, and B's alice's sessions without one.
    let r = post_logout_token(&at_b, &logout(Some("op-session"), "b-1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!at_b.signed_in(&b_in_session).await);
    assert!(
        at_a.signed_in(&a_in_session).await,
        "B's logout of its provider session ended A's of the same sid"
    );
    assert!(
        at_a.signed_in(&a_sidless).await,
        "B's logout of its alice ended A's alice's session without a sid"
    );

    // Naming alice alone: every session of B's alice, none of A's.
    let b_again = login(&at_b, &b, &signer, None).await;
    let r = post_logout_token(&at_b, &logout(None, "b-2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!at_b.signed_in(&b_again).await);
    assert!(
        at_a.signed_in(&a_in_session).await && at_a.signed_in(&a_sidless).await,
        "B's logout of alice ended A's alice's sessions"
    );
}

/// A `jti` is unique per issuer only (Back-Channel Logout 1.0 §2.4): two providers that number
/// their logout tokens alike must not see each other's as replays. B's logout token with the
/// `jti` A's had just used ends B's session; A's sent again is still a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_token_is_a_replay_only_of_its_own_issuers_jti() {
    let TwoIssuers {
        _redis,
        _up,
        signer,
        a,
        b,
        at_a,
        at_b,
    } = two_issuers().await;
    let in_a = login(&at_a, &a, &signer, Some("op-a")).await;
    let in_b = login(&at_b, &b, &signer, Some("op-b")).await;
    let logout = |issuer: &str, sid: &str| logout_token(&signer, issuer, Some(sid), "logout-1");
    let from_a = logout(&a.issuer, "op-a");
    let r = post_logout_token(&at_a, &from_a).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!at_a.signed_in(&in_a).await);
    let r = post_logout_token(&at_b, &logout(&b.issuer, "op-b")).await;
    assert_eq!(
        r.status,
        200,
        "B's logout token was refused as a replay of A's jti: {}",
        r.text()
    );
    assert!(
        !at_b.signed_in(&in_b).await,
        "B's session outlived its logout"
    );
    // A's own token again is still a replay.
    let r = post_logout_token(&at_a, &from_a).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // And so is one whose jti the previous release recorded (no issuer in its key).
    use sha2::Digest;
    let old = format!(
        "jti:{}",
        hex::encode(sha2::Sha256::digest("logout-2".as_bytes()))
    );
    let store = at_a.app.sessions.store();
    let minute = std::time::Duration::from_secs(60);
    assert!(store.remember_once(&old, minute).await.unwrap());
    let in_a = login(&at_a, &a, &signer, Some("op-a2")).await;
    let token = logout_token(&signer, &a.issuer, Some("op-a2"), "logout-2");
    let r = post_logout_token(&at_a, &token).await;
    assert_eq!(
        r.status,
        400,
        "a jti the previous release took was taken again: {}",
        r.text()
    );
    assert!(at_a.signed_in(&in_a).await);
}

/// A logout token of `issuer`'s for alice (signed with `signer`'s key), naming `sid` or no
/// `sid`, numbered `jti`.
fn logout_token(signer: &TestSigner, issuer: &str, sid: Option<&str>, jti: &str) -> String {
    let mut claims = logout_token_claims(issuer, "vestibule", now());
    claims["jti"] = jti.into();
    match sid {
        Some(sid) => claims["sid"] = sid.into(),
        None => {
            claims.as_object_mut().unwrap().remove("sid");
        }
    }
    signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims)
}

/// `r`, a callback's answer at `proxy`, signed alice in (`what` says which login).
async fn assert_signed_in(proxy: &Proxy, r: &Reply, what: &str) {
    assert_eq!(r.status, 302, "{what}: {}", r.text());
    assert!(proxy.signed_in(&r.session_cookie()).await, "{what}");
}

/// `r`, a callback's answer, refused the login as one into an ended provider session.
fn assert_refused(r: &Reply, what: &str) {
    assert_eq!(
        crate::fake_provider::reason(r).as_deref(),
        Some("provider_session_ended"),
        "{what}: {} {}",
        r.status,
        r.text()
    );
}

/// A login of alice begun at `proxy`, its callback still to come: the query of its redirect to
/// the provider and its login cookie.
struct Pending {
    q: std::collections::HashMap<String, String>,
    cookie: String,
}

async fn begin(proxy: &Proxy) -> Pending {
    let (q, cookie) = begin_login(proxy).await;
    Pending { q, cookie }
}

/// The callback of `login` at `proxy`, `idp` answering with alice's ID token naming `sid` if
/// given.
async fn finish(
    proxy: &Proxy,
    idp: &fake_idp::FakeIdp,
    signer: &TestSigner,
    login: &Pending,
    sid: Option<&str>,
) -> Reply {
    let mut claims = id_token_claims(&idp.issuer, "vestibule", &login.q["nonce"], now());
    match sid {
        Some(sid) => claims["sid"] = sid.into(),
        None => {
            claims.as_object_mut().unwrap().remove("sid");
        }
    }
    let answer = json!({"access_token": "access", "token_type": "Bearer", "expires_in": 300,
                        "id_token": signer.token(TestKey::Rsa1).kid("k1").sign(&claims)});
    idp.state.script("authorization_code", 200, answer);
    callback(proxy, &login.q, &login.cookie).await
}

/// A back-channel logout that comes before its login's callback leaves a mark the callback
/// reads. A `sub` or `sid` is unique only per issuer: A's logout of alice (of her provider
/// session `op-session`, then of all her sessions), arriving while logins of alice at A and at
/// B are pending, refuses A's logins exactly as before, and none of B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_before_the_callback_refuses_only_its_own_issuers_login() {
    let clock = vestibule::clock::TestClock::new();
    let TwoIssuers {
        _redis,
        _up,
        signer,
        a,
        b,
        at_a,
        at_b,
    } = two_issuers_on(clock.clock()).await;
    let logout_at_a = |sid: Option<&str>, jti: &str| logout_token(&signer, &a.issuer, sid, jti);

    // A's logout of alice's provider session `op-session` (its `sid` and `sub` marks).
    let (a_sid, a_sidless) = (begin(&at_a).await, begin(&at_a).await);
    let (b_sid, b_sidless) = (begin(&at_b).await, begin(&at_b).await);
    clock.advance(std::time::Duration::from_secs(1));
    let r = post_logout_token(&at_a, &logout_at_a(Some("op-session"), "a-1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = finish(&at_b, &b, &signer, &b_sid, Some("op-session")).await;
    assert_signed_in(
        &at_b,
        &r,
        "A's logout of its op-session refused B's login into B's",
    )
    .await;
    let r = finish(&at_b, &b, &signer, &b_sidless, None).await;
    assert_signed_in(
        &at_b,
        &r,
        "A's logout of its alice's op-session refused B's alice's login without a sid",
    )
    .await;
    let r = finish(&at_a, &a, &signer, &a_sid, Some("op-session")).await;
    assert_refused(&r, "A's own login into the ended op-session");
    let r = finish(&at_a, &a, &signer, &a_sidless, None).await;
    assert_refused(&r, "A's own login of alice without a sid");

    // A's logout of every session of alice (its `sub` mark).
    let (a_login, b_login) = (begin(&at_a).await, begin(&at_b).await);
    clock.advance(std::time::Duration::from_secs(1));
    let r = post_logout_token(&at_a, &logout_at_a(None, "a-2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = finish(&at_b, &b, &signer, &b_login, Some("op-2")).await;
    assert_signed_in(&at_b, &r, "A's logout of alice refused B's alice's login").await;
    let r = finish(&at_a, &a, &signer, &a_login, Some("op-2")).await;
    assert_refused(&r, "A's own login of alice after A's logout of her");
}

/// A mark the previous release left (its key names no issuer: one of its replicas took the
/// logout during an upgrade) still refuses the configured issuer's login: of the ended provider
/// session, of the user all of whose sessions ended, and without a `sid` of the user one of
/// whose provider sessions ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_mark_left_by_the_previous_release_still_refuses_the_login() {
    use sha2::Digest;
    let redis = RedisServer::start();
    let up = upstream::start().await;
    let signer = TestSigner::new();
    let a = provider(&signer).await;
    let proxy = proxy_for(&redis, &a, &up, vestibule::clock::Clock::system()).await;
    let store = proxy.app.sessions.store();
    let hash = |text: &str| hex::encode(sha2::Sha256::digest(text.as_bytes()));

    let pending = begin(&proxy).await;
    let ten_minutes = std::time::Duration::from_secs(600);
    let key = format!("ended-sid:{}", hash("op-session"));
    assert!(store.remember_once(&key, ten_minutes).await.unwrap());
    let r = finish(&proxy, &a, &signer, &pending, Some("op-session")).await;
    assert_refused(&r, "the previous release's mark of op-session");

    let pending = begin(&proxy).await;
    let key = format!("ended-sub:{}", hash("alice"));
    // A logout recorded as a minute from now: it refuses every login begun before it (the mark
    // refuses a login begun in an earlier second than its own). One second ahead was too
    // little: a third login begun in the next second was let in (a CI run under load).
    let at = (now() + 60).to_string();
    assert!(
        store
            .put_new(&key, at.as_bytes(), ten_minutes)
            .await
            .unwrap()
    );
    let r = finish(&proxy, &a, &signer, &pending, Some("op-2")).await;
    assert_refused(&r, "the previous release's mark of alice");

    let pending = begin(&proxy).await;
    let key = format!("ended-sub-sidless:{}", hash("alice"));
    assert!(
        store
            .put_new(&key, at.as_bytes(), ten_minutes)
            .await
            .unwrap()
    );
    let r = finish(&proxy, &a, &signer, &pending, None).await;
    assert_refused(
        &r,
        "the previous release's mark of alice's provider session",
    );
}

/// A session list, and ending a session from it, know only the sessions of the list's own
/// issuer: B's alice neither sees A's alice's sessions (their devices) nor can end them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_list_shows_and_ends_only_the_sessions_of_its_own_issuer() {
    let TwoIssuers {
        _redis,
        _up,
        signer,
        a,
        b,
        at_a,
        at_b,
    } = two_issuers().await;
    let of_a = login(&at_a, &a, &signer, None).await;
    let of_b = login(&at_b, &b, &signer, None).await;
    let list_of = |proxy: &Proxy, cookie: &str| {
        let (url, cookie) = (proxy.url("/bff/sessions"), cookie.to_string());
        async move { get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await }
    };
    let list = list_of(&at_b, &of_b).await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(
        list.json()["sessions"].as_array().unwrap().len(),
        1,
        "B's alice is shown the sessions of A's: {}",
        list.text()
    );
    let a_handle = list_of(&at_a, &of_a).await.json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == json!(true))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ended = send(
        http::Request::delete(at_b.url(&format!("/bff/sessions/{a_handle}")))
            .header("cookie", &of_b)
            .header("x-csrf", "1")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(ended.status, 404, "{}", ended.text());
    assert!(
        at_a.signed_in(&of_a).await,
        "B's alice ended A's alice's session"
    );
}

/// A session stored before sessions recorded their issuer (a record without one, as the
/// earlier release wrote it) is the configured issuer's: the upgrade signs nobody out, its
/// token is still sent, and the issuer's logout ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stored_before_issuers_were_recorded_stays_signed_in() {
    let redis = RedisServer::start();
    let up = upstream::start().await;
    let signer = TestSigner::new();
    let a = provider(&signer).await;
    let proxy = proxy_for(&redis, &a, &up, vestibule::clock::Clock::system()).await;
    let mut tokens = std::collections::BTreeMap::new();
    tokens.insert(
        String::new(),
        vestibule::session::model::AccessToken {
            value: "stored-before".into(),
            expires_at: now() + 3600,
            issued_at: now(),
            scope: None,
            jkt: None,
        },
    );
    // Written without an issuer, as the earlier release's records are.
    let session = vestibule::session::model::Session {
        sub: "alice".into(),
        sid: Some("op-session".into()),
        tokens: tokens.into(),
        refresh_token: Some("rt".into()),
        ..Default::default()
    };
    let cookie = proxy.session_cookie(session).await;
    stop(proxy).await;

    let proxy = proxy_for(&redis, &a, &up, vestibule::clock::Clock::system()).await;
    assert!(proxy.signed_in(&cookie).await);
    let api = get(
        &proxy.url("/tok/x"),
        &[("cookie", &cookie), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(api.status, 200, "{}", api.text());
    assert_eq!(
        up.last()
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("Bearer stored-before".into())
    );
    let list = get(
        &proxy.url("/bff/sessions"),
        &[("cookie", &cookie), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(
        list.json()["sessions"].as_array().unwrap().len(),
        1,
        "{}",
        list.text()
    );
    assert!(a.state.token_requests.lock().unwrap().is_empty());
    // And the configured issuer's logout still ends it.
    let mut claims = logout_token_claims(&a.issuer, "vestibule", now());
    claims["sid"] = "op-session".into();
    let token = signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims);
    let r = post_logout_token(&proxy, &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!proxy.signed_in(&cookie).await);
}
