//! Observability for an incident: OpenTelemetry spans exported over OTLP/HTTP JSON to a receiver
//! started by the test (their names, parent ids chaining from the request to the provider calls
//! and the upstream hop, no secret in any attribute), the W3C `traceparent` the upstream sees,
//! who may decide sampling, and `/metrics` against `docs/metrics.md` and the Grafana dashboard.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::redis::RedisServer;
use crate::support::stack::LoginStack;
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vestibule::clock::TestClock;

/// An OTLP/HTTP receiver: records the path, content type and JSON body of every POST.
#[derive(Clone, Default)]
struct Receiver {
    url: String,
    posts: Arc<Mutex<Vec<(String, String, serde_json::Value)>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            url: format!("http://{}", listener.local_addr().unwrap()),
            ..Receiver::default()
        };
        let posts = receiver.posts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let posts = posts.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let posts = posts.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let kind = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json = serde_json::from_slice(&body).unwrap_or_else(|_| {
                                serde_json::Value::String(String::from_utf8_lossy(&body).into())
                            });
                            posts.lock().unwrap().push((path, kind, json));
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        receiver
    }

    /// Every span received so far, flattened out of the OTLP envelopes.
    fn spans(&self) -> Vec<Span> {
        let posts = self.posts.lock().unwrap();
        let mut spans = Vec::new();
        for (path, kind, body) in posts.iter() {
            assert_eq!(path, "/v1/traces");
            assert_eq!(kind, "application/json");
            for rs in body["resourceSpans"].as_array().unwrap() {
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for s in ss["spans"].as_array().unwrap() {
                        spans.push(Span::of(s));
                    }
                }
            }
        }
        spans
    }

    /// Waits until a span named `name` in trace `trace` (any trace when `None`) has arrived.
    async fn span(&self, name: &str, trace: Option<&str>) -> Span {
        eventually(
            &format!("a {name:?} span arrives"),
            Duration::from_secs(10),
            || async {
                self.spans()
                    .into_iter()
                    .find(|s| s.name == name && trace.is_none_or(|t| s.trace == t))
            },
        )
        .await
    }
}

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    kind: i64,
    attributes: HashMap<String, String>,
}

