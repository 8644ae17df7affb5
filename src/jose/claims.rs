//! Reading claims: public helpers for the rest of the crate (dotted paths, string lists) and the
//! checks shared by every token kind (issuer, audience, times). Time is always a parameter.

use serde_json::{Map, Value};

use super::{Claims, Expect, JoseError};

/// The value at `dotted` (e.g. `realm_access.roles`). A top-level key that itself contains dots
/// (Auth0's `https://example.com/roles`) wins over descending into objects.
pub fn claim_path<'a>(claims: &'a Map<String, Value>, dotted: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(dotted) {
        return Some(value);
    }
    dotted
        .match_indices('.')
        .find_map(|(at, _)| match claims.get(&dotted[..at]) {
            Some(Value::Object(inner)) => claim_path(inner, &dotted[at + 1..]),
            _ => None,
        })
}

/// A claim as a list of strings: a string gives one item, an array gives its string items;
/// anything else gives none. (Space-separated `scope` strings are not split.)
pub fn claim_strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A string claim, `None` when absent; an error when it has another type.
pub(super) fn string_claim<'a>(
    claims: &'a Claims,
    name: &'static str,
) -> Result<Option<&'a str>, JoseError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JoseError::BadClaimType(name)),
    }
}

/// A present, non-empty string claim.
pub(super) fn required_string<'a>(
    claims: &'a Claims,
    name: &'static str,
) -> Result<&'a str, JoseError> {
    string_claim(claims, name)?
        .filter(|s| !s.is_empty())
        .ok_or(JoseError::MissingClaim(name))
}

/// `iss` must equal the expected issuer byte for byte (OpenID Connect Core §3.1.3.7 step 2): a
/// trailing `/` more or less is another issuer identifier.
pub(super) fn check_issuer(claims: &Claims, expected: &str) -> Result<(), JoseError> {
    let iss = required_string(claims, "iss")?;
    if iss == expected {
        Ok(())
    } else {
        Err(JoseError::WrongIssuer)
    }
}

/// `aud` (a string or an array of strings) must contain `expected`; returns all audiences.
pub(super) fn check_audience<'a>(
    claims: &'a Claims,
    expected: &str,
) -> Result<Vec<&'a str>, JoseError> {
    let audiences: Vec<&str> = match claims.get("aud") {
        None => return Err(JoseError::MissingClaim("aud")),
        Some(Value::String(aud)) => vec![aud],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().ok_or(JoseError::BadClaimType("aud")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(JoseError::BadClaimType("aud")),
    };
    if audiences.contains(&expected) {
        Ok(audiences)
    } else {
        Err(JoseError::WrongAudience)
    }
}

/// Whether a time claim must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    Required,
    Optional,
}

/// The time rules of one token kind.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimeRules {
    pub exp: Presence,
    pub iat: Presence,
    pub max_iat_age: Option<u64>,
}

/// Checks `exp`, `nbf` and `iat` against `expect.now`, each with `expect.leeway`; returns `iat`.
pub(super) fn check_times(
    claims: &Claims,
    expect: &Expect,
    rules: TimeRules,
) -> Result<Option<u64>, JoseError> {
    let (now, leeway) = (expect.now, expect.leeway);
    match numeric_date(claims, "exp")? {
        Some(exp) if now >= exp.saturating_add(leeway) => return Err(JoseError::Expired),
        None if rules.exp == Presence::Required => return Err(JoseError::MissingClaim("exp")),
        _ => {}
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(JoseError::NotYetValid);
    }
    let iat = numeric_date(claims, "iat")?;
    match iat {
        Some(iat) if iat > now.saturating_add(leeway) => Err(JoseError::IssuedInFuture),
        Some(iat)
            if rules
                .max_iat_age
                .is_some_and(|age| now > iat.saturating_add(age).saturating_add(leeway)) =>
        {
            Err(JoseError::IssuedTooLongAgo)
        }
        None if rules.iat == Presence::Required => Err(JoseError::MissingClaim("iat")),
        _ => Ok(iat),
    }
}

