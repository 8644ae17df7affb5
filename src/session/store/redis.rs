//! The Redis store: standalone (`redis://`, `rediss://`), Sentinel or Cluster.
//!
//! Records are hashes `{v: version, d: bytes}`; compare-and-set, lock extension and release are
//! Lua scripts, so each touches one key (safe in Cluster). Every key and channel is prefixed with
//! `key_prefix`. Commands go through a reconnecting connection (`ConnectionManager`, replaced
//! when a standalone server answers READONLY, see [`link`]; the cluster connection, replaced as a
//! whole after a command got no answer, see [`cluster`]; or a manager re-resolved through
//! Sentinel after a failure) and each is bounded by the configured timeout (`[session.redis]
//! timeout`), reconnecting included; every failure is `StoreError::Unavailable`, never "not
//! found".
//! Pub/sub uses its own connection, see [`pubsub`].
//!
//! A standalone server also gets one connection per serving worker: [`RedisStore::for_worker`]
//! makes a handle with a connection of its own, whose reader task runs on the runtime that first
//! uses it, so a command sent from that runtime and its answer never wake another thread. The
//! caller decides which handle a runtime uses; this module knows nothing of workers.

mod cluster;
mod eviction;
mod link;
mod pubsub;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Client, Cmd, ConnectionAddr, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError,
    RedisResult, Script, ScriptInvocation, TlsMode,
};
use tokio::sync::watch;

use super::{Corruption, Misconfiguration, Outage, Record, StoreError, redact_url, ttl_millis};
use crate::config::{RedisConfig, Secret, SentinelConfig};

/// Upper bound on establishing one connection (lowered to the operation timeout if that is
/// shorter).
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound on waiting for one reply (lowered likewise).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

const PUT_NEW: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1";

const COMPARE_AND_SET: &str = r"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1";

const DELETE_AT: &str = r"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])";

// The announcing forms publish ARGV[n] on channel ARGV[n-1] in the same step as the change:
// a change is never left without its message (a connection lost or a process gone between the
// two), and a command carried out late announces itself when it is carried out.
const COMPARE_AND_SET_ANNOUNCED: &str = r"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1";

// Announced also when the key is gone: a copy may outlive the record (its own time to live).
const DELETE_ANNOUNCED: &str = r"
local removed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return removed";

const DELETE_AT_ANNOUNCED: &str = r"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
local removed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return removed";

// An index is a sorted set scored by each member's deadline (Unix seconds): the members past
// their deadline go in the same step as an add, so no index grows by its stale members.
const INDEX_ADD: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return redis.call('ZCARD', KEYS[1])";

const EXTEND_LOCK: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])";

const SHORTEN_LOCK: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left <= tonumber(ARGV[2]) or left >= tonumber(ARGV[1]) then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])";

const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])";

/// A Redis-backed store. Clones share connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    /// This handle's own connection to a standalone server (see [`RedisStore::for_worker`]);
    /// `None`: the shared one.
    own: Option<Arc<link::Link>>,
}

struct Inner {
    prefix: String,
    /// Upper bound on one operation.
    timeout: Duration,
    conn: Conn,
    scripts: Scripts,
    pubsub: pubsub::Subscriber,
    description: String,
    metrics: OpMetrics,
    /// Operations answered `Unavailable` so far (`/readyz` trusts no PONG from before one).
    outages: std::sync::atomic::AtomicU64,
}

/// The operations [`RedisStore::run`] names, in metrics and spans.
const OPS: [&str; 20] = [
    "get",
    "version",
    "put_new",
    "compare_and_set",
    "touch",
    "delete",
    "delete_at",
    "index_add",
    "index_members",
    "index_remove",
    "old_index_members",
    "old_index_remove",
    "exists",
    "set_nx",
    "remembered",
    "extend_lock",
    "shorten_lock",
    "unlock",
    "publish",
    "ping",
];

/// Each operation's latency histogram and error counter, registered once: looking a labelled
/// series up per command would cost more than recording into it.
struct OpMetrics {
    durations: Vec<metrics::Histogram>,
    errors: Vec<metrics::Counter>,
}

