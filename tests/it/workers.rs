//! Serving workers: connections are spread over them, each serves its own connections to the
//! end, and `/metrics` shows how many each holds. Its own test binary, so the process-wide
//! metrics belong to this proxy alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;

fn open_connections(metrics: &str, worker: usize) -> Option<f64> {
    let prefix = format!("vestibule_connections_open{{worker=\"{worker}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

async fn metrics(proxy: &Proxy) -> String {
    get(&format!("http://{}/metrics", proxy.admin), &[])
        .await
        .text()
}

#[tokio::test]
async fn connections_are_spread_over_the_workers_and_counted() {
    let up = upstream::start().await;
    let proxy = start_proxy(&workers_config(&up.url(), 3)).await;

    // Six keep-alive connections, each answered once and held open.
    let mut held = Vec::new();
    for n in 0..6 {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        let req = http::Request::get(format!("/api/conn/{n}"))
            .header("host", "app.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        assert_eq!(up.last().uri, format!("/api/conn/{n}"));
        held.push((sender, driver));
    }
    let text = metrics(&proxy).await;
    for worker in 0..3 {
        assert_eq!(
            open_connections(&text, worker),
            Some(2.0),
            "worker {worker} should hold 2 of 6 connections:\n{text}"
        );
    }

    // A request on an already open connection is still answered by its worker.
    let (sender, _) = &mut held[4];
    let req = http::Request::get("/api/again")
        .header("host", "app.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.ready().await.unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);

    // Closed connections are counted off.
    for (sender, driver) in held {
        drop(sender);
        let _ = driver.await;
    }
    eventually(
        "no connection is still counted",
        Duration::from_secs(5),
        || async {
            let text = metrics(&proxy).await;
            let total: f64 = (0..3).filter_map(|w| open_connections(&text, w)).sum();
            // The metrics request itself goes to the admin listener, not to a worker.
            (total == 0.0).then_some(())
        },
    )
    .await;
}
