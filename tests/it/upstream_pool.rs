//! Upstream connections of the serving workers: reused while the upstream keeps them open,
//! never reused once it closed them, on the wire of a raw HTTP/1.1 upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::pki::{TestCa, tls_front};
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 upstream: answers `ok` to each request; with `close_after_each`, closes the
/// connection right after each answer without saying so (as when an idle keep-alive connection
/// times out). Counts the connections it accepted.
async fn raw_upstream(close_after_each: bool) -> (String, Arc<AtomicUsize>) {
    upstream_answering(move |_, _: &mut ()| {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
        (vec![ok], close_after_each)
    })
    .await
}

/// The next request head on `tcp` (bytes read past it stay in `seen`), `None` once the
/// connection ends.
async fn next_head(tcp: &mut tokio::net::TcpStream, seen: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    seen.drain(..end);
    Some(head)
}

/// A raw HTTP/1.1 upstream that reads each request head and writes what `answer` returns for
/// it (given the head and the connection's own state, which starts as `S::default()`), piece
/// by piece (5 ms apart); closes the connection after it when told to. Counts the connections
/// it accepted.
async fn upstream_answering<S: Default + Send + 'static>(
    answer: impl Fn(&str, &mut S) -> (Vec<Vec<u8>>, bool) + Copy + Send + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut state = S::default();
                while let Some(head) = next_head(&mut tcp, &mut buffer).await {
                    let (pieces, close) = answer(&head, &mut state);
                    for (i, piece) in pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                        if tcp.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), accepted)
}