impl OpMetrics {
    fn new() -> OpMetrics {
        OpMetrics {
            durations: OPS
                .iter()
                .map(|op| metrics::histogram!("vestibule_store_duration_seconds", "op" => *op))
                .collect(),
            errors: OPS
                .iter()
                .map(|op| metrics::counter!("vestibule_store_errors_total", "op" => *op))
                .collect(),
        }
    }

    fn record(&self, what: &str, elapsed: Duration, failed: bool) {
        let Some(i) = OPS.iter().position(|op| *op == what) else {
            return;
        };
        if let Some(h) = self.durations.get(i) {
            h.record(elapsed.as_secs_f64());
        }
        if failed && let Some(c) = self.errors.get(i) {
            c.increment(1);
        }
    }
}

struct Scripts {
    put_new: Script,
    compare_and_set: Script,
    delete_at: Script,
    compare_and_set_announced: Script,
    delete_announced: Script,
    delete_at_announced: Script,
    index_add: Script,
    extend_lock: Script,
    shorten_lock: Script,
    unlock: Script,
}

enum Conn {
    /// One server. Handles made by [`RedisStore::for_worker`] have a connection of their own;
    /// the others share this one.
    Single(Arc<link::Link>),
    /// Replaced as a whole after a command gets no answer ([`cluster`]).
    Cluster(Arc<cluster::ClusterLink>),
    Sentinel(Box<SentinelConn>),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisStore({})", self.inner.description)
    }
}

enum Op<'a> {
    Cmd(Cmd),
    Script(ScriptInvocation<'a>),
}

