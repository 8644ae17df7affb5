//! What a reload may change. Every key is decided here, once: it takes effect on reload, or it is
//! restart-only. A reload keeps the running value of every restart-only key (and logs each one
//! that changed), so the configuration in effect is always one consistent snapshot: code that
//! keeps a copy made at start (the OpenID client, the session manager, the listeners) and code
//! that reads the live configuration see the same values.
//!
//! [`reload`] takes the new configuration apart with exhaustive patterns: a new field does not
//! compile until it is decided, and the unit test below fails until its TOML key is.
//!
//! Keys that only make sense together are decided together: the client's credential (its secret,
//! key and assertion files) follows `oidc.client_auth`, so a file that changes the method keeps
//! the running credential whole until a restart (its secret file too: the watcher keeps
//! following it, and the app reads it again). And since the result mixes two files, the rules
//! between sections are checked again on it ([`Config::check_effective`]): a reload never puts
//! in effect what start-up would refuse.

use super::*;

/// When a key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// The next request after a reload uses the new value.
    OnReload,
    /// Read at start only; a reload keeps the running value and logs that a restart is needed.
    AfterRestart,
}

/// The configuration a reload puts in effect.
#[derive(Debug)]
pub struct Reloaded {
    /// The new file's live keys and the running restart-only ones.
    pub config: Config,
    /// Restart-only keys whose value in the new file differs from the running one.
    pub restart_needed: Vec<&'static str>,
    /// Every key (a TOML path; a table stands for all its keys) and when it takes effect.
    pub decisions: Vec<(&'static str, Applies)>,
}

#[derive(Default)]
struct Decide {
    restart_needed: Vec<&'static str>,
    decisions: Vec<(&'static str, Applies)>,
}

impl Decide {
    fn live<T>(&mut self, key: &'static str, new: T) -> T {
        self.decisions.push((key, Applies::OnReload));
        new
    }

    fn restart<T: Clone + PartialEq>(&mut self, key: &'static str, old: &T, new: T) -> T {
        self.restart_if(key, *old != new);
        old.clone()
    }

