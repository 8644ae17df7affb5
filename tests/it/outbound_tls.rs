//! Outbound trust and egress (issue 16 §1), with a private CA made at test time: the provider
//! served over TLS reached only through `ca_file`, an upstream that requires a client
//! certificate, `rediss://` with `ca_file`, calls to the provider through an HTTP CONNECT proxy
//! (`HTTPS_PROXY`) and around it (`NO_PROXY`), and `check` naming bad PEM files by TOML path.

use crate::support::pki::{ConnectProxy, TestCa, tls_front};
use crate::support::redis::RedisServer;
use crate::support::{config_toml, fake_idp, free_port, get, start_proxy, upstream};
use std::path::Path;
use vestibule::config::Config;
use vestibule::jose::testing::{TestKey, TestSigner};
use vestibule::session::{Store, StoreError};

/// The fake provider behind a TLS front with a certificate of `ca`; its discovery document
/// names the front. Returns the issuer (`https://127.0.0.1:PORT`).
async fn provider_over_tls(ca: &TestCa) -> (String, fake_idp::FakeIdp) {
    let (issuer, idp, _) = provider_behind(ca.acceptor(None)).await;
    (issuer, idp)
}

/// [`provider_over_tls`] behind `acceptor`, with the front's log.
async fn provider_behind(
    acceptor: tokio_rustls::TlsAcceptor,
) -> (
    String,
    fake_idp::FakeIdp,
    std::sync::Arc<crate::support::pki::FrontLog>,
) {
    let signer = TestSigner::new();
    let idp = fake_idp::start(signer.jwks_json(&[(TestKey::Rsa1, "k1")])).await;
    let backend = idp.issuer.trim_start_matches("http://").parse().unwrap();
    let (front, log) = tls_front(acceptor, backend).await;
    let issuer = format!("https://{front}");
    let mut extra = serde_json::Map::new();
    for (key, path) in [
        ("issuer", ""),
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("jwks_uri", "/jwks"),
        ("end_session_endpoint", "/logout"),
        ("userinfo_endpoint", "/userinfo"),
    ] {
        extra.insert(key.into(), format!("{issuer}{path}").into());
    }
    *idp.state.discovery_extra.lock().unwrap() = extra;
    (issuer, idp, log)
}

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, vestibule::config::ConfigErrors> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse(text, Path::new("."), &move |name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
}

fn provider_config(issuer: &str, extra: &[(&str, &str)]) -> String {
    let mut config = config_toml("")
        .set("oidc.issuer", issuer)
        .remove("oidc.allow_http_issuer");
    for (path, value) in extra {
        config = config.add(path, *value);
    }
    config.text()
}

