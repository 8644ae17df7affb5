use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;
use crate::session::model::{AccessToken, TokenMap};
use crate::session::store::MemoryStore;

const NAME: &str = "__Host-vestibule";
const T0: u64 = 1_700_000_000;
const IDLE: u64 = 1800;
const ABSOLUTE: u64 = 12 * 3600;

fn settings(keys: &[u8], cache_ttl: Duration) -> SessionSettings {
    SessionSettings {
        cookie_name: NAME.into(),
        idle_timeout: Duration::from_secs(IDLE),
        absolute_timeout: Duration::from_secs(ABSOLUTE),
        keyring: Keyring::new(keys.iter().map(|b| [*b; 32]).collect()).unwrap(),
        cache_ttl,
        cache_entries: crate::config::DEFAULT_CACHE_ENTRIES,
        max_per_user: crate::config::DEFAULT_MAX_PER_USER,
        issuer: ISSUER.into(),
    }
}

const ISSUER: &str = "https://idp.example";

fn sessions() -> Sessions {
    Sessions::new(
        settings(&[1], Duration::ZERO),
        Store::Memory(MemoryStore::new(1000)),
    )
}

fn user(sub: &str, sid: Option<&str>) -> Session {
    let mut tokens = TokenMap::default();
    tokens.insert(
        String::new(),
        AccessToken {
            value: "access-token-value".into(),
            expires_at: T0 + 300,
            issued_at: 0,
            scope: None,
            jkt: None,
        },
    );
    Session {
        sub: sub.into(),
        sid: sid.map(Into::into),
        refresh_token: Some("refresh-token-value".into()),
        user_agent: Some("TestBrowser/1".into()),
        tokens,
        ..Session::default()
    }
}

fn flip(cookie: &str, index: usize) -> String {
    let mut raw = URL_SAFE_NO_PAD.decode(cookie).unwrap();
    raw[index] ^= 1;
    URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn created_session_loads_with_its_tokens_and_times() {
    let s = sessions();
    let (cookie, created) = s.create(user("alice", Some("sid-1")), T0).await.unwrap();
    let loaded = s.load(&cookie, T0 + 5).await.unwrap().unwrap();
    assert_eq!(loaded.session, created.session);
    assert_eq!(
        (loaded.session.created_at, loaded.session.last_seen),
        (T0, T0)
    );
    assert_eq!(
        loaded.session.tokens.get("").unwrap().value,
        "access-token-value"
    );
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.handle, created.handle);
    assert!(!loaded.reseal);
}

#[tokio::test]
async fn every_create_issues_a_new_id() {
    let s = sessions();
    let (a, la) = s.create(user("alice", None), T0).await.unwrap();
    let (b, lb) = s.create(user("alice", None), T0).await.unwrap();
    assert_ne!(a, b);
    assert_ne!(la.handle, lb.handle);
}

#[tokio::test]
async fn tampered_cookie_is_no_session() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let len = URL_SAFE_NO_PAD.decode(&cookie).unwrap().len();
    for i in 0..len {
        assert!(
            s.load(&flip(&cookie, i), T0).await.unwrap().is_none(),
            "byte {i}"
        );
    }
}

#[tokio::test]
async fn truncated_cookie_is_no_session() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    for len in 0..cookie.len() {
        assert!(
            s.load(&cookie[..len], T0).await.unwrap().is_none(),
            "length {len}"
        );
    }
}

#[tokio::test]
async fn cookie_sealed_with_a_wrong_key_is_no_session() {
    let store = Store::Memory(MemoryStore::new(100));
    let ours = Sessions::new(settings(&[1], Duration::ZERO), store.clone());
    let theirs = Sessions::new(settings(&[9], Duration::ZERO), store);
    let (cookie, _) = theirs.create(user("mallory", None), T0).await.unwrap();
    assert!(ours.load(&cookie, T0).await.unwrap().is_none());
}

#[tokio::test]
async fn foreign_cookie_with_the_same_name_is_no_session() {
    let s = sessions();
    let keyring = Keyring::new(vec![[1; 32]]).unwrap();
    // Right key and name, but not a ticket (another feature's cookie, or a forged id).
    for plaintext in [&b""[..], b"short", &[0u8; 63], &[0u8; 65], &[0u8; 64]] {
        let foreign = keyring.seal(NAME, plaintext).unwrap();
        assert!(s.load(&foreign, T0).await.unwrap().is_none());
    }
    // A real ticket sealed under another cookie name (e.g. the login-state cookie).
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let ticket = keyring.open(NAME, &cookie).unwrap().plaintext;
    let renamed = keyring.seal("__Host-vestibule-login", &ticket).unwrap();
    assert!(s.load(&renamed, T0).await.unwrap().is_none());
}

