//! A client assertion in a file that something else keeps fresh (`[oidc]
//! client_assertion_file`), held in memory for the serving workers, which never touch the file:
//! a read on a hung NFS or FUSE mount would hold a worker's thread, and every connection on it,
//! for as long as the read.
//!
//! A watcher thread of its own looks at the file every [`LOOK_PERIOD`] (its whole contents,
//! bounded, regular files only: a FIFO in its place is refused unopened). Each look runs on a
//! thread of its own, so that one stuck on the file holds only itself; no look starts while one
//! is in flight, unless that one has been stuck for [`STUCK`]: then one more starts beside it, so
//! that a file that is fine again (a new file renamed into place, as Kubernetes does) is read,
//! with at most [`MAX_LOOKS`] threads held at once. A look's result counts only if no later
//! look's has. Plain threads, not a runtime's blocking pool: a runtime waits for its blocking
//! tasks when it shuts down, and a stuck read would hold the process's exit.
//!
//! A file that cannot be read, or holds no JWT, keeps the last good assertion in use, with a
//! warning (once per problem; the contents are never shown).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak, mpsc};
use std::time::{Duration, Instant};

/// How often the file is looked at: a rewritten file is in use about this long after.
pub const LOOK_PERIOD: Duration = Duration::from_secs(1);

/// How long a look may take before one more starts beside it.
pub const STUCK: Duration = Duration::from_secs(5);

/// How many looks may be in flight at once (the stuck ones and one more).
pub const MAX_LOOKS: usize = 3;

/// The assertion, as last read from its file by the watcher.
pub struct AssertionFile {
    latest: Arc<Latest>,
    /// Dropped with the file (a reload's credential replacing it): the watcher stops.
    _stop: mpsc::Sender<()>,
}

struct Latest {
    path: PathBuf,
    value: Mutex<Arc<str>>,
    looks: Mutex<Looks>,
}

#[derive(Default)]
struct Looks {
    /// The number of the last look started.
    started: u64,
    /// The looks in flight: their numbers and when each started.
    in_flight: Vec<(u64, Instant)>,
    /// The number of the latest look whose result counted.
    counted: u64,
    /// What that look could not read, logged once.
    problem: Option<String>,
    /// The last look found stuck, logged once.
    stuck: u64,
}

impl AssertionFile {
    /// Reads the file now (a problem is the caller's error: a configuration that cannot start)
    /// and starts its watcher.
    pub fn open(path: PathBuf) -> Result<AssertionFile, String> {
        let value = read(&path)?;
        let latest = Arc::new(Latest {
            path,
            value: Mutex::new(value),
            looks: Mutex::default(),
        });
        let (stop, stopped) = mpsc::channel();
        let watched = Arc::downgrade(&latest);
        std::thread::Builder::new()
            .name("vestibule-assertion".into())
            .spawn(move || watch(&watched, &stopped))
            .map_err(|e| format!("cannot start the watcher of its file: {e}"))?;
        Ok(AssertionFile {
            latest,
            _stop: stop,
        })
    }

    pub fn path(&self) -> &Path {
        &self.latest.path
    }

    /// The latest assertion read. Memory only: never the file.
    pub fn current(&self) -> Arc<str> {
        lock(&self.latest.value).clone()
    }
}

/// Starts a look every [`LOOK_PERIOD`] until the file is dropped.
fn watch(latest: &Weak<Latest>, stopped: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LOOK_PERIOD) {
        let Some(latest) = latest.upgrade() else {
            break;
        };
        let Some(number) = latest.begin(Instant::now()) else {
            continue;
        };
        let path = latest.path.clone();
        // A look holds no strong reference: one stuck for good keeps nothing else alive.
        let reported = Arc::downgrade(&latest);
        let spawned = std::thread::Builder::new()
            .name("vestibule-assertion-look".into())
            .spawn(move || {
                let read = read(&path);
                if let Some(latest) = reported.upgrade() {
                    latest.end(number, read);
                }
            });
        if let Err(e) = spawned {
            latest.end(number, Err(format!("cannot start a look at its file: {e}")));
        }
    }
}

