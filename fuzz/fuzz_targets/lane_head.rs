//! Request heads as Vestibule's own HTTP/1 lane takes them (`server::lane`), against hyper's
//! server given the same bytes behind the framing guard — what a connection handed to hyper
//! meets. Any head the lane takes, hyper takes too, as the same request: method, target, every
//! header line a forwarded request keeps (hop-by-hop ones aside; each name's values in order),
//! no body. So the lane never accepts what the front door would refuse, nor reads a request
//! differently from the parser it stands in for. It never panics.
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use vestibule::proxy::headers::{RecentNames, strip_hop_by_hop};
use vestibule::server::framing::Guarded;
use vestibule::server::lane::take;

/// Kept from input to input, as a connection keeps its last head's names.
static NAMES: LazyLock<Mutex<RecentNames>> = LazyLock::new(Mutex::default);

static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
});

#[derive(Debug, PartialEq)]
struct Read {
    method: String,
    target: String,
    fields: Vec<(String, Vec<u8>)>,
    bodiless: bool,
}

pub fn fuzz(data: &[u8]) {
    let taken = take(data, &mut NAMES.lock().unwrap_or_else(|p| p.into_inner()));
    let Some((len, ours)) = taken else {
        return;
    };
    let head = &data[..len];
    let ours = Read {
        method: ours.method().to_string(),
        target: ours.uri().to_string(),
        fields: forwarded(ours.headers()),
        bodiless: ours.body().is_end_stream(),
    };
    let theirs = RUNTIME.block_on(hyper_reads(head));
    let Some(theirs) = theirs else {
        panic!(
            "hyper refused a head the lane took: {:?}",
            String::from_utf8_lossy(head)
        );
    };
    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(head));
}

/// The fields of `headers` that a forwarded request keeps: the lane leaves the hop-by-hop ones
/// out where hyper keeps them for the proxy to remove, so they are compared once removed. A
/// removal moves the map's last name into the removed one's place, so names are compared in
/// name order; each name's values stay in the order they came.
fn forwarded(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    let mut fields: Vec<_> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
}

/// The request hyper's HTTP/1 server reads from `head` behind the framing guard, if any.
async fn hyper_reads(head: &[u8]) -> Option<Read> {
    let (mut client, server) = tokio::io::duplex(256 * 1024);
    let seen: std::sync::Arc<Mutex<Option<Read>>> = Default::default();
    let record = seen.clone();
    let service = service_fn(move |req: http::Request<Incoming>| {
        let mut slot = record.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Read {
                method: req.method().to_string(),
                target: req.uri().to_string(),
                fields: forwarded(req.headers()),
                bodiless: req.body().is_end_stream(),
            });
        }
        async { Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new())) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(Guarded::new(server)), service);
    let write = async {
        let _ = client.write_all(head).await;
        let _ = client.shutdown().await;
        // Drain the answer so that hyper is never blocked writing it.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(conn, write) }).await;
    seen.lock().unwrap_or_else(|p| p.into_inner()).take()
}