    fn restart_if(&mut self, key: &'static str, changed: bool) {
        self.decisions.push((key, Applies::AfterRestart));
        if changed {
            self.restart_needed.push(key);
        }
    }
}

/// Takes `$new` (a `$ty`) apart with an exhaustive pattern and builds it again, one rule a field
/// and in the order written (the order of the decisions): `live "key"` takes the new value,
/// `restart "key"` keeps the running value of `$old` and notes a change, `kept` keeps the running
/// value of a field decided elsewhere, and a block computes the field (it may use every field of
/// `$new` by name). A field added to `$ty` does not compile until it has a rule here.
macro_rules! decide {
    ($d:expr, $old:expr, $new:expr => $ty:ident {
        $($field:ident: $($rule:ident)? $($key:literal)? $($value:block)?),* $(,)?
    }) => {{
        let $ty { $($field),* } = $new;
        $ty { $($field: decide!(@rule $d, $old, $field, $($rule)? $($key)? $($value)?)),* }
    }};
    (@rule $d:expr, $old:expr, $field:ident, live $key:literal) => {
        $d.live($key, $field)
    };
    (@rule $d:expr, $old:expr, $field:ident, restart $key:literal) => {
        $d.restart($key, &$old.$field, $field)
    };
    (@rule $d:expr, $old:expr, $field:ident, kept) => {{
        let _ = $field;
        $old.$field.clone()
    }};
    (@rule $d:expr, $old:expr, $field:ident, $value:block) => {
        $value
    };
}

/// Every key and when it takes effect (the same for every configuration).
pub fn decisions(config: &Config) -> Vec<(&'static str, Applies)> {
    merge(config, config.clone()).decisions
}

/// The configuration in effect after `new`, read from the file at `path`, is loaded over the
/// running `old`; refused if the two together break a rule between sections that each file
/// keeps on its own (a `token_binding = "dpop"` route of the new file on a running client
/// without DPoP, a route inside the running `bff_prefix`, a `static_dir` holding a running key).
pub fn reload(old: &Config, new: Config, path: &Path) -> Result<Reloaded, ConfigErrors> {
    let reloaded = merge(old, new);
    let Err(ConfigErrors(problems)) = reloaded.config.check_effective(path) else {
        return Ok(reloaded);
    };
    let running = reloaded.restart_needed.join(", ");
    let problems = problems
        .into_iter()
        .map(|problem| ConfigError {
            message: format!(
                "{} (with the running value of {running}, which changes only at a restart: restart to apply this file)",
                problem.message
            ),
            ..problem
        })
        .collect();
    Err(ConfigErrors(problems))
}

fn merge(old: &Config, new: Config) -> Reloaded {
    let new = keep_credential(old, new);
    let mut d = Decide::default();
    let config = decide!(d, old, new => Config {
        server: { server_section(&mut d, &old.server, server) },
        admin: {
            decide!(d, old.admin, admin => AdminConfig {
                listen: restart "admin.listen",
                max_connections: restart "admin.max_connections",
            })
        },
        // The subscriber is installed once, at start.
        log: {
            decide!(d, old.log, log => LogConfig {
                level: restart "log.level",
                format: restart "log.format",
            })
        },
        oidc: { oidc_section(&mut d, &old.oidc, oidc) },
        session: { session_section(&mut d, &old.session, session) },
        limits: {
            decide!(d, old.limits, limits => LimitsConfig {
                login_per_minute: live "limits.login_per_minute",
                callback_per_minute: live "limits.callback_per_minute",
                backchannel_logout_per_minute: live "limits.backchannel_logout_per_minute",
                // Sizes the rate limiter, built at start.
                tracked_addresses: restart "limits.tracked_addresses",
            })
        },
        telemetry: {
            decide!(d, old.telemetry, telemetry => TelemetryConfig {
                // The exporter is started with the application.
                otlp_endpoint: restart "telemetry.otlp_endpoint",
                sample_ratio: live "telemetry.sample_ratio",
                log_user: live "telemetry.log_user",
            })
        },
        // Compiled into each runtime: every key of every route and feature is live.
        routes: live "routes",
        features: live "features",
        // The default outbound clients (provider, upstreams, Redis) are built at start.
        tls: {
            decide!(d, old.tls, tls => OutboundTls {
                ca_file: restart "tls.ca_file",
                system_roots: restart "tls.system_roots",
            })
        },
        // Read from the environment at start; a process's environment does not change.
        egress: kept,
        // What the new file and its secret files held: the watcher compares the files with it.
        sources: { sources },
    });
    Reloaded {
        config,
        restart_needed: d.restart_needed,
        decisions: d.decisions,
    }
}

fn server_section(d: &mut Decide, old: &ServerConfig, new: ServerConfig) -> ServerConfig {
    // The redirect URI registered at the provider is built from these two at start.
    d.restart_if(
        "server.public_url",
        (&old.public_url, &old.public_origin) != (&new.public_url, &new.public_origin),
    );
    decide!(d, old, new => ServerConfig {
        listen: restart "server.listen",
        public_url: kept,
        public_origin: kept,
        bff_prefix: restart "server.bff_prefix",
        trusted_proxies: live "server.trusted_proxies",
        request_timeout: live "server.request_timeout",
        max_body: live "server.max_body",
        tls: restart "server.tls",
        cors_origins: live "server.cors_origins",
        shutdown_grace: restart "server.shutdown_grace",
        // The HTTP parsers of the listener are set up at start.
        header_read_timeout: restart "server.header_read_timeout",
        max_header_size: restart "server.max_header_size",
        workers: restart "server.workers",
        connections: {
            decide!(d, old.connections, connections => ConnectionLimits {
                max_connections: restart "server.max_connections",
                // Its default follows `max_connections`, and the accept loop reads it at start.
                max_connections_per_client: restart "server.max_connections_per_client",
                idle_timeout: restart "server.connection_idle_timeout",
                // Read per request.
                body_read_timeout: live "server.body_read_timeout",
                body_min_rate: live "server.body_min_rate",
                // Each connection is given it when it opens.
                send_timeout: restart "server.send_timeout",
                http2_max_concurrent_streams: restart "server.http2_max_concurrent_streams",
                http2_keep_alive_interval: restart "server.http2_keep_alive_interval",
                http2_keep_alive_timeout: restart "server.http2_keep_alive_timeout",
            })
        },
    })
}

/// The credential goes with the method, `oidc.client_auth`, which is restart-only: a file for
/// another method (its secret, or none, and its key files) would leave the running method with
/// the wrong credential or none, such as an empty client secret. The running credential is kept
/// whole until a restart, and so is the client secret file it was read from in the sources: the
/// watcher keeps following it (not the new file's, or none), and the app reads it again on every
/// reload, so it rotates as before.
fn keep_credential(old: &Config, new: Config) -> Config {
    if new.oidc.client_auth == old.oidc.client_auth {
        return new;
    }
    // The watcher follows the running credential's files, not the waiting file's.
    let credential = |oidc: &OidcConfig| -> Vec<PathBuf> {
        (oidc.client_secret_file.iter())
            .chain(&oidc.client_key_file)
            .chain(&oidc.client_published_key_files)
            .cloned()
            .collect()
    };
    let (unused, running) = (credential(&new.oidc), credential(&old.oidc));
    let oidc = OidcConfig {
        client_secret: old.oidc.client_secret.clone(),
        client_secret_file: old.oidc.client_secret_file.clone(),
        client_key_file: old.oidc.client_key_file.clone(),
        client_published_key_files: old.oidc.client_published_key_files.clone(),
        client_assertion_file: old.oidc.client_assertion_file.clone(),
        ..new.oidc
    };
    let mut files: Vec<(PathBuf, Vec<u8>)> = (new.sources.files.iter())
        .filter(|(path, _)| !unused.contains(path) || Some(path) == new.session.keys_file.as_ref())
        .cloned()
        .collect();
    for file in old.sources.files.iter() {
        if running.contains(&file.0) && !files.iter().any(|(path, _)| *path == file.0) {
            files.push(file.clone());
        }
    }
    let sources = std::sync::Arc::new(Sources {
        text: new.sources.text.clone(),
        files,
    });
    Config {
        oidc,
        sources,
        ..new
    }
}

/// The OpenID client keeps the section it was started with; only what is read from the live
/// configuration alone, and the client secret it is handed on reload, is live.
fn oidc_section(d: &mut Decide, old: &OidcConfig, new: OidcConfig) -> OidcConfig {
    // The provider client is built at start; the key follows its certificate.
    d.restart_if("oidc.tls_client_key", false);
    decide!(d, old, new => OidcConfig {
        ca_file: restart "oidc.ca_file",
        tls_client: restart "oidc.tls_client_cert",
        issuer: restart "oidc.issuer",
        client_id: restart "oidc.client_id",
        // Swapped into the running client (the app does it): the next token call uses it. With
        // a change of `client_auth`, these five keep their running values (above).
        client_secret: live "oidc.client_secret",
        client_secret_file: live "oidc.client_secret_file",
        client_auth: restart "oidc.client_auth",
        // The key files and the assertion file are read again on every reload (the app swaps the
        // client's credential): rotation needs no restart.
        client_key_file: live "oidc.client_key_file",
        client_published_key_files: live "oidc.client_published_key_files",
        client_assertion_file: live "oidc.client_assertion_file",
        scopes: restart "oidc.scopes",
        extra_auth_params: restart "oidc.extra_auth_params",
        roles_claim: live "oidc.roles_claim",
        refresh_skew: restart "oidc.refresh_skew",
        post_logout_redirect: restart "oidc.post_logout_redirect",
        allow_http_issuer: restart "oidc.allow_http_issuer",
        metadata_refresh: restart "oidc.metadata_refresh",
        clock_skew: restart "oidc.clock_skew",
        provider_timeout: restart "oidc.provider_timeout",
        // Read by the OpenID client (login and refresh), which keeps its start-up section.
        userinfo: restart "oidc.userinfo",
        // The OpenID client and its DPoP key are built at start.
        dpop: restart "oidc.dpop",
        dpop_key_file: restart "oidc.dpop_key_file",
        // Read at each login.
        par: live "oidc.par",
    })
}

/// The session manager and the store are built at start; the key ring is handed over on reload.
fn session_section(d: &mut Decide, old: &SessionConfig, new: SessionConfig) -> SessionConfig {
    let redis = |s: &StoreConfig| match s {
        StoreConfig::Memory => None,
        StoreConfig::Redis(r) => Some(r.clone()),
    };
    d.restart_if(
        "session.store",
        redis(&old.store).is_some() != redis(&new.store).is_some(),
    );
    d.restart_if("session.redis", redis(&old.store) != redis(&new.store));
    decide!(d, old, new => SessionConfig {
        store: kept,
        cookie_name: restart "session.cookie_name",
        cookie_secure: restart "session.cookie_secure",
        same_site: live "session.same_site",
        idle_timeout: restart "session.idle_timeout",
        absolute_timeout: restart "session.absolute_timeout",
        // A new key ring is swapped in (the app does it): cookies sealed under a key it still
        // holds keep opening.
        keys: live "session.keys",
        keys_file: live "session.keys_file",
        max_entries: restart "session.max_entries",
        // Copied into the session manager at start.
        max_per_user: restart "session.max_per_user",
        cache_ttl: restart "session.cache_ttl",
        cache_entries: restart "session.cache_entries",
    })
}

#[cfg(test)]
mod tests {
    use super::super::keys::Schema;
    use super::*;
    use std::collections::BTreeSet;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn config(extra_server: &str) -> Config {
        let text = format!(
            "[server]\npublic_url = \"https://app.example.com\"\n{extra_server}\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\nclient_secret = \"s\"\n\
             [session]\nkeys = [\"{KEY}\"]\n"
        );
        match Config::parse(&text, Path::new("."), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// What [`reload`] puts in effect; panics if it refuses.
    fn applied(old: &Config, new: Config) -> Reloaded {
        match reload(old, new, Path::new("config.toml")) {
            Ok(reloaded) => reloaded,
            Err(e) => panic!("{e}"),
        }
    }

    /// Whether the decision `decided` covers the schema path `leaf`.
    fn covers(decided: &str, leaf: &str) -> bool {
        leaf == decided
            || [".", "[].", ".*."]
                .iter()
                .any(|sep| leaf.starts_with(&format!("{decided}{sep}")))
    }

    #[test]
    fn every_key_takes_effect_on_reload_or_is_restart_only() {
        let decided = decisions(&config(""));
        let leaves = Schema::of_file().leaves();
        let mut seen = BTreeSet::new();
        for (key, _) in &decided {
            assert!(seen.insert(*key), "{key} is decided twice");
            assert!(
                leaves.iter().any(|leaf| covers(key, leaf)),
                "{key} is decided but no such key exists"
            );
        }
        for leaf in &leaves {
            let n = decided.iter().filter(|(key, _)| covers(key, leaf)).count();
            assert_eq!(
                n, 1,
                "{leaf}: add it to config/reload.rs as live or restart-only"
            );
        }
    }

    #[test]
    fn a_reload_applies_live_keys_and_keeps_restart_only_ones() {
        let old = config("");
        let new = config(
            "listen = \"0.0.0.0:9999\"\nrequest_timeout = \"5s\"\nbody_min_rate = \"1KiB\"\nmax_connections = 5",
        );
        let reloaded = applied(&old, new);
        // `max_connections_per_client` is not written, but its default follows
        // `max_connections`: it changes too, and is kept with it until a restart.
        assert_eq!(
            reloaded.restart_needed,
            [
                "server.listen",
                "server.max_connections",
                "server.max_connections_per_client"
            ]
        );
        let c = &reloaded.config;
        assert_eq!(c.server.listen, old.server.listen);
        assert_eq!(c.server.connections.max_connections, 10_000);
        assert_eq!(c.server.connections.max_connections_per_client, 2_500);
        assert_eq!(c.server.request_timeout, Duration::from_secs(5));
        assert_eq!(c.server.connections.body_min_rate, 1024);
        // Nothing changed: nothing to report.
        assert!(applied(&old, old.clone()).restart_needed.is_empty());
    }

    #[test]
    fn secrets_are_applied_and_store_changes_are_noticed() {
        let old = config("");
        let mut new = old.clone();
        new.oidc.client_secret = Some(Secret::new("other"));
        new.session.keys.insert(0, [7; 32]);
        new.session.store = StoreConfig::Redis(RedisConfig {
            url: Secret::new("redis://r:6379"),
            sentinel: None,
            cluster: Vec::new(),
            key_prefix: "p:".into(),
            timeout: Duration::from_secs(2),
            ca_file: None,
        });
        let reloaded = applied(&old, new);
        assert_eq!(reloaded.restart_needed, ["session.store", "session.redis"]);
        assert_eq!(reloaded.config.session.store, StoreConfig::Memory);
        assert_eq!(
            reloaded.config.oidc.client_secret,
            Some(Secret::new("other"))
        );
        assert_eq!(reloaded.config.session.keys.len(), 2);
        assert_eq!(reloaded.config.session.keys[0], [7; 32]);
    }

    /// `oidc.client_auth` is restart-only and the credential is live: a file for the next
    /// restart that switches to `private_key_jwt` (valid on its own: no secret, a key file) was
    /// put in effect as `client_secret_basic` with no secret, and the running client then
    /// authenticated with an empty one. The credential follows the method instead.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_change_of_client_auth_keeps_the_running_credential_whole() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client-key.pem");
        std::fs::write(&key, include_str!("../../tests/fixtures/ec-p256.pem")).unwrap();
        let old = config("");
        let text = format!(
            "[server]\npublic_url = \"https://app.example.com\"\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n\
             client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"\n\
             [session]\nkeys = [\"{KEY}\"]\n",
            key.display()
        );
        let new = Config::parse(&text, Path::new("."), &|_| None).unwrap();
        let reloaded = applied(&old, new);
        assert_eq!(reloaded.restart_needed, ["oidc.client_auth"]);
        assert_eq!(reloaded.config.oidc.client_key_file, None);
        // What the running OpenID client is built from: its method and its secret.
        assert_eq!(reloaded.config.oidc.client_auth, old.oidc.client_auth);
        assert_eq!(
            reloaded
                .config
                .oidc
                .client_secret
                .as_ref()
                .map(Secret::expose),
            Some("s"),
            "the running client secret is kept"
        );

        // And back: the file's secret is not taken while the running client signs assertions.
        let running = Config::parse(&text, Path::new("."), &|_| None).unwrap();
        let reloaded = applied(&running, config(""));
        assert_eq!(reloaded.restart_needed, ["oidc.client_auth"]);
        assert_eq!(reloaded.config.oidc.client_secret, None);
        assert_eq!(reloaded.config.oidc.client_key_file.as_deref(), Some(&*key));

        // The same method: a rotated secret is applied.
        let mut rotated = config("");
        rotated.oidc.client_secret = Some(Secret::new("rotated"));
        let reloaded = applied(&config(""), rotated);
        assert!(reloaded.restart_needed.is_empty());
        assert_eq!(
            reloaded.config.oidc.client_secret,
            Some(Secret::new("rotated"))
        );
    }

    /// While a change of `oidc.client_auth` waits for a restart, the running credential's secret
    /// file stays in the sources the watcher compares (the new file's, here another secret file,
    /// does not), and reading it again takes a rotation; a bad one is refused and changes
    /// nothing.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_running_client_secret_file_is_followed_while_client_auth_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (running, staged) = (dir.path().join("running"), dir.path().join("staged"));
        std::fs::write(&running, "old\n").unwrap();
        std::fs::write(&staged, "staged").unwrap();
        let key = dir.path().join("client-key.pem");
        std::fs::write(&key, include_str!("../../tests/fixtures/ec-p256.pem")).unwrap();
        let file = |oidc: &str| {
            let text = format!(
                "[server]\npublic_url = \"https://app.example.com\"\n\
                 [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\n{oidc}\n\
                 [session]\nkeys = [\"{KEY}\"]\n"
            );
            Config::parse(&text, dir.path(), &|_| None).unwrap()
        };
        let old = file("client_secret_file = \"running\"");
        let new = file("client_auth = \"client_secret_post\"\nclient_secret_file = \"staged\"\n");
        let mut reloaded = applied(&old, new).config;
        let followed: Vec<_> = reloaded.sources.files.iter().map(|(p, _)| p).collect();
        assert_eq!(followed, [&running]);
        assert_eq!(reloaded.oidc.client_secret, Some(Secret::new("old")));
        assert!(
            !reloaded
                .read_secret_again(SecretFile::ClientSecret)
                .unwrap()
        );

        std::fs::write(&running, "rotated\n").unwrap();
        assert!(
            reloaded
                .read_secret_again(SecretFile::ClientSecret)
                .unwrap()
        );
        assert_eq!(reloaded.oidc.client_secret, Some(Secret::new("rotated")));
        assert_eq!(
            reloaded.sources.files,
            [(running.clone(), b"rotated\n".to_vec())]
        );

        std::fs::write(&running, " \n").unwrap();
        let before = reloaded.clone();
        let refused = reloaded.read_secret_again(SecretFile::ClientSecret);
        assert_eq!(
            refused.unwrap_err().to_string(),
            format!(
                "oidc.client_secret_file: {:?} is empty; write the client secret into it",
                running.display().to_string()
            )
        );
        assert_eq!(reloaded.oidc.client_secret, before.oidc.client_secret);
        assert_eq!(reloaded.sources.files, before.sources.files);

        // To a method without a secret file: the running one is still followed.
        let new = file(&format!(
            "client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"",
            key.display()
        ));
        let reloaded = applied(&old, new).config;
        let followed: Vec<_> = reloaded.sources.files.iter().map(|(p, _)| p).collect();
        assert_eq!(followed, [&running]);
    }

    /// A keys file read again at its path: a rotation is taken, a bad file refused with the
    /// line named and the running ring kept.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_keys_file_read_again_takes_a_rotation_and_refuses_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{KEY}\n")).unwrap();
        let text = "[server]\npublic_url = \"https://app.example.com\"\n\
             [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\nclient_secret = \"s\"\n\
             [session]\nkeys_file = \"keys\"\n";
        let mut config = Config::parse(text, dir.path(), &|_| None).unwrap();
        assert!(!config.read_secret_again(SecretFile::SessionKeys).unwrap());
        // Written inline: nothing to read.
        assert!(!config.read_secret_again(SecretFile::ClientSecret).unwrap());

        let other = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY=";
        std::fs::write(&keys, format!("{other}\n{KEY}\n")).unwrap();
        assert!(config.read_secret_again(SecretFile::SessionKeys).unwrap());
        assert_eq!(config.session.keys.len(), 2);
        assert_eq!(config.session.keys[1], *b"0123456789abcdef0123456789abcdef");

        std::fs::write(&keys, format!("{other}\nnot-a-key\n")).unwrap();
        let refused = config.read_secret_again(SecretFile::SessionKeys);
        assert_eq!(
            refused.unwrap_err().to_string(),
            format!(
                "session.keys_file: line 2 of {:?} is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`",
                keys.display().to_string()
            )
        );
        assert_eq!(config.session.keys.len(), 2);
        std::fs::remove_file(&keys).unwrap();
        let refused = config.read_secret_again(SecretFile::SessionKeys);
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .starts_with("session.keys_file: cannot read ")
        );
        assert_eq!(config.session.keys.len(), 2);
    }

