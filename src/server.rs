//! Listeners: the public one (HTTP/1.1 and HTTP/2, optional TLS) and the admin one, with
//! header-read timeouts, TCP_NODELAY, and graceful shutdown that lets in-flight requests and
//! tunnels finish within `shutdown_grace`.

pub mod admin;
pub mod tls;

use crate::app::App;
use crate::config::Config;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Sockets bound before serving, so callers learn the real ports (port 0 in tests).
pub struct Bound {
    pub public: TcpListener,
    pub admin: TcpListener,
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    let public = TcpListener::bind(config.server.listen).await?;
    let admin = TcpListener::bind(config.admin.listen).await?;
    Ok(Bound {
        public_addr: public.local_addr()?,
        admin_addr: admin.local_addr()?,
        public,
        admin,
    })
}

fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.server.header_read_timeout)
        .max_buf_size((config.server.max_header_size * 2).max(16 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.server.max_header_size * 2).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

/// Serves until `shutdown` is cancelled, then drains within the grace period.
pub async fn serve(app: Arc<App>, bound: Bound, shutdown: CancellationToken) -> anyhow::Result<()> {
    let runtime = app.runtime.load_full();
    let config = runtime.config.clone();
    let tls = match &config.server.tls {
        Some(tls) => Some(tls::acceptor(tls)?),
        None => None,
    };
    let graceful = Arc::new(GracefulShutdown::new());
    let builder = Arc::new(builder(&config));
    let admin_task = tokio::spawn(admin::serve(app.clone(), bound.admin, shutdown.clone()));
    tracing::info!(public = %bound.public_addr, admin = %bound.admin_addr, "vestibule listening");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = bound.public.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let graceful = graceful.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let ip = peer.ip();
            match tls {
                None => {
                    let service = service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(app.handle(req, ip, false).await) }
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    let _ = graceful.watch(conn.into_owned()).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(app.handle(req, ip, true).await) }
                    });
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = graceful.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(bound.public);
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight requests");
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
    let drained = tokio::time::timeout(config.server.shutdown_grace, async {
        graceful.shutdown().await;
        app.upstreams.tunnels.close();
        app.upstreams.tunnels.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    let _ = admin_task.await;
    Ok(())
}
