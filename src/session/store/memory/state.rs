//! The data of a memory store and its bounds: what expires when, and what makes room for what.
//!
//! Every kind of entry has a part of the bound of its own, so that no kind can push out another:
//! records (sessions), markers (`login:`, `jti:`), leases (refresh locks) and index members each
//! hold at most `max_entries` (index members twice that: a session has up to two). A full part
//! of records, markers or index members evicts its own entry that expires soonest (an evicted
//! index member takes its session with it: no session lives on out of its indexes); a full part
//! of leases refuses a new one instead, since a lease taken from its holder lets two refreshes
//! spend one refresh token.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::session::store::Record;

/// What a store never holds longer (a time to live too long for the clock is cut to this).
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `ttl` from now, without overflowing the clock however long `ttl` is.
pub(super) fn expiry_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .or_else(|| now.checked_add(LONGEST))
        .unwrap_or(now)
}

#[derive(Default)]
pub(super) struct State {
    pub(super) entries: HashMap<String, Entry>,
    /// Records, markers and leases by expiry, one queue per part of the bound.
    queues: [BTreeSet<(Instant, String)>; 3],
    /// Every index's members by expiry (their part of the bound): (expiry, index, member).
    members: BTreeSet<(Instant, String, String)>,
}

pub(super) struct Entry {
    pub(super) expires_at: Instant,
    pub(super) kind: Kind,
}

pub(super) enum Kind {
    Record(Record),
    /// An index's members; it lives while it has one (its own `expires_at` is not used).
    Index(Index),
    Marker,
    Lock(String),
}

/// The parts of the bound that keep an expiry queue of whole entries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Records = 0,
    Markers = 1,
    Leases = 2,
}

impl Kind {
    fn part(&self) -> Option<Part> {
        match self {
            Kind::Record(_) => Some(Part::Records),
            Kind::Marker => Some(Part::Markers),
            Kind::Lock(_) => Some(Part::Leases),
            Kind::Index(_) => None,
        }
    }
}

/// An index: each member with its deadline (Unix seconds, the caller's clock) and its expiry.
#[derive(Default)]
pub(super) struct Index {
    members: HashMap<String, (u64, Instant)>,
    by_deadline: BTreeSet<(u64, String)>,
}

impl Index {
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    /// Members and deadlines, soonest deadline first.
    pub(super) fn ranked(&self) -> Vec<(String, u64)> {
        self.by_deadline
            .iter()
            .map(|(deadline, member)| (member.clone(), *deadline))
            .collect()
    }

    fn remove(&mut self, member: &str) -> Option<Instant> {
        let (deadline, expires_at) = self.members.remove(member)?;
        self.by_deadline.remove(&(deadline, member.to_owned()));
        Some(expires_at)
    }
}

