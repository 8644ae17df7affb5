//! Against an in-process fake provider: the callback refuses every forged or mismatched ID token,
//! accepts a well-formed one (also after key rotation), and token-exchange routes work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use vestibule::jose::testing::{Forgery, TestKey, TestSigner, id_token_claims};

pub(crate) struct Case {
    pub proxy: Proxy,
    pub idp: fake_idp::FakeIdp,
    pub signer: TestSigner,
}

pub(crate) async fn setup() -> Case {
    setup_with(serde_json::Map::new()).await
}

/// [`setup`] with `discovery` members added to the fake provider's discovery document.
pub(crate) async fn setup_with(discovery: serde_json::Map<String, Value>) -> Case {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    *idp.state.discovery_extra.lock().unwrap() = discovery;
    let proxy = start_proxy_for(&idp.issuer, "").await;
    Case { proxy, idp, signer }
}

impl Case {
    /// A login begun, the provider's ID token for it (well-formed, its nonce) in place.
    async fn login_begun(&self) -> (std::collections::HashMap<String, String>, String) {
        let (q, cookie) = begin_login(&self.proxy).await;
        *self.idp.state.id_token.lock().unwrap() = self
            .signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&claims(&self.idp.issuer, &q["nonce"]));
        (q, cookie)
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts a login, lets `make` build the ID token from the real nonce, and completes the callback.
pub(crate) async fn attempt(
    c: &Case,
    make: impl FnOnce(&TestSigner, &str, &str) -> String,
) -> Reply {
    attempt_with(c, "", make).await
}

/// [`attempt`], with `extra` (e.g. `&iss=…`) appended to the callback's query.
pub(crate) async fn attempt_with(
    c: &Case,
    extra: &str,
    make: impl FnOnce(&TestSigner, &str, &str) -> String,
) -> Reply {
    let (q, cookie) = begin_login(&c.proxy).await;
    *c.idp.state.id_token.lock().unwrap() = make(&c.signer, &c.idp.issuer, &q["nonce"]);
    let r = get(
        &c.proxy.url(&format!(
            "/bff/callback?code=abc&state={}{extra}",
            q["state"]
        )),
        &[("cookie", &cookie), ("accept", "text/html")],
    )
    .await;
    assert_ne!(r.status, 500);
    r
}

/// The stable reason a `login_failed` page names, or `None` when the reply is no such page.
pub(crate) fn reason(r: &Reply) -> Option<String> {
    let text = r.text();
    if r.status != 400 || !text.contains("error: login_failed") {
        return None;
    }
    let rest = text.split("reason: ").nth(1)?;
    Some(
        rest.chars()
            .take_while(|c| *c == '_' || c.is_ascii_alphanumeric())
            .collect(),
    )
}

pub(crate) fn claims(issuer: &str, nonce: &str) -> Value {
    let mut c = id_token_claims(issuer, "vestibule", nonce, now());
    c["name"] = json!("Alice");
    c
}

pub(crate) fn with(mut c: Value, key: &str, value: Value) -> Value {
    if value.is_null() {
        c.as_object_mut().unwrap().remove(key);
    } else {
        c[key] = value;
    }
    c
}

#[tokio::test]
async fn a_valid_id_token_signs_the_user_in() {
    let c = setup().await;
    assert_eq!(
        attempt(&c, |s, iss, nonce| s
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&claims(iss, nonce)))
        .await
        .status,
        302
    );
}

