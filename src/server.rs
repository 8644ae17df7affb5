//! Listeners: the public one (HTTP/1.1 and HTTP/2, optional TLS; served by worker threads) and
//! the admin one, with header-read timeouts, TCP_NODELAY, caps on open connections (in all and
//! per client address), and graceful shutdown that lets in-flight requests and tunnels finish
//! within `shutdown_grace`.
//!
//! Shutdown (SIGTERM) goes in this order, so that a load balancer loses no request:
//! 1. `/readyz` answers 503 (the admin listener keeps serving until the end);
//! 2. the public listener closes: new connections are refused and go to another replica;
//! 3. for [`DRAIN_LINGER`], open connections are still served, and every HTTP/1 answer carries
//!    `Connection: close`, so a client learns to reconnect elsewhere instead of sending on a
//!    connection that is being closed;
//! 4. the rest drains gracefully: idle connections close, in-flight requests and tunnels
//!    finish within `shutdown_grace`, and so do token refreshes under way, also those whose
//!    request is gone: a provider's answer may carry a rotated refresh token that exists
//!    nowhere else until it is saved.

pub mod admin;
mod connection;
pub mod framing;
mod gate;
pub mod heartbeat;
pub mod lane;
mod send;
pub mod tls;

use crate::app::App;
use crate::config::Config;
use crate::limits::ClientPlace;
use crate::proxy::forward::ConnectionHold;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use metrics::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Sockets bound before serving, so callers learn the real ports (port 0 in tests).
pub struct Bound {
    pub public: TcpListener,
    pub admin: TcpListener,
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    // A failure names the listener's key and address: the system's error alone ("Address
    // already in use") leaves the operator to guess which of the two it was.
    let listen = |key: &'static str, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("{key}: cannot listen on {addr}: {e}"))
        })
    };
    let public = listen("server.listen", config.server.listen).await?;
    let admin = listen("admin.listen", config.admin.listen).await?;
    Ok(Bound {
        public_addr: public.local_addr()?,
        admin_addr: admin.local_addr()?,
        public,
        admin,
    })
}

fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let limits = &config.server.connections;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Each worker replaces this timer with one on its own coarse deadlines (`work`).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout)
        .max_buf_size((config.server.max_header_size * 2).max(16 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.server.max_header_size * 2).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    builder
}

/// Serves until `shutdown` is cancelled, then drains within the grace period.
///
/// Connections are accepted here and handed to `server.workers` serving threads, each with a
/// single-threaded runtime and its own upstream pool, like nginx's worker processes: a request
/// is handled start to finish on one thread, with no work stealing or cross-thread wake-ups.
/// Each new connection goes to the worker with the fewest open connections. With
/// `server.max_connections` open, the next connection waits to be accepted (in the kernel's
/// backlog) until one closes; open connections are not disturbed. A client address (not a
/// trusted proxy) with `server.max_connections_per_client` open has its next one closed at once:
/// waiting in the backlog, it would hold up everyone else's behind it.
pub async fn serve(app: Arc<App>, bound: Bound, shutdown: CancellationToken) -> anyhow::Result<()> {
    let live = app.live.load_full();
    let config = live.config.clone();
    let tls = match &config.server.tls {
        Some(tls) => Some(tls::acceptor(tls)?),
        None => None,
    };
    let count = worker_count(&config);
    let timeouts = connection::Timeouts {
        idle: config.server.connections.idle_timeout,
        send: config.server.connections.send_timeout,
        head: config.server.header_read_timeout,
        cancels: usize::try_from(config.server.connections.http2_max_concurrent_streams)
            .unwrap_or(usize::MAX),
    };
    let kit = Arc::new(ServeKit {
        app: app.clone(),
        builder: builder(&config),
        tls,
        grace: config.server.shutdown_grace,
        timeouts,
        lane: lane::Limits {
            head_timeout: config.server.header_read_timeout,
            timeouts,
            max_head: (config.server.max_header_size * 2).max(16 * 1024),
            max_fields: config.server.max_header_size,
        },
    });
    let limits = &config.server.connections;
    let mut gate = gate::Gate {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        per_client: (limits.max_connections_per_client > 0)
            .then(|| gate::PerClient::new(limits.max_connections_per_client, app.live.clone())),
    };
    let beats = Arc::new(heartbeat::Heartbeats::new(count));
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        workers.push(Worker::start(index, kit.clone(), &beats, shutdown.clone())?);
    }
    // The admin listener outlives the drain, so that `/readyz` keeps saying 503 meanwhile.
    let admin_stop = CancellationToken::new();
    let admin = admin::serve(app.clone(), bound.admin, beats, admin_stop.clone());
    let admin_task = tokio::spawn(admin);
    tracing::info!(public = %bound.public_addr, admin = %bound.admin_addr, workers = count, "vestibule listening");
    let accepting = accept(&bound.public, &workers, &mut gate, &shutdown).await;
    // Not ready any more, before anything else changes.
    app.stopping.cancel();
    drop(bound.public);
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight requests");
    for worker in workers {
        let _ = worker.finished.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    accepting
}

