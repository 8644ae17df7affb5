//! The front door under attack: who may speak for the client (`trusted_proxies`), cookies an
//! upstream may not set, request smuggling and header floods on the public listener. Each test
//! watches the wire: what the upstream saw and what the client got back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::upstream::Upstream;
use crate::support::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PUBLIC_HOST: &str = "app.example.test";

/// One `/api/` route to `up`, `public_url = https://app.example.test`, optionally trusting
/// loopback as a proxy.
fn edge_config(up: &Upstream, trusted: bool, extra: &str) -> TomlConfig {
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\n{extra}",
        up.url()
    );
    let config = config_toml(&routes).set("server.public_url", format!("https://{PUBLIC_HOST}"));
    if trusted {
        config.add("server.trusted_proxies", vec!["127.0.0.0/8"])
    } else {
        config
    }
}

/// A value for each header a client could use to speak for itself.
const SPOOFED: &[(&str, &str)] = &[
    ("forwarded", "for=203.0.113.66;proto=http;host=evil.example"),
    ("x-real-ip", "203.0.113.66"),
    ("x-forwarded-for", "203.0.113.66"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-port", "6666"),
    ("x-forwarded-prefix", "/evil"),
    ("x-forwarded-server", "evil.example"),
    ("x-forwarded-ssl", "off"),
    ("x-request-id", "spoofed-request-id"),
    ("host", "evil.example"),
];

fn is_generated_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn an_untrusted_peer_cannot_speak_for_the_client() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let r = get(&proxy.url("/api/who"), SPOOFED).await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    for name in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
    ] {
        assert!(
            !seen.contains_key(name),
            "{name} from an untrusted peer reached the upstream: {:?}",
            seen.get(name)
        );
    }
    assert_eq!(seen.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(
        seen.get("x-forwarded-proto").unwrap(),
        "https",
        "the scheme comes from public_url"
    );
    assert_eq!(
        seen.get("x-forwarded-host").unwrap(),
        PUBLIC_HOST,
        "the host comes from public_url, never from the client's Host"
    );
    let id = seen.get("x-request-id").unwrap().to_str().unwrap();
    assert!(is_generated_id(id), "the request id was kept: {id}");
    assert_eq!(r.header("x-request-id"), Some(id));
}

#[tokio::test]
async fn each_spoofed_header_alone_is_replaced_or_removed() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    for &(name, value) in SPOOFED {
        get(&proxy.url("/api/one"), &[(name, value)]).await;
        let seen = up.last().headers;
        let leaked = seen
            .iter()
            .filter(|(n, _)| n.as_str() != "host")
            .any(|(_, v)| {
                v.to_str().is_ok_and(|v| {
                    v == value
                        || ["203.0.113.66", "evil", "spoofed"]
                            .iter()
                            .any(|m| v.contains(m))
                })
            });
        assert!(!leaked, "{name}: {value} reached the upstream: {seen:?}");
    }
}

#[tokio::test]
async fn a_trusted_proxy_speaks_for_the_client() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, true, "")).await;
    let r = get(&proxy.url("/api/who"), SPOOFED).await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    for &(name, value) in SPOOFED {
        match name {
            "host" => {}
            "x-forwarded-for" => {
                assert_eq!(seen.get(name).unwrap(), "203.0.113.66, 127.0.0.1");
            }
            _ => assert_eq!(seen.get(name).unwrap(), value, "{name}"),
        }
    }
    assert_eq!(r.header("x-request-id"), Some("spoofed-request-id"));
    // What a trusted proxy does not say comes from public_url, not from Host.
    let r = get(
        &proxy.url("/api/who"),
        &[("host", "evil.example"), ("x-request-id", "has spaces")],
    )
    .await;
    let seen = up.last().headers;
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(seen.get("x-forwarded-host").unwrap(), PUBLIC_HOST);
    let id = seen.get("x-request-id").unwrap().to_str().unwrap();
    assert!(is_generated_id(id), "an unusable id was kept: {id}");
    assert_eq!(r.header("x-request-id"), Some(id));
}

