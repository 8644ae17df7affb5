//! Login end to end against the real OpenID provider, with both session stores.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::{Browser, urlencode};
use crate::support::provider;
use crate::support::redis::RedisServer;
use crate::support::stack::LoginStack as Stack;
use crate::support::*;

/// The same configuration listening on a fresh port.
fn elsewhere(config: TomlConfig) -> TomlConfig {
    config.set("server.listen", format!("127.0.0.1:{}", free_port()))
}

async fn stack(store: &str, provider_extra: serde_json::Value) -> Stack {
    let store = store.to_string();
    Stack::builder()
        .provider(provider_extra)
        .extra(move |u| {
            format!(
                r#"{store}
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/public/"
upstream = "{u}"
"#
            )
        })
        .start()
        .await
}

async fn full_login_flow(s: &Stack) {
    let mut browser = Browser::default();
    let done = browser.login(&s.base, "alice", "alice", "/app?tab=2").await;
    assert_eq!(done.status, 302);
    assert_eq!(done.header("location"), Some("/app?tab=2"));
    let cookie = done.set_cookie("vestibule").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Path=/"),
        "{cookie}"
    );
    assert!(
        !browser
            .jar
            .keys()
            .any(|k| k.starts_with("vestibule-login-")),
        "the login cookie is cleared"
    );

    let user = browser
        .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(user.status, 200, "{}", user.text());
    let json = user.json();
    assert_eq!(json["sub"], "alice");
    assert_eq!(json["name"], "Alice Liddell");
    assert!(
        json["bff:logout_url"]
            .as_str()
            .unwrap()
            .starts_with("/bff/logout?sid=")
    );
    assert!(json["bff:session_expires_in"].as_u64().unwrap() > 0);
    let issued = s.provider.tokens("alice").await;
    for kind in ["access_token", "refresh_token", "id_token"] {
        let token = issued[kind].as_str().unwrap();
        assert!(!user.text().contains(token), "/bff/user leaked the {kind}");
        assert!(
            !browser.jar.values().any(|v| v.contains(token)),
            "a cookie holds the {kind}"
        );
    }

    // The upstream sees the user's access token, never the session cookie or the browser's own Authorization.
    let api = browser
        .get(
            &format!("{}/api/data", s.base),
            &[
                ("x-csrf", "1"),
                ("authorization", "Bearer from-the-browser"),
            ],
        )
        .await;
    assert_eq!(api.status, 200, "{}", api.text());
    let seen = s.up.last().headers;
    assert_eq!(
        seen.get_all("authorization").iter().count(),
        1,
        "the browser's Authorization went along with the token"
    );
    let bearer = seen
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        bearer,
        format!("Bearer {}", issued["access_token"].as_str().unwrap())
    );
    let forwarded_cookies = seen
        .get("cookie")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        !forwarded_cookies.contains("vestibule="),
        "the session cookie reached the upstream: {forwarded_cookies}"
    );
    // The same for a request with a body, which takes another path to the upstream.
    let api = browser
        .request(
            "POST",
            &format!("{}/api/data", s.base),
            &[
                ("x-csrf", "1"),
                ("authorization", "Bearer from-the-browser"),
            ],
            Some("a=1".into()),
        )
        .await;
    assert_eq!(api.status, 200, "{}", api.text());
    let seen = s.up.last().headers;
    let sent: Vec<_> = seen.get_all("authorization").iter().collect();
    assert_eq!(
        sent,
        [&format!(
            "Bearer {}",
            issued["access_token"].as_str().unwrap()
        )],
        "the browser's Authorization went along with the token, or instead of it"
    );
    assert!(
        !seen
            .get_all("cookie")
            .iter()
            .any(|v| v.to_str().unwrap().contains("vestibule=")),
        "the session cookie reached the upstream with a body"
    );
}

#[tokio::test]
async fn login_end_to_end_with_the_memory_store() {
    let s = stack("", serde_json::json!({})).await;
    full_login_flow(&s).await;
}

