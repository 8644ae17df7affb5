//! HTTP/2 (prior knowledge on plain TCP, ALPN over TLS) and the optional rustls listener.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;

#[tokio::test]
async fn http2_prior_knowledge_is_served_and_forwarded_as_http1() {
    let up = upstream::start().await;
    let proxy = start_proxy(&config_text(&format!(
        "[[routes]]\npath = \"/\"\nupstream = \"{}\"\n",
        up.url()
    )))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let response = client.get(proxy.url("/h2").parse().unwrap()).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(up.last().uri, "/h2");
}

#[tokio::test]
async fn tls_listener_negotiates_h2_with_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl must be installed");
    assert!(status.success());
    let up = upstream::start().await;
    let text = config_toml(&format!(
        "[[routes]]\npath = \"/\"\nupstream = \"{}\"\n",
        up.url()
    ))
    .set("server.public_url", "https://127.0.0.1:8080")
    .add(
        "server.tls.cert",
        dir.path().join("cert.pem").display().to_string(),
    )
    .add(
        "server.tls.key",
        dir.path().join("key.pem").display().to_string(),
    );
    let proxy = start_proxy(&text).await;

    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(dir.path().join("cert.pem")).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(connector);
    let url = format!("https://127.0.0.1:{}/secure", proxy.addr.port());
    let response = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // From public_url, which names the scheme browsers use.
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");
    // Plain HTTP to the TLS port gets no answer.
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(12),
        plain.get(proxy.url("/x").parse().unwrap()),
    )
    .await;
    assert!(!matches!(refused, Ok(Ok(r)) if r.status() == 200));
}
