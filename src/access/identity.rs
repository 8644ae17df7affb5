//! Who the user is, told to upstreams that do not take the provider's tokens: headers set from the
//! session's claims (`identity_headers`) and an assertion, a short-lived JWT Vestibule signs
//! (`assertion`). Only routes that configure one of them get here; the browser's own copies of
//! these headers are removed by the proxy ([`crate::proxy::headers::strip_identity`]) whether or
//! not there is a session.
//!
//! Header values: a string claim is sent percent-encoded (RFC 3986 style, UTF-8): every byte
//! outside visible ASCII, and `%` and `,`, become `%XX`, so a value can never break the header
//! (no CR, LF or NUL reaches the wire) and plain values (`alice`, `alice@example.com`) pass
//! unchanged. Numbers and booleans are sent as JSON writes them; an array is its items, each
//! encoded alike, joined with `,` (an item's own `,` is `%2C`, so splitting on `,` is exact);
//! objects, `null` and absent claims send no header. An `email` goes (as a header or in the
//! assertion) only with `email_verified` true in the same claims.

use crate::config::{AssertionConfig, RouteConfig, Target};
use crate::rescue::RequestError;
use crate::session::model::Session;
use crate::state::LiveConfig;
use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

/// The longest header value sent; a longer claim (a huge group list) sends no header.
const MAX_VALUE_LEN: usize = 8 * 1024;

/// The identity headers and the assertion for `session` on `route`, ready to be set.
pub fn headers(
    live: &LiveConfig,
    route: &RouteConfig,
    session: &Session,
    now: u64,
) -> Result<Vec<(HeaderName, HeaderValue)>, RequestError> {
    let mut out = Vec::with_capacity(route.identity_headers.len() + 1);
    for (name, claim) in &route.identity_headers {
        let value = if claim == "sub" {
            Some(encode_value(&Value::String(session.sub.clone())))
        } else if !sendable(claim, session.claims.map()) {
            None
        } else {
            crate::jose::claim_path(session.claims.map(), claim).map(encode_value)
        };
        match value.flatten() {
            Some(text) if text.len() <= MAX_VALUE_LEN => {
                if let Ok(v) = HeaderValue::from_str(&text) {
                    out.push((name.clone(), v));
                }
            }
            Some(_) => {
                tracing::debug!(header = %name, claim, "claim too long for a header; not sent")
            }
            None => {}
        }
    }
    if let Some(assertion) = &route.assertion {
        let jwt = sign(live, route, assertion, session, now)?;
        let text = if assertion.header == http::header::AUTHORIZATION {
            format!("Bearer {jwt}")
        } else {
            jwt
        };
        let mut value = HeaderValue::from_str(&text)
            .map_err(|_| RequestError::Internal("an assertion is not a header value"))?;
        value.set_sensitive(true);
        out.push((assertion.header.clone(), value));
    }
    Ok(out)
}

/// Whether `claim` may be told to an upstream as the user's: an `email` only when the same
/// claims say it was verified, as `require = { email }` asks ([`super::email_verified`]). At many
/// providers a user may enter any address, sent unverified until confirmed; an upstream taking
/// it as who the user is would be fooled. Entra ID says nothing of it: no `email` is sent.
fn sendable(claim: &str, claims: &Map<String, Value>) -> bool {
    claim != "email" || super::email_verified(claims)
}

/// The header form of a claim value, `None` when it has none.
fn encode_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(encode(s)),
        Value::Number(_) | Value::Bool(_) => Some(value.to_string()),
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .filter_map(|item| match item {
                    Value::Array(_) | Value::Object(_) | Value::Null => None,
                    other => encode_value(other),
                })
                .collect();
            Some(parts.join(","))
        }
        Value::Object(_) | Value::Null => None,
    }
}

/// Percent-encodes every byte outside visible ASCII, and `%` and `,`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'%' && byte != b',' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The assertion's audience: the route's `resource`, else the upstream's origin.
fn audience(route: &RouteConfig) -> String {
    match (&route.resource, &route.target) {
        (Some(resource), _) => resource.clone(),
        (None, Target::Upstream(base)) => base.url.origin().ascii_serialization(),
        (None, Target::Static { .. }) => String::new(),
    }
}

fn sign(
    live: &LiveConfig,
    route: &RouteConfig,
    assertion: &AssertionConfig,
    session: &Session,
    now: u64,
) -> Result<String, RequestError> {
    let jti = crate::oidc::random_token(16)?;
    let mut claims = Map::new();
    for name in assertion
        .claims
        .iter()
        .filter(|n| sendable(n, session.claims.map()))
    {
        if let Some(value) = crate::jose::claim_path(session.claims.map(), name) {
            claims.insert(name.clone(), value.clone());
        }
    }
    let own = [
        ("iss", Value::from(live.assertion_issuer.clone())),
        ("aud", Value::from(audience(route))),
        ("sub", Value::from(session.sub.clone())),
        ("iat", Value::from(now)),
        ("nbf", Value::from(now)),
        ("exp", Value::from(now + assertion.lifetime.as_secs())),
        ("jti", Value::from(jti)),
    ];
    for (name, value) in own {
        claims.insert(name.to_string(), value);
    }
    live.signing_keys
        .sign(&Value::Object(claims))
        .map_err(|error| {
            tracing::error!(%error, "cannot sign an assertion");
            RequestError::Internal("cannot sign an assertion")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_values_pass_and_everything_else_is_percent_encoded() {
        assert_eq!(
            encode_value(&json!("alice@example.com")).as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(encode_value(&json!("Zoë")).as_deref(), Some("Zo%C3%AB"));
        assert_eq!(
            encode_value(&json!("a\r\nb\0")).as_deref(),
            Some("a%0D%0Ab%00")
        );
        assert_eq!(encode_value(&json!(" x ")).as_deref(), Some("%20x%20"));
        assert_eq!(
            encode_value(&json!(["a,b", "50%", 7, true, {"x": 1}])).as_deref(),
            Some("a%2Cb,50%25,7,true")
        );
        assert_eq!(encode_value(&json!(42)).as_deref(), Some("42"));
        assert_eq!(encode_value(&json!({"a": 1})), None);
        assert_eq!(encode_value(&Value::Null), None);
        for value in [json!("\u{7f}\u{1}é"), json!(["\n", "\t"])] {
            let text = encode_value(&value).unwrap_or_default();
            assert!(HeaderValue::from_str(&text).is_ok(), "{text}");
            assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{text}");
        }
    }
}
