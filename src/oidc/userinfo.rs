//! The UserInfo endpoint (OpenID Connect Core §5.3): fetched with the access token after a login
//! and after each refresh of the default access token when `[oidc] userinfo = true`, and merged
//! with the ID token's claims.
//!
//! §5.3.2: the `sub` of the answer must equal the ID token's, or nothing of it may be used (a
//! mix-up or a substituted token). Merge rule: the ID token's user claims, then every claim of
//! the answer over them, except `sub` and the claims that describe a token rather than the user
//! (`iss`, `aud`, `exp`, …). The answer is JSON, or a signed JWT (`application/jwt`) checked with
//! the provider's keys, which must name the issuer and this client (`iss`, `aud`: a MUST of
//! errata set 2); an encrypted one is refused.

use super::Oidc;
use super::dpop::origin;
use crate::jose::Claims;
use serde_json::Value;

/// Claims that describe a token (or the provider's session) rather than the user: never kept as
/// user claims, wherever they come from. `_claim_names` and `_claim_sources` say where
/// aggregated or distributed claims are (OpenID Connect Core §5.6.2) and may carry an access
/// token for that place: kept, it would reach the browser at `/bff/user`.
pub const TOKEN_CLAIMS: [&str; 13] = [
    "iss",
    "aud",
    "exp",
    "iat",
    "nbf",
    "nonce",
    "at_hash",
    "c_hash",
    "azp",
    "jti",
    "sid",
    "_claim_names",
    "_claim_sources",
];

/// Claims about the sign-in itself (how and when the user authenticated): they come from ID
/// tokens only, never from UserInfo, and a refreshed ID token that leaves them out keeps the
/// login's (step-up routes read them).
pub const SIGN_IN_CLAIMS: [&str; 3] = ["acr", "amr", "auth_time"];

/// Why the UserInfo claims could not be used. No text holds a token or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserinfoError {
    #[error("the provider's metadata names no userinfo_endpoint")]
    NoEndpoint,
    /// Unreachable, slow, 5xx or 429: try again later.
    #[error("the userinfo endpoint is unavailable: {0}")]
    Unavailable(String),
    #[error("the userinfo endpoint refused the access token (HTTP {0})")]
    Refused(u16),
    #[error("the userinfo answer is invalid: {0}")]
    Invalid(String),
    #[error("the userinfo answer names another subject than the ID token")]
    SubjectMismatch,
}

impl UserinfoError {
    /// A stable name for the login-failed page and the log (docs/errors.md).
    pub fn reason(&self) -> &'static str {
        match self {
            UserinfoError::NoEndpoint => "userinfo_endpoint_missing",
            UserinfoError::Unavailable(_) => "userinfo_unavailable",
            UserinfoError::Refused(_) => "userinfo_refused",
            UserinfoError::Invalid(_) => "userinfo_invalid",
            UserinfoError::SubjectMismatch => "userinfo_subject_mismatch",
        }
    }
}

impl Oidc {
    /// One call to the UserInfo endpoint. With DPoP the access token is bound to our key, so it
    /// goes as `DPoP <token>` with a proof for this GET (`ath` included); a nonce the endpoint
    /// sends along is kept for the next proof to its origin (a resource server's nonce, RFC 9449
    /// §9: the token endpoint's own is another server's when it is on another origin).
    async fn userinfo_call(
        &self,
        endpoint: &str,
        access_token: &str,
    ) -> Result<super::http::Answer, UserinfoError> {
        let unavailable = |e: &dyn std::fmt::Display| UserinfoError::Unavailable(e.to_string());
        let (scheme, proof) = match &self.dpop {
            Some(dpop) => {
                let key = dpop.key().await.map_err(|e| unavailable(&e))?;
                let nonce = dpop.nonce(&origin(endpoint));
                let proof = key
                    .proof(
                        "GET",
                        endpoint,
                        crate::clock::now(),
                        Some(access_token),
                        nonce.as_deref(),
                    )
                    .map_err(|e| unavailable(&e))?;
                ("DPoP", Some(proof))
            }
            None => ("Bearer", None),
        };
        let answer = self
            .provider
            .http
            .get_with_token(
                endpoint,
                scheme,
                access_token,
                proof.as_deref(),
                self.config.provider_timeout,
            )
            .await
            .map_err(|e| unavailable(&e))?;
        if let (Some(dpop), Some(nonce)) = (&self.dpop, &answer.dpop_nonce)
            && answer.status < 300
        {
            dpop.remember_nonce(&origin(endpoint), nonce.as_bytes());
        }
        Ok(answer)
    }

