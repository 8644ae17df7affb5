//! Sessions: cookie sealing, the session model, the stores and the manager that ties them together.
//!
//! This module owns everything between "a cookie value arrived" and "here is the user's session",
//! and nothing else: it knows no HTTP types, no TOML and no clock. Callers pass plain settings
//! structs and the current time (`now`, Unix seconds) as parameters.
//!
//! - [`aead`]: AES-256-GCM (aws-lc-rs), what `seal` and the records at rest are sealed with.
//! - [`seal`]: the versioned, AEAD-sealed, key-rotating cookie format ([`Keyring`]).
//! - [`model`]: the [`Session`] value (its `Debug` never shows a token).
//! - [`store`]: opaque-bytes storage with versions, indexes, locks and pub/sub, in memory or Redis.
//! - [`manager`]: [`Sessions`], which seals tickets into cookies and encrypts sessions at rest so
//!   that a dump of the store yields neither tokens nor usable cookies.
//!
//! Dependencies point one way: `manager` uses `seal`, `model` and `store`; those use nothing here.

pub mod aead;
pub mod manager;
pub mod model;
pub mod seal;
pub mod store;

pub use manager::{OpenSession, SessionError, SessionSettings, SessionSummary, Sessions};
pub use model::{AccessToken, Session, TokenMap};
pub use seal::{Keyring, KeyringError, Opened, SealError};
pub use store::{MemoryStore, Record, RedisStore, Store, StoreConfig, StoreError};
