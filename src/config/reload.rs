//! What a reload may change. Every key is decided here, once: it takes effect on reload, or it is
//! restart-only. A reload keeps the running value of every restart-only key (and logs each one
//! that changed), so the configuration in effect is always one consistent snapshot: code that
//! keeps a copy made at start (the OpenID client, the session manager, the listeners) and code
//! that reads the live configuration see the same values.
//!
//! [`reload`] takes the new configuration apart with exhaustive patterns: a new field does not
//! compile until it is decided, and the unit test below fails until its TOML key is.

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

/// Every key and when it takes effect (the same for every configuration).
pub fn decisions(config: &Config) -> Vec<(&'static str, Applies)> {
    reload(config, config.clone()).decisions
}

/// The configuration in effect after `new` is loaded over the running `old`.
pub fn reload(old: &Config, new: Config) -> Reloaded {
    let mut d = Decide::default();
    let Config {
        server,
        admin,
        log,
        oidc,
        session,
        limits,
        telemetry,
        routes,
        features,
        tls,
        egress,
    } = new;
    let server = server_section(&mut d, &old.server, server);
    let AdminConfig {
        listen: admin_listen,
        max_connections: admin_max_connections,
    } = admin;
    let admin = AdminConfig {
        listen: d.restart("admin.listen", &old.admin.listen, admin_listen),
        max_connections: d.restart(
            "admin.max_connections",
            &old.admin.max_connections,
            admin_max_connections,
        ),
    };
    // The subscriber is installed once, at start.
    let LogConfig { level, format } = log;
    let log = LogConfig {
        level: d.restart("log.level", &old.log.level, level),
        format: d.restart("log.format", &old.log.format, format),
    };
    let oidc = oidc_section(&mut d, &old.oidc, oidc);
    let session = session_section(&mut d, &old.session, session);
    let LimitsConfig {
        login_per_minute,
        callback_per_minute,
        backchannel_logout_per_minute,
        tracked_addresses,
    } = limits;
    let limits = LimitsConfig {
        login_per_minute: d.live("limits.login_per_minute", login_per_minute),
        callback_per_minute: d.live("limits.callback_per_minute", callback_per_minute),
        backchannel_logout_per_minute: d.live(
            "limits.backchannel_logout_per_minute",
            backchannel_logout_per_minute,
        ),
        // Sizes the rate limiter, built at start.
        tracked_addresses: d.restart(
            "limits.tracked_addresses",
            &old.limits.tracked_addresses,
            tracked_addresses,
        ),
    };
    let TelemetryConfig {
        otlp_endpoint,
        sample_ratio,
        log_user,
    } = telemetry;
    let telemetry = TelemetryConfig {
        // The exporter is started with the application.
        otlp_endpoint: d.restart(
            "telemetry.otlp_endpoint",
            &old.telemetry.otlp_endpoint,
            otlp_endpoint,
        ),
        sample_ratio: d.live("telemetry.sample_ratio", sample_ratio),
        log_user: d.live("telemetry.log_user", log_user),
    };
    // Compiled into each runtime: every key of every route and feature is live.
    let routes = d.live("routes", routes);
    let features = d.live("features", features);
    // The default outbound clients (provider, upstreams, Redis) are built at start.
    let OutboundTls {
        ca_file,
        system_roots,
    } = tls;
    let tls = OutboundTls {
        ca_file: d.restart("tls.ca_file", &old.tls.ca_file, ca_file),
        system_roots: d.restart("tls.system_roots", &old.tls.system_roots, system_roots),
    };
    // Read from the environment at start; a process's environment does not change.
    let _ = egress;
    let egress = old.egress.clone();
    Reloaded {
        config: Config {
            server,
            admin,
            log,
            oidc,
            session,
            limits,
            telemetry,
            routes,
            features,
            tls,
            egress,
        },
        restart_needed: d.restart_needed,
        decisions: d.decisions,
    }
}

