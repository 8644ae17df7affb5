//! Sealing small values (cookies) with AES-256-GCM under a key ring that supports rotation.
//!
//! Format, base64url without padding:
//! `version (1 byte, = 1) ‖ key id (4 bytes) ‖ nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`.
//! The key id is the first four bytes of SHA-256 of the key, so opening never tries keys in turn.
//! The associated data is `aad ‖ version ‖ key id`: callers pass the cookie name as `aad`, which
//! binds a value to the name it was issued under. The first key seals; every key opens, and a value
//! opened with an older key is reported as stale so the caller can re-seal it.
//!
//! This module never panics on input and never logs; it knows nothing of cookies' other attributes.

use std::fmt;

use super::aead::{Cipher, NONCE_LEN, TAG_LEN};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The only format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Longest sealed value accepted, in characters, checked before any decoding.
pub const MAX_SEALED_LEN: usize = 4096;

const KEY_ID_LEN: usize = 4;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Shortest sealed value (empty plaintext), in characters of unpadded base64.
const MIN_SEALED_LEN: usize = sealed_len(0);

/// How many characters [`Keyring::seal`] makes of a plaintext of `plaintext_len` bytes.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    ((HEADER_LEN + plaintext_len + TAG_LEN) * 4).div_ceil(3)
}

/// Why a key ring could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("the session key ring needs at least one key")]
    Empty,
    #[error(
        "session keys {first} and {second} are the same or share a key id; use distinct random keys"
    )]
    DuplicateKeyId { first: usize, second: usize },
    #[error("the cryptographic library refused session key {0} for AES-256-GCM")]
    Refused(usize),
}

/// Why nothing was sealed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the system random number generator failed")]
    Random,
    #[error("the value would be longer than {MAX_SEALED_LEN} characters")]
    TooLarge,
}

/// Longest plaintext whose sealed form still opens.
pub const MAX_PLAINTEXT_LEN: usize = MAX_SEALED_LEN / 4 * 3 - HEADER_LEN - TAG_LEN;

/// A successfully opened value.
#[derive(PartialEq, Eq)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    /// Opened with a key other than the first: the caller should re-seal and re-issue the value.
    pub stale_key: bool,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("stale_key", &self.stale_key)
            .finish()
    }
}

struct Key {
    id: [u8; KEY_ID_LEN],
    cipher: Cipher,
}

/// Current and previous sealing keys. The first seals; all open.
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyring({} keys, redacted)", self.keys.len())
    }
}

impl Keyring {
    pub fn new(keys: Vec<[u8; 32]>) -> Result<Keyring, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut ring: Vec<Key> = Vec::with_capacity(keys.len());
        for (index, key) in keys.iter().enumerate() {
            let id = key_id(key);
            if let Some(first) = ring.iter().position(|k| k.id == id) {
                return Err(KeyringError::DuplicateKeyId {
                    first,
                    second: index,
                });
            }
            let cipher = Cipher::new(key).ok_or(KeyringError::Refused(index))?;
            ring.push(Key { id, cipher });
        }
        Ok(Keyring { keys: ring })
    }

    /// Seals `plaintext` under the first key, bound to `aad`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Result<String, SealError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SealError::TooLarge);
        }
        let key = self.keys.first().ok_or(SealError::Random)?;
        let nonce: [u8; NONCE_LEN] = random()?;
        let aad = associated_data(aad, &key.id);
        let sealed = key
            .cipher
            .seal(nonce, &aad, plaintext)
            .ok_or(SealError::TooLarge)?;
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a value sealed by [`Keyring::seal`] under the same `aad`; `None` for anything else.
    pub fn open(&self, aad: &str, value: &(impl AsRef<[u8]> + ?Sized)) -> Option<Opened> {
        let value = value.as_ref();
        if value.len() > MAX_SEALED_LEN || value.len() < MIN_SEALED_LEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(value).ok()?;
        let (header, sealed) = raw.split_at_checked(HEADER_LEN)?;
        if sealed.len() < TAG_LEN || header.first() != Some(&VERSION) {
            return None;
        }
        let id = header.get(1..1 + KEY_ID_LEN)?;
        let nonce = header.get(1 + KEY_ID_LEN..)?;
        let index = self.keys.iter().position(|k| k.id == id)?;
        let key = self.keys.get(index)?;
        let aad = associated_data(aad, &key.id);
        let plaintext = key.cipher.open(nonce, &aad, sealed)?;
        Some(Opened {
            plaintext,
            stale_key: index != 0,
        })
    }
}

