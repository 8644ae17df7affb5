//! The pub/sub side of the Redis store: one dedicated connection pattern-subscribed to
//! `key_prefix*`, fanned out to in-process broadcast channels by suffix.
//!
//! Where the server allows it (a standalone server or Sentinel's master, Redis 6.2 and later,
//! `CLIENT TRACKING` permitted), the connection speaks RESP3 and also asks Redis to announce
//! every change of a session record (`CLIENT TRACKING ON BCAST PREFIX <key_prefix>s:`): an
//! operator's `DEL`, a `FLUSHDB`, Redis's own expiry and eviction, which nobody publishes, reach
//! the caches as invalidations of the sessions named, and a copy then needs no reading of the
//! record's version to stay true ([`Proof::set_tracking`]). Redis Cluster tracks per node and
//! keeps the plain subscription; so does a server that refuses any step (an ACL without
//! `client|tracking`, a managed service, a proxy that answers `HELLO 3` badly, a replica),
//! with a warning.
//!
//! The connection is re-established forever with capped backoff (none after an attempt that got
//! no answer at all, as into a dead link: the next starts at once, so that the link's return is
//! noticed within a second; with several nodes, at the next one) and checked every second (a
//! PING, or `ROLE` on a tracking connection, which must still name a master), so a silently dead
//! socket is noticed. Messages published while it was down are lost, so every subscriber
//! receives [`RESYNC`](super::super::RESYNC) when the connection is lost and again when it is
//! back: caches must then drop what they hold. [`Subscriber::live`] says whether the
//! subscription is active, so that caches are not refilled while messages cannot arrive.
//!
//! Each answered check is also a [`Proof`]: the server answers in order, so every message it
//! sent before the answer came first and is handed to the subscribers before the proof is
//! recorded. Until the check notices a dead socket (a check unanswered for a second), the proof
//! stops advancing, and caches stop trusting their copies as soon as it is a little older than
//! the interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Client, Msg, ProtocolVersion, PushInfo, PushKind, RedisError,
    RedisResult, Value,
};
use tokio::sync::{Notify, watch};
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
    /// The nodes to try, in order: Sentinel's master is asked for now.
    async fn nodes(&mut self) -> RedisResult<Vec<Client>> {
        match self {
            Source::Clients(clients) => Ok(clients.clone()),
            Source::Sentinel(sentinel) => Ok(vec![sentinel.async_get_client().await?]),
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

/// What Redis is asked to announce besides the messages published: every change of a key
/// whose name (after the key prefix) begins with `keys`, handed to the subscribers of
/// `channel` as `to_message` makes of that name (keys it makes nothing of are passed by).
pub(super) struct Tracking {
    pub(super) keys: &'static str,
    pub(super) channel: &'static str,
    pub(super) to_message: fn(&str) -> Option<String>,
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
    /// Subscribes to `prefix*`, and asks for `tracking` where the server allows it (`None`:
    /// never, as with Redis Cluster).
    pub(super) fn start(source: Source, prefix: String, tracking: Option<Tracking>) -> Subscriber {
        let channels: Channels = Arc::new(Mutex::new(HashMap::new()));
        let (generation, connected) = watch::channel(0);
        let (up, live) = watch::channel(false);
        let proof = Proof::new();
        let delivery = Arc::new(Delivery {
            prefix,
            channels: channels.clone(),
            tracking,
        });
        let task =
            tokio::spawn(run(source, delivery, generation, up, proof.clone())).abort_handle();
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

/// Hands what the connection receives to the in-process channels.
struct Delivery {
    prefix: String,
    channels: Channels,
    tracking: Option<Tracking>,
}

impl Delivery {
    /// A message published on `channel` (the whole name).
    fn message(&self, channel: &[u8], payload: &[u8]) {
        let Some(suffix) = channel.strip_prefix(self.prefix.as_bytes()) else {
            return;
        };
        let (Ok(suffix), Ok(payload)) = (std::str::from_utf8(suffix), std::str::from_utf8(payload))
        else {
            return;
        };
        self.send(suffix, payload.to_owned());
    }

    /// Redis's announcement that the keys `data` names changed; every key, when it names none
    /// (`FLUSHDB`, `FLUSHALL`): messages may then have been lost for any of them.
    fn changed(&self, data: &[Value]) {
        let Some(tracking) = &self.tracking else {
            return;
        };
        let mut keys = Vec::new();
        let mut every = false;
        for value in data {
            match value {
                Value::Nil => every = true,
                Value::Array(items) => {
                    every |= items.is_empty();
                    keys.extend(items.iter());
                }
                key => keys.push(key),
            }
        }
        if every {
            self.resync();
            return;
        }
        for key in keys {
            let name = match key {
                Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
                Value::SimpleString(text) => Some(text.as_str()),
                _ => None,
            };
            let message = name
                .and_then(|name| name.strip_prefix(self.prefix.as_str()))
                .filter(|name| name.starts_with(tracking.keys))
                .and_then(tracking.to_message);
            if let Some(message) = message {
                self.send(tracking.channel, message);
            }
        }
    }

    fn send(&self, suffix: &str, payload: String) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(suffix)
            && !channel.send(payload)
        {
            channels.remove(suffix);
        }
    }

    fn resync(&self) {
        let channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        for channel in channels.values() {
            let _ = channel.send(RESYNC.to_owned());
        }
    }
}

async fn run(
    mut source: Source,
    delivery: Arc<Delivery>,
    generation: watch::Sender<u64>,
    live: watch::Sender<bool>,
    proof: Arc<Proof>,
) {
    let pattern = format!("{}*", glob_escape(&delivery.prefix));
    let mut backoff = MIN_BACKOFF;
    // 1 while the live subscription carries Redis's announcements of every change.
    let announcing = metrics::gauge!("vestibule_session_store_tracking");
    announcing.set(0.0);
    // What the last subscription was, to log a change of it once.
    let mut was_tracking = None;
    loop {
        // Before the subscription: what is published after it is delivered, and what was
        // published before it, no cache holds (RESYNC, and nothing is filed until `live`).
        let started = Instant::now();
        let attempt = subscribe(&mut source, &pattern, &delivery).await;
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
        if let Ok(subscribed) = attempt {
            backoff = MIN_BACKOFF;
            if *generation.borrow() > 0 {
                delivery.resync();
            }
            let tracking = matches!(subscribed, Subscribed::Tracking(..));
            log_mode(&mut was_tracking, &subscribed);
            generation.send_modify(|g| *g += 1);
            proof.record(started);
            proof.set_tracking(tracking);
            announcing.set(if tracking { 1.0 } else { 0.0 });
            live.send_replace(true);
            match subscribed {
                Subscribed::Plain(pubsub, _) => listen(pubsub, &delivery, &proof).await,
                Subscribed::Tracking(connection, gone) => {
                    listen_tracking(connection, &gone, &proof).await;
                }
            }
            proof.set_tracking(false);
            announcing.set(0.0);
            live.send_replace(false);
            delivery.resync();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Logs a change of what the subscription announces: tracking taken, or refused (a reason).
fn log_mode(was_tracking: &mut Option<bool>, subscribed: &Subscribed) {
    let tracking = matches!(subscribed, Subscribed::Tracking(..));
    if *was_tracking == Some(tracking) {
        return;
    }
    *was_tracking = Some(tracking);
    match subscribed {
        Subscribed::Tracking(..) => tracing::info!(
            "session store: Redis announces every change of a session record (client \
             tracking); cached sessions need no version reads"
        ),
        Subscribed::Plain(_, Some(why)) => tracing::warn!(
            reason = why.as_str(),
            "session store: Redis refused to announce changes made behind Vestibule's back \
             (client tracking); cached sessions are checked with a version read every cache_ttl"
        ),
        Subscribed::Plain(_, None) => {}
    }
}

/// A subscription made.
enum Subscribed {
    /// Messages only: changes made behind Vestibule's back are not announced; why, when
    /// tracking was asked for and refused.
    Plain(PubSub, Option<String>),
    /// Messages and Redis's announcements of every change of a session record, both handed
    /// over by the connection's push sender; `gone` is notified when the connection ends.
    Tracking(MultiplexedConnection, Arc<Notify>),
}

/// Why an attempt to subscribe failed.
enum Unsubscribed {
    /// No answer within the attempt's time limit.
    TimedOut,
    /// An answer, or an error, came: refused, or an error reply.
    Failed,
}

/// Why a tracking subscription was not made.
enum Untracked {
    /// The connection failed: the attempt as a whole failed.
    Connection(RedisError),
    /// The server answered, but not as tracking needs: a plain subscription instead.
    Refused(String),
}

async fn subscribe(
    source: &mut Source,
    pattern: &str,
    delivery: &Arc<Delivery>,
) -> Result<Subscribed, Unsubscribed> {
    let limit = DEFAULT_CONNECTION_TIMEOUT + DEFAULT_RESPONSE_TIMEOUT;
    let mut refused = None;
    if delivery.tracking.is_some() {
        match tokio::time::timeout(limit, tracking(source, pattern, delivery)).await {
            Err(_) => return Err(Unsubscribed::TimedOut),
            Ok(Ok((connection, gone))) => return Ok(Subscribed::Tracking(connection, gone)),
            Ok(Err(Untracked::Connection(err))) if err.is_timeout() => {
                return Err(Unsubscribed::TimedOut);
            }
            Ok(Err(Untracked::Connection(_))) => return Err(Unsubscribed::Failed),
            Ok(Err(Untracked::Refused(why))) => refused = Some(why),
        }
    }
    let attempt = async {
        let mut last = None;
        let mut opened = None;
        for client in source.nodes().await? {
            match client.get_async_pubsub().await {
                Ok(pubsub) => {
                    opened = Some(pubsub);
                    break;
                }
                Err(err) => last = Some(err),
            }
        }
        let mut pubsub = opened.ok_or_else(|| no_node(last))?;
        pubsub.psubscribe(pattern).await?;
        RedisResult::Ok(pubsub)
    };
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => Err(Unsubscribed::TimedOut),
        Ok(Err(err)) if err.is_timeout() => Err(Unsubscribed::TimedOut),
        Ok(Err(_)) => Err(Unsubscribed::Failed),
        Ok(Ok(pubsub)) => Ok(Subscribed::Plain(pubsub, refused)),
    }
}

/// A RESP3 connection subscribed to `pattern` on which Redis announces every change of a
/// session record, checked before it is used: tracking on in broadcast mode for exactly the
/// prefix asked, on a master.
async fn tracking(
    source: &mut Source,
    pattern: &str,
    delivery: &Arc<Delivery>,
) -> Result<(MultiplexedConnection, Arc<Notify>), Untracked> {
    let Some(tracking) = &delivery.tracking else {
        return Err(Untracked::Refused("not asked".into()));
    };
    let prefix = format!("{}{}", delivery.prefix, tracking.keys);
    let gone = Arc::new(Notify::new());
    let ended = Arc::new(AtomicBool::new(false));
    let push = {
        let (delivery, gone, ended) = (delivery.clone(), gone.clone(), ended.clone());
        move |info: PushInfo| -> Result<(), redis::aio::SendError> {
            if ended.load(Ordering::Acquire) {
                return Err(redis::aio::SendError);
            }
            push(&delivery, &gone, info);
            Ok(())
        }
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(DEFAULT_CONNECTION_TIMEOUT))
        .set_response_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
        .set_push_sender(push);
    let mut last = None;
    let mut opened = None;
    for client in source.nodes().await.map_err(classify)? {
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(resp3)).map_err(classify)?;
        match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => {
                opened = Some(connection);
                break;
            }
            Err(err) => last = Some(err),
        }
    }
    let mut connection = opened.ok_or_else(|| classify(no_node(last)))?;
    let result = async {
        master(&mut connection).await?;
        let _: Value = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(&prefix)
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        let info: Value = redis::cmd("CLIENT")
            .arg("TRACKINGINFO")
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        confirm_tracking(&info, &prefix)?;
        connection.psubscribe(pattern).await.map_err(classify)?;
        Ok(())
    }
    .await;
    if let Err(err) = result {
        ended.store(true, Ordering::Release);
        return Err(err);
    }
    Ok((connection, gone))
}

/// The last node's error, or that there was none to try.
fn no_node(last: Option<RedisError>) -> RedisError {
    last.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Client, "no node")))
}

