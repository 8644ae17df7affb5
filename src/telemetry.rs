//! Logging, metrics and traces. Logs never carry cookies, authorization headers or query
//! strings: the access log records the canonical path only (bounded), and no log line prints a
//! header map. Every series is listed in `docs/metrics.md`; labels take values from short fixed
//! lists or from the configuration (route names), never from requests or upstreams' answers (a
//! status is counted under its class unless it is a registered one: [`status_key`]).

pub mod log_queue;
pub mod otlp;
pub mod trace;

use crate::config::{LogConfig, LogFormat};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

/// The log's queue to stderr, once [`init_logging`] has installed it.
static LOG_QUEUE: OnceLock<log_queue::Queue> = OnceLock::new();

/// How long [`flush_logs`] waits for stderr to take the lines queued: a stderr that takes
/// nothing does not keep the process from exiting.
pub const LOG_FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Installs the global log subscriber (once; later calls are ignored). Lines go to stderr
/// through a bounded queue and a thread of their own ([`log_queue`]): a stderr nobody reads
/// stops no thread that logs. Without that thread, lines are written to stderr directly.
pub fn init_logging(config: &LogConfig) {
    let filter = log_filter(&config.level);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let Some(queue) = log_queue::Queue::start() else {
        let builder = builder.with_writer(std::io::stderr);
        let _ = match config.format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Pretty => builder.compact().try_init(),
        };
        return;
    };
    let builder = builder.with_writer(queue.clone());
    let installed = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    if installed.is_ok() {
        let _ = LOG_QUEUE.set(queue);
    }
}

/// The log's filter: `[log] level`'s directives.
pub(crate) fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Spans are for the trace exporter's own dispatcher ([`trace`]), never for the log.
    if let Ok(directive) = format!("{}=off", trace::TARGET).parse() {
        filter = filter.add_directive(directive);
    }
    // The count of lines the log lost passes whatever the level: an operator who logs only
    // errors learns that some (errors, perhaps) were dropped. Only lines logged are dropped, so
    // `"off"` still logs nothing.
    if let Ok(directive) = format!("{}=warn", log_queue::TARGET).parse() {
        filter = filter.add_directive(directive);
    }
    filter
}

/// Waits until the log lines queued so far are on stderr (at most [`LOG_FLUSH_WITHIN`]): before
/// the process exits, and before a message printed to stderr directly that should follow them.
pub fn flush_logs() {
    if let Some(queue) = LOG_QUEUE.get() {
        queue.flush(LOG_FLUSH_WITHIN);
    }
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
             token_exchange, client_credentials), by outcome (ok, invalid_grant, refused, \
             client_refused, unavailable, id_token_invalid, subject_changed)."
        );
        metrics::describe_counter!(
            "vestibule_session_cache_lookups_total",
            "Session lookups in the in-process cache, by result (hit, miss); hits are added in \
             batches of up to 32 per shard."
        );
        metrics::describe_gauge!(
            "vestibule_requests_in_flight",
            "Requests being handled now."
        );
        metrics::describe_gauge!(
            "vestibule_connections_open",
            "Client connections open now, by serving worker."
        );
        metrics::describe_counter!(
            "vestibule_connections_refused_total",
            "Client connections closed at accept, unserved, by reason (per_client: the client \
             address held server.max_connections_per_client already)."
        );
        describe_incident_series();
        handle
    })
}

