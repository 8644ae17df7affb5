//! The provider's JSON Web Key Set: fetched through an injected [`JwksFetcher`], cached in an
//! `ArcSwap`, refetched once when a token names a key we do not know (key rotation), and never
//! more often than `min_refetch_interval` for such misses — a flood of bogus `kid`s costs the
//! provider at most one request per interval, and concurrent misses share that one request.
//!
//! Keys that cannot be used for verification (`use: enc`, symmetric `oct` keys, unknown key types
//! or curves, undecodable members) are skipped one by one; they never fail the whole set.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::jws::allowed_algorithm;
use super::{JoseError, KeySetFault};
use crate::reply::Cause;

/// How long one fetch may take before it counts as failed (the refetch lock is held meanwhile).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed refetch, how soon a token naming an unknown key may cause another (when the
/// rate limit is longer): once the provider is reachable again, a key it rotated to meanwhile
/// is fetched within a second, not a whole interval later.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(1);

/// Gets the raw JWKS document (the body of the provider's `jwks_uri`). Its errors are logged: they
/// must not contain secrets.
pub trait JwksFetcher: Send + Sync + 'static {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Cause>> + Send + '_>>;
}

/// The cached key set of one provider. Cheap to share behind an `Arc`.
pub struct Jwks {
    fetcher: Arc<dyn JwksFetcher>,
    min_refetch_interval: Duration,
    /// How long a lookup that misses waits for the refetch it causes, the wait for one under
    /// way included ([`Jwks::with_fetch_timeout`]).
    fetch_timeout: Duration,
    keys: ArcSwap<KeySet>,
    /// Serializes fetches; holds the time of the last fetch caused by an unknown key, and
    /// whether it brought a set.
    fetching: Mutex<Option<(Instant, bool)>>,
}

#[derive(Default)]
struct KeySet {
    /// Bumped on every successful fetch, so waiters can tell that the set changed.
    generation: u64,
    keys: Vec<Key>,
}

struct Key {
    kid: Option<String>,
    kind: KeyKind,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Jwks {
    /// An empty set; call [`Jwks::load`] at start-up (and periodically) to fill it.
    pub fn new(fetcher: Arc<dyn JwksFetcher>, min_refetch_interval: Duration) -> Self {
        Self {
            fetcher,
            min_refetch_interval,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetching: Mutex::new(None),
        }
    }

    /// A lookup that misses waits at most `timeout` (and never more than
    /// [`DEFAULT_FETCH_TIMEOUT`]) for the set: its refetch, and another fetch under way (a
    /// periodic [`Jwks::load`], itself given up after `timeout`) before it. A provider behind a
    /// dead link then fails the request within the provider timeout the request is promised,
    /// not after a fixed 10 s or two.
    #[must_use]
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout.min(DEFAULT_FETCH_TIMEOUT);
        self
    }

    /// Fetches the set and replaces the cached keys, giving up after the fetch timeout (a
    /// lookup that misses may be waiting for the lock meanwhile). On failure the old keys stay
    /// in use.
    pub async fn load(&self) -> Result<(), JoseError> {
        let _guard = self.fetching.lock().await;
        self.fetch_and_store(Instant::now() + self.fetch_timeout)
            .await
    }

    /// Whether a key set has been loaded successfully at least once.
    pub fn is_loaded(&self) -> bool {
        self.keys.load().generation > 0
    }

