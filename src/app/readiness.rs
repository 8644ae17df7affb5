//! `/readyz`'s store check, shared by the probes: one PING at a time for the process, whose
//! answer every probe that came meanwhile waits for, and a PONG that stands for [`REUSED`]. The
//! store is the one the sessions use: probes from every load balancer and the orchestrator, or a
//! client of the admin listener sending many, are at most one command in flight, and at most
//! one a second while the store answers.
//!
//! A failure is never reused: once the store has failed a PING, the next probe sends another
//! (still one at a time), so `/readyz` is 200 again with the first PONG. Nor is a PONG reused
//! once any operation has found the store unavailable since its PING was sent (the requests
//! already answered 503 `store_unavailable` know better than a PONG from before): the next
//! probe sends a PING. A store that fails is 503 within [`REUSED`] of its last PONG and the
//! time the PING takes to fail (the store timeout, or [`PING_TIMEOUT`]), at once if a request
//! found it down first.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a PONG answers for the probes after it.
pub const REUSED: Duration = Duration::from_secs(1);

/// The longest a PING may take before it counts as failed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The shared check: the last PONG, and the PING under way.
#[derive(Default)]
pub struct SharedPing {
    slot: Arc<Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    /// When the last PING was answered with PONG, unless a PING failed since, and the store's
    /// count of outages when that PING was sent.
    pong: Option<(Instant, u64)>,
    /// The PING under way: its outcome, once known (`None` until then).
    pending: Option<watch::Receiver<Option<bool>>>,
}

impl SharedPing {
    /// Whether the store answers: a PONG less than [`REUSED`] old with no outage since its PING
    /// (`outages`: how many operations have found the store unavailable so far), else the
    /// outcome of the PING under way, else of a new one made by `ping` (`true`: PONG). The PING
    /// runs as a task of its own, to the end even if every probe waiting for it is gone (a
    /// reset HTTP/2 stream).
    pub async fn check<F, P>(&self, outages: u64, ping: F) -> bool
    where
        F: FnOnce() -> P,
        P: Future<Output = bool> + Send + 'static,
    {
        let mut outcome = {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if slot
                .pong
                .is_some_and(|(at, seen)| at.elapsed() < REUSED && seen == outages)
            {
                return true;
            }
            // A PING whose task is gone without an outcome (its runtime shutting down) is
            // replaced rather than waited on.
            match slot.pending.as_ref().filter(|rx| rx.has_changed().is_ok()) {
                Some(pending) => pending.clone(),
                None => {
                    let (tell, outcome) = watch::channel(None);
                    slot.pending = Some(outcome.clone());
                    let shared = self.slot.clone();
                    let ping = tokio::time::timeout(PING_TIMEOUT, ping());
                    tokio::spawn(async move {
                        let pong = matches!(ping.await, Ok(true));
                        {
                            let mut slot = shared.lock().unwrap_or_else(PoisonError::into_inner);
                            slot.pending = None;
                            slot.pong = pong.then(|| (Instant::now(), outages));
                        }
                        let _ = tell.send(Some(pong));
                    });
                    outcome
                }
            }
        };
        outcome
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|pong| *pong == Some(true))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose PING takes `delay` and answers `pong`; it counts the PINGs sent.
    #[derive(Clone)]
    struct Store {
        pings: Arc<AtomicUsize>,
        pong: Arc<std::sync::atomic::AtomicBool>,
        delay: Duration,
    }

    impl Store {
        fn new(delay: Duration) -> Store {
            Store {
                pings: Arc::default(),
                pong: Arc::new(true.into()),
                delay,
            }
        }

        fn ping(&self) -> impl Future<Output = bool> + Send + 'static {
            self.pings.fetch_add(1, Ordering::SeqCst);
            let (pong, delay) = (self.pong.clone(), self.delay);
            async move {
                tokio::time::sleep(delay).await;
                pong.load(Ordering::SeqCst)
            }
        }

        fn pings(&self) -> usize {
            self.pings.load(Ordering::SeqCst)
        }

        fn answers(&self, pong: bool) {
            self.pong.store(pong, Ordering::SeqCst);
        }
    }

    async fn probes(shared: &Arc<SharedPing>, store: &Store, n: usize) -> Vec<bool> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (shared, store) = (shared.clone(), store.clone());
                tokio::spawn(async move { shared.check(0, || store.ping()).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    }

    #[tokio::test(start_paused = true)]
    async fn probes_at_once_wait_for_one_ping_and_a_pong_stands_for_a_second() {
        let shared = Arc::new(SharedPing::default());
        let store = Store::new(Duration::from_millis(100));
        assert_eq!(probes(&shared, &store, 10).await, [true; 10]);
        assert_eq!(store.pings(), 1);
        tokio::time::sleep(REUSED - Duration::from_millis(10)).await;
        assert!(shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 1, "a PONG stands for a second");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 2, "and no longer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_shared_by_the_probes_waiting_for_it_and_never_reused() {
        let shared = Arc::new(SharedPing::default());
        let store = Store::new(Duration::from_millis(100));
        assert!(shared.check(0, || store.ping()).await);
        tokio::time::sleep(REUSED).await;
        store.answers(false);
        assert_eq!(probes(&shared, &store, 5).await, [false; 5]);
        assert_eq!(store.pings(), 2);
        // The next probe asks again, and sees the store back at once.
        store.answers(true);
        assert!(shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pong_is_not_reused_once_an_operation_found_the_store_unavailable() {
        let shared = Arc::new(SharedPing::default());
        let store = Store::new(Duration::from_millis(100));
        assert!(shared.check(0, || store.ping()).await);
        assert!(shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 1);
        // A request's operation found the store down, well within the PONG's second.
        store.answers(false);
        assert!(
            !shared.check(1, || store.ping()).await,
            "a PONG from before the outage kept /readyz green"
        );
        assert_eq!(store.pings(), 2);
        // Back: a new PONG stands for its second again, with the count it was sent at.
        store.answers(true);
        assert!(shared.check(1, || store.ping()).await);
        assert!(shared.check(1, || store.ping()).await);
        assert_eq!(store.pings(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_that_takes_too_long_fails_and_the_next_probe_asks_again() {
        let shared = Arc::new(SharedPing::default());
        let store = Store::new(PING_TIMEOUT * 3);
        let started = Instant::now();
        assert_eq!(probes(&shared, &store, 3).await, [false; 3]);
        let took = started.elapsed();
        assert!(took >= PING_TIMEOUT && took < PING_TIMEOUT * 2, "{took:?}");
        assert_eq!(store.pings(), 1);
        assert!(!shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_whose_probes_are_gone_still_ends_and_its_pong_is_used() {
        let shared = Arc::new(SharedPing::default());
        let store = Store::new(Duration::from_millis(100));
        let gone =
            tokio::time::timeout(Duration::from_millis(10), shared.check(0, || store.ping())).await;
        assert!(gone.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(shared.check(0, || store.ping()).await);
        assert_eq!(store.pings(), 1);
    }
}
