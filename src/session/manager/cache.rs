//! A short-lived, in-process cache of opened sessions, keyed by handle.
//!
//! It saves a store round trip and a decryption per request. Every write on any instance publishes
//! the session's handle; pending messages are drained before each lookup, so an instance forgets a
//! session as soon as the message arrives. A lagging receiver or a `RESYNC` empties the cache, and
//! no entry is served past its time to live, even if messages are lost, before the store has said
//! its record is still at the entry's version ([`Lookup::Stale`]: a read of the version alone,
//! which every change of the record bumps, instead of the whole record). While the store says its
//! subscription is down (`live` is `false`), messages cannot arrive at all: the cache then holds
//! nothing and every lookup goes to the store; any change of `live` (an outage, even one that
//! ended before the next lookup) empties the cache.
//!
//! A subscription can also die without a word (a half-open connection, a stalled node), and
//! messages are then lost before the store notices. A copy is therefore served only while the
//! store's [`Freshness`] proves that every message published more than [`PROOF_LASTS`] ago has
//! been delivered: a write on another instance is seen here within that, whatever the time to
//! live says. Without the proof a lookup misses (the copy stays, to be replaced by the read).
//!
//! A miss hands out a [`Stamp`]; the session read from the store is filed with it, and only if
//! no invalidation of that session (nor an emptying of its shard) was taken in since the miss.
//! Its time to live counts from the miss, not from the store's answer: a slow store may answer
//! long after it read the record, and the answer vouches for nothing later than the question.
//! Otherwise a read that straddles a write or a logout — the store answered the old record, the
//! message came before the answer was filed — would cache the ended session for a whole time to
//! live after the logout.
//!
//! The cache is split into [`SHARDS`] shards by handle, each behind its own mutex with its own
//! receivers of the invalidation messages and of `live`, so two serving workers rarely wait for
//! each other. Entries are keyed by the handle's 128 bits, not its text, and sit in the slots of
//! the shard's open-addressing table (`table.rs`): a lookup reads the slot, not an index and then
//! an entry elsewhere.
//!
//! A full shard admits a new session only when it is asked for a second time while still
//! remembered in the shard's *doorkeeper* (one slot per entry, holding recently refused keys),
//! and then evicts one entry: of two picked at random, an expired one if there is one, else the
//! first. When more sessions are active than the cache holds, a session seen once does not push
//! out one that is used again and again, and a working set far larger than the cache (every
//! request a different session) costs a failed lookup, not an insert and an eviction per request.
//! Random eviction, unlike LRU (or emptying everything), still hits when sessions come round in a
//! cycle a little larger than the cache.

pub mod sizing;
mod table;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::watch;
use tokio::time::Instant;

use self::table::{Slot, Table};
use crate::session::model::Session;
use crate::session::store::{Freshness, Subscription};

/// How old the store's proof of delivery may be for a copy to be served: the Redis
/// subscription proves it every second.
pub(super) const PROOF_LASTS: Duration = Duration::from_secs(2);

/// How long a copy is served without a version read while the store announces every change of
/// a record, also those made behind Vestibule's back ([`Freshness::announces_every_change`]),
/// when that is longer than the cache's time to live: the read is then a backstop only.
pub(super) const ANNOUNCED_LASTS: Duration = Duration::from_secs(60);

/// Independent parts of the cache (a power of two).
const SHARDS: usize = 16;

/// A handle as the cache keys it: its 128 bits. Handles are hex digests of a secret (see
/// `ticket.rs`), so nobody can choose them to collide in the index.
pub(super) type Key = u128;

/// The key the cache files `handle` under.
pub(super) fn key_of(handle: &str) -> Key {
    if let Some(key) = hex_key(handle.as_bytes()) {
        return key;
    }
    // Not a handle this process made (only tests and foreign messages): any stable fold will do.
    handle.bytes().fold(0xcbf2_9ce4_8422_2325_u128, |acc, b| {
        (acc ^ u128::from(b)).wrapping_mul(0x0100_0000_0000_0000_0000_0000_013b)
    })
}

