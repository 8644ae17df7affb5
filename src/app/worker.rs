//! What one serving worker owns, as a value: the server makes one per worker thread (each a
//! single-threaded runtime) and passes it with every request that worker handles, down to
//! forwarding and to the session store. Nothing below looks up "the current worker".
//!
//! Per worker — connections, because a connection's I/O is driven by the runtime that opened it,
//! and one used from another thread costs a lock and a cross-thread wake-up per request:
//! - the upstream clients ([`Upstreams::for_worker`]): a pooled client and an HTTP/1.1 pool;
//! - the session store handle ([`Sessions::for_worker`]): on a standalone Redis server, a
//!   connection of its own;
//! - coarse deadlines ([`Deadlines`]): upstream answers' and its connections' header read timeout;
//! - its view of the hot-swappable configuration ([`Worker::live`]): a reference of its own to
//!   the current [`LiveConfig`], so that a request takes and drops a reference count no other
//!   worker writes;
//! - the numbers of the request ids it makes ([`RequestIds`]), a block at a time;
//! - the request metrics' handles and pending samples ([`WorkerMetrics`]): handed to the
//!   process-wide series in batches and before every scrape, so `/metrics` reads the process's
//!   totals while no request writes what another worker writes.
//!
//! Process-wide, in [`App`] — state whose meaning is the whole process's, so splitting it would
//! change behaviour, not just speed:
//! - the session cache: a session opened on one worker is cached for the next request, whichever
//!   worker takes it, and one invalidation message (pub/sub) clears it for all;
//! - the token maps (single-flight refresh queues, client-credentials tokens): one refresh per
//!   session and one client token per resource for the process, not per worker;
//! - the rate limiter: counted for the process;
//! - tunnels (tracked for the drain) and the hot-swappable configuration.
//!
//! Code off the workers (admin endpoints, reloads, pub/sub, background tasks) uses the
//! process-wide values in [`App`] directly.

use super::App;
use crate::clock::deadline::Deadlines;
use crate::proxy::Upstreams;
use crate::proxy::headers::RequestIds;
use crate::session::manager::Sessions;
use crate::state::LiveConfig;
use crate::telemetry::WorkerMetrics;
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex, PoisonError};

/// One serving worker's own upstream clients, session store handle, coarse deadlines and
/// request metrics.
pub struct Worker {
    pub upstreams: Upstreams,
    pub sessions: Arc<Sessions>,
    /// Upstream answers' deadlines and the HTTP/1 header read timeout of its connections.
    pub deadlines: Arc<Deadlines>,
    /// Requests in flight, counted and timed, by route and status.
    pub metrics: Arc<WorkerMetrics>,
    /// Numbers for the request ids it makes.
    pub request_ids: RequestIds,
    /// Buffers its connections write answers from.
    pub buffers: crate::reply::Buffers,
    /// The configuration this worker's requests last took, and this worker's own reference to
    /// it (see [`Worker::live`]); `None` before the first request.
    live: Mutex<Option<SeenConfig>>,
}

/// A configuration as the shared slot held it, and this worker's own reference to it.
type SeenConfig = (Arc<LiveConfig>, Arc<Arc<LiveConfig>>);

impl Worker {
    /// A new worker's connections, made on its own thread so that they are driven there.
    pub fn new(app: &App) -> Worker {
        let deadlines = Arc::new(Deadlines::default());
        Worker {
            upstreams: app.upstreams.for_worker(deadlines.clone()),
            sessions: Arc::new(app.sessions.for_worker()),
            deadlines,
            metrics: WorkerMetrics::new(),
            request_ids: RequestIds::default(),
            buffers: crate::reply::Buffers::default(),
            live: Mutex::new(None),
        }
    }

    /// The configuration now in `shared`, for one request. Every request holds the
    /// configuration it started with (a reload does not change it half-way); taken with
    /// `load_full`, that is a reference count every worker increments and decrements on every
    /// request, a cache line bouncing between cores. Here each worker counts references to a
    /// wrapper of its own, made again when `shared` holds another configuration (a reload).
    pub fn live(&self, shared: &ArcSwap<LiveConfig>) -> Arc<Arc<LiveConfig>> {
        let current = shared.load();
        let mut seen = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        match &*seen {
            Some((config, local)) if Arc::ptr_eq(config, &current) => local.clone(),
            _ => {
                let config = arc_swap::Guard::into_inner(current);
                let local = Arc::new(config.clone());
                *seen = Some((config, local.clone()));
                local
            }
        }
    }
}