fn server_section(d: &mut Decide, old: &ServerConfig, new: ServerConfig) -> ServerConfig {
    let ServerConfig {
        listen,
        public_url,
        public_origin,
        bff_prefix,
        trusted_proxies,
        request_timeout,
        max_body,
        tls,
        cors_origins,
        shutdown_grace,
        header_read_timeout,
        max_header_size,
        workers,
        connections,
    } = new;
    let ConnectionLimits {
        max_connections,
        idle_timeout,
        body_read_timeout,
        body_min_rate,
        http2_max_concurrent_streams,
        http2_keep_alive_interval,
        http2_keep_alive_timeout,
    } = connections;
    let old_c = &old.connections;
    // The redirect URI registered at the provider is built from these two at start.
    let (public_url, public_origin) = d.restart(
        "server.public_url",
        &(old.public_url.clone(), old.public_origin.clone()),
        (public_url, public_origin),
    );
    ServerConfig {
        listen: d.restart("server.listen", &old.listen, listen),
        public_url,
        public_origin,
        bff_prefix: d.restart("server.bff_prefix", &old.bff_prefix, bff_prefix),
        trusted_proxies: d.live("server.trusted_proxies", trusted_proxies),
        request_timeout: d.live("server.request_timeout", request_timeout),
        max_body: d.live("server.max_body", max_body),
        tls: d.restart("server.tls", &old.tls, tls),
        cors_origins: d.live("server.cors_origins", cors_origins),
        shutdown_grace: d.restart("server.shutdown_grace", &old.shutdown_grace, shutdown_grace),
        // The HTTP parsers of the listener are set up at start.
        header_read_timeout: d.restart(
            "server.header_read_timeout",
            &old.header_read_timeout,
            header_read_timeout,
        ),
        max_header_size: d.restart(
            "server.max_header_size",
            &old.max_header_size,
            max_header_size,
        ),
        workers: d.restart("server.workers", &old.workers, workers),
        connections: ConnectionLimits {
            max_connections: d.restart(
                "server.max_connections",
                &old_c.max_connections,
                max_connections,
            ),
            idle_timeout: d.restart(
                "server.connection_idle_timeout",
                &old_c.idle_timeout,
                idle_timeout,
            ),
            // Read per request.
            body_read_timeout: d.live("server.body_read_timeout", body_read_timeout),
            body_min_rate: d.live("server.body_min_rate", body_min_rate),
            http2_max_concurrent_streams: d.restart(
                "server.http2_max_concurrent_streams",
                &old_c.http2_max_concurrent_streams,
                http2_max_concurrent_streams,
            ),
            http2_keep_alive_interval: d.restart(
                "server.http2_keep_alive_interval",
                &old_c.http2_keep_alive_interval,
                http2_keep_alive_interval,
            ),
            http2_keep_alive_timeout: d.restart(
                "server.http2_keep_alive_timeout",
                &old_c.http2_keep_alive_timeout,
                http2_keep_alive_timeout,
            ),
        },
    }
}

/// The OpenID client keeps the section it was started with; only what is read from the live
/// configuration alone, and the client secret it is handed on reload, is live.
fn oidc_section(d: &mut Decide, old: &OidcConfig, new: OidcConfig) -> OidcConfig {
    let OidcConfig {
        issuer,
        client_id,
        client_secret,
        client_secret_file,
        client_auth,
        client_key_file,
        client_published_key_files,
        client_assertion_file,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew,
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh,
        clock_skew,
        provider_timeout,
        userinfo,
        dpop,
        dpop_key_file,
        par,
        ca_file,
        tls_client,
    } = new;
    // The provider client is built at start; the key follows its certificate.
    d.restart_if("oidc.tls_client_key", false);
    OidcConfig {
        ca_file: d.restart("oidc.ca_file", &old.ca_file, ca_file),
        tls_client: d.restart("oidc.tls_client_cert", &old.tls_client, tls_client),
        issuer: d.restart("oidc.issuer", &old.issuer, issuer),
        client_id: d.restart("oidc.client_id", &old.client_id, client_id),
        // Swapped into the running client (the app does it): the next token call uses it.
        client_secret: d.live("oidc.client_secret", client_secret),
        client_secret_file: d.live("oidc.client_secret_file", client_secret_file),
        client_auth: d.restart("oidc.client_auth", &old.client_auth, client_auth),
        // The key files and the assertion file are read again on every reload (the app swaps the
        // client's credential): rotation needs no restart.
        client_key_file: d.live("oidc.client_key_file", client_key_file),
        client_published_key_files: d.live(
            "oidc.client_published_key_files",
            client_published_key_files,
        ),
        client_assertion_file: d.live("oidc.client_assertion_file", client_assertion_file),
        scopes: d.restart("oidc.scopes", &old.scopes, scopes),
        extra_auth_params: d.restart(
            "oidc.extra_auth_params",
            &old.extra_auth_params,
            extra_auth_params,
        ),
        roles_claim: d.live("oidc.roles_claim", roles_claim),
        refresh_skew: d.restart("oidc.refresh_skew", &old.refresh_skew, refresh_skew),
        post_logout_redirect: d.restart(
            "oidc.post_logout_redirect",
            &old.post_logout_redirect,
            post_logout_redirect,
        ),
        allow_http_issuer: d.restart(
            "oidc.allow_http_issuer",
            &old.allow_http_issuer,
            allow_http_issuer,
        ),
        metadata_refresh: d.restart(
            "oidc.metadata_refresh",
            &old.metadata_refresh,
            metadata_refresh,
        ),
        clock_skew: d.restart("oidc.clock_skew", &old.clock_skew, clock_skew),
        provider_timeout: d.restart(
            "oidc.provider_timeout",
            &old.provider_timeout,
            provider_timeout,
        ),
        // Read by the OpenID client (login and refresh), which keeps its start-up section.
        userinfo: d.restart("oidc.userinfo", &old.userinfo, userinfo),
        // The OpenID client and its DPoP key are built at start.
        dpop: d.restart("oidc.dpop", &old.dpop, dpop),
        dpop_key_file: d.restart("oidc.dpop_key_file", &old.dpop_key_file, dpop_key_file),
        // Read at each login.
        par: d.live("oidc.par", par),
    }
}

