//! Mutual-TLS client authentication and certificate-bound access tokens (RFC 8705, issue 18
//! §2): against the real `oidc-provider` with its mTLS features on (its token endpoint alias
//! served over https, client certificates checked against a CA made at test time), and hostile
//! cases with the fake provider (a token bound to another certificate).

use crate::fake_provider::claims;
use crate::support::browser::Browser;
use crate::support::pki::{Issued, TestCa, bound_api, thumbprint, token_thumbprint};
use crate::support::{
    begin_login, callback, fake_idp, free_port, get, login_toml, provider, start_proxy,
    start_proxy_for, wait_ready,
};
use serde_json::json;
use vestibule::jose::testing::{TestKey, TestSigner};

/// A token route to `api` that presents `cert` and trusts `ca`.
fn route(path: &str, api: std::net::SocketAddr, ca: &TestCa, cert: &Issued) -> String {
    format!(
        "[[routes]]\npath = \"{path}\"\nupstream = \"https://{api}\"\ntoken = \"user\"\nca_file = {:?}\ntls_client_cert = {:?}\ntls_client_key = {:?}\n",
        ca.ca_file.display().to_string(),
        cert.cert_file.display().to_string(),
        cert.key_file.display().to_string(),
    )
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_gets_certificate_bound_tokens_that_a_binding_api_accepts() {
    let ca = TestCa::new("mTLS CA");
    let provider_cert = ca.server();
    let client = ca.client("vestibule");
    let intruder = ca.client("intruder");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let provider = provider::start(
        port,
        json!({
            "mtls": {
                "cert": path(&provider_cert.cert_file),
                "key": path(&provider_cert.key_file),
                "ca": path(&ca.ca_file),
            },
            "clients": [{
                "client_id": "vestibule",
                "token_endpoint_auth_method": "tls_client_auth",
                "tls_client_auth_subject_dn": "CN=vestibule",
                "tls_client_certificate_bound_access_tokens": true,
                "redirect_uris": [format!("{base}/bff/callback")],
                "post_logout_redirect_uris": [format!("{base}/")],
            }],
        }),
    );
    let (api, verdicts) = bound_api(ca.acceptor(Some(&ca))).await;
    let routes = [
        route("/api/", api, &ca, &client),
        route("/stolen/", api, &ca, &intruder),
    ]
    .concat();
    let config = |cert: &Issued| {
        login_toml(port, &provider.issuer, &routes)
            .remove("oidc.client_secret")
            .add("oidc.client_auth", "tls_client_auth")
            .add("oidc.tls_client_cert", path(&cert.cert_file))
            .add("oidc.tls_client_key", path(&cert.key_file))
            // The provider's mutual-TLS listener has a certificate of the private CA.
            .add("tls.ca_file", path(&ca.ca_file))
    };

    // Hostile first: a certificate whose subject is not the registered one authenticates
    // nobody; the login fails at the token request and no token is issued. (Without PAR, so
    // that the login reaches the token request; with PAR it fails earlier, at the push.)
    let proxy = start_proxy(&config(&intruder).add("oidc.par", "never")).await;
    wait_ready(&proxy).await;
    let mut browser = Browser::default();
    let refused = browser.login(&base, "alice", "alice", "/").await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.text().contains("code_rejected"),
        "{}",
        refused.text()
    );
    assert!(provider.tokens("alice").await.is_null());
    proxy.shutdown.cancel();
    let _ = proxy.task.await;

    let proxy = start_proxy(&config(&client)).await;
    wait_ready(&proxy).await;
    let mut browser = Browser::default();
    // The provider offers PAR, so the authorization request is pushed to its mutual-TLS alias.
    let done = browser.login(&base, "alice", "alice", "/").await;
    assert_eq!(done.status, 302, "{}", done.text());
    assert_eq!(done.header("location"), Some("/"));
    // The provider bound the access token to Vestibule's certificate.
    let tokens = provider.tokens("alice").await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(token_thumbprint(access), Some(thumbprint(&client.cert)));

    let reply = browser
        .get(&format!("{base}/api/items"), &[("x-csrf", "1")])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["bound"], true);
    assert_eq!(
        verdicts.lock().unwrap().last(),
        Some(&Ok(thumbprint(&client.cert)))
    );

    // The same token sent with another certificate (as a thief would) is refused.
    let reply = browser
        .get(&format!("{base}/stolen/items"), &[("x-csrf", "1")])
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(
        verdicts.lock().unwrap().last(),
        Some(&Err(
            "x5t#S256 does not match the client certificate".to_string()
        ))
    );
    drop(proxy);
}

