//! Rolling restarts and reloads lose nothing: the real binary, SIGTERMed (or reloaded with
//! SIGHUP) while a bounded load of concurrent keep-alive requests runs against it.
//!
//! The test plays the load balancer in front of two replicas: a request the first replica never
//! took (connection refused, or closed before anything was answered) goes to the second, as a
//! balancer would do. Each replica has its own recording upstream, so the test knows which
//! requests a replica accepted and forwarded: every one of those must have been answered.
//! The order checked is the one `deploy/kubernetes` relies on after its `preStop` pause:
//! `/readyz` 503 first, in-flight requests finish, kept-alive connections are told
//! `Connection: close`, then the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::upstream::{self, Upstream};
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vestibule::jose::testing::{TestKey, TestSigner};

const DEADLINE: Duration = Duration::from_secs(10);

/// The binary as a child process, killed on drop.
struct Replica {
    child: Child,
    port: u16,
    admin: u16,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn config_for(port: u16, admin: u16, issuer: &str, upstream: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n\
         shutdown_grace = \"5s\"\nworkers = 2\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [oidc]\nissuer = \"{issuer}\"\nallow_http_issuer = true\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         [session]\ncookie_secure = false\nkeys = [\"{KEY}\"]\n\
         [[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n"
    )
}

impl Replica {
    async fn start(issuer: &str, upstream: &Upstream) -> Replica {
        let (port, admin) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_for(port, admin, issuer, &upstream.url())).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vestibule"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let replica = Replica {
            child,
            port,
            admin,
            config,
            _dir: dir,
        };
        eventually("the replica is ready", DEADLINE, || async {
            replica.ready().await.filter(|r| r.status == 200).map(drop)
        })
        .await;
        replica
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `/readyz`, or `None` if the admin listener does not answer.
    async fn ready(&self) -> Option<Reply> {
        let req = http::Request::get(format!("http://127.0.0.1:{}/readyz", self.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(DEADLINE, client().request(req))
            .await
            .ok()?
            .ok()?;
        let (parts, body) = response.into_parts();
        Some(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.ok()?.to_bytes(),
        })
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one request of the load ended with.
#[derive(Debug)]
struct Sent {
    id: u64,
    /// Which replica answered: 0 the first, 1 the second, `None`: no answer at all.
    by: Option<usize>,
    status: u16,
    closes: bool,
    /// Why the first replica did not answer, when it did not.
    missed: Option<String>,
    at: Instant,
}

impl Sent {
    fn unanswered(id: u64) -> Sent {
        Sent {
            id,
            by: None,
            status: 0,
            closes: false,
            missed: None,
            at: Instant::now(),
        }
    }
}

/// A bounded loop of concurrent keep-alive requests to `urls[0]`, falling back to `urls[1]`
/// for requests the first never answered.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn attempt(client: &TestClient, url: &str, id: u64) -> Result<(u16, bool), String> {
    let req = http::Request::get(format!("{url}?id={id}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let closes = response
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    // A body cut off is a failure of an accepted request, never a reason to go elsewhere.
    let body = response.into_body().collect().await;
    assert!(body.is_ok(), "request {id}: the answer's body was cut off");
    Ok((status, closes))
}

impl Load {
    fn start(urls: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..6)
            .map(|_| {
                let (urls, stop, sent, next) =
                    (urls.clone(), stop.clone(), sent.clone(), next.clone());
                tokio::spawn(async move {
                    let clients: Vec<TestClient> = urls.iter().map(|_| client()).collect();
                    for _ in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let id = next.fetch_add(1, Ordering::SeqCst);
                        let mut record = Sent::unanswered(id);
                        for (i, url) in urls.iter().enumerate() {
                            match attempt(&clients[i], url, id).await {
                                Ok((status, closes)) => {
                                    (record.by, record.status, record.closes) =
                                        (Some(i), status, closes);
                                    break;
                                }
                                Err(why) if i == 0 => record.missed = Some(why),
                                Err(_) => {}
                            }
                        }
                        record.at = Instant::now();
                        sent.lock().unwrap().push(record);
                    }
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }

    fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    async fn run_for(&self, more: usize) {
        let target = self.count() + more;
        eventually("the load makes progress", DEADLINE, || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.sent).unwrap().into_inner().unwrap()
    }
}

/// One request on `tcp`; `Err` if the connection ended before a whole answer.
async fn raw_request(tcp: &mut tokio::net::TcpStream, id: u64) -> Result<(u16, bool), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /api/load?id={id} HTTP/1.1\r\nHost: vestibule\r\n\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                    return Ok((status, head.contains("connection: close")));
                }
            }
            match tcp.read(&mut chunk).await {
                Ok(0) => return Err("closed before an answer".to_string()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .map_err(|_| "no answer in time".to_string())?
}

impl Load {
    /// Like `wrk`: each connection sends its next request the moment the previous answer is read,
    /// and opens a new connection only when told `Connection: close` or when the old one is gone.
    /// A request lost on a connection that had already been answered on (kept alive) is a failure:
    /// the server must say `Connection: close` rather than drop such a connection. A request lost
    /// on a brand-new connection was never accepted (it raced the listener closing) and goes to the
    /// other replica, as a balancer would send it.
    fn raw(ports: [u16; 2]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..6)
            .map(|_| {
                let (stop, sent, next) = (stop.clone(), sent.clone(), next.clone());
                tokio::spawn(async move {
                    // (connection, replica, answers it gave)
                    let mut open: Option<(tokio::net::TcpStream, usize, usize)> = None;
                    for _ in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let id = next.fetch_add(1, Ordering::SeqCst);
                        let mut record = Sent::unanswered(id);
                        let mut first = 0;
                        loop {
                            if open.is_none() {
                                for (i, port) in ports.iter().enumerate().skip(first) {
                                    if let Ok(tcp) =
                                        tokio::net::TcpStream::connect(("127.0.0.1", *port)).await
                                    {
                                        open = Some((tcp, i, 0));
                                        break;
                                    }
                                }
                            }
                            let Some((tcp, replica, answered)) = open.as_mut() else {
                                record.missed = Some("no replica accepts connections".into());
                                break;
                            };
                            let replica = *replica;
                            match raw_request(tcp, id).await {
                                Ok((status, closes)) => {
                                    *answered += 1;
                                    (record.by, record.status, record.closes) =
                                        (Some(replica), status, closes);
                                    if closes {
                                        open = None;
                                    }
                                    break;
                                }
                                Err(why) => {
                                    let kept_alive = *answered > 0;
                                    open = None;
                                    record.missed = Some(why);
                                    if kept_alive || replica == 1 {
                                        break;
                                    }
                                    // Never accepted: the other replica gets it.
                                    first = 1;
                                }
                            }
                        }
                        record.at = Instant::now();
                        sent.lock().unwrap().push(record);
                    }
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }
}

/// The ids of the load requests an upstream received.
fn ids_seen(upstream: &Upstream) -> HashSet<u64> {
    upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| s.uri.split("id=").nth(1)?.parse().ok())
        .collect()
}

/// Reads a whole HTTP/1.1 response from a blocking socket until the server closes it.
fn read_until_closed(mut tcp: std::net::TcpStream) -> String {
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out)
        .expect("the server closed the connection after its answer");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_flips_readyz_first_finishes_in_flight_requests_and_loses_none() {
    let idp =
        crate::support::fake_idp::start(TestSigner::new().jwks_json(&[(TestKey::Rsa1, "k1")]))
            .await;
    let (up_a, up_b) = (upstream::start().await, upstream::start().await);
    let mut a = Replica::start(&idp.issuer, &up_a).await;
    let b = Replica::start(&idp.issuer, &up_b).await;

    let load = Load::raw([a.port, b.port]);
    load.run_for(100).await;
    // A slow request in flight on a kept-alive connection when the signal comes.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    write!(slow, "GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    eventually(
        "the slow request reached the upstream",
        DEADLINE,
        || async {
            up_a.seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.uri.ends_with("/slow"))
                .then_some(())
        },
    )
    .await;
    let slow_reader = std::thread::spawn(move || {
        let text = read_until_closed(slow.try_clone().unwrap());
        drop(slow);
        (text, Instant::now())
    });

    let signalled = Instant::now();
    a.signal("TERM");
    let unready = eventually("readyz says 503", DEADLINE, || async {
        a.ready()
            .await
            .filter(|r| r.status == 503)
            .map(|r| (r.json(), Instant::now()))
    })
    .await;
    assert_eq!(unready.0["checks"]["accepting"], false, "{}", unready.0);

    let exited = eventually("the replica exits", DEADLINE, || {
        let status = a.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exited.success(), "SIGTERM must end with exit 0: {exited}");
    let (slow_answer, slow_done) = slow_reader.join().unwrap();
    load.run_for(50).await;
    let sent = load.finish().await;

    // 1. Not ready before the in-flight request was answered.
    assert!(
        unready.1 < slow_done,
        "readyz still said 200 after the in-flight request ended"
    );
    // 2. The in-flight request finished, and its kept-alive connection was told to close.
    let head = slow_answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{slow_answer}");
    assert!(head.contains("connection: close"), "{slow_answer}");
    assert!(slow_answer.ends_with("slow done"), "{slow_answer}");
    // 3. Every request got a 200 from one replica or the other: none was lost on a kept-alive
    //    connection closed under it.
    let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // 4. None that the signalled replica accepted (and forwarded) went unanswered.
    let accepted_by_a = ids_seen(&up_a);
    for s in &sent {
        if accepted_by_a.contains(&s.id) {
            assert_eq!(
                s.by,
                Some(0),
                "request {} was accepted by the stopping replica but not answered by it: {:?}",
                s.id,
                s.missed
            );
        }
    }
    // 5. Its kept-alive connections were told `Connection: close` rather than dropped.
    let told = sent
        .iter()
        .filter(|s| s.by == Some(0) && s.at > signalled && s.closes)
        .count();
    assert!(
        told > 0,
        "no answer during the drain carried Connection: close"
    );
    let after: Vec<&Sent> = sent.iter().filter(|s| s.at > signalled).collect();
    assert!(
        after.iter().filter(|s| s.by == Some(1)).count() >= 50,
        "the load did not move on to the other replica"
    );
    assert_eq!(
        up_a.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.ends_with("/slow"))
            .count(),
        1
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_under_load_loses_nothing() {
    let idp =
        crate::support::fake_idp::start(TestSigner::new().jwks_json(&[(TestKey::Rsa1, "k1")]))
            .await;
    let (up_a, up_b) = (upstream::start().await, upstream::start().await);
    let a = Replica::start(&idp.issuer, &up_a).await;
    // No fallback: every request goes to this one replica.
    let load = Load::start(vec![a.url("/api/load")]);
    load.run_for(100).await;

    let text = config_for(a.port, a.admin, &idp.issuer, &up_b.url());
    std::fs::write(&a.config, text).unwrap();
    a.signal("HUP");
    eventually("the new upstream gets the load", DEADLINE, || async {
        (up_b.count() > 50).then_some(())
    })
    .await;
    for _ in 0..5 {
        let ready = a.ready().await.expect("readyz answers");
        assert_eq!(ready.status, 200, "{}", ready.text());
    }
    let sent = load.finish().await;

    let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let (seen_a, seen_b) = (ids_seen(&up_a), ids_seen(&up_b));
    assert!(seen_a.is_disjoint(&seen_b), "a request was sent twice");
    assert_eq!(
        seen_a.len() + seen_b.len(),
        sent.len(),
        "every request reached exactly one upstream"
    );
}
