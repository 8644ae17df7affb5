//! Whether every serving worker's runtime still turns, for `/healthz`: each worker runs a task
//! that writes the time into a slot of its own every second ([`TICK`]); `/healthz` fails when a
//! slot is older than [`STALL`]. A worker whose thread is blocked (a synchronous call that does
//! not return: a read of a file on a hung mount), busy without end, or gone (its thread panicked)
//! stops writing; nothing else tells it, since the admin listener and the accept loop run on
//! another runtime and keep answering. Nothing on the request path reads or writes the slots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a worker writes its slot.
pub const TICK: Duration = Duration::from_secs(1);

/// How long a worker may go without writing its slot before `/healthz` fails: five ticks. A
/// worker's runtime comes back to its timers between any two polls of its tasks, every few
/// microseconds to milliseconds of work; on an overloaded or throttled host (a container's CPU
/// quota stops the whole process for the rest of each 100 ms period) a tick comes late by
/// hundreds of milliseconds, not seconds. Silent for five seconds, the worker has left every
/// request on it waiting that long, and what stopped it does not pass by itself often enough to
/// wait longer: the orchestrator's liveness probe (e.g. three failures ten seconds apart) adds
/// its own patience on top.
pub const STALL: Duration = Duration::from_secs(5);

/// A slot's value once its worker has stopped on its own (after the drain): not a stall.
const STOPPED: u64 = u64::MAX;

/// The workers' slots: milliseconds since [`Heartbeats::new`] at each worker's last tick.
pub struct Heartbeats {
    epoch: Instant,
    slots: Box<[AtomicU64]>,
}

/// A worker that has not ticked for longer than the bound: its index (as in the
/// `vestibule_connections_open{worker}` series) and how long it has been silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    pub worker: usize,
    pub silent: Duration,
}

impl Heartbeats {
    /// Slots for `workers` workers, each as if it had ticked now.
    pub fn new(workers: usize) -> Heartbeats {
        Heartbeats {
            epoch: Instant::now(),
            slots: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// How many workers there are.
    pub fn workers(&self) -> usize {
        self.slots.len()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(STOPPED - 1)
    }

    /// Writes `worker`'s slot every `period` for as long as the runtime it is spawned on runs
    /// it: spawn it on that worker's runtime.
    pub async fn tick(self: std::sync::Arc<Self>, worker: usize, period: Duration) {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            if let Some(slot) = self.slots.get(worker) {
                slot.store(self.now(), Ordering::Relaxed);
            }
        }
    }

    /// `worker` has stopped serving on its own (shutdown): its silence is no stall. A worker
    /// whose thread ended otherwise (a panic) never says so, and is reported.
    pub fn stopped(&self, worker: usize) {
        if let Some(slot) = self.slots.get(worker) {
            slot.store(STOPPED, Ordering::Relaxed);
        }
    }

    /// The workers silent for longer than `bound`, in order.
    pub fn stalled(&self, bound: Duration) -> Vec<Stalled> {
        let now = self.now();
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(worker, slot)| {
                let last = slot.load(Ordering::Relaxed);
                let silent = Duration::from_millis(now.saturating_sub(last));
                (last != STOPPED && silent > bound).then_some(Stalled { worker, silent })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    const PERIOD: Duration = Duration::from_millis(20);
    const BOUND: Duration = Duration::from_millis(200);

    /// What the test asks of a worker's runtime.
    enum Ask {
        /// Block the thread until the sender is dropped or sends.
        Block(mpsc::Receiver<()>),
        /// Panic (the thread ends).
        Panic,
        /// Return from `block_on`, as a drained worker does.
        Stop,
    }

    /// A worker as the server makes one: a thread, a current-thread runtime on it, the ticking
    /// task spawned there; it does what it is asked.
    fn worker(beats: &Arc<Heartbeats>, index: usize) -> tokio::sync::mpsc::UnboundedSender<Ask> {
        let (asks, mut asked) = tokio::sync::mpsc::unbounded_channel();
        let beats = beats.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            runtime.block_on(async {
                tokio::spawn(beats.clone().tick(index, PERIOD));
                while let Some(ask) = asked.recv().await {
                    match ask {
                        // The thread itself waits: no task of this runtime runs meanwhile.
                        Ask::Block(until) => drop(until.recv()),
                        Ask::Panic => std::panic::panic_any("the worker's thread ends"),
                        Ask::Stop => break,
                    }
                }
            });
            beats.stopped(index);
        });
        asks
    }

    fn stalled_workers(beats: &Heartbeats) -> Vec<usize> {
        beats.stalled(BOUND).iter().map(|s| s.worker).collect()
    }

    /// Waits (for at most ten bounds) until `check` holds.
    fn soon(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + BOUND * 10;
        while !check() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(PERIOD);
        }
    }

    #[test]
    fn a_worker_whose_thread_is_blocked_is_stalled_until_it_runs_again() {
        let beats = Arc::new(Heartbeats::new(2));
        let first = worker(&beats, 0);
        let _second = worker(&beats, 1);
        std::thread::sleep(BOUND * 2);
        assert_eq!(stalled_workers(&beats), [0usize; 0], "both tick");

        let (release, until) = mpsc::channel();
        first.send(Ask::Block(until)).unwrap();
        soon("the blocked worker is stalled", || {
            stalled_workers(&beats) == [0]
        });
        let stalled = beats.stalled(BOUND);
        assert!(stalled[0].silent > BOUND, "{stalled:?}");
        // Only that one, for as long as it is blocked.
        std::thread::sleep(BOUND);
        assert_eq!(stalled_workers(&beats), [0]);

        release.send(()).unwrap();
        soon("the worker ticks again", || {
            stalled_workers(&beats).is_empty()
        });
    }

    #[test]
    fn a_worker_whose_thread_ended_is_stalled_and_one_that_stopped_is_not() {
        let beats = Arc::new(Heartbeats::new(3));
        let asks: Vec<_> = (0..3).map(|index| worker(&beats, index)).collect();
        std::thread::sleep(BOUND / 2);
        asks[1].send(Ask::Panic).unwrap();
        asks[2].send(Ask::Stop).unwrap();
        soon("the worker that panicked is stalled", || {
            stalled_workers(&beats) == [1]
        });
        std::thread::sleep(BOUND * 2);
        assert_eq!(stalled_workers(&beats), [1]);
    }

    #[test]
    fn slots_start_as_ticked_now() {
        let beats = Heartbeats::new(4);
        assert_eq!(beats.workers(), 4);
        assert!(beats.stalled(BOUND).is_empty());
        assert!(Heartbeats::new(0).stalled(Duration::ZERO).is_empty());
    }
}
