//! DPoP (RFC 9449): against the real `oidc-provider`, whose tokens come back bound to
//! Vestibule's key (`token_type` DPoP, `cnf.jkt`), forwarded as `Authorization: DPoP` with a
//! fresh proof per request; against the fake provider, the nonce challenge, a provider that
//! answers a Bearer token where a bound one was asked for, and the key shared by replicas.

use crate::fake_provider::{self, reason};
use crate::support::redis::RedisServer;
use crate::support::stack::LoginStack;
use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest;

fn segment(jwt: &str, i: usize) -> Value {
    let part = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The RFC 7638 thumbprint of the public key in a proof's header.
fn proof_jkt(proof: &str) -> String {
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(segment(proof, 0)["jwk"].clone())
        .expect("the proof header has a jwk");
    jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        .unwrap()
}

/// `(access token, proof)` of the upstream's requests for paths containing `marker`.
fn sent(up: &upstream::Upstream, marker: &str) -> Vec<(String, Option<String>)> {
    up.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.uri.contains(marker))
        .map(|s| {
            let auth = s.headers.get("authorization").unwrap().to_str().unwrap();
            let proof = s
                .headers
                .get("dpop")
                .map(|p| p.to_str().unwrap().to_string());
            (auth.to_string(), proof)
        })
        .collect()
}

/// A stack with DPoP on, its `instances` proxies keeping their sessions (and the DPoP key) in
/// `redis`, with [`routes`].
async fn dpop_stack_on(redis: &RedisServer, instances: usize) -> LoginStack {
    let url = redis.url();
    LoginStack::builder()
        .instances(instances)
        .extra(move |u| {
            format!(
                "store = \"redis\"\n[session.redis]\nurl = \"{url}\"\n{}",
                routes(u)
            )
        })
        .config(|c| c.add("oidc.dpop", true))
        .start()
        .await
}

fn routes(u: &str) -> String {
    format!(
        r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
[[routes]]
path = "/plain/"
upstream = "{u}"
token = "user"
"#
    )
}

async fn dpop_stack(provider: Value) -> LoginStack {
    LoginStack::builder()
        .provider(provider)
        .extra(routes)
        .config(|c| c.add("oidc.dpop", true))
        .start()
        .await
}

