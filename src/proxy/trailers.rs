//! Request trailers stop at the proxy. They are fields that arrive after the body, past the
//! vetting of the head ([`super::headers::strip_for_upstream`], the identity fields): a trailer
//! `Authorization` or `X-User` would speak for the client where its head could not. Nothing in
//! Vestibule's contract needs them, so the request body is relayed without them rather than
//! vetted a second time.
//!
//! An HTTP/1.1 upstream would be written only the trailers that the head announced in `Trailer`
//! (hyper's rule; the field is removed as hop-by-hop), but hyper's HTTP/2 client sends a body's
//! trailers as they come: HTTP/2 upstreams were given them all.

use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// `B` with its trailer frames dropped; its data, its end and its errors as they are.
pub struct WithoutTrailers<B> {
    inner: B,
}

impl<B> WithoutTrailers<B> {
    pub fn new(inner: B) -> Self {
        WithoutTrailers { inner }
    }
}

impl<B: Body + Unpin> Body for WithoutTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        loop {
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => {
                    tracing::debug!("request trailers dropped");
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn trailers_are_dropped_and_the_data_kept() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("authorization", "Bearer forged".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::trailers(trailers.clone())),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let collected = WithoutTrailers::new(body).collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(collected.to_bytes(), "hello world");
    }
}
