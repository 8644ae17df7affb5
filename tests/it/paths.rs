//! One canonical path before routing and policy: hostile request targets, sent raw over TCP (a
//! client library would normalise them), against a config shaped like the shipped one — `/api/`
//! with the user's token, `/api/beta/` hidden behind a feature and a role, a `strip_prefix` route
//! and the static app at `/`. Each case asserts the status and the exact request target the
//! recording upstream received, or that no upstream saw anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vestibule::session::model::{AccessToken, Session};

/// Which recording upstream should have seen the request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Saw {
    /// `/api/` and `/api/beta/` (the same service, as in the shipped config).
    Api(&'static str),
    /// The `strip_prefix` route `/s/`, whose upstream has the base path `/base`.
    Svc(&'static str),
    Nothing,
}

struct Stack {
    proxy: Proxy,
    api: upstream::Upstream,
    svc: upstream::Upstream,
    _public: tempfile::TempDir,
}

async fn stack(api_extra: &str) -> Stack {
    let api = upstream::start().await;
    let svc = upstream::start().await;
    let public = tempfile::tempdir().unwrap();
    std::fs::write(public.path().join("index.html"), "<p>the app</p>").unwrap();
    std::fs::create_dir(public.path().join("assets")).unwrap();
    std::fs::write(public.path().join("assets/app.js"), "console.log(1)").unwrap();
    let routes = format!(
        r#"
[[routes]]
path = "/api/"
upstream = "{api}"
token = "user"
{api_extra}

[[routes]]
path = "/api/beta/"
upstream = "{api}"
token = "user"
feature = "new-dashboard"
require = {{ roles = ["beta-tester"] }}

[[routes]]
path = "/s/"
upstream = "{svc}/base"
strip_prefix = true

[[routes]]
path = "/"
static_dir = "{public}"
spa_fallback = "index.html"

[features.new-dashboard]
public = false
beta = true
role = "beta-tester"
"#,
        api = api.url(),
        svc = svc.url(),
        public = public.path().display(),
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    Stack {
        proxy,
        api,
        svc,
        _public: public,
    }
}

/// A signed-in user's cookie header, with a fresh access token and these roles.
async fn user(proxy: &Proxy, roles: &[&str]) -> String {
    let now = vestibule::app::now();
    let mut session = Session {
        sub: "mallory".into(),
        ..Session::default()
    };
    let mut claims = serde_json::Map::new();
    claims.insert("roles".into(), serde_json::json!(roles));
    session.claims = claims.into();
    session.tokens.insert(
        String::new(),
        AccessToken {
            value: "mallorys-token".into(),
            expires_at: now + 3600,
            issued_at: 0,
            scope: None,
            jkt: None,
        },
    );
    let (cookie, _) = proxy.app.sessions.create(session, now).await.unwrap();
    let name = proxy.app.live.load().config.session.cookie_name.clone();
    format!("{name}={cookie}")
}

/// Sends `GET <target>` byte for byte and returns the status and the whole response text.
async fn raw_get(proxy: &Proxy, target: &str, cookie: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nX-CSRF: 1\r\n\
         Connection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{target}: no status line in {text:?}"));
    (status, text)
}

/// Sends each case and checks the status, the error code of a refusal, and what the upstreams
/// saw.
async fn check(s: &Stack, cookie: &str, cases: &[(&str, u16, Saw)]) {
    let mut failures = Vec::new();
    for &(target, want_status, want_saw) in cases {
        let (api_before, svc_before) = (s.api.count(), s.svc.count());
        let (status, text) = raw_get(&s.proxy, target, cookie).await;
        let new = |up: &upstream::Upstream, before: usize| {
            up.seen.lock().unwrap()[before..]
                .iter()
                .map(|r| r.uri.clone())
                .collect::<Vec<_>>()
        };
        let (api_new, svc_new) = (new(&s.api, api_before), new(&s.svc, svc_before));
        let saw = match (api_new.as_slice(), svc_new.as_slice()) {
            ([], []) => "nothing".to_string(),
            ([uri], []) => format!("api {uri}"),
            ([], [uri]) => format!("svc {uri}"),
            _ => format!("api {api_new:?} svc {svc_new:?}"),
        };
        let want = match want_saw {
            Saw::Api(uri) => format!("api {uri}"),
            Saw::Svc(uri) => format!("svc {uri}"),
            Saw::Nothing => "nothing".to_string(),
        };
        let code_ok = want_status != 400 || text.contains("\"error\":\"bad_path\"");
        if status != want_status || saw != want || !code_ok {
            failures.push(format!(
                "{target}: got {status}, upstream saw {saw}; want {want_status}, {want}{}",
                if code_ok { "" } else { " (without bad_path)" }
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

use Saw::{Api, Nothing, Svc};

/// A user without the `beta-tester` role: every spelling of `/api/beta/…` meets the beta
/// route's policy (404, the feature is hidden from them) or is refused as ambiguous, and
/// whatever is forwarded is forwarded in its canonical form.
#[tokio::test]
async fn hostile_paths_meet_the_policy_of_the_route_they_name() {
    let s = stack("").await;
    let cookie = user(&s.proxy, &["user"]).await;
    #[rustfmt::skip]
    let cases: &[(&str, u16, Saw)] = &[
        // Canonical forms pass unchanged, the query string as sent.
        ("/api/x", 200, Api("/api/x")),
        ("/api/x?q=%2e%2e/../a;b", 200, Api("/api/x?q=%2e%2e/../a;b")),
        ("/api/x/", 200, Api("/api/x/")),
        ("/api/a%20b/caf%C3%A9", 200, Api("/api/a%20b/caf%C3%A9")),
        // Segment boundaries: these are not the beta route.
        ("/api/betax", 200, Api("/api/betax")),
        ("/api/beta-old/x", 200, Api("/api/beta-old/x")),
        // Equivalent spellings are forwarded canonical.
        ("/api/./x", 200, Api("/api/x")),
        ("/api//x", 200, Api("/api/x")),
        ("/api/a/../x", 200, Api("/api/x")),
        ("/api/%78", 200, Api("/api/x")),
        ("/api/%7Euser", 200, Api("/api/~user")),
        ("/api/caf%c3%a9", 200, Api("/api/caf%C3%A9")),
        ("/api/x/.", 200, Api("/api/x/")),
        ("/api/x/y/..", 200, Api("/api/x/")),
        ("/api/x/./y/../z?k=v", 200, Api("/api/x/z?k=v")),
        ("/bff/../api/x", 200, Api("/api/x")),
        ("/other/../api/x", 200, Api("/api/x")),
        // Every spelling of the beta area meets the beta route's policy.
        ("/api/beta/x", 404, Nothing),
        ("/api/beta", 404, Nothing),
        ("/api/beta/", 404, Nothing),
        ("/api/beta?x=1", 404, Nothing),
        ("/api/x/../beta/x", 404, Nothing),
        ("/api/./beta/x", 404, Nothing),
        ("/api//beta/x", 404, Nothing),
        ("//api/beta/x", 404, Nothing),
        ("/api/beta//x", 404, Nothing),
        ("/api/beta/./x", 404, Nothing),
        ("/api/%62eta/x", 404, Nothing),
        ("/api/%62%65%74%61/x", 404, Nothing),
        ("/%61pi/beta/x", 404, Nothing),
        ("/api/x/..//beta/", 404, Nothing),
        ("/api/x/y/../../beta", 404, Nothing),
        ("/api/beta/x/..", 404, Nothing),
        ("/api/x/..", 200, Api("/api/")),
        // Ambiguous forms are refused.
        ("/api/beta%2Fx", 400, Nothing),
        ("/api/beta%2fx", 400, Nothing),
        ("/api/x%2F..%2Fbeta/x", 400, Nothing),
        ("/api/beta;v=1/x", 400, Nothing),
        ("/api/beta;/x", 400, Nothing),
        ("/api/..;/api/beta/x", 400, Nothing),
        ("/api/x;jsessionid=1", 400, Nothing),
        ("/api/%2e%2e/api/beta/x", 400, Nothing),
        ("/api/x/%2E%2E/beta/x", 400, Nothing),
        ("/api/x/.%2e/beta/x", 400, Nothing),
        ("/api/%2e/beta/x", 400, Nothing),
        ("/api/x/%2e", 400, Nothing),
        ("/api\\beta\\x", 400, Nothing),
        ("/api/beta%5Cx", 400, Nothing),
        ("/api/beta%5cx", 400, Nothing),
        ("/api/x%00", 400, Nothing),
        ("/api/x%00/../beta/x", 400, Nothing),
        ("/api/x%0d%0aX-Injected:%201", 400, Nothing),
        ("/api/x%09", 400, Nothing),
        ("/api/x%7F", 400, Nothing),
        ("/api/x%C2%85", 400, Nothing),
        ("/api/%ff", 400, Nothing),
        ("/api/%c0%af", 400, Nothing),
        ("/api/%c0%ae%c0%ae/beta", 400, Nothing),
        ("/api/%ed%a0%80", 400, Nothing),
        ("/api/%c3", 400, Nothing),
        ("/api/%c3/x", 400, Nothing),
        ("/api/%zz", 400, Nothing),
        ("/api/x%", 400, Nothing),
        ("/api/x%2", 400, Nothing),
        ("/api/%252e%252e/x", 200, Api("/api/%252e%252e/x")),
        ("/..", 400, Nothing),
        ("/../api/beta/x", 400, Nothing),
        ("/api/../../etc/passwd", 400, Nothing),
        ("/api/x/../../../beta", 400, Nothing),
        // The BFF endpoints are decided on the canonical path; an ambiguous form never
        // reaches them.
        ("/x/../bff/user", 200, Nothing),
        ("/%62ff/user", 200, Nothing),
        ("/bff//user", 200, Nothing),
        ("/bff;x=1/user", 400, Nothing),
        ("/bff%2Fuser", 400, Nothing),
        ("/bff/%2e%2e/api/beta/x", 400, Nothing),
        // The strip_prefix route never leaves the upstream's base path.
        ("/s/x", 200, Svc("/base/x")),
        ("/s", 200, Svc("/base/")),
        ("/s/a/../x", 200, Svc("/base/x")),
        ("/s//x?y=1", 200, Svc("/base/x?y=1")),
        ("/s/%78", 200, Svc("/base/x")),
        ("/s/../admin", 404, Nothing),
        ("/s/x/../../admin", 404, Nothing),
        ("/sx/admin", 404, Nothing),
        ("/s/../../admin", 400, Nothing),
        ("/s/%2e%2e/admin", 400, Nothing),
        ("/s/..%2Fadmin", 400, Nothing),
        ("/s/..;/admin", 400, Nothing),
        // Static files go through the same canonical path.
        ("/index.html", 200, Nothing),
        ("/assets/../index.html", 200, Nothing),
        ("/%69ndex.html", 200, Nothing),
        ("/assets//app.js", 200, Nothing),
        ("/assets/%2e%2e/index.html", 400, Nothing),
        ("/..%2Findex.html", 400, Nothing),
        ("/../index.html", 400, Nothing),
    ];
    check(&s, &cookie, cases).await;
}

/// A beta tester reaches the beta route by any equivalent spelling, and its upstream receives
/// the canonical form: the path that was matched is the path that is forwarded.
#[tokio::test]
async fn the_matched_path_is_the_forwarded_path() {
    let s = stack("").await;
    let cookie = user(&s.proxy, &["beta-tester"]).await;
    #[rustfmt::skip]
    let cases: &[(&str, u16, Saw)] = &[
        ("/api/beta/x", 200, Api("/api/beta/x")),
        ("/api/beta", 200, Api("/api/beta")),
        ("/api/%62eta/x?a=%2F", 200, Api("/api/beta/x?a=%2F")),
        ("/api/x/../beta//y/./z", 200, Api("/api/beta/y/z")),
        ("/api/beta;v=1/x", 400, Nothing),
        ("/api/beta%2Fx", 400, Nothing),
    ];
    check(&s, &cookie, cases).await;
}

/// The two per-route switches pass `%2F` or `;` parameters through to the routes that set
/// them — and only below that route's own prefix, never into another route's area.
#[tokio::test]
async fn per_route_switches_pass_encoded_slashes_and_parameters_through() {
    let s = stack("allow_encoded_slash = true\nallow_path_params = true").await;
    let cookie = user(&s.proxy, &["user"]).await;
    #[rustfmt::skip]
    let cases: &[(&str, u16, Saw)] = &[
        ("/api/files/a%2Fb", 200, Api("/api/files/a%2Fb")),
        ("/api/files/a%2fb", 200, Api("/api/files/a%2Fb")),
        ("/api/x;v=1/y", 200, Api("/api/x;v=1/y")),
        ("/api/%78;v=1", 200, Api("/api/x;v=1")),
        // Still refused: the pieces they hide would name the beta route or climb.
        ("/api/beta;v=1/x", 400, Nothing),
        ("/api/beta%2Fx", 400, Nothing),
        ("/api/;/beta/x", 400, Nothing),
        ("/api/%2Fbeta/x", 400, Nothing),
        ("/api/..;/beta/x", 400, Nothing),
        ("/api/x%2F..%2Fbeta", 400, Nothing),
        ("/api/x%2F..", 400, Nothing),
        ("/api/%2e;v=1/x", 400, Nothing),
        // Other routes keep the strict default.
        ("/s/a%2Fb", 400, Nothing),
        ("/s/a;v=1", 400, Nothing),
    ];
    check(&s, &cookie, cases).await;
}

/// An unauthenticated call learns a login URL whose return URL is the canonical path, with the
/// query as sent.
#[tokio::test]
async fn the_login_return_url_names_the_canonical_path() {
    let s = stack("").await;
    let (status, text) = raw_get(&s.proxy, "/api/a/../%78?q=1", "other=1").await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains(r#""login_url":"/bff/login?returnUrl=%2Fapi%2Fx%3Fq%3D1""#),
        "{text}"
    );
    assert_eq!(s.api.count(), 0);
}

/// `/api/ADMIN/x` meets the `/api/admin/` route's policy because case-insensitive
/// upstreams serve it as `/api/admin/x`. The same upstreams fold more than ASCII: Java's
/// `String.equalsIgnoreCase` (Spring's `AntPathMatcher` with `caseSensitive = false`) takes
/// `admın` (U+0131) for `admin`, `Character.toLowerCase` (Spring's `PathPattern`) takes
/// `İ` (U+0130) for `i` and `K` (U+212A) for `k`; Python's `casefold` and a JavaScript `/iu`
/// regex take `ſ` (U+017F) for `s`. Those spellings reach such an upstream under the `/api/`
/// route's policy, without a session.
#[tokio::test]
async fn letters_case_insensitive_servers_read_as_ascii_never_spell_another_routes_prefix() {
    let api = upstream::start().await;
    let routes = routes_to(
        &api.url(),
        &[
            ("/api/", OPEN),
            ("/api/admin/", WITH_TOKEN),
            ("/api/staff/", WITH_TOKEN),
            ("/api/class/", WITH_TOKEN),
        ],
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    never_past_the_policy(
        &proxy,
        &api,
        &[
            "/api/ADMIN/users",
            "/api/adm%C4%B1n/users",
            "/api/adm%C4%B0n/users",
            "/api/adm%c4%b1n/users",
            // Full case folding: one letter for two ASCII ones (`ﬀ` is `ff`, `ß` and `ẞ` are `ss`).
            "/api/sta%EF%AC%80/users",
            "/api/cla%C3%9F/users",
            "/api/cla%E1%BA%9E/users",
        ],
    )
    .await;
}

/// A route anyone may use, and one that needs a session and sends its upstream the user's token.
const OPEN: &str = "auth = \"none\"";
const WITH_TOKEN: &str = "auth = \"required\"\ntoken = \"user\"";

/// `[[routes]]` tables to `upstream`, each a path and its other keys (TOML lines).
fn routes_to(upstream: &str, routes: &[(&str, &str)]) -> String {
    routes
        .iter()
        .map(|(path, keys)| {
            format!("[[routes]]\npath = \"{path}\"\nupstream = \"{upstream}\"\n{keys}\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each of `targets`, asked without a session, is refused (401, or 400) and never reaches `api`.
async fn never_past_the_policy(proxy: &Proxy, api: &upstream::Upstream, targets: &[&str]) {
    let mut failures = Vec::new();
    for target in targets {
        let before = api.count();
        let (status, _) = raw_get(proxy, target, "x=1").await;
        if status != 401 && status != 400 || api.count() != before {
            failures.push(format!(
                "{target}: {status}, the upstream saw it: {}",
                api.count() != before
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A route that lets `;` parameters through (for a Java upstream's `;jsessionid=`) beside a
/// stricter one below it: Tomcat drops the parameter and Spring, matching case-insensitively,
/// reads `ı` as `i`, so `/java/adm%C4%B1n;jsessionid=1/users` is `/java/admin/users` there. It
/// meets the stricter route's policy or is refused, and never reaches the upstream without a
/// session.
#[tokio::test]
async fn a_folding_letter_behind_a_path_parameter_never_spells_another_routes_prefix() {
    let api = upstream::start().await;
    let routes = routes_to(
        &api.url(),
        &[
            ("/java/", "auth = \"none\"\nallow_path_params = true"),
            ("/java/admin/", WITH_TOKEN),
            ("/files/", "auth = \"none\"\nallow_encoded_slash = true"),
            ("/files/private/", WITH_TOKEN),
        ],
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    // The switches still work.
    let (status, _) = raw_get(&proxy, "/java/x;jsessionid=1", "x=1").await;
    assert_eq!(status, 200);
    never_past_the_policy(
        &proxy,
        &api,
        &[
            "/java/admin;jsessionid=1/users",
            "/java/adm%C4%B1n;jsessionid=1/users",
            "/java/ADM%C4%B0N;jsessionid=1",
            "/files/private%2Fusers",
            "/files/pr%C4%B1vate%2Fusers",
        ],
    )
    .await;
}

/// Headers through which some upstream frameworks take the request path from the client rather
/// than from the request line (Yii's `X-Rewrite-Url`; Symfony, Zend and Drupal before 2018
/// took `X-Original-URL` as well, for IIS's rewrite module): a user without the beta role asks
/// for `/api/x`, which meets the `/api/` route's policy, and names `/api/beta/x` in them. None
/// of them, in any spelling, may reach an upstream, whoever the peer: the path Vestibule
/// matched is the only one the upstream is told.
#[tokio::test]
async fn headers_that_name_another_path_never_reach_the_upstream() {
    let s = stack("").await;
    let cookie = user(&s.proxy, &["user"]).await;
    let forged = [
        ("X-Original-URL", "/api/beta/x"),
        ("x-rewrite-url", "/api/beta/x"),
        ("X-Original-URI", "/api/beta/x"),
        ("X-Override-URL", "/api/beta/x"),
        ("X_Original_URL", "/api/beta/x"),
        ("X_Rewrite_Url", "/api/beta/x"),
    ];
    let mut headers = vec![("cookie", cookie.as_str()), ("x-csrf", "1")];
    headers.extend(forged);
    let r = get(&s.proxy.url("/api/x"), &headers).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.api.last();
    assert_eq!(seen.uri, "/api/x");
    let passed: Vec<&str> = forged
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| seen.headers.contains_key(*name))
        .collect();
    assert!(passed.is_empty(), "reached the upstream: {passed:?}");
}

/// WebDAV's `MOVE` and `COPY` name a second path in `Destination` (RFC 4918 §10.3), which the
/// upstream acts on as it would on the request's: through a `strip_prefix` route it could name
/// another route's paths, whose policy the client never met (`/admin/` below, which needs a
/// session), or the stripped route's own paths outside its prefix. A `Destination` must name,
/// in canonical form, a path of the request's own route on `public_url`; it is then forwarded
/// as the upstream's own URL for that path, as the request's path is. Any other is 400.
#[tokio::test]
async fn a_webdav_destination_names_only_a_path_of_the_requests_own_route() {
    let up = upstream::start().await;
    let u = up.url();
    let routes = format!(
        "[[routes]]\npath = \"/dav/\"\nupstream = \"{u}/files\"\nstrip_prefix = true\n\
         [[routes]]\npath = \"/admin/\"\nupstream = \"{u}\"\nauth = \"required\"\n"
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    let moved = |method: &str, destination: &[&str]| {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(proxy.url("/dav/notes.txt"));
        for d in destination {
            builder = builder.header("destination", *d);
        }
        send(
            builder
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
    };
    let before = up.count();
    for destination in [
        // Another route's path: `/admin/secret` on the upstream, without a session.
        "http://127.0.0.1:8080/admin/secret",
        "/admin/secret",
        "/dav/../admin/secret",
        "/dav/%2e%2e/admin/secret",
        "/dav/..%2Fadmin/secret",
        // The stripped route's upstream paths outside it, a Vestibule endpoint, another host.
        "/files/admin/secret",
        "/bff/user",
        "http://evil.example/dav/x",
        "https://127.0.0.1:8080/dav/x",
        "//evil.example/dav/x",
        "/dav/x?y=1",
        "dav/x",
        "",
    ] {
        let r = moved("MOVE", &[destination]).await;
        assert_eq!(r.status, 400, "{destination:?}: {}", r.text());
    }
    // Two fields: which one the upstream reads is its own choice.
    let r = moved("COPY", &["/dav/a", "/admin/secret"]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(up.count(), before, "a refused request reached the upstream");
    // Its own route's path, absolute or as a path: forwarded as the upstream names it.
    for (method, destination) in [
        ("MOVE", "http://127.0.0.1:8080/dav/old/notes.txt"),
        ("COPY", "/dav/old/./notes.txt"),
        ("MOVE", "http://127.0.0.1:8080/DAV/old/%6Eotes.txt"),
    ] {
        let r = moved(method, &[destination]).await;
        assert_eq!(r.status, 200, "{method} {destination}: {}", r.text());
        let seen = up.last();
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            (method, "/files/notes.txt")
        );
        let sent: Vec<_> = seen.headers.get_all("destination").iter().collect();
        assert_eq!(
            sent,
            [format!("{u}/files/old/notes.txt").as_str()],
            "{destination}"
        );
    }
}

/// An upstream answering every request with the status in `x-status`, the `Location` in
/// `x-location` (as a WebDAV server answers a `PUT` or `MKCOL` with 201, or redirects) and the
/// `Content-Location` in `x-content-location`, each if asked.
async fn locating_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let h = req.headers();
                        let status: u16 = h["x-status"].to_str().unwrap().parse().unwrap();
                        let mut response = http::Response::builder().status(status);
                        for (asked, field) in [
                            ("x-location", "location"),
                            ("x-content-location", "content-location"),
                        ] {
                            if let Some(value) = h.get(asked) {
                                response = response.header(field, value.clone());
                            }
                        }
                        let response = response
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    url
}

/// The locating upstream behind `/dav/` (its `/files`, `strip_prefix`) and `/` (as it is): the
/// upstream's URL and the proxy.
async fn dav_behind_strip_prefix() -> (String, Proxy) {
    let u = locating_upstream().await;
    let routes = format!(
        "[[routes]]\npath = \"/dav/\"\nupstream = \"{u}/files\"\nstrip_prefix = true\n\
         [[routes]]\npath = \"/\"\nupstream = \"{u}\"\n"
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    (u, proxy)
}

/// For each `(status, sent, expected)`: a request to `path` whose upstream answers `status`
/// with `field` set to `sent`; a line for each answer whose `field` is not `expected`.
async fn rewrites(
    proxy: &Proxy,
    path: &str,
    field: &str,
    cases: impl IntoIterator<Item = (&str, String, String)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let echo = format!("x-{field}");
    for (status, sent, expected) in cases {
        let r = get(&proxy.url(path), &[("x-status", status), (&echo, &sent)]).await;
        let got = r.header(field).unwrap_or_default().to_string();
        if got != expected {
            failures.push(format!(
                "{status} {sent}: {field} {got:?}, not {expected:?}"
            ));
        }
    }
    failures
}

/// Under `strip_prefix` (and a base path) the upstream names its own paths: a WebDAV server's
/// 201 after `PUT` or `MKCOL` says `Location: /files/new/`, a redirect says where the
/// upstream's `/files/x/` is. Relayed as they came, the client follows a path Vestibule gives
/// another route (here `/files/` on the catch-all) or none. A `Location` that is a path or a
/// URL on the route's upstream, below its base, is written back as the public path the route
/// maps to it (a URL on `public_url`); any other is left alone.
#[tokio::test]
async fn an_upstreams_location_under_strip_prefix_names_the_public_path() {
    let (u, proxy) = dav_behind_strip_prefix().await;
    let public = "http://127.0.0.1:8080";
    let cases = [
        (
            "201",
            "/files/new/doc.txt".to_string(),
            "/dav/new/doc.txt".to_string(),
        ),
        (
            "201",
            format!("{u}/files/new/"),
            format!("{public}/dav/new/"),
        ),
        (
            "301",
            "/files/x/?a=1".to_string(),
            "/dav/x/?a=1".to_string(),
        ),
        ("302", "/files".to_string(), "/dav/".to_string()),
        // Not below the base, another host, relative: as they came.
        (
            "302",
            "/filesystem/x".to_string(),
            "/filesystem/x".to_string(),
        ),
        (
            "302",
            "https://elsewhere.example/files/x".to_string(),
            "https://elsewhere.example/files/x".to_string(),
        ),
        ("302", "x/y".to_string(), "x/y".to_string()),
    ];
    let failures = rewrites(&proxy, "/dav/put", "location", cases).await;
    // A route that maps paths as they are leaves its upstream's `Location` alone.
    let r = get(
        &proxy.url("/other"),
        &[("x-status", "201"), ("x-location", "/files/new")],
    )
    .await;
    assert_eq!(r.header("location"), Some("/files/new"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `Content-Location` names the resource an answer's content is (RFC 9110 §8.7): under
/// `strip_prefix` an upstream names its own path there (`200` to a content-negotiated `GET`,
/// `201` and `204` to a `PUT`, a WebDAV `PROPPATCH`), and a client that stores or follows it
/// lands on another route's path or none, as with `Location`. Written back the same way, on any
/// status; one that is not on the upstream below its base passes as it came.
#[tokio::test]
async fn an_upstreams_content_location_under_strip_prefix_names_the_public_path() {
    let (u, proxy) = dav_behind_strip_prefix().await;
    let public = "http://127.0.0.1:8080";
    let cases = [
        (
            "200",
            "/files/doc.en.txt".to_string(),
            "/dav/doc.en.txt".to_string(),
        ),
        (
            "201",
            format!("{u}/files/new/"),
            format!("{public}/dav/new/"),
        ),
        ("204", "/files/x?v=2".to_string(), "/dav/x?v=2".to_string()),
        ("207", "/files".to_string(), "/dav/".to_string()),
        // Not below the base, another host, relative: as they came.
        (
            "200",
            "/filesystem/x".to_string(),
            "/filesystem/x".to_string(),
        ),
        (
            "200",
            "https://elsewhere.example/files/x".to_string(),
            "https://elsewhere.example/files/x".to_string(),
        ),
        ("200", "doc.en.txt".to_string(), "doc.en.txt".to_string()),
    ];
    let failures = rewrites(&proxy, "/dav/doc.txt", "content-location", cases).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both fields of one answer, each written back.
    let r = get(
        &proxy.url("/dav/put"),
        &[
            ("x-status", "201"),
            ("x-location", "/files/a"),
            ("x-content-location", "/files/a"),
        ],
    )
    .await;
    assert_eq!(
        (r.header("location"), r.header("content-location")),
        (Some("/dav/a"), Some("/dav/a"))
    );
    // A route that maps paths as they are leaves it alone.
    let r = get(
        &proxy.url("/other"),
        &[("x-status", "200"), ("x-content-location", "/files/new")],
    )
    .await;
    assert_eq!(r.header("content-location"), Some("/files/new"));
}

/// The rewrite must never make a `Location` leave the site or the route. An upstream's
/// `/store//evil.example/x` (or `/store/\evil.example`, a tab after the slash) is a path on
/// the upstream's own host, as is the site's `/store//evil.example/x` when relayed as it came;
/// with the base path cut off and nothing put in front (a route at `/`, or one keeping its
/// prefix), it became `//evil.example/x`, which browsers follow to another site. A path below
/// the base that the route does not map back to (`/store/other/x` behind `/dav/`) is another
/// route's public path, not this upstream's: left as it came too.
#[tokio::test]
async fn a_rewritten_location_never_leaves_the_site_or_the_route() {
    let u = locating_upstream().await;
    let routes = format!(
        "[[routes]]\npath = \"/dav/\"\nupstream = \"{u}/store\"\n\
         [[routes]]\npath = \"/\"\nupstream = \"{u}/store\"\n"
    );
    let proxy = start_proxy(&config_text(&routes)).await;
    let mut failures = Vec::new();
    for (at, sent) in [
        ("/x", "/store//evil.example/x"),
        ("/x", "/store/\\evil.example/x"),
        ("/x", "/store/\t/evil.example/x"),
        ("/x", "/store/./\\evil.example"),
        ("/x", "/store/a/../\\evil.example"),
        ("/dav/x", "/store/other/x"),
        ("/dav/x", "/store/dav/../other/x"),
    ] {
        let r = get(&proxy.url(at), &[("x-status", "302"), ("x-location", sent)]).await;
        let got = r.header("location").unwrap_or_default().to_string();
        if got != sent {
            failures.push(format!("{at} {sent:?}: Location {got:?}, not as it came"));
        }
    }
    // The common case still maps.
    let r = get(
        &proxy.url("/dav/x"),
        &[("x-status", "201"), ("x-location", "/store/dav/new/")],
    )
    .await;
    assert_eq!(r.header("location"), Some("/dav/new/"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
