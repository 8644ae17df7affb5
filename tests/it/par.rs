//! Pushed authorization requests (RFC 9126): with the real `oidc-provider` (PAR on) the browser
//! carries only `client_id` and `request_uri`, and the login completes; `par = "never"` keeps
//! the parameters in the URL; `par = "always"` with a provider that has no PAR endpoint is
//! refused at login and by `vestibule check --online`.

use crate::fake_provider;
use crate::support::stack::LoginStack;
use crate::support::*;
use serde_json::json;
use std::collections::HashMap;

/// The query of the provider URL `/bff/login` redirects to.
async fn login_redirect(base: &str) -> HashMap<String, String> {
    let start = get(&format!("{base}/bff/login?returnUrl=/"), &[]).await;
    assert_eq!(start.status, 302, "{}", start.text());
    let location = url::Url::parse(start.header("location").unwrap()).unwrap();
    location.query_pairs().into_owned().collect()
}

const PUSHED_ONLY: [&str; 7] = [
    "scope",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
    "state",
    "nonce",
    "response_type",
];

#[tokio::test]
async fn with_a_provider_that_offers_par_the_browser_carries_only_a_request_uri() {
    let stack = LoginStack::builder().start().await;
    let query = login_redirect(&stack.base).await;
    assert!(
        query["request_uri"].starts_with("urn:ietf:params:oauth:request_uri:"),
        "{query:?}"
    );
    assert_eq!(query["client_id"], "vestibule");
    for name in PUSHED_ONLY {
        assert!(!query.contains_key(name), "{name} in {query:?}");
    }
    // The whole login goes through with the pushed request.
    let mut browser = stack.login("alice").await;
    browser.user(&stack.base).await;
}

#[tokio::test]
async fn par_never_keeps_the_parameters_in_the_browser_url() {
    let stack = LoginStack::builder()
        .config(|c| c.add("oidc.par", "never"))
        .start()
        .await;
    let query = login_redirect(&stack.base).await;
    assert!(!query.contains_key("request_uri"), "{query:?}");
    for name in PUSHED_ONLY {
        assert!(query.contains_key(name), "{name} missing from {query:?}");
    }
    stack.login("bob").await;
}

#[tokio::test]
async fn par_auto_pushes_every_parameter_to_an_advertised_endpoint() {
    let c = fake_provider::setup().await;
    c.idp.state.discovery_extra.lock().unwrap().insert(
        "pushed_authorization_request_endpoint".into(),
        json!(format!("{}/par", c.idp.issuer)),
    );
    c.proxy.app.oidc.provider.refresh().await.unwrap();
    let (query, _) = begin_login(&c.proxy).await;
    assert_eq!(
        query["request_uri"],
        "urn:ietf:params:oauth:request_uri:fake-1"
    );
    assert_eq!(query.len(), 2, "{query:?}");
    let pushed = c.idp.state.pushed.lock().unwrap().clone();
    assert_eq!(pushed.len(), 1);
    let form: HashMap<_, _> = pushed[0].iter().cloned().collect();
    for name in PUSHED_ONLY {
        assert!(form.contains_key(name), "{name} missing from {form:?}");
    }
    assert_eq!(form["code_challenge_method"], "S256");
    assert!(!form.contains_key("prompt"), "{form:?}");

    // An app's silent sign-in: its prompt is pushed too, never put in the browser's URL.
    let start = get(&c.proxy.url("/bff/login?returnUrl=/&prompt=none"), &[]).await;
    assert_eq!(start.status, 302, "{}", start.text());
    let location = url::Url::parse(start.header("location").unwrap()).unwrap();
    assert!(
        !location.query_pairs().any(|(k, _)| k == "prompt"),
        "{location}"
    );
    let pushed = c.idp.state.pushed.lock().unwrap().clone();
    let form: HashMap<_, _> = pushed[1].iter().cloned().collect();
    assert_eq!(form["prompt"], "none", "{form:?}");
}

#[tokio::test]
async fn par_always_with_a_provider_without_par_refuses_the_login_and_the_online_check() {
    let c = fake_provider::setup().await;
    let config = config_toml("")
        .set("oidc.issuer", c.idp.issuer.as_str())
        .add("oidc.par", "always");
    let proxy = start_proxy(config.clone()).await;
    wait_metadata(&proxy).await;
    let r = get(&proxy.url("/bff/login?returnUrl=/"), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("provider_unavailable"), "{}", r.text());
    assert!(r.header("location").is_none());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config.text()).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
            .args(["check", "--online", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("oidc.par: \"always\", but the provider advertises no pushed_authorization_request_endpoint"),
        "{err}"
    );
}

/// RFC 9126 §2.2: the pushed request's answer names a `request_uri`, a short reference that the
/// browser then carries to the authorization endpoint. An empty one, one longer than any
/// reference (a Location of megabytes), or one with bytes no URI has (CR, LF, NUL, non-ASCII)
/// is the provider's fault: 503, no redirect. Characters that mean something in a query (`&`,
/// `#`, `=`) are escaped, so the browser's URL carries exactly `client_id` and that value.
#[tokio::test]
async fn a_pushed_request_answered_with_an_unusable_request_uri_is_refused() {
    let c = fake_provider::setup().await;
    c.idp.state.discovery_extra.lock().unwrap().insert(
        "pushed_authorization_request_endpoint".into(),
        json!(format!("{}/par", c.idp.issuer)),
    );
    c.proxy.app.oidc.provider.refresh().await.unwrap();
    let answer = |request_uri: serde_json::Value| {
        *c.idp.state.pushed_answer.lock().unwrap() =
            Some(json!({"request_uri": request_uri, "expires_in": 60}));
    };
    let mut taken = Vec::new();
    for (name, bad) in [
        ("empty", json!("")),
        ("long", json!(format!("urn:x:{}", "a".repeat(100_000)))),
        ("crlf", json!("urn:x\r\nlocation: https://evil.example")),
        ("nul", json!("urn:x\u{0}")),
        ("space", json!("urn:x y")),
        ("non-ascii", json!("urn:x:\u{e9}")),
        ("number", json!(7)),
    ] {
        answer(bad);
        let r = get(&c.proxy.url("/bff/login?returnUrl=/"), &[]).await;
        if r.status != 503 || r.header("location").is_some() {
            taken.push(format!("{name}: {}", r.status));
        }
    }
    assert!(taken.is_empty(), "taken: {taken:?}");
    let odd = "urn:x:a&client_id=evil&redirect_uri=https://evil.example#frag";
    answer(json!(odd));
    let (query, _) = begin_login(&c.proxy).await;
    assert_eq!(query.len(), 2, "{query:?}");
    assert_eq!(query["client_id"], "vestibule");
    assert_eq!(query["request_uri"], odd);
}
