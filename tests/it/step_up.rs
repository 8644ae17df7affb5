//! Step-up authentication per route: a route that requires `acr_values` and/or `max_age` answers
//! a session that falls short with 401 `step_up_required` (a navigation is redirected) naming
//! the `login_url` that asks the provider for it; the ID token that comes back is checked
//! against what was asked; an upstream's RFC 9470 challenge gets the same answer. End to end
//! with the real provider (which supports `acr_values` and `max_age`), hostile cases with the
//! fake one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hostile;

use crate::fake_provider::now;
use crate::support::browser::Browser;
use crate::support::stack::LoginStack;
use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::time::Duration;
use vestibule::clock::TestClock;

/// An upstream that, like an RFC 9470 resource server, answers a path ending in one of
/// `challenges`' suffixes with that status and those `WWW-Authenticate` fields (body `{}`), and
/// everything else with 200 and the `Authorization` it got as `{"authorization": …}`.
async fn upstream_with(
    challenges: &'static [(&'static str, u16, &'static [&'static str])],
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let authorization = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    let echo = json!({ "authorization": authorization }).to_string();
                    let mut response = http::Response::new(Full::new(Bytes::from(echo)));
                    let path = req.uri().path();
                    if let Some((_, status, fields)) = challenges
                        .iter()
                        .find(|(suffix, ..)| path.ends_with(suffix))
                    {
                        *response.status_mut() = http::StatusCode::from_u16(*status).unwrap();
                        *response.body_mut() = Full::new(Bytes::from_static(b"{}"));
                        for field in *fields {
                            response
                                .headers_mut()
                                .append("www-authenticate", http::HeaderValue::from_static(field));
                        }
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    url
}

/// An upstream that wants a stronger sign-in for `/transfer` and answers everything else.
async fn challenging_upstream() -> String {
    upstream_with(&[(
        "/transfer",
        401,
        &[
            r#"Bearer error="insufficient_user_authentication", error_description="A different authentication level is required", acr_values="mfa", max_age="300""#,
        ],
    )])
    .await
}

async fn stack() -> LoginStack {
    let rs = challenging_upstream().await;
    LoginStack::builder()
        .provider(json!({ "acr_values": ["pwd", "mfa"] }))
        // The tests read the step-up parameters from the browser's URL, so without PAR (the
        // pushed request carries the same parameters: tests/it/par.rs).
        .config(|c| c.add("oidc.par", "never"))
        .extra(move |u| {
            format!(
                r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
[[routes]]
path = "/secure/"
upstream = "{u}"
token = "user"
auth = "required"
acr_values = ["mfa"]
[[routes]]
path = "/rs/"
upstream = "{rs}"
token = "user"
[[routes]]
path = "/rs-pages/"
upstream = "{rs}"
token = "user"
csrf = false
"#
            )
        })
        .start()
        .await
}

/// Follows `login_url` (relative to `base`) through the provider's login form, posting `acr`
/// when given, and returns the proxy's callback reply.
async fn login_via(browser: &mut Browser, base: &str, login_url: &str, acr: Option<&str>) -> Reply {
    let start = browser
        .get(&format!("{base}{login_url}"), &[("accept", "text/html")])
        .await;
    assert_eq!(start.status, 302, "{}", start.text());
    let mut form = "login=alice&password=alice".to_string();
    if let Some(acr) = acr {
        form.push_str(&format!("&acr={acr}"));
    }
    let url = start.header("location").unwrap().to_string();
    let callback = browser.back_at(base, url, Some(&form)).await;
    browser.get(&callback, &[("accept", "text/html")]).await
}

/// [`login_via`], which must sign the user in (the callback redirects back into the app).
async fn signed_in_via(
    browser: &mut Browser,
    base: &str,
    login_url: &str,
    acr: Option<&str>,
) -> Reply {
    let done = login_via(browser, base, login_url, acr).await;
    assert_eq!(done.status, 302, "{}", done.text());
    done
}

/// Follows the `login_url` of a `step_up_required` answer's `body` with [`signed_in_via`].
async fn step_up(browser: &mut Browser, s: &LoginStack, body: &Value, acr: Option<&str>) -> Reply {
    let login_url = body["login_url"].as_str().unwrap();
    signed_in_via(browser, &s.base, login_url, acr).await
}

/// A `GET` of `path` at the stack's proxy as the app sends it, which must answer `status`.
async fn call(browser: &mut Browser, s: &LoginStack, path: &str, status: u16) -> Reply {
    let r = browser.get(&s.proxy().url(path), &[("x-csrf", "1")]).await;
    assert_eq!(r.status, status, "{}", r.text());
    r
}

async fn user_claims(browser: &mut Browser, s: &LoginStack) -> Value {
    call(browser, s, "/bff/user", 200).await.json()
}

