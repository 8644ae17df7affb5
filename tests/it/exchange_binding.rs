//! Token exchange (RFC 8693) with DPoP (RFC 9449), against the in-process fake provider: the
//! subject token presented at an exchange is bound to the key that signs the exchange's proof
//! (refreshed first when it is bound to a replaced key); an exchanged token records its own key
//! and is exchanged again when that key is replaced; no answer to an exchange ends the session,
//! and one refusing the subject token has it refreshed and the exchange asked for once more;
//! and each exchange route's token reaches that route's upstream only.
//!
//! A key "replaced" is played by writing another thumbprint into the session as stored: what a
//! session written by a replica signing with another key file (or before the stored key was
//! replaced) looks like to this one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use serde_json::{Value, json};
use vestibule::app::now;
use vestibule::jose::testing::{TestKey, TestSigner, id_token_claims};

const REFRESH: &str = "refresh_token";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The thumbprint of a key that no longer signs.
const REPLACED: &str = "thumbprint-of-a-replaced-key";

struct Case {
    proxy: Proxy,
    idp: fake_idp::FakeIdp,
    signer: TestSigner,
    up: upstream::Upstream,
}

/// Vestibule with `[oidc] dpop = true` and, all `token_binding = "dpop"`: `/api/` (the login's
/// token), `/plain-a/` (a refreshed token for `https://a.example`), and three exchange routes:
/// `/ex-a/` and `/ex-a-write/` (`https://a.example`, the second with `scopes = ["write"]`) and
/// `/ex-b/` (`https://b.example`).
async fn setup() -> Case {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let u = up.url();
    let routes = format!(
        r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
[[routes]]
path = "/plain-a/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
resource = "https://a.example"
[[routes]]
path = "/ex-a/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
resource = "https://a.example"
exchange = true
[[routes]]
path = "/ex-a-write/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
resource = "https://a.example"
scopes = ["write"]
exchange = true
[[routes]]
path = "/ex-b/"
upstream = "{u}"
token = "user"
token_binding = "dpop"
resource = "https://b.example"
exchange = true
"#
    );
    let config = config_toml(&routes)
        .set("oidc.issuer", idp.issuer.as_str())
        .add("oidc.dpop", true);
    let proxy = start_proxy(config).await;
    wait_metadata(&proxy).await;
    Case {
        proxy,
        idp,
        signer,
        up,
    }
}

/// A DPoP-bound token answer of a refresh (or the login) living five minutes.
fn bound(access: &str, refresh: Option<&str>) -> Value {
    let mut body = json!({"access_token": access, "token_type": "DPoP", "expires_in": 300});
    if let Some(refresh) = refresh {
        body["refresh_token"] = refresh.into();
    }
    body
}

/// A token exchange's DPoP-bound answer.
fn exchanged(access: &str) -> Value {
    json!({"access_token": access, "token_type": "DPoP", "expires_in": 300,
           "issued_token_type": ACCESS_TOKEN_TYPE})
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The session-map key of an exchange route's token for `resource` and `scopes`.
fn exchange_key(resource: &str, scopes: &[&str]) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    vestibule::config::token_key_of(Some(resource), &scopes, true)
}

impl Case {
    /// Signs alice in; the code grant answers `answer` (and a valid ID token). Returns the
    /// session cookie.
    async fn login(&self, mut answer: Value) -> String {
        let (q, login_cookie) = begin_login(&self.proxy).await;
        let claims = id_token_claims(&self.idp.issuer, "vestibule", &q["nonce"], now());
        answer["id_token"] = self
            .signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&claims)
            .into();
        self.idp.state.script("authorization_code", 200, answer);
        let done = callback(&self.proxy, &q, &login_cookie).await;
        assert_eq!(done.status, 302, "{}", done.text());
        done.session_cookie()
    }

    async fn get(&self, cookie: &str, path: &str) -> Reply {
        get(
            &self.proxy.url(path),
            &[("cookie", cookie), ("x-csrf", "1")],
        )
        .await
    }

    /// The forms of the token requests of `grant_type`, in order.
    fn requests(&self, grant_type: &str) -> Vec<Vec<(String, String)>> {
        self.idp.state.token_requests_of(grant_type)
    }

    /// The thumbprint of the DPoP key Vestibule signs with now.
    fn signing(&self) -> String {
        let dpop = self.proxy.app.oidc.dpop.as_ref().unwrap();
        dpop.loaded_key().unwrap().thumbprint().to_string()
    }

    /// The session as stored.
    async fn stored(&self, cookie: &str) -> vestibule::session::manager::OpenSession {
        let app = &self.proxy.app;
        let live = app.live.load_full();
        let mut headers = http::HeaderMap::new();
        headers.insert("cookie", cookie.parse().unwrap());
        app.load_session(&app.sessions, &live, &headers)
            .await
            .unwrap()
            .unwrap()
    }

    /// The thumbprint recorded for the session's token under `key`.
    async fn jkt(&self, cookie: &str, key: &str) -> Option<String> {
        let loaded = self.stored(cookie).await;
        loaded.session.tokens.get(key).unwrap().jkt.clone()
    }

    /// Records the session's token under `key` as bound to a key that no longer signs.
    async fn bind_to_replaced_key(&self, cookie: &str, key: &str) {
        let loaded = self.stored(cookie).await;
        let mut session = vestibule::session::model::Session::clone(&loaded.session);
        session.tokens.get_mut(key).unwrap().jkt = Some(REPLACED.into());
        let app = &self.proxy.app;
        assert!(app.sessions.save(&loaded, session, now()).await.unwrap());
    }
}

