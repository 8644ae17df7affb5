//! JWS/JWT parsing and validation (`jose::jws`, `jose::validate_*`, `jose::Jwks`) against the
//! fixture keys of `jose::testing`. The first input byte picks a mode:
//!
//! - 0: the rest is a token. `jws::parse` accepts only allowed algorithms and three parts (so
//!   `looks_like_jwt` agrees); every validator may accept it only if its claims meet the policy.
//! - 1: the second byte picks key, `typ` and `kid`; the rest is JSON laid over a valid ID token's
//!   claims (`null` removes one), signed honestly. Accepted tokens must meet the policy.
//! - 2: the rest is a provider's JWKS document; loading it and looking keys up never panics, and
//!   a token is verified by it only if one of its keys is really the signer's.
use serde_json::Value;
use vestibule::jose::jws::{self, ALLOWED_ALGORITHMS};
use vestibule::jose::testing::{TestKey, id_token_claims};
use vestibule::jose::{
    looks_like_jwt, validate_access_token, validate_id_token, validate_logout_token,
    validate_refreshed_id_token,
};

use crate::common::*;

fn validate_all(token: &str) {
    let jwks = shared_jwks();
    let expect = expect();
    if let Ok(claims) = block_on(validate_id_token(jwks, token, &expect, NONCE)) {
        assert_id_token(&claims, true);
    }
    let original = match id_token_claims(ISSUER, CLIENT, NONCE, NOW) {
        Value::Object(map) => map,
        _ => return,
    };
    if let Ok(claims) = block_on(validate_refreshed_id_token(jwks, token, &expect, &original)) {
        assert_id_token(&claims, false);
        assert_eq!(
            claims.get("sub"),
            original.get("sub"),
            "the subject changed"
        );
    }
    if let Ok(claims) = block_on(validate_access_token(jwks, token, &expect)) {
        assert_common_policy(&claims, true);
    }
    if let Ok(logout) = block_on(validate_logout_token(jwks, token, &expect)) {
        assert!(logout.sub.is_some() || logout.sid.is_some());
        assert!(!logout.jti.is_empty());
    }
}

fn raw_token(token: &str) {
    if let Ok(parsed) = jws::parse(token) {
        assert!(ALLOWED_ALGORITHMS.iter().any(|(_, alg)| *alg == parsed.alg));
        assert_eq!(token.split('.').count(), 3);
        assert!(
            looks_like_jwt(token),
            "parse accepts what looks_like_jwt refuses"
        );
    }
    validate_all(token);
}

fn signed_claims(flags: u8, json: &[u8]) {
    let Ok(fuzzed) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let claims = overlay(id_token_claims(ISSUER, CLIENT, NONCE, NOW), fuzzed);
    validate_all(&sign(flags, &claims));
}

/// A base64url JWK member as a big-endian number without leading zeros.
fn magnitude(member: Option<&Value>) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = member?.as_str()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    Some(bytes[start..].to_vec())
}

fn key_set(body: &[u8]) {
    let jwks = jwks_from(body);
    if block_on(jwks.load()).is_err() {
        return;
    }
    let provider = &*PROVIDER;
    let claims = id_token_claims(ISSUER, CLIENT, NONCE, NOW);
    for key in [TestKey::Rsa1, TestKey::EcP256, TestKey::Ed25519] {
        let token = provider.signer.token(key).sign(&claims);
        let verified = block_on(validate_id_token(&jwks, &token, &expect(), NONCE));
        if verified.is_ok() {
            // Only the signer's public key verifies its signature.
            let signer = provider.signer.jwk(key, "x");
            let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
            // The members that make the key, by its type; any other member (a `y` beside an
            // OKP key's `x`) is ignored, as RFC 7517 §4 has a JWK's unknown members ignored.
            let defining: &[&str] = match signer.get("kty").and_then(Value::as_str) {
                Some("RSA") => &["n", "e"],
                Some("EC") => &["x", "y"],
                _ => &["x"],
            };
            let has = parsed["keys"].as_array().is_some_and(|keys| {
                keys.iter().any(|k| {
                    k.get("kty") == signer.get("kty")
                        && k.get("crv") == signer.get("crv")
                        && defining
                            .iter()
                            .all(|m| magnitude(k.get(*m)) == magnitude(signer.get(*m)))
                })
            });
            assert!(has, "a token verified with a key that is not its signer's");
        }
    }
    for (_, alg) in ALLOWED_ALGORITHMS {
        for kid in [None, Some(""), Some("rsa-1"), Some("k")] {
            let _ = block_on(jwks.key_for(kid, alg));
        }
    }
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw_token(&String::from_utf8_lossy(rest)),
        1 => {
            if let Some((&flags, json)) = rest.split_first() {
                signed_claims(flags, json);
            }
        }
        _ => key_set(rest),
    }
}
