//! The command line: exit codes 0/1/2, `check` printing every problem, `keygen`, `health`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::free_port;
use std::process::Command;

fn vestibule() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vestibule"))
}

#[test]
fn keygen_prints_a_32_byte_base64_key() {
    let out = vestibule().arg("keygen").output().unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .unwrap()
            .len(),
        32
    );
}

#[test]
fn check_reports_problems_with_paths_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"x\"\n[oidc]\nclient_secret = \"${NOPE_NOT_SET}\"\n",
    )
    .unwrap();
    let out = vestibule()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen:"), "{err}");
    assert!(err.contains("server.public_url: is required"), "{err}");
    assert!(
        err.contains("environment variable NOPE_NOT_SET is not set"),
        "{err}"
    );
    assert!(err.contains("session.keys: is required"), "{err}");
}

#[test]
fn the_repository_config_passes_check() {
    let out = vestibule()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
        ])
        .env("VESTIBULE_CLIENT_SECRET", "x")
        .env(
            "VESTIBULE_SESSION_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A session cookie sent only over https whose name lacks the `__Host-` prefix can be set by
/// any sibling subdomain (cookie tossing): `check` warns, naming the key, and still passes; the
/// default name, or a plain-http development set-up (no prefix possible), says nothing.
#[test]
fn check_warns_of_a_secure_session_cookie_name_without_the_host_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let base = crate::support::config_text("").replace("cookie_secure = false\n", "");
    for (session, warned) in [
        ("cookie_name = \"app_session\"\n", true),
        ("cookie_name = \"__Secure-app\"\n", true),
        ("", false),
        ("cookie_name = \"__Host-app\"\n", false),
        (
            "cookie_name = \"app_session\"\ncookie_secure = false\n",
            false,
        ),
    ] {
        let text = base.replace("[session]\n", &format!("[session]\n{session}"));
        std::fs::write(&path, text).unwrap();
        let out = vestibule()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{session}: {err}");
        assert_eq!(
            err.contains("warning: session.cookie_name:") && err.contains("__Host-"),
            warned,
            "{session}: {err}"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_health_fails_without_a_server() {
    let out = vestibule().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = vestibule()
        .args(["health", "--url", "http://127.0.0.1:9/healthz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = vestibule().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keygen"));
}

/// Two free ports (public, admin) and a temp dir with `site/hello.txt` ("hello") to serve.
fn site() -> (u16, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("site")).unwrap();
    std::fs::write(dir.path().join("site/hello.txt"), "hello").unwrap();
    (free_port(), free_port(), dir)
}

/// A configuration serving [`site`]'s `site/` at `/site/` on `port` (admin on `admin`), with
/// `extra` TOML after it.
fn site_config(port: u16, admin: u16, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [oidc]\nissuer = \"http://127.0.0.1:9\"\nallow_http_issuer = true\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [session]\ncookie_secure = false\nkeys = [\"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n\
             [[routes]]\npath = \"/site/\"\nstatic_dir = \"site\"\nstrip_prefix = true\n{extra}"
    )
}

/// The binary serving the configuration at `path` (its log discarded).
fn serve(path: &std::path::Path) -> std::process::Child {
    vestibule()
        .arg("--config")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `GET path` on a fresh HTTP/1.1 connection to `port`: the whole raw answer, or `None` if
/// the connection fails.
fn fetch(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Whether `done` holds within 10 s (asked every 50 ms).
fn within_10s(done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

#[test]
fn sighup_reloads_the_configuration_of_the_running_binary() {
    let (port, admin, dir) = site();
    std::fs::create_dir(dir.path().join("other")).unwrap();
    std::fs::write(dir.path().join("other/new.txt"), "reloaded").unwrap();
    let config = |extra: &str| site_config(port, admin, extra);
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config("")).unwrap();
    let mut child = serve(&path);
    let fetch = |p: &str| fetch(port, p);
    let wait_for = |p: &str, want: &str| within_10s(|| fetch(p).is_some_and(|r| r.contains(want)));
    assert!(
        wait_for("/site/hello.txt", "hello"),
        "the binary did not start serving"
    );
    assert!(fetch("/other/new.txt").unwrap().starts_with("HTTP/1.1 404"));
    std::fs::write(
        &path,
        config("[[routes]]\npath = \"/other/\"\nstatic_dir = \"other\"\nstrip_prefix = true\n"),
    )
    .unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    let reloaded = wait_for("/other/new.txt", "reloaded");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(reloaded, "the new route did not appear after SIGHUP");
    assert!(status.success());
}

/// The allocator (mimalloc 2.x) would take a transparent huge page for each region it touches
/// when the kernel's default allows them (~14 MiB more RSS with 10,000 active sessions):
/// the binary turns them off for itself before it allocates.
#[test]
fn the_running_binary_has_transparent_huge_pages_off() {
    let (port, admin, dir) = site();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, site_config(port, admin, "")).unwrap();
    let mut child = serve(&path);
    let serving =
        within_10s(|| fetch(port, "/site/hello.txt").is_some_and(|r| r.contains("hello")));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving, "the binary did not start serving");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(str::trim);
    // Linux 5.0 and later report the flag; this test's own process has the kernel's default.
    assert_eq!(thp, Some("0"), "THP_enabled of the running binary: {thp:?}");
}

#[test]
fn sighup_rereads_the_secret_files_and_refuses_a_bad_one_with_a_clear_error() {
    let (port, admin, dir) = site();
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let next = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY=";
    std::fs::write(dir.path().join("client-secret"), "s\n").unwrap();
    std::fs::write(dir.path().join("session-keys"), format!("{key}\n")).unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [oidc]\nissuer = \"http://127.0.0.1:9\"\nallow_http_issuer = true\nclient_id = \"c\"\nclient_secret_file = \"client-secret\"\n\
             [session]\ncookie_secure = false\nkeys_file = \"session-keys\"\n\
             [[routes]]\npath = \"/site/\"\nstatic_dir = \"site\"\nstrip_prefix = true\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = vestibule()
        .arg("--config")
        .arg(&path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let serves = || {
        fetch(port, "/site/hello.txt")
            .is_some_and(|out| out.starts_with("HTTP/1.1 200") && out.ends_with("hello"))
    };
    let wait_for = |what: &dyn Fn() -> bool| within_10s(what);
    let logged = |text: &str| std::fs::read_to_string(&log).unwrap().contains(text);
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
    };
    let started = wait_for(&serves);

    // A bad line: refused, named by key and line, its value never printed; still serving.
    std::fs::write(
        dir.path().join("session-keys"),
        format!("{next}\nhunter2-not-a-key\n"),
    )
    .unwrap();
    hup();
    let refused = wait_for(&|| {
        logged(
            "configuration rejected, keeping the previous one: session.keys_file: line 2 of \"session-keys\" is not 32 bytes of base64",
        )
    });
    let still_serving = serves();
    // A good rotation: applied.
    std::fs::write(dir.path().join("session-keys"), format!("{next}\n{key}\n")).unwrap();
    std::fs::write(dir.path().join("client-secret"), "rotated\n").unwrap();
    hup();
    let applied = wait_for(&|| logged("session keys replaced") && logged("client secret replaced"));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(started, "the binary did not start serving:\n{text}");
    assert!(
        refused,
        "the bad keys file was not refused clearly:\n{text}"
    );
    assert!(still_serving, "the refused reload stopped the service");
    assert!(applied, "the rotated files were not applied:\n{text}");
    for secret in ["hunter2", next, key, "rotated"] {
        assert!(!text.contains(secret), "{secret} is in the log:\n{text}");
    }
    assert!(status.success());
}

/// A listener that cannot be opened (the port taken, or below 1024 for a non-root user) stopped
/// the start with `Address already in use (os error 98)` alone: which of the two listeners, and
/// at what address, was left to guess. The error names the key and the address.
#[test]
fn a_listener_that_cannot_be_opened_is_named_by_its_key_and_address() {
    let (port, admin, dir) = site();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, site_config(port, admin, "")).unwrap();
    for (taken, key) in [(port, "server.listen"), (admin, "admin.listen")] {
        let _held = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
        let out = vestibule().arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "error: {key}: cannot listen on 127.0.0.1:{taken}: Address already in use"
            )),
            "{err}"
        );
        // The log's line about it is written out before the exit, and before the error.
        let logged = err
            .find(&format!("vestibule stopped: {key}: cannot listen"))
            .unwrap_or_else(|| panic!("the log's line is lost: {err}"));
        let printed = err.find(&format!("error: {key}")).unwrap();
        assert!(logged < printed, "the log's line comes first: {err}");
    }
}
