//! What opening a session cookie gave, remembered by the cookie's exact value.
//!
//! Opening a cookie costs a base64 decode, an AES-256-GCM decryption and two SHA-256 digests (the
//! store key, then the handle), on every request of a session. The result depends only on the
//! cookie's value, the cookie's name and the key ring, so it can be remembered: each serving
//! worker keeps a memo of its own (no lock shared between workers), and the process-wide manager
//! one more.
//!
//! - Only cookies that opened are remembered: a forged or damaged value costs its lookup and its
//!   failed opening every time, and never takes a place.
//! - The memo belongs to one key ring: when the ring is swapped (hot reload, rotation), the whole
//!   memo is forgotten before the next lookup, so a cookie stops opening the moment its key
//!   leaves the ring, and one sealed with a key that is no longer the first asks to be sealed
//!   again, exactly as an opening would say.
//! - It remembers openings, not sessions: whether the session still exists, its expiry and its
//!   contents are still read from the session cache or the store on every request.
//! - Bounded: `ways`-way sets of slots by the value's hash (seeded per process, so nobody can aim
//!   values at one set). A full set takes a new entry only on one `put` in [`ADMIT_EVERY`],
//!   giving up one of its entries in turn: with more cookies in use than slots, most misses cost
//!   the opening they would cost without a memo and nothing more (no allocation, no eviction),
//!   and nothing grows.
//! - One allocation an entry, the cookie in it: with many sessions in use, a request reads its
//!   entry from memory, not from a CPU cache, and every separate allocation on the way (the
//!   cookie's text, the handle's) was one more wait. Only cookies as long as the seal of a
//!   ticket ([`COOKIE_LEN`]) are remembered; no other value opens to a ticket.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use super::Handle;
use super::ticket::Ticket;
use crate::session::seal::{Keyring, sealed_len};

/// The length of every session cookie's value: a sealed [`Ticket`].
pub(super) const COOKIE_LEN: usize = sealed_len(Ticket::LEN);

/// Entries per set: a value may sit in any slot of its set.
const WAYS: usize = 8;
/// The most slots one memo has (16 bytes a slot; an entry is ~260 bytes more, as it comes): as
/// many as the largest `cache_entries`, so that every session the cache is sized for is opened
/// once per worker, not once per request.
const MAX_SLOTS: usize = 1 << 20;
/// The slots a memo starts with; it doubles, up to the slots it was made for, when a set is
/// full while at least half of all slots hold entries. A memo sized for many more sessions
/// than are in use costs memory for those in use only.
const FIRST_SLOTS: usize = 64 * WAYS;
/// A full set admits one new entry per this many `put`s.
const ADMIT_EVERY: usize = 8;

pub(super) struct Memo {
    inner: Mutex<Inner>,
    hasher: foldhash::fast::RandomState,
}

struct Inner {
    /// The key ring every remembered entry was opened with.
    keyring: Option<Arc<Keyring>>,
    slots: Box<[Slot]>,
    /// Slots holding an entry.
    len: usize,
    /// The most slots it grows to.
    most: usize,
    /// `put`s so far: which of them a full set admits, and which way gives up its entry.
    puts: usize,
}

#[derive(Default)]
struct Slot {
    hash: u64,
    entry: Option<Box<Entry>>,
}

/// An [`Opening`] and the cookie it came from, in four cache lines (`repr(C)`, aligned to a
/// line): the cookie first, which a lookup compares, then what it copies out, without the
/// padding a nested `Opening` would bring.
#[repr(C, align(64))]
struct Entry {
    cookie: [u8; COOKIE_LEN],
    stale_key: bool,
    key: super::cache::Key,
    handle: Handle,
    ticket: Ticket,
}

impl Entry {
    fn opening(&self) -> Opening {
        Opening {
            ticket: self.ticket.clone(),
            handle: self.handle,
            key: self.key,
            stale_key: self.stale_key,
        }
    }
}

/// What opening a cookie gave.
#[derive(Clone)]
pub(super) struct Opening {
    pub(super) ticket: Ticket,
    /// The session's handle (derived from the ticket).
    pub(super) handle: Handle,
    /// The key the session cache files the handle under (`cache::key_of`).
    pub(super) key: super::cache::Key,
    /// Sealed with a key that is no longer the first of the ring.
    pub(super) stale_key: bool,
}

