//! A sample API to put behind Vestibule: a resource server that validates the access token the
//! BFF attaches, as every API must. The ID token is for the BFF; this API only accepts access
//! tokens issued *for it* (one of its audiences), signed with the issuer's current keys.
//!
//! ```text
//! cargo run --example sample_api -- --listen 127.0.0.1:5001 --issuer http://127.0.0.1:9000 \
//!     --audience https://api.example.test [--audience https://legacy-api.example.test]
//! ```
//!
//! Behind a route with `assertion = true` it validates Vestibule's assertions instead: the issuer
//! is Vestibule's `public_url` and the keys come from its admin listener, which serves no
//! discovery document, so the key set is named directly:
//!
//! ```text
//! cargo run --example sample_api -- --issuer https://app.example.test \
//!     --audience https://api.example.test --jwks-uri http://127.0.0.1:9901/jwks
//! ```
//!
//! `GET /api/hello` greets any valid token, `GET /api/beta/dashboard` needs the role
//! `beta-tester`, `GET /healthz` is liveness. One JSON line per request goes to stderr; tokens
//! and query strings are never logged.
//!
//! DPoP (RFC 9449): a token bound to a key (`cnf.jkt`) is accepted only as `Authorization: DPoP`
//! with a proof signed by that key for this very request (`htm`, `htu`, `ath`, a recent `iat`,
//! a `jti` never seen before, and with `--dpop-nonce` the nonce this API hands out). A stolen
//! bound token is worthless without the key. An unbound token is accepted only as `Bearer`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::HashMap;
use tokio::{net::TcpListener, sync::Mutex};

/// Asymmetric algorithms only: a resource server shares no secret with the issuer, HS* keyed
/// with a public key is the classic key-confusion attack, and `none` is not an algorithm.
const ALLOWED_ALGS: &[Algorithm] = {
    use Algorithm::*;
    &[
        RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
    ]
};
/// At most one key-set fetch per interval, so tokens with made-up `kid`s cannot flood the issuer.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const LEEWAY_SECS: u64 = 30;
const BETA_ROLE: &str = "beta-tester";
/// How far a DPoP proof's `iat` may be from now, either way.
const PROOF_WINDOW_SECS: u64 = 60;
/// Proof algorithms accepted (asymmetric only).
const PROOF_ALGS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::PS256,
    Algorithm::RS256,
];

#[derive(Parser)]
#[command(about = "Sample API for the Vestibule demo: validates Bearer access tokens")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5001")]
    listen: SocketAddr,
    /// Issuer URL; tokens must carry exactly this `iss`.
    #[arg(long)]
    issuer: String,
    /// Accepted audience; repeat it to accept several, e.g. the old and new one in a migration.
    #[arg(long = "audience", required = true)]
    audiences: Vec<String>,
    /// The key set's URL, instead of the `jwks_uri` of the issuer's discovery document (for an
    /// issuer without one, such as Vestibule's assertions and its admin `/jwks`).
    #[arg(long)]
    jwks_uri: Option<String>,
    /// Require DPoP proofs to carry a nonce this API hands out (RFC 9449 §9).
    #[arg(long)]
    dpop_nonce: bool,
    /// Answer a proof of another key than the token's `cnf.jkt` with `invalid_dpop_proof`, as
    /// several DPoP libraries do, rather than RFC 9449 §7.1's `invalid_token`.
    #[arg(long)]
    binding_as_proof_error: bool,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;
type Reply = Response<Full<Bytes>>;

/// Why a request was refused. The reason is logged; the client learns only the category.
enum Reject {
    Missing,
    Invalid(String),
    KeysUnavailable,
    /// A bound token without a valid proof of possession.
    Proof(String),
    /// A valid proof, but of another key than the token's `cnf.jkt`: the token is not this
    /// client's, or is bound to a key the client has since replaced. RFC 9449 §7.1 answers it
    /// as `invalid_token` (its example of a failed key binding), which tells a client that
    /// holds a refresh token to get a token bound to the key it now proves.
    Binding,
    /// The proof lacks the current nonce; the answer carries it.
    UseNonce,
}

fn invalid(why: impl ToString) -> Reject {
    Reject::Invalid(why.to_string())
}

/// A verification key from the issuer's key set, with the algorithm it is pinned to, if any.
struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    fetched: Option<Instant>,
    jwks_uri: Option<String>,
}

