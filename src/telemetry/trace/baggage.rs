//! A trusted proxy's W3C `baggage`, checked before it is passed on to an upstream: SDKs there
//! put its entries into their context (and spans, and logs), so what breaks the specification
//! (W3C Baggage, §3.2 and §3.3) or its limits is removed whole, never repaired or cut. Reads
//! the bytes in place: nothing is allocated, nothing decoded (a value's percent-encoding is
//! the reader's).

use super::incoming::trim_ows;
use http::HeaderValue;

/// List members at most, all fields together (§3.3.2: what every platform must propagate).
const MAX_MEMBERS: usize = 64;
/// Bytes at most, the fields combined as one list (joined by commas, optional whitespace
/// included) (§3.3.2).
const MAX_LEN: usize = 8192;

/// Whether `fields` (a request's `baggage` fields, one list combined: §3.2) are valid W3C
/// Baggage: each field a `baggage-string`, list members `key OWS "=" OWS value` followed by
/// `OWS ";" OWS property`, a property `key OWS "=" OWS value` or `key OWS`; at most
/// [`MAX_MEMBERS`] members and [`MAX_LEN`] bytes in all. No field at all is valid; an empty
/// one, or an empty member (`a=1,,b=2`, a trailing comma), is not: the grammar has none.
pub fn valid<'a>(fields: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let (mut len, mut members) = (0, 0);
    for (at, field) in fields.enumerate() {
        len += field.len() + usize::from(at > 0);
        if len > MAX_LEN {
            return false;
        }
        for member in field.as_bytes().split(|&b| b == b',') {
            members += 1;
            if members > MAX_MEMBERS || !valid_member(member) {
                return false;
            }
        }
    }
    true
}

/// `OWS key OWS "=" OWS value *( OWS ";" OWS property ) OWS`, the `OWS` around it being the
/// list's.
fn valid_member(member: &[u8]) -> bool {
    let mut parts = member.split(|&b| b == b';');
    let pair = parts.next().map(trim_ows).and_then(split_pair);
    matches!(pair, Some((key, value)) if is_token(key) && is_value(value))
        && parts
            .map(trim_ows)
            .all(|property| match split_pair(property) {
                Some((key, value)) => is_token(key) && is_value(value),
                None => is_token(property),
            })
}

/// `key OWS "=" OWS value` split at its `=` (a key never holds one; a value may), the spaces
/// around the `=` dropped; `None` without a `=`.
fn split_pair(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = pair.iter().position(|&b| b == b'=')?;
    Some((trim_ows(&pair[..eq]), trim_ows(&pair[eq + 1..])))
}

/// `key = token` (RFC 9110 §5.6.2): one or more `tchar`.
fn is_token(key: &[u8]) -> bool {
    !key.is_empty()
        && key
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `value = *baggage-octet`: printable ASCII but space, `"`, `,`, `;` and `\` (it may be empty,
/// and may hold `=`).
fn is_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (0x21..=0x7e).contains(&b) && !b"\",;\\".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baggage(fields: &[&str]) -> bool {
        let values: Vec<HeaderValue> = fields
            .iter()
            .map(|f| HeaderValue::from_str(f).unwrap_or_else(|_| HeaderValue::from_static("")))
            .collect();
        valid(values.iter())
    }

    fn members(from: usize, to: usize) -> String {
        (from..to)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `k<n>=xxx…`, `len` bytes long.
    fn sized(n: usize, len: usize) -> String {
        format!("k{n}={}", "x".repeat(len - 3))
    }

    #[test]
    fn baggage_in_the_grammar_and_its_bounds_is_valid() {
        for good in [
            &[][..],
            &["userId=alice,serverNode=DF%2028,isProduction=false"],
            &[
                "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue",
            ],
            &["a=1", "b=2"],
            &["k!#$%&'*+-.^_`|~9Z=v"],
            &["a=", "b=x=y", "c=!#/:<[]>?@~"],
            &[" a\t=\t1 ;\tp ; q = 2\t, b=2 "],
            &["a=1;p="],
            &[&members(0, 64)],
            &[&members(0, 32), &members(32, 64)],
            &[&[sized(0, 4096), sized(1, 4095)].join(",")],
            &[&sized(0, 4096), &sized(1, 4095)],
        ] {
            assert!(baggage(good), "{good:?}");
        }
    }

    #[test]
    fn baggage_outside_the_grammar_or_its_bounds_is_invalid() {
        for bad in [
            vec![members(0, 65)],
            vec![members(0, 33), members(33, 65)],
            vec![[sized(0, 4096), sized(1, 4096)].join(",")],
            vec![sized(0, 4096), sized(1, 4096)],
            vec![sized(0, 8193)],
            vec!["".into()],
            vec!["a=1,".into()],
            vec!["a=1,,b=2".into()],
            vec![" , a=1".into()],
            vec!["a".into()],
            vec!["=1".into()],
            vec!["a b=1".into()],
            vec!["a(b)=1".into()],
            vec!["a:b=1".into()],
            vec!["a=x y".into()],
            vec!["a=x\ty".into()],
            vec!["a=\"q\"".into()],
            vec!["a=x\\y".into()],
            vec!["a=1;".into()],
            vec!["a=1; ;p".into()],
            vec!["a=1;p=x y".into()],
            vec!["a=1;b c".into()],
            vec!["a=1;=x".into()],
            vec!["a=1".into(), "b c=2".into()],
        ] {
            let fields: Vec<&str> = bad.iter().map(String::as_str).collect();
            assert!(!baggage(&fields), "{bad:?}");
        }
        // Bytes a header value may hold but baggage may not.
        for bytes in [&b"a=caf\xc3\xa9"[..], b"caf\xc3\xa9=1", b"a=1;\x80"] {
            let obs = HeaderValue::from_bytes(bytes).unwrap();
            assert!(!valid([&obs].into_iter()), "{bytes:?}");
        }
    }
}
