//! Vestibule's own signing keys, for the assertions it sends to upstreams: ES256 (P-256) keys
//! derived from the session keys, so that every replica sharing `[session] keys` signs with the
//! same key and publishes the same set, without a key file to distribute.
//!
//! Derivation: HKDF-SHA256 (RFC 5869) with a fixed salt naming this use, the session key as input
//! keying material and a counter as info gives a 32-byte scalar; the few scalars outside the
//! curve's order are skipped by counting on. HKDF is one-way and the salt separates this use from
//! the cookie sealing, so neither the published public keys nor the assertions reveal anything
//! about a session key. Rotation follows the session keys: the first one's key signs, every
//! key is published (current and previous), so an upstream keeps accepting assertions signed
//! just before a rotation.
//!
//! The `kid` is the RFC 7638 thumbprint of the public key: the same on every replica.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest;

/// Separates the signing keys from every other use of the session keys; never change it (the
/// keys, and every upstream's trust in them, would change with it).
const SALT: &[u8] = b"vestibule/assertion-signing-key/ES256/v1";
/// Scalars to try before giving up; each fails with a probability of about 2^-32.
const ATTEMPTS: u8 = 8;

/// Why no key or no signature could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("no signing key could be derived")]
    Derive,
    #[error("there is no signing key")]
    NoKey,
    #[error("signing failed")]
    Sign,
}

struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    /// The public key as a JWK, `kid` included.
    jwk: Value,
}

/// The keys: the first signs, all are published.
#[derive(Default)]
pub struct SigningKeys {
    keys: Vec<SigningKey>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| &k.kid))
            .finish()
    }
}

struct Len32;

impl aws_lc_rs::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// An RFC 5915 `ECPrivateKey` for P-256 without its optional public key, which the parser
/// computes: `SEQUENCE { 1, OCTET STRING scalar, [0] prime256v1 }`.
fn ec_private_key_der(scalar: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![0x30, 0x31, 0x02, 0x01, 0x01, 0x04, 0x20];
    der.extend_from_slice(scalar);
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    der
}

fn derive(secret: &[u8; 32]) -> Result<SigningKey, SigningError> {
    let prk = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, SALT).extract(secret);
    for counter in 0..ATTEMPTS {
        let info = [counter];
        let info = [&info[..]];
        let mut scalar = [0u8; 32];
        prk.expand(&info, Len32)
            .and_then(|okm| okm.fill(&mut scalar))
            .map_err(|_| SigningError::Derive)?;
        let der = ec_private_key_der(&scalar);
        scalar.fill(0);
        let Ok(pair) = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        else {
            continue;
        };
        return Ok(with_public_jwk(pair));
    }
    Err(SigningError::Derive)
}

fn with_public_jwk(pair: EcdsaKeyPair) -> SigningKey {
    // Uncompressed point: 0x04 ‖ x ‖ y.
    let point = pair.public_key().as_ref();
    let (x, y) = point
        .get(1..)
        .map(|xy| xy.split_at(xy.len() / 2))
        .unwrap_or_default();
    let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
    // RFC 7638: the required members in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()));
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": kid, "alg": "ES256", "use": "sig",
    });
    SigningKey { kid, pair, jwk }
}

impl SigningKeys {
    /// One key per session key, in the same order (the first signs).
    pub fn derive(secrets: &[[u8; 32]]) -> Result<SigningKeys, SigningError> {
        let keys = secrets.iter().map(derive).collect::<Result<Vec<_>, _>>()?;
        Ok(SigningKeys { keys })
    }

    /// The public keys as JWKs, the signing one first.
    pub fn public_jwks(&self) -> Vec<Value> {
        self.keys.iter().map(|k| k.jwk.clone()).collect()
    }

    /// A compact JWS (`typ` JWT, `alg` ES256, `kid`) of `claims`, signed with the first key.
    pub fn sign(&self, claims: &Value) -> Result<String, SigningError> {
        let key = self.keys.first().ok_or(SigningError::NoKey)?;
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": key.kid});
        let encode = |v: &Value| {
            serde_json::to_vec(v)
                .map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
                .map_err(|_| SigningError::Sign)
        };
        let mut jwt = encode(&header)?;
        jwt.push('.');
        jwt.push_str(&encode(claims)?);
        let signature = key
            .pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), jwt.as_bytes())
            .map_err(|_| SigningError::Sign)?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(jwt)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};

    fn verify(jwk: &Value, token: &str) -> Result<Value, jsonwebtoken::errors::Error> {
        let jwk: Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let mut validation = Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(&jwk).unwrap(), &validation)
            .map(|d| d.claims)
    }

    #[test]
    fn the_same_session_keys_give_the_same_keys_on_every_replica() {
        let a = SigningKeys::derive(&[[1; 32], [2; 32]]).unwrap();
        let b = SigningKeys::derive(&[[1; 32], [2; 32]]).unwrap();
        assert_eq!(a.public_jwks(), b.public_jwks());
        assert_eq!(a.public_jwks().len(), 2);
        assert_ne!(a.public_jwks()[0]["kid"], a.public_jwks()[1]["kid"]);
        // Another session key, another signing key.
        let c = SigningKeys::derive(&[[3; 32]]).unwrap();
        assert_ne!(c.public_jwks()[0]["x"], a.public_jwks()[0]["x"]);
    }

    #[test]
    fn a_signature_verifies_with_the_published_first_key_only() {
        let keys = SigningKeys::derive(&[[1; 32], [2; 32]]).unwrap();
        let token = keys.sign(&json!({"sub": "alice"})).unwrap();
        let jwks = keys.public_jwks();
        assert_eq!(verify(&jwks[0], &token).unwrap()["sub"], "alice");
        assert!(verify(&jwks[1], &token).is_err());
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), jwks[0]["kid"].as_str());
        // A rotation: the new key signs, the old one is still published and still verifies
        // what it signed.
        let rotated = SigningKeys::derive(&[[9; 32], [1; 32]]).unwrap();
        assert_eq!(
            verify(&rotated.public_jwks()[1], &token).unwrap()["sub"],
            "alice"
        );
    }

    #[test]
    fn the_kid_is_the_rfc_7638_thumbprint() {
        let keys = SigningKeys::derive(&[[1; 32]]).unwrap();
        let jwk: Jwk = serde_json::from_value(keys.public_jwks()[0].clone()).unwrap();
        let thumbprint = jwk
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap();
        assert_eq!(keys.public_jwks()[0]["kid"], thumbprint);
    }

    #[test]
    fn no_private_material_is_published_or_printed() {
        let keys = SigningKeys::derive(&[[1; 32]]).unwrap();
        let jwk = &keys.public_jwks()[0];
        assert!(jwk.get("d").is_none(), "{jwk}");
        assert!(!format!("{keys:?}").contains("pair"));
        assert_eq!(
            SigningKeys::default().sign(&json!({})),
            Err(SigningError::NoKey)
        );
    }
}
