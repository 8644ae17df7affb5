//! Protocol checks against the in-process fake provider: the authorization response's `iss`
//! (RFC 9207), every MUST of the code grant's token response (RFC 6749 §5.1, OpenID Connect Core
//! §3.1.3.3 to §3.1.3.8), and back-channel logout tokens that carry both `sid` and `sub`.
//! Every refused login asserts its named reason, so a login that fails for another reason does
//! not pass for the one under test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::{Case, attempt, attempt_with, claims, reason, setup, setup_with, with};
use crate::support::*;
use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;
use vestibule::jose::testing::{TestKey, TestSigner, logout_token_claims};
use vestibule::oidc::MIN_TOKEN_LIFETIME;
use vestibule::session::model::Session;

fn encoded(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn token_requests(c: &Case) -> usize {
    c.idp.state.token_requests.lock().unwrap().len()
}

fn sets_session_cookie(r: &Reply) -> bool {
    r.headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("vestibule="))
}

/// Signs a valid ID token for the login's nonce, with `extra` claims merged in.
fn id_token(
    extra: Value,
) -> impl FnOnce(&vestibule::jose::testing::TestSigner, &str, &str) -> String {
    move |s, iss, nonce| {
        let mut c = claims(iss, nonce);
        for (k, v) in extra.as_object().unwrap() {
            c = with(c, k, v.clone());
        }
        s.token(TestKey::Rsa1).kid("k1").sign(&c)
    }
}