    /// The key to verify a token signed with `alg` and naming `kid`. Only keys whose type, curve,
    /// `use` and `alg` fit `alg` are considered; a token without `kid` is accepted only when
    /// exactly one key fits. On a miss the set is refetched once, rate-limited.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, JoseError> {
        let seen = self.keys.load_full();
        if let Some(key) = seen.find(kid, alg) {
            return Ok(key);
        }
        let deadline = Instant::now() + self.fetch_timeout;
        let Ok(mut last_refetch) = tokio::time::timeout_at(deadline, self.fetching.lock()).await
        else {
            return Err(JoseError::KeySetUnavailable(KeySetFault::TimedOut));
        };
        let current = self.keys.load_full();
        if current.generation != seen.generation {
            // Someone fetched while we waited: their set is as fresh as ours would be.
            return current.find(kid, alg).ok_or(JoseError::UnknownKey);
        }
        let now = Instant::now();
        if let Some((at, fetched)) = *last_refetch
            && now.duration_since(at) < self.min_interval_after(fetched)
        {
            // Only a set fetched moments ago says the key is unknown; after a failed fetch the
            // set in use may be the one before the provider's rotation, so the token may be
            // good (a back-channel logout answered "invalid" would be lost for good).
            return Err(match (current.generation, fetched) {
                (0, _) => JoseError::KeySetUnavailable(KeySetFault::NotLoaded),
                (_, false) => JoseError::KeySetUnavailable(KeySetFault::LastFetchFailed),
                (_, true) => JoseError::UnknownKey,
            });
        }
        let fetched = self.fetch_and_store(deadline).await;
        *last_refetch = Some((now, fetched.is_ok()));
        fetched?;
        self.keys.load().find(kid, alg).ok_or(JoseError::UnknownKey)
    }

    /// The least time between two refetches, after one that `fetched` a set or failed.
    fn min_interval_after(&self, fetched: bool) -> Duration {
        if fetched {
            self.min_refetch_interval
        } else {
            self.min_refetch_interval.min(RETRY_FAILED_AFTER)
        }
    }

    /// Callers hold `self.fetching`.
    async fn fetch_and_store(&self, deadline: Instant) -> Result<(), JoseError> {
        let body = match tokio::time::timeout_at(deadline, self.fetcher.fetch()).await {
            Ok(Ok(body)) => body,
            Ok(Err(cause)) => return Err(JoseError::KeySetUnavailable(KeySetFault::Fetch(cause))),
            Err(_) => return Err(JoseError::KeySetUnavailable(KeySetFault::TimedOut)),
        };
        let keys = parse_key_set(&body)?;
        let generation = self.keys.load().generation + 1;
        self.keys.store(Arc::new(KeySet { generation, keys }));
        Ok(())
    }
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys.load();
        f.debug_struct("Jwks")
            .field("keys", &keys.keys.len())
            .field("generation", &keys.generation)
            .field("min_refetch_interval", &self.min_refetch_interval)
            .finish_non_exhaustive()
    }
}

impl KeySet {
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let mut fitting = self.keys.iter().filter(|key| key.fits(alg));
        let found = match kid {
            Some(kid) => fitting.find(|key| key.kid.as_deref() == Some(kid)),
            None => match (fitting.next(), fitting.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            },
        };
        found.map(|key| key.key.clone())
    }
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        let kind = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyKind::Rsa,
            Algorithm::ES256 => KeyKind::P256,
            Algorithm::ES384 => KeyKind::P384,
            Algorithm::EdDSA => KeyKind::Ed25519,
            _ => return false,
        };
        self.kind == kind && self.alg.is_none_or(|own| own == alg)
    }
}

fn parse_key_set(body: &[u8]) -> Result<Vec<Key>, JoseError> {
    let document: Value = serde_json::from_slice(body)
        .map_err(|_| JoseError::KeySetUnavailable(KeySetFault::NotJson))?;
    let keys = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JoseError::KeySetUnavailable(KeySetFault::NoKeys))?;
    Ok(keys
        .iter()
        .filter_map(Value::as_object)
        .filter_map(parse_key)
        .collect())
}