/// The same headers spelled with `_` for `-`: CGI, WSGI, Rack and PHP upstreams read
/// `X_Forwarded_For` and `X-Forwarded-For` as one variable (`HTTP_X_FORWARDED_FOR`), so such a
/// field would speak for the client, or add to what Vestibule says, as surely as the real one.
/// `Proxy` becomes `HTTP_PROXY` there, which some HTTP clients take as their proxy ("httpoxy").
const LOOKALIKES: &[(&str, &str)] = &[
    ("x_real_ip", "203.0.113.66"),
    ("X_Forwarded_For", "203.0.113.66"),
    ("x_forwarded_proto", "http"),
    ("x_forwarded_host", "evil.example"),
    ("x_forwarded_prefix", "/evil"),
    ("X_Request_Id", "spoofed-request-id"),
    ("proxy", "http://evil.example:6666"),
];

#[tokio::test]
async fn underscore_spellings_of_forwarding_headers_never_pass_whoever_the_peer() {
    let up = upstream::start().await;
    for trusted in [false, true] {
        let proxy = start_proxy(&edge_config(&up, trusted, "")).await;
        let mut sent = LOOKALIKES.to_vec();
        sent.push(("x_trace_tag", "kept"));
        let r = get(&proxy.url("/api/who"), &sent).await;
        assert_eq!(r.status, 200);
        let seen = up.last().headers;
        for &(name, value) in LOOKALIKES {
            assert!(
                !seen.contains_key(name),
                "trusted {trusted}: {name}: {value} reached the upstream"
            );
        }
        assert_eq!(
            seen.get("x_trace_tag").map(|v| v.to_str().unwrap()),
            Some("kept"),
            "an underscore in a name of nobody's is no reason to drop it"
        );
    }
}

/// Every way an upstream could name one of Vestibule's cookies, for the session cookie `name`.
fn own_cookie_names(name: &str) -> Vec<String> {
    let bare = name.trim_start_matches("__Host-");
    vec![
        bare.to_string(),
        format!("__Host-{bare}"),
        format!("{bare}-login-abc123"),
        format!("__Host-{bare}-login-abc123"),
    ]
}

#[tokio::test]
async fn an_upstream_cannot_set_vestibules_cookies() {
    let up = upstream::start().await;
    for secure in [false, true] {
        let text = edge_config(&up, false, "").set("session.cookie_secure", secure);
        let proxy = start_proxy(&text).await;
        let name = proxy.app.live.load().config.session.cookie_name.clone();
        assert_eq!(name.starts_with("__Host-"), secure);
        let mut names = own_cookie_names(&name);
        names.push("app-pref".into());
        names.push("vestibule-other".into());
        let r = get(
            &proxy.url(&format!("/api/set-cookie?{}", names.join(","))),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        let set: Vec<&str> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            set,
            [
                "app-pref=from-upstream; Path=/",
                "vestibule-other=from-upstream; Path=/"
            ],
            "cookie name {name}"
        );
        // A value that is not UTF-8 does not hide the name (an upstream deleting the session
        // cookie in the browser would log its user out).
        let r = get(
            &proxy.url(&format!("/api/set-cookie-bytes?{}", names.join(","))),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        let set: Vec<&[u8]> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(
            set,
            [
                &b"app-pref=\x80; Path=/; Max-Age=0"[..],
                b"vestibule-other=\x80; Path=/; Max-Age=0"
            ],
            "cookie name {name}"
        );
        proxy.shutdown.cancel();
    }
}

/// The real binary with `text` as its configuration, logging to a file.
struct Spawned {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    async fn start(config: TomlConfig) -> Spawned {
        Spawned::start_with(config, &[]).await
    }

    /// With the variables `env` added to the binary's environment.
    async fn start_with(config: TomlConfig, env: &[(&str, &str)]) -> Spawned {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = config
            .set("server.listen", format!("127.0.0.1:{port}"))
            .add("server.workers", 1);
        let (child, log) = spawn_binary_with(dir.path(), &config, env);
        eventually("the proxy listens", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Spawned {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Transparent huge pages are off for the process (its resident memory stays what it uses)
/// unless the operator asks mimalloc for large OS pages, `MIMALLOC_ALLOW_LARGE_OS_PAGES=1`:
/// then they stay on, so that mimalloc's `madvise` for them takes effect, and the log says so.
/// The kernel's word is `THP_enabled` in `/proc/<pid>/status`.
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_the_operator_asks_for_large_os_pages() {
    let up = upstream::start().await;
    let said = "transparent huge pages are allowed";
    for (env, on) in [
        (None, false),
        (Some("1"), true),
        (Some("0"), false),
        (Some("On"), true),
    ] {
        let env: Vec<(&str, &str)> = env
            .map(|v| ("MIMALLOC_ALLOW_LARGE_OS_PAGES", v))
            .into_iter()
            .collect();
        let proxy = Spawned::start_with(edge_config(&up, false, ""), &env).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.child.id())).unwrap();
        let enabled = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .expect("the kernel reports THP_enabled")
            .trim()
            .to_string();
        assert_eq!(enabled, if on { "1" } else { "0" }, "{env:?}");
        if on {
            logged(&proxy.log, said).await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let log = std::fs::read_to_string(&proxy.log).unwrap();
            assert!(!log.contains(said), "{env:?}: {log}");
        }
    }
}

#[tokio::test]
async fn a_dropped_upstream_cookie_is_logged_at_warn_with_the_route() {
    let up = upstream::start().await;
    let proxy = Spawned::start(edge_config(&up, false, "")).await;
    let r = get(&proxy.url("/api/set-cookie?vestibule,app-pref"), &[]).await;
    assert_eq!(r.status, 200);
    let line = eventually("the warning is logged", Duration::from_secs(5), || async {
        std::fs::read_to_string(&proxy.log)
            .unwrap()
            .lines()
            .find(|l| l.contains("WARN") && l.contains("Set-Cookie"))
            .map(String::from)
    })
    .await;
    assert!(line.contains("/api/"), "no route in: {line}");
    assert!(line.contains("vestibule"), "no cookie name in: {line}");
    assert!(
        !line.contains("from-upstream"),
        "a cookie value was logged: {line}"
    );
}

/// Sends `bytes` on a fresh connection and returns the status of every response until the
/// proxy closes the connection (or goes quiet for a second), and the bytes received.
async fn exchange(proxy: &Proxy, bytes: &[u8]) -> (Vec<u16>, String) {
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rx, mut tx) = tcp.split();
    let write = async {
        // The proxy may answer and close before reading everything: that is fine.
        let _ = tx.write_all(bytes).await;
    };
    let read = async {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(1), rx.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            }
        }
        received
    };
    let ((), received) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&received).into_owned();
    let statuses = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect();
    (statuses, text)
}

