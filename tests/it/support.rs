//! Shared test harness: real sockets on port 0, a recording upstream, the proxy in-process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;
pub mod fake_idp;
pub mod late_replies;
pub mod leased;
pub mod netns;
pub mod pki;
pub mod provider;
pub mod redis;
pub mod stack;
pub mod toml_config;
pub mod upstream;

pub use toml_config::TomlConfig;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use vestibule::app::App;
use vestibule::config::Config;

/// Claims `port` for this test process among every test process on the machine: an exclusive
/// `flock` on a file named after it in a shared directory, held until the process exits (the
/// kernel lets it go then, however the process ends). A port stays its process's though its
/// server may be down for a while (a Redis killed, to be restarted on the same port): a bind
/// alone would hand it to another test process meanwhile (`scripts/test` runs one beside the
/// fault suite).
fn claim_port(port: u16) -> bool {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("vestibule-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
    else {
        return false;
    };
    let exclusive = rustix::fs::FlockOperation::NonBlockingLockExclusive;
    if rustix::fs::flock(&file, exclusive).is_err() {
        return false;
    }
    HELD.lock().unwrap().push(file);
    true
}

/// A port that was free a moment ago, for a server a test configures before it starts (bound,
/// then released). Taken below the kernel's ephemeral range, where outbound connections and
/// port-0 listeners get theirs: a port from that range could be handed to one of those in the
/// moment between its release and the server binding it (it was, in a CI run: `AddrInUse`).
/// Each port is given once per run (a counter from a start that differs per process), and
/// never to two test processes alive at once ([`claim_port`]). `VESTIBULE_TEST_PORT_START` sets
/// the start (for the harness's own test, and to make two processes walk the same ports).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    if ephemeral_low > LOW + 2_000 {
        let span = ephemeral_low - LOW;
        let start = std::env::var("VESTIBULE_TEST_PORT_START")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .map_or(std::process::id() % span, |p| p.saturating_sub(LOW) % span);
        for _ in 0..span {
            let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = u16::try_from(port).expect("below the ephemeral range");
            if claim_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, test only

/// A config with the given routes (TOML `[[routes]]` blocks) and a dead issuer.
pub fn config_text(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:8080"
request_timeout = "2s"
max_body = "1MiB"
header_read_timeout = "1s"
max_header_size = "8KiB"
shutdown_grace = "5s"
[admin]
listen = "127.0.0.1:0"
[oidc]
issuer = "http://127.0.0.1:9"
allow_http_issuer = true
client_id = "vestibule"
client_secret = "secret"
[session]
cookie_secure = false
keys = ["{KEY}"]
{extra}
"#
    )
}

/// [`config_text`] as a [`TomlConfig`], to be changed key by key.
pub fn config_toml(extra: &str) -> TomlConfig {
    TomlConfig::parse(&config_text(extra))
}

/// [`config_text`] with one route, `/api/` to `upstream`, served by `workers` threads.
pub fn workers_config(upstream: &str, workers: i64) -> String {
    let routes = format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n");
    config_toml(&routes).add("server.workers", workers).text()
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<App>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A session made directly in the store (no provider needed), as a `Cookie` header value.
    pub async fn session_cookie(&self, session: vestibule::session::Session) -> String {
        session_cookie(&self.app, session).await
    }

    /// Whether `/bff/user` knows the session of `cookie`.
    pub async fn signed_in(&self, cookie: &str) -> bool {
        let user = get(
            &self.url("/bff/user"),
            &[("cookie", cookie), ("x-csrf", "1")],
        )
        .await;
        user.status == 200
    }
}

/// A session made directly in `app`'s store, as a `Cookie` header value.
pub async fn session_cookie(app: &App, session: vestibule::session::Session) -> String {
    let (value, _) = app
        .sessions
        .create(session, vestibule::app::now())
        .await
        .unwrap();
    let name = app.live.load().config.session.cookie_name.clone();
    format!("{name}={value}")
}

/// Starts the proxy in-process; the config file is written to a temp dir (for reload tests).
/// `text` is the config: a `String` or a [`TomlConfig`].
pub async fn start_proxy(text: impl std::fmt::Display) -> Proxy {
    start_proxy_with_clock(text, vestibule::clock::Clock::system()).await
}

/// [`start_proxy`] on `clock`: a `vestibule::clock::TestClock`'s, which the test moves ahead to
/// reach token and session expiries without waiting for them.
pub async fn start_proxy_with_clock(
    text: impl std::fmt::Display,
    clock: vestibule::clock::Clock,
) -> Proxy {
    let text = &text.to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::parse(text, dir.path(), &|n| std::env::var(n).ok())
        .unwrap_or_else(|e| panic!("config: {e}"));
    let bound = vestibule::server::bind(&config).await.unwrap();
    let (addr, admin) = (bound.public_addr, bound.admin_addr);
    let app = App::start_with_clock(config, path, clock).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(vestibule::server::serve(
        app.clone(),
        bound,
        shutdown.clone(),
    ));
    Proxy {
        addr,
        admin,
        app,
        shutdown,
        task,
        dir,
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The whole `Set-Cookie` value that sets cookie `name`.
    pub fn set_cookie(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}=");
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&prefix))
    }

    /// The `name=value` pair of the session cookie set by this answer, for a `Cookie` header.
    pub fn session_cookie(&self) -> String {
        let set = self.set_cookie("vestibule").expect("no session cookie set");
        set.split(';').next().unwrap().to_string()
    }
}