/// The series that explain an incident: sign-ins, refreshes, the store, logouts, refusals and
/// the trace exporter.
fn describe_incident_series() {
    metrics::describe_counter!(
        "vestibule_logins_total",
        "Sign-ins started at the login endpoint, by outcome."
    );
    metrics::describe_counter!(
        "vestibule_callbacks_total",
        "Returns from the provider at the callback, by outcome."
    );
    metrics::describe_histogram!(
        "vestibule_refresh_lock_wait_seconds",
        "Time a request waited for its session's refresh to be its turn."
    );
    metrics::describe_gauge!(
        "vestibule_refresh_answers_unsaved",
        "Refresh answers the session store did not take, kept in memory until saved or their \
         session ends."
    );
    metrics::describe_histogram!(
        "vestibule_store_duration_seconds",
        "Redis command latency, by operation."
    );
    metrics::describe_counter!(
        "vestibule_store_errors_total",
        "Redis commands that failed or timed out, by operation."
    );
    metrics::describe_counter!(
        "vestibule_logouts_total",
        "Logouts, by way (link, script, backchannel) and outcome."
    );
    metrics::describe_counter!(
        "vestibule_rate_limited_total",
        "Requests refused with 429 by the per-address limits, by endpoint."
    );
    metrics::describe_counter!(
        "vestibule_trace_spans_exported_total",
        "Spans the trace collector accepted."
    );
    metrics::describe_counter!(
        "vestibule_trace_spans_dropped_total",
        "Spans dropped: the export queue was full, or the collector did not take them."
    );
    metrics::describe_counter!(
        "vestibule_log_lines_dropped_total",
        "Log lines dropped: stderr did not take them and the log's queue was full."
    );
}

/// The longest path the access log writes; longer ones are cut and end in `...`.
pub const MAX_LOGGED_PATH: usize = 256;

/// `path` as a URI carries it, cut to [`MAX_LOGGED_PATH`] bytes (at a character boundary).
/// A byte that is not visible ASCII (a space excepted) is percent-encoded: a path refused as
/// ambiguous is logged as it came, and its U+0085 (a line break to Unicode-aware line readers)
/// or U+009B (a terminal's escape) would reach the log as they are (the log's formatter
/// escapes the message only, and JSON leaves both alone). Canonical paths are encoded already.
pub fn logged_path(path: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| (b' '..=b'~').contains(&b);
    if path.len() <= MAX_LOGGED_PATH && path.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(path);
    }
    use std::fmt::Write;
    let mut text = String::with_capacity(path.len().min(MAX_LOGGED_PATH));
    // Where the text ends after the last whole character (escapes whole) that leaves room for
    // the `...` of a cut.
    let mut fits = 0;
    for c in path.chars() {
        if c.is_ascii() && plain(c as u8) {
            text.push(c);
        } else {
            for b in c.encode_utf8(&mut [0; 4]).bytes() {
                let _ = write!(text, "%{b:02X}");
            }
        }
        if text.len() > MAX_LOGGED_PATH {
            text.truncate(fits);
            text.push_str("...");
            break;
        }
        if text.len() <= MAX_LOGGED_PATH - 3 {
            fits = text.len();
        }
    }
    std::borrow::Cow::Owned(text)
}

/// The path the access log writes for a request to `path`: a session's handle in the path of
/// `DELETE {bff_prefix}/sessions/<handle>` is left out (`.../sessions/*`), since the handle is
/// a secret (the `sid` that guards `{bff_prefix}/logout` against another site), and the rest is
/// cut to [`MAX_LOGGED_PATH`] bytes. Letters of the prefix in any case, as routing takes them.
pub fn access_logged_path<'p>(path: &'p str, bff_prefix: &str) -> std::borrow::Cow<'p, str> {
    const SESSIONS: &str = "/sessions/";
    let (prefix, sessions) = (bff_prefix.as_bytes(), SESSIONS.as_bytes());
    let bytes = path.as_bytes();
    let holds_handle = bytes.len() >= prefix.len() + sessions.len()
        && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
        && bytes[prefix.len()..][..sessions.len()].eq_ignore_ascii_case(sessions);
    if holds_handle {
        return std::borrow::Cow::Owned(format!("{bff_prefix}{SESSIONS}*"));
    }
    logged_path(path)
}

/// The access log's `user`: `sub` as configured — as is, as a keyed hash (16 hex digits of
/// SHA-256 over a key derived from `key` and `sub`), or not at all.
pub fn logged_user<'a>(
    mode: crate::config::LogUser,
    key: &[u8],
    sub: &'a str,
) -> Option<std::borrow::Cow<'a, str>> {
    use sha2::Digest;
    match mode {
        crate::config::LogUser::None => None,
        crate::config::LogUser::Sub => Some(std::borrow::Cow::Borrowed(sub)),
        crate::config::LogUser::Hash => {
            let mut hasher = sha2::Sha256::new();
            hasher.update(b"vestibule access log user\0");
            hasher.update(key);
            hasher.update(sub.as_bytes());
            Some(std::borrow::Cow::Owned(hex::encode(
                &hasher.finalize()[..8],
            )))
        }
    }
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