#[tokio::test]
async fn unknown_version_is_no_session() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(&cookie).unwrap();
    raw[0] = 2;
    assert!(
        s.load(&URL_SAFE_NO_PAD.encode(raw), T0)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn huge_or_garbage_cookie_is_no_session_and_never_panics() {
    let s = sessions();
    let huge = "A".repeat(1 << 16);
    for value in [
        "", " ", "=", "a=b; c=d", "\u{fffd}", "..", &huge, "%00%00", "AAAA",
    ] {
        assert!(s.load(value, T0).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn deleted_session_is_no_session() {
    let s = sessions();
    let (cookie, loaded) = s.create(user("alice", Some("sid-1")), T0).await.unwrap();
    s.delete(&loaded).await.unwrap();
    assert!(s.load(&cookie, T0).await.unwrap().is_none());
    assert!(s.list_for_sub("alice", T0).await.unwrap().is_empty());
}

#[tokio::test]
async fn idle_session_expires() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    assert!(s.load(&cookie, T0 + IDLE - 1).await.unwrap().is_some());
    assert!(s.load(&cookie, T0 + IDLE).await.unwrap().is_none());
}

#[tokio::test]
async fn touch_slides_the_idle_timeout_but_not_past_the_absolute_one() {
    let s = sessions();
    let (cookie, mut loaded) = s.create(user("alice", None), T0).await.unwrap();
    assert!(
        !s.touch(&mut loaded, T0 + IDLE / 10 - 1).await.unwrap(),
        "too soon to write"
    );
    assert_eq!(loaded.version, 1);
    let mut now = T0;
    while now + IDLE / 2 < T0 + ABSOLUTE {
        now += IDLE / 2;
        let mut current = s.load(&cookie, now).await.unwrap().unwrap();
        assert!(s.touch(&mut current, now).await.unwrap());
        assert_eq!(current.session.last_seen, now);
    }
    assert!(s.load(&cookie, T0 + ABSOLUTE - 1).await.unwrap().is_some());
    assert!(s.load(&cookie, T0 + ABSOLUTE).await.unwrap().is_none());
    assert_eq!(s.expires_in(&loaded.session, T0), Duration::from_secs(IDLE));
}

#[tokio::test]
async fn save_fails_when_someone_else_wrote_first() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let first = s.load(&cookie, T0 + 1).await.unwrap().unwrap();
    let second = s.load(&cookie, T0 + 1).await.unwrap().unwrap();
    let mut a = first.session.as_ref().clone();
    a.refresh_token = Some("rotated-by-a".into());
    let mut b = second.session.as_ref().clone();
    b.refresh_token = Some("rotated-by-b".into());
    assert!(s.save(&first, a, T0 + 2).await.unwrap());
    assert!(!s.save(&second, b, T0 + 2).await.unwrap());
    let now = s.load(&cookie, T0 + 3).await.unwrap().unwrap();
    assert_eq!(now.session.refresh_token.as_deref(), Some("rotated-by-a"));
    assert_eq!(
        (now.version, now.session.created_at, now.session.last_seen),
        (2, T0, T0 + 2)
    );
}

#[tokio::test]
async fn save_after_delete_or_expiry_writes_nothing() {
    let s = sessions();
    let (cookie, loaded) = s.create(user("alice", None), T0).await.unwrap();
    assert!(
        !s.save(&loaded, loaded.session.as_ref().clone(), T0 + ABSOLUTE)
            .await
            .unwrap()
    );
    s.delete(&loaded).await.unwrap();
    assert!(
        !s.save(&loaded, loaded.session.as_ref().clone(), T0 + 1)
            .await
            .unwrap()
    );
    assert!(s.load(&cookie, T0 + 1).await.unwrap().is_none());
}

#[tokio::test]
async fn old_key_cookie_loads_and_asks_for_reseal() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    s.replace_keyring(Keyring::new(vec![[2; 32], [1; 32]]).unwrap());
    let loaded = s.load(&cookie, T0).await.unwrap().unwrap();
    assert!(loaded.reseal);
    let fresh = s.reseal(&loaded).unwrap();
    let again = s.load(&fresh, T0).await.unwrap().unwrap();
    assert!(!again.reseal);
    assert_eq!(again.handle, loaded.handle);
    assert_eq!(
        s.list_for_sub("alice", T0).await.unwrap().len(),
        1,
        "meta sealed with the old key"
    );
    s.replace_keyring(Keyring::new(vec![[2; 32]]).unwrap());
    assert!(s.load(&cookie, T0).await.unwrap().is_none(), "retired key");
    assert!(s.load(&fresh, T0).await.unwrap().is_some());
}

#[tokio::test]
async fn end_by_sid_ends_only_that_provider_session() {
    let s = sessions();
    let (a, _) = s.create(user("alice", Some("sid-1")), T0).await.unwrap();
    let (b, _) = s.create(user("alice", Some("sid-2")), T0).await.unwrap();
    let (c, _) = s
        .create(user("bob", Some("sid-1-other")), T0)
        .await
        .unwrap();
    assert_eq!(s.end_by_sid("sid-1").await.unwrap(), 1);
    assert!(s.load(&a, T0).await.unwrap().is_none());
    assert!(s.load(&b, T0).await.unwrap().is_some());
    assert!(s.load(&c, T0).await.unwrap().is_some());
    assert_eq!(s.end_by_sid("sid-1").await.unwrap(), 0);
    assert_eq!(s.end_by_sid("unknown").await.unwrap(), 0);
}

#[tokio::test]
async fn end_by_sub_ends_every_session_of_the_user() {
    let s = sessions();
    let (a, _) = s.create(user("alice", Some("sid-1")), T0).await.unwrap();
    let (b, _) = s.create(user("alice", None), T0).await.unwrap();
    let (c, _) = s.create(user("bob", None), T0).await.unwrap();
    assert_eq!(s.end_by_sub("alice").await.unwrap(), 2);
    assert!(s.load(&a, T0).await.unwrap().is_none());
    assert!(s.load(&b, T0).await.unwrap().is_none());
    assert!(s.load(&c, T0).await.unwrap().is_some());
    assert_eq!(
        s.end_by_sid("sid-1").await.unwrap(),
        0,
        "stale sid index entry is harmless"
    );
}

#[tokio::test]
async fn list_for_sub_shows_the_users_live_sessions_newest_first() {
    let s = sessions();
    let (_, old) = s.create(user("alice", None), T0).await.unwrap();
    let mut newer = user("alice", None);
    newer.user_agent = Some("Phone/2".into());
    let (_, new) = s.create(newer, T0 + 60).await.unwrap();
    s.create(user("bob", None), T0).await.unwrap();
    let list = s.list_for_sub("alice", T0 + 61).await.unwrap();
    let handles: Vec<_> = list.iter().map(|x| x.handle.as_str()).collect();
    assert_eq!(handles, [&*new.handle, &*old.handle]);
    assert_eq!(list[0].user_agent.as_deref(), Some("Phone/2"));
    assert_eq!((list[1].created_at, list[1].last_seen), (T0, T0));
    let later = s.list_for_sub("alice", T0 + IDLE).await.unwrap();
    assert_eq!(later.len(), 1, "the idle one is not listed");
}

#[tokio::test]
async fn end_by_handle_only_reaches_the_users_own_sessions() {
    let s = sessions();
    let (alice, a) = s.create(user("alice", None), T0).await.unwrap();
    let (bob, b) = s.create(user("bob", None), T0).await.unwrap();
    assert!(!s.end_by_handle("alice", &b.handle).await.unwrap());
    assert!(s.load(&bob, T0).await.unwrap().is_some());
    assert!(!s.end_by_handle("alice", "not-a-handle").await.unwrap());
    assert!(s.end_by_handle("alice", &a.handle).await.unwrap());
    assert!(s.load(&alice, T0).await.unwrap().is_none());
}

#[tokio::test]
async fn every_end_and_update_publishes_the_handle_not_the_id() {
    let s = sessions();
    let mut events = s.subscribe_invalidations();
    let (cookie, loaded) = s.create(user("alice", Some("sid-1")), T0).await.unwrap();
    assert!(
        s.save(&loaded, loaded.session.as_ref().clone(), T0 + 1)
            .await
            .unwrap()
    );
    assert_eq!(*events.try_recv().unwrap(), *loaded.handle);
    let keyring = Keyring::new(vec![[1; 32]]).unwrap();
    let ticket = keyring.open(NAME, &cookie).unwrap().plaintext;
    assert!(!loaded.handle.contains(&hex::encode(&ticket[..32])));
    s.end_by_sid("sid-1").await.unwrap();
    assert_eq!(*events.try_recv().unwrap(), *loaded.handle);
}

#[tokio::test]
async fn cached_session_ended_on_another_instance_is_gone_at_once() {
    let store = Store::Memory(MemoryStore::new(100));
    let a = Sessions::new(settings(&[1], Duration::from_secs(60)), store.clone());
    let b = Sessions::new(settings(&[1], Duration::from_secs(60)), store);
    let (cookie, _) = a.create(user("alice", Some("sid-1")), T0).await.unwrap();
    assert!(b.load(&cookie, T0).await.unwrap().is_some());
    assert!(
        b.load(&cookie, T0).await.unwrap().is_some(),
        "served from the cache"
    );
    a.end_by_sid("sid-1").await.unwrap();
    assert!(b.load(&cookie, T0).await.unwrap().is_none());
}

/// A read of the store that straddles the session's end (logout on another instance while this
/// one was waiting for the record) must not leave the ended session in this instance's cache:
/// it would be served for the whole cache time to live after the logout.
#[tokio::test]
async fn a_session_ended_while_another_instance_reads_it_is_not_cached_there() {
    let memory = MemoryStore::new(100);
    let store = Store::Memory(memory.clone());
    let a = Arc::new(Sessions::new(
        settings(&[1], Duration::from_secs(60)),
        store.clone(),
    ));
    let b = Sessions::new(settings(&[1], Duration::from_secs(60)), store);
    let (cookie, _) = b.create(user("alice", None), T0).await.unwrap();
    let (has_read, let_go) = memory.hold_next_get();
    let reading = tokio::spawn({
        let (a, cookie) = (a.clone(), cookie.clone());
        async move { a.load(&cookie, T0 + 1).await.unwrap().is_some() }
    });
    has_read.await.unwrap();
    // A has the record in hand; B logs the user out (deletes, publishes the handle).
    let on_b = b.load(&cookie, T0 + 1).await.unwrap().unwrap();
    b.delete(&on_b).await.unwrap();
    let_go.send(()).unwrap();
    // That one request began before the logout and may see the session; none after it may.
    let _ = reading.await.unwrap();
    assert!(
        a.load(&cookie, T0 + 2).await.unwrap().is_none(),
        "served from the cache after logout"
    );
}

/// The same on one instance: its own logout lands while another of its requests reads.
#[tokio::test]
async fn a_session_ended_here_while_a_request_reads_it_is_not_cached() {
    let memory = MemoryStore::new(100);
    let s = Arc::new(Sessions::new(
        settings(&[1], Duration::from_secs(60)),
        Store::Memory(memory.clone()),
    ));
    let (cookie, created) = s.create(user("alice", None), T0).await.unwrap();
    let (has_read, let_go) = memory.hold_next_get();
    let reading = tokio::spawn({
        let (s, cookie) = (s.clone(), cookie.clone());
        async move { s.load(&cookie, T0 + 1).await.unwrap().is_some() }
    });
    has_read.await.unwrap();
    s.delete(&created).await.unwrap();
    let_go.send(()).unwrap();
    let _ = reading.await.unwrap();
    assert!(
        s.load(&cookie, T0 + 2).await.unwrap().is_none(),
        "served from the cache after logout"
    );
}

#[tokio::test]
async fn a_session_opened_from_the_memo_is_found_in_the_cache() {
    let store = Store::Memory(MemoryStore::new(100));
    let s = Sessions::new(settings(&[1], Duration::from_secs(60)), store.clone());
    let (cookie, created) = s.create(user("alice", None), T0).await.unwrap();
    // The first load opens the cookie (and remembers it) and fills the cache.
    assert!(s.load(&cookie, T0).await.unwrap().is_some());
    // Gone from the store behind the cache's back (no message): only a cache hit, by the key
    // the memo kept, still finds it.
    assert!(store.delete(&created.ticket.key().name()).await.unwrap());
    let again = s.load(&cookie, T0).await.unwrap();
    assert_eq!(
        again.map(|loaded| loaded.handle),
        Some(created.handle),
        "served from the cache"
    );
}

#[tokio::test]
async fn cached_copy_never_hides_a_newer_version_after_a_conflict() {
    let store = Store::Memory(MemoryStore::new(100));
    let a = Sessions::new(settings(&[1], Duration::from_secs(60)), store.clone());
    let b = Sessions::new(settings(&[1], Duration::from_secs(60)), store);
    let (cookie, _) = a.create(user("alice", None), T0).await.unwrap();
    let on_b = b.load(&cookie, T0).await.unwrap().unwrap();
    let on_a = a.load(&cookie, T0).await.unwrap().unwrap();
    assert!(
        a.save(&on_a, on_a.session.as_ref().clone(), T0 + 1)
            .await
            .unwrap()
    );
    assert!(
        !b.save(&on_b, on_b.session.as_ref().clone(), T0 + 1)
            .await
            .unwrap()
    );
    assert_eq!(b.load(&cookie, T0 + 1).await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn debug_output_of_loaded_sessions_shows_no_secret() {
    let s = sessions();
    let (cookie, loaded) = s
        .create(user("alice", Some("provider-sid")), T0)
        .await
        .unwrap();
    let text = format!("{loaded:?} {s:?}");
    for secret in [
        "access-token-value",
        "refresh-token-value",
        "provider-sid",
        cookie.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn loads_leave_the_id_token_in_the_store_and_writes_through_them_keep_it() {
    let s = Sessions::new(
        settings(&[1], Duration::from_secs(60)),
        Store::Memory(MemoryStore::new(100)),
    );
    let mut session = user("alice", None);
    session.id_token = Some("header.payload.signature".into());
    let (cookie, created) = s.create(session, T0).await.unwrap();
    assert!(created.session.id_token.is_some());
    let mut loaded = s.load(&cookie, T0 + IDLE / 2).await.unwrap().unwrap();
    assert_eq!(
        loaded.session.id_token, None,
        "a load (and the cache) holds no ID token: only logout and refresh read it"
    );
    assert!(s.touch(&mut loaded, T0 + IDLE / 2).await.unwrap());
    let cached = s.load(&cookie, T0 + IDLE / 2).await.unwrap().unwrap();
    let mut changed = Session::clone(&cached.session);
    changed.refresh_token = Some("rotated".into());
    assert!(s.save(&cached, changed, T0 + IDLE / 2 + 1).await.unwrap());
    let stale = cached;
    assert!(
        !s.save(&stale, Session::clone(&stale.session), T0 + IDLE)
            .await
            .unwrap(),
        "a write through an outdated load is refused, not merged"
    );
    let full = s.reload(&stale, T0 + IDLE).await.unwrap().unwrap();
    assert_eq!(
        full.session.id_token.as_deref(),
        Some("header.payload.signature"),
        "a touch and a save through loads without the ID token kept the stored one"
    );
    assert_eq!(full.session.refresh_token.as_deref(), Some("rotated"));
    assert_eq!(full.session.last_seen, T0 + IDLE / 2 + 1);
}

// The memo of opened cookies (`memo.rs`) must answer exactly what opening the cookie would.

#[tokio::test]
async fn a_remembered_cookie_follows_key_ring_changes() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let first = s.load(&cookie, T0).await.unwrap().unwrap();
    assert!(!first.reseal);
    assert_eq!(s.memo.len(), 1, "opened once, remembered");
    // The key moves to second place: the same cookie must now ask to be sealed again.
    s.replace_keyring(Keyring::new(vec![[2; 32], [1; 32]]).unwrap());
    let again = s.load(&cookie, T0).await.unwrap().unwrap();
    assert!(
        again.reseal,
        "a remembered opening hid the key's retirement to second place"
    );
    assert_eq!(again.handle, first.handle);
    // The key leaves the ring: the cookie must stop working at once.
    s.replace_keyring(Keyring::new(vec![[2; 32]]).unwrap());
    assert!(
        s.load(&cookie, T0).await.unwrap().is_none(),
        "a remembered opening outlived its key"
    );
}

#[tokio::test]
async fn cookies_that_do_not_open_are_never_remembered() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    for bad in [
        flip(&cookie, 20),
        flip(&cookie, 40),
        cookie[..cookie.len() - 2].to_string(),
        format!("{cookie}A"),
        "x".repeat(200),
    ] {
        assert!(s.load(&bad, T0).await.unwrap().is_none());
    }
    assert_eq!(s.memo.len(), 0);
    // With the real cookie remembered, its neighbours still do not open.
    assert!(s.load(&cookie, T0).await.unwrap().is_some());
    assert!(s.load(&flip(&cookie, 20), T0).await.unwrap().is_none());
    assert!(
        s.load(&cookie[..cookie.len() - 1], T0)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.memo.len(), 1);
}

#[tokio::test]
async fn a_remembered_cookie_of_an_ended_session_opens_nothing() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let loaded = s.load(&cookie, T0).await.unwrap().unwrap();
    s.delete(&loaded).await.unwrap();
    assert!(s.load(&cookie, T0).await.unwrap().is_none());
}

#[tokio::test]
async fn each_worker_remembers_on_its_own() {
    let s = sessions();
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    let worker = s.for_worker();
    assert!(worker.load(&cookie, T0).await.unwrap().is_some());
    assert_eq!((worker.memo.len(), s.memo.len()), (1, 0));
    // A key ring swapped on the process-wide manager reaches the worker's memo too.
    s.replace_keyring(Keyring::new(vec![[2; 32]]).unwrap());
    assert!(worker.load(&cookie, T0).await.unwrap().is_none());
}

/// Review 7, C4: `create` writes the index entries first so that a session is never missing
/// from them; but a reader that met an entry whose record was not there yet removed it
/// (`list_for_sub` from the user's other device, or a back-channel logout's `end_index`). The
/// login between its two writes then stored a session that no "sign out everywhere" or
/// back-channel logout by `sub` could reach and that the user's session list never showed.
/// The interleaving is laid out step by step with `create`'s own parts.
#[tokio::test]
async fn a_session_being_created_while_its_user_is_listed_stays_reachable_by_sub() {
    let s = sessions();
    let (_phone, _) = s
        .create(user("alice", Some("sid-phone")), T0)
        .await
        .unwrap();
    // The laptop's login: `create` up to its index writes.
    let mut session = user("alice", Some("sid-laptop"));
    session.created_at = T0;
    session.last_seen = T0;
    let ticket = Ticket::random().unwrap();
    let key = ticket.key();
    s.index(&key, &session, T0).await.unwrap();
    // Meanwhile the phone opens "your devices", and a back-channel logout names the laptop's
    // provider session, which has no session here yet.
    assert_eq!(s.list_for_sub("alice", T0).await.unwrap().len(), 1);
    assert_eq!(s.end_by_sid("sid-laptop").await.unwrap(), 0);
    // The laptop's record lands, as `create` goes on.
    let record = encode_record(&s.keyring.load(), &ticket, &key, &session).unwrap();
    assert!(
        s.store
            .put_new(&key.name(), &record, Duration::from_secs(IDLE))
            .await
            .unwrap()
    );
    let laptop = s.keyring.load().seal(NAME, &ticket.to_bytes()).unwrap();
    assert!(s.load(&laptop, T0).await.unwrap().is_some());
    assert_eq!(
        s.list_for_sub("alice", T0).await.unwrap().len(),
        2,
        "the laptop's live session is missing from alice's session list"
    );
    assert_eq!(s.end_by_sid("sid-laptop").await.unwrap(), 1);
    assert!(s.load(&laptop, T0).await.unwrap().is_none());
}

/// The same race with a logout of every session of the user.
#[tokio::test]
async fn a_session_being_created_while_its_user_is_signed_out_everywhere_stays_reachable() {
    let s = sessions();
    let mut session = user("alice", None);
    session.created_at = T0;
    session.last_seen = T0;
    let ticket = Ticket::random().unwrap();
    let key = ticket.key();
    s.index(&key, &session, T0).await.unwrap();
    assert_eq!(s.end_by_sub("alice").await.unwrap(), 0);
    let record = encode_record(&s.keyring.load(), &ticket, &key, &session).unwrap();
    let ttl = Duration::from_secs(IDLE);
    assert!(s.store.put_new(&key.name(), &record, ttl).await.unwrap());
    let laptop = s.keyring.load().seal(NAME, &ticket.to_bytes()).unwrap();
    s.end_by_sub("alice").await.unwrap();
    assert!(
        s.load(&laptop, T0).await.unwrap().is_none(),
        "a logout of every session of alice left the laptop's signed in"
    );
}

/// And with another login of the same user, which removes the index entries of the user's
/// ended sessions: an entry younger than the idle timeout (and `INDEX_GRACE`) is never taken for
/// one, whether its record is there yet or not.
#[tokio::test]
async fn a_session_being_created_while_its_user_signs_in_elsewhere_stays_reachable() {
    let s = sessions();
    let mut session = user("alice", Some("sid-1"));
    session.created_at = T0;
    session.last_seen = T0;
    let ticket = Ticket::random().unwrap();
    let key = ticket.key();
    s.index(&key, &session, T0).await.unwrap();
    let later = T0 + INDEX_GRACE;
    s.create(user("alice", Some("sid-1")), later).await.unwrap();
    let record = encode_record(&s.keyring.load(), &ticket, &key, &session).unwrap();
    let ttl = Duration::from_secs(IDLE);
    assert!(s.store.put_new(&key.name(), &record, ttl).await.unwrap());
    assert_eq!(s.list_for_sub("alice", later).await.unwrap().len(), 2);
    assert_eq!(s.end_by_sid("sid-1").await.unwrap(), 2);
}

/// Review 6, C1: a user who signs in again and again, each session idling out before the next
/// login (as a daily user's do), had the subject index of back-channel logout and "sign out
/// everywhere" pruned by nothing but a session listing: every login extended the index's time
/// to live and added a member, one stale member per login, forever.
#[tokio::test(start_paused = true)]
async fn the_subject_index_keeps_no_member_of_a_session_long_gone() {
    let s = sessions();
    let mut now = T0;
    for _ in 0..50 {
        s.create(user("alice", Some("sid-1")), now).await.unwrap();
        // The session idles out (store time to live and the session's own clock alike).
        tokio::time::advance(Duration::from_secs(IDLE + 1)).await;
        now += IDLE + 1;
    }
    let (_, live) = s.create(user("alice", Some("sid-1")), now).await.unwrap();
    for index in [
        index_name(SUBJECT_INDEX, "alice"),
        index_name(PROVIDER_INDEX, "sid-1"),
    ] {
        let members = s.store().index_members(&index).await.unwrap();
        assert!(
            members.len() <= 2,
            "one live session, but an index holds {} members (stale ones never pruned); \
             live handle {}",
            members.len(),
            live.handle
        );
    }
}

/// Index entries past their session's absolute deadline (by more than the margin for other
/// replicas' clocks) go when the next one is added, whether or not their records are checked.
#[tokio::test]
async fn index_entries_past_their_absolute_deadline_go_with_the_next_login() {
    let s = sessions();
    s.create(user("alice", None), T0).await.unwrap();
    let later = T0 + ABSOLUTE + PRUNE_MARGIN;
    s.create(user("alice", None), later).await.unwrap();
    let members = s
        .store()
        .index_members(&index_name(SUBJECT_INDEX, "alice"))
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].1, later + ABSOLUTE);
}

