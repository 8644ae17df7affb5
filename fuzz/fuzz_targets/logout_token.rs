//! Back-channel logout token validation (`jose::validate_logout_token`). The first byte picks key,
//! `typ` and `kid` (see `common::sign`); the second whether the rest is a whole token or JSON laid
//! over a valid logout token's claims (`null` removes one), signed honestly. Whatever is accepted
//! must meet Back-Channel Logout 1.0 §2.6: logout `typ` if any, issuer, audience, a recent `iat`,
//! the logout event, no `nonce`, a `jti`, and a `sub` or `sid` (as returned).
use serde_json::Value;
use vestibule::jose::testing::logout_token_claims;
use vestibule::jose::{
    BACKCHANNEL_LOGOUT_EVENT, DEFAULT_LOGOUT_MAX_IAT_AGE, validate_logout_token,
};

use crate::common::*;

fn check(token: &str, claims: Option<&Value>) {
    let Ok(logout) = block_on(validate_logout_token(shared_jwks(), token, &expect())) else {
        return;
    };
    assert!(
        !logout.jti.is_empty(),
        "accepted a logout token without jti"
    );
    assert!(
        logout.sub.as_deref().is_some_and(|s| !s.is_empty())
            || logout.sid.as_deref().is_some_and(|s| !s.is_empty()),
        "accepted a logout token without sub or sid"
    );
    assert!(
        logout.iat <= NOW + LEEWAY,
        "accepted a logout token from the future"
    );
    assert!(
        NOW <= logout.iat + DEFAULT_LOGOUT_MAX_IAT_AGE + LEEWAY,
        "accepted a stale logout token"
    );
    let Some(Value::Object(claims)) = claims else {
        return;
    };
    assert_common_policy(claims, false);
    assert!(
        !claims.contains_key("nonce"),
        "accepted a logout token with a nonce"
    );
    assert!(
        claims["events"][BACKCHANNEL_LOGOUT_EVENT].is_object(),
        "accepted a logout token without the logout event"
    );
    assert_eq!(
        claims.get("jti").and_then(Value::as_str),
        Some(logout.jti.as_str())
    );
    let typ = token
        .split('.')
        .next()
        .and_then(|h| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
        .and_then(|h| {
            h.get("typ")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase)
        });
    if let Some(typ) = typ {
        assert!(
            typ == "logout+jwt" || typ == "application/logout+jwt",
            "accepted a logout token typed {typ:?}"
        );
    }
}

pub fn fuzz(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&mode, rest)) = rest.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check(&String::from_utf8_lossy(rest), None);
        return;
    }
    let Ok(fuzzed) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    let claims = overlay(logout_token_claims(ISSUER, CLIENT, NOW), fuzzed);
    check(&sign(flags, &claims), Some(&claims));
}
