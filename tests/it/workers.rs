//! Serving workers: connections are spread over them, each serves its own connections to the
//! end, `/metrics` shows how many each holds, and `/healthz` fails while one is stuck. Run one
//! at a time (`scripts/test`), so the process-wide metrics belong to one proxy alone.
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

/// `/healthz` is 200 while every serving worker's runtime turns, and says how many there are.
#[tokio::test]
async fn healthz_is_200_and_counts_the_workers_while_every_worker_ticks() {
    let up = upstream::start().await;
    let proxy = start_proxy(&workers_config(&up.url(), 3)).await;
    let url = format!("http://{}/healthz", proxy.admin);
    // Past the first tick of every worker, and a couple more.
    for _ in 0..3 {
        let reply = get(&url, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json(),
            serde_json::json!({"status": "ok", "workers": 3})
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

/// A worker really wedged, from outside the process: the binary's log (stderr) is a pipe that
/// nobody reads, as when a log shipper stops. Once the pipe is full, the worker that writes the
/// next access-log line blocks in `write(2)`, and its whole thread with it; its connections get
/// no answer. `/healthz` (the admin listener writes no log) then answers 503 naming that worker
/// and not the other, until the pipe is read again.
#[tokio::test]
async fn healthz_names_a_worker_whose_thread_is_blocked_until_it_runs_again() {
    use std::io::Read;
    use vestibule::jose::testing::{TestKey, TestSigner};
    // A provider that answers, so that nothing on the admin listener's runtime logs meanwhile.
    let signer = TestSigner::new();
    let idp = crate::support::fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = config_toml("")
        .set("server.listen", format!("127.0.0.1:{port}"))
        .set("admin.listen", format!("127.0.0.1:{admin}"))
        .set("oidc.issuer", idp.issuer.as_str())
        .add("server.workers", 2);
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config.text()).unwrap();
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = child.0.stderr.take().unwrap();
    let healthz = format!("http://127.0.0.1:{admin}/healthz");
    let probe = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(5), get(&url, &[]))
            .await
            .expect("the admin listener answers")
    };
    wait_binary_ready(admin).await;
    let reply = probe(healthz.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["workers"], 2);

    // One keep-alive connection: the first connection goes to worker 0, and so does every
    // request on it. Each request writes an access-log line; one of them fills the pipe.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let (mut stuck, mut status) = (None, None);
    for _ in 0..20_000 {
        let req = http::Request::get("/bff/user")
            .header("host", "app.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let mut answer = tokio::spawn(sender.send_request(req));
        match tokio::time::timeout(Duration::from_secs(2), &mut answer).await {
            Ok(response) => {
                let response = response.unwrap().unwrap();
                status = Some(response.status());
                response.into_body().collect().await.unwrap();
            }
            Err(_) => {
                stuck = Some(answer);
                break;
            }
        }
    }
    let stuck = stuck.expect("a request went unanswered once the log pipe was full");

    // Five seconds without a tick, and the probe's own poll.
    let reply = eventually(
        "healthz says worker 0 is stalled",
        Duration::from_secs(10),
        || async {
            let reply = probe(healthz.clone()).await;
            (reply.status == 503).then_some(reply)
        },
    )
    .await;
    let body = reply.json();
    assert_eq!(body["status"], "stalled", "{body}");
    assert_eq!(body["workers"], 2, "{body}");
    let stalled: Vec<u64> = body["stalled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_u64().unwrap())
        .collect();
    assert_eq!(stalled, [0], "only worker 0 is stalled: {body}");
    let silent = body["stalled"][0]["silent_ms"].as_u64().unwrap();
    assert!((5_000..60_000).contains(&silent), "{body}");

    // The log is read again: the worker writes its line, answers, and ticks again.
    let reading = std::thread::spawn(move || {
        let mut sink = [0u8; 64 * 1024];
        while matches!(log.read(&mut sink), Ok(n) if n > 0) {}
    });
    let answered = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the stuck request is answered once the log is read")
        .unwrap()
        .unwrap();
    assert_eq!(Some(answered.status()), status);
    eventually("healthz is 200 again", Duration::from_secs(5), || async {
        (probe(healthz.clone()).await.status == 200).then_some(())
    })
    .await;
    drop(sender);
    driver.abort();
    drop(child);
    let _ = reading.join();
}

/// A child process, killed when dropped (also when an assertion fails first).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