#[tokio::test]
async fn a_worker_reuses_its_upstream_connection() {
    let (upstream, accepted) = raw_upstream(false).await;
    let proxy = start_proxy(&workers_config(&upstream, 2)).await;
    // One client connection, so one worker; its requests in turn share one upstream connection.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for n in 0..20 {
        let req = http::Request::get(format!("/api/{n}"))
            .header("host", "app.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_reused() {
    let (upstream, accepted) = raw_upstream(true).await;
    let proxy = start_proxy(&workers_config(&upstream, 2)).await;
    for n in 0..30 {
        let r = get(&proxy.url(&format!("/api/seq/{n}")), &[]).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "request {n}");
    }
    let parallel = futures_util::future::join_all((0..10).map(|n| {
        let url = proxy.url(&format!("/api/par/{n}"));
        async move { get(&url, &[]).await.status }
    }))
    .await;
    assert!(parallel.iter().all(|s| *s == 200), "{parallel:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 40);
}

/// A raw HTTP/1.1 upstream answering each request by its path with scripted bytes, written in
/// pieces a few milliseconds apart; `/api/close/...` answers end their connection. Counts the
/// connections it accepted.
async fn scripted_upstream() -> (String, Arc<AtomicUsize>) {
    fn script(target: &str) -> Vec<Vec<u8>> {
        let big: Vec<u8> = (0..64)
            .flat_map(|i| {
                let piece = vec![b'a' + (i % 26) as u8; 64 * 1024];
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(&piece);
                chunk.extend_from_slice(b"\r\n");
                chunk
            })
            .collect();
        let mut big_answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        big_answer.extend_from_slice(&big);
        big_answer.extend_from_slice(b"0\r\n\r\n");
        let pieces: Vec<&[u8]> = match target {
            "/api/length" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Kind: length\r\n\r\nlen", b"gth"],
            "/api/chunked" => vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchun",
                b"k\r\n3;ext=1\r\ned ",
                b"\r\n4\r\nbody\r\n0\r\nX-Trailer: t\r\n\r\n",
            ],
            "/api/head" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"],
            "/api/not-modified" => vec![b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"],
            "/api/interim" => vec![b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"],
            "/api/close/until-close" => vec![b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it"],
            "/api/smuggle" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"],
            "/api/two-answers" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"],
            // The second answer a few milliseconds later: after the first went back to the pool.
            "/api/late-second-answer" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"],
            // A HEAD answered with its body, written after the head (a common upstream bug).
            "/api/late-head-body" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n", b"{\"user\":\"alice\"}\n"],
            "/api/big" => return big_answer.chunks(100_000).map(<[u8]>::to_vec).collect(),
            _ => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        };
        pieces.into_iter().map(<[u8]>::to_vec).collect()
    }
    upstream_answering(|head, _: &mut ()| {
        let target = head.split(' ').nth(1).unwrap_or("/");
        (script(target), target.starts_with("/api/close/"))
    })
    .await
}

/// One keep-alive client connection (so one worker and one upstream pool), its requests in turn.
async fn one_connection(proxy: &Proxy) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn ask(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    method: &str,
    path: &str,
) -> (u16, http::HeaderMap, Bytes) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    // Once the connection has taken the previous answer in (right after its body, it may not
    // have yet: "connection was not ready").
    sender
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .to_bytes();
    (status, headers, body)
}

#[tokio::test]
async fn every_framing_an_upstream_uses_reaches_the_client_intact_and_reuse_follows_it() {
    let (upstream, accepted) = scripted_upstream().await;
    let proxy = start_proxy(&workers_config(&upstream, 1)).await;
    let mut client = one_connection(&proxy).await;

    let (status, headers, body) = ask(&mut client, "GET", "/api/length").await;
    assert_eq!((status, &body[..]), (200, &b"length"[..]));
    assert_eq!(headers["x-kind"], "length");
    let (status, _, body) = ask(&mut client, "GET", "/api/chunked").await;
    assert_eq!((status, &body[..]), (200, &b"chunked body"[..]));
    // The same through hyper's client (a POST), on a connection of its own.
    let (status, _, body) = ask(&mut client, "POST", "/api/chunked").await;
    assert_eq!((status, &body[..]), (200, &b"chunked body"[..]));
    let (status, headers, body) = ask(&mut client, "HEAD", "/api/head").await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(
        headers["content-length"], "50",
        "a HEAD answer keeps its length"
    );
    let (status, headers, body) = ask(&mut client, "GET", "/api/not-modified").await;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(headers["etag"], "\"v1\"");
    let (status, headers, body) = ask(&mut client, "GET", "/api/interim").await;
    assert_eq!((status, &body[..]), (200, &b"hi"[..]));
    assert!(
        !headers.contains_key("link"),
        "an interim answer's fields stay out"
    );
    let (status, _, body) = ask(&mut client, "GET", "/api/big").await;
    assert_eq!((status, body.len()), (200, 64 * 64 * 1024));
    assert!(
        body.chunks(64 * 1024)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == b'a' + (i % 26) as u8))
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "every one of these answers left its connection reusable (one for hyper's client), \
         but the HEAD's (see a_head_body_written_after_the_next_request_arrived_never_answers_it)"
    );

    // An answer framed by the end of its connection: complete, and the connection not reused.
    let (status, _, body) = ask(&mut client, "GET", "/api/close/until-close").await;
    assert_eq!((status, &body[..]), (200, &b"all of it"[..]));
    let (status, _, _) = ask(&mut client, "GET", "/api/after").await;
    assert_eq!(status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_upstream_answering_more_than_asked_never_answers_the_next_request() {
    let (upstream, accepted) = scripted_upstream().await;
    let proxy = start_proxy(&workers_config(&upstream, 1)).await;
    let mut client = one_connection(&proxy).await;
    // Content-Length beside chunked, then a forged second answer: the chunks are the body, the
    // length is not relayed, and the connection (with the forged answer on it) is dropped.
    let (status, headers, body) = ask(&mut client, "GET", "/api/smuggle").await;
    assert_eq!((status, &body[..]), (200, &b"abc"[..]));
    assert_ne!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"50"[..])
    );
    let (status, _, body) = ask(&mut client, "GET", "/api/next").await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"ok"[..]),
        "not the forged answer"
    );
    // The same answer through hyper's client (a POST): the length beside the chunks is not
    // relayed either (RFC 9112 §6.3), or the client would wait for 50 bytes of a 3-byte body.
    let (status, headers, body) = ask(&mut client, "POST", "/api/smuggle").await;
    assert_eq!((status, &body[..]), (200, &b"abc"[..]));
    assert_ne!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"50"[..])
    );
    // Two answers to one request: the first is relayed, the second never reaches anyone.
    let (status, _, body) = ask(&mut client, "GET", "/api/two-answers").await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    for n in 0..3 {
        let (status, _, body) = ask(&mut client, "GET", &format!("/api/next/{n}")).await;
        assert_eq!(
            (status, &body[..]),
            (200, &b"ok"[..]),
            "request {n} after the extra answer"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "a new connection after each answer that carried more than itself (and one for hyper's client)"
    );
}