/// OpenID Connect Core §3.1.3.6: the left half of the SHA-256 of the access token, base64url.
fn at_hash(access_token: &str) -> String {
    let digest = sha2::Sha256::digest(access_token.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
}

#[tokio::test]
async fn a_callback_without_its_login_cookie_fails_with_its_own_reason() {
    let c = setup().await;
    let start = get(&c.proxy.url("/bff/login?returnUrl=/"), &[]).await;
    let location = url::Url::parse(start.header("location").unwrap()).unwrap();
    let state = location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let r = get(
        &c.proxy
            .url(&format!("/bff/callback?code=abc&state={state}")),
        &[("accept", "text/html")],
    )
    .await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("login_state_missing"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn an_authorization_response_naming_another_issuer_is_refused_before_the_code_is_used() {
    let c = setup().await;
    let issuer = c.idp.issuer.clone();
    for (what, iss) in [
        ("another issuer", "https://evil.example".to_string()),
        ("a trailing slash", format!("{issuer}/")),
        ("an empty iss", String::new()),
    ] {
        let before = token_requests(&c);
        let r = attempt_with(&c, &format!("&iss={}", encoded(&iss)), id_token(json!({}))).await;
        assert_eq!(r.status, 400, "{what} was accepted");
        assert_eq!(
            reason(&r).as_deref(),
            Some("iss_mismatch"),
            "{what}: {}",
            r.text()
        );
        assert_eq!(token_requests(&c), before, "{what}: the code was exchanged");
        assert!(!sets_session_cookie(&r), "{what} made a session");
    }
    // The right issuer, or none from a provider that does not advertise the parameter, is fine.
    let r = attempt_with(
        &c,
        &format!("&iss={}", encoded(&issuer)),
        id_token(json!({})),
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(attempt(&c, id_token(json!({}))).await.status, 302);
}

#[tokio::test]
async fn a_provider_that_advertises_the_iss_parameter_must_send_it() {
    let mut discovery = serde_json::Map::new();
    discovery.insert(
        "authorization_response_iss_parameter_supported".into(),
        json!(true),
    );
    let c = setup_with(discovery).await;
    let before = token_requests(&c);
    let r = attempt(&c, id_token(json!({}))).await;
    assert_eq!(reason(&r).as_deref(), Some("iss_missing"), "{}", r.text());
    assert_eq!(token_requests(&c), before, "the code was exchanged");
    let r = attempt_with(&c, "&iss=https%3A%2F%2Fevil.example", id_token(json!({}))).await;
    assert_eq!(reason(&r).as_deref(), Some("iss_mismatch"), "{}", r.text());
    let issuer = c.idp.issuer.clone();
    let r = attempt_with(
        &c,
        &format!("&iss={}", encoded(&issuer)),
        id_token(json!({})),
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
}

#[tokio::test]
async fn token_responses_that_break_a_must_are_refused_with_their_reason() {
    let c = setup().await;
    let cases: Vec<(&str, Value, Value, &str)> = vec![
        (
            "no access_token",
            json!({"access_token": null}),
            json!({}),
            "access_token_missing",
        ),
        (
            "an empty access_token",
            json!({"access_token": ""}),
            json!({}),
            "access_token_missing",
        ),
        (
            "a numeric access_token",
            json!({"access_token": 7}),
            json!({}),
            "access_token_invalid",
        ),
        // Written as it is into each upstream request's head: a line break would add fields
        // of the provider's choosing (or a request) to every call the user makes.
        (
            "an access_token with a line break",
            json!({"access_token": "at\r\nx-injected: 1"}),
            json!({}),
            "access_token_invalid",
        ),
        (
            "an access_token with a space",
            json!({"access_token": "at x"}),
            json!({}),
            "access_token_invalid",
        ),
        (
            "an access_token beyond ASCII",
            json!({"access_token": "at\u{e9}"}),
            json!({}),
            "access_token_invalid",
        ),
        (
            "no token_type",
            json!({"token_type": null}),
            json!({}),
            "token_type_missing",
        ),
        (
            "token_type mac",
            json!({"token_type": "mac"}),
            json!({}),
            "token_type_invalid",
        ),
        (
            "an unrequested DPoP token",
            json!({"token_type": "DPoP"}),
            json!({}),
            "token_type_invalid",
        ),
        (
            "expires_in as a string",
            json!({"expires_in": "300"}),
            json!({}),
            "expires_in_invalid",
        ),
        (
            "a negative expires_in",
            json!({"expires_in": -5}),
            json!({}),
            "expires_in_invalid",
        ),
        (
            "a fractional expires_in",
            json!({"expires_in": 2.5}),
            json!({}),
            "expires_in_invalid",
        ),
        (
            "a numeric refresh_token",
            json!({"refresh_token": 1}),
            json!({}),
            "refresh_token_invalid",
        ),
        (
            "scope as an array",
            json!({"scope": ["openid"]}),
            json!({}),
            "scope_invalid",
        ),
        (
            "no id_token",
            json!({"id_token": null}),
            json!({}),
            "id_token_missing",
        ),
        (
            "an id_token object",
            json!({"id_token": {}}),
            json!({}),
            "id_token_malformed",
        ),
        (
            "an at_hash of another access token",
            json!({}),
            json!({"at_hash": at_hash("another-access-token")}),
            "id_token_at_hash_mismatch",
        ),
        (
            "an at_hash of the wrong type",
            json!({}),
            json!({"at_hash": 7}),
            "id_token_bad_claim_type",
        ),
    ];
    for (what, fields, extra_claims, want) in cases {
        *c.idp.state.token_fields.lock().unwrap() = fields.as_object().unwrap().clone();
        let r = attempt(&c, id_token(extra_claims)).await;
        assert_eq!(r.status, 400, "{what} was accepted");
        assert_eq!(reason(&r).as_deref(), Some(want), "{what}: {}", r.text());
        assert!(!sets_session_cookie(&r), "{what} made a session");
        assert!(
            !r.text().contains("fake-access") && !r.text().contains("fake-refresh"),
            "{what}: the page shows a token"
        );
    }
    for body in [
        "[]",
        "\"a string\"",
        "{\"access_token\": \"x\", \"token_type\": \"Bearer\"} trailing",
    ] {
        *c.idp.state.token_body.lock().unwrap() = Some(body.into());
        let r = attempt(&c, id_token(json!({}))).await;
        assert_ne!(r.status, 302, "the body {body} was accepted");
        assert!(!sets_session_cookie(&r), "the body {body} made a session");
    }
    *c.idp.state.token_body.lock().unwrap() = Some("[]".into());
    let r = attempt(&c, id_token(json!({}))).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("token_response_malformed"),
        "{}",
        r.text()
    );
    *c.idp.state.token_body.lock().unwrap() = None;

    // What the MUSTs allow: any case of Bearer, the optional members absent or null, unknown
    // members, and an at_hash that matches.
    let accepted: Vec<(&str, Value, Value)> = vec![
        (
            "token_type bearer",
            json!({"token_type": "bearer"}),
            json!({}),
        ),
        (
            "no optional members",
            json!({"expires_in": null, "refresh_token": null, "scope": null}),
            json!({}),
        ),
        (
            "unknown members",
            json!({"x-vendor": {"a": [1]}}),
            json!({}),
        ),
        (
            "a matching at_hash",
            json!({}),
            json!({"at_hash": at_hash("fake-access")}),
        ),
    ];
    for (what, fields, extra_claims) in accepted {
        *c.idp.state.token_fields.lock().unwrap() = fields.as_object().unwrap().clone();
        let r = attempt(&c, id_token(extra_claims)).await;
        assert_eq!(r.status, 302, "{what} was refused: {}", r.text());
        assert!(sets_session_cookie(&r), "{what} made no session");
    }
}

async fn session(c: &Case, sub: &str, sid: &str) -> String {
    let session = Session {
        sub: sub.into(),
        sid: (!sid.is_empty()).then(|| sid.into()),
        ..Session::default()
    };
    c.proxy.session_cookie(session).await
}

async fn post_logout(c: &Case, jti: &str, sid: &str, sub: &str) -> Reply {
    let mut claims = logout_token_claims(&c.idp.issuer, "vestibule", vestibule::app::now());
    claims["jti"] = jti.into();
    claims["sid"] = sid.into();
    claims["sub"] = sub.into();
    let token = c
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims);
    send(
        http::Request::post(c.proxy.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                "logout_token={}",
                encoded(&token)
            ))))
            .unwrap(),
    )
    .await
}

