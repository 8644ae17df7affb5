//! The canonical request path: one spelling per resource, decided before routing, policy and
//! forwarding, so that the path a route was matched on is the path its upstream receives.
//!
//! [`canonicalize`] is a pure function of a string (no HTTP types; a fuzz target calls it) and
//! never panics. It applies RFC 3986 normalisation — unreserved characters percent-decoded,
//! other escapes' hex digits upper-cased, raw non-ASCII percent-encoded, `//` collapsed, `.` and
//! `..` segments removed (§5.2.4) — and refuses the forms that upstream frameworks disagree
//! about ([`BadPath`]). An already-canonical path, the common case, is checked in one pass and
//! returned borrowed.

use std::borrow::Cow;

/// What a route lets through that is refused by default (`allow_encoded_slash`,
/// `allow_path_params`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathOptions {
    /// `%2F` inside a segment is kept (encoded) instead of refused.
    pub allow_encoded_slash: bool,
    /// `;` parameters inside a segment are kept instead of refused.
    pub allow_path_params: bool,
}

impl PathOptions {
    pub const STRICT: PathOptions = PathOptions {
        allow_encoded_slash: false,
        allow_path_params: false,
    };
    pub const LENIENT: PathOptions = PathOptions {
        allow_encoded_slash: true,
        allow_path_params: true,
    };
}

/// The ambiguity found in a path: each is a reason to answer 400 `bad_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("a % not followed by two hex digits")]
    BadPercentEncoding,
    /// `%2F` where the route does not allow it, or next to a `.`/`..` piece where it does.
    #[error("an encoded slash")]
    EncodedSlash,
    #[error("a backslash, raw or encoded")]
    Backslash,
    /// A `.` or `..` segment spelt with `%2E`.
    #[error("an encoded dot segment")]
    EncodedDotSegment,
    /// `;` where the route does not allow it, or a parameter on a `.`/`..` segment where it does.
    #[error("a ; parameter inside a segment")]
    PathParameter,
    #[error("a control character")]
    ControlCharacter,
    #[error("invalid UTF-8 after percent-decoding")]
    InvalidUtf8,
    #[error("a .. above the root")]
    AboveRoot,
    /// A letter that servers matching paths case-insensitively read as ASCII ones (`ı`, `İ`,
    /// `ſ`, the Kelvin sign; `ß`, `ẞ` and the ligatures `ﬀ`–`ﬆ` as two or three) spelling
    /// another route's prefix: ([`super::routing`]).
    #[error("a letter read as another route's by case-insensitive servers")]
    FoldsToAnotherRoute,
}

impl BadPath {
    /// Refusals that a route's switches may lift.
    pub fn is_switchable(self) -> bool {
        matches!(self, BadPath::EncodedSlash | BadPath::PathParameter)
    }
}

/// The canonical form of `raw` (a request path without its query), or the ambiguity that makes
/// it unsafe to route.
pub fn canonicalize(raw: &str, options: PathOptions) -> Result<Cow<'_, str>, BadPath> {
    if scan(raw, options)? {
        rewrite(raw, options).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

/// The path a route is chosen by, for a canonical path that kept `%2F` or `;` parameters: each
/// segment without its parameters and encoded slashes as slashes — the most specific path an
/// upstream could take it for. Borrowed when there is neither.
pub fn routing_view(canonical: &str) -> Result<Cow<'_, str>, BadPath> {
    let slash = |s: &str| s.contains("%2F") || s.contains("%2f");
    if !canonical.contains(';') && !slash(canonical) {
        return Ok(Cow::Borrowed(canonical));
    }
    let mut view = String::with_capacity(canonical.len());
    for (i, segment) in canonical.split('/').enumerate() {
        if i > 0 {
            view.push('/');
        }
        let name = segment.split(';').next().unwrap_or_default();
        view.push_str(&name.replace("%2F", "/").replace("%2f", "/"));
    }
    let view = canonicalize(&view, PathOptions::STRICT)?.into_owned();
    Ok(Cow::Owned(view))
}