impl RedisStore {
    /// Builds the connections from `[session.redis]`. Connects lazily: only a bad
    /// configuration is an error here. Waits up to `DEFAULT_CONNECTION_TIMEOUT` for the pub/sub
    /// subscription so that a reachable server delivers messages published right after this.
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let RedisConfig {
            url,
            sentinel,
            cluster,
            key_prefix,
            timeout,
            ca_file,
        } = config;
        let url = url.expose();
        let roots = ca_file
            .as_ref()
            .map(|ca| super::pem_certificates(&ca.certs));
        let timeout = *timeout;
        let cluster = (!cluster.is_empty()).then(|| exposed(cluster));
        let (connect_limit, response_limit) = limits(timeout);
        let (conn, source, description) = match (sentinel, cluster) {
            (Some(_), Some(_)) => {
                return Err(StoreError::Config(Misconfiguration::SentinelAndCluster));
            }
            (Some(_), None) if roots.is_some() => {
                return Err(StoreError::Config(Misconfiguration::SentinelWithCaFile));
            }
            (Some(SentinelConfig { master, nodes }), None) => {
                let nodes = &exposed(nodes);
                let conn = Conn::Sentinel(Box::new(SentinelConn::new(
                    sentinel_client(url, master, nodes)?,
                    timeout,
                )));
                let source =
                    pubsub::Source::Sentinel(Box::new(sentinel_client(url, master, nodes)?));
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                (
                    conn,
                    source,
                    format!("sentinel master {master} via {}", nodes.join(", ")),
                )
            }
            (None, Some(nodes)) => {
                let mut builder = ClusterClient::builder(nodes.iter().copied())
                    .connection_timeout(connect_limit)
                    .response_timeout(response_limit);
                if let Some(roots) = &roots {
                    builder = builder.certs(certificates(roots));
                }
                let client = builder.build().map_err(config_error)?;
                let conn = cluster::ClusterLink::new(client, (connect_limit, response_limit));
                let clients = nodes
                    .iter()
                    .map(|n| open(n, roots.as_deref()))
                    .collect::<Result<Vec<_>, _>>()?;
                let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
                let description = format!("cluster {}", nodes.join(", "));
                (
                    Conn::Cluster(Arc::new(conn)),
                    pubsub::Source::Clients(clients),
                    description,
                )
            }
            (None, None) => {
                let client = open(url, roots.as_deref())?;
                let source = pubsub::Source::Clients(vec![client.clone()]);
                let link = link::Link::new(client, timeout).map_err(config_error)?;
                let conn = Conn::Single(Arc::new(link));
                (conn, source, redact_url(url))
            }
        };
        // Redis Cluster tracks keys per node: the plain subscription (and version reads) there.
        let tracking = (!matches!(conn, Conn::Cluster(_))).then_some(pubsub::Tracking {
            keys: crate::session::manager::RECORD_PREFIX,
            channel: crate::session::manager::INVALIDATION_CHANNEL,
            to_message: crate::session::manager::handle_of_record,
        });
        let pubsub = pubsub::Subscriber::start(source, key_prefix.clone(), tracking);
        pubsub.wait_connected(DEFAULT_CONNECTION_TIMEOUT).await;
        let scripts = Scripts {
            put_new: Script::new(PUT_NEW),
            compare_and_set: Script::new(COMPARE_AND_SET),
            delete_at: Script::new(DELETE_AT),
            compare_and_set_announced: Script::new(COMPARE_AND_SET_ANNOUNCED),
            delete_announced: Script::new(DELETE_ANNOUNCED),
            delete_at_announced: Script::new(DELETE_AT_ANNOUNCED),
            index_add: Script::new(INDEX_ADD),
            extend_lock: Script::new(EXTEND_LOCK),
            shorten_lock: Script::new(SHORTEN_LOCK),
            unlock: Script::new(UNLOCK),
        };
        let prefix = key_prefix.clone();
        Ok(RedisStore {
            inner: Arc::new(Inner {
                prefix,
                timeout,
                conn,
                scripts,
                pubsub,
                description,
                metrics: OpMetrics::new(),
                outages: std::sync::atomic::AtomicU64::new(0),
            }),
            own: None,
        })
    }

    /// A handle for one serving worker, sharing everything with this one but, on a standalone
    /// server, the connection: it gets its own, connected on first use (by the worker, whose
    /// runtime then drives it). Cluster and Sentinel connections stay shared.
    pub fn for_worker(&self) -> RedisStore {
        let own = match &self.inner.conn {
            // Cannot fail for a client that `connect` already accepted; the shared one then.
            Conn::Single(shared) => shared.another().ok().map(Arc::new),
            Conn::Cluster(_) | Conn::Sentinel(_) => None,
        };
        RedisStore {
            inner: self.inner.clone(),
            own,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.inner.prefix, key)
    }

    /// Runs one command or script (`what`, a fixed name for metrics and spans — never a key),
    /// timed (`vestibule_store_duration_seconds`), failures counted
    /// (`vestibule_store_errors_total`), as a `redis` span of the request's trace.
    async fn run<T: FromRedisValue>(
        &self,
        what: &'static str,
        op: Op<'_>,
    ) -> Result<T, StoreError> {
        let span = tracing::trace_span!(
            target: crate::telemetry::trace::TARGET,
            "redis",
            "otel.kind" = "client",
            "db.system.name" = "redis",
            "db.operation.name" = what,
            "error.type" = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self.run_untimed(op).await;
        self.inner
            .metrics
            .record(what, started.elapsed(), result.is_err());
        if result.is_err() {
            span.record("error.type", "unavailable");
        }
        if let Err(StoreError::Unavailable(_)) = &result {
            self.inner
                .outages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// How many operations have been answered `Unavailable` (the store down, stalled, or out
    /// of reach) since the store was made.
    pub fn outages(&self) -> u64 {
        self.inner
            .outages
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn run_untimed<T: FromRedisValue>(&self, op: Op<'_>) -> Result<T, StoreError> {
        let attempts = async {
            match self.attempt(&op).await {
                // Never sent: a connection that failed to reconnect earlier reports that failure
                // once, then reconnects. Try once more (within the deadline) rather than answer
                // 503 to the first request after Redis is back.
                Err(err) if err.is_connection_refusal() => self.attempt(&op).await,
                other => other,
            }
        };
        match tokio::time::timeout(self.inner.timeout, attempts).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(store_error(err)),
            Err(_) => {
                self.timed_out();
                Err(StoreError::Unavailable(Outage::TimedOut(
                    self.inner.timeout,
                )))
            }
        }
    }

    /// An operation got no answer within the timeout: its connection is not trusted further
    /// (it may lead into a dead link; [`link::Link::timed_out`]).
    fn timed_out(&self) {
        match &self.inner.conn {
            Conn::Single(shared) => self.own.as_ref().unwrap_or(shared).timed_out(),
            // Replaced as a whole once a new one reaches every master: the client retries on a
            // node's connection through timeouts (see [`cluster`]).
            Conn::Cluster(cluster) => cluster.timed_out(),
            // Asked of the Sentinels again: the master may have moved, or be cut off.
            Conn::Sentinel(sentinel) => sentinel.forget(),
        }
    }

    async fn attempt<T: FromRedisValue>(&self, op: &Op<'_>) -> RedisResult<T> {
        match &self.inner.conn {
            Conn::Single(shared) => self.own.as_ref().unwrap_or(shared).exec(op).await,
            Conn::Cluster(cluster) => cluster.exec(op).await,
            Conn::Sentinel(sentinel) => {
                let mut manager = sentinel.manager().await?;
                let result = exec(op, &mut manager).await;
                if let Err(err) = &result
                    && master_may_have_moved(err)
                {
                    sentinel.forget();
                }
                result
            }
        }
    }

    fn cmd(name: &str) -> Cmd {
        redis::cmd(name)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let mut cmd = Self::cmd("HMGET");
        cmd.arg(self.key(key)).arg("v").arg("d");
        let (version, value): (Option<u64>, Option<Vec<u8>>) =
            self.run("get", Op::Cmd(cmd)).await?;
        match (version, value) {
            (Some(version), Some(value)) => Ok(Some(Record { version, value })),
            (None, None) => Ok(None),
            _ => Err(StoreError::Corrupt(Corruption::Incomplete)),
        }
    }

    pub async fn version(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let mut cmd = Self::cmd("HGET");
        cmd.arg(self.key(key)).arg("v");
        self.run("version", Op::Cmd(cmd)).await
    }

    pub async fn put_new(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.put_new.prepare_invoke();
        inv.key(self.key(key)).arg(value).arg(ttl_millis(ttl));
        self.run("put_new", Op::Script(inv)).await
    }

    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.compare_and_set.prepare_invoke();
        inv.key(self.key(key))
            .arg(expected_version)
            .arg(value)
            .arg(ttl_millis(ttl));
        self.run("compare_and_set", Op::Script(inv)).await
    }

    pub async fn touch(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut cmd = Self::cmd("PEXPIRE");
        cmd.arg(self.key(key)).arg(ttl_millis(ttl));
        self.run("touch", Op::Cmd(cmd)).await
    }

    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut cmd = Self::cmd("DEL");
        cmd.arg(self.key(key));
        let removed: u64 = self.run("delete", Op::Cmd(cmd)).await?;
        Ok(removed > 0)
    }

    pub async fn delete_at(&self, key: &str, version: u64) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.delete_at.prepare_invoke();
        inv.key(self.key(key)).arg(version);
        self.run("delete_at", Op::Script(inv)).await
    }

    pub async fn compare_and_set_announced(
        &self,
        key: &str,
        expected_version: u64,
        value: &[u8],
        ttl: Duration,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let mut inv = self
            .inner
            .scripts
            .compare_and_set_announced
            .prepare_invoke();
        inv.key(self.key(key))
            .arg(expected_version)
            .arg(value)
            .arg(ttl_millis(ttl))
            .arg(self.key(channel_suffix))
            .arg(payload);
        self.run("compare_and_set", Op::Script(inv)).await
    }

    pub async fn delete_announced(
        &self,
        key: &str,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.delete_announced.prepare_invoke();
        inv.key(self.key(key))
            .arg(self.key(channel_suffix))
            .arg(payload);
        let removed: u64 = self.run("delete", Op::Script(inv)).await?;
        Ok(removed > 0)
    }

    pub async fn delete_at_announced(
        &self,
        key: &str,
        version: u64,
        channel_suffix: &str,
        payload: &str,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.delete_at_announced.prepare_invoke();
        inv.key(self.key(key))
            .arg(version)
            .arg(self.key(channel_suffix))
            .arg(payload);
        self.run("delete_at", Op::Script(inv)).await
    }

    pub async fn index_add(
        &self,
        index_key: &str,
        member: &str,
        deadline: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        let ttl = Duration::from_secs(deadline.saturating_sub(now));
        let mut inv = self.inner.scripts.index_add.prepare_invoke();
        inv.key(self.key(index_key))
            .arg(member)
            .arg(deadline)
            .arg(now)
            .arg(ttl_millis(ttl));
        self.run("index_add", Op::Script(inv)).await
    }

    pub async fn index_members(&self, index_key: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut cmd = Self::cmd("ZRANGE");
        cmd.arg(self.key(index_key))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let ranked: Vec<(String, f64)> = self.run("index_members", Op::Cmd(cmd)).await?;
        // Whole seconds, written by `index_add`: exact in a double.
        Ok(ranked
            .into_iter()
            .map(|(member, score)| (member, score.max(0.0) as u64))
            .collect())
    }

    pub async fn index_remove(&self, index_key: &str, member: &str) -> Result<(), StoreError> {
        let mut cmd = Self::cmd("ZREM");
        cmd.arg(self.key(index_key)).arg(member);
        self.run::<i64>("index_remove", Op::Cmd(cmd))
            .await
            .map(drop)
    }

    pub async fn old_index_members(&self, index_key: &str) -> Result<Vec<String>, StoreError> {
        let mut cmd = Self::cmd("SMEMBERS");
        cmd.arg(self.key(index_key));
        self.run("old_index_members", Op::Cmd(cmd)).await
    }

    pub async fn old_index_remove(&self, index_key: &str, member: &str) -> Result<(), StoreError> {
        let mut cmd = Self::cmd("SREM");
        cmd.arg(self.key(index_key)).arg(member);
        self.run::<i64>("old_index_remove", Op::Cmd(cmd))
            .await
            .map(drop)
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let mut cmd = Self::cmd("EXISTS");
        cmd.arg(self.key(key));
        let found: u64 = self.run("exists", Op::Cmd(cmd)).await?;
        Ok(found > 0)
    }

    async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut cmd = Self::cmd("SET");
        cmd.arg(self.key(key))
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl_millis(ttl));
        let reply: Option<String> = self.run("set_nx", Op::Cmd(cmd)).await?;
        Ok(reply.is_some())
    }

    pub async fn remember_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.set_nx(key, "1", ttl).await
    }

    pub async fn remembered(&self, key: &str) -> Result<bool, StoreError> {
        let mut cmd = Self::cmd("EXISTS");
        cmd.arg(self.key(key));
        let found: u64 = self.run("remembered", Op::Cmd(cmd)).await?;
        Ok(found > 0)
    }

    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.set_nx(key, token, lease).await
    }

    pub async fn extend_lock(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.extend_lock.prepare_invoke();
        inv.key(self.key(key)).arg(token).arg(ttl_millis(lease));
        self.run("extend_lock", Op::Script(inv)).await
    }

    pub async fn shorten_lock(
        &self,
        key: &str,
        below: Duration,
        to: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.shorten_lock.prepare_invoke();
        inv.key(self.key(key))
            .arg(ttl_millis(below))
            .arg(ttl_millis(to));
        self.run("shorten_lock", Op::Script(inv)).await
    }

    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.unlock.prepare_invoke();
        inv.key(self.key(key)).arg(token);
        self.run::<i64>("unlock", Op::Script(inv)).await.map(drop)
    }

    pub async fn publish(&self, channel_suffix: &str, payload: &str) -> Result<(), StoreError> {
        let mut cmd = Self::cmd("PUBLISH");
        cmd.arg(self.key(channel_suffix)).arg(payload);
        self.run::<i64>("publish", Op::Cmd(cmd)).await.map(drop)
    }

    pub fn subscribe(&self, channel_suffix: &str) -> super::Subscription {
        self.inner.pubsub.subscribe(channel_suffix)
    }

    pub fn subscription_live(&self) -> watch::Receiver<bool> {
        self.inner.pubsub.live()
    }

    /// Proven on the subscription's connection, except with Redis Cluster: a message published
    /// through one node reaches the node this instance listens to later, in no set order with
    /// what that node answers.
    pub fn freshness(&self) -> super::Freshness {
        match self.inner.conn {
            Conn::Cluster(_) => super::Freshness::Unproven,
            Conn::Single(_) | Conn::Sentinel(_) => {
                super::Freshness::Proven(self.inner.pubsub.proof())
            }
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let reply: String = self.run("ping", Op::Cmd(Self::cmd("PING"))).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Unavailable(Outage::UnexpectedPing))
        }
    }
}

