//! The usual login stack: the real provider, a recording upstream and one or more proxies in
//! front of them (the further ones on other ports, sharing the first one's configuration).

use super::browser::Browser;
use super::provider::{self, TestProvider};
use super::upstream::{self, Upstream};
use super::{Proxy, TomlConfig, free_port, login_toml, wait_ready};

pub struct LoginStack {
    pub provider: TestProvider,
    /// The first instance listens on `port`, the registered redirect URI's port.
    pub proxies: Vec<Proxy>,
    pub up: Upstream,
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    pub port: u16,
    /// The configuration of the first instance.
    pub config: TomlConfig,
}

/// Builds a [`LoginStack`]; see [`LoginStack::builder`].
pub struct StackBuilder {
    provider: serde_json::Value,
    extra: Box<dyn FnOnce(&str) -> String>,
    edit: Box<dyn FnOnce(TomlConfig) -> TomlConfig>,
    instances: usize,
    clock: vestibule::clock::Clock,
}

impl LoginStack {
    /// One proxy, [`super::login_config`] as is, the provider with its defaults.
    pub fn builder() -> StackBuilder {
        StackBuilder {
            provider: serde_json::json!({}),
            extra: Box::new(|_| String::new()),
            edit: Box::new(|c| c),
            instances: 1,
            clock: vestibule::clock::Clock::system(),
        }
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxies[0]
    }

    /// A browser signed in as `user` (whose password is its name).
    pub async fn login(&self, user: &str) -> Browser {
        let mut browser = Browser::default();
        let done = browser.login(&self.base, user, user, "/").await;
        assert_eq!(done.status, 302, "{}", done.text());
        browser
    }
}

impl StackBuilder {
    /// Top-level fields for the provider's config (see tests/provider/provider.js).
    pub fn provider(mut self, extra: serde_json::Value) -> StackBuilder {
        self.provider = extra;
        self
    }

    /// TOML appended to the proxy's config (routes, store, …), given the upstream's URL.
    pub fn extra(mut self, extra: impl FnOnce(&str) -> String + 'static) -> StackBuilder {
        self.extra = Box::new(extra);
        self
    }

    /// Changes to the proxy's config, after [`StackBuilder::extra`] and any earlier changes.
    pub fn config(mut self, edit: impl FnOnce(TomlConfig) -> TomlConfig + 'static) -> StackBuilder {
        let earlier = std::mem::replace(&mut self.edit, Box::new(|c| c));
        self.edit = Box::new(move |c| edit(earlier(c)));
        self
    }

    /// The proxies' clock (a `TestClock`'s, to reach expiries without waiting).
    pub fn clock(mut self, clock: vestibule::clock::Clock) -> StackBuilder {
        self.clock = clock;
        self
    }

    /// How many proxies share the configuration (give them a shared store).
    pub fn instances(mut self, n: usize) -> StackBuilder {
        self.instances = n;
        self
    }

    /// Starts everything and waits until every proxy has loaded the provider's metadata.
    pub async fn start(self) -> LoginStack {
        let port = free_port();
        let provider = provider::start(port, self.provider);
        let up = upstream::start().await;
        let extra = (self.extra)(&up.url());
        let config = (self.edit)(login_toml(port, &provider.issuer, &extra));
        let mut proxies = vec![super::start_proxy_with_clock(&config, self.clock.clone()).await];
        // Further instances: the same configuration (and public_url, the registered redirect
        // URI), another listening port.
        for _ in 1..self.instances {
            let other = config.clone().set("server.listen", "127.0.0.1:0");
            proxies.push(super::start_proxy_with_clock(&other, self.clock.clone()).await);
        }
        for proxy in &proxies {
            wait_ready(proxy).await;
        }
        LoginStack {
            provider,
            proxies,
            up,
            base: format!("http://127.0.0.1:{port}"),
            port,
            config,
        }
    }
}
