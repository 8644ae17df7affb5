#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::late_answer;
use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1-over-TLS upstream for `localhost` on a thread and runtime of its own (so
/// that it writes while the test's runtime is blocked): `/alice` gets `ok` and, once told,
/// a second, unasked answer with alice's data; anything else gets `bob`. Its certificate is
/// returned, to be trusted.
fn tls_upstream() -> (
    std::net::SocketAddr,
    rustls_pki_types::CertificateDer<'static>,
    tokio::sync::mpsc::UnboundedSender<()>,
) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (late, go) = tokio::sync::mpsc::unbounded_channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let go = Arc::new(tokio::sync::Mutex::new(go));
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, go) = (acceptor.clone(), go.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut seen = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let head = loop {
                            if let Some(head) = late_answer::next_head(&mut seen) {
                                break head;
                            }
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let alices = late_answer::is_alices(&head);
                        let answer = if alices {
                            late_answer::FIRST
                        } else {
                            late_answer::OTHER
                        };
                        let _ = tls.write_all(answer).await;
                        let _ = tls.flush().await;
                        if alices {
                            go.lock().await.recv().await;
                            let _ = tls.write_all(late_answer::LATE).await;
                            let _ = tls.flush().await;
                        }
                    }
                });
            }
        });
    });
    (addr, der, late)
}

async fn get(client: &Pooled, uri: &str) -> Vec<u8> {
    let req = Request::get(uri).body(crate::reply::empty()).unwrap();
    let response = client.request(req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// Bytes an `https` upstream sends after an answer, arriving while the worker is busy (no
/// turn of its event loop between them and the next request), never answer the next
/// request on the pooled connection, which may be another user's.
#[tokio::test]
async fn late_bytes_on_a_pooled_tls_connection_never_answer_the_next_request() {
    let (addr, cert, late) = tls_upstream();
    let roots = rustls::RootCertStore::empty();
    let tls = crate::net::client_config(&crate::net::TlsSettings {
        roots: &roots,
        extra: &[cert],
        identity: None,
    })
    .unwrap();
    let client = pooled(crate::net::connector_with(tls));
    let port = addr.port();
    assert_eq!(
        get(&client, &format!("https://localhost:{port}/alice")).await,
        b"ok"
    );
    // The connection's task sees the answer end and waits on the idle connection.
    tokio::time::sleep(Duration::from_millis(50)).await;
    late.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let bob = get(&client, &format!("https://localhost:{port}/bob")).await;
    late_answer::assert_bobs(&bob);
}