#[tokio::test]
async fn every_hostile_id_token_is_refused() {
    let c = setup().await;
    type Make = Box<dyn FnOnce(&TestSigner, &str, &str) -> String>;
    // Each case names the reason the login fails with, so a login that fails for another reason
    // (a lost login cookie, a replayed state) does not pass for a refused ID token.
    let cases: Vec<(&str, &str, Make)> = vec![
        (
            "bad signature",
            "id_token_bad_signature",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .forge(Forgery::BadSignature)
                    .sign(&claims(iss, n))
            }),
        ),
        (
            "alg none",
            "id_token_unsupported_algorithm",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .forge(Forgery::AlgNone)
                    .sign(&claims(iss, n))
            }),
        ),
        (
            "HS256 with the client secret",
            "id_token_unsupported_algorithm",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .forge(Forgery::Hs256WithSecret(b"secret".to_vec()))
                    .sign(&claims(iss, n))
            }),
        ),
        (
            "HS256 keyed with the public key",
            "id_token_unsupported_algorithm",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .forge(Forgery::Hs256WithPublicKeyPem)
                    .sign(&claims(iss, n))
            }),
        ),
        (
            "a key the provider never published",
            "id_token_bad_signature",
            Box::new(|s, iss, n| s.token(TestKey::Rsa2).kid("k1").sign(&claims(iss, n))),
        ),
        (
            "wrong iss",
            "id_token_wrong_issuer",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "iss",
                    json!("https://evil.example"),
                ))
            }),
        ),
        (
            "wrong aud",
            "id_token_wrong_audience",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "aud",
                    json!("another-client"),
                ))
            }),
        ),
        (
            "several audiences without azp",
            "id_token_missing_azp",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "aud",
                    json!(["vestibule", "other"]),
                ))
            }),
        ),
        (
            "missing nonce",
            "id_token_missing_claim",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .sign(&with(claims(iss, n), "nonce", Value::Null))
            }),
        ),
        (
            "nonce mismatch",
            "id_token_nonce_mismatch",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "nonce",
                    json!("other-nonce"),
                ))
            }),
        ),
        (
            "expired",
            "id_token_expired",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "exp",
                    json!(now() - 3600),
                ))
            }),
        ),
        (
            "iat in the future",
            "id_token_issued_in_future",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1).kid("k1").sign(&with(
                    claims(iss, n),
                    "iat",
                    json!(now() + 3600),
                ))
            }),
        ),
        (
            "no sub",
            "id_token_missing_claim",
            Box::new(|s, iss, n| {
                s.token(TestKey::Rsa1)
                    .kid("k1")
                    .sign(&with(claims(iss, n), "sub", Value::Null))
            }),
        ),
    ];
    for (name, want, make) in cases {
        let r = attempt(&c, make).await;
        assert_eq!(r.status, 400, "{name} was accepted");
        assert_eq!(reason(&r).as_deref(), Some(want), "{name}: {}", r.text());
    }
}

/// OpenID Connect Core §3.1.3.7 step 2: the ID token's `iss` exactly matches the issuer; the
/// issuer plus `/` is another issuer identifier (as the RFC 9207 check takes it).
#[tokio::test]
async fn an_id_token_whose_iss_differs_by_a_trailing_slash_is_refused() {
    let c = setup().await;
    let r = attempt(&c, |s, iss, nonce| {
        let claims = with(claims(iss, nonce), "iss", json!(format!("{iss}/")));
        s.token(TestKey::Rsa1).kid("k1").sign(&claims)
    })
    .await;
    assert_eq!(
        r.status, 400,
        "an ID token with iss = issuer + '/' signed the user in"
    );
    assert_eq!(reason(&r).as_deref(), Some("id_token_wrong_issuer"));
}

/// `[oidc] issuer` may be written with a trailing `/` more or less than the provider's
/// discovery document states it (OpenID Connect Discovery §4.3); the login works, and from then
/// on the document's form is the issuer: an ID token must carry it exactly, and one carrying the
/// configured form is refused.
#[tokio::test]
async fn an_issuer_configured_with_a_slash_more_or_less_signs_in_with_the_stated_form_only() {
    for (configured, stated) in [
        ("/realm/", "/realm"),
        ("/realm", "/realm/"),
        ("", "/"),
        ("/", ""),
    ] {
        let signer = TestSigner::new();
        let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
        let (configured, stated) = (
            format!("{}{configured}", idp.issuer),
            format!("{}{stated}", idp.issuer),
        );
        idp.state
            .discovery_extra
            .lock()
            .unwrap()
            .insert("issuer".into(), json!(stated));
        let proxy = start_proxy_for(&configured, "").await;
        let c = Case { proxy, idp, signer };
        for (iss, want) in [(&stated, 302), (&configured, 400)] {
            let r = attempt(&c, |s, _, nonce| {
                s.token(TestKey::Rsa1).kid("k1").sign(&claims(iss, nonce))
            })
            .await;
            assert_eq!(
                r.status,
                want,
                "configured {configured}, discovery {stated}, iss {iss}: {}",
                r.text()
            );
        }
        // RFC 9207: the authorization response names the stated form too.
        let query: String = url::form_urlencoded::byte_serialize(stated.as_bytes()).collect();
        let r = attempt_with(&c, &format!("&iss={query}"), |s, _, nonce| {
            s.token(TestKey::Rsa1)
                .kid("k1")
                .sign(&claims(&stated, nonce))
        })
        .await;
        assert_eq!(r.status, 302, "iss={stated}: {}", r.text());
    }
}