/// The number 32 lowercase hex digits spell (a handle as `ticket.rs` writes it), `None` for
/// any other text. Every request's session lookup goes through it: eight digits at a time in a
/// 64-bit word (checked, then their nibbles gathered), not `u128::from_str_radix`'s checked
/// arithmetic a digit (~0.5k instructions per request).
fn hex_key(text: &[u8]) -> Option<Key> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES << 7;
    // Per byte of `x` (each below 0x80): its top bit set where the byte is above `n`.
    let above = |x: u64, n: u8| (x + (0x7f - u64::from(n)) * ONES) & HIGH;
    let digits: &[u8; 32] = text.try_into().ok()?;
    let mut key: Key = 0;
    for eight in digits.chunks_exact(8) {
        let x = u64::from_be_bytes(eight.try_into().ok()?);
        if x & HIGH != 0 {
            return None;
        }
        let digit = above(x, b'0' - 1) & !above(x, b'9');
        let letter = above(x, b'a' - 1) & !above(x, b'f');
        if digit | letter != HIGH {
            return None;
        }
        // '0'..'9' are 0x30..0x39 and 'a'..'f' 0x61..0x66: the low nibble, and 9 more for a letter.
        let mut x = (x & (ONES * 0x0f)) + (letter >> 7) * 9;
        x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
        x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
        x = (x | (x >> 16)) & 0x0000_0000_ffff_ffff;
        key = (key << 32) | Key::from(x);
    }
    Some(key)
}