#[tokio::test]
async fn login_end_to_end_with_redis_and_the_session_survives_a_restart() {
    let redis = RedisServer::start();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let mut s = stack(&store, serde_json::json!({})).await;
    full_login_flow(&s).await;
    let mut browser = Browser::default();
    browser.login(&s.base, "bob", "bob", "/").await;
    // Restart: a new proxy process state on the same port and Redis keeps the session.
    s.proxy().shutdown.cancel();
    let _ = (&mut s.proxies[0].task).await;
    let port: u16 = s.base.rsplit(':').next().unwrap().parse().unwrap();
    let routes = format!(
        "{store}\n[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\n",
        s.up.url()
    );
    // A new process state on another port (the old port may be taken by a parallel test by now);
    // cookies ignore ports, so the browser's session cookie goes along.
    let again = start_proxy(&elsewhere(login_toml(port, &s.provider.issuer, &routes))).await;
    wait_ready(&again).await;
    let user = browser
        .get(&again.url("/bff/user"), &[("x-csrf", "1")])
        .await;
    assert_eq!(user.status, 200);
    assert_eq!(user.json()["sub"], "bob");
    // A dump of Redis yields no token, no session id, no code, no cookie value.
    let issued = s.provider.tokens("bob").await;
    let (keys, values) = redis_dump(&redis);
    // The dump must see what is stored, or it proves nothing: both sessions (alice's and bob's,
    // each holding an ID token, so well over 500 bytes sealed) are among the values.
    assert!(
        values.iter().filter(|v| v.len() > 500).count() >= 2,
        "the dump does not hold both sessions: {} keys",
        keys.len()
    );
    let mut everything = keys.concat();
    for value in &values {
        everything.extend_from_slice(value);
    }
    let everything = String::from_utf8_lossy(&everything).into_owned();
    let cookie = browser.jar.get("vestibule").unwrap();
    let handle = user.json()["bff:logout_url"]
        .as_str()
        .unwrap()
        .split("sid=")
        .nth(1)
        .unwrap()
        .to_string();
    for (what, secret) in [
        ("access token", issued["access_token"].as_str().unwrap()),
        ("refresh token", issued["refresh_token"].as_str().unwrap()),
        ("ID token", issued["id_token"].as_str().unwrap()),
        ("session cookie", cookie.as_str()),
        ("session handle", handle.as_str()),
    ] {
        assert!(secret.len() >= 16, "{what} is too short to probe");
        assert!(
            !everything.contains(&secret[..secret.len().min(40)]),
            "Redis holds the {what} in clear"
        );
    }
    assert!(
        !everything.contains("Alice Liddell") && !everything.contains("Bob Builder"),
        "claims are stored in clear"
    );
}

/// Every key of the Redis server and every value under it, read with the commands of the key's
/// type (strings, sets, hashes, lists, sorted sets); any other type fails the test.
fn redis_dump(redis: &RedisServer) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut con = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<Vec<u8>> = ::redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    let mut values = Vec::new();
    for key in &keys {
        let kind: String = ::redis::cmd("TYPE").arg(key).query(&mut con).unwrap();
        let read = match kind.as_str() {
            "string" => ::redis::cmd("GET")
                .arg(key)
                .query::<Vec<u8>>(&mut con)
                .map(|v| vec![v]),
            "set" => ::redis::cmd("SMEMBERS").arg(key).query(&mut con),
            "hash" => ::redis::cmd("HGETALL").arg(key).query(&mut con),
            "list" => ::redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query(&mut con),
            "zset" => ::redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query(&mut con),
            other => panic!("a key of type {other} the dump cannot read"),
        };
        values.extend(read.unwrap());
    }
    (keys, values)
}