/// Accepts connections on `listener` and hands each to the least busy live worker, one slot of
/// the gate's each (and a place in its client address's share), until `shutdown` is cancelled;
/// `Err` once no worker is left alive.
async fn accept(
    listener: &TcpListener,
    workers: &[Worker],
    gate: &mut gate::Gate,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            slot = gate.slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return Ok(()) };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A listener on `[::]` takes IPv4 connections too, their peers IPv4-mapped
        // (`::ffff:10.0.0.1`): read as the IPv4 address they are, or no IPv4 network in
        // `trusted_proxies` would contain the proxy in front, and every client behind it
        // would share its one address (rate limits, the access log).
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // Over its share: closed before any TLS or HTTP work, with a reset rather than a
        // close that would leave this side a TIME_WAIT for each one refused. Its slot goes back.
        let Ok(place) = gate.place(peer.ip()) else {
            let _ = tcp.set_zero_linger();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(tcp) = tcp.into_std() else { continue };
        // Every worker's thread gone (each panicked): nothing here serves any more. Ending
        // closes the listener and the process exits 1, so that the load balancer sends
        // elsewhere and the supervisor restarts it, rather than every connection being taken
        // and dropped until a liveness probe gives up.
        let Some(worker) = least_busy(workers) else {
            anyhow::bail!("every serving worker has stopped (its thread ended); exiting");
        };
        worker.assign(tcp, peer, slot, place);
    }
}

/// The worker with the fewest open connections among those still running. A worker whose
/// thread has died (a panic in its loop) counts none: chosen by the count alone, it would be
/// handed nearly every new connection, each dropped unserved.
fn least_busy(workers: &[Worker]) -> Option<&Worker> {
    workers
        .iter()
        .filter(|w| !w.connections.is_closed())
        .min_by_key(|w| w.counter.open())
}

/// How long open connections are still served once shutdown begins (at most half the grace
/// period), each HTTP/1 answer closing its connection, before idle ones are closed.
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// One worker per CPU available to the process unless `server.workers` says otherwise.
fn worker_count(config: &Config) -> usize {
    config.server.worker_count()
}

/// What every worker needs to serve a connection.
struct ServeKit {
    app: Arc<App>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    grace: Duration,
    timeouts: connection::Timeouts,
    /// Limits of the HTTP/1 lane on plain connections.
    lane: lane::Limits,
}

/// A connection handed to a worker, counted as open from the hand-over on.
type Handoff = (std::net::TcpStream, SocketAddr, CountedConnection);

/// A serving thread, seen from the accept loop.
struct Worker {
    connections: mpsc::UnboundedSender<Handoff>,
    /// Connections it is serving now.
    counter: ConnectionCount,
    /// Resolves once it has drained and stopped.
    finished: oneshot::Receiver<()>,
}