/// Review 6, C2: one signed-in subject who signs in again and again (a script replaying silent
/// SSO logins, one account) filled a memory store and evicted every other user's session: the
/// store evicts the session expiring soonest, which is any session a little idle, whoever owns
/// it. The cap on one subject's sessions keeps a flood within them.
#[tokio::test(start_paused = true)]
async fn one_subject_cannot_evict_another_users_session_from_a_memory_store() {
    let s = Sessions::new(
        settings(&[1], Duration::ZERO),
        Store::Memory(MemoryStore::new(100)),
    );
    let (victim, _) = s.create(user("alice", None), T0).await.unwrap();
    // Alice read something a minute ago; her session has 29 minutes left.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..100 {
        s.create(user("mallory", None), T0 + 60).await.unwrap();
    }
    assert!(
        s.load(&victim, T0 + 61).await.unwrap().is_some(),
        "mallory's own logins signed alice out"
    );
}

/// A login beyond `max_per_user` ends that subject's oldest sessions, and only theirs.
#[tokio::test]
async fn a_login_beyond_max_per_user_ends_the_users_oldest_session() {
    let mut settings = settings(&[1], Duration::ZERO);
    settings.max_per_user = 3;
    let s = Sessions::new(settings, Store::Memory(MemoryStore::new(1000)));
    let (other, _) = s.create(user("bob", None), T0).await.unwrap();
    let mut cookies = Vec::new();
    for i in 0..5 {
        let (cookie, _) = s
            .create(user("alice", Some("sid-1")), T0 + i)
            .await
            .unwrap();
        cookies.push(cookie);
    }
    let mut signed_in = Vec::new();
    for cookie in &cookies {
        signed_in.push(s.load(cookie, T0 + 5).await.unwrap().is_some());
    }
    assert_eq!(signed_in, [false, false, true, true, true]);
    assert_eq!(s.list_for_sub("alice", T0 + 5).await.unwrap().len(), 3);
    assert!(s.load(&other, T0 + 5).await.unwrap().is_some());
    let index = index_name(SUBJECT_INDEX, "alice");
    assert_eq!(s.store().index_members(&index).await.unwrap().len(), 3);
}