/// A request the upstream must never see: it hides behind the one before it.
const SMUGGLED: &str = "GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn smuggling_cases() -> Vec<(&'static str, String)> {
    let big_extension = "a".repeat(20 * 1024);
    vec![
        (
            "Content-Length then Transfer-Encoding",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 39\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "two equal Content-Lengths",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{SMUGGLED}"
            ),
        ),
        (
            "a Content-Length list",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello{SMUGGLED}"
            ),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "obs-fold",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "an obs-folded Transfer-Encoding",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "bare LF line ends",
            format!("GET /api/a HTTP/1.1\nHost: x\n\n{SMUGGLED}"),
        ),
        (
            "a bare LF inside the head",
            format!(
                "POST /api/a HTTP/1.1\r\nHost: x\r\nX-Note: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "oversized chunk extensions",
            format!(
                "POST /api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;{big_extension}\r\nx\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
    ]
}

#[tokio::test]
async fn smuggling_attempts_get_400_and_the_upstream_sees_at_most_one_request() {
    let failures = smuggling_failures(None).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every smuggling case again, behind a plain request on the same connection: the first is
/// served by Vestibule's own HTTP/1 lane, the second must be handed to hyper and the framing
/// guard exactly as if it had come first.
#[tokio::test]
async fn smuggling_attempts_behind_a_plain_request_are_refused_alike() {
    let first = "GET /api/first HTTP/1.1\r\nHost: x\r\n\r\n";
    let failures = smuggling_failures(Some(first)).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bodies the framing guard cannot follow as hyper reads them (a trailer line ending in a bare
/// LF, which hyper takes; a `Transfer-Encoding` line too long for the guard to keep, which hyper
/// trims and reads as chunked) must not switch the guard off: every smuggling head after them
/// on the same connection is still refused, and none reaches the upstream.
#[tokio::test]
async fn bodies_the_guard_cannot_follow_never_let_a_smuggled_head_through() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let long_te = format!(
        "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:{}chunked\r\n\r\n0\r\n\r\n",
        " ".repeat(100)
    );
    let firsts = [
        "POST /api/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: b\n\r\n\r\n",
        long_te.as_str(),
    ];
    let smuggled = [
        "POST /api/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST /api/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET /api/b HTTP/1.1\nHost: x\n\n",
    ];
    let mut failures = Vec::new();
    for first in firsts {
        for second in smuggled {
            let before = up.count();
            let (statuses, _) = exchange(&proxy, format!("{first}{second}").as_bytes()).await;
            let seen: Vec<String> = up.seen.lock().unwrap()[before..]
                .iter()
                .map(|s| s.uri.clone())
                .collect();
            if statuses.iter().skip(1).any(|&s| s != 400) || seen.iter().any(|u| u == "/api/b") {
                failures.push(format!(
                    "{first:?} then {second:?}: {statuses:?}, upstream saw {seen:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sends each smuggling case on a connection of its own, after `first` (a plain request that
/// must be answered 200) if given; returns how each case that got past went wrong.
async fn smuggling_failures(first: Option<&str>) -> Vec<String> {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let mut failures = Vec::new();
    for (case, bytes) in smuggling_cases() {
        let before = up.count();
        let sent = format!("{}{bytes}", first.unwrap_or(""));
        let (statuses, text) = exchange(&proxy, sent.as_bytes()).await;
        let seen: Vec<_> = up.seen.lock().unwrap()[before..].to_vec();
        // Refused in the head: the upstream sees nothing of it. A body that turns out bad can
        // only be refused once its request is on its way: the upstream sees that one, cut off.
        let in_body = case == "oversized chunk extensions";
        let allowed = usize::from(first.is_some()) + usize::from(in_body);
        // A head is refused by the parser (no body); a body by Vestibule, with its error code.
        let answer = if in_body {
            "\"error\":\"bad_request\""
        } else {
            "content-length: 0\r\n"
        };
        let expected: &[u16] = if first.is_some() { &[200, 400] } else { &[400] };
        if statuses != expected
            || !text.to_ascii_lowercase().contains(answer)
            || seen.len() > allowed
            || (first.is_some() && seen.first().is_none_or(|s| s.uri != "/api/first"))
            || seen.iter().any(|s| s.uri.contains("smuggled"))
        {
            let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
            failures.push(format!(
                "{case}: answered {statuses:?}, the upstream saw {uris:?}\n{text}"
            ));
        }
    }
    failures
}

/// Plain requests, one with a body between them, and `Connection: close` at the end, all in
/// one write: answered in order, each body where it belongs, and the connection closed at once
/// after the last answer, which says so.
#[tokio::test]
async fn pipelined_plain_requests_around_one_with_a_body_are_answered_in_order() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let requests = concat!(
        "GET /api/one HTTP/1.1\r\nHost: x\r\n\r\n",
        "HEAD /api/two HTTP/1.1\r\nHost: x\r\n\r\n",
        "DELETE /api/three HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "GET /api/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let started = tokio::time::Instant::now();
    let (statuses, text) = exchange(&proxy, requests.as_bytes()).await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the connection stayed open after `Connection: close`"
    );
    assert_eq!(statuses, [200, 200, 200, 200, 200], "{text}");
    let seen: Vec<(String, String)> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.method.clone(), s.uri.clone()))
        .collect();
    let expected = [
        ("GET", "/api/one"),
        ("HEAD", "/api/two"),
        ("DELETE", "/api/three"),
        ("POST", "/api/upload"),
        ("GET", "/api/last"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, u)| (m.to_string(), u.to_string()))
        .collect();
    assert_eq!(seen, expected);
    // The HEAD answer has its length but no body: the next answer starts right after its head.
    let head_answer = text.split("HTTP/1.1 ").nth(2).unwrap();
    let length: u64 = head_answer
        .to_ascii_lowercase()
        .split("content-length: ")
        .nth(1)
        .and_then(|rest| rest.split("\r\n").next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        length > 0,
        "HEAD lost the length of what GET would send: {head_answer}"
    );
    assert!(
        head_answer.ends_with("\r\n\r\n"),
        "a body after HEAD: {head_answer:?}"
    );
    assert!(text.contains("\r\n\r\n5"), "the upload's answer: {text}");
    let last = text
        .rsplit("HTTP/1.1 ")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(last.contains("connection: close\r\n"), "{last}");
}

/// A client that hangs up while its request waits on the upstream cancels it: the upstream
/// connection is closed, not left to finish an answer nobody reads.
#[tokio::test]
async fn a_client_that_hangs_up_cancels_its_request_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (asked, mut asked_rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let asked = asked.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = closed.send(());
                            return;
                        }
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = asked.send(());
                        head.clear();
                    }
                }
            });
        }
    });
    let config = config_text(&format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"http://{addr}\"\ntimeout = \"30s\"\n"
    ));
    let proxy = start_proxy(&config).await;
    for method in ["GET", "DELETE"] {
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(format!("{method} /api/hang HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), asked_rx.recv())
            .await
            .expect("the request reached the upstream");
        drop(client);
        let cancelled = tokio::time::timeout(Duration::from_secs(3), closed_rx.recv()).await;
        assert!(
            cancelled.is_ok(),
            "{method}: the upstream request outlived its client"
        );
    }
}

#[tokio::test]
async fn well_formed_pipelined_requests_still_pass() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let requests = concat!(
        "POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "POST /api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        "5;name=value\r\nhello\r\n3\r\n\nab\r\n0\r\nX-Trailer: 1\r\n\r\n",
        "GET /api/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (statuses, text) = exchange(&proxy, requests.as_bytes()).await;
    assert_eq!(statuses, [200, 200, 200], "{text}");
    let uris: Vec<String> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.clone())
        .collect();
    assert_eq!(uris, ["/api/upload", "/api/upload", "/api/last"]);
    assert!(text.contains("\r\n\r\n5"), "first body: {text}");
    assert!(text.contains("\r\n\r\n8"), "chunked body: {text}");
}