struct Api {
    issuer: String,
    audiences: Vec<String>,
    http: HttpClient,
    /// One lock for lookups and fetches: fetches are rare, and a request carrying a freshly
    /// rotated `kid` should wait for the fetch already under way rather than start another.
    keys: Mutex<KeySet>,
    /// `Some`: the nonce DPoP proofs must carry.
    nonce: Option<String>,
    /// `jti`s of accepted proofs and until when they are remembered.
    seen: std::sync::Mutex<HashMap<String, u64>>,
    /// `--binding-as-proof-error`.
    binding_as_proof_error: bool,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Api {
    async fn authenticate(&self, req: &Request<Incoming>) -> Result<Value, Reject> {
        let (scheme, token) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()?.split_once(' '))
            .filter(|(scheme, _)| {
                scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("dpop")
            })
            .map(|(scheme, token)| (scheme, token.trim()))
            .ok_or(Reject::Missing)?;
        let claims = self.validate(token).await?;
        let bound = claims["cnf"]["jkt"].as_str();
        match (scheme.eq_ignore_ascii_case("dpop"), bound) {
            (true, Some(jkt)) => {
                if self.verify_proof(req, token)? != jkt {
                    return Err(Reject::Binding);
                }
            }
            (false, Some(_)) => return Err(invalid("a DPoP-bound token sent as a bearer token")),
            (true, None) => {
                return Err(invalid("a token without cnf.jkt sent with the DPoP scheme"));
            }
            (false, None) => {}
        }
        Ok(claims)
    }

    /// Checks the request's DPoP proof for `token`; its key's thumbprint.
    fn verify_proof(&self, req: &Request<Incoming>, token: &str) -> Result<String, Reject> {
        let proof = |why: &str| Reject::Proof(why.to_string());
        let mut values = req.headers().get_all("dpop").iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(proof("exactly one DPoP header is required"));
        };
        let jws = value.to_str().map_err(|_| proof("unreadable proof"))?;
        let head =
            jsonwebtoken::decode_header(jws).map_err(|_| proof("unreadable proof header"))?;
        if head.typ.as_deref() != Some("dpop+jwt") || !PROOF_ALGS.contains(&head.alg) {
            return Err(proof("not a dpop+jwt with an accepted algorithm"));
        }
        // The header's key must be public: a private member means a leaked key.
        let raw_head: Value = jws
            .split('.')
            .next()
            .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if raw_head["jwk"].get("d").is_some() {
            return Err(proof("the proof's jwk holds a private key"));
        }
        let jwk = head.jwk.ok_or_else(|| proof("the proof has no jwk"))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| proof("unusable jwk"))?;
        let mut validation = Validation::new(head.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Value>(jws, &key, &validation)
            .map_err(|_| proof("bad proof signature"))?
            .claims;
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let htu = format!("http://{host}{}", req.uri().path());
        if claims["htm"].as_str() != Some(req.method().as_str()) {
            return Err(proof("htm is not this request's method"));
        }
        if claims["htu"].as_str() != Some(htu.as_str()) {
            return Err(proof("htu is not this request's URL"));
        }
        let ath = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()));
        if claims["ath"].as_str() != Some(ath.as_str()) {
            return Err(proof("ath is not the hash of this token"));
        }
        let now = now();
        let iat = claims["iat"].as_u64().ok_or_else(|| proof("no iat"))?;
        if iat.abs_diff(now) > PROOF_WINDOW_SECS {
            return Err(proof("iat is outside the accepted window"));
        }
        if let Some(nonce) = &self.nonce
            && claims["nonce"].as_str() != Some(nonce.as_str())
        {
            return Err(Reject::UseNonce);
        }
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty() && j.len() <= 256);
        let jti = jti.ok_or_else(|| proof("no jti"))?;
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, until| *until >= now);
            if seen
                .insert(jti.to_string(), now + 2 * PROOF_WINDOW_SECS)
                .is_some()
            {
                return Err(proof("the proof's jti was already used (a replay)"));
            }
        }
        jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .map_err(|_| proof("no thumbprint for the jwk"))
    }

    async fn validate(&self, token: &str) -> Result<Value, Reject> {
        let head = jsonwebtoken::decode_header(token).map_err(invalid)?;
        if !ALLOWED_ALGS.contains(&head.alg) {
            return Err(invalid(format!("algorithm {:?} is not allowed", head.alg)));
        }
        // Refuse JWTs that say they are something else (a logout token, say). ID tokens are
        // refused by the audience check: their `aud` is the BFF's client id, not this API.
        if !matches!(
            head.typ.as_deref(),
            None | Some("JWT" | "at+jwt" | "application/at+jwt")
        ) {
            return Err(invalid("typ is not an access token type"));
        }
        let key = self.key_for(head.kid.as_deref(), head.alg).await?;
        let mut validation = Validation::new(head.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(invalid)?;
        Ok(data.claims)
    }

    /// The key for `kid`. An unknown `kid` is looked up in a key set fetched after the request
    /// arrived (at most one fetch per interval, waited for without holding the lock): that is how
    /// a resource server follows the issuer's key rotation without being a fetch amplifier.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, Reject> {
        let arrived = Instant::now();
        loop {
            let mut set = self.keys.lock().await;
            if let Some(key) = set.find(kid, alg) {
                return Ok(key);
            }
            match set.fetched {
                Some(at) if at >= arrived => return Err(invalid("unknown signing key")),
                Some(at) if at.elapsed() < REFETCH_INTERVAL => {
                    drop(set);
                    tokio::time::sleep_until((at + REFETCH_INTERVAL).into()).await;
                    continue;
                }
                _ => {}
            }
            set.fetched = Some(Instant::now());
            if let Err(e) = self.fetch_keys(&mut set).await {
                log(json!({"warn": "cannot load the issuer's keys", "cause": e.to_string()}));
                return Err(Reject::KeysUnavailable);
            }
            return set
                .find(kid, alg)
                .ok_or_else(|| invalid("unknown signing key"));
        }
    }

    async fn fetch_keys(&self, set: &mut KeySet) -> anyhow::Result<()> {
        let jwks_uri = match set.jwks_uri.clone() {
            Some(uri) => uri,
            None => self.discover().await?,
        };
        let jwks = get_json(&self.http, &jwks_uri).await?;
        let keys = jwks["keys"]
            .as_array()
            .context("the key set has no keys array")?;
        set.keys = keys.iter().filter_map(signing_key).collect();
        set.jwks_uri = Some(jwks_uri);
        Ok(())
    }

    /// The `jwks_uri` from the discovery document, which must name our issuer exactly.
    async fn discover(&self) -> anyhow::Result<String> {
        let base = self.issuer.trim_end_matches('/');
        let discovery = format!("{base}/.well-known/openid-configuration");
        let meta = get_json(&self.http, &discovery).await?;
        if meta["issuer"].as_str() != Some(&self.issuer) {
            bail!(
                "the discovery document names another issuer: {}",
                meta["issuer"]
            );
        }
        let uri = meta["jwks_uri"]
            .as_str()
            .context("discovery has no jwks_uri")?;
        Ok(uri.to_owned())
    }
}

