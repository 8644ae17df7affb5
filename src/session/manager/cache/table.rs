//! One shard's entries: an open-addressing table (linear probing) whose slots hold the entries
//! themselves, key and all.
//!
//! A lookup's first slot is where its answer is, nearly always: one place in memory, where an
//! index beside a list of entries was three (the index's control bytes, its bucket, the entry).
//! With many sessions in use, each of them was a read from memory on every request.
//!
//! The table has at least twice as many slots as it holds entries, so probes stay short (about
//! 1.5 slots for a key that is there, 2.5 for one that is not) and there is always an empty slot
//! to end them. It starts small and doubles as entries come, up to twice the shard's capacity:
//! a `cache_entries` sized far above the sessions in use costs memory for those in use only. A
//! removal shifts the entries after it back (no tombstones), so nothing wears out with churn.

use tokio::time::Instant;

use super::{Key, Session, mix};
use std::sync::Arc;

pub(super) struct Slot {
    pub(super) key: Key,
    pub(super) stored: Instant,
    pub(super) version: u64,
    /// Shared with the requests that read it: a hit costs a reference count, not a copy.
    pub(super) session: Arc<Session>,
}

pub(super) struct Table {
    slots: Box<[Option<Slot>]>,
    len: usize,
    /// The most slots it grows to: twice its capacity.
    most: usize,
}

/// The slots a table starts with (if its capacity allows so many).
const FIRST_SLOTS: usize = 64;

impl Table {
    /// A table for at most `capacity` entries.
    pub(super) fn new(capacity: usize) -> Table {
        let most = capacity.max(1) * 2;
        Table {
            slots: empty_slots(most.min(FIRST_SLOTS)),
            len: 0,
            most,
        }
    }

    /// Slots allocated so far.
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot `key` is looked for first.
    fn home(&self, key: Key) -> usize {
        // The bits below the shard's ([`super::shard_of`] takes the top four), scaled to the
        // table's length.
        ((u128::from(mix(key) << 4) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, at: usize) -> usize {
        if at + 1 == self.slots.len() {
            0
        } else {
            at + 1
        }
    }

    /// Where `key`'s entry is.
    pub(super) fn find(&self, key: Key) -> Option<usize> {
        let mut at = self.home(key);
        loop {
            match &self.slots[at] {
                None => return None,
                Some(slot) if slot.key == key => return Some(at),
                Some(_) => at = self.next(at),
            }
        }
    }

    /// The entry at `at` (from [`Table::find`] or [`Table::occupied_from`]).
    pub(super) fn at(&self, at: usize) -> Option<&Slot> {
        self.slots.get(at)?.as_ref()
    }

    pub(super) fn at_mut(&mut self, at: usize) -> Option<&mut Slot> {
        self.slots.get_mut(at)?.as_mut()
    }

    /// Files an entry whose key is not held, in a table holding fewer entries than its
    /// capacity.
    pub(super) fn insert(&mut self, slot: Slot) {
        if (self.len + 1) * 2 > self.slots.len() && self.slots.len() < self.most {
            self.grow();
        }
        self.place(slot);
        self.len += 1;
    }

    /// Twice the slots (at most [`Table::most`]), every entry filed again from its home in
    /// them; an entry's place is only found, never kept, outside the table.
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).min(self.most);
        let old = std::mem::replace(&mut self.slots, empty_slots(size));
        for slot in old.into_vec().into_iter().flatten() {
            self.place(slot);
        }
    }

    /// Puts an entry in the first empty slot from its home on.
    fn place(&mut self, slot: Slot) {
        let mut at = self.home(slot.key);
        while self.slots[at].is_some() {
            at = self.next(at);
        }
        self.slots[at] = Some(slot);
    }

    /// Removes the entry at `at`; entries probed past it move back, so that every entry stays
    /// reachable from its home without a gap.
    pub(super) fn remove_at(&mut self, at: usize) {
        if self.slots[at].take().is_none() {
            return;
        }
        self.len -= 1;
        let mut hole = at;
        let mut at = self.next(hole);
        while let Some(slot) = &self.slots[at] {
            let home = self.home(slot.key);
            // It may fill the hole unless its home lies after the hole, up to where it is.
            let stays = if hole <= at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !stays {
                self.slots[hole] = self.slots[at].take();
                hole = at;
            }
            at = self.next(at);
        }
    }