/// One serving worker's request metrics: the in-flight count and, per route and status, the
/// handles of the request counter and duration histogram with the samples not yet handed to
/// them.
///
/// Nothing here is written by another thread on the request path. Process-wide handles would
/// make every request write cache lines that the other workers write too (the gauge, the
/// counter, the histogram's sample queue, a lock around the handle map): about six writes per
/// request that bounce between cores. Samples are handed over in batches of [`BATCH`], and
/// [`render`] hands over every worker's before `/metrics` is written and sets the in-flight
/// gauge to the workers' sum, so a scrape reads the same numbers as before.
pub struct WorkerMetrics {
    in_flight: AtomicI64,
    pending: Mutex<Pending>,
}

/// Samples recorded per route and status before they go to the process-wide handles.
const BATCH: usize = 64;

/// Handles kept per worker at most (route names come from the configuration, statuses are few).
const MAX_CACHED_HANDLES: usize = 4096;

#[derive(Default)]
struct Pending {
    by_route: HashMap<Box<str>, Vec<Batch>, foldhash::fast::RandomState>,
    handles: usize,
}

/// The request counter and duration histogram of one route and status, and what is not yet
/// recorded into them.
struct Batch {
    /// Its [`status_key`].
    status: u16,
    counter: Counter,
    histogram: Histogram,
    seconds: Vec<f64>,
}

impl Batch {
    fn hand_over(&mut self) {
        if self.seconds.is_empty() {
            return;
        }
        self.counter.increment(self.seconds.len() as u64);
        for &seconds in &self.seconds {
            self.histogram.record(seconds);
        }
        self.seconds.clear();
    }
}

/// What a status is counted under: a registered status (one `http` has a reason phrase for)
/// as itself, any other as its class, `1`–`9`. An upstream's answer may carry any status of
/// 100–999, and a label value per status would let it add up to 900 series per route to every
/// scrape; so a route has about 70 at most, whatever its upstream sends.
fn status_key(status: u16) -> u16 {
    match http::StatusCode::from_u16(status) {
        Ok(code) if code.canonical_reason().is_some() => status,
        _ => (status / 100).clamp(1, 9),
    }
}

/// The `status` label value of a [`status_key`]: `"404"`, or `"5xx"` for a class.
fn status_label(key: u16) -> String {
    if key < 10 {
        format!("{key}xx")
    } else {
        key.to_string()
    }
}

/// Every worker's metrics, for [`render`].
static WORKERS: Mutex<Vec<Weak<WorkerMetrics>>> = Mutex::new(Vec::new());

/// One request in the in-flight count; leaves it when dropped, also when the client goes away
/// and the request's future is dropped half-way.
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerMetrics {
    /// A worker's metrics, counted in `/metrics` for as long as they are kept.
    pub fn new() -> Arc<WorkerMetrics> {
        let metrics = Arc::new(WorkerMetrics {
            in_flight: AtomicI64::new(0),
            pending: Mutex::new(Pending::default()),
        });
        let mut workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
        workers.retain(|w| w.strong_count() > 0);
        workers.push(Arc::downgrade(&metrics));
        metrics
    }

    /// Counts a request in flight until the returned value is dropped.
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Counts one finished request and its duration, under the `status` label of
    /// [`status_label`].
    pub fn record(&self, route: &str, status: u16, elapsed: Duration) {
        let status = status_key(status);
        let seconds = elapsed.as_secs_f64();
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(batch) = pending
            .by_route
            .get_mut(route)
            .and_then(|b| b.iter_mut().find(|b| b.status == status))
        {
            batch.seconds.push(seconds);
            if batch.seconds.len() >= BATCH {
                batch.hand_over();
            }
            return;
        }
        let status_label = status_label(status);
        let counter = metrics::counter!("vestibule_requests_total", "route" => route.to_string(), "status" => status_label.clone());
        let histogram = metrics::histogram!("vestibule_request_duration_seconds", "route" => route.to_string(), "status" => status_label);
        if pending.handles >= MAX_CACHED_HANDLES {
            counter.increment(1);
            histogram.record(seconds);
            return;
        }
        pending.handles += 1;
        let mut seconds_list = Vec::with_capacity(BATCH);
        seconds_list.push(seconds);
        pending
            .by_route
            .entry(route.into())
            .or_default()
            .push(Batch {
                status,
                counter,
                histogram,
                seconds: seconds_list,
            });
    }

    /// Hands every pending sample over to the process-wide handles.
    fn hand_over(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for batch in pending.by_route.values_mut().flatten() {
            batch.hand_over();
        }
    }
}