#[tokio::test]
async fn unauthenticated_navigations_redirect_and_api_calls_get_401() {
    let s = stack("", serde_json::json!({})).await;
    let nav = get(
        &format!("{}/api/page?x=1", s.base),
        &[("accept", "text/html")],
    )
    .await;
    assert_eq!(nav.status, 302);
    assert_eq!(
        nav.header("location"),
        Some(format!("/bff/login?returnUrl={}", urlencode("/api/page?x=1")).as_str())
    );
    let api = get(
        &format!("{}/api/data", s.base),
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(api.status, 401);
    assert_eq!(api.json()["error"], "unauthenticated");
    assert!(
        api.json()["login_url"]
            .as_str()
            .unwrap()
            .starts_with("/bff/login")
    );
    let user = get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")]).await;
    assert_eq!(user.status, 401);
    let no_csrf = get(&format!("{}/bff/user", s.base), &[]).await;
    assert_eq!(no_csrf.status, 403);
    assert_eq!(no_csrf.json()["error"], "csrf");
    let public = get(&format!("{}/public/x", s.base), &[]).await;
    assert_eq!(public.status, 200);
    assert!(s.up.last().headers.get("authorization").is_none());
}

#[tokio::test]
async fn return_urls_that_leave_the_site_are_refused() {
    let s = stack("", serde_json::json!({})).await;
    for bad in [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "javascript:alert(1)",
        "/%2F%2Fevil.example",
        "%2F%2Fevil.example",
        "/%5Cevil.example",
        "http:evil.example",
    ] {
        let r = get(
            &format!("{}/bff/login?returnUrl={}", s.base, urlencode(bad)),
            &[],
        )
        .await;
        assert_eq!(r.status, 400, "{bad} was accepted");
        assert_eq!(r.json()["error"], "invalid_return_url");
    }
}

#[tokio::test]
async fn login_requests_carry_pkce_state_and_nonce() {
    // A provider without PAR: the parameters travel in the URL (tests/it/par.rs has the rest).
    let s = stack("", serde_json::json!({ "par": false })).await;
    let r = get(&format!("{}/bff/login?returnUrl=/", s.base), &[]).await;
    let location = url::Url::parse(r.header("location").unwrap()).unwrap();
    let q: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 43 && q["nonce"].len() >= 43);
    assert_eq!(q["redirect_uri"], format!("{}/bff/callback", s.base));
    assert!(location.as_str().starts_with(&s.provider.issuer));
}

#[tokio::test]
async fn a_replayed_callback_and_another_browsers_state_fail() {
    let s = stack("", serde_json::json!({})).await;
    let mut victim = Browser::default();
    let callback = victim.login_until_callback(&s.base, "alice", "/").await;
    // An attacker's browser presenting the victim's callback has no matching login cookie.
    let mut attacker = Browser::default();
    attacker
        .get(&format!("{}/bff/login?returnUrl=/", s.base), &[])
        .await;
    let stolen = attacker.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(stolen.status, 400);
    assert!(stolen.text().contains("login_failed"));
    let first = victim.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(first.status, 302, "{}", first.text());
    // Replay with the login cookie put back: single use.
    let mut replayer = Browser::default();
    let callback2 = replayer.login_until_callback(&s.base, "alice", "/").await;
    let saved = replayer.jar.clone();
    assert_eq!(replayer.get(&callback2, &[]).await.status, 302);
    replayer.jar = saved;
    let replay = replayer.get(&callback2, &[("accept", "text/html")]).await;
    assert_eq!(replay.status, 400, "a replayed callback must fail");
}

#[tokio::test]
async fn provider_errors_and_malformed_callbacks_are_clear_4xx_pages() {
    let s = stack("", serde_json::json!({})).await;
    for query in [
        "error=access_denied&error_description=%3Cscript%3E",
        "",
        "code=abc",
        "state=xyz",
        "code=abc&state=xyz",
    ] {
        let r = get(
            &format!("{}/bff/callback?{query}", s.base),
            &[("accept", "text/html")],
        )
        .await;
        assert_eq!(r.status, 400, "{query}");
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert!(!r.text().contains("<script>"));
    }
}

#[tokio::test]
async fn several_tabs_logging_in_at_once_all_succeed() {
    let s = stack("", serde_json::json!({})).await;
    let mut browser = Browser::default();
    let a = browser.login_until_callback(&s.base, "alice", "/a").await;
    let b = browser.login_until_callback(&s.base, "alice", "/b").await;
    let rb = browser.get(&b, &[]).await;
    assert_eq!(rb.header("location"), Some("/b"));
    let ra = browser.get(&a, &[]).await;
    assert_eq!(ra.header("location"), Some("/a"));
    assert_eq!(
        browser
            .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
            .await
            .status,
        200
    );
}

fn login_cookies(browser: &Browser) -> usize {
    browser
        .jar
        .keys()
        .filter(|name| name.starts_with("vestibule-login-"))
        .count()
}

