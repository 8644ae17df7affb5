//! Outbound connections: the TCP and TLS connector shared by the upstream clients and the
//! OpenID provider client, the roots they trust (the compiled-in web PKI roots, plus the
//! system's and PEM bundles when configured), client certificates for mutual TLS, and an HTTP
//! CONNECT tunnel through an egress proxy. Knows nothing of requests or of the configuration
//! file: callers hand in what to trust and present.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

mod probed;
pub use probed::{Probed, Probing};

/// An HTTP connector that speaks TLS for `https://` URIs. Its connections notice bytes that
/// arrive on them while idle even when the runtime has not yet seen them ([`Probed`]).
pub type Connector = hyper_rustls::HttpsConnector<Probing>;

/// A connector that speaks TLS for `https://` URIs and may reach them through an egress proxy.
pub type EgressConnector = hyper_rustls::HttpsConnector<Egress>;

/// Plain TCP connections: no delay, 5 s to connect, TCP keep-alive.
pub fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

/// The roots every outbound TLS connection starts from: the compiled-in web PKI roots, plus the
/// operating system's store when `system` is set. Certificates of the system store that cannot
/// be used (or a store that cannot be read) are skipped with a warning.
pub fn base_roots(system: bool) -> rustls::RootCertStore {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if system {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "a part of the system trust store could not be read");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::info!(added, ignored, "trusting the system store");
    }
    roots
}

/// What one outbound client trusts and presents.
pub struct TlsSettings<'a> {
    /// The starting roots ([`base_roots`]).
    pub roots: &'a rustls::RootCertStore,
    /// More roots (a PEM bundle already parsed).
    pub extra: &'a [CertificateDer<'static>],
    /// A client certificate chain and its key, for mutual TLS.
    pub identity: Option<(&'a [CertificateDer<'static>], &'a PrivateKeyDer<'static>)>,
}

/// Why a TLS client could not be set up (a bad root or key that validation should have caught).
#[derive(Debug, thiserror::Error)]
#[error("outbound TLS: {0}")]
pub struct TlsError(String);

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls client configuration for `settings`.
pub fn client_config(settings: &TlsSettings<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = settings.roots.clone();
    for cert in settings.extra {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError(format!("a CA certificate is not usable: {e}")))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots);
    match settings.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.to_vec(), key.clone_key())
            .map_err(|e| TlsError(format!("the client certificate cannot be used: {e}"))),
    }
}

/// An HTTPS-capable connector (HTTP/1.1 and HTTP/2 by ALPN) with the given TLS configuration.
pub fn connector_with(tls: rustls::ClientConfig) -> Connector {
    let mut http = http_connector();
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(Probing(http))
}

/// Builds the HTTPS-capable connector used for upstreams and the identity provider, trusting
/// the compiled-in web PKI roots only.
pub fn connector() -> Connector {
    let roots = base_roots(false);
    let settings = TlsSettings {
        roots: &roots,
        extra: &[],
        identity: None,
    };
    match client_config(&settings) {
        Ok(tls) => connector_with(tls),
        Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector({
                let mut http = http_connector();
                http.enforce_http(false);
                Probing(http)
            }),
    }
}

/// An egress proxy for `https://` destinations: an `http://` proxy URL (credentials in it are
/// sent as `Proxy-Authorization: Basic` and never logged) and the hosts that bypass it.
pub struct ProxySettings<'a> {
    pub https_proxy: &'a str,
    pub no_proxy: Option<&'a str>,
}

/// The TCP side of the provider client: a direct connection, or, for an `https://` destination
/// the egress proxy covers, an HTTP CONNECT tunnel through it. TLS is spoken over either by the
/// [`EgressConnector`] around it, end to end with the destination.
#[derive(Clone)]
pub struct Egress {
    http: HttpConnector,
    proxy: Option<Arc<Matcher>>,
}

impl Egress {
    fn new(proxy: Option<&ProxySettings<'_>>) -> Egress {
        let mut http = http_connector();
        http.enforce_http(false);
        let proxy = proxy.map(|p| {
            Arc::new(
                Matcher::builder()
                    .https(p.https_proxy.to_string())
                    .no(p.no_proxy.unwrap_or_default().to_string())
                    .build(),
            )
        });
        Egress { http, proxy }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Egress {
    type Response = TokioIo<Probed>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let intercept = match &self.proxy {
            Some(matcher) if dst.scheme() == Some(&http::uri::Scheme::HTTPS) => {
                matcher.intercept(&dst)
            }
            _ => None,
        };
        let mut http = self.http.clone();
        Box::pin(async move {
            let tcp = match intercept {
                None => tower::Service::call(&mut http, dst).await?,
                Some(intercept) => {
                    let mut tunnel = Tunnel::new(intercept.uri().clone(), http);
                    if let Some(auth) = intercept.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    tower::ServiceExt::ready(&mut tunnel).await?;
                    tower::Service::call(&mut tunnel, dst)
                        .await
                        .map_err(|e| format!("through the egress proxy: {e}"))?
                }
            };
            Ok(TokioIo::new(Probed(tcp.into_inner())))
        })
    }
}

/// The provider client's connector: TLS with `tls`, through `proxy` when set. HTTP/1.1 only:
/// a provider call that times out takes its connection with it, so a provider behind a link
/// that died and healed is reached again on a new one at once; a pooled HTTP/2 connection
/// would carry every call into the dead link until TCP's retransmission resumed it.
pub fn egress_connector(
    tls: rustls::ClientConfig,
    proxy: Option<&ProxySettings<'_>>,
) -> EgressConnector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(Egress::new(proxy))
}
