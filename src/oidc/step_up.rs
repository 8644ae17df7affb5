//! Step-up authentication: a route (or an upstream, RFC 9470) requires a sign-in with one of
//! some `acr` values and/or no older than `max_age`. A session that falls short is sent to a
//! login that asks the provider for exactly that (`acr_values`, `max_age`, `prompt=login`), and
//! the ID token that comes back is checked against what was asked (OpenID Connect Core
//! §3.1.2.1, §2: `auth_time` is required when `max_age` was asked).

use crate::config::{StepUp, TokenBinding, is_acr_value};
use serde_json::{Map, Value};

/// Why a sign-in does not satisfy a [`StepUp`]; [`Shortfall::reason`] is a stable identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error("the sign-in's acr is not one of the required values")]
    Acr,
    #[error("the ID token has no auth_time although max_age was asked")]
    AuthTimeMissing,
    #[error("the sign-in is older than max_age")]
    TooOld,
    /// An `auth_time` after the present (beyond the clock skew): no age can be told from it,
    /// and counted from it the sign-in would stay recent until that time came.
    #[error("the ID token's auth_time is in the future")]
    AuthTimeInFuture,
}

impl Shortfall {
    pub fn reason(self) -> &'static str {
        match self {
            Shortfall::Acr => "acr_not_satisfied",
            Shortfall::AuthTimeMissing => "auth_time_missing",
            Shortfall::TooOld => "auth_time_too_old",
            Shortfall::AuthTimeInFuture => "auth_time_in_future",
        }
    }
}

/// Whether the sign-in described by `claims` (the ID token's, as kept in the session) satisfies
/// `step` at `now`, with `leeway` seconds for the provider's clock. Its age is counted at
/// `since`: `now` for a session, and for the ID token of a step-up login the time that login
/// started (the provider weighed `max_age` then, and the user may take their time to sign in).
/// An `auth_time` after `now` is never recent.
pub fn check(
    step: &StepUp,
    claims: &Map<String, Value>,
    since: u64,
    now: u64,
    leeway: u64,
) -> Result<(), Shortfall> {
    if !step.acr_values.is_empty() {
        let acr = claims.get("acr").and_then(Value::as_str);
        if !acr.is_some_and(|acr| step.acr_values.iter().any(|a| a == acr)) {
            return Err(Shortfall::Acr);
        }
    }
    if let Some(max_age) = step.max_age {
        let Some(auth_time) = claims.get("auth_time").and_then(Value::as_u64) else {
            return Err(Shortfall::AuthTimeMissing);
        };
        if auth_time > now.saturating_add(leeway) {
            return Err(Shortfall::AuthTimeInFuture);
        }
        if since.saturating_sub(auth_time) > max_age.saturating_add(leeway) {
            return Err(Shortfall::TooOld);
        }
    }
    Ok(())
}

/// The parameters added to the authorization request. `prompt=login` with `acr_values`: most
/// providers treat `acr_values` as a wish and would otherwise answer from their existing
/// (weaker) session; with `max_age` alone the provider re-authenticates by itself.
pub fn authorization_params(step: &StepUp, prompt_set: bool) -> Vec<(&'static str, String)> {
    let mut params = Vec::new();
    if !step.acr_values.is_empty() {
        params.push(("acr_values", step.acr_values.join(" ")));
        if !prompt_set {
            params.push(("prompt", "login".to_string()));
        }
    }
    if let Some(max_age) = step.max_age {
        params.push(("max_age", max_age.to_string()));
    }
    params
}

/// The `/login` URL that starts a step-up login and returns to `return_path`.
pub fn login_url(prefix: &str, return_path: &str, step: Option<&StepUp>) -> String {
    let mut url = format!("{prefix}/login?");
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("returnUrl", return_path);
    if let Some(step) = step {
        if !step.acr_values.is_empty() {
            query.append_pair("acr_values", &step.acr_values.join(" "));
        }
        if let Some(max_age) = step.max_age {
            query.append_pair("max_age", &max_age.to_string());
        }
    }
    url.push_str(&query.finish());
    url
}

/// `/login`'s `acr_values` or `max_age` is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed acr_values or max_age")]
pub struct MalformedStepUp;