/// A NumericDate (seconds since the epoch; fractions are allowed and dropped).
fn numeric_date(claims: &Claims, name: &'static str) -> Result<Option<u64>, JoseError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => Ok(Some(secs)),
            // `as` saturates; the range check refuses negatives, NaN and infinities.
            (None, Some(secs)) if (0.0..=u64::MAX as f64).contains(&secs) => Ok(Some(secs as u64)),
            _ => Err(JoseError::BadClaimType(name)),
        },
        Some(_) => Err(JoseError::BadClaimType(name)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(value: Value) -> Claims {
        match value {
            Value::Object(map) => map,
            _ => Claims::new(),
        }
    }

    fn expect(now: u64) -> Expect {
        Expect {
            issuer: "https://idp.example.com/realms/app".to_owned(),
            audience: "spa-bff".to_owned(),
            now,
            leeway: 60,
            max_iat_age: Some(300),
        }
    }

    const LENIENT: TimeRules = TimeRules {
        exp: Presence::Optional,
        iat: Presence::Optional,
        max_iat_age: None,
    };

    #[test]
    fn dotted_paths_descend_into_objects() {
        let c = claims(json!({"realm_access": {"roles": ["admin", "user"]}, "sub": "alice"}));
        assert_eq!(
            claim_path(&c, "realm_access.roles"),
            Some(&json!(["admin", "user"]))
        );
        assert_eq!(claim_path(&c, "sub"), Some(&json!("alice")));
        assert_eq!(claim_path(&c, "realm_access.missing"), None);
        assert_eq!(claim_path(&c, "sub.deeper"), None);
    }

    #[test]
    fn keys_containing_dots_are_found_whole_or_as_a_prefix() {
        let c = claims(json!({
            "https://app.example.com/roles": ["beta"],
            "https://app.example.com/meta": {"tier": "gold"}
        }));
        assert_eq!(
            claim_path(&c, "https://app.example.com/roles"),
            Some(&json!(["beta"]))
        );
        assert_eq!(
            claim_path(&c, "https://app.example.com/meta.tier"),
            Some(&json!("gold"))
        );
    }

    #[test]
    fn strings_and_arrays_become_string_lists() {
        assert_eq!(claim_strings(&json!("admin")), vec!["admin"]);
        assert_eq!(claim_strings(&json!(["a", 1, "b"])), vec!["a", "b"]);
        assert!(claim_strings(&json!({"a": 1})).is_empty());
    }

    /// OpenID Connect Core §3.1.3.7 step 2: `iss` exactly matches the issuer the provider's
    /// discovery document states. A trailing `/` more or less is another issuer identifier.
    #[test]
    fn issuer_is_compared_byte_for_byte() {
        let want = "https://idp.example.com/";
        assert!(check_issuer(&claims(json!({"iss": "https://idp.example.com/"})), want).is_ok());
        for other in [
            "https://idp.example.com",
            "https://idp.example.com//",
            "https://IDP.example.com/",
            "https://idp.example.com/ ",
            "",
        ] {
            let err = check_issuer(&claims(json!({"iss": other})), want);
            assert!(err.is_err(), "{other:?} taken for {want}");
        }
        let err = check_issuer(
            &claims(json!({"iss": "https://idp.example.com/"})),
            "https://idp.example.com",
        );
        assert_eq!(err, Err(JoseError::WrongIssuer));
        assert_eq!(
            check_issuer(&Claims::new(), want),
            Err(JoseError::MissingClaim("iss"))
        );
    }

    #[test]
    fn audience_may_be_a_string_or_an_array_but_nothing_else() {
        let both = claims(json!({"aud": ["api", "spa-bff"]}));
        assert_eq!(
            check_audience(&both, "spa-bff").unwrap(),
            vec!["api", "spa-bff"]
        );
        for bad in [json!({"aud": 7}), json!({"aud": ["api", 7]})] {
            let err = check_audience(&claims(bad), "spa-bff").map(|_| ());
            assert_eq!(err, Err(JoseError::BadClaimType("aud")));
        }
    }

    #[test]
    fn expiry_and_not_before_honour_the_leeway() {
        let e = expect(1_000);
        assert!(check_times(&claims(json!({"exp": 941})), &e, LENIENT).is_ok());
        let err = check_times(&claims(json!({"exp": 940})), &e, LENIENT);
        assert_eq!(err, Err(JoseError::Expired));
        assert!(check_times(&claims(json!({"nbf": 1_060})), &e, LENIENT).is_ok());
        let err = check_times(&claims(json!({"nbf": 1_061})), &e, LENIENT);
        assert_eq!(err, Err(JoseError::NotYetValid));
    }

    #[test]
    fn fractional_dates_are_accepted_and_negative_ones_are_not() {
        let e = expect(1_000);
        assert!(check_times(&claims(json!({"exp": 2_000.5})), &e, LENIENT).is_ok());
        let err = check_times(&claims(json!({"exp": -1})), &e, LENIENT);
        assert_eq!(err, Err(JoseError::BadClaimType("exp")));
        let err = check_times(&claims(json!({"iat": "1000"})), &e, LENIENT);
        assert_eq!(err, Err(JoseError::BadClaimType("iat")));
    }
}
