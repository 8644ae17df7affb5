//! Logging and metrics. Logs never carry cookies, authorization headers or query strings: the
//! access log records the path only, and no log line prints a header map.

use crate::config::{LogConfig, LogFormat};
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Duration;

/// Installs the global log subscriber (once; later calls are ignored).
pub fn init_logging(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder; installed on first use.
pub fn metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        metrics::gauge!("vestibule_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        metrics::describe_counter!(
            "vestibule_requests_total",
            "Requests handled, by route and status."
        );
        metrics::describe_histogram!(
            "vestibule_request_duration_seconds",
            "Request latency, by route and status."
        );
        metrics::describe_counter!(
            "vestibule_upstream_errors_total",
            "Upstream failures, by route and kind."
        );
        metrics::describe_counter!(
            "vestibule_token_grants_total",
            "Grants at the provider's token endpoint for upstream tokens (refresh_token, \
             token_exchange, client_credentials), by outcome (ok, rejected, unavailable)."
        );
        metrics::describe_gauge!(
            "vestibule_requests_in_flight",
            "Requests being handled now."
        );
        metrics::describe_gauge!(
            "vestibule_connections_open",
            "Client connections open now, by serving worker."
        );
        handle
    })
}

/// Folds recorded histogram samples into their buckets every few seconds. The exporter keeps
/// every raw sample until this runs (or `/metrics` is scraped), so without it memory grows with
/// each request when nobody scrapes.
pub fn spawn_upkeep() {
    let handle = metrics();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Per-route, per-status request metrics with their handles kept: looking a labelled metric up
/// in the registry (owned label strings, key hashing) costs more than recording into it.
pub struct RequestMetrics {
    in_flight: Gauge,
    by_route: RwLock<HashMap<String, HashMap<u16, Handles>>>,
}

/// The request counter and duration histogram of one route and status.
type Handles = (Counter, Histogram);

/// One request in the in-flight gauge; leaves it when dropped, also when the client goes away
/// and the request's future is dropped half-way.
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub fn enter(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Handles kept at most (route names come from the configuration, statuses are few).
const MAX_CACHED_HANDLES: usize = 4096;

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestMetrics {
    /// Registers with the global recorder: call after [`metrics`] has installed it.
    pub fn new() -> Self {
        RequestMetrics {
            in_flight: metrics::gauge!("vestibule_requests_in_flight"),
            by_route: RwLock::new(HashMap::new()),
        }
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Counts one finished request and records its duration.
    pub fn record(&self, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        {
            let map = self.by_route.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((counter, histogram)) = map.get(route).and_then(|m| m.get(&status)) {
                counter.increment(1);
                histogram.record(seconds);
                return;
            }
        }
        let status_label = status.to_string();
        let counter = metrics::counter!("vestibule_requests_total", "route" => route.to_string(), "status" => status_label.clone());
        let histogram = metrics::histogram!("vestibule_request_duration_seconds", "route" => route.to_string(), "status" => status_label);
        counter.increment(1);
        histogram.record(seconds);
        let mut map = self
            .by_route
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.values().map(HashMap::len).sum::<usize>() < MAX_CACHED_HANDLES {
            map.entry(route.to_string())
                .or_default()
                .insert(status, (counter, histogram));
        }
    }
}
