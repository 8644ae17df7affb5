//! Protection of proxied routes: CSRF and origin checks (also for WebSocket upgrades), the role
//! policy with the real provider, feature flags, hot reload (explicit and on file change), CORS,
//! and the error codes not produced elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::stack::LoginStack as Stack;
use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vestibule::session::model::{AccessToken, Session};

/// The real provider and a proxy whose config is `login_config` plus `extra` (with `{u}` replaced
/// by the upstream's URL), after `edit` has changed it.
async fn stack_with(
    extra: &'static str,
    provider_extra: serde_json::Value,
    edit: impl FnOnce(TomlConfig) -> TomlConfig + 'static,
) -> Stack {
    Stack::builder()
        .provider(provider_extra)
        .extra(move |u| extra.replace("{u}", u))
        .config(edit)
        .start()
        .await
}

async fn stack(extra: &'static str) -> Stack {
    stack_with(extra, serde_json::json!({}), |t| t).await
}

async fn logged_in(s: &Stack, user: &str) -> Browser {
    s.login(user).await
}

const API: &str = r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
"#;

#[tokio::test]
async fn csrf_header_and_origin_are_required_on_token_routes() {
    let s = stack(API).await;
    let mut alice = logged_in(&s, "alice").await;
    let url = format!("{}/api/data", s.base);

    let missing = alice.get(&url, &[]).await;
    assert_eq!(missing.status, 403);
    assert_eq!(missing.json()["error"], "csrf");
    let wrong = alice.get(&url, &[("x-csrf", "0")]).await;
    assert_eq!(wrong.status, 403);
    assert_eq!(wrong.json()["error"], "csrf");
    let before = s.up.count();
    let ok = alice.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(s.up.count(), before + 1);

    let same_origin = alice
        .get(&url, &[("x-csrf", "1"), ("origin", s.base.as_str())])
        .await;
    assert_eq!(same_origin.status, 200);
    let evil = alice
        .get(&url, &[("x-csrf", "1"), ("origin", "https://evil.example")])
        .await;
    assert_eq!(evil.status, 403);
    assert_eq!(evil.json()["error"], "csrf");
    let cross_site = alice
        .get(&url, &[("x-csrf", "1"), ("sec-fetch-site", "cross-site")])
        .await;
    assert_eq!(cross_site.status, 403);
    assert_eq!(cross_site.json()["error"], "csrf");
    let same_site = alice
        .get(&url, &[("x-csrf", "1"), ("sec-fetch-site", "same-origin")])
        .await;
    assert_eq!(same_site.status, 200);
    // A field sent twice counts by its first value: a good second value after a wrong first
    // one proves nothing.
    let base = s.base.as_str();
    for twice in [
        [("x-csrf", "0"), ("x-csrf", "1"), ("x-other", "1")],
        [
            ("x-csrf", "1"),
            ("origin", "https://evil.example"),
            ("origin", base),
        ],
        [
            ("x-csrf", "1"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-origin"),
        ],
    ] {
        let refused = alice.get(&url, &twice).await;
        assert_eq!(refused.status, 403, "{twice:?}");
        assert_eq!(refused.json()["error"], "csrf");
    }
    assert_eq!(
        s.up.count(),
        before + 3,
        "a refused request must never reach the upstream"
    );

    // Management endpoints follow the same rule.
    let user = alice
        .get(
            &format!("{}/bff/user", s.base),
            &[("x-csrf", "1"), ("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(user.status, 403);

    // WebSocket upgrades cannot carry X-CSRF: the Origin must be the app's own.
    let cookie = format!("vestibule={}", alice.jar["vestibule"]);
    let (status, _) = websocket(s.port, &cookie, None).await;
    assert_eq!(status, 403, "an upgrade without Origin must be refused");
    let (status, _) = websocket(s.port, &cookie, Some("https://evil.example")).await;
    assert_eq!(status, 403, "a cross-site upgrade must be refused");
    let (status, echoed) = websocket(s.port, &cookie, Some(&s.base)).await;
    assert_eq!(status, 101);
    assert_eq!(echoed.as_deref(), Some("ping"));
    // Only a handshake (a GET) goes on its Origin alone: another method asking for an upgrade
    // needs X-CSRF like any request.
    let before = s.up.count();
    let posted = alice
        .request(
            "POST",
            &url,
            &[
                ("origin", s.base.as_str()),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
            ],
            Some("x=1".into()),
        )
        .await;
    assert_eq!(posted.status, 403, "{}", posted.text());
    assert_eq!(posted.json()["error"], "csrf");
    assert_eq!(s.up.count(), before);
}

/// Opens a WebSocket through the proxy at `/api/ws`; returns the status and, after 101, what the
/// upstream echoed back.
async fn websocket(port: u16, cookie: &str, origin: Option<&str>) -> (u16, Option<String>) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}Cookie: {cookie}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut byte).await.unwrap();
            assert!(n > 0, "connection closed before the response head");
            head.push(byte[0]);
        }
    })
    .await
    .expect("no response head in time");
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    if status != 101 {
        return (status, None);
    }
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .expect("no echo in time")
        .unwrap();
    (status, Some(String::from_utf8_lossy(&buf).to_string()))
}

