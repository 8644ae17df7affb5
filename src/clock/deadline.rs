//! Coarse deadlines on a serving worker: one sweep every [`TICK`] instead of a timer entry per
//! request. Two users once per request: the upstream answer's deadline (a route's `timeout`,
//! [`Deadlines::within`]) and the deadline for a client's next HTTP/1 request head
//! (`server.header_read_timeout`, [`HeadTimer`]: hyper's own timer for it). And one only while
//! an answer waits on its client (`server.send_timeout`, [`Deadlines::arm`]): a write the socket
//! does not take at once, or an HTTP/2 stream's data the client has not made room for.
//!
//! A tokio timer entry (registered in the timer wheel on first poll, removed on drop) cost about
//! 1,100 instructions per request. Here a request takes a slot in the worker's list (an
//! uncontended lock and a push), and a sweeper task, running only while some slot is taken, marks
//! the slots whose deadline has passed and wakes their requests. A deadline fires up to two
//! [`TICK`]s late, which timeouts counted in seconds do not notice.
//!
//! While the sweeper runs, the time of its last sweep is the worker's coarse clock
//! ([`Deadlines::coarse_now`]): a deadline taken then counts from that sweep plus a [`TICK`]
//! (not earlier than the real one, since the next sweep is due within a tick; only a sweep
//! itself late, on a worker too busy to run it on time, moves it earlier, by that much), and
//! the upstream pool's idle times use it too. A clock read costs ~25 ns here (`clock_gettime`); a busy worker
//! took four of them per request for these.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// How often the sweeper looks, and so how late a deadline may fire.
pub const TICK: Duration = Duration::from_millis(50);

/// One worker's deadlines. Used only from the worker's runtime (the sweeper runs there).
pub struct Deadlines {
    slots: Mutex<Slots>,
    /// What [`Self::swept`] counts from.
    base: Instant,
    /// While the sweeper runs: nanoseconds from `base` to its last sweep (or to its start), plus
    /// one; 0 while it does not.
    swept: AtomicU64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            slots: Mutex::default(),
            base: Instant::now(),
            swept: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct Slots {
    entries: Vec<Slot>,
    /// Indexes of free entries.
    free: Vec<usize>,
    taken: usize,
    sweeping: bool,
}

#[derive(Default)]
struct Slot {
    at: Option<Instant>,
    fired: bool,
    waker: Option<Waker>,
}

impl Deadlines {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `fut`'s output, or `Err(())` once `timeout` (give or take [`TICK`]) has passed. `fut` is
    /// pinned by the caller: a request's future is large, and moving it into this one would
    /// copy it (`memcpy` per request, the cost the round-3 future-size fix removed).
    pub async fn within<F: Future>(
        self: &Arc<Self>,
        timeout: Duration,
        fut: Pin<&mut F>,
    ) -> Result<F::Output, ()> {
        let taken = self.take_after(timeout);
        let expired = std::future::poll_fn(|cx| taken.poll_fired(cx));
        tokio::select! {
            biased;
            output = fut => Ok(output),
            () = expired => Err(()),
        }
    }

    /// A slot whose deadline is `at`, held until the [`Taken`] is dropped; a waker given to
    /// [`Taken::poll_fired`] is woken once it has passed.
    pub fn arm(self: &Arc<Self>, at: Instant) -> Taken {
        self.take(at)
    }

    /// The time of the sweeper's last sweep while it runs (up to a [`TICK`], and whatever the
    /// sweeper is late, behind the clock), the clock otherwise: for times kept in seconds.
    pub fn coarse_now(&self) -> Instant {
        self.swept().unwrap_or_else(Instant::now)
    }

    fn swept(&self) -> Option<Instant> {
        match self.swept.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.base + Duration::from_nanos(nanos - 1)),
        }
    }

    fn mark_swept(&self, at: Instant) {
        let nanos = u64::try_from(at.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1);
        self.swept.store(nanos + 1, Ordering::Relaxed);
    }

    /// A slot for `timeout` from now: counted from the last sweep and one [`TICK`] more while
    /// the sweeper runs (the next sweep is due within a tick of it, so the deadline is never
    /// before `timeout` from now), from the clock otherwise.
    fn take_after(self: &Arc<Self>, timeout: Duration) -> Taken {
        let at = match self.swept() {
            Some(swept) => swept + TICK + timeout,
            None => Instant::now() + timeout,
        };
        self.take(at)
    }

    fn take(self: &Arc<Self>, at: Instant) -> Taken {
        let mut slots = self.lock();
        let slot = Slot {
            at: Some(at),
            fired: false,
            waker: None,
        };
        let index = match slots.free.pop() {
            Some(index) => {
                slots.entries[index] = slot;
                index
            }
            None => {
                slots.entries.push(slot);
                slots.entries.len() - 1
            }
        };
        slots.taken += 1;
        if !slots.sweeping {
            slots.sweeping = true;
            self.mark_swept(Instant::now());
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        Taken {
            deadlines: self.clone(),
            index,
        }
    }
}

/// A request's slot; given back when dropped (answered, failed or cancelled).
pub struct Taken {
    deadlines: Arc<Deadlines>,
    index: usize,
}

impl Taken {
    /// Ready once the deadline has passed; until then `cx`'s waker is kept and woken then.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slots = self.deadlines.lock();
        let slot = &mut slots.entries[self.index];
        if slot.fired {
            return Poll::Ready(());
        }
        match &slot.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut slots = self.deadlines.lock();
        slots.entries[self.index] = Slot::default();
        slots.free.push(self.index);
        slots.taken -= 1;
    }
}

