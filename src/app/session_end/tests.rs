use super::*;
use crate::clock::TestClock;
use crate::session::manager::{INVALIDATION_CHANNEL, SessionSettings};
use crate::session::model::Session;
use crate::session::seal::Keyring;
use crate::session::store::{MemoryStore, Store};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A future whose polls are counted: each is a wake-up of the task that runs it.
struct Polled<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Polled<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

fn sessions() -> Arc<Sessions> {
    let keyring = Keyring::new(vec![[1; 32]]).unwrap();
    let store = Store::Memory(MemoryStore::new(1000));
    Arc::new(Sessions::new(
        SessionSettings::new("__Host-vestibule", keyring),
        store,
    ))
}

async fn signed_in(sessions: &Sessions, clock: &Clock, sid: &str) -> OpenSession {
    let session = Session {
        sub: "alice".into(),
        sid: Some(sid.into()),
        ..Session::default()
    };
    sessions.create(session, clock.now()).await.unwrap().1
}

/// Sessions in memory, a test clock, and one session in them (`sid-1`).
async fn one_session() -> (Arc<Sessions>, Clock, OpenSession) {
    let sessions = sessions();
    let clock = TestClock::new().clock();
    let loaded = signed_in(&sessions, &clock, "sid-1").await;
    (sessions, clock, loaded)
}

/// [`one_session`] watched by 20 streams (one client's, with one cookie), settled: the
/// sessions, the session's handle, and each watch's end.
async fn watched_twenty_times() -> (Arc<Sessions>, String, Vec<CancellationToken>) {
    let (sessions, clock, loaded) = one_session().await;
    let handle = loaded.handle.to_string();
    let ends = (0..20)
        .map(|_| watch(&sessions, &clock, loaded.clone()).1)
        .collect();
    settle().await;
    (sessions, handle, ends)
}

/// Publishes the invalidation message that names `handle` (`""`: any session may have changed).
async fn invalidate(sessions: &Sessions, handle: &str) {
    sessions
        .store()
        .publish(INVALIDATION_CHANNEL, handle)
        .await
        .unwrap();
}

/// A watch of `loaded`, spawned; its polls and the token it cancels.
fn watch(
    sessions: &Arc<Sessions>,
    clock: &Clock,
    loaded: OpenSession,
) -> (Arc<AtomicUsize>, CancellationToken) {
    let polls = Arc::new(AtomicUsize::new(0));
    let end = CancellationToken::new();
    let watching = close_with_session(
        sessions.clone(),
        clock.clone(),
        Box::new(loaded),
        end.clone(),
        ("a test's stream", false),
        None,
    );
    tokio::spawn(Polled {
        inner: Box::pin(watching),
        polls: polls.clone(),
    });
    (polls, end)
}

/// Two sessions signed in and watched, and then the clock moved past their idle timeout:
/// each watch ends once something has it read its session again.
async fn two_watches_timed_out() -> (
    Arc<Sessions>,
    TestClock,
    CancellationToken,
    CancellationToken,
) {
    let sessions = sessions();
    let test_clock = TestClock::new();
    let clock = test_clock.clock();
    let first = signed_in(&sessions, &clock, "sid-1").await;
    let second = signed_in(&sessions, &clock, "sid-2").await;
    let (_, first) = watch(&sessions, &clock, first);
    let (_, second) = watch(&sessions, &clock, second);
    settle().await;
    test_clock.advance(crate::session::manager::DEFAULT_IDLE_TIMEOUT * 2);
    (sessions, test_clock, first, second)
}

/// Lets every task that can run, run.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

async fn ended(end: &CancellationToken) -> bool {
    tokio::time::timeout(Duration::from_secs(2), end.cancelled())
        .await
        .is_ok()
}

#[tokio::test]
async fn a_watch_sleeps_through_the_invalidations_of_other_sessions() {
    let (sessions, clock, loaded) = one_session().await;
    let own = loaded.handle;
    let (polls, end) = watch(&sessions, &clock, loaded);
    settle().await;
    let before = polls.load(Ordering::Relaxed);
    for n in 0..100u32 {
        let other = format!("{n:032x}");
        invalidate(&sessions, &other).await;
        settle().await;
    }
    let woken = polls.load(Ordering::Relaxed) - before;
    assert_eq!(woken, 0, "woken by 100 messages of other sessions");
    // Its own session's message wakes it: it reads the session, still there, and goes on.
    invalidate(&sessions, &own).await;
    settle().await;
    assert!(polls.load(Ordering::Relaxed) > before);
    assert!(!end.is_cancelled());
}

