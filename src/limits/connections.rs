//! Open connections per client address: one address (an IPv6 one by its /64, as the rate limits
//! count it) may hold at most its share of the listener, so that it cannot take every place
//! under `max_connections` with idle keep-alive connections, event streams or WebSocket tunnels
//! and leave everyone else waiting in the backlog.
//!
//! Knows nothing of sockets or of trusted proxies: the accept loop asks for a [`ClientPlace`]
//! before it serves a connection and keeps it for as long as the connection is open; dropping
//! it, however the connection ended, gives the place back. Only addresses with a connection open
//! are remembered, so the table is never larger than the listener's open connections.

use super::client::client_key;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Open connections by client address, each address up to `cap`. Shared by the accept loop
/// (which takes places) and every worker (whose connections give them back).
pub struct ClientConnections {
    cap: usize,
    open: Mutex<HashMap<u128, usize>>,
}

impl std::fmt::Debug for ClientConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientConnections(cap: {})", self.cap)
    }
}

/// One open connection's place in its address's share; given back when dropped.
pub struct ClientPlace {
    table: Arc<ClientConnections>,
    key: u128,
}

impl ClientConnections {
    /// At most `cap` connections open from each address (at least one).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(ClientConnections {
            cap: cap.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// A place for one more connection from `addr`, or `None` when it holds `cap` already.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Option<ClientPlace> {
        let key = client_key(addr);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let held = open.entry(key).or_insert(0);
        if *held >= self.cap {
            return None;
        }
        *held += 1;
        Some(ClientPlace {
            table: self.clone(),
            key,
        })
    }

    /// Connections open from `addr` (its /64 for IPv6).
    #[cfg(test)]
    fn open(&self, addr: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&client_key(addr)).copied().unwrap_or(0)
    }

    /// Addresses with a connection open.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        let mut open = (self.table.open.lock()).unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// How often at most a refusal is logged: a client hammering at its cap would otherwise write
/// a line for each connection it tries.
pub const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(60);

/// Refusals since the last one logged, so that at most one line a [`REFUSALS_LOGGED_EVERY`]
/// says how many there were.
#[derive(Debug, Default)]
pub struct RefusalLog {
    logged: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts one refusal at `now`; `Some(n)` when it is to be logged, `n` refusals since the
    /// last line (this one included).
    pub fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= REFUSALS_LOGGED_EVERY);
        if !due {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_holds_up_to_its_cap_and_each_place_given_back_is_its_own_again() {
        let table = ClientConnections::new(2);
        let client = ip("203.0.113.7");
        let first = table.admit(client).expect("first");
        let second = table.admit(client).expect("second");
        assert!(table.admit(client).is_none(), "a third past a cap of 2");
        // Another address has a share of its own.
        let other = table.admit(ip("203.0.113.8")).expect("another address");
        assert_eq!((table.open(client), table.addresses()), (2, 2));
        drop(first);
        assert_eq!(table.open(client), 1);
        let again = table.admit(client).expect("a place given back");
        assert!(table.admit(client).is_none());
        drop((second, again, other));
        // Nothing is left behind: the table holds only addresses with a connection open.
        assert_eq!((table.open(client), table.addresses()), (0, 0));
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_one_cap_and_ipv4_mapped_is_ipv4() {
        let table = ClientConnections::new(1);
        let _held = table.admit(ip("2001:db8:1:2::1")).expect("first");
        assert!(
            table.admit(ip("2001:db8:1:2:ffff::9")).is_none(),
            "another address of the same /64"
        );
        let _next = table
            .admit(ip("2001:db8:1:3::1"))
            .expect("the next /64 is another client");
        let _v4 = table.admit(ip("192.0.2.1")).expect("an IPv4 client");
        assert!(table.admit(ip("::ffff:192.0.2.1")).is_none());
    }

    /// Places are given back from the workers' threads while the accept loop takes them: the
    /// count ends at zero, never below (a lost decrement) or above (a leaked one), whatever the
    /// interleaving.
    #[test]
    fn places_taken_and_given_back_on_many_threads_add_up_to_nothing() {
        let table = ClientConnections::new(usize::MAX);
        let client = ip("198.51.100.1");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        let place = table.admit(client).expect("no cap");
                        drop(place);
                    }
                })
            })
            .collect();
        let held: Vec<_> = (0..100).map(|_| table.admit(client).unwrap()).collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(table.open(client), 100);
        drop(held);
        assert_eq!((table.open(client), table.addresses()), (0, 0));
    }

    #[test]
    fn a_cap_below_one_is_one() {
        let table = ClientConnections::new(0);
        let _held = table.admit(ip("192.0.2.1")).expect("one");
        assert!(table.admit(ip("192.0.2.1")).is_none());
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_minute_with_how_many_there_were() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        assert_eq!(log.refused(start), Some(1), "the first is logged at once");
        for n in 1..10 {
            assert_eq!(log.refused(start + Duration::from_secs(n)), None);
        }
        assert_eq!(log.refused(start + REFUSALS_LOGGED_EVERY), Some(10));
        assert_eq!(log.refused(start + REFUSALS_LOGGED_EVERY), None);
    }
}
