//! Who waits on which session: what lives as long as the session it was opened with (a
//! WebSocket tunnel, a streamed answer, a session event stream) waits here for the
//! invalidations of that session alone.
//!
//! Every write of any session publishes its handle, from every instance: the touches and
//! refreshes of every user, many a second. A watch holding its own subscription would be woken
//! by each of them only to compare a handle and sleep again (10,000 open event streams and 100
//! messages a second: a million wake-ups a second), and a burst past the channel's capacity
//! would have every one of them read the store at once. Instead one task per process, the
//! relay, takes the messages in and wakes only the watches of the handle named, found in a map
//! sharded by handle. What says that messages may have been lost still wakes every watch, to
//! read its session again: an empty handle ([`RESYNC`](crate::session::store::RESYNC): the
//! pub/sub connection was lost or is back), the relay falling behind, its subscription
//! closing, or the relay itself gone with the runtime it ran on.
//!
//! Must not: hold a lock across an await (a shard's is held for one lookup, the relay's state
//! for one check), or keep an entry once the last watch of its session is gone.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::{Handle, INVALIDATION_CHANNEL};
use crate::session::model::Session;
use crate::session::store::{Store, Subscription};

/// Shards of the map of watched sessions: a message locks one, for one lookup.
const SHARDS: usize = 16;

/// The watched sessions of a process, shared by every worker's [`super::Sessions`].
pub(super) struct Watches {
    /// Where the relay subscribes.
    store: Store,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<Handle, Watched>>]>,
    relay: Mutex<Relay>,
}

/// One watched session.
struct Watched {
    /// The messages that named the session (or said anything may have changed), counted: each
    /// bump wakes its watches.
    changed: watch::Sender<u64>,
    /// The latest count a watch took the read for: the others, woken by the same messages,
    /// leave the read to it ([`SessionWatch::changed`]).
    claimed: u64,
    /// A read found the session ended: its watches end without reading it again.
    ended: bool,
    /// Its [`SessionWatch`]es: the entry goes with the last.
    watches: usize,
    /// When one of its watches last took its timed read ([`SessionWatch::read_due`]).
    read_at: Option<tokio::time::Instant>,
    /// The session as the latest read found it alive (its store version), for the watches that
    /// did not read it themselves ([`SessionWatch::share`], [`SessionWatch::founds`]).
    found: watch::Sender<Option<Found>>,
}

/// A session as a read found it: its store version and what it holds.
pub type Found = (u64, Arc<Session>);

/// Whether a relay task is taking messages in.
enum Relay {
    /// None: the next watch to wait starts one.
    Idle,
    /// Subscribed, being spawned.
    Starting,
    Running(AbortHandle),
    /// The store's channel is gone: no more messages, only the watches' own checks on time.
    Closed,
}

impl Watches {
    pub(super) fn new(store: Store) -> Watches {
        Watches {
            store,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            relay: Mutex::new(Relay::Idle),
        }
    }

    fn shard(&self, handle: &Handle) -> MutexGuard<'_, HashMap<Handle, Watched>> {
        let index = usize::try_from(self.hasher.hash_one(handle)).unwrap_or_default() % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts watching `handle`: woken by what is published from now on.
    pub(super) fn watch(self: &Arc<Self>, handle: Handle) -> SessionWatch {
        let (changed, found) = self
            .shard(&handle)
            .entry(handle)
            .or_insert_with(|| Watched {
                changed: watch::Sender::new(0),
                claimed: 0,
                ended: false,
                watches: 0,
                read_at: None,
                found: watch::Sender::new(None),
            })
            .register();
        // Subscribed before this returns: a message published after it is not missed.
        self.relay();
        SessionWatch {
            watches: self.clone(),
            handle,
            changed,
            found,
        }
    }

    /// Starts the relay if none is running (the first watch, or the last relay's runtime
    /// stopped). Outside a runtime it waits for the next watch to ask.
    fn relay(self: &Arc<Self>) {
        let (runtime, subscription) = {
            let mut relay = self.relay.lock().unwrap_or_else(PoisonError::into_inner);
            if !matches!(*relay, Relay::Idle) {
                return;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            *relay = Relay::Starting;
            // Under the lock: a watch that finds the relay starting finds it subscribed.
            (runtime, self.store.subscribe(INVALIDATION_CHANNEL))
        };
        // Spawned without the lock: a runtime shutting down drops the relay at once, and its
        // `Stopped` takes the lock.
        let stopped = Stopped {
            watches: Arc::downgrade(self),
            closed: false,
        };
        let task = runtime.spawn(relay_messages(subscription, stopped));
        let mut relay = self.relay.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*relay, Relay::Starting) {
            *relay = Relay::Running(task.abort_handle());
        }
    }

