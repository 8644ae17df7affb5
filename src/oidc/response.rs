//! What the provider answers during a login, checked before anything is believed: the
//! authorization response's `iss` (RFC 9207) and the token response of the authorization-code
//! grant (RFC 6749 §5.1, OpenID Connect Core §3.1.3.3). The ID token inside is validated by
//! [`crate::jose`]; this module checks the envelope.
//!
//! Each failure has a stable [`reason`](TokenResponseError::reason) for the login-failed page and
//! the log. No text here contains a token or any value the provider sent.

use super::TokenResponse;
use super::metadata::Metadata;
use serde_json::{Map, Value};

/// Why an authorization response is refused (RFC 9207 §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    #[error("the authorization response names another issuer")]
    Mismatch,
    #[error("the provider advertises the iss parameter but the authorization response lacks it")]
    Missing,
}

impl IssuerError {
    pub fn reason(self) -> &'static str {
        match self {
            IssuerError::Mismatch => "iss_mismatch",
            IssuerError::Missing => "iss_missing",
        }
    }
}

/// RFC 9207: an `iss` in the authorization response must equal the provider's issuer by simple
/// string comparison; when the provider advertises
/// `authorization_response_iss_parameter_supported`, it must be there.
pub fn check_authorization_iss(metadata: &Metadata, iss: Option<&str>) -> Result<(), IssuerError> {
    match iss {
        Some(iss) if iss == metadata.issuer => Ok(()),
        Some(_) => Err(IssuerError::Mismatch),
        None if metadata.authorization_response_iss_parameter_supported == Some(true) => {
            Err(IssuerError::Missing)
        }
        None => Ok(()),
    }
}

/// Why a token response of the code grant is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenResponseError {
    #[error("the token response is not a JSON object")]
    Malformed,
    /// A required member is absent (or `null`, or an empty string).
    #[error("the token response lacks {0}")]
    Missing(&'static str),
    /// A member has the wrong JSON type, or a value the client cannot accept.
    #[error("the token response's {0} has the wrong type or value")]
    Invalid(&'static str),
}

impl TokenResponseError {
    /// A stable name for the failure, e.g. `token_type_invalid`.
    pub fn reason(self) -> &'static str {
        match self {
            TokenResponseError::Malformed => "token_response_malformed",
            TokenResponseError::Missing("access_token") => "access_token_missing",
            TokenResponseError::Missing("token_type") => "token_type_missing",
            TokenResponseError::Missing("id_token") => "id_token_missing",
            TokenResponseError::Missing(_) => "token_response_incomplete",
            TokenResponseError::Invalid("access_token") => "access_token_invalid",
            TokenResponseError::Invalid("token_type") => "token_type_invalid",
            TokenResponseError::Invalid("expires_in") => "expires_in_invalid",
            TokenResponseError::Invalid("refresh_token") => "refresh_token_invalid",
            TokenResponseError::Invalid("scope") => "scope_invalid",
            TokenResponseError::Invalid("id_token") => "id_token_malformed",
            TokenResponseError::Invalid(_) => "token_response_invalid",
        }
    }
}

/// A string member: `Ok(None)` when absent or `null`, an error for any other type.
fn string_member<'a>(
    body: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, TokenResponseError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenResponseError::Invalid(name)),
    }
}

/// A string member that must be present and non-empty.
fn required_member<'a>(
    body: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, TokenResponseError> {
    string_member(body, name)?
        .filter(|s| !s.is_empty())
        .ok_or(TokenResponseError::Missing(name))
}

/// The kind of access token asked for (RFC 6749 §7.1, RFC 9449 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Bearer,
    /// Bound to Vestibule's DPoP key: the token request carried a proof.
    Dpop,
}

impl TokenType {
    pub fn name(self) -> &'static str {
        match self {
            TokenType::Bearer => "Bearer",
            TokenType::Dpop => "DPoP",
        }
    }

    /// Whether a `token_type` value names this kind (case does not matter).
    pub fn matches(self, token_type: &str) -> bool {
        token_type.eq_ignore_ascii_case(self.name())
    }
}