/// Deadlines are whole seconds, so logins within one second tie: the login that runs over the
/// cap never ends itself (with ties ranked by store name it would, one time in two here). A
/// login ends only sessions ranked before it (two at once must not end each other), so
/// same-second logins may stay over the cap until the next login in a later second.
#[tokio::test]
async fn a_login_beyond_max_per_user_in_the_same_second_keeps_the_new_session() {
    let mut settings = settings(&[1], Duration::ZERO);
    settings.max_per_user = 1;
    let s = Sessions::new(settings, Store::Memory(MemoryStore::new(1000)));
    for _ in 0..20 {
        let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
        assert!(
            s.load(&cookie, T0).await.unwrap().is_some(),
            "a login ended its own new session"
        );
    }
    let (last, _) = s.create(user("alice", None), T0 + 1).await.unwrap();
    assert!(s.load(&last, T0 + 1).await.unwrap().is_some());
    assert_eq!(s.list_for_sub("alice", T0 + 1).await.unwrap().len(), 1);
}

// ---- indexes that never lose a live session, and the cap ----

/// In a memory store the index members have a bound of their own and a full part
/// evicts the member expiring soonest, the oldest login's, whether its session is live or not.
/// A login ended by `max_per_user` leaves its entry in its provider session's index (only the
/// subject's is taken out), so one account signing in again and again (a fresh provider
/// session each time) fills the part and pushes out another user's index entries: her live
/// session can no longer be ended by back-channel logout.
#[tokio::test]
async fn one_account_cannot_push_another_users_session_out_of_back_channel_logout() {
    let mut settings = settings(&[1], Duration::ZERO);
    settings.max_per_user = 3;
    let s = Sessions::new(settings, Store::Memory(MemoryStore::new(20)));
    let (alice, _) = s.create(user("alice", Some("alice-op")), T0).await.unwrap();
    for i in 0..20 {
        let sid = format!("mallory-op-{i}");
        s.create(user("mallory", Some(&sid)), T0 + 1 + i)
            .await
            .unwrap();
    }
    let now = T0 + 30;
    assert!(s.load(&alice, now).await.unwrap().is_some());
    // The provider's back-channel logout for alice's provider session (sid and sub), as
    // `endpoints::backchannel_logout` runs it.
    let ended =
        s.end_by_sid("alice-op").await.unwrap() + s.end_sidless_by_sub("alice").await.unwrap();
    assert!(
        s.load(&alice, now).await.unwrap().is_none(),
        "alice's live session survived her back-channel logout ({ended} ended)"
    );
}