    pub(super) fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill_with(|| None);
            self.len = 0;
        }
    }

    /// The first entry at `start % slots` or after it (round the end), if any: an entry picked
    /// at random from a random `start`.
    pub(super) fn occupied_from(&self, start: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let start = start % self.slots.len();
        let mut at = start;
        loop {
            if self.slots[at].is_some() {
                return Some(at);
            }
            at = self.next(at);
            if at == start {
                return None;
            }
        }
    }
}

fn empty_slots(size: usize) -> Box<[Option<Slot>]> {
    std::iter::repeat_with(|| None).take(size).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn slot(key: Key, version: u64) -> Slot {
        Slot {
            key,
            stored: Instant::now(),
            version,
            session: Arc::default(),
        }
    }

    /// Inserts and removals in any order leave every key that is held findable, at its own
    /// version, and no key that is not: a table against a map, through churn that wraps round
    /// the end and piles keys onto the same homes.
    #[test]
    fn finds_what_it_holds_and_nothing_else_through_churn() {
        const CAPACITY: usize = 64;
        let mut table = Table::new(CAPACITY);
        let mut model: HashMap<Key, u64> = HashMap::new();
        let mut random = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        // Few distinct keys, so that the same ones come and go; some share their home.
        let keys: Vec<Key> = (0..100u128)
            .map(|i| if i % 3 == 0 { i << 64 } else { i * 0x9e37_79b9 })
            .collect();
        for round in 0..20_000u64 {
            let key = keys[(next() % keys.len() as u64) as usize];
            match (table.find(key), model.contains_key(&key)) {
                (Some(at), true) => {
                    assert_eq!(table.at(at).unwrap().version, model[&key]);
                    if next() % 2 == 0 {
                        table.remove_at(at);
                        model.remove(&key);
                    } else {
                        table.at_mut(at).unwrap().version = round;
                        model.insert(key, round);
                    }
                }
                (None, false) if model.len() < CAPACITY => {
                    table.insert(slot(key, round));
                    model.insert(key, round);
                }
                (None, false) => {
                    let at = table.occupied_from(next() as usize).unwrap();
                    let gone = table.at(at).unwrap().key;
                    table.remove_at(at);
                    model.remove(&gone);
                }
                (found, held) => panic!("{key:x}: found {found:?}, held {held}"),
            }
            assert_eq!(table.len(), model.len());
        }
        for key in &keys {
            let found = table.find(*key).map(|at| table.at(at).unwrap().version);
            assert_eq!(found, model.get(key).copied(), "{key:x}");
        }
        table.clear();
        assert!(table.is_empty() && keys.iter().all(|k| table.find(*k).is_none()));
        assert_eq!(table.occupied_from(3), None);
    }

    /// A table made for many entries starts small and doubles as they come, only up to twice
    /// its capacity, and every entry filed before a doubling is found after it.
    #[test]
    fn grows_with_its_entries_up_to_twice_its_capacity() {
        let mut table = Table::new(100_000);
        assert_eq!(table.slots(), FIRST_SLOTS);
        let key = |i: u128| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        for i in 0..1_000 {
            table.insert(slot(key(i), i as u64));
            assert!(
                table.slots() >= 2 * table.len(),
                "{} in {}",
                table.len(),
                table.slots()
            );
        }
        assert_eq!(table.slots(), 2_048);
        for i in 0..1_000 {
            let at = table.find(key(i)).unwrap();
            assert_eq!(table.at(at).unwrap().version, i as u64);
        }
        let mut small = Table::new(40);
        for i in 0..40 {
            small.insert(slot(key(i), 0));
        }
        assert_eq!(small.slots(), 80);
        assert!((0..40).all(|i| small.find(key(i)).is_some()));
    }

    #[test]
    fn a_random_start_finds_an_entry_wherever_it_is() {
        let mut table = Table::new(8);
        table.insert(slot(5, 1));
        let at = table.find(5).unwrap();
        for start in 0..100 {
            assert_eq!(table.occupied_from(start), Some(at));
        }
    }
}