/// A session at the fake provider whose access token is `access_token`.
async fn fake_session(
    proxy: &crate::support::Proxy,
    idp: &fake_idp::FakeIdp,
    signer: &TestSigner,
    access_token: &str,
) -> String {
    idp.state
        .token_fields
        .lock()
        .unwrap()
        .insert("access_token".into(), json!(access_token));
    let (q, login_cookie) = begin_login(proxy).await;
    *idp.state.id_token.lock().unwrap() = signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .sign(&claims(&idp.issuer, &q["nonce"]));
    let done = callback(proxy, &q, &login_cookie).await;
    assert_eq!(done.status, 302, "{}", done.text());
    done.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("vestibule="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A JWT-shaped access token whose `cnf.x5t#S256` is `bound_to` (the API in this test checks the
/// binding only).
fn bound_token(bound_to: &str) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256", "typ": "at+jwt"})),
        b64(json!({"sub": "alice", "cnf": {"x5t#S256": bound_to}}))
    )
}

#[tokio::test]
async fn a_token_bound_to_another_certificate_is_refused_by_the_api() {
    let ca = TestCa::new("mTLS CA");
    let client = ca.client("vestibule");
    let other = ca.client("other");
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let (api, verdicts) = bound_api(ca.acceptor(Some(&ca))).await;
    let proxy = start_proxy_for(&idp.issuer, &route("/api/", api, &ca, &client)).await;

    // The provider bound the token to a certificate Vestibule does not hold: refused.
    let session = fake_session(
        &proxy,
        &idp,
        &signer,
        &bound_token(&thumbprint(&other.cert)),
    )
    .await;
    let reply = get(
        &proxy.url("/api/x"),
        &[("cookie", &session), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    let seen = verdicts.lock().unwrap().clone();
    assert!(
        !seen.is_empty() && seen.iter().all(|v| v.is_err()),
        "{seen:?}"
    );
    assert_eq!(
        seen[0],
        Err("x5t#S256 does not match the client certificate".to_string())
    );

    // Bound to the route's certificate: accepted.
    let session = fake_session(
        &proxy,
        &idp,
        &signer,
        &bound_token(&thumbprint(&client.cert)),
    )
    .await;
    let reply = get(
        &proxy.url("/api/x"),
        &[("cookie", &session), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        verdicts.lock().unwrap().last(),
        Some(&Ok(thumbprint(&client.cert)))
    );
}

#[test]
fn check_asks_for_the_certificate_of_mtls_client_auth() {
    let text = crate::support::config_toml("")
        .remove("oidc.client_secret")
        .add("oidc.client_auth", "self_signed_tls_client_auth")
        .text();
    let errors = vestibule::config::Config::parse(&text, std::path::Path::new("."), &|_| None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        errors,
        "oidc.tls_client_cert: is required for client_auth = \"tls_client_auth\" or \"self_signed_tls_client_auth\": the PEM file of the client certificate (and tls_client_key its key)"
    );
    // With the certificate, no client secret is needed.
    let ca = TestCa::new("Check CA");
    let client = ca.client("vestibule");
    let text = crate::support::config_toml("")
        .remove("oidc.client_secret")
        .add("oidc.client_auth", "tls_client_auth")
        .add("oidc.tls_client_cert", path(&client.cert_file))
        .add("oidc.tls_client_key", path(&client.key_file))
        .text();
    let config =
        vestibule::config::Config::parse(&text, std::path::Path::new("."), &|_| None).unwrap();
    assert!(config.oidc.client_secret.is_none());
    assert!(config.oidc.tls_client.is_some());
    // The private key never shows in the configuration's Debug form.
    let key_pem = std::fs::read_to_string(&client.key_file).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    let shown = format!("{config:?}");
    assert!(shown.contains("ClientIdentity") && !shown.contains(key_line));
}
