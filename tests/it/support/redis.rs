//! A real `redis-server` for tests: a free port on loopback, a temporary directory, no
//! persistence unless asked (`stop` saves a snapshot so `restart` can come back with the data),
//! ready only once it answers PING, killed on drop. Never skips: a missing binary is a failure.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::free_port;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const READY_DEADLINE: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// For servers in statics, which are never dropped: a shell that waits for the end of a pipe
    /// from this process, then kills the server and removes its directory.
    watchdog: Option<Child>,
    tls_port: Option<u16>,
    certs: Option<tempfile::TempDir>,
    /// Where it listens besides loopback (see [`RedisServer::start_also_on`]).
    also_on: Option<Ipv4Addr>,
}

impl RedisServer {
    /// A standalone server.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A one-node Redis Cluster owning every slot, shared by every test of this test binary (a
    /// new cluster node refuses writes for its first two seconds). Give each test its own key
    /// prefix. The server exits with the test process.
    pub fn shared_cluster() -> &'static RedisServer {
        static CLUSTER: OnceLock<RedisServer> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            let cluster = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ];
            let mut server = RedisServer::start_with(&cluster);
            server.exit_with_this_process();
            server.command(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
            let deadline = Instant::now() + READY_DEADLINE;
            while !server
                .command(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(
                    Instant::now() < deadline,
                    "redis cluster did not reach state ok"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            server
        })
    }

    /// A server that also listens with TLS (a fresh self-signed certificate made with the
    /// `openssl` command) on [`RedisServer::tls_url`].
    pub fn start_tls() -> RedisServer {
        let certs = tempfile::tempdir().expect("temporary directory");
        let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .args([
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl to make a test certificate ({e}); install it")
            });
        assert!(
            status.success(),
            "openssl could not make a test certificate"
        );
        let mut server = RedisServer::start_tls_with(&cert, &key, &cert);
        server.certs = Some(certs);
        server
    }

    /// A server that also listens with TLS on [`RedisServer::tls_url`], with the certificate
    /// `cert` and its `key`, trusting `ca` (clients need no certificate of their own).
    pub fn start_tls_with(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> RedisServer {
        let tls_port = free_port();
        let (cert, key, ca) = (
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
        );
        let mut server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]);
        server.tls_port = Some(tls_port);
        server
    }

    /// A Sentinel watching `master` under the name `name`.
    pub fn start_sentinel(master: &RedisServer, name: &str) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("sentinel.conf");
        let text = format!("sentinel monitor {name} 127.0.0.1 {} 1\n", master.port);
        std::fs::write(&config, text).expect("write sentinel.conf");
        let args = vec![config.display().to_string(), "--sentinel".to_owned()];
        RedisServer::launch(dir, args)
    }

    /// A Sentinel like [`RedisServer::start_sentinel`] that declares the master down after
    /// `down_after` without an answer and fails over at once (for failover tests).
    pub fn start_quick_sentinel(
        master: &RedisServer,
        name: &str,
        down_after: Duration,
    ) -> RedisServer {
        RedisServer::start_quick_sentinel_at("127.0.0.1", master.port, name, down_after)
    }

    /// [`RedisServer::start_quick_sentinel`] for a master at `host:port` (e.g. in a network
    /// namespace).
    pub fn start_quick_sentinel_at(
        host: &str,
        port: u16,
        name: &str,
        down_after: Duration,
    ) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("sentinel.conf");
        let text = format!(
            "sentinel monitor {name} {host} {port} 1\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            down = down_after.as_millis(),
        );
        std::fs::write(&config, text).expect("write sentinel.conf");
        let args = vec![config.display().to_string(), "--sentinel".to_owned()];
        RedisServer::launch(dir, args)
    }

    /// A standalone server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        RedisServer::start_in(dir, extra)
    }

    /// A standalone server that writes every command to its append-only file before it answers
    /// (`appendfsync always`): SIGKILL ([`RedisServer::kill`]) loses nothing it answered, and
    /// [`RedisServer::restart`] comes back with it. The file is kept in memory (`/dev/shm`, where
    /// there is one): it must outlive the process, not the machine, and an fsync to a disk busy
    /// with other work took up to 300 ms on a loaded machine — past the store timeout of the
    /// fault tests, which then saw a failure of the machine's disk, not of what they test.
    pub fn start_durable() -> RedisServer {
        let in_memory = Path::new("/dev/shm");
        let dir = if in_memory.is_dir() {
            tempfile::tempdir_in(in_memory)
        } else {
            tempfile::tempdir()
        };
        let durable = ["--appendonly", "yes", "--appendfsync", "always"];
        RedisServer::start_in(dir.expect("temporary directory"), &durable)
    }

    /// A standalone server with extra `redis-server` arguments that also listens on `address`
    /// (a local address other than loopback, e.g. this side of a [`super::netns::NetHost`]'s
    /// link, so that a process in the namespace reaches it), without protected mode.
    pub fn start_also_on(address: Ipv4Addr, extra: &[&str]) -> RedisServer {
        let mut args = vec!["--protected-mode", "no"];
        args.extend_from_slice(extra);
        let dir = tempfile::tempdir().expect("temporary directory");
        let args = RedisServer::args_in(&dir_path(&dir), &args);
        RedisServer::launch_on(dir, args, Some(address))
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> RedisServer {
        let args = RedisServer::args_in(&dir_path(&dir), extra);
        RedisServer::launch(dir, args)
    }

    fn args_in(dir: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--save", "", "--appendonly", "no", "--dir", dir]
            .map(String::from)
            .into();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    fn launch(dir: tempfile::TempDir, args: Vec<String>) -> RedisServer {
        RedisServer::launch_on(dir, args, None)
    }

    fn launch_on(
        dir: tempfile::TempDir,
        args: Vec<String>,
        also_on: Option<Ipv4Addr>,
    ) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
            args,
            watchdog: None,
            tls_port: None,
            certs: None,
            also_on,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            match server.spawn() {
                Ok(()) => return server,
                Err(why) if attempts < 5 && why.contains("Address already in use") => {
                    server.port = free_port()
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.log_path()).expect("create redis log file");
        let child = Command::new("redis-server")
            .args(&self.args)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(self.also_on.map(|a| a.to_string()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}). These tests need a real Redis and never skip: \
                     install it, e.g. `apt-get install -y redis-server`."
                )
            });
        self.child = Some(child);
        self.wait_ready()
    }

    fn exit_with_this_process(&mut self) {
        let pid = self.child.as_ref().expect("a running server").id();
        let script = format!(
            "read _; kill {pid}; sleep 0.5; rm -rf '{}'",
            self.dir.path().display()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the watchdog shell");
        self.watchdog = Some(watchdog);
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.port))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(format!(
                    "redis-server exited with {status} on port {}:\n{log}",
                    self.port
                ));
            }
            if try_command(self.port, &["PING"]).is_some_and(|r| r.starts_with("+PONG")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {} did not answer PING in time",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://` URL of the TLS listener of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        let port = self
            .tls_port
            .expect("a server started with start_tls or start_tls_with");
        format!("rediss://127.0.0.1:{port}")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends one command and returns the raw reply (short replies only).
    pub fn command(&self, args: &[&str]) -> String {
        try_command(self.port, args)
            .unwrap_or_else(|| panic!("redis on port {} did not answer {args:?}", self.port))
    }

    /// Whether this server, a replica, has its master's data (its link to the master is up).
    /// False while it does not answer: a replica that writes the master's copy to its disk,
    /// syncs it and loads it answers nothing meanwhile, for longer than [`RedisServer::command`]
    /// waits when the disk is busy.
    pub fn in_sync(&self) -> bool {
        try_command(self.port, &["INFO", "replication"])
            .is_some_and(|r| r.contains("master_link_status:up"))
    }

    /// Shuts the server down after saving a snapshot into its directory, and waits for the exit.
    pub fn stop(&mut self) {
        let _ = try_command(self.port, &["SHUTDOWN", "SAVE"]);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + READY_DEADLINE;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Kills the server with SIGKILL (no snapshot, no goodbye to clients) and waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`) to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Starts again on the same port and directory, loading the snapshot `stop` saved.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn().unwrap_or_else(|why| panic!("{why}"));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        for mut child in [self.child.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dir_path(dir: &tempfile::TempDir) -> String {
    dir.path().display().to_string()
}

fn try_command(port: u16, args: &[&str]) -> Option<String> {
    try_command_at(SocketAddr::from(([127, 0, 0, 1], port)), args)
}

/// Sends one command to the server at `addr` and returns the raw reply (short replies only), or
/// `None` without an answer within half a second.
pub fn try_command_at(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = vec![0u8; 64 * 1024];
    let read = stream.read(&mut reply).ok()?;
    (read > 0).then(|| String::from_utf8_lossy(&reply[..read]).into_owned())
}

/// A Redis Cluster of `masters` masters with one replica each, all on loopback, made with
/// `redis-cli --cluster create`, ready once every node reports `cluster_state:ok` and every
/// replica is in sync. Short `cluster-node-timeout`, so a replica takes over a dead master fast.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, node_timeout: Duration) -> RedisCluster {
        let timeout = node_timeout.as_millis().to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            "--appendonly",
            "yes",
        ];
        let nodes: Vec<RedisServer> = (0..masters * 2)
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); install redis-tools"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.settled() {
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every live node sees a healthy cluster and every replica's link to its master is up.
    pub fn settled(&self) -> bool {
        self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
            let info = try_command(n.port, &["CLUSTER", "INFO"]).unwrap_or_default();
            let replication = try_command(n.port, &["INFO", "replication"]).unwrap_or_default();
            info.contains("cluster_state:ok")
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Indexes of the live nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].child.is_some()
                    && try_command(self.nodes[i].port, &["ROLE"])
                        .is_some_and(|r| r.contains("master"))
            })
            .collect()
    }
}

/// The number of keys matching `pattern` on the server at `port` (short replies only).
pub fn count_keys(port: u16, pattern: &str) -> usize {
    count_keys_at(SocketAddr::from(([127, 0, 0, 1], port)), pattern)
}

/// [`count_keys`] on the server at `addr`.
pub fn count_keys_at(addr: SocketAddr, pattern: &str) -> usize {
    let reply = try_command_at(addr, &["KEYS", pattern]).expect("KEYS answered");
    reply
        .lines()
        .next()
        .and_then(|l| l.strip_prefix('*'))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected KEYS reply {reply:?}"))
}
