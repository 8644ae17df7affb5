//! Logout: the RP-initiated logout (GET with `sid`, POST with X-CSRF), back-channel logout from
//! the real provider across two instances sharing Redis (with the session-ended event stream),
//! hostile logout tokens from a fake provider, and the session list of a user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::provider;
use crate::support::redis::RedisServer;
use crate::support::stack::LoginStack;
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vestibule::jose::testing::{Forgery, TestKey, TestSigner, logout_token_claims};
use vestibule::session::model::Session;

/// Two proxies sharing one Redis in front of the real provider. The provider's client (and its
/// back-channel logout URI) points at the first one.
struct Pair {
    provider: provider::TestProvider,
    _a: Proxy,
    _b: Proxy,
    base_a: String,
    base_b: String,
    _redis: RedisServer,
}

async fn pair() -> Pair {
    let redis = RedisServer::start();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let (port_a, port_b) = (free_port(), free_port());
    let provider = provider::start(port_a, serde_json::json!({}));
    let a = start_proxy(&login_config(port_a, &provider.issuer, &store)).await;
    let b = start_proxy(&login_config(port_b, &provider.issuer, &store)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    Pair {
        provider,
        _a: a,
        _b: b,
        base_a: format!("http://127.0.0.1:{port_a}"),
        base_b: format!("http://127.0.0.1:{port_b}"),
        _redis: redis,
    }
}

async fn user_status(browser: &mut Browser, base: &str) -> u16 {
    browser
        .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
        .await
        .status
}

/// Waits (bounded) until `/bff/user` at `base` answers `status` for this browser.
async fn eventually_user_status(browser: &mut Browser, base: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = user_status(browser, base).await;
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base}/bff/user stayed {now}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tries the refresh token at the provider's token endpoint; true if it still works.
async fn refresh_works(provider: &provider::TestProvider, refresh_token: &str) -> bool {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("vestibule:vestibule-secret");
    let body = format!(
        "grant_type=refresh_token&refresh_token={}",
        crate::support::browser::urlencode(refresh_token)
    );
    let r = send(
        http::Request::post(format!("{}/token", provider.issuer))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    r.status == 200
}

impl Pair {
    /// A browser signed in at the first instance as `user` (whose password is its name).
    async fn login(&self, user: &str) -> Browser {
        let mut browser = Browser::default();
        let done = browser.login(&self.base_a, user, user, "/").await;
        assert_eq!(done.status, 302, "{}", done.text());
        browser
    }
}

#[tokio::test]
async fn logout_with_the_session_id_ends_the_session_everywhere_and_revokes_the_refresh_token() {
    let p = pair().await;
    let mut alice = p.login("alice").await;
    let user = alice
        .get(&format!("{}/bff/user", p.base_a), &[("x-csrf", "1")])
        .await;
    assert_eq!(user.status, 200);
    let logout_url = user.json()["bff:logout_url"].as_str().unwrap().to_string();
    assert_eq!(user_status(&mut alice, &p.base_b).await, 200);

    // Without the session's sid, logout is refused (a cross-site link cannot log the user out).
    for bad in ["/bff/logout", "/bff/logout?sid=", "/bff/logout?sid=wrong"] {
        let r = alice.get(&format!("{}{bad}", p.base_a), &[]).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"], "bad_request");
    }
    assert_eq!(user_status(&mut alice, &p.base_a).await, 200);

    let refresh_token = p.provider.tokens("alice").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let revocations = p.provider.stats().await["revocations"].as_u64().unwrap();
    let cookie = alice.jar["vestibule"].clone();
    let out = alice.get(&format!("{}{logout_url}", p.base_a), &[]).await;
    assert_eq!(out.status, 302, "{}", out.text());
    let location = url::Url::parse(out.header("location").unwrap()).unwrap();
    assert!(
        location.as_str().starts_with(&p.provider.issuer),
        "{location}"
    );
    let q: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(
        q.get("id_token_hint").map(String::as_str),
        p.provider.tokens("alice").await["id_token"].as_str()
    );
    assert_eq!(q["post_logout_redirect_uri"], format!("{}/", p.base_a));
    assert_eq!(q["client_id"], "vestibule");
    let metadata = get(
        &format!("{}/.well-known/openid-configuration", p.provider.issuer),
        &[],
    )
    .await
    .json();
    assert_eq!(
        format!(
            "{}://{}{}",
            location.scheme(),
            location.host_str().unwrap(),
            location.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + location.path(),
        metadata["end_session_endpoint"].as_str().unwrap()
    );
    assert!(
        !alice.jar.contains_key("vestibule"),
        "the session cookie is cleared"
    );

    // Replaying the old cookie value works on neither instance.
    let mut replay = Browser::default();
    replay.jar.insert("vestibule".into(), cookie);
    eventually_user_status(&mut replay, &p.base_a, 401).await;
    eventually_user_status(&mut replay, &p.base_b, 401).await;
    eventually_user_status(&mut alice, &p.base_a, 401).await;
    eventually_user_status(&mut alice, &p.base_b, 401).await;

    let after = p.provider.stats().await["revocations"].as_u64().unwrap();
    assert!(after > revocations, "no revocation reached the provider");
    assert!(
        !refresh_works(&p.provider, &refresh_token).await,
        "the refresh token still works after logout"
    );
}

#[tokio::test]
async fn post_logout_needs_the_csrf_header_and_answers_json_without_a_token() {
    let LoginStack {
        provider,
        proxies: _proxies,
        base,
        ..
    } = LoginStack::builder().start().await;
    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);
    let url = format!("{base}/bff/logout");
    let refused = alice.request("POST", &url, &[], None).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"], "csrf");
    let cross = alice
        .request(
            "POST",
            &url,
            &[("x-csrf", "1"), ("origin", "https://evil.example")],
            None,
        )
        .await;
    assert_eq!(cross.status, 403);
    assert_eq!(user_status(&mut alice, &base).await, 200);
    let done = alice.request("POST", &url, &[("x-csrf", "1")], None).await;
    assert_eq!(done.status, 200, "{}", done.text());
    // The page's script reads this answer: the ID token (id_token_hint) is not in it.
    let answer = done.text();
    assert!(
        !answer.contains("id_token_hint") && !answer.contains("eyJ"),
        "the answer to the page's script carries a token: {answer}"
    );
    let target = done.json()["redirect"].as_str().unwrap().to_string();
    assert_eq!(target, "/bff/logout/end");
    assert_eq!(user_status(&mut alice, &base).await, 401);
    // The browser goes there; the ID token travels in that navigation's redirect only, as with
    // GET /bff/logout.
    let end = alice.get(&format!("{base}{target}"), &[]).await;
    assert_eq!(end.status, 302, "{}", end.text());
    let location = end.header("location").unwrap().to_string();
    assert!(location.starts_with(&provider.issuer), "{location}");
    assert!(location.contains("id_token_hint=ey"), "{location}");
    assert!(location.contains("post_logout_redirect_uri="), "{location}");
    // Once: the way out is forgotten with its first use.
    let replayed = alice.get(&format!("{base}{target}"), &[]).await;
    assert_eq!(replayed.status, 302);
    assert_eq!(replayed.header("location"), Some("/"));
    // Logging out without a session is harmless.
    let again = alice.request("POST", &url, &[("x-csrf", "1")], None).await;
    assert_eq!(again.status, 200);
}

/// The way out a script's logout keeps for the browser lasts a minute: a cookie kept longer (a
/// browser that ignores its Max-Age, a copy taken) leads only to `post_logout_redirect`.
#[tokio::test]
async fn a_script_logouts_way_out_lasts_a_minute() {
    let clock = vestibule::clock::TestClock::new();
    let LoginStack {
        provider,
        proxies: _proxies,
        base,
        ..
    } = LoginStack::builder().clock(clock.clock()).start().await;
    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);
    let url = format!("{base}/bff/logout");
    let done = alice.request("POST", &url, &[("x-csrf", "1")], None).await;
    assert_eq!(done.json()["redirect"], "/bff/logout/end");
    let kept = alice.jar.clone();
    let end = alice.get(&format!("{base}/bff/logout/end"), &[]).await;
    assert!(
        end.header("location")
            .unwrap()
            .starts_with(&provider.issuer),
        "{:?}",
        end.header("location")
    );
    alice.jar = kept;
    clock.advance(Duration::from_secs(61));
    let late = alice.get(&format!("{base}/bff/logout/end"), &[]).await;
    assert_eq!(late.status, 302);
    assert_eq!(late.header("location"), Some("/"));
}

/// The cookie that keeps a script's logout's way out is Vestibule's own, like the session
/// cookie: it never reaches an upstream (it holds the ID token, sealed), and an upstream cannot
/// set it.
#[tokio::test]
async fn a_script_logouts_way_out_never_reaches_an_upstream() {
    let LoginStack {
        provider: _provider,
        proxies: _proxies,
        base,
        up,
        ..
    } = LoginStack::builder()
        .extra(|u| format!("[[routes]]\npath = \"/open/\"\nupstream = \"{u}\"\nauth = \"none\"\n"))
        .start()
        .await;
    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);
    let url = format!("{base}/bff/logout");
    let done = alice.request("POST", &url, &[("x-csrf", "1")], None).await;
    assert_eq!(done.json()["redirect"], "/bff/logout/end");
    assert!(
        alice.jar.contains_key("vestibule-logout"),
        "{:?}",
        alice.jar
    );
    let r = alice
        .get(&format!("{base}/open/x"), &[("cookie", "app=1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last().headers["cookie"].to_str().unwrap().to_string();
    assert!(seen.contains("app=1"), "{seen}");
    assert!(
        !seen.contains("vestibule-logout"),
        "the upstream was sent the logout cookie: {seen}"
    );
}

/// Reads an event stream until `needle` appears; panics at the deadline.
/// Opens `/bff/session-events` with the browser's session cookie.
async fn session_events(base: &str, browser: &Browser) -> http::Response<hyper::body::Incoming> {
    client()
        .request(
            http::Request::get(format!("{base}/bff/session-events"))
                .header("cookie", format!("vestibule={}", browser.jar["vestibule"]))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap()
}

async fn wait_for_event(
    body: &mut hyper::body::Incoming,
    needle: &str,
    within: Duration,
) -> String {
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
    seen
}

#[tokio::test]
async fn back_channel_logout_from_the_provider_ends_the_session_on_every_instance() {
    let p = pair().await;
    let mut alice = p.login("alice").await;
    let mut bob = p.login("bob").await;
    assert_eq!(user_status(&mut alice, &p.base_b).await, 200);

    // An open session-events stream on the other instance.
    let events = client()
        .request(
            http::Request::get(format!("{}/bff/session-events", p.base_b))
                .header("cookie", format!("vestibule={}", alice.jar["vestibule"]))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(
        events.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = events.into_body();
    wait_for_event(&mut body, ": connected", Duration::from_secs(5)).await;

    let sent_before = p.provider.stats().await["backchannel_logouts_sent"]
        .as_u64()
        .unwrap();
    let r = p
        .provider
        .control("/_test/logout", serde_json::json!({"sub": "alice"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stats = p.provider.stats().await;
    assert!(
        stats["backchannel_logouts_sent"].as_u64().unwrap() > sent_before,
        "the proxy did not accept the provider's logout token: {stats}"
    );
    assert_eq!(stats["backchannel_logout_errors"], 0, "{stats}");

    let seen = wait_for_event(&mut body, "event: ended", Duration::from_secs(10)).await;
    assert!(seen.contains("event: ended"));
    eventually_user_status(&mut alice, &p.base_a, 401).await;
    eventually_user_status(&mut alice, &p.base_b, 401).await;
    // Only alice's session ended.
    assert_eq!(user_status(&mut bob, &p.base_a).await, 200);
    assert_eq!(user_status(&mut bob, &p.base_b).await, 200);
}

/// A provider that serves only discovery and a key set, so tokens can be forged at will.
async fn fake_provider(jwks: Vec<u8>) -> String {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let discovery = serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/auth"),
        "token_endpoint": format!("{issuer}/token"),
        "jwks_uri": format!("{issuer}/jwks"),
        "end_session_endpoint": format!("{issuer}/session/end"),
        "backchannel_logout_supported": true,
    })
    .to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (discovery, jwks) = (discovery.clone(), jwks.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => Some(discovery.clone().into_bytes()),
                        "/jwks" => Some(jwks.clone()),
                        _ => None,
                    };
                    async move {
                        let response = match body {
                            Some(b) => http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(b))),
                            None => http::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new())),
                        };
                        Ok::<_, std::convert::Infallible>(response.unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    issuer
}

pub(crate) async fn post_logout_token(proxy: &Proxy, token: &str) -> Reply {
    send(
        http::Request::post(proxy.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(format!(
                "logout_token={}",
                crate::support::browser::urlencode(token)
            ))))
            .unwrap(),
    )
    .await
}

/// A session for alice with provider sid `session-1`, made directly in the store.
/// A signer, the fake provider it signs for (its issuer), and a ready proxy with the memory
/// store in front of it.
async fn signed_in_proxy() -> (TestSigner, String, Proxy) {
    let signer = TestSigner::new();
    let issuer = fake_provider(signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")])).await;
    let proxy = start_proxy(&login_config(free_port(), &issuer, "")).await;
    wait_ready(&proxy).await;
    (signer, issuer, proxy)
}

/// alice's session cookie ([`alice_session`]) and the logout link `/bff/user` gives her page.
async fn alice_and_her_logout_link(proxy: &Proxy) -> (String, String) {
    let alice = alice_session(proxy).await;
    let user = get(
        &proxy.url("/bff/user"),
        &[("cookie", alice.as_str()), ("x-csrf", "1")],
    )
    .await;
    let link = user.json()["bff:logout_url"].as_str().unwrap().to_string();
    (alice, link)
}

async fn alice_session(proxy: &Proxy) -> String {
    let session = Session {
        sub: "alice".into(),
        sid: Some("session-1".into()),
        ..Session::default()
    };
    proxy.session_cookie(session).await
}

#[tokio::test]
async fn hostile_logout_tokens_are_rejected_and_end_nothing() {
    let (signer, issuer, proxy) = signed_in_proxy().await;
    let cookie = alice_session(&proxy).await;
    assert!(proxy.signed_in(&cookie).await);

    let now = vestibule::app::now();
    let valid = |jti: &str| {
        let mut claims = logout_token_claims(&issuer, "vestibule", now);
        claims["jti"] = jti.into();
        claims
    };
    let sign =
        |claims: &serde_json::Value| signer.token(TestKey::Rsa1).typ("logout+jwt").sign(claims);
    let forged = |forgery: Forgery, jti: &str| {
        signer
            .token(TestKey::Rsa1)
            .typ("logout+jwt")
            .forge(forgery)
            .sign(&valid(jti))
    };
    let mut hostile: Vec<(&str, String)> = vec![
        ("bad signature", forged(Forgery::BadSignature, "j-sig")),
        ("alg none", forged(Forgery::AlgNone, "j-none")),
        (
            "HS256 with the client secret",
            forged(
                Forgery::Hs256WithSecret(b"vestibule-secret".to_vec()),
                "j-hs",
            ),
        ),
        (
            "unknown key",
            signer
                .token(TestKey::Rsa2)
                .typ("logout+jwt")
                .sign(&valid("j-key")),
        ),
    ];
    let mut c = valid("j-iss");
    c["iss"] = "https://evil.example".into();
    hostile.push(("wrong iss", sign(&c)));
    let mut c = valid("j-aud");
    c["aud"] = "another-client".into();
    hostile.push(("wrong aud", sign(&c)));
    let mut c = valid("j-events");
    c.as_object_mut().unwrap().remove("events");
    hostile.push(("missing events", sign(&c)));
    let mut c = valid("j-event-kind");
    c["events"] = serde_json::json!({"http://example.com/other-event": {}});
    hostile.push(("another event", sign(&c)));
    let mut c = valid("j-nonce");
    c["nonce"] = "n-1".into();
    hostile.push(("with nonce", sign(&c)));
    let mut c = valid("j-none-of");
    c.as_object_mut().unwrap().remove("sid");
    c.as_object_mut().unwrap().remove("sub");
    hostile.push(("neither sid nor sub", sign(&c)));
    let mut c = valid("j-stale");
    c["iat"] = (now - 3600).into();
    hostile.push(("stale iat", sign(&c)));
    let mut c = valid("j-future");
    c["iat"] = (now + 3600).into();
    hostile.push(("iat in the future", sign(&c)));
    let mut c = valid("j-jti");
    c.as_object_mut().unwrap().remove("jti");
    hostile.push(("missing jti", sign(&c)));
    hostile.push((
        "an ID token",
        signer.token(TestKey::Rsa1).typ("JWT").sign(&valid("j-typ")),
    ));
    hostile.push(("not a JWT", "garbage".into()));

    for (what, token) in &hostile {
        let r = post_logout_token(&proxy, token).await;
        assert_eq!(r.status, 400, "{what} was accepted: {}", r.text());
        assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
        assert!(proxy.signed_in(&cookie).await, "{what} ended the session");
    }
    let empty = post_logout_token(&proxy, "").await;
    assert_eq!(empty.status, 400);

    // The valid token ends the session; the same token again is a replay.
    let token = sign(&valid("j-valid"));
    let r = post_logout_token(&proxy, &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !proxy.signed_in(&cookie).await,
        "the valid token ended nothing"
    );
    let second = alice_session(&proxy).await;
    let replayed = post_logout_token(&proxy, &token).await;
    assert_eq!(replayed.status, 400, "a replayed jti was accepted");
    assert!(proxy.signed_in(&second).await, "the replay ended a session");

    // A token with only `sub` ends all of that user's sessions.
    let mut c = valid("j-sub");
    c.as_object_mut().unwrap().remove("sid");
    let r = post_logout_token(&proxy, &sign(&c)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!proxy.signed_in(&second).await);
}

/// `DELETE {sessions}/{id}` from the app in `browser` (with X-CSRF): ends session `id`.
async fn end_session(browser: &mut Browser, sessions: &str, id: &str) -> Reply {
    browser
        .request(
            "DELETE",
            &format!("{sessions}/{id}"),
            &[("x-csrf", "1")],
            None,
        )
        .await
}

#[tokio::test]
async fn users_list_and_end_their_own_sessions_only() {
    let LoginStack {
        provider: _provider,
        mut proxies,
        base,
        ..
    } = LoginStack::builder().start().await;
    let proxy = proxies.remove(0);
    let mut laptop = Browser::default();
    let mut phone = Browser::default();
    let mut bob = Browser::default();
    assert_eq!(laptop.login(&base, "alice", "alice", "/").await.status, 302);
    assert_eq!(phone.login(&base, "alice", "alice", "/").await.status, 302);
    assert_eq!(bob.login(&base, "bob", "bob", "/").await.status, 302);

    let url = format!("{base}/bff/sessions");
    assert_eq!(
        laptop.get(&url, &[]).await.status,
        403,
        "X-CSRF is required"
    );
    let list = laptop.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let sessions = list.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(
        sessions.iter().filter(|s| s["current"] == true).count(),
        1,
        "{sessions:?}"
    );
    let other = sessions.iter().find(|s| s["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let current = sessions.iter().find(|s| s["current"] == true).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for s in &sessions {
        let text = s.to_string();
        for cookie in laptop.jar.values().chain(phone.jar.values()) {
            assert!(!text.contains(cookie.as_str()), "a cookie value is listed");
        }
    }
    let bob_list = bob.get(&url, &[("x-csrf", "1")]).await.json();
    assert_eq!(bob_list["sessions"].as_array().unwrap().len(), 1);

    // Bob cannot end alice's session.
    let r = end_session(&mut bob, &url, &other).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    assert_eq!(user_status(&mut phone, &base).await, 200);
    // Without X-CSRF nothing happens.
    let r = laptop
        .request("DELETE", &format!("{url}/{other}"), &[], None)
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(user_status(&mut phone, &base).await, 200);

    // The phone's app learns at once that its session ended.
    let events = session_events(&base, &phone).await;
    let mut stream = events.into_body();
    wait_for_event(&mut stream, ": connected", Duration::from_secs(5)).await;
    let r = end_session(&mut laptop, &url, &other).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for_event(&mut stream, "event: ended", Duration::from_secs(5)).await;
    assert_eq!(user_status(&mut phone, &base).await, 401);
    assert_eq!(user_status(&mut laptop, &base).await, 200);
    let list = laptop.get(&url, &[("x-csrf", "1")]).await.json();
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![current.as_str()]);
    let again = end_session(&mut laptop, &url, &other).await;
    assert_eq!(again.status, 404);

    // Shutting down ends open event streams at once (the app reconnects, to another replica)
    // rather than holding the drain for the whole grace period (30 s here).
    let events = session_events(&base, &laptop).await;
    let mut stream = events.into_body();
    wait_for_event(&mut stream, ": connected", Duration::from_secs(5)).await;
    proxy.shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = stream.frame().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream outlived the shutdown");
    tokio::time::timeout(Duration::from_secs(3), proxy.task)
        .await
        .expect("the proxy drained well within its grace period")
        .unwrap()
        .unwrap();
}

/// The fake provider with a revocation endpoint.
pub(crate) async fn revoking_idp() -> fake_idp::FakeIdp {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    idp.state.discovery_extra.lock().unwrap().insert(
        "revocation_endpoint".into(),
        format!("{}/revoke", idp.issuer).into(),
    );
    idp
}

/// A script's logout (`POST /bff/logout`) of `cookie`'s session on `proxy`, sent in the
/// background.
pub(crate) fn script_logout(proxy: &Proxy, cookie: &str) -> tokio::task::JoinHandle<Reply> {
    let (url, cookie) = (proxy.url("/bff/logout"), cookie.to_string());
    tokio::spawn(async move {
        send(
            http::Request::post(url)
                .header("cookie", &cookie)
                .header("x-csrf", "1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    })
}

/// A logout while a refresh of the session is at the provider waits for it (no refresh saves
/// while a logout reads and ends the session), then revokes the refresh token the refresh
/// rotated — which only its answer held — not only the spent one, and the session stays ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_during_a_refresh_waits_for_it_and_revokes_the_rotated_refresh_token() {
    use crate::faults_redis::{due_session, refresh_held_at_the_provider, token_proxy};
    let redis = RedisServer::start();
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let proxy = token_proxy(&redis.url(), &idp, &up).await;
    let cookie = due_session(&proxy, &idp, &[]).await;

    let (release, refresh) = refresh_held_at_the_provider(&proxy, &idp, &cookie).await;
    let logout = script_logout(&proxy, &cookie);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !logout.is_finished(),
        "the logout did not wait for the refresh"
    );
    release.send(()).unwrap();
    let logout = logout.await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    assert_eq!(refresh.await.unwrap().status, 200);
    assert!(
        !proxy.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    let revoked = revoked_tokens(&idp);
    assert!(
        revoked.contains(&"rt-2".to_string()),
        "the rotated refresh token outlives the logout at the provider; revoked: {revoked:?}"
    );
}

/// The tokens the fake provider was asked to revoke, in order.
pub(crate) fn revoked_tokens(idp: &fake_idp::FakeIdp) -> Vec<String> {
    idp.state
        .revocations
        .lock()
        .unwrap()
        .iter()
        .filter_map(|form| {
            form.iter()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.clone())
        })
        .collect()
}

/// A logout that could not hold the refresh lease (a refresh kept it past the logout's wait),
/// read the session just before that refresh saved new tokens, and deletes it just after: it
/// must revoke the refresh token that was saved (rotated by the refresh, now the grant's only
/// one), not only the spent one it read. The logout's read is answered late (the logout's
/// replica talks to Redis through a relay) while the other replica's refresh saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_that_read_the_session_before_a_refresh_saved_revokes_the_saved_refresh_token() {
    use crate::faults_redis::{
        due_session, redis_proxy_timed, refresh_held_at_the_provider, token_proxy,
    };
    use crate::support::late_replies::LateReplies;
    let redis = RedisServer::start();
    let relay = LateReplies::start(redis.port()).await;
    let idp = revoking_idp().await;
    let up = upstream::start().await;
    let a = token_proxy(&redis.url(), &idp, &up).await;
    // b's logout waits provider_timeout + 5 s for the refresh lease.
    let b = redis_proxy_timed(
        &relay.url(),
        "30s",
        Duration::from_secs(3),
        &[("oidc.provider_timeout", "1s")],
        &idp,
        &up,
    )
    .await;
    let cookie = due_session(&a, &idp, &[]).await;
    // b caches the session, so that its logout's first read of the store is the whole reread.
    assert_eq!(
        get(&b.url("/api/x"), &[("cookie", &cookie)]).await.status,
        200
    );

    let (release, refresh) = refresh_held_at_the_provider(&a, &idp, &cookie).await;
    relay.arm(b"vestibule:s:", Duration::from_millis(700));
    let logout = script_logout(&b, &cookie);
    eventually(
        "the logout reads the session",
        Duration::from_secs(15),
        || async { relay.fired().then_some(()) },
    )
    .await;
    // The refresh saves rt-2 while the logout's read (rt-1) is on its way back.
    release.send(()).unwrap();
    assert_eq!(refresh.await.unwrap().status, 200);
    let logout = logout.await.unwrap();
    assert_eq!(logout.status, 200, "{}", logout.text());
    assert!(
        !a.signed_in(&cookie).await,
        "the session outlived the logout"
    );
    let revoked = revoked_tokens(&idp);
    assert!(
        revoked.contains(&"rt-2".to_string()),
        "the refresh token saved by the refresh outlives the logout at the provider; revoked: \
         {revoked:?}"
    );
}

/// A logout token naming a provider session (`sid`) ends that session only. After the
/// user signed out on the laptop (RP-initiated logout, which ends the laptop's session here and
/// takes it out of the sid index), the provider's back-channel logout for the laptop's provider
/// session (`sid` = laptop's, `sub` = alice) must not end the phone's session, which belongs to
/// another provider session (Back-Channel Logout 1.0 §2.4: without `sid` the intent is all of the
/// user's sessions; with it, that session; §2.7: a user already logged out is a success).
#[tokio::test]
async fn a_logout_token_for_an_ended_provider_session_leaves_the_users_other_sessions() {
    let (signer, issuer, proxy) = signed_in_proxy().await;
    let laptop = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            sid: Some("op-session-laptop".into()),
            ..Session::default()
        })
        .await;
    let phone = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            sid: Some("op-session-phone".into()),
            ..Session::default()
        })
        .await;
    // Stored without a provider session id (the provider gave none at login): it may be the
    // laptop's provider session, so a logout token for the user's session ends it.
    let sidless = proxy
        .session_cookie(Session {
            sub: "alice".into(),
            sid: None,
            ..Session::default()
        })
        .await;
    let bob = proxy
        .session_cookie(Session {
            sub: "bob".into(),
            sid: None,
            ..Session::default()
        })
        .await;
    for cookie in [&laptop, &phone, &sidless, &bob] {
        assert!(proxy.signed_in(cookie).await);
    }

    // The user signs out on the laptop through the app (POST /bff/logout, X-CSRF).
    let out = script_logout(&proxy, &laptop).await.unwrap();
    assert_eq!(out.status, 200, "{}", out.text());
    assert!(!proxy.signed_in(&laptop).await);

    // The provider then tells every client of the laptop's provider session.
    let now = vestibule::app::now();
    let mut claims = logout_token_claims(&issuer, "vestibule", now);
    claims["jti"] = "laptop-logout".into();
    claims["sid"] = "op-session-laptop".into();
    let token = signer.token(TestKey::Rsa1).typ("logout+jwt").sign(&claims);
    let r = post_logout_token(&proxy, &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        proxy.signed_in(&phone).await,
        "a logout token for the laptop's provider session ended the phone's session"
    );
    assert!(
        !proxy.signed_in(&sidless).await,
        "the user's session without a provider session id outlived a logout token for her"
    );
    assert!(proxy.signed_in(&bob).await, "another user's session ended");
}

/// A logout token that cannot be checked because the provider's key set is unreachable
/// right now (the provider rotated its signing key, and the refetch for the new `kid` failed) is
/// not an invalid token: the answer must let the provider retry (503, as for a store outage),
/// not 400, which providers take as final — the logout would be lost and the session live on.
#[tokio::test]
async fn a_key_set_outage_during_a_back_channel_logout_is_answered_so_the_provider_retries() {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let port = free_port();
    let proxy = start_proxy(&login_config(port, &idp.issuer, "")).await;
    wait_ready(&proxy).await;
    let cookie = alice_session(&proxy).await;
    assert!(proxy.signed_in(&cookie).await);

    // The provider rotates to a new key; its JWKS endpoint answers garbage for a moment.
    *idp.state.jwks.lock().unwrap() = b"<html>502 Bad Gateway</html>".to_vec();
    let now = vestibule::app::now();
    let mut claims = logout_token_claims(&idp.issuer, "vestibule", now);
    claims["jti"] = "rotated".into();
    let token = signer
        .token(TestKey::Rsa2)
        .kid("k2")
        .typ("logout+jwt")
        .sign(&claims);
    let r = post_logout_token(&proxy, &token).await;
    assert!(proxy.signed_in(&cookie).await);
    assert_eq!(
        r.status,
        503,
        "an unreachable key set was answered as an invalid logout token: {} {}",
        r.status,
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    // The provider's retry comes before another fetch may be tried: still not "invalid".
    let again = post_logout_token(&proxy, &token).await;
    assert_eq!(again.status, 503, "{}", again.text());
    assert!(proxy.signed_in(&cookie).await);
}

/// The provider sends its logout token as a form (Back-Channel Logout 1.0 §2.5:
/// `application/x-www-form-urlencoded`). A body of any other type (or of none named) is not a
/// logout: 415 with `Cache-Control: no-store` and the endpoint's error body, nothing ended and
/// its `jti` not recorded. The form's type is matched whatever its case, with parameters.
#[tokio::test]
async fn a_back_channel_logout_that_is_not_a_form_is_415_and_ends_nothing() {
    let (signer, issuer, proxy) = signed_in_proxy().await;
    let cookie = alice_session(&proxy).await;
    let mut claims = logout_token_claims(&issuer, "vestibule", vestibule::app::now());
    claims["jti"] = "j-media-type".into();
    let token = signer.token(TestKey::Rsa1).typ("logout+jwt").sign(&claims);
    let form = format!(
        "logout_token={}",
        crate::support::browser::urlencode(&token)
    );
    let post = |types: &[&str]| {
        let mut req = http::Request::post(proxy.url("/bff/backchannel-logout"));
        for t in types {
            req = req.header("content-type", *t);
        }
        send(req.body(Full::new(Bytes::from(form.clone()))).unwrap())
    };
    for types in [
        &[][..],
        &["text/plain"],
        &["application/json"],
        &["multipart/form-data; boundary=x"],
        &["application/x-www-form-urlencodedx"],
        &["application/x-www-form"],
        &["text/plain; x=application/x-www-form-urlencoded"],
        &["application/x-www-form-urlencoded", "text/plain"],
    ] {
        let r = post(types).await;
        assert_eq!(r.status, 415, "Content-Type {types:?}: {}", r.text());
        assert_eq!(r.header("cache-control"), Some("no-store"), "{types:?}");
        assert_eq!(r.json()["error"], "invalid_request", "{types:?}");
        assert!(r.json()["message"].is_string(), "{types:?}");
        assert!(
            proxy.signed_in(&cookie).await,
            "{types:?} ended the session"
        );
    }
    // The same token as a form, its type in capitals with a charset: taken (not a replay).
    let r = post(&["Application/X-WWW-Form-URLEncoded ; charset=UTF-8"]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!proxy.signed_in(&cookie).await);
}

/// A session cookie tossed beside the user's own (a page on a sibling subdomain set one of its
/// author's for the parent domain, when `cookie_name` is not `__Host-`) makes her requests
/// sessionless, as it must; but her logout, by the script or by the link, must still end her
/// session, not answer "logged out" and leave it live for the browser, whose own cookie works
/// again once the tossed one is gone (a shared computer's next user).
#[tokio::test]
async fn a_logout_beside_a_tossed_session_cookie_still_ends_the_users_session() {
    let (_, _, proxy) = signed_in_proxy().await;
    for via in ["script", "link"] {
        let (alice, link) = alice_and_her_logout_link(&proxy).await;
        let mallory = proxy
            .session_cookie(Session {
                sub: "mallory".into(),
                ..Session::default()
            })
            .await;
        let both = format!("{alice}; {mallory}");
        assert!(!proxy.signed_in(&both).await, "two sessions are none");
        let r = if via == "script" {
            send(
                http::Request::post(proxy.url("/bff/logout"))
                    .header("cookie", &both)
                    .header("x-csrf", "1")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
        } else {
            get(&proxy.url(&link), &[("cookie", both.as_str())]).await
        };
        assert!(
            !proxy.signed_in(&alice).await,
            "{via}: her logout (answered {}) left her session live",
            r.status
        );
    }
    // A link naming the tossed cookie's session (its author knows his own handle) ends that
    // one only: her session is not logged out across sites by it.
    let alice = alice_session(&proxy).await;
    let mallory = proxy
        .session_cookie(Session {
            sub: "mallory".into(),
            ..Session::default()
        })
        .await;
    let user = get(
        &proxy.url("/bff/user"),
        &[("cookie", mallory.as_str()), ("x-csrf", "1")],
    )
    .await;
    let his_link = user.json()["bff:logout_url"].as_str().unwrap().to_string();
    let both = format!("{alice}; {mallory}");
    let r = get(&proxy.url(&his_link), &[("cookie", both.as_str())]).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert!(proxy.signed_in(&alice).await, "his link ended her session");
    assert!(!proxy.signed_in(&mallory).await, "his link ended nothing");
}

/// A logout while the store is down is an error the user (or the provider) sees, 503 with
/// `Retry-After`, never a "logged out" with the session still live once the store is back: by
/// the script, the link, and the provider's back-channel logout (which is not recorded as taken
/// either, and is taken when the provider retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_the_store_is_down_is_503_not_a_silent_logged_out() {
    let signer = TestSigner::new();
    let issuer = fake_provider(signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")])).await;
    let mut redis = RedisServer::start();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        redis.url()
    );
    let proxy = start_proxy(&login_config(free_port(), &issuer, &store)).await;
    wait_ready(&proxy).await;
    let (alice, link) = alice_and_her_logout_link(&proxy).await;
    let mut claims = logout_token_claims(&issuer, "vestibule", vestibule::app::now());
    claims["jti"] = "j-outage".into();
    let token = signer.token(TestKey::Rsa1).typ("logout+jwt").sign(&claims);

    redis.stop();
    let script = send(
        http::Request::post(proxy.url("/bff/logout"))
            .header("cookie", &alice)
            .header("x-csrf", "1")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(script.status, 503, "{}", script.text());
    assert_eq!(script.json()["error"], "store_unavailable");
    let by_link = get(&proxy.url(&link), &[("cookie", alice.as_str())]).await;
    assert_eq!(by_link.status, 503, "{}", by_link.text());
    let back_channel = post_logout_token(&proxy, &token).await;
    assert_eq!(back_channel.status, 503, "{}", back_channel.text());
    assert_eq!(back_channel.json()["error"], "store_unavailable");
    assert_eq!(back_channel.header("cache-control"), Some("no-store"));
    // Each says when to try again: the provider retries its logout, as does the user's page.
    for (via, r) in [
        ("script", &script),
        ("link", &by_link),
        ("back-channel", &back_channel),
    ] {
        assert_eq!(
            r.header("retry-after"),
            Some("5"),
            "the {via} logout's 503 says when to try again"
        );
    }

    redis.restart();
    wait_ready(&proxy).await;
    assert!(
        proxy.signed_in(&alice).await,
        "nothing ended, nothing said so"
    );
    // The provider's retry is taken, not refused as a replay.
    let retry = post_logout_token(&proxy, &token).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert!(!proxy.signed_in(&alice).await);
}
