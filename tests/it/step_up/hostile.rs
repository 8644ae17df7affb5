//! Step-up cases a real provider or upstream will not produce, with the in-process fake
//! provider: ID tokens that bring back less than a step-up login asked for, a user who takes
//! their time, and upstream challenges that are malformed, hostile, or not RFC 9470's.

use super::upstream_with;
use crate::fake_provider::{claims, now};
use crate::support::browser::Browser;
use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;
use vestibule::clock::TestClock;
use vestibule::jose::testing::{TestKey, TestSigner};

/// A proxy on a [`TestClock`] in front of the fake provider, and a browser.
struct Fake {
    signer: TestSigner,
    idp: fake_idp::FakeIdp,
    clock: TestClock,
    proxy: Proxy,
    browser: Browser,
}

impl Fake {
    async fn start(extra: &str) -> Fake {
        Fake::start_with(extra, |c| c).await
    }

    /// [`Fake::start`] with the configuration edited by `edit` too.
    async fn start_with(extra: &str, edit: fn(TomlConfig) -> TomlConfig) -> Fake {
        let signer = TestSigner::new();
        let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
        let clock = TestClock::new();
        let config = edit(config_toml(extra).set("oidc.issuer", idp.issuer.as_str()));
        let proxy = start_proxy_with_clock(config, clock.clock()).await;
        wait_metadata(&proxy).await;
        Fake {
            signer,
            idp,
            clock,
            proxy,
            browser: Browser::default(),
        }
    }

    /// Starts the login at `login_url` (a path), lets the user take `slow` to sign in, and
    /// completes it with an ID token of `edit(claims)`. Returns the provider's authorization
    /// query and the callback's reply.
    async fn login(
        &mut self,
        login_url: &str,
        slow: Duration,
        edit: impl FnOnce(Value) -> Value,
    ) -> (std::collections::HashMap<String, String>, Reply) {
        let start = self.browser.get(&self.proxy.url(login_url), &[]).await;
        assert_eq!(start.status, 302, "{}", start.text());
        let location = url::Url::parse(start.header("location").unwrap()).unwrap();
        let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
        self.clock.advance(slow);
        let mut c = claims(&self.idp.issuer, &q["nonce"]);
        c["iat"] = json!(now() + slow.as_secs());
        *self.idp.state.id_token.lock().unwrap() =
            self.signer.token(TestKey::Rsa1).kid("k1").sign(&edit(c));
        let callback = format!("/bff/callback?code=abc&state={}", q["state"]);
        let reply = self
            .browser
            .get(&self.proxy.url(&callback), &[("accept", "text/html")])
            .await;
        (q, reply)
    }
}

/// A step-up login (`query` after `returnUrl`) answered at once with an ID token of
/// `edit(claims)`.
async fn step_up_login(query: &str, edit: impl FnOnce(Value) -> Value) -> Reply {
    let mut fake = Fake::start("").await;
    let login_url = format!("/bff/login?returnUrl=/{query}");
    fake.login(&login_url, Duration::ZERO, edit).await.1
}

fn with(acr: Option<&str>, auth_time: Option<u64>) -> impl FnOnce(Value) -> Value {
    let acr = acr.map(String::from);
    move |mut c: Value| {
        if let Some(acr) = acr {
            c["acr"] = json!(acr);
        }
        if let Some(t) = auth_time {
            c["auth_time"] = json!(t);
        }
        c
    }
}

fn reason(r: &Reply) -> Option<String> {
    crate::fake_provider::reason(r)
}

#[tokio::test]
async fn what_a_step_up_login_brings_back_is_checked_against_what_was_asked() {
    // A weaker acr than asked.
    let r = step_up_login("&acr_values=mfa+hwk", with(Some("pwd"), None)).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("acr_not_satisfied"),
        "{}",
        r.text()
    );
    // No acr at all.
    let r = step_up_login("&acr_values=mfa", with(None, Some(now()))).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("acr_not_satisfied"),
        "{}",
        r.text()
    );
    // max_age asked, no auth_time (OpenID Connect Core §3.1.2.1: it is then required).
    let r = step_up_login("&max_age=60", with(Some("mfa"), None)).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("auth_time_missing"),
        "{}",
        r.text()
    );
    // An old sign-in passed off as fresh.
    let r = step_up_login("&max_age=60", with(None, Some(now() - 3600))).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("auth_time_too_old"),
        "{}",
        r.text()
    );
    // What was asked.
    let r = step_up_login(
        "&acr_values=mfa+hwk&max_age=60",
        with(Some("hwk"), Some(now() - 5)),
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.text());
    // A plain login checks neither.
    let r = step_up_login("", with(Some("pwd"), None)).await;
    assert_eq!(r.status, 302, "{}", r.text());
}

