#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use http_body_util::BodyExt;
use std::sync::{Arc, Mutex};

static REQUEST_ID: crate::field::Made = crate::field::Made::Value(HeaderValue::from_static("id-1"));

fn head_of(text: &str, to_head: bool) -> Result<Option<Head>, WireError> {
    let mut buf = BytesMut::from(text.as_bytes());
    parse_head(&mut buf, to_head, &mut RecentNames::default())
}

fn complete(text: &str) -> Head {
    head_of(text, false).unwrap().expect("a complete head")
}

fn malformed(text: &str) -> &'static str {
    match head_of(text, false) {
        Err(WireError::Malformed(what)) => what,
        Err(other) => panic!("{text:?}: {other}"),
        Ok(Some(_)) => panic!("{text:?} was accepted"),
        Ok(None) => panic!("{text:?} is waiting for more"),
    }
}

#[test]
fn a_head_with_a_length_is_reused_and_keeps_its_fields_in_order() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\nok"[..],
    );
    let head = parse_head(&mut buf, false, &mut RecentNames::default())
        .unwrap()
        .unwrap();
    assert_eq!(head.response.status(), 200);
    assert_eq!(head.framing, Framing::Length(2));
    assert!(head.keep);
    let cookies: Vec<_> = head
        .response
        .headers()
        .get_all("set-cookie")
        .iter()
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(&buf[..], b"ok", "the body's bytes stay in the buffer");
}

#[test]
fn a_head_is_waited_for_until_it_has_all_arrived() {
    let whole = b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n";
    let mut buf = BytesMut::new();
    for (at, byte) in whole.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let parsed = parse_head(&mut buf, false, &mut RecentNames::default()).unwrap();
        assert_eq!(parsed.is_some(), at == whole.len() - 1, "after byte {at}");
    }
}

