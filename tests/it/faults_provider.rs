//! Provider outages, with a provider that can be taken down (its port closed, its connections
//! cut) or hung (it accepts and never answers), and brought back on the same address. Sessions
//! whose tokens are still fresh keep working without calling it; what needs it answers 503
//! (`Retry-After` for API calls, a readable page for a browser); everything recovers by itself;
//! a failed key-set refetch breaks no valid session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::upstream::{self, Upstream};
use crate::support::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;
use vestibule::app::now;
use vestibule::jose::testing::{TestKey, TestSigner};
use vestibule::session::{AccessToken, Session};

const API: &str = "https://api.example.test";
/// A provider call that fails fast (refused) is answered well within this.
const QUICK: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(10);

const UP: u8 = 0;
const HUNG: u8 = 1;

/// An OpenID provider on a fixed loopback address: discovery, a key set, and a token endpoint
/// whose refresh grant issues `at-N` / `rt-N`.
struct Idp {
    addr: SocketAddr,
    state: Arc<IdpState>,
    /// The listener and every connection task, aborted by [`Idp::down`].
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

/// What every connection of the provider shares.
struct IdpState {
    issuer: String,
    /// The key set it publishes (a test may rotate it).
    jwks: Mutex<Vec<u8>>,
    mode: AtomicU8,
    calls: AtomicUsize,
    grants: AtomicUsize,
}

impl std::ops::Deref for Idp {
    type Target = IdpState;
    fn deref(&self) -> &IdpState {
        &self.state
    }
}

impl Idp {
    async fn start(jwks: Vec<u8>) -> Idp {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let idp = Idp {
            addr,
            state: Arc::new(IdpState {
                issuer: format!("http://{addr}"),
                jwks: Mutex::new(jwks),
                mode: AtomicU8::new(UP),
                calls: AtomicUsize::new(0),
                grants: AtomicUsize::new(0),
            }),
            tasks: Arc::default(),
        };
        idp.up();
        idp
    }

    /// Listening (again) on its address and answering.
    fn up(&self) {
        self.mode.store(UP, Ordering::SeqCst);
        // The listener of a `down()` just before closes when its aborted task is dropped, on
        // another thread: retry the bind briefly rather than race it.
        let mut tries = 0;
        let listener = loop {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            match socket.bind(self.addr).and_then(|()| socket.listen(64)) {
                Ok(listener) => break listener,
                Err(error) if tries < 200 => {
                    tries += 1;
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("the provider could not listen again: {error}"),
            }
        };
        let (state, tasks) = (self.state.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = state.clone();
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move {
                        state.calls.fetch_add(1, Ordering::SeqCst);
                        if state.mode.load(Ordering::SeqCst) == HUNG {
                            std::future::pending::<()>().await;
                        }
                        let jwks = state.jwks.lock().unwrap().clone();
                        Ok::<_, Infallible>(answer(req, &state.issuer, &jwks, &state.grants).await)
                    }
                });
                let conn = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Connection refused, and open connections cut.
    fn down(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accepts (the kernel does) and reads, never answers.
    fn hang(&self) {
        self.mode.store(HUNG, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn answer(
    req: Request<Incoming>,
    issuer: &str,
    jwks: &[u8],
    grants: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let json = |v: serde_json::Value| {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    match req.uri().path() {
        "/.well-known/openid-configuration" => json(serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })),
        "/jwks" => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(jwks.to_vec())))
            .unwrap(),
        "/token" => {
            let n = grants.fetch_add(1, Ordering::SeqCst) + 1;
            json(serde_json::json!({
                "access_token": format!("at-{n}"),
                "token_type": "Bearer",
                "expires_in": 300,
                "refresh_token": format!("rt-{n}"),
            }))
        }
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    }
}

struct Setup {
    proxy: Proxy,
    idp: Idp,
    upstream: Upstream,
    signer: TestSigner,
}

/// A proxy in front of the provider: `/api/` needs a session and attaches its access token;
/// `/jwt/` also checks a `roles` requirement, against the access token when it validates.
async fn setup(oidc: impl FnOnce(TomlConfig) -> TomlConfig) -> Setup {
    let signer = TestSigner::new();
    let idp = Idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let upstream = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{up}\"\nauth = \"required\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/jwt/\"\nupstream = \"{up}\"\nauth = \"required\"\ntoken = \"user\"\n\
         resource = \"{API}\"\nrequire = {{ roles = [\"writer\"] }}\n\
         [[routes]]\npath = \"/svc/\"\nupstream = \"{up}\"\ntoken = \"client\"\n",
        up = upstream.url()
    );
    let text = oidc(config_toml(&routes).set("oidc.issuer", idp.issuer.as_str()));
    let proxy = start_proxy(&text).await;
    wait_ready(&proxy).await;
    Setup {
        proxy,
        idp,
        upstream,
        signer,
    }
}

impl Setup {
    /// A session holding `tokens` (by resource, `""` for the default) and a refresh token.
    async fn session(&self, tokens: &[(&str, &str, u64)]) -> String {
        self.session_with(tokens, serde_json::Map::new()).await
    }

