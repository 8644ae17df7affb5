use super::*;
use http_body_util::{BodyExt, StreamBody};

/// The 431 limit the tests parse with (`server.max_header_size`'s default).
const MAX_FIELDS: usize = 64 * 1024;

fn parsed(head: &str) -> Parsed {
    let mut fields = Vec::new();
    parse(
        head.as_bytes(),
        &mut fields,
        &mut RecentNames::default(),
        MAX_FIELDS,
    )
}

fn taken(head: &str) -> Request<Inbound> {
    let bytes = Bytes::copy_from_slice(head.as_bytes());
    let mut fields = Vec::new();
    let Parsed::Complete {
        len,
        method,
        target,
        ..
    } = parse(&bytes, &mut fields, &mut RecentNames::default(), MAX_FIELDS)
    else {
        panic!("not taken: {head:?}");
    };
    assert_eq!(len, head.len());
    *request(&bytes, method, target, &mut fields).expect("a request")
}

#[test]
fn a_plain_bodiless_head_is_taken_with_its_fields_in_order() {
    let req = taken(
        "GET /api/items?x=1 HTTP/1.1\r\nHost: app\r\nX-Two: a\r\nx-two: b\r\nCookie: s=1\r\n\r\n",
    );
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/items");
    assert_eq!(req.uri().query(), Some("x=1"));
    assert_eq!(req.version(), http::Version::HTTP_11);
    let twos: Vec<_> = req.headers().get_all("x-two").iter().collect();
    assert_eq!(twos, ["a", "b"]);
    assert_eq!(req.headers()["host"], "app");
    assert_eq!(req.headers().len(), 4);
    assert!(req.body().is_end_stream());
}

