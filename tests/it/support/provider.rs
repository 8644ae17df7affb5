//! The real OpenID provider (npm `oidc-provider`, pinned under tests/provider), started on a
//! free port for one test and killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the provider may take to print its ready line.
const START_DEADLINE: Duration = Duration::from_secs(20);

pub struct TestProvider {
    child: Child,
    pub issuer: String,
    /// The provider's stderr, kept in a file and printed when the test fails.
    stderr: tempfile::NamedTempFile,
}

impl Drop for TestProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- provider {} stderr ---\n{}",
                self.issuer,
                read(&self.stderr)
            );
        }
    }
}

fn read(file: &tempfile::NamedTempFile) -> String {
    std::fs::read_to_string(file.path()).unwrap_or_else(|e| format!("(unreadable: {e})"))
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the provider with a client whose redirect URIs point at `proxy_port`. `extra` holds
/// top-level fields of the provider's config, and `client`: members added to the client's
/// registration (e.g. `token_endpoint_auth_method` and `jwks_uri`).
pub fn start(proxy_port: u16, mut extra: serde_json::Value) -> TestProvider {
    let modules = root().join("tests/provider/node_modules");
    assert!(
        modules.is_dir(),
        "tests/provider/node_modules is missing: run `npm ci --prefix tests/provider` (scripts/test does)"
    );
    let base = format!("http://127.0.0.1:{proxy_port}");
    let mut config = serde_json::json!({
        "port": 0,
        "clients": [{
            "client_id": "vestibule",
            "client_secret": "vestibule-secret",
            "redirect_uris": [format!("{base}/bff/callback")],
            "post_logout_redirect_uris": [format!("{base}/")],
            "backchannel_logout_uri": format!("{base}/bff/backchannel-logout"),
        }],
    });
    let client = extra
        .as_object_mut()
        .and_then(|e| e.remove("client"))
        .unwrap_or_default();
    if let (Some(target), Some(more)) = (config["clients"][0].as_object_mut(), client.as_object()) {
        for (k, v) in more {
            target.insert(k.clone(), v.clone());
        }
    }
    if let (Some(target), Some(more)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            target.insert(k.clone(), v.clone());
        }
    }
    launch(
        Command::new("node")
            .arg(root().join("tests/provider/provider.js"))
            .env("PROVIDER_CONFIG", config.to_string()),
        START_DEADLINE,
    )
}

/// Spawns `command` (the provider, or a stand-in that prints the same ready line) and waits at
/// most `deadline` for its ready line; on failure panics with everything it wrote to stderr.
fn launch(command: &mut Command, deadline: Duration) -> TestProvider {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .expect("node must be installed (scripts/test installs it)");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
    });
    let outcome = rx.recv_timeout(deadline);
    let issuer = match &outcome {
        Ok(Ok(line)) => serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|ready| ready["issuer"].as_str().map(str::to_string)),
        _ => None,
    };
    let Some(issuer) = issuer else {
        let _ = child.kill();
        let _ = child.wait();
        let why = match outcome {
            Ok(Ok(line)) if line.is_empty() => "it exited before its ready line".to_string(),
            Ok(Ok(line)) => format!("its first line is not the ready line: {line:?}"),
            Ok(Err(e)) => format!("reading its stdout failed: {e}"),
            Err(_) => format!("no ready line within {deadline:?}"),
        };
        panic!(
            "provider did not start: {why}\n--- provider stderr ---\n{}",
            read(&stderr)
        );
    };
    TestProvider {
        child,
        issuer,
        stderr,
    }
}

impl TestProvider {
    /// Stops the provider process (SIGSTOP): connections are still accepted by the kernel, but
    /// nothing is answered until [`TestProvider::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`TestProvider::pause`]d provider run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .arg(which)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {which} failed");
    }

    pub async fn stats(&self) -> serde_json::Value {
        super::get(&format!("{}/_test/stats", self.issuer), &[])
            .await
            .json()
    }

    pub async fn control(&self, path: &str, body: serde_json::Value) -> super::Reply {
        let req = http::Request::post(format!("{}{path}", self.issuer))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        super::send(req).await
    }

    /// Everything the provider wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read(&self.stderr)
    }

    /// The latest tokens the provider issued to `sub`.
    pub async fn tokens(&self, sub: &str) -> serde_json::Value {
        let all = super::get(&format!("{}/_test/tokens", self.issuer), &[])
            .await
            .json();
        all.get(sub).cloned().unwrap_or(serde_json::Value::Null)
    }
}

/// The panic message of a [`launch`] of the shell `script` that must fail.
#[cfg(test)]
fn failed_launch(script: &str, deadline: Duration) -> String {
    let failure =
        std::panic::catch_unwind(|| launch(Command::new("sh").args(["-c", script]), deadline))
            .err()
            .expect("the launch must fail");
    failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_provider_that_never_gets_ready_fails_in_time_with_its_stderr() {
    let started = std::time::Instant::now();
    let message = failed_launch(
        "echo 'cannot listen: EADDRINUSE' >&2; exec sleep 30",
        Duration::from_millis(500),
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{message}");
    assert!(message.contains("no ready line within 500ms"), "{message}");
    assert!(message.contains("cannot listen: EADDRINUSE"), "{message}");
}

#[test]
fn a_provider_that_exits_early_fails_with_its_stderr() {
    let message = failed_launch("echo 'SyntaxError: bad config' >&2; exit 1", START_DEADLINE);
    assert!(
        message.contains("exited before its ready line"),
        "{message}"
    );
    assert!(message.contains("SyntaxError: bad config"), "{message}");
}