#[tokio::test]
async fn a_route_requiring_mfa_sends_a_password_session_to_a_step_up_login_and_lets_it_in_after() {
    let s = stack().await;
    let mut browser = Browser::default();
    signed_in_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
    // A plain login asks for no acr; the provider names none.
    assert!(user_claims(&mut browser, &s).await["acr"].is_null());
    // The plain route serves the session; the step-up route tells the SPA what to do.
    call(&mut browser, &s, "/api/x", 200).await;
    let r = call(&mut browser, &s, "/secure/data?q=1", 401).await;
    let body = r.json();
    assert_eq!(body["error"], "step_up_required");
    assert_eq!(body["acr_values"], json!(["mfa"]));
    assert_eq!(
        body["login_url"],
        "/bff/login?returnUrl=%2Fsecure%2Fdata%3Fq%3D1&acr_values=mfa"
    );
    // A navigation is redirected there.
    let nav = browser
        .get(&s.proxy().url("/secure/page"), &[("accept", "text/html")])
        .await;
    assert_eq!(nav.status, 302);
    assert_eq!(
        nav.header("location"),
        Some("/bff/login?returnUrl=%2Fsecure%2Fpage&acr_values=mfa")
    );
    // The provider is asked for it, with a fresh sign-in.
    let login_url = body["login_url"].as_str().unwrap().to_string();
    let start = browser
        .clone()
        .get(&format!("{}{login_url}", s.base), &[])
        .await;
    let authorization = url::Url::parse(start.header("location").unwrap()).unwrap();
    let query: std::collections::HashMap<_, _> = authorization.query_pairs().into_owned().collect();
    assert_eq!(query["acr_values"], "mfa");
    assert_eq!(query["prompt"], "login");
    // The user gives the second factor: back where they were, and let in.
    let done = signed_in_via(&mut browser, &s.base, &login_url, Some("mfa")).await;
    assert_eq!(done.header("location"), Some("/secure/data?q=1"));
    assert_eq!(user_claims(&mut browser, &s).await["acr"], "mfa");
    call(&mut browser, &s, "/secure/data?q=1", 200).await;
}

#[tokio::test]
async fn a_step_up_login_that_brings_back_a_weaker_acr_is_refused_and_the_session_stays() {
    let s = stack().await;
    let mut browser = Browser::default();
    signed_in_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
    // The user signs in again without the second factor: the provider says acr "pwd".
    let done = login_via(
        &mut browser,
        &s.base,
        "/bff/login?returnUrl=%2Fsecure%2F&acr_values=mfa",
        None,
    )
    .await;
    assert_eq!(done.status, 400, "{}", done.text());
    assert!(
        done.text().contains("reason: acr_not_satisfied"),
        "{}",
        done.text()
    );
    // The earlier session is untouched, and still not enough for the route.
    assert!(user_claims(&mut browser, &s).await["acr"].is_null());
    let r = call(&mut browser, &s, "/secure/x", 401).await;
    assert_eq!(r.json()["error"], "step_up_required");
}

