//! The connection to a Redis Cluster, replaced as a whole after an operation gets no answer.
//!
//! The cluster client keeps one connection per node and, on a reply that does not come in time,
//! tries the command again on that same connection: it connects anew only to a node whose
//! connection breaks, or after a `MOVED` answer. Behind a dead link (a partition, a failed
//! switch: no RST, no FIN) the connection does not break for minutes, and nothing answers
//! `MOVED`; once the link is back, the node's connection waits for TCP's backed-off
//! retransmission timer (seconds), and a failover behind the link is never learnt of. So an
//! operation that timed out has a new cluster connection made in the background (every node
//! connected anew, the slot map read again), one at most every [`TRIED_AT_MOST_EVERY`], and put
//! in place of the current one once it is shown to reach every master the cluster names.
//!
//! Until then the current one keeps serving: with a node cut off, a new connection would lack
//! that node, and the client would send the node's commands to another, be told `MOVED` and,
//! to connect to the node again, read the slot map again while holding back every command to
//! every node, over and over — a dead node would take the live ones down with it. Commands
//! under way on the replaced connection finish on it; it closes with the last of them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{FromRedisValue, RedisResult, Value};

use super::{Op, exec};

/// The shortest time between two attempts to replace the connection: a cluster that is only
/// slow costs one set of new connections a second, not one per timed-out command.
const TRIED_AT_MOST_EVERY: Duration = Duration::from_secs(1);

pub(super) struct ClusterLink {
    client: ClusterClient,
    /// Bounds on connecting to a node and on one reply.
    limits: (Duration, Duration),
    current: ArcSwap<ClusterConnection>,
    /// The runtime the connection was made on: its replacements are made and driven there too,
    /// not on whichever worker's runtime a timed-out command ran.
    runtime: tokio::runtime::Handle,
    attempts: Mutex<Attempts>,
}

/// The attempts to replace the connection.
#[derive(Default)]
struct Attempts {
    last: Option<Instant>,
    under_way: bool,
}

impl ClusterLink {
    /// A connection to the cluster `client` names, made in the background on the current
    /// runtime; `limits`: connecting to a node, and one reply.
    pub(super) fn new(client: ClusterClient, limits: (Duration, Duration)) -> ClusterLink {
        let conn = client.get_pending_async_connection_with_config(config(limits));
        ClusterLink {
            client,
            limits,
            current: ArcSwap::from_pointee(conn),
            runtime: tokio::runtime::Handle::current(),
            attempts: Mutex::new(Attempts::default()),
        }
    }

    /// Runs `op` on the current connection. One that gets no answer in time (the client's own
    /// reply timeout, as short as the store's) has the connection replaced
    /// ([`ClusterLink::timed_out`]).
    pub(super) async fn exec<T: FromRedisValue>(self: &Arc<Self>, op: &Op<'_>) -> RedisResult<T> {
        // Cloned out of the guard: none is held across the command.
        let mut conn = ClusterConnection::clone(&self.current.load());
        let result = exec(op, &mut conn).await;
        if let Err(err) = &result
            && err.is_timeout()
        {
            self.timed_out();
        }
        result
    }

    /// An operation got no answer within the store's timeout: unless an attempt is under way or
    /// the last began less than [`TRIED_AT_MOST_EVERY`] ago, a new connection is made in the
    /// background and put in place of the current one if it reaches every master.
    pub(super) fn timed_out(self: &Arc<Self>) {
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
            if attempts.under_way
                || attempts
                    .last
                    .is_some_and(|at| at.elapsed() < TRIED_AT_MOST_EVERY)
            {
                return;
            }
            *attempts = Attempts {
                last: Some(Instant::now()),
                under_way: true,
            };
        }
        // Marks the attempt over however it ends: the task dropped unfinished (the runtime
        // shutting down) included.
        let attempt = UnderWay(self.clone());
        self.runtime.spawn(async move { attempt.0.replace().await });
    }

    async fn replace(&self) {
        let (connect, reply) = self.limits;
        // Connecting to every node (a dead one takes the connection timeout, twice: first
        // contact, then the slot map's nodes), reading the slot map, then the check.
        let limit = 2 * (connect + reply) + 3 * reply;
        let attempt = async {
            let mut conn = self
                .client
                .get_async_connection_with_config(config(self.limits))
                .await?;
            let whole = reaches_every_master(&mut conn).await?;
            RedisResult::Ok(whole.then_some(conn))
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(Some(conn))) => {
                self.current.store(Arc::new(conn));
                tracing::warn!(
                    "a Redis Cluster command got no answer within the store timeout; the next \
                     commands take a new cluster connection (the old one may lead into a dead \
                     link)"
                );
            }
            // Not made in time, or short of a master (one still cut off): the next command
            // that gets no answer tries again.
            _ => tracing::debug!(
                "a new Redis Cluster connection does not reach every master (yet); the current \
                 one is kept"
            ),
        }
    }
}