/// A request head with `fill` headers; every case is far over `max_header_size`.
fn floods() -> Vec<(&'static str, Vec<u8>)> {
    let cookies: Vec<String> = (0..10_000).map(|i| format!("c{i}=1")).collect();
    let mut many_headers = String::from("GET /api/x HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        many_headers.push_str(&format!("x-h{i}: 1\r\n"));
    }
    many_headers.push_str("\r\n");
    vec![
        (
            "10,000 cookies",
            format!(
                "GET /api/x HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\n",
                cookies.join("; ")
            )
            .into_bytes(),
        ),
        (
            "a 1 MiB Cookie header",
            format!(
                "GET /api/x HTTP/1.1\r\nHost: x\r\nCookie: a={}\r\n\r\n",
                "b".repeat(1 << 20)
            )
            .into_bytes(),
        ),
        ("10,000 headers", many_headers.into_bytes()),
        (
            "a 100 KiB query string",
            format!(
                "GET /api/x?q={} HTTP/1.1\r\nHost: x\r\n\r\n",
                "q".repeat(100 * 1024)
            )
            .into_bytes(),
        ),
    ]
}

#[tokio::test]
async fn header_floods_get_431_and_never_reach_the_upstream() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    for (case, bytes) in floods() {
        let (statuses, text) = exchange(&proxy, &bytes).await;
        assert_eq!(statuses, [431], "{case}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("content-length: 0\r\n"),
            "{case}: the parser's answer has no body: {text}"
        );
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn heads_just_over_the_limit_get_a_json_431() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    // 8 KiB < head < 16 KiB: past max_header_size, within the parser's buffer.
    let cookies: Vec<String> = (0..1_200).map(|i| format!("c{i}=1")).collect();
    let cases = [
        format!("Cookie: {}", cookies.join("; ")),
        (0..90)
            .map(|i| format!("x-h{i}: {}", "v".repeat(100)))
            .collect::<Vec<_>>()
            .join("\r\n"),
    ];
    for headers in cases {
        let request =
            format!("GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n\r\n");
        let (statuses, text) = exchange(&proxy, request.as_bytes()).await;
        assert_eq!(statuses, [431], "{text}");
        assert!(text.contains("\"error\":\"headers_too_large\""), "{text}");
    }
    let query = "q".repeat(10 * 1024);
    let request = format!("GET /api/x?q={query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (statuses, text) = exchange(&proxy, request.as_bytes()).await;
    assert_eq!(statuses, [431], "{text}");
    assert!(text.contains("\"error\":\"headers_too_large\""), "{text}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_target_over_64_kib_gets_414_when_the_head_limit_is_larger() {
    let up = upstream::start().await;
    let text = edge_config(&up, false, "").set("server.max_header_size", "64KiB");
    let proxy = start_proxy(&text).await;
    let floods = floods();
    let (_, query) = floods.last().unwrap();
    let (statuses, text) = exchange(&proxy, query).await;
    assert_eq!(statuses, [414], "{text}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_keep_memory_bounded() {
    let up = upstream::start().await;
    let text = edge_config(&up, false, "").set("server.max_header_size", "64KiB");
    let proxy = Spawned::start(text).await;
    let warm = get(&proxy.url("/api/warm"), &[]).await;
    assert_eq!(warm.status, 200);
    let before = proxy.rss_kib();
    let floods = std::sync::Arc::new(floods());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", proxy.port).parse().unwrap();
    for round in 0..10 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let floods = floods.clone();
            tasks.push(tokio::spawn(async move {
                let (_, bytes) = &floods[(round + i) % floods.len()];
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut rx, mut tx) = tcp.split();
                let mut status = [0u8; 12];
                let (_, read) = tokio::join!(tx.write_all(bytes), rx.read_exact(&mut status));
                read.map(|_| status)
            }));
        }
        for task in tasks {
            if let Ok(status) = task.await.unwrap() {
                let status = String::from_utf8_lossy(&status).into_owned();
                assert!(status.starts_with("HTTP/1.1 4"), "a flood got {status:?}");
            }
        }
    }
    let after = proxy.rss_kib();
    let growth = after.saturating_sub(before);
    assert!(
        {
            eprintln!("RSS growth {growth} KiB ({before} -> {after})");
            growth < 8 * 1024
        },
        "RSS grew by {growth} KiB over 200 floods ({before} -> {after} KiB)"
    );
    let r = get(&proxy.url("/api/after"), &[]).await;
    assert_eq!(r.status, 200, "the proxy still serves after the floods");
}

