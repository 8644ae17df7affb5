//! `WWW-Authenticate` challenges (RFC 9110 §11.6.1) as an upstream sends them: the one reader
//! for every place that acts on an upstream's 401 (its `invalid_token`, its request for a DPoP
//! nonce, its RFC 9470 step-up), so that each asks about a parsed challenge — this scheme, this
//! `error` — and never searches the field's text, where a description or a realm may say
//! anything.
//!
//! The sender is not trusted (a compromised or buggy upstream answers anything). A field that
//! breaks the grammar or the bounds yields no challenge at all rather than a guess at what was
//! meant, and so does one that names a parameter twice in a challenge (RFC 9110 §11.2: "each
//! parameter name MUST only occur once per challenge"; which one counts is unknown). The work is
//! bounded: at most [`MAX_FIELDS`] fields of at most [`MAX_FIELD_BYTES`] are read, once each.
//! This module only reads, and says which schemes speak about a token sent one way or another
//! ([`schemes_for`]); what a challenge means is for its callers.

use crate::config::TokenBinding;
use http::HeaderValue;

/// `WWW-Authenticate` fields read from one answer; later ones are not looked at.
pub const MAX_FIELDS: usize = 8;
/// A longer field is not read (RFC 6750 and RFC 9470 challenges are a few hundred bytes).
pub const MAX_FIELD_BYTES: usize = 4096;
/// Challenges in one answer, all fields together; a field that would go past it is not read.
pub const MAX_CHALLENGES: usize = 16;
/// Parameters of one challenge; a field with a challenge that has more is not read.
pub const MAX_PARAMS: usize = 16;

/// One challenge: its scheme and its auth-params, quoted values unescaped. A `token68`
/// (`Basic`'s form, RFC 9110 §11.2) is read over and not kept: no caller asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// Whether the scheme is `scheme`, in any case (RFC 9110 §11.1).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// The scheme as sent.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The auth-params in order, names as sent, values unescaped.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The value of the parameter `name` (any case, RFC 9110 §11.2).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The schemes in which an upstream speaks about a token that went with `binding`: `Bearer`,
/// and on a DPoP-bound route `DPoP` too (RFC 9449 §7.1: an API that authenticates the `DPoP`
/// scheme sends RFC 6750's errors, RFC 9470's step-up among them, in a `DPoP` challenge) — or
/// still `Bearer`, as an API that reads the token before the proof answers. A bearer token is
/// not a `DPoP` credential: a `DPoP` challenge to it only says the API also takes that scheme,
/// and is not about the token that was sent.
pub fn schemes_for(binding: TokenBinding) -> &'static [&'static str] {
    match binding {
        TokenBinding::Dpop => &["Bearer", "DPoP"],
        TokenBinding::None => &["Bearer"],
    }
}

/// The first challenge among `fields` of one of `schemes` whose `error` is exactly `error`
/// (RFC 6750 §3: error codes are case-sensitive; a description or a realm does not count).
pub fn find<'a>(
    fields: impl IntoIterator<Item = &'a HeaderValue>,
    schemes: &[&str],
    error: &str,
) -> Option<Challenge> {
    parse(fields)
        .into_iter()
        .find(|c| schemes.iter().any(|s| c.is(s)) && c.param("error") == Some(error))
}

/// The challenges of an answer's `WWW-Authenticate` fields, in order; fields that are not
/// readable (see the module) contribute none.
pub fn parse<'a>(fields: impl IntoIterator<Item = &'a HeaderValue>) -> Vec<Challenge> {
    let mut challenges = Vec::new();
    for field in fields.into_iter().take(MAX_FIELDS) {
        let Ok(text) = field.to_str() else {
            continue;
        };
        if text.len() > MAX_FIELD_BYTES {
            continue;
        }
        match read_field(text, MAX_CHALLENGES - challenges.len()) {
            Ok(read) => challenges.extend(read),
            Err(Unreadable::TooMany) => break,
            Err(Unreadable::Malformed) => continue,
        }
    }
    challenges
}

/// Why a field yields no challenge.
#[derive(Debug, PartialEq, Eq)]
enum Unreadable {
    Malformed,
    /// More than the challenges still allowed.
    TooMany,
}

/// `#challenge` (RFC 9110 §5.6.1: empty list elements are allowed), at most `room` of them.
fn read_field(text: &str, room: usize) -> Result<Vec<Challenge>, Unreadable> {
    let mut cursor = Cursor { text, at: 0 };
    let mut challenges = Vec::new();
    loop {
        cursor.skip_separators();
        if cursor.at_end() {
            return Ok(challenges);
        }
        if challenges.len() == room {
            return Err(Unreadable::TooMany);
        }
        challenges.push(cursor.challenge()?);
    }
}

