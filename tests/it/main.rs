//! Vestibule's integration tests, one binary: every module starts real parts (the proxy on port
//! 0, `redis-server`, the npm `oidc-provider`, upstream servers) through the shared [`support`]
//! harness. One binary links once, instead of once per file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod architecture;
mod claims_policy;
mod cli;
mod client_auth;
mod config_errors;
mod config_reload;
mod dpop;
mod edge;
mod exchange_binding;
mod fake_provider;
mod faults_collector;
mod faults_late_writes;
mod faults_provider;
mod faults_redis;
mod faults_refusals;
mod faults_restart;
mod faults_upstream;
mod harness;
mod identity;
mod issuer_change;
mod limits;
mod login;
mod logout;
mod mtls_tokens;
mod no_secrets_in_logs;
mod observe;
mod outbound_tls;
mod par;
mod paths;
mod protection;
mod protocol;
mod proxy;
mod refresh_outcomes;
mod sample_api;
mod secret_reload;
mod session_store;
mod slow_read;
mod spa_edges;
mod static_files;
mod step_up;
mod store_tracking;
mod tls_http2;
mod tokens;
mod trailers;
mod upstream_pool;
mod userinfo;
mod workers;
