//! Vestibule: a Backend-for-Frontend reverse proxy.
//!
//! Module map, with dependencies pointing one way (each module may use those above it):
//!
//! - [`config`]: the TOML schema, `${VAR}` interpolation and validation; the only module that
//!   knows TOML. Produces typed settings.
//! - [`clock`]: the time (Unix seconds now) as a value passed to what needs it; tests move it.
//! - [`telemetry`], [`reply`]: logging and metrics; the error contract and the response body
//!   type. Used by everything below.
//! - [`cookies`]: reading our cookies from a request and writing `Set-Cookie`.
//! - [`field`]: text written into an HTTP field as it is (access tokens), checked where it
//!   enters.
//! - [`net`]: the outbound TCP/TLS connector for upstreams and the provider: trusted roots,
//!   client certificates (mutual TLS), the egress proxy.
//! - [`limits`]: the client address after trusted proxies, per-address rate limits and the pace
//!   request bodies must keep — bounded work for anonymous clients.
//! - [`jose`]: JSON Web Key sets and JWT validation (ID tokens, logout tokens, access tokens).
//!   Knows nothing of HTTP servers; fetches key sets through an injected fetcher.
//! - [`session`]: cookie sealing with a key ring, the session model, and the session stores
//!   (memory and Redis) behind one type.
//! - [`oidc`]: provider metadata, login (PAR), callback, refresh, logout, UserInfo — the OpenID
//!   Connect client, with its client authentication, DPoP proofs, step-up requirements and the
//!   reader of an API's `WWW-Authenticate` challenges.
//! - [`proxy`]: routing, header rewriting, forwarding, upgrades, static files.
//! - [`state`]: the state shared by every request (clients, sessions, the hot-swappable
//!   [`state::LiveConfig`]) and the session of a request; [`rescue`]: [`rescue::RequestError`],
//!   why a request failed, and the one place that turns it into a response and logs its cause.
//! - [`access`] (the access stage of proxied routes) and [`endpoints`] (the BFF endpoints): read the
//!   shared state, never the pipeline above them.
//! - [`app`]: the composition root, the request pipeline tying routes, the access stage and the
//!   BFF endpoints together; reloads.
//! - [`server`]: listeners, TLS, the admin endpoints, graceful shutdown.

// The layout of a connection's request future (pipeline, proxy, forward) nests deeper than the
// default query depth allows.
#![recursion_limit = "256"]

pub mod access;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cookies;
pub mod endpoints;
pub mod field;
pub mod jose;
pub mod limits;
pub mod net;
pub mod oidc;
pub mod proxy;
pub mod reply;
pub mod rescue;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;