/// `/bff/login` needs no session and its cookie is `SameSite=Lax`, so a page on another site can
/// send a browser there again and again (top-level navigations). Each visit sets one more login
/// cookie for ten minutes: unbounded, they would outgrow the head limit and lock the user out of
/// the app and of signing in (431 on every request) until they expire.
#[tokio::test]
async fn a_browser_sent_to_login_again_and_again_keeps_a_few_login_cookies_and_signs_in() {
    let s = stack("", serde_json::json!({})).await;
    let mut browser = Browser::default();
    let long = format!("/{}", "a".repeat(600));
    for round in 0..20 {
        let r = browser.start_login(&s.base, &long).await;
        assert_eq!(r.status, 302, "login {round}: {}", r.text());
        assert!(
            login_cookies(&browser) <= 4,
            "login {round}: {:?}",
            browser.jar.keys()
        );
    }
    let done = browser.login(&s.base, "alice", "alice", "/app").await;
    assert_eq!(done.status, 302, "{}", done.text());
    assert_eq!(done.header("location"), Some("/app"));
    assert_eq!(browser.user(&s.base).await["sub"], "alice");
}

/// A head too large because of login cookies gets its 431 with those cookies deleted: the
/// browser's next request goes through (here the head limit is 8 KiB and three pending logins
/// with long return URLs outgrow it).
#[tokio::test]
async fn a_head_too_large_with_login_cookies_deletes_them_so_the_browser_recovers() {
    let s = Stack::builder()
        .config(|c| c.add("server.max_header_size", "8KiB"))
        .start()
        .await;
    let mut browser = Browser::default();
    let long = format!("/{}", "b".repeat(2000));
    let mut refused = None;
    for _ in 0..4 {
        let r = browser.start_login(&s.base, &long).await;
        if r.status == 431 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 302, "{}", r.text());
    }
    let refused = refused.expect("three long login cookies outgrow an 8 KiB head");
    assert_eq!(refused.json()["error"], "headers_too_large");
    assert_eq!(login_cookies(&browser), 0, "{:?}", browser.jar.keys());
    let done = browser.login(&s.base, "alice", "alice", "/app").await;
    assert_eq!(done.header("location"), Some("/app"), "{}", done.text());
}