fn key_id(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let digest = Sha256::digest(key);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

fn associated_data(aad: &str, key_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(aad.len() + 1 + KEY_ID_LEN);
    out.extend_from_slice(aad.as_bytes());
    out.push(VERSION);
    out.extend_from_slice(key_id);
    out
}

/// Fills an array from the operating system's random source.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|_| SealError::Random)?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const NAME: &str = "__Host-vestibule";

    #[test]
    fn a_sealed_value_is_as_long_as_sealed_len_says() {
        let ring = ring(&[1]);
        for len in [0, 1, 2, 3, 64, 100] {
            let sealed = ring.seal(NAME, &vec![7; len]).unwrap();
            assert_eq!(sealed.len(), sealed_len(len), "{len} bytes");
        }
    }

    fn ring(keys: &[u8]) -> Keyring {
        Keyring::new(keys.iter().map(|b| [*b; 32]).collect()).unwrap()
    }

    fn raw(value: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(value).unwrap()
    }

    fn encode(raw: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(raw)
    }

    #[test]
    fn sealed_value_opens_with_the_same_key_and_name() {
        let keys = ring(&[1]);
        let sealed = keys.seal(NAME, b"ticket").unwrap();
        let opened = keys.open(NAME, &sealed).unwrap();
        assert_eq!(opened.plaintext, b"ticket");
        assert!(!opened.stale_key);
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let keys = ring(&[1]);
        let sealed = keys.seal(NAME, b"").unwrap();
        assert_eq!(sealed.len(), MIN_SEALED_LEN);
        assert_eq!(keys.open(NAME, &sealed).unwrap().plaintext, b"");
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let keys = ring(&[1]);
        assert_ne!(
            keys.seal(NAME, b"x").unwrap(),
            keys.seal(NAME, b"x").unwrap()
        );
    }

    #[test]
    fn sealed_value_is_url_safe_and_has_the_documented_layout() {
        let keys = ring(&[1]);
        let sealed = keys.seal(NAME, b"abc").unwrap();
        assert!(
            sealed
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let bytes = raw(&sealed);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(bytes[1..5], key_id(&[1; 32]));
        assert_eq!(bytes.len(), HEADER_LEN + 3 + TAG_LEN);
    }

    #[test]
    fn tampered_nonce_is_rejected() {
        let keys = ring(&[1]);
        let mut bytes = raw(&keys.seal(NAME, b"ticket").unwrap());
        bytes[1 + KEY_ID_LEN] ^= 1;
        assert_eq!(keys.open(NAME, &encode(&bytes)), None);
    }

    #[test]
    fn tampered_ciphertext_or_tag_is_rejected() {
        let keys = ring(&[1]);
        let bytes = raw(&keys.seal(NAME, b"ticket").unwrap());
        for i in HEADER_LEN..bytes.len() {
            let mut copy = bytes.clone();
            copy[i] ^= 0x80;
            assert_eq!(keys.open(NAME, &encode(&copy)), None, "byte {i}");
        }
    }

    #[test]
    fn tampered_key_id_is_rejected() {
        let keys = ring(&[1, 2]);
        let mut bytes = raw(&keys.seal(NAME, b"ticket").unwrap());
        bytes[1..5].copy_from_slice(&key_id(&[2; 32]));
        assert_eq!(keys.open(NAME, &encode(&bytes)), None);
    }

    #[test]
    fn wrong_key_is_rejected() {
        let sealed = ring(&[1]).seal(NAME, b"ticket").unwrap();
        assert_eq!(ring(&[2]).open(NAME, &sealed), None);
    }

    #[test]
    fn truncated_value_is_rejected() {
        let keys = ring(&[1]);
        let sealed = keys.seal(NAME, b"ticket").unwrap();
        for len in 0..sealed.len() {
            assert_eq!(keys.open(NAME, &sealed[..len]), None, "length {len}");
        }
        let bytes = raw(&sealed);
        for len in 0..bytes.len() {
            assert_eq!(
                keys.open(NAME, &encode(&bytes[..len])),
                None,
                "raw length {len}"
            );
        }
    }

    #[test]
    fn unknown_version_is_rejected() {
        let keys = ring(&[1]);
        let mut bytes = raw(&keys.seal(NAME, b"ticket").unwrap());
        for version in [0u8, 2, 0xff] {
            bytes[0] = version;
            assert_eq!(keys.open(NAME, &encode(&bytes)), None);
        }
    }

    #[test]
    fn value_under_another_cookie_name_is_rejected() {
        let keys = ring(&[1]);
        let sealed = keys.seal(NAME, b"ticket").unwrap();
        assert_eq!(keys.open("__Host-vestibule-login", &sealed), None);
        assert_eq!(keys.open("", &sealed), None);
    }

    #[test]
    fn huge_value_is_rejected() {
        let keys = ring(&[1]);
        let largest = keys.seal(NAME, &vec![7u8; MAX_PLAINTEXT_LEN]).unwrap();
        assert!(largest.len() <= MAX_SEALED_LEN);
        assert!(keys.open(NAME, &largest).is_some());
        assert_eq!(
            keys.seal(NAME, &vec![7u8; MAX_PLAINTEXT_LEN + 1]),
            Err(SealError::TooLarge)
        );
        let mut raw = raw(&largest);
        raw.extend_from_slice(&[0u8; 3]);
        assert_eq!(keys.open(NAME, &encode(&raw)), None);
        assert_eq!(keys.open(NAME, &"A".repeat(1 << 20)), None);
    }

    #[test]
    fn reordered_blocks_are_rejected() {
        let keys = ring(&[1]);
        let mut bytes = raw(&keys.seal(NAME, &[9u8; 64]).unwrap());
        let body = HEADER_LEN..HEADER_LEN + 32;
        bytes[body].rotate_left(16);
        assert_eq!(keys.open(NAME, &encode(&bytes)), None);
    }

    #[test]
    fn garbage_never_panics() {
        let keys = ring(&[1]);
        let samples = [
            "",
            "=",
            "====",
            "%%%%",
            "not base64 at all!",
            "\u{0}\u{1}",
            "ééééééééééééééééééééééééééééééééééééééééééééééé",
        ];
        for sample in samples {
            assert_eq!(keys.open(NAME, sample), None);
        }
        for len in 0..200 {
            assert_eq!(keys.open(NAME, &"A".repeat(len)), None);
            assert_eq!(keys.open(NAME, &"_".repeat(len)), None);
        }
        // A well-formed header with a known key id but a forged body.
        let mut forged = vec![VERSION];
        forged.extend_from_slice(&key_id(&[1; 32]));
        forged.extend_from_slice(&[0u8; NONCE_LEN + TAG_LEN + 10]);
        assert_eq!(keys.open(NAME, &encode(&forged)), None);
    }

    #[test]
    fn old_key_opens_and_reports_stale() {
        let old = ring(&[1]);
        let sealed = old.seal(NAME, b"ticket").unwrap();
        let rotated = ring(&[2, 1]);
        let opened = rotated.open(NAME, &sealed).unwrap();
        assert_eq!(opened.plaintext, b"ticket");
        assert!(opened.stale_key);
        let resealed = rotated.seal(NAME, &opened.plaintext).unwrap();
        assert!(!rotated.open(NAME, &resealed).unwrap().stale_key);
        assert_eq!(
            old.open(NAME, &resealed),
            None,
            "the new key is not in the old ring"
        );
    }

    #[test]
    fn empty_or_duplicate_key_rings_are_refused() {
        assert_eq!(Keyring::new(vec![]).unwrap_err(), KeyringError::Empty);
        assert_eq!(
            Keyring::new(vec![[1; 32], [2; 32], [1; 32]]).unwrap_err(),
            KeyringError::DuplicateKeyId {
                first: 0,
                second: 2
            }
        );
    }

    #[test]
    fn debug_output_shows_no_key_or_plaintext() {
        let keys = ring(&[0xab]);
        let text = format!("{keys:?}");
        assert!(
            !text.contains("171") && !text.to_lowercase().contains("ab"),
            "{text}"
        );
        let opened = keys
            .open(NAME, &keys.seal(NAME, b"secret-ticket").unwrap())
            .unwrap();
        assert!(!format!("{opened:?}").contains("secret"));
    }

    /// A cookie an earlier release sealed (with the `aes-gcm` crate): users stay signed in
    /// across an upgrade, and across replicas of both versions during one.
    #[test]
    fn a_cookie_sealed_by_an_earlier_release_opens() {
        let keys = ring(&[3]);
        let opened = keys.open(NAME, EARLIER_COOKIE).unwrap();
        assert_eq!(opened.plaintext, [42; 64]);
        assert!(!opened.stale_key);
        assert!(keys.open("__Host-other", EARLIER_COOKIE).is_none());
        assert!(ring(&[4]).open(NAME, EARLIER_COOKIE).is_none());
    }

    const EARLIER_COOKIE: &str = concat!(
        "AWSKpcV_Et1f47m-FLNw3jrIe38mLvw8HpZfzIQFRRX0pQdEIJost0Dq5FuHxW-e-OxwDI6cYMJ-i5Jt2EYlJPQQ",
        "dtyxFz8UGT-jH3YjIRblzcdDq9ChcWY6xzsWsfNaOA",
    );
}
