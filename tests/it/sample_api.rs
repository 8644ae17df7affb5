//! The sample API (`examples/sample_api.rs`) is a real process here: it is built with cargo,
//! started on port 0 against an in-test issuer that serves discovery and a key set, and asked
//! with tokens signed by a key made for each test.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use vestibule::oidc::dpop::DpopKey;

const API: &str = "https://api.example.test";
const LEGACY_API: &str = "https://legacy-api.example.test";
const DEADLINE: Duration = Duration::from_secs(10);

/// An issuer signing with Ed25519 keys made for the test, serving discovery and its key set
/// on loopback. `rotate` publishes a new key and signs with it from then on.
struct Issuer {
    url: String,
    /// The published key set; the last key signs.
    keys: Arc<Mutex<Vec<(Jwk, EncodingKey)>>>,
}

impl Issuer {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let issuer = Self {
            url: url.clone(),
            keys: Arc::default(),
        };
        issuer.rotate()?;
        let keys = issuer.keys.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (url, keys) = (url.clone(), keys.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => {
                            json!({"issuer": url, "jwks_uri": format!("{url}/jwks")})
                        }
                        "/jwks" => match keys.lock() {
                            Ok(keys) => {
                                json!({"keys": keys.iter().map(|(jwk, _)| jwk).collect::<Vec<_>>()})
                            }
                            Err(_) => json!({}),
                        },
                        _ => json!({}),
                    };
                    let resp = Response::new(Full::<Bytes>::from(body.to_string()));
                    async move { Ok::<_, hyper::Error>(resp) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::spawn(conn);
            }
        });
        Ok(issuer)
    }

    /// Publishes a fresh signing key (kid `key-<n>`), which signs every token from now on.
    fn rotate(&self) -> anyhow::Result<()> {
        // A PKCS#8 v1 Ed25519 key is a fixed 16-byte prefix and a 32-byte random seed.
        let mut der = ED25519_PKCS8_PREFIX.to_vec();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow!("{e}"))?;
        der.extend_from_slice(&seed);
        let key = EncodingKey::from_ed_der(&der);
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA)?;
        let mut keys = self.keys.lock().map_err(|_| anyhow!("poisoned"))?;
        jwk.common.key_id = Some(format!("key-{}", keys.len() + 1));
        keys.push((jwk, key));
        Ok(())
    }

    /// The signing key: its id, the key, and its public bytes.
    fn current(&self) -> anyhow::Result<(String, EncodingKey, Vec<u8>)> {
        let keys = self.keys.lock().map_err(|_| anyhow!("poisoned"))?;
        let (jwk, key) = keys.last().context("no key")?;
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        let public = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p) => base64url_decode(&p.x)?,
            _ => bail!("not an OKP key"),
        };
        Ok((kid, key.clone(), public))
    }

    /// A token for alice with `beta-tester`, changed by `adjust`.
    fn token(&self, adjust: impl FnOnce(&mut Value)) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let mut claims = json!({
            "iss": self.url, "sub": "alice", "aud": API, "iat": now, "exp": now + 300,
            "name": "Alice", "roles": ["beta-tester"], "scope": "openid api",
        });
        adjust(&mut claims);
        let (kid, key, _) = self.current()?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid);
        header.typ = Some("at+jwt".into());
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }
}

const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn base64url_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text)?)
}

/// The example binary, built once per test run into the same target directory as this test.
fn sample_api_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let build = || -> anyhow::Result<PathBuf> {
            let exe = std::env::current_exe()?; // <target>/<profile>/deps/sample_api-<hash>
            let profile = exe
                .parent()
                .and_then(|deps| deps.parent())
                .context("no profile dir")?;
            let target = profile.parent().context("no target dir")?;
            let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cargo.args([
                "build",
                "--quiet",
                "--example",
                "sample_api",
                "--target-dir",
            ]);
            cargo.arg(target).current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile.ends_with("release") {
                cargo.arg("--release");
            }
            if !cargo.status()?.success() {
                bail!("cargo build --example sample_api failed");
            }
            Ok(profile.join("examples").join("sample_api"))
        };
        build().map_err(|e| format!("{e:#}"))
    });
    built.clone().map_err(|e| anyhow!(e))
}

/// A running sample API; killed when dropped. Its stderr (the request log) goes to a file.
pub(crate) struct SampleApi {
    child: Child,
    pub(crate) url: String,
    log: tempfile::NamedTempFile,
}

impl SampleApi {
    async fn start(issuer: &Issuer, audiences: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--issuer", issuer.url.as_str()];
        for audience in audiences {
            args.extend(["--audience", audience]);
        }
        Self::start_with(&args).await
    }

