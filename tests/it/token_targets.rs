//! A session's tokens for routes that ask for different things: scopes, resources, token exchange,
//! and what an upstream's refusal may do. Each test was first seen failing (a hostile review).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use vestibule::jose::testing::{TestKey, TestSigner, id_token_claims};

const REFRESH: &str = "refresh_token";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Case {
    proxy: Proxy,
    idp: fake_idp::FakeIdp,
    signer: TestSigner,
}

async fn setup(routes: impl FnOnce(&str) -> String) -> (Case, upstream::Upstream) {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let proxy = start_proxy_for(&idp.issuer, &routes(&up.url())).await;
    (Case { proxy, idp, signer }, up)
}

impl Case {
    /// Signs alice in: the login's token answer is `answer` plus a valid ID token.
    async fn login(&self, mut answer: Value) -> String {
        let (q, login_cookie) = begin_login(&self.proxy).await;
        let mut c = id_token_claims(&self.idp.issuer, "vestibule", &q["nonce"], now());
        c["roles"] = json!(["reader"]);
        answer["id_token"] = self.signer.token(TestKey::Rsa1).kid("k1").sign(&c).into();
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

    fn requests(&self, grant_type: &str) -> Vec<Vec<(String, String)>> {
        self.idp
            .state
            .token_requests
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.contains(&("grant_type".into(), grant_type.into())))
            .cloned()
            .collect()
    }
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn bearer_of(up: &upstream::Upstream, marker: &str) -> Vec<String> {
    up.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.uri.contains(marker))
        .map(|s| {
            s.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// Two routes for one resource with different `scopes` (least privilege per upstream): the token
/// one route's refresh asked for with its scopes is never sent to the other route's upstream.
/// The session's tokens are kept by resource, scopes and grant (`RouteConfig::token_key`), as
/// the client-credentials cache keeps its own; by resource alone, the admin-scoped token reached
/// the reports upstream.
#[tokio::test]
async fn a_token_refreshed_for_one_routes_scopes_never_reaches_another_routes_upstream() {
    let (case, up) = setup(|u| {
        format!(
            r#"
[[routes]]
path = "/admin/"
upstream = "{u}"
token = "user"
resource = "https://api.example"
scopes = ["api.admin"]
[[routes]]
path = "/reports/"
upstream = "{u}"
token = "user"
resource = "https://api.example"
scopes = ["api.read"]
"#
        )
    })
    .await;
    let cookie = case
        .login(
            json!({"access_token": "login-access", "token_type": "Bearer",
                        "expires_in": 300, "refresh_token": "rt-1"}),
        )
        .await;
    case.idp.state.script(
        REFRESH,
        200,
        json!({"access_token": "admin-scoped", "token_type": "Bearer", "expires_in": 300,
               "refresh_token": "rt-2", "scope": "api.admin"}),
    );
    case.idp.state.script(
        REFRESH,
        200,
        json!({"access_token": "read-scoped", "token_type": "Bearer", "expires_in": 300,
               "refresh_token": "rt-3", "scope": "api.read"}),
    );
    let r = case.get(&cookie, "/admin/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bearer_of(&up, "/admin/x"), vec!["Bearer admin-scoped"]);
    let grants = case.requests(REFRESH);
    assert_eq!(field(&grants[0], "scope"), Some("api.admin"));

    let r = case.get(&cookie, "/reports/y").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        bearer_of(&up, "/reports/y"),
        vec!["Bearer admin-scoped"],
        "the reports upstream (scopes = [\"api.read\"]) was sent the token granted with scope \
         api.admin for the admin route"
    );
}

/// RFC 8693 §2.2.1 lets a token exchange answer carry a `refresh_token` (Keycloak's legacy token
/// exchange does by default): it is a credential for the exchanged audience and never takes the
/// place of the session's own. Written over it, the next refresh of the session's default token
/// presented the exchange's refresh token (whatever it yields is then sent to routes without a
/// resource), and the login's was dropped without revocation (a logout revoked the wrong one).
#[tokio::test]
async fn a_token_exchange_answer_never_replaces_the_sessions_refresh_token() {
    let (case, up) = setup(|u| {
        format!(
            r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/exchanged/"
upstream = "{u}"
token = "user"
resource = "https://exchanged.example"
exchange = true
"#
        )
    })
    .await;
    // The login's default token is due at once, so every request to /api/ refreshes it.
    let cookie = case
        .login(
            json!({"access_token": "login-access", "token_type": "Bearer",
                        "expires_in": 0, "refresh_token": "rt-login"}),
        )
        .await;
    // /exchanged/: the subject token is refreshed first, then exchanged.
    case.idp.state.script(
        REFRESH,
        200,
        json!({"access_token": "base-2", "token_type": "Bearer", "expires_in": 0,
               "refresh_token": "rt-2"}),
    );
    case.idp.state.script(
        EXCHANGE,
        200,
        json!({"access_token": "exchanged-at", "token_type": "Bearer", "expires_in": 300,
               "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
               "refresh_token": "rt-for-exchanged-audience"}),
    );
    let r = case.get(&cookie, "/exchanged/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bearer_of(&up, "/exchanged/x"), vec!["Bearer exchanged-at"]);
    // The provider answers a refresh with the exchange's refresh token with a token for the
    // exchanged audience.
    case.idp.state.script(
        REFRESH,
        200,
        json!({"access_token": "token-with-exchanged-audience", "token_type": "Bearer",
               "expires_in": 300, "refresh_token": "rt-3"}),
    );
    let r = case.get(&cookie, "/api/y").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let grants = case.requests(REFRESH);
    let presented: Vec<_> = grants
        .iter()
        .map(|g| field(g, "refresh_token").unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        presented.last().map(String::as_str),
        Some("rt-2"),
        "the session's refresh token was replaced by the token exchange's: {presented:?}"
    );
}

/// An upstream that answers every request `401 invalid_token`.
async fn rejecting_upstream() -> (String, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(0usize));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let counter = counter.clone();
                    async move {
                        *counter.lock().unwrap() += 1;
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .status(401)
                                .header("www-authenticate", "Bearer error=\"invalid_token\"")
                                .body(Full::new(Bytes::from("no")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, hits)
}

/// A session without a refresh token (a provider that issues none, e.g. no `offline_access`)
/// and an access token valid by its lifetime: one upstream answering `401 invalid_token`
/// (attacker 5, or any buggy API) gets its answer relayed, and the session stays. The forced
/// refresh found no refresh token and ended the session: one upstream signed its users out of
/// every route.
#[tokio::test]
async fn an_upstreams_401_does_not_end_a_session_whose_token_is_still_valid() {
    let (bad, hits) = rejecting_upstream().await;
    let (case, _up) = setup(|u| {
        format!(
            r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/hostile/"
upstream = "{bad}"
token = "user"
"#
        )
    })
    .await;
    let cookie = case
        .login(
            json!({"access_token": "login-access", "token_type": "Bearer",
                        "expires_in": 3600}),
        )
        .await;
    assert_eq!(case.get(&cookie, "/api/before").await.status, 200);
    let r = case.get(&cookie, "/hostile/x").await;
    assert!(*hits.lock().unwrap() >= 1);
    assert_eq!(r.status, 401, "{}", r.text());
    // The access token is still valid for its hour: the other routes and /bff/user still work.
    let user = case.get(&cookie, "/bff/user").await;
    assert_eq!(
        user.status,
        200,
        "the session was ended by one upstream's 401: {}",
        user.text()
    );
    assert_eq!(case.get(&cookie, "/api/after").await.status, 200);
}

/// The same without a resource: a route with `scopes` but no `resource` gets a token asked for
/// with its scopes, not the login's (every scope of the sign-in); keyed as the login's token,
/// it was sent that one, and when its refresh came first the session's default token (the
/// UserInfo and token-exchange subject) became the narrowed one for every other route.
#[tokio::test]
async fn a_route_with_scopes_and_no_resource_gets_a_token_for_its_scopes() {
    let (case, up) = setup(|u| {
        format!(
            r#"
[[routes]]
path = "/narrow/"
upstream = "{u}"
token = "user"
scopes = ["api.read"]
"#
        )
    })
    .await;
    let cookie = case
        .login(
            json!({"access_token": "login-access", "token_type": "Bearer",
                        "expires_in": 300, "refresh_token": "rt-1",
                        "scope": "openid profile email offline_access api.read api.admin"}),
        )
        .await;
    case.idp.state.script(
        REFRESH,
        200,
        json!({"access_token": "read-scoped", "token_type": "Bearer", "expires_in": 300,
               "refresh_token": "rt-2", "scope": "api.read"}),
    );
    let r = case.get(&cookie, "/narrow/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        bearer_of(&up, "/narrow/x"),
        vec!["Bearer login-access"],
        "the route with scopes = [\"api.read\"] was sent the login's token with every scope"
    );
}
