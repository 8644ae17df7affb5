//! Golden tests: the exact words an operator reads for each kind of mistake. All problems of
//! one file are reported together, each with its TOML path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::TomlConfig;
use std::path::Path;
use vestibule::config::Config;

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn base() -> String {
    format!(
        r#"
[server]
public_url = "https://app.example.com"
[oidc]
issuer = "https://idp.example.com"
client_id = "spa"
client_secret = "${{SECRET}}"
[session]
keys = ["{KEY}"]
"#
    )
}

/// [`base`] with `path` added.
fn add(path: &str, value: impl Into<toml::Value>) -> String {
    TomlConfig::parse(&base()).add(path, value).text()
}

fn env(name: &str) -> Option<String> {
    (name == "SECRET").then(|| "s3cr3t-value".to_string())
}

fn errors(text: &str) -> Vec<String> {
    match Config::parse(text, Path::new("."), &env) {
        Ok(_) => panic!("the config was accepted"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn the_base_config_is_valid() {
    let config = Config::parse(&base(), Path::new("."), &env).unwrap();
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.session.cookie_name, "__Host-vestibule");
    assert_eq!(
        config.oidc.provider_timeout,
        std::time::Duration::from_secs(25)
    );
    assert_eq!(
        config.oidc.client_secret.as_ref().unwrap().expose(),
        "s3cr3t-value"
    );
    assert_eq!(
        format!("{:?}", config.oidc.client_secret),
        "Some([redacted])"
    );
}

#[test]
fn golden_messages_for_each_kind_of_mistake() {
    let cases: Vec<(String, &str)> = vec![
        (
            add("server.listen_addr", "x"),
            "server.listen_addr: unknown key; did you mean `listen`?",
        ),
        (
            add("server.request_timeout", "soon"),
            "server.request_timeout: \"soon\" is not a duration; write e.g. \"500ms\", \"30s\", \"10m\" or \"12h\"",
        ),
        (
            add("server.max_body", "ten megs"),
            "server.max_body: \"ten megs\" is not a size; write e.g. \"64KiB\", \"10MiB\" or \"1GiB\"",
        ),
        (
            TomlConfig::parse(&base())
                .set("oidc.client_secret", "${MISSING_SECRET}")
                .text(),
            "oidc.client_secret: environment variable MISSING_SECRET is not set; export it, or write ${MISSING_SECRET:-default}",
        ),
        (
            TomlConfig::parse(&base())
                .set("oidc.issuer", "http://idp.example.com")
                .text(),
            "oidc.issuer: \"http://idp.example.com\" uses plain http; use https, or set allow_http_issuer = true for a loopback issuer in development",
        ),
        (
            add("oidc.provider_timeout", "0s"),
            "oidc.provider_timeout: must be longer than 0s; write e.g. \"25s\"",
        ),
        (
            add("server.workers", 0),
            "server.workers: 0 is out of range; use 1 to 1024, or leave it out for one per CPU",
        ),
        (
            add("server.listen", "nowhere"),
            "server.listen: \"nowhere\" is not an address; write host:port such as \"0.0.0.0:8080\"",
        ),
        (
            TomlConfig::parse(&base())
                .set("session.keys", vec!["c2hvcnQ="])
                .text(),
            "session.keys[0]: is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`",
        ),
        (
            add("session.same_site", "none"),
            "session.same_site: \"none\" is not allowed; use one of \"lax\", \"strict\"",
        ),
        (
            add("session.max_per_user", 0),
            "session.max_per_user: 0 is out of range; use 1 to 10000 (a login beyond it ends the user's oldest session)",
        ),
        (
            add("session.cache_entries", 0),
            "session.cache_entries: 0 is out of range; use 1 to 1000000, or cache_ttl = \"0s\" for no cache",
        ),
        (
            add("session.store", "redis"),
            "session.redis: is required when store = \"redis\": add [session.redis] with url = \"redis://127.0.0.1:6379\"",
        ),
        (
            TomlConfig::parse(&base())
                .add("session.store", "redis")
                .add("session.redis.url", "redis://r:6379")
                .add("session.redis.timeout", "10ms")
                .text(),
            "session.redis.timeout: must be between 50ms and 30s: a request waits this long for Redis before it gets a 503",
        ),
        (
            TomlConfig::parse(&base())
                .add("session.store", "redis")
                .add("session.redis.url", "redis://r:6379")
                .add("session.redis.timeout", "soon")
                .text(),
            "session.redis.timeout: \"soon\" is not a duration; write e.g. \"500ms\", \"30s\", \"10m\" or \"12h\"",
        ),
        (
            format!("{}\n[[routes]]\npath = \"/api/\"\n", base()),
            "routes[0]: needs upstream = \"http://…\" or static_dir = \"./public\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"api\"\nupstream = \"http://a:1\"\n",
                base()
            ),
            "routes[0].path: \"api\" must start with a single /",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/api/../admin/\"\nupstream = \"http://a:1\"\n",
                base()
            ),
            "routes[0].path: \"/api/../admin/\" is not a canonical path (it has a \".\" or \"..\" segment); requests are matched in canonical form, so write it as they arrive, e.g. \"/api/\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/api//v2/\"\nupstream = \"http://a:1\"\n",
                base()
            ),
            "routes[0].path: \"/api//v2/\" is not a canonical path (it has an empty segment); requests are matched in canonical form, so write it as they arrive, e.g. \"/api/\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/%61pi;v=1/\"\nupstream = \"http://a:1\"\n",
                base()
            ),
            "routes[0].path: \"/%61pi;v=1/\" is not a canonical path (it has '%'); requests are matched in canonical form, so write it as they arrive, e.g. \"/api/\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/api/\"\nupstream = \"http://a:1\"\n[[routes]]\npath = \"/api\"\nupstream = \"http://b:1\"\n",
                base()
            ),
            "routes[1].path: \"/api\" serves the same paths as an earlier route (a route \"/x/\" also owns \"/x\"); keep one of them",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/x/\"\nupstream = \"ftp://a\"\n",
                base()
            ),
            "routes[0].upstream: \"ftp://a\" is not an http(s) URL without credentials or query; write e.g. \"http://127.0.0.1:5001\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/x/\"\nupstream = \"https://api.internal/?api_key=upstream-key-7f3a9c\"\n",
                base()
            ),
            "routes[0].upstream: \"https://api.internal/\" (its credentials and query not shown) is not an http(s) URL without credentials or query; write e.g. \"http://127.0.0.1:5001\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/x/\"\nupstream = \"http://svc:pa55word@api.internal:8080\"\n",
                base()
            ),
            "routes[0].upstream: \"http://api.internal:8080/\" (its credentials and query not shown) is not an http(s) URL without credentials or query; write e.g. \"http://127.0.0.1:5001\"",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/x/\"\nupstream = \"http://a:1\"\nfeature = \"new-dashbord\"\n[features.new-dashboard]\npublic = true\n",
                base()
            ),
            "routes[0].feature: \"new-dashbord\" is not defined; did you mean \"new-dashboard\"?",
        ),
        (
            format!(
                "{}\n[[routes]]\npath = \"/x/\"\nupstream = \"http://a:1\"\ntoken = \"user\"\nauth = \"none\"\n",
                base()
            ),
            "routes[0].auth: must be \"required\" when token = \"user\" (use token = \"user_or_client\" for optional sign-in)",
        ),
        (
            add("oidc.client_auth", "private_key_jwt"),
            "oidc.client_auth: \"private_key_jwt\" needs client_key_file (a PEM private key, EC P-256 or RSA) or client_assertion_file (a client assertion the platform keeps fresh)",
        ),
        (
            "[server\nlisten = 1".to_string(),
            "not valid TOML: line 1, column 8: unclosed table, expected `]`",
        ),
        (
            add("server.listen", 8080),
            "server.listen: invalid type: integer `8080`, expected a string; check the types against docs/configuration.md",
        ),
        (
            add("oidc.scopes", vec!["profile"]),
            "oidc.scopes: must include \"openid\"",
        ),
    ];
    for (text, expected) in cases {
        let found = errors(&text);
        assert!(
            found.iter().any(|e| e == expected),
            "expected {expected:?}\n   found {found:#?}"
        );
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = TomlConfig::parse(&base())
        .add("server.listne", "x")
        .add("server.request_timeout", "soon")
        .add("session.same_site", "none")
        .text();
    let found = errors(&text);
    assert_eq!(found.len(), 3, "{found:#?}");
}

