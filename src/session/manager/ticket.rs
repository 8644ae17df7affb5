//! What the cookie carries (a ticket), the names derived from it, and the encrypted record a
//! store holds.
//!
//! Ticket = random 32-byte session id ‖ random 32-byte data key. The store key is
//! `"s:" + hex(SHA-256(id))`, so the store never sees the id. The record is
//! `format (1) ‖ meta length (u16 BE) ‖ meta ‖ nonce (12) ‖ AES-256-GCM(data key, session JSON)`:
//! only the cookie holder can read the session. `meta` (created, last seen, user agent) is sealed
//! with the server key ring instead, so session listings work without the cookie and a dump of the
//! store alone still reveals nothing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::session::aead::{Cipher, NONCE_LEN};
use crate::session::model::Session;
use crate::session::seal::{Keyring, SealError, random};

const RECORD_FORMAT: u8 = 1;
pub(super) const SESSION_PREFIX: &str = "s:";
const BODY_AAD: &str = "vestibule session body ";
const META_AAD: &str = "vestibule session meta ";
const MAX_USER_AGENT_CHARS: usize = 256;

/// The secret half of a session, held only inside the sealed cookie.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Ticket {
    id: [u8; 32],
    data_key: [u8; 32],
}

impl Ticket {
    pub(super) fn random() -> Result<Ticket, SealError> {
        Ok(Ticket {
            id: random()?,
            data_key: random()?,
        })
    }

    /// How many bytes [`Ticket::to_bytes`] makes.
    pub(super) const LEN: usize = 64;

    pub(super) fn to_bytes(&self) -> [u8; Ticket::LEN] {
        let mut out = [0u8; Ticket::LEN];
        out[..32].copy_from_slice(&self.id);
        out[32..].copy_from_slice(&self.data_key);
        out
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Ticket> {
        let (id, data_key) = bytes.split_at_checked(32)?;
        Some(Ticket {
            id: id.try_into().ok()?,
            data_key: data_key.try_into().ok()?,
        })
    }

    pub(super) fn key(&self) -> StoreKey {
        StoreKey(Sha256::digest(self.id).into())
    }
}

/// The store's name for a session: a hash of its id.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct StoreKey([u8; 32]);

impl StoreKey {
    /// Parses a name produced by [`StoreKey::name`] (an index member).
    pub(super) fn parse(name: &str) -> Option<StoreKey> {
        let hex_part = name.strip_prefix(SESSION_PREFIX)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).ok()?;
        Some(StoreKey(out))
    }

    pub(super) fn name(&self) -> String {
        prefixed_hex(&[SESSION_PREFIX], &self.0)
    }

    /// `prefix` followed by [`StoreKey::name`]: what a record's parts are sealed with.
    fn aad(&self, prefix: &str) -> String {
        prefixed_hex(&[prefix, SESSION_PREFIX], &self.0)
    }

    /// A stable, non-secret id for URLs and invalidation messages.
    pub(super) fn handle(&self) -> String {
        prefixed_hex(&[], &self.handle_digest())
    }

    /// [`StoreKey::handle`]'s text, in place.
    pub(super) fn handle_text(&self) -> [u8; 32] {
        let mut text = [0u8; 32];
        for (pair, byte) in text.chunks_exact_mut(2).zip(self.handle_digest()) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        text
    }

    fn handle_digest(&self) -> [u8; 16] {
        let digest = Sha256::new()
            .chain_update(b"vestibule handle\0")
            .chain_update(self.0)
            .finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        first
    }

    /// Where the single-flight refresh lease for this session lives.
    pub(super) fn lock_name(&self) -> String {
        prefixed_hex(&["l:"], &self.0)
    }

