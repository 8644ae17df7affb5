#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::field::Made;
use crate::proxy::forward::late_answer;
use crate::proxy::headers::Replaced;
use http::HeaderValue;
use std::io::{Read, Write};
use std::sync::mpsc;

static REQUEST_ID: Made = Made::Value(HeaderValue::from_static("id-1"));

/// A blocking HTTP/1.1 upstream on a thread of its own (so that it writes while the test's
/// runtime is busy): each connection's requests are answered by target. `/alice` gets `ok`,
/// and once `late` says so, a second, unasked answer that carries alice's data; anything else
/// gets `bob`.
fn upstream(late: mpsc::Receiver<()>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let late = Arc::new(Mutex::new(late));
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            let late = late.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let head = loop {
                        if let Some(head) = late_answer::next_head(&mut seen) {
                            break head;
                        }
                        match tcp.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&chunk[..n]),
                        }
                    };
                    if late_answer::is_alices(&head) {
                        tcp.write_all(late_answer::FIRST).unwrap();
                        let _ = late.lock().unwrap().recv();
                        let _ = tcp.write_all(late_answer::LATE);
                    } else {
                        let _ = tcp.write_all(late_answer::OTHER);
                    }
                }
            });
        }
    });
    addr
}

async fn get(pool: &Arc<LocalPool>, uri: &str) -> Vec<u8> {
    let mut req = Request::get(uri).body(super::super::no_body()).unwrap();
    let replaced = Replaced {
        host: HeaderValue::from_static("up.test"),
        owns_authorization: true,
        authorization: None,
        forwarded_for: None,
        forwarded_proto: None,
        forwarded_host: None,
        cookie: None,
        request_id: &REQUEST_ID,
    };
    let response = exchange(pool, &mut req, &replaced, None).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// Bytes that reach an idle pooled connection while the worker is busy (no turn of its event
/// loop in between, as when a pipelined request or another task woken by the same turn comes
/// next) are no answer to the next request on it, which may be another user's. The runtime's
/// idea of the socket's readiness is stale then: a partial read cleared it, and only the event
/// loop sets it again.
#[tokio::test]
async fn bytes_reaching_a_pooled_connection_while_the_worker_is_busy_never_answer_the_next_request()
{
    let (late, go) = mpsc::channel();
    let addr = upstream(go);
    let pool = Arc::new(LocalPool::new(
        crate::net::http_connector(),
        Arc::new(Deadlines::default()),
    ));
    assert_eq!(get(&pool, &format!("http://{addr}/alice")).await, b"ok");
    // The unasked answer is written and arrives while this thread is blocked: the runtime's
    // event loop does not turn meanwhile.
    late.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let bob = get(&pool, &format!("http://{addr}/bob")).await;
    late_answer::assert_bobs(&bob);
}

async fn send_get(pool: &LocalPool, uri: &str) -> Vec<u8> {
    send_with(pool, Request::get(uri), crate::reply::empty()).await
}

async fn send_with(pool: &LocalPool, req: http::request::Builder, body: Body) -> Vec<u8> {
    let req = req.header("host", "up.test").body(body).unwrap();
    let response = send(pool, req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// The same through hyper's client connections (requests with bodies and upgrades take them):
/// a connection's task reads an idle connection before it writes the next request, but that
/// read too asks the runtime's readiness first.
#[tokio::test]
async fn bytes_reaching_a_pooled_hyper_connection_while_the_worker_is_busy_never_answer_the_next_request()
 {
    let (late, go) = mpsc::channel();
    let addr = upstream(go);
    let pool = LocalPool::new(crate::net::http_connector(), Arc::new(Deadlines::default()));
    assert_eq!(
        send_get(&pool, &format!("http://{addr}/alice")).await,
        b"ok"
    );
    // Let the connection's task see the answer end and wait on the idle connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    late.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A request with a body, which is never sent twice: the connection is refused before it
    // is written, so it goes unsent to a fresh one.
    let bob = send_with(
        &pool,
        Request::post(format!("http://{addr}/bob")).header("content-length", "2"),
        crate::reply::full("hi"),
    )
    .await;
    late_answer::assert_bobs(&bob);
}
