//! What ends with the session it was opened with: a WebSocket tunnel, and a proxied answer
//! whose body is still streaming (an event stream, a long poll, a download). The upstream
//! authorised either once, at its head; without this, the user's data would go on reaching the
//! browser after a logout, a back-channel logout, "sign out that device" or a timeout.
//!
//! Both are watched the same way ([`close_with_session`]): on the session's invalidation
//! message, and on a read of the session every [`SESSION_CHECK`] (idle and absolute timeouts);
//! and their route's policy is checked again when the session changes, at a reload, and when a
//! step-up's `max_age` runs out ([`Gate`]). One opened without a session is checked at a reload
//! ([`close_unless_admitted`]).
//! A watch is a task and an entry among the session's watches (woken by that session's
//! messages only, see [`Sessions::watch`]), so an answer's body takes one only once it has
//! streamed for [`STREAM_GRACE`] ([`SessionBound`]): an answer that completes at once, as most
//! do, never registers, and one read whole with its head is not wrapped at all.

use crate::clock::Clock;
use crate::clock::deadline::{Deadlines, Taken};
use crate::config::RouteConfig;
use crate::proxy::routing::{Destination, Resolved};
use crate::reply::{Body, BoxError};
use crate::session::manager::{OpenSession, Sessions, Woken};
use crate::session::model::Session;
use crate::state::LiveConfig;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How often a watched session is read again, to catch its idle and absolute timeouts (an end
/// by logout is announced at once).
pub(super) const SESSION_CHECK: Duration = Duration::from_secs(15);

/// How long an answer's body streams, from the first time it waits on its upstream, before it
/// is watched; a session ended meanwhile is noticed then (the watch reads it at once).
const STREAM_GRACE: Duration = Duration::from_secs(2);

/// Frames a body may yield without ever waiting on its upstream (a download faster than its
/// client) before its grace starts anyway.
const READY_FRAMES: u32 = 16;

/// Cancels `end` once the session `loaded` was opened with has ended by any path, on any
/// instance: checked when an invalidation for it arrives (or any may have been lost; one read
/// per message for all the session's watches: [`crate::session::manager::SessionWatch::changed`]) and every
/// [`SESSION_CHECK`] (one read of the session for all its watches:
/// [`crate::session::manager::SessionWatch::read_due`]), as `session-events` does (the check
/// bypasses the session cache);
/// `check_first`: once at the start too (a watch started late may have missed the message). An
/// unreachable store ends nothing. Returns when `end` is cancelled (the tunnel or the body
/// closed). Other sessions' invalidations do not wake it ([`Sessions::watch`]).
///
/// With a [`Gate`], `end` is also cancelled once a request of the stream would be refused: on a
/// route whose policy looks at the session, checked at each change of the session found by any
/// read of it (this watch's or another's: [`crate::session::manager::Founds::next`]: a role
/// taken away by a refresh or an administrator's change, a weaker `acr`); at every reload,
/// against the new configuration and the session as last found; and once a step-up's `max_age`
/// runs out. None of these reads the store.
pub(super) async fn close_with_session(
    sessions: Arc<Sessions>,
    clock: Clock,
    loaded: Box<OpenSession>,
    end: CancellationToken,
    (what, check_first): (&'static str, bool),
    mut gate: Option<Box<Gate>>,
) {
    let mut invalidated = sessions.watch(loaded.handle);
    // The session as last found alive (at first, as the stream was admitted with it) and its
    // version: what the gate checks.
    let (mut checked, mut latest) = (loaded.version, loaded.session.clone());
    let mut founds = invalidated.founds();
    let mut check = tokio::time::interval(SESSION_CHECK);
    if !check_first {
        check.reset();
    }
    // The first check of a watch started late is its own (it may have missed the message).
    let mut first = check_first;
    // A reload between the stream's admission and its watch: checked at once.
    let mut reloaded = gate.as_ref().is_some_and(|gate| gate.due);
    let reason = loop {
        // Only a route whose policy looks at the session follows its changes (the founds
        // are kept all the same: a reload reads the latest).
        let gated = gate.as_ref().is_some_and(|gate| gate.watches_session());
        let sign_in_left = gate
            .as_ref()
            .and_then(|gate| gate.sign_in_left(&latest, clock.now()));
        if std::mem::take(&mut reloaded)
            && let Some(gate) = &mut gate
        {
            if let Some((version, session)) = founds.latest() {
                (checked, latest) = (version, session);
            }
            if !gate.follow_admits(Some(&latest), clock.now()).await {
                break NOT_ADMITTED;
            }
            continue;
        }
        let turn = tokio::select! {
            () = end.cancelled() => return,
            (version, session) = founds.next(), if gated => {
                if version != checked
                    && let Some(gate) = &gate
                    && !gate.admits(Some(&session), clock.now()).await
                {
                    break NOT_ADMITTED;
                }
                (checked, latest) = (version, session);
                continue;
            }
            () = Gate::reload(gate.as_deref()) => {
                reloaded = true;
                continue;
            }
            // A step-up's `max_age` runs out: checked again with the clock (a test's clock may
            // have moved further than this timer).
            () = tokio::time::sleep(sign_in_left.unwrap_or(SESSION_CHECK)), if sign_in_left.is_some() => {
                if let Some(gate) = &gate
                    && !gate.admits(Some(&latest), clock.now()).await
                {
                    break NOT_ADMITTED;
                }
                continue;
            }
            woken = invalidated.changed() => match woken {
                // One read per message, whichever of the session's watches comes first.
                Woken::Read(turn) => Some(turn),
                Woken::Ended => break "ended",
            },
            _ = check.tick() => {
                // One timed read per session, whichever of its watches comes first.
                if !std::mem::take(&mut first) && !invalidated.read_due(SESSION_CHECK) {
                    continue;
                }
                None
            }
        };
        let read = sessions.reload(&loaded, clock.now()).await;
        if let Some(turn) = turn {
            turn.done();
        }
        match read {
            Ok(None) => {
                invalidated.wake_session();
                break "ended";
            }
            // Every watch of the session checks its own route's policy against it.
            Ok(Some(found)) => invalidated.share(found.version, &found.session),
            Err(_) => {}
        }
    };
    tracing::info!("the session of {what} {reason}; closing it");
    end.cancel();
}

/// Why a watch closed its stream though the session lives on.
const NOT_ADMITTED: &str = "no longer meets its route's policy";

/// Cancels `end` once a stream opened without a session (a tunnel, a streamed answer) would no
/// longer be let through: checked at every reload of the configuration (a route that now wants
/// a sign-in, a claim or a feature, or that is gone). Returns when `end` is cancelled.
pub(super) async fn close_unless_admitted(
    mut gate: Box<Gate>,
    clock: Clock,
    end: CancellationToken,
    what: &'static str,
) {
    let mut reloaded = gate.due;
    loop {
        if !std::mem::take(&mut reloaded) {
            tokio::select! {
                () = end.cancelled() => return,
                () = Gate::reload(Some(&gate)) => {}
            }
        }
        if !gate.follow_admits(None, clock.now()).await {
            break;
        }
    }
    tracing::info!(
        "{what}, opened without a session, is no longer let through its route; closing it"
    );
    end.cancel();
}

/// A stream's route policy ([`crate::access::still_admits`]), checked again whenever what
/// decides it changes: the session (a read of it, by any of its watches, finds another version:
/// a refresh bringing other claims or a weaker `acr`, an administrator's change), the
/// configuration (a reload: the stream's request path is routed again, and a stream whose path
/// now goes to another route, or to none, or whose route now sends it to another upstream
/// ([`same_destination`]), closes), and the time (a step-up's `max_age`). No
/// check reads the store: the session is the one the watches' reads found last.
pub(super) struct Gate {
    oidc: Arc<crate::oidc::Oidc>,
    /// The configuration in effect, followed at each reload.
    configs: Arc<arc_swap::ArcSwap<LiveConfig>>,
    /// The configuration last checked against (its `superseded` tells of the next one) and the
    /// route of `path` in it.
    live: Arc<LiveConfig>,
    route: Arc<RouteConfig>,
    /// The stream's request path (canonical), routed again after a reload.
    path: Box<str>,
    /// `live` is not the configuration the stream was admitted with (a reload came in between):
    /// the watch checks at once.
    due: bool,
}

/// What a reload made of a stream's route.
enum Followed {
    /// The path goes to another route now, or to none, or its route to another upstream.
    Gone,
    /// The route's policy is what it was.
    Same,
    Changed,
}

impl Gate {
    /// The gate of a stream admitted by `route` under `admitted` (the request's configuration),
    /// for a request to `path`.
    pub(super) fn of(
        oidc: &Arc<crate::oidc::Oidc>,
        configs: &Arc<arc_swap::ArcSwap<LiveConfig>>,
        admitted: &LiveConfig,
        route: &Arc<RouteConfig>,
        path: &str,
    ) -> Box<Gate> {
        let live = configs.load_full();
        let due = !std::ptr::eq(&*live, admitted);
        Box::new(Gate {
            oidc: oidc.clone(),
            configs: configs.clone(),
            live,
            route: route.clone(),
            path: path.into(),
            due,
        })
    }

    /// Whether a change of the session alone can shut the stream: its route has a `feature`, a
    /// `require` or a step-up.
    fn watches_session(&self) -> bool {
        let route = &self.route;
        route.feature.is_some() || !route.require.is_empty() || route.step_up.is_some()
    }

    /// Returns once the configuration checked against has been replaced (never without a gate).
    async fn reload(gate: Option<&Gate>) {
        match gate {
            Some(gate) => gate.live.superseded.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Whether a request of the stream, with `session`, would still be let through the route.
    async fn admits(&self, session: Option<&Session>, now: u64) -> bool {
        crate::access::still_admits(&self.oidc, &self.live, &self.route, session, now).await
    }

    /// Follows the configuration in effect and checks the stream against it, as [`Gate::admits`]
    /// does; a route whose policy the reload left as it was is not checked again.
    async fn follow_admits(&mut self, session: Option<&Session>, now: u64) -> bool {
        match self.follow() {
            Followed::Gone => false,
            Followed::Same => true,
            Followed::Changed => self.admits(session, now).await,
        }
    }

    /// Routes the stream's path in the configuration in effect.
    fn follow(&mut self) -> Followed {
        let live = self.configs.load_full();
        let route = match live
            .routes
            .resolve(&self.path, &live.config.server.bff_prefix)
        {
            Ok(Resolved {
                to: Destination::Route(route),
                ..
            }) if route.path == self.route.path && same_destination(&self.route, route) => {
                route.clone()
            }
            _ => return Followed::Gone,
        };
        let same = !std::mem::take(&mut self.due)
            && same_policy((&self.live, &self.route), (&live, &route));
        (self.live, self.route) = (live, route);
        if same {
            Followed::Same
        } else {
            Followed::Changed
        }
    }

    /// How long until `session`'s sign-in is older than the route's step-up `max_age` allows
    /// (with `oidc.clock_skew`), from `now`: a second past it, [`Gate::admits`] says no. `None`
    /// for a route without `max_age`, or a session without `auth_time` (which it refuses).
    fn sign_in_left(&self, session: &Session, now: u64) -> Option<Duration> {
        let max_age = self.route.step_up.as_ref()?.max_age?;
        let auth_time = session.claims.map().get("auth_time")?.as_u64()?;
        let skew = self.live.config.oidc.clock_skew.as_secs();
        let last = auth_time.saturating_add(max_age).saturating_add(skew);
        Some(Duration::from_secs(
            last.saturating_sub(now).saturating_add(1),
        ))
    }
}

/// Whether route `b` sends a stream's bytes where `a` did: the same target (upstream URL),
/// the same path below it, and the same TLS trust and client certificate. A route repointed
/// by a reload (its upstream decommissioned, or no longer trusted) keeps no stream on the old
/// one.
fn same_destination(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.target == b.target
        && a.strip_prefix == b.strip_prefix
        && a.ca_file == b.ca_file
        && a.tls_client == b.tls_client
}

/// Whether route `b` under configuration `b` lets through what `a` does: the same keys of the
/// route and of the configuration that decide it.
fn same_policy(
    (a_live, a): (&LiveConfig, &RouteConfig),
    (b_live, b): (&LiveConfig, &RouteConfig),
) -> bool {
    let (a_config, b_config) = (&a_live.config, &b_live.config);
    a.auth == b.auth
        && a.token == b.token
        && a.token_key == b.token_key
        && a.resource == b.resource
        && a.require == b.require
        && a.feature == b.feature
        && a.step_up == b.step_up
        && a.feature
            .as_ref()
            .is_none_or(|name| a_config.features.get(name) == b_config.features.get(name))
        && a_config.oidc.roles_claim == b_config.oidc.roles_claim
        && a_config.oidc.clock_skew == b_config.oidc.clock_skew
}

/// What a streamed answer's body needs to be watched: the session it was opened with and the
/// worker it is relayed on.
pub(super) struct Watcher {
    pub sessions: Arc<Sessions>,
    pub clock: Clock,
    /// `None` for an answer admitted without a session: watched for reloads only.
    pub loaded: Option<OpenSession>,
    pub deadlines: Arc<Deadlines>,
    /// The route's policy ([`Gate::of`]).
    pub gate: Option<Box<Gate>>,
}

/// The body of an answer admitted with a session, relayed while that session lasts: once it
/// has waited on its upstream and then streamed for [`STREAM_GRACE`] it is watched, and when
/// the session ends it ends with an error (the client's connection or stream is aborted, not
/// finished as if complete) and the upstream's body is dropped (its request abandoned).
pub(super) struct SessionBound {
    /// `None` once cut.
    inner: Option<Body>,
    phase: Phase,
}

enum Phase {
    /// Not waited on its upstream yet; frames so far.
    Fresh(Box<Watcher>, u32),
    /// In its grace: watched once the slot fires.
    Grace(Box<Watcher>, Taken),
    /// Watched: ends when this does (its watch cancels it; the body too, when it ends).
    Watched(Pin<Box<WaitForCancellationFutureOwned>>, CancellationToken),
    /// Ended, or cut.
    Over,
}

/// Why an answer's body stopped short.
#[derive(Debug, thiserror::Error)]
#[error("the session this answer was streamed for has ended")]
pub struct SessionEnded;

impl SessionBound {
    pub(super) fn new(inner: Body, watcher: Watcher) -> SessionBound {
        SessionBound {
            inner: Some(inner),
            phase: Phase::Fresh(Box::new(watcher), 0),
        }
    }

    /// Moves the watch on, before the upstream's body is polled: a grace that has run out
    /// starts the watch. `Ready` once the session has ended.
    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Phase::Grace(_, slot) = &self.phase
            && slot.poll_fired(cx).is_ready()
        {
            self.phase = match std::mem::replace(&mut self.phase, Phase::Over) {
                Phase::Grace(watcher, _) => watch(*watcher),
                other => other,
            };
        }
        match &mut self.phase {
            Phase::Watched(waiting, _) => waiting.as_mut().poll(cx),
            _ => Poll::Pending,
        }
    }

    /// Starts the grace: the upstream made the body wait, or it ran past [`READY_FRAMES`].
    fn start_grace(&mut self, cx: &mut Context<'_>) {
        self.phase = match std::mem::replace(&mut self.phase, Phase::Over) {
            Phase::Fresh(watcher, _) => {
                let deadlines = &watcher.deadlines;
                let slot = deadlines.arm(deadlines.coarse_now() + STREAM_GRACE);
                // Its waker kept, for a body still waiting on its upstream when the grace ends.
                let _ = slot.poll_fired(cx);
                Phase::Grace(watcher, slot)
            }
            other => other,
        };
    }

    /// The body is over (ended or cut): its watch, or its grace, ends too.
    fn finish(&mut self) {
        if let Phase::Watched(_, end) = std::mem::replace(&mut self.phase, Phase::Over) {
            end.cancel();
        }
    }
}

/// Starts watching the session of a body whose grace has run out.
fn watch(watcher: Watcher) -> Phase {
    let Watcher {
        sessions,
        clock,
        loaded,
        deadlines: _,
        gate,
    } = watcher;
    let end = CancellationToken::new();
    match (loaded, gate) {
        (Some(loaded), gate) => {
            // Read at once: the session may have ended during the grace, its message gone.
            let what = ("a streamed answer", true);
            tokio::spawn(close_with_session(
                sessions,
                clock,
                Box::new(loaded),
                end.clone(),
                what,
                gate,
            ));
        }
        (None, Some(gate)) => {
            let what = "a streamed answer";
            tokio::spawn(close_unless_admitted(gate, clock, end.clone(), what));
        }
        (None, None) => {}
    }
    Phase::Watched(Box::pin(end.clone().cancelled_owned()), end)
}

impl http_body::Body for SessionBound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if !matches!(this.phase, Phase::Fresh(..)) && this.poll_session(cx).is_ready() {
            // The upstream's body goes with it: its request is abandoned.
            this.inner = None;
            this.finish();
            return Poll::Ready(Some(Err(Box::new(SessionEnded))));
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let grace = match (&mut this.phase, &polled) {
            (Phase::Fresh(..), Poll::Pending) => true,
            (Phase::Fresh(_, frames), Poll::Ready(Some(Ok(_)))) => {
                *frames += 1;
                *frames > READY_FRAMES
            }
            (_, Poll::Ready(None | Some(Err(_)))) => {
                this.finish();
                false
            }
            _ => false,
        };
        if grace {
            this.start_grace(cx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for SessionBound {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