/// A failure of the connection, or an answer that is not what tracking needs.
fn classify(err: RedisError) -> Untracked {
    if err.is_timeout()
        || err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
    {
        Untracked::Connection(err)
    } else {
        Untracked::Refused(match err.code() {
            Some(code) => format!("{code}: {}", err.detail().unwrap_or_default()),
            None => format!("{:?}", err.kind()),
        })
    }
}

/// `ROLE` names a master: a replica's answers prove nothing of the writes its master took
/// and has not passed on.
async fn master(connection: &mut MultiplexedConnection) -> Result<(), Untracked> {
    let role: Value = redis::cmd("ROLE")
        .query_async(connection)
        .await
        .map_err(classify)?;
    match role {
        Value::Array(items) if items.first().and_then(text) == Some("master") => Ok(()),
        _ => Err(Untracked::Refused("not a master".into())),
    }
}

/// `CLIENT TRACKINGINFO` says tracking is on, in broadcast mode, for `prefix` alone.
fn confirm_tracking(info: &Value, prefix: &str) -> Result<(), Untracked> {
    let field = |name: &str| -> Option<&Value> {
        match info {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(key, _)| text(key) == Some(name))
                .map(|(_, value)| value),
            Value::Array(items) => items
                .chunks_exact(2)
                .find(|pair| text(&pair[0]) == Some(name))
                .map(|pair| &pair[1]),
            _ => None,
        }
    };
    let texts = |value: Option<&Value>| -> Vec<String> {
        match value {
            Some(Value::Array(items) | Value::Set(items)) => {
                items.iter().filter_map(text).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        }
    };
    let flags = texts(field("flags"));
    let prefixes = texts(field("prefixes"));
    let on = flags.iter().any(|f| f == "on") && flags.iter().any(|f| f == "bcast");
    if on && prefixes == [prefix] {
        Ok(())
    } else {
        Err(Untracked::Refused(format!(
            "CLIENT TRACKINGINFO: flags {flags:?}, prefixes {}",
            prefixes.len()
        )))
    }
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// What the tracking connection's reader hands over, on the reader, in the order the server
/// sent it: a check's answer reaches [`listen_tracking`] only after everything before it.
fn push(delivery: &Delivery, gone: &Notify, info: PushInfo) {
    match info.kind {
        PushKind::PMessage => {
            if let [_, Value::BulkString(channel), Value::BulkString(payload)] = &info.data[..] {
                delivery.message(channel, payload);
            }
        }
        PushKind::Message => {
            if let [Value::BulkString(channel), Value::BulkString(payload)] = &info.data[..] {
                delivery.message(channel, payload);
            }
        }
        PushKind::Invalidate => delivery.changed(&info.data),
        PushKind::Disconnection => gone.notify_one(),
        _ => {}
    }
}

/// Proves delivery on a tracking connection every second until it ends, stops answering, or
/// its server is no longer a master (a failover demoted it).
async fn listen_tracking(mut connection: MultiplexedConnection, gone: &Notify, proof: &Proof) {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        tokio::select! {
            () = gone.notified() => return,
            _ = check.tick() => {
                let sent = Instant::now();
                let role = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, master(&mut connection)).await;
                if !matches!(role, Ok(Ok(()))) {
                    return;
                }
                // The push sender ran, on the connection's reader, for everything the server
                // sent before this answer.
                proof.record(sent);
            }
        }
    }
}