#[tokio::test]
async fn a_step_up_login_is_as_fresh_as_asked_when_it_started_however_long_the_user_takes() {
    // max_age=0, what an upstream's bare challenge asks: a sign-in after the login started.
    // The user signs in two seconds in and their browser comes back three minutes later.
    let started = now();
    let mut fake = Fake::start("").await;
    let (_, r) = fake
        .login(
            "/bff/login?returnUrl=/&max_age=0",
            Duration::from_secs(180),
            with(None, Some(started + 2)),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    // A sign-in from before the login started (beyond the clock skew) is still too old.
    let (_, r) = fake
        .login(
            "/bff/login?returnUrl=/&max_age=0",
            Duration::from_secs(180),
            with(None, Some(started - 120)),
        )
        .await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("auth_time_too_old"),
        "{}",
        r.text()
    );
}

/// An `auth_time` after the present (beyond the clock skew) is no sign-in at all: its age,
/// counted from it, would stay under any `max_age` until that time came, and a route asking for
/// a recent sign-in would take it for one all along.
#[tokio::test]
async fn a_sign_in_dated_in_the_future_is_never_fresh_enough() {
    let r = step_up_login("&max_age=60", with(Some("mfa"), Some(now() + 3600))).await;
    assert_eq!(
        reason(&r).as_deref(),
        Some("auth_time_in_future"),
        "{}",
        r.text()
    );
    // A plain login checks no auth_time; a route with max_age must not take this one as fresh.
    let rs = upstream_with(&[]).await;
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/secure/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
         auth = \"required\"\nmax_age = \"5m\"\n"
    ))
    .await;
    let (_, r) = fake
        .login(
            "/bff/login?returnUrl=/",
            Duration::ZERO,
            with(Some("mfa"), Some(now() + 3600)),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let url = fake.proxy.url("/secure/x");
    let r = fake.browser.get(&url, &[("x-csrf", "1")]).await;
    assert_eq!(r.json()["error"], "step_up_required", "{}", r.text());
}

#[tokio::test]
async fn malformed_step_up_parameters_are_refused_at_login() {
    let fake = Fake::start("").await;
    for query in ["&max_age=soon", "&max_age=-1", "&acr_values=%22x%22"] {
        let r = get(
            &fake.proxy.url(&format!("/bff/login?returnUrl=/{query}")),
            &[],
        )
        .await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request");
    }
}

