//! The pub/sub side of the Redis store: one dedicated connection pattern-subscribed to
//! `key_prefix*`, fanned out to in-process broadcast channels by suffix.
//!
//! The connection is re-established forever with capped backoff (none after an attempt that got
//! no answer at all, as into a dead link: the next starts at once, so that the link's return is
//! noticed within a second; with several nodes, at the next one) and checked with a PING every
//! second, so a silently dead socket is noticed. Messages published while it was down are lost,
//! so every subscriber receives [`RESYNC`](super::super::RESYNC) when the connection is lost and
//! again when it is back: caches must then drop what they hold. [`Subscriber::live`] says whether
//! the subscription is active, so that caches are not refilled while messages cannot arrive.
//!
//! Each answered PING is also a [`Proof`]: the server answers in order, so every message it
//! sent before the PONG came first and is handed to the subscribers before the proof is
//! recorded. Until the check notices a dead socket (a PING unanswered for a second), the proof
//! stops advancing, and caches stop trusting their copies as soon as it is a little older than
//! the interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::PubSub;
use redis::sentinel::SentinelClient;
use redis::{Client, Msg, RedisError, RedisResult, Value};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::{Channels, DEFAULT_CONNECTION_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT};
use crate::session::store::{Proof, RESYNC};

const CHANNEL_CAPACITY: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the subscription is checked with a PING (and delivery proven).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where the subscriber connects: any of these nodes in turn, or the master Sentinel names.
pub(super) enum Source {
    Clients(Vec<Client>),
    Sentinel(Box<SentinelClient>),
}

impl Source {
    async fn open(&mut self) -> RedisResult<PubSub> {
        match self {
            Source::Clients(clients) => {
                let mut last = None;
                for client in clients.iter() {
                    match client.get_async_pubsub().await {
                        Ok(pubsub) => return Ok(pubsub),
                        Err(err) => last = Some(err),
                    }
                }
                Err(last.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Client, "no node"))))
            }
            Source::Sentinel(sentinel) => {
                sentinel.async_get_client().await?.get_async_pubsub().await
            }
        }
    }

    /// After a failed attempt: the next one begins with the next node. A node that does not
    /// answer at all (cut off by a dead link) holds an attempt until its time limit, so the
    /// nodes after it would otherwise never be tried, and a Redis Cluster with one node cut off
    /// would have no subscription until that node is back, though the others carry every
    /// message just as well.
    fn next_first(&mut self) {
        if let Source::Clients(clients) = self
            && !clients.is_empty()
        {
            clients.rotate_left(1);
        }
    }
}

/// Owns the subscriber task; dropping it stops the task.
pub(super) struct Subscriber {
    channels: Channels,
    connected: watch::Receiver<u64>,
    live: watch::Receiver<bool>,
    proof: Arc<Proof>,
    task: AbortHandle,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    pub(super) fn start(source: Source, prefix: String) -> Subscriber {
        let channels: Channels = Arc::new(Mutex::new(HashMap::new()));
        let (generation, connected) = watch::channel(0);
        let (up, live) = watch::channel(false);
        let proof = Proof::new();
        let task = tokio::spawn(run(
            source,
            prefix,
            channels.clone(),
            generation,
            up,
            proof.clone(),
        ))
        .abort_handle();
        Subscriber {
            channels,
            connected,
            live,
            proof,
            task,
        }
    }

    /// How recently delivery was proven (see the module's documentation).
    pub(super) fn proof(&self) -> Arc<Proof> {
        self.proof.clone()
    }

    /// `true` while subscribed: a message published now will be delivered.
    pub(super) fn live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }

    /// Waits until the first subscription is active, or `limit` has passed.
    pub(super) async fn wait_connected(&self, limit: Duration) {
        let mut connected = self.connected.clone();
        let _ = tokio::time::timeout(limit, connected.wait_for(|generation| *generation > 0)).await;
    }

    pub(super) fn subscribe(&self, suffix: &str) -> crate::session::store::Subscription {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        channels
            .entry(suffix.to_owned())
            .or_insert_with(|| crate::session::store::Channel::new(CHANNEL_CAPACITY))
            .subscribe()
    }
}

