//! Upstream faults, from a raw TCP upstream that misbehaves on purpose: it resets mid-head and
//! mid-body, trickles its headers, answers garbage, or closes a kept-alive connection just as
//! the proxy reuses it. The browser gets a 502/504 JSON with a stable code and nothing else, the
//! proxy lets go of the broken upstream connection, and only a request that was never sent or
//! is idempotent is sent again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The route's time limit for the upstream's response head.
const ROUTE_TIMEOUT: Duration = Duration::from_millis(500);
const DEADLINE: Duration = Duration::from_secs(5);

/// A hand-written HTTP/1.1 upstream. It answers by path; every request line it read is
/// recorded; `drop_reused` makes it close a connection, unanswered, on that connection's second
/// request; `let_go` counts connections the proxy closed while the upstream still held them.
#[derive(Clone, Default)]
struct Raw {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
    drop_reused: Arc<AtomicBool>,
    let_go: Arc<AtomicUsize>,
}

impl Raw {
    async fn start() -> Raw {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw = Raw {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Raw::default()
        };
        let shared = raw.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(shared.clone().serve(tcp));
            }
        });
        raw
    }

    fn seen(&self, line: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.as_str() == line)
            .count()
    }

    fn let_go(&self) -> usize {
        self.let_go.load(Ordering::SeqCst)
    }

    async fn serve(self, mut tcp: TcpStream) {
        let mut served = 0;
        loop {
            let Some(line) = read_request(&mut tcp).await else {
                return;
            };
            self.seen.lock().unwrap().push(line.clone());
            if served > 0 && self.drop_reused.load(Ordering::SeqCst) {
                // Read, then closed unanswered: as if the idle timeout struck just then.
                return;
            }
            served += 1;
            let path = line.split(' ').nth(1).unwrap_or("");
            match path {
                "/api/reset-head" => {
                    let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                    return reset(tcp);
                }
                "/api/reset-body" => {
                    let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";
                    let _ = tcp.write_all(head.as_bytes()).await;
                    let _ = tcp.flush().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return reset(tcp);
                }
                "/api/slow-head" => {
                    let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\n").await;
                    // One header line every 100 ms, until the proxy hangs up.
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(30) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if tcp.write_all(b"x-slow: 1\r\n").await.is_err() {
                            self.let_go.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    return;
                }
                "/api/garbage" => {
                    let _ = tcp
                        .write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x7f\xff not http\r\n\r\n")
                        .await;
                    // Held open: the proxy must close it.
                    let mut rest = [0u8; 64];
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < deadline {
                        match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut rest))
                            .await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                self.let_go.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            _ => {}
                        }
                    }
                    return;
                }
                _ => {
                    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tcp.write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Closes with a TCP reset rather than an orderly FIN.
#[allow(deprecated)] // A zero linger never blocks: it resets at once.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Reads one request (head and `content-length` body); returns its request line, `None` at the
/// end of the connection.
async fn read_request(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.ok()?;
    let line = head.lines().next().unwrap_or("");
    // "GET /api/ok HTTP/1.1" -> "GET /api/ok"
    Some(line.rsplit_once(' ').map_or(line, |(l, _)| l).to_string())
}

/// A misbehaving upstream, a proxy in front of it and a client with its own connection pool.
struct Scene {
    raw: Raw,
    proxy: Proxy,
    client: TestClient,
}

impl Scene {
    async fn start() -> Scene {
        let raw = Raw::start().await;
        let proxy = proxy_for(&raw).await;
        Scene {
            raw,
            proxy,
            client: client(),
        }
    }
}

/// The proxy closes its one connection to the upstream (`what` happened).
async fn let_go_of_one(raw: &Raw, what: &str) {
    eventually(what, DEADLINE, || async {
        (raw.let_go() == 1).then_some(())
    })
    .await;
}

/// One worker, so that every request shares one upstream pool.
async fn proxy_for(raw: &Raw) -> Proxy {
    proxy_to(&raw.url, "").await
}

/// [`proxy_for`] an upstream at `url`, with `more` settings for its route.
async fn proxy_to(url: &str, more: &str) -> Proxy {
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{url}\"\ntimeout = \"{}ms\"\n{more}",
        ROUTE_TIMEOUT.as_millis()
    );
    let text = config_toml(&routes)
        .remove("server.shutdown_grace")
        .add("server.workers", 1);
    start_proxy(&text).await
}

/// Asserts a Vestibule error body: exactly `error` and `message`, the given code, no internals.
fn assert_error(reply: &Reply, status: u16, code: &str, raw: &Raw) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error", "message"], "{body}");
    assert_eq!(body["error"], code);
    let text = reply.text().to_lowercase();
    let port = raw.url.rsplit(':').next().unwrap();
    for internal in [
        "127.0.0.1",
        port,
        "hyper",
        "connection",
        "reset",
        "parse",
        "os error",
    ] {
        assert!(!text.contains(internal), "{internal:?} leaked in {text}");
    }
}

