//! DPoP (RFC 9449): the key Vestibule proves possession of, the proofs it signs for token
//! requests and for upstream calls, and the server nonces it was told to use.
//!
//! One ES256 key per deployment: every replica must sign with the same key, or a token bound by
//! one replica is useless to the next. It comes from a [`KeySource`] — a PEM file, or (wired in
//! by the state layer) a key generated once and kept sealed in the session store — and is loaded
//! on first use, so a store that is down at start delays nothing but DPoP.
//!
//! Proofs carry `iat` from the system clock, not the application's [`crate::clock::Clock`]:
//! the provider and the APIs check it against their own wall clocks.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::Digest;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// The header a proof travels in.
pub const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");
/// The header a server's nonce travels in.
pub const DPOP_NONCE: http::HeaderName = http::HeaderName::from_static("dpop-nonce");

/// Longest server nonce kept; anything longer is ignored.
const MAX_NONCE_LEN: usize = 512;
/// Server origins whose nonce is remembered; beyond this the map starts afresh.
const MAX_NONCES: usize = 1024;

/// Why no proof could be made. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the DPoP key is not an EC P-256 private key")]
    BadKey,
    #[error("the DPoP key could not be loaded: {0}")]
    Unavailable(String),
    #[error("signing the DPoP proof failed")]
    Signing,
    #[error("the system random source failed")]
    Random,
}

/// An ES256 key pair with its public JWK and thumbprint, ready to sign proofs.
pub struct DpopKey {
    pair: EcdsaKeyPair,
    /// The base64url JOSE header every proof shares (`typ`, `alg`, `jwk`).
    header: String,
    /// RFC 7638 SHA-256 thumbprint of the public key: the `cnf.jkt` of bound tokens.
    jkt: String,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey").field("jkt", &self.jkt).finish()
    }
}

impl DpopKey {
    /// A new random key.
    pub fn generate() -> Result<DpopKey, DpopError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| DpopError::Random)?;
        DpopKey::from_pair(pair)
    }

    /// A private key in DER: PKCS#8 or SEC1 (RFC 5915).
    pub fn from_der(der: &[u8]) -> Result<DpopKey, DpopError> {
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| DpopError::BadKey)?;
        DpopKey::from_pair(pair)
    }

    /// A private key in PEM (`PRIVATE KEY` or `EC PRIVATE KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<DpopKey, DpopError> {
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(pem).map_err(|_| DpopError::BadKey)?;
        DpopKey::from_der(der.secret_der())
    }

    /// The private key as PKCS#8 DER, to be sealed before it is stored anywhere.
    pub fn to_pkcs8(&self) -> Result<Vec<u8>, DpopError> {
        self.pair
            .to_pkcs8v1()
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| DpopError::BadKey)
    }

    fn from_pair(pair: EcdsaKeyPair) -> Result<DpopKey, DpopError> {
        // An uncompressed P-256 point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let (Some(&4), Some(x), Some(y)) = (point.first(), point.get(1..33), point.get(33..65))
        else {
            return Err(DpopError::BadKey);
        };
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let jkt = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()));
        let header = serde_json::json!({
            "typ": "dpop+jwt",
            "alg": "ES256",
            "jwk": {"kty": "EC", "crv": "P-256", "x": x, "y": y},
        });
        Ok(DpopKey {
            pair,
            header: URL_SAFE_NO_PAD.encode(header.to_string()),
            jkt,
        })
    }

    /// The key's RFC 7638 thumbprint (`cnf.jkt` of the tokens bound to it).
    pub fn thumbprint(&self) -> &str {
        &self.jkt
    }

    /// A proof for one request: `htm` the method, `htu` the URL (its query and fragment are
    /// dropped here), `ath` when an access token goes with it, `nonce` when the server asked
    /// for one, a fresh random `jti`, and `iat` = `now` (Unix seconds).
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        now: u64,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String, DpopError> {
        let jti = super::random_token(16).map_err(|_| DpopError::Random)?;
        let mut claims = serde_json::json!({
            "jti": jti,
            "htm": htm,
            "htu": without_query(htu),
            "iat": now,
        });
        if let Some(token) = access_token {
            claims["ath"] = ath(token).into();
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = nonce.into();
        }
        let mut jws = String::with_capacity(self.header.len() + 400);
        jws.push_str(&self.header);
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self
            .pair
            .sign(&SystemRandom::new(), jws.as_bytes())
            .map_err(|_| DpopError::Signing)?;
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(jws)
    }
}

/// `ath`: base64url of the SHA-256 of the access token.
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(access_token.as_bytes()))
}

/// `htu` (RFC 9449 §4.2): the URL without query and fragment.
pub fn without_query(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url.get(..end).unwrap_or(url)
}