impl Drop for WorkerMetrics {
    /// A worker that ends (shutdown) leaves no sample behind.
    fn drop(&mut self) {
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for batch in pending.by_route.values_mut().flatten() {
            batch.hand_over();
        }
    }
}

/// `/metrics`: every worker's pending samples handed over first, and the in-flight gauge set
/// to the sum of the workers' counts.
pub fn render() -> String {
    let handle = metrics();
    let mut in_flight = 0;
    {
        let mut workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
        workers.retain(|w| w.strong_count() > 0);
        for worker in workers.iter().filter_map(Weak::upgrade) {
            worker.hand_over();
            in_flight += worker.in_flight.load(Ordering::Relaxed);
        }
    }
    metrics::gauge!("vestibule_requests_in_flight").set(in_flight as f64);
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_leaves_a_session_handle_out_of_the_path() {
        let handle = "eb868f4de8c451e4cbd3321e7a1baf52";
        for path in [
            format!("/bff/sessions/{handle}"),
            format!("/BFF/Sessions/{handle}"),
            format!("/bff/sessions/{handle}/x"),
        ] {
            let logged = access_logged_path(&path, "/bff");
            assert_eq!(logged, "/bff/sessions/*", "{path}");
        }
        for path in [
            "/bff/sessions",
            "/bff/user",
            "/api/sessions/x",
            "/bffsessions/x",
        ] {
            assert_eq!(access_logged_path(path, "/bff"), path);
        }
        let long = "/api/".to_string() + &"a".repeat(400);
        assert_eq!(access_logged_path(&long, "/bff").len(), MAX_LOGGED_PATH);
        assert_eq!(
            access_logged_path("/auth/sessions/x", "/auth"),
            "/auth/sessions/*"
        );
        assert_eq!(access_logged_path("/b\u{e9}/x", "/bff"), "/b%C3%A9/x");
    }
    use crate::config::LogUser;

    #[test]
    fn long_paths_are_cut_for_the_log() {
        assert_eq!(logged_path("/api/x"), "/api/x");
        let long = format!("/{}", "é".repeat(400));
        let logged = logged_path(&long);
        assert!(logged.len() <= MAX_LOGGED_PATH, "{}", logged.len());
        assert!(logged.ends_with("..."));
        // Escapes are never cut: what precedes the mark is whole `%XX` triples.
        assert!(
            logged
                .trim_end_matches("...")
                .trim_start_matches('/')
                .len()
                .is_multiple_of(3)
        );
        assert_eq!(logged_path("/x\u{85}y\u{9b}\u{1b}"), "/x%C2%85y%C2%9B%1B");
        assert_eq!(logged_path("Mozilla/5.0 (X11)"), "Mozilla/5.0 (X11)");
        assert_eq!(logged_path("a\tb\u{7f}"), "a%09b%7F");
    }

    #[test]
    fn the_user_is_logged_as_configured() {
        let key = [7u8; 32];
        assert_eq!(
            logged_user(LogUser::Sub, &key, "alice").as_deref(),
            Some("alice")
        );
        assert_eq!(logged_user(LogUser::None, &key, "alice"), None);
        let hashed = logged_user(LogUser::Hash, &key, "alice").unwrap();
        assert_eq!(hashed.len(), 16);
        assert!(!hashed.contains("alice"));
        assert_eq!(logged_user(LogUser::Hash, &key, "alice").unwrap(), hashed);
        assert_ne!(logged_user(LogUser::Hash, &key, "bob").unwrap(), hashed);
        assert_ne!(
            logged_user(LogUser::Hash, &[8u8; 32], "alice").unwrap(),
            hashed
        );
    }
}
