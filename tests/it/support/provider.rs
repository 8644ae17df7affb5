//! The real OpenID provider (npm `oidc-provider`, pinned under tests/provider), started on a
//! free port for one test and killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub struct TestProvider {
    child: Child,
    pub issuer: String,
}

impl Drop for TestProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the provider with a client whose redirect URIs point at `proxy_port`.
pub fn start(proxy_port: u16, extra: serde_json::Value) -> TestProvider {
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
    if let (Some(target), Some(more)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            target.insert(k.clone(), v.clone());
        }
    }
    let mut child = Command::new("node")
        .arg(root().join("tests/provider/provider.js"))
        .env("PROVIDER_CONFIG", config.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node must be installed (scripts/test installs it)");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let ready: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("provider did not start: {line}"));
    TestProvider {
        child,
        issuer: ready["issuer"].as_str().unwrap().to_string(),
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

    /// The latest tokens the provider issued to `sub`.
    pub async fn tokens(&self, sub: &str) -> serde_json::Value {
        let all = super::get(&format!("{}/_test/tokens", self.issuer), &[])
            .await
            .json();
        all.get(sub).cloned().unwrap_or(serde_json::Value::Null)
    }
}
