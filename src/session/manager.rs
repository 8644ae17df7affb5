//! [`Sessions`]: creating, loading, saving and ending sessions, with the cookie value as the only
//! thing the browser holds.
//!
//! The cookie seals a ticket (session id ‖ data key, see `ticket`) with the key ring, bound to the
//! cookie name. The store holds the session encrypted with the data key under a hashed name, with
//! time to live = min(idle time left, absolute time left). The absolute deadline is set at login
//! and stored in the session, so a later `absolute_timeout` never moves it past its index
//! entries. Indexes by hashed `sub` and hashed
//! provider `sid` serve back-channel logout, session listing and the cap on a user's sessions;
//! their members are store names, each with its session's absolute deadline. Adding a member
//! removes those past their deadline in the same step, and a login removes its user's entries
//! of sessions that ended (idled out) and ends the oldest sessions beyond `max_per_user`. A
//! reader never removes an entry just because its session is missing: `create` writes the
//! entries before the record, and the login between the two must stay reachable by its user.
//!
//! Rules: a bad, foreign or expired cookie is `Ok(None)`, and so is a session another issuer's
//! login made (`issuer`: ended when read; what finds sessions by `sub` or `sid` passes it by);
//! an unreachable store is `Err` and never ends a session. Every write publishes the session's
//! handle on [`INVALIDATION_CHANNEL`], in the same step as the write, so other instances drop
//! cached copies and what waits on that session ([`Sessions::watch`], `watches`) reads it again.
//! The time is always a parameter (`now`, Unix seconds).

mod cache;
mod issuer;
mod memo;
mod ticket;
mod watches;

use std::fmt;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

pub use self::cache::sizing;
use self::cache::{Cache, Lookup};
use self::memo::{Memo, Opening};
use self::ticket::{StoreKey, Ticket, decode_meta, decode_session, encode_record, index_name};
use self::watches::Watches;
pub use self::watches::{Found, Founds, ReadTurn, SessionWatch, Woken};
use crate::session::model::Session;
use crate::session::seal::{Keyring, SealError};
use crate::session::store::{Corruption, Outage, Store, StoreError};
use std::sync::Arc;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);
/// The index of a subject's sessions, and of a provider session's: sorted by deadline.
const SUBJECT_INDEX: &str = "sub";
const PROVIDER_INDEX: &str = "sid";
/// The same indexes as plain sets without deadlines, as versions before wrote them (Redis
/// answers WRONGTYPE to reading one as the other, hence the new names). Still read, and their
/// sessions ended, by back-channel logout, "sign out everywhere" and the session list until
/// they expire: at most `absolute_timeout` after the last login an older version took.
const OLD_SUBJECT_INDEX: &str = "u";
const OLD_PROVIDER_INDEX: &str = "p";
/// An index entry whose session is missing is stale only once that session is this old (and
/// older than the idle timeout, before which only a logout ends it, and a logout removes its
/// entries): `create` writes its record at most a store timeout (30 s at most) after its index
/// entries, and an entry removed in between would leave the new session out of its index.
const INDEX_GRACE: u64 = 300;
/// An index entry is removed for its deadline only once that deadline is this far behind the
/// clock of the replica removing it: replicas' clocks may differ (`oidc.clock_skew` allows each
/// up to 5 minutes, so two may be 10 apart), and one running fast must not take a session that
/// the others still serve out of reach of back-channel logout. A stale entry costs nothing but
/// this much longer in the index.
const PRUNE_MARGIN: u64 = 600;
/// Store channel (suffix) carrying the handles of sessions that changed or ended.
pub const INVALIDATION_CHANNEL: &str = "session-invalidate";
/// What the names of session records begin with (after the store's key prefix).
pub const RECORD_PREFIX: &str = ticket::SESSION_PREFIX;

/// The handle of the session whose record the store names `name` (its key without the store's
/// prefix), as invalidation messages carry it; `None` for a name no session record has. A
/// store that hears of a record's change from the store itself (Redis's tracking of keys)
/// announces it on [`INVALIDATION_CHANNEL`] under this.
pub fn handle_of_record(name: &str) -> Option<String> {
    StoreKey::parse(name).map(|key| key.handle())
}

/// What the manager needs to know; built by `config`.
#[derive(Debug)]
pub struct SessionSettings {
    pub cookie_name: String,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub keyring: Keyring,
    /// Keep opened sessions in memory this long (`ZERO`: no cache). Another instance's write is
    /// seen as soon as its invalidation message arrives, and at the latest after this long.
    pub cache_ttl: Duration,
    /// The most sessions the cache holds (`session.cache_entries`).
    pub cache_entries: usize,
    /// The most sessions one subject has at once (`session.max_per_user`): a login beyond it
    /// ends that subject's oldest.
    pub max_per_user: usize,
    /// The configured issuer (`oidc.issuer`). A session recorded as another's is no session:
    /// it is signed out and ended, and a logout, listing or cap that finds sessions by `sub` or
    /// `sid` leaves it alone (a `sub` is unique only per issuer). One recorded with none (stored
    /// before issuers were) is this one's.
    pub issuer: String,
}