/// A token with `sid` and `sub` ends that provider session's sessions and the user's sessions
/// stored without a `sid` (any of them may be it), never one of her other provider sessions —
/// not even when no session has the `sid` any more (Back-Channel Logout 1.0 §2.7: she signed
/// out here first).
#[tokio::test]
async fn a_logout_token_with_sid_and_sub_ends_that_sid_and_the_subs_sessions_without_one() {
    let c = setup().await;
    let first = session(&c, "alice", "session-1").await;
    let second = session(&c, "alice", "session-2").await;
    let sidless = session(&c, "alice", "").await;
    let bob = session(&c, "bob", "session-3").await;
    let bob_sidless = session(&c, "bob", "").await;
    for cookie in [&first, &second, &sidless, &bob, &bob_sidless] {
        assert!(c.proxy.signed_in(cookie).await);
    }

    // The sid has a session: that one ends, and the sub's session without a sid.
    let r = post_logout(&c, "j-1", "session-1", "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !c.proxy.signed_in(&first).await,
        "the session of the sid lives on"
    );
    assert!(
        !c.proxy.signed_in(&sidless).await,
        "the sub's session without a sid lives on"
    );
    assert!(
        c.proxy.signed_in(&second).await,
        "a session of another provider session of the sub ended"
    );

    // No session has the sid: the sub's sessions of other provider sessions stand.
    let r = post_logout(&c, "j-2", "session-unknown", "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        c.proxy.signed_in(&second).await,
        "a logout token for an unknown sid ended another provider session's session"
    );
    assert!(
        c.proxy.signed_in(&bob).await && c.proxy.signed_in(&bob_sidless).await,
        "another user's session ended"
    );
}

/// The grants whose form names `grant_type`.
fn grants(c: &Case, grant_type: &str) -> usize {
    let requests = c.idp.state.token_requests.lock().unwrap();
    requests
        .iter()
        .filter(|form| {
            form.iter()
                .any(|(k, v)| k == "grant_type" && v == grant_type)
        })
        .count()
}

