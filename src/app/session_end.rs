//! What ends with the session it was opened with: a WebSocket tunnel, and a proxied answer
//! whose body is still streaming (an event stream, a long poll, a download). The upstream
//! authorised either once, at its head; without this, the user's data would go on reaching the
//! browser after a logout, a back-channel logout, "sign out that device" or a timeout.
//!
//! Both are watched the same way ([`close_with_session`]): on the session's invalidation
//! message, and on a read of the session every [`SESSION_CHECK`] (idle and absolute timeouts).
//! A watch is a task and an entry among the session's watches (woken by that session's
//! messages only, see [`Sessions::watch`]), so an answer's body takes one only once it has
//! streamed for [`STREAM_GRACE`] ([`SessionBound`]): an answer that completes at once, as most
//! do, never registers, and one read whole with its head is not wrapped at all.

use crate::clock::Clock;
use crate::clock::deadline::{Deadlines, Taken};
use crate::reply::{Body, BoxError};
use crate::session::manager::{OpenSession, Sessions, Woken};
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
/// With a [`Gate`], a change of the session found by any read of it (this watch's or another's:
/// [`crate::session::manager::Founds::next`]) has the route's policy checked again, and
/// `end` is cancelled once the session no longer meets it (a role taken away by a refresh or
/// an administrator's change).
pub(super) async fn close_with_session(
    sessions: Arc<Sessions>,
    clock: Clock,
    loaded: Box<OpenSession>,
    end: CancellationToken,
    (what, check_first): (&'static str, bool),
    gate: Option<Box<Gate>>,
) {
    let mut invalidated = sessions.watch(loaded.handle);
    // The version last checked against the gate: the one the stream was admitted with.
    let mut checked = loaded.version;
    let mut founds = invalidated.founds();
    let mut check = tokio::time::interval(SESSION_CHECK);
    if !check_first {
        check.reset();
    }
    // The first check of a watch started late is its own (it may have missed the message).
    let mut first = check_first;
    let reason = loop {
        let turn = tokio::select! {
            () = end.cancelled() => return,
            (version, session) = founds.next(), if gate.is_some() => {
                if version != checked
                    && let Some(gate) = &gate
                    && !gate.admits(&session, clock.now()).await
                {
                    break "no longer meets its route's policy";
                }
                checked = version;
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

/// A route's policy, checked again whenever its stream's session is found changed
/// ([`crate::access::still_admits`]). Made only for routes with a `require` or a `feature`
/// (what a change of claims can fail), when their stream is watched.
pub(super) struct Gate {
    pub oidc: Arc<crate::oidc::Oidc>,
    pub live: Arc<crate::state::LiveConfig>,
    pub route: crate::config::RouteConfig,
}

impl Gate {
    /// `None` for a route no change of the session can shut (no `require`, no `feature`).
    pub(super) fn of(
        oidc: &Arc<crate::oidc::Oidc>,
        live: &arc_swap::ArcSwap<crate::state::LiveConfig>,
        route: &crate::config::RouteConfig,
    ) -> Option<Box<Gate>> {
        (!route.require.is_empty() || route.feature.is_some()).then(|| {
            Box::new(Gate {
                oidc: oidc.clone(),
                live: live.load_full(),
                route: route.clone(),
            })
        })
    }

    async fn admits(&self, session: &crate::session::model::Session, now: u64) -> bool {
        crate::access::still_admits(&self.oidc, &self.live, &self.route, session, now).await
    }
}

/// What a streamed answer's body needs to be watched: the session it was opened with and the
/// worker it is relayed on.
pub(super) struct Watcher {
    pub sessions: Arc<Sessions>,
    pub clock: Clock,
    pub loaded: OpenSession,
    pub deadlines: Arc<Deadlines>,
    /// The route's policy, for a route that has one ([`Gate::of`]).
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