async fn exec<T: FromRedisValue>(op: &Op<'_>, con: &mut impl ConnectionLike) -> RedisResult<T> {
    match op {
        Op::Cmd(cmd) => cmd.query_async(con).await,
        Op::Script(invocation) => invocation.invoke_async(con).await,
    }
}

/// Connection and response timeouts that fit in one operation's `timeout`.
fn limits(timeout: Duration) -> (Duration, Duration) {
    (
        DEFAULT_CONNECTION_TIMEOUT.min(timeout),
        DEFAULT_RESPONSE_TIMEOUT.min(timeout),
    )
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    // Few, quick retries: a request waiting on Redis is a user waiting. The manager starts a new
    // reconnect attempt on the next command after these run out, so it never gives up for good.
    let (connect_limit, response_limit) = limits(timeout);
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(connect_limit))
        .set_response_timeout(Some(response_limit))
}

/// A client for one server URL; a `rediss://` one trusts `roots` (PEM) instead of the web PKI
/// roots when given.
fn open(url: &str, roots: Option<&[u8]>) -> Result<Client, StoreError> {
    match roots {
        Some(roots) if url.starts_with("rediss://") => {
            Client::build_with_tls(url, certificates(roots)).map_err(config_error)
        }
        _ => Client::open(url).map_err(config_error),
    }
}

