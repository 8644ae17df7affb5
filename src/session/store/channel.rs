//! A pub/sub channel inside the process: what the store receives on one channel suffix, handed
//! to every subscriber (the session cache's shards, session event streams).
//!
//! A tokio broadcast receiver that finds nothing new still takes the channel's slot lock twice
//! and its tail lock once, and every receiver of a channel shares them: the session cache
//! looked for invalidations before each lookup, so every request on a token route wrote those
//! locks' cache lines from both workers. A [`Subscription`] first compares a count of messages
//! sent with the count it last drained, a read of a line nobody writes until a message comes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::time::Instant;

/// The sending side of one channel.
pub(crate) struct Channel {
    sender: broadcast::Sender<String>,
    /// Messages sent so far (counted after each is in the channel).
    sent: Arc<AtomicU64>,
}

impl Channel {
    pub(crate) fn new(capacity: usize) -> Channel {
        Channel {
            sender: broadcast::channel(capacity).0,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sends `payload` to every subscription; `false` when there is none left.
    pub(crate) fn send(&self, payload: String) -> bool {
        let delivered = self.sender.send(payload).is_ok();
        // After the send: a subscription that reads this count finds the message in the channel.
        self.sent.fetch_add(1, Ordering::Release);
        delivered
    }

    /// Receives what is sent from now on.
    pub(crate) fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
            sent: self.sent.clone(),
            drained: 0,
        }
    }
}

/// The receiving side of a [`Channel`].
pub struct Subscription {
    receiver: broadcast::Receiver<String>,
    sent: Arc<AtomicU64>,
    /// The count of messages sent that [`Subscription::try_recv`] last found drained.
    drained: u64,
}

impl Subscription {
    /// The next message if there is one, as [`broadcast::Receiver::try_recv`] says (a lagging
    /// subscription is told so); `Empty` without touching the channel when nothing was sent
    /// since the last time it was found empty.
    pub fn try_recv(&mut self) -> Result<String, TryRecvError> {
        let sent = self.sent.load(Ordering::Acquire);
        if sent == self.drained {
            return Err(TryRecvError::Empty);
        }
        let next = self.receiver.try_recv();
        if matches!(next, Err(TryRecvError::Empty)) {
            // Every message counted in `sent` was in the channel before it was counted.
            self.drained = sent;
        }
        next
    }

    /// Another subscription to the same channel, receiving what is sent from now on.
    pub fn resubscribe(&self) -> Subscription {
        Subscription {
            receiver: self.receiver.resubscribe(),
            sent: self.sent.clone(),
            drained: 0,
        }
    }

    /// Waits for the next message.
    pub async fn recv(&mut self) -> Result<String, broadcast::error::RecvError> {
        self.receiver.recv().await
    }

    /// The broadcast receiver, for a subscriber that waits for messages.
    pub fn into_receiver(self) -> broadcast::Receiver<String> {
        self.receiver
    }
}

/// How recently this instance's subscriptions were shown to have received every message
/// published before: what lets a cache trust a copy it holds. A subscription can die silently (a
/// half-open connection, a stalled node) and lose messages long before anyone notices, so a copy
/// is served only while the proof is recent.
#[derive(Clone, Debug)]
pub enum Freshness {
    /// Messages are delivered as they are sent (the memory store's channels, in the process).
    Immediate,
    /// A Redis subscription that checks itself (see [`Proof`]).
    Proven(Arc<Proof>),
    /// Nothing can prove delivery (Redis Cluster: a message may reach the node this instance
    /// listens to after another node answered a later command); only the cache's time to live
    /// bounds a missed message.
    Unproven,
}

impl Freshness {
    /// Whether every message published more than `bound` before `now` has been delivered (as
    /// far as this instance can know).
    pub fn within(&self, now: Instant, bound: Duration) -> bool {
        match self {
            Freshness::Immediate | Freshness::Unproven => true,
            Freshness::Proven(proof) => proof.within(now, bound),
        }
    }