impl Worker {
    fn start(
        index: usize,
        kit: Arc<ServeKit>,
        beats: &Arc<heartbeat::Heartbeats>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let (connections, incoming) = mpsc::unbounded_channel();
        let (done, finished) = oneshot::channel();
        let gauge = metrics::gauge!("vestibule_connections_open", "worker" => index.to_string());
        gauge.set(0.0);
        let counter = ConnectionCount(Arc::new(AtomicUsize::new(0)), gauge);
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let beats = beats.clone();
        std::thread::Builder::new()
            .name(format!("vestibule-worker-{index}"))
            .spawn(move || {
                executor.block_on(async {
                    // Its runtime turns for as long as this writes its slot (`/healthz`).
                    let ticking = tokio::spawn(beats.clone().tick(index, heartbeat::TICK));
                    work(kit, incoming, shutdown).await;
                    ticking.abort();
                });
                // Drained: its silence from now on is no stall. (A panic skips this.)
                beats.stopped(index);
                // Tasks still running after the grace period (none, normally) are dropped here.
                executor.shutdown_timeout(Duration::from_secs(1));
                let _ = done.send(());
            })?;
        Ok(Worker {
            connections,
            counter,
            finished,
        })
    }

    /// Hands `tcp` over; if the worker has stopped, the connection is dropped (and counted off,
    /// its slot and its place freed).
    fn assign(
        &self,
        tcp: std::net::TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        place: Option<ClientPlace>,
    ) {
        let _ = self
            .connections
            .send((tcp, peer, self.counter.one(slot, place)));
    }
}

/// A worker's count of open connections, as the accept loop and `/metrics` see it.
#[derive(Clone)]
struct ConnectionCount(Arc<AtomicUsize>, Gauge);

impl ConnectionCount {
    fn open(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn one(&self, slot: OwnedSemaphorePermit, place: Option<ClientPlace>) -> CountedConnection {
        self.0.fetch_add(1, Ordering::Relaxed);
        self.1.increment(1.0);
        CountedConnection(self.clone(), place, slot)
    }
}

/// One connection, counted (by the accept loop) when handed over and counted off when dropped,
/// which also gives its slot of `server.max_connections` and its place in its client address's
/// share back: dropped however the connection ends (closed, reset, timed out, a tunnel it
/// became closed, handed over to a worker that stopped), so no place is ever leaked. The place
/// goes back before the slot (fields drop in order): the accept loop, woken by the slot, must
/// find the place free too, or a connection that waited in the backlog for a client at both
/// caps (a small `max_connections`) would be refused rather than served.
struct CountedConnection(
    ConnectionCount,
    #[allow(dead_code)] Option<ClientPlace>,
    #[allow(dead_code)] OwnedSemaphorePermit,
);

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
        self.0.1.decrement(1.0);
    }
}

