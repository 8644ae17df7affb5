//! A test host of our own across a real network link: a network namespace joined to this one
//! by a veth pair, with a `redis-server` inside it. The link can be cut as a failed switch or a
//! partition cuts it — packets dropped, no RST, no FIN, new connections unanswered — which
//! neither a killed server (its kernel refuses connections at once) nor a stopped one (its
//! kernel still accepts and acknowledges) shows.
//!
//! Needs root and iproute2 (`ip`), as CI has; never skipped. The addresses are taken from
//! 198.18.0.0/15 (RFC 2544, for benchmarking networks): this machine's own test hosts only.

use super::redis::{RedisServer, count_keys_at, try_command_at};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static HOSTS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`, panicking with its error when it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `ip` ({e}): these tests need iproute2 and root, and never skip: \
             `apt-get install -y iproute2`"
        )
    });
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace with one veth link to this one; removed on drop.
pub struct NetHost {
    namespace: String,
    /// The link's end on this side, and the one inside the namespace.
    here: String,
    there: String,
    /// The namespace's address, reached over the link.
    pub address: Ipv4Addr,
    /// This side's address on the link: what a process inside the namespace reaches this one at
    /// (a server of the test bound there is reached from inside across the link).
    pub near: Ipv4Addr,
    redis: Option<Child>,
    /// Other processes started inside the namespace, killed on drop.
    children: Vec<Child>,
    /// The forwarding tasks of [`NetHost::reach`], aborted on drop.
    tasks: Vec<tokio::task::AbortHandle>,
    dir: tempfile::TempDir,
}

impl NetHost {
    /// A new namespace and link, with addresses of their own (a /30 per host of this process).
    pub fn start() -> NetHost {
        let n = HOSTS.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id() % 100_000;
        let namespace = format!("vb{id}n{n}");
        let (here, there) = (format!("vb{id}h{n}"), format!("vb{id}t{n}"));
        // One /30 per host: which one from this process's id and the count, in 198.18.0.0/15.
        let block = (id.wrapping_mul(7).wrapping_add(n) % 32_768) * 4;
        let [a, b] = u16::try_from(block).unwrap_or(0).to_be_bytes();
        let near = Ipv4Addr::new(198, 18 + (a >> 7), a & 0x7f, b.wrapping_add(1));
        let address = Ipv4Addr::new(198, 18 + (a >> 7), a & 0x7f, b.wrapping_add(2));
        ip(&["netns", "add", &namespace]);
        let host = NetHost {
            namespace,
            here,
            there,
            address,
            near,
            redis: None,
            children: Vec::new(),
            tasks: Vec::new(),
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        ip(&[
            "link",
            "add",
            &host.here,
            "type",
            "veth",
            "peer",
            "name",
            &host.there,
        ]);
        ip(&["link", "set", &host.there, "netns", &host.namespace]);
        ip(&["addr", "add", &format!("{near}/30"), "dev", &host.here]);
        ip(&["link", "set", &host.here, "up"]);
        host.inside(&["addr", "add", &format!("{address}/30"), "dev", &host.there]);
        host.inside(&["link", "set", &host.there, "up"]);
        host.inside(&["link", "set", "lo", "up"]);
        // The far end's hardware address, fixed: with the link cut, packets to it are sent into
        // the dead link and lost, as across a partition, instead of failing at once for want of
        // a neighbour ("No route to host").
        let mac = host.mac_inside();
        ip(&[
            "neigh",
            "replace",
            &address.to_string(),
            "lladdr",
            mac.trim(),
            "dev",
            &host.here,
            "nud",
            "permanent",
        ]);
        host
    }

    fn inside(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.namespace, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn mac_inside(&self) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "cat"])
            .arg(format!("/sys/class/net/{}/address", self.there))
            .output()
            .expect("read the far end's address");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `redis-server` inside the namespace, listening on its address; its URL.
    pub fn start_redis(&mut self) -> String {
        self.start_redis_with(&[])
    }

    /// [`NetHost::start_redis`] with extra `redis-server` arguments.
    pub fn start_redis_with(&mut self, extra: &[&str]) -> String {
        assert!(self.redis.is_none(), "one redis-server per host");
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "redis-server"])
            .args(["--bind", &self.address.to_string(), "--port", "6379"])
            .args(["--protected-mode", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start redis-server in the namespace");
        self.redis = Some(child);
        let at = SocketAddr::from((self.address, 6379));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server in {} did not listen in time",
                self.namespace
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        format!("redis://{at}")
    }

    /// Runs `program` with `args` inside the namespace, its output in a log file named after
    /// `name`; killed on drop.
    pub fn spawn(&mut self, name: &str, program: &str, args: &[&str]) {
        let log =
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} in the namespace: {e}"));
        self.children.push(child);
    }

    /// A TCP relay inside the namespace (node's `net`), listening on its address at `port` and
    /// passing each connection on to `to` — typically a server of the test bound on
    /// [`NetHost::near`] — so that both legs cross the link: with it cut, a server of this
    /// process is as far away as one on another host. Returns where to connect.
    pub fn relay(&mut self, port: u16, to: SocketAddr) -> SocketAddr {
        const RELAY: &str = "const net = require('net');\
            const [host, port, toHost, toPort] = process.argv.slice(1);\
            net.createServer((c) => {\
              const u = net.connect(Number(toPort), toHost);\
              c.pipe(u); u.pipe(c);\
              c.on('error', () => u.destroy()); u.on('error', () => c.destroy());\
            }).listen(Number(port), host);";
        let (host, port_text) = (self.address.to_string(), port.to_string());
        let (to_host, to_port) = (to.ip().to_string(), to.port().to_string());
        self.spawn(
            &format!("relay-{port}"),
            "node",
            &["-e", RELAY, &host, &port_text, &to_host, &to_port],
        );
        let at = SocketAddr::from((self.address, port));
        self.wait_listening(at, "the relay");
        at
    }

    /// Puts a server of this process at `to` (on loopback) behind the link: a relay inside the
    /// namespace passes each connection back across the link to a forwarder of this process on
    /// [`NetHost::near`], which passes it on to `to`. Returns the address to use instead of `to`:
    /// with the link cut, nothing sent there arrives, nor any answer.
    pub async fn reach(&mut self, to: SocketAddr) -> SocketAddr {
        self.reach_on(None, to).await
    }

    /// [`NetHost::reach`], listening inside the namespace on `port` when given (the namespace
    /// has ports of its own: 80 and 443 are free there).
    pub async fn reach_on(&mut self, port: Option<u16>, to: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind((self.near, 0))
            .await
            .expect("a port on the link's near address");
        let near = listener.local_addr().expect("the forwarder's address");
        let forward = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut server).await;
                    }
                });
            }
        });
        self.tasks.push(forward.abort_handle());
        self.relay(port.unwrap_or(near.port()), near)
    }

    fn wait_listening(&self, at: SocketAddr, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{what} in {} did not listen on {at} in time",
                self.namespace
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts the link: from now on every packet either way is lost.
    pub fn partition(&self) {
        self.inside(&["link", "set", &self.there, "down"]);
    }

    /// Mends the link.
    pub fn heal(&self) {
        self.inside(&["link", "set", &self.there, "up"]);
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        for mut child in self.redis.take().into_iter().chain(self.children.drain(..)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.here])
            .stderr(Stdio::null())
            .status();
    }
}

/// A Redis Cluster of three masters, one of them — the *far* node — inside a [`NetHost`], across
/// its link. The two near nodes listen on loopback and on the link's near address; every node
/// announces (`cluster-announce-ip`) the address at which the others and the clients reach it,
/// so the cluster bus between the far node and the near ones crosses the link too.
/// [`NetHost::partition`] then cuts the far node off from its peers and from every client.
///
/// Made with [`LinkedCluster::start`], the node timeout is longer than the tests' cuts: no node
/// is marked failed, nothing fails over and the cluster never refuses commands for want of the
/// far node's slots — the link heals without a failover. With
/// [`LinkedCluster::start_with_far_replica`], the far node has a replica this side, which takes
/// over once the far node has been cut off for longer than the node timeout.
pub struct LinkedCluster {
    pub host: NetHost,
    near: Vec<RedisServer>,
    replica: Option<RedisServer>,
}

impl LinkedCluster {
    pub fn start() -> LinkedCluster {
        LinkedCluster::start_with(Duration::from_secs(30), false)
    }

    /// A cluster whose far node has a replica this side (in sync once this returns), with
    /// `node_timeout`.
    pub fn start_with_far_replica(node_timeout: Duration) -> LinkedCluster {
        LinkedCluster::start_with(node_timeout, true)
    }

    fn start_with(node_timeout: Duration, replica: bool) -> LinkedCluster {
        let mut host = NetHost::start();
        let node_timeout = node_timeout.as_millis().to_string();
        let cluster_args = |announce: &str| -> Vec<String> {
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &node_timeout,
                "--cluster-announce-ip",
                announce,
                "--repl-diskless-sync-delay",
                "0",
            ]
            .map(String::from)
            .into()
        };
        let far = cluster_args(&host.address.to_string());
        host.start_redis_with(&far.iter().map(String::as_str).collect::<Vec<_>>());
        let near_args = cluster_args(&host.near.to_string());
        let near_args: Vec<&str> = near_args.iter().map(String::as_str).collect();
        let near = (0..2)
            .map(|_| RedisServer::start_also_on(host.near, &near_args))
            .collect();
        let mut cluster = LinkedCluster {
            host,
            near,
            replica: None,
        };
        redis_cli(
            &["--cluster", "create"],
            cluster.addresses(),
            &["--cluster-replicas", "0", "--cluster-yes"],
        );
        cluster.wait_settled();
        if replica {
            let replica = RedisServer::start_also_on(cluster.host.near, &near_args);
            let at = SocketAddr::from((cluster.host.near, replica.port()));
            let far_id = try_command_at(cluster.far(), &["CLUSTER", "MYID"])
                .and_then(|reply| reply.lines().nth(1).map(str::to_owned))
                .expect("the far node's id");
            redis_cli(
                &["--cluster", "add-node"],
                vec![at, cluster.far()],
                &["--cluster-slave", "--cluster-master-id", &far_id],
            );
            cluster.replica = Some(replica);
            cluster.wait_settled();
        }
        cluster
    }

    fn wait_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.settled() {
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The far node's replica, where the others and the clients reach it.
    pub fn replica(&self) -> Option<SocketAddr> {
        self.replica
            .as_ref()
            .map(|r| SocketAddr::from((self.host.near, r.port())))
    }

    /// Whether the far node's replica is a master now.
    pub fn replica_took_over(&self) -> bool {
        self.replica()
            .and_then(|at| try_command_at(at, &["ROLE"]))
            .is_some_and(|role| role.contains("master"))
    }

    /// Every master the cluster was made with, the far one first, where the others and the
    /// clients reach it.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut all = vec![self.far()];
        all.extend(
            self.near
                .iter()
                .map(|n| SocketAddr::from((self.host.near, n.port()))),
        );
        all
    }

    /// The far node's address.
    pub fn far(&self) -> SocketAddr {
        SocketAddr::from((self.host.address, 6379))
    }

    /// Every node's URL, the far node's first.
    pub fn urls(&self) -> Vec<String> {
        self.addresses()
            .iter()
            .map(|a| format!("redis://{a}"))
            .collect()
    }

    /// Every node sees a healthy cluster that knows every node, and the replica (if any) has
    /// its master's data.
    pub fn settled(&self) -> bool {
        let nodes = self.addresses().into_iter().chain(self.replica());
        let known = format!("cluster_known_nodes:{}", nodes.clone().count());
        nodes.clone().all(|a| {
            try_command_at(a, &["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok") && info.contains(&known))
        }) && self.replica().is_none_or(|at| {
            try_command_at(at, &["INFO", "replication"])
                .is_some_and(|info| info.contains("master_link_status:up"))
        })
    }

    /// The number of keys matching `pattern` on the node at `addr`.
    pub fn count_keys(&self, addr: SocketAddr, pattern: &str) -> usize {
        count_keys_at(addr, pattern)
    }
}

/// Runs `redis-cli` with `before`, the node addresses `nodes`, then `after`; panics if it fails.
fn redis_cli(before: &[&str], nodes: Vec<SocketAddr>, after: &[&str]) {
    let out = Command::new("redis-cli")
        .args(before)
        .args(nodes.iter().map(ToString::to_string))
        .args(after)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); install redis-tools"));
    assert!(
        out.status.success(),
        "redis-cli {before:?} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