    /// `oidc.dpop` and `server.bff_prefix` are restart-only, routes are live: a file turning
    /// DPoP on with a `token_binding = "dpop"` route, or moving `bff_prefix` away from a route's
    /// path, is valid on its own but not over the running values. A DPoP-bound route on a client
    /// without DPoP sent `Authorization: DPoP <token>` with no proof; such a mix is refused.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_reload_that_mixes_into_what_start_up_refuses_is_refused() {
        let old = config("");
        assert!(!old.oidc.dpop);
        let file = |oidc: &str, server: &str, route: &str| {
            let text = format!(
                "[server]\npublic_url = \"https://app.example.com\"\n{server}\n\
                 [oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"spa\"\nclient_secret = \"s\"\n{oidc}\n\
                 [session]\nkeys = [\"{KEY}\"]\n\
                 [[routes]]\nupstream = \"http://127.0.0.1:5001\"\ntoken = \"user\"\n{route}\n"
            );
            Config::parse(&text, Path::new("."), &|_| None).unwrap()
        };
        let refused = |new: Config| match reload(&old, new, Path::new("config.toml")) {
            Ok(reloaded) => panic!("put in effect: {:?}", reloaded.config.routes),
            Err(errors) => errors.to_string(),
        };
        let dpop = file(
            "dpop = true",
            "",
            "path = \"/api/\"\ntoken_binding = \"dpop\"",
        );
        assert_eq!(
            refused(dpop),
            "routes[0].token_binding: \"dpop\" needs DPoP-bound tokens: set oidc.dpop = true \
             (with the running value of oidc.dpop, which changes only at a restart: restart to \
             apply this file)"
        );
        let bff = file("", "bff_prefix = \"/auth\"", "path = \"/bff/x/\"");
        assert_eq!(
            refused(bff),
            "routes[0].path: \"/bff/x/\" is inside bff_prefix \"/bff\", which Vestibule serves \
             itself (with the running value of server.bff_prefix, which changes only at a \
             restart: restart to apply this file)"
        );
        // Over a running client with DPoP, the same route is applied.
        let with_dpop = file("dpop = true", "", "path = \"/other/\"");
        let dpop = file(
            "dpop = true",
            "",
            "path = \"/api/\"\ntoken_binding = \"dpop\"",
        );
        assert!(reload(&with_dpop, dpop, Path::new("config.toml")).is_ok());
    }