async fn run(
    mut source: Source,
    prefix: String,
    channels: Channels,
    generation: watch::Sender<u64>,
    live: watch::Sender<bool>,
    proof: Arc<Proof>,
) {
    let pattern = format!("{}*", glob_escape(&prefix));
    let mut backoff = MIN_BACKOFF;
    loop {
        // Before the subscription: what is published after it is delivered, and what was
        // published before it, no cache holds (RESYNC, and nothing is filed until `live`).
        let started = Instant::now();
        let attempt = subscribe(&mut source, &pattern).await;
        if attempt.is_err() {
            source.next_first();
        }
        if let Err(Unsubscribed::TimedOut) = attempt {
            // No answer at all: the server or the link to it is dead (a partition drops every
            // packet). The attempt itself waited long enough, and its connection attempt would
            // be retransmitted only seconds later: try again at once with a new one, so that a
            // link coming back is noticed within a second, not after the backoff.
            backoff = MIN_BACKOFF;
        }
        if let Ok(pubsub) = attempt {
            backoff = MIN_BACKOFF;
            if *generation.borrow() > 0 {
                resync(&channels);
            }
            generation.send_modify(|g| *g += 1);
            proof.record(started);
            live.send_replace(true);
            listen(pubsub, &prefix, &channels, &proof).await;
            live.send_replace(false);
            resync(&channels);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why an attempt to subscribe failed.
enum Unsubscribed {
    /// No answer within the attempt's time limit.
    TimedOut,
    /// An answer, or an error, came: refused, or an error reply.
    Failed,
}

async fn subscribe(source: &mut Source, pattern: &str) -> Result<PubSub, Unsubscribed> {
    let attempt = async {
        let mut pubsub = source.open().await?;
        pubsub.psubscribe(pattern).await?;
        RedisResult::Ok(pubsub)
    };
    let limit = DEFAULT_CONNECTION_TIMEOUT + DEFAULT_RESPONSE_TIMEOUT;
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => Err(Unsubscribed::TimedOut),
        Ok(Err(err)) if err.is_timeout() => Err(Unsubscribed::TimedOut),
        Ok(Err(_)) => Err(Unsubscribed::Failed),
        Ok(Ok(pubsub)) => Ok(pubsub),
    }
}

/// Delivers messages until the connection is lost or stops answering, proving delivery with
/// each answered check.
async fn listen(pubsub: PubSub, prefix: &str, channels: &Channels, proof: &Proof) {
    let (mut sink, mut stream) = pubsub.split();
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => deliver(&message, prefix, channels),
                None => return,
            },
            _ = check.tick() => {
                let sent = Instant::now();
                let ping = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, sink.ping::<Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    return;
                }
                // The connection's reader queued every message the server sent before the PONG
                // before it handed the PONG over: deliver them, then record the proof.
                while let Some(next) = stream.next().now_or_never() {
                    match next {
                        Some(message) => deliver(&message, prefix, channels),
                        None => return,
                    }
                }
                proof.record(sent);
            }
        }
    }
}

fn deliver(message: &Msg, prefix: &str, channels: &Channels) {
    let Some(suffix) = message.get_channel_name().strip_prefix(prefix) else {
        return;
    };
    let Ok(payload) = std::str::from_utf8(message.get_payload_bytes()) else {
        return;
    };
    let mut channels = channels.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(channel) = channels.get(suffix)
        && !channel.send(payload.to_owned())
    {
        channels.remove(suffix);
    }
}

fn resync(channels: &Channels) {
    let channels = channels.lock().unwrap_or_else(PoisonError::into_inner);
    for channel in channels.values() {
        let _ = channel.send(RESYNC.to_owned());
    }
}

/// Escapes Redis glob characters so the prefix matches only itself.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::{Source, glob_escape};

    #[test]
    fn after_a_failed_attempt_the_next_begins_with_the_next_node() {
        let urls = [
            "redis://10.0.0.1/",
            "redis://10.0.0.2/",
            "redis://10.0.0.3/",
        ];
        let clients = urls.map(|u| redis::Client::open(u).unwrap());
        let mut source = Source::Clients(clients.to_vec());
        let first = |source: &Source| match source {
            Source::Clients(clients) => clients[0].get_connection_info().addr().to_string(),
            Source::Sentinel(_) => unreachable!(),
        };
        assert_eq!(first(&source), "10.0.0.1:6379");
        source.next_first();
        assert_eq!(first(&source), "10.0.0.2:6379");
        source.next_first();
        source.next_first();
        assert_eq!(first(&source), "10.0.0.1:6379");
        let mut none = Source::Clients(Vec::new());
        none.next_first();
    }

    #[test]
    fn glob_characters_in_the_prefix_are_escaped() {
        assert_eq!(glob_escape("app:[x]*?\\"), "app:\\[x\\]\\*\\?\\\\");
        assert_eq!(glob_escape("vestibule:"), "vestibule:");
    }
}