#[tokio::test]
async fn upstream_challenges_become_a_step_up_only_as_rfc_9470_says_and_never_pass_on_their_text() {
    let rs = upstream_with(&[
        (
            "/hostile",
            401,
            &[
                r#"Bearer error="insufficient_user_authentication", error_description="<script>alert(1)</script>", acr_values="mfa\" onclick=x", max_age="-5""#,
            ],
        ),
        (
            "/second-field",
            401,
            &[
                r#"Basic realm="rs""#,
                r#"Bearer error="insufficient_user_authentication", max_age=30"#,
            ],
        ),
        (
            // RFC 9110 §11.6.1: several challenges in one field, the Bearer one not first.
            "/combined",
            401,
            &[
                r#"DPoP error="use_dpop_nonce", Bearer error="insufficient_user_authentication", acr_values="mfa""#,
            ],
        ),
        (
            // Another scheme's challenge naming the error, and a Bearer one that does not.
            "/not-bearer",
            401,
            &[
                r#"Newauth error="insufficient_user_authentication", acr_values="weak", Bearer realm="rs", error_description="insufficient_user_authentication""#,
            ],
        ),
        (
            "/forbidden",
            403,
            &[r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#],
        ),
    ])
    .await;
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/rs/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/public/\"\nupstream = \"{rs}\"\n"
    ))
    .await;
    let (_, r) = fake
        .login("/bff/login?returnUrl=/", Duration::ZERO, with(None, None))
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let call = |fake: &Fake, path: &str| {
        let url = fake.proxy.url(path);
        let mut browser = fake.browser.clone();
        async move { browser.get(&url, &[("x-csrf", "1")]).await }
    };
    // Malformed parameters are not passed on (nor is the description): a fresh sign-in is asked.
    let r = call(&fake, "/rs/hostile").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let body = r.json();
    assert_eq!(
        body,
        json!({
            "error": "step_up_required",
            "message": body["message"],
            "login_url": "/bff/login?returnUrl=%2Frs%2Fhostile&max_age=0",
            "max_age": 0,
        })
    );
    assert!(!r.text().contains("script") && !r.text().contains("onclick"));
    assert!(r.header("www-authenticate").is_none());
    // The challenge may come in a later WWW-Authenticate field.
    let r = call(&fake, "/rs/second-field").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["max_age"], 30, "{}", r.text());
    // Or after another challenge in the same field, with its own parameters.
    let r = call(&fake, "/rs/combined").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "step_up_required", "{}", r.text());
    assert_eq!(r.json()["acr_values"], json!(["mfa"]), "{}", r.text());
    // Only a Bearer challenge's `error` asks: the upstream's answer is passed through.
    let r = call(&fake, "/rs/not-bearer").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), "{}");
    // Not a 401: not RFC 9470's challenge, passed through as the upstream's answer.
    let r = call(&fake, "/rs/forbidden").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "{}");
    // A route that does not send the user's token: the challenge is not about the session.
    let r = call(&fake, "/public/hostile").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), "{}");
    // The step-up login asks the provider for a fresh sign-in and checks it came back fresh.
    let (q, r) = fake
        .login(
            "/bff/login?returnUrl=%2Frs%2Fhostile&max_age=0",
            Duration::from_secs(1),
            with(None, Some(now() - 600)),
        )
        .await;
    assert_eq!(q["max_age"], "0");
    assert!(
        !q.contains_key("acr_values") && !q.contains_key("prompt"),
        "{q:?}"
    );
    assert_eq!(
        reason(&r).as_deref(),
        Some("auth_time_too_old"),
        "{}",
        r.text()
    );
    let (_, r) = fake
        .login(
            "/bff/login?returnUrl=%2Frs%2Fhostile&max_age=0",
            Duration::ZERO,
            with(None, Some(now())),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(r.header("location"), Some("/rs/hostile"));
}

#[tokio::test]
async fn check_validates_the_keys_and_online_warns_of_acr_values_the_provider_does_not_list() {
    use crate::client_auth::check_in_background as run;
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let route = "[[routes]]\npath = \"/secure/\"\nupstream = \"http://127.0.0.1:9\"\n\
                 auth = \"required\"\nacr_values = [\"mfa\", \"hwk\"]\nmax_age = \"10m\"\n";
    let config = config_toml(route).set("oidc.issuer", idp.issuer.as_str());
    let (code, out) = run(&config, false).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning"), "{out}");
    let bad = config
        .clone()
        .set("routes.0.acr_values", vec!["mfa", "two words"])
        .set("routes.0.max_age", "soon")
        .remove("routes.0.auth");
    let (code, out) = run(&bad, false).await;
    assert_eq!(code, Some(1), "{out}");
    for line in [
        "routes[0].acr_values[1]: \"two words\" is not an acr value",
        "routes[0].max_age: \"soon\" is not a duration",
        "routes[0].acr_values: acr_values and max_age need a signed-in user",
    ] {
        assert!(out.contains(line), "{line} in {out}");
    }
    // A provider that publishes no acr_values_supported: a warning, and the check passes.
    let (code, out) = run(&config, true).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: routes[0].acr_values: the provider publishes no acr_values_supported, so whether it knows mfa, hwk cannot be checked"),
        "{out}"
    );
    // One that does not list a value: a warning naming it.
    idp.state
        .discovery_extra
        .lock()
        .unwrap()
        .insert("acr_values_supported".to_string(), json!(["pwd", "mfa"]));
    let (code, out) = run(&config, true).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning: routes[0].acr_values: the provider does not list \"hwk\" in acr_values_supported (pwd, mfa)"),
        "{out}"
    );
    assert!(!out.contains("\"mfa\""), "{out}");
    // One that lists them all: nothing to say.
    idp.state.discovery_extra.lock().unwrap().insert(
        "acr_values_supported".to_string(),
        json!(["pwd", "mfa", "hwk"]),
    );
    let (code, out) = run(&config, true).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[tokio::test]
