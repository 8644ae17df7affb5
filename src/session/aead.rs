//! AES-256-GCM, the one cipher Vestibule seals with (cookies, session records), from aws-lc-rs,
//! which is in the tree for TLS already. The sealed form is the standard one: a 12-byte nonce
//! given by the caller, and the ciphertext followed by its 16-byte tag — the bytes earlier
//! releases wrote with the `aes-gcm` crate, so cookies and stored sessions outlive the change.
//!
//! aws-lc's implementation computes the tag and the key stream together, several blocks at a
//! time: a session record read from the store (~2 KiB) cost ~13,000 instructions to open with
//! the `aes-gcm` crate, one block at a time (docs/benchmarks.md, round 28).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of the tag that follows the ciphertext.
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key, expanded once.
pub struct Cipher(LessSafeKey);

impl Cipher {
    /// `None` only if aws-lc refuses a 32-byte key, which it does not.
    pub fn new(key: &[u8; 32]) -> Option<Cipher> {
        let key = UnboundKey::new(&AES_256_GCM, key).ok()?;
        Some(Cipher(LessSafeKey::new(key)))
    }

    /// `plaintext` sealed under `nonce`, bound to `aad`: ciphertext ‖ tag. `None` for a plaintext
    /// larger than GCM allows (64 GiB), which nothing here comes near.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
        out.extend_from_slice(plaintext);
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out,
            )
            .ok()?;
        Some(out)
    }

    /// The plaintext of `sealed` (ciphertext ‖ tag), if it was sealed by this key under `nonce`
    /// and `aad`; `None` for anything else.
    pub fn open(&self, nonce: &[u8], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        if sealed.len() < TAG_LEN {
            return None;
        }
        let mut buf = sealed.to_vec();
        let len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap()
    }

    /// The GCM specification's test cases 13 and 14 (McGrew and Viega, "The Galois/Counter Mode
    /// of Operation", AES-256 with a zero key and a zero nonce), and a case with associated data
    /// sealed by the `aes-gcm` crate earlier releases used: the format is standard AES-256-GCM.
    #[test]
    fn the_cipher_is_standard_aes_256_gcm() {
        let zero = Cipher::new(&[0; 32]).unwrap();
        assert_eq!(
            zero.seal([0; 12], b"", b"").unwrap(),
            hex("530f8afbc74536b9a963b4f1c4cb738b")
        );
        assert_eq!(
            zero.seal([0; 12], b"", &[0; 16]).unwrap(),
            hex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
        );
        assert_eq!(
            zero.open(&[0; 12], b"", &hex("530f8afbc74536b9a963b4f1c4cb738b")),
            Some(Vec::new())
        );
        let sealed = hex("0084fac3f9dd9962b4490d60e010fa280d53978330af7491b6");
        let cipher = Cipher::new(&[7; 32]).unwrap();
        assert_eq!(
            cipher.seal([1; 12], b"associated", b"vestibule").unwrap(),
            sealed
        );
        assert_eq!(
            cipher.open(&[1; 12], b"associated", &sealed).as_deref(),
            Some(&b"vestibule"[..])
        );
    }

    #[test]
    fn only_the_same_key_nonce_and_associated_data_open_a_sealed_value() {
        let cipher = Cipher::new(&[7; 32]).unwrap();
        let sealed = cipher.seal([1; 12], b"name", b"secret").unwrap();
        assert_eq!(sealed.len(), 6 + TAG_LEN);
        assert_eq!(
            cipher.open(&[1; 12], b"name", &sealed).as_deref(),
            Some(&b"secret"[..])
        );
        assert_eq!(cipher.open(&[2; 12], b"name", &sealed), None);
        assert_eq!(cipher.open(&[1; 12], b"other", &sealed), None);
        assert_eq!(
            Cipher::new(&[8; 32])
                .unwrap()
                .open(&[1; 12], b"name", &sealed),
            None
        );
        for at in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            assert_eq!(cipher.open(&[1; 12], b"name", &flipped), None, "byte {at}");
        }
        // Short input (less than a tag) and a nonce of the wrong length.
        assert_eq!(cipher.open(&[1; 12], b"name", &sealed[..TAG_LEN - 1]), None);
        assert_eq!(cipher.open(&[1; 11], b"name", &sealed), None);
    }
}