/// Wakes the requests whose deadline has passed, every [`TICK`], until no slot is taken.
async fn sweep(deadlines: Weak<Deadlines>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(deadlines) = deadlines.upgrade() else {
            return;
        };
        let mut slots = deadlines.lock();
        if slots.taken == 0 {
            slots.sweeping = false;
            deadlines.swept.store(0, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        deadlines.mark_swept(now);
        for slot in &mut slots.entries {
            if !slot.fired && slot.at.is_some_and(|at| at <= now) {
                slot.fired = true;
                if let Some(waker) = slot.waker.take() {
                    waker.wake();
                }
            }
        }
    }
}

/// hyper's timer for a worker's HTTP/1 connections, on the worker's [`Deadlines`]. hyper asks
/// for a sleep whenever it starts waiting for a request head (and drops it once the head is
/// read), so with tokio's timer every request paid for a timer entry; here it pays for a slot,
/// taken only if the head is not already there when hyper first looks.
#[derive(Clone)]
pub struct HeadTimer(pub Arc<Deadlines>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            deadlines: self.0.clone(),
            at: Instant::from_std(deadline),
            taken: None,
        })
    }

    /// tokio's clock, so that tests with paused time move it.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// A sleep until `at` that holds a slot in the worker's [`Deadlines`] from its first poll until
/// it is dropped.
struct CoarseSleep {
    deadlines: Arc<Deadlines>,
    at: Instant,
    taken: Option<Taken>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let taken = match &this.taken {
            Some(taken) => taken,
            None => this.taken.insert(this.deadlines.take(this.at)),
        };
        taken.poll_fired(cx)
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn a_head_timer_sleep_ends_within_a_tick_of_its_deadline_and_gives_its_slot_back() {
        let deadlines = Arc::new(Deadlines::default());
        let timer = HeadTimer(deadlines.clone());
        let started = Instant::now();
        timer.sleep(Duration::from_secs(2)).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_secs(2) + TICK,
            "woke after {waited:?}"
        );
        // A sleep dropped before its deadline (the head arrived) frees its slot at once.
        let mut early = timer.sleep(Duration::from_secs(2));
        let pending = std::future::poll_fn(|cx| Poll::Ready(early.as_mut().poll(cx))).await;
        assert!(pending.is_pending());
        assert_eq!(deadlines.lock().taken, 1, "a pending sleep holds a slot");
        drop(early);
        assert_eq!(deadlines.lock().taken, 0);
        // One never polled takes none.
        let unpolled = timer.sleep(Duration::from_secs(2));
        assert_eq!(deadlines.lock().taken, 0);
        drop(unpolled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_is_cut_off_within_a_tick_and_a_prompt_one_is_not() {
        let deadlines = Arc::new(Deadlines::default());
        let started = Instant::now();
        let late = deadlines
            .within(
                Duration::from_secs(1),
                std::pin::pin!(tokio::time::sleep(Duration::from_secs(60))),
            )
            .await;
        assert!(late.is_err());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + TICK,
            "cut off after {waited:?}"
        );
        let prompt = deadlines
            .within(Duration::from_secs(1), std::pin::pin!(async { 7 }))
            .await;
        assert_eq!(prompt, Ok(7));
        let slots = deadlines.lock();
        assert_eq!(slots.taken, 0, "every slot is given back");
        assert!(slots.entries.len() <= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_sweeper_runs_a_deadline_counts_from_its_last_sweep_and_is_never_early() {
        let deadlines = Arc::new(Deadlines::default());
        assert!(deadlines.swept().is_none(), "no sweeper yet");
        // A long wait keeps the sweeper running.
        let keeper = {
            let deadlines = deadlines.clone();
            tokio::spawn(async move {
                let forever = std::pin::pin!(std::future::pending::<()>());
                deadlines.within(Duration::from_secs(60), forever).await
            })
        };
        tokio::time::sleep(Duration::from_millis(120)).await;
        let now = Instant::now();
        let coarse = deadlines.coarse_now();
        assert!(
            coarse <= now && now - coarse <= TICK,
            "{:?} behind",
            now - coarse
        );
        for offset in [0, 10, 30, 49] {
            tokio::time::sleep(Duration::from_millis(offset)).await;
            let started = Instant::now();
            let late = deadlines
                .within(
                    Duration::from_secs(1),
                    std::pin::pin!(std::future::pending::<()>()),
                )
                .await;
            assert!(late.is_err());
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + 2 * TICK,
                "taken {offset} ms later, cut off after {waited:?}"
            );
        }
        keeper.abort();
        let _ = keeper.await;
        tokio::time::sleep(TICK * 3).await;
        assert!(
            deadlines.swept().is_none(),
            "the sweeper stopped and its time with it"
        );
        let now = Instant::now();
        assert_eq!(deadlines.coarse_now(), now, "the clock, without a sweeper");
    }

    #[tokio::test(start_paused = true)]
    async fn many_requests_each_get_their_own_deadline_and_the_sweeper_stops_when_idle() {
        let deadlines = Arc::new(Deadlines::default());
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            let deadlines = deadlines.clone();
            tasks.push(tokio::spawn(async move {
                // Even ones answer in time (after 100 ms), odd ones never.
                let answer = async move {
                    if i % 2 == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                    i
                };
                deadlines
                    .within(Duration::from_millis(300 + i), std::pin::pin!(answer))
                    .await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let outcome = task.await.unwrap();
            assert_eq!(outcome.is_ok(), i % 2 == 0, "request {i}: {outcome:?}");
        }
        tokio::time::sleep(TICK * 3).await;
        let slots = deadlines.lock();
        assert_eq!(slots.taken, 0);
        assert!(!slots.sweeping, "no sweeper runs while nothing waits");
    }
}
