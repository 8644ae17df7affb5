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