#[test]
fn secrets_never_appear_in_errors() {
    let text = TomlConfig::parse(&base())
        .add("session.same_site", "none")
        .set("session.keys", vec!["bm90LWEtcmVhbC1rZXktYnV0LXNlY3JldA=="])
        .text();
    let found = errors(&text).join("\n");
    assert!(!found.contains("s3cr3t-value"));
    assert!(!found.contains("bm90LWEtcmVhbC1rZXktYnV0LXNlY3JldA"));
    let redis = TomlConfig::parse(&base())
        .add("session.store", "redis")
        .add("session.redis.url", "http://user:hunter2@redis:6379")
        .text();
    let found = errors(&redis).join("\n");
    assert!(
        found.contains("session.redis.url") && !found.contains("hunter2"),
        "{found}"
    );
}

#[test]
fn dpop_and_par_mistakes_are_named_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let rsa_like = dir.path().join("wrong.pem");
    std::fs::write(
        &rsa_like,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBrXY6Pdm0uKmbbWJFSJuGRdTYA4J2/Fe1Fn3j7bXjkb\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let text = TomlConfig::parse(&base())
        .add("oidc.par", "sometimes")
        .add("oidc.dpop_key_file", "/nowhere.pem")
        .text()
        + r#"
[[routes]]
path = "/api/"
upstream = "http://api"
token = "user"
token_binding = "dpop"
[[routes]]
path = "/b/"
upstream = "http://api"
token_binding = "mtls"
[[routes]]
path = "/c/"
upstream = "http://api"
token_binding = "dpop"
"#;
    assert_eq!(
        errors(&text),
        [
            "oidc.dpop_key_file: is only used with dpop = true; set oidc.dpop = true or remove the key file",
            "oidc.par: \"sometimes\" is not allowed; use one of \"auto\", \"always\", \"never\"",
            "routes[0].token_binding: \"dpop\" needs DPoP-bound tokens: set oidc.dpop = true",
            "routes[2].token_binding: \"dpop\" needs DPoP-bound tokens: set oidc.dpop = true",
            "routes[1].token_binding: \"mtls\" is not allowed; use one of \"none\", \"dpop\"",
            "routes[2].token_binding: binds the access token sent upstream: set token = \"user\", \"client\" or \"user_or_client\"",
        ]
    );
    // Nothing at the path: the value is not shown (it may be the key itself).
    let text = TomlConfig::parse(&base())
        .add("oidc.dpop", true)
        .add("oidc.dpop_key_file", "/nowhere.pem")
        .text();
    assert_eq!(
        errors(&text),
        [
            "oidc.dpop_key_file: names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it"
        ]
    );
    for (file, why) in [
        (
            not_a_key.display().to_string(),
            "holds no PEM private key; write an EC P-256 key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)".to_string(),
        ),
        (
            rsa_like.display().to_string(),
            "is not an EC P-256 private key (DPoP proofs are signed with ES256)".into(),
        ),
    ] {
        let text = TomlConfig::parse(&base())
            .add("oidc.dpop", true)
            .add("oidc.dpop_key_file", file.as_str())
            .text();
        assert_eq!(
            errors(&text),
            [format!("oidc.dpop_key_file: {file}: {why}")]
        );
    }
    // A good key file passes, and so does a generated key.
    let good = dir.path().join("dpop.pem");
    let key = vestibule::oidc::dpop::DpopKey::generate().unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.to_pkcs8().unwrap());
    std::fs::write(
        &good,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    for extra in [Some(good.display().to_string()), None] {
        let mut config = TomlConfig::parse(&base()).add("oidc.dpop", true);
        if let Some(file) = &extra {
            config = config.add("oidc.dpop_key_file", file.as_str());
        }
        let parsed = Config::parse(&config.text(), Path::new("."), &env).unwrap();
        assert!(parsed.oidc.dpop);
    }
}