impl Latest {
    /// The number of a look to start at `now`, if one may start.
    fn begin(&self, now: Instant) -> Option<u64> {
        let mut looks = lock(&self.looks);
        if let Some(&(newest, at)) = looks.in_flight.iter().max_by_key(|(_, at)| *at) {
            if now.duration_since(at) < STUCK || looks.in_flight.len() >= MAX_LOOKS {
                return None;
            }
            if looks.stuck < newest {
                looks.stuck = newest;
                tracing::warn!(
                    file = %self.path.display(),
                    stuck = looks.in_flight.len(),
                    "the client assertion file is not read after {} s (a hung mount?): looking again beside the stuck read; grants send the last assertion read",
                    STUCK.as_secs()
                );
            }
        }
        looks.started += 1;
        let number = looks.started;
        looks.in_flight.push((number, now));
        Some(number)
    }

    /// Look `number` has `read` the file: it counts unless a later look's result did.
    fn end(&self, number: u64, read: Result<Arc<str>, String>) {
        let mut looks = lock(&self.looks);
        looks.in_flight.retain(|(n, _)| *n != number);
        if number < looks.counted {
            return;
        }
        looks.counted = number;
        match read {
            Ok(value) => {
                let mut current = lock(&self.value);
                if *current != value {
                    *current = value;
                    tracing::info!(file = %self.path.display(), "client assertion read again");
                }
                if looks.problem.take().is_some() {
                    tracing::info!(file = %self.path.display(), "the client assertion file is readable again");
                }
            }
            Err(problem) => {
                if looks.problem.as_ref() != Some(&problem) {
                    tracing::warn!(
                        %problem,
                        "the client assertion file is unusable: grants send the last assertion read"
                    );
                    looks.problem = Some(problem);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The assertion in the file at `path`. Errors name the file, never its contents.
fn read(path: &Path) -> Result<Arc<str>, String> {
    let shown = path.display();
    let text = crate::config::read_text(path, crate::config::MAX_FILE)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let value = text.trim();
    // A compact JWS: three base64url parts. Anything else would only be refused by the
    // provider as invalid_client, which reads as a wrong registration.
    let parts: Vec<&str> = value.split('.').collect();
    if parts.len() != 3
        || parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    {
        return Err(format!("{shown} does not hold a JWT (contents not shown)"));
    }
    Ok(value.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn latest(value: &str) -> Latest {
        Latest {
            path: "token".into(),
            value: Mutex::new(value.into()),
            looks: Mutex::default(),
        }
    }

    #[test]
    fn a_file_is_read_whole_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "aaa.bbb.ccc\n").unwrap();
        assert_eq!(&*read(&path).unwrap(), "aaa.bbb.ccc");
        std::fs::write(&path, "secret-value-not-a-jwt").unwrap();
        let error = read(&path).unwrap_err();
        assert!(!error.contains("secret-value"), "{error}");
        assert!(AssertionFile::open(path).is_err());
    }

    #[test]
    fn a_file_that_becomes_unusable_keeps_the_last_good_assertion() {
        let file = latest("aaa.bbb.ccc");
        let now = Instant::now();
        let first = file.begin(now).unwrap();
        file.end(first, Err("cannot read token".into()));
        let second = file.begin(now).unwrap();
        file.end(second, Ok("ddd.eee.fff".into()));
        assert_eq!(&**lock(&file.value), "ddd.eee.fff");
        let third = file.begin(now).unwrap();
        file.end(third, Err("token does not hold a JWT".into()));
        assert_eq!(&**lock(&file.value), "ddd.eee.fff");
    }

    /// One look at a time, one more beside a stuck one, never more than [`MAX_LOOKS`]; a stuck
    /// look that ends after a later one has counted does not put its older read in use.
    #[test]
    fn a_stuck_look_holds_back_no_later_look_and_never_counts_after_one() {
        let file = latest("aaa.bbb.ccc");
        let start = Instant::now();
        let stuck = file.begin(start).unwrap();
        assert_eq!(file.begin(start + LOOK_PERIOD), None, "one look at a time");
        let mut later = start + STUCK;
        let beside = file.begin(later).unwrap();
        for _ in 2..MAX_LOOKS {
            later += STUCK;
            file.begin(later).unwrap();
        }
        assert_eq!(file.begin(later + STUCK * 10), None, "at most MAX_LOOKS");
        file.end(beside, Ok("new.new.new".into()));
        file.end(stuck, Ok("old.old.old".into()));
        assert_eq!(&**lock(&file.value), "new.new.new");
    }
}