#[test]
fn a_post_with_an_empty_body_said_once_is_taken() {
    let req = taken("POST /bff/logout HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(req.method(), Method::POST);
    assert_eq!(req.headers()["content-length"], "0");
}

#[test]
fn obs_text_in_a_value_is_kept_byte_for_byte() {
    let head = b"GET / HTTP/1.1\r\nX-Name: caf\xc3\xa9\r\n\r\n";
    let bytes = Bytes::copy_from_slice(head);
    let mut fields = Vec::new();
    let Parsed::Complete { method, target, .. } =
        parse(&bytes, &mut fields, &mut RecentNames::default(), MAX_FIELDS)
    else {
        panic!("not taken");
    };
    let req = request(&bytes, method, target, &mut fields).unwrap();
    assert_eq!(req.headers()["x-name"].as_bytes(), b"caf\xc3\xa9");
}

#[test]
fn every_head_the_lane_must_not_judge_goes_to_hyper() {
    let unusual = [
        // a body, however framed
        "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        "GET /a HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "GET /a HTTP/1.1\r\nContent-Length: +0\r\n\r\n",
        "GET /a HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
        // switching protocols, or asking to
        "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "GET /ws HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
        "GET /ws HTTP/1.1\r\nConnection: keep-alive, UPGRADE\r\n\r\n",
        "CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        // interim answers and trailers
        "GET /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        "GET /a HTTP/1.1\r\nTE: trailers\r\n\r\n",
        // targets that are not a path
        "OPTIONS * HTTP/1.1\r\n\r\n",
        "GET http://app/a HTTP/1.1\r\n\r\n",
        // another version
        "GET /a HTTP/1.0\r\n\r\n",
        // line ends hyper would take and the framing guard refuses
        "GET /a HTTP/1.1\nHost: app\n\n",
        "GET /a HTTP/1.1\r\nHost: app\n\r\n",
        "GET /a HTTP/1.1\r\nHost: app\r\n\n",
        // a lone CR balancing a bare LF: the count of each would match, httparse must refuse
        "GET /a HTTP/1.1\r\nX: a\rb\nY: c\r\n\r\n",
        "GET /a\r HTTP/1.1\nX: b\r\n\r\n",
        "GET /a HTTP/1.1\r\nX\r: b\nY: c\r\n\r\n",
        // malformed: hyper's 400
        "GET /a HTTP/1.1\r\nBad Name: x\r\n\r\n",
        "GET /a HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        "GET /a HTTP/1.1\r\n folded: x\r\n\r\n",
        "GET /a HTTP/1.1\r\nX : a\r\n\r\n",
        "GET  /a HTTP/1.1\r\n\r\n",
        "G(T /a HTTP/1.1\r\n\r\n",
    ];
    for head in unusual {
        assert_eq!(parsed(head), Parsed::Unusual, "{head:?}");
    }
}

#[test]
fn too_many_header_lines_go_to_hyper() {
    let mut head = String::from("GET / HTTP/1.1\r\n");
    for n in 0..MAX_HEADERS {
        head.push_str(&format!("X-{n}: v\r\n"));
    }
    head.push_str("\r\n");
    assert!(matches!(parsed(&head), Parsed::Complete { .. }));
    let more = head.replacen("\r\n\r\n", "\r\nX-last: v\r\n\r\n", 1);
    assert_eq!(parsed(&more), Parsed::Unusual);
}

#[test]
fn a_head_in_pieces_is_partial_until_its_last_byte() {
    let head = "GET /a HTTP/1.1\r\nHost: app\r\n\r\n";
    for cut in 0..head.len() {
        assert_eq!(parsed(&head[..cut]), Parsed::Partial, "cut at {cut}");
    }
    assert!(matches!(parsed(head), Parsed::Complete { .. }));
}

#[test]
fn the_head_ends_where_the_next_pipelined_one_begins() {
    let two = "GET /one HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n";
    let Parsed::Complete { len, .. } = parsed(two) else {
        panic!("not taken");
    };
    assert_eq!(&two[len..], "GET /two HTTP/1.1\r\n\r\n");
}

#[test]
fn hop_by_hop_fields_are_read_and_left_out_of_the_request() {
    // Nothing forwards them, so the map is spared them (and the proxy their removal).
    let req = taken(
        "GET / HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic YTpi\r\nTrailer: X-T\r\nX-A: 1\r\n\r\n",
    );
    let names: Vec<_> = req.headers().keys().map(HeaderName::as_str).collect();
    assert_eq!(names, ["host", "x-a"]);
    // A Connection that names other fields stays, for the proxy to remove them by it.
    let req = taken("GET / HTTP/1.1\r\nConnection: close, X-Private\r\nX-Private: 1\r\n\r\n");
    assert_eq!(req.headers().len(), 2);
    assert!(matches!(
        parsed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
        Parsed::Complete { close: true, .. }
    ));
}

#[test]
fn a_head_near_the_size_limit_keeps_its_hop_by_hop_fields_for_the_431_check() {
    // The size check (431) counts the request's fields: a head whose left-out fields could
    // decide it goes to hyper, whose request keeps them.
    let filler = "x".repeat(MAX_FIELDS - 100);
    let plain = format!("GET / HTTP/1.1\r\nX-Fill: {filler}\r\n\r\n");
    assert!(matches!(parsed(&plain), Parsed::Complete { .. }));
    let with_hop = format!("GET / HTTP/1.1\r\nX-Fill: {filler}\r\nKeep-Alive: 5\r\n\r\n");
    assert_eq!(parsed(&with_hop), Parsed::Unusual);
    let small = "GET / HTTP/1.1\r\nKeep-Alive: 5\r\n\r\n";
    assert!(matches!(parsed(small), Parsed::Complete { .. }));
}

#[test]
fn connection_close_is_seen_in_any_case_and_list_position() {
    for value in ["close", "Close", "keep-alive, CLOSE", " close ,x"] {
        let head = format!("GET / HTTP/1.1\r\nConnection: {value}\r\n\r\n");
        assert!(
            matches!(parsed(&head), Parsed::Complete { close: true, .. }),
            "{value}"
        );
    }
    let head = "GET / HTTP/1.1\r\nConnection: keep-alive, closed\r\n\r\n";
    assert!(matches!(
        parsed(head),
        Parsed::Complete { close: false, .. }
    ));
}

fn encoded(
    response: Response<Body>,
    head_only: bool,
    client_close: bool,
) -> (String, Framing, bool) {
    let (parts, body) = response.into_parts();
    let mut out = Vec::new();
    let mut date = HttpDate::default();
    let (framing, close) = encode_head(
        (&mut out, &mut date),
        (&parts, None),
        &body,
        head_only,
        client_close,
    );
    (String::from_utf8(out).unwrap(), framing, close)
}

#[test]
fn the_request_id_is_written_once_in_place_of_any_other() {
    let response = answer(
        200,
        &[("x-request-id", "from-the-upstream"), ("x-a", "1")],
        crate::reply::empty(),
    );
    let (parts, body) = response.into_parts();
    let mut out = Vec::new();
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    encode_head(
        (&mut out, &mut HttpDate::default()),
        (&parts, Some(id.as_bytes())),
        &body,
        false,
        false,
    );
    let head = String::from_utf8(out).unwrap();
    assert_eq!(head.matches("x-request-id").count(), 1, "{head}");
    assert!(head.contains("x-request-id: 0123456789abcdef0123456789abcdef\r\n"));
    assert!(head.contains("x-a: 1\r\n"));
}

fn answer(status: u16, headers: &[(&str, &str)], body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    response
}

fn streamed() -> Body {
    let frames = futures_util::stream::iter(vec![Ok::<_, crate::reply::BoxError>(
        http_body::Frame::data(Bytes::from_static(b"abc")),
    )]);
    StreamBody::new(frames).boxed_unsync()
}

#[test]
fn a_known_length_is_written_once_whatever_the_headers_said() {
    let body = crate::reply::full("hello");
    let (head, framing, close) = encoded(
        answer(200, &[("content-length", "99"), ("x-a", "1")], body),
        false,
        false,
    );
    assert_eq!(framing, Framing::Length(5));
    assert!(!close);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "));
    assert_eq!(head.matches("content-length").count(), 1);
    assert!(head.ends_with(" GMT\r\n\r\n"));
}

#[test]
fn an_unknown_length_is_chunked_and_a_transfer_encoding_given_is_replaced() {
    let (head, framing, _) = encoded(
        answer(502, &[("transfer-encoding", "gzip, chunked")], streamed()),
        false,
        false,
    );
    assert_eq!(framing, Framing::Chunked);
    assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
    assert_eq!(head.matches("transfer-encoding").count(), 1);
    assert!(head.contains("transfer-encoding: chunked\r\n"));
}

#[test]
fn an_unknown_length_told_by_a_single_header_is_kept() {
    let (head, framing, _) = encoded(
        answer(200, &[("content-length", "3")], streamed()),
        false,
        false,
    );
    assert_eq!(framing, Framing::Length(3));
    assert!(head.contains("content-length: 3\r\n"));
    // Two that differ: neither is trusted, the body is chunked.
    let (head, framing, _) = encoded(
        answer(
            200,
            &[("content-length", "3"), ("content-length", "4")],
            streamed(),
        ),
        false,
        false,
    );
    assert_eq!(framing, Framing::Chunked);
    assert!(!head.contains("content-length"));
}

#[test]
fn head_204_and_304_answers_have_no_body_and_keep_only_a_meaningful_length() {
    let (head, framing, _) = encoded(
        answer(200, &[("content-length", "1234")], crate::reply::empty()),
        true,
        false,
    );
    assert_eq!(framing, Framing::None);
    assert!(head.contains("content-length: 1234\r\n"), "{head}");
    let (head, framing, _) = encoded(
        answer(304, &[("content-length", "1234")], crate::reply::empty()),
        false,
        false,
    );
    assert_eq!(framing, Framing::None);
    assert!(head.contains("content-length: 1234\r\n"), "{head}");
    let (head, framing, _) = encoded(
        answer(
            204,
            &[("content-length", "7")],
            crate::reply::full("ignored"),
        ),
        false,
        false,
    );
    assert_eq!(framing, Framing::None);
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"));
}

#[test]
fn a_head_answer_built_with_a_body_says_its_length_and_an_empty_one_says_none() {
    let (head, framing, _) = encoded(answer(200, &[], crate::reply::full("hello")), true, false);
    assert_eq!(framing, Framing::None);
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    let (head, _, _) = encoded(answer(200, &[], crate::reply::empty()), true, false);
    assert!(!head.contains("content-length"), "{head}");
    let (head, _, _) = encoded(answer(200, &[], streamed()), true, false);
    assert!(!head.contains("content-length"), "{head}");
}

#[test]
fn close_asked_by_either_side_is_said_once_and_ends_the_connection() {
    let (head, _, close) = encoded(answer(200, &[], crate::reply::empty()), false, true);
    assert!(close);
    assert_eq!(head.matches("connection").count(), 1);
    assert!(head.contains("connection: close\r\n"));
    assert!(head.contains("content-length: 0\r\n"));
    let (head, _, close) = encoded(
        answer(200, &[("connection", "close")], crate::reply::empty()),
        false,
        false,
    );
    assert!(close);
    assert_eq!(head.matches("connection").count(), 1);
    let (head, _, close) = encoded(answer(200, &[], crate::reply::empty()), false, false);
    assert!(!close);
    assert!(!head.contains("connection"));
}

#[test]
fn a_date_given_is_not_doubled_and_an_unknown_status_gets_a_reason() {
    let (head, _, _) = encoded(
        answer(
            599,
            &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")],
            crate::reply::empty(),
        ),
        false,
        false,
    );
    assert!(head.starts_with("HTTP/1.1 599 <none>\r\n"));
    assert_eq!(head.matches("date: ").count(), 1);
}

#[test]
fn lengths_and_chunk_sizes_are_written_as_their_numbers() {
    for n in [0u64, 7, 10, 99, 100, 12345, u64::MAX] {
        let mut out = Vec::new();
        write_length(&mut out, n);
        assert_eq!(out, format!("content-length: {n}\r\n").into_bytes());
    }
    for n in [0usize, 9, 10, 15, 16, 255, 4096, 65535, usize::MAX] {
        let mut out = Vec::new();
        write_chunk_size(&mut out, n);
        assert_eq!(out, format!("{n:x}\r\n").into_bytes());
    }
}

#[test]
fn a_line_feed_without_its_carriage_return_is_found_anywhere() {
    for (head, bare) in [
        ("", false),
        ("\r\n", false),
        ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", false),
        ("\n", true),
        ("\nGET / HTTP/1.1\r\n\r\n", true),
        ("GET / HTTP/1.1\r\nHost: a\n\r\n", true),
        ("GET / HTTP/1.1\r\nHost: a\r\n\n", true),
        ("GET / HTTP/1.1\r\r\n\n", true),
    ] {
        assert_eq!(has_bare_lf(head.as_bytes()), bare, "{head:?}");
    }
    // Past a vector's width, too.
    let long = format!(
        "GET / HTTP/1.1\r\nCookie: {}\r\nX: y\n\r\n",
        "c".repeat(300)
    );
    assert!(has_bare_lf(long.as_bytes()));
    assert!(!has_bare_lf(long.replace("y\n", "y\r\n").as_bytes()));
}

#[test]
fn the_http2_preface_is_told_from_its_start_on() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for len in 1..=preface.len() {
        assert!(is_h2_preface(&preface[..len]), "{len} bytes");
    }
    let mut more = preface.to_vec();
    more.extend_from_slice(b"\x00\x00\x00\x04");
    assert!(is_h2_preface(&more), "with the first frame after it");
    for other in [
        &b""[..],
        b"PRI * HTTP/1.1\r\n",
        b"PRX",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        assert!(!is_h2_preface(other), "{other:?}");
    }
}