impl Span {
    fn of(s: &serde_json::Value) -> Span {
        let attributes = s["attributes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| {
                        let value = &kv["value"];
                        let text = value["stringValue"]
                            .as_str()
                            .or(value["intValue"].as_str())
                            .map(str::to_string)
                            .unwrap_or_else(|| value.to_string());
                        (kv["key"].as_str().unwrap().to_string(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            s["startTimeUnixNano"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                <= s["endTimeUnixNano"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
        );
        Span {
            name: s["name"].as_str().unwrap().to_string(),
            trace: s["traceId"].as_str().unwrap().to_string(),
            id: s["spanId"].as_str().unwrap().to_string(),
            parent: s["parentSpanId"].as_str().unwrap_or("").to_string(),
            kind: s["kind"].as_i64().unwrap_or(0),
            attributes,
        }
    }
}

/// The names of the spans from `span` up to its root, following parent ids.
fn ancestry(spans: &[Span], span: &Span) -> Vec<String> {
    let mut names = vec![span.name.clone()];
    let mut current = span.clone();
    while !current.parent.is_empty() {
        let Some(parent) = spans.iter().find(|s| s.id == current.parent) else {
            panic!("{current:?}: its parent was not exported");
        };
        assert_eq!(parent.trace, current.trace, "a parent in another trace");
        names.push(parent.name.clone());
        current = parent.clone();
    }
    names
}

const TTL: u64 = 8;
const SKEW: u64 = 4;

struct Traced {
    stack: LoginStack,
    receiver: Receiver,
    clock: TestClock,
    _redis: RedisServer,
}

/// A login stack on Redis exporting every trace to a fresh receiver; `trusted`: the proxies
/// whose `traceparent` is honoured.
async fn traced(sample_ratio: f64, trusted: &'static str) -> Traced {
    let receiver = Receiver::start().await;
    let redis = RedisServer::start();
    let clock = TestClock::new();
    let store = format!(
        "store = \"redis\"\n[session.redis]\nurl = \"{}\"\n",
        redis.url()
    );
    let endpoint = receiver.url.clone();
    let stack = LoginStack::builder()
        .provider(serde_json::json!({ "access_token_ttl": TTL }))
        .extra(move |u| {
            format!("{store}\n[[routes]]\npath = \"/api/\"\nupstream = \"{u}\"\ntoken = \"user\"\n")
        })
        .config(move |c| {
            c.set("oidc.refresh_skew", format!("{SKEW}s"))
                .add("server.trusted_proxies", vec![trusted])
                .add("telemetry.otlp_endpoint", endpoint)
                .add("telemetry.sample_ratio", sample_ratio)
        })
        .clock(clock.clock())
        .start()
        .await;
    Traced {
        stack,
        receiver,
        clock,
        _redis: redis,
    }
}

/// Trace id and parent span id of a `traceparent` header; its flags.
fn traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    assert_eq!(parts[1].len(), 32, "{value}");
    assert_eq!(parts[2].len(), 16, "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn seen_traceparent(stack: &LoginStack, marker: &str) -> Option<String> {
    let seen = stack.up.seen.lock().unwrap();
    let s = seen.iter().rev().find(|s| s.uri.contains(marker))?;
    s.headers
        .get("traceparent")
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn spans_chain_from_the_request_to_the_provider_and_the_upstream_and_carry_no_secret() {
    let t = traced(1.0, "10.255.255.0/24").await;
    let s = &t.stack;
    let mut browser: Browser = s.login("alice").await;
    let r = browser
        .get(&s.proxy().url("/api/first"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    t.clock
        .advance(Duration::from_millis((TTL - SKEW) * 1000 + 300));
    let r = browser
        .get(&s.proxy().url("/api/after-expiry"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The upstream saw our traceparent, in the trace of the request, as a child of the hop.
    let header = seen_traceparent(s, "/after-expiry").expect("no traceparent upstream");
    let (trace, parent, flags) = traceparent(&header);
    assert_eq!(flags, "01", "sampled at ratio 1: {header}");
    let hop = t.receiver.span("upstream hop", Some(&trace)).await;
    assert_eq!(hop.id, parent, "the upstream's parent is the hop span");
    assert_eq!(hop.kind, 3, "the hop is a client span");
    t.receiver.span("provider call", Some(&trace)).await;
    t.receiver.span("refresh lock wait", Some(&trace)).await;
    let spans = t.receiver.spans();
    let chain = ancestry(&spans, &hop);
    assert_eq!(chain.last().unwrap(), "request", "{chain:?}");
    let root = spans
        .iter()
        .find(|s| s.trace == trace && s.parent.is_empty())
        .unwrap();
    assert_eq!(root.kind, 2, "the request span is a server span");
    assert_eq!(root.attributes["http.route"], "/api/");
    assert_eq!(root.attributes["http.response.status_code"], "200");
    // The refresh's grant at the provider, in the same trace, below the request.
    let grant = spans
        .iter()
        .find(|s| s.trace == trace && s.name == "provider call")
        .unwrap();
    assert_eq!(ancestry(&spans, grant).last().unwrap(), "request");
    assert!(
        spans.iter().any(|s| s.trace == trace && s.name == "redis"),
        "the refresh's Redis commands are spans of the request's trace"
    );

    // The login: its callback span holds the code grant, a provider call.
    let callback = t.receiver.span("callback", None).await;
    let code_grant = spans
        .iter()
        .filter(|s| s.trace == callback.trace && s.name == "provider call")
        .find(|s| ancestry(&spans, s).contains(&"callback".to_string()))
        .expect("no provider call below the callback span");
    assert_eq!(code_grant.kind, 3);
    t.receiver.span("login", None).await;
    t.receiver.span("session load", None).await;

    // Nothing secret in any attribute: no cookie value, token, code or session id.
    let tokens = s.provider.tokens("alice").await;
    let mut secrets: Vec<String> = browser.jar.values().cloned().collect();
    for name in ["access_token", "refresh_token", "id_token"] {
        if let Some(v) = tokens[name].as_str() {
            secrets.push(v.to_string());
        }
    }
    assert!(secrets.len() >= 3, "{secrets:?}");
    let spans = t.receiver.spans();
    for span in &spans {
        for (key, value) in &span.attributes {
            for secret in &secrets {
                assert!(
                    !value.contains(secret.as_str()),
                    "{} attribute {key} carries a secret",
                    span.name
                );
            }
            assert!(
                !value.contains("code="),
                "{} attribute {key} carries a code",
                span.name
            );
            assert!(
                !value.contains("state="),
                "{} attribute {key} carries a state",
                span.name
            );
            assert!(
                !key.contains("cookie") && !key.contains("authorization"),
                "{key}"
            );
        }
    }
}

#[tokio::test]
async fn an_untrusted_browser_can_neither_force_sampling_nor_choose_the_trace_id() {
    let t = traced(0.0, "10.255.255.0/24").await;
    let s = &t.stack;
    let mut browser = s.login("alice").await;
    let forced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = browser
        .get(
            &s.proxy().url("/api/forced"),
            &[
                ("x-csrf", "1"),
                ("traceparent", forced),
                ("tracestate", "a=b"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let header = seen_traceparent(s, "/forced").expect("no traceparent upstream");
    let (trace, _, flags) = traceparent(&header);
    assert_ne!(
        trace, "0af7651916cd43dd8448eb211c80319c",
        "the browser chose the trace"
    );
    assert_eq!(
        flags, "00",
        "ratio 0: not sampled, whatever the browser says"
    );
    let seen = s.up.last();
    assert!(seen.headers.get("tracestate").is_none());
}

#[tokio::test]
async fn a_trusted_proxy_decides_sampling_and_its_trace_continues_upstream() {
    let t = traced(0.0, "127.0.0.1/32").await;
    let s = &t.stack;
    let mut browser = s.login("alice").await;
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = browser
        .get(
            &s.proxy().url("/api/continued"),
            &[("x-csrf", "1"), ("traceparent", incoming)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let header = seen_traceparent(s, "/continued").expect("no traceparent upstream");
    let (trace, parent, flags) = traceparent(&header);
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(flags, "01");
    let hop = t.receiver.span("upstream hop", Some(&trace)).await;
    assert_eq!(hop.id, parent);
    let spans = t.receiver.spans();
    let root = spans
        .iter()
        .find(|s| s.trace == trace && s.name == "request")
        .unwrap();
    assert_eq!(
        root.parent, "b7ad6b7169203331",
        "the proxy's span is the parent"
    );
    // Unsampled by the trusted proxy: a new request with flag 00 exports nothing of its trace.
    let unsampled = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    browser
        .get(
            &s.proxy().url("/api/unsampled"),
            &[("x-csrf", "1"), ("traceparent", unsampled)],
        )
        .await;
    let header = seen_traceparent(s, "/unsampled").unwrap();
    assert_eq!(traceparent(&header).2, "00");
    // The next sampled request's spans arrive; none of the unsampled trace came before them.
    let again = "00-2af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    browser
        .get(
            &s.proxy().url("/api/again"),
            &[("x-csrf", "1"), ("traceparent", again)],
        )
        .await;
    t.receiver
        .span("request", Some("2af7651916cd43dd8448eb211c80319c"))
        .await;
    assert!(
        !t.receiver
            .spans()
            .iter()
            .any(|s| s.trace == "1af7651916cd43dd8448eb211c80319c")
    );
}

/// The `vestibule_*` series `text` (Prometheus exposition) names, without histogram suffixes.
#[tokio::test]
async fn session_cache_hits_and_misses_are_counted() {
    let t = traced(0.0, "10.255.255.0/24").await;
    let s = &t.stack;
    let mut browser = s.login("alice").await;
    let metrics = format!("http://{}/metrics", s.proxy().admin);
    let before = get(&metrics, &[]).await.text();
    for i in 0..40 {
        let r = browser
            .get(&s.proxy().url(&format!("/api/c{i}")), &[("x-csrf", "1")])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after = get(&metrics, &[]).await.text();
    // One session, one part of the cache: its hits are added in batches of 32.
    let hits = cache_lookups(&after, "hit") - cache_lookups(&before, "hit");
    assert!(
        hits >= 32,
        "{hits} hits counted for 40 requests of one session: {after}"
    );
    assert!(
        cache_lookups(&after, "miss") >= 1,
        "the session's first load is a miss: {after}"
    );
}

/// `vestibule_session_cache_lookups_total{result}` in a scrape (0 when absent).
fn cache_lookups(metrics: &str, result: &str) -> u64 {
    let prefix = format!("vestibule_session_cache_lookups_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| n.starts_with("vestibule_"))
        .map(|n| {
            n.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect()
}

/// The series `docs/metrics.md` documents (each in backticks at the start of a table row) and
/// the labels of each: the names in backticks in its row's third cell, before any `:` and
/// outside parentheses (which list the values).
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| `vestibule_"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let name = cells[0].trim_matches('`').to_string();
            let cell = cells[2].split(':').next().unwrap();
            let (mut labels, mut depth) = (BTreeSet::new(), 0);
            for (i, part) in cell.split('`').enumerate() {
                if i % 2 == 1 && depth == 0 && part != "–" {
                    labels.insert(part.to_string());
                } else if i % 2 == 0 {
                    depth += part.matches('(').count();
                    depth -= part.matches(')').count();
                }
            }
            (name, labels)
        })
        .collect()
}

/// Each `vestibule_*` line of a scrape: its series (without histogram suffixes) and its label
/// names (`le` of a bucket left out).
fn scraped_labels(text: &str) -> Vec<(String, BTreeSet<String>)> {
    text.lines()
        .filter(|l| l.starts_with("vestibule_"))
        .map(|l| {
            let name = series(l).into_iter().next().unwrap();
            let labels = l
                .split_once('{')
                .map(|(_, rest)| rest.rsplit_once('}').unwrap().0)
                .unwrap_or_default();
            let names = labels
                .split("\",")
                .filter_map(|pair| pair.split_once('='))
                .map(|(label, _)| label.trim_start_matches(',').to_string())
                .filter(|label| label != "le")
                .collect();
            (name, names)
        })
        .collect()
}

#[tokio::test]
async fn every_series_after_a_login_refresh_and_logout_is_documented() {
    let t = traced(1.0, "10.255.255.0/24").await;
    let s = &t.stack;
    let mut browser = s.login("alice").await;
    browser
        .get(&s.proxy().url("/api/one"), &[("x-csrf", "1")])
        .await;
    t.clock
        .advance(Duration::from_millis((TTL - SKEW) * 1000 + 300));
    let r = browser
        .get(&s.proxy().url("/api/two"), &[("x-csrf", "1")])
        .await;
    assert_eq!(r.status, 200);
    let r = browser
        .request(
            "POST",
            &s.proxy().url("/bff/logout"),
            &[("x-csrf", "1")],
            None,
        )
        .await;
    assert!(r.status < 400, "{}", r.text());
    let metrics = get(&format!("http://{}/metrics", s.proxy().admin), &[])
        .await
        .text();
    // The flow's own series are there (so the comparison below means something).
    for needed in [
        "vestibule_logins_total",
        "vestibule_callbacks_total",
        "vestibule_refresh_lock_wait_seconds",
        "vestibule_store_duration_seconds",
        "vestibule_logouts_total",
    ] {
        assert!(
            series(&metrics).contains(needed),
            "{needed} missing: {metrics}"
        );
    }
    assert!(
        metrics.contains("route=\"bff:/login\"") && metrics.contains("route=\"bff:/callback\""),
        "each BFF endpoint has its own route label: {metrics}"
    );
    let documented = documented();
    let names: BTreeSet<String> = documented.keys().cloned().collect();
    let missing: Vec<_> = series(&metrics).difference(&names).cloned().collect();
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
    // And with the labels the table gives them.
    for (name, labels) in scraped_labels(&metrics) {
        let undocumented: Vec<_> = labels.difference(&documented[&name]).collect();
        assert!(
            undocumented.is_empty(),
            "{name}: labels {undocumented:?} are not in its row of docs/metrics.md"
        );
    }
}

/// Every series `docs/metrics.md` documents is one the code records, and the other way round:
/// each is named in `src/` (`metrics::counter!("vestibule_…"`, …), with no label the table
/// does not give it. The scrape above sees only the series a login, a refresh and a logout
/// touch; this sees the rest (rate limits, upstream errors, trace export, …).
#[test]
fn every_documented_series_is_recorded_by_the_code_with_its_labels() {
    fn sources(dir: &std::path::Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut src = String::new();
    sources(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut src,
    );
    let documented = documented();
    let mut named = BTreeSet::new();
    for (at, _) in src.match_indices("\"vestibule_") {
        let name: String = src[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // The labels a recording macro gives it: `"name", "label" => value, …)`.
        let call = &src[at + 1 + name.len()..];
        let call = &call[..call.find(')').unwrap_or(call.len())];
        let parts: Vec<&str> = call.split("=>").collect();
        for label in parts[..parts.len() - 1].iter().filter_map(|part| {
            let quoted = part.trim_end().strip_suffix('"')?;
            Some(&quoted[quoted.rfind('"')? + 1..])
        }) {
            assert!(
                documented.get(&name).is_some_and(|l| l.contains(label)),
                "{name}: the code gives it label {label:?}, its row of docs/metrics.md does not"
            );
        }
        named.insert(name);
    }
    let documented: BTreeSet<String> = documented.into_keys().collect();
    assert_eq!(
        documented.difference(&named).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "documented in docs/metrics.md, recorded nowhere in src/"
    );
    assert_eq!(
        named.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "recorded in src/, not documented in docs/metrics.md"
    );
}

#[test]
fn the_grafana_dashboard_is_json_and_queries_only_documented_series() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/vestibule.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let documented = documented();
    let mut used = BTreeSet::new();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 6, "a dashboard worth opening");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut in_expr = Vec::new();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("vestibule_") {
                    let name = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count");
                    assert!(
                        documented.contains_key(name),
                        "{name} in {expr} is not documented"
                    );
                    used.insert(name.to_string());
                    in_expr.push(name);
                }
            }
            // A label the query selects on (`series{label=…}`) is one of that series'; one it
            // groups by (`by (…)`) is one of every series it aggregates (`le`: a histogram's).
            for (at, _) in expr.match_indices('{') {
                let name: String = expr[..at]
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let name = name.trim_end_matches("_bucket");
                let selector = &expr[at + 1..at + expr[at..].find('}').unwrap()];
                for label in selector
                    .split(',')
                    .filter_map(|m| m.split(['=', '!']).next())
                {
                    assert!(
                        documented[name].contains(label.trim()),
                        "{expr}: {name} has no label {label:?} in docs/metrics.md"
                    );
                }
            }
            for (at, _) in expr.match_indices("by (") {
                let group = &expr[at + 4..at + expr[at..].find(')').unwrap()];
                for label in group.split(',').map(str::trim).filter(|l| *l != "le") {
                    for name in &in_expr {
                        assert!(
                            documented[*name].contains(label),
                            "{expr}: {name} has no label {label:?} in docs/metrics.md"
                        );
                    }
                }
            }
        }
    }
    assert!(used.len() >= 8, "{used:?}");
}

/// The real binary, logging JSON at debug to a file, with traces to `receiver`.
struct Binary {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(text: &TomlConfig) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_port();
        let text = text
            .clone()
            .set("admin.listen", format!("127.0.0.1:{admin}"));
        let (child, log) = spawn_binary(dir.path(), &text);
        let binary = Binary {
            child,
            log,
            _dir: dir,
        };
        wait_binary_ready(admin).await;
        binary
    }

    /// Stops the process; its log lines as JSON.
    fn stop(mut self) -> Vec<serde_json::Value> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(self.child.wait().unwrap().success());
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[tokio::test]
async fn the_access_log_names_client_user_agent_canonical_path_and_trace() {
    let receiver = Receiver::start().await;
    let port = free_port();
    let provider = crate::support::provider::start(port, serde_json::json!({}));
    let up = crate::support::upstream::start().await;
    let text = login_toml(
        port,
        &provider.issuer,
        &format!(
            "[log]\nlevel = \"debug\"\nformat = \"json\"\n[telemetry]\notlp_endpoint = \"{}\"\nlog_user = \"hash\"\n[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\ntoken = \"user\"\n",
            receiver.url,
            up.url()
        ),
    )
    .add("server.trusted_proxies", vec!["127.0.0.1/32"]);
    let binary = Binary::start(&text).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut browser = Browser::default();
    let done = browser.login(&base, "alice", "alice", "/").await;
    assert_eq!(done.status, 302, "{}", done.text());
    let headers = [
        ("x-csrf", "1"),
        ("x-forwarded-for", "203.0.113.9"),
        ("user-agent", "incident-test/1.0"),
    ];
    let r = browser
        .get(&format!("{base}/api//a/./%62c"), &headers)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let traceparent = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let long = format!("{base}/api/{}", "x".repeat(2000));
    assert_eq!(browser.get(&long, &headers).await.status, 200);
    // Refused inside a traced request: its debug line still reaches the log.
    let refused = browser.get(&format!("{base}/api/no-csrf"), &[]).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    let lines = binary.stop();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "vestibule::access")
        .collect();
    let line = access
        .iter()
        .find(|l| l["path"] == "/api/a/bc")
        .unwrap_or_else(|| panic!("no access line with the canonical path: {access:?}"));
    assert_eq!(line["route"], "/api/");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client"], "203.0.113.9");
    assert_eq!(line["user_agent"], "incident-test/1.0");
    assert_eq!(line["trace_id"].as_str(), Some(&traceparent[3..35]));
    let user = line["user"].as_str().unwrap();
    assert_eq!(user.len(), 16, "a keyed hash: {user}");
    assert!(!user.contains("alice"));
    assert!(line["upstream_ms"].as_f64().is_some());
    let cut = access
        .iter()
        .find(|l| l["path"].as_str().unwrap().starts_with("/api/xxxx"))
        .unwrap();
    assert!(cut["path"].as_str().unwrap().len() <= 256, "{cut}");
    for name in ["bff:/login", "bff:/callback"] {
        assert!(
            access.iter().any(|l| l["route"] == name),
            "{name}: {access:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "DEBUG" && l["message"] == "request refused"),
        "a debug line from inside a traced request is missing"
    );
}

/// A method is any token a client writes (up to `max_header_size`, ~64 KiB), and every request
/// span carries it: at `sample_ratio = 1`, with the collector slow, the export queue (4096
/// spans) would hold that much per span, and the access log would write it whole. The span
/// says `_OTHER` for a method HTTP does not define (OpenTelemetry's rule for
/// `http.request.method`), and the access log cuts it as it cuts the path.
#[tokio::test]
async fn a_clients_own_method_neither_swells_its_span_nor_its_log_line() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "hi").unwrap();
    let port = free_port();
    let text = config_toml(&format!(
        "[log]\nformat = \"json\"\n[telemetry]\notlp_endpoint = \"{}\"\nsample_ratio = 1.0\n\
         [[routes]]\npath = \"/\"\nstatic_dir = {:?}\n",
        receiver.url,
        site.display().to_string()
    ))
    .set("server.listen", format!("127.0.0.1:{port}"))
    .set("server.max_header_size", "64KiB")
    .set("admin.listen", format!("127.0.0.1:{}", free_port()));
    let (mut child, log) = spawn_binary(dir.path(), &text);
    eventually(
        "the public listener is up",
        Duration::from_secs(20),
        || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let method = "M".repeat(30_000);
    for method in [method.as_str(), "GET"] {
        let request =
            format!("{method} /x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
        let answer = crate::support::raw_exchange(("127.0.0.1", port), request.as_bytes()).await;
        assert!(answer.starts_with(b"HTTP/1.1 4"), "{:?}", &answer[..20]);
    }
    let methods = eventually("both request spans arrive", Duration::from_secs(10), || {
        let spans = receiver.spans();
        async move {
            let methods: Vec<String> = spans
                .iter()
                .filter(|s| s.name == "request")
                .filter_map(|s| s.attributes.get("http.request.method").cloned())
                .collect();
            (methods.len() >= 2).then_some(methods)
        }
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    let mut methods = methods;
    methods.sort();
    assert_eq!(methods, ["GET", "_OTHER"]);
    let lines = std::fs::read_to_string(&log).unwrap();
    let logged: Vec<serde_json::Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "vestibule::access")
        .collect();
    assert_eq!(logged.len(), 2, "{lines}");
    for line in &logged {
        let method = line["method"].as_str().unwrap();
        assert!(
            method.len() <= 256,
            "the access log wrote a {}-byte method",
            method.len()
        );
    }
}

/// W3C `baggage` travels beside `traceparent` and `tracestate` and crosses the same boundary:
/// OpenTelemetry SDKs upstream take its entries into their context (and, with a baggage span
/// processor, into every span and log), and some services read it (a tenant, a user). From a
/// browser it is removed with the trace context; from a trusted proxy it passes.
#[tokio::test]
async fn an_untrusted_client_cannot_hand_baggage_to_the_upstreams() {
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url()
    );
    for (trusted, kept) in [(None, false), (Some("127.0.0.1/32"), true)] {
        let mut text = config_toml(&routes);
        if let Some(cidr) = trusted {
            text = text.add("server.trusted_proxies", vec![cidr]);
        }
        let proxy = start_proxy(text).await;
        let r = get(
            &proxy.url("/open/x"),
            &[("baggage", "tenant=other,user.id=admin")],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = up.last().headers.get("baggage").cloned();
        assert_eq!(seen.is_some(), kept, "trusted: {trusted:?}: {seen:?}");
    }
}

/// A trusted proxy's trace context is passed on only as W3C Trace Context allows it: a
/// `traceparent` that is one version-00 field (lowercase hex, ids not all zero), and beside it a
/// `tracestate` of at most 32 list members, each `key=value` in the specification's grammar,
/// keys unique, at most 512 characters in all (its fields combined). An invalid `tracestate` is
/// removed; an invalid, repeated or missing `traceparent` takes its `tracestate` with it (the
/// state belongs to that parent). Without a tracer the valid `traceparent` passes unchanged;
/// with one, the trace goes on with its trace id, or a new one starts.
#[tokio::test]
async fn a_trusted_proxys_trace_context_is_passed_on_only_when_it_is_well_formed() {
    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let many = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let long = (0..5)
        .map(|i| format!("k{i}={}", "x".repeat(100)))
        .collect::<Vec<_>>()
        .join(",");
    let (first_half, second_half) = (
        many(17),
        (17..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(","),
    );
    let (most, too_many) = (many(32), many(33));
    let (long_key, long_value) = (
        format!("{}=v", "k".repeat(257)),
        format!("k={}", "v".repeat(257)),
    );
    // (traceparent fields, tracestate fields, the traceparent kept, the tracestate kept)
    let cases: Vec<(Vec<&str>, Vec<&str>, bool, bool)> = vec![
        (
            vec![PARENT],
            vec!["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
            true,
            true,
        ),
        (vec![PARENT], vec!["a=1", "b=2"], true, true),
        (vec![PARENT], vec!["a=1, ,b=2 ,\tc=x y"], true, true),
        (
            vec![PARENT],
            vec!["tenant@vendor=1,1a/b*c_d-e=v"],
            true,
            true,
        ),
        (vec![PARENT], vec![&most], true, true),
        (vec![PARENT], vec![&too_many], true, false),
        (vec![PARENT], vec![&first_half, &second_half], true, false),
        (vec![PARENT], vec![&long], true, false),
        (vec![PARENT], vec!["Rojo=1"], true, false),
        (vec![PARENT], vec!["_a=1"], true, false),
        (vec![PARENT], vec!["a=b=c"], true, false),
        (vec![PARENT], vec!["a"], true, false),
        (vec![PARENT], vec!["a="], true, false),
        (vec![PARENT], vec!["a=x\ty"], true, false),
        (vec![PARENT], vec!["a=1,a=2"], true, false),
        (vec![PARENT], vec![&long_key], true, false),
        (vec![PARENT], vec![&long_value], true, false),
        (vec![], vec!["a=1"], false, false),
        (vec![PARENT, PARENT], vec!["a=1"], false, false),
        (
            vec!["00-00000000000000000000000000000000-b7ad6b7169203331-01"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"],
            vec!["a=1"],
            false,
            false,
        ),
        (
            vec!["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"],
            vec![],
            false,
            false,
        ),
    ];
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url()
    );
    for tracer in [false, true] {
        let mut text = config_toml(&routes).add("server.trusted_proxies", vec!["127.0.0.1/32"]);
        if tracer {
            // A collector nobody listens at: spans are dropped, requests never wait for it.
            text = text.add(
                "telemetry.otlp_endpoint",
                format!("http://127.0.0.1:{}", free_port()),
            );
        }
        let proxy = start_proxy(text).await;
        for (parents, states, parent_kept, state_kept) in &cases {
            let mut headers: Vec<(&str, &str)> =
                parents.iter().map(|p| ("traceparent", *p)).collect();
            headers.extend(states.iter().map(|s| ("tracestate", *s)));
            let case = format!("tracer: {tracer}, traceparent {parents:?}, tracestate {states:?}");
            let r = get(&proxy.url("/open/x"), &headers).await;
            assert_eq!(r.status, 200, "{case}: {}", r.text());
            let seen = up.last().headers;
            let all = |name: &str| -> Vec<String> {
                seen.get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_string())
                    .collect()
            };
            let (parent, state) = (all("traceparent"), all("tracestate"));
            match (tracer, parent_kept) {
                (false, true) => assert_eq!(parent, [PARENT], "{case}"),
                (false, false) => assert!(parent.is_empty(), "{case}: {parent:?}"),
                (true, kept) => {
                    assert_eq!(parent.len(), 1, "{case}: {parent:?}");
                    assert_eq!(
                        parent[0].split('-').nth(1) == Some(TRACE),
                        *kept,
                        "{case}: {parent:?}"
                    );
                }
            }
            if *state_kept {
                assert_eq!(state.join(","), states.join(","), "{case}");
            } else {
                assert!(state.is_empty(), "{case}: {state:?}");
            }
        }
    }
}

/// An upstream answering with the status its path names (`/<code>`, any of 100–999).
async fn status_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let code = req
                        .uri()
                        .path()
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let mut response = http::Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// The `status` label values of `vestibule_requests_total` for `route` in a scrape.
fn status_labels(metrics: &str, route: &str) -> BTreeSet<String> {
    let route = format!("route=\"{route}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("vestibule_requests_total{") && l.contains(&route))
        .filter_map(|l| l.split("status=\"").nth(1)?.split('"').next())
        .map(str::to_string)
        .collect()
}

/// An upstream chooses the status of its answers: with a label value per status it sends, it
/// could add up to 900 series to every scrape for each route (and as many histograms). A status
/// that is not a registered one is counted under its class (`5xx`), which the dashboard's
/// `status=~"5.."` still matches; the registered ones keep their own value.
#[tokio::test]
async fn an_upstream_cannot_add_a_status_series_per_code_it_invents() {
    let upstream = status_upstream().await;
    let route = "/odd-statuses/";
    let proxy = start_proxy(config_text(&format!(
        "[[routes]]\npath = \"{route}\"\nupstream = \"http://{upstream}\"\nauth = \"none\"\ntoken = \"none\"\n"
    )))
    .await;
    let invented = [299, 342, 477, 499, 520, 599, 600, 799, 999];
    for code in [200, 404, 418, 503].into_iter().chain(invented) {
        let r = get(&proxy.url(&format!("{route}{code}")), &[]).await;
        assert_eq!(r.status, code, "the status passes through unchanged");
    }
    // Many more invented codes add nothing beyond their classes.
    for code in (500..600).filter(|c| {
        http::StatusCode::from_u16(*c)
            .unwrap()
            .canonical_reason()
            .is_none()
    }) {
        get(&proxy.url(&format!("{route}{code}")), &[]).await;
    }
    let metrics = get(&format!("http://{}/metrics", proxy.admin), &[])
        .await
        .text();
    let expected: BTreeSet<String> = [
        "200", "404", "418", "503", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "9xx",
    ]
    .map(String::from)
    .into();
    assert_eq!(status_labels(&metrics, route), expected, "{metrics}");
    // The duration histogram has the same labels.
    let histograms = metrics
        .lines()
        .filter(|l| {
            l.starts_with("vestibule_request_duration_seconds_count{")
                && l.contains(&format!("route=\"{route}\""))
        })
        .count();
    assert_eq!(histograms, expected.len(), "{metrics}");
}

/// A collector reached over https is trusted as `[tls]` says, as upstreams are: one behind a
/// private CA named by `[tls] ca_file` receives the spans. Before, the exporter trusted only the
/// compiled-in public roots, and every batch was dropped as "could not be reached".
#[tokio::test]
async fn a_collector_behind_the_private_ca_of_tls_ca_file_receives_the_spans() {
    let receiver = Receiver::start().await;
    let ca = crate::support::pki::TestCa::new("Collector CA");
    let plain = receiver.url.trim_start_matches("http://").parse().unwrap();
    let (front, _) = crate::support::pki::tls_front(ca.acceptor(None), plain).await;
    let up = crate::support::upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"{}\"\n",
        up.url()
    );
    let config = config_toml(&routes)
        .add("tls.ca_file", ca.ca_file.display().to_string())
        .add("telemetry.otlp_endpoint", format!("https://{front}"))
        .add("telemetry.sample_ratio", 1.0)
        .text();
    let proxy = start_proxy(&config).await;
    assert_eq!(get(&proxy.url("/api/traced"), &[]).await.status, 200);
    receiver.span("upstream hop", None).await;
}

/// A trusted proxy's `baggage` is passed on only as W3C Baggage allows it: each field a list of
/// `key = value` members, with `;` properties (`key` or `key = value`), a key an HTTP token and
/// a value of baggage-octets (printable ASCII but space, `"`, `,`, `;` and `\`), spaces and tabs
/// only around the separators; at most 64 members and 8192 bytes, its fields combined. Anything
/// else is removed whole, not repaired: SDKs upstream put its entries into their context,
/// spans and logs, so a proxy must not hand them what its own parser would not have let out.
/// Sent without a `traceparent`: baggage stands on its own (it is not part of the trace).
#[tokio::test]
async fn a_trusted_proxys_baggage_is_passed_on_only_when_it_is_well_formed() {
    let members = |from: usize, to: usize| {
        (from..to)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (most, too_many) = (members(0, 64), members(0, 65));
    let (first_half, second_half) = (members(0, 33), members(33, 65));
    // Exactly 8192 bytes, and one more: two members of 4096 bytes around a comma.
    let sized = |k: usize, n: usize| format!("k{k}={}", "x".repeat(n - 3));
    let at_most = [sized(0, 4096), sized(1, 4095)].join(",");
    let too_long = [sized(0, 4096), sized(1, 4096)].join(",");
    assert_eq!((at_most.len(), too_long.len()), (8192, 8193));
    let (split_a, split_b) = (sized(0, 4096), sized(1, 4096));
    // (baggage fields, kept)
    let cases: Vec<(Vec<&str>, bool)> = vec![
        (
            vec!["userId=alice,serverNode=DF%2028,isProduction=false"],
            true,
        ),
        (
            vec![
                "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue",
            ],
            true,
        ),
        (vec!["a=1", "b=2"], true),
        (vec!["k!#$%&'*+-.^_`|~9=v"], true),
        (vec!["a=", "b=x=y", "c=!#/:<[]>?@~"], true),
        (vec!["a=1 ;\tp ; q = 2"], true),
        (vec![&most], true),
        (vec![&at_most], true),
        (vec![&too_many], false),
        (vec![&first_half, &second_half], false),
        (vec![&too_long], false),
        (vec![&split_a, &split_b], false),
        (vec!["a b=1"], false),
        (vec!["a(b)=1"], false),
        (vec!["=1"], false),
        (vec!["a"], false),
        (vec!["a=1,"], false),
        (vec!["a=1,,b=2"], false),
        (vec![""], false),
        (vec!["a=x y"], false),
        (vec!["a=x\ty"], false),
        (vec!["a=\"q\""], false),
        (vec!["a=x\\y"], false),
        (vec!["a=1;"], false),
        (vec!["a=1;p=x y"], false),
        (vec!["a=1;b c"], false),
        (vec!["a=1;=x"], false),
        (vec!["a=1", "b c=2"], false),
    ];
    let up = upstream::start().await;
    let routes = format!(
        "[[routes]]\npath = \"/open/\"\nupstream = \"{}\"\n",
        up.url()
    );
    // The default head limit (the tests' is 8 KiB): room for baggage past its own.
    let text = config_toml(&routes)
        .add("server.trusted_proxies", vec!["127.0.0.1/32"])
        .set("server.max_header_size", "64KiB");
    let proxy = start_proxy(text).await;
    for (fields, kept) in &cases {
        let headers: Vec<(&str, &str)> = fields.iter().map(|f| ("baggage", *f)).collect();
        let r = get(&proxy.url("/open/x"), &headers).await;
        let case = format!("baggage {fields:?}");
        assert_eq!(r.status, 200, "{case}: {}", r.text());
        let seen: Vec<String> = up
            .last()
            .headers
            .get_all("baggage")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        if *kept {
            assert_eq!(seen, *fields, "{case}");
        } else {
            assert!(seen.is_empty(), "{case}: {seen:?}");
        }
    }
}