#[tokio::test]
async fn an_upstream_asking_for_stronger_authentication_gets_the_same_step_up_answer() {
    let s = stack().await;
    let mut browser = Browser::default();
    signed_in_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
    call(&mut browser, &s, "/rs/balance", 200).await;
    let r = call(&mut browser, &s, "/rs/transfer", 401).await;
    let body = r.json();
    assert_eq!(body["error"], "step_up_required", "{body}");
    assert_eq!(body["acr_values"], json!(["mfa"]));
    assert_eq!(body["max_age"], 300);
    assert_eq!(
        body["login_url"],
        "/bff/login?returnUrl=%2Frs%2Ftransfer&acr_values=mfa&max_age=300"
    );
    assert!(r.header("www-authenticate").is_none());
    // A page the upstream serves (a route without CSRF, so that a navigation reaches it) sends
    // the browser to the same step-up login, as a route's own requirement does.
    let nav = browser
        .get(
            &s.proxy().url("/rs-pages/transfer?to=bob"),
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(nav.status, 302, "{}", nav.text());
    assert_eq!(
        nav.header("location"),
        Some("/bff/login?returnUrl=%2Frs-pages%2Ftransfer%3Fto%3Dbob&acr_values=mfa&max_age=300")
    );
    // Following it with the second factor gives an mfa session with a fresh auth_time.
    step_up(&mut browser, &s, &body, Some("mfa")).await;
    let user = user_claims(&mut browser, &s).await;
    assert_eq!(user["acr"], "mfa");
    let auth_time = user["auth_time"].as_u64().unwrap();
    assert!(auth_time.abs_diff(now()) < 30, "{user}");
}

#[tokio::test]
async fn a_slow_code_exchange_with_no_clock_skew_still_signs_in() {
    // The ID token is issued when the provider answers the code exchange, not when the callback
    // arrived: a provider slower than the allowed skew (here none) is no ID token "from the future".
    let s = LoginStack::builder()
        .config(|c| c.add("oidc.clock_skew", "0s"))
        .start()
        .await;
    let r = s
        .provider
        .control("/_test/behaviour", json!({ "token_delay_ms": 1500 }))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut browser = Browser::default();
    signed_in_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
}

#[tokio::test]
async fn a_route_with_max_age_asks_for_a_fresh_sign_in_once_the_last_one_is_too_old() {
    let rs = challenging_upstream().await;
    let s = LoginStack::builder()
        .provider(json!({ "acr_values": ["pwd", "mfa"] }))
        .extra(move |_| {
            format!("[[routes]]\npath = \"/recent/\"\nupstream = \"{rs}\"\ntoken = \"user\"\nauth = \"required\"\nmax_age = \"5s\"\n")
        })
        .config(|c| c.add("oidc.clock_skew", "0s"))
        .start()
        .await;
    let mut browser = Browser::default();
    signed_in_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
    // A plain login says nothing of when the user authenticated: not enough for max_age.
    let r = call(&mut browser, &s, "/recent/a", 401).await;
    let body = r.json();
    assert_eq!(body["error"], "step_up_required");
    assert_eq!(body["max_age"], 5);
    assert!(body.get("acr_values").is_none(), "{body}");
    assert_eq!(
        body["login_url"],
        "/bff/login?returnUrl=%2Frecent%2Fa&max_age=5"
    );
    step_up(&mut browser, &s, &body, None).await;
    call(&mut browser, &s, "/recent/a", 200).await;
    // Once that sign-in is older than max_age, a fresh one is asked for again.
    let body = eventually(
        "the sign-in is older than max_age",
        Duration::from_secs(20),
        || {
            let mut b = browser.clone();
            let url = s.proxy().url("/recent/b");
            async move {
                let r = b.get(&url, &[("x-csrf", "1")]).await;
                (r.status == 401).then(|| r.json())
            }
        },
    )
    .await;
    assert_eq!(body["error"], "step_up_required");
    step_up(&mut browser, &s, &body, None).await;
    call(&mut browser, &s, "/recent/b", 200).await;
}

#[tokio::test]
async fn a_stepped_up_session_stays_stepped_up_across_refreshes() {
    let clock = TestClock::new();
    let rs = challenging_upstream().await;
    let s = LoginStack::builder()
        .provider(json!({ "acr_values": ["pwd", "mfa"], "access_token_ttl": 8 }))
        .extra(move |_| {
            format!(
                "[[routes]]\npath = \"/secure/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
                 auth = \"required\"\nacr_values = [\"mfa\"]\nmax_age = \"1h\"\n"
            )
        })
        .config(|c| c.set("oidc.refresh_skew", "4s"))
        .clock(clock.clock())
        .start()
        .await;
    let mut browser = Browser::default();
    let login_url = "/bff/login?returnUrl=%2Fsecure%2F&acr_values=mfa&max_age=3600";
    signed_in_via(&mut browser, &s.base, login_url, Some("mfa")).await;
    let bearer = |r: &Reply| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["authorization"].as_str().unwrap().to_string()
    };
    let url = s.proxy().url("/secure/a");
    let first = bearer(&browser.get(&url, &[("x-csrf", "1")]).await);
    // The access token is due: this request refreshes it (and the session's ID token claims).
    clock.advance(Duration::from_millis(4_300));
    let second = bearer(&browser.get(&url, &[("x-csrf", "1")]).await);
    assert_ne!(first, second, "the access token was not refreshed");
    // Admitted on the claims the refresh left: the sign-in is still the mfa one.
    let third = bearer(&browser.get(&url, &[("x-csrf", "1")]).await);
    assert_eq!(second, third);
    let user = user_claims(&mut browser, &s).await;
    assert_eq!(user["acr"], "mfa", "{user}");
    assert!(user["auth_time"].is_u64(), "{user}");
}

#[tokio::test]
async fn acr_values_added_to_a_route_by_a_reload_apply_to_the_sessions_already_there() {
    let s = stack().await;
    let mut browser = Browser::default();
    let done = login_via(&mut browser, &s.base, "/bff/login?returnUrl=/", None).await;
    assert_eq!(done.status, 302, "{}", done.text());
    let balance = || {
        let mut browser = browser.clone();
        let url = s.proxy().url("/rs/balance");
        async move { browser.get(&url, &[("x-csrf", "1")]).await }
    };
    assert_eq!(balance().await.status, 200);
    // routes[2] is "/rs/": it now asks for mfa, which this password session lacks.
    assert_eq!(s.config.get("routes.2.path").as_str(), Some("/rs/"));
    let stricter = s.config.clone().add("routes.2.acr_values", vec!["mfa"]);
    std::fs::write(s.proxy().dir.path().join("config.toml"), stricter.text()).unwrap();
    crate::support::eventually(
        "the reloaded route asks for mfa",
        std::time::Duration::from_secs(10),
        || async { (balance().await.status == 401).then_some(()) },
    )
    .await;
    let r = balance().await;
    assert_eq!(r.json()["error"], "step_up_required", "{}", r.text());
    assert_eq!(r.json()["acr_values"], json!(["mfa"]));
}
