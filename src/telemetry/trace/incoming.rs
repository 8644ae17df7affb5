//! A trusted proxy's W3C trace context (`traceparent`, `tracestate`) and `baggage`, checked
//! before anything continues them or passes them on to an upstream: what breaks the
//! specifications (W3C Trace Context, §3.2 and §3.3; W3C Baggage: [`super::baggage`]) is
//! removed, never repaired. Anyone else's are removed whole by the pipeline (`App::answer`),
//! whatever they hold.

use super::SpanContext;
use http::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// `tracestate` list members at most (§3.3.1.1).
const MAX_MEMBERS: usize = 32;
/// Characters of `tracestate` at most, its fields combined (joined by commas, optional
/// whitespace included): what every vendor must propagate (§3.3.1.5). A longer one is removed,
/// not cut.
const MAX_STATE_LEN: usize = 512;
/// Characters of a member's key, and of its value, at most (§3.3.1.3).
const MAX_KEY_LEN: usize = 256;
const MAX_VALUE_LEN: usize = 256;

/// Keeps of a trusted proxy's trace context what W3C Trace Context allows: one `traceparent`
/// field of version 00 ([`SpanContext::parse`]: lowercase hex, ids not all zero), and beside it
/// a `tracestate` ([`valid_state`]). An invalid `tracestate` is removed; a `traceparent` that
/// is invalid, repeated or missing is removed with the `tracestate` (the state belongs to that
/// parent, and is not read without it: §3.3). `baggage` stands on its own, parent or none: it
/// is removed, all its fields, unless they are valid together ([`super::baggage::valid`]).
pub fn vet_trusted(headers: &mut HeaderMap) {
    let mut parents = headers.get_all(TRACEPARENT).iter();
    let parent = match (parents.next(), parents.next()) {
        (Some(one), None) => SpanContext::parse(one.as_bytes()).is_some(),
        _ => false,
    };
    if !parent {
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
    } else if !valid_state(headers.get_all(TRACESTATE).iter()) {
        headers.remove(TRACESTATE);
    }
    if !super::baggage::valid(headers.get_all(BAGGAGE).iter()) {
        headers.remove(BAGGAGE);
    }
}

/// Whether `fields` (a `tracestate`'s, combined as one list: §3.3.1) are a valid list: at most
/// [`MAX_MEMBERS`] members `key=value`, each in the grammar, no key twice, at most
/// [`MAX_STATE_LEN`] characters in all. Empty members (and no field at all) are allowed.
pub fn valid_state<'a>(fields: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let mut len = 0;
    let mut keys: Vec<&[u8]> = Vec::new();
    for (at, field) in fields.enumerate() {
        len += field.len() + usize::from(at > 0);
        if len > MAX_STATE_LEN {
            return false;
        }
        for member in field.as_bytes().split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            let Some(eq) = member.iter().position(|&b| b == b'=') else {
                return false;
            };
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            if keys.len() == MAX_MEMBERS
                || !valid_key(key)
                || !valid_value(value)
                || keys.contains(&key)
            {
                return false;
            }
            keys.push(key);
        }
    }
    true
}

/// `member` without the spaces and tabs around it (`OWS`).
pub(super) fn trim_ows(member: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = member.iter().position(|b| !ows(b)).unwrap_or(member.len());
    let end = member
        .iter()
        .rposition(|b| !ows(b))
        .map_or(start, |at| at + 1);
    &member[start..end]
}

/// `key = ( lcalpha / DIGIT ) 0*255 ( keychar )`, `keychar = lcalpha / DIGIT / "_" / "-" /
/// "*" / "/" / "@"` (Level 2; it admits every key of Level 1's simple and multi-tenant forms).
fn valid_key(key: &[u8]) -> bool {
    let Some((first, rest)) = key.split_first() else {
        return false;
    };
    key.len() <= MAX_KEY_LEN
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && rest
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*/@".contains(b))
}

