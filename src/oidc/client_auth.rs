//! How Vestibule proves who it is at the provider's token and revocation endpoints: a client
//! secret (HTTP Basic or in the form), or `private_key_jwt` (RFC 7523, OpenID Connect Core §9) —
//! a short-lived JWT signed with our own key, or one the platform keeps fresh in a file (e.g. a
//! Kubernetes projected service-account token), so that no long-lived secret exists at all.
//!
//! [`Credential::load`] reads the files; the app loads it again on every reload, so a rotated key
//! needs no restart. An assertion file is then kept fresh by a watcher of its own
//! ([`AssertionFile`]). [`Credential::request_parts`] produces the authentication parts of one
//! request, from memory (the serving workers call it: it never touches a file); the public keys
//! for the admin `/jwks` come from [`Credential::published_keys`].

use crate::config::{ClientAuth, OidcConfig, Secret};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderValue;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use std::path::Path;

mod assertion_file;
pub use assertion_file::AssertionFile;

/// `client_assertion_type` of RFC 7523 §2.2.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a client assertion we sign is valid: long enough for a slow token endpoint, short
/// enough that a captured one is soon worthless (each also carries a unique `jti`).
pub const ASSERTION_LIFETIME: u64 = 60;

/// Why the client's credential cannot be loaded: the TOML key and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CredentialError {
    pub key: String,
    pub message: String,
}

/// The client's credential, as loaded from the configuration and its files.
pub enum Credential {
    /// `client_secret_basic` (`basic`) or `client_secret_post`.
    Secret { secret: Secret, basic: bool },
    /// `private_key_jwt` with our own key: `signing` signs, every key in `published` (the
    /// signing one first) is published at the admin `/jwks`.
    Key {
        signing: ClientKey,
        published: Vec<Value>,
    },
    /// `private_key_jwt` with an assertion the platform writes to a file.
    AssertionFile(AssertionFile),
    /// `tls_client_auth` or `self_signed_tls_client_auth` (RFC 8705 §2): the client certificate
    /// presented on the connection authenticates the client; the form carries `client_id` only.
    Certificate,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Secret { basic, .. } => write!(f, "Secret {{ basic: {basic} }}"),
            Credential::Key { signing, .. } => write!(f, "Key {{ kid: {:?} }}", signing.kid),
            Credential::AssertionFile(file) => write!(f, "AssertionFile({:?})", file.path()),
            Credential::Certificate => write!(f, "Certificate"),
        }
    }
}

/// The authentication parts of one request: an `Authorization` header, form fields, or both.
#[derive(Default)]
pub struct ClientCredentials {
    pub authorization: Option<HeaderValue>,
    pub fields: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|(k, _)| *k).collect();
        f.debug_struct("ClientCredentials")
            .field("authorization", &self.authorization.is_some())
            .field("fields", &names)
            .finish()
    }
}