#[test]
fn interim_answers_are_skipped_and_an_unasked_upgrade_is_refused() {
    let head = complete(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(head.response.status(), 404);
    assert!(head.response.headers().get("link").is_none());
    assert_eq!(
        malformed("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
        "switching protocols unasked"
    );
}

#[test]
fn framing_follows_rfc_9112() {
    // Answers without a body, whatever they say; a HEAD's connection is not reused (a body
    // written late would answer the next request).
    let head = head_of("HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", true)
        .unwrap()
        .unwrap();
    assert_eq!((head.framing, head.keep), (Framing::Length(0), false));
    // A 204 or 304 that announces a body anyway (its handler may write it late, as a HEAD's
    // may): no body, and the connection not reused; one that announces none, or a length of 0,
    // leaves it reusable.
    for status in ["204 No Content", "304 Not Modified"] {
        for (fields, keep) in [
            ("Transfer-Encoding: chunked\r\n", false),
            ("Content-Length: 44\r\n", false),
            ("Content-Length: x\r\n", false),
            ("Content-Length: 0\r\n", true),
            ("ETag: \"v1\"\r\n", true),
        ] {
            let head = complete(&format!("HTTP/1.1 {status}\r\n{fields}\r\n"));
            assert_eq!(
                (&head.framing, head.keep),
                (&Framing::Length(0), keep),
                "{status} {fields}"
            );
        }
    }
    // Chunked, last coding chunked.
    let head = complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
    assert_eq!(
        (head.framing, head.keep),
        (Framing::Chunked(Chunked::Size), true)
    );
    // Both framings: chunked wins, the length goes, the connection is not reused.
    let head =
        complete("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(
        (&head.framing, head.keep),
        (&Framing::Chunked(Chunked::Size), false)
    );
    assert!(!head.response.headers().contains_key("content-length"));
    // Also in an answer without a body.
    let head = head_of(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        true,
    )
    .unwrap()
    .unwrap();
    assert_eq!((&head.framing, head.keep), (&Framing::Length(0), false));
    assert!(!head.response.headers().contains_key("content-length"));
    // A coding other than chunked last: the body ends with the connection.
    let head = complete("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
    assert_eq!((head.framing, head.keep), (Framing::UntilClose, false));
    // Neither: the same.
    let head = complete("HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!((head.framing, head.keep), (Framing::UntilClose, false));
    // Equal repeated lengths are one length.
    let head = complete("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n");
    assert_eq!(head.framing, Framing::Length(7));
}

#[test]
fn hop_by_hop_fields_are_read_for_framing_and_never_kept() {
    // Every field that concerns the upstream connection only, and the ones its Connection
    // names, are left out of the relayed head where they stand, in any case; what they say
    // about the framing and the connection still counts.
    let head = complete(
        "HTTP/1.1 200 OK\r\nX-Before: 1\r\nX-Private-Hop: secret\r\nConnection: Keep-Alive, x-private-hop, X-Other-Hop, close\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nProxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\nx-other-hop: 2\r\nX-After: 2\r\n\r\n",
    );
    assert_eq!(head.framing, Framing::Chunked(Chunked::Size));
    assert!(!head.keep, "Connection: close still counts");
    let kept: Vec<_> = head
        .response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    assert_eq!(kept, [("x-before", "1"), ("x-after", "2")]);
    // Keep-alive without close: the connection is kept, the field is still not relayed.
    let head = complete("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nconnection: keep-alive\r\n\r\n");
    assert!(head.keep);
    assert_eq!(head.response.headers().len(), 1);
    // A Connection token that is no field name names nothing; the others still go.
    let head = complete(
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: a b, x-gone\r\nX-Gone: 1\r\nA: 1\r\n\r\n",
    );
    let kept: Vec<_> = head.response.headers().keys().map(|n| n.as_str()).collect();
    assert_eq!(kept, ["content-length", "a"]);
    // Connection naming the length: framed by it, then not relayed.
    let head =
        complete("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: content-length\r\n\r\nok");
    assert_eq!(head.framing, Framing::Length(2));
    assert!(head.response.headers().is_empty());
}

#[test]
fn an_answer_that_ends_its_connection_is_not_reused() {
    for text in [
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive, Close\r\n\r\n",
        "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
    ] {
        assert!(!complete(text).keep, "{text:?}");
    }
}

#[test]
fn malformed_heads_are_refused() {
    for (text, why) in [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
            "content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n",
            "content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "content-length",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "content-length",
        ),
        ("HTTP/1.1 2000 OK\r\n\r\n", "head"),
        ("HTTP/2.0 200 OK\r\n\r\n", "head"),
        ("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "head"),
        ("HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "head"),
        ("garbage\r\n\r\n", "head"),
    ] {
        assert_eq!(malformed(text), why, "{text:?}");
    }
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_eq!(
        malformed(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
        "too many header fields"
    );
    let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "v".repeat(MAX_HEAD));
    assert_eq!(malformed(&huge), "head too large");
}

/// Feeds `wire` to `framing` in pieces of `step` bytes; the data and trailers it gave.
fn decode_all(
    mut framing: Framing,
    wire: &[u8],
    step: usize,
) -> Result<(Vec<u8>, Option<HeaderMap>, usize), WireError> {
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut trailers = None;
    let mut fed = 0;
    loop {
        match framing.decode(&mut buf)? {
            Some(Piece::Data(bytes)) => data.extend_from_slice(&bytes),
            Some(Piece::Trailers(map)) => trailers = Some(map),
            Some(Piece::End) => return Ok((data, trailers, buf.len())),
            None if fed == wire.len() => {
                framing.at_close()?;
                return Ok((data, trailers, 0));
            }
            None => {
                let next = (fed + step).min(wire.len());
                buf.extend_from_slice(&wire[fed..next]);
                fed = next;
            }
        }
    }
}

#[test]
fn chunked_bodies_decode_however_they_are_split() {
    let wire = b"5\r\nhello\r\n1;name=\"v\" ; x\r\n \r\n10\r\n0123456789abcdef\r\n0\r\nX-Sum: 9\r\nX-B: 2\r\n\r\nNEXT";
    for step in [1, 2, 3, 7, 64] {
        let (data, trailers, left) =
            decode_all(Framing::Chunked(Chunked::Size), wire, step).unwrap();
        assert_eq!(&data[..], b"hello 0123456789abcdef", "step {step}");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.get("x-sum").unwrap(), "9");
        assert_eq!(trailers.len(), 2);
        // What follows the body is left alone (and makes the connection unusable).
        assert!(left <= 4, "step {step}");
    }
    let (data, trailers, _) =
        decode_all(Framing::Chunked(Chunked::Size), b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
    assert_eq!((&data[..], trailers), (&b"abc"[..], None));
}

#[test]
fn malformed_chunks_are_refused() {
    for (wire, why) in [
        (&b"g\r\nx\r\n0\r\n\r\n"[..], "chunk size"),
        (b"\r\n", "chunk size"),
        (b"-1\r\n", "chunk size"),
        (b"1000000000000000\r\n", "chunk size"),
        (b"5 x\r\nhello\r\n", "chunk size"),
        (b"5;a\x01\r\nhello\r\n", "chunk extension"),
        (b"5\nhello\r\n", "bare LF in chunk size"),
        (b"5;a\rb\r\nhello\r\n", "chunk extension"),
        (b"5\r\nhelloXX0\r\n\r\n", "chunk not followed by CRLF"),
        (b"0\r\nBad Name: x\r\n\r\n", "trailers"),
    ] {
        match decode_all(Framing::Chunked(Chunked::Size), wire, 3) {
            Err(WireError::Malformed(what)) => assert_eq!(what, why, "{wire:?}"),
            other => panic!("{wire:?}: {:?}", other.map(|(d, _, _)| d)),
        }
    }
    let long = format!("1;{}\r\nx\r\n", "e".repeat(MAX_CHUNK_LINE));
    match decode_all(Framing::Chunked(Chunked::Size), long.as_bytes(), 512) {
        Err(WireError::Malformed(what)) => assert_eq!(what, "chunk size line too long"),
        other => panic!("{:?}", other.map(|(d, _, _)| d)),
    }
}

#[test]
fn a_body_cut_short_is_an_error_and_one_framed_by_the_close_is_not() {
    assert!(decode_all(Framing::Length(10), b"short", 2).is_err());
    assert!(decode_all(Framing::Chunked(Chunked::Size), b"5\r\nhel", 2).is_err());
    let mut framing = Framing::UntilClose;
    let mut buf = BytesMut::from(&b"all of it"[..]);
    assert_eq!(
        framing.decode(&mut buf).unwrap(),
        Some(Piece::Data(Bytes::from_static(b"all of it")))
    );
    assert!(framing.at_close().is_ok());
    let (data, _, left) = decode_all(Framing::Length(3), b"abcdef", 6).unwrap();
    assert_eq!(
        (&data[..], left),
        (&b"abc"[..], 3),
        "a length takes no more than it says"
    );
}

/// The proxy's fields for a request to `up.test` on a route that sends `Bearer <token>`.
fn replaced_with_token(token: &str) -> Replaced<'_> {
    Replaced {
        host: HeaderValue::from_static("up.test"),
        owns_authorization: true,
        authorization: Some(crate::proxy::headers::Credential {
            scheme: "Bearer ",
            token,
        }),
        forwarded_for: None,
        forwarded_proto: None,
        forwarded_host: None,
        cookie: None,
        request_id: &REQUEST_ID,
    }
}

fn encode<B>(req: &http::Request<B>, replaced: &Replaced<'_>) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_head(req, replaced, &mut out);
    out.to_vec()
}

/// What [`ask`] sends.
const ROOT_HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: up.test\r\nx-request-id: id-1\r\n\r\n";

/// `GET /` to `up.test` on `conn`, without a token.
async fn ask(conn: &mut Conn) -> Result<Head, WireError> {
    let req = http::Request::get("http://up.test/").body(()).unwrap();
    let mut replaced = replaced_with_token("");
    replaced.authorization = None;
    exchange(conn, (&req, &replaced), (false, &Default::default())).await
}

#[test]
fn the_request_head_is_written_in_origin_form() {
    let req = http::Request::get("http://api.test:8080/a/b?x=1&y")
        .header("host", "api.test:8080")
        .header("accept", "a")
        .header("accept", "b")
        .body(())
        .unwrap();
    let mut replaced = replaced_with_token("t");
    replaced.forwarded_for = crate::field::Made::new(b"10.0.0.1");
    assert_eq!(
        String::from_utf8(encode(&req, &replaced)).unwrap(),
        "GET /a/b?x=1&y HTTP/1.1\r\naccept: a\r\naccept: b\r\nhost: up.test\r\nx-forwarded-for: 10.0.0.1\r\nx-request-id: id-1\r\nauthorization: Bearer t\r\n\r\n",
        "the client's Host gives way to the proxy's"
    );
}

/// Tokens are checked where they enter; should one with a line break ever get this far, it
/// is not written: it could end the field and add others (or a request) of its own.
#[test]
fn a_token_with_a_line_break_is_never_written() {
    let req = http::Request::get("http://api.test/a").body(()).unwrap();
    for token in ["t\r\nx-injected: 1", "t\nx-injected: 1", "t\rx"] {
        assert_eq!(
            String::from_utf8(encode(&req, &replaced_with_token(token))).unwrap(),
            "GET /a HTTP/1.1\r\nhost: up.test\r\nx-request-id: id-1\r\n\r\n",
            "{token:?}"
        );
    }
}

#[test]
fn only_bodiless_idempotent_requests_without_an_upgrade_take_this_path() {
    let with = |method: &str, body: crate::reply::Body, header: Option<(&str, &str)>| {
        let mut req = http::Request::builder().method(method).uri("http://a/");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        takes(&req.body(()).unwrap(), &body)
    };
    let none = || crate::reply::empty();
    assert!(with("GET", none(), None));
    assert!(with("HEAD", none(), None));
    assert!(with("DELETE", none(), None));
    assert!(with("OPTIONS", none(), None));
    assert!(!with("POST", none(), None), "may not be sent twice");
    assert!(
        !with("PUT", none(), None),
        "hyper adds its Content-Length: 0"
    );
    assert!(!with("GET", crate::reply::full("x"), None), "a body");
    assert!(!with("GET", none(), Some(("upgrade", "websocket"))));
    assert!(!with("GET", none(), Some(("transfer-encoding", "chunked"))));
}

/// A connected pair: the upstream's end, and ours wrapped as a [`Conn`].
async fn pair() -> (TcpStream, Conn) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (theirs.unwrap().0, Conn::new(ours.unwrap()))
}

type Homes = Arc<Mutex<Vec<Conn>>>;

fn home(homes: &Homes) -> Home {
    let homes = homes.clone();
    Box::new(move |conn| homes.lock().unwrap().push(conn))
}

#[tokio::test]
async fn an_exchange_reads_the_head_and_the_body_streams_then_the_connection_goes_home() {
    let (mut upstream, mut conn) = pair().await;
    let homes = Homes::default();
    let answer = tokio::spawn(async move {
        let mut seen = vec![0u8; 64];
        let n = upstream.read(&mut seen).await.unwrap();
        assert_eq!(&seen[..n], ROOT_HEAD);
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        upstream.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
        upstream
    });
    let head = ask(&mut conn).await.unwrap();
    assert!(head.keep);
    let body = WireBody::new(conn, head.framing, head.keep, home(&homes));
    let bytes = body.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"abcde");
    assert_eq!(homes.lock().unwrap().len(), 1, "the connection went home");
    drop(answer.await.unwrap());
}

#[tokio::test]
async fn a_connection_with_bytes_beyond_the_answer_or_told_to_close_stays_away() {
    for (wire, keep) in [
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"[..], true),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nab",
            false,
        ),
    ] {
        let (mut upstream, mut conn) = pair().await;
        let homes = Homes::default();
        upstream.write_all(wire).await.unwrap();
        let head = ask(&mut conn).await.unwrap();
        assert_eq!(head.keep, keep);
        let body = WireBody::new(conn, head.framing, head.keep, home(&homes));
        // The rest of the body and, when the connection was to be kept, an extra byte.
        upstream
            .write_all(if keep { b"cdeX" } else { b"cde" })
            .await
            .unwrap();
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abcde");
        let went_home = homes.lock().unwrap().len();
        // The extra byte may have arrived with the body's end or after it: either way nothing
        // that was read with it goes back.
        if !keep {
            assert_eq!(went_home, 0);
        } else if let Some(conn) = homes.lock().unwrap().first() {
            assert!(conn.buf.is_empty());
        }
    }
}

#[tokio::test]
async fn a_connection_closed_before_any_answer_is_lost_and_one_closed_mid_answer_is_an_error() {
    let (upstream, mut conn) = pair().await;
    drop(upstream);
    let lost = ask(&mut conn).await;
    assert!(lost.is_err_and(|e| e.lost()));

    let (mut upstream, mut conn) = pair().await;
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-")
        .await
        .unwrap();
    drop(upstream);
    let cut = ask(&mut conn).await;
    assert!(matches!(cut, Err(WireError::Malformed(_))));

    let (mut upstream, mut conn) = pair().await;
    let homes = Homes::default();
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        .await
        .unwrap();
    let head = ask(&mut conn).await.unwrap();
    drop(upstream);
    let body = WireBody::new(conn, head.framing, head.keep, home(&homes));
    assert!(
        body.collect().await.is_err(),
        "a body cut short is an error"
    );
    assert!(homes.lock().unwrap().is_empty());
}

#[test]
fn an_answer_reads_the_same_however_its_bytes_arrive() {
    let cases: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nA: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ncut",
    ];
    // One connection's names across all the reads, as the fuzz target keeps them.
    let mut names = RecentNames::default();
    for bytes in cases {
        let whole = read_answer(bytes, bytes.len(), false, &mut names);
        for step in 1..bytes.len() {
            assert_eq!(
                read_answer(bytes, step, false, &mut names),
                whole,
                "{bytes:?} by {step}"
            );
        }
    }
    let ok = read_answer(cases[0], 3, false, &mut names).unwrap();
    assert_eq!(
        (ok.status, &ok.body[..], ok.reusable),
        (200, &b"hello"[..], true)
    );
    let chunked = read_answer(cases[1], 1, false, &mut names).unwrap();
    assert_eq!((&chunked.body[..], chunked.trailers), (&b"hello"[..], 1));
    assert!(chunked.reusable);
    let until_close = read_answer(cases[2], 4, false, &mut names).unwrap();
    assert_eq!(
        (&until_close.body[..], until_close.reusable),
        (&b"until the end"[..], false)
    );
    assert!(
        !read_answer(cases[3], 4, false, &mut names)
            .unwrap()
            .reusable,
        "bytes beyond the answer"
    );
    assert!(
        read_answer(cases[4], 4, false, &mut names).is_err(),
        "a body cut short"
    );
}