#[tokio::test]
async fn the_real_provider_binds_tokens_and_every_request_carries_a_fresh_proof_of_that_key() {
    let stack = dpop_stack(json!({})).await;
    let mut browser = stack.login("alice").await;
    for _ in 0..2 {
        let r = browser
            .get(
                &format!("{}/api/items?page=2", stack.base),
                &[("x-csrf", "1")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = browser
        .get(&format!("{}/plain/x", stack.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let bound = sent(&stack.up, "/api/items");
    assert_eq!(bound.len(), 2);
    let mut jtis = Vec::new();
    for (auth, proof) in &bound {
        let token = auth.strip_prefix("DPoP ").expect("the DPoP scheme");
        let proof = proof.as_deref().expect("a DPoP proof");
        // The provider bound the token to the key that signs the proofs.
        let claims = segment(token, 1);
        assert_eq!(
            claims["cnf"]["jkt"].as_str(),
            Some(proof_jkt(proof).as_str()),
            "{claims}"
        );
        let head = segment(proof, 0);
        assert_eq!(head["typ"], "dpop+jwt");
        assert_eq!(head["alg"], "ES256");
        let p = segment(proof, 1);
        assert_eq!(p["htm"], "GET");
        assert_eq!(p["htu"], format!("{}/api/items", stack.up.url()));
        assert_eq!(
            p["ath"],
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
        );
        assert!(p["iat"].as_u64().unwrap().abs_diff(fake_provider::now()) < 30);
        jtis.push(p["jti"].as_str().unwrap().to_string());
    }
    assert_ne!(jtis[0], jtis[1], "a proof is never reused");
    // A route without token_binding pays nothing: a bearer token, no proof.
    let plain = sent(&stack.up, "/plain/");
    assert!(plain[0].0.starts_with("Bearer "), "{:?}", plain[0]);
    assert_eq!(plain[0].1, None);
}

/// An upstream's 401 is acted on only for what its challenges say in their `error`, in the
/// scheme that carries it: a nonce request in a `DPoP` challenge (RFC 9449 §9) is answered
/// once with the nonce; `invalid_token` in a `DPoP` challenge (RFC 9449 §7.1) replaces the
/// token of a DPoP-bound route, not of a bearer route. The code in a realm, or in another
/// scheme's challenge, is passed to the client untouched, with no second request and no grant.
#[tokio::test]
async fn an_upstreams_401_is_acted_on_only_for_the_error_of_the_challenge_that_carries_it() {
    let stack = dpop_stack(json!({})).await;
    let mut browser = stack.login("alice").await;
    let refreshes = async || {
        stack.provider.stats().await["refresh_token"]
            .as_u64()
            .unwrap()
    };
    let before = refreshes().await;
    let mut call = async |path: &str, challenge: &str| {
        let url = format!("{}{path}", stack.base);
        let headers = [
            ("x-csrf", "1"),
            ("x-challenge", challenge),
            ("x-dpop-nonce", "n-1"),
        ];
        let r = browser.get(&url, &headers).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.header("www-authenticate"), Some(challenge));
        sent(&stack.up, path)
    };
    for (i, challenge) in [
        r#"Bearer realm="use_dpop_nonce""#,
        r#"Bearer error="use_dpop_nonce""#,
        r#"DPoP error="invalid_dpop_proof", error_description="use_dpop_nonce""#,
    ]
    .into_iter()
    .enumerate()
    {
        let seen = call(&format!("/api/challenge401?realm{i}"), challenge).await;
        assert_eq!(seen.len(), 1, "not replayed: {challenge}");
    }
    let seen = call("/plain/challenge401?dpop", r#"DPoP error="invalid_token""#).await;
    assert_eq!(seen.len(), 1, "not a bearer token's refusal");
    assert_eq!(refreshes().await, before);

    let seen = call(
        "/api/challenge401?nonce",
        r#"Bearer realm="api", DPoP error="use_dpop_nonce""#,
    )
    .await;
    assert_eq!(seen.len(), 2, "once more with the nonce");
    let nonce = |i: usize| segment(seen[i].1.as_deref().unwrap(), 1)["nonce"].clone();
    assert_eq!(nonce(1), "n-1");
    assert_eq!(refreshes().await, before);

    let seen = call("/api/challenge401?bound", r#"DPoP error="invalid_token""#).await;
    assert_eq!(seen.len(), 2, "once more with a new token");
    assert_ne!(seen[0].0, seen[1].0);
    assert_eq!(refreshes().await, before + 1);
}

/// RFC 9449 §7.1: an API that authenticates the `DPoP` scheme sends its challenges under
/// `DPoP`, RFC 9470's step-up among them. On a DPoP-bound route that is a step-up like a
/// `Bearer` one; on a bearer route the token went as `Bearer`, so a `DPoP` challenge is not about
/// it and is passed on.
#[tokio::test]
async fn a_step_up_challenge_in_the_dpop_scheme_is_a_step_up_on_a_bound_route_only() {
    let stack = dpop_stack(json!({})).await;
    let mut browser = stack.login("alice").await;
    let challenge = r#"DPoP error="insufficient_user_authentication", acr_values="mfa""#;
    let headers = [("x-csrf", "1"), ("x-challenge", challenge)];
    let r = browser
        .get(&format!("{}/api/challenge401", stack.base), &headers)
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "step_up_required", "{}", r.text());
    assert_eq!(r.json()["acr_values"], json!(["mfa"]), "{}", r.text());
    assert_eq!(
        r.json()["login_url"],
        "/bff/login?returnUrl=%2Fapi%2Fchallenge401&acr_values=mfa",
        "{}",
        r.text()
    );
    assert!(r.header("www-authenticate").is_none());
    let r = browser
        .get(&format!("{}/plain/challenge401", stack.base), &headers)
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), "no");
    assert_eq!(r.header("www-authenticate"), Some(challenge));
}

#[tokio::test]
async fn a_provider_that_wants_a_nonce_gets_one_retry_with_it_and_the_login_completes() {
    let stack = dpop_stack(json!({ "dpop_require_nonce": true })).await;
    let mut browser = stack.login("alice").await;
    let r = browser
        .get(&format!("{}/api/x", stack.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (auth, proof) = sent(&stack.up, "/api/x").remove(0);
    let token = auth.strip_prefix("DPoP ").unwrap();
    assert_eq!(
        segment(token, 1)["cnf"]["jkt"].as_str(),
        Some(proof_jkt(&proof.unwrap()).as_str())
    );
}

/// A fake-provider proxy with `oidc.dpop = true` and the DPoP routes.
async fn fake_case() -> fake_provider::Case {
    let signer = vestibule::jose::testing::TestSigner::new();
    let idp =
        fake_idp::start(signer.jwks_json(&[(vestibule::jose::testing::TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let config = config_toml(&routes(&up.url()))
        .set("oidc.issuer", idp.issuer.as_str())
        .add("oidc.dpop", true);
    let proxy = start_proxy(config).await;
    wait_metadata(&proxy).await;
    std::mem::forget(up);
    fake_provider::Case { proxy, idp, signer }
}

fn id_token(s: &vestibule::jose::testing::TestSigner, iss: &str, nonce: &str) -> String {
    s.token(vestibule::jose::testing::TestKey::Rsa1)
        .kid("k1")
        .sign(&fake_provider::claims(iss, nonce))
}

#[tokio::test]
async fn a_bearer_token_where_a_bound_one_was_asked_for_is_refused() {
    let c = fake_case().await;
    // The fake answers token_type Bearer whatever the request carried.
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("token_type_invalid"),
        "{}",
        r.text()
    );
    let proofs = c.idp.state.token_proofs.lock().unwrap().clone();
    assert_eq!(proofs.len(), 1);
    let claims = fake_idp::proof_claims(proofs[0].as_deref());
    assert_eq!(claims["htm"], "POST");
    assert_eq!(claims["htu"], format!("{}/token", c.idp.issuer));
    assert!(claims.get("ath").is_none(), "{claims}");
}

#[tokio::test]
async fn a_nonce_challenge_is_answered_once_and_a_second_one_is_not() {
    let c = fake_case().await;
    c.idp
        .state
        .token_fields
        .lock()
        .unwrap()
        .insert("token_type".into(), json!("DPoP"));
    *c.idp.state.dpop_nonce.lock().unwrap() = Some("nonce-1".into());
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let proofs = c.idp.state.token_proofs.lock().unwrap().clone();
    assert_eq!(proofs.len(), 2, "one retry, with the nonce");
    assert_eq!(
        fake_idp::proof_claims(proofs[0].as_deref())["nonce"],
        Value::Null
    );
    assert_eq!(
        fake_idp::proof_claims(proofs[1].as_deref())["nonce"],
        "nonce-1"
    );
    let jti = |i: usize| fake_idp::proof_claims(proofs[i].as_deref())["jti"].clone();
    assert_ne!(jti(0), jti(1));

    // The nonce is remembered: the next grant sends it at once.
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(c.idp.state.token_proofs.lock().unwrap().len(), 3);

    // A provider whose nonce changed is followed at once.
    *c.idp.state.dpop_nonce.lock().unwrap() = Some("nonce-2".into());
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(c.idp.state.token_proofs.lock().unwrap().len(), 5);

    // A provider that asks again and again gets exactly one retry, then the login fails.
    c.idp.state.token_proofs.lock().unwrap().clear();
    c.idp
        .state
        .dpop_nonce_always
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(c.idp.state.token_proofs.lock().unwrap().len(), 2);
    assert_eq!(reason(&r).as_deref(), Some("code_rejected"), "{}", r.text());
}

#[tokio::test]
async fn replicas_sharing_a_store_prove_possession_of_one_key_kept_sealed() {
    let redis = RedisServer::start();
    let stack = dpop_stack_on(&redis, 2).await;
    let mut browser = stack.login("alice").await;
    for proxy in &stack.proxies {
        let r = browser.get(&proxy.url("/api/r"), &[("x-csrf", "1")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = sent(&stack.up, "/api/r");
    assert_eq!(seen.len(), 2);
    let (a, b) = (
        proof_jkt(seen[0].1.as_deref().unwrap()),
        proof_jkt(seen[1].1.as_deref().unwrap()),
    );
    assert_eq!(a, b, "both replicas sign with the same key");
    // The stored key is that key, sealed with the session key ring (nothing in the clear).
    let app = &stack.proxies[1].app;
    let record = app
        .sessions
        .store()
        .get(vestibule::state::DPOP_KEY_NAME)
        .await
        .unwrap()
        .expect("the key is stored");
    let sealed = std::str::from_utf8(&record.value).unwrap();
    let opened = app
        .keyring()
        .open(vestibule::state::DPOP_KEY_NAME, sealed)
        .expect("sealed with the session keys");
    let key = vestibule::oidc::dpop::DpopKey::from_der(&opened.plaintext).unwrap();
    assert_eq!(key.thumbprint(), a);
    assert_eq!(redis.command(&["PING"]).trim(), "+PONG");
}

/// The demo: the sample API (which wants nonces) behind a `token_binding = "dpop"` route. Through
/// Vestibule the call succeeds — after one `use_dpop_nonce` round, whose nonce is then kept — and
/// the very same token, stolen, is refused when sent without Vestibule's key.
#[tokio::test]
async fn through_vestibule_the_sample_api_answers_and_the_stolen_token_is_refused() {
    let port = free_port();
    let provider = crate::support::provider::start(port, json!({}));
    let api = crate::sample_api::SampleApi::start_with(&[
        "--issuer",
        &provider.issuer,
        "--audience",
        "https://api.example.test",
        "--dpop-nonce",
    ])
    .await
    .unwrap();
    let extra = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\ntoken_binding = \"dpop\"\n",
        api.url
    );
    let config = login_toml(port, &provider.issuer, &extra).add("oidc.dpop", true);
    let proxy = start_proxy(&config).await;
    wait_ready(&proxy).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut browser = crate::support::browser::Browser::default();
    assert_eq!(
        browser.login(&base, "alice", "alice", "/").await.status,
        302
    );
    for _ in 0..2 {
        let r = browser
            .get(&format!("{base}/api/hello"), &[("x-csrf", "1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sub"], "alice");
    }
    let log = api.log().unwrap();
    let nonce_rounds = log.matches("without the current nonce").count();
    assert_eq!(
        nonce_rounds, 1,
        "one nonce round, then the nonce is kept: {log}"
    );

    let stolen = provider.tokens("alice").await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let thief_key = vestibule::oidc::dpop::DpopKey::generate().unwrap();
    let htu = format!("{}/api/hello", api.url);
    let forged = thief_key
        .proof("GET", &htu, fake_provider::now(), Some(&stolen), None)
        .unwrap();
    let (bearer, dpop) = (format!("Bearer {stolen}"), format!("DPoP {stolen}"));
    for (what, headers) in [
        (
            "as a bearer token",
            vec![("authorization", bearer.as_str())],
        ),
        ("without a proof", vec![("authorization", dpop.as_str())]),
        (
            "with the thief's own proof",
            vec![("authorization", dpop.as_str()), ("dpop", forged.as_str())],
        ),
    ] {
        let (status, _, body) = api.get_with("/api/hello", &headers).await.unwrap();
        assert_eq!(status, 401, "{what}: {body}");
    }
}

/// A PEM file (PKCS#8) with a new DPoP key, and that key's thumbprint.
fn key_file(dir: &tempfile::TempDir, name: &str) -> (String, String) {
    let key = vestibule::oidc::dpop::DpopKey::generate().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8().unwrap());
    let path = dir.path().join(name);
    std::fs::write(
        &path,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    (
        path.to_str().unwrap().to_string(),
        key.thumbprint().to_string(),
    )
}

/// docs/configuration.md, DPoP rotation: a session whose token is bound to a replaced key (a
/// key file replaced, the replica restarted on the same store; here a second replica with the
/// new file, as during the rolling restart). The session recorded the key its token was bound
/// to, so the token is refreshed before it is sent: the sample API — which would answer it
/// `DPoP error="invalid_token"` (RFC 9449 §7.1's own example of a failed key binding) — never
/// sees it, and the first request already succeeds on a token bound to the new key.
#[tokio::test]
async fn a_token_bound_to_a_replaced_key_is_refreshed_before_it_is_sent() {
    let s = a_session_bound_to_a_replaced_key(&[]).await;
    rebound_once_before_it_is_sent(s, "cnf.jkt").await;
}

#[tokio::test]
async fn userinfo_is_asked_with_a_proof_for_the_bound_token_and_its_claims_arrive() {
    // Opaque access tokens, accepted at the userinfo endpoint; the ID token carries only `sub`,
    // so `email` and `name` can come from UserInfo alone. The provider binds the token to our
    // key and, asked for a nonce, wants one in every proof.
    let stack = LoginStack::builder()
        .provider(json!({
            "resources": [],
            "conform_id_token_claims": true,
            "dpop_require_nonce": true,
        }))
        .extra(routes)
        .config(|c| c.add("oidc.dpop", true).add("oidc.userinfo", true))
        .start()
        .await;
    let mut browser = stack.login("alice").await;
    let me = browser.user(&stack.base).await;
    assert_eq!(me["email"], "alice@example.test", "{me}");
    assert_eq!(me["name"], "Alice Liddell", "{me}");
}

/// A session logged in through a replica signing with one DPoP key file, and a second replica
/// on the same store with another key file (a key file replaced and the replicas restarted):
/// the browser, the new replica, the provider, the sample API (started with `api_args`) and
/// the new key's thumbprint.
struct ReplacedKey {
    _redis: RedisServer,
    _dir: tempfile::TempDir,
    old: Proxy,
    provider: crate::support::provider::TestProvider,
    api: crate::sample_api::SampleApi,
    new: Proxy,
    browser: crate::support::browser::Browser,
    new_jkt: String,
}

async fn a_session_bound_to_a_replaced_key(api_args: &[&str]) -> ReplacedKey {
    let redis = RedisServer::start();
    let port = free_port();
    let provider = crate::support::provider::start(port, json!({}));
    let mut args = vec![
        "--issuer",
        &provider.issuer,
        "--audience",
        "https://api.example.test",
    ];
    args.extend_from_slice(api_args);
    let api = crate::sample_api::SampleApi::start_with(&args)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (old_key, _) = key_file(&dir, "old.pem");
    let (new_key, new_jkt) = key_file(&dir, "new.pem");
    let extra = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n\
         [[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\ntoken_binding = \"dpop\"\n",
        redis.url(),
        api.url
    );
    let config = login_toml(port, &provider.issuer, &extra).add("oidc.dpop", true);
    let old = start_proxy(&config.clone().add("oidc.dpop_key_file", old_key.as_str())).await;
    wait_ready(&old).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut browser = crate::support::browser::Browser::default();
    assert_eq!(
        browser.login(&base, "alice", "alice", "/").await.status,
        302
    );
    let r = browser
        .get(&old.url("/api/hello"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let renewed = config
        .set("server.listen", "127.0.0.1:0")
        .add("oidc.dpop_key_file", new_key.as_str());
    let new = start_proxy(&renewed).await;
    wait_ready(&new).await;
    ReplacedKey {
        _redis: redis,
        _dir: dir,
        old,
        provider,
        api,
        new,
        browser,
        new_jkt,
    }
}

/// docs/configuration.md, DPoP rotation: the session records the thumbprint of the key its
/// token was bound to, and a token bound to a key no longer signing is refreshed before it is
/// sent, so an API that calls the mismatch an invalid proof (`invalid_dpop_proof`, as several
/// DPoP libraries do, which says nothing of the token) never sees it: the first request after
/// the key changed already succeeds, after exactly one refresh grant.
#[tokio::test]
async fn a_token_bound_to_a_replaced_key_is_refreshed_before_an_api_that_calls_it_a_bad_proof_sees_it()
 {
    let s = a_session_bound_to_a_replaced_key(&["--binding-as-proof-error"]).await;
    rebound_once_before_it_is_sent(s, "invalid DPoP proof").await;
}

/// Two requests through the replica with the new key both succeed, after exactly one refresh
/// grant, on a token bound to the new key; the API's log holds no `refusal` (what it logs when
/// it refuses the token bound to the old key).
async fn rebound_once_before_it_is_sent(mut s: ReplacedKey, refusal: &str) {
    let refreshes = s.provider.stats().await["refresh_token"].as_u64().unwrap();
    for _ in 0..2 {
        let r = s
            .browser
            .get(&s.new.url("/api/hello"), &[("x-csrf", "1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["sub"], "alice");
    }
    assert_eq!(
        s.provider.stats().await["refresh_token"].as_u64().unwrap(),
        refreshes + 1,
        "exactly one refresh grant"
    );
    let log = s.api.log().unwrap();
    assert_eq!(
        log.matches(refusal).count(),
        0,
        "the token bound to the old key was sent: {log}"
    );
    let bound = s.provider.tokens("alice").await;
    let token = bound["access_token"].as_str().unwrap();
    assert_eq!(segment(token, 1)["cnf"]["jkt"], s.new_jkt.as_str());
}

/// Replicas that sign with different keys for a while (a rolling restart onto a new key file)
/// each find the token bound to the other's key: each replaces it at most once per session
/// every 10 seconds, not at every request (the provider would otherwise see a grant per
/// request).
#[tokio::test]
async fn replicas_signing_with_different_keys_do_not_refresh_at_every_request() {
    let mut s = a_session_bound_to_a_replaced_key(&[]).await;
    let refreshes = s.provider.stats().await["refresh_token"].as_u64().unwrap();
    for round in 0..3 {
        for proxy in [&s.new, &s.old] {
            let r = s
                .browser
                .get(&proxy.url("/api/hello"), &[("x-csrf", "1")])
                .await;
            assert!(
                [200, 401].contains(&r.status),
                "round {round}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    let grants = s.provider.stats().await["refresh_token"].as_u64().unwrap() - refreshes;
    assert!(
        (1..=2).contains(&grants),
        "{grants} refresh grants for six requests alternating between two keys"
    );
}

/// RFC 9449 §9: an upstream's nonce is its own. `http://api` and `https://api` are two servers
/// (ports 80 and 443) — one may be a legacy plain-HTTP service nobody trusts — and the nonce
/// one sends must never go in the proofs for the other (nor let it make every request to the
/// other a 401 and a second send). On a test host of its own, where ports 80 and 443 are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_nonce_goes_only_to_that_upstream_not_to_another_port_of_its_host() {
    use crate::support::pki::{TestCa, tls_front};
    let up = upstream::start().await;
    let ca = TestCa::new("dpop-nonce-ca");
    let mut host = crate::support::netns::NetHost::start();
    let address = host.address.to_string();
    let (front, _) = tls_front(ca.acceptor_also_for(&address), up.addr.unwrap()).await;
    host.reach_on(Some(80), up.addr.unwrap()).await;
    host.reach_on(Some(443), front).await;
    let ca_file = ca.ca_file.display().to_string();
    let stack = LoginStack::builder()
        .provider(json!({}))
        .extra(move |_| {
            format!(
                r#"
[[routes]]
path = "/legacy/"
upstream = "http://{address}"
token = "user"
token_binding = "dpop"
[[routes]]
path = "/api/"
upstream = "https://{address}"
ca_file = "{ca_file}"
token = "user"
token_binding = "dpop"
"#
            )
        })
        .config(|c| c.add("oidc.dpop", true))
        .start()
        .await;
    let mut browser = stack.login("alice").await;
    let seen = |marker: &str| {
        let sent = sent(&up, marker);
        assert_eq!(sent.len(), 1, "{marker}");
        segment(sent[0].1.as_deref().expect("a proof"), 1)
    };
    // The plain-HTTP server on port 80 asks for a nonce of its own.
    let r = browser
        .get(
            &format!("{}/legacy/challenge401", stack.base),
            &[
                ("x-csrf", "1"),
                ("x-challenge", r#"DPoP error="use_dpop_nonce""#),
                ("x-dpop-nonce", "port-80-nonce"),
            ],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let asked = sent(&up, "/legacy/challenge401");
    assert_eq!(asked.len(), 2, "once more with the nonce");
    let retried = segment(asked[1].1.as_deref().unwrap(), 1);
    assert_eq!(retried["nonce"], "port-80-nonce");
    assert_eq!(
        retried["htu"],
        format!("http://{}/legacy/challenge401", host.address)
    );
    // The server on 443 gets a proof without it; the one on 80 gets it back.
    let r = browser
        .get(&format!("{}/api/two", stack.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let proof = seen("/api/two");
    assert_eq!(proof["htu"], format!("https://{}/api/two", host.address));
    assert_eq!(
        proof["nonce"],
        Value::Null,
        "the nonce of http://{} went to https://{}",
        host.address,
        host.address
    );
    let r = browser
        .get(&format!("{}/legacy/three", stack.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen("/legacy/three")["nonce"], "port-80-nonce");
}

/// A hostile upstream that asks for a nonce again and again: a POST (with a body or without)
/// is sent once and its 401 passed on, never sent twice with a new proof; a GET is sent once
/// more with the nonce, and no more. Each proof names the URL the upstream was sent to — after
/// `strip_prefix`, below the upstream's base path, without the query — in the retry too, with a
/// `jti` of its own and the `ath` of the token that went with it.
#[tokio::test]
async fn a_nonce_request_never_repeats_a_post_and_every_proof_names_the_url_actually_sent() {
    let stack = LoginStack::builder()
        .provider(json!({}))
        .extra(|u| {
            format!(
                r#"
[[routes]]
path = "/sp/"
upstream = "{u}/v1/"
strip_prefix = true
token = "user"
token_binding = "dpop"
"#
            )
        })
        .config(|c| c.add("oidc.dpop", true))
        .start()
        .await;
    let mut browser = stack.login("alice").await;
    let challenge = r#"DPoP error="use_dpop_nonce""#;
    let headers = [
        ("x-csrf", "1"),
        ("x-challenge", challenge),
        ("x-dpop-nonce", "n-again"),
    ];
    let htu = format!("{}/v1/challenge401", stack.up.url());
    for (i, body) in [Some("a=1".to_string()), None].into_iter().enumerate() {
        let url = format!("{}/sp/challenge401?post{i}", stack.base);
        let r = browser.request("POST", &url, &headers, body).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.header("www-authenticate"), Some(challenge));
        let seen = sent(&stack.up, &format!("?post{i}"));
        assert_eq!(seen.len(), 1, "a POST is never sent twice (body: {i} == 0)");
        let proof = segment(seen[0].1.as_deref().unwrap(), 1);
        assert_eq!(proof["htm"], "POST");
        assert_eq!(proof["htu"], htu);
    }
    let r = browser
        .get(&format!("{}/sp/challenge401?get", stack.base), &headers)
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let seen = sent(&stack.up, "?get");
    assert_eq!(seen.len(), 2, "a GET once more with the nonce, and no more");
    let mut jtis = Vec::new();
    for (auth, proof) in &seen {
        let token = auth.strip_prefix("DPoP ").expect("the DPoP scheme");
        let proof = segment(proof.as_deref().unwrap(), 1);
        assert_eq!(proof["htm"], "GET");
        assert_eq!(proof["htu"], htu);
        assert_eq!(proof["nonce"], "n-again");
        assert_eq!(
            proof["ath"],
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
        );
        jtis.push(proof["jti"].clone());
    }
    assert_ne!(jtis[0], jtis[1]);
}

/// Vestibule with `oidc.dpop` and `oidc.userinfo` on, in front of a fake provider whose token
/// endpoint binds tokens and wants the nonce `token-nonce`; its UserInfo endpoint, on the same
/// origin or (`elsewhere`) on another one (another port), wants `userinfo_nonce`. Returns the
/// case and the server answering UserInfo.
async fn userinfo_nonce_case(
    elsewhere: bool,
    userinfo_nonce: &str,
) -> (fake_provider::Case, Option<fake_idp::FakeIdp>) {
    let signer = vestibule::jose::testing::TestSigner::new();
    let idp =
        fake_idp::start(signer.jwks_json(&[(vestibule::jose::testing::TestKey::Rsa1, "k1")])).await;
    let other = match elsewhere {
        true => Some(fake_idp::start(b"{}".to_vec()).await),
        false => None,
    };
    let userinfo = other.as_ref().map_or(&idp.state, |o| &o.state);
    *userinfo.userinfo.lock().unwrap() = Some((
        200,
        "application/json".into(),
        json!({"sub": "alice", "email": "alice@example.test"}).to_string(),
    ));
    *userinfo.userinfo_nonce.lock().unwrap() = Some(userinfo_nonce.into());
    if let Some(other) = &other {
        idp.state.discovery_extra.lock().unwrap().insert(
            "userinfo_endpoint".into(),
            json!(format!("{}/userinfo", other.issuer)),
        );
    }
    idp.state
        .token_fields
        .lock()
        .unwrap()
        .insert("token_type".into(), json!("DPoP"));
    *idp.state.dpop_nonce.lock().unwrap() = Some("token-nonce".into());
    let up = upstream::start().await;
    let config = config_toml(&routes(&up.url()))
        .set("oidc.issuer", idp.issuer.as_str())
        .add("oidc.dpop", true)
        .add("oidc.userinfo", true);
    let proxy = start_proxy(config).await;
    wait_metadata(&proxy).await;
    std::mem::forget(up);
    (fake_provider::Case { proxy, idp, signer }, other)
}

/// The `nonce` claims of `proofs`, in order (`null` for a proof without one).
fn nonces(proofs: &std::sync::Mutex<Vec<Option<String>>>) -> Vec<Value> {
    proofs
        .lock()
        .unwrap()
        .iter()
        .map(|p| fake_idp::proof_claims(p.as_deref())["nonce"].clone())
        .collect()
}

/// RFC 9449 §8 and §9: a nonce is issued by one server for the proofs sent to it — the
/// authorization server's token endpoint, or a resource server, which the UserInfo endpoint is.
/// A UserInfo endpoint on another origin than the token endpoint keeps a nonce of its own: each
/// server's nonce, once learnt, goes at once in every proof sent to it, and never in the proofs
/// for the other (which would make each token request and each UserInfo call refused with
/// `use_dpop_nonce` and sent twice, the two servers replacing each other's nonce).
#[tokio::test]
async fn a_userinfo_endpoint_on_another_origin_keeps_its_own_nonce_apart_from_the_token_endpoints()
{
    let (c, userinfo) = userinfo_nonce_case(true, "userinfo-nonce").await;
    let userinfo = userinfo.unwrap();
    for login in 0..3 {
        let r = fake_provider::attempt(&c, id_token).await;
        assert_eq!(r.status, 302, "login {login}: {}", r.text());
    }
    assert_eq!(
        nonces(&c.idp.state.token_proofs),
        [
            Value::Null,
            json!("token-nonce"),
            json!("token-nonce"),
            json!("token-nonce")
        ],
        "the nonces of the token requests' proofs"
    );
    assert_eq!(
        nonces(&userinfo.state.userinfo_proofs),
        [
            Value::Null,
            json!("userinfo-nonce"),
            json!("userinfo-nonce"),
            json!("userinfo-nonce")
        ],
        "the nonces of the UserInfo requests' proofs"
    );
    assert!(c.idp.state.userinfo_proofs.lock().unwrap().is_empty());
}

/// One origin is one server (RFC 9449 §8: the server that issued a nonce checks it; an origin is
/// what `DPoP-Nonce` belongs to, as for upstreams): a UserInfo endpoint on the token endpoint's
/// origin shares its nonce, so the nonce learnt at the token endpoint goes in the first
/// UserInfo proof already (no `use_dpop_nonce` round there).
#[tokio::test]
async fn a_userinfo_endpoint_on_the_token_endpoints_origin_shares_its_nonce() {
    let (c, _) = userinfo_nonce_case(false, "token-nonce").await;
    for login in 0..2 {
        let r = fake_provider::attempt(&c, id_token).await;
        assert_eq!(r.status, 302, "login {login}: {}", r.text());
    }
    let n = json!("token-nonce");
    assert_eq!(
        nonces(&c.idp.state.token_proofs),
        [Value::Null, n.clone(), n.clone()]
    );
    assert_eq!(nonces(&c.idp.state.userinfo_proofs), [n.clone(), n]);
}

/// A UserInfo `401` that carries a `DPoP-Nonce` but asks for no nonce (its challenge says
/// `invalid_token`) is not sent again: only a `DPoP` challenge with `use_dpop_nonce` asks for
/// one (RFC 9449 §9), as for upstreams.
#[tokio::test]
async fn a_userinfo_refusal_that_asks_for_no_nonce_is_not_sent_again() {
    let (c, _) = userinfo_nonce_case(false, "token-nonce").await;
    *c.idp.state.userinfo_nonce.lock().unwrap() = None;
    *c.idp.state.userinfo.lock().unwrap() = Some((401, "application/json".into(), "{}".into()));
    *c.idp.state.userinfo_headers.lock().unwrap() = vec![
        (
            "www-authenticate".into(),
            r#"DPoP error="invalid_token", error_description="use_dpop_nonce""#.into(),
        ),
        ("dpop-nonce".into(), "another-nonce".into()),
    ];
    let r = fake_provider::attempt(&c, id_token).await;
    assert_ne!(r.status, 302, "signed in without its claims: {}", r.text());
    assert_eq!(
        c.idp.state.userinfo_proofs.lock().unwrap().len(),
        1,
        "a UserInfo refusal that asked for no nonce was sent again"
    );
}

/// The stored DPoP key that every replica shares opens with the session keys but holds no key
/// (here a truncated PKCS#8: a partial write, a hand-edited store). It is replaced as a missing
/// key is, by compare-and-set: the first replica to need a key signs in and proves possession
/// with a new one, the provider binds the token to it, and a replica started afterwards signs
/// with that same new key (it was stored, and is not replaced again).
#[tokio::test]
async fn a_stored_dpop_key_that_opens_but_is_no_key_is_replaced_once_for_every_replica() {
    use vestibule::session::{Keyring, Store, StoreConfig};
    use vestibule::state::DPOP_KEY_NAME;
    let redis = RedisServer::start();
    let store = Store::connect(
        &StoreConfig::Redis(vestibule::config::RedisConfig {
            url: vestibule::config::Secret::new(redis.url()),
            sentinel: None,
            cluster: vec![],
            key_prefix: "vestibule:".into(),
            timeout: std::time::Duration::from_secs(2),
            ca_file: None,
        }),
        0,
    )
    .await
    .unwrap();
    let session_key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap()
        .try_into()
        .unwrap();
    let ring = Keyring::new(vec![session_key]).unwrap();
    let whole = vestibule::oidc::dpop::DpopKey::generate()
        .unwrap()
        .to_pkcs8()
        .unwrap();
    let sealed = ring.seal(DPOP_KEY_NAME, &whole[..whole.len() / 2]).unwrap();
    let hour = std::time::Duration::from_secs(3600);
    assert!(
        store
            .put_new(DPOP_KEY_NAME, sealed.as_bytes(), hour)
            .await
            .unwrap()
    );
    let stack = dpop_stack_on(&redis, 1).await;
    let mut browser = stack.login("alice").await;
    let r = browser
        .get(&stack.proxy().url("/api/first"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (auth, proof) = sent(&stack.up, "/api/first").remove(0);
    let jkt = proof_jkt(&proof.unwrap());
    let token = auth.strip_prefix("DPoP ").unwrap();
    assert_eq!(segment(token, 1)["cnf"]["jkt"].as_str(), Some(jkt.as_str()));
    // The store holds that key now, sealed.
    let record = store.get(DPOP_KEY_NAME).await.unwrap().unwrap();
    let opened = ring
        .open(DPOP_KEY_NAME, std::str::from_utf8(&record.value).unwrap())
        .unwrap();
    let stored = vestibule::oidc::dpop::DpopKey::from_der(&opened.plaintext).unwrap();
    assert_eq!(stored.thumbprint(), jkt);

    let later = start_proxy(&stack.config.clone().set("server.listen", "127.0.0.1:0")).await;
    wait_ready(&later).await;
    let r = browser
        .get(&later.url("/api/second"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, proof) = sent(&stack.up, "/api/second").remove(0);
    assert_eq!(
        proof_jkt(&proof.unwrap()),
        jkt,
        "the replica started later signs with another key"
    );
    let again = store.get(DPOP_KEY_NAME).await.unwrap().unwrap();
    assert_eq!(again.version, record.version, "the new key was replaced");
}

/// docs/configuration.md, "Which token type is accepted": with `dpop = true` a refresh answered
/// `token_type: Bearer` for a session whose tokens are DPoP-bound (a downgrade: the provider did
/// not bind the new token, which a thief could then use alone) is refused as the provider's
/// fault — 503 `provider_unavailable`, the session kept — and that token reaches no upstream:
/// not as `DPoP` on the bound route, not as `Bearer` on the plain one. The refresh token the
/// refused answer rotated is kept (the provider has spent the one presented). Once the provider
/// binds again, the bound route gets the new token with a proof for it.
#[tokio::test]
async fn a_refresh_downgraded_to_a_bearer_token_is_refused_and_that_token_reaches_no_upstream() {
    let signer = vestibule::jose::testing::TestSigner::new();
    let idp =
        fake_idp::start(signer.jwks_json(&[(vestibule::jose::testing::TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let clock = vestibule::clock::TestClock::new();
    let config = config_toml(&routes(&up.url()))
        .set("oidc.issuer", idp.issuer.as_str())
        .add("oidc.dpop", true);
    let proxy = start_proxy_with_clock(config, clock.clock()).await;
    wait_metadata(&proxy).await;
    idp.state
        .token_fields
        .lock()
        .unwrap()
        .insert("token_type".into(), json!("DPoP"));
    let c = fake_provider::Case { proxy, idp, signer };
    let r = fake_provider::attempt(&c, id_token).await;
    assert_eq!(r.status, 302, "{}", r.text());
    let cookie = r.session_cookie();
    let call = async |path: &str| {
        get(
            &c.proxy.url(path),
            &[("cookie", cookie.as_str()), ("x-csrf", "1")],
        )
        .await
    };
    let r = call("/api/before").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sent(&up, "/api/before")[0].0, "DPoP fake-access");

    clock.advance(std::time::Duration::from_secs(300));
    for (path, rotated) in [("/api/after", "refresh-2a"), ("/plain/after", "refresh-2b")] {
        c.idp.state.script(
            "refresh_token",
            200,
            json!({"access_token": "downgraded", "token_type": "Bearer", "expires_in": 300,
                   "refresh_token": rotated}),
        );
        let r = call(path).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "provider_unavailable", "{path}");
    }
    let leaked: Vec<String> = up
        .authorizations("/")
        .into_iter()
        .filter(|a| a.contains("downgraded"))
        .collect();
    assert!(
        leaked.is_empty(),
        "the downgraded token was sent: {leaked:?}"
    );
    assert!(c.proxy.signed_in(&cookie).await, "the session ended");

    c.idp.state.script(
        "refresh_token",
        200,
        json!({"access_token": "bound-2", "token_type": "DPoP", "expires_in": 300,
               "refresh_token": "refresh-3"}),
    );
    let r = call("/api/again").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (auth, proof) = sent(&up, "/api/again").remove(0);
    assert_eq!(auth, "DPoP bound-2");
    // The provider spent each refresh token presented, the refused answers' too: the one each
    // rotated is presented next, none twice (a rotating provider takes a replay for theft).
    let presented: Vec<String> = c
        .idp
        .state
        .token_requests_of("refresh_token")
        .iter()
        .map(|form| {
            form.iter()
                .find(|(k, _)| k == "refresh_token")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(presented, ["fake-refresh", "refresh-2a", "refresh-2b"]);
    assert_eq!(
        segment(&proof.unwrap(), 1)["ath"],
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(b"bound-2"))
    );
}