const BETA_ROUTE: &str = r#"
[[routes]]
path = "/beta/"
upstream = "{u}"
auth = "required"
token = "user"
require = { roles = ["beta-tester"] }
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
"#;

async fn roles_policy_admits_alice_and_refuses_bob(s: &Stack) {
    let mut alice = logged_in(s, "alice").await;
    let mut bob = logged_in(s, "bob").await;
    let url = format!("{}/beta/x", s.base);
    let a = alice.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let before = s.up.count();
    let b = bob.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(b.status, 403, "{}", b.text());
    assert_eq!(b.json()["error"], "forbidden");
    assert_eq!(b.json()["missing"], serde_json::json!(["roles"]));
    assert_eq!(
        s.up.count(),
        before,
        "a denied request reached the upstream"
    );
    // Bob may still use routes without a requirement.
    let other = bob
        .get(&format!("{}/api/x", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(other.status, 200);
}

#[tokio::test]
async fn role_requirements_use_the_roles_claim() {
    let s = stack(BETA_ROUTE).await;
    roles_policy_admits_alice_and_refuses_bob(&s).await;
}

#[tokio::test]
async fn role_requirements_follow_a_dotted_roles_claim() {
    // Here only the nested claim decides: alice has the role only under realm_access, bob only
    // at the top level.
    let users = serde_json::json!({"users": [
        {"sub": "alice", "password": "alice", "roles": [], "realm_access": {"roles": ["beta-tester"]}},
        {"sub": "bob", "password": "bob", "roles": ["beta-tester"], "realm_access": {"roles": ["other"]}},
    ]});
    let s = stack_with(BETA_ROUTE, users, |t| {
        t.add("oidc.roles_claim", "realm_access.roles")
    })
    .await;
    roles_policy_admits_alice_and_refuses_bob(&s).await;
}

const FEATURES: &str = r#"
[[routes]]
path = "/feat-public/"
upstream = "{u}"
auth = "required"
feature = "everyone"
[[routes]]
path = "/feat-beta/"
upstream = "{u}"
auth = "required"
feature = "beta-dash"
[[routes]]
path = "/feat-off/"
upstream = "{u}"
auth = "required"
feature = "off"
[features.everyone]
public = true
[features.beta-dash]
public = false
beta = true
role = "beta-tester"
[features.off]
public = false
beta = false
"#;

#[tokio::test]
async fn feature_flags_hide_routes_and_are_listed_per_user() {
    let s = stack(FEATURES).await;
    let mut alice = logged_in(&s, "alice").await;
    let mut bob = logged_in(&s, "bob").await;
    for (browser, expect) in [(&mut alice, [200, 200, 404]), (&mut bob, [200, 404, 404])] {
        for (path, status) in ["/feat-public/x", "/feat-beta/x", "/feat-off/x"]
            .iter()
            .zip(expect)
        {
            let r = browser.get(&format!("{}{path}", s.base), &[]).await;
            assert_eq!(r.status, status, "{path}: {}", r.text());
            if status == 404 {
                assert_eq!(r.json()["error"], "not_found");
            }
        }
    }
    // Hidden even from anonymous callers, who get the same 404 as for a route that does not exist.
    let anonymous = get(&format!("{}/feat-off/x", s.base), &[]).await;
    assert_eq!(anonymous.status, 404);

    let url = format!("{}/bff/user", s.base);
    let of_alice = alice.get(&url, &[("x-csrf", "1")]).await.json();
    assert_eq!(
        of_alice["bff:features"],
        serde_json::json!(["beta-dash", "everyone"])
    );
    let of_bob = bob.get(&url, &[("x-csrf", "1")]).await.json();
    assert_eq!(of_bob["bff:features"], serde_json::json!(["everyone"]));
}

fn reload_config(port: u16, issuer: &str, upstream: &str, beta_public: bool, new: bool) -> String {
    let mut extra = format!(
        r#"
[[routes]]
path = "/api/"
upstream = "{upstream}"
[[routes]]
path = "/feat/"
upstream = "{upstream}"
auth = "required"
feature = "dash"
[features.dash]
public = {beta_public}
beta = true
role = "beta-tester"
"#
    );
    if new {
        extra.push_str(&format!(
            "[[routes]]\npath = \"/new/\"\nupstream = \"{upstream}\"\n"
        ));
    }
    login_config(port, issuer, &extra)
}

#[tokio::test]
async fn hot_reload_changes_routes_and_features_without_dropping_requests() {
    let port = free_port();
    let provider = provider::start(port, serde_json::json!({}));
    let up = upstream::start().await;
    let proxy = start_proxy(&reload_config(
        port,
        &provider.issuer,
        &up.url(),
        false,
        false,
    ))
    .await;
    wait_ready(&proxy).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut bob = Browser::default();
    assert_eq!(bob.login(&base, "bob", "bob", "/").await.status, 302);
    assert_eq!(bob.get(&format!("{base}/feat/x"), &[]).await.status, 404);
    assert_eq!(get(&format!("{base}/new/x"), &[]).await.status, 404);

    let slow = tokio::spawn(get_owned(format!("{base}/api/slow")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = proxy.dir.path().join("config.toml");
    std::fs::write(
        &path,
        reload_config(port, &provider.issuer, &up.url(), true, true),
    )
    .unwrap();
    proxy.app.reload("test");
    assert_eq!(get(&format!("{base}/new/x"), &[]).await.status, 200);
    assert_eq!(
        bob.get(&format!("{base}/feat/x"), &[]).await.status,
        200,
        "the feature became public"
    );
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "the request in flight was dropped");
    assert_eq!(slow.text(), "slow done");
    assert_eq!(
        bob.get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
            .await
            .json()["bff:features"],
        serde_json::json!(["dash"])
    );

    // A broken file is rejected; the running configuration stays.
    std::fs::write(&path, "[[routes]]\npath = 3\n").unwrap();
    proxy.app.reload("test");
    assert_eq!(get(&format!("{base}/new/x"), &[]).await.status, 200);
    assert_eq!(get(&format!("{base}/api/x"), &[]).await.status, 200);
    assert_eq!(bob.get(&format!("{base}/feat/x"), &[]).await.status, 200);
}

async fn get_owned(url: String) -> Reply {
    get(&url, &[]).await
}

#[tokio::test]
async fn the_config_file_is_reloaded_when_it_changes_on_disk() {
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\n",
        up.url()
    );
    let text = config_text(&routes);
    let proxy = start_proxy(&text).await;
    assert_eq!(get(&proxy.url("/api/x"), &[]).await.status, 200);
    assert_eq!(get(&proxy.url("/later/x"), &[]).await.status, 404);
    let path = proxy.dir.path().join("config.toml");
    // A broken file first: rejected, the old routes keep working.
    std::fs::write(&path, "this is not toml [").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get(&proxy.url("/api/x"), &[]).await.status, 200);
    let added = config_text(&format!(
        "{routes}[[routes]]\npath = \"/later/\"\nupstream = \"{}\"\n",
        up.url()
    ));
    std::fs::write(&path, added).unwrap();
    eventually(
        "the changed file is picked up",
        Duration::from_secs(10),
        || async { (get(&proxy.url("/later/x"), &[]).await.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(get(&proxy.url("/api/x"), &[]).await.status, 200);
}

/// A file refused because something it names is not there yet (a directory or key file on a
/// volume that Kubernetes updates a moment after the ConfigMap) is tried again until it is
/// applied: it used to be recorded as seen, and waited for another edit or a SIGHUP while
/// `vestibule check` called it fine.
#[tokio::test]
async fn a_refused_file_is_applied_once_what_it_names_appears() {
    let proxy = start_proxy(config_toml("")).await;
    let site = proxy.dir.path().join("site");
    let next = config_toml(&format!(
        "[[routes]]\npath = \"/\"\nstatic_dir = \"{}\"\n",
        site.display()
    ));
    std::fs::write(proxy.dir.path().join("config.toml"), next.text()).unwrap();
    // The watcher reads it within a second and refuses it: the directory is not there yet.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(proxy.app.live.load().config.routes.is_empty());
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello").unwrap();
    eventually(
        "the file is applied once its directory exists",
        Duration::from_secs(5),
        || async { (!proxy.app.live.load().config.routes.is_empty()).then_some(()) },
    )
    .await;
    assert_eq!(get(&proxy.url("/index.html"), &[]).await.text(), "hello");
}

/// A CORS preflight from `origin` for a `POST` to `path` with `X-CSRF` and `Content-Type`.
async fn cors_preflight(proxy: &Proxy, origin: &str, path: &str) -> Reply {
    send(
        http::Request::builder()
            .method("OPTIONS")
            .uri(proxy.url(path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-csrf, content-type")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
}

/// A hybrid app's origin (`capacitor://localhost`: an opaque origin by the URL standard) is
/// listed as the app's WebView sends it: `Origin: null`, which sandboxed frames, `data:`
/// documents and redirected requests send, neither passes the CSRF check nor gets CORS with
/// credentials.
#[tokio::test]
async fn a_listed_app_origin_of_another_scheme_lets_that_app_in_and_never_origin_null() {
    let up = upstream::start().await;
    let text = config_toml(&format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url()
    ))
    .add("server.cors_origins", vec!["capacitor://localhost"]);
    let proxy = start_proxy(&text).await;
    let preflight = |origin: &'static str| cors_preflight(&proxy, origin, "/open/x");
    // Its status, and the origin it may be read from.
    let answered = |reply: Reply, status: u16, allowed: Option<&str>| {
        assert_eq!(reply.status, status, "{}", reply.text());
        assert_eq!(reply.header("access-control-allow-origin"), allowed);
    };
    let app = "capacitor://localhost";
    answered(preflight(app).await, 204, Some(app));
    answered(preflight("null").await, 403, None);
    // The CSRF check: the app's origin passes (401: no session), `null` does not (403).
    let user = |origin: &'static str| {
        let url = proxy.url("/bff/user");
        async move { get(&url, &[("origin", origin), ("x-csrf", "1")]).await }
    };
    answered(user(app).await, 401, Some(app));
    answered(user("null").await, 403, None);
    let open = get(&proxy.url("/open/x"), &[("origin", "null")]).await;
    assert!(open.header("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_preflights_are_answered_for_listed_origins_only() {
    let up = upstream::start().await;
    let text = config_toml(&format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url(),
        up.url()
    ))
    .add("server.cors_origins", vec!["https://admin.example"]);
    let proxy = start_proxy(&text).await;
    let preflight = |origin: &'static str, path: &'static str| cors_preflight(&proxy, origin, path);
    let seen = up.count();
    let ok = preflight("https://admin.example", "/api/data").await;
    assert_eq!(ok.status, 204, "{}", ok.text());
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://admin.example")
    );
    assert_eq!(ok.header("access-control-allow-credentials"), Some("true"));
    let allowed = ok
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("x-csrf"), "{allowed}");
    assert!(
        ok.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let bff = preflight("https://admin.example", "/bff/user").await;
    assert_eq!(bff.status, 204);

    let evil = preflight("https://evil.example", "/api/data").await;
    assert_eq!(evil.status, 403);
    assert!(evil.header("access-control-allow-origin").is_none());
    assert_eq!(up.count(), seen, "preflights are answered by Vestibule");

    // Actual requests from the listed origin get the allow-origin header, errors included.
    let actual = get(
        &proxy.url("/open/x"),
        &[("origin", "https://admin.example")],
    )
    .await;
    assert_eq!(actual.status, 200);
    assert_eq!(
        actual.header("access-control-allow-origin"),
        Some("https://admin.example")
    );
    assert_eq!(
        actual.header("access-control-allow-credentials"),
        Some("true")
    );
    let user = get(
        &proxy.url("/bff/user"),
        &[("origin", "https://admin.example"), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(user.status, 401, "the listed origin passes the CSRF check");
    assert_eq!(
        user.header("access-control-allow-origin"),
        Some("https://admin.example")
    );
    let other = get(&proxy.url("/open/x"), &[("origin", "https://evil.example")]).await;
    assert_eq!(other.status, 200);
    assert!(other.header("access-control-allow-origin").is_none());
    assert!(
        other
            .headers
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().contains("Origin")),
        "responses vary by Origin when CORS is configured"
    );
    // A plain OPTIONS (not a preflight) is routed as usual.
    let plain = send(
        http::Request::builder()
            .method("OPTIONS")
            .uri(proxy.url("/open/x"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(plain.status, 200);
}

/// Behind Vestibule the browser's credential is Vestibule's cookie, so only `cors_origins` may
/// let another origin read an answer made with it: an upstream built for bearer tokens often
/// allows any origin with credentials (its own policy harmless there, since a browser holds
/// none of its tokens), and a same-site page (a sibling subdomain, sent the `Lax` cookie) would
/// read the signed-in user's data. The upstream's `Access-Control-Allow-Credentials` never
/// reaches the browser; a listed origin gets Vestibule's own headers in place of the
/// upstream's `*`, one value each.
#[tokio::test]
async fn an_upstreams_own_cors_never_lets_an_unlisted_origin_read_with_credentials() {
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url()
    );
    let values = |reply: &Reply, name: &str| -> Vec<String> {
        reply
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    for listed in [vec![], vec!["https://admin.example"]] {
        let proxy =
            start_proxy(config_toml(&routes).add("server.cors_origins", listed.clone())).await;
        let evil = get(
            &proxy.url("/open/cors"),
            &[("origin", "https://evil.example.com")],
        )
        .await;
        assert_eq!(evil.status, 200, "{}", evil.text());
        assert_eq!(
            values(&evil, "access-control-allow-credentials"),
            Vec::<String>::new(),
            "cors_origins = {listed:?}: the upstream granted credentials to an unlisted origin"
        );
        if listed.is_empty() {
            continue;
        }
        let admin = get(
            &proxy.url("/open/cors?star"),
            &[("origin", "https://admin.example")],
        )
        .await;
        assert_eq!(
            values(&admin, "access-control-allow-origin"),
            ["https://admin.example"]
        );
        assert_eq!(values(&admin, "access-control-allow-credentials"), ["true"]);
        assert_eq!(values(&admin, "access-control-expose-headers"), ["x-total"]);
    }
}

#[tokio::test]
async fn the_remaining_error_codes_are_produced() {
    let up = upstream::start().await;
    let public = tempfile::tempdir().unwrap();
    std::fs::write(public.path().join("index.html"), "<p>app</p>").unwrap();
    let text = config_text(&format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/\"\nstatic_dir = \"{}\"\n",
        up.url(),
        public.path().display()
    ));
    let proxy = start_proxy(&text).await;

    // provider_unavailable: the provider's metadata is not loaded (its issuer is dead).
    let login = get(&proxy.url("/bff/login?returnUrl=/"), &[]).await;
    assert_eq!(login.status, 503, "{}", login.text());
    assert_eq!(login.json()["error"], "provider_unavailable");

    // method_not_allowed: static files are read-only.
    let post = send(
        http::Request::post(proxy.url("/index.html"))
            .body(http_body_util::Full::new(bytes::Bytes::from("x")))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.json()["error"], "method_not_allowed");

    // session_expired: the access token expired and there is no refresh token to renew it.
    let now = vestibule::app::now();
    let mut session = Session {
        sub: "carol".into(),
        ..Session::default()
    };
    session.tokens.insert(
        String::new(),
        AccessToken {
            value: "expired".into(),
            expires_at: now.saturating_sub(10),
            issued_at: 0,
            scope: None,
            jkt: None,
        },
    );
    let cookie = proxy.session_cookie(session).await;
    let expired = get(
        &proxy.url("/api/x"),
        &[("cookie", cookie.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(expired.status, 401, "{}", expired.text());
    assert_eq!(expired.json()["error"], "session_expired");
    let after = get(
        &proxy.url("/bff/user"),
        &[("cookie", cookie.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(after.status, 401, "the session has ended");

    // A live session with a fresh token is forwarded (the fixture works).
    let mut fresh = Session {
        sub: "carol".into(),
        ..Session::default()
    };
    fresh.tokens.insert(
        String::new(),
        AccessToken {
            value: "fresh-token".into(),
            expires_at: now + 3600,
            issued_at: 0,
            scope: None,
            jkt: None,
        },
    );
    let cookie = proxy.session_cookie(fresh).await;
    let ok = get(
        &proxy.url("/api/x"),
        &[("cookie", cookie.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        up.last().headers["authorization"].to_str().unwrap(),
        "Bearer fresh-token"
    );
}

#[tokio::test]
async fn a_store_outage_is_503_and_ends_no_session() {
    let mut redis = crate::support::redis::RedisServer::start();
    let text = config_text(&format!(
        "store = \"redis\"\ncache_ttl = \"0s\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    ));
    let proxy = start_proxy(&text).await;
    let cookie = proxy
        .session_cookie(Session {
            sub: "carol".into(),
            ..Session::default()
        })
        .await;
    let url = proxy.url("/bff/user");
    let headers = [("cookie", cookie.as_str()), ("x-csrf", "1")];
    let user = || get(&url, &headers);
    assert_eq!(user().await.status, 200);
    redis.stop();
    let down = user().await;
    assert_eq!(down.status, 503, "{}", down.text());
    assert_eq!(down.json()["error"], "store_unavailable");
    redis.restart();
    eventually(
        "the session comes back",
        Duration::from_secs(15),
        || async { (user().await.status == 200).then_some(()) },
    )
    .await;
}

/// docs/errors.md lists every error code with its status, and each response has the contract's
/// shape (JSON with `error` and `message`, no-store; HTML naming the code for navigations).
#[tokio::test]
async fn docs_list_every_error_code() {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/errors.md"),
    )
    .unwrap();
    for &code in vestibule::reply::ErrorCode::ALL {
        let row = format!("| `{}` | {} |", code.code(), code.status().as_u16());
        assert!(docs.contains(&row), "docs/errors.md lacks the row {row}");
        let json = code.json(&[]);
        assert_eq!(json.status(), code.status());
        assert_eq!(json.headers()["cache-control"], "no-store");
        let body = http_body_util::BodyExt::collect(json.into_body())
            .await
            .unwrap()
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["error"], code.code());
        assert_eq!(value["message"], code.message());
        let html = code.html();
        assert_eq!(html.status(), code.status());
        let body = http_body_util::BodyExt::collect(html.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(code.code()));
    }
}

const RESOURCE_ROUTE: &str = r#"
[[routes]]
path = "/orders/"
upstream = "{u}"
auth = "required"
token = "user"
resource = "https://api.example.test"
require = { roles = ["beta-tester"] }
"#;

#[tokio::test]
async fn the_policy_reads_a_validated_jwt_access_token_for_the_routes_resource() {
    // The provider's access tokens for the API carry `roles`: alice passes, bob does not.
    let s = stack(RESOURCE_ROUTE).await;
    let mut alice = logged_in(&s, "alice").await;
    let mut bob = logged_in(&s, "bob").await;
    let url = format!("{}/orders/1", s.base);
    let a = alice.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let bearer = s.up.last().headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    let payload = bearer.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://api.example.test");
    let b = bob.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(b.status, 403, "{}", b.text());
    assert_eq!(b.json()["missing"], serde_json::json!(["roles"]));
}

#[tokio::test]
async fn the_access_tokens_claims_win_over_the_id_tokens() {
    // Here the API's access tokens carry no roles, though alice's ID token does: the API would
    // not see the role, so neither does the policy.
    let s = stack_with(
        RESOURCE_ROUTE,
        serde_json::json!({"access_token_claims": []}),
        |t| t,
    )
    .await;
    let mut alice = logged_in(&s, "alice").await;
    let user = alice
        .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
        .await
        .json();
    assert_eq!(user["roles"], serde_json::json!(["beta-tester"]));
    let r = alice
        .get(&format!("{}/orders/1", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
}