impl SessionSettings {
    /// Default timeouts, no cache.
    pub fn new(cookie_name: impl Into<String>, keyring: Keyring) -> SessionSettings {
        SessionSettings {
            cookie_name: cookie_name.into(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            absolute_timeout: DEFAULT_ABSOLUTE_TIMEOUT,
            keyring,
            cache_ttl: Duration::ZERO,
            cache_entries: crate::config::DEFAULT_CACHE_ENTRIES,
            max_per_user: crate::config::DEFAULT_MAX_PER_USER,
            issuer: String::new(),
        }
    }
}

/// Why a session could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("session could not be sealed: {0}")]
    Seal(#[from] SealError),
}

/// What [`Sessions::load_cached`] tells of a cookie value without the store.
pub enum Cached {
    /// The answer: no session, or the cached one.
    Known(Option<OpenSession>),
    /// The store has the answer ([`Sessions::load_stored`]).
    Ask(Stored),
}

/// A cookie value that opened, whose session the cache did not hold.
pub struct Stored {
    opening: Opening,
    /// The cache's miss, under which the store's answer is filed; none without a cache.
    stamp: Option<cache::Stamp>,
    /// The cache's copy past its time to live (or not proven fresh), at its version: served
    /// if the store's record is still at that version.
    stale: Option<(u64, Arc<Session>)>,
}

/// A session read through its cookie, ready to be saved back.
#[derive(Clone)]
pub struct OpenSession {
    /// Shared with the cache; [`Arc::make_mut`] copies it before a change.
    pub session: Arc<Session>,
    /// The store version this was read at; `save` succeeds only if it is still current.
    pub version: u64,
    /// A stable, non-secret id for this session (URLs, cache keys, invalidation messages).
    pub handle: Handle,
    /// The cookie was sealed with an old key: send a new value from [`Sessions::reseal`].
    pub reseal: bool,
    ticket: Ticket,
    /// `false` after [`Sessions::load`]: `session.id_token` was left in the store (see there).
    complete: bool,
}

impl fmt::Debug for OpenSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSession")
            .field("session", &self.session)
            .field("version", &self.version)
            .field("handle", &self.handle)
            .field("reseal", &self.reseal)
            .field("complete", &self.complete)
            .finish_non_exhaustive()
    }
}

/// A session's handle ([`OpenSession::handle`]): its text, 32 lowercase hex digits, held in
/// place. A request copies it out of the memo's entry of its cookie (`memo.rs`), beside what it
/// reads there anyway: no allocation of its own to reach (and miss) for a reference count.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle([u8; 32]);

impl Handle {
    fn of(key: &StoreKey) -> Handle {
        Handle(key.handle_text())
    }
}

impl std::ops::Deref for Handle {
    type Target = str;

    fn deref(&self) -> &str {
        // Made only of hex digits (`of`): always text.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// The refresh lease of a session, held by a logout ([`Sessions::hold_refreshes`]).
pub struct RefreshHold {
    key: String,
    token: String,
}

/// How long a hold lasts should its holder never let it go (it crashed): the refresh lease's
/// length.
const HOLD_LEASE: Duration = Duration::from_secs(10);
/// How often a hold is tried for while a refresh holds the lease.
const HOLD_POLL: Duration = Duration::from_millis(25);

/// One of a user's sessions, as a "your devices" page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    pub handle: String,
    pub created_at: u64,
    pub last_seen: u64,
    pub user_agent: Option<String>,
}

/// The session manager: key ring + store (+ optional cache).
///
/// One per process, plus one per serving worker ([`Sessions::for_worker`]) that differs only in
/// its store handle. The key ring and the cache are process-wide and shared by all of them: a
/// session opened or written on one worker is cached for every other, a reload's key ring
/// reaches all, and an invalidation message is received once for the whole process.
pub struct Sessions {
    cookie_name: String,
    idle: u64,
    absolute: u64,
    keyring: Arc<ArcSwap<Keyring>>,
    store: Store,
    cache: Option<Arc<Cache>>,
    /// The sessions that tunnels and streams wait on, process-wide like the cache.
    watches: Arc<Watches>,
    /// Cookies opened before, by value: this manager's own (each worker has one).
    memo: Memo,
    /// How many cookies a memo is sized for (`session.cache_entries`).
    memo_entries: usize,
    max_per_user: usize,
    issuer: Arc<str>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("cookie_name", &self.cookie_name)
            .field("idle_timeout_s", &self.idle)
            .field("absolute_timeout_s", &self.absolute)
            .field("store", &self.store)
            .field("cache", &self.cache.is_some())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    pub fn new(settings: SessionSettings, store: Store) -> Sessions {
        let SessionSettings {
            cookie_name,
            idle_timeout,
            absolute_timeout,
            keyring,
            cache_ttl,
            cache_entries,
            max_per_user,
            issuer,
        } = settings;
        let cache = (!cache_ttl.is_zero()).then(|| {
            Arc::new(Cache::new(
                cache_ttl,
                cache_entries,
                store.subscribe(INVALIDATION_CHANNEL),
                store.subscription_live(),
                store.freshness(),
            ))
        });
        Sessions {
            cookie_name,
            idle: idle_timeout.as_secs().max(1),
            absolute: absolute_timeout.as_secs().max(1),
            keyring: Arc::new(ArcSwap::from_pointee(keyring)),
            watches: Arc::new(Watches::new(store.clone())),
            store,
            cache,
            memo: Memo::new(cache_entries),
            memo_entries: cache_entries,
            max_per_user: max_per_user.max(1),
            issuer: issuer.into(),
        }
    }

