//! What the accept loop admits a connection by: a place under `server.max_connections` (waited
//! for, in the kernel's backlog) and one of its client address's share,
//! `server.max_connections_per_client` (not waited for: the connection is closed at once).

use crate::limits::{ClientConnections, ClientPlace, RefusalLog};
use crate::state::LiveConfig;
use arc_swap::ArcSwap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

pub(super) struct Gate {
    /// One permit per connection `server.max_connections` allows.
    pub(super) slots: Arc<Semaphore>,
    /// `None`: `max_connections_per_client = 0`.
    pub(super) per_client: Option<PerClient>,
}

pub(super) struct PerClient {
    open: Arc<ClientConnections>,
    /// The configuration in effect, for `trusted_proxies` (applied on reload).
    live: Arc<ArcSwap<LiveConfig>>,
    refused: metrics::Counter,
    log: RefusalLog,
}

impl PerClient {
    pub(super) fn new(cap: usize, live: Arc<ArcSwap<LiveConfig>>) -> Self {
        PerClient {
            open: ClientConnections::new(cap),
            live,
            refused: metrics::counter!("vestibule_connections_refused_total", "reason" => "per_client"),
            log: RefusalLog::default(),
        }
    }
}

/// The connection from `peer` is over its address's share and must be closed unserved.
pub(super) struct Refused;

impl Gate {
    /// The place in its address's share a connection from `peer` holds while open: `None` when
    /// nothing is counted (no cap, or a trusted proxy, which carries every client's connections
    /// behind it), `Err` when the address holds its share already. A refusal is counted in
    /// `vestibule_connections_refused_total` and logged at most once a minute.
    pub(super) fn place(&mut self, peer: IpAddr) -> Result<Option<ClientPlace>, Refused> {
        let Some(per_client) = &mut self.per_client else {
            return Ok(None);
        };
        let live = per_client.live.load();
        let trusted = &live.config.server.trusted_proxies;
        if trusted.iter().any(|net| net.contains(&peer)) {
            return Ok(None);
        }
        if let Some(place) = per_client.open.admit(peer) {
            return Ok(Some(place));
        }
        per_client.refused.increment(1);
        if let Some(refused) = per_client.log.refused(Instant::now()) {
            tracing::warn!(
                client = %peer,
                refused,
                "connections refused: the client address holds server.max_connections_per_client \
                 ({}) already (an IPv6 address counts by its /64); {refused} refused since the \
                 last such line, logged at most once a minute",
                per_client.open.cap()
            );
        }
        Err(Refused)
    }
}
