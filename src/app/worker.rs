//! What one serving worker owns, as a value: the server makes one per worker thread (each a
//! single-threaded runtime) and passes it with every request that worker handles, down to
//! forwarding and to the session store. Nothing below looks up "the current worker".
//!
//! Per worker — connections, because a connection's I/O is driven by the runtime that opened it,
//! and one used from another thread costs a lock and a cross-thread wake-up per request:
//! - the upstream clients ([`Upstreams::for_worker`]): a pooled client and an HTTP/1.1 pool;
//! - the session store handle ([`Sessions::for_worker`]): on a standalone Redis server, a
//!   connection of its own;
//! - coarse deadlines ([`Deadlines`]): upstream answers' and its connections' header read timeout.
//!
//! Process-wide, in [`App`] — state whose meaning is the whole process's, so splitting it would
//! change behaviour, not just speed:
//! - the session cache: a session opened on one worker is cached for the next request, whichever
//!   worker takes it, and one invalidation message (pub/sub) clears it for all;
//! - the token maps (single-flight refresh queues, client-credentials tokens): one refresh per
//!   session and one client token per resource for the process, not per worker;
//! - the metrics and the rate limiter: counted for the process, as `/metrics` reports them;
//! - tunnels (tracked for the drain) and the hot-swappable configuration.
//!
//! Code off the workers (admin endpoints, reloads, pub/sub, background tasks) uses the
//! process-wide values in [`App`] directly.

use super::App;
use crate::clock::deadline::Deadlines;
use crate::proxy::Upstreams;
use crate::session::manager::Sessions;
use std::sync::Arc;

/// One serving worker's own upstream clients, session store handle and coarse deadlines.
pub struct Worker {
    pub upstreams: Upstreams,
    pub sessions: Arc<Sessions>,
    /// Upstream answers' deadlines and the HTTP/1 header read timeout of its connections.
    pub deadlines: Arc<Deadlines>,
}

impl Worker {
    /// A new worker's connections, made on its own thread so that they are driven there.
    pub fn new(app: &App) -> Worker {
        let deadlines = Arc::new(Deadlines::default());
        Worker {
            upstreams: app.upstreams.for_worker(deadlines.clone()),
            sessions: Arc::new(app.sessions.for_worker()),
            deadlines,
        }
    }
}
