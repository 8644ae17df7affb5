//! What Vestibule writes into an HTTP field as it is, without making a field value of it first:
//! an access token, after `Bearer ` or `DPoP ` in the upstream request's `Authorization`. The
//! check is made where such text enters (the provider's answers, sessions read from a store),
//! by every layer that takes it in, so that a request never looks at it again.

use serde::{Deserialize, Deserializer};

/// The longest access or refresh token taken from a provider, in bytes. Far beyond any token a
/// provider issues (a JWT with hundreds of roles is a few KiB; an ID token is bounded the same
/// by [`crate::jose`]), and far below what one answer may be (1 MiB): a session keeps its
/// tokens, and every upstream request carries its access token.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Whether `token` can follow `Bearer ` or `DPoP ` in an `Authorization` field as it is:
/// visible ASCII and no space (RFC 6750's `b64token`, and the opaque tokens providers issue, fit),
/// at most [`MAX_TOKEN_LEN`] bytes. Checked where a token enters Vestibule (the provider's answer,
/// a session read from a store), so that a request writes it into the upstream's head without
/// looking at it again.
pub fn sendable_token(token: &str) -> bool {
    // Every byte looked at, without a branch per byte (which `all` has, to stop at the first
    // bad one): a vector at a time. A store read checks each access token of the session this
    // way, ~4 instructions a byte of an 800-byte token the other way.
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .fold(true, |ok, b| ok & (b.wrapping_sub(b'!') <= b'~' - b'!'))
}

/// [`sendable_token`] for a token read by serde; anything else is refused, and the whole value
/// (a token response, a session) with it.
pub fn sendable<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let token = String::deserialize(deserializer)?;
    if !sendable_token(&token) {
        return Err(serde::de::Error::custom(
            "an access token must be visible ASCII without spaces, at most 64 KiB",
        ));
    }
    Ok(token)
}

/// Whether `token` is a refresh token as RFC 6749 Appendix A.17 has it, `1*VSCHAR` (printable
/// ASCII, space included), of at most [`MAX_TOKEN_LEN`] bytes. It is kept in the session and
/// sent back (form-encoded) to the token and revocation endpoints.
pub fn refresh_token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// An optional refresh token read by serde (`null` or absent: none), refused unless
/// [`refresh_token_ok`], and the whole token response with it.
pub fn refresh_token<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let token = Option::<String>::deserialize(deserializer)?;
    if token.as_deref().is_some_and(|t| !refresh_token_ok(t)) {
        return Err(serde::de::Error::custom(
            "a refresh token must be printable ASCII, at most 64 KiB",
        ));
    }
    Ok(token)
}

/// A short field value Vestibule makes for each request (the request id it gives a request,
/// the peer's address in `X-Forwarded-For`), kept in place rather than allocated as a
/// `HeaderValue`: the paths Vestibule writes itself copy its bytes into the head, and only a
/// request that goes through hyper's client makes a field value of it ([`Made::value`]). A
/// longer value (a trusted proxy's request id, its `X-Forwarded-For` list with the peer added)
/// is kept as the field value it is.
#[derive(Clone, Debug)]
pub enum Made {
    Short { bytes: [u8; SHORT], len: u8 },
    Value(http::HeaderValue),
}

/// The longest [`Made::Short`]: an IPv6 address with an IPv4 tail is 45 bytes, a request id 32.
pub const SHORT: usize = 46;

impl Made {
    /// `text` kept in place if it is short and visible ASCII (the only bytes these values are
    /// made of); otherwise made a field value, or `None` if it is not one.
    pub fn new(text: &[u8]) -> Option<Made> {
        if text.len() <= SHORT && text.iter().all(u8::is_ascii_graphic) {
            let mut bytes = [0u8; SHORT];
            bytes[..text.len()].copy_from_slice(text);
            let len = u8::try_from(text.len()).ok()?;
            return Some(Made::Short { bytes, len });
        }
        http::HeaderValue::from_bytes(text).ok().map(Made::Value)
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Made::Short { bytes, len } => &bytes[..usize::from(*len)],
            Made::Value(value) => value.as_bytes(),
        }
    }

    /// As text, for a log: `""` for a kept value that is not visible ASCII.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// As a field value, for hyper's client and server.
    pub fn value(&self) -> http::HeaderValue {
        match self {
            // Visible ASCII (checked in `new`): always a field value.
            Made::Short { .. } => http::HeaderValue::from_bytes(self.as_bytes())
                .unwrap_or(http::HeaderValue::from_static("")),
            Made::Value(value) => value.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check looks at every byte of a long token: a byte that could break a request head
    /// (a line break, a space, a control or non-ASCII character) is refused wherever it is,
    /// within or past the first vector's width.
    #[test]
    fn a_token_is_sendable_only_if_every_byte_is_visible_ascii() {
        let extra = ['\u{100}', '\u{2028}', '\u{fffd}', '\u{1f600}'];
        for c in (0u32..=0xff).filter_map(char::from_u32).chain(extra) {
            for at in [0, 1, 15, 16, 31, 32, 33, 63, 64, 65, 798, 799] {
                let mut token = "a".repeat(800);
                token.replace_range(at..=at, c.encode_utf8(&mut [0; 4]));
                let visible = c.is_ascii_graphic();
                assert_eq!(sendable_token(&token), visible, "{c:?} at {at}");
            }
        }
        assert!(sendable_token(&"~".repeat(MAX_TOKEN_LEN)));
        assert!(!sendable_token(&"~".repeat(MAX_TOKEN_LEN + 1)));
        assert!(!sendable_token(""));
    }

    #[test]
    fn a_made_value_keeps_its_bytes_whether_short_or_not() {
        for text in [
            &b""[..],
            b"10.0.0.1",
            b"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            b"0123456789abcdef0123456789abcdef",
            b"1.2.3.4, 5.6.7.8, 9.10.11.12, 13.14.15.16, 10.0.0.1",
            b"a b",
        ] {
            let made = Made::new(text).unwrap();
            assert_eq!(made.as_bytes(), text);
            assert_eq!(made.value().as_bytes(), text);
            assert_eq!(made.as_str().as_bytes(), text);
            let short = text.len() <= SHORT && text.iter().all(u8::is_ascii_graphic);
            assert_eq!(matches!(made, Made::Short { .. }), short, "{text:?}");
        }
        // What no field value may hold is refused, short or not.
        assert!(Made::new(b"a\r\nb").is_none());
        assert!(Made::new(b"x\0").is_none());
    }
}