/// The subject token of an exchange is the user's own token; the exchange itself is proved
/// with the key that signs now, and the provider binds the new token to it. A subject token
/// bound to a key that no longer signs (a key file replaced) is one a provider checking the
/// subject's binding refuses, and a route that refused stays refused until the subject token
/// expires: it is refreshed first, as it would be before it is sent to a DPoP route, and the
/// exchange presents the refreshed one.
#[tokio::test]
async fn a_subject_token_bound_to_a_replaced_key_is_refreshed_before_it_is_exchanged() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    let signing = c.signing();
    assert_eq!(c.jkt(&cookie, "").await.as_deref(), Some(signing.as_str()));
    c.bind_to_replaced_key(&cookie, "").await;
    c.idp
        .state
        .script(REFRESH, 200, bound("base-2", Some("refresh-2")));
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-1"));

    let r = c.get(&cookie, "/ex-a/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/1"), vec!["DPoP ex-a-1"]);
    let exchanges = c.requests(EXCHANGE);
    assert_eq!(exchanges.len(), 1);
    assert_eq!(
        field(&exchanges[0], "subject_token"),
        Some("base-2"),
        "the subject token bound to the replaced key was exchanged"
    );
    let refreshes = c.requests(REFRESH);
    assert_eq!(refreshes.len(), 1, "one refresh of the subject token");
    assert_eq!(field(&refreshes[0], "resource"), None);
    assert_eq!(c.jkt(&cookie, "").await.as_deref(), Some(signing.as_str()));
    let key = exchange_key("https://a.example", &[]);
    assert_eq!(
        c.jkt(&cookie, &key).await.as_deref(),
        Some(signing.as_str())
    );

    // The refreshed subject token serves the login's route too, with no other grant.
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/api/x"), vec!["DPoP base-2"]);
    assert_eq!(c.requests(REFRESH).len(), 1);
}

/// Both the exchanged token and its subject bound to a replaced key (the whole session written
/// by a replica with another key file): the early replacement of the exchanged token refreshes
/// the subject too, in the same turn, and exchanges the refreshed one.
#[tokio::test]
async fn an_exchanged_token_and_its_subject_both_bound_to_a_replaced_key_are_both_replaced() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-1"));
    assert_eq!(c.get(&cookie, "/ex-a/1").await.status, 200);
    let key = exchange_key("https://a.example", &[]);
    c.bind_to_replaced_key(&cookie, &key).await;
    c.bind_to_replaced_key(&cookie, "").await;
    c.idp
        .state
        .script(REFRESH, 200, bound("base-2", Some("refresh-2")));
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-2"));
    let r = c.get(&cookie, "/ex-a/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/2"), vec!["DPoP ex-a-2"]);
    let exchanges = c.requests(EXCHANGE);
    assert_eq!(exchanges.len(), 2);
    assert_eq!(
        field(&exchanges[1], "subject_token"),
        Some("base-2"),
        "the subject bound to the replaced key was exchanged"
    );
    assert_eq!(c.requests(REFRESH).len(), 1);
    let signing = c.signing();
    assert_eq!(c.jkt(&cookie, "").await.as_deref(), Some(signing.as_str()));
    assert_eq!(
        c.jkt(&cookie, &key).await.as_deref(),
        Some(signing.as_str())
    );
}

/// Replicas signing with different keys for a while (a rolling restart onto a new key file)
/// each find the subject token bound to the other's key. On a route whose exchange the
/// provider refuses for good nothing is stored to stop the next request from trying again, so
/// the subject's replacement is held to the early refresh's pace — once per session every 10
/// seconds per instance — not one refresh per request.
#[tokio::test]
async fn a_subject_bound_to_another_key_is_not_refreshed_at_every_refused_exchange() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    for (i, access) in ["base-2", "base-3", "base-4"].into_iter().enumerate() {
        // The other replica refreshed it meanwhile, bound to its key.
        c.bind_to_replaced_key(&cookie, "").await;
        c.idp
            .state
            .script(REFRESH, 200, bound(access, Some(&format!("refresh-{i}"))));
        c.idp
            .state
            .script(EXCHANGE, 400, json!({"error": "invalid_target"}));
        let r = c.get(&cookie, &format!("/ex-a/{i}")).await;
        assert_eq!(r.status, 403, "{}", r.text());
    }
    assert_eq!(c.requests(EXCHANGE).len(), 3);
    assert_eq!(
        c.requests(REFRESH).len(),
        1,
        "a refresh grant at every refused exchange"
    );
    assert!(c.proxy.signed_in(&cookie).await);
}

