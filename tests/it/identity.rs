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
    /// The proxy's clock, moved on rather than waited out.
    pub clock: vestibule::clock::TestClock,
}

pub(crate) async fn stack(routes: impl FnOnce(&str) -> String) -> Stack {
    stack_with(routes, |c| c).await
}

/// [`stack`], with changes to the proxy's configuration.
pub(crate) async fn stack_with(
    routes: impl FnOnce(&str) -> String,
    edit: impl FnOnce(TomlConfig) -> TomlConfig,
) -> Stack {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let up = upstream::start().await;
    let config = edit(config_toml(&routes(&up.url())).set("oidc.issuer", idp.issuer.as_str()));
    let clock = vestibule::clock::TestClock::new();
    let proxy = start_proxy_with_clock(config, clock.clock()).await;
    wait_metadata(&proxy).await;
    Stack {
        proxy,
        idp,
        signer,
        up,
        clock,
    }
}

impl Stack {
    /// Signs in through the fake provider with an ID token carrying `extra` claims; the session
    /// cookie (`name=value`).
    pub async fn sign_in(&self, extra: Value) -> String {
        let done = self.callback(extra).await;
        assert_eq!(done.status, 302, "{}", done.text());
        session_cookie(&done)
    }

    /// A login through the fake provider up to the callback's answer.
    pub async fn callback(&self, extra: Value) -> Reply {
        let (q, login_cookie) = begin_login(&self.proxy).await;
        let mut claims = id_token_claims(&self.idp.issuer, "vestibule", &q["nonce"], now());
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        *self.idp.state.id_token.lock().unwrap() =
            self.signer.token(TestKey::Rsa1).kid("k1").sign(&claims);
        let done = callback(&self.proxy, &q, &login_cookie).await;
        assert_ne!(done.status, 500, "{}", done.text());
        done
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

/// What the SPA sends on every call to a route that acts as the user.
const CSRF: (&str, &str) = ("x-csrf", "1");

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
        // `X-CSRF` as the SPA sends it: these routes act as the user.
        let r = get(&s.proxy.url(path), &[&FORGED[..], &[CSRF]].concat()).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        for (name, _) in FORGED {
            assert_eq!(seen(&s.up, name), Vec::<String>::new(), "{path}: {name}");
        }
    }
    // A route without identity headers passes such headers on, as any other header.
    get(&s.proxy.url("/plain/x"), &FORGED).await;
    assert_eq!(seen(&s.up, "x-user"), ["admin"]);
}

/// Identity headers spelled with `_` for `-` (`X_User`): many upstream servers (CGI, WSGI, Rack,
/// PHP) read both spellings as one variable, so the forged one would stand beside, or before,
/// Vestibule's.
const FORGED_LOOKALIKES: [(&str, &str); 3] = [
    ("X_User", "admin"),
    ("x_email", "root@example.test"),
    ("X_GROUPS", "admins"),
];

#[tokio::test]
async fn an_underscore_spelling_of_an_identity_header_never_reaches_the_upstream() {
    let s = stack(routes).await;
    let cookie = s.sign_in(json!({"email": "alice@example.test"})).await;
    let mut signed_in = vec![("cookie", cookie.as_str())];
    signed_in.extend(FORGED_LOOKALIKES);
    for path in ["/open/x", "/maybe/x"] {
        for sent in [&FORGED_LOOKALIKES[..], &signed_in[..]] {
            let r = get(&s.proxy.url(path), &[sent, &[CSRF]].concat()).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            for (name, _) in FORGED_LOOKALIKES {
                assert_eq!(seen(&s.up, name), Vec::<String>::new(), "{path}: {name}");
            }
        }
        assert_eq!(seen(&s.up, "x-user"), ["alice"], "{path}");
    }
    // Where nothing is spoken for the user, such a name is a header like any other.
    get(&s.proxy.url("/plain/x"), &FORGED_LOOKALIKES).await;
    assert_eq!(seen(&s.up, "x_user"), ["admin"]);
}

#[tokio::test]
async fn identity_headers_carry_the_session_claims_and_replace_the_browsers() {
    let s = stack(routes).await;
    let cookie = s
        .sign_in(
            json!({"email": "alice@example.test", "email_verified": true,
                        "groups": ["staff", "beta-tester"], "org": {"dept": "R&D"}}),
        )
        .await;
    let mut headers = vec![("cookie", cookie.as_str()), CSRF];
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
    get(&s.proxy.url("/maybe/x"), &[("cookie", &cookie), CSRF]).await;
    let last = s.up.last();
    assert_eq!(seen(&s.up, "x-name"), ["Zo%C3%AB%0D%0AX-Admin:%20yes"]);
    assert!(last.headers.get("x-admin").is_none());
    assert_eq!(seen(&s.up, "x-groups"), ["a%2Cb,100%25,c%20d"]);
    // An object has no header form: no header.
    assert_eq!(seen(&s.up, "x-email"), Vec::<String>::new());
}

