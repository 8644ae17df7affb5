//! Claims that stay current (issue 16 §3): with `[oidc] userinfo = true` the UserInfo endpoint is
//! read after the login and after each refresh and merged with the ID token's claims (OpenID
//! Connect Core §5.3.2: the `sub` must match); `/bff/user` and `require` read the result.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::reason;
use crate::identity::{Stack, stack_with};
use crate::support::stack::LoginStack;
use crate::support::*;
use serde_json::{Value, json};

fn routes(up: &str) -> String {
    format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{up}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/beta/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
         require = {{ groups = [\"g2\"] }}\n"
    )
}

async fn with_userinfo() -> Stack {
    stack_with(routes, |c| c.add("oidc.userinfo", true)).await
}

fn answer(s: &Stack, status: u16, body: Value) {
    *s.idp.state.userinfo.lock().unwrap() =
        Some((status, "application/json".into(), body.to_string()));
}

async fn user(s: &Stack, cookie: &str) -> Value {
    let r = get(
        &s.proxy.url("/bff/user"),
        &[("cookie", cookie), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn status_of(s: &Stack, path: &str, cookie: &str) -> u16 {
    get(&s.proxy.url(path), &[("cookie", cookie), ("x-csrf", "1")])
        .await
        .status
}

fn userinfo_calls(s: &Stack) -> Vec<String> {
    s.idp.state.userinfo_requests.lock().unwrap().clone()
}

#[tokio::test]
async fn userinfo_claims_are_merged_at_login_and_read_by_bff_user_and_require() {
    let s = with_userinfo().await;
    answer(
        &s,
        200,
        json!({"sub": "alice", "email": "alice@example.test", "groups": ["g2"],
               "name": "Alice Liddell", "iss": "https://evil.example.test"}),
    );
    let cookie = s.sign_in(json!({"name": "Alice"})).await;
    assert_eq!(userinfo_calls(&s), ["Bearer fake-access"]);
    let me = user(&s, &cookie).await;
    assert_eq!(me["sub"], "alice");
    assert_eq!(me["email"], "alice@example.test");
    assert_eq!(
        me["name"], "Alice Liddell",
        "userinfo wins over the ID token"
    );
    assert_eq!(me["groups"], json!(["g2"]));
    assert!(
        me.get("iss").is_none(),
        "token claims are never user claims: {me}"
    );
    assert_eq!(
        status_of(&s, "/beta/x", &cookie).await,
        200,
        "require reads them"
    );
}

#[tokio::test]
async fn without_userinfo_the_endpoint_is_never_called() {
    let s = stack_with(routes, |c| c).await;
    answer(&s, 200, json!({"sub": "alice", "groups": ["g2"]}));
    let cookie = s.sign_in(json!({})).await;
    assert!(userinfo_calls(&s).is_empty());
    assert!(user(&s, &cookie).await.get("groups").is_none());
    assert_eq!(status_of(&s, "/beta/x", &cookie).await, 403);
}

#[tokio::test]
async fn a_userinfo_answer_about_another_subject_fails_the_login() {
    let s = with_userinfo().await;
    let cases = [
        (
            200,
            json!({"sub": "mallory", "groups": ["g2"]}),
            "userinfo_subject_mismatch",
        ),
        (200, json!({"groups": ["g2"]}), "userinfo_invalid"),
        (200, json!(["not", "an", "object"]), "userinfo_invalid"),
        (401, json!({"error": "invalid_token"}), "userinfo_refused"),
    ];
    for (status, body, expected) in cases {
        answer(&s, status, body.clone());
        let done = s.callback(json!({})).await;
        assert_eq!(reason(&done).as_deref(), Some(expected), "{body}");
        assert!(
            !done
                .headers
                .get_all("set-cookie")
                .iter()
                .any(|v| v.to_str().unwrap().starts_with("vestibule=")),
            "{body}: no session"
        );
    }
    // An outage is the provider's: 503, try again later.
    answer(&s, 503, json!({}));
    assert_eq!(s.callback(json!({})).await.status, 503);
}

/// How far the clock moves for a token answered with `expires_in` 0 to be due.
const SHORTEST: std::time::Duration =
    std::time::Duration::from_secs(vestibule::oidc::MIN_TOKEN_LIFETIME);

#[tokio::test]
async fn claims_follow_userinfo_after_a_refresh_and_stay_on_a_mismatch() {
    let s = with_userinfo().await;
    // The login's access token is due once the shortest lifetime believed has passed; each
    // refresh is scripted.
    s.idp
        .state
        .token_fields
        .lock()
        .unwrap()
        .insert("expires_in".into(), json!(0));
    answer(&s, 200, json!({"sub": "alice", "groups": ["g1"]}));
    let cookie = s.sign_in(json!({})).await;
    assert_eq!(user(&s, &cookie).await["groups"], json!(["g1"]));
    assert_eq!(status_of(&s, "/beta/x", &cookie).await, 403);

    let refreshed = |token: &str, expires_in: u64| {
        json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in,
               "refresh_token": format!("rt-{token}")})
    };
    s.idp
        .state
        .script("refresh_token", 200, refreshed("fresh-1", 0));
    s.idp
        .state
        .script("refresh_token", 200, refreshed("fresh-2", 300));

    answer(&s, 200, json!({"sub": "alice", "groups": ["g2"]}));
    s.clock.advance(SHORTEST);
    assert_eq!(status_of(&s, "/api/x", &cookie).await, 200);
    assert_eq!(
        s.up.last().headers["authorization"],
        "Bearer fresh-1",
        "refreshed"
    );
    assert_eq!(userinfo_calls(&s).last().unwrap(), "Bearer fresh-1");
    assert_eq!(user(&s, &cookie).await["groups"], json!(["g2"]));
    assert_eq!(status_of(&s, "/beta/x", &cookie).await, 200);

    // Another subject's answer after the next refresh: the tokens are new, the claims are not.
    answer(&s, 200, json!({"sub": "mallory", "groups": ["admins"]}));
    s.clock.advance(SHORTEST);
    assert_eq!(status_of(&s, "/api/x", &cookie).await, 200);
    assert_eq!(s.up.last().headers["authorization"], "Bearer fresh-2");
    assert_eq!(userinfo_calls(&s).last().unwrap(), "Bearer fresh-2");
    assert_eq!(user(&s, &cookie).await["groups"], json!(["g2"]));
}

#[tokio::test]
async fn with_the_real_provider_userinfo_brings_the_claims_the_id_token_leaves_out() {
    // Opaque access tokens (no resources), which its userinfo endpoint accepts; with
    // conformIdTokenClaims the profile and email claims are at the userinfo endpoint only.
    let provider = json!({"resources": [], "conform_id_token_claims": true});
    for userinfo in [false, true] {
        let stack = LoginStack::builder()
            .provider(provider.clone())
            .extra(|up| {
                format!(
                    "[[routes]]\npath = \"/mail/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
                     require = {{ email = [\"alice@example.test\"] }}\n"
                )
            })
            .config(move |c| c.add("oidc.userinfo", userinfo))
            .start()
            .await;
        let mut browser = stack.login("alice").await;
        let me = browser.user(&stack.base).await;
        assert_eq!(me["sub"], "alice");
        let mail = browser
            .get(&format!("{}/mail/x", stack.base), &[("x-csrf", "1")])
            .await;
        if userinfo {
            assert_eq!(me["email"], "alice@example.test", "{me}");
            assert_eq!(me["name"], "Alice Liddell", "{me}");
            assert_eq!(mail.status, 200, "{}", mail.text());
        } else {
            assert!(
                me.get("email").is_none(),
                "the ID token alone has no email: {me}"
            );
            assert_eq!(mail.status, 403);
        }
    }
}

#[tokio::test]
async fn a_signed_userinfo_answer_is_checked_with_the_providers_keys() {
    use vestibule::jose::testing::{Forgery, TestKey};
    let s = with_userinfo().await;
    let claims = |groups: &str| json!({"sub": "alice", "iss": s.idp.issuer, "aud": "vestibule", "groups": [groups]});
    let jwt = |token: String| {
        *s.idp.state.userinfo.lock().unwrap() = Some((200, "application/jwt".into(), token));
    };
    jwt(s.signer.token(TestKey::Rsa1).kid("k1").sign(&claims("g2")));
    let cookie = s.sign_in(json!({})).await;
    assert_eq!(user(&s, &cookie).await["groups"], json!(["g2"]));
    let forged = [
        s.signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .forge(Forgery::BadSignature)
            .sign(&claims("admins")),
        s.signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&json!({"sub": "alice", "aud": "another-client", "groups": ["admins"]})),
    ];
    for token in forged {
        jwt(token);
        assert_eq!(
            reason(&s.callback(json!({})).await).as_deref(),
            Some("userinfo_invalid")
        );
    }
}

/// OpenID Connect Core §5.6.2: distributed claims name where to fetch them and may carry an
/// access token for that endpoint in `_claim_sources`. It is a token like any other: never in
/// `/bff/user` (security invariant 1), whether the ID token or the UserInfo answer brought it.
#[tokio::test]
async fn the_access_token_of_distributed_claims_never_reaches_the_browser() {
    let s = with_userinfo().await;
    let distributed = |token: &str| {
        json!({
            "_claim_names": {"groups": "src1"},
            "_claim_sources": {"src1": {
                "endpoint": "https://claims.example.test/groups",
                "access_token": token,
            }},
        })
    };
    let mut from_userinfo = distributed("userinfo-claims-token");
    from_userinfo["sub"] = json!("alice");
    from_userinfo["email"] = json!("alice@example.test");
    answer(&s, 200, from_userinfo);
    let cookie = s.sign_in(distributed("id-token-claims-token")).await;
    let me = user(&s, &cookie).await;
    assert_eq!(me["email"], "alice@example.test", "{me}");
    let text = me.to_string();
    for token in ["id-token-claims-token", "userinfo-claims-token"] {
        assert!(!text.contains(token), "/bff/user shows {token}: {text}");
    }
}

/// OpenID Connect Core 1.0 (errata set 2) §5.3.2: a signed UserInfo answer MUST contain `iss`
/// and `aud`. One without them could be any JWT the provider signed about the user for another
/// purpose (or for another client); it is refused like any other invalid answer.
#[tokio::test]
async fn a_signed_userinfo_answer_without_iss_or_aud_is_refused() {
    use vestibule::jose::testing::TestKey;
    let s = with_userinfo().await;
    let full = json!({"sub": "alice", "iss": s.idp.issuer, "aud": "vestibule", "groups": ["g2"]});
    for missing in ["iss", "aud"] {
        let mut claims = full.clone();
        claims.as_object_mut().unwrap().remove(missing);
        let token = s.signer.token(TestKey::Rsa1).kid("k1").sign(&claims);
        *s.idp.state.userinfo.lock().unwrap() = Some((200, "application/jwt".into(), token));
        let done = s.callback(json!({})).await;
        assert_eq!(
            reason(&done).as_deref(),
            Some("userinfo_invalid"),
            "without {missing}: {} {}",
            done.status,
            done.text()
        );
    }
}
