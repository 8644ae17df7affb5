//! Shared by the token targets: a provider with the fixture keys (`jose::testing`), a loaded key
//! set, the expectations tokens are judged by, and the policy every accepted token must meet.
#![allow(dead_code)]

use std::sync::LazyLock;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::runtime::Runtime;
use vestibule::jose::testing::{FakeJwksFetcher, ONE_OF_EACH, TestKey, TestSigner};
use vestibule::jose::{Claims, Expect, Jwks};

pub const ISSUER: &str = "https://idp.example.com/realms/app";
pub const CLIENT: &str = "spa-bff";
pub const NONCE: &str = "n-0S6_WzA2Mj";
pub const NOW: u64 = 1_700_000_000;
pub const LEEWAY: u64 = 60;

pub struct Provider {
    pub runtime: Runtime,
    pub signer: TestSigner,
    pub jwks: Jwks,
}

pub static PROVIDER: LazyLock<Provider> = LazyLock::new(|| {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => panic!("runtime: {e}"),
    };
    let signer = TestSigner::new();
    let fetcher = FakeJwksFetcher::new(signer.jwks_json(&ONE_OF_EACH));
    // A long refetch interval: an unknown `kid` costs one refetch, then none.
    let jwks = Jwks::new(fetcher, Duration::from_secs(86_400));
    if let Err(e) = runtime.block_on(jwks.load()) {
        panic!("key set: {e}");
    }
    Provider {
        runtime,
        signer,
        jwks,
    }
});

pub fn expect() -> Expect {
    Expect {
        issuer: ISSUER.to_owned(),
        audience: CLIENT.to_owned(),
        now: NOW,
        leeway: LEEWAY,
        max_iat_age: None,
    }
}

/// `base` with the members of `overlay` (a JSON object) set, a `null` member removing one.
/// Any other JSON value replaces the payload entirely.
pub fn overlay(base: Value, overlay: Value) -> Value {
    match (base, overlay) {
        (Value::Object(mut base), Value::Object(overlay)) => {
            for (name, value) in overlay {
                if value.is_null() {
                    base.remove(&name);
                } else {
                    base.insert(name, value);
                }
            }
            Value::Object(base)
        }
        (_, other) => other,
    }
}

/// Signs `claims` honestly with a fixture key chosen by `flags`, with a `typ` and `kid` header
/// chosen by `flags` too (including an unknown `kid` and none).
pub fn sign(flags: u8, claims: &Value) -> String {
    let provider = &*PROVIDER;
    let key = [
        TestKey::Ed25519,
        TestKey::EcP256,
        TestKey::Ed25519,
        TestKey::Rsa1,
    ][usize::from(flags & 3)];
    let mut token = provider.signer.token(key);
    token = match (flags >> 2) & 7 {
        0 => token.no_typ(),
        1 => token,
        2 => token.typ("logout+jwt"),
        3 => token.typ("application/logout+jwt"),
        4 => token.typ("Logout+JWT"),
        5 => token.typ("at+jwt"),
        6 => token.typ(""),
        _ => token.typ("logout+jwt+x"),
    };
    token = match flags >> 5 {
        0 => token.no_kid(),
        1 => token.kid("unknown"),
        2 => token.kid(""),
        _ => token,
    };
    token.sign(claims)
}

fn number(claims: &Claims, name: &str) -> Option<u64> {
    let value = claims.get(name)?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn audiences(claims: &Claims) -> Vec<&str> {
    match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// What every accepted token's claims must satisfy: issuer, audience and times.
pub fn assert_common_policy(claims: &Map<String, Value>, exp_required: bool) {
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert_eq!(
        iss.strip_suffix('/').unwrap_or(iss),
        ISSUER,
        "accepted a token from another issuer"
    );
    assert!(
        audiences(claims).contains(&CLIENT),
        "accepted a token for another audience"
    );
    match number(claims, "exp") {
        Some(exp) => assert!(
            NOW < exp.saturating_add(LEEWAY),
            "accepted an expired token"
        ),
        None => assert!(!exp_required, "accepted a token without exp"),
    }
    if let Some(nbf) = number(claims, "nbf") {
        assert!(nbf <= NOW + LEEWAY, "accepted a token before nbf");
    }
    if let Some(iat) = number(claims, "iat") {
        assert!(iat <= NOW + LEEWAY, "accepted a token issued in the future");
    }
}

/// An accepted ID token: the common policy, `iat`, `sub`, `azp` and the nonce.
pub fn assert_id_token(claims: &Claims, nonce_required: bool) {
    assert_common_policy(claims, true);
    assert!(
        number(claims, "iat").is_some(),
        "accepted an ID token without iat"
    );
    assert!(
        claims
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()),
        "accepted an ID token without sub"
    );
    let auds = audiences(claims);
    match claims.get("azp").and_then(Value::as_str) {
        Some(azp) => assert_eq!(azp, CLIENT, "accepted an ID token for another azp"),
        None => assert!(
            auds.iter().all(|aud| *aud == CLIENT),
            "accepted a multi-audience ID token without azp"
        ),
    }
    match claims.get("nonce") {
        Some(nonce) => assert_eq!(nonce.as_str(), Some(NONCE), "accepted a wrong nonce"),
        None => assert!(!nonce_required, "accepted an ID token without nonce"),
    }
}

/// Runs `future` on the shared runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    PROVIDER.runtime.block_on(future)
}

pub fn shared_jwks() -> &'static Jwks {
    &PROVIDER.jwks
}

/// A fresh key set loaded from `body` (a fuzzed JWKS document).
pub fn jwks_from(body: &[u8]) -> Jwks {
    Jwks::new(
        FakeJwksFetcher::new(body.to_vec()),
        Duration::from_secs(86_400),
    )
}
