//! Upstream answers as the workers' own HTTP/1.1 path reads them (`proxy::forward::wire`): it
//! never panics, how the bytes are split as they arrive changes nothing (head, body, trailers,
//! whether the connection is reused, or the refusal), a body framed by a length is exactly that
//! long, an answer with no body says so, and a connection is only ever reused after an answer
//! whose end its framing marked (never after a `204` or `304` that announced a body).
use std::sync::{LazyLock, Mutex};
use vestibule::proxy::forward::wire::read_answer;
use vestibule::proxy::headers::RecentNames;

/// Kept from input to input, as a connection keeps its last answer's names.
static NAMES: LazyLock<Mutex<RecentNames>> = LazyLock::new(Mutex::default);

pub fn fuzz(data: &[u8]) {
    // The first byte picks how the rest arrives, and whether the request was a HEAD.
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let to_head = control & 0x80 != 0;
    let step = usize::from(control & 0x7f).max(1);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let whole = read_answer(bytes, bytes.len(), to_head, &mut names);
    let split = read_answer(bytes, step, to_head, &mut names);
    let by_byte = read_answer(bytes, 1, to_head, &mut names);
    drop(names);
    match (&whole, &split, &by_byte) {
        (Ok(a), Ok(b), Ok(c)) => {
            assert_eq!(a, b, "split by {step}");
            assert_eq!(a, c, "split by 1");
        }
        (Err(_), Err(_), Err(_)) => {}
        _ => panic!("the split changed the outcome: {whole:?} / {split:?} / {by_byte:?}"),
    }
    let Ok(answer) = whole else { return };
    let field = |name: &str| {
        answer
            .fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let no_body = to_head || answer.status == 204 || answer.status == 304;
    if no_body {
        assert!(answer.body.is_empty(), "a body where none can be");
    }
    let chunked = answer.transfer_encoding;
    for hop in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(field(hop).is_empty(), "{hop} kept to be relayed");
    }
    if !no_body && !chunked {
        if let Some(length) = field("content-length").first() {
            let text = String::from_utf8_lossy(length);
            let first = text.split(',').next().unwrap_or("").trim();
            let length: usize = first.parse().expect("a length that was accepted parses");
            assert_eq!(answer.body.len(), length, "the body is as long as it said");
        } else {
            assert!(!answer.reusable, "a body framed by the close, yet reused");
        }
    }
    if !to_head && (answer.status == 204 || answer.status == 304) {
        // No body is read, but one announced may come later, as the next request's answer.
        let announced = chunked
            || field("content-length")
                .iter()
                .any(|length| length.iter().any(|b| (b'1'..=b'9').contains(b)));
        assert!(
            !(announced && answer.reusable),
            "a {} that announced a body, yet reused",
            answer.status
        );
    }
    if chunked {
        assert!(
            field("content-length").is_empty(),
            "a length left beside Transfer-Encoding"
        );
    }
    if answer.reusable {
        assert!((200..1000).contains(&answer.status));
    }
}
