use super::*;

const MINUTE: Duration = Duration::from_secs(60);
/// The caller's clock (Unix seconds) for index deadlines.
const T0: u64 = 1_700_000_000;

#[tokio::test]
async fn full_store_evicts_the_entry_expiring_soonest() {
    let store = MemoryStore::new(3);
    store.put_new("long", b"1", MINUTE * 10).await.unwrap();
    store.put_new("short", b"2", MINUTE).await.unwrap();
    store.put_new("middle", b"3", MINUTE * 5).await.unwrap();
    store.put_new("new", b"4", MINUTE * 2).await.unwrap();
    assert_eq!(store.len(), 3);
    assert!(store.get("short").await.unwrap().is_none());
    for key in ["long", "middle", "new"] {
        assert!(store.get(key).await.unwrap().is_some(), "{key}");
    }
}

#[tokio::test]
async fn rewriting_a_key_does_not_evict_another() {
    let store = MemoryStore::new(2);
    store.put_new("a", b"1", MINUTE).await.unwrap();
    store.put_new("b", b"1", MINUTE).await.unwrap();
    assert!(store.compare_and_set("a", 1, b"2", MINUTE).await.unwrap());
    assert!(store.touch("b", MINUTE).await.unwrap());
    assert_eq!(store.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_swept_without_being_read() {
    let store = MemoryStore::new(10);
    store
        .put_new("a", b"1", Duration::from_secs(1))
        .await
        .unwrap();
    store
        .remember_once("b", Duration::from_secs(1))
        .await
        .unwrap();
    store.index_add("c", "m", T0 + 1, T0).await.unwrap();
    store.put_new("d", b"1", MINUTE).await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.len(), 1);
    assert_eq!(store.state().members(), 0);
}

#[tokio::test(start_paused = true)]
async fn each_index_member_lives_until_its_own_deadline() {
    let store = MemoryStore::new(10);
    store.index_add("i", "a", T0 + 120, T0).await.unwrap();
    store.index_add("i", "b", T0 + 60, T0).await.unwrap();
    assert_eq!(
        store.index_members("i").await.unwrap(),
        [("b".to_string(), T0 + 60), ("a".to_string(), T0 + 120)],
        "soonest deadline first"
    );
    tokio::time::advance(MINUTE + Duration::from_secs(1)).await;
    assert_eq!(
        store.index_members("i").await.unwrap(),
        [("a".to_string(), T0 + 120)]
    );
}

/// The caller's clock decides too: members past their deadline by it go in the same step as an
/// add, whatever the store's own clock says.
#[tokio::test]
async fn adding_to_an_index_removes_its_members_past_their_deadline() {
    let store = MemoryStore::new(10);
    assert_eq!(store.index_add("i", "old", T0 + 10, T0).await.unwrap(), 1);
    assert_eq!(store.index_add("i", "mid", T0 + 20, T0).await.unwrap(), 2);
    assert_eq!(
        store.index_add("i", "new", T0 + 50, T0 + 20).await.unwrap(),
        1
    );
    assert_eq!(
        store.index_members("i").await.unwrap(),
        [("new".to_string(), T0 + 50)]
    );
}

#[tokio::test]
async fn a_flood_of_markers_never_evicts_sessions_or_locks() {
    let store = MemoryStore::new(3);
    store.put_new("session", b"1", MINUTE).await.unwrap();
    store
        .index_add("index", "session", T0 + 60, T0)
        .await
        .unwrap();
    assert!(
        store
            .try_lock("lock", "me", Duration::from_secs(5))
            .await
            .unwrap()
    );
    // Markers that outlive all three, as login markers outlive a refresh lease.
    for i in 0..100 {
        assert!(
            store
                .remember_once(&format!("login:{i}"), MINUTE * 10)
                .await
                .unwrap()
        );
    }
    assert!(store.get("session").await.unwrap().is_some());
    assert_eq!(store.index_members("index").await.unwrap().len(), 1);
    assert!(!store.try_lock("lock", "other", MINUTE).await.unwrap());
    assert!(store.extend_lock("lock", "me", MINUTE).await.unwrap());
    // The markers are bounded too: the oldest went, the newest are remembered.
    assert_eq!(store.len(), 3 + 3);
    assert!(!store.remember_once("login:99", MINUTE).await.unwrap());
    assert!(store.remember_once("login:0", MINUTE).await.unwrap());
}

/// Review 6, C3: a whole index counted as one entry, whatever its size, so the members of one
/// index were bounded by nothing.
#[tokio::test]
async fn index_members_are_bounded_by_twice_max_entries() {
    let store = MemoryStore::new(10);
    for i in 0..10_000 {
        store
            .index_add("u:one-user", &format!("s:{i:064}"), T0 + 60, T0)
            .await
            .unwrap();
    }
    let held = store.index_members("u:one-user").await.unwrap().len();
    assert!(
        held <= 20,
        "a store of 10 entries holds {held} index members (~{} KiB) in one entry",
        held * 66 / 1024
    );
}

/// Index members have a part of the bound of their own: they outlive the sessions they name
/// (a session's absolute deadline, not its idle one), so in the records' part they would push
/// out live sessions, and sessions would push out the members that let a logout find them.
#[tokio::test]
async fn index_members_and_sessions_never_push_each_other_out() {
    let store = MemoryStore::new(3);
    for i in 0..3 {
        store
            .put_new(&format!("s:{i}"), b"x", MINUTE)
            .await
            .unwrap();
    }
    for i in 0..10 {
        store
            .index_add("u:flood", &format!("s:x{i}"), T0 + 3600, T0)
            .await
            .unwrap();
    }
    for i in 0..3 {
        assert!(store.get(&format!("s:{i}")).await.unwrap().is_some());
    }
    store.index_add("u:one", "s:0", T0 + 30, T0).await.unwrap();
    store.put_new("s:new", b"x", MINUTE * 30).await.unwrap();
    assert_eq!(store.index_members("u:flood").await.unwrap().len(), 5);
    assert_eq!(store.index_members("u:one").await.unwrap().len(), 1);
}

/// A session must never live on without its index entries (back-channel logout and "sign out
/// everywhere" could not reach it): an index member pushed out takes its session with it.
#[tokio::test]
async fn an_index_member_pushed_out_takes_its_session_with_it() {
    let store = MemoryStore::new(1);
    store.put_new("s:a", b"x", MINUTE).await.unwrap();
    store.index_add("u:a", "s:a", T0 + 60, T0).await.unwrap();
    store.index_add("p:a", "s:a", T0 + 60, T0).await.unwrap();
    store.index_add("u:b", "s:b", T0 + 3600, T0).await.unwrap();
    assert!(store.get("s:a").await.unwrap().is_none());
    assert_eq!(store.index_members("u:b").await.unwrap().len(), 1);
}

/// Review 6, C4: a refresh lease, the entry that expires soonest, was the first a full store
/// evicted, so a second refresh could take it while the first was at the provider.
#[tokio::test]
async fn a_held_refresh_lease_is_never_evicted_by_new_sessions() {
    let store = MemoryStore::new(3);
    assert!(
        store
            .try_lock("l:victim", "first", Duration::from_secs(10))
            .await
            .unwrap()
    );
    for i in 0..3 {
        store
            .put_new(&format!("s:{i}"), b"x", MINUTE * 30)
            .await
            .unwrap();
    }
    assert!(
        !store
            .try_lock("l:victim", "second", Duration::from_secs(10))
            .await
            .unwrap(),
        "the lease held by `first` was evicted and taken by `second`"
    );
    assert!(
        store
            .try_lock("l:another", "third", Duration::from_secs(10))
            .await
            .unwrap(),
        "a store full of sessions refuses leases"
    );
}

/// Leases are never evicted, not by other leases either: a full part refuses a new one (its
/// caller waits, as for a lease held) until one is let go.
#[tokio::test]
async fn a_full_part_of_leases_refuses_a_new_one() {
    let store = MemoryStore::new(2);
    let lease = Duration::from_secs(10);
    assert!(store.try_lock("l:a", "a", lease).await.unwrap());
    assert!(store.try_lock("l:b", "b", lease).await.unwrap());
    assert!(!store.try_lock("l:c", "c", lease).await.unwrap());
    assert!(store.extend_lock("l:a", "a", lease).await.unwrap());
    assert!(store.extend_lock("l:b", "b", lease).await.unwrap());
    store.unlock("l:a", "a").await.unwrap();
    assert!(store.try_lock("l:c", "c", lease).await.unwrap());
}

/// A time to live too long for the clock (an operator's `absolute_timeout = "300000000000y"`)
/// is cut to a century instead of panicking the request that stores it.
#[tokio::test]
async fn an_enormous_time_to_live_is_kept_without_panicking() {
    let store = MemoryStore::new(10);
    assert!(store.put_new("k", b"v", Duration::MAX).await.unwrap());
    assert!(
        store
            .compare_and_set("k", 1, b"w", Duration::MAX)
            .await
            .unwrap()
    );
    assert!(store.touch("k", Duration::MAX).await.unwrap());
    assert!(store.remember_once("m", Duration::MAX).await.unwrap());
    assert!(store.try_lock("l", "t", Duration::MAX).await.unwrap());
    assert!(store.extend_lock("l", "t", Duration::MAX).await.unwrap());
    store.index_add("i", "k", u64::MAX, 0).await.unwrap();
    assert_eq!(store.len(), 4);
}

#[tokio::test]
async fn using_a_key_as_the_wrong_kind_is_an_error() {
    let store = MemoryStore::new(10);
    store.index_add("i", "a", T0 + 60, T0).await.unwrap();
    assert!(matches!(store.get("i").await, Err(StoreError::Corrupt(_))));
    store.put_new("r", b"1", MINUTE).await.unwrap();
    assert!(matches!(
        store.index_add("r", "a", T0 + 60, T0).await,
        Err(StoreError::Corrupt(_))
    ));
}