async fn a_refreshed_id_token_that_leaves_out_the_sign_in_keeps_the_step_up() {
    let rs = upstream_with(&[]).await;
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/secure/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
         auth = \"required\"\nacr_values = [\"mfa\"]\nmax_age = \"1h\"\n"
    ))
    .await;
    let (q, r) = fake
        .login(
            "/bff/login?returnUrl=/&acr_values=mfa&max_age=3600",
            Duration::ZERO,
            with(Some("mfa"), Some(now())),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let bearer = |fake: &Fake| {
        let url = fake.proxy.url("/secure/x");
        let mut browser = fake.browser.clone();
        async move {
            let r = browser.get(&url, &[("x-csrf", "1")]).await;
            (r.status == 200)
                .then(|| r.json()["authorization"].as_str().unwrap().to_string())
                .ok_or_else(|| r.json()["error"].as_str().unwrap().to_string())
        }
    };
    assert_eq!(bearer(&fake).await.as_deref(), Ok("Bearer fake-access"));
    // The provider refreshes with an ID token that says nothing of how or when the user signed
    // in (OpenID Connect Core §12.2 allows it): the session's sign-in stands.
    let refresh = |fake: &Fake, n: u32, edit: fn(Value) -> Value| {
        let c = claims(&fake.idp.issuer, &q["nonce"]);
        let id_token = fake.signer.token(TestKey::Rsa1).kid("k1").sign(&edit(c));
        fake.idp.state.script(
            "refresh_token",
            200,
            json!({
                "access_token": format!("fake-access-{n}"), "token_type": "Bearer",
                "expires_in": 300, "refresh_token": format!("fake-refresh-{n}"),
                "id_token": id_token,
            }),
        );
        fake.clock.advance(Duration::from_secs(300));
    };
    refresh(&fake, 2, |c| c);
    assert_eq!(bearer(&fake).await.as_deref(), Ok("Bearer fake-access-2"));
    assert_eq!(bearer(&fake).await.as_deref(), Ok("Bearer fake-access-2"));
    // One that names a weaker sign-in is the provider's word: the route asks for a step-up.
    refresh(&fake, 3, |mut c| {
        c["acr"] = json!("pwd");
        c
    });
    assert_eq!(bearer(&fake).await.as_deref(), Ok("Bearer fake-access-3"));
    assert_eq!(bearer(&fake).await, Err("step_up_required".to_string()));
}