/// Bytes an upstream sends once its answer is complete and its connection back in the pool (a
/// second answer, a HEAD answer's body written after its head) are no answer to the next
/// request on that connection, which may be another user's: such a connection is not reused.
#[tokio::test]
async fn bytes_arriving_on_an_idle_upstream_connection_never_answer_the_next_request() {
    let (upstream, accepted) = scripted_upstream().await;
    let proxy = start_proxy(&workers_config(&upstream, 1)).await;
    let mut alice = one_connection(&proxy).await;
    let (status, _, body) = ask(&mut alice, "GET", "/api/late-second-answer").await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut bob = one_connection(&proxy).await;
    for n in 0..3 {
        let (status, _, body) = ask(&mut bob, "GET", &format!("/api/bob/{n}")).await;
        assert_eq!(
            (status, &body[..]),
            (200, &b"ok"[..]),
            "bob's request {n} after alice's answer came twice"
        );
    }
    // Each on a client connection of its own from here: the proxy closes a client connection
    // quiet for `header_read_timeout` (1 s here), which a loaded machine can make alice's or
    // bob's meanwhile. The upstream pool is the worker's, whichever client connection asks.
    drop((alice, bob));
    let (status, _, _) = ask(
        &mut one_connection(&proxy).await,
        "HEAD",
        "/api/late-head-body",
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, _, body) = ask(
        &mut one_connection(&proxy).await,
        "GET",
        "/api/bob/after-head",
    )
    .await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"ok"[..]),
        "bob's request after alice's HEAD got its body late"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "a new connection after each answer followed by more bytes"
    );
}

/// A client that goes away in the middle of an answer's body leaves the upstream connection
/// mid-answer: it is closed, never put back for the next request, which may be another user's
/// (the rest of the first answer would be read as its answer). Guard: nothing else pins it; a
/// `WireBody` that went home when dropped early turns it red.
#[tokio::test]
async fn a_client_leaving_mid_body_never_leaves_the_rest_of_its_answer_to_the_next_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let (go, went) = tokio::sync::watch::channel(0u8);
    let (seen_close, mut closed) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let (mut went, seen_close) = (went.clone(), seen_close.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let Some(head) = next_head(&mut tcp, &mut seen).await else {
                        let _ = seen_close.send(());
                        return;
                    };
                    if !head.starts_with("GET /api/stream ") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    // The head and a first piece; a second once told (the client has gone);
                    // the rest, alice's, once told again.
                    let pieces: [&[u8]; 3] = [
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                        b"6\r\nsecond\r\n",
                        b"c\r\nalice-secret\r\n0\r\n\r\n",
                    ];
                    for (at, piece) in pieces.iter().enumerate() {
                        let _ = went.wait_for(|n| usize::from(*n) >= at).await;
                        if tcp.write_all(piece).await.is_err() {
                            let _ = seen_close.send(());
                            return;
                        }
                    }
                }
            });
        }
    });
    let proxy = start_proxy(&workers_config(&upstream, 1)).await;
    // Alice, on a raw connection: she reads the first piece, then resets her connection.
    let mut alice = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    alice
        .write_all(b"GET /api/stream HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(5).any(|w| w == b"first") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), alice.read(&mut chunk))
            .await
            .expect("the first piece")
            .unwrap();
        assert!(n > 0, "alice's answer ended early");
        got.extend_from_slice(&chunk[..n]);
    }
    alice.set_zero_linger().unwrap();
    drop(alice);
    // The second piece finds her gone: the proxy stops relaying and lets go of the answer.
    go.send(1).unwrap();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closed.recv()).await;
    // Bob asks on the same worker; the rest of alice's answer comes a moment later.
    let rest = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let _ = go.send(2);
    });
    let (status, _, body) = ask(&mut one_connection(&proxy).await, "GET", "/api/bob").await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (200, "ok".to_string()),
        "bob's answer after alice left hers mid-body"
    );
    rest.await.unwrap();
}