/// A connection that has carried an HTTP/1.1 request stays HTTP/1.1: the HTTP/2 preface after
/// it is a malformed request, as when hyper serves the connection from its first byte, not the
/// start of an HTTP/2 connection (the lane hands a connection to hyper when a request needs it,
/// and hyper's automatic choice of version looks for the preface at what it is given first).
#[tokio::test]
async fn the_http2_preface_after_an_http1_request_does_not_switch_the_connection() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, false, "")).await;
    let bytes = b"GET /api/first HTTP/1.1\r\nHost: x\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (statuses, text) = exchange(&proxy, bytes).await;
    assert_eq!(statuses.first(), Some(&200), "{text:?}");
    let (_, after) = text.split_once("\r\n\r\n").unwrap();
    // An HTTP/2 server's first frame is SETTINGS: three bytes of length, then type 0x04.
    let h2 = after
        .as_bytes()
        .windows(4)
        .any(|w| w[0] == 0 && w[3] == 0x04);
    assert!(!h2, "the connection switched to HTTP/2: {text:?}");
    assert!(
        statuses.len() == 1 || statuses[1] == 400,
        "the preface is refused or the connection closed: {statuses:?}"
    );
    assert_eq!(up.count(), 1, "only the first request reached the upstream");
}
/// a trusted proxy that adds its entry as a field line of its own (HAProxy's
/// `option forwardfor`, RFC 9110 §5.3: several lines are one list) must not have it dropped.
/// Here the client wrote `X-Forwarded-For: 198.51.100.66` and the trusted proxy added a line
/// with the address it saw, 203.0.113.5. Vestibule's own rate limits take 203.0.113.5 as the
/// client (`limits::client_address` reads every line); the upstream must be told the same,
/// not only the client-written first line.
#[tokio::test]
async fn every_forwarded_for_line_of_a_trusted_proxy_reaches_the_upstream() {
    let up = upstream::start().await;
    let proxy = start_proxy(&edge_config(&up, true, "")).await;
    let lines = [
        ("x-forwarded-for", "198.51.100.66"),
        ("x-forwarded-for", "203.0.113.5"),
    ];
    // Bodiless (the lane) and with a body (hyper).
    for with_body in [false, true] {
        let r = if with_body {
            let mut builder = http::Request::post(proxy.url("/api/who"));
            for (k, v) in lines {
                builder = builder.header(k, v);
            }
            send(
                builder
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
                    .unwrap(),
            )
            .await
        } else {
            get(&proxy.url("/api/who"), &lines).await
        };
        assert_eq!(r.status, 200);
        let seen = up.last().headers;
        let xff: Vec<&str> = seen
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        let joined = xff.join(", ");
        assert_eq!(
            joined, "198.51.100.66, 203.0.113.5, 127.0.0.1",
            "body {with_body}: the upstream's right-most untrusted hop is not the one the \
             trusted proxy added (203.0.113.5)"
        );
    }
}
