//! A request body must keep a pace: the next piece within `read_timeout`, and on average at
//! least `min_rate` bytes a second after a first `read_timeout` of grace (each `min_rate` bytes
//! received buy one more second, like Apache's `mod_reqtimeout`). A body that falls behind
//! ends in [`BodyTimeout`], so a client trickling bytes cannot hold an upstream connection or a
//! task for longer than that.

use crate::reply::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The pace a request body must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The longest wait for the next piece of the body, and the grace before `min_rate` counts.
    pub read_timeout: Duration,
    /// Bytes a second, on average; 0: no minimum.
    pub min_rate: u64,
}

/// The body did not keep its [`Pace`].
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly")]
pub struct BodyTimeout;

/// A body held to a [`Pace`]; the clock starts when it is wrapped.
pub struct Paced<B> {
    inner: B,
    pace: Pace,
    started: Instant,
    last: Instant,
    received: u64,
    /// Made only when the body first has to be waited for.
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl<B> Paced<B> {
    pub fn new(inner: B, pace: Pace) -> Self {
        let now = Instant::now();
        Paced {
            inner,
            pace,
            started: now,
            last: now,
            received: 0,
            timer: None,
            expired: false,
        }
    }

    fn deadline(&self) -> Instant {
        let next_piece = self.last + self.pace.read_timeout;
        if self.pace.min_rate == 0 {
            return next_piece;
        }
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / self.pace.min_rate);
        next_piece.min(self.started + self.pace.read_timeout + earned)
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                this.received = this
                    .received
                    .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
                this.last = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let deadline = this.deadline();
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.expired = true;
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    type Chunks = mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;

    /// A body fed by the test, paced as given.
    fn fed(
        pace: Pace,
    ) -> (
        Chunks,
        Paced<impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, Paced::new(StreamBody::new(Box::pin(stream)), pace))
    }

    fn bytes(n: usize) -> Result<Frame<Bytes>, std::convert::Infallible> {
        Ok(Frame::data(Bytes::from(vec![b'x'; n])))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_ends_after_the_read_timeout() {
        let (tx, mut body) = fed(Pace {
            read_timeout: SECOND * 5,
            min_rate: 0,
        });
        tx.send(bytes(10)).await.unwrap();
        let started = Instant::now();
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyTimeout>());
        assert_eq!(started.elapsed(), SECOND * 5);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_ends_soon_after_the_grace() {
        let (tx, mut body) = fed(Pace {
            read_timeout: SECOND * 5,
            min_rate: 100,
        });
        let started = Instant::now();
        tokio::spawn(async move {
            // One byte a second: each piece comes well within the read timeout.
            while tx.send(bytes(1)).await.is_ok() {
                tokio::time::sleep(SECOND).await;
            }
        });
        let error = tokio::time::timeout(SECOND * 60, async {
            loop {
                match body.frame().await.unwrap() {
                    Ok(_) => continue,
                    Err(e) => break e,
                }
            }
        })
        .await
        .expect("the trickle was never cut");
        assert!(error.is::<BodyTimeout>());
        // 5 s of grace plus 10 ms for each byte received.
        assert!(started.elapsed() < SECOND * 6, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_not_cut() {
        let (tx, mut body) = fed(Pace {
            read_timeout: SECOND * 2,
            min_rate: 100,
        });
        tokio::spawn(async move {
            for _ in 0..30 {
                tx.send(bytes(100)).await.unwrap();
                tokio::time::sleep(SECOND).await;
            }
        });
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(total, 3000);
    }
}