#[tokio::test]
async fn tampered_truncated_foreign_and_huge_cookies_are_no_session() {
    let s = stack("", serde_json::json!({})).await;
    let mut browser = Browser::default();
    browser.login(&s.base, "alice", "alice", "/").await;
    let good = browser.jar.get("vestibule").unwrap().clone();
    let mut tampered = good.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let huge = "A".repeat(6000);
    for bad in [
        tampered.as_str(),
        &good[..good.len() - 5],
        "not-a-cookie",
        "",
        huge.as_str(),
        "Zm9yZWlnbg",
        &good[1..],
    ] {
        let r = get(
            &format!("{}/bff/user", s.base),
            &[("x-csrf", "1"), ("cookie", &format!("vestibule={bad}"))],
        )
        .await;
        assert_eq!(
            r.status, 401,
            "a bad cookie must be no session, never a 500"
        );
    }
    // A foreign cookie of the same name beside ours does not hide ours.
    let r = get(
        &format!("{}/bff/user", s.base),
        &[
            ("x-csrf", "1"),
            ("cookie", &format!("vestibule=foreign; vestibule={good}")),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    // Re-ordered cookie bytes are no session either.
    let reordered: String = good.chars().rev().collect();
    let r = get(
        &format!("{}/bff/user", s.base),
        &[
            ("x-csrf", "1"),
            ("cookie", &format!("vestibule={reordered}")),
        ],
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn a_new_login_replaces_the_browsers_previous_session() {
    let s = stack("", serde_json::json!({})).await;
    let mut browser = Browser::default();
    browser.login(&s.base, "alice", "alice", "/").await;
    let first = browser.jar.get("vestibule").unwrap().clone();
    let callback = browser.login_until_callback(&s.base, "alice", "/").await;
    assert_eq!(browser.get(&callback, &[]).await.status, 302);
    let second = browser.jar.get("vestibule").unwrap().clone();
    assert_ne!(first, second, "every login gets a new session id");
    let old = get(
        &format!("{}/bff/user", s.base),
        &[("x-csrf", "1"), ("cookie", &format!("vestibule={first}"))],
    )
    .await;
    assert_eq!(
        old.status, 401,
        "the previous session of this browser ended"
    );
    let new = get(
        &format!("{}/bff/user", s.base),
        &[("x-csrf", "1"), ("cookie", &format!("vestibule={second}"))],
    )
    .await;
    assert_eq!(new.status, 200);
}

#[tokio::test]
async fn a_cookie_sealed_with_an_old_key_still_opens_and_is_resealed_with_the_first() {
    const NEW_KEY: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let redis = RedisServer::start();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let mut s = stack(&store, serde_json::json!({})).await;
    let mut browser = Browser::default();
    browser.login(&s.base, "alice", "alice", "/").await;
    let old_cookie = browser.jar.get("vestibule").unwrap().clone();
    s.proxy().shutdown.cancel();
    let _ = (&mut s.proxies[0].task).await;
    let port: u16 = s.base.rsplit(':').next().unwrap().parse().unwrap();
    let rotated =
        login_toml(port, &s.provider.issuer, &store).set("session.keys", vec![NEW_KEY, KEY]);
    let proxy = start_proxy(&elsewhere(rotated)).await;
    wait_ready(&proxy).await;
    let r = browser
        .get(&proxy.url("/bff/user"), &[("x-csrf", "1")])
        .await;
    assert_eq!(
        r.status, 200,
        "a cookie sealed with the second key must still open"
    );
    let resealed = browser.jar.get("vestibule").unwrap().clone();
    assert_ne!(
        resealed, old_cookie,
        "the cookie is resealed with the first key"
    );
    proxy.shutdown.cancel();
    let _ = proxy.task.await;
    let only_new = login_toml(port, &s.provider.issuer, &store).set("session.keys", vec![NEW_KEY]);
    let proxy = start_proxy(&elsewhere(only_new)).await;
    wait_ready(&proxy).await;
    let r = get(
        &proxy.url("/bff/user"),
        &[
            ("x-csrf", "1"),
            ("cookie", &format!("vestibule={resealed}")),
        ],
    )
    .await;
    assert_eq!(
        r.status, 200,
        "the resealed cookie opens with the new key alone"
    );
    let r = get(
        &proxy.url("/bff/user"),
        &[
            ("x-csrf", "1"),
            ("cookie", &format!("vestibule={old_cookie}")),
        ],
    )
    .await;
    assert_eq!(
        r.status, 401,
        "once the old key is removed, old cookies no longer open"
    );
}

#[tokio::test]
async fn client_secret_post_authentication_works() {
    let port = free_port();
    let provider = provider::start(
        port,
        serde_json::json!({"clients": [{
            "client_id": "vestibule", "client_secret": "vestibule-secret",
            "redirect_uris": [format!("http://127.0.0.1:{port}/bff/callback")],
            "token_endpoint_auth_method": "client_secret_post",
        }]}),
    );
    let extra = "[[routes]]\npath = \"/x/\"\nupstream = \"http://127.0.0.1:9\"\n";
    let text =
        login_toml(port, &provider.issuer, extra).add("oidc.client_auth", "client_secret_post");
    let proxy = start_proxy(&text).await;
    wait_ready(&proxy).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut browser = Browser::default();
    let callback = browser.login_until_callback(&base, "alice", "/").await;
    assert_eq!(browser.get(&callback, &[]).await.status, 302);
    assert_eq!(
        browser
            .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn readiness_waits_for_the_provider_and_login_is_503_until_then() {
    let proxy = start_proxy(&config_text("")).await;
    let ready = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["provider"], false);
    let login = get(&proxy.url("/bff/login?returnUrl=/"), &[]).await;
    assert_eq!(login.status, 503);
    assert_eq!(login.json()["error"], "provider_unavailable");
    assert_eq!(
        get(&format!("http://{}/healthz", proxy.admin), &[])
            .await
            .status,
        200,
        "alive while not ready"
    );
}

#[tokio::test]
async fn a_store_outage_is_503_and_the_session_survives_it() {
    let mut redis = RedisServer::start();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let s = stack(&store, serde_json::json!({})).await;
    let mut browser = Browser::default();
    browser.login(&s.base, "alice", "alice", "/").await;
    redis.stop();
    let down = browser
        .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(down.status, 503);
    assert_eq!(down.json()["error"], "store_unavailable");
    let api = browser
        .get(&format!("{}/api/x", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(api.status, 503);
    let ready = get(&format!("http://{}/readyz", s.proxy().admin), &[]).await;
    assert_eq!(ready.status, 503);
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let back = browser
            .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
            .await;
        if back.status == 200 {
            assert_eq!(back.json()["sub"], "alice");
            break;
        }
        assert_eq!(
            back.status, 503,
            "while Redis reconnects the answer stays 503, never 401"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the session did not come back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
