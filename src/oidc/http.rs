//! The HTTP client for calls to the identity provider: never follows redirects, caps response
//! bodies, bounds every call with a timeout, and keeps secrets out of its errors.

use super::client_auth::ClientCredentials;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

const MAX_RESPONSE: usize = 1 << 20;

/// Why a provider call failed; the message never contains a secret or token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// A URL or header value HTTP cannot carry (the provider's metadata named a bad URL).
    #[error("the request to the provider cannot be built: {0}")]
    Request(&'static str),
    /// No connection, TLS refused, or the connection broke; `cause` keeps the client's error.
    #[error("the provider could not be reached: {host}: {cause}")]
    Unreachable {
        host: String,
        cause: crate::reply::Cause,
    },
    /// No whole answer (head and body) within the call's deadline.
    #[error("the provider could not be reached: {host}: no answer within {timeout:?}")]
    TimedOut { host: String, timeout: Duration },
    /// The body broke off, or is larger than [`MAX_RESPONSE`] bytes.
    #[error("the provider could not be reached: {host}: the body is unreadable or too large")]
    Body { host: String },
    #[error("the provider answered HTTP {0}")]
    Status(u16),
    #[error("the provider's answer is not valid JSON")]
    NotJson,
    /// Discovery has not succeeded yet, so there is no URL to call.
    #[error("the provider's metadata is not loaded")]
    NoMetadata,
}

#[derive(Clone)]
pub struct ProviderHttp {
    client: Client<crate::net::EgressConnector, Full<Bytes>>,
    /// Presents a client certificate (RFC 8705): the provider's `mtls_endpoint_aliases` are
    /// used.
    mtls: bool,
}

impl Default for ProviderHttp {
    fn default() -> Self {
        Self::new()
    }
}

/// A JSON answer with its status, for endpoints whose errors carry a JSON body.
pub struct JsonReply {
    pub status: u16,
    pub body: serde_json::Value,
    /// The `DPoP-Nonce` header (RFC 9449 §8), when the provider sent one.
    pub dpop_nonce: Option<HeaderValue>,
}

impl ProviderHttp {
    /// Trusting the compiled-in web PKI roots, with no egress proxy.
    pub fn new() -> Self {
        let roots = crate::net::base_roots(false);
        let settings = crate::net::TlsSettings {
            roots: &roots,
            extra: &[],
            identity: None,
        };
        match crate::net::client_config(&settings) {
            Ok(tls) => Self::with_tls(tls, None),
            Err(_) => Self::with_tls(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
                None,
            ),
        }
    }

    /// Trusting and presenting what `tls` says, through `proxy` for `https://` destinations it
    /// covers.
    pub fn with_tls(
        tls: rustls::ClientConfig,
        proxy: Option<&crate::net::ProxySettings<'_>>,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(crate::net::egress_connector(tls, proxy));
        ProviderHttp {
            client,
            mtls: false,
        }
    }

    /// Whether this client presents a client certificate, so that the provider's mutual-TLS
    /// endpoint aliases are to be used.
    pub fn presents_certificate(&self) -> bool {
        self.mtls
    }

    /// The provider client for a configuration: `[oidc] ca_file` (or else `[tls] ca_file`) added
    /// to the roots, the system store when `[tls] system_roots`, and `HTTPS_PROXY`/`NO_PROXY`.
    pub fn for_config(config: &crate::config::Config) -> Result<Self, crate::net::TlsError> {
        let roots = crate::net::base_roots(config.tls.system_roots);
        let ca = config.oidc.ca_file.as_ref().or(config.tls.ca_file.as_ref());
        let identity = config.oidc.tls_client.as_ref();
        let settings = crate::net::TlsSettings {
            roots: &roots,
            extra: ca.map_or(&[][..], |ca| ca.certs.as_slice()),
            identity: identity.map(|i| (i.chain.as_slice(), &*i.key)),
        };
        let tls = crate::net::client_config(&settings)?;
        let proxy = config
            .egress
            .https_proxy
            .as_ref()
            .map(|p| crate::net::ProxySettings {
                https_proxy: p.expose(),
                no_proxy: config.egress.no_proxy.as_deref(),
            });
        let mut http = Self::with_tls(tls, proxy.as_ref());
        http.mtls = identity.is_some();
        Ok(http)
    }

    /// One call, as a `provider call` span of the request's trace (when tracing), whose
    /// `traceparent` the provider receives.
    async fn call(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        self.call_full(req, timeout)
            .await
            .map(|answer| (answer.status, answer.body))
    }

