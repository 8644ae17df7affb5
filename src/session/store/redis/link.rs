//! The connection to a standalone server, replaced when that server turns out to be a replica.
//!
//! Behind one address that follows the master across a failover (a managed Redis's primary
//! endpoint, a DNS name, a proxy that routes to whichever node is master), a connection made
//! before the failover still reaches the demoted master, now a replica answering every write
//! `-READONLY`. `ConnectionManager` reconnects only when a connection breaks, and the demoted
//! master keeps its clients connected: every session write, lease and logout would be refused
//! for as long as the connection lives. So a `READONLY` answer replaces the connection with a
//! new one to what the address leads to now, and the command — refused, so not carried out — is
//! tried once more on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;
use redis::{Client, ErrorKind, FromRedisValue, RedisError, RedisResult, ServerErrorKind};

use super::{Op, exec, manager_config};

/// The youngest a connection is replaced for a `READONLY` answer: an address that leads to a
/// replica for good (a misconfiguration) costs one new connection a second, not one per write.
const KEPT_AT_LEAST: Duration = Duration::from_secs(1);

pub(super) struct Link {
    client: Client,
    timeout: Duration,
    current: ArcSwap<Made>,
}

/// One connection and when it was made.
struct Made {
    manager: ConnectionManager,
    at: Instant,
}

impl Link {
    /// A connection to `client`'s server, made on first use, each operation bounded by `timeout`.
    pub(super) fn new(client: Client, timeout: Duration) -> RedisResult<Link> {
        let made = Made::new(&client, timeout)?;
        Ok(Link {
            client,
            timeout,
            current: ArcSwap::from_pointee(made),
        })
    }

    /// Another connection to the same server, for another runtime.
    pub(super) fn another(&self) -> RedisResult<Link> {
        Link::new(self.client.clone(), self.timeout)
    }

    /// Runs `op`; after a `READONLY` answer, once more on a newer connection. One that gets no
    /// answer in time leaves the connection to be replaced ([`Link::timed_out`]).
    pub(super) async fn exec<T: FromRedisValue>(&self, op: &Op<'_>) -> RedisResult<T> {
        let used = self.current.load_full();
        let result = exec(op, &mut used.manager.clone()).await;
        match result {
            Err(err) if read_only(&err) => {
                self.replace(&used, Replaced::ReadOnly);
                let newer = self.current.load_full();
                if Arc::ptr_eq(&newer, &used) {
                    return Err(err);
                }
                exec(op, &mut newer.manager.clone()).await
            }
            Err(err) if err.is_timeout() => {
                // Perhaps carried out: not tried again.
                self.replace(&used, Replaced::TimedOut);
                Err(err)
            }
            other => other,
        }
    }

    /// An operation got no answer within the store's timeout. Its connection may lead into a
    /// dead link (a partition, a failed switch: no RST, no FIN), where it would stay until TCP
    /// gives up, minutes later — the manager reconnects only a connection that breaks — and
    /// once the link is back, until TCP's backed-off retransmission timer next fires, seconds
    /// later. The next operations take a new connection instead (one a second at most, for a
    /// server that is only slow).
    pub(super) fn timed_out(&self) {
        let used = self.current.load_full();
        self.replace(&used, Replaced::TimedOut);
    }

    /// Puts a new connection in place of `used`, unless another task already did or `used` is
    /// younger than [`KEPT_AT_LEAST`]. The old one closes once its last command is answered
    /// or given up on.
    fn replace(&self, used: &Arc<Made>, why: Replaced) {
        if used.at.elapsed() < KEPT_AT_LEAST {
            return;
        }
        let Ok(made) = Made::new(&self.client, self.timeout) else {
            return;
        };
        let previous = self.current.compare_and_swap(used, Arc::new(made));
        if !Arc::ptr_eq(&previous, used) {
            return;
        }
        match why {
            Replaced::ReadOnly => tracing::warn!(
                "Redis answered READONLY: the server is a replica now (a failover?); connecting \
                 again to reach the master"
            ),
            Replaced::TimedOut => tracing::warn!(
                "Redis did not answer within the store timeout; the next commands take a new \
                 connection (the old one may lead into a dead link)"
            ),
        }
    }
}

/// Why a connection was replaced.
#[derive(Clone, Copy)]
enum Replaced {
    ReadOnly,
    TimedOut,
}

impl Made {
    fn new(client: &Client, timeout: Duration) -> RedisResult<Made> {
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config(timeout))?;
        Ok(Made {
            manager,
            at: Instant::now(),
        })
    }
}

/// A write refused by a replica: `-READONLY`, also as Redis 6 reports it from inside a script
/// (`-ERR Error running script ...: -READONLY You can't write against a read only replica.`).
pub(super) fn read_only(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || (err.code() == Some("ERR") && err.detail().is_some_and(|d| d.contains("-READONLY ")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn answer(reply: &str) -> RedisError {
        redis::parse_redis_value(reply.as_bytes())
            .and_then(redis::Value::extract_error)
            .expect_err("an error answer")
    }

    #[test]
    fn readonly_answers_are_told_from_other_errors() {
        let script = "-READONLY You can't write against a read only replica. script: \
                      ab12, on @user_script:3.\r\n";
        assert!(read_only(&answer(script)));
        let redis6 = "-ERR Error running script (call to f_ab12): @user_script:3: \
                      @user_script: 3: -READONLY You can't write against a read only replica.\r\n";
        assert!(read_only(&answer(redis6)));
        for other in [
            "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-ERR unknown command 'READONLY'\r\n",
        ] {
            assert!(!read_only(&answer(other)), "{other}");
        }
    }
}
