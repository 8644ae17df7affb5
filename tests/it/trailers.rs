//! Request trailers never reach an upstream. They arrive after the head was vetted (the fields
//! that speak for the client removed, the identity fields set), so an `Authorization` or an
//! `X-User` sent as a trailer would speak for the client past that stripping. The client sends
//! trailers over HTTP/1.1 (chunked) and over HTTP/2; real upstreams, HTTP/1.1 on plain TCP and
//! HTTP/2 over TLS (ALPN), read the whole body and record the trailers they were given.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::pki::TestCa;
use crate::support::*;
use bytes::Bytes;
use http::{HeaderMap, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// What an upstream read of one request: its version, its whole body, and its trailers.
#[derive(Debug, Clone)]
struct Received {
    version: Version,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// An upstream on port 0 (HTTP/1.1 or HTTP/2, as the client speaks; over TLS with `tls`) that
/// reads each request's body to its end and records it.
async fn recording_upstream(tls: Option<TlsAcceptor>) -> (SocketAddr, Log) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Log::default();
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (tls, seen) = (tls.clone(), seen.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve(tcp, seen).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            serve(stream, seen).await;
                        }
                    }
                }
            });
        }
    });
    (addr, log)
}

async fn serve<I>(io: I, log: Log)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let log = log.clone();
        async move {
            let version = req.version();
            let collected = req.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            log.lock().unwrap().push(Received {
                version,
                body,
                trailers,
            });
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"read"))))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// A chunked HTTP/1.1 request to `path` whose trailers speak for someone else. The status of
/// the answer.
async fn send_http1(proxy: &Proxy, path: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\
         Trailer: Authorization, X-User\r\nTE: trailers\r\nConnection: close\r\n\r\n\
         6\r\nhello \r\n5\r\nworld\r\n0\r\n\
         Authorization: Bearer forged\r\nX-User: admin\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("no answer in time")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 answer: {answer:?}"))
}

