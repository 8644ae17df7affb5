//! What each answer of the token endpoint to a refresh or a token exchange does to the session,
//! against the in-process fake provider: a refreshed ID token replaces the claims, one for
//! another subject ends the session, an invalid one changes nothing but the refresh token it
//! rotated; a route's own refused resource or scope is 403 on that route only; exchange routes
//! refresh their subject token. And which route a token is for: one asked for with a route's
//! scopes, or by an exchange, reaches no other route's upstream; an upstream's refusal of a
//! token that cannot be replaced leaves the session alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use serde_json::{Value, json};
use vestibule::app::now;
use vestibule::jose::testing::{Forgery, TestKey, TestSigner, id_token_claims};

const REFRESH: &str = "refresh_token";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

struct Case {
    proxy: Proxy,
    idp: fake_idp::FakeIdp,
    signer: TestSigner,
    up: upstream::Upstream,
    /// The proxy's clock, moved on rather than waited out.
    clock: vestibule::clock::TestClock,
}

async fn setup() -> Case {
    setup_with(|u| {
        format!(
            r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/orders/"
upstream = "{u}"
token = "user"
resource = "https://orders.example"
[[routes]]
path = "/exchanged/"
upstream = "{u}"
token = "user"
resource = "https://exchanged.example"
exchange = true
"#
        )
    })
    .await
}

/// The fake provider, an upstream, and Vestibule with the routes `routes` gives for the
/// upstream's URL.
async fn setup_with(routes: impl FnOnce(&str) -> String) -> Case {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let clock = vestibule::clock::TestClock::new();
    let config = config_toml(&routes(&up.url())).set("oidc.issuer", idp.issuer.as_str());
    let proxy = start_proxy_with_clock(config, clock.clock()).await;
    wait_metadata(&proxy).await;
    Case {
        proxy,
        idp,
        signer,
        up,
        clock,
    }
}

/// Alice's ID token claims with `roles`; `nonce` only when given (a refreshed token has none).
fn alice(issuer: &str, nonce: Option<&str>, roles: &[&str]) -> Value {
    let mut c = id_token_claims(issuer, "vestibule", nonce.unwrap_or(""), now());
    c["roles"] = json!(roles);
    if nonce.is_none() {
        c.as_object_mut().unwrap().remove("nonce");
    }
    c
}

impl Case {
    fn sign(&self, claims: &Value) -> String {
        self.signer.token(TestKey::Rsa1).kid("k1").sign(claims)
    }

    /// Signs alice in with roles `["reader"]` and a default access token that lives
    /// `expires_in` seconds (0: due for refresh at once). Returns the session cookie.
    async fn login(&self, expires_in: u64) -> String {
        self.login_with(
            json!({"access_token": "login-access", "token_type": "Bearer",
                               "expires_in": expires_in, "refresh_token": "login-refresh"}),
        )
        .await
    }

    /// Signs alice in with roles `["reader"]`; the login's token answer is `answer` and a valid
    /// ID token. An `expires_in` of 0 makes the token due at once: the proxy's clock is moved
    /// on by the shortest lifetime believed. Returns the session cookie.
    async fn login_with(&self, mut answer: Value) -> String {
        let due = answer["expires_in"] == json!(0);
        let (q, login_cookie) = begin_login(&self.proxy).await;
        answer["id_token"] = self
            .sign(&alice(&self.idp.issuer, Some(&q["nonce"]), &["reader"]))
            .into();
        self.idp.state.script("authorization_code", 200, answer);
        let done = callback(&self.proxy, &q, &login_cookie).await;
        assert_eq!(done.status, 302, "{}", done.text());
        if due {
            self.due();
        }
        done.session_cookie()
    }

    /// Moves the proxy's clock on until a token answered with `expires_in` 0 is due.
    fn due(&self) {
        let shortest = vestibule::oidc::MIN_TOKEN_LIFETIME;
        self.clock.advance(std::time::Duration::from_secs(shortest));
    }