    fn leave(&self, handle: &Handle) {
        let mut shard = self.shard(handle);
        if let Some(watched) = shard.get_mut(handle) {
            watched.watches = watched.watches.saturating_sub(1);
            if watched.watches == 0 {
                shard.remove(handle);
            }
        }
    }

    /// Wakes the watches of the session `text` names (a handle from another instance: any
    /// text, looked up as it is).
    fn wake(&self, text: &str) {
        let Ok(digits) = <[u8; 32]>::try_from(text.as_bytes()) else {
            return;
        };
        let handle = Handle(digits);
        if let Some(watched) = self.shard(&handle).get(&handle) {
            watched.bump();
        }
    }

    /// Wakes every watch: messages may have been lost.
    fn wake_all(&self) {
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for watched in shard.values() {
                watched.bump();
            }
        }
    }

    /// The relay has stopped: `closed`, for good (its channel is gone); else a watch starts
    /// another. Every watch reads its session again either way.
    fn relay_stopped(&self, closed: bool) {
        let mut relay = self.relay.lock().unwrap_or_else(PoisonError::into_inner);
        if !matches!(*relay, Relay::Closed) {
            *relay = if closed { Relay::Closed } else { Relay::Idle };
        }
        drop(relay);
        self.wake_all();
    }

    /// Sessions watched now.
    #[cfg(test)]
    pub(super) fn watched(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        let relay = self.relay.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Relay::Running(task) = relay {
            task.abort();
        }
    }
}

impl Watched {
    fn register(&mut self) -> (watch::Receiver<u64>, watch::Receiver<Option<Found>>) {
        self.watches += 1;
        (self.changed.subscribe(), self.found.subscribe())
    }

    /// Wakes every watch of the session: one of them is to read it.
    fn bump(&self) {
        self.changed
            .send_modify(|count| *count = count.wrapping_add(1));
    }
}

/// The relay: hands each message to the watches of its session.
async fn relay_messages(mut subscription: Subscription, mut stopped: Stopped) {
    loop {
        let message = subscription.recv().await;
        let Some(watches) = stopped.watches.upgrade() else {
            return;
        };
        match message {
            Ok(handle) if !handle.is_empty() => watches.wake(&handle),
            Ok(_) | Err(RecvError::Lagged(_)) => watches.wake_all(),
            Err(RecvError::Closed) => {
                stopped.closed = true;
                return;
            }
        }
    }
}

/// Held by the relay: it stopped by any path (its runtime's end too, even before it first
/// ran), so every watch reads its session again, and the next to wait starts another relay.
struct Stopped {
    watches: Weak<Watches>,
    /// Its channel is gone: no other relay.
    closed: bool,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(watches) = self.watches.upgrade() {
            watches.relay_stopped(self.closed);
        }
    }
}

/// A watch of one session ([`super::Sessions::watch`]): [`SessionWatch::changed`] returns when
/// it may have changed or ended. Dropping it stops the watch.
pub struct SessionWatch {
    watches: Arc<Watches>,
    handle: Handle,
    changed: watch::Receiver<u64>,
    /// What the session's reads found ([`SessionWatch::founds`]).
    found: watch::Receiver<Option<Found>>,
}

/// Why [`SessionWatch::changed`] returned.
#[must_use]
pub enum Woken {
    /// This watch is to read its session, for itself and the session's other watches: when the
    /// read finds it ended, [`SessionWatch::wake_session`] tells them. The turn, dropped
    /// before [`ReadTurn::done`] (its task gone mid-read), hands the read on to another.
    Read(ReadTurn),
    /// Another watch of the session found it ended.
    Ended,
}

/// A watch's turn to read its session for the messages that woke it ([`Woken::Read`]).
#[must_use]
pub struct ReadTurn {
    watches: Arc<Watches>,
    handle: Handle,
    /// The message count it read for; `None` once done.
    count: Option<u64>,
}

