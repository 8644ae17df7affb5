//! Clients that stop reading their answer ("slow read"): `server.send_timeout` closes a
//! connection whose answer makes no progress towards the client, so that the connection's place,
//! the upstream connection and the upstream's worker are let go — on the HTTP/1 lane, on hyper's
//! HTTP/1 (a request with a body) and over HTTP/2 (a stream whose flow-control window the client
//! never opens, while it answers pings). A slow client that keeps reading gets the whole answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::limits::{HEADERS, PING, PREFACE, SETTINGS, frame, get_headers, next_frame};
use crate::support::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

const WITHIN: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 * 1024;

/// An upstream that answers every request with an endless chunked body, written as fast as the
/// proxy takes it. When a write fails (the proxy let go of the connection), it reports how many
/// bytes it had written on `ended`.
async fn endless_upstream() -> (String, mpsc::UnboundedReceiver<u64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (report, ended) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let report = report.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
                chunk.extend_from_slice(&[b'x'; CHUNK]);
                chunk.extend_from_slice(b"\r\n");
                let start = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                let mut written = 0u64;
                if tcp.write_all(start).await.is_err() {
                    let _ = report.send(written);
                    return;
                }
                loop {
                    if tcp.write_all(&chunk).await.is_err() {
                        let _ = report.send(written);
                        return;
                    }
                    written += CHUNK as u64;
                }
            });
        }
    });
    (url, ended)
}

/// The proxy with `/api/` to `upstream` and a `send_timeout` of one second.
async fn proxy_to(upstream: &str) -> Proxy {
    start_proxy(config_to(upstream)).await
}

fn config_to(upstream: &str) -> TomlConfig {
    let routes = format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n");
    config_toml(&routes)
        .add("server.send_timeout", "1s")
        .add("server.http2_keep_alive_interval", "200ms")
        .add("server.http2_keep_alive_timeout", "1s")
}