/// The fake provider, an upstream behind a user-token route `/api/` and a client-token route
/// `/svc/`, and Vestibule in front on a test clock.
async fn lifetimes() -> (Case, upstream::Upstream, vestibule::clock::TestClock) {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{0}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/svc/\"\nupstream = \"{0}\"\ntoken = \"client\"\n",
        up.url()
    );
    let clock = vestibule::clock::TestClock::new();
    let proxy = start_proxy_with_clock(
        config_toml(&routes).set("oidc.issuer", idp.issuer.as_str()),
        clock.clock(),
    )
    .await;
    wait_metadata(&proxy).await;
    (Case { proxy, idp, signer }, up, clock)
}

/// `expires_in` is the provider's number, as large as a JSON integer gets: a lifetime that
/// runs past the end of the clock is a very long one, at login, at a refresh and for a client
/// token, never a token that has already expired (one refresh per request) nor a crash.
#[tokio::test]
async fn an_expires_in_beyond_the_end_of_time_is_a_long_lifetime_not_an_expired_token() {
    let (c, up, clock) = lifetimes().await;
    let call = |path: &'static str, session: String| {
        let url = c.proxy.url(path);
        async move { get(&url, &[("cookie", &session), ("x-csrf", "1")]).await }
    };
    let sign_in = || async {
        let (q, login_cookie) = begin_login(&c.proxy).await;
        *c.idp.state.id_token.lock().unwrap() = c
            .signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&claims(&c.idp.issuer, &q["nonce"]));
        let done = callback(&c.proxy, &q, &login_cookie).await;
        assert_eq!(done.status, 302, "{}", done.text());
        done.session_cookie()
    };

    // At login.
    c.idp
        .state
        .token_fields
        .lock()
        .unwrap()
        .insert("expires_in".into(), json!(u64::MAX));
    let session = sign_in().await;
    for _ in 0..2 {
        let r = call("/api/a", session.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            up.last().headers.get("authorization").unwrap(),
            "Bearer fake-access"
        );
    }
    assert_eq!(
        grants(&c, "refresh_token"),
        0,
        "the login's token was refreshed"
    );

    // At a refresh: the login's token is due at once, the refreshed one lives long.
    c.idp
        .state
        .token_fields
        .lock()
        .unwrap()
        .insert("expires_in".into(), json!(0));
    let session = sign_in().await;
    clock.advance(std::time::Duration::from_secs(MIN_TOKEN_LIFETIME));
    c.idp.state.script(
        "refresh_token",
        200,
        json!({"access_token": "refreshed", "token_type": "Bearer", "refresh_token": "r2",
               "expires_in": u64::MAX}),
    );
    for _ in 0..2 {
        let r = call("/api/b", session.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            up.last().headers.get("authorization").unwrap(),
            "Bearer refreshed"
        );
    }
    assert_eq!(
        grants(&c, "refresh_token"),
        1,
        "the refreshed token was refreshed again"
    );

    // A client token.
    c.idp.state.script(
        "client_credentials",
        200,
        json!({"access_token": "client-token", "token_type": "Bearer", "expires_in": u64::MAX}),
    );
    for _ in 0..2 {
        let r = call("/svc/c", String::new()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            up.last().headers.get("authorization").unwrap(),
            "Bearer client-token"
        );
    }
    assert_eq!(
        grants(&c, "client_credentials"),
        1,
        "the client token was fetched again"
    );
}

