//! The log's way to stderr, which must never stop a thread that logs: a line is formatted on
//! the thread that logs it, put in a bounded queue ([`QUEUE_BYTES`]), and written by one thread
//! of its own. A stderr that does not take lines (a pipe whose reader stalled: a stuck log
//! driver, `vestibule 2>&1 | slow-consumer`) fills the pipe and then the queue; later lines are
//! dropped and counted (`vestibule_log_lines_dropped_total`), and the first line the queue takes
//! again is preceded by a warning with the number dropped meanwhile. [`flush`] waits (a while)
//! for the queue to be written, before the process exits.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// How many bytes of lines wait for stderr at most: 1 MiB, some 3,000 access-log lines (a
/// few seconds of a busy proxy's log), beside the 64 KiB a pipe holds. Bounded by bytes, not
/// lines, so that what it holds is bounded whatever the lines' length. The writer thread takes
/// the whole queue at once: the lines it is writing (at most as many again) no longer count.
pub const QUEUE_BYTES: usize = 1 << 20;

/// What the writer thread has to write.
enum Entry {
    Line(Vec<u8>),
    /// This many lines were dropped here.
    Gap(u64),
}

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Lines dropped since the last gap was queued.
    dropped: u64,
    /// The writer thread is writing entries it has taken from the queue.
    writing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Entries were queued.
    queued: Condvar,
    /// The queue was written out.
    written: Condvar,
    /// The writer thread, whose own lines go to stderr directly.
    writer: OnceLock<ThreadId>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `line`, or drops and counts it if the queue is full. Never waits for stderr.
    fn push(&self, line: Vec<u8>) {
        let mut state = self.lock();
        if state.bytes + line.len() > QUEUE_BYTES {
            state.dropped += 1;
            drop(state);
            metrics::counter!("vestibule_log_lines_dropped_total").increment(1);
            return;
        }
        // The writer thread waits only for an empty queue: a wake-up (a system call) per line
        // would cost what the write it replaces cost.
        let wake = state.entries.is_empty();
        if state.dropped > 0 {
            let dropped = std::mem::take(&mut state.dropped);
            state.entries.push_back(Entry::Gap(dropped));
        }
        state.bytes += line.len();
        state.entries.push_back(Entry::Line(line));
        drop(state);
        if wake {
            self.queued.notify_one();
        }
    }

    /// Writes the queue to stderr for as long as the process runs.
    fn write_forever(&self) {
        let _ = self.writer.set(std::thread::current().id());
        let mut batch = VecDeque::new();
        loop {
            {
                let mut state = self.lock();
                state.writing = false;
                self.written.notify_all();
                while state.entries.is_empty() {
                    state = self
                        .queued
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                std::mem::swap(&mut batch, &mut state.entries);
                state.bytes = 0;
                state.writing = true;
            }
            let mut stderr = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
            for entry in batch.drain(..) {
                match entry {
                    // A line stderr refuses (closed) is lost as it was before the queue.
                    Entry::Line(line) => drop(stderr.write_all(&line)),
                    Entry::Gap(dropped) => {
                        // Written before the lines that follow the gap: this thread's own
                        // lines go to stderr directly ([`Queue::make_writer`]).
                        let _ = stderr.flush();
                        warn_of_gap(dropped);
                    }
                }
            }
            let _ = stderr.flush();
        }
    }

    /// Waits until every line queued is written, or until `within` has passed.
    fn flush(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut state = self.lock();
        while !state.entries.is_empty() || state.writing {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            state = self
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The target of this module's lines ([`warn_of_gap`]'s), which are about the log itself: the
/// log's filter lets them through at `warn` whatever its level (`telemetry::log_filter`).
pub const TARGET: &str = module_path!();

/// The warning that `dropped` lines were lost.
fn warn_of_gap(dropped: u64) {
    tracing::warn!(
        target: TARGET,
        dropped,
        "log lines dropped: stderr did not take them (its reader fell behind)"
    );
}

/// The queue, as the log's writer (`MakeWriter`).
#[derive(Clone)]
pub struct Queue(Arc<Shared>);

impl Queue {
    /// A queue and its writer thread; `None` if the thread cannot be started.
    pub fn start() -> Option<Queue> {
        let shared = Arc::new(Shared::default());
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("vestibule-log".into())
            .spawn(move || writer.write_forever())
            .ok()?;
        Some(Queue(shared))
    }

    /// See [`Shared::flush`].
    pub fn flush(&self, within: Duration) {
        self.0.flush(within);
    }
}

/// One line on its way: what the formatter writes is kept, and queued when it is dropped (the
/// formatter makes one writer per line). On the writer thread itself, it writes to stderr.
pub struct LineWriter<'a> {
    queue: Option<&'a Shared>,
    line: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.queue.is_none() {
            return std::io::stderr().write(buf);
        }
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if let Some(shared) = self.queue
            && !self.line.is_empty()
        {
            shared.push(std::mem::take(&mut self.line));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Queue {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            queue: (self.0.writer.get() != Some(&std::thread::current().id())).then_some(&*self.0),
            line: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn entries(shared: &Shared) -> Vec<String> {
        shared
            .lock()
            .entries
            .iter()
            .map(|e| match e {
                Entry::Line(line) => String::from_utf8_lossy(line).into_owned(),
                Entry::Gap(n) => format!("gap {n}"),
            })
            .collect()
    }

    #[test]
    fn a_full_queue_drops_lines_and_the_next_line_it_takes_follows_their_count() {
        let shared = Shared::default();
        let line = vec![b'x'; QUEUE_BYTES / 2];
        shared.push(line.clone());
        shared.push(line.clone());
        // Full: these two are dropped.
        shared.push(b"dropped\n".to_vec());
        shared.push(b"dropped\n".to_vec());
        assert_eq!(shared.lock().dropped, 2);
        assert_eq!(shared.lock().entries.len(), 2);
        // Written out, the queue takes lines again, the count first.
        shared.lock().entries.clear();
        shared.lock().bytes = 0;
        shared.push(b"later\n".to_vec());
        assert_eq!(entries(&shared), ["gap 2", "later\n"]);
        assert_eq!(shared.lock().dropped, 0);
    }

    /// An operator who logs only errors (or only some targets) must still learn that lines
    /// were lost: the count of drops passes any `[log] level`.
    #[test]
    fn the_count_of_dropped_lines_is_logged_whatever_the_level() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        for level in [
            "error",
            "info",
            "vestibule::access=info",
            "error,vestibule=error",
        ] {
            let sink = Sink::default();
            let writer = sink.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(crate::telemetry::log_filter(level))
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || warn_of_gap(7));
            let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            assert!(
                text.contains("log lines dropped") && text.contains("dropped=7"),
                "level {level:?} hid the count of dropped lines: {text:?}"
            );
        }
    }

    #[test]
    fn a_line_is_queued_when_its_writer_is_dropped_and_an_empty_one_is_not() {
        let queue = Queue(Arc::new(Shared::default()));
        {
            use tracing_subscriber::fmt::MakeWriter;
            let mut writer = queue.make_writer();
            writer.write_all(b"one ").unwrap();
            writer.write_all(b"line\n").unwrap();
            assert!(entries(&queue.0).is_empty());
            drop(queue.make_writer());
        }
        assert_eq!(entries(&queue.0), ["one line\n"]);
    }

    #[test]
    fn flush_returns_once_written_or_when_its_time_is_up() {
        let queue = Queue(Arc::new(Shared::default()));
        queue.0.push(b"unwritten\n".to_vec());
        // No writer thread: the time is up.
        let start = Instant::now();
        queue.flush(Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
        queue.0.lock().entries.clear();
        queue.flush(Duration::from_secs(60));
    }
}