/// A position in a field's text, which is visible ASCII, space and tab only
/// ([`HeaderValue::to_str`]), so every byte position is a character boundary.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at >= self.text.len()
    }

    /// OWS; whether there was any.
    fn skip_whitespace(&mut self) -> bool {
        let start = self.at;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
        self.at > start
    }

    /// Whitespace and the commas of a list, empty elements included.
    fn skip_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.at += 1;
        }
    }

    /// `1*tchar`.
    fn token(&mut self) -> Result<&str, Unreadable> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        match self.text.get(start..self.at) {
            Some(token) if !token.is_empty() => Ok(token),
            _ => Err(Unreadable::Malformed),
        }
    }

    /// `auth-scheme [ 1*SP ( token68 / #auth-param ) ]`, up to the comma that ends it.
    fn challenge(&mut self) -> Result<Challenge, Unreadable> {
        let scheme = self.token()?.to_string();
        let mut challenge = Challenge {
            scheme,
            params: Vec::new(),
        };
        let spaced = self.skip_whitespace();
        if self.at_end() || self.peek() == Some(b',') {
            return Ok(challenge);
        }
        if !spaced {
            return Err(Unreadable::Malformed);
        }
        if self.token68() {
            return Ok(challenge);
        }
        loop {
            let (name, value) = self.param()?;
            if challenge.param(&name).is_some() || challenge.params.len() == MAX_PARAMS {
                return Err(Unreadable::Malformed);
            }
            challenge.params.push((name, value));
            self.skip_whitespace();
            if self.at_end() {
                return Ok(challenge);
            }
            if self.peek() != Some(b',') {
                return Err(Unreadable::Malformed);
            }
            self.skip_separators();
            if self.at_end() || !self.param_follows() {
                // The next challenge (or the field's end) begins here.
                return Ok(challenge);
            }
        }
    }

    /// Reads a `token68` that fills the rest of the challenge (up to a comma or the end);
    /// false, and nothing read, when that is not what follows.
    fn token68(&mut self) -> bool {
        let bytes = self.text.as_bytes();
        let mut end = self.at;
        while bytes.get(end).is_some_and(|b| is_token68_char(*b)) {
            end += 1;
        }
        if end == self.at {
            return false;
        }
        while bytes.get(end) == Some(&b'=') {
            end += 1;
        }
        while matches!(bytes.get(end), Some(b' ' | b'\t')) {
            end += 1;
        }
        if !matches!(bytes.get(end), None | Some(b',')) {
            return false;
        }
        self.at = end;
        true
    }

    /// Whether an auth-param (`token BWS "="`) starts here rather than another challenge.
    fn param_follows(&self) -> bool {
        let mut probe = Cursor {
            text: self.text,
            at: self.at,
        };
        probe.token().is_ok() && {
            probe.skip_whitespace();
            probe.peek() == Some(b'=')
        }
    }

    /// `auth-param = token BWS "=" BWS ( token / quoted-string )`.
    fn param(&mut self) -> Result<(String, String), Unreadable> {
        let name = self.token()?.to_string();
        self.skip_whitespace();
        if self.peek() != Some(b'=') {
            return Err(Unreadable::Malformed);
        }
        self.at += 1;
        self.skip_whitespace();
        let value = match self.peek() {
            Some(b'"') => self.quoted_string()?,
            _ => self.token()?.to_string(),
        };
        Ok((name, value))
    }

    /// `DQUOTE *( qdtext / quoted-pair ) DQUOTE`, unescaped (RFC 9110 §5.6.4).
    fn quoted_string(&mut self) -> Result<String, Unreadable> {
        self.at += 1;
        let mut value = String::new();
        loop {
            let byte = self.peek().ok_or(Unreadable::Malformed)?;
            self.at += 1;
            match byte {
                b'"' => return Ok(value),
                b'\\' => {
                    let escaped = self.peek().ok_or(Unreadable::Malformed)?;
                    self.at += 1;
                    value.push(char::from(escaped));
                }
                // Visible ASCII, space and tab, as `to_str` let through.
                _ => value.push(char::from(byte)),
            }
        }
    }
}