    /// The manager one serving worker uses: the same settings, key ring and cache, over the
    /// worker's own store handle ([`Store::for_worker`]).
    pub fn for_worker(&self) -> Sessions {
        Sessions {
            cookie_name: self.cookie_name.clone(),
            idle: self.idle,
            absolute: self.absolute,
            keyring: self.keyring.clone(),
            store: self.store.for_worker(),
            cache: self.cache.clone(),
            watches: self.watches.clone(),
            memo: Memo::new(self.memo_entries),
            memo_entries: self.memo_entries,
            max_per_user: self.max_per_user,
            issuer: self.issuer.clone(),
        }
    }

    /// The store, for the refresh lease, replay markers and readiness checks.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The key ring in effect.
    pub fn keyring(&self) -> arc_swap::Guard<Arc<Keyring>> {
        self.keyring.load()
    }

    /// Swaps in a new key ring (hot reload). Cookies sealed under keys it still holds keep working.
    /// The key ring itself, for others that seal with it and must follow a reload.
    pub fn shared_keyring(&self) -> Arc<ArcSwap<Keyring>> {
        self.keyring.clone()
    }

    pub fn replace_keyring(&self, keyring: Keyring) {
        self.keyring.store(keyring.into());
    }

    /// Handles of changed or ended sessions, from every instance; `""` means "drop everything".
    /// Every message wakes every receiver: to wait on one session, [`Sessions::watch`].
    pub fn subscribe_invalidations(&self) -> broadcast::Receiver<String> {
        self.store.subscribe(INVALIDATION_CHANNEL).into_receiver()
    }

    /// Waits on the session `handle` names, from now on: woken by its invalidations, from
    /// every instance, and whenever any may have been lost — not by other sessions' (see
    /// `watches`). Call inside a runtime.
    pub fn watch(&self, handle: Handle) -> SessionWatch {
        self.watches.watch(handle)
    }

    /// How many sessions are watched now (an entry per session, gone with its last watch).
    #[cfg(test)]
    pub(crate) fn watched_sessions(&self) -> usize {
        self.watches.watched()
    }

    /// The store key of this session's single-flight refresh lease.
    pub fn refresh_lock_key(&self, loaded: &OpenSession) -> String {
        loaded.ticket.key().lock_name()
    }

    /// The store key that records a refresh spending this session's `refresh_token`.
    pub fn spend_key(&self, loaded: &OpenSession, refresh_token: &str) -> String {
        loaded.ticket.key().spend_name(refresh_token)
    }

    /// Time until the session ends if unused.
    pub fn expires_in(&self, session: &Session, now: u64) -> Duration {
        Duration::from_secs(self.seconds_left(session, now))
    }

    fn seconds_left(&self, session: &Session, now: u64) -> u64 {
        let idle_end = session.last_seen.saturating_add(self.idle);
        idle_end.min(self.absolute_end(session)).saturating_sub(now)
    }

    /// The deadline the session got at login, which a later `absolute_timeout` does not move
    /// (its index entries hold it); for a session stored before that, as configured now.
    fn absolute_end(&self, session: &Session) -> u64 {
        match session.absolute_deadline {
            Some(deadline) => deadline,
            None => session.created_at.saturating_add(self.absolute),
        }
    }

    /// Stores a new session (new id, new data key) and returns the cookie value for it.
    /// `created_at` and `last_seen` are set to `now`.
    pub async fn create(
        &self,
        session: Session,
        now: u64,
    ) -> Result<(String, OpenSession), SessionError> {
        self.create_replacing(session, now, None).await
    }

    /// [`Sessions::create`] for a browser whose session `previous` the new one replaces (a
    /// login in a browser already signed in): `previous` ends once the new one is stored (a
    /// store that refuses new data but still deletes must not leave the browser with neither),
    /// before `max_per_user` is applied, so that it never counts against the cap and ends
    /// another device's session.
    pub async fn create_replacing(
        &self,
        mut session: Session,
        now: u64,
        previous: Option<&OpenSession>,
    ) -> Result<(String, OpenSession), SessionError> {
        session.created_at = now;
        session.last_seen = now;
        session.absolute_deadline = Some(now.saturating_add(self.absolute));
        let ticket = Ticket::random()?;
        let key = ticket.key();
        let keyring = self.keyring.load();
        let record = encode_record(&keyring, &ticket, &key, &session)?;
        // Index first: an index entry without a session is pruned later, a session missing from
        // the index could not be ended by back-channel logout.
        let held = self.index(&key, &session, now).await?;
        let ttl = Duration::from_secs(self.seconds_left(&session, now));
        if !self.store.put_new(&key.name(), &record, ttl).await? {
            return Err(StoreError::Corrupt(Corruption::IdCollision).into());
        }
        if let Some(previous) = previous
            && let Err(error) = self.delete(previous).await
        {
            tracing::warn!(%error, "the browser's previous session could not be ended at login");
        }
        // The session stands whatever happens here; the next login tidies up again.
        if let Err(error) = self.tidy(&session, &key.name(), held, now).await {
            tracing::warn!(%error, "the user's ended sessions could not be tidied after a login");
        }
        let cookie = keyring.seal(&self.cookie_name, &ticket.to_bytes())?;
        let loaded = OpenSession {
            session: Arc::new(session),
            version: 1,
            handle: Handle::of(&key),
            reseal: false,
            ticket,
            complete: true,
        };
        Ok((cookie, loaded))
    }