/// The same without any hostile account: sessions that idled out keep their index
/// entries until their absolute deadline, so ordinary logins of other users fill the part of
/// index members and push out the entries of a session still in use.
#[tokio::test]
async fn other_users_logins_cannot_push_a_live_session_out_of_its_index() {
    let s = Sessions::new(
        settings(&[1], Duration::ZERO),
        Store::Memory(MemoryStore::new(20)),
    );
    let (alice, _) = s.create(user("alice", Some("alice-op")), T0).await.unwrap();
    // Ten other users, each with a provider session: 20 index members.
    for i in 0..10 {
        let (sub, sid) = (format!("user-{i}"), format!("op-{i}"));
        s.create(user(&sub, Some(&sid)), T0 + 1).await.unwrap();
    }
    assert!(s.load(&alice, T0 + 2).await.unwrap().is_some());
    s.end_by_sub("alice").await.unwrap();
    assert!(
        s.load(&alice, T0 + 2).await.unwrap().is_none(),
        "\"sign out everywhere\" missed alice's live session"
    );
}

/// Index entries hold the absolute deadline a session got at login. After a restart with a
/// longer `absolute_timeout` (a restart-only key; Redis sessions survive it) an older session
/// that lived on past that deadline would have lost its entries (at its user's next login, or
/// when the Redis index key expires): out of reach of "sign out everywhere" and back-channel
/// logout. It keeps its deadline instead: ended there, and reachable until then.
#[tokio::test]
async fn a_session_keeps_its_absolute_deadline_when_absolute_timeout_grows() {
    let hour = 3600;
    let with_absolute = |absolute: u64| SessionSettings {
        idle_timeout: Duration::from_secs(4 * hour),
        absolute_timeout: Duration::from_secs(absolute),
        ..settings(&[1], Duration::ZERO)
    };
    let store = Store::Memory(MemoryStore::new(1000));
    let before = Sessions::new(with_absolute(hour), store.clone());
    let (laptop, _) = before
        .create(user("alice", Some("op-laptop")), T0)
        .await
        .unwrap();
    // Restart with absolute_timeout 1h -> 2h; the laptop keeps being used.
    let after = Sessions::new(with_absolute(2 * hour), store);
    let past = T0 + hour + 1800;
    assert!(
        after.load(&laptop, past).await.unwrap().is_none(),
        "the laptop's session was served past the deadline its index entries hold"
    );
    let now = T0 + hour - 60;
    let open = after.load(&laptop, now).await.unwrap().unwrap();
    assert_eq!(
        after.expires_in(&open.session, now),
        Duration::from_secs(60)
    );
    after
        .create(user("alice", Some("op-phone")), now)
        .await
        .unwrap();
    assert_eq!(
        after.end_by_sub("alice").await.unwrap(),
        2,
        "sign out everywhere"
    );
    assert!(after.load(&laptop, now).await.unwrap().is_none());
}

