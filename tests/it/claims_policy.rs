//! Whose claims a route's `require` reads (attacker 2: a signed-in user who wants more than their
//! roles allow). The policy is about the user: it may read the user's own access token for the
//! route's resource, but never Vestibule's client-credentials token, which a `token = "client"`
//! route sends and whose claims describe Vestibule's service account.
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