/// A connection to `addr` with a receive buffer of `window` bytes, so that a client that does
/// not read soon stops the proxy's writes.
async fn small_window_client(addr: std::net::SocketAddr, window: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(window).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends `request` and then reads nothing; the upstream must see its connection dropped, and
/// the client its connection closed, within [`WITHIN`].
async fn a_client_that_stops_reading_is_let_go(request: &[u8]) {
    let (upstream, mut ended) = endless_upstream().await;
    let proxy = proxy_to(&upstream).await;
    let mut client = small_window_client(proxy.addr, 4096).await;
    client.write_all(request).await.unwrap();
    let written = tokio::time::timeout(WITHIN, ended.recv())
        .await
        .expect("the upstream is still writing into a connection whose client stopped reading")
        .unwrap();
    // What was in the buffers is delivered, then the connection ends.
    let mut received = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let closed = tokio::time::timeout(WITHIN, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n as u64,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client's connection was never closed");
    assert!(
        received <= written + 4096,
        "received {received} of {written} bytes"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_a_lane_answer_is_disconnected() {
    a_client_that_stops_reading_is_let_go(b"GET /api/endless HTTP/1.1\r\nHost: app\r\n\r\n").await;
}

#[tokio::test]
async fn a_client_that_stops_reading_a_hyper_answer_is_disconnected() {
    // A request with a body is served by hyper, not the lane.
    a_client_that_stops_reading_is_let_go(
        b"POST /api/endless HTTP/1.1\r\nHost: app\r\nContent-Length: 1\r\n\r\nx",
    )
    .await;
}

/// Asks for `path` over HTTP/2 with a stream window of `window` bytes that it never opens
/// further, answering settings and pings as a live client does, until the server closes the
/// connection; `false` if it did not within [`WITHIN`].
async fn an_http2_client_that_never_makes_room(proxy: &Proxy, window: u32, path: &str) -> bool {
    let mut h2 = TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(PREFACE).await.unwrap();
    // SETTINGS_INITIAL_WINDOW_SIZE: what the server may send on a stream before the client
    // opens its window further.
    let mut settings = vec![0, 4];
    settings.extend_from_slice(&window.to_be_bytes());
    h2.write_all(&frame(SETTINGS, 0, 0, &settings))
        .await
        .unwrap();
    h2.write_all(&get_headers(1, path)).await.unwrap();
    let watched = tokio::time::timeout(WITHIN, async {
        let mut answered = false;
        loop {
            let Some((kind, flags, id, payload)) = next_frame(&mut h2).await else {
                return answered;
            };
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    h2.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
                }
                PING if flags & 1 == 0 => {
                    let _ = h2.write_all(&frame(PING, 1, 0, &payload)).await;
                }
                HEADERS if id == 1 => answered = true,
                _ => {}
            }
        }
    })
    .await;
    let Ok(answered) = watched else {
        return false;
    };
    assert!(answered, "the stream was never answered");
    true
}

#[tokio::test]
async fn an_http2_stream_whose_window_stays_shut_closes_its_connection() {
    let (upstream, mut ended) = endless_upstream().await;
    let proxy = proxy_to(&upstream).await;
    assert!(
        an_http2_client_that_never_makes_room(&proxy, 0, "/api/endless").await,
        "the connection stayed open with its stream's window shut"
    );
    tokio::time::timeout(WITHIN, ended.recv())
        .await
        .expect("the upstream is still held by a stream the client never reads")
        .unwrap();
}

#[tokio::test]
async fn an_http2_stream_stalled_on_the_last_piece_of_its_answer_closes_its_connection() {
    // The upstream's answer (its JSON echo, some 600 bytes) is whole and read; the stream
    // still waits on the client for all but the 100 bytes its window allows. The connection
    // is idle (no request in flight) after a second, and then closes without waiting for it.
    let up = upstream::start().await;
    let config = config_to(&up.url()).add("server.connection_idle_timeout", "1s");
    let proxy = start_proxy(config).await;
    assert!(
        an_http2_client_that_never_makes_room(&proxy, 100, "/api/who").await,
        "the connection stayed open with the end of an answer unsent"
    );
}

#[tokio::test]
async fn a_slow_client_that_keeps_reading_gets_the_whole_answer() {
    let up = upstream::start().await;
    let proxy = proxy_to(&up.url()).await;
    let size = 16 << 20;
    for (name, request) in [
        (
            "lane",
            format!("GET /api/big?n={size} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"),
        ),
        (
            "hyper",
            format!(
                "POST /api/big?n={size} HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
            ),
        ),
    ] {
        let mut client = small_window_client(proxy.addr, 256 * 1024).await;
        client.write_all(request.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut received = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        // At most 256 KiB every 40 ms (6.4 MiB a second), so that the download lasts longer
        // than `send_timeout` and, once the buffers between are full, the proxy waits on this
        // client most of the time, but never for a whole `send_timeout`.
        loop {
            tokio::time::sleep(Duration::from_millis(40)).await;
            match tokio::time::timeout(WITHIN, client.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Ok(Err(error)) => panic!("{name}: the connection failed: {error}"),
                Err(_) => panic!("{name}: no byte for {WITHIN:?}"),
            }
        }
        let text = String::from_utf8_lossy(&received[..200.min(received.len())]).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
        let body_start = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let body = &received[body_start..];
        // The upstream's body is chunked on the way to the client or carries a length; either
        // way every `x` arrives.
        let xs = body.iter().filter(|&&b| b == b'x').count();
        assert_eq!(xs, size, "{name}: body cut short");
        assert!(
            started.elapsed() > Duration::from_millis(1500),
            "{name}: the client did not read slowly ({:?})",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_slow_http2_client_that_keeps_reading_gets_the_whole_answer() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = upstream::start().await;
    let proxy = proxy_to(&up.url()).await;
    let size = 16 << 20;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(256 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let request = http::Request::get(proxy.url(&format!("/api/big?n={size}")))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut received, mut paced) = (0usize, 0usize);
    // A pause of 40 ms after each 256 KiB (the window): the proxy waits on this client most of
    // the time, never for a whole `send_timeout`.
    while let Some(frame) = tokio::time::timeout(WITHIN, body.frame())
        .await
        .expect("no data for 10 s")
    {
        let frame = frame.expect("the stream failed");
        if let Some(data) = frame.data_ref() {
            received += data.len();
            paced += data.len();
            if paced >= 256 * 1024 {
                paced = 0;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
    }
    assert_eq!(received, size, "body cut short");
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the client did not read slowly ({:?})",
        started.elapsed()
    );
}