impl State {
    pub(super) fn sweep(&mut self, now: Instant) {
        for queue in &mut self.queues {
            while queue.first().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, key)) = queue.pop_first() {
                    self.entries.remove(&key);
                }
            }
        }
        while self.members.first().is_some_and(|(at, ..)| *at <= now) {
            if let Some((_, index, member)) = self.members.pop_first() {
                self.drop_member(&index, &member);
            }
        }
    }

    fn queue(&mut self, part: Part) -> &mut BTreeSet<(Instant, String)> {
        &mut self.queues[part as usize]
    }

    pub(super) fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.sweep(Instant::now());
        self.entries.get_mut(key)
    }

    /// Whether the part of the bound `kind` belongs to holds `max_entries`.
    pub(super) fn full(&mut self, kind: &Kind, max_entries: usize) -> bool {
        kind.part()
            .is_some_and(|part| self.queue(part).len() >= max_entries)
    }

    /// Inserts a record, marker or lease, first evicting the entry of the same part that expires
    /// soonest while that part holds `max_entries` (see [`State::full`] for leases, which the
    /// caller refuses instead).
    pub(super) fn insert(&mut self, key: &str, entry: Entry, max_entries: usize) {
        self.remove(key);
        let Some(part) = entry.kind.part() else {
            return;
        };
        while self.queue(part).len() >= max_entries {
            match self.queue(part).pop_first() {
                Some((_, evicted)) => {
                    self.entries.remove(&evicted);
                }
                None => break,
            }
        }
        self.queue(part).insert((entry.expires_at, key.to_owned()));
        self.entries.insert(key.to_owned(), entry);
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        match &entry.kind {
            Kind::Index(index) => {
                for (member, (_, expires_at)) in &index.members {
                    self.members
                        .remove(&(*expires_at, key.to_owned(), member.clone()));
                }
            }
            kind => {
                if let Some(part) = kind.part() {
                    self.queue(part).remove(&(entry.expires_at, key.to_owned()));
                }
            }
        }
        Some(entry)
    }

    pub(super) fn set_expiry(&mut self, key: &str, expires_at: Instant) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut entry.expires_at, expires_at);
        if let Some(part) = entry.kind.part() {
            let queue = self.queue(part);
            queue.remove(&(old, key.to_owned()));
            queue.insert((expires_at, key.to_owned()));
        }
    }

    /// Adds `member` to the index `key` (which must be one or absent) until `deadline`, first
    /// removing the members whose deadline is at or before `now`; evicts the member of any index
    /// that expires soonest, and the session it names with it, while members number twice
    /// `max_entries`. Returns the index's size.
    pub(super) fn index_add(
        &mut self,
        key: &str,
        member: &str,
        (deadline, now): (u64, u64),
        max_entries: usize,
    ) -> usize {
        let expires_at = expiry_after(Duration::from_secs(deadline.saturating_sub(now)));
        let mut gone = Vec::new();
        if let Some(index) = self.index_mut(key) {
            while let Some((due, _)) = index.by_deadline.first()
                && *due <= now
            {
                if let Some((_, old)) = index.by_deadline.pop_first()
                    && let Some((_, at)) = index.members.remove(&old)
                {
                    gone.push((at, old));
                }
            }
            if let Some(at) = index.remove(member) {
                gone.push((at, member.to_owned()));
            }
        }
        for (at, old) in gone {
            self.members.remove(&(at, key.to_owned(), old));
        }
        // Twice the records' bound: a session has up to two members, so live sessions' members
        // fit, and only stale ones (of sessions that idled out) can fill the part.
        while self.members.len() >= max_entries.saturating_mul(2) {
            match self.members.pop_first() {
                Some((_, index, evicted)) => {
                    self.drop_member(&index, &evicted);
                    // Fail closed: a session must never live on out of its indexes, where
                    // back-channel logout and "sign out everywhere" could not reach it.
                    if matches!(
                        self.entries.get(&evicted),
                        Some(Entry {
                            kind: Kind::Record(_),
                            ..
                        })
                    ) {
                        self.remove(&evicted);
                    }
                }
                None => break,
            }
        }
        let entry = self.entries.entry(key.to_owned()).or_insert_with(|| Entry {
            expires_at,
            kind: Kind::Index(Index::default()),
        });
        entry.expires_at = entry.expires_at.max(expires_at);
        let Kind::Index(index) = &mut entry.kind else {
            return 0;
        };
        index
            .members
            .insert(member.to_owned(), (deadline, expires_at));
        index.by_deadline.insert((deadline, member.to_owned()));
        let held = index.len();
        self.members
            .insert((expires_at, key.to_owned(), member.to_owned()));
        held
    }

    /// Takes `member` out of the index `key`; the index goes with its last member.
    pub(super) fn index_remove(&mut self, key: &str, member: &str) {
        if let Some(at) = self.index_mut(key).and_then(|index| index.remove(member)) {
            self.members
                .remove(&(at, key.to_owned(), member.to_owned()));
        }
        self.drop_if_empty(key);
    }

    fn index_mut(&mut self, key: &str) -> Option<&mut Index> {
        match self.entries.get_mut(key) {
            Some(Entry {
                kind: Kind::Index(index),
                ..
            }) => Some(index),
            _ => None,
        }
    }

    /// Removes a member already taken out of the expiry set of members.
    fn drop_member(&mut self, key: &str, member: &str) {
        if let Some(index) = self.index_mut(key) {
            index.remove(member);
        }
        self.drop_if_empty(key);
    }

    fn drop_if_empty(&mut self, key: &str) {
        if self.index_mut(key).is_some_and(|index| index.len() == 0) {
            self.entries.remove(key);
        }
    }

    /// Members of every index (tests: the bound).
    #[cfg(test)]
    pub(super) fn members(&self) -> usize {
        self.members.len()
    }
}
