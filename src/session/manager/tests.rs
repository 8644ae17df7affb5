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
    }
}

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