/// A usable signature key, or `None` for what must be skipped (encryption or symmetric keys,
/// unknown key types) without rejecting the rest of the set.
fn signing_key(jwk: &Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(jwk.clone()).ok()?;
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = common
        .key_algorithm
        .map(Algorithm::try_from)
        .transpose()
        .ok()?;
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    let kid = common.key_id.clone();
    (key.family() != AlgorithmFamily::Hmac).then_some(Key { kid, alg, key })
}

impl KeySet {
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let fits = |k: &&Key| k.alg.is_none_or(|a| a == alg);
        let key = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(fits)
                .find(|k| k.kid.as_deref() == Some(kid)),
            // Without a `kid`, only an unambiguous key set will do.
            None => match self.keys.as_slice() {
                [only] => Some(only).filter(fits),
                _ => None,
            },
        };
        key.map(|k| k.key.clone())
    }
}

async fn get_json(http: &HttpClient, url: &str) -> anyhow::Result<Value> {
    let req = Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(Empty::new())?;
    let fetch = async {
        let resp = http.request(req).await?;
        if !resp.status().is_success() {
            bail!("{url} answered {}", resp.status());
        }
        let body = Limited::new(resp.into_body(), 1 << 20).collect().await;
        let body = body.map_err(|e| anyhow!(e))?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .with_context(|| format!("{url} timed out"))?
}

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut resp = Response::new(Full::from(body.to_string()));
    *resp.status_mut() = status;
    let resp = with(resp, header::CONTENT_TYPE, "application/json");
    with(resp, header::CACHE_CONTROL, "no-store")
}

/// One JSON line on stderr, never with a token in it.
fn log(line: Value) {
    eprintln!("{line}");
}

fn with(mut resp: Reply, name: HeaderName, value: &'static str) -> Reply {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
    resp
}

