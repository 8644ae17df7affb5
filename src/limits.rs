//! Bounded work for anonymous clients: who the client is behind trusted proxies, per-address
//! rate limits for the BFF endpoints anyone may call, each address's share of the open
//! connections, and a pace that request bodies must keep.
//!
//! Knows nothing of routes, sessions or the provider; the endpoints and the proxy decide where
//! each limit applies. Never on the proxied hot path except [`Paced`], which only wraps a body.

mod client;
mod connections;
mod pace;
mod rate;

pub use client::client_address;
pub use connections::{ClientConnections, ClientPlace, RefusalLog};
pub use pace::{BodyTimeout, Pace, Paced};
pub use rate::{Endpoint, RateLimiter, Verdict};