impl ReadTurn {
    /// The session has been read (whatever the read found).
    pub fn done(mut self) {
        self.count = None;
    }
}

impl Drop for ReadTurn {
    fn drop(&mut self) {
        let Some(count) = self.count else {
            return;
        };
        // Nobody has read for these messages: wake the others, for one of them to.
        if let Some(watched) = self.watches.shard(&self.handle).get(&self.handle)
            && watched.claimed == count
        {
            watched.bump();
        }
    }
}

impl SessionWatch {
    /// Returns once a message has named this session, or said that any session may have
    /// changed, since the last return (or since the watch began), for this watch to read the
    /// session ([`Woken::Read`]) — one watch of the session per message, however many it
    /// has: the others sleep on — or once another watch found it ended. Never once no more
    /// messages can come.
    pub async fn changed(&mut self) -> Woken {
        loop {
            self.watches.relay();
            if self.changed.changed().await.is_err() {
                // Not while this watch holds its entry; kept for the type's sake.
                std::future::pending::<()>().await;
            }
            let count = *self.changed.borrow_and_update();
            let mut shard = self.watches.shard(&self.handle);
            let Some(watched) = shard.get_mut(&self.handle) else {
                // Not while this watch holds its entry: read.
                return Woken::Read(ReadTurn {
                    watches: self.watches.clone(),
                    handle: self.handle,
                    count: None,
                });
            };
            if watched.ended {
                return Woken::Ended;
            }
            if watched.claimed != count {
                watched.claimed = count;
                return Woken::Read(ReadTurn {
                    watches: self.watches.clone(),
                    handle: self.handle,
                    count: Some(count),
                });
            }
            // Another watch reads the session for these messages.
        }
    }
}

impl SessionWatch {
    /// Whether this watch is to read its session on time now: yes unless another watch of the
    /// same session read it within `every` (the one told yes counts as reading it now). A
    /// session's timed reads are one every `every` however many watches it has (a client
    /// holding many streams of one session would otherwise make as many reads); whichever
    /// finds the session ended wakes the others ([`SessionWatch::wake_session`]).
    pub fn read_due(&self, every: std::time::Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut shard = self.watches.shard(&self.handle);
        let Some(watched) = shard.get_mut(&self.handle) else {
            return true;
        };
        if watched.read_at.is_some_and(|at| now < at + every) {
            return false;
        }
        watched.read_at = Some(now);
        true
    }

    /// This watch's read found its session alive at `version`: every watch of it (this one
    /// too) is handed it by [`Founds::next`], unless that version was handed on already.
    pub fn share(&self, version: u64, session: &Arc<Session>) {
        if let Some(watched) = self.watches.shard(&self.handle).get(&self.handle) {
            watched.found.send_if_modified(|found| {
                if found.as_ref().is_some_and(|(seen, _)| *seen == version) {
                    return false;
                }
                *found = Some((version, session.clone()));
                true
            });
        }
    }

    /// What the reads of the session find it to be, each read once ([`Founds::next`]): what a
    /// watch that checks more than the session's end (its route's policy) waits on beside
    /// [`SessionWatch::changed`].
    pub fn founds(&self) -> Founds {
        Founds(self.found.clone())
    }

    /// This watch found its session ended: every other watch of it ends too, without reading
    /// it again.
    pub fn wake_session(&self) {
        if let Some(watched) = self.watches.shard(&self.handle).get_mut(&self.handle) {
            watched.ended = true;
            watched.bump();
        }
    }
}

/// The sessions the reads of one session's watches found alive ([`SessionWatch::founds`]).
pub struct Founds(watch::Receiver<Option<Found>>);

impl Founds {
    /// The session as the latest read of any of its watches found it alive, if one has, whether
    /// or not [`Founds::next`] returned it.
    pub fn latest(&self) -> Option<Found> {
        self.0.borrow().clone()
    }

    /// Returns the session as the next read of any of its watches (this one's too) found it
    /// alive ([`SessionWatch::share`]). Never while none comes.
    pub async fn next(&mut self) -> Found {
        loop {
            if self.0.changed().await.is_err() {
                // Not while its watch holds the session's entry.
                std::future::pending::<()>().await;
            }
            if let Some(found) = self.0.borrow_and_update().clone() {
                return found;
            }
        }
    }
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        self.watches.leave(&self.handle);
    }
}

