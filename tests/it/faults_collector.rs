//! The trace collector gone silent: its TCP peer accepts and then neither reads nor answers
//! (a hung process, a dead link that still looks open). Requests never wait on the exporter:
//! spans go through a bounded queue that drops when full, and a batch the collector does not
//! answer is given up after the exporter's timeout, after which a collector that works again
//! gets the spans.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request that takes this long waited on something: a hang, not slowness.
const HANG: Duration = Duration::from_secs(5);
/// Requests in flight at once.
const CONCURRENCY: usize = 8;

/// The value of `vestibule_trace_spans_dropped_total{reason=...}` on `proxy`'s `/metrics`.
async fn dropped(proxy: &Proxy, reason: &str) -> u64 {
    let text = get(&format!("http://{}/metrics", proxy.admin), &[])
        .await
        .text();
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("vestibule_trace_spans_dropped_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `count` requests to `url`, `CONCURRENCY` at a time: asserts each is answered 200 within
/// [`HANG`].
async fn requests(url: &str, count: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, url) = (next.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let started = Instant::now();
                let reply = tokio::time::timeout(HANG, get(&url, &[])).await;
                let reply = reply.unwrap_or_else(|_| {
                    panic!("a request waited {HANG:?} with the trace collector silent")
                });
                assert_eq!(reply.status, 200, "{}", reply.text());
                assert!(started.elapsed() < HANG);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// A collector on `listener` that answers every POST 200; counts them.
fn collector(listener: tokio::net::TcpListener) -> Arc<AtomicUsize> {
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let posts = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let posts = posts.clone();
                    async move {
                        if req.uri().path() == "/v1/traces" {
                            posts.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("{}"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    posts
}

/// Every request is answered while the collector holds the exporter's batch unanswered and the
/// export queue overflows (its spans dropped and counted, never waited for); once a collector
/// answers at that address again, the spans reach it, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_never_holds_a_request_and_a_collector_back_gets_the_spans() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    // Accepted and kept open, never read from nor written to.
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let accepting = tokio::spawn({
        let held = held.clone();
        async move {
            while let Ok((tcp, _)) = silent.accept().await {
                held.lock().unwrap().push(tcp);
            }
        }
    });
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\nauth = \"none\"\n",
        up.url()
    );
    let text = config_toml(&routes)
        .add("telemetry.otlp_endpoint", format!("http://{addr}"))
        .add("telemetry.sample_ratio", 1.0);
    let proxy = start_proxy(&text).await;
    let url = proxy.url("/open/x");
    // The first batch goes out and is held.
    requests(&url, 10).await;
    eventually("the exporter reaches the collector", HANG, || async {
        (!held.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // Until the queue behind the held batch overflows, and on.
    let mut sent = 10;
    while dropped(&proxy, "queue_full").await == 0 {
        assert!(sent < 20_000, "the export queue never filled");
        requests(&url, 500).await;
        sent += 500;
    }
    requests(&url, 200).await;

    // The same address answers again (the silent connections still open): the batch held there
    // is given up after the exporter's timeout, and later spans arrive.
    accepting.abort();
    let listener = eventually("the collector's address is free again", HANG, || async {
        tokio::net::TcpListener::bind(addr).await.ok()
    })
    .await;
    let posts = collector(listener);
    eventually(
        "spans reach the collector once it answers again",
        Duration::from_secs(30),
        || async {
            requests(&url, 5).await;
            (posts.load(Ordering::SeqCst) > 0).then_some(())
        },
    )
    .await;
    assert!(dropped(&proxy, "export_failed").await > 0);
    drop(held);
}
