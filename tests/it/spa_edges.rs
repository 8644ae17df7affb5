//! The edges a single-page app meets at sign-in, against the real OpenID provider: a user who
//! cancels at the provider, and silent sign-in (`prompt=none`) with and without a provider
//! session, both come back to the app's `returnUrl` with a `login_error` flag rather than to a
//! dead-end page; and only a callback that carries this browser's own login state may do so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::{Browser, absolute, urlencode};
use crate::support::stack::LoginStack as Stack;
use crate::support::*;

/// The parameters are read from the browser's URL, so the authorization request is not pushed.
async fn stack() -> Stack {
    Stack::builder()
        .config(|c| c.add("oidc.par", "never"))
        .start()
        .await
}

/// The `reason` a login-failed page names.
fn reason(reply: &Reply) -> Option<String> {
    let text = reply.text();
    let at = text.find("reason: ")? + "reason: ".len();
    Some(
        text[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect(),
    )
}

fn has_login_cookie(browser: &Browser) -> bool {
    browser.jar.keys().any(|k| k.contains("-login-"))
}

fn has_session_cookie(browser: &Browser) -> bool {
    browser.jar.keys().any(|k| k == "vestibule")
}

/// The `state` of the authorization request a `/bff/login` answer redirects to.
fn state_of(login: &Reply) -> String {
    let location = url::Url::parse(login.header("location").unwrap()).unwrap();
    location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned()
}

#[tokio::test]
async fn cancelling_at_the_provider_returns_to_the_app_with_a_flag() {
    let s = stack().await;
    let mut browser = Browser::default();
    let start = browser.start_login(&s.base, "/app?tab=2").await;
    assert_eq!(start.status, 302);
    let (form, form_url) = browser
        .follow(start.header("location").unwrap().to_string(), "\u{0}")
        .await;
    assert_eq!(form.status, 200, "the provider's login form");
    assert!(form.text().contains("id=\"cancel\""));
    let cancelled = browser
        .post_interaction(&form_url, "abort", String::new())
        .await;
    let cancelled = absolute(&form_url, cancelled.header("location").unwrap());
    let callback = browser.back_at(&s.base, cancelled, None).await;
    assert!(callback.contains("error=access_denied"), "{callback}");
    let back = browser.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(back.status, 302, "{}", back.text());
    assert_eq!(
        back.header("location"),
        Some("/app?tab=2&login_error=access_denied")
    );
    assert!(!has_login_cookie(&browser), "the login state is spent");
    assert!(!has_session_cookie(&browser));

    // The same callback again (the back button): the state is spent, no redirect.
    let again = browser.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(again.status, 400);
    assert_eq!(again.header("location"), None);
}

#[tokio::test]
async fn an_access_denied_callback_without_this_browsers_login_state_redirects_nowhere() {
    let s = stack().await;
    let callback = |query: String| format!("{}/bff/callback?{query}", s.base);
    // No state at all, a made-up one, and another browser's genuine one.
    let mut victim = Browser::default();
    let started = victim
        .get(
            &format!("{}/bff/login?returnUrl=/inbox", s.base),
            &[("accept", "text/html")],
        )
        .await;
    let victims_state = state_of(&started);
    for (what, query, why) in [
        (
            "no state",
            "error=access_denied".to_string(),
            "provider_error",
        ),
        (
            "a made-up state",
            "error=access_denied&state=made-up".to_string(),
            "login_state_missing",
        ),
        (
            "another browser's state",
            format!("error=access_denied&state={victims_state}"),
            "login_state_missing",
        ),
        (
            "a redirect parameter",
            format!(
                "error=access_denied&state={victims_state}&returnUrl=https%3A%2F%2Fevil.example"
            ),
            "login_state_missing",
        ),
    ] {
        let mut attacker = Browser::default();
        let r = attacker
            .get(&callback(query), &[("accept", "text/html")])
            .await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.header("location"), None, "{what} redirected");
        assert_eq!(reason(&r).as_deref(), Some(why), "{what}: {}", r.text());
    }
    // Other provider errors keep the login-failed page, even with this browser's own state.
    let r = victim
        .get(
            &callback(format!("error=server_error&state={victims_state}")),
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(reason(&r).as_deref(), Some("provider_error"));
    assert_eq!(r.header("location"), None);
}

#[tokio::test]
async fn silent_sign_in_without_a_provider_session_comes_back_with_login_required() {
    let s = stack().await;
    let mut browser = Browser::default();
    let start = browser
        .get(
            &format!("{}/bff/login?prompt=none&returnUrl=/app", s.base),
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(start.status, 302, "{}", start.text());
    let authorize = url::Url::parse(start.header("location").unwrap()).unwrap();
    let prompts: Vec<_> = authorize
        .query_pairs()
        .filter(|(k, _)| k == "prompt")
        .map(|(_, v)| v.into_owned())
        .collect();
    assert_eq!(prompts, ["none"]);
    let callback = browser.back_at(&s.base, authorize.to_string(), None).await;
    let back = browser.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(back.status, 302, "{}", back.text());
    assert_eq!(
        back.header("location"),
        Some("/app?login_error=login_required")
    );
    assert!(!has_session_cookie(&browser));
    assert!(!has_login_cookie(&browser));
}

#[tokio::test]
async fn silent_sign_in_with_a_provider_session_signs_in_without_a_page() {
    let s = stack().await;
    let mut browser = s.login("alice").await;
    // The app's session is gone (expired, or ended here only); the provider's is not.
    browser.jar.remove("vestibule");
    assert_eq!(
        browser
            .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
            .await
            .status,
        401
    );
    let start = browser
        .get(
            &format!(
                "{}/bff/login?prompt=none&returnUrl={}",
                s.base,
                urlencode("/app#top")
            ),
            &[("accept", "text/html")],
        )
        .await;
    assert_eq!(start.status, 302, "{}", start.text());
    let authorize = start.header("location").unwrap().to_string();
    let callback = browser.back_at(&s.base, authorize, None).await;
    assert!(callback.contains("code="), "{callback}");
    let back = browser.get(&callback, &[("accept", "text/html")]).await;
    assert_eq!(back.status, 302, "{}", back.text());
    assert_eq!(back.header("location"), Some("/app#top"));
    let user = browser
        .get(&format!("{}/bff/user", s.base), &[("x-csrf", "1")])
        .await;
    assert_eq!(user.status, 200);
    assert_eq!(user.json()["sub"], "alice");
}

#[tokio::test]
async fn only_the_prompt_values_of_openid_connect_are_passed_on() {
    let s = stack().await;
    for prompt in ["none%20login", "evil", "none&prompt=login", ""] {
        let r = get(
            &format!("{}/bff/login?returnUrl=/&prompt={prompt}", s.base),
            &[],
        )
        .await;
        assert_eq!(r.status, 400, "prompt={prompt}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_prompt", "prompt={prompt}");
    }
    for prompt in ["login", "consent", "select_account"] {
        let r = get(
            &format!("{}/bff/login?returnUrl=/&prompt={prompt}", s.base),
            &[],
        )
        .await;
        assert_eq!(r.status, 302, "prompt={prompt}: {}", r.text());
        let location = url::Url::parse(r.header("location").unwrap()).unwrap();
        assert!(
            location
                .query_pairs()
                .any(|(k, v)| k == "prompt" && v == prompt)
        );
    }
}
