//! Logging and metrics. Logs never carry cookies, authorization headers or query strings: the
//! access log records the path only, and [`Redacted`] masks sensitive headers wherever headers
//! are logged.

use crate::config::{LogConfig, LogFormat};
use http::HeaderMap;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::fmt;
use std::sync::OnceLock;

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
        handle
    })
}

const SENSITIVE: &[&str] = &[
    "cookie",
    "set-cookie",
    "authorization",
    "proxy-authorization",
];

/// A view of headers for logs that masks cookies and credentials.
pub struct Redacted<'a>(pub &'a HeaderMap);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.0 {
            if SENSITIVE.contains(&name.as_str()) {
                map.entry(&name.as_str(), &"[redacted]");
            } else {
                map.entry(&name.as_str(), &value.to_str().unwrap_or("[binary]"));
            }
        }
        map.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_headers_hide_credentials() {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "__Host-vestibule=secretvalue".parse().unwrap());
        headers.insert("authorization", "Bearer tok".parse().unwrap());
        headers.insert("accept", "text/html".parse().unwrap());
        let shown = format!("{:?}", Redacted(&headers));
        assert!(!shown.contains("secretvalue") && !shown.contains("tok\""));
        assert!(shown.contains("text/html"));
    }
}