/// Without a refresh token, a subject token bound to a replaced key cannot be replaced: it is
/// exchanged as it is and the provider decides; the session is not ended for it.
#[tokio::test]
async fn without_a_refresh_token_a_subject_bound_to_a_replaced_key_is_exchanged_as_it_is() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", None)).await;
    c.bind_to_replaced_key(&cookie, "").await;
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-1"));
    let r = c.get(&cookie, "/ex-a/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/1"), vec!["DPoP ex-a-1"]);
    let exchanges = c.requests(EXCHANGE);
    assert_eq!(field(&exchanges[0], "subject_token"), Some("login-access"));
    assert!(c.requests(REFRESH).is_empty());
    assert!(c.proxy.signed_in(&cookie).await, "the session ended");
}

/// An exchanged token records the thumbprint of the key its exchange was proved with, is sent
/// with a proof by that key, and, once that key no longer signs, is exchanged again before it
/// is sent rather than sent bound to another key.
#[tokio::test]
async fn an_exchanged_token_bound_to_a_replaced_key_is_exchanged_again_before_it_is_sent() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    let signing = c.signing();
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-1"));
    let r = c.get(&cookie, "/ex-a/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/1"), vec!["DPoP ex-a-1"]);
    let key = exchange_key("https://a.example", &[]);
    assert_eq!(
        c.jkt(&cookie, &key).await.as_deref(),
        Some(signing.as_str())
    );
    let proof = c.up.last().headers.get("dpop").cloned().unwrap();
    let proof = fake_idp::proof_claims(proof.to_str().ok());
    assert_eq!(proof["htm"], "GET", "{proof}");
    assert!(proof["ath"].is_string(), "{proof}");

    c.bind_to_replaced_key(&cookie, &key).await;
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-2"));
    let r = c.get(&cookie, "/ex-a/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        c.up.authorizations("/ex-a/2"),
        vec!["DPoP ex-a-2"],
        "the exchanged token bound to the replaced key was sent"
    );
    let exchanges = c.requests(EXCHANGE);
    assert_eq!(exchanges.len(), 2);
    assert_eq!(field(&exchanges[1], "subject_token"), Some("login-access"));
    assert!(c.requests(REFRESH).is_empty(), "the subject was still good");
    assert_eq!(
        c.jkt(&cookie, &key).await.as_deref(),
        Some(signing.as_str())
    );
}

/// Only the refresh token being refused ends a session. Whatever a token exchange is answered
/// — its subject token refused (`invalid_grant`, `invalid_request`: RFC 8693 §2.2.2), the proof
/// refused, a nonce asked for without one, the client refused, the provider failing — that
/// route answers 403 or 503, the session stays, no cookie is cleared, and the other routes keep
/// their tokens. (Without a refresh token, so that every answer reaches the route as it is: a
/// refused subject is otherwise refreshed once, see below.)
#[tokio::test]
async fn no_answer_to_a_token_exchange_ends_the_session() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", None)).await;
    let answers = [
        (400, json!({"error": "invalid_grant"})),
        (400, json!({"error": "invalid_request"})),
        (400, json!({"error": "invalid_dpop_proof"})),
        (400, json!({"error": "use_dpop_nonce"})),
        (401, json!({"error": "use_dpop_nonce"})),
        (401, json!({"error": "invalid_token"})),
        (401, json!({"error": "invalid_client"})),
        (400, json!({"error": "invalid_target"})),
        (400, json!({"error": "invalid_scope"})),
        (500, json!({"error": "server_error"})),
        (200, json!({"token_type": "DPoP"})),
    ];
    for (i, (status, body)) in answers.into_iter().enumerate() {
        c.idp.state.script(EXCHANGE, status, body.clone());
        let r = c.get(&cookie, &format!("/ex-a/{i}")).await;
        assert!(
            [403, 503].contains(&r.status),
            "{status} {body}: {} {}",
            r.status,
            r.text()
        );
        assert_ne!(r.json()["error"], "session_expired", "{status} {body}");
        assert!(
            r.set_cookie("vestibule").is_none(),
            "{status} {body}: the session cookie was touched"
        );
        assert!(c.up.authorizations(&format!("/ex-a/{i}")).is_empty());
        assert!(
            c.proxy.signed_in(&cookie).await,
            "{status} {body}: the session ended"
        );
        let r = c.get(&cookie, &format!("/api/{i}")).await;
        assert_eq!(r.status, 200, "{status} {body}: {}", r.text());
        assert_eq!(
            c.up.authorizations(&format!("/api/{i}")),
            vec!["DPoP login-access"]
        );
    }
    assert!(c.requests(REFRESH).is_empty(), "there is no refresh token");
    // A provider that asks for a new nonce at every request: one retry, then 503, session kept.
    c.idp
        .state
        .dpop_nonce_always
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = c.get(&cookie, "/ex-a/nonce").await;
    assert_eq!(r.status, 503, "{}", r.text());
    c.idp
        .state
        .dpop_nonce_always
        .store(false, std::sync::atomic::Ordering::SeqCst);
    *c.idp.state.dpop_nonce.lock().unwrap() = None;
    assert!(c.proxy.signed_in(&cookie).await, "a nonce loop ended it");
    // And the route works again once the provider does.
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-ok"));
    let r = c.get(&cookie, "/ex-a/ok").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/ok"), vec!["DPoP ex-a-ok"]);
}