#[tokio::test]
async fn a_provider_with_a_private_ca_is_reached_only_through_ca_file() {
    let ca = TestCa::new("Private Provider CA");
    let (issuer, _idp) = provider_over_tls(&ca).await;
    let ca_file = ca.ca_file.display().to_string();

    // Hostile first: the compiled-in roots do not know the private CA.
    let plain = parse(&provider_config(&issuer, &[]), &[]).unwrap();
    let refused = vestibule::app::check_provider(&plain).await.unwrap_err();
    assert!(
        refused.to_string().contains("certificate"),
        "refused for another reason: {refused}"
    );
    // Another CA's bundle is no better.
    let other = TestCa::new("Someone Else");
    let wrong = provider_config(
        &issuer,
        &[("oidc.ca_file", &other.ca_file.display().to_string())],
    );
    assert!(
        vestibule::app::check_provider(&parse(&wrong, &[]).unwrap())
            .await
            .is_err()
    );

    for key in ["oidc.ca_file", "tls.ca_file"] {
        let config = parse(&provider_config(&issuer, &[(key, &ca_file)]), &[]).unwrap();
        vestibule::app::check_provider(&config)
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    // `[oidc] ca_file` replaces `[tls] ca_file` for the provider.
    let replaced = provider_config(
        &issuer,
        &[
            ("tls.ca_file", &ca_file),
            ("oidc.ca_file", &other.ca_file.display().to_string()),
        ],
    );
    assert!(
        vestibule::app::check_provider(&parse(&replaced, &[]).unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn provider_calls_go_through_https_proxy_and_around_it_for_no_proxy() {
    let ca = TestCa::new("Private Provider CA");
    let (issuer, _idp) = provider_over_tls(&ca).await;
    let front = issuer.trim_start_matches("https://").to_string();
    let text = provider_config(
        &issuer,
        &[("tls.ca_file", &ca.ca_file.display().to_string())],
    );
    let proxy = ConnectProxy::start().await;
    let proxy_url = format!("http://scott:tiger-pw@{}", proxy.addr);

    let through = parse(&text, &[("HTTPS_PROXY", &proxy_url)]).unwrap();
    vestibule::app::check_provider(&through).await.unwrap();
    let seen = proxy.requests();
    assert!(!seen.is_empty(), "the proxy was not used");
    for (line, auth) in &seen {
        assert_eq!(line, &format!("CONNECT {front} HTTP/1.1"));
        // scott:tiger-pw
        assert_eq!(auth.as_deref(), Some("Basic c2NvdHQ6dGlnZXItcHc="));
    }
    // The config never shows the proxy's password.
    assert!(!format!("{through:?}").contains("tiger-pw"));

    // Lowercase names work too; NO_PROXY lets the provider's host bypass the proxy.
    let before = proxy.requests().len();
    let around = parse(
        &text,
        &[
            ("https_proxy", &proxy_url),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    )
    .unwrap();
    vestibule::app::check_provider(&around).await.unwrap();
    assert_eq!(proxy.requests().len(), before, "NO_PROXY was not honoured");

    // A proxy that is not there: the call fails, it does not go around it; the error does not
    // show the password.
    let dead = format!("http://scott:tiger-pw@127.0.0.1:{}", free_port());
    let config = parse(&text, &[("HTTPS_PROXY", &dead)]).unwrap();
    let error = vestibule::app::check_provider(&config).await.unwrap_err();
    assert!(!format!("{error:#}").contains("tiger-pw"), "{error:#}");

    // An https:// proxy URL (a TLS hop to the proxy) is refused by check, without the value.
    let errors = parse(
        &text,
        &[("HTTPS_PROXY", "https://scott:tiger-pw@proxy:3128")],
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("environment HTTPS_PROXY: must be an http:// proxy URL"),
        "{errors}"
    );
    assert!(!errors.contains("tiger-pw"), "{errors}");
}

#[tokio::test]
async fn an_upstream_that_requires_a_client_certificate_gets_the_routes_one() {
    let ca = TestCa::new("Private API CA");
    let clients = TestCa::new("Client CA");
    let up = upstream::start().await;
    let (front, log) = tls_front(ca.acceptor(Some(&clients)), up.addr.unwrap()).await;
    let client = clients.client("vestibule");
    let stranger_ca = TestCa::new("Stranger");
    let stranger = stranger_ca.client("vestibule");
    let (cert, key) = (
        client.cert_file.display().to_string(),
        client.key_file.display().to_string(),
    );
    let ca_file = ca.ca_file.display().to_string();
    let route = |path: &str, lines: &[(&str, &str)]| {
        let mut text = format!("[[routes]]\npath = \"{path}\"\nupstream = \"https://{front}\"\n");
        for (key, value) in lines {
            text.push_str(&format!("{key} = {value:?}\n"));
        }
        text
    };
    let routes = [
        route(
            "/mtls/",
            &[
                ("ca_file", &ca_file),
                ("tls_client_cert", &cert),
                ("tls_client_key", &key),
            ],
        ),
        route("/nocert/", &[("ca_file", &ca_file)]),
        route(
            "/noca/",
            &[("tls_client_cert", &cert), ("tls_client_key", &key)],
        ),
        route(
            "/stranger/",
            &[
                ("ca_file", &ca_file),
                ("tls_client_cert", &stranger.cert_file.display().to_string()),
                ("tls_client_key", &stranger.key_file.display().to_string()),
            ],
        ),
    ]
    .concat();
    let proxy = start_proxy(config_toml(&routes)).await;

    // Hostile first: no client certificate, one of another CA, or no trust in the upstream's.
    for path in ["/nocert/x", "/stranger/x", "/noca/x"] {
        let reply = get(&proxy.url(path), &[]).await;
        assert_eq!(reply.status, 502, "{path}: {}", reply.text());
        assert_eq!(reply.json()["error"], "upstream_unavailable");
    }
    assert_eq!(up.count(), 0);

    let reply = get(&proxy.url("/mtls/items"), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().uri, "/mtls/items");
    let presented = log.client_certs.lock().unwrap().clone();
    assert_eq!(presented, vec![Some(client.cert.clone())]);

    // `[tls] ca_file` is the default for routes without their own.
    let proxy = start_proxy(config_toml(&routes).add("tls.ca_file", ca_file.as_str())).await;
    let reply = get(&proxy.url("/noca/x"), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_is_reached_through_ca_file() {
    let ca = TestCa::new("Private Redis CA");
    let server_cert = ca.server();
    let server =
        RedisServer::start_tls_with(&server_cert.cert_file, &server_cert.key_file, &ca.ca_file);
    let url = server.tls_url();
    let ca_file = ca.ca_file.display().to_string();
    let store_for = |extra: &[(&str, &str)]| {
        let mut config = config_toml("")
            .add("session.store", "redis")
            .add("session.redis.url", url.as_str());
        for (path, value) in extra {
            config = config.add(path, *value);
        }
        parse(&config.text(), &[]).unwrap().session.store
    };

    // Hostile first: the web PKI roots do not know the private CA.
    let untrusted = Store::connect(&store_for(&[]), 0).await.unwrap();
    assert!(matches!(
        untrusted.ping().await,
        Err(StoreError::Unavailable(_))
    ));

    for key in ["session.redis.ca_file", "tls.ca_file"] {
        let store = Store::connect(&store_for(&[(key, &ca_file)]), 0)
            .await
            .unwrap();
        store.ping().await.unwrap_or_else(|e| panic!("{key}: {e}"));
        store
            .put_new("k", b"v", std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v");
        store.delete("k").await.unwrap();
    }
}

#[test]
fn check_names_bad_pem_files_by_their_toml_path() {
    let ca = TestCa::new("Check CA");
    let client = ca.client("c");
    let other = ca.client("d");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (junk, missing) = (
        junk.display().to_string(),
        dir.path().join("missing.pem").display().to_string(),
    );
    let (cert, key, other_key) = (
        client.cert_file.display().to_string(),
        client.key_file.display().to_string(),
        other.key_file.display().to_string(),
    );
    let routes = format!(
        "[[routes]]\npath = \"/a/\"\nupstream = \"https://api.test\"\nca_file = {junk:?}\ntls_client_cert = {cert:?}\ntls_client_key = {other_key:?}\n\
         [[routes]]\npath = \"/b/\"\nupstream = \"https://api.test\"\ntls_client_cert = {cert:?}\n\
         [[routes]]\npath = \"/c/\"\nupstream = \"http://api.test\"\ntls_client_cert = {cert:?}\ntls_client_key = {key:?}\n\
         [[routes]]\npath = \"/d/\"\nupstream = \"https://api.test\"\ntls_client_cert = {cert:?}\ntls_client_key = {junk:?}\n"
    );
    let text = config_toml(&routes)
        .add("tls.ca_file", missing.as_str())
        .add("oidc.ca_file", key.as_str())
        .add("session.store", "redis")
        .add("session.redis.url", "rediss://127.0.0.1:1")
        .add("session.redis.ca_file", junk.as_str())
        .text();
    let errors = parse(&text, &[]).unwrap_err().to_string();
    for expected in [
        format!("tls.ca_file: cannot read file {missing:?}"),
        format!("oidc.ca_file: {key:?} holds no PEM certificate"),
        format!("session.redis.ca_file: {junk:?} holds no PEM certificate"),
        format!("routes[0].ca_file: {junk:?} holds no PEM certificate"),
        format!("routes[0].tls_client_key: {other_key:?} does not fit the certificate in {cert:?}"),
        "routes[1].tls_client_key: is required with tls_client_cert".to_string(),
        "routes[2].tls_client_cert: only applies to an https:// upstream".to_string(),
        format!("routes[3].tls_client_key: {junk:?} holds no PEM private key"),
    ] {
        assert!(
            errors.contains(&expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    // The private key's content never appears.
    let key_pem = std::fs::read_to_string(&client.key_file).unwrap();
    let body = key_pem.lines().nth(1).unwrap();
    assert!(!errors.contains(body), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ca_file_is_trusted_by_every_worker_for_routes_without_their_own() {
    let ca = TestCa::new("Private API CA");
    let up = upstream::start().await;
    let (front, _) = tls_front(ca.acceptor(None), up.addr.unwrap()).await;
    let routes = format!("[[routes]]\npath = \"/api/\"\nupstream = \"https://{front}\"\n");
    // Served by worker threads, each with upstream clients of its own.
    let plain = start_proxy(config_toml(&routes).add("server.workers", 2)).await;
    let reply = get(&plain.url("/api/x"), &[]).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    let trusted = start_proxy(
        config_toml(&routes)
            .add("server.workers", 2)
            .add("tls.ca_file", ca.ca_file.display().to_string()),
    )
    .await;
    for _ in 0..4 {
        let reply = get(&trusted.url("/api/x"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gives_a_route_its_client_certificate() {
    let ca = TestCa::new("Private API CA");
    let up = upstream::start().await;
    let (front, log) = tls_front(ca.acceptor(Some(&ca)), up.addr.unwrap()).await;
    let client = ca.client("vestibule");
    let route = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"https://{front}\"\nca_file = {:?}\n",
        ca.ca_file.display().to_string()
    );
    let proxy = start_proxy(config_toml(&route)).await;
    assert_eq!(get(&proxy.url("/api/x"), &[]).await.status, 502);
    let with_cert = format!(
        "{route}tls_client_cert = {:?}\ntls_client_key = {:?}\n",
        client.cert_file.display().to_string(),
        client.key_file.display().to_string()
    );
    std::fs::write(
        proxy.dir.path().join("config.toml"),
        config_toml(&with_cert).text(),
    )
    .unwrap();
    crate::support::eventually(
        "the reloaded route presents its certificate",
        std::time::Duration::from_secs(10),
        || async { (get(&proxy.url("/api/x"), &[]).await.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(
        log.client_certs.lock().unwrap().last(),
        Some(&Some(client.cert.clone()))
    );
}

/// The provider's client speaks HTTP/1.1 only, even to a provider that offers HTTP/2 first:
/// a call that times out drops its connection, and the next opens a new one, so a provider
/// behind a link that died and healed is reached again at once
/// (`faults_provider.rs::a_token_endpoint_behind_a_dead_link_is_503_fast_and_back_soon_after_the_link`).
/// An HTTP/2 connection would stay pooled into the dead link, every call on it failing until
/// TCP's retransmission resumed it, unless pinged as the upstreams' are (guard).
#[tokio::test]
async fn the_provider_client_speaks_http1_even_to_a_provider_offering_http2() {
    let ca = TestCa::new("Provider CA");
    let (issuer, _idp, log) = provider_behind(ca.h2_acceptor()).await;
    let ca_file = ca.ca_file.display().to_string();
    let config = parse(
        &provider_config(&issuer, &[("oidc.ca_file", &ca_file)]),
        &[],
    )
    .unwrap();
    vestibule::app::check_provider(&config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let agreed = log.alpn.lock().unwrap().clone();
    assert!(!agreed.is_empty());
    // No ALPN, or `http/1.1`: never `h2`.
    for protocol in agreed {
        assert_ne!(
            protocol.as_deref(),
            Some(&b"h2"[..]),
            "the provider client agreed on HTTP/2"
        );
    }
}

/// A route's own TLS client (its `ca_file`, its client certificate) is made anew when a reload
/// changes them (a CA rotated); the old one, with its pool, must go with the configuration that
/// used it, or every rotation leaves one more behind for the life of the process.
#[tokio::test]
async fn route_tls_clients_do_not_pile_up_over_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(
        &ca_file,
        std::fs::read(&TestCa::new("ca-0").ca_file).unwrap(),
    )
    .unwrap();
    let routes = format!(
        "[[routes]]\npath = \"/api/\"\nupstream = \"https://127.0.0.1:9\"\nca_file = \"{}\"\n",
        ca_file.display()
    );
    let proxy = start_proxy(config_toml(&routes)).await;
    for round in 1..=12 {
        let r = get(&proxy.url("/api/x"), &[]).await;
        assert_eq!(r.status, 502, "{}", r.text());
        let ca = TestCa::new(&format!("ca-{round}"));
        std::fs::write(&ca_file, std::fs::read(&ca.ca_file).unwrap()).unwrap();
        proxy.app.reload("test");
    }
    let r = get(&proxy.url("/api/x"), &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        proxy.app.upstreams.route_clients(),
        1,
        "TLS clients kept for one route after 12 CA rotations"
    );
}