/// An upstream whose `HEAD` handler writes the body anyway, and only once the next request on
/// the connection has reached it: here a stored file that is itself an HTTP answer. Counts the
/// connections it accepted.
async fn late_head_body_upstream() -> (String, Arc<AtomicUsize>) {
    // The connection's state: what the last HEAD's handler still has to write, its body, late.
    upstream_answering(|head, late: &mut Option<&'static [u8]>| {
        let mut answer = late.take().unwrap_or_default().to_vec();
        if head.starts_with("HEAD ") {
            answer.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n");
            *late = Some(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged");
        } else {
            answer.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
        (vec![answer], false)
    })
    .await
}

/// A proxy with one serving worker whose `/api/` goes to `upstream` (`http://…`), over TLS
/// (a front with a certificate of `ca`, trusted by the route) when `ca` is given. Its requests
/// may take 10 s, not the harness's 2 s: nothing here waits on a timeout, and a loaded machine
/// made a scripted upstream's answer a `504`.
async fn one_worker_proxy_to(mut upstream: String, ca: Option<&TestCa>) -> Proxy {
    let mut route = String::new();
    if let Some(ca) = ca {
        let plain = upstream.trim_start_matches("http://").parse().unwrap();
        let (front, _) = tls_front(ca.acceptor(None), plain).await;
        upstream = format!("https://{front}");
        route = format!("ca_file = \"{}\"\n", ca.ca_file.display());
    }
    let route = format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n{route}");
    start_proxy(
        &config_toml(&route)
            .add("server.workers", 1)
            .set("server.request_timeout", "10s")
            .text(),
    )
    .await
}

/// A `HEAD` answered with a body written only once the next request on the connection has
/// reached the upstream: no check before reuse can see bytes that are not there yet, so the next
/// request — another user's — would get them as its answer ("response queue poisoning"). A
/// connection that carried a `HEAD` is never reused: on the workers' own path, and through
/// hyper's pooled client (an `https` upstream).
#[tokio::test]
async fn a_head_body_written_after_the_next_request_arrived_never_answers_it() {
    let ca = TestCa::new("Upstream CA");
    for tls in [false, true] {
        let (upstream, accepted) = late_head_body_upstream().await;
        let proxy = one_worker_proxy_to(upstream, tls.then_some(&ca)).await;
        let (status, headers, body) = ask(
            &mut one_connection(&proxy).await,
            "HEAD",
            "/api/uploads/answer.txt",
        )
        .await;
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(
            headers["content-length"], "44",
            "a HEAD answer keeps its length"
        );
        bob_is_answered_on_a_connection_of_his_own(
            &proxy,
            "GET",
            &accepted,
            &format!("HEAD (over TLS: {tls})"),
        )
        .await;
    }
}

/// Bob's two requests, on a connection of his own after `case`'s answer, get his own answers
/// ("ok"), not the late body of that answer: the upstream accepted two connections in all, the
/// one that carried it and one for bob's.
async fn bob_is_answered_on_a_connection_of_his_own(
    proxy: &Proxy,
    method: &str,
    accepted: &AtomicUsize,
    case: &str,
) {
    let mut bob = one_connection(proxy).await;
    for n in 0..2 {
        let (status, _, body) = ask(&mut bob, method, &format!("/api/bob/{n}")).await;
        assert_eq!(
            (status, String::from_utf8_lossy(&body).into_owned()),
            (200, "ok".to_string()),
            "{case}: bob's request {n} was answered with the body of that answer"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "{case}: the connection that carried that answer, then one for bob's"
    );
}

/// A client that goes away while its answer's body is quiet (a long poll, an event stream
/// between events) lets go of the upstream request at once, not at the upstream's next write,
/// which may be minutes away: the upstream connection is closed, its place free. On the
/// workers' own path (a bodiless GET) and through hyper's (a request with a body).
#[tokio::test]
async fn a_client_leaving_during_a_quiet_stream_lets_go_of_its_upstream_at_once() {
    let requests: [&[u8]; 2] = [
        b"GET /api/events HTTP/1.1\r\nhost: app.test\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nhost: app.test\r\ncontent-length: 2\r\n\r\nhi",
    ];
    for request in requests {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        let (seen_close, mut closed) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let mut seen = Vec::new();
            if next_head(&mut tcp, &mut seen).await.is_none() {
                return;
            }
            // The head and a first event; then nothing more until the connection ends.
            let first = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
            tcp.write_all(first).await.unwrap();
            let mut chunk = [0u8; 1024];
            while let Ok(n) = tcp.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
            let _ = seen_close.send(());
        });
        let proxy = start_proxy(&workers_config(&upstream, 1)).await;
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(5).any(|w| w == b"first") {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut chunk))
                    .await
                    .expect("the first event")
                    .unwrap();
            assert!(n > 0, "the answer ended early");
            got.extend_from_slice(&chunk[..n]);
        }
        // The tab is closed: the connection ends (FIN), the stream being quiet.
        drop(client);
        let what = String::from_utf8_lossy(&request[..4]).into_owned();
        tokio::time::timeout(std::time::Duration::from_secs(3), closed.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{what}: the upstream request was held after its client had gone")
            });
    }
}

