//! Hostile answers from the identity provider's token endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use serde_json::{Value, json};
use vestibule::jose::testing::{TestKey, TestSigner, id_token_claims};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Case {
    proxy: Proxy,
    idp: fake_idp::FakeIdp,
    signer: TestSigner,
    up: upstream::Upstream,
}

async fn setup() -> Case {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let u = up.url();
    let proxy = start_proxy_for(
        &idp.issuer,
        &format!(
            r#"
[[routes]]
path = "/api/"
upstream = "{u}"
token = "user"
"#
        ),
    )
    .await;
    Case {
        proxy,
        idp,
        signer,
        up,
    }
}

impl Case {
    /// Signs alice in; her access token is due for a refresh at once.
    async fn login(&self) -> String {
        let (q, login_cookie) = begin_login(&self.proxy).await;
        let claims = id_token_claims(&self.idp.issuer, "vestibule", &q["nonce"], now());
        let mut answer = json!({"access_token": "login-access", "token_type": "Bearer",
                                "expires_in": 0, "refresh_token": "login-refresh"});
        answer["id_token"] = self
            .signer
            .token(TestKey::Rsa1)
            .kid("k1")
            .sign(&claims)
            .into();
        self.idp.state.script("authorization_code", 200, answer);
        let done = callback(&self.proxy, &q, &login_cookie).await;
        assert_eq!(done.status, 302, "{}", done.text());
        done.session_cookie()
    }
}

/// RFC 6749 §5.1 (`token_type` REQUIRED) and §7.1 (a client MUST NOT use a token whose type it
/// does not understand): with DPoP off, a refreshed DPoP-bound token, a `mac` token or an answer
/// without `token_type` is refused as the code grant's is, never sent upstream as
/// `Authorization: Bearer …`.
#[tokio::test]
async fn a_refreshed_token_of_another_type_is_never_sent_as_bearer() {
    let mut leaked = Vec::new();
    for (case, token_type) in [
        ("dpop", json!("DPoP")),
        ("mac", json!("mac")),
        ("absent", Value::Null),
    ] {
        let c = setup().await;
        let cookie = c.login().await;
        let mut body = json!({"access_token": format!("odd-{case}"), "expires_in": 300,
                              "refresh_token": "refresh-2"});
        if !token_type.is_null() {
            body["token_type"] = token_type;
        }
        c.idp.state.script("refresh_token", 200, body);
        let r = get(
            &c.proxy.url("/api/x"),
            &[("cookie", &cookie), ("x-csrf", "1")],
        )
        .await;
        let sent = c.up.authorizations("/api/x");
        if sent.contains(&format!("Bearer odd-{case}")) {
            leaked.push(format!("{case} (status {})", r.status));
        }
        // Refused as the provider's fault: the session stays for the next refresh.
        assert_eq!(r.status, 503, "{case}: {}", r.text());
        assert!(
            c.proxy.signed_in(&cookie).await,
            "{case}: the session ended"
        );
    }
    assert!(leaked.is_empty(), "sent as Bearer tokens: {leaked:?}");
}