fn rejection(reject: &Reject, nonce: Option<&str>) -> Reply {
    // RFC 6750 §3.1: a request without any credentials gets a challenge without an error code.
    let (challenge, error) = match reject {
        Reject::Missing => (r#"Bearer realm="sample-api""#, "unauthorized"),
        Reject::Invalid(_) => (
            r#"Bearer realm="sample-api", error="invalid_token""#,
            "invalid_token",
        ),
        Reject::KeysUnavailable => {
            let body = json!({"error": "temporarily_unavailable"});
            return reply(StatusCode::SERVICE_UNAVAILABLE, body);
        }
        Reject::Proof(_) => (
            r#"DPoP realm="sample-api", error="invalid_dpop_proof", algs="ES256 ES384 EdDSA PS256 RS256""#,
            "invalid_dpop_proof",
        ),
        Reject::Binding => (
            r#"DPoP realm="sample-api", error="invalid_token", algs="ES256 ES384 EdDSA PS256 RS256""#,
            "invalid_token",
        ),
        Reject::UseNonce => {
            let body = json!({"error": "use_dpop_nonce"});
            let resp = reply(StatusCode::UNAUTHORIZED, body);
            let resp = with(
                resp,
                header::WWW_AUTHENTICATE,
                r#"DPoP error="use_dpop_nonce""#,
            );
            return match nonce.and_then(|n| HeaderValue::from_str(n).ok()) {
                Some(value) => {
                    let mut resp = resp;
                    resp.headers_mut().insert("dpop-nonce", value);
                    resp
                }
                None => resp,
            };
        }
    };
    let resp = reply(StatusCode::UNAUTHORIZED, json!({"error": error}));
    with(resp, header::WWW_AUTHENTICATE, challenge)
}

/// The protected endpoints, given the validated claims of the access token.
fn protected(path: &str, claims: &Value) -> Reply {
    let roles: Vec<&str> = match &claims["roles"] {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(role) => vec![role.as_str()],
        _ => Vec::new(),
    };
    let name = claims["name"].as_str().or(claims["sub"].as_str());
    let name = name.unwrap_or("stranger");
    if path == "/api/hello" {
        let (sub, aud, scope) = (&claims["sub"], &claims["aud"], &claims["scope"]);
        let message = format!("Hello, {name}");
        let body =
            json!({"message": message, "sub": sub, "roles": roles, "aud": aud, "scope": scope});
        reply(StatusCode::OK, body)
    } else if roles.contains(&BETA_ROLE) {
        let message = format!("Welcome to the new dashboard, {name}");
        let widgets = ["active sessions", "token refreshes", "p95 latency"];
        let body = json!({"dashboard": "new-dashboard", "message": message, "widgets": widgets});
        reply(StatusCode::OK, body)
    } else {
        let body = json!({"error": "forbidden", "required_role": BETA_ROLE});
        reply(StatusCode::FORBIDDEN, body)
    }
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    let mut detail = String::new();
    let resp = match (req.method(), path) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/api/hello" | "/api/beta/dashboard") => {
            match api.authenticate(&req).await {
                Ok(claims) => {
                    detail = format!("sub {}", claims["sub"]);
                    protected(path, &claims)
                }
                Err(reject) => {
                    detail = match &reject {
                        Reject::Missing => "no bearer token".into(),
                        Reject::Invalid(why) => format!("invalid token: {why}"),
                        Reject::KeysUnavailable => "the issuer's keys are unavailable".into(),
                        Reject::Proof(why) => format!("invalid DPoP proof: {why}"),
                        Reject::Binding => "the proof's key is not the token's cnf.jkt".into(),
                        Reject::UseNonce => "DPoP proof without the current nonce".into(),
                    };
                    let reject = match reject {
                        Reject::Binding if api.binding_as_proof_error => {
                            Reject::Proof("another key than the token's".into())
                        }
                        other => other,
                    };
                    rejection(&reject, api.nonce.as_deref())
                }
            }
        }
        (_, "/healthz" | "/api/hello" | "/api/beta/dashboard") => {
            let body = json!({"error": "method_not_allowed"});
            with(
                reply(StatusCode::METHOD_NOT_ALLOWED, body),
                header::ALLOW,
                "GET",
            )
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
    };
    let status = resp.status().as_u16();
    let method = req.method().as_str();
    log(json!({"method": method, "path": path, "status": status, "detail": detail}));
    Ok(resp)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())?
        .https_or_http()
        .enable_http1()
        .build();
    let api = Arc::new(Api {
        issuer: args.issuer,
        audiences: args.audiences,
        http: Client::builder(TokioExecutor::new()).build(connector),
        keys: Mutex::new(KeySet {
            jwks_uri: args.jwks_uri,
            ..KeySet::default()
        }),
        nonce: match args.dpop_nonce {
            false => None,
            true => {
                let mut bytes = [0u8; 16];
                getrandom::fill(&mut bytes).map_err(|e| anyhow!("random source: {e}"))?;
                Some(URL_SAFE_NO_PAD.encode(bytes))
            }
        },
        seen: std::sync::Mutex::new(HashMap::new()),
        binding_as_proof_error: args.binding_as_proof_error,
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = listener.local_addr()?.to_string();
    println!("{}", json!({"ready": true, "listen": listen}));
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => return Ok(()),
        };
        stream.set_nodelay(true)?;
        let api = api.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(api.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log(json!({"warn": "connection error", "cause": e.to_string()}));
            }
        });
    }
}