    /// Starts it on a free port with these arguments (`--issuer`, `--audience`, `--jwks-uri`).
    pub(crate) async fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let mut cmd = Command::new(sample_api_binary()?);
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let child = cmd.stdout(Stdio::piped()).stderr(log.reopen()?).spawn()?;
        let mut api = Self {
            child,
            url: String::new(),
            log,
        };
        let stdout = api.child.stdout.take().context("no stdout")?;
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(DEADLINE, first_line)
            .await
            .context("not ready in time")???;
        let ready: Value =
            serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
        let listen = ready["listen"]
            .as_str()
            .filter(|_| ready["ready"] == true)
            .context("not ready")?;
        api.url = format!("http://{listen}");
        Ok(api)
    }

    pub(crate) async fn get(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(StatusCode, HeaderMap, Value)> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        self.get_with(path, &headers).await
    }

    pub(crate) async fn get_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(StatusCode, HeaderMap, Value)> {
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut req = Request::get(format!("{}{path}", self.url));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = tokio::time::timeout(DEADLINE, client.request(req.body(Empty::<Bytes>::new())?))
            .await??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, serde_json::from_slice(&body)?))
    }

    pub(crate) fn log(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.log.path())?)
    }
}

impl Drop for SampleApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn challenge(headers: &HeaderMap) -> &str {
    headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn valid_token_is_greeted_with_its_roles_and_never_logged() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let token = issuer.token(|_| {})?;
    let (status, _, body) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"], "Hello, Alice");
    assert_eq!(body["sub"], "alice");
    assert_eq!(body["roles"], json!(["beta-tester"]));
    assert_eq!(body["aud"], API);
    assert_eq!(body["scope"], "openid api");
    let log = api.log()?;
    assert!(log.contains("/api/hello"), "the request is logged: {log}");
    let signature = token.rsplit('.').next().unwrap_or_default();
    assert!(!log.contains(signature), "the token is not logged: {log}");
    Ok(())
}

#[tokio::test]
async fn token_for_another_audience_is_rejected() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    // What an ID token looks like to an API: issued for the BFF's client id.
    let token = issuer.token(|c| c["aud"] = json!("spa-bff"))?;
    let (status, headers, body) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_token");
    assert!(
        challenge(&headers).contains(r#"error="invalid_token""#),
        "{headers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn second_accepted_audience_is_accepted_during_a_migration() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API, LEGACY_API]).await?;
    let token = issuer.token(|c| c["aud"] = json!(["some-other-api", LEGACY_API]))?;
    let (status, _, body) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["aud"], json!(["some-other-api", LEGACY_API]));
    Ok(())
}

#[tokio::test]
async fn expired_token_is_rejected() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let token = issuer
        .token(|c| c["exp"] = json!(c["iat"].as_u64().unwrap_or_default().saturating_sub(120)))?;
    let (status, headers, _) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        challenge(&headers).contains(r#"error="invalid_token""#),
        "{headers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn token_from_another_issuer_is_rejected() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let token = issuer.token(|c| c["iss"] = json!("https://evil.example.test"))?;
    let (status, _, _) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn missing_token_is_rejected_with_a_bearer_challenge() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let (status, headers, _) = api.get("/api/hello", None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge(&headers).starts_with("Bearer"), "{headers:?}");
    Ok(())
}

#[tokio::test]
async fn hmac_token_keyed_with_the_public_key_is_rejected() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let good = issuer.token(|_| {})?;
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&good)?;
    let (kid, _, public) = issuer.current()?;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid);
    let forged = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public))?;
    let (status, _, _) = api.get("/api/hello", Some(&forged)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn beta_dashboard_needs_the_beta_tester_role() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let alice = issuer.token(|_| {})?;
    let (status, _, body) = api.get("/api/beta/dashboard", Some(&alice)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bob = issuer.token(|c| {
        c["sub"] = json!("bob");
        c["roles"] = json!([]);
    })?;
    let (status, _, body) = api.get("/api/beta/dashboard", Some(&bob)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "forbidden");
    Ok(())
}

#[tokio::test]
async fn key_rotated_after_the_first_fetch_is_picked_up() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let (status, _, _) = api.get("/api/hello", Some(&issuer.token(|_| {})?)).await?;
    assert_eq!(status, StatusCode::OK, "the first key works");
    issuer.rotate()?;
    let (status, _, body) = api.get("/api/hello", Some(&issuer.token(|_| {})?)).await?;
    assert_eq!(status, StatusCode::OK, "the rotated key is fetched: {body}");
    Ok(())
}

#[tokio::test]
async fn token_signed_with_an_unpublished_key_is_rejected() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let stranger = Issuer::start().await?; // same kid, another key, never published by `issuer`
    let token = stranger.token(|c| c["iss"] = json!(issuer.url))?;
    let (status, _, _) = api.get("/api/hello", Some(&token)).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A DPoP-bound token (`cnf.jkt` of `key`) and a fresh proof for `GET {api}/api/hello` with it.