/// Clears [`Attempts::under_way`] when dropped.
struct UnderWay(Arc<ClusterLink>);

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .under_way = false;
    }
}

fn config((connect, reply): (Duration, Duration)) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(connect)
        .set_response_timeout(reply)
}

/// Whether every master that `CLUSTER SLOTS` names answers through `conn`. The client leaves
/// out of a command sent to every master those it has no connection to, so each is asked for
/// its id, and the ids that came back are compared with the slot map's.
async fn reaches_every_master(conn: &mut ClusterConnection) -> RedisResult<bool> {
    let mut slots = redis::cmd("CLUSTER");
    slots.arg("SLOTS");
    let slots = conn
        .route_command(
            slots,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let mut myid = redis::cmd("CLUSTER");
    myid.arg("MYID");
    let ids = conn
        .route_command(
            myid,
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
        )
        .await?;
    let answered = answered_ids(&ids);
    Ok(master_ids(&slots).is_some_and(|masters| {
        !masters.is_empty() && masters.iter().all(|id| answered.contains(id))
    }))
}

/// The masters' ids in a `CLUSTER SLOTS` answer (each range: start, end, then the master as
/// `[ip, port, id, ...]`); `None` if one has no id.
fn master_ids(slots: &Value) -> Option<HashSet<&[u8]>> {
    let Value::Array(ranges) = slots else {
        return None;
    };
    ranges
        .iter()
        .map(|range| match range {
            Value::Array(range) => match range.get(2) {
                Some(Value::Array(master)) => match master.get(2) {
                    Some(Value::BulkString(id)) => Some(id.as_slice()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The ids in the answers of every node to `CLUSTER MYID` (a map from each node's address to
/// its answer).
fn answered_ids(answers: &Value) -> HashSet<&[u8]> {
    let Value::Map(answers) = answers else {
        return HashSet::new();
    };
    answers
        .iter()
        .filter_map(|(_, answer)| match answer {
            Value::BulkString(id) => Some(id.as_slice()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn range(start: i64, end: i64, master: &str) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![bulk("10.0.0.1"), Value::Int(6379), bulk(master)]),
            Value::Array(vec![bulk("10.0.0.2"), Value::Int(6379), bulk("replica")]),
        ])
    }

    #[test]
    fn the_masters_of_a_slot_map_are_told_by_id() {
        let slots = Value::Array(vec![
            range(0, 5460, "a"),
            range(5461, 10922, "b"),
            range(10923, 16383, "a"),
        ]);
        let ids = master_ids(&slots).unwrap();
        assert_eq!(ids, HashSet::from([&b"a"[..], &b"b"[..]]));
        let without_id = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![bulk("10.0.0.1"), Value::Int(6379)]),
        ])]);
        assert_eq!(master_ids(&without_id), None);
    }

    #[test]
    fn only_ids_that_came_back_count_as_answered() {
        let answers = Value::Map(vec![
            (bulk("10.0.0.1:6379"), bulk("a")),
            (
                bulk("10.0.0.3:6379"),
                redis::parse_redis_value(b"-ERR no\r\n").unwrap(),
            ),
        ]);
        assert_eq!(answered_ids(&answers), HashSet::from([&b"a"[..]]));
        assert!(answered_ids(&Value::Nil).is_empty());
    }
}