    /// Adds the session to its subject's index and its provider session's, until its absolute
    /// deadline; how many entries each then holds.
    async fn index(&self, key: &StoreKey, session: &Session, now: u64) -> Result<Held, StoreError> {
        let deadline = self.absolute_end(session);
        let member = key.name();
        // The store removes members at or before this (see `PRUNE_MARGIN`).
        let past = now.saturating_sub(PRUNE_MARGIN);
        let subject = index_name(SUBJECT_INDEX, &session.sub);
        let subject = self
            .store
            .index_add(&subject, &member, deadline, past)
            .await?;
        let provider = match &session.sid {
            Some(sid) => {
                let index = index_name(PROVIDER_INDEX, sid);
                self.store
                    .index_add(&index, &member, deadline, past)
                    .await?
            }
            None => 0,
        };
        Ok(Held { subject, provider })
    }

    /// After a login (`new`): takes the entries of sessions that ended out of the subject's
    /// index and its provider session's, and ends the subject's oldest sessions beyond
    /// `max_per_user`. Costs nothing more for a subject with one entry (most logins).
    async fn tidy(
        &self,
        session: &Session,
        new: &str,
        held: Held,
        now: u64,
    ) -> Result<(), StoreError> {
        if held.subject > 1 {
            let index = index_name(SUBJECT_INDEX, &session.sub);
            let mut live = Vec::new();
            for (member, deadline) in self.prune(&index, now).await? {
                // Another issuer's user of the same `sub` is another user: not counted, not
                // ended.
                if !self.of_another_issuer(&member).await? {
                    live.push((member, deadline));
                }
            }
            let excess = live.len().saturating_sub(self.max_per_user);
            // Oldest first, and only those ranked before the login itself (by deadline, then
            // name, as the index lists them): never itself, and never a login made at the same
            // time or after, which ends this one instead if need be. Two logins at once then
            // never end each other.
            let rank = (self.absolute_end(session), new);
            let older = live
                .iter()
                .filter(|(member, deadline)| (*deadline, member.as_str()) < rank)
                .map(|(member, _)| member);
            for member in older.take(excess) {
                // One with no record yet (a login between its two writes) keeps its entry; it
                // counts at the next login.
                if self.end_capped(member).await? {
                    self.store.index_remove(&index, member).await?;
                }
            }
        }
        if held.provider > 1
            && let Some(sid) = &session.sid
        {
            self.prune(&index_name(PROVIDER_INDEX, sid), now).await?;
        }
        Ok(())
    }

    /// Ends a session beyond `max_per_user` and takes it out of its provider session's index
    /// (read from its listing data: the cookie, which holds its `sid`, is not here); `true` if
    /// it existed. A record written before that mark leaves an entry there, which goes at its
    /// deadline.
    async fn end_capped(&self, member: &str) -> Result<bool, StoreError> {
        let Some(key) = StoreKey::parse(member) else {
            return Ok(false);
        };
        let provider_index = match self.store.get(member).await? {
            Some(record) => decode_meta(&self.keyring.load(), &key, &record.value)
                .and_then(|meta| meta.provider_index),
            None => None,
        };
        if !self.end(&key).await? {
            return Ok(false);
        }
        if let Some(index) = provider_index {
            self.store.index_remove(&index, member).await?;
        }
        Ok(true)
    }

    /// An index's members, oldest first, without the stale ones, which it removes: those past
    /// their deadline (by more than [`PRUNE_MARGIN`]), and those whose session is missing once it is old enough for that to
    /// mean it ended (see [`INDEX_GRACE`]).
    async fn prune(&self, index: &str, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let settled = self.idle.max(INDEX_GRACE);
        let mut live = Vec::new();
        for (member, deadline) in self.store.index_members(index).await? {
            let created = deadline.saturating_sub(self.absolute);
            let stale = deadline.saturating_add(PRUNE_MARGIN) <= now
                || StoreKey::parse(&member).is_none()
                || (created.saturating_add(settled) <= now && !self.store.exists(&member).await?);
            if stale {
                self.store.index_remove(index, &member).await?;
            } else {
                live.push((member, deadline));
            }
        }
        Ok(live)
    }