impl std::fmt::Debug for SessionWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionWatch")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::session::store::MemoryStore;
    use futures_util::FutureExt as _;
    use std::time::Duration;

    fn watches() -> (Arc<Watches>, Store) {
        let store = Store::Memory(MemoryStore::new(10));
        (Arc::new(Watches::new(store.clone())), store)
    }

    fn handle(digit: char) -> Handle {
        let mut text = [0u8; 32];
        text.fill(digit as u8);
        Handle(text)
    }

    async fn publish(store: &Store, message: &str) {
        store.publish(INVALIDATION_CHANNEL, message).await.unwrap();
        // The relay runs on this test's thread: let it take the message in.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    /// Whether `woken` says the watch is to read its session (its read done at once) or that
    /// the session ended.
    fn read_or_ended(woken: Woken) -> bool {
        if let Woken::Read(turn) = woken {
            turn.done();
        }
        true
    }

    async fn woken(watch: &mut SessionWatch) -> bool {
        tokio::time::timeout(Duration::from_secs(2), watch.changed())
            .await
            .is_ok_and(read_or_ended)
    }

    fn asleep(watch: &mut SessionWatch) -> bool {
        !watch.changed().now_or_never().is_some_and(read_or_ended)
    }

    #[tokio::test]
    async fn a_message_wakes_one_watch_of_its_session_to_read_it_and_none_of_another() {
        let (watches, store) = watches();
        let mut first = watches.watch(handle('a'));
        let mut second = watches.watch(handle('a'));
        let mut other = watches.watch(handle('b'));
        publish(&store, &handle('a')).await;
        assert!(woken(&mut first).await);
        // The first read for both.
        assert!(asleep(&mut second));
        assert!(asleep(&mut other));
        // Woken once per message, not again for the same one.
        assert!(asleep(&mut first));
        publish(&store, "not a handle").await;
        assert!(asleep(&mut first) && asleep(&mut second) && asleep(&mut other));
        // The next message: whichever comes first reads.
        publish(&store, &handle('a')).await;
        assert!(woken(&mut second).await && asleep(&mut first));
    }

    /// A watch whose task goes while it reads for a message (its stream closed) hands the read
    /// on: the session's other watches do not sleep through a message nobody read for.
    #[tokio::test]
    async fn a_read_left_undone_goes_to_another_watch() {
        let (watches, store) = watches();
        let mut first = watches.watch(handle('a'));
        let mut second = watches.watch(handle('a'));
        publish(&store, &handle('a')).await;
        let turn = tokio::time::timeout(Duration::from_secs(2), first.changed())
            .await
            .unwrap();
        assert!(matches!(turn, Woken::Read(_)));
        assert!(asleep(&mut second));
        drop(turn);
        assert!(woken(&mut second).await, "nobody read for the message");
        assert!(asleep(&mut first) && asleep(&mut second));
    }

    /// A watch that found its session ended ends the others without their reading it.
    #[tokio::test]
    async fn a_session_found_ended_ends_its_other_watches() {
        let (watches, store) = watches();
        let first = watches.watch(handle('a'));
        let mut second = watches.watch(handle('a'));
        let mut other = watches.watch(handle('b'));
        first.wake_session();
        let told = tokio::time::timeout(Duration::from_secs(2), second.changed()).await;
        assert!(matches!(told, Ok(Woken::Ended)));
        // And for good: a message later does not have it read the session.
        publish(&store, &handle('a')).await;
        let told = tokio::time::timeout(Duration::from_secs(2), second.changed()).await;
        assert!(matches!(told, Ok(Woken::Ended)));
        assert!(asleep(&mut other));
    }

    #[tokio::test]
    async fn what_one_watch_read_is_handed_to_every_watch_of_its_session_once() {
        let (watches, _store) = watches();
        let reader = watches.watch(handle('a'));
        let (mut mine, mut sibling) = (reader.founds(), watches.watch(handle('a')).founds());
        let mut other = watches.watch(handle('b')).founds();
        let session = Arc::new(Session {
            sub: "alice".into(),
            ..Default::default()
        });
        reader.share(7, &session);
        for founds in [&mut mine, &mut sibling] {
            let (version, found) = founds.next().now_or_never().expect("handed on");
            assert_eq!((version, found.sub.as_str()), (7, "alice"));
        }
        assert!(other.next().now_or_never().is_none());
        // The same version read again is not handed on again.
        reader.share(7, &session);
        assert!(sibling.next().now_or_never().is_none());
        reader.share(8, &session);
        assert_eq!(sibling.next().now_or_never().map(|f| f.0), Some(8));
    }

    #[tokio::test]
    async fn an_empty_message_or_a_lost_one_wakes_every_watch() {
        let (watches, store) = watches();
        let mut a = watches.watch(handle('a'));
        let mut b = watches.watch(handle('b'));
        publish(&store, crate::session::store::RESYNC).await;
        assert!(woken(&mut a).await && woken(&mut b).await);
        // More at once than the channel holds, none of theirs: the relay falls behind.
        for _ in 0..5000 {
            store
                .publish(INVALIDATION_CHANNEL, &handle('c'))
                .await
                .unwrap();
        }
        assert!(woken(&mut a).await && woken(&mut b).await);
    }

    #[tokio::test]
    async fn the_last_watch_of_a_session_takes_its_entry_with_it() {
        let (watches, store) = watches();
        let first = watches.watch(handle('a'));
        let second = watches.watch(handle('a'));
        let other = watches.watch(handle('b'));
        assert_eq!(watches.watched(), 2);
        drop(first);
        assert_eq!(watches.watched(), 2);
        drop(second);
        assert_eq!(watches.watched(), 1);
        drop(other);
        assert_eq!(watches.watched(), 0);
        // Messages of sessions no longer watched find nothing, and start nothing.
        publish(&store, &handle('a')).await;
        assert_eq!(watches.watched(), 0);
        let mut again = watches.watch(handle('a'));
        publish(&store, &handle('a')).await;
        assert!(woken(&mut again).await);
    }

    /// The store's channel closes (no more messages can come): every watch is woken to read
    /// its session again, and no other relay is started, not by a watch made later either;
    /// the watches are left to their own checks on time.
    #[tokio::test]
    async fn a_closed_subscription_wakes_every_watch_and_starts_no_other_relay() {
        let memory = MemoryStore::new(10);
        let store = Store::Memory(memory.clone());
        let watches = Arc::new(Watches::new(store.clone()));
        let closed = || {
            matches!(
                *watches.relay.lock().unwrap_or_else(PoisonError::into_inner),
                Relay::Closed
            )
        };
        let mut a = watches.watch(handle('a'));
        let mut b = watches.watch(handle('b'));
        publish(&store, &handle('a')).await;
        assert!(woken(&mut a).await, "the relay runs");
        memory.close_channel(INVALIDATION_CHANNEL);
        assert!(woken(&mut a).await && woken(&mut b).await);
        assert!(closed());
        // Waiting again, or a new watch, starts no relay: a channel the store makes anew is
        // not listened to.
        let mut c = watches.watch(handle('c'));
        assert!(asleep(&mut a) && asleep(&mut c));
        let _listener = store.subscribe(INVALIDATION_CHANNEL);
        for message in [
            handle('a').to_string(),
            handle('c').to_string(),
            String::new(),
        ] {
            publish(&store, &message).await;
            assert!(asleep(&mut a) && asleep(&mut b) && asleep(&mut c));
        }
        assert!(closed());
        // The watches still come and go.
        assert_eq!(watches.watched(), 3);
        drop((a, b, c));
        assert_eq!(watches.watched(), 0);
    }

    /// The relay runs on the runtime of the watch that started it (a worker's); when that
    /// runtime stops, the watches left on others read their sessions and start another.
    #[test]
    fn a_relay_gone_with_its_runtime_is_replaced() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let (watches, store) = watches();
        let first = runtime();
        let mut watch = first.block_on(async { watches.watch(handle('a')) });
        drop(first);
        runtime().block_on(async {
            assert!(woken(&mut watch).await, "the relay's end wakes every watch");
            publish(&store, &handle('a')).await;
            assert!(woken(&mut watch).await, "a new relay runs here");
        });
    }
}
