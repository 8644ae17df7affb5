//! Identity for upstreams that do not take the provider's tokens (issue 16 §2): headers set from
//! the session's claims, always stripped from the browser's request first, and an assertion
//! signed by Vestibule whose keys the admin listener publishes at `/jwks`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::fake_provider::now;
use crate::support::upstream::{self, Upstream};
use crate::support::*;
use serde_json::{Value, json};
use vestibule::jose::testing::{TestKey, TestSigner, id_token_claims};

/// A proxy in front of the fake provider and a recording upstream, with `routes` (given the
/// upstream's URL) appended to the configuration.
pub(crate) struct Stack {
    pub proxy: Proxy,
    pub idp: fake_idp::FakeIdp,
    pub signer: TestSigner,
    pub up: Upstream,
}

pub(crate) async fn stack(routes: impl FnOnce(&str) -> String) -> Stack {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let proxy = start_proxy_for(&idp.issuer, &routes(&up.url())).await;
    Stack {
        proxy,
        idp,
        signer,
        up,
    }
}

impl Stack {
    /// Signs in through the fake provider with an ID token carrying `extra` claims; the session
    /// cookie (`name=value`).
    pub async fn sign_in(&self, extra: Value) -> String {
        let (q, login_cookie) = begin_login(&self.proxy).await;
        let mut claims = id_token_claims(&self.idp.issuer, "vestibule", &q["nonce"], now());
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        *self.idp.state.id_token.lock().unwrap() =
            self.signer.token(TestKey::Rsa1).kid("k1").sign(&claims);
        let done = get(
            &self
                .proxy
                .url(&format!("/bff/callback?code=abc&state={}", q["state"])),
            &[("cookie", &login_cookie)],
        )
        .await;
        assert_eq!(done.status, 302, "{}", done.text());
        session_cookie(&done)
    }
}

pub(crate) fn session_cookie(r: &Reply) -> String {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("vestibule="))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// Every value the upstream saw for `name`.
fn seen(up: &Upstream, name: &str) -> Vec<String> {
    up.last()
        .headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

const IDENTITY: &str = r#"identity_headers = { "X-User" = "sub", "X-Email" = "email", "X-Groups" = "groups", "X-Name" = "name", "X-Dept" = "org.dept" }"#;

fn routes(up: &str) -> String {
    format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{up}\"\nauth = \"none\"\n{IDENTITY}\n\
         [[routes]]\npath = \"/maybe/\"\nupstream = \"{up}\"\nauth = \"optional\"\n{IDENTITY}\n\
         [[routes]]\npath = \"/plain/\"\nupstream = \"{up}\"\nauth = \"optional\"\n"
    )
}

const FORGED: [(&str, &str); 5] = [
    ("X-User", "admin"),
    ("x-email", "root@example.test"),
    ("X-GROUPS", "admins"),
    ("X-Name", "Mallory"),
    ("X-Dept", "board"),
];

#[tokio::test]
async fn a_browser_sent_identity_header_never_reaches_the_upstream_without_a_session() {
    let s = stack(routes).await;
    for path in ["/open/x", "/maybe/x"] {
        let r = get(&s.proxy.url(path), &FORGED).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        for (name, _) in FORGED {
            assert_eq!(seen(&s.up, name), Vec::<String>::new(), "{path}: {name}");
        }
    }
    // A route without identity headers passes such headers on, as any other header.
    get(&s.proxy.url("/plain/x"), &FORGED).await;
    assert_eq!(seen(&s.up, "x-user"), ["admin"]);
}

#[tokio::test]
async fn identity_headers_carry_the_session_claims_and_replace_the_browsers() {
    let s = stack(routes).await;
    let cookie = s
        .sign_in(
            json!({"email": "alice@example.test", "groups": ["staff", "beta-tester"],
                        "org": {"dept": "R&D"}}),
        )
        .await;
    let mut headers = vec![("cookie", cookie.as_str())];
    headers.extend(FORGED);
    for path in ["/open/x", "/maybe/x"] {
        let r = get(&s.proxy.url(path), &headers).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(seen(&s.up, "x-user"), ["alice"], "{path}");
        assert_eq!(seen(&s.up, "x-email"), ["alice@example.test"], "{path}");
        assert_eq!(seen(&s.up, "x-groups"), ["staff,beta-tester"], "{path}");
        assert_eq!(seen(&s.up, "x-dept"), ["R&D"], "{path}");
        // No `name` claim: no header, and the browser's copy is gone too.
        assert_eq!(seen(&s.up, "x-name"), Vec::<String>::new(), "{path}");
    }
}

#[tokio::test]
async fn unsafe_claim_values_are_percent_encoded_and_never_split_a_header() {
    let s = stack(routes).await;
    let cookie = s
        .sign_in(
            json!({"name": "Zoë\r\nX-Admin: yes", "groups": ["a,b", "100%", "c d"],
                        "email": {"not": "a string"}}),
        )
        .await;
    get(&s.proxy.url("/maybe/x"), &[("cookie", &cookie)]).await;
    let last = s.up.last();
    assert_eq!(seen(&s.up, "x-name"), ["Zo%C3%AB%0D%0AX-Admin:%20yes"]);
    assert!(last.headers.get("x-admin").is_none());
    assert_eq!(seen(&s.up, "x-groups"), ["a%2Cb,100%25,c%20d"]);
    // An object has no header form: no header.
    assert_eq!(seen(&s.up, "x-email"), Vec::<String>::new());
}