fn certificates(roots: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(roots.to_vec()),
    }
}

fn config_error(err: RedisError) -> StoreError {
    StoreError::Config(Misconfiguration::Redis(Arc::new(err)))
}

fn store_error(err: RedisError) -> StoreError {
    if err.code() == Some("WRONGTYPE") || err.kind() == ErrorKind::UnexpectedReturnType {
        return StoreError::Corrupt(Corruption::Redis(Arc::new(err)));
    }
    // An error code is the server's answer; anything else (I/O, a reply that never came) may
    // hide a command carried out.
    if err.code().is_some() {
        return StoreError::Unavailable(Outage::Refused(Arc::new(err)));
    }
    StoreError::Unavailable(Outage::Redis(Arc::new(err)))
}

fn master_may_have_moved(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || link::read_only(err)
}

/// A Sentinel client for the master, taking credentials, database and TLS from `url`.
/// The URLs of a node list, for the client builders.
fn exposed(nodes: &[Secret]) -> Vec<&str> {
    nodes.iter().map(Secret::expose).collect()
}

fn sentinel_client(url: &str, master: &str, nodes: &[&str]) -> Result<SentinelClient, StoreError> {
    if nodes.is_empty() {
        return Err(StoreError::Config(Misconfiguration::NoSentinels));
    }
    let mut node = SentinelNodeConnectionInfo::default();
    if !url.is_empty() {
        let info = url.into_connection_info().map_err(config_error)?;
        node = node.set_redis_connection_info(info.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
            let mode = if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            };
            node = node.set_tls_mode(mode);
        }
    }
    SentinelClient::build(
        nodes.to_vec(),
        master,
        Some(node),
        SentinelServerType::Master,
    )
    .map_err(config_error)
}

/// The master's connection manager, found through Sentinel and forgotten after a failure that
/// suggests a failover, so the next command asks Sentinel again.
struct SentinelConn {
    client: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<ConnectionManager>>,
    timeout: Duration,
}

impl SentinelConn {
    fn new(client: SentinelClient, timeout: Duration) -> SentinelConn {
        SentinelConn {
            client: tokio::sync::Mutex::new(client),
            current: Mutex::new(None),
            timeout,
        }
    }

    fn cached(&self) -> Option<ConnectionManager> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(manager) = self.cached() {
            return Ok(manager);
        }
        let mut client = self.client.lock().await;
        if let Some(manager) = self.cached() {
            return Ok(manager);
        }
        let master = client.async_get_client().await?;
        let manager =
            ConnectionManager::new_lazy_with_config(master, manager_config(self.timeout))?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(manager.clone());
        Ok(manager)
    }

    fn forget(&self) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Channel senders by suffix, shared between the store and its subscriber task.
type Channels = Arc<Mutex<HashMap<String, super::Channel>>>;
