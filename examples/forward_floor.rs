//! The floor of the benchmarks: about the least CPU a proxy built on tokio can spend forwarding
//! a bodiless HTTP/1.1 request. Not a proxy anyone should run: no routing, no header changes, no
//! sessions, no limits, no timeouts; one upstream connection per client connection, kept for
//! its life; the request head forwarded byte for byte and the response (which must carry a
//! `Content-Length`) relayed byte for byte, through buffers kept across requests.
//!
//! `scripts/bench` runs it next to nginx and Vestibule with the same worker threads (a
//! single-threaded runtime each, as Vestibule's serving workers), so that the report can say how
//! much of nginx's CPU per request any proxy on this runtime gets to: what Vestibule spends
//! beyond the floor is its own (and hyper's), the floor's distance to nginx is the runtime's.
//!
//! With `FLOOR_HOP_AUTHORIZATION` set it makes the token route's hop instead of relaying the
//! head as it came: the client's `Cookie` fields are dropped, and `X-Forwarded-Host` (the
//! client's `Host`) and `Authorization` (the variable's value, e.g. `Bearer eyJ…`) are added, so
//! that the upstream gets the head a BFF sends for a session. The head is then written from
//! httparse's slices into a buffer kept across requests: the least work that hop takes on this
//! runtime, with no session to find.
//!
//! Usage: `forward_floor LISTEN UPSTREAM [WORKERS]`, e.g.
//! `forward_floor 127.0.0.1:8088 127.0.0.1:8089 2`.

use std::io::{Error, ErrorKind, Result};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        Error::new(
            ErrorKind::InvalidInput,
            "usage: forward_floor LISTEN UPSTREAM [WORKERS]",
        )
    };
    let listen: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .ok_or_else(usage)?;
    let upstream: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
    let workers: usize = match args.get(2) {
        Some(n) => n.parse().map_err(|_| usage())?,
        None => 2,
    };
    let hop: Option<&'static [u8]> = std::env::var("FLOOR_HOP_AUTHORIZATION")
        .ok()
        .map(|value| &*Box::leak(value.into_bytes().into_boxed_slice()));
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let mut threads = Vec::new();
    for _ in 0..workers {
        let listener = listener.try_clone()?;
        threads.push(std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener)?;
                loop {
                    let (client, _) = listener.accept().await?;
                    tokio::spawn(async move {
                        let _ = serve(client, upstream, hop).await;
                    });
                }
            })
        }));
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| Error::other("a worker panicked"))??;
    }
    Ok(())
}

fn invalid(what: &'static str) -> Error {
    Error::new(ErrorKind::InvalidData, what)
}

/// Relays requests from `client` to `upstream`, one at a time, until either side closes; with
/// `hop`, each head rewritten as the token route's hop (see the module's comment).
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    hop: Option<&'static [u8]>,
) -> Result<()> {
    client.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let mut from_client: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut from_up: Vec<u8> = Vec::with_capacity(16 * 1024);
    // The rewritten head (with `hop` only: the plain relay stays as it was).
    let mut to_up: Vec<u8> = Vec::with_capacity(if hop.is_some() { 16 * 1024 } else { 0 });
    loop {
        let head = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut fields);
            if let httparse::Status::Complete(n) = req
                .parse(&from_client)
                .map_err(|_| invalid("request head"))?
            {
                let framed = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("content-length")
                        || h.name.eq_ignore_ascii_case("transfer-encoding")
                });
                if framed {
                    return Err(invalid("requests with a body are not relayed"));
                }
                if let Some(authorization) = hop {
                    to_up.clear();
                    rewrite(&req, authorization, &mut to_up);
                }
                break n;
            }
            if client.read_buf(&mut from_client).await? == 0 {
                return Ok(());
            }
        };
        if hop.is_some() {
            up.write_all(&to_up).await?;
        } else {
            up.write_all(&from_client[..head]).await?;
        }
        from_client.drain(..head);
        let whole = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(n) =
                res.parse(&from_up).map_err(|_| invalid("response head"))?
            {
                let length = res
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or_else(|| invalid("a response without a length"))?;
                break n + length;
            }
            if up.read_buf(&mut from_up).await? == 0 {
                return Err(invalid("upstream closed"));
            }
        };
        while from_up.len() < whole {
            if up.read_buf(&mut from_up).await? == 0 {
                return Err(invalid("upstream closed"));
            }
        }
        client.write_all(&from_up[..whole]).await?;
        from_up.drain(..whole);
    }
}

/// The token route's hop for one parsed request head: its request line and fields but `Cookie`,
/// then `X-Forwarded-Host` and `Authorization`.
fn rewrite(req: &httparse::Request<'_, '_>, authorization: &[u8], out: &mut Vec<u8>) {
    let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host: &[u8] = b"";
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("cookie") {
            continue;
        }
        if field.name.eq_ignore_ascii_case("host") {
            host = field.value;
        }
        line(out, field.name.as_bytes(), field.value);
    }
    line(out, b"x-forwarded-host", host);
    line(out, b"authorization", authorization);
    out.extend_from_slice(b"\r\n");
}