/// A secret file that is no regular file is refused at once, named: a FIFO would block the load
/// (and a reload, and with it the signal handling) until someone writes to it, and a device
/// such as `/dev/zero` has no length to check and no end to read.
#[test]
fn a_secret_file_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("keys.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("keys.zero")).unwrap();
    for name in ["keys.fifo", "keys.zero"] {
        let text = TomlConfig::parse(&base())
            .remove("session.keys")
            .add("session.keys_file", name)
            .text();
        let base_dir = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = Config::parse(&text, &base_dir, &env).map(|_| ());
            let _ =
                tx.send(outcome.map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>()));
        });
        let outcome = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{name}: the load did not return"));
        let found = outcome.expect_err("accepted").join("\n");
        assert!(
            found.contains(&format!("cannot read \"{name}\": it is not a regular file")),
            "{name}: {found}"
        );
    }
}

/// A `static_dir` that holds the configuration file or a secret file would serve it (the
/// client secret, the session keys): refused at load, named.
#[test]
fn a_static_dir_holding_the_configuration_or_a_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("session-keys"), format!("{KEY}\n")).unwrap();
    let text = TomlConfig::parse(&base())
        .set("oidc.client_secret", "literal-secret")
        .remove("session.keys")
        .add("session.keys_file", "session-keys")
        .text();
    for (static_dir, holds) in [(".", "config.toml"), ("..", "config.toml")] {
        let config = format!("{text}\n[[routes]]\npath = \"/\"\nstatic_dir = \"{static_dir}\"\n");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, &config).unwrap();
        let found = match Config::load(&file) {
            Ok(_) => panic!("{static_dir}: accepted"),
            Err(e) => {
                e.0.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        };
        assert!(
            found.contains("routes[0].static_dir") && found.contains(holds),
            "{static_dir}: {found}"
        );
    }
    // A directory beside them is fine.
    std::fs::create_dir_all(dir.path().join("public")).unwrap();
    let config = format!("{text}\n[[routes]]\npath = \"/\"\nstatic_dir = \"public\"\n");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &config).unwrap();
    assert!(Config::load(&file).is_ok());
}

