//! The HTTP client for calls to the identity provider: never follows redirects, caps response
//! bodies, bounds every call with a timeout, and keeps secrets out of its errors.

use super::client_auth::ClientCredentials;
use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

const MAX_RESPONSE: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a provider call failed; the message never contains a secret or token.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the provider could not be reached: {0}")]
    Unreachable(String),
    #[error("the provider answered HTTP {0}")]
    Status(u16),
    #[error("the provider's answer is not valid JSON")]
    NotJson,
}

#[derive(Clone)]
pub struct ProviderHttp {
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
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
}

impl ProviderHttp {
    pub fn new() -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(crate::net::connector());
        ProviderHttp { client }
    }

    async fn call(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        let host = req.uri().host().unwrap_or("").to_string();
        // One deadline for the answer and its body: a grant is waited for this long in all.
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = tokio::time::timeout_at(deadline, self.client.request(req)).await;
        let response = match sent {
            Err(_) => return Err(CallError::Unreachable(format!("{host}: timed out"))),
            Ok(Err(e)) => {
                return Err(CallError::Unreachable(format!(
                    "{host}: {}",
                    error_chain(&e)
                )));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        let body = tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), MAX_RESPONSE).collect(),
        )
        .await
        .map_err(|_| CallError::Unreachable(format!("{host}: body timed out")))?
        .map_err(|_| CallError::Unreachable(format!("{host}: body unreadable or too large")))?
        .to_bytes();
        Ok((status, body))
    }

    /// GET a JSON document; non-2xx is an error.
    pub async fn get_json(&self, url: &str) -> Result<serde_json::Value, CallError> {
        let (status, body) = self.get_bytes(url).await?;
        if !(200..300).contains(&status) {
            return Err(CallError::Status(status));
        }
        serde_json::from_slice(&body).map_err(|_| CallError::NotJson)
    }

    pub async fn get_bytes(&self, url: &str) -> Result<(u16, Bytes), CallError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|_| CallError::Unreachable("invalid URL".into()))?;
        self.call(req, TIMEOUT).await
    }

    /// POST a form, authenticating as the client (`auth`: a header, form fields or both), waiting for the answer
    /// up to `timeout` (`oidc.provider_timeout`): a grant we stop waiting for may still be
    /// carried out by the provider, and a rotated refresh token we never receive is lost.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        auth: &ClientCredentials,
        timeout: Duration,
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
        fields.extend(auth.fields.iter().map(|(k, v)| (*k, v.as_str())));
        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let req = builder
            .body(Full::new(Bytes::from(encoded)))
            .map_err(|_| CallError::Unreachable("invalid URL".into()))?;
        let (status, body) = self.call(req, timeout).await?;
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
        };
        Ok(JsonReply { status, body })
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