#[tokio::test]
async fn an_unknown_kid_refetches_the_key_set_once_then_succeeds_after_rotation() {
    let c = setup().await;
    let before = c.idp.state.jwks_fetches.load(Ordering::SeqCst);
    *c.idp.state.jwks.lock().unwrap() = c
        .signer
        .jwks_json(&[(TestKey::Rsa1, "k1"), (TestKey::EcP256, "k2")]);
    assert_eq!(
        attempt(&c, |s, iss, nonce| s
            .token(TestKey::EcP256)
            .kid("k2")
            .sign(&claims(iss, nonce)))
        .await
        .status,
        302
    );
    assert_eq!(
        c.idp.state.jwks_fetches.load(Ordering::SeqCst),
        before + 1,
        "exactly one refetch for the new kid"
    );
}

#[tokio::test]
async fn token_exchange_routes_get_a_token_for_their_resource() {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/orders/\"\nupstream = \"{}\"\ntoken = \"user\"\nresource = \"https://orders.example\"\nexchange = true\n",
        up.url()
    );
    let proxy = start_proxy_for(&idp.issuer, &routes).await;
    let c = Case { proxy, idp, signer };
    let (q, login_cookie) = c.login_begun().await;
    let done = callback(&c.proxy, &q, &login_cookie).await;
    assert_eq!(done.status, 302);
    let session = done.session_cookie();
    for _ in 0..2 {
        let r = get(
            &c.proxy.url("/orders/1"),
            &[("cookie", &session), ("x-csrf", "1")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            up.last().headers.get("authorization").unwrap(),
            "Bearer exchanged-for-https://orders.example"
        );
    }
    let requests = c.idp.state.token_requests.lock().unwrap().clone();
    let exchanges: Vec<_> = requests
        .iter()
        .filter(|f| {
            f.iter()
                .any(|(k, v)| k == "grant_type" && v.ends_with("token-exchange"))
        })
        .collect();
    assert_eq!(
        exchanges.len(),
        1,
        "the exchanged token is cached in the session"
    );
    let form = exchanges[0];
    assert!(form.contains(&("subject_token".into(), "fake-access".into())));
    assert!(form.contains(&("resource".into(), "https://orders.example".into())));
    assert!(form.contains(&(
        "subject_token_type".into(),
        "urn:ietf:params:oauth:token-type:access_token".into()
    )));
}

/// The provider ends the provider session a login signed into (the user signed out there, in
/// another tab) and says so by back-channel logout before that login's callback has stored
/// anything: no session may then be made for it, or it would outlive the logout that was
/// meant to end it.
#[tokio::test]
async fn a_provider_session_logged_out_before_its_callback_signs_nobody_in() {
    let c = setup().await;
    let (q, cookie) = begin_login(&c.proxy).await;
    let id_token = claims(&c.idp.issuer, &q["nonce"]);
    assert_eq!(id_token["sid"], "session-1");
    *c.idp.state.id_token.lock().unwrap() = c.signer.token(TestKey::Rsa1).kid("k1").sign(&id_token);
    let logout = vestibule::jose::testing::logout_token_claims(&c.idp.issuer, "vestibule", now());
    let logout = c
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&logout);
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("logout_token", &logout)
        .finish();
    let r = send(
        http::Request::post(c.proxy.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from(form)))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    callback_refused_as_ended(&c.proxy, &q["state"], &cookie, "").await;
}