/// At many providers a user types in any address and it is sent as `email` with
/// `email_verified: false` until they click a link (Entra ID sends no `email_verified` at all).
/// An upstream that takes `X-Email` or the assertion's `email` as the user's (an ACL, an invite
/// matched by address) would let Mallory be `ceo@example.com`; `require = { email }` already
/// refuses such an address, and the headers and assertion send it only as verified too.
#[tokio::test]
async fn an_unverified_email_never_reaches_the_upstream_as_the_users() {
    let s = stack(|up| {
        format!(
            "[[routes]]\npath = \"/maybe/\"\nupstream = \"{up}\"\nauth = \"optional\"\n{IDENTITY}\n\
             [[routes]]\npath = \"/echo/\"\nupstream = \"{up}\"\nauth = \"optional\"\n\
             assertion = true\nassertion_header = \"X-Assertion\"\n\
             assertion_claims = [\"email\", \"name\"]\n"
        )
    })
    .await;
    let mut failures = Vec::new();
    for (verified, sent) in [
        (json!(false), false),
        (json!("false"), false),
        (json!(null), false),
        (json!("yes"), false),
        (json!(true), true),
        (json!("true"), true),
    ] {
        let mut claims = json!({"email": "ceo@example.test", "name": "Mallory"});
        if !verified.is_null() {
            claims["email_verified"] = verified.clone();
        }
        let cookie = s.sign_in(claims).await;
        let r = get(&s.proxy.url("/maybe/x"), &[("cookie", &cookie), CSRF]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let header = seen(&s.up, "x-email");
        assert_eq!(seen(&s.up, "x-name"), ["Mallory"], "{verified}");
        get(&s.proxy.url("/echo/x"), &[("cookie", &cookie), CSRF]).await;
        let assertion = payload(&seen(&s.up, "x-assertion")[0]);
        assert_eq!(assertion["name"], "Mallory", "{verified}");
        let in_assertion = assertion.get("email").is_some();
        if (header == ["ceo@example.test"]) != sent || in_assertion != sent {
            failures.push(format!(
                "email_verified {verified}: X-Email {header:?}, assertion email {:?}",
                assertion.get("email")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- Assertions -------------------------------------------------------------------------------

use crate::sample_api::SampleApi;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use vestibule::jose::signing::SigningKeys;

const API: &str = "https://api.example.test";
/// The proxy's `public_url` in the test configuration: the assertions' issuer.
const PUBLIC_URL: &str = "http://127.0.0.1:8080";
/// Another session key, put first: it signs, the test configuration's `KEY` is the previous one.
const NEW_KEY: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=";

fn key_bytes(text: &str) -> [u8; 32] {
    STANDARD.decode(text).unwrap().try_into().unwrap()
}

fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn header(jwt: &str) -> Value {
    let part = jwt.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Claims an assertion for alice at the sample API would carry, valid for a minute from `now`.
fn assertion_claims(now: u64) -> Value {
    json!({"iss": PUBLIC_URL, "aud": API, "sub": "alice", "iat": now, "exp": now + 60, "jti": "t"})
}

#[tokio::test]
async fn the_sample_api_validates_the_assertion_against_the_published_key_set() {
    let admin_port = free_port();
    let jwks_uri = format!("http://127.0.0.1:{admin_port}/jwks");
    let api = SampleApi::start_with(&[
        "--issuer",
        PUBLIC_URL,
        "--audience",
        API,
        "--jwks-uri",
        &jwks_uri,
    ])
    .await
    .unwrap();
    let api_url = api.url.clone();
    let s = stack_with(
        move |up| {
            format!(
                "[[routes]]\npath = \"/api/\"\nupstream = \"{api_url}\"\nauth = \"optional\"\n\
                 assertion = true\nresource = \"{API}\"\nassertion_claims = [\"email\"]\n\
                 [[routes]]\npath = \"/echo/\"\nupstream = \"{up}\"\nauth = \"optional\"\n\
                 assertion = true\nassertion_header = \"X-Assertion\"\nresource = \"{API}\"\n\
                 assertion_claims = [\"email\"]\nassertion_lifetime = \"2m\"\n"
            )
        },
        |c| {
            c.set("admin.listen", format!("127.0.0.1:{admin_port}"))
                .set("session.keys", vec![NEW_KEY, KEY])
        },
    )
    .await;

    // Published: the signing key (from the first session key) and the previous one.
    let jwks = get(&jwks_uri, &[]).await.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{jwks}");
    assert!(
        keys.iter()
            .all(|k| k["kty"] == "EC" && k["alg"] == "ES256" && k.get("d").is_none())
    );

    // Without a session, a browser's own bearer token never reaches the API: it sees none.
    let r = get(
        &s.proxy.url("/api/hello"),
        &[("authorization", "Bearer forged.by.browser"), CSRF],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "unauthorized",
        "the API got no token at all"
    );

    // Signed in: the API validates the assertion (signature via /jwks, iss, aud, exp) and greets.
    let cookie = s
        .sign_in(json!({"email": "alice@example.test", "email_verified": true}))
        .await;
    let r = get(
        &s.proxy.url("/api/hello"),
        &[
            ("cookie", &cookie),
            ("authorization", "Bearer forged.by.browser"),
            CSRF,
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sub"], "alice");
    assert_eq!(r.json()["aud"], API);

    // What the assertion says, as an upstream receives it in a configured header.
    get(
        &s.proxy.url("/echo/x"),
        &[("cookie", &cookie), ("x-assertion", "forged"), CSRF],
    )
    .await;
    let first = seen(&s.up, "x-assertion");
    assert_eq!(first.len(), 1);
    let jwt = first[0].clone();
    let claims = payload(&jwt);
    assert_eq!(claims["iss"], PUBLIC_URL);
    assert_eq!(claims["aud"], API);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap(), iat + 120);
    assert!(iat.abs_diff(now()) < 60);
    assert_eq!(header(&jwt)["kid"], keys[0]["kid"]);
    assert_eq!(header(&jwt)["alg"], "ES256");
    get(&s.proxy.url("/echo/x"), &[("cookie", &cookie), CSRF]).await;
    let again = payload(&seen(&s.up, "x-assertion")[0]);
    assert_ne!(
        again["jti"], claims["jti"],
        "every assertion has its own jti"
    );

    // The API itself: the real assertion passes; a changed one, an expired one, one for another
    // audience and one signed by a key Vestibule never published are refused.
    let (status, _, body) = api.get("/api/hello", Some(&jwt)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut parts: Vec<String> = jwt.split('.').map(String::from).collect();
    let mut changed = claims.clone();
    changed["sub"] = json!("admin");
    parts[1] = URL_SAFE_NO_PAD.encode(changed.to_string());
    let tampered = parts.join(".");
    let previous = SigningKeys::derive(&[key_bytes(KEY)]).unwrap();
    let stranger = SigningKeys::derive(&[[7; 32]]).unwrap();
    let t = now();
    let mut expired = assertion_claims(t - 600);
    expired["exp"] = json!(t - 300);
    let mut other_audience = assertion_claims(t);
    other_audience["aud"] = json!("https://other-api.example.test");
    for (what, token) in [
        ("tampered", tampered),
        ("expired", previous.sign(&expired).unwrap()),
        ("another audience", previous.sign(&other_audience).unwrap()),
        (
            "unpublished key",
            stranger.sign(&assertion_claims(t)).unwrap(),
        ),
    ] {
        let (status, _, body) = api.get("/api/hello", Some(&token)).await.unwrap();
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "invalid_token", "{what}");
    }
    // The previous key still verifies what it signed (rotation): only the expiry, the audience
    // and the foreign key made the difference above.
    let (status, _, body) = api
        .get(
            "/api/hello",
            Some(&previous.sign(&assertion_claims(t)).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let log = api.log().unwrap();
    assert!(
        !log.contains(jwt.rsplit('.').next().unwrap()),
        "no assertion in the API's log"
    );
}

#[tokio::test]
async fn without_assertion_routes_no_key_is_published() {
    let s = stack(routes).await;
    let jwks = get(&format!("http://{}/jwks", s.proxy.admin), &[]).await;
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.json(), json!({"keys": []}));
}

/// A route that sends identity headers or an assertion acts as the user exactly as a
/// `token = "user"` route does, so it needs `X-CSRF: 1` unless the operator says otherwise. A
/// sibling subdomain (same site: the browser sends the `Lax` session cookie with its form's
/// POST) cannot add that header; before, such a POST reached the upstream as the signed-in user.
#[tokio::test]
async fn a_sibling_sites_post_never_reaches_an_identity_route_as_the_user() {
    let s = stack(|up| {
        format!(
            "[[routes]]\npath = \"/ids/\"\nupstream = \"{up}\"\nauth = \"required\"\n{IDENTITY}\n\
             [[routes]]\npath = \"/signed/\"\nupstream = \"{up}\"\nauth = \"optional\"\n\
             assertion = true\nassertion_header = \"X-Assertion\"\n\
             [[routes]]\npath = \"/opted-out/\"\nupstream = \"{up}\"\nauth = \"required\"\n\
             csrf = false\n{IDENTITY}\n"
        )
    })
    .await;
    let cookie = s.sign_in(json!({"email": "alice@example.test"})).await;
    let sibling = |path: &str| {
        http::Request::post(s.proxy.url(path))
            .header("cookie", cookie.as_str())
            .header("origin", "http://sibling.example.test")
            .header("sec-fetch-site", "same-site")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"amount=100",
            )))
            .unwrap()
    };
    for path in ["/ids/transfer", "/signed/transfer"] {
        let before = s.up.count();
        let r = send(sibling(path)).await;
        assert_eq!(
            r.status,
            403,
            "{path}: a sibling site's POST passed as the user: {}",
            r.text()
        );
        assert_eq!(r.json()["error"], "csrf", "{path}");
        assert_eq!(
            s.up.count(),
            before,
            "{path}: the POST reached the upstream"
        );
        // The SPA's own calls, which send the header, pass as the user.
        let r = get(&s.proxy.url(path), &[("cookie", &cookie), CSRF]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(seen(&s.up, "x-assertion").len(), 1);
    // `csrf = false` written out is the operator's choice and is kept.
    let r = send(sibling("/opted-out/transfer")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen(&s.up, "x-user"), ["alice"]);
}
