//! A pub/sub channel inside the process: what the store receives on one channel suffix, handed
//! to every subscriber (the session cache's shards, session event streams).
//!
//! A tokio broadcast receiver that finds nothing new still takes the channel's slot lock twice
//! and its tail lock once, and every receiver of a channel shares them: the session cache
//! looked for invalidations before each lookup, so every request on a token route wrote those
//! locks' cache lines from both workers. A [`Subscription`] first compares a count of messages
//! sent with the count it last drained, a read of a line nobody writes until a message comes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::broadcast::{self, error::TryRecvError};

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