    /// [`Setup::session`], whose sign-in said `claims`.
    async fn session_with(
        &self,
        tokens: &[(&str, &str, u64)],
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> String {
        let mut map = BTreeMap::new();
        for (resource, value, expires_at) in tokens {
            map.insert(
                (*resource).to_string(),
                AccessToken {
                    value: (*value).to_string(),
                    expires_at: *expires_at,
                    issued_at: now().saturating_sub(60),
                    scope: None,
                    jkt: None,
                },
            );
        }
        let session = Session {
            sub: "alice".into(),
            tokens: map.into(),
            refresh_token: Some("rt-0".into()),
            claims: claims.into(),
            ..Session::default()
        };
        let app = &self.proxy.app;
        let (value, _) = app.sessions.create(session, now()).await.unwrap();
        format!("{}={value}", app.live.load().config.session.cookie_name)
    }

    fn bearer_seen(&self) -> String {
        self.upstream
            .last()
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// A JWT access token for the API, signed with `key` under `kid`.
    fn jwt(&self, key: TestKey, kid: &str, roles: &[&str]) -> String {
        let claims = serde_json::json!({
            "iss": self.idp.issuer,
            "aud": API,
            "sub": "alice",
            "exp": now() + 300,
            "iat": now(),
            "roles": roles,
        });
        self.signer.token(key).kid(kid).sign(&claims)
    }
}

/// An API call with the session `cookie` (and the CSRF header token routes want).
async fn call(url: &str, cookie: &str) -> Reply {
    get(url, &[("cookie", cookie), ("x-csrf", "1")]).await
}

/// Asserts a 503 `provider_unavailable` JSON with `Retry-After`.
fn assert_provider_unavailable(reply: &Reply) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"], "provider_unavailable");
    let retry: u64 = reply
        .header("retry-after")
        .expect("a Retry-After header")
        .parse()
        .unwrap();
    assert!(retry > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_provider_down_or_hung_fresh_tokens_keep_working_without_calling_it() {
    let s = setup(|c| c).await;
    let cookie = s.session(&[("", "at-fresh", now() + 300)]).await;
    let url = s.proxy.url("/api/x");
    let calls = s.idp.calls();
    for outage in ["down", "hung"] {
        match outage {
            "down" => s.idp.down(),
            _ => {
                s.idp.up();
                s.idp.hang();
            }
        }
        for _ in 0..5 {
            let started = Instant::now();
            let reply = call(&url, &cookie).await;
            assert_eq!(reply.status, 200, "provider {outage}: {}", reply.text());
            assert!(started.elapsed() < QUICK, "provider {outage}: waited on it");
            assert_eq!(s.bearer_seen(), "Bearer at-fresh");
        }
    }
    assert_eq!(s.idp.calls(), calls, "the provider was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_the_provider_down_is_a_quick_503_with_retry_after_and_recovers_by_itself() {
    let s = setup(|c| c).await;
    let cookie = s.session(&[("", "at-expired", now() - 10)]).await;
    let url = s.proxy.url("/api/x");
    s.idp.down();
    for _ in 0..3 {
        let started = Instant::now();
        let reply = call(&url, &cookie).await;
        assert_provider_unavailable(&reply);
        assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "nothing reached the API without a token"
    );
    s.idp.up();
    let reply = eventually("the session works again", DEADLINE, || async {
        let reply = call(&url, &cookie).await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        s.bearer_seen(),
        "Bearer at-1",
        "refreshed once the provider was back"
    );
}

/// [`setup`] with `oidc.provider_timeout` set to `timeout`.
async fn setup_with_provider_timeout(timeout: Duration) -> Setup {
    setup(|c| {
        c.add(
            "oidc.provider_timeout",
            format!("{}ms", timeout.as_millis()),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_the_provider_hung_is_a_503_with_retry_after_within_provider_timeout() {
    let timeout = Duration::from_secs(1);
    let s = setup_with_provider_timeout(timeout).await;
    let cookie = s.session(&[("", "at-expired", now() - 10)]).await;
    let url = s.proxy.url("/api/x");
    s.idp.hang();
    let started = Instant::now();
    let reply = call(&url, &cookie).await;
    assert_provider_unavailable(&reply);
    assert!(
        started.elapsed() < timeout + Duration::from_millis(700),
        "took {:?}",
        started.elapsed()
    );
    s.idp.down();
    s.idp.up();
    eventually("the session works again", DEADLINE, || async {
        (call(&url, &cookie).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_requests_during_a_hung_provider_share_one_wait_not_queue_one_each() {
    let timeout = Duration::from_secs(1);
    let s = setup_with_provider_timeout(timeout).await;
    let url = s.proxy.url("/svc/x");
    s.idp.hang();
    let calls = s.idp.calls();
    let started = Instant::now();
    let replies = futures_util::future::join_all((0..6).map(|_| {
        let url = url.clone();
        async move {
            let reply = get(&url, &[("x-csrf", "1")]).await;
            (reply, started.elapsed())
        }
    }))
    .await;
    for (reply, took) in &replies {
        assert_provider_unavailable(reply);
        // Each waits for the grant under way (or shares its failure), never for one grant of
        // its own after another's.
        assert!(
            *took < timeout * 2 + Duration::from_millis(700),
            "a client-credentials request took {took:?} behind the others"
        );
    }
    assert!(
        s.idp.calls() - calls <= 2,
        "{} grants for 6 requests",
        s.idp.calls() - calls
    );
    s.idp.down();
    s.idp.up();
    eventually("client tokens work again", DEADLINE, || async {
        (get(&url, &[("x-csrf", "1")]).await.status == 200).then_some(())
    })
    .await;
    assert!(
        s.bearer_seen().starts_with("Bearer at-"),
        "{}",
        s.bearer_seen()
    );
}

/// Asserts a readable 503 page: HTML, a sentence for a person, the code, no internals.
fn assert_readable_page(reply: &Reply, idp: &Idp) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        reply.headers
    );
    let page = reply.text();
    assert!(
        page.contains("The identity provider is unavailable"),
        "{page}"
    );
    assert!(page.contains("provider_unavailable"), "{page}");
    let port = idp.addr.port().to_string();
    for internal in [
        port.as_str(),
        "127.0.0.1",
        "tcp",
        "connect",
        "refused",
        "hyper",
    ] {
        assert!(
            !page.to_lowercase().contains(internal),
            "{internal:?} in {page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_with_the_provider_down_shows_a_readable_503_page_and_recovers_by_itself() {
    let s = setup(|c| c).await;
    let html = [("accept", "text/html")];
    // Signing in: the redirect to the provider, then the provider goes down before the callback.
    let login = get(&s.proxy.url("/bff/login?returnUrl=/app"), &html).await;
    assert_eq!(login.status, 302, "{}", login.text());
    let location = login.header("location").unwrap().to_string();
    let state = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let cookie = login
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("; ");
    s.idp.down();
    let callback = s
        .proxy
        .url(&format!("/bff/callback?code=abc&state={state}"));
    let reply = get(&callback, &[("accept", "text/html"), ("cookie", &cookie)]).await;
    assert_readable_page(&reply, &s.idp);

    // A proxy that starts while the provider is down: not ready, and a login gets the page.
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\n",
        s.upstream.url()
    );
    let text = config_toml(&routes).set("oidc.issuer", s.idp.issuer.as_str());
    let cold = start_proxy(&text).await;
    let reply = get(&cold.url("/bff/login?returnUrl=/app"), &html).await;
    assert_readable_page(&reply, &s.idp);
    let ready = get(&format!("http://{}/readyz", cold.admin), &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["provider"], false);
    s.idp.up();
    wait_ready(&cold).await;
    let login = get(&cold.url("/bff/login?returnUrl=/app"), &html).await;
    assert_eq!(login.status, 302, "{}", login.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_key_set_refetch_breaks_no_valid_session() {
    let s = setup(|c| c).await;
    // The API's token says `writer` and is signed with the known key; the session's own claims
    // do not: the route admits it only if the token still validates.
    let valid = s.jwt(TestKey::Rsa1, "k1", &["writer"]);
    let cookie = s
        .session(&[("", "at-fresh", now() + 300), (API, &valid, now() + 300)])
        .await;
    // A token signed with a key the proxy has not seen makes it refetch the key set.
    let unknown = s.jwt(TestKey::Rsa2, "k2", &["writer"]);
    let stranger = s
        .session(&[("", "at-fresh", now() + 300), (API, &unknown, now() + 300)])
        .await;
    let url = s.proxy.url("/jwt/x");
    assert_eq!(call(&url, &cookie).await.status, 200);

    s.idp.down();
    // Its claims cannot be read now: refused, as they cannot decide (see below).
    assert_provider_unavailable(&call(&url, &stranger).await);
    // The periodic metadata refresh (at least a minute apart) fails too.
    assert!(s.proxy.app.oidc.provider.refresh().await.is_err());
    for _ in 0..3 {
        let reply = call(&url, &cookie).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(s.bearer_seen(), format!("Bearer {valid}"));
    }
    assert_eq!(call(&s.proxy.url("/api/x"), &cookie).await.status, 200);
    let ready = get(&format!("http://{}/readyz", s.proxy.admin), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
}

/// Whose claims `require` reads must not depend on the provider being reachable: the user's
/// JWT access token for the route says `reader` (the role was taken away since the sign-in),
/// the session's sign-in said `writer`. While the key set cannot be fetched, the token cannot be
/// checked; falling back to the session's claims then admitted the user as a writer. It is a
/// 503 now; once the keys are there, the token decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_outage_never_lets_the_session_claims_decide_for_the_token() {
    let s = setup(|c| c).await;
    let demoted = s.jwt(TestKey::Rsa2, "k2", &["reader"]);
    let mut signed_in_as = serde_json::Map::new();
    signed_in_as.insert("roles".into(), serde_json::json!(["writer"]));
    let cookie = s
        .session_with(
            &[("", "at-fresh", now() + 300), (API, &demoted, now() + 300)],
            signed_in_as,
        )
        .await;
    let url = s.proxy.url("/jwt/x");
    s.idp.down();
    let before = s.upstream.count();
    let reply = call(&url, &cookie).await;
    assert_provider_unavailable(&reply);
    assert_eq!(s.upstream.count(), before, "the request reached the API");
    // The provider back with the rotated key: the token's own roles decide.
    s.idp.up();
    *s.idp.state.jwks.lock().unwrap() = s
        .signer
        .jwks_json(&[(TestKey::Rsa1, "k1"), (TestKey::Rsa2, "k2")]);
    // The periodic metadata refresh, which also fetches the key set, rather than its wait.
    s.proxy.app.oidc.provider.refresh().await.unwrap();
    let reply = call(&url, &cookie).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()["missing"], serde_json::json!(["roles"]));
}

/// A fake provider on this host whose discovery names its own `path` as `field`, reached across
/// the link of a network namespace (the returned host cuts it); its signer, with key `k1` in
/// the set.
async fn provider_with_one_endpoint_behind_a_link(
    field: &str,
    path: &str,
) -> (
    TestSigner,
    crate::support::fake_idp::FakeIdp,
    crate::support::netns::NetHost,
) {
    let signer = TestSigner::new();
    let idp = crate::support::fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let mut host = crate::support::netns::NetHost::start();
    let local: SocketAddr = idp.issuer.trim_start_matches("http://").parse().unwrap();
    let at = host.reach(local).await;
    idp.state
        .discovery_extra
        .lock()
        .unwrap()
        .insert(field.into(), format!("http://{at}{path}").into());
    (signer, idp, host)
}

/// A proxy behind `idp` whose provider calls wait at most `timeout` (login limits out of the
/// way), ready, with `/api/` (signed in only; sent the user's token when `token`) to a new
/// upstream.
async fn proxy_behind(
    idp: &crate::support::fake_idp::FakeIdp,
    timeout: Duration,
    token: bool,
) -> (Proxy, Upstream) {
    let upstream = upstream::start().await;
    let token = if token { "token = \"user\"\n" } else { "" };
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\nauth = \"required\"\n{token}",
        upstream.url()
    );
    let text = config_toml(&routes)
        .set("oidc.issuer", idp.issuer.as_str())
        .add(
            "oidc.provider_timeout",
            format!("{}ms", timeout.as_millis()),
        )
        .add("limits.login_per_minute", 100_000)
        .add("limits.callback_per_minute", 100_000);
    let proxy = start_proxy(&text).await;
    wait_ready(&proxy).await;
    (proxy, upstream)
}

/// A login on `proxy` up to its callback, whose ID token `idp` issues signed with `key` under
/// the name `kid`.
async fn sign_in_with(
    proxy: &Proxy,
    idp: &crate::support::fake_idp::FakeIdp,
    signer: &TestSigner,
    key: TestKey,
    kid: &str,
) -> Reply {
    let (query, login_cookie) = begin_login(proxy).await;
    let claims =
        vestibule::jose::testing::id_token_claims(&idp.issuer, "vestibule", &query["nonce"], now());
    *idp.state.id_token.lock().unwrap() = signer.token(key).kid(kid).sign(&claims);
    callback(proxy, &query, &login_cookie).await
}

/// The provider's token endpoint across a real network link that goes dead (a partition: no
/// RST, no FIN, connection attempts unanswered), its discovery and key set on this host. While
/// it is cut, a refresh and a login's code exchange are 503 within `provider_timeout`, whether
/// the call goes out on a pooled connection or a new one; no session is lost; once the link is
/// back, both work again within a couple of seconds — not once a connection opened before the
/// cut is retransmitted on, or given up on, seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_behind_a_dead_link_is_503_fast_and_back_soon_after_the_link() {
    let timeout = Duration::from_secs(1);
    let slack = Duration::from_millis(700);
    let (signer, idp, host) =
        provider_with_one_endpoint_behind_a_link("token_endpoint", "/token").await;
    let (proxy, _upstream) = proxy_behind(&idp, timeout, true).await;
    let url = proxy.url("/api/x");
    // A session whose access token has expired: the next call refreshes it.
    let expired = || {
        let session = Session {
            sub: "alice".into(),
            tokens: BTreeMap::from([(
                String::new(),
                AccessToken {
                    value: "at-expired".into(),
                    expires_at: now() - 10,
                    issued_at: now() - 70,
                    scope: None,
                    jkt: None,
                },
            )])
            .into(),
            refresh_token: Some("rt-0".into()),
            ..Session::default()
        };
        proxy.session_cookie(session)
    };
    // A login up to its callback, with the ID token the provider will issue for it.
    let sign_in = || sign_in_with(&proxy, &idp, &signer, TestKey::Rsa1, "k1");

    // Connections to the token endpoint are pooled by now. (A refresh answer carries the ID
    // token of the last login.)
    assert_eq!(sign_in().await.status, 302);
    let warm = expired().await;
    let reply = call(&url, &warm).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    host.partition();
    let mut kept = Vec::new();
    for _ in 0..2 {
        let cookie = expired().await;
        let started = Instant::now();
        let reply = call(&url, &cookie).await;
        assert_provider_unavailable(&reply);
        assert!(
            started.elapsed() <= timeout + slack,
            "a refresh into the dead link took {:?}",
            started.elapsed()
        );
        kept.push(cookie);
        let started = Instant::now();
        let reply = sign_in().await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(
            started.elapsed() <= timeout + slack,
            "a code exchange into the dead link took {:?}",
            started.elapsed()
        );
    }
    // Long enough for the retransmission timers of connections into the dead link to back off
    // past several seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    host.heal();
    let healed = Instant::now();
    eventually("a refresh works again", Duration::from_secs(10), || async {
        (call(&url, &expired().await).await.status == 200).then_some(())
    })
    .await;
    eventually("a login works again", Duration::from_secs(10), || async {
        (sign_in().await.status == 302).then_some(())
    })
    .await;
    for cookie in &kept {
        let reply = call(&url, cookie).await;
        assert_eq!(reply.status, 200, "a session was lost: {}", reply.text());
    }
    let back = healed.elapsed();
    assert!(
        back <= Duration::from_secs(2),
        "refreshes and logins worked again only {back:?} after the link was back"
    );
    assert_eq!(call(&url, &warm).await.status, 200);
}

/// The provider's key set across a real network link that goes dead while the provider rotates
/// its keys. A login whose ID token names the new key cannot be checked while the link is cut:
/// its answer comes within `provider_timeout`, not after a fixed 10 s fetch (nor a periodic
/// refresh's fetch under way); once the link is back, such a login works within a couple of
/// seconds, not once 10 s have passed since the failed fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_behind_a_dead_link_is_waited_for_within_provider_timeout_and_back_soon() {
    let timeout = Duration::from_secs(1);
    let slack = Duration::from_millis(700);
    let (signer, idp, host) = provider_with_one_endpoint_behind_a_link("jwks_uri", "/jwks").await;
    let (proxy, _upstream) = proxy_behind(&idp, timeout, false).await;
    // A login whose ID token is signed with the key `kid` names.
    let sign_in = |key, kid| sign_in_with(&proxy, &idp, &signer, key, kid);
    assert_eq!(sign_in(TestKey::Rsa1, "k1").await.status, 302);

    // The provider rotates to a new key, which the proxy has not fetched; the link goes dead.
    *idp.state.jwks.lock().unwrap() =
        signer.jwks_json(&[(TestKey::Rsa1, "k1"), (TestKey::Rsa2, "k2")]);
    host.partition();
    for _ in 0..2 {
        let started = Instant::now();
        let reply = sign_in(TestKey::Rsa2, "k2").await;
        // The code is spent: the login is to be started again (400 `login_failed`), or 503.
        assert!(
            matches!(reply.status, 400 | 503),
            "{} {}",
            reply.status,
            reply.text()
        );
        assert!(
            started.elapsed() <= timeout + slack,
            "a login waited {:?} for a key set behind a dead link",
            started.elapsed()
        );
    }
    // A periodic refresh under way into the dead link holds no login up longer either.
    let provider = proxy.app.oidc.provider.clone();
    let refresh = tokio::spawn(async move { provider.refresh().await.is_ok() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let _ = sign_in(TestKey::Rsa2, "k2").await;
    assert!(
        started.elapsed() <= timeout + slack,
        "a login waited {:?} behind a periodic refresh into a dead link",
        started.elapsed()
    );
    // The old key keeps working meanwhile.
    assert_eq!(sign_in(TestKey::Rsa1, "k1").await.status, 302);
    tokio::time::sleep(Duration::from_secs(3)).await;
    host.heal();
    let healed = Instant::now();
    eventually(
        "a login with the new key works",
        Duration::from_secs(15),
        || async { (sign_in(TestKey::Rsa2, "k2").await.status == 302).then_some(()) },
    )
    .await;
    let back = healed.elapsed();
    assert!(
        back <= Duration::from_secs(2),
        "a login with the new key worked only {back:?} after the link was back"
    );
    refresh.abort();
}

/// A provider that accepts and never answers while Vestibule starts (a peer hung, or a link
/// that died under a connection): each attempt to fetch the discovery document gives up within
/// `provider_timeout`, not after a fixed 10 s, so once the provider answers again Vestibule is
/// ready within a couple of seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_hung_at_start_up_is_loaded_soon_after_it_answers_again() {
    let signer = TestSigner::new();
    let idp = Idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    idp.hang();
    let text = config_toml("")
        .set("oidc.issuer", idp.issuer.as_str())
        .add("oidc.provider_timeout", "1s");
    let proxy = start_proxy(&text).await;
    eventually("discovery is asked for", DEADLINE, || async {
        (idp.calls() > 0).then_some(())
    })
    .await;
    // The outage: long enough for an attempt given up within `provider_timeout` to be followed
    // by another one.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!proxy.app.oidc.provider.is_ready());
    // Answering again; the requests it holds stay unanswered, as across a link that died.
    idp.mode.store(UP, Ordering::SeqCst);
    let answering = Instant::now();
    eventually("the provider's metadata is loaded", DEADLINE, || async {
        proxy.app.oidc.provider.is_ready().then_some(())
    })
    .await;
    let back = answering.elapsed();
    assert!(
        back <= Duration::from_secs(2),
        "ready only {back:?} after the provider answered again"
    );
}

/// A periodic refresh of the metadata and keys that fails (here: the provider hung, given up on
/// within `provider_timeout`) is tried again within a second or so, not a whole period later:
/// a key the provider rotated to meanwhile, or a changed endpoint, is not missed for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_periodic_refresh_is_tried_again_soon_not_a_period_later() {
    let s = setup_with_provider_timeout(Duration::from_secs(1)).await;
    // A refresher of the test's own with a short period (the configured one is at least 1m).
    let period = Duration::from_secs(4);
    let before = s.idp.calls();
    let refresher = tokio::spawn(s.proxy.app.oidc.provider.clone().keep_fresh(period));
    // Its first round: the discovery document and the key set.
    eventually("the first refresh", DEADLINE, || async {
        (s.idp.calls() >= before + 2).then_some(())
    })
    .await;
    s.idp.hang();
    eventually("the periodic refresh", DEADLINE, || async {
        (s.idp.calls() >= before + 3).then_some(())
    })
    .await;
    let hung = Instant::now();
    // Answering again; the request it holds stays unanswered, as across a link that died.
    s.idp.mode.store(UP, Ordering::SeqCst);
    eventually("the refresh is tried again", DEADLINE, || async {
        (s.idp.calls() >= before + 4).then_some(())
    })
    .await;
    let again = hung.elapsed();
    assert!(
        again <= Duration::from_secs(2),
        "tried again {again:?} after the failed refresh began (period {period:?})"
    );
    refresher.abort();
}

/// A provider that answers each call of a login's callback slowly — the code exchange, the key
/// set (the ID token names a key not fetched yet), the UserInfo endpoint — each within
/// `provider_timeout`, all together longer than `server.request_timeout`: the browser gets the
/// readable 503 page within `request_timeout`, not once every call has been waited out; its
/// session from before is kept, and a login started again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_whose_provider_calls_together_outlast_the_request_timeout_is_a_503_within_it() {
    use vestibule::jose::testing::id_token_claims;
    let request_timeout = Duration::from_secs(2);
    let signer = TestSigner::new();
    let idp = crate::support::fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    *idp.state.userinfo.lock().unwrap() = Some((
        200,
        "application/json".into(),
        serde_json::json!({"sub": "alice"}).to_string(),
    ));
    let text = config_toml("")
        .set("oidc.issuer", idp.issuer.as_str())
        .set("server.request_timeout", "2s")
        .add("oidc.provider_timeout", "1500ms")
        .add("oidc.userinfo", true);
    let proxy = start_proxy(&text).await;
    wait_metadata(&proxy).await;
    let sign_in = |kid: &'static str, key: TestKey, cookie: String| {
        let (proxy, idp, signer) = (&proxy, &idp, &signer);
        async move {
            let (query, login_cookie) = begin_login(proxy).await;
            let claims = id_token_claims(&idp.issuer, "vestibule", &query["nonce"], now());
            *idp.state.id_token.lock().unwrap() = signer.token(key).kid(kid).sign(&claims);
            let url = proxy.url(&format!("/bff/callback?code=abc&state={}", query["state"]));
            let cookie = format!("{login_cookie}; {cookie}");
            get(&url, &[("cookie", &cookie), ("accept", "text/html")]).await
        }
    };
    let signed_in = sign_in("k1", TestKey::Rsa1, String::new()).await;
    assert_eq!(signed_in.status, 302, "{}", signed_in.text());
    let session = signed_in.session_cookie();
    assert!(proxy.signed_in(&session).await);

    // The provider rotates its key and slows down: 0.9 s per call, three calls.
    *idp.state.jwks.lock().unwrap() =
        signer.jwks_json(&[(TestKey::Rsa1, "k1"), (TestKey::Rsa2, "k2")]);
    *idp.state.delay.lock().unwrap() = Some(Duration::from_millis(900));
    let started = Instant::now();
    let reply = sign_in("k2", TestKey::Rsa2, session.clone()).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.text().contains("provider_unavailable"),
        "{}",
        reply.text()
    );
    assert!(
        took <= request_timeout + Duration::from_millis(500),
        "the callback took {took:?}"
    );
    assert!(
        proxy.signed_in(&session).await,
        "the browser's session was lost"
    );
    // The provider fast again: the browser starts the login again, and it works.
    *idp.state.delay.lock().unwrap() = None;
    let again = sign_in("k2", TestKey::Rsa2, session.clone()).await;
    assert_eq!(again.status, 302, "{}", again.text());
    assert!(proxy.signed_in(&again.session_cookie()).await);
}