/// An upstream whose `304` and `204` answers announce a body (`Content-Length`, as a handler
/// that set the status but wrote its body anyway sends) and write it only once the next request
/// on the connection has reached it, as the `HEAD` handler of [`late_head_body_upstream`] does.
/// Other requests are answered `ok`. Counts the connections it accepted.
async fn late_bodiless_body_upstream() -> (String, Arc<AtomicUsize>) {
    upstream_answering(|head, late: &mut Option<&'static [u8]>| {
        let mut answer = late.take().unwrap_or_default().to_vec();
        let target = head.split(' ').nth(1).unwrap_or("/");
        let forged: &'static [u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";
        match target {
            "/api/not-modified" => {
                answer.extend_from_slice(
                    b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 44\r\n\r\n",
                );
                *late = Some(forged);
            }
            "/api/no-content" => {
                answer.extend_from_slice(b"HTTP/1.1 204 No Content\r\nContent-Length: 44\r\n\r\n");
                *late = Some(forged);
            }
            "/api/no-content-chunked" => {
                answer.extend_from_slice(
                    b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                *late =
                    Some(b"2f\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged\r\n0\r\n\r\n");
            }
            _ => answer.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        }
        (vec![answer], false)
    })
    .await
}

/// A `304` or `204` answer has no body whatever its head says (RFC 9112 §6.3), and one whose
/// head announces a body anyway comes from an upstream that may write that body, possibly only
/// once the next request on the connection has reached it: too late for any check before
/// reuse, and that request (anyone's) would take it as its answer. Such a connection is never
/// reused, as one that carried a `HEAD`: on the workers' own path (a `GET`), through hyper's
/// client on the workers (a `POST`) and through hyper's pooled client (an `https` upstream).
#[tokio::test]
async fn a_bodiless_answer_announcing_a_body_never_leaves_it_to_the_next_request() {
    let ca = TestCa::new("Upstream CA");
    for tls in [false, true] {
        for (method, path) in [
            ("GET", "/api/not-modified"),
            ("GET", "/api/no-content"),
            ("GET", "/api/no-content-chunked"),
            ("POST", "/api/no-content"),
            ("POST", "/api/not-modified"),
        ] {
            let (upstream, accepted) = late_bodiless_body_upstream().await;
            let proxy = one_worker_proxy_to(upstream, tls.then_some(&ca)).await;
            let case = format!("{method} {path} (over TLS: {tls})");
            let (status, _, body) = ask(&mut one_connection(&proxy).await, method, path).await;
            assert!(matches!(status, 204 | 304), "{case}: {status}");
            assert!(body.is_empty(), "{case}");
            bob_is_answered_on_a_connection_of_his_own(&proxy, method, &accepted, &case).await;
        }
    }
}