#[tokio::test]
async fn a_watch_that_ends_leaves_nothing_behind() {
    let sessions = sessions();
    let clock = TestClock::new().clock();
    let first = signed_in(&sessions, &clock, "sid-1").await;
    let second = signed_in(&sessions, &clock, "sid-2").await;
    // Two streams of one session, one of another.
    let (_, closed) = watch(&sessions, &clock, first.clone());
    let (_, ended_first) = watch(&sessions, &clock, first);
    let (_, ended_second) = watch(&sessions, &clock, second);
    settle().await;
    assert_eq!(sessions.watched_sessions(), 2);
    // One closed by its client; the other two by their sessions' ends.
    closed.cancel();
    settle().await;
    assert_eq!(sessions.watched_sessions(), 2);
    sessions.end_by_sid("sid-1").await.unwrap();
    sessions.end_by_sid("sid-2").await.unwrap();
    assert!(ended(&ended_first).await && ended(&ended_second).await);
    settle().await;
    assert_eq!(sessions.watched_sessions(), 0);
}

#[tokio::test]
async fn a_watch_ends_at_once_when_its_own_session_ends() {
    let (sessions, clock, loaded) = one_session().await;
    let (_, end) = watch(&sessions, &clock, loaded);
    settle().await;
    sessions.end_by_sid("sid-1").await.unwrap();
    assert!(ended(&end).await);
}

/// An empty message (the pub/sub connection was lost and is back: anything may have changed)
/// has every watch read its session again: one that timed out meanwhile ends.
#[tokio::test]
async fn everything_may_have_changed_wakes_every_watch() {
    let (sessions, _clock, first, second) = two_watches_timed_out().await;
    invalidate(&sessions, "").await;
    assert!(ended(&first).await && ended(&second).await);
}

/// More messages at once than the channel holds: the ones lost may have been of any session.
#[tokio::test]
async fn a_burst_past_the_channel_s_capacity_wakes_every_watch() {
    let sessions = sessions();
    let test_clock = TestClock::new();
    let clock = test_clock.clock();
    let loaded = signed_in(&sessions, &clock, "sid-1").await;
    let (_, end) = watch(&sessions, &clock, loaded);
    settle().await;
    test_clock.advance(crate::session::manager::DEFAULT_IDLE_TIMEOUT * 2);
    for n in 0..5000u32 {
        let other = format!("{n:032x}");
        invalidate(&sessions, &other).await;
    }
    assert!(ended(&end).await);
}

/// The memory store behind `sessions`, for its test hooks.
fn memory(sessions: &Sessions) -> MemoryStore {
    match sessions.store() {
        Store::Memory(memory) => memory.clone(),
        Store::Redis(_) => panic!("a memory store"),
    }
}

/// The store's channel closes (no more messages can come): every watch reads its session at
/// once, and one that timed out meanwhile ends.
#[tokio::test]
async fn a_closed_subscription_has_every_watch_read_its_session_at_once() {
    let (sessions, _clock, first, second) = two_watches_timed_out().await;
    memory(&sessions).close_channel(INVALIDATION_CHANNEL);
    assert!(ended(&first).await && ended(&second).await);
}

/// Once the channel has closed, a session's end is announced to nobody: a watch (a WebSocket
/// or a stream opened with a stolen cookie) still ends by its own check within
/// [`SESSION_CHECK`], not never.
#[tokio::test(start_paused = true)]
async fn after_the_subscription_closed_a_watch_still_ends_with_its_session_by_its_own_check() {
    let (sessions, clock, loaded) = one_session().await;
    let (_, end) = watch(&sessions, &clock, loaded);
    settle().await;
    memory(&sessions).close_channel(INVALIDATION_CHANNEL);
    settle().await;
    assert!(!end.is_cancelled(), "its session is still there");
    assert_eq!(sessions.end_by_sid("sid-1").await.unwrap(), 1);
    settle().await;
    assert!(
        !end.is_cancelled(),
        "no message can come: only its check ends it"
    );
    let checked = tokio::time::timeout(SESSION_CHECK + Duration::from_secs(1), end.cancelled());
    assert!(
        checked.await.is_ok(),
        "open past its check after its session ended"
    );
    settle().await;
    assert_eq!(sessions.watched_sessions(), 0);
}