fn bound(issuer: &Issuer, key: &DpopKey) -> anyhow::Result<String> {
    let jkt = key.thumbprint().to_string();
    issuer.token(|c| c["cnf"] = json!({ "jkt": jkt }))
}

fn proof(key: &DpopKey, htm: &str, htu: &str, token: &str, iat: u64) -> String {
    key.proof(htm, htu, iat, Some(token), None).unwrap()
}

#[tokio::test]
async fn a_dpop_bound_token_is_refused_without_a_fresh_proof_from_its_key() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let key = DpopKey::generate()?;
    let token = bound(&issuer, &key)?;
    let htu = format!("{}/api/hello", api.url);
    let auth = format!("DPoP {token}");
    let good = proof(&key, "GET", &htu, &token, unix_now());
    let (status, _, body) = api
        .get_with("/api/hello", &[("authorization", &auth), ("dpop", &good)])
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Each of these is what a thief holding the token (and perhaps an old proof) can send.
    let other = DpopKey::generate()?;
    let refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "the same proof again (replayed jti)",
            vec![("authorization", auth.clone()), ("dpop", good.clone())],
        ),
        (
            "as a bearer token",
            vec![("authorization", format!("Bearer {token}"))],
        ),
        (
            "with the DPoP scheme and no proof",
            vec![("authorization", auth.clone())],
        ),
        (
            "with a proof from another key",
            vec![
                ("authorization", auth.clone()),
                ("dpop", proof(&other, "GET", &htu, &token, unix_now())),
            ],
        ),
        (
            "with a proof for another URL",
            vec![
                ("authorization", auth.clone()),
                (
                    "dpop",
                    proof(
                        &key,
                        "GET",
                        &format!("{}/api/beta/dashboard", api.url),
                        &token,
                        unix_now(),
                    ),
                ),
            ],
        ),
        (
            "with a proof for another method",
            vec![
                ("authorization", auth.clone()),
                ("dpop", proof(&key, "POST", &htu, &token, unix_now())),
            ],
        ),
        (
            "with a proof for another token",
            vec![
                ("authorization", auth.clone()),
                (
                    "dpop",
                    proof(&key, "GET", &htu, "another-token", unix_now()),
                ),
            ],
        ),
        (
            "with a proof ten minutes old",
            vec![
                ("authorization", auth.clone()),
                ("dpop", proof(&key, "GET", &htu, &token, unix_now() - 600)),
            ],
        ),
        (
            "with two proofs",
            vec![
                ("authorization", auth.clone()),
                ("dpop", proof(&key, "GET", &htu, &token, unix_now())),
                ("dpop", proof(&key, "GET", &htu, &token, unix_now())),
            ],
        ),
    ];
    for (what, headers) in refused {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, headers, body) = api.get_with("/api/hello", &headers).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(
            ["invalid_token", "invalid_dpop_proof", "unauthorized"]
                .contains(&body["error"].as_str().unwrap_or_default()),
            "{what}: {body} {}",
            challenge(&headers)
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_unbound_token_is_refused_with_the_dpop_scheme() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start(&issuer, &[API]).await?;
    let key = DpopKey::generate()?;
    let token = issuer.token(|_| {})?;
    let htu = format!("{}/api/hello", api.url);
    let (auth, dpop) = (
        format!("DPoP {token}"),
        proof(&key, "GET", &htu, &token, unix_now()),
    );
    let (status, _, body) = api
        .get_with("/api/hello", &[("authorization", &auth), ("dpop", &dpop)])
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    Ok(())
}

#[tokio::test]
async fn an_api_that_wants_a_nonce_hands_one_out_and_takes_proofs_with_it() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let api = SampleApi::start_with(&["--issuer", &issuer.url, "--audience", API, "--dpop-nonce"])
        .await?;
    let key = DpopKey::generate()?;
    let token = bound(&issuer, &key)?;
    let htu = format!("{}/api/hello", api.url);
    let auth = format!("DPoP {token}");
    let without = proof(&key, "GET", &htu, &token, unix_now());
    let (status, headers, body) = api
        .get_with(
            "/api/hello",
            &[("authorization", &auth), ("dpop", &without)],
        )
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        challenge(&headers).contains("use_dpop_nonce"),
        "{headers:?}"
    );
    let nonce = headers
        .get("dpop-nonce")
        .and_then(|v| v.to_str().ok())
        .context("no DPoP-Nonce")?
        .to_string();
    let with = key.proof("GET", &htu, unix_now(), Some(&token), Some(&nonce))?;
    let (status, _, body) = api
        .get_with("/api/hello", &[("authorization", &auth), ("dpop", &with)])
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(())
}