impl Credential {
    /// Reads what `config.client_auth` needs; a bad or unreadable file is an error naming its key.
    pub fn load(config: &OidcConfig) -> Result<Credential, CredentialError> {
        match config.client_auth {
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
                Ok(Credential::Secret {
                    secret: config
                        .client_secret
                        .clone()
                        .unwrap_or_else(|| Secret::new("")),
                    basic: config.client_auth == ClientAuth::ClientSecretBasic,
                })
            }
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {
                Ok(Credential::Certificate)
            }
            ClientAuth::PrivateKeyJwt => {
                if let Some(path) = &config.client_assertion_file {
                    // Readable now, or `check` and the start say so; later reads are the
                    // watcher's, off the serving workers.
                    let file =
                        AssertionFile::open(path.clone()).map_err(|message| CredentialError {
                            key: "oidc.client_assertion_file".into(),
                            message,
                        })?;
                    return Ok(Credential::AssertionFile(file));
                }
                let Some(path) = &config.client_key_file else {
                    return Err(CredentialError {
                        key: "oidc.client_auth".into(),
                        message:
                            "\"private_key_jwt\" needs client_key_file or client_assertion_file"
                                .into(),
                    });
                };
                let signing = ClientKey::from_file(path).map_err(|message| CredentialError {
                    key: "oidc.client_key_file".into(),
                    message,
                })?;
                let mut published = vec![signing.jwk.clone()];
                for (i, path) in config.client_published_key_files.iter().enumerate() {
                    let key = ClientKey::from_file(path).map_err(|message| CredentialError {
                        key: format!("oidc.client_published_key_files[{i}]"),
                        message,
                    })?;
                    if !published.iter().any(|k| k["kid"] == key.jwk["kid"]) {
                        published.push(key.jwk);
                    }
                }
                Ok(Credential::Key { signing, published })
            }
        }
    }

    /// The public keys to publish at the admin `/jwks` (none for a secret or an assertion file).
    pub fn published_keys(&self) -> &[Value] {
        match self {
            Credential::Key { published, .. } => published,
            _ => &[],
        }
    }

    /// The `alg` our assertions are signed with, when we sign them.
    pub fn signing_alg(&self) -> Option<&'static str> {
        match self {
            Credential::Key { signing, .. } => Some(signing.alg()),
            _ => None,
        }
    }

    /// The authentication parts of one request by `client_id`; an assertion we sign names
    /// `audience` (the token endpoint) and is valid from `now` for [`ASSERTION_LIFETIME`].
    pub fn request_parts(
        &self,
        client_id: &str,
        audience: &str,
        now: u64,
    ) -> Result<ClientCredentials, String> {
        match self {
            Credential::Secret {
                secret,
                basic: true,
            } => {
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let raw = format!("{}:{}", enc(client_id), enc(secret.expose()));
                let mut value =
                    HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(raw)))
                        .map_err(|_| "the client id cannot be sent in a header".to_string())?;
                value.set_sensitive(true);
                Ok(ClientCredentials {
                    authorization: Some(value),
                    fields: Vec::new(),
                })
            }
            Credential::Secret {
                secret,
                basic: false,
            } => Ok(ClientCredentials {
                authorization: None,
                fields: vec![
                    ("client_id", client_id.to_string()),
                    ("client_secret", secret.expose().to_string()),
                ],
            }),
            Credential::Key { signing, .. } => {
                let assertion = signing.assertion(client_id, audience, now)?;
                Ok(assertion_fields(client_id, assertion))
            }
            Credential::AssertionFile(file) => {
                Ok(assertion_fields(client_id, file.current().to_string()))
            }
            Credential::Certificate => Ok(ClientCredentials {
                authorization: None,
                fields: vec![("client_id", client_id.to_string())],
            }),
        }
    }
}

fn assertion_fields(client_id: &str, assertion: String) -> ClientCredentials {
    ClientCredentials {
        authorization: None,
        fields: vec![
            ("client_id", client_id.to_string()),
            ("client_assertion_type", JWT_BEARER.to_string()),
            ("client_assertion", assertion),
        ],
    }
}