/// With `userinfo = true`, a refresh whose UserInfo call fails keeps the user claims as they
/// were; but how and when the user signed in is the refreshed ID token's word alone, and a
/// weaker sign-in it names must end the step-up as it does without UserInfo.
#[tokio::test]
async fn a_refreshed_id_token_naming_a_weaker_sign_in_ends_the_step_up_though_userinfo_fails() {
    let rs = upstream_with(&[]).await;
    let mut fake = Fake::start_with(
        &format!(
            "[[routes]]\npath = \"/secure/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
             auth = \"required\"\nacr_values = [\"mfa\"]\n"
        ),
        |c| c.add("oidc.userinfo", true),
    )
    .await;
    *fake.idp.state.userinfo.lock().unwrap() = Some((
        200,
        "application/json".into(),
        json!({"sub": "alice", "email": "alice@example.test"}).to_string(),
    ));
    let (q, r) = fake
        .login(
            "/bff/login?returnUrl=/&acr_values=mfa",
            Duration::ZERO,
            with(Some("mfa"), Some(now())),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let secure = |fake: &Fake| {
        let url = fake.proxy.url("/secure/x");
        let mut browser = fake.browser.clone();
        async move {
            let r = browser.get(&url, &[("x-csrf", "1")]).await;
            (r.status == 200)
                .then(|| r.json()["authorization"].as_str().unwrap().to_string())
                .ok_or_else(|| r.json()["error"].as_str().unwrap().to_string())
        }
    };
    assert_eq!(secure(&fake).await.as_deref(), Ok("Bearer fake-access"));
    // The provider now says the sign-in is only a password, and its UserInfo endpoint fails.
    let mut c = claims(&fake.idp.issuer, &q["nonce"]);
    c["acr"] = json!("pwd");
    let id_token = fake.signer.token(TestKey::Rsa1).kid("k1").sign(&c);
    fake.idp.state.script(
        "refresh_token",
        200,
        json!({
            "access_token": "fake-access-2", "token_type": "Bearer", "expires_in": 300,
            "refresh_token": "fake-refresh-2", "id_token": id_token,
        }),
    );
    *fake.idp.state.userinfo.lock().unwrap() = Some((503, "application/json".into(), "{}".into()));
    fake.clock.advance(Duration::from_secs(300));
    assert_eq!(secure(&fake).await.as_deref(), Ok("Bearer fake-access-2"));
    assert_eq!(
        secure(&fake).await,
        Err("step_up_required".to_string()),
        "the session must not keep the mfa its provider no longer vouches for"
    );
}

/// A stream opened on a step-up route with the `acr` it asks for (an admin console's
/// WebSocket, an event stream) went on after a refresh's ID token named a weaker sign-in: new
/// requests were asked for the step-up, the open stream was never checked again. It closes
/// once the session's `acr` falls; a refresh that keeps it (an ID token without `acr`) leaves
/// it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_step_up_route_closes_when_a_refresh_brings_a_weaker_acr() {
    let up = upstream::start().await;
    let u = up.url();
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/secure/\"\nupstream = \"{u}\"\ntoken = \"user\"\n\
         auth = \"required\"\nacr_values = [\"mfa\"]\n\
         [[routes]]\npath = \"/open/\"\nupstream = \"{u}\"\ntoken = \"user\"\n\
         auth = \"required\"\n"
    ))
    .await;
    let (q, r) = fake
        .login(
            "/bff/login?returnUrl=/&acr_values=mfa",
            Duration::ZERO,
            with(Some("mfa"), Some(now())),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let cookie = fake
        .browser
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let stream = [("cookie", cookie.as_str()), ("x-csrf", "1")];
    let mut feed = open_stream(&fake.proxy.url("/secure/ticks"), &stream).await;
    // A refresh (asked for by a call on another route) whose ID token says `acr` is `acr`.
    let refresh = |fake: &mut Fake, n: u32, acr: Option<&str>| {
        let mut c = claims(&fake.idp.issuer, &q["nonce"]);
        if let Some(acr) = acr {
            c["acr"] = json!(acr);
        }
        let id_token = fake.signer.token(TestKey::Rsa1).kid("k1").sign(&c);
        fake.idp.state.script(
            "refresh_token",
            200,
            json!({
                "access_token": format!("fake-access-{n}"), "token_type": "Bearer",
                "expires_in": 300, "refresh_token": format!("fake-refresh-{n}"),
                "id_token": id_token,
            }),
        );
        fake.clock.advance(Duration::from_secs(300));
        let url = fake.proxy.url("/open/x");
        let mut browser = fake.browser.clone();
        async move {
            let r = browser.get(&url, &[("x-csrf", "1")]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["headers"]["authorization"].clone()
        }
    };
    refresh(&mut fake, 2, None).await;
    assert!(
        flows_for(&mut feed, Duration::from_secs(3)).await.is_ok(),
        "a refresh that kept the sign-in cut the stream"
    );
    refresh(&mut fake, 3, Some("pwd")).await;
    let again = fake
        .browser
        .get(&fake.proxy.url("/secure/x"), &[("x-csrf", "1")])
        .await;
    assert_eq!(reason_of(&again).as_deref(), Some("step_up_required"));
    let after = flows_for(&mut feed, Duration::from_secs(5)).await;
    assert!(
        after.is_err(),
        "the stream went on after the session's acr fell to pwd ({after:?} frames)"
    );
}

/// The `error` of a JSON refusal.
fn reason_of(r: &Reply) -> Option<String> {
    serde_json::from_slice::<Value>(&r.body)
        .ok()?
        .get("error")?
        .as_str()
        .map(String::from)
}

/// OpenID Connect Core §12.2: a refreshed ID token's `auth_time` is that of the original
/// sign-in. A refresh happens without the user; one whose ID token dates the sign-in later
/// must not make a route with `max_age` take the session for a recent sign-in.
#[tokio::test]
async fn a_refresh_never_makes_the_sign_in_more_recent() {
    let rs = upstream_with(&[]).await;
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/secure/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
         auth = \"required\"\nmax_age = \"5m\"\n\
         [[routes]]\npath = \"/open/\"\nupstream = \"{rs}\"\ntoken = \"user\"\n\
         auth = \"required\"\n"
    ))
    .await;
    let signed_in = now();
    let (q, r) = fake
        .login(
            "/bff/login?returnUrl=/&max_age=300",
            Duration::ZERO,
            with(None, Some(signed_in)),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    let call = |fake: &Fake, path: &str| {
        let url = fake.proxy.url(path);
        let mut browser = fake.browser.clone();
        async move {
            let r = browser.get(&url, &[("x-csrf", "1")]).await;
            (r.status == 200)
                .then(|| r.json()["authorization"].as_str().unwrap().to_string())
                .ok_or_else(|| r.json()["error"].as_str().unwrap().to_string())
        }
    };
    assert_eq!(
        call(&fake, "/secure/x").await.as_deref(),
        Ok("Bearer fake-access")
    );
    // Ten minutes on, the access token is refreshed; the provider's new ID token says the user
    // signed in just now, which they did not.
    fake.clock.advance(Duration::from_secs(600));
    let mut c = claims(&fake.idp.issuer, &q["nonce"]);
    c["auth_time"] = json!(signed_in + 600);
    let id_token = fake.signer.token(TestKey::Rsa1).kid("k1").sign(&c);
    fake.idp.state.script(
        "refresh_token",
        200,
        json!({
            "access_token": "fake-access-2", "token_type": "Bearer", "expires_in": 300,
            "refresh_token": "fake-refresh-2", "id_token": id_token,
        }),
    );
    assert_eq!(
        call(&fake, "/open/x").await.as_deref(),
        Ok("Bearer fake-access-2")
    );
    assert_eq!(
        call(&fake, "/secure/x").await,
        Err("step_up_required".to_string()),
        "the sign-in is ten minutes old whatever the refreshed ID token says"
    );
}