/// Delivers messages until the connection is lost or stops answering, proving delivery with
/// each answered check.
async fn listen(pubsub: PubSub, delivery: &Delivery, proof: &Proof) {
    let (mut sink, mut stream) = pubsub.split();
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    check.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => deliver(&message, delivery),
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
                        Some(message) => deliver(&message, delivery),
                        None => return,
                    }
                }
                proof.record(sent);
            }
        }
    }
}

fn deliver(message: &Msg, delivery: &Delivery) {
    delivery.message(
        message.get_channel_name().as_bytes(),
        message.get_payload_bytes(),
    );
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
    use super::{Delivery, Source, Tracking, Untracked, confirm_tracking, glob_escape};
    use crate::session::store::RESYNC;
    use redis::Value;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn delivery() -> Delivery {
        Delivery {
            prefix: "app:".into(),
            channels: Arc::new(Mutex::new(HashMap::new())),
            tracking: Some(Tracking {
                keys: "s:",
                channel: "inv",
                to_message: |name| (name.len() == 4).then(|| format!("h-{name}")),
            }),
        }
    }

    fn key(name: &str) -> Value {
        Value::BulkString(name.as_bytes().to_vec())
    }

    #[test]
    fn an_announced_change_of_a_record_is_its_invalidation_and_a_flush_a_resync() {
        let delivery = delivery();
        let channel = crate::session::store::Channel::new(16);
        let mut inv = channel.subscribe();
        delivery
            .channels
            .lock()
            .unwrap()
            .insert("inv".into(), channel);
        // Keys outside the prefix, of another kind, or that name no record are passed by.
        delivery.changed(&[Value::Array(vec![
            key("app:s:ab"),
            key("other:s:ab"),
            key("app:l:ab"),
            key("app:s:toolong"),
        ])]);
        assert_eq!(inv.try_recv().as_deref(), Ok("h-s:ab"));
        assert!(inv.try_recv().is_err());
        // A flush names no key: every cache is to drop everything.
        delivery.changed(&[Value::Nil]);
        assert_eq!(inv.try_recv().as_deref(), Ok(RESYNC));
        // Published messages go by their channel's suffix.
        delivery.message(b"app:inv", b"h-1");
        delivery.message(b"else:inv", b"h-2");
        assert_eq!(inv.try_recv().as_deref(), Ok("h-1"));
        assert!(inv.try_recv().is_err());
    }

    #[test]
    fn tracking_is_taken_only_when_trackinginfo_shows_it_on_in_broadcast_for_the_prefix() {
        let text = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let info = |flags: &[&str], prefixes: &[&str]| {
            Value::Map(vec![
                (
                    text("flags"),
                    Value::Set(flags.iter().map(|f| text(f)).collect()),
                ),
                (text("redirect"), Value::Int(-1)),
                (
                    text("prefixes"),
                    Value::Array(prefixes.iter().map(|p| text(p)).collect()),
                ),
            ])
        };
        let ok = |v: &Value| confirm_tracking(v, "app:s:").is_ok();
        assert!(ok(&info(&["on", "bcast"], &["app:s:"])));
        assert!(!ok(&info(&["on"], &["app:s:"])));
        assert!(!ok(&info(&["off"], &[])));
        assert!(!ok(&info(&["on", "bcast"], &["app:"])));
        assert!(!ok(&info(&["on", "bcast"], &["app:s:", "x"])));
        assert!(!ok(&Value::Okay));
        // RESP2's flat array of fields and values, as a proxy may answer.
        let flat = Value::Array(vec![
            text("flags"),
            Value::Array(vec![text("on"), text("bcast")]),
            text("prefixes"),
            Value::Array(vec![text("app:s:")]),
        ]);
        assert!(ok(&flat));
        assert!(matches!(
            confirm_tracking(&Value::Nil, "app:s:"),
            Err(Untracked::Refused(_))
        ));
    }

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
