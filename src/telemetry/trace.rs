//! Traces: W3C trace context (`traceparent`) and the spans of a request, recorded through the
//! `tracing` crate's spans under the target [`TARGET`] and exported by [`super::otlp`].
//!
//! A [`Tracer`] exists only when `[telemetry] otlp_endpoint` is set. It owns a dispatcher of
//! its own, which the pipeline installs around each request's future: spans created below it
//! (provider calls, Redis commands, the upstream hop) find their parent the usual `tracing`
//! way, and nothing else changes hands. Spans are `TRACE`-level, so without a tracer the
//! process-wide log subscriber (at `info`) rejects them on one comparison: no span is created,
//! nothing is allocated. Log events inside a traced request are handed on to that process-wide
//! subscriber unchanged.
//!
//! Sampling is decided once, at the request span: a `traceparent` is honoured (its trace id,
//! its parent and its sampled flag) only from a trusted proxy; anyone else's is ignored and the
//! configured ratio decides. Child spans inherit the decision. An unsampled request still has
//! ids, propagated with the flag off, but records and exports nothing.
//!
//! Span fields become attributes: callers put only names, hosts, routes, statuses and command
//! names there — never a token, cookie, code, query string or session id.

use super::otlp::{Attr, Finished, Kind};
use http::HeaderValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

pub mod baggage;
mod incoming;

pub use incoming::vet_trusted;

/// The `tracing` target of every span that becomes an OpenTelemetry span.
pub const TARGET: &str = "vestibule::otel";

/// A span's place in a trace, as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// A trace id printed as 32 lowercase hex digits (no allocation).
#[derive(Debug, Clone, Copy)]
pub struct TraceId(pub u128);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl SpanContext {
    /// Reads a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all
    /// zero. Anything else is no context (a new trace starts).
    pub fn parse(value: &[u8]) -> Option<SpanContext> {
        if value.len() != 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        if &value[..2] != b"00" {
            return None;
        }
        let hex = |part: &[u8]| -> Option<u128> {
            if !part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            u128::from_str_radix(std::str::from_utf8(part).ok()?, 16).ok()
        };
        let trace_id = hex(&value[3..35]).filter(|t| *t != 0)?;
        let span_id = u64::try_from(hex(&value[36..52])?)
            .ok()
            .filter(|s| *s != 0)?;
        let flags = hex(&value[53..55])?;
        Some(SpanContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// This context as a `traceparent` value.
    pub fn header(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Trace and span ids: SplitMix64 over a counter seeded from the OS. Unique and unpredictable
/// enough for ids (they are no secret), and no system call per request.
pub struct Ids(AtomicU64);

impl Ids {
    pub fn new() -> Ids {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ids(AtomicU64::new(u64::from_le_bytes(seed) ^ nanos))
    }

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn span_id(&self) -> u64 {
        loop {
            let id = self.next();
            if id != 0 {
                return id;
            }
        }
    }

    fn trace_id(&self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.span_id())
    }

    /// `true` with probability `ratio`.
    fn sample(&self, ratio: f64) -> bool {
        // 53 random bits as a float in [0, 1).
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < ratio
    }
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

/// The spans of one application: its dispatcher and the ids it hands out.
pub struct Tracer {
    dispatch: Dispatch,
    /// Registered only to make two: `tracing-core` asks a lone registered dispatcher's opinion
    /// of a new callsite through whatever dispatcher is current, so a span first reached off a
    /// request (a Redis command at start, a background provider call) would be disabled for
    /// good when no process-wide subscriber is installed (tests, embedders).
    _second: Dispatch,
}

impl Tracer {
    /// A tracer whose finished spans go to `queue`; log events go on to `logs` (the dispatcher
    /// in effect before, the process-wide one).
    pub fn new(queue: super::otlp::Queue, logs: Dispatch) -> Tracer {
        let layer = TraceLayer {
            ids: Ids::new(),
            queue,
            logs,
        };
        let second = Dispatch::new(tracing::subscriber::NoSubscriber::default());
        Tracer {
            dispatch: Dispatch::new(tracing_subscriber::layer::SubscriberExt::with(
                Registry::default(),
                layer,
            )),
            _second: second,
        }
    }

    /// The dispatcher to install around a request's future.
    pub fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    /// The span of one request: a child of `remote` (a trusted proxy's context) with its
    /// sampling decision, or a new trace sampled at `ratio`.
    pub fn request_span(
        &self,
        method: &http::Method,
        remote: Option<SpanContext>,
        ratio: f64,
    ) -> tracing::Span {
        tracing::dispatcher::with_default(&self.dispatch, || {
            let (trace_id, parent_id, decided) = match remote {
                Some(r) => (r.trace_id, r.span_id, Some(r.sampled)),
                None => (0, 0, None),
            };
            tracing::trace_span!(
                target: TARGET,
                "request",
                "otel.kind" = "server",
                "vestibule.trace_id" = trace_id,
                "vestibule.parent_id" = parent_id,
                "vestibule.sampled" = decided,
                "vestibule.ratio" = ratio,
                "http.request.method" = span_method(method),
                "http.route" = tracing::field::Empty,
                "http.response.status_code" = tracing::field::Empty,
                "error.type" = tracing::field::Empty,
            )
        })
    }
}

/// A request's `http.request.method` as OpenTelemetry writes it: a method HTTP defines as it
/// is, any other `_OTHER`. A client's own method is a token up to `max_header_size` long,
/// which every span of a sampled request would carry to the export queue.
fn span_method(method: &http::Method) -> &str {
    match method.as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
        | "PATCH") => m,
        _ => "_OTHER",
    }
}

/// The context of `span` (none for a disabled span, or one outside a tracer).
pub fn context(span: &tracing::Span) -> Option<SpanContext> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let extensions = data.extensions();
        extensions.get::<SpanState>().map(|s| s.context)
    })
    .flatten()
}