/// Checks every rule in one pass; `true` when the canonical form differs from `raw`.
fn scan(raw: &str, options: PathOptions) -> Result<bool, BadPath> {
    let rest = raw.strip_prefix('/').ok_or(BadPath::NotAbsolute)?;
    let mut changed = false;
    let mut depth: usize = 0;
    let mut segments = Segments(Some(rest)).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let checked = check_segment(segment, options)?;
        changed |= checked.changed;
        match checked.kind {
            Kind::Name => depth += 1,
            Kind::Empty => changed |= !last,
            Kind::Dot => changed = true,
            Kind::DotDot => {
                depth = depth.checked_sub(1).ok_or(BadPath::AboveRoot)?;
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// The parts of a path between its slashes, as `str::split('/')` gives them, each slash found a
/// byte at a time: a request path has a few short segments, for which the general searcher's
/// set-up cost more than the search (~90 instructions a segment, on every request).
struct Segments<'a>(Option<&'a str>);

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let text = self.0?;
        match text.bytes().position(|b| b == b'/') {
            Some(at) => {
                // A slash is a character of its own: both sides are whole characters.
                self.0 = text.get(at + 1..);
                text.get(..at)
            }
            None => {
                self.0 = None;
                Some(text)
            }
        }
    }
}

/// Builds the canonical form of a path that [`scan`] accepted.
fn rewrite(raw: &str, options: PathOptions) -> Result<String, BadPath> {
    let rest = raw.strip_prefix('/').ok_or(BadPath::NotAbsolute)?;
    let mut out = String::with_capacity(raw.len() + 1);
    out.push('/');
    // Where each kept segment began (before its separator), so `..` can cut it off.
    let mut starts = Vec::new();
    let mut trailing_slash = false;
    for segment in rest.split('/') {
        match check_segment(segment, options)?.kind {
            Kind::Empty | Kind::Dot => trailing_slash = true,
            Kind::DotDot => {
                out.truncate(starts.pop().ok_or(BadPath::AboveRoot)?);
                trailing_slash = true;
            }
            Kind::Name => {
                starts.push(out.len());
                if !out.ends_with('/') {
                    out.push('/');
                }
                push_normalised(&mut out, segment);
                trailing_slash = false;
            }
        }
    }
    if trailing_slash && !out.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Empty,
    Dot,
    DotDot,
    Name,
}

struct Checked {
    kind: Kind,
    /// The segment's own spelling changes (escapes decoded or upper-cased, raw non-ASCII).
    changed: bool,
}

/// A run of a segment between `%2F` and `;` boundaries, as far as dots are concerned.
#[derive(Default)]
struct Piece {
    dots: u8,
    other: bool,
    encoded_dot: bool,
}

impl Piece {
    fn is_dots(&self) -> bool {
        !self.other && (self.dots == 1 || self.dots == 2)
    }
}

