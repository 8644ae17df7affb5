//! A TCP relay in front of a Redis server that makes one command's answer come too late: once
//! armed, the first command that carries a chosen byte string reaches Redis at once (Redis
//! carries it out), but every reply on that connection is held back for a while, longer than
//! the store timeout. What `CLIENT PAUSE ... WRITE` does to every write, this does to one.
//! It can also silence connections that sent a command already ([`LateReplies::silence`]): a
//! subscription whose socket went half-open, still connected and never answering. And it can
//! cut a connection just before a command ([`LateReplies::cut_before`]): what went before it
//! was carried out, it never arrives. And it can send new connections to another server
//! ([`LateReplies::retarget`]): an address that follows the master across a failover.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The marker of the command whose answer is held back and for how long, until one carrying it
/// has passed.
type Armed = Arc<Mutex<Option<(Vec<u8>, Duration)>>>;

/// Each connection relayed: the first bytes its client sent, and until when its replies are
/// held back.
type Relayed = Arc<Mutex<Vec<(Arc<Mutex<Vec<u8>>>, Hold)>>>;
type Hold = Arc<Mutex<Option<Instant>>>;

/// How much of what a client sends is kept to look for a command in.
const KEPT: usize = 4096;

pub struct LateReplies {
    port: u16,
    armed: Armed,
    relayed: Relayed,
    cut: Cut,
    target: Arc<AtomicU16>,
}

/// The marker of the command before which a connection is cut, until one carrying it came.
type Cut = Arc<Mutex<Option<Vec<u8>>>>;

impl LateReplies {
    /// A relay to the Redis server on `redis_port`, passing everything through until armed.
    pub async fn start(redis_port: u16) -> LateReplies {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed: Armed = Arc::default();
        let relayed: Relayed = Arc::default();
        let cut: Cut = Arc::default();
        let shared = armed.clone();
        let connections = relayed.clone();
        let cutting = cut.clone();
        let target = Arc::new(AtomicU16::new(redis_port));
        let to = target.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = to.load(Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                let sent: Arc<Mutex<Vec<u8>>> = Arc::default();
                let hold: Hold = Arc::default();
                connections
                    .lock()
                    .unwrap()
                    .push((sent.clone(), hold.clone()));
                tokio::spawn(relay(
                    client,
                    server,
                    shared.clone(),
                    cutting.clone(),
                    sent,
                    hold,
                ));
            }
        });
        LateReplies {
            port,
            armed,
            relayed,
            cut,
            target,
        }
    }

    /// Relays the connections made from now on to the Redis server on `redis_port`; those made
    /// before stay with the server they reached.
    pub fn retarget(&self, redis_port: u16) {
        self.target.store(redis_port, Ordering::Relaxed);
    }

    /// The next bytes a client sends that carry `marker` never reach Redis: the connection is
    /// closed instead, as a network that fails right then would.
    pub fn cut_before(&self, marker: &[u8]) {
        *self.cut.lock().unwrap() = Some(marker.to_vec());
    }

    /// Whether the connection was cut.
    pub fn was_cut(&self) -> bool {
        self.cut.lock().unwrap().is_none()
    }

    /// Holds back, for `delay` from now, every reply and message on each connection whose
    /// client has sent `marker` (among its first 4 KiB): the client sees a connection that is
    /// open and silent. Returns how many connections that is.
    pub fn silence(&self, marker: &[u8], delay: Duration) -> usize {
        let until = Instant::now() + delay;
        let mut silenced = 0;
        for (sent, hold) in self.relayed.lock().unwrap().iter() {
            if sent
                .lock()
                .unwrap()
                .windows(marker.len())
                .any(|w| w == marker)
            {
                *hold.lock().unwrap() = Some(until);
                silenced += 1;
            }
        }
        silenced
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next command that carries `marker` is answered `delay` late (and every reply after it
    /// on the same connection with it).
    pub fn arm(&self, marker: &[u8], delay: Duration) {
        *self.armed.lock().unwrap() = Some((marker.to_vec(), delay));
    }

    /// Whether the armed command has passed.
    pub fn fired(&self) -> bool {
        self.armed.lock().unwrap().is_none()
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    armed: Armed,
    cut: Cut,
    sent: Arc<Mutex<Vec<u8>>>,
    hold_until: Hold,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let held = hold_until.clone();
    let upward = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut cut = cut.lock().unwrap();
                if cut
                    .as_ref()
                    .is_some_and(|marker| buf[..n].windows(marker.len()).any(|w| w == marker))
                {
                    cut.take();
                    break;
                }
            }
            {
                let mut sent = sent.lock().unwrap();
                let room = KEPT.saturating_sub(sent.len()).min(n);
                sent.extend_from_slice(&buf[..room]);
            }
            {
                let mut armed = armed.lock().unwrap();
                let hit = armed
                    .as_ref()
                    .is_some_and(|(marker, _)| buf[..n].windows(marker.len()).any(|w| w == marker));
                if hit && let Some((_, delay)) = armed.take() {
                    *held.lock().unwrap() = Some(Instant::now() + delay);
                }
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let until = *hold_until.lock().unwrap();
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    upward.abort();
}
