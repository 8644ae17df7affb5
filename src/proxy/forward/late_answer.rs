//! Test support: an upstream that answers more than it was asked, after a while. `/alice` gets
//! [`FIRST`] and, once the test says so, [`LATE`] — a second, unasked answer carrying alice's
//! data; anything else gets [`OTHER`]. The tests of the upstream pools (plain and TLS, the
//! workers' own and hyper's) give it a request of alice's, let the late answer arrive while
//! their runtime is blocked, then check that bob's request gets bob's answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// alice's answer.
pub const FIRST: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
/// What follows alice's answer once the test says so: an answer nobody asked for.
pub const LATE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nalice-secret";
/// Everyone else's answer.
pub const OTHER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbob";

/// Takes the first whole request head out of `seen`, if it holds one.
pub fn next_head(seen: &mut Vec<u8>) -> Option<String> {
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    seen.drain(..end);
    Some(head)
}

/// Whether `head` is alice's request (answered [`FIRST`], then [`LATE`] when told).
pub fn is_alices(head: &str) -> bool {
    head.starts_with("GET /alice ")
}

/// bob's request got bob's answer, not what the upstream sent after alice's.
pub fn assert_bobs(body: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(body),
        "bob",
        "bob's request was answered with what the upstream sent after alice's answer"
    );
}