/// Validates one segment (the text between two raw `/`) and classifies it.
fn check_segment(segment: &str, options: PathOptions) -> Result<Checked, BadPath> {
    let bytes = segment.as_bytes();
    let mut changed = false;
    let mut utf8 = Utf8::default();
    let mut piece = Piece::default();
    let mut dot_piece = false;
    let (mut has_slash, mut has_param) = (false, false);
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let (value, lower) = escape(bytes, i)?;
            i += 3;
            changed |= lower;
            if utf8.pending() {
                utf8.push(value)?;
                continue;
            }
            match value {
                0x00..=0x1F | 0x7F => return Err(BadPath::ControlCharacter),
                b'\\' => return Err(BadPath::Backslash),
                b'/' if !options.allow_encoded_slash => return Err(BadPath::EncodedSlash),
                b'/' => {
                    has_slash = true;
                    dot_piece |= std::mem::take(&mut piece).is_dots();
                }
                b'.' => {
                    changed = true;
                    piece.dots = piece.dots.saturating_add(1);
                    piece.encoded_dot = true;
                }
                v if is_unreserved(v) => {
                    changed = true;
                    piece.other = true;
                }
                0x80..=0xFF => {
                    utf8.start(value)?;
                    piece.other = true;
                }
                _ => piece.other = true,
            }
            continue;
        }
        if utf8.pending() {
            return Err(BadPath::InvalidUtf8);
        }
        match b {
            0x00..=0x1F | 0x7F => return Err(BadPath::ControlCharacter),
            b'\\' => return Err(BadPath::Backslash),
            b';' if !options.allow_path_params => return Err(BadPath::PathParameter),
            b';' => {
                has_param = true;
                dot_piece |= std::mem::take(&mut piece).is_dots();
            }
            b'.' => piece.dots = piece.dots.saturating_add(1),
            0x80..=0xFF => {
                // Raw non-ASCII (a &str holds whole characters): percent-encoded in the
                // canonical form.
                let c = segment
                    .get(i..)
                    .and_then(|s| s.chars().next())
                    .ok_or(BadPath::InvalidUtf8)?;
                if c.is_control() {
                    return Err(BadPath::ControlCharacter);
                }
                changed = true;
                piece.other = true;
                i += c.len_utf8();
                continue;
            }
            _ => piece.other = true,
        }
        i += 1;
    }
    if utf8.pending() {
        return Err(BadPath::InvalidUtf8);
    }
    let kind = if has_slash || has_param {
        if dot_piece || piece.is_dots() {
            return Err(if has_param {
                BadPath::PathParameter
            } else {
                BadPath::EncodedSlash
            });
        }
        Kind::Name
    } else if bytes.is_empty() {
        Kind::Empty
    } else if piece.is_dots() {
        if piece.encoded_dot {
            return Err(BadPath::EncodedDotSegment);
        }
        if piece.dots == 1 {
            Kind::Dot
        } else {
            Kind::DotDot
        }
    } else {
        Kind::Name
    };
    Ok(Checked { kind, changed })
}

/// The byte of the escape at `bytes[i]` (a `%`), and whether its hex digits were lower case.
fn escape(bytes: &[u8], i: usize) -> Result<(u8, bool), BadPath> {
    let digit = |at: usize| {
        let b = *bytes.get(at)?;
        let value = (b as char).to_digit(16)?;
        Some((value as u8, b.is_ascii_lowercase()))
    };
    match (digit(i + 1), digit(i + 2)) {
        (Some((hi, lower_hi)), Some((lo, lower_lo))) => Ok((hi << 4 | lo, lower_hi || lower_lo)),
        _ => Err(BadPath::BadPercentEncoding),
    }
}

/// RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A multi-byte UTF-8 sequence being assembled from escapes.
#[derive(Default)]
struct Utf8 {
    bytes: [u8; 4],
    len: usize,
    need: usize,
}

impl Utf8 {
    fn pending(&self) -> bool {
        self.need > 0
    }

    fn start(&mut self, lead: u8) -> Result<(), BadPath> {
        self.need = match lead {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return Err(BadPath::InvalidUtf8),
        };
        self.bytes = [lead, 0, 0, 0];
        self.len = 1;
        Ok(())
    }

    fn push(&mut self, b: u8) -> Result<(), BadPath> {
        let slot = self.bytes.get_mut(self.len).ok_or(BadPath::InvalidUtf8)?;
        *slot = b;
        self.len += 1;
        if self.len < self.need {
            return Ok(());
        }
        let sequence = self.bytes.get(..self.need).ok_or(BadPath::InvalidUtf8)?;
        let text = std::str::from_utf8(sequence).map_err(|_| BadPath::InvalidUtf8)?;
        if text.chars().any(char::is_control) {
            return Err(BadPath::ControlCharacter);
        }
        *self = Utf8::default();
        Ok(())
    }
}

/// Appends a validated segment in canonical spelling.
fn push_normalised(out: &mut String, segment: &str) {
    fn push_escape(out: &mut String, b: u8) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xF)]));
    }
    let bytes = segment.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%'
            && let Ok((value, _)) = escape(bytes, i)
        {
            if is_unreserved(value) {
                out.push(char::from(value));
            } else {
                push_escape(out, value);
            }
            i += 3;
            continue;
        }
        if b.is_ascii() {
            out.push(char::from(b));
        } else {
            push_escape(out, b);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests;
