//! The three validators: ID tokens (OpenID Connect Core §3.1.3.7), back-channel logout tokens
//! (Back-Channel Logout 1.0 §2.6) and JWT access tokens (RFC 9068, as far as a BFF needs).
//!
//! Each one verifies the signature first ([`verified`]), then checks claims in a fixed order so
//! that every hostile token meets the same, named error. Replay of a logout token's `jti` and the
//! match of `sid`/`sub` to sessions are the caller's business (the session store).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::claims::{
    Presence, TimeRules, check_audience, check_issuer, check_times, required_string, string_claim,
};
use super::jws::{self, Unverified};
use super::{
    BACKCHANNEL_LOGOUT_EVENT, Claims, DEFAULT_LOGOUT_MAX_IAT_AGE, Expect, JoseError, Jwks,
};

/// The facts of a valid logout token the caller needs to end sessions and to stop replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutToken {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
    pub iat: u64,
}

/// Validates an ID token from the token endpoint of a login: signature, `iss`, `aud`, `azp`,
/// `exp`, `iat`, `sub` and the login's `nonce`. Returns the whole payload.
pub async fn validate_id_token(
    jwks: &Jwks,
    token: &str,
    expect: &Expect,
    nonce: &str,
) -> Result<Claims, JoseError> {
    let claims = verified(jwks, &jws::parse(token)?).await?;
    check_id_token(&claims, expect)?;
    let found = required_string(&claims, "nonce")?;
    if nonce.is_empty() || !bool::from(found.as_bytes().ct_eq(nonce.as_bytes())) {
        return Err(JoseError::NonceMismatch);
    }
    Ok(claims)
}

/// Validates an ID token returned by a refresh (OpenID Connect Core §12.2): the same checks as at
/// login, and `iss`, `sub` and `aud` (as a set) must equal those of the `original` ID token's
/// claims — the one issued at login, or the last refreshed one, which repeats them. Another
/// `iss` or `sub` is [`JoseError::SubjectChanged`], another `aud` [`JoseError::WrongAudience`].
/// `nonce` may be absent; if present, it must equal the original's, when that had one.
pub async fn validate_refreshed_id_token(
    jwks: &Jwks,
    token: &str,
    expect: &Expect,
    original: &Claims,
) -> Result<Claims, JoseError> {
    let claims = verified(jwks, &jws::parse(token)?).await?;
    check_id_token(&claims, expect)?;
    for name in ["iss", "sub"] {
        if claims.get(name) != original.get(name) {
            return Err(JoseError::SubjectChanged);
        }
    }
    let audiences = |c: &Claims| -> Option<std::collections::BTreeSet<String>> {
        match c.get("aud")? {
            Value::String(aud) => Some([aud.clone()].into()),
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect(),
            _ => None,
        }
    };
    if audiences(&claims) != audiences(original) {
        return Err(JoseError::WrongAudience);
    }
    if let (Some(nonce), Some(first)) = (
        string_claim(&claims, "nonce")?,
        string_claim(original, "nonce")?,
    ) && !bool::from(nonce.as_bytes().ct_eq(first.as_bytes()))
    {
        return Err(JoseError::NonceMismatch);
    }
    Ok(claims)
}

/// OpenID Connect Core §3.1.3.8: when the ID token (already validated) carries `at_hash`, it
/// must be the left half of the hash of `access_token`, with the hash of the token's `alg`,
/// base64url-encoded. Without `at_hash` there is nothing to check.
pub fn check_at_hash(id_token: &str, claims: &Claims, access_token: &str) -> Result<(), JoseError> {
    let Some(found) = string_claim(claims, "at_hash")? else {
        return Ok(());
    };
    let digest: Vec<u8> = match jws::parse(id_token)?.alg {
        Algorithm::RS256 | Algorithm::PS256 | Algorithm::ES256 => {
            sha2::Sha256::digest(access_token.as_bytes()).to_vec()
        }
        Algorithm::RS384 | Algorithm::PS384 | Algorithm::ES384 => {
            sha2::Sha384::digest(access_token.as_bytes()).to_vec()
        }
        // EdDSA here is Ed25519, whose hash is SHA-512.
        Algorithm::RS512 | Algorithm::PS512 | Algorithm::EdDSA => {
            sha2::Sha512::digest(access_token.as_bytes()).to_vec()
        }
        _ => return Err(JoseError::UnsupportedAlgorithm),
    };
    let want = URL_SAFE_NO_PAD.encode(&digest[..digest.len() / 2]);
    if bool::from(want.as_bytes().ct_eq(found.as_bytes())) {
        Ok(())
    } else {
        Err(JoseError::AtHashMismatch)
    }
}

