//! Reading and writing Vestibule's cookies: the session cookie and the per-login state cookies.

use crate::config::{SameSite, SessionConfig};
use cookie::Cookie;
use http::{HeaderMap, HeaderValue, header};
use std::time::Duration;

/// Every value of the cookie `name` in the request (a foreign cookie of the same name may sit
/// beside ours; each is tried).
pub fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
        .collect()
}

/// A `Set-Cookie` value with Vestibule's attributes: HttpOnly, Path=/, Secure and SameSite as
/// configured. `max_age = None` deletes the cookie.
pub fn set_cookie(
    config: &SessionConfig,
    name: &str,
    value: &str,
    max_age: Option<Duration>,
    lax: bool,
) -> Option<HeaderValue> {
    let same_site = if lax || config.same_site == SameSite::Lax {
        cookie::SameSite::Lax
    } else {
        cookie::SameSite::Strict
    };
    let mut builder = Cookie::build((name.to_string(), value.to_string()))
        .http_only(true)
        .secure(config.cookie_secure)
        .path("/")
        .same_site(same_site);
    builder = match max_age {
        Some(age) => builder.max_age(cookie::time::Duration::seconds(
            i64::try_from(age.as_secs()).unwrap_or(i64::MAX),
        )),
        None => builder
            .max_age(cookie::time::Duration::ZERO)
            .expires(cookie::time::OffsetDateTime::UNIX_EPOCH),
    };
    HeaderValue::from_str(&builder.build().to_string()).ok()
}

/// The prefix shared by every login-state cookie.
pub fn login_prefix(config: &SessionConfig) -> String {
    format!("{}-login-", config.cookie_name)
}
