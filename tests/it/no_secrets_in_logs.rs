//! Security invariant 1, watched on the real binary: after a login, API calls, a refresh and a
//! logout at debug level, no token, code, secret, session cookie or session id is in the logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::provider;
use crate::support::*;
use std::io::Read;
use std::process::Command;

#[tokio::test]
async fn logs_carry_no_token_code_secret_or_cookie() {
    let port = free_port();
    let provider = provider::start(port, serde_json::json!({"access_token_ttl": 3}));
    let up = upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let text = login_toml(port, &provider.issuer, &format!("[log]\nlevel = \"debug\"\nformat = \"json\"\n[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\n", up.url()))
        .set("admin.listen", format!("127.0.0.1:{admin}"))
        .set("oidc.refresh_skew", "2s");
    let (mut child, log_path) = spawn_binary(dir.path(), &text);
    wait_binary_ready(admin).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut browser = Browser::default();
    let callback = browser.login_until_callback(&base, "alice", "/").await;
    let code = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    assert_eq!(browser.get(&callback, &[]).await.status, 302);
    // Read now: logout empties the cookie.
    let session_cookie = browser.jar.get("vestibule").cloned().unwrap_or_default();
    assert!(
        session_cookie.len() > 40,
        "no session cookie after the login: {:?}",
        browser.jar
    );
    assert_eq!(
        browser
            .get(
                &format!("{base}/api/a?access_token=query-secret-value"),
                &[("x-csrf", "1"), ("authorization", "Bearer browser-secret")]
            )
            .await
            .status,
        200
    );
    let first = provider.tokens("alice").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        browser
            .get(&format!("{base}/api/b"), &[("x-csrf", "1")])
            .await
            .status,
        200
    );
    let second = provider.tokens("alice").await;
    let user = browser
        .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
        .await
        .json();
    let logout = user["bff:logout_url"].as_str().unwrap().to_string();
    let handle = logout.split("sid=").nth(1).unwrap().to_string();
    assert!(
        handle.len() >= 16,
        "the session handle is too short to probe: {handle}"
    );
    // A second session of the user's, ended from the first by its handle: the handle is in the
    // path of that request (`DELETE /bff/sessions/<handle>`), which the access log writes.
    let mut other = Browser::default();
    let callback = other.login_until_callback(&base, "alice", "/").await;
    assert_eq!(other.get(&callback, &[]).await.status, 302);
    let other_user = other
        .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
        .await
        .json();
    let other_logout = other_user["bff:logout_url"].as_str().unwrap().to_string();
    let other_handle = other_logout.split("sid=").nth(1).unwrap().to_string();
    for (path, status) in [("bff", 200), ("BFF", 404), ("bff", 404)] {
        let ended = browser
            .request(
                "DELETE",
                &format!("{base}/{path}/sessions/{other_handle}"),
                &[("x-csrf", "1")],
                None,
            )
            .await;
        assert_eq!(ended.status, status, "{path}: {}", ended.text());
    }
    browser.get(&format!("{base}{logout}"), &[]).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM must shut down gracefully with exit 0, got {status}"
    );
    let mut logs = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(
        logs.contains("vestibule::access"),
        "the access log is missing: {logs}"
    );
    let mut secrets: Vec<String> = vec![
        code,
        session_cookie,
        handle,
        other_handle,
        "vestibule-secret".into(),
        crate::support::KEY.into(),
        "query-secret-value".into(),
        "browser-secret".into(),
    ];
    for t in [&first, &second] {
        for kind in ["access_token", "refresh_token", "id_token"] {
            if let Some(v) = t[kind].as_str() {
                secrets.push(v.to_string());
            }
        }
    }
    for secret in secrets {
        assert!(secret.len() >= 12, "a secret too short to probe: {secret}");
        let probe = &secret[..secret.len().min(24)];
        assert!(!logs.contains(probe), "a secret reached the log: {probe}…");
    }
}

/// A request's bytes never reach the log as controls: a path the canonical form refuses (400
/// `bad_path`) is logged as it came, and `\xc2\x85` is U+0085 (NEL, a line break to Unicode-aware
/// line readers: a forged line after it), `\xc2\x9b` U+009B (CSI, a terminal's escape). Paths
/// are written as a URI carries them, percent-encoded beyond visible ASCII, as canonical paths
/// already are. On the real binary, in both log formats.
#[tokio::test]
async fn request_bytes_never_reach_the_log_as_control_characters() {
    for format in ["pretty", "json"] {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(site.join("index.html"), "hi").unwrap();
        let (port, admin) = (free_port(), free_port());
        let text = config_toml(&format!(
            "[log]\nformat = \"{format}\"\n[[routes]]\npath = \"/\"\nstatic_dir = {:?}\n",
            site.display().to_string()
        ))
        .set("server.listen", format!("127.0.0.1:{port}"))
        .set("admin.listen", format!("127.0.0.1:{admin}"));
        let (mut child, log_path) = spawn_binary(dir.path(), &text);
        eventually(
            "the public listener is up",
            std::time::Duration::from_secs(20),
            || async {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        for target in [&b"/x\xc2\x85forged-line"[..], b"/x\xc2\x9b31mred"] {
            let mut request = b"GET ".to_vec();
            request.extend_from_slice(target);
            request.extend_from_slice(b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
            let answer = crate::support::raw_exchange(("127.0.0.1", port), &request).await;
            assert!(answer.starts_with(b"HTTP/1.1 400"), "{format}");
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
        let logs = std::fs::read_to_string(&log_path).unwrap();
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("vestibule::access"))
            .collect();
        assert_eq!(access.len(), 2, "{format}: {logs}");
        for line in &access {
            assert!(
                !line.chars().any(char::is_control),
                "{format}: a control character reached the log: {line:?}"
            );
        }
        assert!(logs.contains("/x%C2%85forged-line"), "{format}: {logs}");
        assert!(logs.contains("/x%C2%9B31mred"), "{format}: {logs}");
    }
}