#[tokio::test]
async fn an_upstream_that_asks_again_for_what_the_session_has_is_not_a_step_up_loop() {
    let rs = upstream_with(&[(
        "/always",
        401,
        &[r#"Bearer error="insufficient_user_authentication", acr_values="mfa", max_age="300""#],
    )])
    .await;
    let mut fake = Fake::start(&format!(
        "[[routes]]\npath = \"/rs/\"\nupstream = \"{rs}\"\ntoken = \"user\"\ncsrf = false\n"
    ))
    .await;
    // The user stepped up as the upstream asked: mfa, just now.
    let (_, r) = fake
        .login(
            "/bff/login?returnUrl=%2Frs%2Falways&acr_values=mfa&max_age=300",
            Duration::ZERO,
            with(Some("mfa"), Some(now())),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(r.header("location"), Some("/rs/always"));
    // The upstream asks for it again: another login would bring back the same and come back
    // here (with a provider that keeps its mfa session, without the user doing anything).
    let r = fake
        .browser
        .get(&fake.proxy.url("/rs/always"), &[("accept", "text/html")])
        .await;
    assert_ne!(
        r.status,
        302,
        "sent to log in again for what the session has: {:?}",
        r.header("location")
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let r = fake
        .browser
        .get(&fake.proxy.url("/rs/always"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_ne!(
        r.json()["error"],
        "step_up_required",
        "asked to step up to what the session has"
    );
}
