//! An upstream's `WWW-Authenticate` fields (`oidc::challenge::parse`), which the proxy reads to
//! decide on an early refresh, a DPoP nonce or a step-up: whatever the bytes, reading them stays
//! within the bounds, and what is read is what a well-formed field with the same challenges
//! says — written out again (every value quoted) and read, it gives the same challenges, so no
//! two readings of one field can differ in what they let an upstream ask for.
use http::HeaderValue;
use vestibule::oidc::challenge::{self, Challenge, MAX_CHALLENGES, MAX_PARAMS};

fn written(challenges: &[Challenge]) -> String {
    let mut text = String::new();
    for (i, c) in challenges.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str(c.scheme());
        for (j, (name, value)) in c.params().iter().enumerate() {
            text.push_str(if j == 0 { " " } else { ", " });
            text.push_str(name);
            text.push_str("=\"");
            for ch in value.chars() {
                if ch == '"' || ch == '\\' {
                    text.push('\\');
                }
                text.push(ch);
            }
            text.push('"');
        }
    }
    text
}

pub fn fuzz(data: &[u8]) {
    // Up to three fields, split where the input has a NUL.
    let fields: Vec<HeaderValue> = data
        .split(|b| *b == 0)
        .take(3)
        .filter_map(|part| HeaderValue::from_bytes(part).ok())
        .collect();
    let read = challenge::parse(&fields);
    assert!(read.len() <= MAX_CHALLENGES, "{} challenges", read.len());
    for c in &read {
        assert!(!c.scheme().is_empty(), "an empty scheme from {data:?}");
        assert!(
            c.params().len() <= MAX_PARAMS,
            "{} params",
            c.params().len()
        );
    }
    if read.is_empty() {
        return;
    }
    let text = written(&read);
    // Long values may take the rewritten field past the bound a field is read within.
    if text.len() > challenge::MAX_FIELD_BYTES {
        return;
    }
    let again = HeaderValue::from_str(&text).expect("a field written from challenges read");
    assert_eq!(
        challenge::parse([&again]),
        read,
        "{text:?} reads otherwise than the fields it was written from"
    );
}