    /// [`Self::call`], also returning the headers some callers read.
    async fn call_full(
        &self,
        mut req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let host = req.uri().host().unwrap_or("").to_string();
        let span = tracing::trace_span!(
            target: crate::telemetry::trace::TARGET,
            "provider call",
            "otel.kind" = "client",
            "http.request.method" = req.method().as_str(),
            "server.address" = host.as_str(),
            "url.path" = req.uri().path(),
            "http.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        if let Some(traceparent) = crate::telemetry::trace::traceparent(&span) {
            req.headers_mut().insert("traceparent", traceparent);
        }
        let result = self.send(req, timeout, &host).await;
        match &result {
            Ok(answer) => {
                span.record("http.response.status_code", answer.status);
            }
            Err(_) => {
                span.record("error.type", "unavailable");
            }
        }
        result
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        host: &str,
    ) -> Result<Answer, CallError> {
        // One deadline for the answer and its body: a grant is waited for this long in all.
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = tokio::time::timeout_at(deadline, self.client.request(req)).await;
        let host = || host.to_string();
        let response = match sent {
            Err(_) => {
                return Err(CallError::TimedOut {
                    host: host(),
                    timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(CallError::Unreachable {
                    host: host(),
                    cause: crate::reply::Cause::new(e),
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        let dpop_nonce = response.headers().get(super::dpop::DPOP_NONCE).cloned();
        let nonce_asked = status == 401
            && super::challenge::find(
                response.headers().get_all(header::WWW_AUTHENTICATE),
                &["DPoP"],
                "use_dpop_nonce",
            )
            .is_some();
        let body = tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), MAX_RESPONSE).collect(),
        )
        .await
        .map_err(|_| CallError::TimedOut {
            host: host(),
            timeout,
        })?
        .map_err(|_| CallError::Body { host: host() })?
        .to_bytes();
        Ok(Answer {
            status,
            content_type,
            dpop_nonce,
            nonce_asked,
            body,
        })
    }

    /// GET a JSON document, its whole answer within `timeout`; non-2xx is an error.
    pub async fn get_json(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        let (status, body) = self.get_bytes(url, timeout).await?;
        if !(200..300).contains(&status) {
            return Err(CallError::Status(status));
        }
        serde_json::from_slice(&body).map_err(|_| CallError::NotJson)
    }

    /// GET, the whole answer within `timeout`.
    pub async fn get_bytes(&self, url: &str, timeout: Duration) -> Result<(u16, Bytes), CallError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|_| CallError::Request("invalid URL"))?;
        self.call(req, timeout).await
    }

    /// GET with `Authorization: <scheme> <access_token>` (the UserInfo endpoint): `Bearer`, or
    /// `DPoP` with `proof` in the `DPoP` header (RFC 9449 §7.1).
    pub async fn get_with_token(
        &self,
        url: &str,
        scheme: &str,
        access_token: &str,
        proof: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let mut authorization = HeaderValue::from_str(&format!("{scheme} {access_token}"))
            .map_err(|_| CallError::Request("the access token is not a header value"))?;
        authorization.set_sensitive(true);
        let mut builder = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json, application/jwt")
            .header(header::AUTHORIZATION, authorization);
        if let Some(proof) = proof.and_then(|p| HeaderValue::from_str(p).ok()) {
            builder = builder.header(super::dpop::DPOP, proof);
        }
        let req = builder
            .body(Full::new(Bytes::new()))
            .map_err(|_| CallError::Request("invalid URL"))?;
        self.call_full(req, timeout).await
    }

    /// POST a form, authenticating as the client (`auth`: a header, form fields or both),
    /// waiting for the answer
    /// up to `timeout` (`oidc.provider_timeout`): a grant we stop waiting for may still be
    /// carried out by the provider, and a rotated refresh token we never receive is lost.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        auth: &ClientCredentials,
        timeout: Duration,
    ) -> Result<JsonReply, CallError> {
        self.post_form_with_proof(url, form, auth, timeout, None)
            .await
    }

    /// [`Self::post_form`] with a DPoP proof (RFC 9449 §5) in the `DPoP` header.
    pub async fn post_form_with_proof(
        &self,
        url: &str,
        form: &[(&str, &str)],
        auth: &ClientCredentials,
        timeout: Duration,
        proof: Option<&str>,
    ) -> Result<JsonReply, CallError> {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(value) = &auth.authorization {
            builder = builder.header(header::AUTHORIZATION, value.clone());
        }
        if let Some(proof) = proof.and_then(|p| HeaderValue::from_str(p).ok()) {
            builder = builder.header(super::dpop::DPOP, proof);
        }
        fields.extend(auth.fields.iter().map(|(k, v)| (*k, v.as_str())));
        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let req = builder
            .body(Full::new(Bytes::from(encoded)))
            .map_err(|_| CallError::Request("invalid URL"))?;
        let Answer {
            status,
            body,
            dpop_nonce,
            ..
        } = self.call_full(req, timeout).await?;
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
        };
        Ok(JsonReply {
            status,
            body,
            dpop_nonce,
        })
    }
}

/// A provider's answer, read whole.
pub struct Answer {
    pub status: u16,
    /// The media type, without parameters, lowercased.
    pub content_type: Option<String>,
    /// RFC 9449 §8: the nonce the provider wants in the next DPoP proof.
    pub dpop_nonce: Option<HeaderValue>,
    /// A `401` whose `WWW-Authenticate` holds a `DPoP` challenge with `error="use_dpop_nonce"`:
    /// a resource server asking for a nonce (RFC 9449 §9), not one refusing the token.
    pub nonce_asked: bool,
    pub body: Bytes,
}
