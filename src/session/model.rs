//! The session value: who the user is and the tokens held for them.
//!
//! A [`Session`] is serialised to JSON and encrypted before it reaches a store. Its `Debug` output
//! redacts every token and the provider's session id, so it is safe in logs; it shows claim names
//! but not their values.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An access token for one resource.
///
/// In this order (`repr(C)`): what a proxied request reads (the text, then the two times) first,
/// the scope last (see [`TokenMap`]'s entries).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[repr(C)]
pub struct AccessToken {
    /// [`crate::field::sendable_token`]: every way in checks it.
    #[serde(deserialize_with = "crate::field::sendable")]
    pub value: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds when it was obtained (0 for sessions stored before this field existed).
    #[serde(default)]
    pub issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// With DPoP: the RFC 7638 thumbprint of the key the token request was proved with, which
    /// the provider bound the token to (`None` without DPoP, and in sessions stored before this
    /// field existed: such a token is sent whatever key signs now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
}

impl AccessToken {
    /// When to refresh: `skew` before expiry, but never earlier than half the token's lifetime,
    /// so a skew longer than the provider's token lifetime cannot cause a refresh per request.
    pub fn refresh_at(&self, skew: u64) -> u64 {
        let lifetime = self.expires_at.saturating_sub(self.issued_at);
        let skew = if self.issued_at > 0 {
            skew.min(lifetime / 2)
        } else {
            skew
        };
        self.expires_at.saturating_sub(skew)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &Redacted)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Access tokens by resource, in key order: a map, serialised as one, stored as a boxed slice.
///
/// A session holds one token or a few, and every opened session sits in the session cache: a
/// `BTreeMap` would take a ~1 KB node for a single token, this takes the entries alone. Writes
/// (a refresh) rebuild the slice; reads are a scan of a handful of keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenMap(Box<[Entry]>);

/// One of a [`TokenMap`]'s tokens, starting a cache line: what every proxied request reads of
/// it (the key's length, then the token's text and times) is that one line, the scope (and the
/// next entry) in the next. With many sessions in use the entry is read from memory, not from a
/// CPU cache, and an entry laid across two lines was two such reads.
#[derive(Clone, PartialEq, Eq)]
#[repr(C, align(64))]
struct Entry {
    key: String,
    token: AccessToken,
}

impl TokenMap {
    pub fn get(&self, key: &str) -> Option<&AccessToken> {
        self.0.iter().find(|e| e.key == key).map(|e| &e.token)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut AccessToken> {
        self.0
            .iter_mut()
            .find(|e| e.key == key)
            .map(|e| &mut e.token)
    }

    /// Sets the token for `key`; the one it replaces, if any.
    pub fn insert(&mut self, key: String, token: AccessToken) -> Option<AccessToken> {
        if let Some(slot) = self.get_mut(&key) {
            return Some(std::mem::replace(slot, token));
        }
        let mut entries = std::mem::take(&mut self.0).into_vec();
        let at = entries.partition_point(|e| e.key < key);
        entries.insert(at, Entry { key, token });
        self.0 = entries.into_boxed_slice();
        None
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &AccessToken)> {
        self.0.iter().map(|e| (&e.key, &e.token))
    }

    pub fn values(&self) -> impl Iterator<Item = &AccessToken> {
        self.0.iter().map(|e| &e.token)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, AccessToken)> for TokenMap {
    /// A later entry for the same key wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, AccessToken)>>(entries: I) -> Self {
        let map: BTreeMap<String, AccessToken> = entries.into_iter().collect();
        TokenMap::from(map)
    }
}

impl From<BTreeMap<String, AccessToken>> for TokenMap {
    fn from(map: BTreeMap<String, AccessToken>) -> Self {
        TokenMap(
            map.into_iter()
                .map(|(key, token)| Entry { key, token })
                .collect(),
        )
    }
}

impl fmt::Debug for TokenMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for TokenMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for TokenMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, AccessToken>::deserialize(deserializer).map(TokenMap::from)
    }
}