/// One JWK, or `None` when it cannot serve to verify signatures.
fn parse_key(jwk: &Map<String, Value>) -> Option<Key> {
    let text = |name: &str| -> Result<Option<&str>, ()> {
        match jwk.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(()),
        }
    };
    if !matches!(text("use").ok()?, None | Some("sig")) {
        return None;
    }
    if let Some(ops) = jwk.get("key_ops")
        && !ops.as_array()?.iter().any(|op| op == "verify")
    {
        return None;
    }
    let alg = match text("alg").ok()? {
        Some(name) => Some(allowed_algorithm(name).ok()?),
        None => None,
    };
    let kid = text("kid").ok()?.map(str::to_owned);
    let bytes = |name: &str, len: Option<usize>| -> Option<Vec<u8>> {
        let decoded = URL_SAFE_NO_PAD.decode(text(name).ok()??).ok()?;
        (!decoded.is_empty() && len.is_none_or(|len| decoded.len() == len)).then_some(decoded)
    };
    let (kind, key) = match (text("kty").ok()??, text("crv").ok()?) {
        ("RSA", _) => {
            let (n, e) = (bytes("n", None)?, bytes("e", None)?);
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (kind, len) = if crv == "P-256" {
                (KeyKind::P256, 32)
            } else {
                (KeyKind::P384, 48)
            };
            let (x, y) = (bytes("x", Some(len))?, bytes("y", Some(len))?);
            // aws-lc takes the raw uncompressed point, which is what `from_ec_der` stores.
            let point = [&[0x04][..], &x, &y].concat();
            (kind, DecodingKey::from_ec_der(&point))
        }
        ("OKP", Some("Ed25519")) => {
            let x = bytes("x", Some(32))?;
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return None,
    };
    Some(Key {
        kid,
        kind,
        alg,
        key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::jose::jws;
    use crate::jose::testing::{FakeJwksFetcher, TestKey, TestSigner};

    const MINUTE: Duration = Duration::from_secs(60);

    async fn loaded(body: Vec<u8>, interval: Duration) -> (Arc<FakeJwksFetcher>, Jwks) {
        let fetcher = FakeJwksFetcher::new(body);
        let jwks = Jwks::new(fetcher.clone(), interval);
        jwks.load().await.unwrap();
        (fetcher, jwks)
    }

    async fn verifies(jwks: &Jwks, token: &str) -> Result<(), JoseError> {
        let token = jws::parse(token)?;
        token
            .verify(&jwks.key_for(token.kid.as_deref(), token.alg).await?)
            .map(|_| ())
    }

    fn set(keys: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    #[tokio::test]
    async fn undecodable_jwk_entries_are_skipped_and_the_rest_of_the_set_is_used() {
        let signer = TestSigner::new();
        let good = signer.jwk(TestKey::Rsa1, "rsa-1");
        let bad = |kid: &str, mut jwk: Value, change: Value| {
            for (name, value) in change.as_object().unwrap() {
                jwk[name] = value.clone();
            }
            jwk["kid"] = json!(kid);
            jwk
        };
        let ec = signer.jwk(TestKey::EcP256, "ec");
        let keys = vec![
            json!("not an object"),
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": "AAAA"}),
            bad("bad-n", good.clone(), json!({"n": "!!not base64!!"})),
            bad("no-e", good.clone(), json!({"e": null})),
            bad("enc", good.clone(), json!({"use": "enc"})),
            bad("oaep", good.clone(), json!({"alg": "RSA-OAEP"})),
            bad("sign-only", good.clone(), json!({"key_ops": ["sign"]})),
            bad("short-x", ec.clone(), json!({"x": "AAAA"})),
            bad("p521", ec.clone(), json!({"crv": "P-521"})),
            json!({"kty": "RSA", "kid": 7, "n": good["n"], "e": good["e"]}),
            good,
        ];
        let (_, jwks) = loaded(set(keys), MINUTE).await;
        assert!(
            verifies(&jwks, &signer.token(TestKey::Rsa1).sign(&json!({})))
                .await
                .is_ok()
        );
        for kid in ["hmac", "bad-n", "enc", "oaep", "sign-only"] {
            let token = signer.token(TestKey::Rsa1).kid(kid).sign(&json!({}));
            assert_eq!(
                verifies(&jwks, &token).await,
                Err(JoseError::UnknownKey),
                "{kid}"
            );
        }
    }

    #[tokio::test]
    async fn a_token_without_kid_uses_the_only_key_that_fits_its_alg() {
        let signer = TestSigner::new();
        let both = signer.jwks_json(&[(TestKey::Rsa1, "rsa-1"), (TestKey::EcP256, "ec")]);
        let (_, jwks) = loaded(both, MINUTE).await;
        let token = signer.token(TestKey::Rsa1).no_kid().sign(&json!({}));
        assert!(verifies(&jwks, &token).await.is_ok());

        let two_rsa = signer.jwks_json(&[(TestKey::Rsa1, "rsa-1"), (TestKey::Rsa2, "rsa-2")]);
        let (_, jwks) = loaded(two_rsa, MINUTE).await;
        assert_eq!(verifies(&jwks, &token).await, Err(JoseError::UnknownKey));
    }

    #[tokio::test]
    async fn a_key_of_another_type_never_serves_even_under_the_right_kid() {
        let signer = TestSigner::new();
        let (_, jwks) = loaded(signer.jwks_json(&[(TestKey::EcP256, "shared")]), MINUTE).await;
        let token = signer.token(TestKey::Rsa1).kid("shared").sign(&json!({}));
        assert_eq!(verifies(&jwks, &token).await, Err(JoseError::UnknownKey));
    }

    #[tokio::test]
    async fn a_broken_key_set_keeps_the_old_keys_in_use() {
        let signer = TestSigner::new();
        let (fetcher, jwks) = loaded(signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")]), MINUTE).await;
        for (body, why) in [
            (b"<html>".to_vec(), KeySetFault::NotJson),
            (b"{}".to_vec(), KeySetFault::NoKeys),
        ] {
            fetcher.set(body);
            assert_eq!(jwks.load().await, Err(JoseError::KeySetUnavailable(why)));
        }
        fetcher.fail("HTTP 503");
        let err = jwks.load().await.unwrap_err();
        assert!(
            matches!(&err, JoseError::KeySetUnavailable(KeySetFault::Fetch(cause)) if cause.to_string() == "HTTP 503"),
            "{err:?}"
        );
        assert!(
            verifies(&jwks, &signer.token(TestKey::Rsa1).sign(&json!({})))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn without_any_loaded_set_lookups_report_the_set_unavailable() {
        let fetcher = FakeJwksFetcher::new(Vec::new());
        fetcher.fail("connection refused");
        let jwks = Jwks::new(fetcher.clone(), MINUTE);
        assert!(!jwks.is_loaded());
        for _ in 0..3 {
            let err = jwks.key_for(Some("k"), Algorithm::RS256).await.unwrap_err();
            assert!(matches!(err, JoseError::KeySetUnavailable(_)));
        }
        assert_eq!(fetcher.fetches(), 1, "failed fetches are rate-limited too");
    }

    #[tokio::test]
    async fn after_a_failed_refetch_an_unknown_key_is_not_called_unknown_until_a_fetch_succeeds() {
        let signer = TestSigner::new();
        let (fetcher, jwks) = loaded(signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")]), MINUTE).await;
        // The provider rotates to rsa-2 while its key set cannot be fetched.
        fetcher.fail("HTTP 502");
        let rotated = signer.token(TestKey::Rsa2).kid("rsa-2").sign(&json!({}));
        for _ in 0..3 {
            let err = verifies(&jwks, &rotated).await.unwrap_err();
            assert!(matches!(err, JoseError::KeySetUnavailable(_)), "{err:?}");
        }
        assert_eq!(fetcher.fetches(), 2, "the refetch stays rate-limited");
        // A set that was fetched and still lacks the key does call it unknown.
        let (fetcher, jwks) = loaded(signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")]), MINUTE).await;
        assert_eq!(verifies(&jwks, &rotated).await, Err(JoseError::UnknownKey));
        fetcher.fail("HTTP 502");
        assert_eq!(verifies(&jwks, &rotated).await, Err(JoseError::UnknownKey));
    }

    /// A fetcher whose provider never answers (hung, or behind a link that died).
    struct Unanswered;

    impl JwksFetcher for Unanswered {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Cause>> + Send + '_>> {
            Box::pin(std::future::pending())
        }
    }

    /// The periodic load (and the one at start-up) gives up within the fetch timeout (the
    /// provider timeout) too, not after a fixed 10 s: meanwhile it holds the lock a token
    /// naming a new key waits on, and the start-up retries wait behind it.
    #[tokio::test(start_paused = true)]
    async fn a_load_from_a_provider_that_never_answers_gives_up_within_the_fetch_timeout() {
        let jwks =
            Jwks::new(Arc::new(Unanswered), MINUTE).with_fetch_timeout(Duration::from_secs(1));
        let started = Instant::now();
        let loaded = tokio::time::timeout(Duration::from_secs(5), jwks.load()).await;
        assert_eq!(
            loaded,
            Ok(Err(JoseError::KeySetUnavailable(KeySetFault::TimedOut))),
            "after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() <= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn each_miss_may_refetch_once_the_interval_has_passed() {
        let signer = TestSigner::new();
        let (fetcher, jwks) = loaded(
            signer.jwks_json(&[(TestKey::Rsa1, "rsa-1")]),
            Duration::ZERO,
        )
        .await;
        let token = signer.token(TestKey::Rsa1).kid("unknown").sign(&json!({}));
        for _ in 0..3 {
            assert_eq!(verifies(&jwks, &token).await, Err(JoseError::UnknownKey));
        }
        assert_eq!(fetcher.fetches(), 4);
        assert!(jwks.is_loaded());
    }
}