impl Memo {
    /// A memo for about `entries` cookies (at most [`MAX_SLOTS`]).
    pub(super) fn new(entries: usize) -> Memo {
        let most = entries.clamp(WAYS, MAX_SLOTS).next_power_of_two();
        Memo {
            inner: Mutex::new(Inner {
                keyring: None,
                slots: empty_slots(most.min(FIRST_SLOTS)),
                len: 0,
                most,
                puts: 0,
            }),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// What opening `cookie` under `keyring` gave, if it was remembered under this very ring.
    pub(super) fn get(
        &self,
        keyring: &Arc<Keyring>,
        cookie: &(impl AsRef<[u8]> + ?Sized),
    ) -> Option<Opening> {
        let cookie: &[u8; COOKIE_LEN] = cookie.as_ref().try_into().ok()?;
        let hash = self.hasher.hash_one(placed_by(cookie));
        let mut inner = self.lock();
        if !inner.holds(keyring) {
            inner.forget(keyring);
            return None;
        }
        let set = inner.set(hash);
        inner.slots[set].iter().find_map(|slot| match &slot.entry {
            Some(e) if slot.hash == hash && e.cookie == *cookie => Some(e.opening()),
            _ => None,
        })
    }

    /// Remembers that `cookie` opened to `opened` under `keyring`.
    pub(super) fn put(
        &self,
        keyring: &Arc<Keyring>,
        cookie: &(impl AsRef<[u8]> + ?Sized),
        opened: &Opening,
    ) {
        let Ok(&cookie) = <&[u8; COOKIE_LEN]>::try_from(cookie.as_ref()) else {
            return;
        };
        let hash = self.hasher.hash_one(placed_by(&cookie));
        let mut inner = self.lock();
        if !inner.holds(keyring) {
            inner.forget(keyring);
        }
        let puts = inner.puts;
        inner.puts = puts.wrapping_add(1);
        let mut set = inner.set(hash);
        let mut free = inner.slots[set.clone()]
            .iter()
            .position(|s| s.entry.is_none());
        if free.is_none() && inner.slots.len() < inner.most && inner.len * 2 >= inner.slots.len() {
            inner.grow();
            set = inner.set(hash);
            free = inner.slots[set.clone()]
                .iter()
                .position(|s| s.entry.is_none());
        }
        let way = match free {
            Some(free) => {
                inner.len += 1;
                free
            }
            None if puts.is_multiple_of(ADMIT_EVERY) => (puts / ADMIT_EVERY) % WAYS,
            None => return,
        };
        inner.slots[set][way] = Slot {
            hash,
            entry: Some(Box::new(Entry {
                cookie,
                stale_key: opened.stale_key,
                key: opened.key,
                handle: opened.handle,
                ticket: opened.ticket.clone(),
            })),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing is left half-done while the lock is held: a poisoned memo is still whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock()
            .slots
            .iter()
            .filter(|s| s.entry.is_some())
            .count()
    }
}

fn empty_slots(size: usize) -> Box<[Slot]> {
    std::iter::repeat_with(Slot::default).take(size).collect()
}

/// What a cookie's place is worked out from: its last 16 characters, which spell most of the
/// AES-GCM tag (a value it seals cannot be chosen without the key), not all 130, hashed on every
/// request. Two values that end alike share a set and are told apart by their whole text, as
/// any two whose hashes meet.
fn placed_by(cookie: &[u8; COOKIE_LEN]) -> u128 {
    let mut tail = [0u8; 16];
    tail.copy_from_slice(&cookie[COOKIE_LEN - 16..]);
    u128::from_le_bytes(tail)
}

impl Inner {
    fn holds(&self, keyring: &Arc<Keyring>) -> bool {
        self.keyring
            .as_ref()
            .is_some_and(|k| Arc::ptr_eq(k, keyring))
    }

    /// Forgets every entry and belongs to `keyring` from now on. The ring is held, so its
    /// address cannot be taken by another ring while entries opened with it are remembered.
    fn forget(&mut self, keyring: &Arc<Keyring>) {
        for slot in &mut self.slots {
            slot.entry = None;
        }
        self.len = 0;
        self.keyring = Some(keyring.clone());
    }

    /// Twice the slots (at most [`Inner::most`]), each entry moved to its set among them: a set
    /// splits in two, so every entry finds a free way.
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).min(self.most);
        let old = std::mem::replace(&mut self.slots, empty_slots(size));
        self.len = 0;
        for slot in old.into_vec() {
            if slot.entry.is_some() {
                let set = self.set(slot.hash);
                if let Some(free) = self.slots[set].iter_mut().find(|s| s.entry.is_none()) {
                    *free = slot;
                    self.len += 1;
                }
            }
        }
    }

    /// The slots of `hash`'s set.
    fn set(&self, hash: u64) -> std::ops::Range<usize> {
        let sets = self.slots.len() / WAYS;
        // The high bits: foldhash's low bits are its weakest.
        let start = ((hash >> 32) as usize & (sets - 1)) * WAYS;
        start..start + WAYS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(byte: u8) -> Arc<Keyring> {
        Arc::new(Keyring::new(vec![[byte; 32]]).unwrap())
    }

    fn opening(n: u8) -> Opening {
        let mut bytes = [0u8; 64];
        bytes[0] = n;
        let ticket = Ticket::from_bytes(&bytes).unwrap();
        Opening {
            handle: Handle::of(&ticket.key()),
            ticket,
            key: u128::from(n),
            stale_key: n % 2 == 1,
        }
    }

    /// A value as long as a session cookie's, ending in `name`.
    fn c(name: &str) -> String {
        format!("{name:->COOKIE_LEN$}")
    }

    #[test]
    fn gives_back_what_was_put_for_that_exact_value_and_ring() {
        let memo = Memo::new(64);
        let k = ring(1);
        memo.put(&k, &c("cookie-one"), &opening(1));
        memo.put(&k, &c("cookie-two"), &opening(2));
        let one = memo.get(&k, &c("cookie-one")).unwrap();
        assert_eq!(
            (one.handle, one.key, one.stale_key),
            (opening(1).handle, 1, true)
        );
        assert!(one.ticket == opening(1).ticket);
        assert_eq!(memo.get(&k, &c("cookie-two")).unwrap().key, 2);
        let mut last = c("cookie-one");
        last.replace_range(COOKIE_LEN - 1.., "+");
        for other in [c("cookie-on"), c("Cookie-one"), last] {
            assert!(memo.get(&k, &other).is_none(), "{other}");
        }
        for other in [
            "cookie-one",
            "",
            &c("cookie-one")[1..],
            &(c("cookie-one") + "-"),
        ] {
            assert!(memo.get(&k, other).is_none(), "{other}");
        }
    }

    #[test]
    fn another_key_ring_forgets_everything() {
        let memo = Memo::new(64);
        let (k1, k2) = (ring(1), ring(1));
        memo.put(&k1, &c("cookie"), &opening(1));
        // Equal keys, another ring: a swap is a swap.
        assert!(memo.get(&k2, &c("cookie")).is_none());
        assert_eq!(memo.len(), 0);
        assert!(memo.get(&k1, &c("cookie")).is_none(), "nothing comes back");
    }

    /// Only a value as long as a sealed ticket can open to one: nothing else takes a place.
    #[test]
    fn a_value_of_another_length_is_not_remembered() {
        let memo = Memo::new(64);
        let k = ring(1);
        for other in ["short", &c("long").repeat(2), &c("one-less")[1..]] {
            memo.put(&k, other, &opening(1));
            assert!(memo.get(&k, other).is_none(), "{other}");
        }
        assert_eq!(memo.len(), 0);
    }

    /// Values that end alike share a set, and are still told apart.
    #[test]
    fn values_with_the_same_end_are_told_apart() {
        let memo = Memo::new(64);
        let k = ring(1);
        let end = "-".repeat(16);
        let values: Vec<String> = (0..WAYS as u8)
            .map(|n| c(&format!("cookie-{n}{end}")))
            .collect();
        assert!(values.iter().all(|v| v.ends_with(&end)));
        for (n, value) in values.iter().enumerate() {
            memo.put(&k, value, &opening(n as u8));
        }
        for (n, value) in values.iter().enumerate() {
            assert_eq!(memo.get(&k, value).unwrap().key, n as u128, "{value}");
        }
        assert!(memo.get(&k, &c(&format!("cookie-x{end}"))).is_none());
    }

    #[test]
    fn never_holds_more_than_its_slots() {
        let memo = Memo::new(64);
        let k = ring(1);
        for n in 0..10_000u32 {
            memo.put(&k, &c(&format!("cookie-{n}")), &opening(1));
        }
        assert_eq!(memo.len(), 64);
        let found = (0..10_000u32)
            .filter(|n| memo.get(&k, &c(&format!("cookie-{n}"))).is_some())
            .count();
        assert_eq!(found, 64);
    }

    #[test]
    fn a_full_memo_lets_one_newcomer_in_of_every_eight() {
        let memo = Memo::new(64);
        let k = ring(1);
        let mut n = 0u32;
        while memo.len() < 64 {
            memo.put(&k, &c(&format!("old-{n}")), &opening(1));
            n += 1;
        }
        let old: Vec<String> = (0..n)
            .map(|n| c(&format!("old-{n}")))
            .filter(|c| memo.get(&k, c).is_some())
            .collect();
        assert_eq!(old.len(), 64);
        for m in 0..64 {
            memo.put(&k, &c(&format!("new-{m}")), &opening(2));
        }
        let kept = old.iter().filter(|c| memo.get(&k, c).is_some()).count();
        let new = (0..64)
            .filter(|m| memo.get(&k, &c(&format!("new-{m}"))).is_some())
            .count();
        assert_eq!((kept, new), (64 - 64 / ADMIT_EVERY, 64 / ADMIT_EVERY));
    }

    #[test]
    fn an_entry_is_four_cache_lines() {
        assert_eq!(std::mem::size_of::<Entry>(), 256);
        assert_eq!(std::mem::align_of::<Entry>(), 64);
    }

    #[test]
    fn sizes_are_bounded_both_ways() {
        let most = |entries| Memo::new(entries).lock().most;
        assert_eq!(most(0), WAYS);
        assert_eq!(most(20_000), 32_768);
        assert_eq!(most(200_000), 262_144);
        assert_eq!(most(crate::config::MAX_CACHE_ENTRIES), MAX_SLOTS);
        assert_eq!(most(5_000_000), MAX_SLOTS);
        assert_eq!(Memo::new(0).lock().slots.len(), WAYS);
        assert_eq!(Memo::new(200_000).lock().slots.len(), FIRST_SLOTS);
    }

    /// A memo made for many more cookies than come starts small and grows with them, every
    /// entry still found after each doubling, up to the slots it was made for and no further.
    #[test]
    fn grows_with_the_cookies_it_holds_and_loses_none_on_the_way() {
        let memo = Memo::new(20_000);
        let k = ring(1);
        // A real cookie ends in its AES-GCM tag, which looks random (`placed_by`).
        let cookie = |n: u32| {
            let tail = (u64::from(n) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            c(&format!("{tail:016x}"))
        };
        let slots = |memo: &Memo| memo.lock().slots.len();
        assert_eq!(slots(&memo), FIRST_SLOTS);
        let mut sizes = vec![slots(&memo)];
        for n in 0..3_000u32 {
            memo.put(&k, &cookie(n), &opening(1));
            if slots(&memo) != *sizes.last().unwrap() {
                sizes.push(slots(&memo));
            }
        }
        // Doubled, and only while at least half full: 3,000 entries need no more than 8,192.
        assert_eq!(sizes, [512, 1024, 2048, 4096, 8192][..sizes.len()]);
        assert!(sizes.len() >= 4, "{sizes:?}");
        let found = (0..3_000u32)
            .filter(|n| memo.get(&k, &cookie(*n)).is_some())
            .count();
        assert_eq!(memo.len(), found);
        let held = memo.lock().len;
        assert_eq!(held, found);
        // A grown memo may still refuse a newcomer whose set is full, but keeps nearly all.
        assert!(found > 2_850, "{found} of 3,000 kept");
        for n in 3_000..200_000u32 {
            memo.put(&k, &cookie(n), &opening(1));
        }
        assert_eq!(slots(&memo), 32_768);
        let held = memo.lock().len;
        assert_eq!(held, memo.len());
    }
}
