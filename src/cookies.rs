//! Reading and writing Vestibule's cookies: the session cookie and the per-login state cookies.

use crate::config::{SameSite, SessionConfig};
use cookie::Cookie;
use http::{HeaderMap, HeaderValue, header};
use std::time::Duration;

/// Every value of the cookie `name` in the request (a foreign cookie of the same name may sit
/// beside ours; each is tried), with no list made. A pair that is not all visible ASCII is
/// skipped; the others in its field are not (browsers keep UTF-8 and other bytes in cookies
/// that scripts and servers set: one such cookie beside the session cookie must not log its
/// user out).
///
/// Read as bytes: the visible-ASCII check has no early exit (so it runs a word at a time) and
/// the pairs are found with `memchr`; as `str` with `split`, a long session cookie cost ~600
/// instructions per request.
pub fn values<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h str> {
    named_pairs(headers)
        .filter(move |(n, _)| *n == name.as_bytes())
        .filter_map(|(_, v)| std::str::from_utf8(trim_quotes(v)).ok())
}

/// [`values`] as bytes, for a cookie whose value is checked for what it must be anyway (the
/// session cookie: the base64url text of a sealed ticket, of one length, or nothing opens):
/// neither the visible-ASCII pass nor the UTF-8 check [`values`] makes of it (~300
/// instructions for a session cookie, on every request). Pairs and names as [`values`] finds
/// them.
pub fn raw_values<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .flat_map(|v| Pairs(Some(v)))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let at = memchr::memchr(b'=', pair)?;
            (&pair[..at] == name.as_bytes()).then(|| trim_quotes(&pair[at + 1..]))
        })
}

/// Every cookie in the request whose name starts with `prefix`, as (name, value), in order; a
/// name sent twice comes twice.
pub fn with_prefix<'h>(
    headers: &'h HeaderMap,
    prefix: &'h str,
) -> impl Iterator<Item = (&'h str, &'h str)> {
    named_pairs(headers).filter_map(move |(name, value)| {
        let name = std::str::from_utf8(name).ok()?;
        let value = std::str::from_utf8(trim_quotes(value)).ok()?;
        name.starts_with(prefix).then_some((name, value))
    })
}

/// The (name, value) of every cookie pair with a `=` in the request's `Cookie` fields that is
/// visible ASCII (one that is not is skipped, not its field), trimmed, in order. `;` is never
/// part of a longer character, so the pairs are where a browser put them whatever bytes they
/// hold.
fn named_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .flat_map(|v| Pairs(Some(v)))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            if !is_visible_ascii(pair) {
                return None;
            }
            let at = memchr::memchr(b'=', pair)?;
            Some((&pair[..at], &pair[at + 1..]))
        })
}

/// `Set-Cookie` values that delete each of `names` once.
pub fn deletions<'n>(
    config: &SessionConfig,
    names: impl IntoIterator<Item = &'n str>,
) -> Vec<HeaderValue> {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| set_cookie(config, name, "", None, true))
        .collect()
}

/// Visible ASCII or tab, as `HeaderValue::to_str` requires, every byte looked at.
fn is_visible_ascii(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, &b| {
        ok & ((b.wrapping_sub(0x20) < 0x5f) | (b == b'\t'))
    })
}

/// `value` without the `"`s at either end (all of them, like `str::trim_matches`).
fn trim_quotes(mut value: &[u8]) -> &[u8] {
    while let [b'"', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b'"'] = value {
        value = rest;
    }
    value
}

/// The pairs of a `Cookie` value: its `;`-separated parts, trimmed, the empty ones left out.
pub fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    Pairs(Some(value))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// The `;`-separated parts of a `Cookie` value.
struct Pairs<'h>(Option<&'h [u8]>);

impl<'h> Iterator for Pairs<'h> {
    type Item = &'h [u8];