/// A scope is a set (RFC 6749 §3.3): client-token routes that ask for the same scopes in
/// another order, or with one repeated, share one client-credentials grant, as user tokens do
/// (`RouteConfig::token_key`); different scopes, or a different resource, get grants of their
/// own, however their texts run together. The provider is sent each route's scopes as written.
#[tokio::test]
async fn client_tokens_for_the_same_scopes_in_any_order_are_one_grant() {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let route = |path: &str, resource: &str, scopes: &str| {
        format!(
            "[[routes]]\npath = \"{path}\"\nupstream = \"{}\"\ntoken = \"client\"\n\
             resource = \"{resource}\"\nscopes = {scopes}\n",
            up.url()
        )
    };
    let routes = [
        route("/ab/", "https://api.example/x", r#"["a", "b"]"#),
        route("/ba/", "https://api.example/x", r#"["b", "a", "a"]"#),
        route("/a/", "https://api.example/x", r#"["a"]"#),
        // `resource|scopes` of these two read the same: `https://api.example/x|y|z`.
        route("/xy/", "https://api.example/x|y", r#"["z"]"#),
        route("/x/", "https://api.example/x", r#"["y|z"]"#),
    ]
    .concat();
    let proxy = start_proxy(config_toml(&routes).set("oidc.issuer", idp.issuer.as_str())).await;
    wait_metadata(&proxy).await;
    let c = Case { proxy, idp, signer };
    for path in ["/ab/1", "/ba/1", "/ab/2", "/ba/2", "/a/1", "/xy/1", "/x/1"] {
        let r = get(&c.proxy.url(path), &[("x-csrf", "1")]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let asked: Vec<(String, String)> = c
        .idp
        .state
        .token_requests
        .lock()
        .unwrap()
        .iter()
        .map(|form| {
            let field = |name: &str| {
                let found = form.iter().find(|(k, _)| k == name);
                found.map(|(_, v)| v.clone()).unwrap_or_default()
            };
            (field("resource"), field("scope"))
        })
        .collect();
    let pair = |resource: &str, scope: &str| (resource.to_string(), scope.to_string());
    assert_eq!(
        asked,
        [
            pair("https://api.example/x", "a b"),
            pair("https://api.example/x", "a"),
            pair("https://api.example/x|y", "z"),
            pair("https://api.example/x", "y|z"),
        ]
    );
    assert_eq!(grants(&c, "client_credentials"), 4);
}

/// `expires_in` of 0 (RFC 6749 does not forbid it) would make a token due for refresh as it
/// arrives: every request would refresh, and a provider answering 0 each time would be sent one
/// grant per API request. A lifetime under [`MIN_TOKEN_LIFETIME`] is taken as that: at login,
/// at a refresh and for a client token, a burst of requests uses one token, and the next is
/// fetched only once that short lifetime is half gone.
#[tokio::test]
async fn an_expires_in_of_zero_is_a_short_lifetime_not_a_refresh_per_request() {
    let (c, up, clock) = lifetimes().await;
    let call = |path: &'static str, session: String| {
        let url = c.proxy.url(path);
        async move { get(&url, &[("cookie", &session), ("x-csrf", "1")]).await }
    };
    c.idp
        .state
        .token_fields
        .lock()
        .unwrap()
        .insert("expires_in".into(), json!(0));
    let (q, login_cookie) = begin_login(&c.proxy).await;
    *c.idp.state.id_token.lock().unwrap() = c
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .sign(&claims(&c.idp.issuer, &q["nonce"]));
    let done = callback(&c.proxy, &q, &login_cookie).await;
    assert_eq!(done.status, 302, "{}", done.text());
    let session = done.session_cookie();
    for n in 0..3 {
        c.idp.state.script(
            "refresh_token",
            200,
            json!({"access_token": format!("refreshed-{n}"), "token_type": "Bearer",
                   "refresh_token": format!("r-{n}"), "expires_in": 0}),
        );
        c.idp.state.script(
            "client_credentials",
            200,
            json!({"access_token": format!("client-{n}"), "token_type": "Bearer",
                   "expires_in": 0}),
        );
    }
    let burst = |want_user: &'static str, want_client: &'static str| {
        let (call, up, session) = (&call, &up, session.clone());
        async move {
            for _ in 0..4 {
                let r = call("/api/a", session.clone()).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(up.last().headers.get("authorization").unwrap(), want_user);
                let r = call("/svc/a", String::new()).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(up.last().headers.get("authorization").unwrap(), want_client);
            }
        }
    };
    burst("Bearer fake-access", "Bearer client-0").await;
    let counts = || {
        (
            grants(&c, "refresh_token"),
            grants(&c, "client_credentials"),
        )
    };
    assert_eq!(
        counts(),
        (0, 1),
        "(refresh, client) grants for 4 requests each"
    );
    clock.advance(std::time::Duration::from_secs(MIN_TOKEN_LIFETIME));
    burst("Bearer refreshed-0", "Bearer client-1").await;
    assert_eq!(
        counts(),
        (1, 2),
        "(refresh, client) grants for 4 more requests each"
    );
}
