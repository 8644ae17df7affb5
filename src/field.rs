//! What Vestibule writes into an HTTP field as it is, without making a field value of it first:
//! an access token, after `Bearer ` or `DPoP ` in the upstream request's `Authorization`. The
//! check is made where such text enters (the provider's answers, sessions read from a store),
//! by every layer that takes it in, so that a request never looks at it again.

use serde::{Deserialize, Deserializer};

/// Whether `token` can follow `Bearer ` or `DPoP ` in an `Authorization` field as it is:
/// visible ASCII and no space (RFC 6750's `b64token`, and the opaque tokens providers issue, fit).
/// Checked where a token enters Vestibule (the provider's answer, a session read from a store),
/// so that a request writes it into the upstream's head without looking at it again.
pub fn sendable_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// [`sendable_token`] for a token read by serde; anything else is refused, and the whole value
/// (a token response, a session) with it.
pub fn sendable<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let token = String::deserialize(deserializer)?;
    if !sendable_token(&token) {
        return Err(serde::de::Error::custom(
            "an access token must be visible ASCII without spaces",
        ));
    }
    Ok(token)
}