/// The callback of the login whose state is `state` (its login cookie `cookie`), which a
/// back-channel logout came before: refused with `provider_session_ended`. `label` names the
/// case in a failure.
async fn callback_refused_as_ended(proxy: &Proxy, state: &str, cookie: &str, label: &str) -> Reply {
    let r = get(
        &proxy.url(&format!("/bff/callback?code=abc&state={state}")),
        &[("cookie", cookie), ("accept", "text/html")],
    )
    .await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("provider_session_ended"),
        "{label}: {} {}",
        r.status,
        r.text()
    );
    r
}

/// Posts `form` (already encoded) to the back-channel logout endpoint.
async fn post_logout_form(proxy: &Proxy, form: String) -> Reply {
    send(
        http::Request::post(proxy.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from(form)))
            .unwrap(),
    )
    .await
}

/// A logout token signed with the provider's key, with `claims`.
fn logout_token(c: &Case, claims: &Value) -> String {
    logout_jwt(&c.signer, claims)
}

/// `claims` signed by `signer` as the provider signs a logout token.
fn logout_jwt(signer: &TestSigner, claims: &Value) -> String {
    signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(claims)
}

fn encoded(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn sets_a_session(r: &Reply) -> bool {
    r.headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("vestibule="))
}

/// RFC 6749 §3.1: a parameter of the authorization response is never sent twice. A callback
/// repeating `code`, `state`, `iss` (RFC 9207's mix-up defence) or `error` has been tampered
/// with, and which copy Vestibule would take is nobody's business: it is refused before the
/// login state is spent or the code used, as a callback lacking `state` is, so the provider's
/// own callback still signs the user in.
#[tokio::test]
async fn a_callback_repeating_a_parameter_is_refused_before_its_code_is_used() {
    let c = setup().await;
    let (q, cookie) = c.login_begun().await;
    let (state, iss) = (&q["state"], encoded(&c.idp.issuer));
    for query in [
        format!("code=abc&code=other&state={state}"),
        format!("code=abc&state={state}&state=forged"),
        format!("code=abc&state={state}&state={state}"),
        format!("code=abc&state={state}&iss={iss}&iss=https%3A%2F%2Fevil.example"),
        format!("error=access_denied&error=server_error&state={state}"),
    ] {
        let r = get(
            &c.proxy.url(&format!("/bff/callback?{query}")),
            &[("cookie", &cookie), ("accept", "text/html")],
        )
        .await;
        assert_eq!(
            reason(&r).as_deref(),
            Some("callback_parameter_repeated"),
            "{query}: {} {}",
            r.status,
            r.text()
        );
        assert!(!sets_a_session(&r), "{query}: a session was made");
        assert!(r.header("location").is_none(), "{query}: redirected");
    }
    assert!(
        c.idp
            .state
            .token_requests_of("authorization_code")
            .is_empty(),
        "the code of a callback repeating a parameter was exchanged"
    );
    let r = get(
        &c.proxy
            .url(&format!("/bff/callback?code=abc&state={state}&iss={iss}")),
        &[("cookie", &cookie), ("accept", "text/html")],
    )
    .await;
    assert_eq!(r.status, 302, "the login state was spent: {}", r.text());
}