/// The members past their deadline were removed against the adding replica's clock. A
/// replica whose clock runs 10 minutes ahead removes the entry of a session that the others
/// (and the store's own expiry) still keep for 5 minutes: a back-channel logout then misses it.
#[tokio::test]
async fn a_replica_with_a_fast_clock_does_not_take_live_sessions_out_of_the_index() {
    let s = Sessions::new(
        SessionSettings {
            idle_timeout: Duration::from_secs(ABSOLUTE),
            ..settings(&[1], Duration::ZERO)
        },
        Store::Memory(MemoryStore::new(1000)),
    );
    let (laptop, _) = s.create(user("alice", Some("op-1")), T0).await.unwrap();
    let true_now = T0 + ABSOLUTE - 300;
    // A login through the replica whose clock is 600 s fast.
    s.create(user("alice", Some("op-2")), true_now + 600)
        .await
        .unwrap();
    assert!(s.load(&laptop, true_now).await.unwrap().is_some());
    s.end_by_sub("alice").await.unwrap();
    assert!(
        s.load(&laptop, true_now).await.unwrap().is_none(),
        "a session with 5 minutes left survived \"sign out everywhere\""
    );
}

/// A login in a browser that already has a session replaces it, so the user's number of
/// sessions does not grow; `create` applied `max_per_user` before the callback deleted the
/// previous one, counting the session about to be replaced, and ended the user's oldest
/// session on another device.
/// Another site can send the browser through `/bff/login` (silent SSO) whenever it likes.
#[tokio::test]
async fn a_login_replacing_the_browsers_own_session_does_not_end_another_device() {
    let mut settings = settings(&[1], Duration::ZERO);
    settings.max_per_user = 2;
    let s = Sessions::new(settings, Store::Memory(MemoryStore::new(1000)));
    let (phone, _) = s.create(user("alice", None), T0).await.unwrap();
    let (laptop, _) = s.create(user("alice", None), T0 + 1).await.unwrap();
    // The laptop's browser goes through a login again, as the callback does it.
    let previous_cookie = laptop.clone();
    let previous = s.load(&laptop, T0 + 2).await.unwrap().unwrap();
    let (laptop, _) = s
        .create_replacing(user("alice", None), T0 + 2, Some(&previous))
        .await
        .unwrap();
    assert!(s.load(&previous_cookie, T0 + 3).await.unwrap().is_none());
    assert!(s.load(&laptop, T0 + 3).await.unwrap().is_some());
    assert!(
        s.load(&phone, T0 + 3).await.unwrap().is_some(),
        "the phone was signed out by a login that replaced the laptop's own session"
    );
}

