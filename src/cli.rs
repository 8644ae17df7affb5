//! The command line: run, `check`, `keygen`, `health`. Loads configuration without binding
//! sockets, so `check` is safe anywhere.

use crate::app::App;
use crate::config::{Config, DEFAULT_CONFIG_PATH};
use base64::Engine;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "vestibule",
    version,
    about = "A Backend-for-Frontend reverse proxy: OpenID Connect login on the server, tokens never in the browser."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "VESTIBULE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration file and print every problem with its TOML path.
    Check {
        /// Also fetch the issuer's discovery document and key set.
        #[arg(long)]
        online: bool,
    },
    /// Print a fresh random base64 session key.
    Keygen,
    /// Probe the admin /healthz endpoint; exit 0 when healthy, 1 otherwise.
    Health {
        /// URL to probe; by default derived from [admin] listen, or http://127.0.0.1:9091/healthz.
        #[arg(long)]
        url: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Keygen) => keygen(),
        Some(Command::Check { online }) => check(&cli.config, online),
        Some(Command::Health { url }) => health(&cli.config, url),
        None => run(&cli.config),
    }
}

/// Whether the operator asked the allocator for large OS pages: `MIMALLOC_ALLOW_LARGE_OS_PAGES`
/// (or its older name `MIMALLOC_LARGE_OS_PAGES`) set empty or to `1`, `true`, `yes` or `on`, as
/// mimalloc reads it. The binary then leaves transparent huge pages on for the process (they are
/// turned off otherwise, before anything is allocated), and mimalloc asks the kernel for them
/// (`madvise`): each huge page maps 2 MiB where a page maps 4 KiB, so a request that reads the
/// cache entries of one session among many misses the TLB less often (docs/benchmarks.md,
/// round 37), at the cost of resident memory.
pub fn huge_pages_asked() -> bool {
    ["MIMALLOC_ALLOW_LARGE_OS_PAGES", "MIMALLOC_LARGE_OS_PAGES"]
        .iter()
        .filter_map(std::env::var_os)
        .any(|value| {
            let value = value.to_string_lossy().to_ascii_lowercase();
            matches!(value.as_str(), "" | "1" | "true" | "yes" | "on")
        })
}

fn keygen() -> ExitCode {
    let mut key = [0u8; 32];
    if getrandom::fill(&mut key).is_err() {
        eprintln!("error: the system random generator failed");
        return ExitCode::from(1);
    }
    println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
    ExitCode::SUCCESS
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            eprintln!(
                "{}: {} problem{} found:",
                path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            for error in &errors.0 {
                eprintln!("  - {error}");
            }
            None
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            None
        }
    }
}

fn check(path: &std::path::Path, online: bool) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    // The key or assertion file parses, not only exists.
    if let Err(error) = crate::oidc::client_auth::Credential::load(&config.oidc) {
        eprintln!("{}: {error}", path.display());
        return ExitCode::from(1);
    }
    for warning in config.warnings() {
        eprintln!("{}: warning: {warning}", path.display());
    }
    if online {
        let Some(rt) = runtime() else {
            return ExitCode::from(1);
        };
        match rt.block_on(crate::app::check_provider(&config)) {
            Ok(warnings) => {
                for warning in warnings {
                    eprintln!("{}: warning: {warning}", path.display());
                }
            }
            Err(error) => {
                for line in error.to_string().lines() {
                    eprintln!("{}: {line}", path.display());
                }
                return ExitCode::from(1);
            }
        }
    }
    println!("{}: OK ({} routes)", path.display(), config.routes.len());
    ExitCode::SUCCESS
}

fn health(path: &std::path::Path, url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let admin = Config::load(path).ok().map(|c| c.admin.listen);
        match admin {
            Some(addr) if addr.ip().is_unspecified() => {
                format!("http://127.0.0.1:{}/healthz", addr.port())
            }
            Some(addr) => format!("http://{addr}/healthz"),
            None => "http://127.0.0.1:9091/healthz".into(),
        }
    });
    let Some(rt) = runtime() else {
        return ExitCode::from(1);
    };
    let ok = rt.block_on(async {
        let Ok(uri) = url.parse::<http::Uri>() else { return false };
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let request = client.get(uri);
        matches!(tokio::time::timeout(std::time::Duration::from_secs(3), request).await, Ok(Ok(r)) if r.status().is_success())
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("unhealthy: {url}");
        ExitCode::from(1)
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(1);
    };
    crate::telemetry::init_logging(&config.log);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if huge_pages_asked() {
        tracing::info!(
            "transparent huge pages are allowed for the heap (MIMALLOC_ALLOW_LARGE_OS_PAGES): \
             less CPU per request with many sessions, more resident memory"
        );
    }
    // Requests are served by the server's own worker threads; this runtime runs the accept
    // loop, the admin listener, signals and background work (store connections, reloads).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vestibule-main")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let bound = crate::server::bind(&config).await?;
        let app = App::start(config, path.to_path_buf()).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(app.clone(), shutdown.clone()));
        crate::server::serve(app, bound, shutdown).await
    });
    // The runtime's threads are done logging; the log's queue is written out before the exit
    // (and before the error printed directly, which follows the lines logged before it). A
    // look at the files stuck on a hung mount holds a blocking thread, which is not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => {
            crate::telemetry::flush_logs();
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!("vestibule stopped: {error:#}");
            crate::telemetry::flush_logs();
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

async fn signals(app: std::sync::Arc<App>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let reloads = match reloader(app) {
        Ok(reloads) => Some(reloads),
        Err(error) => {
            tracing::error!("cannot start the reload thread, SIGHUP is ignored: {error}");
            None
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Full: one is already waiting behind the reload under way, and will read the
                // files as they are by then.
                if let Some(reloads) = &reloads {
                    let _ = reloads.try_send(());
                }
            }
        }
    }
    shutdown.cancel();
}

/// A thread of its own that reloads once for each message: a reload reads files, and one that
/// blocks (a hung mount) must hold neither this runtime's one thread — the accept loop, the
/// admin listener, these signals — nor a SIGTERM. It ends when the sender is dropped (or, stuck,
/// with the process).
fn reloader(app: std::sync::Arc<App>) -> std::io::Result<std::sync::mpsc::SyncSender<()>> {
    let (reloads, asked) = std::sync::mpsc::sync_channel(1);
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("vestibule-reload".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            while asked.recv().is_ok() {
                app.reload("SIGHUP");
            }
        })?;
    Ok(reloads)
}
