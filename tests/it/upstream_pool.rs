//! Upstream connections of the serving workers: reused while the upstream keeps them open,
//! never reused once it closed them, on the wire of a raw HTTP/1.1 upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
                let mut chunk = [0u8; 4096];
                loop {
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buffer.drain(..end);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tcp.write_all(answer).await.is_err() || close_after_each {
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