/// The proxy still answers on a connection of `client`'s pool, and the upstream still serves.
async fn still_serves(client: &TestClient, proxy: &Proxy) {
    let started = Instant::now();
    let reply = tokio::time::timeout(DEADLINE, request(client, "GET", &proxy.url("/api/ok")))
        .await
        .expect("the proxy hangs after an upstream fault");
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    assert!(started.elapsed() < DEADLINE);
}

async fn request(client: &TestClient, method: &str, url: &str) -> Reply {
    let body = if method == "POST" { "payload" } else { "" };
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_before_its_head_is_complete_is_a_502_json() {
    let Scene { raw, proxy, client } = Scene::start().await;
    let reply = request(&client, "GET", &proxy.url("/api/reset-head")).await;
    assert_error(&reply, 502, "upstream_unavailable", &raw);
    still_serves(&client, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_cuts_the_response_off_instead_of_completing_it() {
    let Scene {
        raw: _raw,
        proxy,
        client,
    } = Scene::start().await;
    let req = http::Request::get(proxy.url("/api/reset-body"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(req).await.unwrap();
    // The head was relayed before the reset: the status stands, the body must not look whole.
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
        .await
        .expect("the truncated body hangs instead of ending");
    assert!(
        body.is_err(),
        "a truncated body was delivered as if complete"
    );
    still_serves(&client, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_trickling_its_headers_is_a_504_within_the_route_timeout() {
    let Scene { raw, proxy, client } = Scene::start().await;
    let started = Instant::now();
    let reply = request(&client, "GET", &proxy.url("/api/slow-head")).await;
    let waited = started.elapsed();
    assert_error(&reply, 504, "upstream_timeout", &raw);
    assert!(
        waited >= ROUTE_TIMEOUT && waited < ROUTE_TIMEOUT + Duration::from_secs(1),
        "answered after {waited:?}"
    );
    let_go_of_one(&raw, "the proxy let go of the slow upstream connection").await;
    still_serves(&client, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_garbage_is_a_502_and_its_connection_is_closed() {
    let Scene { raw, proxy, client } = Scene::start().await;
    let reply = request(&client, "GET", &proxy.url("/api/garbage")).await;
    assert_error(&reply, 502, "upstream_unavailable", &raw);
    let_go_of_one(&raw, "the proxy closed the garbage connection").await;
    still_serves(&client, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_lost_on_a_reused_connection_is_sent_again_on_a_new_one() {
    let Scene { raw, proxy, client } = Scene::start().await;
    // A pooled upstream connection, then the upstream closes it as the next request arrives.
    assert_eq!(
        request(&client, "GET", &proxy.url("/api/ok")).await.status,
        200
    );
    raw.drop_reused.store(true, Ordering::SeqCst);
    let reply = request(&client, "GET", &proxy.url("/api/ok")).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "ok"),
        "a GET lost on a reused connection is retried"
    );
    assert_eq!(raw.seen("GET /api/ok"), 3, "first, lost, retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_lost_on_a_reused_connection_is_a_502_and_is_never_sent_twice() {
    let Scene { raw, proxy, client } = Scene::start().await;
    a_post_lost_on_reuse_is_a_502_sent_once(&client, &proxy, &raw, "plain").await;
    still_serves(&client, &proxy).await;
}

/// A `POST /api/ok` on a pooled connection (of the kind a POST is sent on: requests with a body
/// or a method that may not be repeated go through hyper's client, bodiless GETs do not), then
/// another that the upstream closes unanswered as it arrives: 502, and the upstream has seen
/// the lost one once, which it may have acted on (`context` names the case).
async fn a_post_lost_on_reuse_is_a_502_sent_once(
    client: &TestClient,
    proxy: &Proxy,
    raw: &Raw,
    context: &str,
) {
    let before = raw.seen("POST /api/ok");
    let pooled = request(client, "POST", &proxy.url("/api/ok")).await;
    assert_eq!(pooled.status, 200, "{context}");
    raw.drop_reused.store(true, Ordering::SeqCst);
    let reply = request(client, "POST", &proxy.url("/api/ok")).await;
    assert_error(&reply, 502, "upstream_unavailable", raw);
    raw.drop_reused.store(false, Ordering::SeqCst);
    assert_eq!(
        raw.seen("POST /api/ok") - before,
        2,
        "the pooled one, then the lost one: never sent again ({context})"
    );
}

/// RFC 9110 §9.2.2: a request whose bytes reached the upstream is sent again only when it is
/// idempotent. A POST on a reused connection that the upstream read, then answered with part of
/// a head and reset — or closed unanswered — may have been acted on: 502, never a second copy.
/// Through the workers' own HTTP/1.1 connections (a plain `http` upstream) and through hyper's
/// pooled client (an `https` upstream, HTTP/1.1 over TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_cut_off_mid_head_on_a_reused_connection_is_never_sent_twice() {
    let ca = crate::support::pki::TestCa::new("Upstream CA");
    for tls in [false, true] {
        let raw = Raw::start().await;
        let proxy = if tls {
            let plain = raw.url.trim_start_matches("http://").parse().unwrap();
            let (front, _) = crate::support::pki::tls_front(ca.acceptor(None), plain).await;
            let ca_file = format!("ca_file = {:?}\n", ca.ca_file.display().to_string());
            proxy_to(&format!("https://{front}"), &ca_file).await
        } else {
            proxy_for(&raw).await
        };
        let client = client();
        // A pooled connection, then the POST that the upstream cuts off mid-head on it.
        let first = request(&client, "POST", &proxy.url("/api/ok")).await;
        assert_eq!(first.status, 200, "over TLS: {tls}");
        let reply = request(&client, "POST", &proxy.url("/api/reset-head")).await;
        assert_error(&reply, 502, "upstream_unavailable", &raw);
        assert_eq!(
            raw.seen("POST /api/reset-head"),
            1,
            "the upstream read the POST and began answering: never sent again (over TLS: {tls})"
        );
        // Closed unanswered on reuse.
        let context = format!("over TLS: {tls}");
        a_post_lost_on_reuse_is_a_502_sent_once(&client, &proxy, &raw, &context).await;
        still_serves(&client, &proxy).await;
    }
}

/// The same over HTTP/2 (an `https` upstream offering `h2`): a POST whose stream the upstream
/// reset once it had read the request is a 502, and the upstream has seen it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_http2_stream_the_upstream_reset_is_never_sent_twice() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let ca = crate::support::pki::TestCa::new("Upstream CA");
    let acceptor = ca.h2_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(http::Version, String)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let (version, path) = (req.version(), req.uri().path().to_string());
                            let _ = req.into_body().collect().await;
                            log.lock().unwrap().push((version, path.clone()));
                            if path == "/api/reset" {
                                // An error from the service: the stream is reset, unanswered.
                                return Err(std::io::Error::other("reset"));
                            }
                            Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let ca_file = format!("ca_file = {:?}\n", ca.ca_file.display().to_string());
    let proxy = proxy_to(&format!("https://{addr}"), &ca_file).await;
    let client = client();
    assert_eq!(
        request(&client, "POST", &proxy.url("/api/ok")).await.status,
        200
    );
    let reply = request(&client, "POST", &proxy.url("/api/reset")).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "upstream_unavailable");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(v, _)| *v == http::Version::HTTP_2),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|(_, p)| p == "/api/reset").count(),
        1,
        "the reset POST was sent again: {seen:?}"
    );
}

/// An upstream across a real network link that goes dead (a partition: no RST, no FIN,
/// connection attempts unanswered). Meanwhile each request is a 504 (or 502) within the route's
/// timeout — on a pooled connection into the dead link or on a new one whose connection attempt
/// goes unanswered — and once the link is back, every request works again within a couple of
/// seconds: no pooled connection into the dead link is handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_behind_a_dead_link_is_504_fast_and_back_soon_after_the_link() {
    let up = crate::support::upstream::start().await;
    let mut host = crate::support::netns::NetHost::start();
    let behind = host.reach(up.addr.unwrap()).await;
    let proxy = proxy_to(&format!("http://{behind}"), "").await;
    let url = proxy.url("/api/x");
    let burst = |n: usize| {
        let url = url.clone();
        async move {
            futures_util::future::join_all((0..n).map(|_| {
                let url = url.clone();
                async move {
                    let started = Instant::now();
                    let reply = get(&url, &[]).await;
                    (reply, started.elapsed())
                }
            }))
            .await
        }
    };
    // Several connections pooled.
    for (reply, _) in burst(4).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }

    host.partition();
    let limit = ROUTE_TIMEOUT + Duration::from_millis(100) + Duration::from_millis(500);
    // More at once than are pooled: pooled connections and new ones.
    for _ in 0..2 {
        for (reply, took) in burst(6).await {
            assert!(
                matches!(reply.status, 502 | 504),
                "{} {}",
                reply.status,
                reply.text()
            );
            assert!(took <= limit, "a request into the dead link took {took:?}");
        }
    }
    // Long enough for the retransmission timers of connections into the dead link to back off
    // past several seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    host.heal();
    let healed = Instant::now();
    eventually("requests work again", Duration::from_secs(10), || async {
        burst(6)
            .await
            .iter()
            .all(|(reply, _)| reply.status == 200)
            .then_some(())
    })
    .await;
    let back = healed.elapsed();
    // And keep working: no request after that meets a connection from before.
    for _ in 0..3 {
        for (reply, _) in burst(6).await {
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    assert!(
        back <= Duration::from_secs(2),
        "requests worked again only {back:?} after the link was back"
    );
}

/// An HTTP/2 upstream (https, `h2`) across a real network link that goes dead. Its one
/// connection carries every request, and a request that times out leaves it in the pool: it must
/// not stay there until TCP's backed-off retransmission resumes it, seconds after the link is
/// back. Requests are 502/504 within the route's timeout meanwhile, and work again within a
/// couple of seconds of the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_behind_a_dead_link_is_504_fast_and_back_soon_after_the_link() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut host = crate::support::netns::NetHost::start();
    let ca = crate::support::pki::TestCa::new("Upstream CA");
    let acceptor = ca.h2_acceptor_also_for(&host.address.to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let behind = host.reach(addr).await;
    let ca_file = format!("ca_file = {:?}\n", ca.ca_file.display().to_string());
    let proxy = proxy_to(&format!("https://{behind}"), &ca_file).await;
    let url = proxy.url("/api/x");
    for _ in 0..3 {
        let reply = get(&url, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    host.partition();
    let limit = ROUTE_TIMEOUT + Duration::from_millis(600);
    for _ in 0..4 {
        let started = Instant::now();
        let reply = get(&url, &[]).await;
        assert!(
            matches!(reply.status, 502 | 504),
            "{} {}",
            reply.status,
            reply.text()
        );
        assert!(started.elapsed() <= limit, "took {:?}", started.elapsed());
    }
    // Long enough for the retransmission timer of the connection to back off past seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    host.heal();
    let healed = Instant::now();
    eventually("requests work again", Duration::from_secs(15), || async {
        (get(&url, &[]).await.status == 200).then_some(())
    })
    .await;
    let back = healed.elapsed();
    for _ in 0..5 {
        assert_eq!(get(&url, &[]).await.status, 200);
    }
    assert!(
        back <= Duration::from_secs(2),
        "requests worked again only {back:?} after the link was back"
    );
}
