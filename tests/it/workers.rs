//! Serving workers: connections are spread over them, each serves its own connections to the
//! end, `/metrics` shows how many each holds, and `/healthz` is 200 while they turn, also when
//! nobody reads the log. Run one at a time (`scripts/test`), so the process-wide metrics belong
//! to one proxy alone.
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

/// An HTTP/1.1 keep-alive connection to `addr`: its sender, and the task driving it.
async fn keep_alive(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
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
        let (mut sender, driver) = keep_alive(proxy.addr).await;
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

/// A log nobody reads stops no worker: the binary's log (stderr) is a pipe that nobody reads,
/// as when a log shipper stops. Far more access-log lines than the pipe and the log's queue
/// hold are all answered, `/healthz` stays 200, and the lines that did not fit are dropped and
/// counted. Once the pipe is read again, later lines arrive, after one that says how many were
/// dropped meanwhile.
#[tokio::test]
async fn a_log_nobody_reads_stops_no_worker_and_healthz_stays_200() {
    // Every part bound, so that none is dropped (the provider, the upstream) before the end.
    let Binary {
        mut child,
        port,
        admin,
        up,
        _idp,
        _dir,
    } = Binary::start(std::process::Stdio::piped()).await;
    let log = child.0.stderr.take().unwrap();

    // Each answer writes an access-log line of some 400 bytes (the path is most of it): 8,000
    // of them are ~3 MiB, the pipe's 64 KiB and the queue's 1 MiB many times over. Four
    // keep-alive connections, two on each worker.
    flood(port, 4, 2_000, 240, false).await;
    assert_eq!(up.count(), 8_000);

    let probe = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(5), get(&url, &[]))
            .await
            .expect("the admin listener answers")
    };
    // Past a stall's five seconds: every worker still ticks.
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    let reply = probe(format!("http://127.0.0.1:{admin}/healthz")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        serde_json::json!({"status": "ok", "workers": 2})
    );
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let dropped_so_far = || async {
        let metrics = probe(metrics_url.clone()).await.text();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("vestibule_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no vestibule_log_lines_dropped_total:\n{metrics}"))
    };
    assert!(dropped_so_far().await > 0);

    // The log is read again: a later line arrives, after the one that counts the drops. While
    // the backlog is still going out, a new line may find the queue full and be dropped too
    // (the count then waits for the next line that gets in): one more request each try.
    let (text, reading) = read_in_background(log);
    let (note, later) = eventually(
        "a later line and the count of drops are written",
        Duration::from_secs(20),
        || async {
            let text = log_after_one_more_request(port, &text).await;
            let later = text.find("/api/after-the-stall")?;
            let note = text
                .lines()
                .find(|l| l.contains("log lines dropped"))?
                .to_string();
            let before = text[..later].contains(&note);
            Some((note, before))
        },
    )
    .await;
    assert!(later, "the count comes before the later line: {note}");
    // The queue may fill and take lines again more than once: each time the first line it
    // takes follows a count of those dropped since the last. Together they are every drop.
    let count = |line: &str| -> u64 {
        line.split("dropped=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line:?}"))
    };
    let counter = dropped_so_far().await;
    let text = String::from_utf8_lossy(&text.lock().unwrap()).into_owned();
    let counted: u64 = text
        .lines()
        .filter(|l| l.contains("log lines dropped"))
        .map(count)
        .sum();
    assert_eq!(counted, counter, "{note}");
    drop(child);
    let _ = reading.join();
}

/// An operator who logs errors and the access log only (`level = "error,vestibule::access=info"`)
/// still learns that lines were lost: the count of drops is shown whatever the level. The
/// binary's stderr is a pipe nobody reads until ~3 MiB of access log (the pipe's 64 KiB, a
/// batch being written and the queue's 1 MiB many times over) were logged; once it is read, the
/// count arrives.
#[tokio::test]
async fn a_log_at_level_error_still_says_how_many_lines_were_dropped() {
    let Binary {
        mut child,
        port,
        admin: _admin,
        up: _up,
        _idp,
        _dir,
    } = Binary::start_logging(std::process::Stdio::piped(), "error,vestibule::access=info").await;
    let log = child.0.stderr.take().unwrap();
    // Lines of some 650 bytes: the path and the user agent are each cut at 256.
    flood(port, 2, 2_500, 256, true).await;
    let (text, reading) = read_in_background(log);
    // One more request each try: the count goes out before the next line the queue takes.
    eventually(
        "the count of dropped lines is written at level error",
        Duration::from_secs(20),
        || async {
            let text = log_after_one_more_request(port, &text).await;
            text.lines()
                .any(|l| l.contains("log lines dropped"))
                .then_some(())
        },
    )
    .await;
    drop(child);
    let _ = reading.join();
}