/// An HTTP/2 connection to `proxy` (prior knowledge), driven by a task of its own.
async fn http2_to<B>(proxy: &Proxy) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// The same request over HTTP/2 (prior knowledge), its trailers in a HEADERS frame of their own.
async fn send_http2(proxy: &Proxy, path: &str) -> u16 {
    let mut sender = http2_to(proxy).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("authorization", "Bearer forged".parse().unwrap());
    trailers.insert("x-user", "admin".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello "))),
        Ok(Frame::data(Bytes::from_static(b"world"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post(format!("http://app.test{path}"))
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

/// Two routes: `/h1/` to the plain HTTP/1.1 upstream `plain`, `/h2/` to the TLS upstream `tls`
/// (HTTP/2), whose certificate `ca` issued.
fn h1_and_h2_routes(
    plain: impl std::fmt::Display,
    tls: impl std::fmt::Display,
    ca: &TestCa,
) -> String {
    format!(
        "[[routes]]\npath = \"/h1/\"\nupstream = \"http://{plain}\"\n\
         [[routes]]\npath = \"/h2/\"\nupstream = \"https://{tls}\"\nca_file = {:?}\n",
        ca.ca_file.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_never_reach_an_upstream() {
    let ca = TestCa::new("Upstream CA");
    let (plain, plain_log) = recording_upstream(None).await;
    let (tls, tls_log) = recording_upstream(Some(ca.h2_acceptor())).await;
    let proxy = start_proxy(config_text(&h1_and_h2_routes(plain, tls, &ca))).await;

    // Every case is tried before the verdict, so that a failure names each path that leaks.
    let mut leaked = Vec::new();
    for (route, log, version) in [
        ("/h1/", &plain_log, Version::HTTP_11),
        ("/h2/", &tls_log, Version::HTTP_2),
    ] {
        for client in ["http/1.1", "h2"] {
            let path = format!("{route}upload");
            let status = match client {
                "http/1.1" => send_http1(&proxy, &path).await,
                _ => send_http2(&proxy, &path).await,
            };
            let case = format!("{client} client to the {route} upstream");
            assert_eq!(status, 200, "{case}");
            let received = log.lock().unwrap().pop().expect(&case);
            // The route is what it claims: HTTP/2 to the TLS upstream.
            assert_eq!(received.version, version, "{case}");
            assert_eq!(&received.body[..], b"hello world", "{case}: the body");
            if let Some(trailers) = received.trailers.filter(|t| !t.is_empty()) {
                leaked.push(format!("{case}: {trailers:?}"));
            }
        }
    }
    assert!(
        leaked.is_empty(),
        "upstreams were given trailers: {leaked:#?}"
    );
}

/// The trailers an upstream answers with: a `Set-Cookie` naming Vestibule's session cookie
/// (`own`), one naming a cookie of the upstream's, a grant of CORS credentials, and a checksum.
fn answer_trailers(own: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.append(
        "set-cookie",
        format!("{own}=forged; Path=/").parse().unwrap(),
    );
    trailers.append("set-cookie", "theirs=1; Path=/".parse().unwrap());
    trailers.insert("access-control-allow-credentials", "true".parse().unwrap());
    trailers.insert("x-checksum", "9".parse().unwrap());
    trailers
}

/// An HTTP/1.1 upstream on plain TCP answering every request with a chunked body and
/// [`answer_trailers`], written byte for byte (hyper's server writes trailers only to a client
/// that sent `TE: trailers`).
async fn trailing_http1_upstream(own: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let own = own.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut answer = String::from(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\
                     Trailer: Set-Cookie, X-Checksum\r\n\r\n5\r\nhello\r\n0\r\n",
                );
                for (name, value) in &answer_trailers(&own) {
                    answer.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
                }
                answer.push_str("\r\n");
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// An HTTP/2 upstream over TLS answering every request with a body and [`answer_trailers`].
async fn trailing_http2_upstream(acceptor: TlsAcceptor, own: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, own) = (acceptor.clone(), own.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from_static(b"hello"))),
                        Ok(Frame::trailers(answer_trailers(&own))),
                    ];
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    async move { Ok::<_, Infallible>(http::Response::new(body)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A `GET` of `path` over HTTP/2 (prior knowledge) asking for trailers: the body and the
/// trailers it was answered with.
async fn get_http2_with_trailers(proxy: &Proxy, path: &str) -> (u16, Bytes, Option<HeaderMap>) {
    let mut sender = http2_to(proxy).await;
    let req = http::Request::get(format!("http://app.test{path}"))
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status().as_u16();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

/// An upstream's `Set-Cookie` for one of Vestibule's own cookies is dropped from its answer's
/// head, and so is its `Access-Control-Allow-Credentials` (credentials are Vestibule's to
/// grant); sent as trailers they must not pass either: an intermediary in front that buffers
/// the answer may merge trailers into the head (RFC 9110 §6.5.1), and neither field may be a
/// trailer at all. The upstream's other trailers pass, from HTTP/1.1 (chunked) and HTTP/2
/// upstreams alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_trailers_neither_set_cookies_nor_grant_credentials() {
    let ca = TestCa::new("Upstream CA");
    // The session cookie's name, as the proxy is configured (read before the upstreams start).
    let probe = start_proxy(config_text("")).await;
    let own = probe.app.live.load().config.session.cookie_name.clone();
    drop(probe);
    let plain = trailing_http1_upstream(own.clone()).await;
    let tls = trailing_http2_upstream(ca.h2_acceptor(), own.clone()).await;
    let proxy = start_proxy(config_text(&h1_and_h2_routes(plain, tls, &ca))).await;
    let mut leaked = Vec::new();
    for route in ["/h1/", "/h2/"] {
        let (status, body, trailers) = get_http2_with_trailers(&proxy, &format!("{route}x")).await;
        assert_eq!((status, &body[..]), (200, &b"hello"[..]), "{route}");
        let trailers = trailers.unwrap_or_default();
        // The upstream's trailers do reach the client: the case is what it claims.
        assert_eq!(
            trailers.get("x-checksum").map(|v| v.to_str().unwrap()),
            Some("9"),
            "{route}: {trailers:?}"
        );
        if ["set-cookie", "access-control-allow-credentials"]
            .iter()
            .any(|name| trailers.contains_key(*name))
        {
            leaked.push(format!("{route}: {trailers:?}"));
        }
    }
    assert!(
        leaked.is_empty(),
        "an upstream's trailers set a cookie or granted credentials: {leaked:#?}"
    );
}