/// `logout_token` twice in a back-channel logout: not a request Back-Channel Logout 1.0 §2.5
/// describes (one `logout_token`), so it is refused like an invalid token, ends nothing and
/// records nothing: the provider's well-formed request is then taken.
#[tokio::test]
async fn a_back_channel_logout_repeating_logout_token_is_refused_and_ends_nothing() {
    let c = setup().await;
    let (q, cookie) = c.login_begun().await;
    let done = callback(&c.proxy, &q, &cookie).await;
    assert_eq!(done.status, 302, "{}", done.text());
    let session = done.session_cookie();
    let signed_in = || async {
        get(
            &c.proxy.url("/bff/user"),
            &[("cookie", &session), ("x-csrf", "1")],
        )
        .await
        .status
    };
    let token = logout_token(
        &c,
        &vestibule::jose::testing::logout_token_claims(&c.idp.issuer, "vestibule", now()),
    );
    for form in [
        format!("logout_token={token}&logout_token=garbage"),
        format!("logout_token={token}&logout_token={token}"),
    ] {
        let r = post_logout_form(&c.proxy, form).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"], "invalid_request");
        assert_eq!(signed_in().await, 200, "a session was ended");
    }
    let r = post_logout_form(&c.proxy, format!("logout_token={token}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(signed_in().await, 401);
}

/// `returnUrl` twice at `/bff/login`: which one the login would go back to is ambiguous (a
/// link whose first copy looks harmless), so the login is refused as for a bad `returnUrl`.
#[tokio::test]
async fn a_login_repeating_return_url_is_refused() {
    let c = setup().await;
    for query in [
        "returnUrl=%2Fapp&returnUrl=%2F%2Fevil.example",
        "returnUrl=%2Fapp&returnUrl=%2Fapp",
    ] {
        let r = get(&c.proxy.url(&format!("/bff/login?{query}")), &[]).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(r.text().contains("invalid_return_url"), "{}", r.text());
        assert!(r.header("location").is_none(), "{query}");
    }
}

/// A login stack whose sessions are kept in `store` ("memory", or "redis" on `redis`).
async fn stack_on(
    store: &str,
    redis: &crate::support::redis::RedisServer,
) -> crate::identity::Stack {
    let url = redis.url();
    crate::identity::stack_with(
        |_| String::new(),
        |c| match store {
            "redis" => c
                .add("session.store", "redis")
                .add("session.redis.url", url),
            _ => c,
        },
    )
    .await
}

/// A logout token naming only `sub` ends every session of that user at the provider. One that
/// comes between the user's sign-in there and this login's callback found no session to end;
/// the callback must not then make one for that sign-in, alive until its timeout. A login begun
/// after the logout signs in as ever: the user is not locked out. With both session stores.
#[tokio::test]
async fn a_user_logged_out_everywhere_before_the_callback_is_signed_in_only_by_a_later_login() {
    let redis = crate::support::redis::RedisServer::start();
    for store in ["memory", "redis"] {
        let s = stack_on(store, &redis).await;
        logged_out_everywhere_before_the_callback(&s, store).await;
    }
}

async fn logged_out_everywhere_before_the_callback(s: &crate::identity::Stack, store: &str) {
    let (q, cookie) = begin_login(&s.proxy).await;
    *s.idp.state.id_token.lock().unwrap() = s
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .sign(&claims(&s.idp.issuer, &q["nonce"]));
    s.clock.advance(std::time::Duration::from_secs(1));
    let logout = with(
        vestibule::jose::testing::logout_token_claims(&s.idp.issuer, "vestibule", now()),
        "sid",
        Value::Null,
    );
    let token = logout_jwt(&s.signer, &logout);
    let r = post_logout_form(&s.proxy, format!("logout_token={token}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = callback_refused_as_ended(&s.proxy, &q["state"], &cookie, store).await;
    assert!(!sets_a_session(&r), "{store}: a session was made");
    // At once, in the second the logout came in.
    let again = s.callback(json!({})).await;
    assert_eq!(
        again.status,
        302,
        "{store}: signing in again: {}",
        again.text()
    );
}

/// The other parameters `/bff/login` and the logout link read, repeated (RFC 6749 §3.1; the
/// callback's, `logout_token` and `returnUrl` above): `acr_values` or `max_age` twice would let
/// the copy a step-up login asks for depend on which one is read (a link whose first copy asks
/// for the strong sign-in), and `sid` twice at `GET /bff/logout` is no link Vestibule made. Each
/// is refused before anything else (400 `bad_request`): no login begun (no login cookie, no
/// redirect, nothing pushed to the provider), no session ended.
#[tokio::test]
async fn a_login_or_logout_link_repeating_a_parameter_is_refused_and_starts_or_ends_nothing() {
    let c = setup().await;
    for query in [
        "returnUrl=%2Fapp&acr_values=mfa&acr_values=pwd",
        "returnUrl=%2Fapp&acr_values=mfa&acr_values=mfa",
        "returnUrl=%2Fapp&max_age=0&max_age=86400",
        "returnUrl=%2Fapp&max_age=60&max_age=60",
    ] {
        let r = get(&c.proxy.url(&format!("/bff/login?{query}")), &[]).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{query}");
        assert!(r.header("location").is_none(), "{query}: redirected");
        assert!(r.header("set-cookie").is_none(), "{query}: a login began");
    }
    assert!(c.idp.state.pushed.lock().unwrap().is_empty());

    let (q, cookie) = c.login_begun().await;
    let done = callback(&c.proxy, &q, &cookie).await;
    assert_eq!(done.status, 302, "{}", done.text());
    let session = done.session_cookie();
    let me = get(
        &c.proxy.url("/bff/user"),
        &[("cookie", &session), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(me.status, 200, "{}", me.text());
    let link = me.json()["bff:logout_url"].as_str().unwrap().to_string();
    let sid = link.split("sid=").nth(1).unwrap().to_string();
    for query in [
        format!("sid={sid}&sid=forged"),
        format!("sid=forged&sid={sid}"),
        format!("sid={sid}&sid={sid}"),
    ] {
        let r = get(
            &c.proxy.url(&format!("/bff/logout?{query}")),
            &[("cookie", &session)],
        )
        .await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{query}");
        assert!(r.header("location").is_none(), "{query}: redirected");
        assert!(r.header("set-cookie").is_none(), "{query}: cookies changed");
        assert!(
            c.proxy.signed_in(&session).await,
            "{query}: the session ended"
        );
    }
    assert!(c.idp.state.revocations.lock().unwrap().is_empty());
    let r = get(&c.proxy.url(&link), &[("cookie", &session)]).await;
    assert_eq!(r.status, 302, "the link Vestibule made: {}", r.text());
    assert!(!c.proxy.signed_in(&session).await);
}

/// A logout token naming both `sid` and `sub` ends that provider session and the user's
/// sessions stored without a `sid` (the provider named none at their login, so any of them may
/// be it). A login whose ID token carries no `sid`, begun before that logout and whose callback
/// comes after it, is the same case: it may have signed into the ended provider session, and
/// makes no session. A login into another provider session (another `sid`) is not refused,
/// nor is a login without `sid` begun after the logout. With both session stores.
#[tokio::test]
async fn a_login_without_sid_pending_when_its_users_provider_session_ended_signs_nobody_in() {
    let redis = crate::support::redis::RedisServer::start();
    for store in ["memory", "redis"] {
        let s = stack_on(store, &redis).await;
        // Two logins begun before the logout: one signing in without a sid, one into another
        // provider session.
        let sign_in = |sid: Option<&'static str>| {
            let s = &s;
            async move {
                let (q, cookie) = begin_login(&s.proxy).await;
                let claims = with(
                    claims(&s.idp.issuer, &q["nonce"]),
                    "sid",
                    sid.map_or(Value::Null, |sid| json!(sid)),
                );
                (q, cookie, claims)
            }
        };
        let (sidless_q, sidless_cookie, sidless) = sign_in(None).await;
        let (other_q, other_cookie, other) = sign_in(Some("session-2")).await;
        s.clock.advance(std::time::Duration::from_secs(1));
        let logout =
            vestibule::jose::testing::logout_token_claims(&s.idp.issuer, "vestibule", now());
        assert_eq!(
            (&logout["sid"], &logout["sub"]),
            (&json!("session-1"), &json!("alice"))
        );
        let token = logout_jwt(&s.signer, &logout);
        let r = post_logout_form(&s.proxy, format!("logout_token={token}")).await;
        assert_eq!(r.status, 200, "{store}: {}", r.text());

        *s.idp.state.id_token.lock().unwrap() =
            s.signer.token(TestKey::Rsa1).kid("k1").sign(&sidless);
        let r =
            callback_refused_as_ended(&s.proxy, &sidless_q["state"], &sidless_cookie, store).await;
        assert!(!sets_a_session(&r), "{store}: a session was made");

        *s.idp.state.id_token.lock().unwrap() =
            s.signer.token(TestKey::Rsa1).kid("k1").sign(&other);
        let r = callback(&s.proxy, &other_q, &other_cookie).await;
        assert_eq!(
            r.status,
            302,
            "{store}: another provider session's login was refused: {}",
            r.text()
        );

        // Begun after the logout: signs in, at once.
        let (q, cookie, later) = sign_in(None).await;
        *s.idp.state.id_token.lock().unwrap() =
            s.signer.token(TestKey::Rsa1).kid("k1").sign(&later);
        let r = callback(&s.proxy, &q, &cookie).await;
        assert_eq!(r.status, 302, "{store}: signing in again: {}", r.text());
    }
}

/// Login CSRF by cookie tossing: with a session cookie named without `__Host-`, a page on a
/// sibling subdomain could set a login-state cookie of the login prefix's name (`Domain=` the
/// parent domain), holding the state of a login the attacker began, and send the victim to the
/// callback with the attacker's code: the victim would be signed in as the attacker. The
/// login-state cookie's name is `__Host-` whatever the session cookie is called (all of
/// Vestibule's cookies are `Path=/` with no `Domain` already), which no other host can set,
/// and a callback finds its state under that name only.
#[tokio::test]
async fn a_login_state_is_kept_in_a_host_cookie_whatever_the_session_cookie_is_named() {
    for (name, secure, login_prefix) in [
        ("vestibule", true, "__Host-vestibule-login-"),
        ("__Secure-app", true, "__Host-app-login-"),
        ("__Host-app", true, "__Host-app-login-"),
        ("vestibule", false, "vestibule-login-"),
    ] {
        let signer = TestSigner::new();
        let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
        let config = config_toml("")
            .set("oidc.issuer", idp.issuer.as_str())
            .set("session.cookie_secure", secure)
            .add("session.cookie_name", name);
        let proxy = start_proxy(config).await;
        wait_metadata(&proxy).await;
        let c = Case { proxy, idp, signer };
        let (q, cookie) = c.login_begun().await;
        assert!(
            cookie.starts_with(login_prefix),
            "{name} (secure: {secure}): the login state went in {cookie}"
        );
        let callback = |cookie: String| {
            let url = c
                .proxy
                .url(&format!("/bff/callback?code=abc&state={}", q["state"]));
            async move { get(&url, &[("cookie", &cookie), ("accept", "text/html")]).await }
        };
        if secure {
            // What a sibling subdomain can set: the name without the prefix, same value.
            let tossed = cookie.trim_start_matches("__Host-").to_string();
            let r = callback(tossed.clone()).await;
            assert_eq!(r.status, 400, "{name}: {tossed} {}", r.text());
            assert!(
                !sets_a_session_named(&r, name),
                "{name}: signed in by {tossed}"
            );
        }
        let r = callback(cookie.clone()).await;
        assert_eq!(r.status, 302, "{name}: {cookie}: {}", r.text());
        assert!(sets_a_session_named(&r, name), "{name}: {cookie}");
        // The script's logout keeps its way out (with the ID token as a hint) in a cookie of
        // the same kind.
        let session = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .find(|pair| pair.starts_with(&format!("{name}=")))
            .unwrap();
        let out = crate::logout::script_logout(&c.proxy, &session)
            .await
            .unwrap();
        let way_out = login_prefix.replace("-login-", "-logout=");
        assert!(
            out.headers
                .get_all("set-cookie")
                .iter()
                .any(|v| v.to_str().unwrap().starts_with(&way_out)),
            "{name}: no {way_out} in {:?}",
            out.headers
        );
    }
}

fn sets_a_session_named(r: &Reply, name: &str) -> bool {
    r.headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with(&format!("{name}=")))
}