/// Spreads a key's bits over 64 (one multiply), not SipHash: real keys are random already and
/// nobody can choose one (see [`Key`]); this only keeps made-up ones (tests, foreign messages)
/// from piling up in one shard or slot.
fn mix(key: Key) -> u64 {
    ((key as u64) ^ ((key >> 64) as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The shard a key lives in.
fn shard_of(key: Key) -> usize {
    (mix(key) >> 60) as usize & (SHARDS - 1)
}

/// Invalidations a shard remembers by key, to tell whether one concerned a pending miss.
const RECENT: usize = 32;

/// What a lookup found.
pub(super) enum Lookup {
    /// The session, at its version.
    Hit(u64, Arc<Session>),
    /// Not held: what the store answers may be filed with this stamp.
    Miss(Stamp),
    /// Held, but past its time to live or without a recent proof of delivery: to be served
    /// only once the store says the record is still at this version ([`Cache::renew`] then
    /// keeps it for another time to live); else read like a miss, filed with this stamp.
    Stale(Stamp, u64, Arc<Session>),
}

/// A miss's key, where its shard's invalidations stood at the miss, and when it was: the store
/// is asked after it, so what the store answers is at least as old as `at`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    key: Key,
    seen: u64,
    at: Instant,
}

pub(super) struct Cache {
    ttl: Duration,
    /// The time to live while the store announces every change: [`ANNOUNCED_LASTS`] at least.
    announced_ttl: Duration,
    freshness: Freshness,
    shards: Box<[Mutex<Shard>]>,
    lookups: Lookups,
}

/// `vestibule_session_cache_lookups_total`, by result: whether the cache is large enough.
struct Lookups {
    hit: metrics::Counter,
    miss: metrics::Counter,
}

/// Hits a shard counts under its own lock before adding them to the shared counter, so that a
/// hit costs no atomic operation shared between the workers.
const HITS_BATCH: u64 = 32;

struct Shard {
    /// The entries, by key.
    slots: Table,
    capacity: usize,
    /// Keys refused while the shard was full, by `key % len`: a key found here is admitted.
    /// Empty until the shard is first full (then `capacity` slots): a shard never full never
    /// needs one.
    doorkeeper: Box<[Key]>,
    invalidations: Subscription,
    /// `None` once the sender is gone (the memory store's, which is always live): `is_live` is
    /// then final.
    live: Option<watch::Receiver<bool>>,
    is_live: bool,
    /// Invalidations (removals by message or by this instance's own write) of this shard's
    /// keys taken in so far, and emptyings: a count that only grows.
    invalidations_seen: u64,
    /// The keys of the last [`RECENT`] invalidations, by their number `% RECENT`.
    recent: [Key; RECENT],
    /// `invalidations_seen` just after the shard was last emptied.
    emptied_at: u64,
    /// Which shard this is ([`shard_of`]).
    at: usize,
    /// State of the xorshift generator that picks eviction candidates.
    random: u64,
    /// Hits not yet added to [`Lookups::hit`].
    hits: u64,
}

impl Cache {
    /// A cache of at most about `entries` sessions (rounded up to a multiple of [`SHARDS`]).
    pub(super) fn new(
        ttl: Duration,
        entries: usize,
        invalidations: Subscription,
        live: watch::Receiver<bool>,
        freshness: Freshness,
    ) -> Cache {
        let capacity = entries.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|i| {
                let mut live = live.clone();
                let is_live = *live.borrow_and_update();
                Mutex::new(Shard {
                    slots: Table::new(capacity),
                    capacity,
                    doorkeeper: Box::default(),
                    invalidations: invalidations.resubscribe(),
                    live: Some(live),
                    is_live,
                    invalidations_seen: 0,
                    recent: [Key::MAX; RECENT],
                    emptied_at: 0,
                    at: i,
                    random: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1),
                    hits: 0,
                })
            })
            .collect();
        let name = "vestibule_session_cache_lookups_total";
        let lookups = Lookups {
            hit: metrics::counter!(name, "result" => "hit"),
            miss: metrics::counter!(name, "result" => "miss"),
        };
        Cache {
            ttl,
            announced_ttl: ttl.max(ANNOUNCED_LASTS),
            freshness,
            shards,
            lookups,
        }
    }

    /// The shard of a key, brought up to date (messages drained, liveness checked).
    fn shard(&self, key: Key) -> MutexGuard<'_, Shard> {
        let mut shard = self.shards[shard_of(key)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.refresh();
        shard
    }

    #[cfg(test)]
    fn get(&self, handle: &str) -> Option<(u64, Arc<Session>)> {
        match self.get_key(key_of(handle)) {
            Lookup::Hit(version, session) => Some((version, session)),
            Lookup::Miss(_) | Lookup::Stale(..) => None,
        }
    }

    /// The session filed under `key` ([`key_of`] its handle: the memo of opened cookies keeps
    /// it with the handle, so a request does not work it out again).
    pub(super) fn get_key(&self, key: Key) -> Lookup {
        let now = Instant::now();
        // Read before the shard takes in its messages: those the proof covers are then there.
        let fresh = self.freshness.within(now, PROOF_LASTS);
        let ttl = self.ttl();
        let mut shard = self.shard(key);
        let stale = match shard.slots.find(key).and_then(|at| shard.slots.at(at)) {
            Some(slot) if fresh && now.saturating_duration_since(slot.stored) < ttl => {
                let hit = Lookup::Hit(slot.version, slot.session.clone());
                shard.hits += 1;
                if shard.hits >= HITS_BATCH {
                    self.lookups.hit.increment(std::mem::take(&mut shard.hits));
                }
                return hit;
            }
            // Past its time to live, or delivery not proven lately: the copy stays, and the
            // store's version of the record says whether it may be served.
            Some(slot) => Some((slot.version, slot.session.clone())),
            None => None,
        };
        // A miss reads the store next: counting it (and the hits not yet counted) costs nothing
        // next to that.
        self.lookups.miss.increment(1);
        self.lookups.hit.increment(std::mem::take(&mut shard.hits));
        let stamp = Stamp {
            key,
            seen: shard.invalidations_seen,
            at: now,
        };
        match stale {
            Some((version, session)) => Lookup::Stale(stamp, version, session),
            None => Lookup::Miss(stamp),
        }
    }

    /// How long a copy is served before its record's version is read again: longer while the
    /// store announces every change. A change of that (a new subscription) empties the cache
    /// first, so no copy outlives the announcements it was kept under.
    fn ttl(&self) -> Duration {
        if self.freshness.announces_every_change() {
            self.announced_ttl
        } else {
            self.ttl
        }
    }

    /// Keeps the copy a [`Lookup::Stale`] gave for another time to live, counted from the
    /// lookup: the store has said its record is still at `version`, which it may have told
    /// long before its answer came (a slow store), so the answer vouches for no later time.
    /// Not when the session was invalidated (or its shard emptied) since the lookup: the
    /// store's answer may predate a write or a logout. A renewed copy is still served only
    /// with a recent proof of delivery ([`Cache::get_key`] asks for it at every lookup).
    pub(super) fn renew(&self, stamp: Stamp, version: u64) {
        let mut shard = self.shard(stamp.key);
        if !shard.is_live || shard.invalidated_since(stamp) {
            return;
        }
        let found = shard.slots.find(stamp.key);
        if let Some(slot) = found.and_then(|at| shard.slots.at_mut(at))
            && slot.version == version
        {
            slot.stored = slot.stored.max(stamp.at);
        }
    }

    /// Files what the store answered after the miss that gave `stamp`, unless the session was
    /// invalidated (or its shard emptied) since: then the answer may predate a write or logout.
    /// Its time to live counts from the miss, which the store's answer may date from.
    pub(super) fn put(&self, stamp: Stamp, version: u64, session: &Arc<Session>) {
        let key = stamp.key;
        let ttl = self.ttl();
        let mut shard = self.shard(key);
        if !shard.is_live || shard.invalidated_since(stamp) {
            return;
        }
        let stored = stamp.at;
        if let Some(slot) = shard.slots.find(key).and_then(|at| shard.slots.at_mut(at)) {
            slot.stored = stored;
            slot.version = version;
            slot.session = session.clone();
            return;
        }
        if shard.slots.len() >= shard.capacity {
            if !shard.admit(key) {
                return;
            }
            if let Some(victim) = shard.victim(ttl) {
                shard.remove_at(victim);
            }
        } else {
            shard.drop_one_if_expired(ttl);
        }
        shard.slots.insert(Slot {
            key,
            stored,
            version,
            session: session.clone(),
        });
    }

    /// Files `handle`'s session as if just read after a miss.
    #[cfg(test)]
    fn put_now(&self, handle: &str, version: u64, session: &Arc<Session>) {
        let key = key_of(handle);
        let seen = self.shard(key).invalidations_seen;
        let at = Instant::now();
        self.put(Stamp { key, seen, at }, version, session);
    }

    /// Drops the copy a [`Lookup::Stale`] gave: its record is gone from the store.
    pub(super) fn drop_stale(&self, stamp: Stamp) {
        self.shard(stamp.key).remove(stamp.key);
    }

    /// Forgets `handle`'s session: this instance has just written or ended it.
    pub(super) fn remove(&self, handle: &str) {
        let key = key_of(handle);
        self.shard(key).invalidate(key);
    }

    /// Entries held, expired or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .slots
                    .len()
            })
            .sum()
    }
}

