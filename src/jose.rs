//! JSON Web Key sets and JWT validation: ID tokens, back-channel logout tokens and JWT access
//! tokens.
//!
//! `jsonwebtoken` does the cryptography; this module does the policy that DESIGN.md's security
//! invariant 4 asks for:
//!
//! 1. [`jws`] splits the compact serialization and enforces the algorithm allow-list (asymmetric
//!    algorithms only — `none` and every HMAC are refused before any key is looked up, so a token
//!    "signed" with the client secret or with a public key used as an HMAC secret never verifies).
//! 2. [`Jwks`] finds the key: cached, refetched once on an unknown `kid`, rate-limited so that a
//!    flood of bogus `kid`s cannot hammer the provider.
//! 3. [`claims`] checks `iss`, `aud`, `azp`, the times and the token-specific claims, with the
//!    current time passed in by the caller.
//!
//! It knows nothing of HTTP servers or TOML: key sets arrive through an injected [`JwksFetcher`].
//! It never logs or displays a token or a claim value; [`JoseError`] texts name only conditions.

pub mod claims;
pub mod jwks;
pub mod jws;
pub mod signing;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
mod validate;

pub use claims::{claim_path, claim_strings};
pub use jwks::{Jwks, JwksFetcher};
pub use jws::looks_like_jwt;
pub use validate::{
    LogoutToken, check_at_hash, validate_access_token, validate_id_token, validate_logout_token,
    validate_refreshed_id_token, validate_userinfo_jwt,
};

/// The whole payload of a validated token.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// The member of a logout token's `events` claim (Back-Channel Logout 1.0 §2.4).
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// How old a logout token's `iat` may be when [`Expect::max_iat_age`] is not set, in seconds.
/// The caller's `jti` replay cache must remember identifiers for [`logout_replay_ttl`].
pub const DEFAULT_LOGOUT_MAX_IAT_AGE: u64 = 300;

/// How long a `jti` replay cache must remember a logout token taken now, with `leeway` seconds
/// of clock skew (and [`DEFAULT_LOGOUT_MAX_IAT_AGE`]), so that no replay is taken: its `iat`
/// may be up to `leeway` in the future, and it stays young enough for the maximum age plus
/// `leeway` after that; a minute more covers the store's own timing.
pub fn logout_replay_ttl(leeway: u64) -> std::time::Duration {
    let leeway = leeway.min(u64::MAX / 4);
    std::time::Duration::from_secs(DEFAULT_LOGOUT_MAX_IAT_AGE + 2 * leeway + 60)
}

/// What a token must say, and the clock to judge it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The provider's issuer identifier, as its discovery document states it; `iss` must equal
    /// it byte for byte.
    pub issuer: String,
    /// The client id (ID and logout tokens) or the resource (access tokens) `aud` must contain.
    pub audience: String,
    /// Now, in seconds since the Unix epoch.
    pub now: u64,
    /// Allowed clock skew in seconds, e.g. 60.
    pub leeway: u64,
    /// Reject tokens whose `iat` is older than this many seconds (logout tokens default to
    /// [`DEFAULT_LOGOUT_MAX_IAT_AGE`]).
    pub max_iat_age: Option<u64>,
}

/// Why a token was refused. The texts name the condition only — never the token or a claim value —
/// so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    #[error("the token is not a well-formed signed JWT")]
    Malformed,
    #[error("the token's signing algorithm is not allowed")]
    UnsupportedAlgorithm,
    #[error("no suitable key for the token in the provider's key set")]
    UnknownKey,
    #[error("the provider's key set is unavailable: {0}")]
    KeySetUnavailable(KeySetFault),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token has several audiences but no authorized party (azp)")]
    MissingAzp,
    #[error("the token's authorized party (azp) is another client")]
    WrongAzp,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the token was issued too long ago (iat)")]
    IssuedTooLongAgo,
    #[error("the token's nonce does not match the login's")]
    NonceMismatch,
    #[error("the token lacks the claim {0}")]
    MissingClaim(&'static str),
    #[error("the token carries the claim {0}, which it must not")]
    UnexpectedClaim(&'static str),
    #[error("the claim {0} has the wrong type")]
    BadClaimType(&'static str),
    #[error("the token is not a back-channel logout token")]
    NotALogoutToken,
    #[error("the refreshed ID token names another subject or issuer than the original")]
    SubjectChanged,
    #[error("the ID token's at_hash does not match the access token")]
    AtHashMismatch,
}

/// Why the provider's key set could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetFault {
    /// Nothing was ever fetched, and a fetch was tried too recently to try again.
    #[error("no key set loaded yet")]
    NotLoaded,
    /// A fetch for an unknown key failed moments ago, and is not tried again yet.
    #[error("the last fetch failed; not tried again yet")]
    LastFetchFailed,
    #[error("the fetch timed out")]
    TimedOut,
    /// The fetcher's own error (the provider unreachable, an HTTP status).
    #[error("{0}")]
    Fetch(crate::reply::Cause),
    #[error("the key set is not JSON")]
    NotJson,
    #[error("the key set has no \"keys\" array")]
    NoKeys,
}

impl JoseError {
    /// A stable name for the condition, e.g. `bad_signature`, for logs and error pages.
    pub fn code(&self) -> &'static str {
        match self {
            JoseError::Malformed => "malformed",
            JoseError::UnsupportedAlgorithm => "unsupported_algorithm",
            JoseError::UnknownKey => "unknown_key",
            JoseError::KeySetUnavailable(_) => "key_set_unavailable",
            JoseError::BadSignature => "bad_signature",
            JoseError::WrongIssuer => "wrong_issuer",
            JoseError::WrongAudience => "wrong_audience",
            JoseError::MissingAzp => "missing_azp",
            JoseError::WrongAzp => "wrong_azp",
            JoseError::Expired => "expired",
            JoseError::NotYetValid => "not_yet_valid",
            JoseError::IssuedInFuture => "issued_in_future",
            JoseError::IssuedTooLongAgo => "issued_too_long_ago",
            JoseError::NonceMismatch => "nonce_mismatch",
            JoseError::MissingClaim(_) => "missing_claim",
            JoseError::UnexpectedClaim(_) => "unexpected_claim",
            JoseError::BadClaimType(_) => "bad_claim_type",
            JoseError::NotALogoutToken => "not_a_logout_token",
            JoseError::SubjectChanged => "subject_changed",
            JoseError::AtHashMismatch => "at_hash_mismatch",
        }
    }
}