/// An upstream's `304` and `204` without a body (and without a field announcing one) leave
/// their connection reusable; bytes after one in the same write are no answer to anyone.
#[tokio::test]
async fn a_bodiless_answer_followed_by_stray_bytes_never_answers_the_next_request() {
    let (upstream, accepted) = upstream_answering(|head, _: &mut ()| {
        let target = head.split(' ').nth(1).unwrap_or("/");
        let answer: &[u8] = match target {
            "/api/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n",
            "/api/204" => b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            "/api/304-stray" => {
                b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
            }
            "/api/204-stray" => {
                b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
            }
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        };
        (vec![answer.to_vec()], false)
    })
    .await;
    let proxy = start_proxy(&workers_config(&upstream, 1)).await;
    let mut client = one_connection(&proxy).await;
    for method in ["GET", "POST"] {
        for path in ["/api/304", "/api/204"] {
            let (status, _, body) = ask(&mut client, method, path).await;
            assert!(
                matches!(status, 204 | 304) && body.is_empty(),
                "{method} {path}"
            );
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a plain 304 or 204 leaves its connection reusable (one for the workers' own path, one \
         for hyper's client)"
    );
    for method in ["GET", "POST"] {
        for path in ["/api/304-stray", "/api/204-stray"] {
            let (status, _, _) = ask(&mut client, method, path).await;
            assert!(matches!(status, 204 | 304), "{method} {path}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            for n in 0..2 {
                let (status, _, body) = ask(&mut client, method, &format!("/api/next/{n}")).await;
                assert_eq!(
                    (status, &body[..]),
                    (200, &b"ok"[..]),
                    "{method} {n} after {path}: the stray answer"
                );
            }
        }
    }
}

/// Interim answers (`1xx`, here `103 Early Hints`) are not relayed: their fields never reach the
/// client, so an upstream cannot set one of Vestibule's own cookies or grant credentials to
/// another origin through them, past the vetting of the final head. On the workers' own path
/// (a `GET`), through hyper's client (a `POST`), and through hyper's pooled client (`https`).
#[tokio::test]
async fn interim_answers_never_reach_the_client_with_their_fields() {
    let ca = TestCa::new("Upstream CA");
    let (plain, _) = upstream_answering(|_, _: &mut ()| {
        let interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\
            Set-Cookie: vestibule=forged; Path=/\r\nSet-Cookie: __Host-vestibule-login-x=forged\r\n\
            Access-Control-Allow-Origin: https://evil.example\r\n\
            Access-Control-Allow-Credentials: true\r\n\r\n";
        let last = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        (vec![interim.to_vec(), last.to_vec()], false)
    })
    .await;
    let backend = plain.trim_start_matches("http://").parse().unwrap();
    let (front, _) = tls_front(ca.acceptor(None), backend).await;
    for (upstream, more) in [
        (plain.clone(), String::new()),
        (
            format!("https://{front}"),
            format!("ca_file = \"{}\"\n", ca.ca_file.display()),
        ),
    ] {
        let route = format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n{more}");
        let proxy = start_proxy(
            &config_toml(&route)
                .add("server.workers", 1)
                .set("server.request_timeout", "10s")
                .text(),
        )
        .await;
        for request in [
            &b"GET /api/early HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"[..],
            b"POST /api/early HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        ] {
            let answer = raw_exchange(proxy.addr, request).await;
            let text = String::from_utf8_lossy(&answer).to_lowercase();
            let what = format!("{upstream} {}", String::from_utf8_lossy(&request[..4]));
            assert!(text.starts_with("http/1.1 200 "), "{what}: {text}");
            assert!(text.ends_with("\r\n\r\nhi"), "{what}: {text}");
            for leaked in ["http/1.1 103", "early hints", "forged", "evil.example", "allow-credentials", "</a.css>"] {
                assert!(!text.contains(leaked), "{what}: {leaked} reached the client: {text}");
            }
        }
    }
}

/// A route with TLS settings of its own (`ca_file`) keeps its upstream connections per serving
/// worker, as every other route does. Shared between the workers, a connection whose answer
/// leaves bytes on it ([`a_bodiless_answer_announcing_a_body_never_leaves_it_to_the_next_request`])
/// goes back to the pool before the request that got it can keep it out, and another worker's
/// request, on another thread, could take it in between and be answered with those bytes. Two
/// client connections, on the two workers, take turns: each worker opens one upstream connection
/// and reuses it, never the other's.
#[tokio::test]
async fn a_routes_own_tls_connections_are_used_by_one_worker_only() {
    let ca = TestCa::new("Upstream CA");
    let (plain, accepted) = raw_upstream(false).await;
    let (front, _) = tls_front(
        ca.acceptor(None),
        plain.trim_start_matches("http://").parse().unwrap(),
    )
    .await;
    let route = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"https://{front}\"\nca_file = \"{}\"\n",
        ca.ca_file.display()
    );
    let proxy = start_proxy(
        &config_toml(&route)
            .add("server.workers", 2)
            .set("server.request_timeout", "10s")
            .text(),
    )
    .await;
    // Both open at once: the second goes to the worker without a connection.
    let mut clients = [one_connection(&proxy).await, one_connection(&proxy).await];
    for n in 0..6 {
        let client = &mut clients[n % 2];
        let (status, _, body) = ask(client, "GET", &format!("/api/{n}")).await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]), "request {n}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one upstream connection per worker: a worker never uses another's"
    );
}
