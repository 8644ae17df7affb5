//! An in-process fake identity provider for hostile cases a real one will not produce: it
//! serves discovery and a key set, and its token endpoint answers with whatever ID token the
//! test put there.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct State {
    pub jwks: Mutex<Vec<u8>>,
    pub id_token: Mutex<String>,
    pub jwks_fetches: AtomicUsize,
    /// The form of every token request, in order.
    pub token_requests: Mutex<Vec<Vec<(String, String)>>>,
    /// Members merged into the code grant's token response; a `null` removes the member.
    pub token_fields: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// When set, the code grant's whole token response body, as is.
    pub token_body: Mutex<Option<String>>,
    /// Members added to the discovery document.
    pub discovery_extra: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// Answers for the next token requests of a grant type (`grant_type` value), in order:
    /// status and JSON body. When none is left, the defaults below answer.
    pub scripted: Mutex<
        std::collections::HashMap<String, std::collections::VecDeque<(u16, serde_json::Value)>>,
    >,
    /// The UserInfo endpoint's answer: status, media type and body (default: 404).
    pub userinfo: Mutex<Option<(u16, String, String)>>,
    /// The `Authorization` header of every UserInfo request, in order.
    pub userinfo_requests: Mutex<Vec<String>>,
    /// The `DPoP` header of every token request (`None`: it had none), in order.
    pub token_proofs: Mutex<Vec<Option<String>>>,
    /// The `DPoP` header of every UserInfo request (`None`: it had none), in order.
    pub userinfo_proofs: Mutex<Vec<Option<String>>>,
    /// When set, a UserInfo request whose DPoP proof does not carry this nonce is answered
    /// `401` with `WWW-Authenticate: DPoP error="use_dpop_nonce"` and it in `DPoP-Nonce`
    /// (RFC 9449 §9: the UserInfo endpoint is a resource server).
    pub userinfo_nonce: Mutex<Option<String>>,
    /// Header fields added to every scripted UserInfo answer (`userinfo`).
    pub userinfo_headers: Mutex<Vec<(String, String)>>,
    /// When set, a token request whose DPoP proof does not carry this nonce is answered
    /// `400 use_dpop_nonce` with it in `DPoP-Nonce` (RFC 9449 §8).
    pub dpop_nonce: Mutex<Option<String>>,
    /// When true, every token request is answered `use_dpop_nonce` with a new nonce.
    pub dpop_nonce_always: std::sync::atomic::AtomicBool,
    /// Discovery advertises a pushed authorization request endpoint (`/par`), which records
    /// each pushed form and answers a `request_uri`.
    pub pushed: Mutex<Vec<Vec<(String, String)>>>,
    /// When set, the pushed authorization request endpoint's answer (201) instead of its own.
    pub pushed_answer: Mutex<Option<serde_json::Value>>,
    /// When set, the next token request is recorded, then answered only once this fires.
    pub hold: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// The form of every request to `/revoke` (answered 200), in order. Discovery names that
    /// endpoint only when a test adds `revocation_endpoint` to `discovery_extra`.
    pub revocations: Mutex<Vec<Vec<(String, String)>>>,
    /// When set, every request waits this long before it is answered (a slow provider).
    pub delay: Mutex<Option<std::time::Duration>>,
}

impl State {
    /// Queues an answer for the next token request of `grant_type`.
    pub fn script(&self, grant_type: &str, status: u16, body: serde_json::Value) {
        self.scripted
            .lock()
            .unwrap()
            .entry(grant_type.to_string())
            .or_default()
            .push_back((status, body));
    }

    /// The forms of the token requests of `grant_type` so far, in order.
    pub fn token_requests_of(&self, grant_type: &str) -> Vec<Vec<(String, String)>> {
        let grant = ("grant_type".to_string(), grant_type.to_string());
        self.token_requests
            .lock()
            .unwrap()
            .iter()
            .filter(|form| form.contains(&grant))
            .cloned()
            .collect()
    }
}

pub struct FakeIdp {
    pub issuer: String,
    pub state: Arc<State>,
}

