//! `client_auth = "private_key_jwt"` (RFC 7523, OpenID Connect Core §9): against the real
//! provider (a client registered with a `jwks_uri` pointing at our admin `/jwks`, or with its keys
//! inline), key rotation by reload, a key the provider does not know, and — with the fake
//! provider — what every assertion carries: a unique `jti`, our client id, the token endpoint, a
//! short life and a signature the published keys verify. And `client_assertion_file`: an
//! assertion the platform keeps fresh, read again when it changes, never by a serving worker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::{claims, now};
use crate::support::browser::Browser;
use crate::support::leased::Leased;
use crate::support::stack::LoginStack;
use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vestibule::clock::TestClock;
use vestibule::jose::testing::{TestKey, TestSigner};

const EC: &str = include_str!("../fixtures/ec-p256.pem");
const RSA_1: &str = include_str!("../fixtures/rsa-1.pem");
const RSA_2: &str = include_str!("../fixtures/rsa-2.pem");
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The public JWK (with `kid`) Vestibule makes of a PEM key.
fn jwk(pem: &str) -> Value {
    vestibule::oidc::client_auth::ClientKey::from_pem(pem.as_bytes())
        .unwrap()
        .jwk
}

fn part(jwt: &str, i: usize) -> Value {
    let part = jwt.split('.').nth(i).expect("not a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// A key file in its own directory (the test rewrites it to rotate the key).
fn key_file(dir: &Path, pem: &str) -> PathBuf {
    let path = dir.join("client-key.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

async fn jwks_of(admin: std::net::SocketAddr) -> Value {
    let r = get(&format!("http://{admin}/jwks"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

const TTL: u64 = 20;
const SKEW: u64 = 5;

struct Stack {
    stack: LoginStack,
    clock: TestClock,
    keys: tempfile::TempDir,
}

/// The real provider with the `vestibule` client registered for `private_key_jwt` (`client`
/// members added: `jwks_uri` or `jwks`), and a proxy signing with `pem`.
async fn stack(client: impl FnOnce(u16) -> Value, pem: &str) -> Stack {
    let admin_port = free_port();
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), pem);
    let clock = TestClock::new();
    let extra = client(admin_port);
    let stack = LoginStack::builder()
        .provider(json!({ "access_token_ttl": TTL, "client": extra }))
        .extra(|u| format!("[[routes]]\npath = \"/api/\"\nupstream = \"{u}\"\ntoken = \"user\"\n"))
        .config(move |c| {
            c.remove("oidc.client_secret")
                .add("oidc.client_auth", "private_key_jwt")
                .add("oidc.client_key_file", key.to_str().unwrap())
                .set("oidc.refresh_skew", format!("{SKEW}s"))
                .set("admin.listen", format!("127.0.0.1:{admin_port}"))
        })
        .clock(clock.clock())
        .start()
        .await;
    Stack { stack, clock, keys }
}

impl Stack {
    fn until_due(&self) {
        self.clock
            .advance(Duration::from_millis((TTL - SKEW) * 1000 + 300));
    }

    async fn api(&self, browser: &mut Browser, path: &str) -> Reply {
        browser
            .get(&self.stack.proxy().url(path), &[("x-csrf", "1")])
            .await
    }

    /// Writes `pem` over the key file and reloads.
    fn rotate_to(&self, pem: &str) {
        key_file(self.keys.path(), pem);
        self.stack.proxy().app.reload("test");
    }
}

#[tokio::test]
async fn login_and_refresh_work_with_a_key_the_provider_fetches_from_our_jwks() {
    let s = stack(
        |admin| json!({ "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": format!("http://127.0.0.1:{admin}/jwks") }),
        EC,
    )
    .await;
    let published = jwks_of(s.stack.proxy().admin).await;
    assert_eq!(published, json!({ "keys": [jwk(EC)] }));
    assert_eq!(published["keys"][0]["alg"], "ES256");
    let mut browser = s.stack.login("alice").await;
    let r = s.api(&mut browser, "/api/first").await;
    assert_eq!(r.status, 200, "{}", r.text());
    s.until_due();
    let r = s.api(&mut browser, "/api/refreshed").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let stats = s.stack.provider.stats().await;
    assert_eq!(stats["authorization_code"], 1, "{stats}");
    assert_eq!(stats["refresh_token"], 1, "{stats}");
    assert_eq!(stats["token_errors"]["refresh_token"], 0, "{stats}");
}

#[tokio::test]
async fn a_rotated_key_file_is_used_after_reload_and_an_unknown_key_is_503_not_logout() {
    // Registered inline: the RSA key and the EC key, not the second RSA key.
    let s = stack(
        |_| json!({ "token_endpoint_auth_method": "private_key_jwt", "jwks": { "keys": [jwk(RSA_1), jwk(EC)] } }),
        RSA_1,
    )
    .await;
    let mut browser = s.stack.login("alice").await;
    assert_eq!(
        kids(&jwks_of(s.stack.proxy().admin).await),
        [jwk(RSA_1)["kid"].as_str().unwrap()]
    );
    // Rotation: the EC key replaces the RSA key in the same file; a reload puts it in effect.
    s.rotate_to(EC);
    assert_eq!(
        kids(&jwks_of(s.stack.proxy().admin).await),
        [jwk(EC)["kid"].as_str().unwrap()]
    );
    s.until_due();
    let r = s.api(&mut browser, "/api/after-rotation").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.stack.provider.stats().await["refresh_token"], 1);
    // A key the provider does not know: invalid_client, which is the provider's refusal of
    // Vestibule itself — 503, and the session is kept.
    s.rotate_to(RSA_2);
    s.until_due();
    let r = s.api(&mut browser, "/api/unknown-key").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "provider_unavailable");
    let user = browser
        .get(&s.stack.proxy().url("/bff/user"), &[("x-csrf", "1")])
        .await;
    assert_eq!(
        user.status,
        200,
        "the session must be kept: {}",
        user.text()
    );
    // The registered key again: the same session refreshes.
    s.rotate_to(EC);
    let r = s.api(&mut browser, "/api/fixed").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_bad_key_file_on_reload_keeps_the_running_key() {
    let s = stack(
        |_| json!({ "token_endpoint_auth_method": "private_key_jwt", "jwks": { "keys": [jwk(EC)] } }),
        EC,
    )
    .await;
    let mut browser = s.stack.login("alice").await;
    s.rotate_to("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n");
    assert_eq!(
        kids(&jwks_of(s.stack.proxy().admin).await),
        [jwk(EC)["kid"].as_str().unwrap()]
    );
    s.until_due();
    let r = s.api(&mut browser, "/api/still").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A proxy in front of the fake provider, authenticating with `private_key_jwt` and the
/// settings `edit` makes.
async fn fake_case(
    edit: impl FnOnce(TomlConfig) -> TomlConfig,
) -> (Proxy, fake_idp::FakeIdp, TestSigner) {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    // Two routes with client tokens for two resources: two client-credentials grants.
    let routes = "[[routes]]\npath = \"/svc/\"\nupstream = \"http://127.0.0.1:9\"\ntoken = \"client\"\n\
                  resource = \"https://one.example\"\n\
                  [[routes]]\npath = \"/svc2/\"\nupstream = \"http://127.0.0.1:9\"\ntoken = \"client\"\n\
                  resource = \"https://two.example\"\n";
    let config = edit(
        config_toml(routes)
            .set("oidc.issuer", idp.issuer.as_str())
            .remove("oidc.client_secret")
            .add("oidc.client_auth", "private_key_jwt"),
    );
    let proxy = start_proxy(config).await;
    eventually("metadata loaded", Duration::from_secs(10), || async {
        proxy.app.oidc.provider.is_ready().then_some(())
    })
    .await;
    (proxy, idp, signer)
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A key file rotated on disk (a Secret volume updated, `cert-manager` renewing) is picked up
/// by the watcher like the client secret and session key files, without SIGHUP: the next
/// assertion is signed with the new key, and `/jwks` publishes it.
#[tokio::test]
async fn a_key_file_rotated_on_disk_is_applied_without_a_reload() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), RSA_1);
    let (proxy, _idp, _signer) =
        fake_case(|c| c.add("oidc.client_key_file", key.to_str().unwrap())).await;
    assert_eq!(
        kids(&jwks_of(proxy.admin).await),
        [jwk(RSA_1)["kid"].as_str().unwrap()]
    );
    key_file(keys.path(), EC);
    let rotated = jwk(EC)["kid"].as_str().unwrap().to_string();
    eventually(
        "the rotated key file is applied by the watcher",
        Duration::from_secs(8),
        || async { (kids(&jwks_of(proxy.admin).await) == [rotated.clone()]).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn every_assertion_is_fresh_signed_by_a_published_key_and_names_the_token_endpoint() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), RSA_1);
    let next = keys.path().join("next.pem");
    std::fs::write(&next, EC).unwrap();
    let (proxy, idp, signer) = fake_case(|c| {
        c.add("oidc.client_key_file", key.to_str().unwrap()).add(
            "oidc.client_published_key_files",
            vec![next.to_str().unwrap().to_string()],
        )
    })
    .await;
    // Both keys are published, the signing one first.
    let published = jwks_of(proxy.admin).await;
    assert_eq!(published["keys"], json!([jwk(RSA_1), jwk(EC)]));
    // A login (code grant) and two client-credentials grants.
    let (q, cookie) = begin_login(&proxy).await;
    *idp.state.id_token.lock().unwrap() = signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .sign(&claims(&idp.issuer, &q["nonce"]));
    let r = get(
        &proxy.url(&format!("/bff/callback?code=abc&state={}", q["state"])),
        &[("cookie", &cookie), ("accept", "text/html")],
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let r = get(&proxy.url("/svc/x"), &[("x-csrf", "1")]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let r = get(&proxy.url("/svc2/x"), &[("x-csrf", "1")]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let requests = idp.state.token_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let mut jtis = std::collections::HashSet::new();
    let token_endpoint = format!("{}/token", idp.issuer);
    for form in &requests {
        assert_eq!(field(form, "client_assertion_type"), Some(JWT_BEARER));
        assert_eq!(field(form, "client_id"), Some("vestibule"));
        assert_eq!(field(form, "client_secret"), None);
        let assertion = field(form, "client_assertion").unwrap();
        let header = part(assertion, 0);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], jwk(RSA_1)["kid"]);
        // The signature verifies with the key we publish.
        let published: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(published["keys"][0].clone()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&[&token_endpoint]);
        validation.set_issuer(&["vestibule"]);
        let claims = jsonwebtoken::decode::<Value>(
            assertion,
            &jsonwebtoken::DecodingKey::from_jwk(&published).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["sub"], "vestibule");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert!(iat.abs_diff(now()) <= 5, "iat {iat}");
        assert!(exp > iat && exp - iat <= 60, "lives {}s", exp - iat);
        // No assertion is ever sent twice: a captured one cannot be replayed as a new one.
        assert!(
            jtis.insert(claims["jti"].as_str().unwrap().to_string()),
            "jti repeated"
        );
        assert!(claims["jti"].as_str().unwrap().len() >= 22);
    }
}

#[tokio::test]
async fn an_assertion_file_is_sent_as_is_and_read_again_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let signer = TestSigner::new();
    let first = signer
        .token(TestKey::EcP256)
        .sign(&json!({"iss": "vestibule", "sub": "system:serviceaccount:app:bff", "n": 1}));
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let (proxy, idp, _) =
        fake_case(|c| c.add("oidc.client_assertion_file", file.to_str().unwrap())).await;
    // Nothing of ours to publish: the platform holds the key.
    assert_eq!(jwks_of(proxy.admin).await, json!({"keys": []}));
    let r = get(&proxy.url("/svc/one"), &[("x-csrf", "1")]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    // The platform writes a fresh token (a projected service-account token is rotated so).
    let second = signer
        .token(TestKey::EcP256)
        .sign(&json!({"iss": "vestibule", "sub": "system:serviceaccount:app:bff", "n": 2}));
    std::fs::write(&file, &second).unwrap();
    // Read by the watcher within about a second (the workers never read the file).
    let credential = proxy.app.oidc.credential();
    eventually(
        "the rewritten file is read",
        Duration::from_secs(10),
        || async {
            let parts = credential.request_parts("vestibule", "aud", now()).unwrap();
            (parts.fields.iter())
                .any(|(_, v)| *v == second)
                .then_some(())
        },
    )
    .await;
    let r = get(&proxy.url("/svc2/two"), &[("x-csrf", "1")]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let requests = idp.state.token_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        field(&requests[0], "client_assertion"),
        Some(first.as_str())
    );
    assert_eq!(
        field(&requests[1], "client_assertion"),
        Some(second.as_str())
    );
    for form in &requests {
        assert_eq!(field(form, "client_assertion_type"), Some(JWT_BEARER));
        assert_eq!(field(form, "client_secret"), None);
    }
}

pub(crate) fn check(config: &TomlConfig, online: bool) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config.text()).unwrap();
    let mut args = vec!["check", "--config", path.to_str().unwrap()];
    if online {
        args.push("--online");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .args(&args)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_accepts_private_key_jwt_with_a_key_and_names_a_bad_key_file() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), EC);
    let config = config_toml("")
        .remove("oidc.client_secret")
        .add("oidc.client_auth", "private_key_jwt")
        .add("oidc.client_key_file", key.to_str().unwrap());
    let (code, out) = check(&config, false);
    assert_eq!(code, Some(0), "{out}");
    let ed = keys.path().join("ed.pem");
    std::fs::write(&ed, include_str!("../fixtures/ed25519.pem")).unwrap();
    let (code, out) = check(
        &config
            .clone()
            .set("oidc.client_key_file", ed.to_str().unwrap()),
        false,
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("oidc.client_key_file: ")
            && out.contains("is not an EC P-256 or RSA private key"),
        "{out}"
    );
    assert!(!out.contains("BEGIN"), "{out}");
}

/// [`check`] on a blocking thread, so that the runtime goes on serving an in-process provider.
pub(crate) async fn check_in_background(
    config: &TomlConfig,
    online: bool,
) -> (Option<i32>, String) {
    let config = config.clone();
    tokio::task::spawn_blocking(move || check(&config, online))
        .await
        .unwrap()
}

#[tokio::test]
async fn check_online_compares_the_method_with_the_providers_metadata() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), EC);
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let config = config_toml("")
        .set("oidc.issuer", idp.issuer.as_str())
        .remove("oidc.client_secret")
        .add("oidc.client_auth", "private_key_jwt")
        .add("oidc.client_key_file", key.to_str().unwrap());
    // The fake provider's discovery document names no methods: client_secret_basic only.
    let (code, out) = check_in_background(&config, true).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("oidc.client_auth: the provider does not support \"private_key_jwt\""),
        "{out}"
    );
    idp.state.discovery_extra.lock().unwrap().extend([
        (
            "token_endpoint_auth_methods_supported".to_string(),
            json!(["client_secret_basic", "private_key_jwt"]),
        ),
        (
            "token_endpoint_auth_signing_alg_values_supported".to_string(),
            json!(["RS256"]),
        ),
    ]);
    let (code, out) = check_in_background(&config, true).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("oidc.client_key_file: the provider does not accept ES256 client assertions"),
        "{out}"
    );
    idp.state.discovery_extra.lock().unwrap().insert(
        "token_endpoint_auth_signing_alg_values_supported".to_string(),
        json!(["RS256", "ES256"]),
    );
    let (code, out) = check_in_background(&config, true).await;
    assert_eq!(code, Some(0), "{out}");
}