/// A cached copy past `cache_ttl` is checked against the store's version of the record: the
/// same version is the same record (every write bumps it), so the copy is kept without reading
/// and decrypting the record again; a changed or deleted record is read (or found gone) as
/// before.
#[tokio::test(start_paused = true)]
async fn an_unchanged_session_past_cache_ttl_costs_a_version_read_not_a_record_read() {
    let memory = MemoryStore::new(100);
    let s = Sessions::new(
        settings(&[1], Duration::from_secs(5)),
        Store::Memory(memory.clone()),
    );
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    assert!(s.load(&cookie, T0).await.unwrap().is_some());
    let reads = memory.record_reads();
    tokio::time::advance(Duration::from_secs(6)).await;
    let again = s.load(&cookie, T0 + 6).await.unwrap().unwrap();
    assert_eq!(again.version, 1);
    assert_eq!(
        memory.record_reads(),
        reads,
        "the record was read again although its version had not changed"
    );
    // Kept for another cache_ttl: the next request asks the store nothing.
    let versions = memory.version_reads();
    assert!(s.load(&cookie, T0 + 7).await.unwrap().is_some());
    assert_eq!(memory.version_reads(), versions, "the copy was not kept");
    assert_eq!(memory.record_reads(), reads);
}

#[tokio::test(start_paused = true)]
async fn a_session_changed_behind_the_cache_is_read_again_past_cache_ttl() {
    let store = Store::Memory(MemoryStore::new(100));
    let s = Sessions::new(settings(&[1], Duration::from_secs(5)), store.clone());
    let (cookie, created) = s.create(user("alice", None), T0).await.unwrap();
    assert_eq!(s.load(&cookie, T0).await.unwrap().unwrap().version, 1);
    // Written behind Vestibule's back (no message): the same bytes, the next version.
    let name = created.ticket.key().name();
    let record = store.get(&name).await.unwrap().unwrap();
    let ttl = Duration::from_secs(IDLE);
    assert!(
        store
            .compare_and_set(&name, 1, &record.value, ttl)
            .await
            .unwrap()
    );
    assert_eq!(
        s.load(&cookie, T0 + 1).await.unwrap().unwrap().version,
        1,
        "within cache_ttl the copy is served"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        s.load(&cookie, T0 + 6).await.unwrap().unwrap().version,
        2,
        "past cache_ttl the changed record must be read"
    );
    // Deleted behind its back: gone once the copy is past cache_ttl.
    assert!(store.delete(&name).await.unwrap());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(s.load(&cookie, T0 + 12).await.unwrap().is_none());
    assert!(s.load(&cookie, T0 + 12).await.unwrap().is_none());
}

/// The version read straddles a logout on another instance: the store still had the version
/// when it answered, the message came before the answer was taken in. The copy must not be
/// kept for another cache_ttl.
#[tokio::test(start_paused = true)]
async fn a_session_ended_while_its_version_is_read_is_not_kept() {
    let memory = MemoryStore::new(100);
    let store = Store::Memory(memory.clone());
    let a = Arc::new(Sessions::new(
        settings(&[1], Duration::from_secs(5)),
        store.clone(),
    ));
    let b = Sessions::new(settings(&[1], Duration::from_secs(5)), store);
    let (cookie, _) = b.create(user("alice", None), T0).await.unwrap();
    assert!(a.load(&cookie, T0).await.unwrap().is_some());
    tokio::time::advance(Duration::from_secs(6)).await;
    let (has_read, let_go) = memory.hold_next_get();
    let reading = tokio::spawn({
        let (a, cookie) = (a.clone(), cookie.clone());
        async move { a.load(&cookie, T0 + 6).await.unwrap().is_some() }
    });
    has_read.await.unwrap();
    let on_b = b.load(&cookie, T0 + 6).await.unwrap().unwrap();
    b.delete(&on_b).await.unwrap();
    let_go.send(()).unwrap();
    let _ = reading.await.unwrap();
    assert!(
        a.load(&cookie, T0 + 7).await.unwrap().is_none(),
        "served from the cache after logout"
    );
}

/// A version read that takes long to come back (a stalled node) renews the copy as of when it
/// was sent, not when it came back: cache_ttl after the store was asked, it is asked again.
/// Otherwise an end whose message is lost is served for cache_ttl plus the store's delay.
#[tokio::test(start_paused = true)]
async fn a_copy_renewed_by_a_slow_version_read_is_checked_again_cache_ttl_after_it_was_sent() {
    let memory = MemoryStore::new(100);
    let s = Arc::new(Sessions::new(
        settings(&[1], Duration::from_secs(5)),
        Store::Memory(memory.clone()),
    ));
    let (cookie, _) = s.create(user("alice", None), T0).await.unwrap();
    assert!(s.load(&cookie, T0).await.unwrap().is_some());
    tokio::time::advance(Duration::from_secs(6)).await;
    let versions = memory.version_reads();
    let (has_read, let_go) = memory.hold_next_get();
    let reading = tokio::spawn({
        let (s, cookie) = (s.clone(), cookie.clone());
        async move { s.load(&cookie, T0 + 6).await.unwrap().is_some() }
    });
    has_read.await.unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    let_go.send(()).unwrap();
    assert!(reading.await.unwrap());
    assert_eq!(memory.version_reads(), versions + 1, "a version read");
    // 6 s after the version was read, 2 s after its answer came.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(s.load(&cookie, T0 + 12).await.unwrap().is_some());
    assert_eq!(
        memory.version_reads(),
        versions + 2,
        "served from the cache past cache_ttl since the store was last asked"
    );
}