    async fn get(&self, cookie: &str, path: &str) -> Reply {
        get(
            &self.proxy.url(path),
            &[("cookie", cookie), ("x-csrf", "1")],
        )
        .await
    }

    /// The `/bff/user` answer: 200 with the claims while the session lives.
    async fn user(&self, cookie: &str) -> Reply {
        self.get(cookie, "/bff/user").await
    }

    /// The forms of the token requests of `grant_type`, in order.
    fn requests(&self, grant_type: &str) -> Vec<Vec<(String, String)>> {
        self.idp.state.token_requests_of(grant_type)
    }

    fn bearer(&self) -> String {
        self.up
            .last()
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    }
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn refreshed(access: &str, refresh: &str, id_token: Option<String>) -> Value {
    let mut body = json!({"access_token": access, "token_type": "Bearer", "expires_in": 300,
                          "refresh_token": refresh});
    if let Some(id_token) = id_token {
        body["id_token"] = id_token.into();
    }
    body
}

#[tokio::test]
async fn a_valid_refreshed_id_token_replaces_the_claims() {
    let c = setup().await;
    let cookie = c.login(0).await;
    assert_eq!(c.user(&cookie).await.json()["roles"], json!(["reader"]));
    let id_token = c.sign(&alice(&c.idp.issuer, None, &["reader", "editor"]));
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-2", "refresh-2", Some(id_token)),
    );
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer access-2");
    let user = c.user(&cookie).await;
    assert_eq!(user.status, 200);
    assert_eq!(user.json()["roles"], json!(["reader", "editor"]));
    assert_eq!(user.json()["sub"], "alice");
}

#[tokio::test]
async fn a_refreshed_id_token_for_another_subject_ends_the_session() {
    let c = setup().await;
    let cookie = c.login(0).await;
    let mut mallory = alice(&c.idp.issuer, None, &["admin"]);
    mallory["sub"] = json!("mallory");
    let id_token = c.sign(&mallory);
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-2", "refresh-2", Some(id_token)),
    );
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "session_expired");
    assert_eq!(
        c.up.seen.lock().unwrap().len(),
        0,
        "nothing may reach the upstream"
    );
    assert_eq!(
        c.user(&cookie).await.status,
        401,
        "the session must be gone"
    );
}

#[tokio::test]
async fn an_invalid_refreshed_id_token_changes_nothing_and_keeps_the_session() {
    let c = setup().await;
    let cookie = c.login(0).await;
    let issuer = c.idp.issuer.clone();
    let mut other_aud = alice(&issuer, None, &["admin"]);
    other_aud["aud"] = json!("another-client");
    let mut other_iss = alice(&issuer, None, &["admin"]);
    other_iss["iss"] = json!("https://evil.example");
    let bad_signature = c
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .forge(Forgery::BadSignature)
        .sign(&alice(&issuer, None, &["admin"]));
    for (name, id_token) in [
        ("wrong aud", c.sign(&other_aud)),
        ("wrong iss", c.sign(&other_iss)),
        ("bad signature", bad_signature),
    ] {
        c.idp.state.script(
            REFRESH,
            200,
            refreshed("access-bad", "refresh-bad", Some(id_token)),
        );
        let r = c.get(&cookie, "/api/x").await;
        assert_eq!(r.status, 503, "{name}: {}", r.text());
        assert_eq!(r.json()["error"], "provider_unavailable", "{name}");
        assert!(r.header("retry-after").is_some(), "{name}");
        let user = c.user(&cookie).await;
        assert_eq!(user.status, 200, "{name}: the session must be kept");
        assert_eq!(user.json()["roles"], json!(["reader"]), "{name}");
    }
    // Nothing of those answers was used: not the access token, not the claims; only the refresh
    // token they rotated was kept (the provider spent the one presented), and presented next.
    let id_token = c.sign(&alice(&issuer, None, &["reader"]));
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-good", "refresh-good", Some(id_token)),
    );
    let r = c.get(&cookie, "/api/y").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer access-good");
    let spent: Vec<String> = c
        .requests(REFRESH)
        .iter()
        .map(|f| field(f, "refresh_token").unwrap().to_string())
        .collect();
    assert_eq!(
        spent,
        vec!["login-refresh", "refresh-bad", "refresh-bad", "refresh-bad"]
    );
}

