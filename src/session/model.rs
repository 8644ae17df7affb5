//! The session value: who the user is and the tokens held for them.
//!
//! A [`Session`] is serialised to JSON and encrypted before it reaches a store. Its `Debug` output
//! redacts every token and the provider's session id, so it is safe in logs; it shows claim names
//! but not their values.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An access token for one resource.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    pub value: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Unix seconds when it was obtained (0 for sessions stored before this field existed).
    #[serde(default)]
    pub issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
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

/// One signed-in user's session.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub sub: String,
    /// The provider's session id (`sid` claim), used by back-channel logout.
    #[serde(default)]
    pub sid: Option<String>,
    /// Selected claims of the ID token or userinfo.
    #[serde(default)]
    pub claims: Map<String, Value>,
    /// Kept for `id_token_hint` at logout.
    #[serde(default)]
    pub id_token: Option<String>,
    /// Access tokens by resource; `""` is the default resource.
    #[serde(default)]
    pub tokens: BTreeMap<String, AccessToken>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix seconds; set by the manager when the session is created.
    #[serde(default)]
    pub created_at: u64,
    /// Unix seconds; set by the manager on every write.
    #[serde(default)]
    pub last_seen: u64,
    #[serde(default)]
    pub user_agent: Option<String>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("sub", &self.sub)
            .field("sid", &self.sid.as_ref().map(|_| Redacted))
            .field("claims", &self.claims.keys().collect::<Vec<_>>())
            .field("id_token", &self.id_token.as_ref().map(|_| Redacted))
            .field("tokens", &self.tokens)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| Redacted),
            )
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("user_agent", &self.user_agent)
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
        let mut tokens = BTreeMap::new();
        tokens.insert(
            String::new(),
            AccessToken {
                value: "AT-default-secret".into(),
                expires_at: 100,
                issued_at: 0,
                scope: Some("api.read".into()),
            },
        );
        tokens.insert(
            "https://api.example.com".into(),
            AccessToken {
                value: "AT-resource-secret".into(),
                expires_at: 200,
                issued_at: 0,
                scope: None,
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
            claims,
            id_token: Some("ID-token-secret".into()),
            tokens,
            refresh_token: Some("RT-secret".into()),
            created_at: 10,
            last_seen: 20,
            user_agent: Some("Firefox".into()),
        }
    }

    #[test]
    fn debug_redacts_every_token_and_the_provider_session_id() {
        let text = format!("{:?} {:#?}", sample(), sample());
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("user-1") && text.contains("email") && text.contains("api.read"));
    }

    #[test]
    fn session_round_trips_through_json() {
        let json = serde_json::to_string(&sample()).unwrap();
        let back: Session = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample());
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
