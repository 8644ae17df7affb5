//! Access tokens end to end against the real OpenID provider: refresh on expiry, exactly one
//! refresh grant per expiry under concurrency (one instance, and two instances on one Redis,
//! also with a provider slower than the refresh lease), `invalid_grant` and provider outages,
//! the retry after an upstream's `invalid_token`, client credentials and per-route audiences.
//! Every test checks what the upstream or the provider saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::redis::RedisServer;
use crate::support::stack::LoginStack;
use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vestibule::clock::TestClock;

/// Provider access token lifetime and the proxy's refresh skew: a token is due for refresh
/// `TTL - SKEW` seconds after it was issued and then stays fresh for about as long, which is far
/// more than a burst of requests takes.
const TTL: u64 = 8;
const SKEW: u64 = 4;
const API: &str = "https://api.example.test";
const OTHER_API: &str = "https://other-api.example.test";

/// An upstream that answers 401 `invalid_token` to the bearers in `rejected` and 200 with
/// `"accepted"` otherwise, recording every bearer it was shown.
#[derive(Clone, Default)]
struct Api {
    url: String,
    rejected: Arc<Mutex<HashSet<String>>>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl Api {
    async fn start() -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = Api {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Api::default()
        };
        let shared = api.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let api = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let api = api.clone();
                        async move {
                            let bearer = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            api.seen
                                .lock()
                                .unwrap()
                                .push((req.method().to_string(), bearer.clone()));
                            let token = bearer.strip_prefix("Bearer ").unwrap_or("");
                            let response = if api.rejected.lock().unwrap().contains(token) {
                                http::Response::builder()
                                    .status(401)
                                    .header("www-authenticate", "Bearer error=\"invalid_token\"")
                                    .body(Full::new(Bytes::from("rejected")))
                            } else {
                                http::Response::builder().body(Full::new(Bytes::from("accepted")))
                            };
                            Ok::<_, Infallible>(response.unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        api
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

/// The login stack (instances sharing one store: Redis when there are several), with the API
/// that checks the tokens it gets.
struct Stack {
    stack: LoginStack,
    api: Api,
    redis: Option<RedisServer>,
    /// The instances' clock: moved ahead rather than waited out.
    clock: TestClock,
}

impl std::ops::Deref for Stack {
    type Target = LoginStack;
    fn deref(&self) -> &LoginStack {
        &self.stack
    }
}

async fn stack(instances: usize, provider_extra: serde_json::Value) -> Stack {
    let mut extra = serde_json::json!({ "access_token_ttl": TTL });
    for (k, v) in provider_extra.as_object().unwrap() {
        extra[k] = v.clone();
    }
    let api = Api::start().await;
    let redis = (instances > 1).then(RedisServer::start);
    let store = redis.as_ref().map_or(String::new(), |r| {
        format!(
            "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
            r.url()
        )
    });
    let a = api.url.clone();
    let clock = TestClock::new();
    let stack = LoginStack::builder()
        .provider(extra)
        .instances(instances)
        .extra(move |u| {
            format!(
                r#"{store}
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/a/"
upstream = "{u}"
token = "user"
resource = "{API}"
[[routes]]
path = "/b/"
upstream = "{u}"
token = "user"
resource = "{OTHER_API}"
[[routes]]
path = "/svc/"
upstream = "{u}"
token = "client"
resource = "{API}"
[[routes]]
path = "/guarded/"
upstream = "{a}"
token = "user"
[[routes]]
path = "/based/"
upstream = "{u}/base"
strip_prefix = true
token = "user"
"#
            )
        })
        .config(|c| c.set("oidc.refresh_skew", format!("{SKEW}s")))
        .clock(clock.clock())
        .start()
        .await;
    Stack {
        stack,
        api,
        redis,
        clock,
    }
}

impl Stack {
    async fn stats(&self) -> serde_json::Value {
        self.provider.stats().await
    }

    async fn reset_stats(&self) {
        let r = self
            .provider
            .control("/_test/reset-stats", serde_json::json!({}))
            .await;
        assert_eq!(r.status, 200);
    }

    async fn behaviour(&self, behaviour: serde_json::Value) {
        let r = self.provider.control("/_test/behaviour", behaviour).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    async fn newest_access_token(&self, sub: &str) -> String {
        self.provider.tokens(sub).await["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Bearer tokens the recording upstream saw for paths containing `marker`, in order.
    fn bearers(&self, marker: &str) -> Vec<String> {
        self.up
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.contains(marker))
            .map(|s| {
                let value = s
                    .headers
                    .get("authorization")
                    .expect("no bearer")
                    .to_str()
                    .unwrap();
                value
                    .strip_prefix("Bearer ")
                    .expect("not a bearer")
                    .to_string()
            })
            .collect()
    }

    /// `n` concurrent GETs of `path` spread over the instances; every reply's status.
    /// `n` concurrent GETs of `path` spread over the instances; every reply.
    async fn burst(&self, browser: &Browser, n: usize, path: &str) -> Vec<Reply> {
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut b = browser.clone();
            let url = self.proxies[i % self.proxies.len()].url(&format!("{path}?i={i}"));
            tasks.push(tokio::spawn(async move {
                b.get(&url, &[("x-csrf", "1")]).await
            }));
        }
        let mut replies = Vec::new();
        for t in tasks {
            replies.push(t.await.unwrap());
        }
        replies
    }

    /// A [`Stack::burst`] that must succeed throughout.
    async fn burst_ok(&self, browser: &Browser, n: usize, path: &str) {
        for r in self.burst(browser, n, path).await {
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
}

impl Stack {
    /// Moves the instances' clock until a token issued just before the call is due for refresh
    /// (the provider's clock is not moved: it accepts a refresh at any time).
    fn until_due(&self) {
        self.clock
            .advance(Duration::from_millis((TTL - SKEW) * 1000 + 300));
    }
}

fn payload(jwt: &str) -> serde_json::Value {
    let part = jwt.split('.').nth(1).expect("not a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn audience(jwt: &str) -> String {
    match &payload(jwt)["aud"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.len() == 1 => a[0].as_str().unwrap().to_string(),
        other => panic!("unexpected aud {other}"),
    }
}

fn refresh_grants(stats: &serde_json::Value) -> u64 {
    stats["refresh_token"].as_u64().unwrap()
}

#[tokio::test]
async fn after_expiry_the_next_request_carries_a_new_token() {
    let s = stack(1, serde_json::json!({})).await;
    let mut browser = s.login("alice").await;
    let first = s.newest_access_token("alice").await;
    let r = browser
        .get(&s.proxies[0].url("/api/before"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.bearers("/before"), vec![first.clone()]);
    s.reset_stats().await;
    s.until_due();
    let r = browser
        .get(&s.proxies[0].url("/api/after"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let refreshed = s.newest_access_token("alice").await;
    assert_ne!(refreshed, first, "the provider issued no new token");
    assert_eq!(s.bearers("/after"), vec![refreshed.clone()]);
    // The new token is kept: the next request uses it without another grant.
    let r = browser
        .get(&s.proxies[0].url("/api/again"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.bearers("/again"), vec![refreshed]);
    assert_eq!(refresh_grants(&s.stats().await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_at_expiry_make_one_refresh_grant() {
    let s = stack(1, serde_json::json!({})).await;
    let browser = s.login("alice").await;
    s.reset_stats().await;
    s.until_due();
    s.burst_ok(&browser, 50, "/api/burst").await;
    let stats = s.stats().await;
    assert_eq!(refresh_grants(&stats), 1, "{stats}");
    let newest = s.newest_access_token("alice").await;
    let bearers = s.bearers("/burst");
    assert_eq!(bearers.len(), 50);
    assert!(
        bearers.iter().all(|b| *b == newest),
        "a request used an old token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_redis_refresh_once_and_rotation_keeps_working() {
    let s = stack(2, serde_json::json!({})).await;
    let browser = s.login("alice").await;
    s.reset_stats().await;
    for round in 1..=2u64 {
        s.until_due();
        let marker = format!("/round{round}");
        s.burst_ok(&browser, 40, &format!("/api{marker}")).await;
        let stats = s.stats().await;
        assert_eq!(refresh_grants(&stats), round, "round {round}: {stats}");
        assert_eq!(stats["token_errors"]["refresh_token"], 0, "{stats}");
        let newest = s.newest_access_token("alice").await;
        let bearers = s.bearers(&marker);
        assert_eq!(bearers.len(), 40);
        assert!(
            bearers.iter().all(|b| *b == newest),
            "round {round}: an old token was sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_slower_than_the_lease_still_gets_one_refresh_grant() {
    let s = stack(2, serde_json::json!({})).await;
    let browser = s.login("alice").await;
    s.reset_stats().await;
    s.until_due();
    s.behaviour(serde_json::json!({"token_delay_ms": 12000}))
        .await;
    let started = std::time::Instant::now();
    s.burst_ok(&browser, 20, "/api/slow-provider").await;
    assert!(started.elapsed() >= Duration::from_secs(12));
    s.behaviour(serde_json::json!({})).await;
    let stats = s.stats().await;
    assert_eq!(refresh_grants(&stats), 1, "{stats}");
    assert_eq!(stats["token_errors"]["refresh_token"], 0, "{stats}");
    let newest = s.newest_access_token("alice").await;
    assert!(s.bearers("/slow-provider").iter().all(|b| *b == newest));
}

#[tokio::test]
async fn invalid_grant_ends_the_session() {
    let s = stack(1, serde_json::json!({})).await;
    let mut browser = s.login("alice").await;
    s.until_due();
    s.behaviour(serde_json::json!({"token_status": 400, "token_error": "invalid_grant"}))
        .await;
    let r = browser
        .get(&s.proxies[0].url("/api/x"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "session_expired");
    assert_eq!(s.bearers("/x").len(), 0, "nothing may reach the upstream");
    s.behaviour(serde_json::json!({})).await;
    let user = browser
        .get(&s.proxies[0].url("/bff/user"), &[("x-csrf", "1")])
        .await;
    assert_eq!(
        user.status,
        401,
        "the session must be gone: {}",
        user.text()
    );
    let r = browser
        .get(&s.proxies[0].url("/api/y"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(refresh_grants(&s.stats().await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_outage_is_503_and_keeps_the_session() {
    let s = stack(1, serde_json::json!({})).await;
    let mut browser = s.login("alice").await;
    let first = s.newest_access_token("alice").await;
    s.until_due();
    s.reset_stats().await;
    // Slow and then failing: every request of the burst queues behind the first refresh and
    // shares its answer instead of trying the provider again.
    s.behaviour(serde_json::json!({"token_status": 503, "token_delay_ms": 1000}))
        .await;
    for r in s.burst(&browser, 20, "/api/down").await {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "provider_unavailable");
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(s.bearers("/down").len(), 0);
    assert_eq!(refresh_grants(&s.stats().await), 1);
    let user = browser
        .get(&s.proxies[0].url("/bff/user"), &[("x-csrf", "1")])
        .await;
    assert_eq!(user.status, 200, "the session must be kept");
    s.behaviour(serde_json::json!({})).await;
    let r = browser
        .get(&s.proxies[0].url("/api/up"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let newest = s.newest_access_token("alice").await;
    assert_ne!(newest, first);
    assert_eq!(s.bearers("/up"), vec![newest]);
    assert_eq!(refresh_grants(&s.stats().await), 2);
}

#[tokio::test]
async fn an_upstream_invalid_token_answer_is_retried_once_with_a_refreshed_token() {
    let s = stack(1, serde_json::json!({})).await;
    let mut browser = s.login("alice").await;
    let first = s.newest_access_token("alice").await;
    // `invalid_token` anywhere but in a Bearer challenge's `error` is not a rejected token: the
    // upstream's 401 is the client's answer, sent once, and the provider is not asked for a
    // token (an upstream must not turn its every answer into a grant by its wording).
    s.reset_stats().await;
    for (i, challenge) in [
        r#"Bearer error="insufficient_scope", error_description="the invalid_token flag""#,
        r#"Bearer realm="invalid_token""#,
        r#"Basic realm="api", error="invalid_token""#,
        r#"Bearer error="insufficient_scope", error_description="a \"invalid_token\" b""#,
    ]
    .into_iter()
    .enumerate()
    {
        let r = browser
            .get(
                &s.proxies[0].url(&format!("/api/challenge401?described{i}")),
                &[("x-csrf", "1"), ("x-challenge", challenge)],
            )
            .await;
        assert_eq!(r.status, 401, "{challenge}");
        assert_eq!(r.text(), "no");
        assert_eq!(r.header("www-authenticate"), Some(challenge));
        let seen = s.bearers(&format!("/challenge401?described{i}"));
        assert_eq!(seen, vec![first.clone()], "sent once: {challenge}");
        assert_eq!(refresh_grants(&s.stats().await), 0, "{challenge}");
    }
    assert_eq!(s.newest_access_token("alice").await, first);
    // The API has revoked the (not yet expiring) token: one refresh, one retry, the client
    // sees the second answer.
    s.api.rejected.lock().unwrap().insert(first.clone());
    s.reset_stats().await;
    let r = browser
        .get(&s.proxies[0].url("/guarded/data"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "accepted");
    let newest = s.newest_access_token("alice").await;
    assert_ne!(newest, first);
    let seen = s.api.seen();
    assert_eq!(
        seen,
        vec![
            ("GET".to_string(), format!("Bearer {first}")),
            ("GET".to_string(), format!("Bearer {newest}")),
        ]
    );
    assert_eq!(refresh_grants(&s.stats().await), 1);
    // The refreshed token is kept for later requests.
    let r = browser
        .get(&s.proxies[0].url("/guarded/more"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.api.seen().len(), 3);

    // Right after that early refresh, another rejection is not retried: an upstream that
    // rejects every token must not turn each request into a grant.
    let r = browser
        .get(
            &s.proxies[0].url("/api/status401?alice"),
            &[("x-csrf", "1")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(s.bearers("/status401?alice").len(), 1);
    assert_eq!(refresh_grants(&s.stats().await), 1);

    // Another session and an upstream that rejects every token: exactly one retry, the client
    // gets the second answer.
    let mut bob = s.login("bob").await;
    s.reset_stats().await;
    let r = bob
        .get(
            &s.proxies[0].url("/api/status401?bob"),
            &[("x-csrf", "1"), ("x-client-note", "kept")],
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "no");
    let bearers = s.bearers("/status401?bob");
    assert_eq!(bearers.len(), 2, "one request and one retry");
    // The retry is the same request: the client's own fields go with it again.
    let notes: Vec<Option<String>> =
        s.up.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri.contains("/status401?bob"))
            .map(|r| {
                let note = r.headers.get("x-client-note");
                note.map(|v| v.to_str().unwrap().to_string())
            })
            .collect();
    assert_eq!(notes, [Some("kept".to_string()), Some("kept".to_string())]);
    assert_ne!(bearers[0], bearers[1]);
    assert_eq!(bearers[1], s.newest_access_token("bob").await);
    assert_eq!(refresh_grants(&s.stats().await), 1);

    // A request with a body is not replayed.
    let r = bob
        .request(
            "POST",
            &s.proxies[0].url("/api/status401?post"),
            &[("x-csrf", "1")],
            Some("a=1".into()),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(s.bearers("/status401?post").len(), 1);
    assert_eq!(refresh_grants(&s.stats().await), 1);

    // The retry goes where the first went, though the upstream's URI is made of the request's
    // own (a base path, a prefix taken off). A session of its own: the last one's token was just
    // replaced, and is not replaced again so soon.
    let mut again = s.login("bob").await;
    let r = again
        .get(
            &s.proxies[0].url("/based/status401?dave"),
            &[("x-csrf", "1")],
        )
        .await;
    assert_eq!(r.status, 401);
    let uris: Vec<String> =
        s.up.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.uri.contains("status401?dave"))
            .map(|r| r.uri.clone())
            .collect();
    assert_eq!(uris, ["/base/status401?dave", "/base/status401?dave"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_credentials_are_fetched_once_with_the_route_audience() {
    let s = stack(1, serde_json::json!({})).await;
    s.reset_stats().await;
    let counted = grant_count(&s.proxies[0], "client_credentials", "ok").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = s.proxies[0].url(&format!("/svc/call?i={i}"));
        tasks.push(tokio::spawn(
            async move { get(&url, &[("x-csrf", "1")]).await },
        ));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stats = s.stats().await;
    assert_eq!(stats["client_credentials"], 1, "{stats}");
    assert_eq!(refresh_grants(&stats), 0);
    let bearers = s.bearers("/svc/call");
    assert_eq!(bearers.len(), 10);
    assert!(bearers.iter().all(|b| *b == bearers[0]));
    assert_eq!(audience(&bearers[0]), API);
    assert_eq!(payload(&bearers[0])["client_id"], "vestibule");
    // Operators can see the grants. The recorder is process-wide and tests/it/client_auth.rs
    // makes client-credentials grants too, possibly at the same time: at least this one counted.
    let now_counted = grant_count(&s.proxies[0], "client_credentials", "ok").await;
    assert!(now_counted > counted, "{counted} -> {now_counted}");
}

#[tokio::test]
async fn each_route_gets_a_token_for_its_own_resource() {
    let s = stack(1, serde_json::json!({})).await;
    let mut browser = s.login("alice").await;
    for (path, resource) in [("/a/one", API), ("/b/one", OTHER_API), ("/a/two", API)] {
        let r = browser
            .get(&s.proxies[0].url(path), &[("x-csrf", "1")])
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let bearers = s.bearers(path);
        assert_eq!(bearers.len(), 1);
        assert_eq!(audience(&bearers[0]), resource, "{path}");
        assert_eq!(payload(&bearers[0])["sub"], "alice");
    }
    // Each resource's token is kept: /a/two reused the one /a/one got.
    assert_eq!(s.bearers("/a/one"), s.bearers("/a/two"));
    assert_ne!(s.bearers("/a/one"), s.bearers("/b/one"));
}

/// The metric `vestibule_token_grants_total` for `grant` and `outcome` at `proxy` (0 if absent).
/// The recorder is process-wide: other tests' grants count too, so compare before and after.
async fn grant_count(proxy: &Proxy, grant: &str, outcome: &str) -> u64 {
    let metrics = get(&format!("http://{}/metrics", proxy.admin), &[])
        .await
        .text();
    metrics
        .lines()
        .find(|l| {
            l.starts_with("vestibule_token_grants_total{")
                && l.contains(&format!("grant=\"{grant}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_outlives_the_request_that_started_it() {
    let s = stack(2, serde_json::json!({})).await;
    let browser = s.login("alice").await;
    let first = s.newest_access_token("alice").await;
    s.reset_stats().await;
    s.until_due();
    // The provider stalls; the request that starts the refresh is abandoned by its client while
    // the grant is on its way (the lease is taken just before the grant is sent).
    s.provider.pause();
    let mut b = browser.clone();
    let url = s.proxies[0].url("/api/abandoned");
    let abandoned = tokio::spawn(async move { b.get(&url, &[("x-csrf", "1")]).await });
    let redis = s.redis.as_ref().unwrap();
    eventually(
        "the refresh lease is taken",
        Duration::from_secs(5),
        || async {
            redis
                .command(&["KEYS", "vestibule:l:*"])
                .contains("vestibule:l:")
                .then_some(())
        },
    )
    .await;
    abandoned.abort();
    let _ = abandoned.await;
    s.provider.resume();
    // The next request, on the other replica, gets the token of that one refresh at once: not
    // after a lease kept alive by an orphaned keeper, and without a second grant.
    let mut b = browser.clone();
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        b.get(&s.proxies[1].url("/api/next"), &[("x-csrf", "1")]),
    )
    .await
    .expect("the next request waited for a refresh nobody finishes");
    assert_eq!(r.status, 200, "{}", r.text());
    let newest = s.newest_access_token("alice").await;
    assert_ne!(newest, first);
    assert_eq!(s.bearers("/next"), vec![newest]);
    let stats = s.stats().await;
    assert_eq!(refresh_grants(&stats), 1, "{stats}");
    assert_eq!(stats["token_errors"]["refresh_token"], 0, "{stats}");
    assert!(s.bearers("/abandoned").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_client_secret_ends_no_session_and_the_fixed_one_works_again() {
    let s = stack(2, serde_json::json!({})).await;
    let browser = s.login("alice").await;
    let first = s.newest_access_token("alice").await;
    // Another instance on the same store whose client secret is wrong (expired, mistyped).
    let wrong_text = s
        .config
        .clone()
        .set("oidc.client_secret", "expired-secret")
        .set("server.listen", "127.0.0.1:0")
        .text();
    assert!(wrong_text.contains("expired-secret"));
    let wrong = start_proxy_with_clock(&wrong_text, s.clock.clock()).await;
    wait_ready(&wrong).await;
    s.reset_stats().await;
    s.until_due();
    let refused_before = grant_count(&wrong, "refresh_token", "client_refused").await;
    for i in 0..3 {
        let mut b = browser.clone();
        let r = b
            .get(&wrong.url(&format!("/api/wrong{i}")), &[("x-csrf", "1")])
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "provider_unavailable");
        assert!(r.header("retry-after").is_some());
        let mut b = browser.clone();
        let user = b.get(&wrong.url("/bff/user"), &[("x-csrf", "1")]).await;
        assert_eq!(
            user.status,
            200,
            "the session must be kept: {}",
            user.text()
        );
    }
    assert!(s.bearers("/wrong").is_empty());
    let stats = s.stats().await;
    assert!(refresh_grants(&stats) >= 1, "{stats}");
    assert_eq!(
        stats["token_errors"]["refresh_token"], stats["refresh_token"],
        "{stats}"
    );
    assert!(grant_count(&wrong, "refresh_token", "client_refused").await > refused_before);
    // With the right secret, the same session refreshes with the refresh token it always had.
    let mut b = browser.clone();
    let r = b
        .get(&s.proxies[1].url("/api/fixed"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let newest = s.newest_access_token("alice").await;
    assert_ne!(newest, first);
    assert_eq!(s.bearers("/fixed"), vec![newest]);
}