/// A refreshed ID token that does not validate (a wrong `aud` here; a key the JWKS refetch, rate
/// limited, has not brought yet in practice) changes neither the claims nor the access token, but
/// the refresh token the answer rotated is kept: the provider has spent the one presented, and a
/// rotating provider refuses it the next time with `invalid_grant`, which ends the session.
#[tokio::test]
async fn an_invalid_refreshed_id_token_still_keeps_the_rotated_refresh_token() {
    let c = setup().await;
    let cookie = c.login(0).await;
    let issuer = c.idp.issuer.clone();
    let mut other_aud = alice(&issuer, None, &["admin"]);
    other_aud["aud"] = json!("another-client");
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-bad", "refresh-2", Some(c.sign(&other_aud))),
    );
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "provider_unavailable");
    assert_eq!(c.user(&cookie).await.json()["roles"], json!(["reader"]));

    let id_token = c.sign(&alice(&issuer, None, &["reader"]));
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-good", "refresh-3", Some(id_token)),
    );
    let r = c.get(&cookie, "/api/y").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer access-good");
    let presented: Vec<String> = c
        .requests(REFRESH)
        .iter()
        .map(|f| field(f, "refresh_token").unwrap().to_string())
        .collect();
    assert_eq!(
        presented,
        vec!["login-refresh", "refresh-2"],
        "the spent refresh token was presented again"
    );
}

#[tokio::test]
async fn a_refused_resource_or_scope_is_403_on_that_route_only() {
    let c = setup().await;
    let cookie = c.login(300).await;
    for error in ["invalid_target", "invalid_scope"] {
        c.idp.state.script(REFRESH, 400, json!({"error": error}));
        let r = c.get(&cookie, "/orders/1").await;
        assert_eq!(r.status, 403, "{error}: {}", r.text());
        assert_eq!(r.json()["error"], "token_refused", "{error}");
        assert_eq!(
            c.user(&cookie).await.status,
            200,
            "{error}: the session must be kept"
        );
        let r = c.get(&cookie, "/api/x").await;
        assert_eq!(r.status, 200, "{error}: other routes keep working");
        assert_eq!(c.bearer(), "Bearer login-access");
    }
    let orders = c.requests(REFRESH);
    assert_eq!(orders.len(), 2);
    assert!(
        orders
            .iter()
            .all(|f| field(f, "resource") == Some("https://orders.example"))
    );
    // A refused token exchange: the same.
    c.idp
        .state
        .script(EXCHANGE, 400, json!({"error": "invalid_target"}));
    let r = c.get(&cookie, "/exchanged/1").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "token_refused");
    assert_eq!(c.user(&cookie).await.status, 200);
    let r = c.get(&cookie, "/exchanged/2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer exchanged-for-https://exchanged.example");
}

#[tokio::test]
async fn only_invalid_grant_ends_the_session() {
    let c = setup().await;
    let cookie = c.login(0).await;
    for (status, body) in [
        (401, json!({"error": "invalid_client"})),
        (400, json!({"error": "unauthorized_client"})),
        (400, json!({"error": "invalid_request"})),
        (500, json!({"error": "server_error"})),
        (400, json!("not an OAuth error")),
        (200, json!({"token_type": "Bearer"})),
    ] {
        c.idp.state.script(REFRESH, status, body.clone());
        let r = c.get(&cookie, "/api/x").await;
        assert_eq!(r.status, 503, "{status} {body}: {}", r.text());
        assert_eq!(r.json()["error"], "provider_unavailable");
        assert!(r.header("retry-after").is_some());
        assert_eq!(c.user(&cookie).await.status, 200, "{status} {body}");
    }
    c.idp
        .state
        .script(REFRESH, 400, json!({"error": "invalid_grant"}));
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "session_expired");
    assert_eq!(c.user(&cookie).await.status, 401);
}

