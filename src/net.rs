//! Outbound connections: the TCP and TLS connector shared by the upstream clients and the
//! OpenID provider client. Knows nothing of requests; trusts the compiled-in web PKI roots.

use hyper_util::client::legacy::connect::HttpConnector;
use std::time::Duration;

/// An HTTP connector that speaks TLS for `https://` URIs.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Plain TCP connections: no delay, 5 s to connect, TCP keep-alive.
pub fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

/// Builds the HTTPS-capable connector used for upstreams and the identity provider.
pub fn connector() -> Connector {
    let mut http = http_connector();
    http.enforce_http(false);
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match tls {
        Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http),
    }
}