/// A server nonce as RFC 9449 §8 allows it (`1*NQCHAR`, bounded here), or nothing.
pub fn valid_nonce(value: &[u8]) -> Option<&str> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NONCE_LEN
        && value
            .iter()
            .all(|&b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
    ok.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The server a nonce belongs to: the origin of `address`, `scheme://host[:port]` (the port
/// only when it is not the scheme's default, as an upstream's origin is written), or `address`
/// itself when it has none.
pub fn origin(address: &str) -> String {
    match url::Url::parse(address) {
        Ok(u) if u.has_host() => format!(
            "{}://{}",
            u.scheme(),
            &u[url::Position::BeforeHost..url::Position::AfterPort]
        ),
        _ => address.to_string(),
    }
}

/// An opaque token for a key ring, compared by address (held, so that no other takes it).
pub type Ring = Arc<dyn std::any::Any + Send + Sync>;

/// Where the key comes from. Called until it succeeds; the key is then kept until the key
/// ring it was read under ([`KeySource::ring`]) is swapped.
pub trait KeySource: Send + Sync {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<DpopKey, DpopError>> + Send + '_>>;

    /// What the key is sealed with in a store (the session key ring), if it is, as a token
    /// compared by address: a new one (a reload) means reading the key again, so that every
    /// replica keeps signing with the one key stored.
    fn ring(&self) -> Option<Ring> {
        None
    }
}

/// A PEM file (`[oidc] dpop_key_file`), read on first use.
pub struct KeyFile(pub std::path::PathBuf);

impl KeySource for KeyFile {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<DpopKey, DpopError>> + Send + '_>> {
        Box::pin(async move {
            let path = self.0.clone();
            let read = tokio::task::spawn_blocking(move || {
                crate::config::read_file(&path, crate::config::MAX_FILE)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let pem = read.map_err(|e| {
                DpopError::Unavailable(format!("{}: {}", self.0.display(), e.kind()))
            })?;
            DpopKey::from_pem(&pem)
        })
    }
}

/// A key made in this process: for a single instance (tests, the memory store).
pub struct ProcessKey;

impl KeySource for ProcessKey {
    fn load(&self) -> Pin<Box<dyn Future<Output = Result<DpopKey, DpopError>> + Send + '_>> {
        Box::pin(async { DpopKey::generate() })
    }
}

/// DPoP for one OpenID client: its key, loaded once, and the nonces servers asked for.
pub struct Dpop {
    source: Arc<dyn KeySource>,
    /// The key, and the ring it was read under (held, so that its address names it).
    key: Mutex<Option<Loaded>>,
    /// One load at a time.
    loading: tokio::sync::Mutex<()>,
    /// Per server origin (`scheme://host[:port]`, see [`origin`]), the latest nonce it sent:
    /// the token endpoint's, the UserInfo endpoint's, each upstream's. RFC 9449 §8 and §9: a
    /// nonce is provided by a server (the authorization server, or a resource server such as
    /// the UserInfo endpoint or an API) for the proofs sent to that server; an origin is one
    /// server, so endpoints on one origin share its nonce and endpoints on two never do.
    nonces: Mutex<HashMap<String, String>>,
}

/// The key [`Dpop`] signs with, and the key ring it was read under.
struct Loaded {
    ring: Option<Ring>,
    key: Arc<DpopKey>,
}

impl Dpop {
    pub fn new(source: Arc<dyn KeySource>) -> Dpop {
        Dpop {
            source,
            key: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            nonces: Mutex::new(HashMap::new()),
        }
    }

    /// The key, loaded on first use and again after the key ring was swapped (a failed load is
    /// retried on the next call).
    pub async fn key(&self) -> Result<Arc<DpopKey>, DpopError> {
        let ring = self.source.ring();
        if let Some(key) = self.current(&ring) {
            return Ok(key);
        }
        let _one = self.loading.lock().await;
        if let Some(key) = self.current(&ring) {
            return Ok(key);
        }
        let key = Arc::new(self.source.load().await?);
        *self
            .key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Loaded {
            ring,
            key: key.clone(),
        });
        Ok(key)
    }

    /// The key loaded under `ring`, if that is the one kept.
    fn current(&self, ring: &Option<Ring>) -> Option<Arc<DpopKey>> {
        let kept = self
            .key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let loaded = kept.as_ref()?;
        let same = match (&loaded.ring, ring) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same.then(|| loaded.key.clone())
    }

    /// A proof for a POST to the provider's `url`, with its server's latest nonce, and the thumbprint
    /// of the key that signed it (the key the provider binds the tokens it answers with to).
    pub async fn provider_proof(&self, url: &str) -> Result<(String, String), DpopError> {
        let key = self.key().await?;
        let nonce = self.nonce(&origin(url));
        let proof = key.proof("POST", url, crate::clock::now(), None, nonce.as_deref())?;
        Ok((proof, key.thumbprint().to_string()))
    }

    /// The key loaded now, without waiting: `None` before a key was loaded under the current
    /// key ring (at start, after a reload that swapped the ring, until the next load).
    pub fn loaded_key(&self) -> Option<Arc<DpopKey>> {
        self.current(&self.source.ring())
    }

    /// The latest nonce of the server at `origin` ([`origin`]).
    pub fn nonce(&self, origin: &str) -> Option<String> {
        self.nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(origin)
            .cloned()
    }

    /// Keeps the nonce the server at `origin` sent if it is a valid one; `true` if it was kept.
    pub fn remember_nonce(&self, origin: &str, value: &[u8]) -> bool {
        let Some(nonce) = valid_nonce(value) else {
            return false;
        };
        let mut map = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_NONCES && !map.contains_key(origin) {
            map.clear();
        }
        map.insert(origin.to_string(), nonce.to_string());
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn part(jws: &str, i: usize) -> serde_json::Value {
        let text = jws.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).unwrap()).unwrap()
    }

    #[test]
    fn a_proof_names_the_request_and_verifies_with_the_key_in_its_header() {
        let key = DpopKey::generate().unwrap();
        let proof = key
            .proof(
                "GET",
                "https://api.example.test/items?page=2#top",
                1_700_000_000,
                Some("the-token"),
                Some("n-1"),
            )
            .unwrap();
        let header = part(&proof, 0);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert!(header["jwk"].get("d").is_none(), "the private key leaked");
        let claims = part(&proof, 1);
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.example.test/items");
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["nonce"], "n-1");
        assert_eq!(claims["ath"], ath("the-token"));
        assert_eq!(
            ath("the-token"),
            URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(b"the-token"))
        );
        // The signature verifies with the header's own key, and the thumbprint is the one
        // jsonwebtoken computes for that JWK.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(header["jwk"].clone()).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(&proof, &decoding, &validation).unwrap();
        assert_eq!(
            jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap(),
            key.thumbprint()
        );
        let again = key
            .proof("GET", "https://api.example.test/items", 1, None, None)
            .unwrap();
        assert_ne!(part(&again, 1)["jti"], claims["jti"]);
        assert!(part(&again, 1).get("ath").is_none());
        assert!(part(&again, 1).get("nonce").is_none());
    }

    #[test]
    fn a_key_survives_its_pkcs8_form_and_garbage_is_no_key() {
        let key = DpopKey::generate().unwrap();
        let again = DpopKey::from_der(&key.to_pkcs8().unwrap()).unwrap();
        assert_eq!(key.thumbprint(), again.thumbprint());
        assert_eq!(DpopKey::from_der(b"nope").unwrap_err(), DpopError::BadKey);
        assert_eq!(
            DpopKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err(),
            DpopError::BadKey
        );
    }

    #[test]
    fn only_well_formed_nonces_are_kept() {
        let dpop = Dpop::new(Arc::new(ProcessKey));
        for bad in [&b""[..], b"a b", b"a\"b", b"a\\b", b"\xff", &[b'a'; 513]] {
            assert!(!dpop.remember_nonce("https://h", bad), "{bad:?}");
        }
        assert_eq!(dpop.nonce("https://h"), None);
        assert!(dpop.remember_nonce("https://h", b"eyJ7S_zG.1-x~"));
        assert_eq!(dpop.nonce("https://h").as_deref(), Some("eyJ7S_zG.1-x~"));
        assert_eq!(dpop.nonce("https://other"), None);
    }

    /// A nonce belongs to one server (RFC 9449 §8, §9): endpoints share it only on one origin.
    #[test]
    fn a_nonce_belongs_to_the_origin_of_the_endpoint() {
        let same = [
            "https://idp.test/token",
            "https://IDP.test:443/userinfo?x#y",
        ];
        assert_eq!(origin(same[0]), "https://idp.test");
        assert_eq!(origin(same[1]), "https://idp.test");
        for other in [
            "http://idp.test/userinfo",
            "https://idp.test:8443/userinfo",
            "https://userinfo.idp.test/",
        ] {
            assert_ne!(origin(other), origin(same[0]), "{other}");
        }
        assert_eq!(origin("http://[::1]:8080/x"), "http://[::1]:8080");
        assert_eq!(origin("https://u:p@idp.test/t"), "https://idp.test");
        assert_eq!(origin("not a url"), "not a url");
    }
}
