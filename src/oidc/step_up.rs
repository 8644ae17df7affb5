//! Step-up authentication: a route (or an upstream, RFC 9470) requires a sign-in with one of
//! some `acr` values and/or no older than `max_age`. A session that falls short is sent to a
//! login that asks the provider for exactly that (`acr_values`, `max_age`, `prompt=login`), and
//! the ID token that comes back is checked against what was asked (OpenID Connect Core
//! §3.1.2.1, §2: `auth_time` is required when `max_age` was asked).

use crate::config::{StepUp, is_acr_value};
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
}

impl Shortfall {
    pub fn reason(self) -> &'static str {
        match self {
            Shortfall::Acr => "acr_not_satisfied",
            Shortfall::AuthTimeMissing => "auth_time_missing",
            Shortfall::TooOld => "auth_time_too_old",
        }
    }
}

/// Whether the sign-in described by `claims` (the ID token's, as kept in the session) satisfies
/// `step`, at `now` with `leeway` seconds for the provider's clock. For the ID token of a
/// step-up login, `now` is when that login started: the provider weighed `max_age` then, and
/// the user may take their time to sign in.
pub fn check(
    step: &StepUp,
    claims: &Map<String, Value>,
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
        if now.saturating_sub(auth_time) > max_age.saturating_add(leeway) {
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
/// optional `acr_values` and `max_age`; `None` when no such challenge is among `values`.
pub fn from_challenge<'a>(values: impl Iterator<Item = &'a http::HeaderValue>) -> Option<StepUp> {
    for value in values {
        let Some(params) = value.to_str().ok().and_then(bearer_params) else {
            continue;
        };
        if !params.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("error") && v == "insufficient_user_authentication"
        }) {
            continue;
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        // A malformed parameter is ignored rather than trusted: the login still asks for a
        // fresh sign-in.
        let step = from_params(get("acr_values"), None)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut max_age = get("max_age").and_then(|m| m.parse::<u64>().ok());
        if step.acr_values.is_empty() && max_age.is_none() {
            // Neither named: a fresh sign-in (`max_age=0`, OpenID Connect Core §3.1.2.1).
            max_age = Some(0);
        }
        return Some(StepUp {
            acr_values: step.acr_values,
            max_age,
        });
    }
    None
}

/// The auth-params of a `Bearer` challenge (RFC 7235 §2.1, quoted or token values).
fn bearer_params(text: &str) -> Option<Vec<(String, String)>> {
    let rest = text.trim_start();
    let rest = rest
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case("bearer"))
        .map(|_| &rest[6..])?;
    let mut params = Vec::new();
    let mut chars = rest.trim_start().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            return Some(params);
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Some(params);
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((name, value));
        if params.len() > 20 {
            return Some(params);
        }
    }
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
                0
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "pwd", "auth_time": now})),
                now,
                0
            ),
            Err(Shortfall::Acr)
        );
        assert_eq!(
            check(&step, &claims(json!({"auth_time": now})), now, 0),
            Err(Shortfall::Acr)
        );
        assert_eq!(
            check(&step, &claims(json!({"acr": "hwk"})), now, 0),
            Err(Shortfall::AuthTimeMissing)
        );
        assert_eq!(
            check(
                &step,
                &claims(json!({"acr": "hwk", "auth_time": now - 301})),
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
                5
            ),
            Ok(())
        );
        assert_eq!(
            check(&StepUp::default(), &claims(json!({})), now, 0),
            Ok(())
        );
    }

    #[test]
    fn rfc9470_challenges_are_read() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let header = v(
            r#"Bearer error="insufficient_user_authentication", error_description="A different authentication level is required", acr_values="myACR hwk""#,
        );
        assert_eq!(
            from_challenge([header].iter()),
            Some(StepUp {
                acr_values: vec!["myACR".into(), "hwk".into()],
                max_age: None
            })
        );
        let header = v(
            r#"Bearer error="insufficient_user_authentication", error_description="More recent authentication is required", max_age="5""#,
        );
        assert_eq!(
            from_challenge([header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(5)
            })
        );
        let header = v(r#"Bearer error="insufficient_user_authentication""#);
        assert_eq!(
            from_challenge([header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(0)
            })
        );
        let header = v(r#"Bearer error="invalid_token""#);
        assert_eq!(from_challenge([header].iter()), None);
        let header = v(r#"Basic realm="x", Bearer error=insufficient_user_authentication"#);
        assert_eq!(
            from_challenge([header].iter()),
            None,
            "only a Bearer challenge first"
        );
        let basic = v(r#"Basic realm="x""#);
        let bearer = v(r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#);
        assert_eq!(
            from_challenge([basic, bearer].iter()),
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
            from_challenge([header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(0)
            }),
            "malformed parameters are not passed on: a fresh sign-in is asked instead"
        );
        let header = v(r#"bearer error=insufficient_user_authentication, max_age=60"#);
        assert_eq!(
            from_challenge([header].iter()),
            Some(StepUp {
                acr_values: vec![],
                max_age: Some(60)
            })
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
