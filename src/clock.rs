//! The time, as a value handed to what needs it: Unix seconds now, for session lifetimes, token
//! expiry and JWT validation. Production reads the system clock; tests build a [`TestClock`]
//! that follows tokio's clock (paused time moves it) and that they can move ahead, so an expiry
//! is reached without waiting for it.
//!
//! The bottom layer: uses nothing of the crate, and everything may use it.

pub mod deadline;
pub mod http_date;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix seconds now, by the system clock. For code that is given no [`Clock`] (tests that build
/// sessions for a proxy on the system clock); everything else asks its [`Clock`].
pub fn now() -> u64 {
    since_epoch().as_secs()
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix seconds now. Cheap to clone; clones of a test clock move together.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Debug, Default)]
enum Source {
    /// The system clock, read at every call.
    #[default]
    System,
    #[cfg(any(test, feature = "test-support"))]
    Test(std::sync::Arc<testing::Time>),
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock {
            source: Source::System,
        }
    }

    /// Unix seconds now.
    pub fn now(&self) -> u64 {
        match &self.source {
            Source::System => now(),
            #[cfg(any(test, feature = "test-support"))]
            Source::Test(time) => time.now().as_secs(),
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
pub use testing::TestClock;

#[cfg(any(test, feature = "test-support"))]
mod testing {
    use super::{Clock, Source, since_epoch};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Debug)]
    pub(super) struct Time {
        /// The system time when the clock was made.
        base: Duration,
        /// tokio's time then: a test with paused time moves the clock with `advance`.
        started: tokio::time::Instant,
        /// How far the test has moved this clock ahead of tokio's.
        ahead: Mutex<Duration>,
    }

    impl Time {
        pub(super) fn now(&self) -> Duration {
            let ahead = *self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            self.base + self.started.elapsed() + ahead
        }
    }

    /// A clock for tests: starts at the system time and follows tokio's clock from there (so
    /// `tokio::time::pause` and `advance` move it), plus whatever [`TestClock::advance`] adds —
    /// for tests with real sockets and processes, where tokio's time must keep running.
    /// Never for release builds (feature `test-support`).
    #[derive(Clone, Debug)]
    pub struct TestClock {
        time: Arc<Time>,
    }

    impl Default for TestClock {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestClock {
        /// Must be called inside a tokio runtime.
        pub fn new() -> TestClock {
            TestClock {
                time: Arc::new(Time {
                    base: since_epoch(),
                    started: tokio::time::Instant::now(),
                    ahead: Mutex::new(Duration::ZERO),
                }),
            }
        }

        /// Moves this clock (and every [`Clock`] made from it) ahead by `by`, at once.
        pub fn advance(&self, by: Duration) {
            *self.time.ahead.lock().unwrap_or_else(|p| p.into_inner()) += by;
        }

        /// The [`Clock`] to hand to the code under test.
        pub fn clock(&self) -> Clock {
            Clock {
                source: Source::Test(self.time.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_is_the_system_time() {
        let before = now();
        let read = Clock::system().now();
        assert!(before <= read && read <= now(), "{before} {read}");
        assert!(read > 1_600_000_000, "not Unix seconds: {read}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_test_clock_follows_paused_tokio_time_without_sleeping() {
        let test = TestClock::new();
        let clock = test.clock();
        let t0 = clock.now();
        let system = now();
        assert!(t0.abs_diff(system) <= 1, "{t0} vs {system}");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), t0 + 3600);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(clock.now(), t0 + 3660);
    }

    #[tokio::test(start_paused = true)]
    async fn advancing_a_test_clock_moves_every_clone() {
        let test = TestClock::new();
        let (a, b) = (test.clock(), test.clock().clone());
        let t0 = a.now();
        test.clone().advance(Duration::from_secs(90));
        assert_eq!(a.now(), t0 + 90);
        assert_eq!(b.now(), t0 + 90);
        // A clock of another test clock is not moved.
        let other = TestClock::new().clock();
        assert!(other.now() < t0 + 90);
    }
}