/// Resident memory of a process (`"self"` or a pid), in KiB.
pub fn rss_kib(process: impl std::fmt::Display) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// Sends a request and reads the whole response.
pub async fn send(req: http::Request<Full<Bytes>>) -> Reply {
    let response = client().request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = http::Request::get(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    send(builder.body(Full::new(Bytes::new())).unwrap()).await
}

/// `GET url` with `fields`, whose answer streams (an event stream): its body, once its first
/// frame arrived.
pub async fn open_stream(url: &str, fields: &[(&str, &str)]) -> hyper::body::Incoming {
    let mut request = http::Request::get(url);
    for (name, value) in fields {
        request = request.header(*name, *value);
    }
    let response = client()
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let mut body = response.into_body();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(matches!(first, Some(Ok(_))), "{url}: {first:?}");
    body
}

/// Reads `body` for `long`: `Ok` with the frames read if it kept flowing all along, `Err` with
/// them if it ended (with an error or not) before.
pub async fn flows_for(
    body: &mut hyper::body::Incoming,
    long: std::time::Duration,
) -> Result<usize, usize> {
    let deadline = std::time::Instant::now() + long;
    let mut read = 0usize;
    while std::time::Instant::now() < deadline {
        let second = std::time::Duration::from_secs(1);
        match tokio::time::timeout(second, body.frame()).await {
            Ok(Some(Ok(_))) => read += 1,
            Ok(_) => return Err(read),
            Err(_) => {}
        }
    }
    Ok(read)
}

/// A proxy on `port` in front of the real provider at `issuer`, with `extra` appended.
pub fn login_config(port: u16, issuer: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
request_timeout = "10s"
[admin]
listen = "127.0.0.1:0"
[oidc]
issuer = "{issuer}"
allow_http_issuer = true
client_id = "vestibule"
client_secret = "vestibule-secret"
refresh_skew = "5s"
[session]
cookie_secure = false
keys = ["{KEY}"]
{extra}
"#
    )
}

/// [`login_config`] as a [`TomlConfig`], to be changed key by key.
pub fn login_toml(port: u16, issuer: &str, extra: &str) -> TomlConfig {
    TomlConfig::parse(&login_config(port, issuer, extra))
}

/// A proxy for [`config_text`] plus `extra`, in front of the provider at `issuer` (the in-process
/// fake one), once it has loaded the provider's metadata.
pub async fn start_proxy_for(issuer: &str, extra: &str) -> Proxy {
    let proxy = start_proxy(config_toml(extra).set("oidc.issuer", issuer)).await;
    wait_metadata(&proxy).await;
    proxy
}

/// Waits until `proxy` has loaded its provider's metadata (an in-process fake provider's).
pub async fn wait_metadata(proxy: &Proxy) {
    eventually(
        "the provider's metadata is loaded",
        std::time::Duration::from_secs(10),
        || async { proxy.app.oidc.provider.is_ready().then_some(()) },
    )
    .await;
}

/// The start of a login at `proxy`: the query of the provider's authorization URL it redirects
/// to, and the login cookie (`name=value`).
pub async fn begin_login(proxy: &Proxy) -> (std::collections::HashMap<String, String>, String) {
    let start = get(&proxy.url("/bff/login?returnUrl=/"), &[]).await;
    assert_eq!(start.status, 302);
    let location = url::Url::parse(start.header("location").unwrap()).unwrap();
    let query = location.query_pairs().into_owned().collect();
    let cookie = start
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (query, cookie)
}

/// The real binary on `config` (written into `dir`), its stderr (the log) going to
/// `dir/vestibule.log`: the process and the log's path.
pub fn spawn_binary(
    dir: &std::path::Path,
    config: &TomlConfig,
) -> (std::process::Child, std::path::PathBuf) {
    spawn_binary_with(dir, config, &[])
}

/// [`spawn_binary`] with the variables `env` added to its environment.
pub fn spawn_binary_with(
    dir: &std::path::Path,
    config: &TomlConfig,
    env: &[(&str, &str)],
) -> (std::process::Child, std::path::PathBuf) {
    let path = dir.join("config.toml");
    std::fs::write(&path, config.text()).unwrap();
    let log = dir.join("vestibule.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

/// A binary's log (see [`spawn_binary`]) once a line carrying `needle` is in it (within 10 s):
/// that line.
pub async fn logged(log: &std::path::Path, needle: &str) -> String {
    eventually(
        "the line is logged",
        std::time::Duration::from_secs(10),
        || async {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains(needle))
                .map(String::from)
        },
    )
    .await
}

/// Waits until a binary's admin listener on `admin` answers `/readyz` with 200.
pub async fn wait_binary_ready(admin: u16) {
    eventually(
        "vestibule becomes ready",
        std::time::Duration::from_secs(20),
        || async {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                client().get(format!("http://127.0.0.1:{admin}/readyz").parse().unwrap()),
            )
            .await;
            matches!(r, Ok(Ok(ref r)) if r.status() == 200).then_some(())
        },
    )
    .await;
}

/// The provider's redirect back to `proxy` with code `abc`, for the login [`begin_login`] began
/// (`query` and `login_cookie` are what it returned): the callback's answer.
pub async fn callback(
    proxy: &Proxy,
    query: &std::collections::HashMap<String, String>,
    login_cookie: &str,
) -> Reply {
    let url = proxy.url(&format!("/bff/callback?code=abc&state={}", query["state"]));
    get(&url, &[("cookie", login_cookie)]).await
}

/// Waits until the proxy has loaded the provider's metadata.
pub async fn wait_ready(proxy: &Proxy) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
        if r.status == 200 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "proxy never became ready: {}",
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `within`. Use instead of
/// a hand-written retry loop or a fixed sleep.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sends `request` byte for byte on a new connection to `addr` and returns everything that
/// comes back until the proxy closes it (the request should say `Connection: close`).
pub async fn raw_exchange(addr: impl tokio::net::ToSocketAddrs, request: &[u8]) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, request)
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer)
        .await
        .unwrap();
    answer
}