/// The session manager and the store are built at start; the key ring is handed over on reload.
fn session_section(d: &mut Decide, old: &SessionConfig, new: SessionConfig) -> SessionConfig {
    let SessionConfig {
        store,
        cookie_name,
        cookie_secure,
        same_site,
        idle_timeout,
        absolute_timeout,
        keys,
        keys_file,
        max_entries,
        cache_ttl,
    } = new;
    let redis = |s: &StoreConfig| match s {
        StoreConfig::Memory => None,
        StoreConfig::Redis(r) => Some(r.clone()),
    };
    d.restart_if(
        "session.store",
        redis(&old.store).is_some() != redis(&store).is_some(),
    );
    d.restart_if("session.redis", redis(&old.store) != redis(&store));
    SessionConfig {
        store: old.store.clone(),
        cookie_name: d.restart("session.cookie_name", &old.cookie_name, cookie_name),
        cookie_secure: d.restart("session.cookie_secure", &old.cookie_secure, cookie_secure),
        same_site: d.live("session.same_site", same_site),
        idle_timeout: d.restart("session.idle_timeout", &old.idle_timeout, idle_timeout),
        absolute_timeout: d.restart(
            "session.absolute_timeout",
            &old.absolute_timeout,
            absolute_timeout,
        ),
        // A new key ring is swapped in (the app does it): cookies sealed under a key it still
        // holds keep opening.
        keys: d.live("session.keys", keys),
        keys_file: d.live("session.keys_file", keys_file),
        max_entries: d.restart("session.max_entries", &old.max_entries, max_entries),
        cache_ttl: d.restart("session.cache_ttl", &old.cache_ttl, cache_ttl),
    }
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
        let reloaded = reload(&old, new);
        assert_eq!(
            reloaded.restart_needed,
            ["server.listen", "server.max_connections"]
        );
        let c = &reloaded.config;
        assert_eq!(c.server.listen, old.server.listen);
        assert_eq!(c.server.connections.max_connections, 10_000);
        assert_eq!(c.server.request_timeout, Duration::from_secs(5));
        assert_eq!(c.server.connections.body_min_rate, 1024);
        // Nothing changed: nothing to report.
        assert!(reload(&old, old.clone()).restart_needed.is_empty());
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
        let reloaded = reload(&old, new);
        assert_eq!(reloaded.restart_needed, ["session.store", "session.redis"]);
        assert_eq!(reloaded.config.session.store, StoreConfig::Memory);
        assert_eq!(
            reloaded.config.oidc.client_secret,
            Some(Secret::new("other"))
        );
        assert_eq!(reloaded.config.session.keys.len(), 2);
        assert_eq!(reloaded.config.session.keys[0], [7; 32]);
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
