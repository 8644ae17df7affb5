//! A signed-in user who wants more than their roles allow (attacker 2). Whose claims a route's
//! `require` reads: the policy is about the user, so it may read the user's own access token
//! for the route's resource, but never Vestibule's client-credentials token, which a
//! `token = "client"` route sends and whose claims describe Vestibule's service account. And
//! what the user may see of what Vestibule adds to their requests: nothing (a `TRACE` answer
//! would echo it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::now;
use crate::identity::stack;
use crate::support::*;
use serde_json::json;
use vestibule::jose::testing::TestKey;

const API: &str = "https://api.example.test";

/// A `token = "client"` route that only signed-in admins may use: the upstream gets
/// Vestibule's own token, the user must have the role.
fn routes(up: &str) -> String {
    format!(
        "[[routes]]\npath = \"/svc/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
         token = \"client\"\nresource = \"{API}\"\nrequire = {{ roles = [\"admin\"] }}\n"
    )
}

/// Mallory has only `viewer`; Vestibule's service account (the client-credentials token, a JWT
/// for the route's resource that validates with the provider's keys) has `admin`. The route's
/// requirement is the user's: she is refused and nothing reaches the upstream. Alice, an admin
/// herself, passes with the client's token, whatever roles that token names.
#[tokio::test]
async fn a_client_credentials_tokens_roles_never_admit_a_user_who_lacks_them() {
    let s = stack(routes).await;
    let client_token = |roles: serde_json::Value| {
        let claims = json!({
            "iss": s.idp.issuer,
            "aud": API,
            "sub": "service-account-vestibule",
            "azp": "vestibule",
            "exp": now() + 300,
            "iat": now(),
            "roles": roles,
        });
        s.signer.token(TestKey::Rsa1).kid("k1").sign(&claims)
    };
    let svc = client_token(json!(["admin"]));
    s.idp.state.script(
        "client_credentials",
        200,
        json!({"access_token": svc, "token_type": "Bearer", "expires_in": 300}),
    );
    let mallory = s
        .sign_in(json!({"sub": "mallory", "roles": ["viewer"]}))
        .await;
    let before = s.up.count();
    let r = get(
        &s.proxy.url("/svc/admin/users"),
        &[("cookie", mallory.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(
        r.status,
        403,
        "a user without the role passed on the client's roles: {}",
        r.text()
    );
    assert_eq!(r.json()["missing"], json!(["roles"]));
    assert_eq!(
        s.up.count(),
        before,
        "the refused request reached the upstream"
    );

    // The other way round: the client's token names no role, the user has it.
    let alice = s.sign_in(json!({"sub": "alice", "roles": ["admin"]})).await;
    let r = get(
        &s.proxy.url("/svc/admin/users"),
        &[("cookie", alice.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "an admin was refused: {}", r.text());
    let sent = s.up.last();
    assert_eq!(
        sent.headers.get("authorization").unwrap().to_str().unwrap(),
        format!("Bearer {svc}"),
        "the route sends Vestibule's own token"
    );
}

/// A route sending the user's token, and one sending identity headers and a signed assertion.
fn echoing_routes(up: &str) -> String {
    format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{up}\"\ntoken = \"user\"\n\
         [[routes]]\npath = \"/who/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
         identity_headers = {{ \"X-User\" = \"sub\", \"X-Email\" = \"email\" }}\n\
         assertion = true\nassertion_header = \"X-Assertion\"\n"
    )
}

/// A `TRACE` answer is the request as the upstream received it (RFC 9110 §9.3.8), which is why a
/// client MUST NOT put stored credentials or cookies into one. Sent through Vestibule with the
/// session cookie it carried the user's access token (`Authorization`), identity fields and
/// signed assertion, which the browser was never to see: with them the user calls the API
/// past Vestibule's `require`, `feature` and step-up. `TRACE` and IIS's `TRACK`, in any case,
/// are refused before the access stage; nothing reaches the upstream.
#[tokio::test]
async fn a_trace_never_echoes_the_users_token_identity_or_assertion_to_the_browser() {
    let s = stack(echoing_routes).await;
    let alice = s
        .sign_in(json!({"sub": "alice", "email": "alice@example.test", "email_verified": true}))
        .await;
    // The routes work, and what they add is what a TRACE would show.
    let ok = get(
        &s.proxy.url("/api/x"),
        &[("cookie", alice.as_str()), ("x-csrf", "1")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(s.up.last().headers["authorization"], "Bearer fake-access");
    let mut failures = Vec::new();
    for method in ["TRACE", "TRACK", "trace", "Trace"] {
        for path in ["/api/x", "/who/x"] {
            let before = s.up.count();
            let mut req = http::Request::builder()
                .method(http::Method::from_bytes(method.as_bytes()).unwrap())
                .uri(s.proxy.url(path));
            for (name, value) in [("cookie", alice.as_str()), ("x-csrf", "1")] {
                req = req.header(name, value);
            }
            let r = send(req.body(Default::default()).unwrap()).await;
            let text = r.text();
            let leaked = ["fake-access", "alice@example.test", "x-assertion", "eyJ"]
                .into_iter()
                .filter(|secret| {
                    text.to_ascii_lowercase()
                        .contains(&secret.to_ascii_lowercase())
                })
                .collect::<Vec<_>>();
            if r.status != 405 || s.up.count() != before || !leaked.is_empty() {
                failures.push(format!(
                    "{method} {path}: {} (the upstream saw it: {}), the answer shows {leaked:?}",
                    r.status,
                    s.up.count() != before
                ));
            } else {
                assert_eq!(r.json()["error"], "method_not_allowed");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `require = { email = [...] }` is about who the user is, but at many providers a user can
/// set an email address of their own choosing that nobody has confirmed (`email_verified`
/// false, or absent: Entra ID's "nOAuth"). Only a verified email meets the requirement.
#[tokio::test]
async fn an_email_requirement_is_met_only_by_a_verified_email() {
    let s = stack(|up| {
        format!(
            "[[routes]]\npath = \"/mail/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
             require = {{ email = [\"alice@example.test\"] }}\n"
        )
    })
    .await;
    for (what, claims, status) in [
        (
            "unverified",
            json!({"sub": "mallory", "email": "alice@example.test", "email_verified": false}),
            403,
        ),
        (
            "verified as a string that says no",
            json!({"sub": "mallory", "email": "alice@example.test", "email_verified": "false"}),
            403,
        ),
        (
            "without email_verified",
            json!({"sub": "mallory", "email": "alice@example.test"}),
            403,
        ),
        (
            "another verified address",
            json!({"sub": "bob", "email": "bob@example.test", "email_verified": true}),
            403,
        ),
        (
            "verified",
            json!({"sub": "alice", "email": "alice@example.test", "email_verified": true}),
            200,
        ),
    ] {
        let cookie = s.sign_in(claims).await;
        let before = s.up.count();
        let r = get(&s.proxy.url("/mail/inbox"), &[("cookie", cookie.as_str())]).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        if status == 403 {
            assert_eq!(r.json()["missing"], json!(["email"]), "{what}");
            assert_eq!(s.up.count(), before, "{what}: reached the upstream");
        }
    }
}