#[tokio::test]
async fn an_exchange_route_refreshes_its_due_subject_token_first() {
    let c = setup().await;
    let cookie = c.login(0).await;
    c.idp
        .state
        .script(REFRESH, 200, refreshed("base-2", "refresh-2", None));
    let r = c.get(&cookie, "/exchanged/1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer exchanged-for-https://exchanged.example");
    let refreshes = c.requests(REFRESH);
    assert_eq!(refreshes.len(), 1);
    assert_eq!(field(&refreshes[0], "refresh_token"), Some("login-refresh"));
    assert_eq!(field(&refreshes[0], "resource"), None);
    let exchanges = c.requests(EXCHANGE);
    assert_eq!(exchanges.len(), 1);
    assert_eq!(field(&exchanges[0], "subject_token"), Some("base-2"));
    // The refreshed subject token was kept for the default route too.
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(c.bearer(), "Bearer base-2");
    assert_eq!(c.requests(REFRESH).len(), 1);
}

impl Case {
    /// Plays another replica that refreshed the session while this one's grant was on its way
    /// (as after a lost lease): writes `access` and `refresh` straight into the store.
    async fn saved_elsewhere(&self, cookie: &str, access: &str, refresh: &str) {
        let app = &self.proxy.app;
        let live = app.live.load_full();
        let mut headers = http::HeaderMap::new();
        headers.insert("cookie", cookie.parse().unwrap());
        let loaded = app
            .load_session(&app.sessions, &live, &headers)
            .await
            .unwrap()
            .unwrap();
        let mut session = vestibule::session::model::Session::clone(&loaded.session);
        let token = session.tokens.get_mut("").unwrap();
        token.value = access.into();
        token.issued_at = now();
        token.expires_at = now() + 300;
        session.refresh_token = Some(refresh.into());
        assert!(app.sessions.save(&loaded, session, now()).await.unwrap());
    }

    /// Sends `path` and holds the provider's answer to the grant it makes until
    /// [`Case::saved_elsewhere`] has run.
    async fn racing(&self, cookie: &str, path: &str, access: &str, refresh: &str) -> Reply {
        let (release, hold) = tokio::sync::oneshot::channel();
        *self.idp.state.hold.lock().unwrap() = Some(hold);
        let before = self.requests(REFRESH).len();
        let url = self.proxy.url(path);
        let headers = [("cookie".to_string(), cookie.to_string())];
        let request = tokio::spawn(async move {
            let (k, v) = &headers[0];
            get(&url, &[(k.as_str(), v.as_str()), ("x-csrf", "1")]).await
        });
        eventually(
            "the refresh grant reaches the provider",
            std::time::Duration::from_secs(5),
            || async { (self.requests(REFRESH).len() > before).then_some(()) },
        )
        .await;
        self.saved_elsewhere(cookie, access, refresh).await;
        release.send(()).unwrap();
        request.await.unwrap()
    }
}

#[tokio::test]
async fn a_refresh_saved_first_elsewhere_is_neither_overwritten_nor_ended() {
    let c = setup().await;
    let cookie = c.login(0).await;
    // The late grant succeeds: it serves its own request, but the tokens saved first stay.
    c.idp
        .state
        .script(REFRESH, 200, refreshed("late-access", "late-refresh", None));
    let r = c
        .racing(&cookie, "/api/one", "first-access", "first-refresh")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer late-access");
    let r = c.get(&cookie, "/api/two").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        c.bearer(),
        "Bearer first-access",
        "the first save was overwritten"
    );
    // The late grant is refused because the other one spent the token: the session lives on.
    let cookie = c.login(0).await;
    c.idp
        .state
        .script(REFRESH, 400, json!({"error": "invalid_grant"}));
    let r = c
        .racing(&cookie, "/api/three", "second-access", "second-refresh")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer second-access");
    assert_eq!(
        c.user(&cookie).await.status,
        200,
        "the session must be kept"
    );
}