    /// The UserInfo claims for `access_token`, checked to be about `sub`; `clock`, read when the
    /// answer has come, judges a signed answer's times.
    pub async fn userinfo(
        &self,
        access_token: &str,
        sub: &str,
        clock: &crate::clock::Clock,
    ) -> Result<Claims, UserinfoError> {
        let metadata = self
            .metadata()
            .map_err(|e| UserinfoError::Unavailable(e.to_string()))?;
        let endpoint = metadata
            .userinfo_endpoint
            .as_deref()
            .ok_or(UserinfoError::NoEndpoint)?;
        let mut answer = self.userinfo_call(endpoint, access_token).await?;
        // RFC 9449 §9: a resource server that wants a nonce answers 401 with a `DPoP` challenge
        // saying `use_dpop_nonce`, and the nonce; the request is sent once more with it. A 401
        // that refuses the token is not, whatever nonce it carries.
        if let Some(dpop) = &self.dpop
            && answer.nonce_asked
            && answer
                .dpop_nonce
                .as_ref()
                .is_some_and(|n| dpop.remember_nonce(&origin(endpoint), n.as_bytes()))
        {
            answer = self.userinfo_call(endpoint, access_token).await?;
        }
        let (status, media_type, body) = (answer.status, answer.content_type, answer.body);
        if status >= 500 || status == 429 {
            return Err(UserinfoError::Unavailable(format!("HTTP {status}")));
        }
        if !(200..300).contains(&status) {
            return Err(UserinfoError::Refused(status));
        }
        let claims = if media_type.as_deref() == Some("application/jwt") {
            let token = std::str::from_utf8(&body)
                .map_err(|_| UserinfoError::Invalid("the JWT is not text".into()))?
                .trim();
            let expect = self
                .id_token_expectations(&self.config.client_id, clock.now())
                .map_err(|e| UserinfoError::Invalid(e.to_string()))?;
            crate::jose::validate_userinfo_jwt(&self.provider.jwks, token, &expect)
                .await
                .map_err(|e| UserinfoError::Invalid(e.to_string()))?
        } else {
            match serde_json::from_slice(&body) {
                Ok(Value::Object(claims)) => claims,
                _ => return Err(UserinfoError::Invalid("not a JSON object".into())),
            }
        };
        match claims.get("sub") {
            Some(Value::String(s)) if s == sub => Ok(claims),
            Some(Value::String(_)) => Err(UserinfoError::SubjectMismatch),
            _ => Err(UserinfoError::Invalid("no sub".into())),
        }
    }
}

/// The ID token's user claims: without the claims that describe the token.
pub fn user_claims(id_token_claims: &Claims) -> Claims {
    id_token_claims
        .iter()
        .filter(|(k, _)| !TOKEN_CLAIMS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `base` (the ID token's user claims) with the UserInfo claims over it, `sub`, the token claims
/// and the sign-in claims excepted.
pub fn merge(mut base: Claims, userinfo: Claims) -> Claims {
    for (name, value) in userinfo {
        if name != "sub"
            && !TOKEN_CLAIMS.contains(&name.as_str())
            && !SIGN_IN_CLAIMS.contains(&name.as_str())
        {
            base.insert(name, value);
        }
    }
    base
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Claims {
        match v {
            Value::Object(m) => m,
            _ => Claims::new(),
        }
    }

    #[test]
    fn userinfo_claims_win_but_never_sub_or_token_claims() {
        let id = user_claims(&claims(json!({
            "sub": "alice", "iss": "https://idp", "aud": "spa", "exp": 9, "name": "A",
            "groups": ["old"], "sid": "s-1",
        })));
        assert_eq!(
            id,
            claims(json!({"sub": "alice", "name": "A", "groups": ["old"]}))
        );
        let merged = merge(
            id,
            claims(json!({
                "sub": "someone-else", "iss": "https://evil", "exp": 1, "groups": ["new"],
                "email": "a@example.test",
            })),
        );
        assert_eq!(
            merged,
            claims(
                json!({"sub": "alice", "name": "A", "groups": ["new"], "email": "a@example.test"})
            )
        );
    }

    #[test]
    fn userinfo_never_claims_how_or_when_the_user_signed_in() {
        let id = claims(json!({"sub": "alice", "acr": "pwd", "auth_time": 100}));
        let merged = merge(
            id.clone(),
            claims(json!({"acr": "mfa", "amr": ["hwk"], "auth_time": 999})),
        );
        assert_eq!(merged, id);
    }
}