impl TokenResponse {
    /// The token response of the authorization-code grant with scope `openid`, checked against
    /// RFC 6749 §5.1 and OpenID Connect Core §3.1.3.3: a JSON object with a non-empty
    /// `access_token`, a `token_type` of the `expected` kind (any case: `Bearer`, or `DPoP` when
    /// the request carried a DPoP proof — a Bearer token then is refused), an `id_token`, and,
    /// where present, `expires_in` a non-negative integer and `refresh_token` and `scope`
    /// strings. Unknown members are ignored.
    pub fn from_code_grant(
        body: Value,
        expected: TokenType,
    ) -> Result<TokenResponse, TokenResponseError> {
        let Value::Object(body) = body else {
            return Err(TokenResponseError::Malformed);
        };
        let access_token = required_member(&body, "access_token")?.to_owned();
        if !crate::field::sendable_token(&access_token) {
            return Err(TokenResponseError::Invalid("access_token"));
        }
        let token_type = required_member(&body, "token_type")?;
        if !expected.matches(token_type) {
            return Err(TokenResponseError::Invalid("token_type"));
        }
        let token_type = Some(token_type.to_owned());
        let id_token = required_member(&body, "id_token")?.to_owned();
        let expires_in = match body.get("expires_in") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .ok_or(TokenResponseError::Invalid("expires_in"))?,
            ),
            Some(_) => return Err(TokenResponseError::Invalid("expires_in")),
        };
        let refresh_token = string_member(&body, "refresh_token")?.map(str::to_owned);
        if refresh_token
            .as_deref()
            .is_some_and(|t| !crate::field::refresh_token_ok(t))
        {
            return Err(TokenResponseError::Invalid("refresh_token"));
        }
        let scope = string_member(&body, "scope")?.map(str::to_owned);
        Ok(TokenResponse {
            access_token,
            expires_in,
            refresh_token,
            id_token: Some(id_token),
            scope,
            token_type,
            jkt: None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(advertised: Option<bool>) -> Metadata {
        let mut m: Metadata = serde_json::from_value(json!({
            "issuer": "https://idp.example.com",
            "authorization_endpoint": "https://idp.example.com/auth",
            "token_endpoint": "https://idp.example.com/token",
            "jwks_uri": "https://idp.example.com/jwks",
        }))
        .unwrap();
        m.authorization_response_iss_parameter_supported = advertised;
        m
    }

    #[test]
    fn iss_must_match_exactly_and_be_present_when_advertised() {
        let quiet = metadata(None);
        assert_eq!(check_authorization_iss(&quiet, None), Ok(()));
        assert_eq!(
            check_authorization_iss(&quiet, Some("https://idp.example.com")),
            Ok(())
        );
        for other in ["https://idp.example.com/", "https://IDP.example.com", ""] {
            assert_eq!(
                check_authorization_iss(&quiet, Some(other)),
                Err(IssuerError::Mismatch),
                "{other}"
            );
        }
        let loud = metadata(Some(true));
        assert_eq!(
            check_authorization_iss(&loud, None),
            Err(IssuerError::Missing)
        );
        assert_eq!(
            check_authorization_iss(&loud, Some("https://idp.example.com")),
            Ok(())
        );
        assert_eq!(
            check_authorization_iss(&metadata(Some(false)), None),
            Ok(())
        );
    }

    #[test]
    fn a_complete_code_grant_response_is_read() {
        let tokens = TokenResponse::from_code_grant(
            json!({
                "access_token": "at", "token_type": "bearer", "id_token": "a.b.c",
                "expires_in": 60, "refresh_token": "rt", "scope": "openid", "x": [1]
            }),
            TokenType::Bearer,
        )
        .unwrap();
        assert_eq!(tokens.access_token, "at");
        assert_eq!(tokens.expires_in, Some(60));
        assert_eq!(tokens.refresh_token.as_deref(), Some("rt"));
        assert_eq!(tokens.id_token.as_deref(), Some("a.b.c"));
        assert_eq!(tokens.scope.as_deref(), Some("openid"));
    }

    #[test]
    fn every_must_of_the_code_grant_response_is_checked() {
        let valid = json!({"access_token": "at", "token_type": "Bearer", "id_token": "a.b.c"});
        let with = |name: &str, value: Value| {
            let mut v = valid.clone();
            v[name] = value;
            v
        };
        let cases = [
            (json!([]), "token_response_malformed"),
            (Value::Null, "token_response_malformed"),
            (with("access_token", Value::Null), "access_token_missing"),
            (with("access_token", json!("")), "access_token_missing"),
            (with("access_token", json!(1)), "access_token_invalid"),
            (with("token_type", Value::Null), "token_type_missing"),
            (with("token_type", json!("DPoP")), "token_type_invalid"),
            (with("token_type", json!(["Bearer"])), "token_type_invalid"),
            (with("id_token", Value::Null), "id_token_missing"),
            (with("id_token", json!(true)), "id_token_malformed"),
            (with("expires_in", json!("60")), "expires_in_invalid"),
            (with("expires_in", json!(-1)), "expires_in_invalid"),
            (with("expires_in", json!(1.5)), "expires_in_invalid"),
            (with("refresh_token", json!({})), "refresh_token_invalid"),
            (with("refresh_token", json!("")), "refresh_token_invalid"),
            (
                with("refresh_token", json!("rt\r\nx")),
                "refresh_token_invalid",
            ),
            (
                with("refresh_token", json!("rt\u{0}")),
                "refresh_token_invalid",
            ),
            (
                with("refresh_token", json!("rt\u{e9}")),
                "refresh_token_invalid",
            ),
            (
                with("refresh_token", json!("r".repeat(100_000))),
                "refresh_token_invalid",
            ),
            (
                with("access_token", json!("a".repeat(100_000))),
                "access_token_invalid",
            ),
            (with("scope", json!(["openid"])), "scope_invalid"),
        ];
        for (body, reason) in cases {
            let text = body.to_string();
            let err = TokenResponse::from_code_grant(body, TokenType::Bearer)
                .map(|_| ())
                .unwrap_err();
            assert_eq!(err.reason(), reason, "{text}");
        }
    }

    #[test]
    fn a_dpop_client_takes_only_dpop_tokens() {
        let answer = |token_type: &str| json!({"access_token": "at", "token_type": token_type, "id_token": "a.b.c"});
        for good in ["DPoP", "dpop"] {
            let tokens = TokenResponse::from_code_grant(answer(good), TokenType::Dpop).unwrap();
            assert_eq!(tokens.token_type.as_deref(), Some(good));
        }
        for bad in ["Bearer", "bearer", "DPoP2", ""] {
            let err = TokenResponse::from_code_grant(answer(bad), TokenType::Dpop)
                .map(|_| ())
                .unwrap_err();
            assert!(err.reason().starts_with("token_type_"), "{bad}");
        }
    }
}
