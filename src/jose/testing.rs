//! Test support, compiled only for this crate's tests and with the `test-support` feature (which
//! the crate's own dev-dependency on itself turns on for `tests/`): the committed fixture keys in
//! `tests/fixtures/`, a [`TestSigner`] that serves their JWKS and signs arbitrary claims —
//! honestly or in the classic forged forms — and a [`FakeJwksFetcher`] that counts its fetches.
//!
//! The keys are test keys, public in this repository; nothing here may reach a release build.
#![allow(clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::jws::ALLOWED_ALGORITHMS;
use super::{BACKCHANNEL_LOGOUT_EVENT, JwksFetcher};

/// One key of each family (RSA, EC P-256, Ed25519) with its `kid`: the key set the validation
/// tests and the fuzz targets load.
pub const ONE_OF_EACH: [(TestKey, &str); 3] = [
    (TestKey::Rsa1, "rsa-1"),
    (TestKey::EcP256, "ec-p256"),
    (TestKey::Ed25519, "ed25519"),
];

/// One of the committed fixture key pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKey {
    Rsa1,
    Rsa2,
    EcP256,
    Ed25519,
}

impl TestKey {
    /// The algorithm tokens are signed with unless the builder says otherwise.
    pub fn default_alg(self) -> Algorithm {
        match self {
            Self::Rsa1 | Self::Rsa2 => Algorithm::RS256,
            Self::EcP256 => Algorithm::ES256,
            Self::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The `kid` used unless the builder or the JWKS call says otherwise.
    pub fn default_kid(self) -> &'static str {
        match self {
            Self::Rsa1 => "rsa-1",
            Self::Rsa2 => "rsa-2",
            Self::EcP256 => "ec-p256",
            Self::Ed25519 => "ed25519",
        }
    }

    /// The public key as PEM (SubjectPublicKeyInfo), as an attacker would find it.
    pub fn public_pem(self) -> &'static str {
        match self {
            Self::Rsa1 => include_str!("../../tests/fixtures/rsa-1.pub.pem"),
            Self::Rsa2 => include_str!("../../tests/fixtures/rsa-2.pub.pem"),
            Self::EcP256 => include_str!("../../tests/fixtures/ec-p256.pub.pem"),
            Self::Ed25519 => include_str!("../../tests/fixtures/ed25519.pub.pem"),
        }
    }

    fn encoding_key(self) -> EncodingKey {
        match self {
            Self::Rsa1 => {
                EncodingKey::from_rsa_der(&der(include_str!("../../tests/fixtures/rsa-1.pem")))
            }
            Self::Rsa2 => {
                EncodingKey::from_rsa_der(&der(include_str!("../../tests/fixtures/rsa-2.pem")))
            }
            Self::EcP256 => {
                EncodingKey::from_ec_der(&der(include_str!("../../tests/fixtures/ec-p256.pem")))
            }
            Self::Ed25519 => {
                EncodingKey::from_ed_der(&der(include_str!("../../tests/fixtures/ed25519.pem")))
            }
        }
    }
}

/// The body of a PEM file (the fixtures hold exactly one block each).
fn der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD.decode(body).expect("fixture PEM is base64")
}

/// A deliberately broken way to sign a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgery {
    /// `alg: none` and an empty signature.
    AlgNone,
    /// `HS256` keyed with a shared secret, e.g. the client secret.
    Hs256WithSecret(Vec<u8>),
    /// `HS256` keyed with the signing key's public PEM (the RS256/HS256 confusion attack).
    Hs256WithPublicKeyPem,
    /// An honest signature with one bit flipped.
    BadSignature,
}

/// Signs test tokens with the fixture keys and publishes their JWKS.
pub struct TestSigner {
    keys: Vec<(TestKey, EncodingKey)>,
}

impl Default for TestSigner {
    fn default() -> Self {
        Self::new()
    }
}

impl TestSigner {
    /// Loads all fixture keys (PEM decoding only; no key generation).
    pub fn new() -> Self {
        let all = [
            TestKey::Rsa1,
            TestKey::Rsa2,
            TestKey::EcP256,
            TestKey::Ed25519,
        ];
        Self {
            keys: all
                .into_iter()
                .map(|key| (key, key.encoding_key()))
                .collect(),
        }
    }

    fn key(&self, key: TestKey) -> &EncodingKey {
        let found = self.keys.iter().find(|(k, _)| *k == key).map(|(_, ek)| ek);
        found.expect("every TestKey is loaded")
    }

    /// The public JWK of `key` with `kid`, `use: sig` and its default `alg`.
    pub fn jwk(&self, key: TestKey, kid: &str) -> Value {
        let jwk = Jwk::from_encoding_key(self.key(key), key.default_alg()).expect("public JWK");
        let mut value = serde_json::to_value(jwk).expect("JWK serializes");
        value["kid"] = json!(kid);
        value["use"] = json!("sig");
        value
    }

    /// A JWKS document holding the public halves of `keys`, each under the given `kid`.
    pub fn jwks_json(&self, keys: &[(TestKey, &str)]) -> Vec<u8> {
        let keys: Vec<Value> = keys.iter().map(|(key, kid)| self.jwk(*key, kid)).collect();
        serde_json::to_vec(&json!({ "keys": keys })).expect("JWKS serializes")
    }