/// A client assertion `n` the fake provider will see.
fn assertion(signer: &TestSigner, n: u64) -> String {
    signer
        .token(TestKey::EcP256)
        .sign(&json!({"iss": "vestibule", "sub": "system:serviceaccount:app:bff", "n": n}))
}

/// `client_assertion_file` is never read on a serving worker: with one worker, the file
/// replaced by one whose every open blocks (as on a hung mount) while a grant needs the
/// assertion, the grant is made with the last assertion read, plain requests on that worker
/// are answered and `/healthz` stays 200 for longer than it takes to name a silent worker; a
/// FIFO in its place (nobody writes it) is the same; and once the file is readable again — a
/// new file put in place while the read of the old one is still stuck — the next grant sends
/// the new assertion.
#[tokio::test]
async fn an_assertion_file_that_blocks_on_open_never_holds_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let signer = TestSigner::new();
    let first = assertion(&signer, 1);
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let up = upstream::start().await;
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    // A route to a real upstream for plain requests, and four client-token routes: a grant
    // each (for its own resource), whose upstream is closed (502 once the token is there).
    let mut routes = format!(
        "[[routes]]\npath = \"/plain/\"\nupstream = \"{}\"\n",
        up.url()
    );
    for n in 1..=4 {
        routes += &format!(
            "[[routes]]\npath = \"/svc{n}/\"\nupstream = \"http://127.0.0.1:9\"\n\
             token = \"client\"\nresource = \"https://{n}.example\"\n"
        );
    }
    let proxy = start_proxy(
        config_toml(&routes)
            .set("oidc.issuer", idp.issuer.as_str())
            .remove("oidc.client_secret")
            .add("oidc.client_auth", "private_key_jwt")
            .add("oidc.client_assertion_file", file.to_str().unwrap())
            .add("server.workers", 1),
    )
    .await;
    wait_metadata(&proxy).await;
    let grant = |n: u32| {
        let url = proxy.url(&format!("/svc{n}/x"));
        async move {
            tokio::time::timeout(Duration::from_secs(5), get(&url, &[("x-csrf", "1")]))
                .await
                .unwrap_or_else(|_| panic!("grant {n}: no answer within 5s"))
        }
    };
    let sent = |i: usize| {
        let requests = idp.state.token_requests.lock().unwrap().clone();
        assert_eq!(requests.len(), i + 1, "{requests:?}");
        field(&requests[i], "client_assertion").unwrap().to_string()
    };
    let r = grant(1).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(sent(0), first);

    // A new assertion in a file every open of which blocks, put in place.
    let next = dir.path().join("next");
    std::fs::write(&next, assertion(&signer, 2)).unwrap();
    let lease = Leased::hold(&next);
    std::fs::rename(&next, &file).unwrap();
    let granting = tokio::spawn(grant(2));
    // Longer than `/healthz` takes to name a silent worker (5 s).
    let healthz = format!("http://{}/healthz", proxy.admin);
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    while tokio::time::Instant::now() < until {
        let plain = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/plain/x"), &[]))
            .await
            .expect("a plain request on the worker is answered while the file blocks");
        assert_eq!(plain.status, 200, "{}", plain.text());
        let health = tokio::time::timeout(Duration::from_secs(5), get(&healthz, &[]))
            .await
            .expect("the admin listener answers");
        assert_eq!(
            health.status,
            200,
            "healthz while the assertion file blocks: {}",
            health.text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = granting.await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(sent(1), first, "the grant used the last assertion read");

    // A FIFO that nobody writes in its place: refused unread, the last assertion kept.
    std::fs::remove_file(&file).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&file)
        .status()
        .unwrap();
    assert!(made.success());
    let r = grant(3).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(sent(2), first, "the grant used the last assertion read");

    // The platform writes a fresh token while the read of the leased one is still stuck: the
    // next grant sends it.
    let third = assertion(&signer, 3);
    std::fs::write(&next, &third).unwrap();
    std::fs::rename(&next, &file).unwrap();
    let credential = proxy.app.oidc.credential();
    eventually(
        "the rewritten assertion file is read",
        Duration::from_secs(15),
        || async {
            let parts = credential.request_parts("vestibule", "aud", now()).unwrap();
            (parts.fields.iter())
                .any(|(_, v)| *v == third)
                .then_some(())
        },
    )
    .await;
    let r = grant(4).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(sent(3), third);
    drop(lease);
}