    /// What `cookie_value` opens to under the key ring in effect, remembered by value (see
    /// `memo.rs`); `None` for a value that does not open, which is never remembered.
    #[inline]
    fn open(&self, cookie_value: &[u8]) -> Option<Opening> {
        // A guard, not a clone: the ring's reference count is shared by every worker.
        let keyring = self.keyring.load();
        if let Some(known) = self.memo.get(&keyring, cookie_value) {
            return Some(known);
        }
        let opened = keyring.open(&self.cookie_name, cookie_value)?;
        let ticket = Ticket::from_bytes(&opened.plaintext)?;
        let handle = Handle::of(&ticket.key());
        let opening = Opening {
            key: cache::key_of(&handle),
            handle,
            ticket,
            stale_key: opened.stale_key,
        };
        self.memo.put(&keyring, cookie_value, &opening);
        Some(opening)
    }

    /// The handle of the session `cookie_value` opens to, live or not, without asking the
    /// store; `None` for a value that does not open.
    pub fn handle_of(&self, cookie_value: &[u8]) -> Option<Handle> {
        self.open(cookie_value).map(|opening| opening.handle)
    }

    /// Whether `cookie_value` opens to another session than `handle`'s, live or not: a request
    /// whose session cookies name two sessions has a cookie of the name that is not ours
    /// (see `Shared::cached_session`).
    pub fn names_another_session(&self, cookie_value: &[u8], handle: &Handle) -> bool {
        self.open(cookie_value)
            .is_some_and(|opening| opening.handle != *handle)
    }

    /// The session behind a cookie value. Anything but a live session sealed by this key ring for
    /// this cookie name is `Ok(None)`; only an unreachable store is an error.
    ///
    /// The session comes without its `id_token`, which no proxied request needs and which is
    /// the largest part of it: what the cache holds stays small. [`Sessions::reload`] reads it
    /// (logout, refresh), and a write through this value keeps the stored one.
    pub async fn load(
        &self,
        cookie_value: &(impl AsRef<[u8]> + ?Sized),
        now: u64,
    ) -> Result<Option<OpenSession>, StoreError> {
        match self.load_cached(cookie_value, now) {
            Cached::Known(loaded) => Ok(loaded),
            Cached::Ask(stored) => self.load_stored(stored, now).await,
        }
    }

    /// [`Sessions::load`] as far as it goes without the store: the answer when the cookie opens
    /// nothing or the cache holds its session, else what the store is to be asked for
    /// ([`Sessions::load_stored`]). Not a future: a request whose session is cached writes
    /// nothing of its loading into its own future's state, which at a few hundred connections
    /// is memory the caches no longer hold.
    pub fn load_cached(&self, cookie_value: &(impl AsRef<[u8]> + ?Sized), now: u64) -> Cached {
        let Some(opening) = self.open(cookie_value.as_ref()) else {
            return Cached::Known(None);
        };
        let (stamp, stale) = match self.cache.as_ref().map(|cache| cache.get_key(opening.key)) {
            Some(Lookup::Hit(version, session)) => {
                return Cached::Known(self.open_session(opening, version, session, now));
            }
            Some(Lookup::Miss(stamp)) => (Some(stamp), None),
            Some(Lookup::Stale(stamp, version, session)) => (Some(stamp), Some((version, session))),
            None => (None, None),
        };
        Cached::Ask(Stored {
            opening,
            stamp,
            stale,
        })
    }

    /// The loaded session, if it has time left.
    fn open_session(
        &self,
        opening: Opening,
        version: u64,
        session: Arc<Session>,
        now: u64,
    ) -> Option<OpenSession> {
        let live = self.seconds_left(&session, now) > 0;
        live.then(|| OpenSession {
            session,
            version,
            handle: opening.handle,
            reseal: opening.stale_key,
            ticket: opening.ticket,
            complete: false,
        })
    }

    /// The rest of [`Sessions::load`] for a session the cache did not hold: read from the store,
    /// and filed in the cache under the miss's stamp. A copy the cache held past its time to
    /// live costs only a read of the record's version when the record has not changed since
    /// (session records are created once, under a random key): no transfer and decryption of
    /// the whole record, which with many active sessions is most of what the store reads cost.
    pub async fn load_stored(
        &self,
        Stored {
            opening,
            stamp,
            stale,
        }: Stored,
        now: u64,
    ) -> Result<Option<OpenSession>, StoreError> {
        let key = opening.ticket.key();
        let name = key.name();
        if let Some((version, session)) = stale {
            match self.store.version(&name).await? {
                Some(now_at) if now_at == version => {
                    if let (Some(cache), Some(stamp)) = (&self.cache, stamp) {
                        cache.renew(stamp, version);
                    }
                    return Ok(self.open_session(opening, version, session, now));
                }
                None => {
                    if let (Some(cache), Some(stamp)) = (&self.cache, stamp) {
                        cache.drop_stale(stamp);
                    }
                    return Ok(None);
                }
                Some(_) => {}
            }
        }
        let Opening {
            ticket,
            handle,
            key: _,
            stale_key,
        } = opening;
        let Some(record) = self.store.get(&name).await? else {
            return Ok(None);
        };
        let Some(mut session) = decode_session(&ticket, &key, &record.value) else {
            return Ok(None);
        };
        // Never cached: a session served from the cache is the configured issuer's.
        if !self.ours(session.issuer.as_deref()) {
            self.end_foreign(&key, &session).await;
            return Ok(None);
        }
        session.id_token = None;
        let session = Arc::new(session);
        if let (Some(cache), Some(stamp)) = (&self.cache, stamp) {
            cache.put(stamp, record.version, &session);
        }
        if self.seconds_left(&session, now) == 0 {
            return Ok(None);
        }
        Ok(Some(OpenSession {
            session,
            version: record.version,
            handle,
            reseal: stale_key,
            ticket,
            complete: false,
        }))
    }