    /// Starts a token signed by `key` with its default `alg` and `kid` and `typ: JWT`.
    pub fn token(&self, key: TestKey) -> TokenBuilder<'_> {
        TokenBuilder {
            signer: self,
            key,
            alg: key.default_alg(),
            kid: Some(key.default_kid().to_owned()),
            typ: Some("JWT".to_owned()),
            forgery: None,
        }
    }
}

/// The header and signing choices of one test token.
pub struct TokenBuilder<'a> {
    signer: &'a TestSigner,
    key: TestKey,
    alg: Algorithm,
    kid: Option<String>,
    typ: Option<String>,
    forgery: Option<Forgery>,
}

impl TokenBuilder<'_> {
    pub fn alg(mut self, alg: Algorithm) -> Self {
        self.alg = alg;
        self
    }

    pub fn kid(mut self, kid: &str) -> Self {
        self.kid = Some(kid.to_owned());
        self
    }

    pub fn no_kid(mut self) -> Self {
        self.kid = None;
        self
    }

    pub fn typ(mut self, typ: &str) -> Self {
        self.typ = Some(typ.to_owned());
        self
    }

    pub fn no_typ(mut self) -> Self {
        self.typ = None;
        self
    }

    pub fn forge(mut self, forgery: Forgery) -> Self {
        self.forgery = Some(forgery);
        self
    }

    /// The compact JWS of `claims` (any JSON value, so malformed payloads can be made too).
    pub fn sign(self, claims: &Value) -> String {
        let alg_name = match &self.forgery {
            Some(Forgery::AlgNone) => "none",
            Some(Forgery::Hs256WithSecret(_) | Forgery::Hs256WithPublicKeyPem) => "HS256",
            _ => alg_name(self.alg),
        };
        let mut header = json!({ "alg": alg_name });
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        if let Some(typ) = &self.typ {
            header["typ"] = json!(typ);
        }
        let input = format!("{}.{}", b64_json(&header), b64_json(claims));
        let hmac = |secret: &[u8]| {
            jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(secret),
                Algorithm::HS256,
            )
            .expect("HMAC signs")
        };
        let honest = || {
            jsonwebtoken::crypto::sign(input.as_bytes(), self.signer.key(self.key), self.alg)
                .expect("the fixture key fits the chosen alg")
        };
        let signature = match &self.forgery {
            None => honest(),
            Some(Forgery::AlgNone) => String::new(),
            Some(Forgery::Hs256WithSecret(secret)) => hmac(secret),
            Some(Forgery::Hs256WithPublicKeyPem) => hmac(self.key.public_pem().as_bytes()),
            Some(Forgery::BadSignature) => {
                let mut bytes = URL_SAFE_NO_PAD
                    .decode(honest())
                    .expect("base64url signature");
                bytes[0] ^= 0x01;
                URL_SAFE_NO_PAD.encode(bytes)
            }
        };
        format!("{input}.{signature}")
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    ALLOWED_ALGORITHMS
        .iter()
        .find(|(_, a)| *a == alg)
        .map(|(name, _)| *name)
        .unwrap_or_else(|| panic!("test tokens use an allowed alg or a Forgery, not {alg:?}"))
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("JSON serializes"))
}

/// The claims of a valid ID token, issued at `now` and valid for an hour.
pub fn id_token_claims(issuer: &str, client_id: &str, nonce: &str, now: u64) -> Value {
    json!({
        "iss": issuer, "aud": client_id, "sub": "alice", "nonce": nonce,
        "iat": now, "exp": now + 3600, "sid": "session-1",
    })
}

/// The claims of a valid back-channel logout token for `sub: alice`, `sid: session-1`.
pub fn logout_token_claims(issuer: &str, client_id: &str, now: u64) -> Value {
    json!({
        "iss": issuer, "aud": client_id, "iat": now, "jti": "logout-1",
        "sub": "alice", "sid": "session-1", "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
    })
}

/// A [`JwksFetcher`] serving a settable body (or error) and counting its fetches.
pub struct FakeJwksFetcher {
    body: Mutex<Result<Vec<u8>, crate::reply::Cause>>,
    fetches: AtomicUsize,
}

impl FakeJwksFetcher {
    pub fn new(body: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            body: Mutex::new(Ok(body)),
            fetches: AtomicUsize::new(0),
        })
    }

    /// Serve `body` from the next fetch on (key rotation).
    pub fn set(&self, body: Vec<u8>) {
        *self.body.lock().unwrap_or_else(PoisonError::into_inner) = Ok(body);
    }

    /// Fail every fetch from now on with `why`.
    pub fn fail(&self, why: &str) {
        *self.body.lock().unwrap_or_else(PoisonError::into_inner) = Err(crate::reply::Cause::new(
            std::io::Error::other(why.to_owned()),
        ));
    }

    /// How many fetches have started.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl JwksFetcher for FakeJwksFetcher {
    fn fetch(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, crate::reply::Cause>> + Send + '_>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            // Let concurrent callers pile up behind this fetch, as a network round trip would.
            tokio::task::yield_now().await;
            self.body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }
}
