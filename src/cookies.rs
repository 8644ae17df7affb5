//! Reading and writing Vestibule's cookies: the session cookie and the per-login state cookies.

use crate::config::{SameSite, SessionConfig};
use cookie::Cookie;
use http::{HeaderMap, HeaderValue, header};
use std::time::Duration;

/// Every value of the cookie `name` in the request (a foreign cookie of the same name may sit
/// beside ours; each is tried). Read as bytes, with no list made: a `Cookie` header whose bytes
/// are not all visible ASCII is skipped whole (as `HeaderValue::to_str` would refuse it).
pub fn values<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|v| v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .flat_map(|v| v.split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| unquote(&pair[eq + 1..]))
        })
        .filter_map(|value| std::str::from_utf8(value).ok())
}

/// `value` without the double quotes around it (any number, either end).
fn unquote(mut value: &[u8]) -> &[u8] {
    while let [b'"', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b'"'] = value {
        value = rest;
    }
    value
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `values` did before it read bytes: the reference it must agree with.
    fn by_text<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
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

    #[test]
    fn every_value_of_the_name_and_nothing_else() {
        let cases: &[&[&[u8]]] = &[
            &[b"vestibule=abc"],
            &[b"a=1; vestibule=abc; b=2"],
            &[b"vestibule-login-x=1;vestibule=one", b"x=y; vestibule=two"],
            &[b"  vestibule=\"quoted\"  ;vestibule=\"\"x\"\""],
            &[b"vestibule =spaced; vestibule= lead; \tvestibule=tab\t"],
            &[b"vestibulex=no; xvestibule=no; vestibule; =vestibule; vestibule=a=b"],
            &[b"vestibule=", b"", b";;;"],
            // A header with a byte outside visible ASCII is skipped whole; the next one counts.
            &[b"vestibule=one; other=\xc3\xa9", b"vestibule=two"],
            &[b"vestibule=one\xff", b"vestibule=\"two"],
        ];
        for case in cases {
            let mut headers = HeaderMap::new();
            for value in *case {
                headers.append(header::COOKIE, HeaderValue::from_bytes(value).unwrap());
            }
            let got: Vec<&str> = values(&headers, "vestibule").collect();
            assert_eq!(got, by_text(&headers, "vestibule"), "{case:?}");
        }
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; vestibule=x; b=2"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("vestibule=\"y\""));
        assert_eq!(
            values(&headers, "vestibule").collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert_eq!(values(&headers, "b").collect::<Vec<_>>(), ["2"]);
        assert_eq!(values(&headers, "c").count(), 0);
    }
}
