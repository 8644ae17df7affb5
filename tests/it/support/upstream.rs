//! A real upstream HTTP server on port 0 that records what it saw and answers by path:
//! `/slow` waits, `/big?n=BYTES` streams a large body, `/upload` counts a streamed body,
//! `/ws` upgrades and echoes bytes (`/ws?slow`: its `101` after 1.5 s), `/ticks` is an event stream (a line every 100 ms, for
//! ever), `/set-cookie?a,b` answers with a `Set-Cookie` for each name
//! (`/set-cookie-bytes?a,b`: each deleted, with a value that is not UTF-8)
//! listed, `/status401` answers 401 `invalid_token`, `/challenge401` answers 401 with the
//! request's `X-Challenge` fields as its `WWW-Authenticate` (and its `X-DPoP-Nonce` as
//! `DPoP-Nonce`), `/cors` answers as an upstream with a lax CORS policy of its own would (the
//! request's `Origin` allowed with credentials; `/cors?star`: `*`), anything else echoes the
//! request head as JSON.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
}

#[derive(Clone, Default)]
pub struct Upstream {
    pub addr: Option<SocketAddr>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    /// The `Authorization` (empty when none) of each request seen whose URI holds `marker`,
    /// in order.
    pub fn authorizations(&self, marker: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.contains(marker))
            .map(|s| {
                s.headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

type B = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> B {
    Full::new(text.into()).boxed()
}

pub async fn start() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut up = Upstream {
        addr: Some(listener.local_addr().unwrap()),
        ..Default::default()
    };
    let seen = up.seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    up.seen = up.seen.clone();
    up
}

async fn handle(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<B>, Infallible> {
    let record = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    };
    seen.lock().unwrap().push(record.clone());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        return Ok(Response::new(full("slow done")));
    }
    if path.ends_with("/big") {
        let n: u64 = query
            .strip_prefix("n=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = n.div_ceil(chunk.len() as u64);
        let stream = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
        );
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))));
    }
    if path.ends_with("/ticks") {
        let ticks = futures_util::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let line = Bytes::from(format!("data: tick {n}\n\n"));
            Some((Ok::<_, Infallible>(Frame::data(line)), n + 1))
        });
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(ticks)))
            .unwrap();
        return Ok(response);
    }
    if path.ends_with("/upload") {
        let mut body = req.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(total.to_string())));
    }
    if path.ends_with("/ws") {
        if query == "slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(""))
            .unwrap();
        return Ok(response);
    }
    if path.ends_with("/set-cookie") {
        let mut response = Response::builder();
        for name in query.split(',').filter(|n| !n.is_empty()) {
            response = response.header("set-cookie", format!("{name}=from-upstream; Path=/"));
        }
        return Ok(response.body(full("cookies set")).unwrap());
    }
    // The same, deleting each cookie with a value that is not UTF-8 (browsers take it).
    if path.ends_with("/set-cookie-bytes") {
        let mut response = Response::builder();
        for name in query.split(',').filter(|n| !n.is_empty()) {
            let mut value = format!("{name}=").into_bytes();
            value.extend_from_slice(b"\x80; Path=/; Max-Age=0");
            let value = http::HeaderValue::from_bytes(&value).unwrap();
            response = response.header("set-cookie", value);
        }
        return Ok(response.body(full("cookies set")).unwrap());
    }
    if path.ends_with("/cors") {
        let origin = record.headers.get("origin").cloned();
        let allowed = match origin {
            Some(origin) if query != "star" => origin,
            _ => http::HeaderValue::from_static("*"),
        };
        return Ok(Response::builder()
            .header("access-control-allow-origin", allowed)
            .header("access-control-allow-credentials", "true")
            .header("access-control-expose-headers", "x-total")
            .body(full("cors"))
            .unwrap());
    }
    if path.ends_with("/status401") {
        return Ok(Response::builder()
            .status(401)
            .header("www-authenticate", "Bearer error=\"invalid_token\"")
            .body(full("no"))
            .unwrap());
    }
    if path.ends_with("/challenge401") {
        let mut response = Response::builder().status(401);
        for challenge in record.headers.get_all("x-challenge") {
            response = response.header("www-authenticate", challenge);
        }
        if let Some(nonce) = record.headers.get("x-dpop-nonce") {
            response = response.header("dpop-nonce", nonce);
        }
        return Ok(response.body(full("no")).unwrap());
    }
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let body = serde_json::json!({"method": record.method, "uri": record.uri, "headers": headers});
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("x-request-id", "from-the-upstream")
        .body(full(body.to_string()))
        .unwrap())
}