/// `traceparent` for a call made under `span` (none when not tracing).
pub fn traceparent(span: &tracing::Span) -> Option<HeaderValue> {
    context(span).map(|c| c.header())
}

/// What the layer keeps per span.
struct SpanState {
    context: SpanContext,
    parent_id: u64,
    start: SystemTime,
    kind: Kind,
    /// Only for sampled spans.
    attributes: Vec<(&'static str, Attr)>,
}

/// Records spans of [`TARGET`] into the export queue; hands log events on to `logs`.
struct TraceLayer {
    ids: Ids,
    queue: super::otlp::Queue,
    logs: Dispatch,
}

/// The fields a span is created with: the root's decision, the kind and (`collect`: only for
/// sampled spans, so that an unsampled one allocates nothing) the attributes.
#[derive(Default)]
struct Fields {
    collect: bool,
    trace_id: u128,
    parent_id: u64,
    sampled: Option<bool>,
    ratio: f64,
    kind: Option<Kind>,
    attributes: Vec<(&'static str, Attr)>,
}

impl Fields {
    fn collecting() -> Fields {
        Fields {
            collect: true,
            ..Fields::default()
        }
    }

    fn push(&mut self, name: &'static str, value: impl FnOnce() -> Attr) {
        if self.collect {
            self.attributes.push((name, value()));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push(field.name(), || Attr::Str(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "otel.kind" {
            self.kind = Some(match value {
                "server" => Kind::Server,
                "client" => Kind::Client,
                _ => Kind::Internal,
            });
            return;
        }
        self.push(field.name(), || Attr::Str(value.to_string()));
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        if field.name() == "vestibule.trace_id" {
            self.trace_id = value;
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "vestibule.parent_id" => self.parent_id = value,
            name => self.push(name, || Attr::Int(i64::try_from(value).unwrap_or(i64::MAX))),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field.name(), || Attr::Int(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        match field.name() {
            "vestibule.sampled" => self.sampled = Some(value),
            name => self.push(name, || Attr::Bool(value)),
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            "vestibule.ratio" => self.ratio = value,
            name => self.push(name, || Attr::Float(value)),
        }
    }
}

/// Replaces or adds `key`'s value.
fn set(attributes: &mut Vec<(&'static str, Attr)>, key: &'static str, value: Attr) {
    match attributes.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => attributes.push((key, value)),
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        metadata: &'static Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if metadata.is_span() {
            if metadata.target() == TARGET {
                tracing::subscriber::Interest::always()
            } else {
                tracing::subscriber::Interest::never()
            }
        } else if self.logs.enabled(metadata) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        if metadata.is_span() {
            metadata.target() == TARGET
        } else {
            self.logs.enabled(metadata)
        }
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<SpanState>().map(|s| s.context));
        // The decision and the kind first; the attributes only if the span is recorded.
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let (context, parent_id) = match parent {
            Some(p) => (
                SpanContext {
                    trace_id: p.trace_id,
                    span_id: self.ids.span_id(),
                    sampled: p.sampled,
                },
                p.span_id,
            ),
            None => (
                SpanContext {
                    trace_id: match fields.trace_id {
                        0 => self.ids.trace_id(),
                        given => given,
                    },
                    span_id: self.ids.span_id(),
                    sampled: fields
                        .sampled
                        .unwrap_or_else(|| self.ids.sample(fields.ratio)),
                },
                fields.parent_id,
            ),
        };
        let state = SpanState {
            context,
            parent_id,
            start: SystemTime::now(),
            kind: fields.kind.unwrap_or(Kind::Internal),
            attributes: if context.sampled {
                let mut collected = Fields::collecting();
                attrs.record(&mut collected);
                collected.attributes
            } else {
                Vec::new()
            },
        };
        span.extensions_mut().insert(state);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let Some(state) = extensions.get_mut::<SpanState>() else {
            return;
        };
        if !state.context.sampled {
            return;
        }
        let mut fields = Fields::collecting();
        values.record(&mut fields);
        for (key, value) in fields.attributes {
            set(&mut state.attributes, key, value);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if self.logs.enabled(event.metadata()) {
            self.logs.event(event);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(state) = span.extensions_mut().remove::<SpanState>() else {
            return;
        };
        if !state.context.sampled {
            return;
        }
        self.queue.offer(Finished {
            name: span.name(),
            trace_id: state.context.trace_id,
            span_id: state.context.span_id,
            parent_id: state.parent_id,
            kind: state.kind,
            start: state.start,
            end: SystemTime::now(),
            attributes: state.attributes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::otlp::{Attr, Finished, Kind};
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_the_same() {
        let c = SpanContext::parse(VALID.as_bytes()).unwrap();
        assert_eq!(c.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(c.span_id, 0xb7ad6b7169203331);
        assert!(c.sampled);
        assert_eq!(c.header().to_str().unwrap(), VALID);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!SpanContext::parse(unsampled.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn a_method_http_does_not_define_is_other_in_spans() {
        for known in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ] {
            let method = http::Method::from_bytes(known.as_bytes()).unwrap();
            assert_eq!(span_method(&method), known);
        }
        for other in ["PROPFIND", "get", &"M".repeat(30_000)] {
            let method = http::Method::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(span_method(&method), "_OTHER");
        }
    }

    #[test]
    fn malformed_traceparents_are_no_context() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(SpanContext::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn the_sample_ratio_bounds_hold() {
        let ids = Ids::new();
        assert!((0..1000).all(|_| !ids.sample(0.0)));
        assert!((0..1000).all(|_| ids.sample(1.0)));
        let half = (0..10_000).filter(|_| ids.sample(0.5)).count();
        assert!((4_000..6_000).contains(&half), "{half}");
    }

    /// A tracer whose finished spans land in the returned receiver.
    fn tracer() -> (Tracer, tokio::sync::mpsc::Receiver<Finished>) {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let queue = super::super::otlp::Queue::new(sender, metrics::Counter::noop());
        (Tracer::new(queue, Dispatch::none()), receiver)
    }

    /// A request span at `ratio` with one child carrying an attribute; both closed.
    fn one_request(tracer: &Tracer, remote: Option<SpanContext>, ratio: f64) -> SpanContext {
        let root = tracer.request_span(&http::Method::GET, remote, ratio);
        let context = context(&root).unwrap();
        tracing::dispatcher::with_default(tracer.dispatch(), || {
            let _entered = root.enter();
            let child = tracing::trace_span!(target: TARGET, "redis", "db.operation.name" = "get");
            let child_context = context_of(&child);
            assert_eq!(child_context.trace_id, context.trace_id);
            assert_eq!(child_context.sampled, context.sampled);
        });
        context
    }

    fn context_of(span: &tracing::Span) -> SpanContext {
        context(span).unwrap()
    }

    #[test]
    fn an_unsampled_request_has_ids_but_records_nothing() {
        let (tracer, mut receiver) = tracer();
        let c = one_request(&tracer, None, 0.0);
        assert!(!c.sampled);
        assert_ne!(c.trace_id, 0);
        assert!(receiver.try_recv().is_err(), "an unsampled span was queued");
    }

    #[test]
    fn a_sampled_request_queues_its_spans_chained_by_parent_id() {
        let (tracer, mut receiver) = tracer();
        let c = one_request(&tracer, None, 1.0);
        assert!(c.sampled);
        let child = receiver.try_recv().unwrap();
        let root = receiver.try_recv().unwrap();
        assert_eq!((child.name, root.name), ("redis", "request"));
        assert_eq!(child.parent_id, root.span_id);
        assert_eq!(root.parent_id, 0);
        assert_eq!(root.kind, Kind::Server);
        assert_eq!(child.trace_id, c.trace_id);
        assert!(
            child
                .attributes
                .contains(&("db.operation.name", Attr::Str("get".into())))
        );
    }

    #[test]
    fn a_remote_parent_gives_the_trace_id_the_parent_and_the_decision() {
        let (tracer, mut receiver) = tracer();
        let remote = SpanContext::parse(VALID.as_bytes()).unwrap();
        let c = one_request(&tracer, Some(remote), 0.0);
        assert_eq!(c.trace_id, remote.trace_id);
        assert!(c.sampled, "the trusted parent's decision, not the ratio");
        let _child = receiver.try_recv().unwrap();
        let root = receiver.try_recv().unwrap();
        assert_eq!(root.parent_id, remote.span_id);
        let unsampled = SpanContext {
            sampled: false,
            ..remote
        };
        assert!(!one_request(&tracer, Some(unsampled), 1.0).sampled);
        assert!(receiver.try_recv().is_err());
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let ids = Ids::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.span_id();
            assert_ne!(id, 0);
            assert!(seen.insert(id));
        }
        assert_ne!(ids.trace_id(), ids.trace_id());
    }
}