/// Many streams of one session (a client opening them by the hundred with one cookie) make
/// one timed read of it per check, not one each; and when that read finds the session ended,
/// every stream ends with it, though no message says so.
#[tokio::test(start_paused = true)]
async fn the_watches_of_one_session_share_its_timed_read() {
    let (sessions, _, ends) = watched_twenty_times().await;
    let store = memory(&sessions);
    let before = store.record_reads();
    tokio::time::sleep(SESSION_CHECK + Duration::from_millis(500)).await;
    settle().await;
    let reads = store.record_reads() - before;
    assert_eq!(
        reads, 1,
        "20 watches of one session read it {reads} times in one check"
    );
    // No message can come; the session ends: the next timed read finds it, and all end.
    store.close_channel(INVALIDATION_CHANNEL);
    settle().await;
    assert_eq!(sessions.end_by_sid("sid-1").await.unwrap(), 1);
    tokio::time::sleep(SESSION_CHECK + Duration::from_secs(1)).await;
    settle().await;
    let open = ends.iter().filter(|end| !end.is_cancelled()).count();
    assert_eq!(open, 0, "{open} of 20 watches outlived their session's end");
}

/// Many streams of one session make one read of it per message that names it, not one each
/// (every write of the session publishes one: a client holding a hundred streams would turn
/// each touch into a hundred store reads); and when the session ends, every stream ends.
#[tokio::test]
async fn the_watches_of_one_session_share_the_read_a_message_asks_for() {
    let (sessions, handle, ends) = watched_twenty_times().await;
    let store = memory(&sessions);
    let before = store.record_reads();
    for _ in 0..5 {
        invalidate(&sessions, &handle).await;
        settle().await;
    }
    let reads = store.record_reads() - before;
    assert_eq!(
        reads, 5,
        "20 watches of one session read it {reads} times for 5 messages"
    );
    assert!(ends.iter().all(|end| !end.is_cancelled()));
    assert_eq!(sessions.end_by_sid("sid-1").await.unwrap(), 1);
    for end in &ends {
        assert!(ended(end).await, "a watch outlived its session's end");
    }
}

/// A route as a file writes it, with `upstream`.
fn route_to(upstream: &str) -> RouteConfig {
    let text = format!(
        "[server]\npublic_url = \"https://app.example.com\"\n\
         [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\nclient_secret = \"s\"\n\
         [session]\nkeys = [\"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n\
         [[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n"
    );
    let config = crate::config::Config::parse(&text, std::path::Path::new("."), &|_| None);
    config.unwrap().routes.remove(0)
}

#[test]
fn a_route_sending_bytes_elsewhere_is_another_destination() {
    let before = route_to("https://api.example.com/v1");
    let mut same = route_to("https://api.example.com/v1");
    same.timeout = Some(Duration::from_secs(7));
    assert!(same_destination(&before, &same), "a timeout moves no byte");
    let bundle = |path: &str| crate::config::CaBundle {
        path: path.into(),
        certs: Arc::new(Vec::new()),
    };
    let identity = |key: u8| crate::config::ClientIdentity {
        cert_path: "client.pem".into(),
        key_path: "client.key".into(),
        chain: Arc::new(Vec::new()),
        key: Arc::new(rustls_pki_types::PrivateKeyDer::Pkcs8(vec![key; 8].into())),
    };
    let mut with_ca = before.clone();
    with_ca.ca_file = Some(bundle("a.pem"));
    let mut with_identity = before.clone();
    with_identity.tls_client = Some(identity(1));
    let elsewhere: [(&str, RouteConfig); 6] = [
        ("another host", route_to("https://other.example.com/v1")),
        ("another port", route_to("https://api.example.com:8443/v1")),
        ("another path", route_to("https://api.example.com/v2")),
        (
            "strip_prefix",
            RouteConfig {
                strip_prefix: !before.strip_prefix,
                ..before.clone()
            },
        ),
        ("a ca_file", with_ca.clone()),
        ("a client certificate", with_identity.clone()),
    ];
    for (what, after) in &elsewhere {
        assert!(!same_destination(&before, after), "{what}");
    }
    let mut other_ca = with_ca.clone();
    other_ca.ca_file = Some(bundle("b.pem"));
    assert!(!same_destination(&with_ca, &other_ca), "another ca_file");
    let mut other_key = with_identity.clone();
    other_key.tls_client = Some(identity(2));
    assert!(!same_destination(&with_identity, &other_key), "another key");
    assert!(same_destination(&with_identity, &with_identity.clone()));
}