    /// Whether the store also announces every change of a session record made behind this
    /// process's back (an operator's `DEL`, Redis's expiry and eviction), not only the changes
    /// Vestibule publishes: then a copy needs no reading of the record's version to stay true,
    /// only the proof that the announcements arrive.
    pub fn announces_every_change(&self) -> bool {
        match self {
            Freshness::Immediate | Freshness::Unproven => false,
            Freshness::Proven(proof) => proof.tracking.load(Ordering::Acquire),
        }
    }
}

/// The latest time before which every message published is known to have been delivered: the
/// time a command was sent on the subscription whose answer has come back, the messages that
/// came before that answer handed to the subscribers first (one connection answers in order).
#[derive(Debug)]
pub struct Proof {
    base: Instant,
    /// Milliseconds from `base` to the proven time, plus one; 0: nothing proven yet.
    at: AtomicU64,
    /// Whether the subscription proven is one on which Redis announces every change of a
    /// session record ([`Freshness::announces_every_change`]). Set before the subscription is
    /// declared live, cleared before it is declared down: a cache empties itself at either.
    tracking: AtomicBool,
}

impl Proof {
    pub fn new() -> Arc<Proof> {
        Arc::new(Proof {
            base: Instant::now(),
            at: AtomicU64::new(0),
            tracking: AtomicBool::new(false),
        })
    }

    /// Records whether the subscription now proven announces every change (see `tracking`).
    pub fn set_tracking(&self, on: bool) {
        self.tracking.store(on, Ordering::Release);
    }

    fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Every message published before `sent` has been handed to the subscribers.
    pub fn record(&self, sent: Instant) {
        // Release: a reader that sees this time finds those messages in the channels.
        self.at.fetch_max(self.millis(sent), Ordering::Release);
    }

    fn within(&self, now: Instant, bound: Duration) -> bool {
        let at = self.at.load(Ordering::Acquire);
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        at != 0 && self.millis(now).saturating_sub(at) <= bound
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_received_and_an_idle_channel_is_not_touched() {
        let channel = Channel::new(4);
        let mut subscription = channel.subscribe();
        assert_eq!(subscription.try_recv(), Err(TryRecvError::Empty));
        assert!(channel.send("a".into()));
        assert!(channel.send("b".into()));
        assert_eq!(subscription.try_recv().as_deref(), Ok("a"));
        assert_eq!(subscription.try_recv().as_deref(), Ok("b"));
        assert_eq!(subscription.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(subscription.drained, 2);
        // Another one sent after the channel was found empty is still received.
        assert!(channel.send("c".into()));
        assert_eq!(subscription.try_recv().as_deref(), Ok("c"));
        // A resubscription receives only what comes after it.
        let mut second = subscription.resubscribe();
        assert!(channel.send("d".into()));
        assert_eq!(second.try_recv().as_deref(), Ok("d"));
        assert_eq!(subscription.try_recv().as_deref(), Ok("d"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_trusted_only_while_delivery_was_proven_recently() {
        let proof = Proof::new();
        let fresh = Freshness::Proven(proof.clone());
        let bound = Duration::from_secs(2);
        // Nothing proven yet.
        assert!(!fresh.within(Instant::now(), bound));
        let sent = Instant::now();
        proof.record(sent);
        assert!(fresh.within(Instant::now(), bound));
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(fresh.within(Instant::now(), bound));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!fresh.within(Instant::now(), bound));
        // An older proof arriving late does not move it back.
        proof.record(Instant::now());
        proof.record(sent);
        assert!(fresh.within(Instant::now(), bound));
        assert!(Freshness::Immediate.within(Instant::now(), Duration::ZERO));
    }

    #[test]
    fn a_subscription_that_falls_behind_is_told() {
        let channel = Channel::new(2);
        let mut subscription = channel.subscribe();
        for n in 0..5 {
            channel.send(n.to_string());
        }
        assert!(matches!(
            subscription.try_recv(),
            Err(TryRecvError::Lagged(_))
        ));
    }
}