/// `value = 0*255(chr) nblk-chr`: printable ASCII but `,` and `=`, not ending in a space.
fn valid_value(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_VALUE_LEN
        && value.last() != Some(&b' ')
        && value
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn state(fields: &[&str]) -> bool {
        let values: Vec<HeaderValue> = fields
            .iter()
            .map(|f| HeaderValue::from_str(f).unwrap_or_else(|_| HeaderValue::from_static("")))
            .collect();
        valid_state(values.iter())
    }

    fn members(n: usize) -> String {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn tracestates_in_the_grammar_and_its_bounds_are_valid() {
        for good in [
            &[][..],
            &[""],
            &["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
            &["a=1", "b=2"],
            &[" a=1 , ,\tb=2\t", ","],
            &["tenant@vendor=x,0a/b*c_d-e=v"],
            &["a= leading spaces are the value's"],
            &[&members(32)],
            &[&format!("{}=v", "k".repeat(256))],
            &[&format!("k={}", "~".repeat(256))],
        ] {
            assert!(state(good), "{good:?}");
        }
        let half = (16..32)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(state(&[&members(16), &half]));
        // Exactly 512 characters, combined.
        let member = |k: usize, n: usize| format!("k{k}={}", "x".repeat(n));
        let at_most = [member(0, 250), member(1, 255)].join(",");
        assert_eq!(at_most.len(), 512);
        assert!(state(&[&at_most]));
    }

    #[test]
    fn tracestates_outside_the_grammar_or_its_bounds_are_invalid() {
        let half = (16..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let over = [
            format!("k0={}", "x".repeat(250)),
            format!("k1={}", "x".repeat(256)),
        ];
        let split_over = [
            format!("k0={}", "x".repeat(250)),
            format!("k1={}", "x".repeat(256)),
        ];
        for bad in [
            vec![members(33)],
            vec![members(16), half],
            vec![over.join(",")],
            split_over.to_vec(),
            vec!["Rojo=1".into()],
            vec!["_a=1".into()],
            vec!["@a=1".into()],
            vec!["a b=1".into()],
            vec!["a".into()],
            vec!["a=".into()],
            vec!["=1".into()],
            vec!["a=b=c".into()],
            vec!["a=x\ty".into()],
            vec!["a=1,a=2".into()],
            vec!["a=1".into(), "a=2".into()],
            vec![format!("{}=v", "k".repeat(257))],
            vec![format!("k={}", "v".repeat(257))],
        ] {
            let fields: Vec<&str> = bad.iter().map(String::as_str).collect();
            assert!(!state(&fields), "{bad:?}");
        }
        // Bytes a header value may hold but a tracestate may not.
        let obs = HeaderValue::from_bytes(b"a=caf\xc3\xa9").unwrap();
        assert!(!valid_state([&obs].into_iter()));
    }

    fn vetted(fields: &[(&'static str, &str)]) -> Vec<(String, String)> {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        vet_trusted(&mut headers);
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn a_trace_context_keeps_what_is_valid_and_loses_its_state_with_its_parent() {
        let kept = vetted(&[("traceparent", PARENT), ("tracestate", "a=1")]);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            vetted(&[("traceparent", PARENT), ("tracestate", "A=1")]),
            [("traceparent".to_string(), PARENT.to_string())]
        );
        for parents in [
            &[][..],
            &[PARENT, PARENT],
            &["00-00000000000000000000000000000000-b7ad6b7169203331-01"],
            &["00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"],
            &["01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
            &["garbage"],
        ] {
            let mut fields: Vec<(&'static str, &str)> =
                parents.iter().map(|p| ("traceparent", *p)).collect();
            fields.push(("tracestate", "a=1"));
            fields.push(("baggage", "k=v"));
            assert_eq!(
                vetted(&fields),
                [("baggage".to_string(), "k=v".to_string())],
                "{parents:?}"
            );
        }
    }

    #[test]
    fn baggage_is_kept_when_valid_and_removed_whole_when_not_whatever_the_parent() {
        for parents in [&[][..], &[PARENT], &["garbage"]] {
            let mut fields: Vec<(&'static str, &str)> =
                parents.iter().map(|p| ("traceparent", *p)).collect();
            fields.extend([("baggage", "a=1"), ("baggage", "b=2;p")]);
            let kept = vetted(&fields);
            let baggage: Vec<&str> = kept
                .iter()
                .filter(|(n, _)| n == "baggage")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(baggage, ["a=1", "b=2;p"], "{parents:?}");
            fields.push(("baggage", "c=x y"));
            let kept = vetted(&fields);
            assert!(kept.iter().all(|(n, _)| n != "baggage"), "{kept:?}");
            assert_eq!(
                kept.iter().any(|(n, _)| n == "traceparent"),
                parents == [PARENT],
                "{parents:?}"
            );
        }
    }
}
