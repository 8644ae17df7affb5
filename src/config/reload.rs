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
    reload(config, config.clone()).decisions
}

/// The configuration in effect after `new` is loaded over the running `old`.
pub fn reload(old: &Config, new: Config) -> Reloaded {
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
        // Swapped into the running client (the app does it): the next token call uses it.
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