/// RFC 9110 §5.6.2.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// RFC 9110 §11.2, without the trailing `=`s.
fn is_token68_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~+/".contains(&byte)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read(fields: &[&str]) -> Vec<(String, Vec<(String, String)>)> {
        let fields: Vec<HeaderValue> = fields
            .iter()
            .map(|f| HeaderValue::from_str(f).unwrap())
            .collect();
        parse(&fields)
            .into_iter()
            .map(|c| (c.scheme, c.params))
            .collect()
    }

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
        let params = params
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        (scheme.to_string(), params)
    }

    #[test]
    fn several_challenges_in_one_field_are_told_apart() {
        assert_eq!(
            read(&[
                r#"DPoP error="use_dpop_nonce", Bearer error="insufficient_user_authentication", acr_values="mfa""#
            ]),
            [
                challenge("DPoP", &[("error", "use_dpop_nonce")]),
                challenge(
                    "Bearer",
                    &[
                        ("error", "insufficient_user_authentication"),
                        ("acr_values", "mfa")
                    ]
                ),
            ]
        );
        // RFC 9110 §11.6.1's own example, token68 and schemes without parameters included.
        assert_eq!(
            read(&[
                r#"Basic realm="simple", Newauth realm="apps", type=1, title="Login to \"apps\"", Other abc==, Negotiate"#,
                "Bearer",
            ]),
            [
                challenge("Basic", &[("realm", "simple")]),
                challenge(
                    "Newauth",
                    &[
                        ("realm", "apps"),
                        ("type", "1"),
                        ("title", r#"Login to "apps""#)
                    ]
                ),
                challenge("Other", &[]),
                challenge("Negotiate", &[]),
                challenge("Bearer", &[]),
            ]
        );
        // Empty list elements and optional whitespace around `=`.
        assert_eq!(
            read(&[r#" , bearer  error = invalid_token ,, realm="a,b", , DPoP"#]),
            [
                challenge("bearer", &[("error", "invalid_token"), ("realm", "a,b")]),
                challenge("DPoP", &[]),
            ]
        );
    }

    #[test]
    fn escaped_quotes_stay_inside_their_value() {
        assert_eq!(
            read(&[
                r#"Bearer error_description="a \"b\", error=\"invalid_token\" \\", error="insufficient_scope""#
            ]),
            [challenge(
                "Bearer",
                &[
                    ("error_description", r#"a "b", error="invalid_token" \"#),
                    ("error", "insufficient_scope")
                ]
            )]
        );
    }

    #[test]
    fn names_are_compared_in_any_case_and_values_exactly() {
        let fields = [HeaderValue::from_static(
            r#"bEaReR ERROR="invalid_token", Realm=api"#,
        )];
        let found = find(&fields, &["Bearer"], "invalid_token").unwrap();
        assert_eq!(found.param("realm"), Some("api"));
        assert!(find(&fields, &["DPoP"], "invalid_token").is_none());
        assert!(find(&fields, &["Bearer"], "INVALID_TOKEN").is_none());
        assert!(find(&fields, &["Bearer"], "invalid").is_none());
    }

    #[test]
    fn a_malformed_field_yields_nothing_and_the_next_field_is_still_read() {
        for bad in [
            r#"Bearer error="invalid_token"#,            // unterminated
            r#"Bearer error="invalid_token" realm="x""#, // no comma
            r#"Bearer error=, realm="x""#,               // no value
            r#"Bearer_x=1, error="invalid_token""#,      // no space after the scheme
            r#"Bearer error="invalid_token", error="insufficient_scope""#, // twice
            r#"Bearer ERROR=a, error="invalid_token""#,  // twice, in another case
            r#"Bearer error="invalid_token", ="x""#,
            r#"Bearer error="invalid_token\"#,
            r#"Bearer error=invalid"token""#,
            r#"Bearer error="invalid_token", Newauth realm="x" junk"#,
            "\"Bearer\" error=invalid_token",
        ] {
            assert_eq!(read(&[bad]), [], "{bad}");
            assert_eq!(
                read(&[bad, "DPoP error=use_dpop_nonce"]),
                [challenge("DPoP", &[("error", "use_dpop_nonce")])],
                "{bad}"
            );
        }
    }

    #[test]
    fn hostile_sizes_cost_little_and_yield_nothing() {
        // 10 KB: not read at all, even when it starts with a challenge.
        let big = format!(
            r#"Bearer error="invalid_token", x="{}""#,
            "a".repeat(10_000)
        );
        assert_eq!(read(&[&big]), []);
        let garbage: String = (0..10_000)
            .map(|i| ['=', ',', '"', 'a', ' ', '\\'][i % 6])
            .collect();
        assert_eq!(read(&[&garbage]), []);
        // Within the size, the bounds on challenges and parameters.
        let params: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        let many_params = format!(r#"Bearer error="invalid_token", {}"#, params.join(", "));
        assert_eq!(read(&[&many_params]), []);
        let challenges = ["DPoP error=use_dpop_nonce"; MAX_CHALLENGES + 1].join(", ");
        assert_eq!(read(&[&challenges]), []);
        // The bound holds across fields: the field that would pass it, and those after, are
        // not read.
        let half = ["Basic realm=x"; MAX_CHALLENGES / 2].join(", ");
        let read_back = read(&[&half, &half, "Bearer error=invalid_token"]);
        assert_eq!(read_back.len(), MAX_CHALLENGES);
        assert!(read_back.iter().all(|(scheme, _)| scheme == "Basic"));
        // So is the number of fields.
        let mut fields = vec!["Basic"; MAX_FIELDS];
        fields.push("Bearer error=invalid_token");
        let fields: Vec<HeaderValue> = fields.into_iter().map(HeaderValue::from_static).collect();
        assert!(find(&fields, &["Bearer"], "invalid_token").is_none());
    }
}