/// An exchange refused for its subject token (`invalid_request`, RFC 8693 §2.2.2, or
/// `invalid_grant`) although Vestibule holds it valid — bound to a replaced key by a session
/// that recorded no thumbprint (written before they were), revoked, or expired early at the
/// provider — is not refused until that token expires: the subject token is refreshed and the
/// exchange asked for once more, as an upstream's `invalid_token` replaces the token it
/// refused. At most once per session every 10 seconds, so a provider that refuses a route's
/// exchanges for good does not turn each request into a refresh.
#[tokio::test]
async fn a_subject_token_the_exchange_refuses_is_refreshed_once_and_exchanged_again() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    c.idp
        .state
        .script(EXCHANGE, 400, json!({"error": "invalid_request"}));
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-1"));
    c.idp
        .state
        .script(REFRESH, 200, bound("base-2", Some("refresh-2")));
    let r = c.get(&cookie, "/ex-a/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.up.authorizations("/ex-a/1"), vec!["DPoP ex-a-1"]);
    let subjects: Vec<String> = c
        .requests(EXCHANGE)
        .iter()
        .map(|f| field(f, "subject_token").unwrap().to_string())
        .collect();
    assert_eq!(subjects, vec!["login-access", "base-2"]);
    assert_eq!(c.requests(REFRESH).len(), 1);
    assert_eq!(c.get(&cookie, "/api/x").await.status, 200);
    assert_eq!(c.up.authorizations("/api/x"), vec!["DPoP base-2"]);

    // Refused again at once (another route): 403, no second refresh within 10 seconds.
    c.idp
        .state
        .script(EXCHANGE, 400, json!({"error": "invalid_grant"}));
    let r = c.get(&cookie, "/ex-b/1").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "token_refused");
    assert_eq!(c.requests(REFRESH).len(), 1, "a refresh at every refusal");
    assert!(c.proxy.signed_in(&cookie).await);
}

/// Each exchange route's token is kept in the session under its own resource, scopes and
/// grant: it reaches that route's upstream only — not another exchange route's for the same
/// resource with other scopes, not one for another resource, not a route refreshing a token
/// for the same resource, not the login's route — and is asked for once.
#[tokio::test]
async fn an_exchanged_token_reaches_its_own_routes_upstream_only() {
    let c = setup().await;
    let cookie = c.login(bound("login-access", Some("login-refresh"))).await;
    let routes = [
        ("/ex-a/", "DPoP ex-a"),
        ("/ex-a-write/", "DPoP ex-a-write"),
        ("/ex-b/", "DPoP ex-b"),
        ("/plain-a/", "DPoP plain-a"),
        ("/api/", "DPoP login-access"),
    ];
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a"));
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-a-write"));
    c.idp.state.script(EXCHANGE, 200, exchanged("ex-b"));
    c.idp
        .state
        .script(REFRESH, 200, bound("plain-a", Some("refresh-2")));
    for round in 0..2 {
        for (path, _) in routes {
            let r = c.get(&cookie, &format!("{path}{round}")).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
        }
    }
    for (path, want) in routes {
        assert_eq!(c.up.authorizations(path), vec![want, want], "{path}");
    }
    let exchanges = c.requests(EXCHANGE);
    let asked: Vec<(Option<&str>, Option<&str>)> = exchanges
        .iter()
        .map(|f| (field(f, "resource"), field(f, "scope")))
        .collect();
    assert_eq!(
        asked,
        vec![
            (Some("https://a.example"), None),
            (Some("https://a.example"), Some("write")),
            (Some("https://b.example"), None),
        ]
    );
    assert_eq!(c.requests(REFRESH).len(), 1);
}