/// The invalidation channel closes (no message can come again): a session ended on another
/// instance is still served from this one's cache no longer than cache_ttl, then found gone
/// by its version read.
#[tokio::test(start_paused = true)]
async fn an_end_never_announced_is_not_served_past_cache_ttl() {
    let memory = MemoryStore::new(100);
    let store = Store::Memory(memory.clone());
    let a = Sessions::new(settings(&[1], Duration::from_secs(5)), store.clone());
    let b = Sessions::new(settings(&[1], Duration::from_secs(5)), store);
    let (cookie, _) = b.create(user("alice", None), T0).await.unwrap();
    assert!(a.load(&cookie, T0).await.unwrap().is_some());
    memory.close_channel(INVALIDATION_CHANNEL);
    let on_b = b.load(&cookie, T0).await.unwrap().unwrap();
    b.delete(&on_b).await.unwrap();
    assert!(b.load(&cookie, T0).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        a.load(&cookie, T0 + 5).await.unwrap().is_none(),
        "an ended session served past cache_ttl"
    );
}

/// A write on this instance (a touch, a refresh) lands while a stale copy's version is read:
/// the read answered the old version, but the renewal must not bring the old copy back.
#[tokio::test(start_paused = true)]
async fn a_write_here_while_the_version_is_read_is_not_hidden_by_the_renewal() {
    let memory = MemoryStore::new(100);
    let s = Arc::new(Sessions::new(
        settings(&[1], Duration::from_secs(5)),
        Store::Memory(memory.clone()),
    ));
    let (cookie, mut here) = s.create(user("alice", None), T0).await.unwrap();
    assert_eq!(s.load(&cookie, T0).await.unwrap().unwrap().version, 1);
    tokio::time::advance(Duration::from_secs(6)).await;
    let (has_read, let_go) = memory.hold_next_get();
    let reading = tokio::spawn({
        let (s, cookie) = (s.clone(), cookie.clone());
        async move { s.load(&cookie, T0 + 6).await.unwrap().map(|l| l.version) }
    });
    has_read.await.unwrap();
    let now = T0 + IDLE / 10 + 1;
    assert!(s.touch(&mut here, now).await.unwrap());
    let_go.send(()).unwrap();
    assert_eq!(reading.await.unwrap(), Some(1), "answered as read");
    let after = s.load(&cookie, now).await.unwrap().unwrap();
    assert_eq!(
        (after.version, after.session.last_seen),
        (2, now),
        "the copy from before the write was renewed"
    );
}

/// A session another issuer's login made (the store kept across a change of `oidc.issuer`) is
/// none, whether cached or not, and its record ends; one stored before issuers were recorded is
/// the configured issuer's, and records it at its next write.
#[tokio::test]
async fn a_session_of_another_issuer_is_none_and_ends() {
    for cache_ttl in [Duration::ZERO, Duration::from_secs(60)] {
        let store = Store::Memory(MemoryStore::new(1000));
        let before = Sessions::new(
            SessionSettings {
                issuer: "https://old.example".into(),
                ..settings(&[1], cache_ttl)
            },
            store.clone(),
        );
        let mut old = user("alice", Some("sid-1"));
        old.issuer = Some("https://old.example/".into());
        let (cookie, _) = before.create(old, T0).await.unwrap();
        let (legacy, _) = before.create(user("bob", None), T0).await.unwrap();

        let now = Sessions::new(settings(&[1], cache_ttl), store.clone());
        assert!(now.load(&cookie, T0 + 1).await.unwrap().is_none());
        assert!(now.load(&cookie, T0 + 1).await.unwrap().is_none());
        assert!(
            before.load(&cookie, T0 + 1).await.unwrap().is_none(),
            "the record was left"
        );
        assert_eq!(now.end_by_sub("alice").await.unwrap(), 0);

        let mut bob = now.load(&legacy, T0 + 1).await.unwrap().unwrap();
        assert_eq!(bob.session.issuer, None);
        assert!(now.touch(&mut bob, T0 + IDLE).await.unwrap());
        assert_eq!(bob.session.issuer.as_deref(), Some(ISSUER));
        assert!(
            before.load(&legacy, T0 + IDLE).await.unwrap().is_none(),
            "a session written since records the issuer it was written under"
        );
    }
}

/// `max_per_user` counts the configured issuer's sessions of a `sub` only: another issuer's
/// user of the same `sub` (replicas on either side of a change of issuer, one store) is another
/// user, whose session is neither counted nor ended.
#[tokio::test]
async fn the_cap_on_a_users_sessions_passes_another_issuers_by() {
    let store = Store::Memory(MemoryStore::new(1000));
    let other = Sessions::new(
        SessionSettings {
            issuer: "https://old.example".into(),
            ..settings(&[1], Duration::ZERO)
        },
        store.clone(),
    );
    let mut theirs = user("alice", None);
    theirs.issuer = Some("https://old.example".into());
    let (theirs, _) = other.create(theirs, T0).await.unwrap();
    let ours = Sessions::new(
        SessionSettings {
            max_per_user: 2,
            ..settings(&[1], Duration::ZERO)
        },
        store,
    );
    let mut mine = user("alice", None);
    mine.issuer = Some(ISSUER.into());
    let (first, _) = ours.create(mine.clone(), T0 + 1).await.unwrap();
    let (second, _) = ours.create(mine, T0 + 2).await.unwrap();
    assert!(
        other.load(&theirs, T0 + 3).await.unwrap().is_some(),
        "another issuer's alice lost her session to this one's cap"
    );
    for cookie in [&first, &second] {
        assert!(ours.load(cookie, T0 + 3).await.unwrap().is_some());
    }
}
