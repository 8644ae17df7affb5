//! The JWS compact serialization (`header.payload.signature`) and the algorithm allow-list.
//!
//! Only asymmetric algorithms pass: a BFF never shares an HMAC key with the provider for tokens
//! it validates, and accepting `HS*` would let anyone who knows a public key (or the client
//! secret) mint tokens. The check happens on the header alone, before any key is looked up.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::{Claims, JoseError};

/// Tokens longer than this are refused unparsed (a provider's JWTs are a few KiB at most).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The algorithms this module accepts, by their JOSE names.
pub const ALLOWED_ALGORITHMS: [(&str, Algorithm); 9] = [
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// Maps a header's `alg` to an allowed algorithm; `none`, `HS*` and anything unknown are refused.
pub fn allowed_algorithm(name: &str) -> Result<Algorithm, JoseError> {
    ALLOWED_ALGORITHMS
        .iter()
        .find(|(allowed, _)| *allowed == name)
        .map(|(_, alg)| *alg)
        .ok_or(JoseError::UnsupportedAlgorithm)
}

/// A token split into its parts, with the header read but nothing verified yet.
#[derive(Debug)]
pub struct Unverified<'a> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub typ: Option<String>,
    signing_input: &'a str,
    payload: &'a str,
    signature: &'a str,
}

/// Splits `token` and reads its header. Fails on anything but three base64url parts with a JSON
/// object header whose `alg` is allowed and which names no critical extension.
pub fn parse(token: &str) -> Result<Unverified<'_>, JoseError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JoseError::Malformed);
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JoseError::Malformed)?;
    let (header, payload) = signing_input.split_once('.').ok_or(JoseError::Malformed)?;
    if payload.contains('.') {
        return Err(JoseError::Malformed);
    }
    let header = decode_object(header)?;
    let alg = match header.get("alg") {
        Some(Value::String(name)) => allowed_algorithm(name)?,
        _ => return Err(JoseError::Malformed),
    };
    // We implement no JWS extension, so any `crit` header must be refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(JoseError::Malformed);
    }
    Ok(Unverified {
        alg,
        kid: optional_string(&header, "kid")?,
        typ: optional_string(&header, "typ")?,
        signing_input,
        payload,
        signature,
    })
}

impl Unverified<'_> {
    /// Checks the signature with `key` and, only then, decodes the payload.
    pub fn verify(&self, key: &DecodingKey) -> Result<Claims, JoseError> {
        let verified = jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            key,
            self.alg,
        );
        match verified {
            Ok(true) => decode_object(self.payload),
            Ok(false) | Err(_) => Err(JoseError::BadSignature),
        }
    }
}

/// The payload of a token that was validated when it arrived and has been kept server-side since
/// (a session's ID token), without checking its signature again. Never for a token from outside.
pub fn stored_claims(token: &str) -> Result<Map<String, Value>, JoseError> {
    decode_object(parse(token)?.payload)
}

/// Whether `token` has the shape of a signed JWT (three parts, a JSON header with an `alg`), as
/// opposed to an opaque token. Says nothing about validity.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    token.len() <= MAX_TOKEN_LEN
        && decode_object(header).is_ok_and(|h| matches!(h.get("alg"), Some(Value::String(_))))
}

fn decode_object(part: &str) -> Result<Map<String, Value>, JoseError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JoseError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JoseError::Malformed),
    }
}

fn optional_string(header: &Map<String, Value>, name: &str) -> Result<Option<String>, JoseError> {
    match header.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JoseError::Malformed),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn none_and_hmac_algorithms_are_refused_by_name() {
        for name in [
            "none", "None", "HS256", "HS384", "HS512", "ES512", "", "RS1",
        ] {
            assert_eq!(
                allowed_algorithm(name),
                Err(JoseError::UnsupportedAlgorithm),
                "{name}"
            );
        }
        assert_eq!(allowed_algorithm("RS256"), Ok(Algorithm::RS256));
        assert_eq!(allowed_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
    }

    #[test]
    fn header_with_alg_none_is_refused_before_anything_else() {
        let token = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}"));
        assert_eq!(parse(&token).unwrap_err(), JoseError::UnsupportedAlgorithm);
    }

    #[test]
    fn wrong_shapes_are_malformed() {
        let header = b64(r#"{"alg":"RS256"}"#);
        let body = b64("{}");
        for token in [
            String::new(),
            "a.b".to_owned(),
            format!("{header}.{body}.sig.extra"),
            format!("{header}.{body}.sig.x.y"),
            format!("{}.{body}.sig", b64("[]")),
            format!("{}.{body}.sig", b64(r#"{"typ":"JWT"}"#)),
            format!("{}.{body}.sig", b64(r#"{"alg":"RS256","crit":["b64"]}"#)),
            format!("{}.{body}.sig", b64(r#"{"alg":"RS256","kid":7}"#)),
            format!("{header}=.{body}.sig"),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(parse(&token).unwrap_err(), JoseError::Malformed);
        }
    }

    #[test]
    fn jwt_shape_is_recognised_and_opaque_tokens_are_not() {
        let header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
        assert!(looks_like_jwt(&format!("{header}.{}.c2ln", b64("{}"))));
        assert!(!looks_like_jwt("2YotnFZFEjr1zCsicMWpAA"));
        assert!(!looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt(&format!("{header}.e30.c2ln.x.y")));
    }
}