/// The first fields' places are kept in place and any beyond them in a vector: every field of
/// an answer with many comes through, in order, with its own value, the hop-by-hop ones among
/// them (early and late) read and left out.
#[test]
fn an_answer_with_more_fields_than_kept_in_place_keeps_them_all_in_order() {
    for count in [Spans::INLINE - 1, Spans::INLINE, Spans::INLINE + 1, 90] {
        let mut text = String::from("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n");
        for i in 0..count {
            text.push_str(&format!("X-F{i}: v{i}\r\n"));
        }
        text.push_str("Keep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n");
        let head = complete(&text);
        let fields: Vec<_> = head
            .response
            .headers()
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
            .collect();
        let mut want: Vec<_> = (0..count).map(|i| format!("x-f{i}=v{i}")).collect();
        want.push("content-length=0".into());
        assert_eq!(fields, want, "{count} fields");
        assert!(head.keep);
    }
}

/// A connected pair as [`pair`], our end's send buffer made small.
async fn narrow_pair() -> (TcpStream, Conn) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let (ours, theirs) = tokio::join!(socket.connect(addr), listener.accept());
    (theirs.unwrap().0, Conn::new(ours.unwrap()))
}

#[tokio::test]
async fn a_head_larger_than_the_socket_takes_at_once_arrives_whole() {
    let req = http::Request::get("http://up.test/big")
        .header("x-big", "b".repeat(600_000))
        .body(())
        .unwrap();
    let replaced = replaced_with_token("a-token");
    let want = encode(&req, &replaced);
    // Such a head does not go at once: part of it is left to be written by waiting.
    let (_probe_upstream, probe) = narrow_pair().await;
    let head = std::sync::Mutex::default();
    let written = write_now(&probe.tcp, (&req, &replaced), &head).unwrap();
    assert!(
        matches!(written, Written::Rest(ref rest) if !rest.is_empty() && rest.len() < want.len()),
        "the socket took the whole head at once, or none of it"
    );
    // The exchange writes it all, in order, while the upstream reads it late.
    let (mut upstream, mut conn) = narrow_pair().await;
    let upstream = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut seen = Vec::new();
        let mut chunk = vec![0u8; 65536];
        while !seen.ends_with(b"\r\n\r\n") {
            let n = upstream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the head ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
        upstream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        (seen, upstream)
    });
    let exchanged = exchange(&mut conn, (&req, &replaced), (false, &head));
    let head = tokio::time::timeout(std::time::Duration::from_secs(5), exchanged)
        .await
        .expect("no answer: the upstream never read the whole head")
        .unwrap();
    assert_eq!(head.response.status(), http::StatusCode::NO_CONTENT);
    let (seen, _upstream) = upstream.await.unwrap();
    assert!(
        seen == want,
        "the upstream read {} bytes of {}",
        seen.len(),
        want.len()
    );
    assert!(conn.drained());
}