/// A replica that died while it spent the session's refresh token (after its spend record was
/// taken, before it presented the token or let the record go) leaves the record behind, made
/// to last for as long as a refresh may keep trying to save its answer through a store outage
/// (minutes). Nobody renews it: a refresh that finds it not renewed for longer than the lease
/// shortens it to a minute, after which the session's refreshes go on, instead of answering 503
/// for all those minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_record_left_by_a_replica_that_died_holds_refreshes_back_about_a_minute() {
    use crate::faults_redis::{due_session, presented_refresh_tokens, redis_proxy_timed};
    let redis = crate::support::redis::RedisServer::start();
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let store_timeout = std::time::Duration::from_secs(1);
    let proxy = redis_proxy_timed(&redis.url(), "5s", store_timeout, &[], &idp, &up).await;
    let cookie = due_session(&proxy, &idp, &[]).await;

    // The record of the dead replica, its last renewal some minutes ago.
    let sessions = &proxy.app.sessions;
    let value = cookie.split_once('=').unwrap().1;
    let loaded = sessions.load(value, now()).await.unwrap().unwrap();
    let record = sessions.spend_key(&loaded, "rt-1");
    let lasts = std::time::Duration::from_secs(240);
    assert!(
        sessions
            .store()
            .try_lock(&record, "dead", lasts)
            .await
            .unwrap()
    );

    let url = proxy.url("/tok/x");
    let served = eventually(
        "the session's refresh goes on",
        std::time::Duration::from_secs(100),
        || async {
            let r = get(&url, &[("cookie", &cookie), ("x-csrf", "1")]).await;
            (r.status != 503).then_some(r)
        },
    )
    .await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(presented_refresh_tokens(&idp), vec!["rt-1"]);
}