/// Validates a back-channel logout token: `typ` (if present) `logout+jwt`, signature, `iss`,
/// `aud`, `iat` (not in the future, not older than `max_iat_age`), `exp` if present, the
/// back-channel logout event, no `nonce`, a `jti`, and a `sid` or a `sub`.
pub async fn validate_logout_token(
    jwks: &Jwks,
    token: &str,
    expect: &Expect,
) -> Result<LogoutToken, JoseError> {
    let unverified = jws::parse(token)?;
    if let Some(typ) = &unverified.typ {
        let typ = typ.to_ascii_lowercase();
        if typ != "logout+jwt" && typ != "application/logout+jwt" {
            return Err(JoseError::NotALogoutToken);
        }
    }
    let claims = verified(jwks, &unverified).await?;
    check_issuer(&claims, &expect.issuer)?;
    check_audience(&claims, &expect.audience)?;
    let rules = TimeRules {
        exp: Presence::Optional,
        iat: Presence::Required,
        max_iat_age: Some(expect.max_iat_age.unwrap_or(DEFAULT_LOGOUT_MAX_IAT_AGE)),
    };
    let iat = check_times(&claims, expect, rules)?.ok_or(JoseError::MissingClaim("iat"))?;
    let is_logout_event = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|events| events.get(BACKCHANNEL_LOGOUT_EVENT))
        .is_some_and(Value::is_object);
    if !is_logout_event {
        return Err(JoseError::NotALogoutToken);
    }
    if claims.contains_key("nonce") {
        return Err(JoseError::UnexpectedClaim("nonce"));
    }
    let jti = required_string(&claims, "jti")?.to_owned();
    let non_empty = |name| -> Result<Option<String>, JoseError> {
        Ok(string_claim(&claims, name)?
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    };
    let (sub, sid) = (non_empty("sub")?, non_empty("sid")?);
    if sub.is_none() && sid.is_none() {
        return Err(JoseError::MissingClaim("sub or sid"));
    }
    Ok(LogoutToken { sub, sid, jti, iat })
}

/// Validates a JWT access token for the API whose identifier is `expect.audience`: signature,
/// `iss`, `aud`, `exp` (required), `nbf` and `iat` when present.
pub async fn validate_access_token(
    jwks: &Jwks,
    token: &str,
    expect: &Expect,
) -> Result<Claims, JoseError> {
    let claims = verified(jwks, &jws::parse(token)?).await?;
    check_issuer(&claims, &expect.issuer)?;
    check_audience(&claims, &expect.audience)?;
    let rules = TimeRules {
        exp: Presence::Required,
        iat: Presence::Optional,
        max_iat_age: expect.max_iat_age,
    };
    check_times(&claims, expect, rules)?;
    Ok(claims)
}

/// Validates a signed UserInfo response (OpenID Connect Core 1.0 errata set 2, §5.3.2): the
/// signature with the provider's keys, `iss` (the issuer) and `aud` (the client id), which a
/// signed answer MUST contain — without them it could be a JWT the provider signed about the
/// user for another purpose or client — and `exp` and `iat` where the provider put them.
pub async fn validate_userinfo_jwt(
    jwks: &Jwks,
    token: &str,
    expect: &Expect,
) -> Result<Claims, JoseError> {
    let claims = verified(jwks, &jws::parse(token)?).await?;
    check_issuer(&claims, &expect.issuer)?;
    check_audience(&claims, &expect.audience)?;
    let rules = TimeRules {
        exp: Presence::Optional,
        iat: Presence::Optional,
        max_iat_age: None,
    };
    check_times(&claims, expect, rules)?;
    Ok(claims)
}

/// Finds the key (the algorithm was already allowed by [`jws::parse`]) and checks the signature.
async fn verified(jwks: &Jwks, token: &Unverified<'_>) -> Result<Claims, JoseError> {
    let key = jwks.key_for(token.kid.as_deref(), token.alg).await?;
    token.verify(&key)
}

/// Everything an ID token needs except the nonce rule, which differs at login and at refresh.
fn check_id_token(claims: &Claims, expect: &Expect) -> Result<(), JoseError> {
    check_issuer(claims, &expect.issuer)?;
    let client_id = expect.audience.as_str();
    let audiences = check_audience(claims, client_id)?;
    match string_claim(claims, "azp")? {
        Some(azp) if azp != client_id => return Err(JoseError::WrongAzp),
        None if audiences.iter().any(|aud| *aud != client_id) => {
            return Err(JoseError::MissingAzp);
        }
        _ => {}
    }
    let rules = TimeRules {
        exp: Presence::Required,
        iat: Presence::Required,
        max_iat_age: expect.max_iat_age,
    };
    check_times(claims, expect, rules)?;
    // OpenID Connect Core §2: at most 255 ASCII characters.
    let sub = required_string(claims, "sub")?;
    if sub.len() > 255 || !sub.is_ascii() {
        return Err(JoseError::BadClaimType("sub"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