    /// Where a refresh records that it is spending `refresh_token`: a name of its own for each
    /// refresh token of each session, which tells nothing of either.
    pub(super) fn spend_name(&self, refresh_token: &str) -> String {
        let digest = Sha256::new()
            .chain_update(b"vestibule spend\0")
            .chain_update(self.0)
            .chain_update(refresh_token.as_bytes())
            .finalize();
        prefixed_hex(&["r:"], &digest[..16])
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The `prefixes` and then `bytes` in lower-case hex, in one allocation, digit by digit
/// (`hex::encode` and `format!` go through a char iterator and the formatter: a few thousand
/// instructions, twice per store read).
fn prefixed_hex(prefixes: &[&str], bytes: &[u8]) -> String {
    let start = prefixes.iter().map(|p| p.len()).sum::<usize>();
    let mut text = Vec::with_capacity(start + 2 * bytes.len());
    for prefix in prefixes {
        text.extend_from_slice(prefix.as_bytes());
    }
    // The digits written in pairs into room made at once (a `String::push` per digit checks
    // the room and encodes a char each time: ~1,500 instructions a store read).
    text.resize(start + 2 * bytes.len(), 0);
    for (pair, byte) in text[start..].chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // ASCII throughout: the prefixes are text and the digits ASCII, so the check passes. Were
    // it ever to fail, the same name is spelt the slow way: never an empty or partial one, under
    // which different sessions would share a record.
    String::from_utf8(text).unwrap_or_else(|_| prefixes.concat() + &hex::encode(bytes))
}

/// Index key for a claim value (`sub` or provider `sid`), hashed like every other key.
pub(super) fn index_name(kind: &str, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update(b"\0")
        .chain_update(value)
        .finalize();
    format!("{kind}:{}", hex::encode(digest))
}

/// What session listings show, readable with the server key ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    pub(super) created_at: u64,
    pub(super) last_seen: u64,
    pub(super) user_agent: Option<String>,
    /// The session's absolute deadline ([`Session::absolute_deadline`]); `None` in records
    /// written before it was stored.
    #[serde(default, rename = "a", skip_serializing_if = "Option::is_none")]
    pub(super) absolute_deadline: Option<u64>,
    /// The index of the session's provider session (a hashed name), so that a session ended
    /// without its cookie (`max_per_user`) leaves that index too. `None` without a provider
    /// session, and in records written before.
    #[serde(default, rename = "i", skip_serializing_if = "Option::is_none")]
    pub(super) provider_index: Option<String>,
    /// Whether the session belongs to a provider session (`sid`): a back-channel logout for
    /// another provider session of the user must leave it alone. `None` in records written
    /// before the mark, which are taken as having none (a logout is never lost for them).
    #[serde(default, rename = "p", skip_serializing_if = "Option::is_none")]
    pub(super) provider_session: Option<bool>,
    /// The session's issuer ([`Session::issuer`]), so that a logout, a listing or the cap on a
    /// user's sessions, which find sessions by `sub` or `sid` without their cookies, leave
    /// another issuer's alone. `None` in records written before: the configured issuer's.
    #[serde(default, rename = "o", skip_serializing_if = "Option::is_none")]
    pub(super) issuer: Option<String>,
}

/// Builds the stored bytes for `session` under `key`.
pub(super) fn encode_record(
    keyring: &Keyring,
    ticket: &Ticket,
    key: &StoreKey,
    session: &Session,
) -> Result<Vec<u8>, SealError> {
    let meta = Meta {
        created_at: session.created_at,
        last_seen: session.last_seen,
        user_agent: session.user_agent.as_deref().map(shorten),
        absolute_deadline: session.absolute_deadline,
        provider_index: session
            .sid
            .as_deref()
            .map(|sid| index_name(super::PROVIDER_INDEX, sid)),
        provider_session: Some(session.sid.is_some()),
        issuer: session.issuer.clone(),
    };
    let meta_json = serde_json::to_vec(&meta).map_err(|_| SealError::TooLarge)?;
    let meta = keyring.seal(&key.aad(META_AAD), &meta_json)?;
    let meta_len = u16::try_from(meta.len()).map_err(|_| SealError::TooLarge)?;
    let body_json = serde_json::to_vec(session).map_err(|_| SealError::TooLarge)?;
    let nonce: [u8; NONCE_LEN] = random()?;
    let aad = key.aad(BODY_AAD);
    let body = Cipher::new(&ticket.data_key)
        .and_then(|cipher| cipher.seal(nonce, aad.as_bytes(), &body_json))
        .ok_or(SealError::TooLarge)?;
    let mut out = Vec::with_capacity(3 + meta.len() + NONCE_LEN + body.len());
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&meta_len.to_be_bytes());
    out.extend_from_slice(meta.as_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Listings need only a recognisable user agent; a huge header must not make sealing fail.
fn shorten(user_agent: &str) -> String {
    match user_agent.char_indices().nth(MAX_USER_AGENT_CHARS) {
        Some((end, _)) => user_agent[..end].to_owned(),
        None => user_agent.to_owned(),
    }
}

fn split_record(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&format, rest) = record.split_first()?;
    if format != RECORD_FORMAT {
        return None;
    }
    let (len, rest) = rest.split_at_checked(2)?;
    let len = usize::from(u16::from_be_bytes(len.try_into().ok()?));
    rest.split_at_checked(len)
}

/// Decrypts the session with the cookie's data key; `None` if it is not this ticket's record.
pub(super) fn decode_session(ticket: &Ticket, key: &StoreKey, record: &[u8]) -> Option<Session> {
    let (_, body) = split_record(record)?;
    let (nonce, sealed) = body.split_at_checked(NONCE_LEN)?;
    let aad = key.aad(BODY_AAD);
    let json = Cipher::new(&ticket.data_key)?.open(nonce, aad.as_bytes(), sealed)?;
    // Checked as UTF-8 once, whole (a vector at a time while it is ASCII), and then read as
    // text: read from bytes, serde_json checks each string on its own, ~2,700 instructions for
    // a session's ~2 KiB (its tokens).
    serde_json::from_str(std::str::from_utf8(&json).ok()?).ok()
}

/// Reads the listing data with the key ring, without the cookie.
pub(super) fn decode_meta(keyring: &Keyring, key: &StoreKey, record: &[u8]) -> Option<Meta> {
    let (meta, _) = split_record(record)?;
    let meta = std::str::from_utf8(meta).ok()?;
    let opened = keyring.open(&key.aad(META_AAD), meta)?;
    serde_json::from_slice(&opened.plaintext).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_data_says_whether_the_session_has_a_provider_session() {
        let keyring = Keyring::new(vec![[3; 32]]).unwrap();
        let ticket = Ticket::random().unwrap();
        for (sid, mark) in [(Some("op-1"), Some(true)), (None, Some(false))] {
            let session = Session {
                sub: "u".into(),
                sid: sid.map(Into::into),
                ..Session::default()
            };
            let record = encode_record(&keyring, &ticket, &ticket.key(), &session).unwrap();
            let meta = decode_meta(&keyring, &ticket.key(), &record).unwrap();
            assert_eq!(meta.provider_session, mark);
        }
        // Written before the mark: unknown, which a back-channel logout takes as none.
        let old: Meta =
            serde_json::from_str(r#"{"created_at":1,"last_seen":2,"user_agent":null}"#).unwrap();
        assert_eq!(old.provider_session, None);
    }

    #[test]
    fn record_opens_only_with_its_ticket_and_key() {
        let keyring = Keyring::new(vec![[3; 32]]).unwrap();
        let ticket = Ticket::random().unwrap();
        let other = Ticket::random().unwrap();
        let session = Session {
            sub: "u".into(),
            user_agent: Some("ua".into()),
            ..Session::default()
        };
        let record = encode_record(&keyring, &ticket, &ticket.key(), &session).unwrap();
        assert_eq!(
            decode_session(&ticket, &ticket.key(), &record),
            Some(session)
        );
        assert_eq!(decode_session(&other, &ticket.key(), &record), None);
        assert_eq!(
            decode_session(&ticket, &other.key(), &record),
            None,
            "records cannot be moved"
        );
        assert_eq!(
            decode_meta(&keyring, &ticket.key(), &record)
                .unwrap()
                .user_agent
                .as_deref(),
            Some("ua")
        );
        assert_eq!(decode_meta(&keyring, &other.key(), &record), None);
        for len in 0..record.len() {
            assert_eq!(decode_session(&ticket, &ticket.key(), &record[..len]), None);
        }
    }

    #[test]
    fn huge_user_agent_is_shortened_in_the_listing_data() {
        let keyring = Keyring::new(vec![[3; 32]]).unwrap();
        let ticket = Ticket::random().unwrap();
        let session = Session {
            user_agent: Some("é".repeat(5000)),
            ..Session::default()
        };
        let record = encode_record(&keyring, &ticket, &ticket.key(), &session).unwrap();
        let meta = decode_meta(&keyring, &ticket.key(), &record).unwrap();
        assert_eq!(
            meta.user_agent.unwrap().chars().count(),
            MAX_USER_AGENT_CHARS
        );
        assert_eq!(
            decode_session(&ticket, &ticket.key(), &record),
            Some(session)
        );
    }

    #[test]
    fn the_handle_is_the_first_half_of_its_digest_in_lower_hex() {
        // Replicas of different versions share handles (invalidation messages, URLs): the
        // text must never change.
        for fill in [0u8, 1, 0x7f, 0xa5, 0xff] {
            let key = StoreKey([fill; 32]);
            let digest = Sha256::new()
                .chain_update(b"vestibule handle\0")
                .chain_update([fill; 32])
                .finalize();
            assert_eq!(key.handle(), hex::encode(&digest[..16]));
            assert_eq!(key.handle_text(), key.handle().as_bytes());
        }
        assert_eq!(
            StoreKey([0; 32]).handle(),
            "d5ca6ac94b2e0720b93db015f975af20"
        );
    }

    #[test]
    fn store_names_and_sealing_labels_keep_their_text() {
        // Records written by older versions are read by their key's name and opened with these
        // labels: the text must never change.
        for fill in [0u8, 0x5a, 0xff] {
            let key = StoreKey([fill; 32]);
            let hex = hex::encode([fill; 32]);
            assert_eq!(key.name(), format!("s:{hex}"));
            assert_eq!(key.lock_name(), format!("l:{hex}"));
            assert_eq!(key.aad(BODY_AAD), format!("vestibule session body s:{hex}"));
            assert_eq!(key.aad(META_AAD), format!("vestibule session meta s:{hex}"));
        }
    }

    #[test]
    fn store_key_names_round_trip_and_reject_garbage() {
        let key = Ticket::random().unwrap().key();
        assert!(StoreKey::parse(&key.name()) == Some(key));
        for bad in ["", "s:", "s:zz", "x:00", "s:0011"] {
            assert!(StoreKey::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(key.handle().len(), 32);
        assert_ne!(key.handle(), key.name());
    }

    #[test]
    fn ticket_bytes_round_trip_and_need_exactly_64_bytes() {
        let ticket = Ticket::random().unwrap();
        assert!(Ticket::from_bytes(&ticket.to_bytes()) == Some(ticket));
        assert!(Ticket::from_bytes(&[0; 63]).is_none());
        assert!(Ticket::from_bytes(&[0; 65]).is_none());
    }

    /// A record as an earlier release (sealed with the `aes-gcm` crate) wrote it: every
    /// session in a store must stay readable across upgrades, and across replicas of both
    /// versions during one.
    #[test]
    fn a_record_written_by_an_earlier_release_opens() {
        let keyring = Keyring::new(vec![[3; 32]]).unwrap();
        let ticket = Ticket::from_bytes(&[[5u8; 32], [9u8; 32]].concat()).unwrap();
        let record = hex::decode(EARLIER_RECORD).unwrap();
        let session = decode_session(&ticket, &ticket.key(), &record).unwrap();
        assert_eq!(session.sub, "alice");
        assert_eq!(session.sid.as_deref(), Some("op-1"));
        assert_eq!(session.id_token.as_deref(), Some("eyJ.id.token"));
        assert_eq!(session.refresh_token.as_deref(), Some("rt-1"));
        assert_eq!(session.absolute_deadline, Some(1_800_000_000));
        assert_eq!(
            session.issuer, None,
            "the configured issuer's (see `Sessions`)"
        );
        let meta = decode_meta(&keyring, &ticket.key(), &record).unwrap();
        assert_eq!(meta.issuer, None);
        assert_eq!(meta.user_agent.as_deref(), Some("ua"));
        assert_eq!(meta.created_at, 1_700_000_000);
        // And what this release writes, an earlier one reads: the same layout, sealed alike.
        let again = encode_record(&keyring, &ticket, &ticket.key(), &session).unwrap();
        assert_eq!(again.len(), record.len());
        assert_eq!(
            decode_session(&ticket, &ticket.key(), &again),
            Some(session)
        );
    }

    const EARLIER_RECORD: &str = concat!(
        "0101084157534b7063576442686f674d52346e5733357036436f35527238436173326467714a6f5f67534956",
        "76702d6b6d456f3363444d614e336f4d42347754706847327a36385266577a747a7a672d4255744f5736797a",
        "52735a626b315a71325a546d6d50557668483944634a32736570316e6a5739307066666d3672457454585a6c",
        "3644734d61744f6b336266697a6f4a6c376f3377443137314451773331706a4930574374396a4e6374563562",
        "5f76504a4267374d3437447763504273485a576a384f414a667964486f5166417056677172474646474d6346",
        "46786b4738314641354d306c4e494d303331492d4a4869756f69345a7a546b4b566a4948526c42717a595a51",
        "2d6f6c73ede4c17e96106d2241515f51cf4b4a54ae038ad8fd952d830f836823106691fda28a4def3270585f",
        "2eeedb560f3d2ef16875d5fa5b4abfdac545bbed53f05e91312d441d9c9cdcd450c88eddfc8b706f4f83491e",
        "e6e7ac9c65a529c13b82de9766a7f5d414068c98aae73f4f6ab7f9694beeae30fdb8e93ddfa32f544f5d0a34",
        "81a3d69028cf02480c269d96cbdfe3f5a71f939ff4f51f52bc8054a11d96f830fb64e12517312c2e28092681",
        "184107ec0d06ae14a34cadf4084b0bba3a7dadbd701dc6308fd9c09b2e677595c08dde8b520e87f38d5af27b",
        "7bb6a2b7b591dc0e",
    );
}