    /// docs/configuration.md says for every key whether a reload applies it, and says it right.
    #[test]
    fn the_reference_says_when_each_key_takes_effect() {
        let decided = decisions(&config(""));
        let docs = include_str!("../../docs/configuration.md");
        let mut documented = Vec::new();
        let mut section = String::new();
        for line in docs.lines() {
            if let Some(rest) = line.strip_prefix("## `[") {
                section = rest
                    .trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or_default()
                    .replace(".<name>", "");
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if let [_, key, .., applies, _] = cells[..]
                && key.starts_with('`')
                && (applies == "applied" || applies == "restart")
            {
                documented.push((format!("{section}.{}", key.trim_matches('`')), applies));
            }
        }
        // And the other way round: every row names a key the file may hold.
        let leaves: Vec<String> = (Schema::of_file().leaves().iter())
            .map(|leaf| leaf.replace("[]", "").replace(".*", ""))
            .collect();
        for (path, _) in &documented {
            assert!(
                leaves
                    .iter()
                    .any(|leaf| leaf == path || leaf.starts_with(&format!("{path}."))),
                "docs/configuration.md has a row for {path}, which is no key of the file"
            );
        }
        for leaf in Schema::of_file().leaves() {
            let path = leaf.replace("[]", "").replace(".*", "");
            let Some((_, applies)) = documented
                .iter()
                .find(|(p, _)| *p == path || path.starts_with(&format!("{p}.")))
            else {
                panic!("docs/configuration.md has no row for {path} with applied or restart");
            };
            let Some((_, decision)) = decided.iter().find(|(key, _)| covers(key, &leaf)) else {
                panic!("{leaf} is not decided");
            };
            let expected = match decision {
                Applies::OnReload => "applied",
                Applies::AfterRestart => "restart",
            };
            assert_eq!(*applies, expected, "docs/configuration.md, {path}");
        }
    }
}