/// Every private key and credential file the configuration names is kept out of a `static_dir`,
/// not only the configuration, the client secret and the session keys: a key there would be
/// served to anyone (client assertions forged, DPoP binding defeated, the server's TLS
/// identity taken).
#[test]
fn a_static_dir_holding_a_key_or_credential_file_the_configuration_names_is_refused() {
    let ca = crate::support::pki::TestCa::new("exposed");
    let site = ca.dir.path().to_path_buf();
    let server = ca.server();
    let client = ca.client("bff");
    let ec = include_str!("../fixtures/ec-p256.pem");
    for name in ["client-key.pem", "next-key.pem", "dpop-key.pem"] {
        std::fs::write(site.join(name), ec).unwrap();
    }
    std::fs::write(
        site.join("assertion.jwt"),
        "eyJhbGciOiJFUzI1NiJ9.e30.c2ln\n",
    )
    .unwrap();
    let path = |file: &Path| file.to_str().unwrap().to_string();
    let name_of = |file: &Path| file.file_name().unwrap().to_str().unwrap().to_string();
    let at = |name: &str| path(&site.join(name));
    let route = format!(
        "[[routes]]\npath = \"/\"\nstatic_dir = \"{}\"\n",
        site.display()
    );
    let base =
        || TomlConfig::parse(&format!("{}\n{route}", base())).set("oidc.client_secret", "literal");
    let private_key_jwt = || {
        base()
            .remove("oidc.client_secret")
            .add("oidc.client_auth", "private_key_jwt")
    };
    let cases = [
        (
            "server.tls.key",
            base()
                .add("server.tls.cert", path(&server.cert_file))
                .add("server.tls.key", path(&server.key_file)),
            name_of(&server.key_file),
        ),
        (
            "oidc.client_key_file",
            private_key_jwt().add("oidc.client_key_file", at("client-key.pem")),
            "client-key.pem".to_string(),
        ),
        (
            "oidc.client_published_key_files",
            private_key_jwt()
                .add("oidc.client_key_file", path(&server.key_file))
                .add("oidc.client_published_key_files", vec![at("next-key.pem")]),
            "next-key.pem".to_string(),
        ),
        (
            "oidc.client_assertion_file",
            private_key_jwt().add("oidc.client_assertion_file", at("assertion.jwt")),
            "assertion.jwt".to_string(),
        ),
        (
            "oidc.dpop_key_file",
            base()
                .add("oidc.dpop", true)
                .add("oidc.dpop_key_file", at("dpop-key.pem")),
            "dpop-key.pem".to_string(),
        ),
        (
            "oidc.tls_client_key",
            base()
                .remove("oidc.client_secret")
                .add("oidc.client_auth", "tls_client_auth")
                .add("oidc.tls_client_cert", path(&client.cert_file))
                .add("oidc.tls_client_key", path(&client.key_file)),
            name_of(&client.key_file),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    // `text` as the configuration file is refused for the static_dir holding `exposed`.
    let refused = |key: &str, text: String, exposed: &str| {
        std::fs::write(&file, text).unwrap();
        let found = match Config::load(&file) {
            Ok(_) => panic!("{key}: a static_dir holding {exposed} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            found.contains("routes[0].static_dir") && found.contains(exposed),
            "{key}: {found}"
        );
    };
    for (key, config, exposed) in cases {
        refused(key, config.text(), &exposed);
    }
    // A route's own client key, under a route of its own.
    let text = format!(
        "{}\n[[routes]]\npath = \"/api/\"\nupstream = \"https://api.example.com\"\ntls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
        base().text(),
        path(&client.cert_file),
        path(&client.key_file)
    );
    refused("routes[1].tls_client_key", text, &name_of(&client.key_file));
}

/// Values that parse but would do harm, refused at load with the bound: a metadata refresh of
/// "0s" fetched the provider's discovery document and keys back to back, forever, from every
/// instance (hundreds of key set fetches a second); a clock skew of years accepted expired
/// tokens; a session timeout of "300000000000y" overflows the arithmetic of expiries.
#[test]
fn values_that_would_do_harm_are_refused_with_their_bounds() {
    let cases = [
        (
            add("oidc.metadata_refresh", "0s"),
            "oidc.metadata_refresh: \"0s\" is shorter than 1m: every instance would fetch the provider's discovery document and keys that often; write e.g. \"1h\"",
        ),
        (
            add("oidc.clock_skew", "3650d"),
            "oidc.clock_skew: \"3650d\" is longer than 5m: an expired ID token, logout token or access token would be accepted that long after it expired; write e.g. \"60s\"",
        ),
        (
            add("session.absolute_timeout", "300000000000y"),
            "session.absolute_timeout: \"300000000000y\" is longer than a year (\"1y\")",
        ),
        (
            add("server.request_timeout", "400d"),
            "server.request_timeout: \"400d\" is longer than a year (\"1y\")",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(errors(&text), [expected]);
    }
}

/// [`base`] with `routes` (TOML `[[routes]]` blocks) appended.
fn with_routes(routes: &str) -> String {
    format!("{}{routes}", base())
}

/// A route to an upstream that trusts `identity_headers` (or an assertion header): Vestibule
/// removes the browser's copies on that route only. Another route reaching the same upstream
/// paths through `strip_prefix`, with the same policy but without those headers, passes a
/// browser's `X-User: admin` to them: the upstream takes it as Vestibule's word.
#[test]
fn a_stripped_route_passing_the_browsers_identity_headers_to_another_routes_upstream_paths_is_refused()
 {
    const UP: &str = "upstream = \"http://api.internal:8080\"";
    let who = format!(
        "[[routes]]\npath = \"/who/\"\n{UP}\nauth = \"optional\"\n\
         identity_headers = {{ \"X-User\" = \"sub\" }}\n"
    );
    let api = format!(
        "[[routes]]\npath = \"/api/\"\n{UP}\nstrip_prefix = true\nauth = \"optional\"\ncsrf = true\n"
    );
    assert_eq!(
        errors(&with_routes(&format!("{api}{who}"))),
        [
            "routes[0].strip_prefix: forwards \"/api/who/…\" to the upstream as \"/who/…\", which routes[1] (\"/who/\") guards with identity_headers it does not have; give \"/api/who/\" a route of its own with routes[1]'s policy, or send them to different upstreams"
        ]
    );
    // An assertion in a header of its own alike.
    let signed = format!(
        "[[routes]]\npath = \"/who/\"\n{UP}\nauth = \"optional\"\nassertion = true\n\
         assertion_header = \"X-Assertion\"\n"
    );
    assert_eq!(
        errors(&with_routes(&format!("{api}{signed}"))),
        [
            "routes[0].strip_prefix: forwards \"/api/who/…\" to the upstream as \"/who/…\", which routes[1] (\"/who/\") guards with assertion it does not have; give \"/api/who/\" a route of its own with routes[1]'s policy, or send them to different upstreams"
        ]
    );
    // The same headers set (so stripped) on the wide route too: accepted.
    let same = format!(
        "[[routes]]\npath = \"/api/\"\n{UP}\nstrip_prefix = true\nauth = \"optional\"\n\
         identity_headers = {{ \"X-User\" = \"sub\" }}\n{who}"
    );
    if let Err(e) = Config::parse(&with_routes(&same), Path::new("."), &env) {
        panic!("refused: {e:?}");
    }
}

/// Two routes to one upstream, one with `strip_prefix` (or a base path): `/api/admin/x` reaches
/// the upstream as `/admin/x`, which the `/admin/` route guards, under `/api/`'s laxer policy.
/// Refused at load (and so by `vestibule check` and a reload), naming both routes; setups whose
/// paths meet the policy that guards them where they arrive pass.
#[test]
fn a_stripped_route_reaching_another_routes_upstream_paths_with_a_laxer_policy_is_refused() {
    const UP: &str = "upstream = \"http://api.internal:8080\"";
    let admin = format!(
        "[[routes]]\npath = \"/admin/\"\n{UP}\ntoken = \"user\"\nrequire = {{ roles = [\"admin\"] }}\n"
    );
    let api =
        format!("[[routes]]\npath = \"/api/\"\n{UP}\nstrip_prefix = true\ntoken = \"user\"\n");
    assert_eq!(
        errors(&with_routes(&format!("{api}{admin}"))),
        [
            "routes[0].strip_prefix: forwards \"/api/admin/…\" to the upstream as \"/admin/…\", which routes[1] (\"/admin/\") guards with require it does not have; give \"/api/admin/\" a route of its own with routes[1]'s policy, or send them to different upstreams"
        ]
    );
    // A base path does the same: `/api/admin/x` arrives as `/v1/admin/x`.
    let v1 = "[[routes]]\npath = \"/api/\"\nupstream = \"http://API.internal:8080/v1/\"\n\
              strip_prefix = true\nauth = \"optional\"\n";
    let v1_admin = "[[routes]]\npath = \"/v1/admin/\"\nupstream = \"http://api.internal:8080\"\n\
                    auth = \"required\"\nfeature = \"ops\"\n[features.ops]\npublic = true\n";
    assert_eq!(
        errors(&with_routes(&format!("{v1}{v1_admin}"))),
        [
            "routes[0].strip_prefix: forwards \"/api/admin/…\" to the upstream as \"/v1/admin/…\", which routes[1] (\"/v1/admin/\") guards with auth, feature it does not have; give \"/api/admin/\" a route of its own with routes[1]'s policy, or send them to different upstreams"
        ]
    );
    // Both stripped to the same place: either path reaches the other's upstream paths.
    let both = format!(
        "[[routes]]\npath = \"/api/\"\n{UP}\nstrip_prefix = true\nauth = \"optional\"\n\
         [[routes]]\npath = \"/ops/\"\n{UP}\nstrip_prefix = true\nauth = \"required\"\n"
    );
    assert_eq!(
        errors(&with_routes(&both)),
        [
            "routes[0].strip_prefix: forwards \"/api/…\" to the upstream as \"/…\", which routes[1] (\"/ops/\") guards with auth it does not have; give \"/api/\" a route of its own with routes[1]'s policy, or send them to different upstreams"
        ]
    );

    let accepted = |routes: &str| {
        if let Err(e) = Config::parse(&with_routes(routes), Path::new("."), &env) {
            panic!("refused: {e:?}\n{routes}");
        }
    };
    // The way out the message names: `/api/admin/` gets `/admin/`'s policy.
    accepted(&format!(
        "{api}{admin}[[routes]]\npath = \"/api/admin/\"\nupstream = \"http://api.internal:8080/admin\"\n\
         strip_prefix = true\ntoken = \"user\"\nrequire = {{ roles = [\"admin\"] }}\n"
    ));
    // Nested prefixes without stripping: the longest prefix decides, as written.
    accepted(&format!(
        "[[routes]]\npath = \"/api/\"\n{UP}\ntoken = \"user\"\n\
         [[routes]]\npath = \"/api/public/\"\n{UP}\n\
         [[routes]]\npath = \"/api/admin/\"\n{UP}\ntoken = \"user\"\nrequire = {{ roles = [\"admin\"] }}\n"
    ));
    // A stricter route reaching a laxer one's paths (`/api/health` as `/health`) takes nothing.
    accepted(&format!("{api}[[routes]]\npath = \"/health\"\n{UP}\n"));
    // Another upstream (another port) is another path space.
    accepted(&format!(
        "{api}[[routes]]\npath = \"/admin/\"\nupstream = \"http://api.internal:8081\"\n\
         token = \"user\"\nrequire = {{ roles = [\"admin\"] }}\n"
    ));
}

/// A route whose upstream is the public listener itself (`/api/` to `http://127.0.0.1:8080`
/// on a proxy listening there): each of its requests comes back in as a request from Vestibule
/// (its own address, maybe a trusted proxy's), without the browser's session cookie, and goes
/// round again or to another route. Refused at load (and so by `vestibule check`) and by a
/// reload over the running `server.listen`, with the admin listener's spellings of the host.
#[test]
fn a_route_whose_upstream_is_the_public_listener_is_refused() {
    let route =
        |upstream: &str| format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n");
    let listening = |routes: &str, listen: &str| {
        TomlConfig::parse(&with_routes(routes))
            .add("server.listen", listen)
            .text()
    };
    let message = |upstream: &str, listen: &str| {
        format!(
            "routes[0].upstream: \"{upstream}\" reaches the public listener itself (server.listen = \
             {listen}): the route's requests would come back to Vestibule, without the browser's \
             session, round and round or to another route; point the route at its service"
        )
    };
    for (listen, upstream, shown) in [
        (
            "127.0.0.1:8080",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
        ),
        (
            "127.0.0.1:8080",
            "http://localhost:8080/x",
            "http://localhost:8080/x",
        ),
        ("127.0.0.1:443", "https://localhost", "https://localhost/"),
        (
            "127.0.0.1:8080",
            "http://[::ffff:127.0.0.1]:8080",
            "http://[::ffff:7f00:1]:8080/",
        ),
        (
            "0.0.0.0:8080",
            "http://127.0.0.2:8080/api/",
            "http://127.0.0.2:8080/api/",
        ),
        ("[::]:8080", "http://[::1]:8080", "http://[::1]:8080/"),
        (
            "10.1.2.3:8080",
            "http://10.1.2.3:8080",
            "http://10.1.2.3:8080/",
        ),
    ] {
        assert_eq!(
            errors(&listening(&route(upstream), listen)),
            [message(shown, listen)],
            "{upstream}"
        );
    }
    let accepted = |text: &str| {
        if let Err(e) = Config::parse(text, Path::new("."), &env) {
            panic!("refused: {e:?}\n{text}");
        }
    };
    // Another port or address; a port of 0 is known only once bound.
    accepted(&listening(
        &route("http://127.0.0.1:8081"),
        "127.0.0.1:8080",
    ));
    accepted(&listening(&route("http://10.1.2.4:8080"), "10.1.2.3:8080"));
    accepted(&listening(&route("http://127.0.0.1:8080"), "127.0.0.1:0"));

    // A reload keeps the running server.listen: the new file's route is checked against it.
    let running = Config::parse(
        &listening(&route("http://127.0.0.1:5001"), "127.0.0.1:7000"),
        Path::new("."),
        &env,
    )
    .unwrap();
    let new = Config::parse(
        &listening(&route("http://localhost:7000"), "127.0.0.1:7001"),
        Path::new("."),
        &env,
    )
    .unwrap();
    match vestibule::config::reload::reload(&running, new, Path::new("config.toml")) {
        Ok(_) => panic!("a route to the running public listener was put in effect"),
        Err(e) => assert_eq!(
            e.to_string(),
            format!(
                "{} (with the running value of server.listen, which changes only at a restart: \
                 restart to apply this file)",
                message("http://localhost:7000/", "127.0.0.1:7000")
            )
        ),
    }
}

/// A route whose upstream is the admin listener itself (`/api/` to `http://127.0.0.1:9091`)
/// would serve `/metrics` and `/jwks` to browsers through the public listener: refused at load
/// (and so by `vestibule check`), and by a reload over a running `admin.listen`, naming the
/// route and the admin key. Every spelling of the host that reaches the listener counts.
#[test]
fn a_route_whose_upstream_is_the_admin_listener_is_refused() {
    let route =
        |upstream: &str| format!("[[routes]]\npath = \"/api/\"\nupstream = \"{upstream}\"\n");
    let admin = |listen: &str| format!("[admin]\nlisten = \"{listen}\"\n");
    let message = |upstream: &str, listen: &str| {
        format!(
            "routes[0].upstream: \"{upstream}\" reaches the admin listener (admin.listen = {listen}), \
             whose /metrics and /jwks this route would serve to browsers; point the route at its \
             service, or move admin.listen to another port"
        )
    };
    for (upstream, shown) in [
        ("http://127.0.0.1:9091", "http://127.0.0.1:9091/"),
        ("http://localhost:9091/", "http://localhost:9091/"),
        ("https://LocalHost.:9091/x", "https://localhost.:9091/x"),
        ("http://app.localhost:9091", "http://app.localhost:9091/"),
        (
            "http://[::ffff:127.0.0.1]:9091",
            "http://[::ffff:7f00:1]:9091/",
        ),
        ("http://0.0.0.0:9091", "http://0.0.0.0:9091/"),
    ] {
        assert_eq!(
            errors(&with_routes(&route(upstream))),
            [message(shown, "127.0.0.1:9091")],
            "{upstream}"
        );
    }
    // Listening everywhere, every loopback address reaches it (`::`: of both families).
    for (listen, upstream, shown) in [
        (
            "0.0.0.0:9091",
            "http://127.0.0.2:9091",
            "http://127.0.0.2:9091/",
        ),
        (
            "0.0.0.0:9091",
            "http://localhost:9091",
            "http://localhost:9091/",
        ),
        ("[::]:9091", "http://[::1]:9091", "http://[::1]:9091/"),
        (
            "[::]:9091",
            "http://127.0.0.5:9091",
            "http://127.0.0.5:9091/",
        ),
        ("[::]:9091", "http://[::]:9091", "http://[::]:9091/"),
        (
            "[::1]:9091",
            "http://localhost:9091",
            "http://localhost:9091/",
        ),
    ] {
        let text = with_routes(&format!("{}{}", route(upstream), admin(listen)));
        assert_eq!(errors(&text), [message(shown, listen)], "{upstream}");
    }
    let accepted = |text: &str| {
        if let Err(e) = Config::parse(text, Path::new("."), &env) {
            panic!("refused: {e:?}\n{text}");
        }
    };
    // Another port, another host, another loopback address than the one listened on, or one of
    // another family.
    accepted(&with_routes(&route("http://127.0.0.1:9092")));
    accepted(&with_routes(&route("http://api.internal:9091")));
    accepted(&with_routes(&route("http://127.0.0.2:9091")));
    accepted(&with_routes(&route("http://[::1]:9091")));
    accepted(&with_routes(&route("http://[::]:9091")));
    accepted(&with_routes(&format!(
        "{}{}",
        route("http://[::1]:9091"),
        admin("0.0.0.0:9091")
    )));
    accepted(&with_routes(&format!(
        "{}{}",
        route("http://10.1.2.4:9091"),
        admin("10.1.2.3:9091")
    )));

    // A reload keeps the running admin.listen: the new file's route is checked against it.
    let running = Config::parse(
        &with_routes(&format!(
            "{}{}",
            route("http://127.0.0.1:5001"),
            admin("127.0.0.1:7000")
        )),
        Path::new("."),
        &env,
    )
    .unwrap();
    let new = Config::parse(
        &with_routes(&format!(
            "{}{}",
            route("http://localhost:7000"),
            admin("127.0.0.1:7001")
        )),
        Path::new("."),
        &env,
    )
    .unwrap();
    match vestibule::config::reload::reload(&running, new, Path::new("config.toml")) {
        Ok(_) => panic!("a route to the running admin listener was put in effect"),
        Err(e) => assert_eq!(
            e.to_string(),
            format!(
                "{} (with the running value of admin.listen, which changes only at a restart: \
                 restart to apply this file)",
                message("http://localhost:7000/", "127.0.0.1:7000")
            )
        ),
    }
}