enum Signer {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// One private key from a PEM file: EC P-256 (ES256) or RSA of 2048 bits or more (RS256), in
/// PKCS#8, SEC1 or PKCS#1 form. Its `kid` is its JWK thumbprint (RFC 7638).
pub struct ClientKey {
    signer: Signer,
    pub kid: String,
    /// The public key as a JWK with `kid`, `alg` and `use`.
    pub jwk: Value,
}

impl ClientKey {
    pub fn from_file(path: &Path) -> Result<ClientKey, String> {
        let pem = crate::config::read_file(path, crate::config::MAX_FILE)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ClientKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_pem(pem: &[u8]) -> Result<ClientKey, String> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
            "holds no PEM private key (BEGIN PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)"
                .to_string()
        })?;
        let bytes = der.secret_der();
        let ec = || EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, bytes);
        let rsa = || match &der {
            PrivateKeyDer::Pkcs1(_) => RsaKeyPair::from_der(bytes),
            _ => RsaKeyPair::from_pkcs8(bytes),
        };
        let signer = match &der {
            PrivateKeyDer::Pkcs1(_) => rsa().map(Signer::Rs256).ok(),
            PrivateKeyDer::Sec1(_) => ec().map(Signer::Es256).ok(),
            _ => ec()
                .map(Signer::Es256)
                .ok()
                .or_else(|| rsa().map(Signer::Rs256).ok()),
        };
        let Some(signer) = signer else {
            return Err("is not an EC P-256 or RSA private key".into());
        };
        let (members, alg) = match &signer {
            Signer::Es256(key) => {
                // The uncompressed point: 0x04, x, y (32 bytes each).
                let point = key.public_key().as_ref();
                if point.len() != 65 {
                    return Err("is not an EC P-256 private key".into());
                }
                let (x, y) = (
                    URL_SAFE_NO_PAD.encode(&point[1..33]),
                    URL_SAFE_NO_PAD.encode(&point[33..]),
                );
                (
                    format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                    "ES256",
                )
            }
            Signer::Rs256(key) => {
                let public = key.public_key();
                if public.modulus_len() < 256 {
                    return Err("is an RSA key shorter than 2048 bits".into());
                }
                let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
                let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
                (format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#), "RS256")
            }
        };
        use sha2::Digest;
        let kid = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(members.as_bytes()));
        let mut jwk: Value = serde_json::from_str(&members).map_err(|e| e.to_string())?;
        if let Some(object) = jwk.as_object_mut() {
            object.insert("kid".into(), kid.clone().into());
            object.insert("alg".into(), alg.into());
            object.insert("use".into(), "sig".into());
        }
        Ok(ClientKey { signer, kid, jwk })
    }

    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        }
    }

    /// A client assertion: `iss` = `sub` = `client_id`, `aud`, a random `jti`, `iat` = `now`,
    /// `exp` [`ASSERTION_LIFETIME`] later.
    pub fn assertion(&self, client_id: &str, audience: &str, now: u64) -> Result<String, String> {
        let jti = crate::oidc::random_token(24).map_err(|e| e.to_string())?;
        let header = json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid});
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": jti,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let failed = |_| "signing the client assertion failed".to_string();
        let signature = match &self.signer {
            Signer::Es256(key) => key
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            Signer::Rs256(key) => {
                let mut out = vec![0; key.public_modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    input.as_bytes(),
                    &mut out,
                )
                .map_err(failed)?;
                out
            }
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const EC: &str = include_str!("../../tests/fixtures/ec-p256.pem");
    const RSA: &str = include_str!("../../tests/fixtures/rsa-1.pem");

    fn verify(token: &str, jwk: &Value) -> serde_json::Value {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_audience(&["https://idp.example/token"]);
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn ec_and_rsa_keys_sign_assertions_their_jwk_verifies() {
        for (pem, alg) in [(EC, "ES256"), (RSA, "RS256")] {
            let key = ClientKey::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(key.alg(), alg);
            assert_eq!(key.jwk["kid"], key.kid.as_str());
            assert!(key.jwk.get("d").is_none(), "no private part is published");
            let now = crate::clock::now();
            let token = key
                .assertion("spa", "https://idp.example/token", now)
                .unwrap();
            let claims = verify(&token, &key.jwk);
            assert_eq!(claims["iss"], "spa");
            assert_eq!(claims["sub"], "spa");
            assert_eq!(claims["iat"], now);
            assert_eq!(claims["exp"], now + ASSERTION_LIFETIME);
            let again = key
                .assertion("spa", "https://idp.example/token", now)
                .unwrap();
            assert_ne!(verify(&again, &key.jwk)["jti"], claims["jti"]);
        }
    }

    #[test]
    fn the_kid_is_the_rfc7638_thumbprint() {
        // RFC 7638 §3.1's example key and thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let members = format!(r#"{{"e":"AQAB","kty":"RSA","n":"{n}"}}"#);
        use sha2::Digest;
        assert_eq!(
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(members.as_bytes())),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        let key = ClientKey::from_pem(RSA.as_bytes()).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk.clone()).unwrap();
        assert_eq!(
            jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap(),
            key.kid
        );
    }

    #[test]
    fn other_keys_and_garbage_are_refused() {
        let ed = include_str!("../../tests/fixtures/ed25519.pem");
        assert_eq!(
            ClientKey::from_pem(ed.as_bytes()).err().unwrap(),
            "is not an EC P-256 or RSA private key"
        );
        assert!(
            ClientKey::from_pem(b"not a key")
                .err()
                .unwrap()
                .contains("holds no PEM private key")
        );
        let public = include_str!("../../tests/fixtures/ec-p256.pub.pem");
        assert!(ClientKey::from_pem(public.as_bytes()).is_err());
    }
}