/// A worker's event loop: serve the connections handed over until shutdown, then drain.
async fn work(
    kit: Arc<ServeKit>,
    mut incoming: mpsc::UnboundedReceiver<Handoff>,
    shutdown: CancellationToken,
) {
    // Made here, so that its connections are driven by this worker's runtime.
    let worker = Arc::new(crate::app::Worker::new(&kit.app));
    // Its HTTP/1 connections wait for request heads on the worker's coarse deadlines.
    let mut builder = kit.builder.clone();
    builder
        .http1()
        .timer(crate::clock::deadline::HeadTimer(worker.deadlines.clone()));
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    // Cancelled once the linger after shutdown is over: then connections close gracefully.
    let close = CancellationToken::new();
    loop {
        let (tcp, peer, guard) = tokio::select! {
            _ = shutdown.cancelled() => break,
            handoff = incoming.recv() => match handoff {
                Some(handoff) => handoff,
                None => break,
            },
        };
        let Ok(tcp) = TcpStream::from_std(tcp) else {
            continue;
        };
        let kit = kit.clone();
        let builder = builder.clone();
        let worker = worker.clone();
        let close = close.clone();
        connections.spawn(async move {
            // Given up when the connection closes, or with the tunnel it became.
            let hold = ConnectionHold {
                place: Arc::new(guard),
                idle: kit.timeouts.idle,
            };
            let app = kit.app.clone();
            let ip = peer.ip();
            match &kit.tls {
                None => {
                    let limits = &kit.lane;
                    lane::serve(&builder, tcp, (app, worker), ip, limits, &close, hold).await;
                }
                Some(acceptor) => {
                    // Boxed: the TLS handshake and hyper's connection are 4.7 KB of future
                    // that every plain connection's task would otherwise be sized for.
                    crate::reply::in_box(|| async {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                .await
                        else {
                            return;
                        };
                        let peer = (ip, true);
                        let timeouts = kit.timeouts;
                        let io = framing::Guarded::new(stream);
                        let worker = (app, worker);
                        connection::serve(&builder, io, worker, peer, timeouts, &close, hold).await;
                    })
                    .await;
                }
            }
        });
    }
    // Connections handed over but not yet taken are closed unanswered, like a full backlog.
    incoming.close();
    while let Ok(unserved) = incoming.try_recv() {
        drop(unserved);
    }
    // Busy clients learn from `Connection: close` on their next answer; then the idle rest close.
    connections.close();
    let linger = DRAIN_LINGER.min(kit.grace / 2);
    let _ = tokio::time::timeout(linger, async {
        while !connections.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    close.cancel();
    let tunnels = &kit.app.upstreams.tunnels;
    let drained = tokio::time::timeout(kit.grace.saturating_sub(linger), async {
        connections.wait().await;
        tunnels.close();
        tunnels.wait().await;
        // Before this worker's runtime, which runs some of them, is dropped.
        kit.app.refreshes_finished().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("grace period over; closing remaining connections and refreshes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker seen from the accept loop with `open` connections, and the receiving end of its
    /// hand-over channel (dropped: the worker's thread is gone).
    fn worker(open: usize) -> (Worker, mpsc::UnboundedReceiver<Handoff>) {
        let (connections, incoming) = mpsc::unbounded_channel();
        let counter = ConnectionCount(
            Arc::new(AtomicUsize::new(open)),
            metrics::gauge!("vestibule_connections_open", "worker" => "test"),
        );
        let finished = oneshot::channel().1;
        let worker = Worker {
            connections,
            counter,
            finished,
        };
        (worker, incoming)
    }

    #[test]
    fn a_dead_worker_is_handed_no_connection_however_idle_it_looks() {
        let (busy, _busy_incoming) = worker(40);
        let (dead, dead_incoming) = worker(0);
        let (quiet, _quiet_incoming) = worker(10);
        drop(dead_incoming);
        let workers = [busy, dead, quiet];
        let chosen = least_busy(&workers).expect("a live worker");
        assert_eq!(chosen.counter.open(), 10, "the quietest live worker");
        let (only_dead, gone) = worker(0);
        drop(gone);
        assert!(least_busy(&[only_dead]).is_none());
    }

    #[tokio::test]
    async fn the_accept_loop_ends_with_an_error_once_every_worker_is_dead() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (first, first_incoming) = worker(0);
        let (second, second_incoming) = worker(3);
        drop((first_incoming, second_incoming));
        let workers = [first, second];
        let mut gate = gate::Gate {
            slots: Arc::new(Semaphore::new(8)),
            per_client: None,
        };
        let shutdown = CancellationToken::new();
        let client = tokio::spawn(async move {
            // Connections keep coming, as from a load balancer that still sends here.
            for _ in 0..50 {
                let _ = TcpStream::connect(addr).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            accept(&listener, &workers, &mut gate, &shutdown),
        )
        .await;
        client.abort();
        let error = match ended {
            Ok(Err(error)) => error.to_string(),
            Ok(Ok(())) => panic!("the accept loop ended as if shut down"),
            Err(_) => panic!(
                "the accept loop still accepts (and drops) connections with every worker dead"
            ),
        };
        assert!(error.contains("every serving worker"), "{error}");
    }
}