impl Shard {
    fn refresh(&mut self) {
        self.drain();
        if let Some(live) = &mut self.live {
            match live.has_changed() {
                Ok(false) => {}
                Ok(true) => {
                    // Down, or down and up again since the last look: messages may have been
                    // lost in between.
                    self.is_live = *live.borrow_and_update();
                    self.clear();
                }
                Err(_) => {
                    self.is_live = *live.borrow();
                    self.live = None;
                }
            }
        }
        if !self.is_live && !self.slots.is_empty() {
            self.clear();
        }
    }

    fn drain(&mut self) {
        loop {
            match self.invalidations.try_recv() {
                Ok(handle) if handle.is_empty() => self.clear(),
                Ok(handle) => self.invalidate(key_of(&handle)),
                Err(TryRecvError::Lagged(_)) => self.clear(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.invalidations_seen += 1;
        self.emptied_at = self.invalidations_seen;
    }

    /// Removes `key`'s entry, if this shard's, and counts the invalidation for pending misses.
    /// Every shard takes in every message: another shard's key is none of its business.
    fn invalidate(&mut self, key: Key) {
        if shard_of(key) != self.at {
            return;
        }
        self.recent[self.invalidations_seen as usize % RECENT] = key;
        self.invalidations_seen += 1;
        self.remove(key);
    }

    /// Whether `stamp`'s key was invalidated, or the shard emptied, after the stamp was made.
    /// More invalidations since than are remembered count as one of the key's.
    fn invalidated_since(&self, stamp: Stamp) -> bool {
        let since = self.invalidations_seen - stamp.seen;
        if since == 0 {
            return false;
        }
        stamp.seen < self.emptied_at
            || since > RECENT as u64
            || (stamp.seen..self.invalidations_seen)
                .any(|n| self.recent[n as usize % RECENT] == stamp.key)
    }

    fn remove(&mut self, key: Key) {
        if let Some(at) = self.slots.find(key) {
            self.remove_at(at);
        }
    }

    fn remove_at(&mut self, at: usize) {
        self.slots.remove_at(at);
    }

    /// An entry picked at random, and whether it has expired.
    fn pick(&mut self, ttl: Duration) -> Option<(usize, bool)> {
        let start = self.next_random();
        let at = self.slots.occupied_from(start)?;
        let expired = self.slots.at(at)?.stored.elapsed() >= ttl;
        Some((at, expired))
    }

    /// Looks at one entry picked at random and drops it if it has expired: an insert pays for
    /// forgetting about one, so a shard that is not full shrinks back to the sessions still in
    /// use once a crowd has gone (the memory and the tokens it holds are let go), without a
    /// sweep of its own.
    fn drop_one_if_expired(&mut self, ttl: Duration) {
        if let Some((at, true)) = self.pick(ttl) {
            self.remove_at(at);
        }
    }

    /// Whether a full shard takes `key` in: only on its second try while the doorkeeper still
    /// remembers the first; otherwise it is remembered now, in place of another.
    fn admit(&mut self, key: Key) -> bool {
        if self.doorkeeper.is_empty() {
            // Never a real key's slot value by chance: keys are random 128-bit values.
            self.doorkeeper = vec![Key::MAX; self.capacity].into_boxed_slice();
        }
        let at = (mix(key) % self.doorkeeper.len() as u64) as usize;
        if self.doorkeeper[at] == key {
            self.doorkeeper[at] = Key::MAX;
            return true;
        }
        self.doorkeeper[at] = key;
        false
    }

    /// The slot to evict from a full shard.
    fn victim(&mut self, ttl: Duration) -> Option<usize> {
        let (first, _) = self.pick(ttl)?;
        match self.pick(ttl)? {
            (second, true) => Some(second),
            _ => Some(first),
        }
    }

    fn next_random(&mut self) -> usize {
        // xorshift64: enough to spread evictions, no need for quality or secrecy.
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        (x >> 16) as usize
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CACHE_ENTRIES as DEFAULT_ENTRIES;
    use crate::session::store::{Channel, Proof};

    const ENTRIES: usize = 10_000;

    /// A cache whose messages and liveness never change: its sender side is gone (a closed
    /// channel reads as empty; a dropped `live` sender leaves it live for good).
    fn quiet_cache(ttl_secs: u64, entries: usize) -> Cache {
        let rx = Channel::new(4).subscribe();
        Cache::new(
            Duration::from_secs(ttl_secs),
            entries,
            rx,
            watch::channel(true).1,
            Freshness::Immediate,
        )
    }

    /// A cache that serves a copy only while `proof` (the store's proof of delivery) is recent.
    fn proven_cache(ttl_secs: u64) -> (Cache, Arc<Proof>) {
        let proof = Proof::new();
        let cache = Cache::new(
            Duration::from_secs(ttl_secs),
            ENTRIES,
            Channel::new(4).subscribe(),
            watch::channel(true).1,
            Freshness::Proven(proof.clone()),
        );
        (cache, proof)
    }

    /// A handle's key is the number its digits spell, as `u128::from_str_radix` reads it; any
    /// other text is not read as digits.
    #[test]
    fn a_handle_is_keyed_by_the_number_its_hex_digits_spell() {
        let mut bytes = [0u8; 16];
        for round in 0..2_000u32 {
            getrandom::fill(&mut bytes).unwrap();
            if round == 0 {
                bytes = [0; 16];
            } else if round == 1 {
                bytes = [0xff; 16];
            }
            let handle: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let expected = u128::from_str_radix(&handle, 16).unwrap();
            assert_eq!(hex_key(handle.as_bytes()), Some(expected), "{handle}");
            assert_eq!(key_of(&handle), expected);
        }
        let handle = "0123456789abcdef0123456789abcdef";
        for (at, bad) in [
            (0, b'g'),
            (31, b'G'),
            (7, b'A'),
            (3, b'+'),
            (30, b' '),
            (9, b'/'),
            (9, b':'),
            (16, b'`'),
            (15, b'@'),
            (8, 0x80),
            (24, 0xff),
            (1, 0),
        ] {
            let mut text = handle.as_bytes().to_vec();
            text[at] = bad;
            assert_eq!(hex_key(&text), None, "{}", String::from_utf8_lossy(&text));
        }
        assert_eq!(hex_key(&handle.as_bytes()[1..]), None, "31 digits");
        assert_eq!(hex_key(format!("{handle}0").as_bytes()), None, "33 digits");
        assert_ne!(key_of("not a handle"), key_of("not a handle!"));
    }

    fn session() -> Arc<Session> {
        Arc::new(Session {
            sub: "u".into(),
            ..Session::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let cache = quiet_cache(1, ENTRIES);
        cache.put_now("h", 3, &session());
        assert_eq!(cache.get("h").map(|(v, _)| v), Some(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get("h").is_none());
    }

    /// A copy is served only while the store's proof of delivery is recent: a subscription
    /// that died silently would otherwise keep an ended session served for the whole time to
    /// live. The copy is not thrown away meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_copy_is_served_only_while_delivery_is_proven() {
        let (cache, proof) = proven_cache(60);
        proof.record(Instant::now());
        cache.put_now("h", 3, &session());
        assert_eq!(cache.get("h").map(|(v, _)| v), Some(3));
        tokio::time::advance(PROOF_LASTS + Duration::from_millis(100)).await;
        assert!(cache.get("h").is_none(), "served on a stale proof");
        assert_eq!(cache.len(), 1);
        proof.record(Instant::now());
        assert_eq!(cache.get("h").map(|(v, _)| v), Some(3));
        // Without a proof at all, nothing is served.
        let cache = Cache::new(
            Duration::from_secs(60),
            ENTRIES,
            Channel::new(4).subscribe(),
            watch::channel(true).1,
            Freshness::Proven(Proof::new()),
        );
        cache.put_now("h", 3, &session());
        assert!(cache.get("h").is_none());
    }

    /// The lookup that found `handle` stale: its stamp.
    fn stale(cache: &Cache, handle: &str) -> Stamp {
        match cache.get_key(key_of(handle)) {
            Lookup::Stale(stamp, ..) => stamp,
            Lookup::Hit(..) => panic!("{handle} was served"),
            Lookup::Miss(_) => panic!("{handle} is not held"),
        }
    }

    /// The store's answer tells the record as it was at some time after the lookup, which a
    /// slow store (a stalled node, a reconnect) may send long before the answer arrives: the
    /// copy it confirms or fills in is as old as the lookup, not the answer. Otherwise a
    /// session ended on another instance (its message lost) is served past `cache_ttl`.
    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_does_not_keep_a_copy_past_its_time_to_live_from_the_lookup() {
        let ttl = Duration::from_secs(10);
        let slow = Duration::from_secs(6);
        let cache = quiet_cache(ttl.as_secs(), ENTRIES);
        let handle = "0123456789abcdef0123456789abcdef";
        // Renewed after a version read that took `slow`.
        cache.put_now(handle, 1, &session());
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        let stamp = stale(&cache, handle);
        tokio::time::advance(slow).await;
        cache.renew(stamp, 1);
        tokio::time::advance(ttl - slow + Duration::from_secs(1)).await;
        assert!(
            cache.get(handle).is_none(),
            "served past cache_ttl since the store was asked"
        );
        // Filed after a record read that took `slow`.
        let stamp = miss(&cache, handle);
        tokio::time::advance(slow).await;
        cache.put(stamp, 2, &session());
        assert_eq!(cache.get(handle).map(|(v, _)| v), Some(2));
        tokio::time::advance(ttl - slow + Duration::from_secs(1)).await;
        assert!(
            cache.get(handle).is_none(),
            "served past cache_ttl since the store was asked"
        );
    }

    /// A copy held while delivery is not proven is renewed by a version read, but never
    /// served from the cache on that: every lookup without a recent proof asks the store
    /// again (a `Stale`), however recently it was renewed. A subscription that died silently
    /// would otherwise hide an end from the next requests.
    #[tokio::test(start_paused = true)]
    async fn a_copy_renewed_without_a_proof_of_delivery_is_still_not_served_on_its_own() {
        let (cache, proof) = proven_cache(60);
        let handle = "0123456789abcdef0123456789abcdef";
        proof.record(Instant::now());
        cache.put_now(handle, 3, &session());
        assert!(cache.get(handle).is_some());
        tokio::time::advance(PROOF_LASTS + Duration::from_millis(100)).await;
        for _ in 0..3 {
            let stamp = stale(&cache, handle);
            cache.renew(stamp, 3);
            assert!(cache.get(handle).is_none(), "served on a renewal alone");
        }
        // Proven again: the renewed copy is served.
        proof.record(Instant::now());
        assert_eq!(cache.get(handle).map(|(v, _)| v), Some(3));
    }

    /// `renew` restamps only the copy it was asked about: not one filed since at another
    /// version, whether its invalidation was taken in (a message) or lost (a read that
    /// started earlier came back with a newer version, no message). Either would be served
    /// for another time to live unchecked.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_does_not_restamp_a_copy_filed_since_at_another_version() {
        let ttl = Duration::from_secs(60);
        let (tx, cache) = messaged_cache(64);
        let handle = &handles(2)[1];
        // Invalidated by message between the lookup and the renewal, then read again at v2.
        cache.put_now(handle, 1, &session());
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        let first = stale(&cache, handle);
        tx.send(handle.clone());
        let refill = miss(&cache, handle);
        cache.put(refill, 2, &session());
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        cache.renew(first, 1);
        assert!(
            matches!(cache.get_key(key_of(handle)), Lookup::Stale(_, 2, _)),
            "the v2 copy was restamped by a renewal of v1 across its invalidation"
        );
        // No message (lost): a read asked before the renewal's own came back with v3.
        let earlier = stale(&cache, handle);
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = stale(&cache, handle);
        cache.put(earlier, 3, &session());
        cache.renew(later, 2);
        tokio::time::advance(ttl - Duration::from_secs(4)).await;
        assert!(
            matches!(cache.get_key(key_of(handle)), Lookup::Stale(_, 3, _)),
            "the v3 copy was restamped by a renewal of v2"
        );
    }

    /// Between a stale lookup and its renewal, the session leaves the cache and another takes
    /// its place (one slot a shard here): the renewal is of the key it was asked about, never
    /// of whatever fills the slot now.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_does_not_restamp_another_session_in_its_slot() {
        let ttl = Duration::from_secs(60);
        let cache = quiet_cache(ttl.as_secs(), SHARDS);
        let first = &handles(1)[0];
        let other = &neighbours(first, 1)[0];
        cache.put_now(first, 1, &session());
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        let for_other = miss(&cache, other);
        tokio::time::advance(Duration::from_secs(5)).await;
        let for_first = stale(&cache, first);
        cache.remove(first);
        cache.put(for_other, 1, &session());
        assert_eq!(cache.len(), 1);
        cache.renew(for_first, 1);
        tokio::time::advance(ttl - Duration::from_secs(4)).await;
        assert!(
            matches!(cache.get_key(key_of(other)), Lookup::Stale(_, 1, _)),
            "another session's copy was restamped by the renewal"
        );
        assert!(matches!(cache.get_key(key_of(first)), Lookup::Miss(_)));
    }

    #[test]
    fn messages_remove_entries_and_resync_or_lag_clears_all() {
        let tx = Channel::new(2);
        let rx = tx.subscribe();
        let cache = Cache::new(
            Duration::from_secs(60),
            ENTRIES,
            rx,
            watch::channel(true).1,
            Freshness::Immediate,
        );
        cache.put_now("a", 1, &session());
        cache.put_now("b", 1, &session());
        tx.send("a".into());
        assert!(cache.get("a").is_none() && cache.get("b").is_some());
        tx.send(String::new());
        assert!(cache.get("b").is_none());
        cache.put_now("c", 1, &session());
        for _ in 0..5 {
            tx.send("unrelated".into());
        }
        assert!(
            cache.get("c").is_none(),
            "a lagged receiver drops everything"
        );
    }

    /// A live cache of [`ENTRIES`] and the channel its messages come by (`capacity` of them).
    fn messaged_cache(capacity: usize) -> (Channel, Cache) {
        let tx = Channel::new(capacity);
        let cache = Cache::new(
            Duration::from_secs(60),
            ENTRIES,
            tx.subscribe(),
            watch::channel(true).1,
            Freshness::Immediate,
        );
        (tx, cache)
    }

    /// A miss's stamp, for filing what the store answers.
    fn miss(cache: &Cache, handle: &str) -> Stamp {
        match cache.get_key(key_of(handle)) {
            Lookup::Miss(stamp) | Lookup::Stale(stamp, ..) => stamp,
            Lookup::Hit(..) => panic!("{handle} is cached"),
        }
    }

    /// Handles in the same shard as `handle`, other than it.
    fn neighbours(handle: &str, count: usize) -> Vec<String> {
        let shard = shard_of(key_of(handle));
        handles(count * SHARDS * 4)
            .into_iter()
            .filter(|h| h != handle && shard_of(key_of(h)) == shard)
            .take(count)
            .collect()
    }

    #[test]
    fn what_the_store_answered_before_an_invalidation_is_not_filed_after_it() {
        let (tx, cache) = messaged_cache(64);
        let handle = &handles(1)[0];
        // By message (another instance wrote or ended it).
        let stamp = miss(&cache, handle);
        tx.send(handle.clone());
        cache.put(stamp, 1, &session());
        assert!(cache.get(handle).is_none(), "filed across a message");
        // By this instance's own write.
        let stamp = miss(&cache, handle);
        cache.remove(handle);
        cache.put(stamp, 1, &session());
        assert!(cache.get(handle).is_none(), "filed across a removal");
        // By the shard being emptied (a resync, a lost subscription).
        let stamp = miss(&cache, handle);
        tx.send(String::new());
        cache.put(stamp, 1, &session());
        assert!(cache.get(handle).is_none(), "filed across a resync");
        // Nothing in between: filed.
        let stamp = miss(&cache, handle);
        cache.put(stamp, 1, &session());
        assert!(cache.get(handle).is_some());
    }

    #[test]
    fn invalidations_of_other_sessions_do_not_keep_a_miss_out_and_a_forgotten_one_still_does() {
        let (tx, cache) = messaged_cache(1024);
        let handle = &handles(1)[0];
        let others = neighbours(handle, RECENT + 1);
        let stamp = miss(&cache, handle);
        for other in &others[..RECENT] {
            tx.send(other.clone());
        }
        cache.put(stamp, 1, &session());
        assert!(cache.get(handle).is_some(), "others' invalidations only");
        cache.remove(handle);
        // Its own invalidation, then so many others that it is no longer remembered by key.
        let stamp = miss(&cache, handle);
        tx.send(handle.clone());
        for other in &others[..RECENT] {
            tx.send(other.clone());
        }
        cache.put(stamp, 1, &session());
        assert!(
            cache.get(handle).is_none(),
            "more invalidations than remembered: the key's may be among them"
        );
    }

    /// A cache of [`ENTRIES`] whose liveness the test sets, and what sets it.
    fn watched_cache() -> (watch::Sender<bool>, Cache) {
        let (live, watching) = watch::channel(true);
        let rx = Channel::new(4).subscribe();
        let cache = Cache::new(
            Duration::from_secs(60),
            ENTRIES,
            rx,
            watching,
            Freshness::Immediate,
        );
        (live, cache)
    }

    #[test]
    fn nothing_is_cached_while_messages_cannot_arrive() {
        let (live, cache) = watched_cache();
        cache.put_now("kept", 1, &session());
        live.send_replace(false);
        assert!(
            cache.get("kept").is_none(),
            "dropped when the subscription is lost"
        );
        cache.put_now("new", 1, &session());
        assert!(cache.get("new").is_none(), "not refilled until it is back");
        live.send_replace(true);
        assert!(
            cache.get("kept").is_none(),
            "what was dropped stays dropped"
        );
        cache.put_now("new", 2, &session());
        assert_eq!(cache.get("new").map(|(v, _)| v), Some(2));
    }

    fn handles(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| format!("{:032x}", i as u128 * 0x9e37_79b9_7f4a_7c15))
            .collect()
    }

    #[test]
    fn more_sessions_than_capacity_keep_the_cache_full_and_the_ones_used_again_in_it() {
        let cache = quiet_cache(60, ENTRIES);
        let all = handles(ENTRIES + ENTRIES / 5);
        for (version, handle) in all.iter().enumerate() {
            cache.put_now(handle, version as u64, &session());
        }
        let held = all.iter().filter(|h| cache.get(h).is_some()).count();
        assert!(
            held >= ENTRIES * 9 / 10,
            "{held} of {} sessions still cached: the cache must not be emptied when full",
            all.len()
        );
        // The newest ones, turned away once the cache was full, get in when used again.
        let recent = &all[all.len() - 1000..];
        for handle in recent {
            if cache.get(handle).is_none() {
                cache.put_now(handle, 1, &session());
            }
        }
        let recent_held = recent.iter().filter(|h| cache.get(h).is_some()).count();
        assert!(
            recent_held >= 800,
            "only {recent_held} of the 1000 most recent sessions are cached after a second use"
        );
    }

    #[test]
    fn ten_thousand_active_sessions_are_held_whole_by_default() {
        let cache = quiet_cache(60, DEFAULT_ENTRIES);
        let active = handles(10_000);
        for handle in &active {
            cache.put_now(handle, 1, &session());
        }
        // The shards hold a binomial share each: a capacity equal to the active set (the old
        // default) left some full and churning.
        let held = active.iter().filter(|h| cache.get(h).is_some()).count();
        assert_eq!(held, active.len(), "every active session is cached");
    }

    #[test]
    fn the_cache_holds_no_more_than_it_is_given() {
        let cache = quiet_cache(60, 1_600);
        for handle in handles(5_000) {
            cache.put_now(&handle, 1, &session());
            cache.put_now(&handle, 1, &session());
        }
        assert_eq!(cache.len(), 1_600, "full, and not one more");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_let_go_as_new_ones_come_in() {
        let cache = quiet_cache(1, 100_000);
        let all = handles(8_000);
        let (crowd, later) = all.split_at(2_000);
        for handle in crowd {
            cache.put_now(handle, 1, &session());
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for handle in later {
            cache.put_now(handle, 1, &session());
        }
        let left = cache.len() - later.len();
        assert!(
            left < crowd.len() / 2,
            "{left} of {} expired sessions still held after {} inserts",
            crowd.len(),
            later.len()
        );
    }

    #[test]
    fn a_stream_of_sessions_seen_once_does_not_push_out_the_ones_in_use() {
        let cache = quiet_cache(600, ENTRIES);
        let all = handles(ENTRIES * 11);
        let (regulars, passers_by) = all.split_at(ENTRIES * 9 / 10);
        for handle in regulars {
            cache.put_now(handle, 1, &session());
        }
        // Ten times the capacity, each once (a cache far smaller than the working set): none of
        // it is worth an eviction.
        for handle in passers_by {
            if cache.get(handle).is_none() {
                cache.put_now(handle, 1, &session());
            }
        }
        let kept = regulars.iter().filter(|h| cache.get(h).is_some()).count();
        assert!(
            kept >= regulars.len() * 9 / 10,
            "{kept} of {} sessions in use survived a stream of one-off sessions",
            regulars.len()
        );
    }

    #[test]
    fn a_cycle_larger_than_capacity_still_hits() {
        let cache = quiet_cache(600, ENTRIES);
        let all = handles(ENTRIES + ENTRIES / 5);
        let (mut hits, mut lookups) = (0usize, 0usize);
        for round in 0..5 {
            for handle in &all {
                let hit = cache.get(handle).is_some();
                if !hit {
                    cache.put_now(handle, 1, &session());
                }
                if round >= 2 {
                    lookups += 1;
                    hits += usize::from(hit);
                }
            }
        }
        let ratio = hits as f64 / lookups as f64;
        assert!(
            ratio >= 0.5,
            "hit ratio {ratio:.3} cycling over 1.2x the capacity (LRU or emptying would give ~0)"
        );
    }

    #[test]
    fn a_subscription_outage_between_two_lookups_still_drops_what_was_cached() {
        let (live, cache) = watched_cache();
        cache.put_now("kept", 1, &session());
        assert!(cache.get("kept").is_some());
        // Down and up again with no lookup in between: messages may have been lost meanwhile.
        live.send_replace(false);
        live.send_replace(true);
        assert!(
            cache.get("kept").is_none(),
            "an entry cached before the outage must not survive it"
        );
        cache.put_now("new", 1, &session());
        assert!(cache.get("new").is_some(), "cached again once it is back");
    }
}
