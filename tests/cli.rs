//! The command line: exit codes 0/1/2, `check` printing every problem, `keygen`, `health`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