    /// The whole session (with its `id_token`) as the store holds it now, bypassing the cache:
    /// used where a stale copy would be harmful (before spending a refresh token) and where the
    /// ID token is needed (logout). Not cached: the next [`Sessions::load`] fills the cache.
    pub async fn reload(
        &self,
        loaded: &OpenSession,
        now: u64,
    ) -> Result<Option<OpenSession>, StoreError> {
        let key = loaded.ticket.key();
        let Some(record) = self.store.get(&key.name()).await? else {
            return Ok(None);
        };
        let Some(session) = decode_session(&loaded.ticket, &key, &record.value) else {
            return Ok(None);
        };
        if !self.ours(session.issuer.as_deref()) {
            self.end_foreign(&key, &session).await;
            return Ok(None);
        }
        if self.seconds_left(&session, now) == 0 {
            return Ok(None);
        }
        Ok(Some(OpenSession {
            session: Arc::new(session),
            version: record.version,
            handle: loaded.handle,
            reseal: loaded.reseal,
            ticket: loaded.ticket.clone(),
            complete: true,
        }))
    }

    /// A fresh cookie value for the same session, sealed with the current key.
    pub fn reseal(&self, loaded: &OpenSession) -> Result<String, SealError> {
        self.keyring
            .load()
            .seal(&self.cookie_name, &loaded.ticket.to_bytes())
    }

    /// Writes `updated` if nobody wrote since `loaded` was read (`false`: reload and retry, or the
    /// session has ended). `created_at` and the absolute deadline are kept; `last_seen` becomes
    /// `now`.
    pub async fn save(
        &self,
        loaded: &OpenSession,
        mut updated: Session,
        now: u64,
    ) -> Result<bool, SessionError> {
        updated.created_at = loaded.session.created_at;
        updated.absolute_deadline = loaded.session.absolute_deadline;
        updated.last_seen = now.max(loaded.session.last_seen);
        Ok(self.write(loaded, updated, now).await?.is_some())
    }

    /// Writes `updated` at `loaded`'s version; the session written, or `None` when another
    /// write came first or the session has ended. Through a [`Sessions::load`] without the ID
    /// token, the stored one is kept (read at the same version, so nothing in between is lost).
    async fn write(
        &self,
        loaded: &OpenSession,
        mut updated: Session,
        now: u64,
    ) -> Result<Option<Session>, SessionError> {
        let seconds = self.seconds_left(&updated, now);
        if seconds == 0 {
            return Ok(None);
        }
        let key = loaded.ticket.key();
        if !loaded.complete && updated.id_token.is_none() {
            let current = self.store.get(&key.name()).await?;
            let Some(record) = current.filter(|r| r.version == loaded.version) else {
                self.forget_here(&loaded.handle);
                return Ok(None);
            };
            let Some(stored) = decode_session(&loaded.ticket, &key, &record.value) else {
                return Ok(None);
            };
            updated.id_token = stored.id_token;
        }
        // A session stored before its deadline was gets it now, fixed from here on, and its
        // index entries with it (once per such session).
        let pinned = updated.absolute_deadline.is_none();
        if pinned {
            updated.absolute_deadline = Some(self.absolute_end(&updated));
        }
        self.pin_issuer(&mut updated);
        let record = encode_record(&self.keyring.load(), &loaded.ticket, &key, &updated)?;
        if pinned || updated.sub != loaded.session.sub || updated.sid != loaded.session.sid {
            self.index(&key, &updated, now).await?;
        }
        let ttl = Duration::from_secs(seconds);
        let written = self
            .store
            .compare_and_set_announced(
                &key.name(),
                loaded.version,
                &record,
                ttl,
                INVALIDATION_CHANNEL,
                &loaded.handle,
            )
            .await;
        // Also on a failed answer, which may hide a write carried out (its reply lost).
        self.forget_here(&loaded.handle);
        Ok(written?.then_some(updated))
    }

    /// Whether [`Sessions::touch`] would write: a tenth of the idle time has passed since
    /// `last_seen`. Asked first, the request of a session not due writes no future for it.
    pub fn touch_due(&self, loaded: &OpenSession, now: u64) -> bool {
        now.saturating_sub(loaded.session.last_seen)
            .saturating_mul(10)
            >= self.idle
    }

    /// Slides the idle timeout. Writes only when a tenth of the idle time has passed since
    /// `last_seen`; then updates `loaded` and returns `true`. `false` also when another request
    /// wrote first (which slid the timeout too).
    pub async fn touch(&self, loaded: &mut OpenSession, now: u64) -> Result<bool, SessionError> {
        if !self.touch_due(loaded, now) {
            return Ok(false);
        }
        let mut updated = Session::clone(&loaded.session);
        updated.last_seen = now;
        let Some(written) = self.write(loaded, updated, now).await? else {
            return Ok(false);
        };
        loaded.session = Arc::new(written);
        loaded.version = loaded.version.saturating_add(1);
        loaded.complete = true;
        Ok(true)
    }