/// `/healthz` names a serving worker whose thread is held for seconds and is 200 again once it
/// runs: the real binary, one of its workers' threads held by `strace` at its next `epoll_wait`
/// for 8 s (its system call delayed, as a hung disk or a wedged library call would hold it),
/// while the other worker and the admin listener run on. A connection handed to it meanwhile is
/// answered once it runs again.
#[tokio::test]
async fn healthz_names_a_worker_whose_thread_is_held_until_it_runs_again() {
    let Binary {
        child,
        port,
        admin,
        up: _up,
        _idp,
        _dir,
    } = Binary::start(std::process::Stdio::null()).await;
    let healthz = format!("http://127.0.0.1:{admin}/healthz");
    let probe = |url: String| async move {
        tokio::time::timeout(Duration::from_secs(5), get(&url, &[]))
            .await
            .expect("the admin listener answers")
    };
    assert_eq!(probe(healthz.clone()).await.status, 200);

    // The workers' threads (`vestibule-worker-N`, cut to 15 bytes by the kernel), started in
    // order: worker 0's has the lowest id.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.0.id())).unwrap();
    let mut workers: Vec<u32> = tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            comm.starts_with("vestibule-worke")
                .then(|| task.file_name().to_str()?.parse().ok())?
        })
        .collect();
    workers.sort_unstable();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let calls = "epoll_wait,epoll_pwait,epoll_pwait2";
    let _held = Killed(
        std::process::Command::new("strace")
            .args(["-qq", "-o", "/dev/null", "-p", &workers[0].to_string()])
            .arg(format!("--trace={calls}"))
            .arg(format!("--inject={calls}:delay_enter=8000000:when=1"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("strace (scripts/test installs it)"),
    );

    // Five seconds without a tick (from its next wait, within a second), and the probe's poll.
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

    // The first connection goes to worker 0 (both hold none): unanswered while it is held,
    // answered once it runs; then /healthz is 200 again.
    let (mut sender, driver) = keep_alive(([127, 0, 0, 1], port).into()).await;
    let req = http::Request::get("/api/held")
        .header("host", "app.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut answer = tokio::spawn(sender.send_request(req));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut answer)
            .await
            .is_err(),
        "worker 0 answered while its thread was held"
    );
    let answered = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the held worker answers once it runs")
        .unwrap()
        .unwrap();
    assert_eq!(answered.status(), 200);
    eventually("healthz is 200 again", Duration::from_secs(5), || async {
        (probe(healthz.clone()).await.status == 200).then_some(())
    })
    .await;
    driver.abort();
}

/// `per_connection` requests on each of `connections` keep-alive connections, every one
/// answered 200 within 5 s, with paths `long` bytes long (and a user agent as long, if asked):
/// an access-log line each, some hundreds of bytes.
async fn flood(port: u16, connections: usize, per_connection: usize, long: usize, agent: bool) {
    let long = "a".repeat(long);
    let mut senders = Vec::new();
    for connection in 0..connections {
        let long = long.clone();
        senders.push(tokio::spawn(async move {
            let (mut sender, driver) = keep_alive(([127, 0, 0, 1], port).into()).await;
            for n in 0..per_connection {
                let mut req = http::Request::get(format!("/api/{long}/{connection}/{n}"))
                    .header("host", "app.test");
                if agent {
                    req = req.header("user-agent", long.as_str());
                }
                sender.ready().await.unwrap();
                let answer = tokio::time::timeout(
                    Duration::from_secs(5),
                    sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
                )
                .await
                .unwrap_or_else(|_| {
                    panic!("request {n} on connection {connection} went unanswered: its worker is blocked on the log")
                })
                .unwrap();
                assert_eq!(answer.status(), 200, "request {n} on connection {connection}");
                answer.into_body().collect().await.unwrap();
            }
            driver.abort();
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
}

/// The binary's stderr, read to the end by a thread of its own into the text returned.
fn read_in_background(
    mut log: std::process::ChildStderr,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<()>,
) {
    use std::io::Read;
    let text = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let reading = std::thread::spawn({
        let text = text.clone();
        move || {
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = log.read(&mut chunk) {
                text.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        }
    });
    (text, reading)
}

/// The log read so far, after one more request (`/api/after-the-stall`): a count of dropped
/// lines goes out before the next line the queue takes.
async fn log_after_one_more_request(port: u16, text: &std::sync::Mutex<Vec<u8>>) -> String {
    let after = get(
        &format!("http://127.0.0.1:{port}/api/after-the-stall"),
        &[("host", "app.test")],
    )
    .await;
    assert_eq!(after.status, 200);
    String::from_utf8_lossy(&text.lock().unwrap()).into_owned()
}

/// The real binary with two serving workers and a route `/api/` to an upstream of its own, its
/// listeners on free ports and ready, a provider that answers (so that nothing on the admin
/// listener's runtime retries or logs meanwhile), its stderr as given.
struct Binary {
    child: Killed,
    port: u16,
    admin: u16,
    up: upstream::Upstream,
    _idp: crate::support::fake_idp::FakeIdp,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(stderr: std::process::Stdio) -> Binary {
        Binary::start_logging(stderr, "info").await
    }

    /// [`Binary::start`] with `[log] level` set to `level`.
    async fn start_logging(stderr: std::process::Stdio, level: &str) -> Binary {
        use vestibule::jose::testing::{TestKey, TestSigner};
        let signer = TestSigner::new();
        let idp = crate::support::fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
        let up = upstream::start().await;
        let (port, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let routes = format!(
            "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\n",
            up.url()
        );
        let config = config_toml(&routes)
            .set("server.listen", format!("127.0.0.1:{port}"))
            .set("admin.listen", format!("127.0.0.1:{admin}"))
            .set("oidc.issuer", idp.issuer.as_str())
            .add("server.workers", 2)
            .add("log.level", level);
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config.text()).unwrap();
        let child = Killed(
            std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
                .arg("--config")
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        );
        wait_binary_ready(admin).await;
        Binary {
            child,
            port,
            admin,
            up,
            _idp: idp,
            _dir: dir,
        }
    }
}

/// A child process, killed when dropped (also when an assertion fails first).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A SIGHUP reload whose configuration file cannot be read (every open of it blocks, as on a
/// hung mount), and the file watcher's look at it: each waits on a thread of its own, so new
/// connections are still taken and served, `/healthz` answers, and a SIGTERM still stops the
/// process long before the file would open (the runtime does not wait for a stuck look).
#[tokio::test]
async fn a_reload_stuck_on_its_file_holds_no_connection_nor_the_exit() {
    let Binary {
        mut child,
        port,
        admin,
        up,
        _idp,
        _dir,
    } = Binary::start(std::process::Stdio::null()).await;
    let lease = crate::support::leased::Leased::hold(&_dir.path().join("config.toml"));
    let pid = child.0.id().to_string();
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success()
    };
    assert!(signal("-HUP"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 0..4 {
        // A new connection each: the accept loop hands it to a worker.
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            get(&format!("http://127.0.0.1:{port}/api/while-stuck/{n}"), &[]),
        )
        .await
        .expect("a new connection is served while the reload waits on its file");
        assert_eq!(reply.status, 200);
    }
    assert_eq!(up.count(), 4);
    let healthz = tokio::time::timeout(
        Duration::from_secs(3),
        get(&format!("http://127.0.0.1:{admin}/healthz"), &[]),
    )
    .await
    .expect("the admin listener answers while the reload waits on its file");
    assert_eq!(healthz.status, 200, "{}", healthz.text());
    // The file watcher's look (every second) is stuck on the file by now as well.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        get(
            &format!("http://127.0.0.1:{port}/api/while-stuck/last"),
            &[],
        ),
    )
    .await
    .expect("a new connection is served while the watcher waits on the file");
    assert_eq!(reply.status, 200);

    assert!(signal("-TERM"));
    let asked = std::time::Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "SIGTERM did not stop a process whose reload waits on its file"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(lease);
}