/// The user's claims, kept as the JSON text they are stored as and parsed on first use.
///
/// An opened session sits in the session cache, and a parsed claims map (a `BTreeMap` node and
/// two strings per claim) was the largest part of it, though a plain token route never reads a
/// claim. Routes that do (roles, requirements, step-up, identity headers) parse once per cached
/// copy: the parsed map is kept with it.
#[derive(Default)]
pub struct UserClaims {
    /// Always an object; `None` is the empty one.
    text: Option<Box<RawValue>>,
    parsed: OnceLock<Map<String, Value>>,
}

impl UserClaims {
    /// The claims as a map (parsed now if not yet).
    pub fn map(&self) -> &Map<String, Value> {
        self.parsed.get_or_init(|| {
            self.text
                .as_deref()
                .and_then(|text| serde_json::from_str(text.get()).ok())
                .unwrap_or_default()
        })
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map().get(name)
    }

    /// The JSON text, `{}` when there are none.
    fn text(&self) -> &str {
        self.text.as_deref().map_or("{}", RawValue::get)
    }
}

/// Claim names only: their values are the user's personal data.
impl fmt::Debug for UserClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map().keys()).finish()
    }
}

impl From<Map<String, Value>> for UserClaims {
    fn from(map: Map<String, Value>) -> Self {
        // A map serialises in key order: equal maps give equal text.
        let text = serde_json::value::to_raw_value(&map).ok();
        UserClaims {
            text,
            parsed: OnceLock::from(map),
        }
    }
}

impl Clone for UserClaims {
    fn clone(&self) -> Self {
        UserClaims {
            text: self.text.clone(),
            parsed: self.parsed.clone(),
        }
    }
}

impl PartialEq for UserClaims {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text() || self.map() == other.map()
    }
}

impl Serialize for UserClaims {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.text {
            Some(text) => text.serialize(serializer),
            None => serializer.collect_map(std::iter::empty::<(&str, &Value)>()),
        }
    }
}

impl<'de> Deserialize<'de> for UserClaims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Box::<RawValue>::deserialize(deserializer)?;
        if !text.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("claims must be a JSON object"));
        }
        Ok(UserClaims {
            text: Some(text),
            parsed: OnceLock::new(),
        })
    }
}

/// One signed-in user's session.
///
/// Laid out in this order (`repr(C)`): what every proxied request reads of it (its times and its
/// access tokens) sits next to the reference count of the `Arc` it is shared in, in the same
/// cache line, so a session not used for a while costs one miss there, not three.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[repr(C)]
pub struct Session {
    /// Unix seconds; set by the manager when the session is created.
    #[serde(default)]
    pub created_at: u64,
    /// Unix seconds; set by the manager on every write.
    #[serde(default)]
    pub last_seen: u64,
    /// Unix seconds; the absolute deadline the manager set at login, kept whatever
    /// `absolute_timeout` later becomes (the indexes hold this deadline). `None` in sessions
    /// written before it was stored: `created_at` + the configured `absolute_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_deadline: Option<u64>,
    /// Access tokens by resource; `""` is the default resource.
    #[serde(default)]
    pub tokens: TokenMap,
    pub sub: String,
    /// The provider's session id (`sid` claim), used by back-channel logout.
    #[serde(default)]
    pub sid: Option<String>,
    /// Selected claims of the ID token or userinfo.
    #[serde(default)]
    pub claims: UserClaims,
    /// Kept for `id_token_hint` at logout.
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    /// The provider that issued it (the ID token's `iss`): a session of another issuer than
    /// the configured one is none (`Sessions`). `None` in sessions stored before it was
    /// recorded, which are the configured issuer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("sub", &self.sub)
            .field("sid", &self.sid.as_ref().map(|_| Redacted))
            .field("claims", &self.claims)
            .field("id_token", &self.id_token.as_ref().map(|_| Redacted))
            .field("tokens", &self.tokens)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| Redacted),
            )
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("absolute_deadline", &self.absolute_deadline)
            .field("user_agent", &self.user_agent)
            .field("issuer", &self.issuer)
            .finish()
    }
}

struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_due_at_skew_before_expiry_but_never_before_half_the_lifetime() {
        let token = |issued_at, expires_at| AccessToken {
            value: "t".into(),
            expires_at,
            issued_at,
            scope: None,
            jkt: None,
        };
        assert_eq!(token(1000, 4600).refresh_at(60), 4540);
        assert_eq!(
            token(1000, 1020).refresh_at(60),
            1010,
            "a 20 s token with a 60 s skew refreshes at 10 s"
        );
        assert_eq!(
            token(0, 4600).refresh_at(60),
            4540,
            "tokens stored without issued_at keep the plain skew"
        );
    }

    fn sample() -> Session {
        let mut tokens = TokenMap::default();
        tokens.insert(
            String::new(),
            AccessToken {
                value: "AT-default-secret".into(),
                expires_at: 100,
                issued_at: 0,
                scope: Some("api.read".into()),
                jkt: None,
            },
        );
        tokens.insert(
            "https://api.example.com".into(),
            AccessToken {
                value: "AT-resource-secret".into(),
                expires_at: 200,
                issued_at: 0,
                scope: None,
                jkt: Some("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into()),
            },
        );
        let mut claims = Map::new();
        claims.insert(
            "email".into(),
            Value::String("claim-value-secret@example.com".into()),
        );
        Session {
            sub: "user-1".into(),
            sid: Some("provider-sid-secret".into()),
            claims: claims.into(),
            id_token: Some("ID-token-secret".into()),
            tokens,
            refresh_token: Some("RT-secret".into()),
            created_at: 10,
            last_seen: 20,
            absolute_deadline: Some(30),
            user_agent: Some("Firefox".into()),
            issuer: Some("https://idp.example.com".into()),
        }
    }

    #[test]
    fn debug_redacts_every_token_and_the_provider_session_id() {
        let text = format!("{:?} {:#?}", sample(), sample());
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("user-1") && text.contains("email") && text.contains("api.read"));
    }

    /// Requests write a token into the upstream's head as it is (`proxy::headers::Credential`):
    /// a session read from a store with a token that is not `sendable_token` is refused (the
    /// provider's answers are checked in `oidc`).
    #[test]
    fn a_stored_token_that_could_break_a_request_head_is_refused() {
        for bad in [
            "",
            "at\r\nx-injected: 1",
            "at\nx",
            "at x",
            "at\tx",
            "at\u{7f}",
            "at\u{e9}",
        ] {
            assert!(!crate::field::sendable_token(bad), "{bad:?}");
            // A session read from a store.
            let stored = serde_json::json!({"": {"value": bad, "expires_at": 1}});
            assert!(
                serde_json::from_value::<TokenMap>(stored).is_err(),
                "{bad:?}"
            );
        }
        for good in [
            "at",
            "eyJhbGciOi.eyJzdWIi.c2ln",
            "a-b_c~d+e/f=",
            "!#$%&'()*,:;<>?@[]^`{|}",
        ] {
            assert!(crate::field::sendable_token(good), "{good:?}");
            let stored = serde_json::json!({"": {"value": good, "expires_at": 1}});
            let read = serde_json::from_value::<TokenMap>(stored).unwrap();
            assert_eq!(read.get("").unwrap().value, good);
        }
    }

    /// What a request reads of a token map's entry — the key's length, the token's text and
    /// its times — is the line the entry starts.
    #[test]
    fn what_a_request_reads_of_a_token_is_one_cache_line() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<Entry>(), 64);
        let token = offset_of!(Entry, token);
        assert_eq!(offset_of!(Entry, key), 0);
        assert!(size_of::<String>() <= token);
        for (at, size) in [
            (offset_of!(AccessToken, value), size_of::<String>()),
            (offset_of!(AccessToken, expires_at), 8),
            (offset_of!(AccessToken, issued_at), 8),
        ] {
            assert!(token + at + size <= 64, "{at}");
        }
        assert_eq!(size_of::<Entry>(), 128);
    }

    #[test]
    fn token_map_reads_and_writes_what_a_btree_map_did() {
        let token = |value: &str| AccessToken {
            value: format!("t-{value}"),
            expires_at: 1,
            issued_at: 0,
            scope: None,
            jkt: None,
        };
        let mut old = BTreeMap::new();
        let mut new = TokenMap::default();
        for key in ["https://b.example", "", "https://a.example"] {
            old.insert(key.to_string(), token(key));
            assert!(new.insert(key.to_string(), token(key)).is_none());
        }
        let written = serde_json::to_string(&new).unwrap();
        assert_eq!(written, serde_json::to_string(&old).unwrap());
        // Sessions stored by earlier versions, keys in any order, read back the same.
        let stored =
            r#"{"https://a.example":{"value":"x","expires_at":1},"":{"value":"y","expires_at":2}}"#;
        let read: TokenMap = serde_json::from_str(stored).unwrap();
        let keys: Vec<&String> = read.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["", "https://a.example"]);
        assert_eq!(read.get("").unwrap().value, "y");
        assert!(read.get("https://c.example").is_none());
        let replaced = new.insert(String::new(), token("renewed")).unwrap();
        assert_eq!((replaced.value.as_str(), new.len()), ("t-", 3));
        assert_eq!(new.get("").unwrap().value, "t-renewed");
        let back: TokenMap = serde_json::from_str(&written).unwrap();
        assert_eq!(back.len(), 3);
    }

    #[test]
    fn claims_are_kept_as_text_until_read_and_written_back_unchanged() {
        let stored =
            r#"{"sub":"u","claims":{"email":"a@example.test","roles":["admin"],"acr":"gold"}}"#;
        let session: Session = serde_json::from_str(stored).unwrap();
        assert!(
            session.claims.parsed.get().is_none(),
            "an opened session holds its claims as text"
        );
        assert_eq!(session.claims.get("acr"), Some(&Value::from("gold")));
        assert!(
            session.claims.parsed.get().is_some(),
            "parsed once, then kept"
        );
        let written = serde_json::to_value(&session).unwrap();
        assert_eq!(
            written["claims"],
            serde_json::json!({"email":"a@example.test","roles":["admin"],"acr":"gold"})
        );
        let mut map = Map::new();
        map.insert("roles".into(), serde_json::json!(["admin"]));
        map.insert("acr".into(), "gold".into());
        map.insert("email".into(), "a@example.test".into());
        assert_eq!(
            session.claims,
            UserClaims::from(map),
            "same claims, same value"
        );
        let none: Session = serde_json::from_str(r#"{"sub":"u"}"#).unwrap();
        assert!(none.claims.map().is_empty());
        assert_eq!(
            serde_json::to_value(&none).unwrap()["claims"],
            serde_json::json!({})
        );
        assert!(serde_json::from_str::<Session>(r#"{"sub":"u","claims":[1]}"#).is_err());
    }

    #[test]
    fn session_round_trips_through_json() {
        let json = serde_json::to_string(&sample()).unwrap();
        let back: Session = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample());
    }

    /// Rolling upgrade: a token stored before the thumbprint of its DPoP key was recorded loads
    /// without one (and is sent as before); one without a thumbprint is written as before, and
    /// a recorded one is read back.
    #[test]
    fn a_token_stored_without_the_thumbprint_of_its_key_loads() {
        let stored =
            r#"{"sub":"u","tokens":{"":{"value":"at","expires_at":9,"issued_at":1,"scope":"s"}}}"#;
        let session: Session = serde_json::from_str(stored).unwrap();
        let token = session.tokens.get("").unwrap();
        assert_eq!((token.value.as_str(), token.jkt.as_deref()), ("at", None));
        let written = serde_json::to_value(&session).unwrap();
        assert_eq!(
            written["tokens"][""],
            serde_json::json!({"value":"at","expires_at":9,"issued_at":1,"scope":"s"})
        );
        let mut bound = session.clone();
        bound.tokens.get_mut("").unwrap().jkt = Some("jkt-1".into());
        let text = serde_json::to_string(&bound).unwrap();
        let back: Session = serde_json::from_str(&text).unwrap();
        assert_eq!(back.tokens.get("").unwrap().jkt.as_deref(), Some("jkt-1"));
    }

    #[test]
    fn missing_optional_fields_default() {
        let back: Session = serde_json::from_str(r#"{"sub":"u"}"#).unwrap();
        assert_eq!(
            back,
            Session {
                sub: "u".into(),
                ..Session::default()
            }
        );
    }
}