    fn next(&mut self) -> Option<&'h [u8]> {
        let rest = self.0?;
        match memchr::memchr(b';', rest) {
            Some(at) => {
                self.0 = Some(&rest[at + 1..]);
                Some(&rest[..at])
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
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

/// The cookie that keeps the way out of a script's logout for the browser's next navigation.
pub fn logout_name(config: &SessionConfig) -> String {
    format!("{}-logout", host_only_base(config))
}

/// The prefix shared by every login-state cookie.
pub fn login_prefix(config: &SessionConfig) -> String {
    format!("{}-login-", host_only_base(config))
}

/// The stem of Vestibule's short-lived cookies: the session cookie's name, under `__Host-`
/// whenever cookies are `Secure`, whatever the session cookie is called. Without the prefix a
/// page on a sibling subdomain could set one for the parent domain ("cookie tossing"): a login
/// state of a login the attacker began, to sign the victim in as the attacker at the callback.
/// Every one of Vestibule's cookies is `Path=/` with no `Domain`, as `__Host-` demands; the
/// session cookie keeps the operator's name, since renaming it would sign everyone out.
fn host_only_base(config: &SessionConfig) -> std::borrow::Cow<'_, str> {
    let name = config.cookie_name.as_str();
    if !config.cookie_secure || name.starts_with("__Host-") {
        return name.into();
    }
    format!("__Host-{}", name.strip_prefix("__Secure-").unwrap_or(name)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_of_the_name_and_nothing_else() {
        let cases: &[(&[&[u8]], &[&str])] = &[
            (&[b"vestibule=abc"], &["abc"]),
            (&[b"a=1; vestibule=abc; b=2"], &["abc"]),
            (
                &[b"vestibule-login-x=1;vestibule=one", b"x=y; vestibule=two"],
                &["one", "two"],
            ),
            (
                &[b"  vestibule=\"quoted\"  ;vestibule=\"\"x\"\""],
                &["quoted", "x"],
            ),
            (
                &[b"vestibule =spaced; vestibule= lead; \tvestibule=tab\t"],
                &[" lead", "tab"],
            ),
            (
                &[b"vestibulex=no; xvestibule=no; vestibule; =vestibule; vestibule=a=b"],
                &["a=b"],
            ),
            (&[b"vestibule=", b"", b";;;"], &[""]),
            // A pair with a byte outside visible ASCII is skipped, not its neighbours.
            (
                &[b"vestibule=one; other=\xc3\xa9", b"vestibule=two"],
                &["one", "two"],
            ),
            (&[b"\xe9=1;vestibule=one;\xff"], &["one"]),
            (&[b"vestibule=one\xff", b"vestibule=\"two"], &["two"]),
            (&[b"vestibule=\xc3\xa9; vestibule=three"], &["three"]),
            (&[b"vestibule=tw\to"], &["tw\to"]),
            (&[b"vestibule=\"\"", b"vestibule=\""], &["", ""]),
        ];
        for (case, want) in cases {
            let mut headers = HeaderMap::new();
            for value in *case {
                headers.append(header::COOKIE, HeaderValue::from_bytes(value).unwrap());
            }
            let got: Vec<&str> = values(&headers, "vestibule").collect();
            assert_eq!(got, *want, "{case:?}");
            // The raw values are the same pairs, the ones `values` skips for their bytes too.
            let raw: Vec<&[u8]> = raw_values(&headers, "vestibule").collect();
            let visible: Vec<&str> = raw
                .iter()
                .filter(|v| is_visible_ascii(v))
                .map(|v| std::str::from_utf8(v).unwrap())
                .collect();
            assert_eq!(visible, *want, "{case:?}");
            let skipped = case
                .iter()
                .flat_map(|field| field.split(|&b| b == b';'))
                .filter(|pair| pair.trim_ascii().starts_with(b"vestibule="))
                .filter(|pair| !is_visible_ascii(pair.trim_ascii()))
                .count();
            assert_eq!(raw.len(), want.len() + skipped, "{case:?}: {raw:?}");
        }
    }
}