pub async fn start(jwks: Vec<u8>) -> FakeIdp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(State {
        jwks: Mutex::new(jwks),
        ..Default::default()
    });
    let (s, iss) = (state.clone(), issuer.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (s, iss) = (s.clone(), iss.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, s.clone(), iss.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    FakeIdp { issuer, state }
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<State>,
    issuer: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let json = |v: serde_json::Value| {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    let delay = *state.delay.lock().unwrap();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    Ok(match req.uri().path() {
        // Also under a path, for an issuer configured as `{issuer}/realm`.
        p if p.ends_with("/.well-known/openid-configuration") => json(with_members(
            serde_json::json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}/authorize"),
                "token_endpoint": format!("{issuer}/token"),
                "jwks_uri": format!("{issuer}/jwks"),
                "userinfo_endpoint": format!("{issuer}/userinfo"),
                "end_session_endpoint": format!("{issuer}/logout"),
                "code_challenge_methods_supported": ["S256"],
                "x-vendor-extension": {"anything": [1, 2, 3]},
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "made-up-alg"],
            }),
            &state.discovery_extra.lock().unwrap(),
        )),
        "/jwks" => {
            state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            let body = state.jwks.lock().unwrap().clone();
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        }
        "/userinfo" => {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            state.userinfo_requests.lock().unwrap().push(auth);
            let proof = req
                .headers()
                .get("dpop")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            state.userinfo_proofs.lock().unwrap().push(proof.clone());
            let wanted = state.userinfo_nonce.lock().unwrap().clone();
            if let Some(nonce) = wanted
                && proof_claims(proof.as_deref())["nonce"].as_str() != Some(nonce.as_str())
            {
                return Ok(Response::builder()
                    .status(401)
                    .header("www-authenticate", r#"DPoP error="use_dpop_nonce""#)
                    .header("dpop-nonce", nonce)
                    .body(Full::new(Bytes::new()))
                    .unwrap());
            }
            match state.userinfo.lock().unwrap().clone() {
                Some((status, media_type, body)) => {
                    let mut answer = Response::builder()
                        .status(status)
                        .header("content-type", media_type);
                    for (name, value) in state.userinfo_headers.lock().unwrap().iter() {
                        answer = answer.header(name, value);
                    }
                    answer.body(Full::new(Bytes::from(body))).unwrap()
                }
                None => Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            }
        }
        "/token" => {
            let proof = req
                .headers()
                .get("dpop")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            state.token_proofs.lock().unwrap().push(proof.clone());
            if state.dpop_nonce_always.load(Ordering::SeqCst) {
                let n = state.token_proofs.lock().unwrap().len();
                *state.dpop_nonce.lock().unwrap() = Some(format!("always-{n}"));
            }
            let wanted = state.dpop_nonce.lock().unwrap().clone();
            if let Some(nonce) = wanted
                && proof_claims(proof.as_deref())["nonce"].as_str() != Some(nonce.as_str())
            {
                let mut response = json(serde_json::json!({"error": "use_dpop_nonce"}));
                *response.status_mut() = http::StatusCode::BAD_REQUEST;
                response
                    .headers_mut()
                    .insert("dpop-nonce", nonce.parse().unwrap());
                return Ok(response);
            }
            let form = form_of(req).await;
            state.token_requests.lock().unwrap().push(form.clone());
            let hold = state.hold.lock().unwrap().take();
            if let Some(hold) = hold {
                let _ = hold.await;
            }
            let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            let grant_type = field("grant_type").unwrap_or_default();
            let scripted = state
                .scripted
                .lock()
                .unwrap()
                .get_mut(&grant_type)
                .and_then(|q| q.pop_front());
            if let Some((status, body)) = scripted {
                let mut response = json(body);
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                return Ok(response);
            }
            if field("grant_type").as_deref()
                == Some("urn:ietf:params:oauth:grant-type:token-exchange")
            {
                let resource = field("resource").unwrap_or_default();
                return Ok(json(
                    serde_json::json!({"access_token": format!("exchanged-for-{resource}"), "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in": 300}),
                ));
            }
            if let Some(body) = state.token_body.lock().unwrap().clone() {
                return Ok(Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap());
            }
            let id_token = state.id_token.lock().unwrap().clone();
            json(with_members(
                serde_json::json!({"access_token": "fake-access", "token_type": "Bearer", "expires_in": 300, "refresh_token": "fake-refresh", "id_token": id_token}),
                &state.token_fields.lock().unwrap(),
            ))
        }
        "/revoke" => {
            let form = form_of(req).await;
            state.revocations.lock().unwrap().push(form);
            Response::new(Full::new(Bytes::new()))
        }
        "/par" => {
            let form = form_of(req).await;
            state.pushed.lock().unwrap().push(form);
            let answer = state.pushed_answer.lock().unwrap().clone();
            let mut response = json(answer.unwrap_or_else(|| {
                serde_json::json!({
                    "request_uri": "urn:ietf:params:oauth:request_uri:fake-1", "expires_in": 60
                })
            }));
            *response.status_mut() = http::StatusCode::CREATED;
            response
        }
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    })
}

/// `base` with `members` merged in; a `null` member removes the key.
/// The fields of a form-encoded request body (none if the body cannot be read).
async fn form_of(req: Request<Incoming>) -> Vec<(String, String)> {
    use http_body_util::BodyExt;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    url::form_urlencoded::parse(&body).into_owned().collect()
}

fn with_members(
    mut base: serde_json::Value,
    members: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    if let Some(object) = base.as_object_mut() {
        for (key, value) in members {
            if value.is_null() {
                object.remove(key);
            } else {
                object.insert(key.clone(), value.clone());
            }
        }
    }
    base
}

/// The claims of a DPoP proof (unverified: the fake only reads them), or `null`.
pub fn proof_claims(proof: Option<&str>) -> serde_json::Value {
    use base64::Engine;
    proof
        .and_then(|p| p.split('.').nth(1))
        .and_then(|c| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}
