//! Which provider a session belongs to: the configured issuer's sessions are the only ones.
//!
//! A session records the issuer of its ID token (`Session::issuer`, and the listing data's copy
//! for what finds sessions without their cookies). After `oidc.issuer` changes over the same
//! store, the previous provider's sessions must not act: a refresh would hand its refresh token
//! to the new provider, its access tokens would still reach upstreams, and a `sub` or `sid` is
//! unique only per issuer. So a session of another issuer is signed out (read as none) and its
//! record ended, and a logout, session list or cap on a user's sessions passes it by. A session
//! recorded with no issuer was stored before issuers were: the configured one's, so that the
//! upgrade signs nobody out; its next write records the configured issuer.

use super::Sessions;
use super::ticket::{StoreKey, decode_meta};
use crate::session::model::Session;
use crate::session::store::StoreError;

/// Whether `recorded` names `configured`. The configured form may differ from the one the
/// provider states (and signs its tokens with) by one trailing `/` (`oidc::metadata`).
fn same_issuer(recorded: &str, configured: &str) -> bool {
    recorded.strip_suffix('/').unwrap_or(recorded)
        == configured.strip_suffix('/').unwrap_or(configured)
}

impl Sessions {
    /// Whether a session recorded with `issuer` is the configured issuer's.
    pub(super) fn ours(&self, issuer: Option<&str>) -> bool {
        issuer.is_none_or(|issuer| same_issuer(issuer, &self.issuer))
    }

    /// The issuer a session written now records: its own, or the configured one for a session
    /// stored before issuers were (kept from then on, through a later change of issuer).
    pub(super) fn pin_issuer(&self, session: &mut Session) {
        if session.issuer.is_none() && !self.issuer.is_empty() {
            session.issuer = Some(self.issuer.to_string());
        }
    }

    /// Ends a session read through its cookie that another issuer's login made: the browser is
    /// signed out, as for an expired session. Logged once (the record goes), without a token; a
    /// store failure leaves the record for the next request to end.
    pub(super) async fn end_foreign(&self, key: &StoreKey, session: &Session) {
        // Info: every such session's first request after a change of issuer logs this.
        tracing::info!(
            session = %key.handle(),
            issuer = session.issuer.as_deref().unwrap_or_default(),
            configured = %self.issuer,
            "a session of another issuer than the configured one is signed out and ended"
        );
        let member = key.name();
        let ended = match self.end(key).await {
            Ok(_) => self.unindex_session(session, &member).await,
            Err(error) => Err(error),
        };
        if let Err(error) = ended {
            tracing::warn!(%error, "the session of another issuer could not be ended now");
        }
    }

    /// Whether the session a store name names is recorded, in its listing data, as another
    /// issuer's: what finds sessions by `sub` or `sid` leaves it alone. A session that is not
    /// there, or whose listing data does not open, is not known to be another's.
    pub(super) async fn of_another_issuer(&self, member: &str) -> Result<bool, StoreError> {
        let Some(key) = StoreKey::parse(member) else {
            return Ok(false);
        };
        let Some(record) = self.store.get(member).await? else {
            return Ok(false);
        };
        let meta = decode_meta(&self.keyring.load(), &key, &record.value);
        Ok(meta.is_some_and(|meta| !self.ours(meta.issuer.as_deref())))
    }
}

#[cfg(test)]
mod tests {
    use super::same_issuer;

    #[test]
    fn an_issuer_is_the_same_with_one_trailing_slash_more_or_less_only() {
        assert!(same_issuer("https://a.example", "https://a.example"));
        assert!(same_issuer("https://a.example/", "https://a.example"));
        assert!(same_issuer("https://a.example", "https://a.example/"));
        assert!(!same_issuer("https://a.example//", "https://a.example"));
        assert!(!same_issuer("https://b.example", "https://a.example"));
        assert!(!same_issuer(
            "https://a.example/tenant",
            "https://a.example"
        ));
    }
}