/// A step-up from `/login`'s `acr_values` (space-separated) and `max_age` (seconds); `Err` for
/// a malformed one, `Ok(None)` when neither is given.
pub fn from_params(
    acr_values: Option<&str>,
    max_age: Option<&str>,
) -> Result<Option<StepUp>, MalformedStepUp> {
    let acr_values: Vec<String> = acr_values
        .unwrap_or_default()
        .split(' ')
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if acr_values.len() > 10 || !acr_values.iter().all(|a| is_acr_value(a)) {
        return Err(MalformedStepUp);
    }
    let max_age = match max_age {
        None => None,
        Some(text) => Some(text.parse::<u64>().map_err(|_| MalformedStepUp)?),
    };
    Ok(
        (!acr_values.is_empty() || max_age.is_some()).then_some(StepUp {
            acr_values,
            max_age,
        }),
    )
}

/// RFC 9470 §3: `WWW-Authenticate: Bearer error="insufficient_user_authentication"` with
/// optional `acr_values` and `max_age`, in any field and after other challenges (RFC 9110
/// §11.6.1); `None` when no such challenge is among `values`. Only that challenge's own
/// parameters count. For a token sent with `binding` DPoP the challenge may also be a `DPoP`
/// one (RFC 9449 §7.1), never for a bearer token ([`super::challenge::schemes_for`]).
pub fn from_challenge<'a>(
    binding: TokenBinding,
    values: impl Iterator<Item = &'a http::HeaderValue>,
) -> Option<StepUp> {
    let schemes = super::challenge::schemes_for(binding);
    let challenge = super::challenge::find(values, schemes, "insufficient_user_authentication")?;
    // A malformed parameter is ignored rather than trusted: the login still asks for a fresh
    // sign-in.
    let step = from_params(challenge.param("acr_values"), None)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut max_age = challenge
        .param("max_age")
        .and_then(|m| m.parse::<u64>().ok());
    if step.acr_values.is_empty() && max_age.is_none() {
        // Neither named: a fresh sign-in (`max_age=0`, OpenID Connect Core §3.1.2.1).
        max_age = Some(0);
    }
    Some(StepUp {
        acr_values: step.acr_values,
        max_age,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn acr_and_age_are_checked_as_asked() {
        let step = StepUp {
            acr_values: vec!["mfa".into(), "hwk".into()],
            max_age: Some(300),
        };
        let now = 10_000;
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "mfa", "auth_time": now - 10})),
                now,
                now,
                0
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "pwd", "auth_time": now})),
                now,
                now,
                0
            ),
            Err(Shortfall::Acr)
        );
        assert_eq!(
            check(&step, &claims(json!({"auth_time": now})), now, now, 0),
            Err(Shortfall::Acr)
        );
        assert_eq!(
            check(&step, &claims(json!({"acr": "hwk"})), now, now, 0),
            Err(Shortfall::AuthTimeMissing)
        );
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "hwk", "auth_time": now - 301})),
                now,
                now,
                0
            ),
            Err(Shortfall::TooOld)
        );
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "hwk", "auth_time": now - 301})),
                now,
                now,
                5
            ),
            Ok(())
        );
        assert_eq!(
            check(&StepUp::default(), &claims(json!({})), now, now, 0),
            Ok(())
        );
    }

    #[test]
    fn a_sign_in_after_the_present_is_never_recent() {
        let step = StepUp {
            acr_values: vec![],
            max_age: Some(300),
        };
        let now = 10_000;
        let at = |t: u64| claims(json!({"auth_time": t}));
        assert_eq!(check(&step, &at(now + 5), now, now, 5), Ok(()));
        assert_eq!(
            check(&step, &at(now + 6), now, now, 5),
            Err(Shortfall::AuthTimeInFuture)
        );
        assert_eq!(
            check(&step, &at(u64::MAX), now, now, 5),
            Err(Shortfall::AuthTimeInFuture)
        );
        // A step-up login: counted from when it started, bounded by when it came back.
        assert_eq!(check(&step, &at(now + 60), now, now + 120, 0), Ok(()));
        assert_eq!(
            check(&step, &at(now + 121), now, now + 120, 0),
            Err(Shortfall::AuthTimeInFuture)
        );
    }

    #[test]
    fn rfc9470_challenges_are_read() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let header = v(
            r#"Bearer error="insufficient_user_authentication", error_description="A different authentication level is required", acr_values="myACR hwk""#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec!["myACR".into(), "hwk".into()],
                max_age: None
            })
        );
        let header = v(
            r#"Bearer error="insufficient_user_authentication", error_description="More recent authentication is required", max_age="5""#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(5)
            })
        );
        let header = v(r#"Bearer error="insufficient_user_authentication""#);
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(0)
            })
        );
        let header = v(r#"Bearer error="invalid_token""#);
        assert_eq!(from_challenge(TokenBinding::None, [header].iter()), None);
        let header = v(r#"Basic realm="x", Bearer error=insufficient_user_authentication"#);
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(0)
            }),
            "a Bearer challenge after another in the same field"
        );
        let header = v(
            r#"DPoP error="use_dpop_nonce", Bearer error="insufficient_user_authentication", acr_values="mfa""#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec!["mfa".into()],
                max_age: None
            }),
            "RFC 9110 §11.6.1: several challenges in one field"
        );
        let basic = v(r#"Basic realm="x""#);
        let bearer = v(r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#);
        assert_eq!(
            from_challenge(TokenBinding::None, [basic, bearer].iter()),
            Some(StepUp {
                acr_values: vec!["mfa".into()],
                max_age: None
            }),
            "a later WWW-Authenticate field is read too"
        );
        let header = v(
            r#"Bearer error="insufficient_user_authentication", acr_values="mfa\" x", max_age=soon"#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(0)
            }),
            "malformed parameters are not passed on: a fresh sign-in is asked instead"
        );
        let header = v(r#"bearer error=insufficient_user_authentication, max_age=60"#);
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(60)
            })
        );
    }

    #[test]
    fn only_a_bearer_challenge_asks_for_a_step_up_and_with_its_own_parameters() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        for field in [
            // Another scheme's challenge, or a Bearer scheme name that is longer.
            r#"Newauth error="insufficient_user_authentication", acr_values="weak""#,
            r#"Bearer_x=1, error="insufficient_user_authentication""#,
            r#"Bearerx error="insufficient_user_authentication""#,
            // The error named only in a description or a realm.
            r#"Bearer error="invalid_token", error_description="insufficient_user_authentication""#,
            r#"Bearer realm="insufficient_user_authentication""#,
            // A parameter given twice is ambiguous: which one the upstream meant is unknown.
            r#"Bearer error="insufficient_user_authentication", error="invalid_token""#,
        ] {
            assert_eq!(
                from_challenge(TokenBinding::None, [v(field)].iter()),
                None,
                "{field}"
            );
        }
        // The parameters of the Bearer challenge, not of the one before or after it.
        let header = v(
            r#"Basic realm="rs", acr_values="weak", Bearer error="insufficient_user_authentication", max_age=60, DPoP acr_values="other", max_age=1"#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(60)
            })
        );
        // Escaped quotes stay inside their quoted-string.
        let header = v(
            r#"Bearer error_description="say \"acr_values=\\\"weak\\\"\", then", error="insufficient_user_authentication", acr_values="mfa""#,
        );
        assert_eq!(
            from_challenge(TokenBinding::None, [header].iter()),
            Some(StepUp {
                acr_values: vec!["mfa".into()],
                max_age: None
            })
        );
    }

    #[test]
    fn a_dpop_challenge_asks_for_a_step_up_only_about_a_dpop_bound_token() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let mfa = Some(StepUp {
            acr_values: vec!["mfa".into()],
            max_age: None,
        });
        let dpop = v(r#"DPoP error="insufficient_user_authentication", acr_values="mfa""#);
        assert_eq!(from_challenge(TokenBinding::Dpop, [&dpop].into_iter()), mfa);
        assert_eq!(
            from_challenge(TokenBinding::None, [&dpop].into_iter()),
            None
        );
        // A bound token may still be challenged as a bearer one (an API that reads the token
        // before the proof).
        let bearer = v(r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#);
        assert_eq!(
            from_challenge(TokenBinding::Dpop, [&bearer].into_iter()),
            mfa
        );
        // Each scheme's own parameters: the DPoP challenge's, not the Bearer realm's.
        let both = v(
            r#"Bearer realm="api", acr_values="weak", DPoP error="insufficient_user_authentication", acr_values="mfa""#,
        );
        assert_eq!(from_challenge(TokenBinding::Dpop, [&both].into_iter()), mfa);
        assert_eq!(
            from_challenge(TokenBinding::None, [&both].into_iter()),
            None
        );
    }

    #[test]
    fn login_urls_carry_the_step_up() {
        let step = StepUp {
            acr_values: vec!["mfa".into()],
            max_age: Some(60),
        };
        assert_eq!(
            login_url("/bff", "/api/x?a=1", Some(&step)),
            "/bff/login?returnUrl=%2Fapi%2Fx%3Fa%3D1&acr_values=mfa&max_age=60"
        );
        assert_eq!(from_params(Some("mfa"), Some("60")), Ok(Some(step)));
        assert_eq!(from_params(None, None), Ok(None));
        assert!(from_params(Some("a\"b"), None).is_err());
        assert!(from_params(None, Some("-1")).is_err());
    }
}
