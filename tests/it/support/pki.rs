//! A private CA made at test time (`rcgen`), certificates it signs written as PEM files, TLS
//! servers that use them (optionally requiring a client certificate), a TLS front for any plain
//! TCP server, and an HTTP CONNECT proxy that records what it was asked to reach.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A certificate signed by the test CA, with its key, as DER and as PEM files.
pub struct Issued {
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Issued {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
    /// The CA certificate as a PEM file (what `ca_file` names).
    pub ca_file: PathBuf,
    count: Mutex<usize>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, issuer.pem()).unwrap();
        TestCa {
            issuer,
            dir,
            ca_file,
            count: Mutex::new(0),
        }
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, cn: &str) -> Issued {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let n = {
            let mut count = self.count.lock().unwrap();
            *count += 1;
            *count
        };
        let cert_file = self.dir.path().join(format!("{n}-{cn}.crt"));
        let key_file = self.dir.path().join(format!("{n}-{cn}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Issued {
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            cert_file,
            key_file,
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self) -> Issued {
        self.issue(
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        )
    }

    /// A client certificate named `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(&[], ExtendedKeyUsagePurpose::ClientAuth, cn)
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A TLS acceptor with a server certificate of this CA; when `client_ca` is given, a client
    /// certificate signed by it is required. Offers HTTP/1.1 only.
    pub fn acceptor(&self, client_ca: Option<&TestCa>) -> TlsAcceptor {
        self.acceptor_for(client_ca, &[b"http/1.1"])
    }

    /// [`TestCa::acceptor`] without client certificates, offering HTTP/2 first by ALPN.
    pub fn h2_acceptor(&self) -> TlsAcceptor {
        self.acceptor_for(None, &[b"h2", b"http/1.1"])
    }

    /// [`TestCa::h2_acceptor`] whose certificate also names `address` (a test host's).
    pub fn h2_acceptor_also_for(&self, address: &str) -> TlsAcceptor {
        let server = self.issue(
            &["127.0.0.1", "localhost", address],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        self.acceptor_with(server, None, &[b"h2", b"http/1.1"])
    }

    /// [`TestCa::acceptor`] whose certificate also names `address` (a test host's).
    pub fn acceptor_also_for(&self, address: &str) -> TlsAcceptor {
        let server = self.issue(
            &["127.0.0.1", "localhost", address],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        self.acceptor_with(server, None, &[b"http/1.1"])
    }

    fn acceptor_for(&self, client_ca: Option<&TestCa>, alpn: &[&[u8]]) -> TlsAcceptor {
        self.acceptor_with(self.server(), client_ca, alpn)
    }

    fn acceptor_with(
        &self,
        server: Issued,
        client_ca: Option<&TestCa>,
        alpn: &[&[u8]],
    ) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.cert()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(vec![server.cert.clone()], server.key())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// What a TLS front saw: the peer certificate of each handshake that completed, and the number
/// of handshakes that failed.
#[derive(Default)]
pub struct FrontLog {
    pub client_certs: Mutex<Vec<Option<CertificateDer<'static>>>>,
    pub failed: Mutex<usize>,
    /// The protocol each connection agreed on by ALPN (`None`: none), in order.
    pub alpn: Mutex<Vec<Option<Vec<u8>>>>,
}

/// Terminates TLS on a fresh port with `acceptor` and relays each connection to `backend` as
/// plain TCP. Returns the port's address.
pub async fn tls_front(acceptor: TlsAcceptor, backend: SocketAddr) -> (SocketAddr, Arc<FrontLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(FrontLog::default());
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        *seen.failed.lock().unwrap() += 1;
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                seen.client_certs.lock().unwrap().push(peer);
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                seen.alpn.lock().unwrap().push(alpn);
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, log)
}

/// A CONNECT request line and the `Proxy-Authorization` that came with it.
pub type ProxyRequest = (String, Option<String>);

/// An HTTP CONNECT proxy on a fresh port that records each request line and the
/// `Proxy-Authorization` it got, then tunnels.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<ProxyRequest>>>,
}

impl ConnectProxy {
    pub async fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(tcp);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let request = line.trim_end().to_string();
                    let mut auth = None;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':')
                            && name.eq_ignore_ascii_case("proxy-authorization")
                        {
                            auth = Some(value.trim().to_string());
                        }
                    }
                    log.lock().unwrap().push((request.clone(), auth));
                    let mut parts = request.split(' ');
                    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = reader.into_inner();
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        ConnectProxy { addr, seen }
    }

    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// `base64url(SHA-256(DER))`: the `x5t#S256` thumbprint of a certificate (RFC 8705 §3.1).
pub fn thumbprint(cert: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert))
}

/// The `cnf.x5t#S256` of a JWT access token (its payload only; no signature check).
pub fn token_thumbprint(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["cnf"]["x5t#S256"].as_str().map(str::to_string)
}

/// What a [`bound_api`] decided for each request: `Ok(thumbprint)` or `Err(why)`.
pub type Verdicts = Arc<Mutex<Vec<Result<String, String>>>>;

/// An API over mutual TLS that checks certificate-bound access tokens (RFC 8705 §3): the
/// bearer token's `cnf.x5t#S256` must be the thumbprint of the client certificate of the
/// connection. 200 `{"bound": true}` when it is, else 401 `invalid_token`.
pub async fn bound_api(acceptor: TlsAcceptor) -> (SocketAddr, Verdicts) {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let verdicts: Verdicts = Arc::default();
    let log = verdicts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| thumbprint(c));
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (peer, log) = (peer.clone(), log.clone());
                    async move {
                        let token = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .map(str::to_string);
                        let verdict = match (token.as_deref().map(token_thumbprint), peer) {
                            (None, _) => Err("no bearer token".to_string()),
                            (Some(None), _) => Err("the token has no cnf.x5t#S256".to_string()),
                            (_, None) => Err("no client certificate".to_string()),
                            (Some(Some(bound)), Some(presented)) if bound == presented => {
                                Ok(presented)
                            }
                            (Some(Some(_)), Some(_)) => {
                                Err("x5t#S256 does not match the client certificate".to_string())
                            }
                        };
                        let ok = verdict.is_ok();
                        log.lock().unwrap().push(verdict);
                        let response = if ok {
                            http::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from_static(b"{\"bound\":true}")))
                        } else {
                            http::Response::builder()
                                .status(401)
                                .header(
                                    "www-authenticate",
                                    "Bearer error=\"invalid_token\", error_description=\"certificate binding\"",
                                )
                                .body(Full::new(bytes::Bytes::new()))
                        };
                        Ok::<_, std::convert::Infallible>(response.unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, verdicts)
}
