//! The span exporter: OTLP/HTTP with the JSON encoding (`POST <endpoint>/v1/traces`), in
//! batches, from a bounded queue. Requests never wait for it: a span that finds the queue full
//! is dropped and counted (`vestibule_trace_spans_dropped_total{reason="queue_full"}`), and so
//! is a batch the collector does not take (`reason="export_failed"`). No retries: traces are
//! for incidents, and a collector that is down must not grow Vestibule's memory.

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Spans waiting to be sent, at most.
const QUEUE: usize = 4096;
/// Spans in one POST, at most.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(500);
/// The longest a collector may take to answer one POST.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// OpenTelemetry's span kinds that Vestibule uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// A finished, sampled span.
#[derive(Debug)]
pub struct Finished {
    pub name: &'static str,
    pub trace_id: u128,
    pub span_id: u64,
    /// 0: a root span.
    pub parent_id: u64,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
}

/// The sending side of the export queue.
pub struct Queue {
    sender: mpsc::Sender<Finished>,
    dropped: metrics::Counter,
}

impl Queue {
    /// A queue into `sender`, counting drops in `dropped`.
    pub fn new(sender: mpsc::Sender<Finished>, dropped: metrics::Counter) -> Queue {
        Queue { sender, dropped }
    }

    /// Queues `span`, or drops and counts it when the queue is full (never waits).
    pub fn offer(&self, span: Finished) {
        if self.sender.try_send(span).is_err() {
            self.dropped.increment(1);
        }
    }
}

/// Starts the exporter task for `endpoint` (on the current runtime) and returns its queue. The
/// task ends when every sender is gone.
/// `connector`: how the collector is reached (the trust `[tls]` configures).
pub fn start(endpoint: &url::Url, connector: crate::net::Connector) -> Queue {
    let (sender, receiver) = mpsc::channel(QUEUE);
    let url = traces_url(endpoint);
    tokio::spawn(run(url, connector, receiver));
    Queue {
        sender,
        dropped: metrics::counter!("vestibule_trace_spans_dropped_total", "reason" => "queue_full"),
    }
}

/// `<endpoint>/v1/traces`, unless the endpoint already names that path.
fn traces_url(endpoint: &url::Url) -> String {
    let text = endpoint.as_str().trim_end_matches('/');
    if text.ends_with("/v1/traces") {
        text.to_string()
    } else {
        format!("{text}/v1/traces")
    }
}

async fn run(
    url: String,
    connector: crate::net::Connector,
    mut receiver: mpsc::Receiver<Finished>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // An https collector may speak HTTP/2 on one pooled connection; behind a dead link (no
        // RST, no FIN) every batch would wait on it until TCP's retransmission resumed it. A
        // ping unanswered within a second closes it, while a batch is on it.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .http2_keep_alive_timeout(Duration::from_secs(1))
        .build(connector);
    let exported = metrics::counter!("vestibule_trace_spans_exported_total");
    let failed =
        metrics::counter!("vestibule_trace_spans_dropped_total", "reason" => "export_failed");
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let body = encode(&batch);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            failed.increment(count);
            continue;
        };
        match tokio::time::timeout(TIMEOUT, client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => exported.increment(count),
            Ok(Ok(response)) => {
                failed.increment(count);
                tracing::debug!(
                    status = response.status().as_u16(),
                    "the trace collector refused spans"
                );
            }
            Ok(Err(error)) => {
                failed.increment(count);
                tracing::debug!(%error, "the trace collector could not be reached");
            }
            Err(_) => {
                failed.increment(count);
                tracing::debug!("the trace collector did not answer in time");
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

fn attribute(key: &str, value: &Attr) -> Value {
    let value = match value {
        Attr::Str(s) => json!({ "stringValue": s }),
        // OTLP/JSON writes 64-bit integers as strings.
        Attr::Int(i) => json!({ "intValue": i.to_string() }),
        Attr::Float(f) => json!({ "doubleValue": f }),
        Attr::Bool(b) => json!({ "boolValue": b }),
    };
    json!({ "key": key, "value": value })
}

/// One OTLP `ExportTraceServiceRequest` in the JSON encoding (ids in hex).
pub fn encode(spans: &[Finished]) -> Vec<u8> {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let error = s.attributes.iter().any(|(k, _)| *k == "error.type");
            let mut span = json!({
                "traceId": format!("{:032x}", s.trace_id),
                "spanId": format!("{:016x}", s.span_id),
                "name": s.name,
                "kind": s.kind as u8,
                "startTimeUnixNano": unix_nanos(s.start),
                "endTimeUnixNano": unix_nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                // STATUS_CODE_ERROR or STATUS_CODE_UNSET.
                "status": { "code": if error { 2 } else { 0 } },
            });
            if s.parent_id != 0 {
                span["parentSpanId"] = json!(format!("{:016x}", s.parent_id));
            }
            span
        })
        .collect();
    let request = json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                attribute("service.name", &Attr::Str("vestibule".into())),
                attribute("service.version", &Attr::Str(env!("CARGO_PKG_VERSION").into())),
            ]},
            "scopeSpans": [{
                "scope": { "name": "vestibule", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&request).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_encoded_as_otlp_json_with_hex_ids() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_000);
        let span = Finished {
            name: "upstream hop",
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
            parent_id: 1,
            kind: Kind::Client,
            start,
            end: start + Duration::from_nanos(500),
            attributes: vec![
                ("server.address", Attr::Str("api".into())),
                ("http.response.status_code", Attr::Int(502)),
                ("error.type", Attr::Str("502".into())),
            ],
        };
        let body: Value = serde_json::from_slice(&encode(&[span])).unwrap();
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s["spanId"], "b7ad6b7169203331");
        assert_eq!(s["parentSpanId"], "0000000000000001");
        assert_eq!(s["kind"], 3);
        assert_eq!(s["startTimeUnixNano"], "1000");
        assert_eq!(s["endTimeUnixNano"], "1500");
        assert_eq!(s["attributes"][1]["value"]["intValue"], "502");
        assert_eq!(s["status"]["code"], 2);
    }

    #[test]
    fn the_traces_path_is_added_once() {
        let url = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            traces_url(&url("http://collector:4318")),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url(&url("http://collector:4318/otlp/")),
            "http://collector:4318/otlp/v1/traces"
        );
        assert_eq!(
            traces_url(&url("http://collector:4318/v1/traces")),
            "http://collector:4318/v1/traces"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let (sender, _receiver) = mpsc::channel(1);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let queue = Queue {
            sender,
            dropped: metrics::Counter::from_arc(dropped.clone()),
        };
        let span = || Finished {
            name: "x",
            trace_id: 1,
            span_id: 1,
            parent_id: 0,
            kind: Kind::Internal,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: Vec::new(),
        };
        queue.offer(span());
        // Would wait forever if it waited.
        queue.offer(span());
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