    /// Drops the copy cached here. Every other instance drops its copy on the message that the
    /// store publishes in the same step as the write or delete (its `*_announced` operations):
    /// a change never goes unannounced, not when the connection or this process is lost just
    /// after it, and one carried out late (its answer lost) announces itself when it is.
    fn forget_here(&self, handle: &str) {
        if let Some(cache) = &self.cache {
            cache.remove(handle);
        }
    }

    /// Ends this session (logout).
    pub async fn delete(&self, loaded: &OpenSession) -> Result<(), StoreError> {
        let key = loaded.ticket.key();
        self.end(&key).await?;
        self.unindex(loaded).await
    }

    /// Holds the session's refresh lease — the one every replica's refresh holds while it spends
    /// the refresh token and saves the answer — so that no refresh saves while the caller (a
    /// logout) reads and ends the session: one under way is waited for (the refresh token it
    /// rotated is then read, and revoked by the logout), and none starts. `None` when it cannot
    /// be had within `within` (a refresh stalled at the provider or lost its lease), or when the
    /// store refused to take it (an out-of-memory Redis refuses what adds data but still
    /// deletes): the caller goes on without it. Any other store failure is an error: the store
    /// cannot end the session now.
    pub async fn hold_refreshes(
        &self,
        loaded: &OpenSession,
        within: Duration,
    ) -> Result<Option<RefreshHold>, StoreError> {
        let Ok(token) = crate::session::seal::random::<16>() else {
            return Ok(None);
        };
        let token = hex::encode(token);
        let key = self.refresh_lock_key(loaded);
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.store.try_lock(&key, &token, HOLD_LEASE).await {
                Ok(true) => return Ok(Some(RefreshHold { key, token })),
                Ok(false) if tokio::time::Instant::now() + HOLD_POLL < until => {
                    tokio::time::sleep(HOLD_POLL).await;
                }
                Ok(false) => return Ok(None),
                Err(StoreError::Unavailable(Outage::Refused(error))) => {
                    tracing::warn!(
                        %error,
                        "the store refused the refresh lease; the logout goes on without it"
                    );
                    return Ok(None);
                }
                Err(error) => {
                    // Taken perhaps (its answer lost): let it go; it lasts seconds at most.
                    let _ = self.store.unlock(&key, &token).await;
                    return Err(error);
                }
            }
        }
    }

    /// Lets go of what [`Sessions::hold_refreshes`] held.
    pub async fn let_refreshes_go(&self, hold: RefreshHold) {
        let _ = self.store.unlock(&hold.key, &hold.token).await;
    }

    /// Ends this session if it is still as `loaded` read it (its version); `false` when it was
    /// written since (a refresh saved new tokens: read it again, whose tokens are then the ones
    /// to revoke) or has ended. A logout thus always knows the tokens it ended.
    pub async fn delete_as_read(&self, loaded: &OpenSession) -> Result<bool, StoreError> {
        let key = loaded.ticket.key();
        let handle = key.handle();
        let deleted = self
            .store
            .delete_at_announced(&key.name(), loaded.version, INVALIDATION_CHANNEL, &handle)
            .await;
        // As in `end`: an answer lost may hide a delete carried out.
        self.forget_here(&handle);
        if !deleted? {
            return Ok(false);
        }
        self.unindex(loaded).await?;
        Ok(true)
    }

    /// Takes an ended session out of the indexes of its subject and provider session.
    async fn unindex(&self, loaded: &OpenSession) -> Result<(), StoreError> {
        self.unindex_session(&loaded.session, &loaded.ticket.key().name())
            .await
    }

    /// [`Sessions::unindex`] for `session`, stored as `member`.
    async fn unindex_session(&self, session: &Session, member: &str) -> Result<(), StoreError> {
        self.store
            .index_remove(&index_name(SUBJECT_INDEX, &session.sub), member)
            .await?;
        if let Some(sid) = &session.sid {
            self.store
                .index_remove(&index_name(PROVIDER_INDEX, sid), member)
                .await?;
        }
        Ok(())
    }

    async fn end(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let handle = key.handle();
        let deleted = self
            .store
            .delete_announced(&key.name(), INVALIDATION_CHANNEL, &handle)
            .await;
        // Also when the store failed to answer: the delete may have been carried out (its reply
        // lost), and a copy cached here would then outlive the session.
        self.forget_here(&handle);
        deleted
    }

    /// Ends the session a store name names; `true` if it existed.
    async fn end_member(&self, member: &str) -> Result<bool, StoreError> {
        match StoreKey::parse(member) {
            Some(key) => self.end(&key).await,
            None => Ok(false),
        }
    }

    /// Ends every session in an index (and in its old-format set); returns how many existed.
    /// The entry of a session not there stays: it may be a login between its two writes, which
    /// must stay reachable by its user; a stale one goes at its deadline or the user's next login.
    async fn end_index(&self, index: &str, old: &str) -> Result<usize, StoreError> {
        let mut ended = 0;
        for (member, _) in self.store.index_members(index).await? {
            if self.of_another_issuer(&member).await? {
                continue;
            }
            if self.end_member(&member).await? {
                ended += 1;
                self.store.index_remove(index, &member).await?;
            }
        }
        for member in self.store.old_index_members(old).await? {
            if self.of_another_issuer(&member).await? {
                continue;
            }
            if self.end_member(&member).await? {
                ended += 1;
                self.store.old_index_remove(old, &member).await?;
            }
        }
        Ok(ended)
    }