/// A token endpoint's answer: `access`, living `expires_in` seconds, with the refresh token
/// `refresh`, and the fields of `more`.
fn answer(access: &str, expires_in: u64, refresh: Option<&str>, more: Value) -> Value {
    let mut body =
        json!({"access_token": access, "token_type": "Bearer", "expires_in": expires_in});
    if let Some(refresh) = refresh {
        body["refresh_token"] = refresh.into();
    }
    for (k, v) in more.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

/// Two routes for one resource with different `scopes` (least privilege per upstream): the token
/// one route's refresh asked for with its scopes is never sent to the other route's upstream.
/// The session's tokens are kept by resource, scopes and grant (`RouteConfig::token_key`), as
/// the client-credentials cache keeps its own; by resource alone, the admin-scoped token reached
/// the reports upstream.
#[tokio::test]
async fn a_token_refreshed_for_one_routes_scopes_never_reaches_another_routes_upstream() {
    let case = setup_with(|u| {
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
        .login_with(answer("login-access", 300, Some("rt-1"), json!({})))
        .await;
    case.idp.state.script(
        REFRESH,
        200,
        answer(
            "admin-scoped",
            300,
            Some("rt-2"),
            json!({"scope": "api.admin"}),
        ),
    );
    case.idp.state.script(
        REFRESH,
        200,
        answer(
            "read-scoped",
            300,
            Some("rt-3"),
            json!({"scope": "api.read"}),
        ),
    );
    let r = case.get(&cookie, "/admin/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        case.up.authorizations("/admin/x"),
        vec!["Bearer admin-scoped"]
    );
    let grants = case.requests(REFRESH);
    assert_eq!(field(&grants[0], "scope"), Some("api.admin"));

    let r = case.get(&cookie, "/reports/y").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        case.up.authorizations("/reports/y"),
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
    let case = setup_with(|u| {
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
    // The login's default token is due at once.
    let cookie = case
        .login_with(answer("login-access", 0, Some("rt-login"), json!({})))
        .await;
    // /exchanged/: the subject token is refreshed first, then exchanged.
    case.idp
        .state
        .script(REFRESH, 200, answer("base-2", 0, Some("rt-2"), json!({})));
    case.idp.state.script(
        EXCHANGE,
        200,
        answer(
            "exchanged-at",
            300,
            None,
            json!({"issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
               "refresh_token": "rt-for-exchanged-audience"}),
        ),
    );
    let r = case.get(&cookie, "/exchanged/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        case.up.authorizations("/exchanged/x"),
        vec!["Bearer exchanged-at"]
    );
    // The provider answers a refresh with the exchange's refresh token with a token for the
    // exchanged audience.
    case.idp.state.script(
        REFRESH,
        200,
        answer(
            "token-with-exchanged-audience",
            300,
            Some("rt-3"),
            json!({}),
        ),
    );
    // base-2 is due: /api/ refreshes it.
    case.due();
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

/// A session without a refresh token (a provider that issues none, e.g. no `offline_access`)
/// and an access token valid by its lifetime: one upstream answering `401 invalid_token`
/// (attacker 5, or any buggy API) gets its answer relayed, and the session stays. The forced
/// refresh found no refresh token and ended the session: one upstream signed its users out of
/// every route.
#[tokio::test]
async fn an_upstreams_401_does_not_end_a_session_whose_token_is_still_valid() {
    let case = setup_with(|u| {
        format!("[[routes]]\npath = \"/api/\"\nupstream = \"{u}\"\ntoken = \"user\"\n")
    })
    .await;
    let cookie = case
        .login_with(answer("login-access", 3600, None, json!({})))
        .await;
    assert_eq!(case.get(&cookie, "/api/before").await.status, 200);
    // The recording upstream answers `.../status401` with `401` and `invalid_token`.
    let r = case.get(&cookie, "/api/status401").await;
    assert!(!case.up.authorizations("/status401").is_empty());
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
    let case = setup_with(|u| {
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
        .login_with(answer(
            "login-access",
            300,
            Some("rt-1"),
            json!({"scope": "openid profile email offline_access api.read api.admin"}),
        ))
        .await;
    case.idp.state.script(
        REFRESH,
        200,
        answer(
            "read-scoped",
            300,
            Some("rt-2"),
            json!({"scope": "api.read"}),
        ),
    );
    let r = case.get(&cookie, "/narrow/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(
        case.up.authorizations("/narrow/x"),
        vec!["Bearer login-access"],
        "the route with scopes = [\"api.read\"] was sent the login's token with every scope"
    );
}

/// RFC 6749 §5.1 (`token_type` REQUIRED) and §7.1 (a client MUST NOT use a token whose type it
/// does not understand): with DPoP off, a refreshed DPoP-bound token, a `mac` token or an answer
/// without `token_type` is refused as the code grant's is (503, the session kept), never sent
/// upstream as `Authorization: Bearer …`.
#[tokio::test]
async fn a_refreshed_token_of_another_type_is_never_sent_as_bearer() {
    let mut leaked = Vec::new();
    for (case, token_type) in [
        ("dpop", json!("DPoP")),
        ("mac", json!("mac")),
        ("absent", Value::Null),
    ] {
        let c = setup().await;
        let cookie = c.login(0).await;
        let mut body = json!({"access_token": format!("odd-{case}"), "expires_in": 300,
                              "refresh_token": "refresh-2"});
        if !token_type.is_null() {
            body["token_type"] = token_type;
        }
        c.idp.state.script(REFRESH, 200, body);
        let r = c.get(&cookie, "/api/x").await;
        if c.up
            .authorizations("/api/x")
            .contains(&format!("Bearer odd-{case}"))
        {
            leaked.push(format!("{case} (status {})", r.status));
        }
        assert_eq!(r.status, 503, "{case}: {}", r.text());
        assert!(
            c.proxy.signed_in(&cookie).await,
            "{case}: the session ended"
        );
    }
    assert!(leaked.is_empty(), "sent as Bearer tokens: {leaked:?}");
}

/// RFC 8693 §2.2.1: an exchange answer's `issued_token_type` is REQUIRED and says what the
/// `access_token` member holds. Vestibule asks for an access token; an answer without the type,
/// or with another (an ID token, a refresh token, a SAML assertion), is the provider's fault
/// (503, the session kept), and its token is never sent upstream.
#[tokio::test]
async fn an_exchange_answer_not_stating_an_access_token_is_never_sent_upstream() {
    let mut sent = Vec::new();
    for (case, issued) in [
        ("absent", Value::Null),
        (
            "id_token",
            json!("urn:ietf:params:oauth:token-type:id_token"),
        ),
        (
            "refresh_token",
            json!("urn:ietf:params:oauth:token-type:refresh_token"),
        ),
        ("saml2", json!("urn:ietf:params:oauth:token-type:saml2")),
        ("number", json!(1)),
    ] {
        let c = setup().await;
        let cookie = c.login(300).await;
        let more = match issued {
            Value::Null => json!({}),
            issued => json!({ "issued_token_type": issued }),
        };
        c.idp.state.script(
            EXCHANGE,
            200,
            answer(&format!("odd-{case}"), 300, None, more),
        );
        let r = c.get(&cookie, "/exchanged/x").await;
        if c.up
            .authorizations("/exchanged/x")
            .contains(&format!("Bearer odd-{case}"))
        {
            sent.push(format!("{case} (status {})", r.status));
            continue;
        }
        assert_eq!(r.status, 503, "{case}: {}", r.text());
        assert!(
            c.proxy.signed_in(&cookie).await,
            "{case}: the session ended"
        );
        // The fake provider's own answer states the access-token type: it is used.
        let r = c.get(&cookie, "/exchanged/x").await;
        assert_eq!(r.status, 200, "{case}: {}", r.text());
        assert_eq!(c.bearer(), "Bearer exchanged-for-https://exchanged.example");
    }
    assert!(sent.is_empty(), "sent upstream: {sent:?}");
}

/// A refresh answer whose `expires_in` is no non-negative integer (negative, a fraction, a
/// float beyond any integer, a string) is the provider's fault, as at login
/// (`expires_in_invalid`): 503, the session kept, its token never used.
#[tokio::test]
async fn a_refresh_answer_with_an_unusable_expires_in_is_refused_and_the_session_kept() {
    let c = setup().await;
    let cookie = c.login(0).await;
    for expires_in in [
        json!(-1),
        json!(1.5),
        json!(1e30),
        json!("300"),
        json!([300]),
    ] {
        c.idp.state.script(
            REFRESH,
            200,
            json!({"access_token": "odd-lifetime", "token_type": "Bearer",
                   "expires_in": expires_in, "refresh_token": "refresh-2"}),
        );
        let r = c.get(&cookie, "/api/x").await;
        assert_eq!(r.status, 503, "{expires_in}: {}", r.text());
        assert!(
            c.proxy.signed_in(&cookie).await,
            "{expires_in}: the session ended"
        );
    }
    assert!(
        !c.up
            .authorizations("/api/x")
            .contains(&"Bearer odd-lifetime".to_string()),
        "a token with an unusable lifetime was sent upstream"
    );
    assert_eq!(c.requests(REFRESH).len(), 5, "each answer was asked for");
}

/// Other writes of the session (idle-timeout touches) that come between each of a refresh's
/// attempts to save its answer never cost the rotated refresh token: the provider has spent
/// the one presented, and the answer holds the only copy of the new one. The answer is kept
/// and saved once the session stops changing, and the next refresh presents the rotated token.
#[tokio::test]
async fn a_refresh_answer_that_loses_every_save_to_other_writes_is_kept_and_saved() {
    let c = setup().await;
    let cookie = c.login(0).await;
    // A touch now, so that the refresh's request writes nothing else.
    assert_eq!(c.user(&cookie).await.status, 200);
    c.idp
        .state
        .script(REFRESH, 200, refreshed("access-2", "refresh-2", None));
    let vestibule::session::Store::Memory(store) = c.proxy.app.sessions.store() else {
        panic!("the test's proxy keeps its sessions in memory");
    };
    // More writes in between than the save makes attempts.
    store.lose_next_writes(8);
    let r = c.get(&cookie, "/api/one").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(c.bearer(), "Bearer access-2");

    c.clock.advance(std::time::Duration::from_secs(300));
    c.idp
        .state
        .script(REFRESH, 200, refreshed("access-3", "refresh-3", None));
    let r = eventually(
        "the next refresh is answered",
        std::time::Duration::from_secs(10),
        || async {
            let r = c.get(&cookie, "/api/two").await;
            (r.status != 503).then_some(r)
        },
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let presented: Vec<_> = c
        .requests(REFRESH)
        .iter()
        .map(|form| field(form, "refresh_token").unwrap().to_string())
        .collect();
    assert_eq!(
        presented,
        ["login-refresh", "refresh-2"],
        "the rotated refresh token was lost"
    );
    assert_eq!(c.bearer(), "Bearer access-3");
    assert_eq!(c.user(&cookie).await.status, 200);
}

/// A back-channel logout of `sid` (and alice) from the fake provider, as its token `jti`.
async fn backchannel_logout(c: &Case, jti: &str, sid: &str) -> Reply {
    let mut claims =
        vestibule::jose::testing::logout_token_claims(&c.idp.issuer, "vestibule", now());
    claims["jti"] = jti.into();
    claims["sid"] = sid.into();
    let token = c
        .signer
        .token(TestKey::Rsa1)
        .kid("k1")
        .typ("logout+jwt")
        .sign(&claims);
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("logout_token", &token)
        .finish();
    send(
        http::Request::post(c.proxy.url("/bff/backchannel-logout"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from(form)))
            .unwrap(),
    )
    .await
}

/// Signs alice in (in provider session `session-1`) and refreshes her token with an ID token
/// naming provider session `session-2`. Returns the session cookie.
async fn moved_to_another_provider_session(c: &Case) -> String {
    let cookie = c.login(0).await;
    let mut moved = alice(&c.idp.issuer, None, &["reader"]);
    moved["sid"] = json!("session-2");
    c.idp.state.script(
        REFRESH,
        200,
        refreshed("access-2", "refresh-2", Some(c.sign(&moved))),
    );
    let r = c.get(&cookie, "/api/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    cookie
}

/// A refreshed ID token naming another provider session (`sid`) moves the session there: the
/// provider's back-channel logout of that provider session ends it. One of the provider session
/// it was signed in with still ends it too (it was born there; ending it is never wrong).
#[tokio::test]
async fn a_refresh_into_another_provider_session_is_ended_by_the_logout_of_either() {
    let c = setup().await;
    let cookie = moved_to_another_provider_session(&c).await;
    let r = backchannel_logout(&c, "logout-new", "session-2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !c.proxy.signed_in(&cookie).await,
        "the session outlived the back-channel logout of its current provider session"
    );

    let cookie = moved_to_another_provider_session(&c).await;
    let r = backchannel_logout(&c, "logout-old", "session-1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !c.proxy.signed_in(&cookie).await,
        "the session outlived the back-channel logout of the provider session it began in"
    );
}