    /// Back-channel logout by provider session id.
    pub async fn end_by_sid(&self, sid: &str) -> Result<usize, StoreError> {
        let old = index_name(OLD_PROVIDER_INDEX, sid);
        self.end_index(&index_name(PROVIDER_INDEX, sid), &old).await
    }

    /// Back-channel logout naming a provider session: the subject's sessions stored without
    /// one (their provider named none at login, so any of them may be that provider session),
    /// never a session that belongs to another provider session. A session whose listing data
    /// does not open, or was written before the mark, is ended: a logout is never lost.
    pub async fn end_sidless_by_sub(&self, sub: &str) -> Result<usize, StoreError> {
        let keyring = self.keyring.load();
        let mut ended = 0;
        for member in self.members_of(sub).await? {
            let Some(key) = StoreKey::parse(&member) else {
                continue;
            };
            let Some(record) = self.store.get(&member).await? else {
                continue;
            };
            let meta = decode_meta(&keyring, &key, &record.value);
            if meta
                .as_ref()
                .is_some_and(|meta| !self.ours(meta.issuer.as_deref()))
            {
                continue;
            }
            let in_provider_session = meta.and_then(|meta| meta.provider_session).unwrap_or(false);
            if !in_provider_session && self.end(&key).await? {
                ended += 1;
                self.unindex_member(sub, &member).await?;
            }
        }
        Ok(ended)
    }

    /// Back-channel logout by subject, or "sign out everywhere".
    pub async fn end_by_sub(&self, sub: &str) -> Result<usize, StoreError> {
        let old = index_name(OLD_SUBJECT_INDEX, sub);
        self.end_index(&index_name(SUBJECT_INDEX, sub), &old).await
    }

    /// Takes an ended session out of `sub`'s index and old-format set.
    async fn unindex_member(&self, sub: &str, member: &str) -> Result<(), StoreError> {
        self.store
            .index_remove(&index_name(SUBJECT_INDEX, sub), member)
            .await?;
        self.store
            .old_index_remove(&index_name(OLD_SUBJECT_INDEX, sub), member)
            .await
    }

    /// The store names of `sub`'s sessions, in its index and its old-format set, each once.
    async fn members_of(&self, sub: &str) -> Result<Vec<String>, StoreError> {
        let index = index_name(SUBJECT_INDEX, sub);
        let old = index_name(OLD_SUBJECT_INDEX, sub);
        let mut members: Vec<String> = (self.store.index_members(&index).await?)
            .into_iter()
            .map(|(member, _)| member)
            .chain(self.store.old_index_members(&old).await?)
            .collect();
        members.sort_unstable();
        members.dedup();
        Ok(members)
    }

    /// The user's live sessions, most recently seen first. Removes no index entry: one whose
    /// session is missing may be a login between its two writes (see [`Sessions::end_index`]).
    pub async fn list_for_sub(
        &self,
        sub: &str,
        now: u64,
    ) -> Result<Vec<SessionSummary>, StoreError> {
        let keyring = self.keyring.load();
        let mut out = Vec::new();
        for member in self.members_of(sub).await? {
            let Some(key) = StoreKey::parse(&member) else {
                continue;
            };
            let Some(record) = self.store.get(&member).await? else {
                continue;
            };
            let Some(meta) = decode_meta(&keyring, &key, &record.value) else {
                continue;
            };
            if !self.ours(meta.issuer.as_deref()) {
                continue;
            }
            let probe = Session {
                created_at: meta.created_at,
                last_seen: meta.last_seen,
                absolute_deadline: meta.absolute_deadline,
                ..Session::default()
            };
            if self.seconds_left(&probe, now) > 0 {
                out.push(SessionSummary {
                    handle: key.handle(),
                    created_at: meta.created_at,
                    last_seen: meta.last_seen,
                    user_agent: meta.user_agent,
                });
            }
        }
        out.sort_by(|a, b| {
            b.last_seen
                .cmp(&a.last_seen)
                .then_with(|| a.handle.cmp(&b.handle))
        });
        Ok(out)
    }

    /// Ends one of `sub`'s sessions by handle; `false` if `sub` has no such session.
    pub async fn end_by_handle(&self, sub: &str, handle: &str) -> Result<bool, StoreError> {
        for member in self.members_of(sub).await? {
            let Some(key) = StoreKey::parse(&member) else {
                continue;
            };
            if key.handle() == handle {
                if self.of_another_issuer(&member).await? {
                    return Ok(false);
                }
                let existed = self.end(&key).await?;
                self.unindex_member(sub, &member).await?;
                return Ok(existed);
            }
        }
        Ok(false)
    }
}

/// How many entries a session's indexes hold once it is added ([`Sessions::index`]).
#[derive(Clone, Copy)]
struct Held {
    subject: u64,
    provider: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
