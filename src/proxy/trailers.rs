//! Request trailers stop at the proxy. They are fields that arrive after the body, past the
//! vetting of the head ([`super::headers::strip_for_upstream`], the identity fields): a trailer
//! `Authorization` or `X-User` would speak for the client where its head could not. Nothing in
//! Vestibule's contract needs them, so the request body is relayed without them rather than
//! vetted a second time.
//!
//! An HTTP/1.1 upstream would be written only the trailers that the head announced in `Trailer`
//! (hyper's rule; the field is removed as hop-by-hop), but hyper's HTTP/2 client sends a body's
//! trailers as they come: HTTP/2 upstreams were given them all.
//!
//! An upstream's answer trailers are relayed (hyper's HTTP/2 server sends them; the HTTP/1 lane
//! drops them), but without the fields Vestibule vets in the answer's head: a `Set-Cookie` (one
//! of Vestibule's own cookies is dropped from the head) and the `Access-Control-*` fields
//! (credentials are granted by `cors_origins` alone). Neither may be a trailer (RFC 9110
//! §6.5.1), and an intermediary that buffers the answer may merge trailers into its head.

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

/// Removes from an upstream's answer trailers the fields only its head may carry, and which
/// Vestibule vets there: `Set-Cookie` and every `Access-Control-*` field.
pub fn vet_answer_trailers(fields: &mut http::HeaderMap) {
    let vetted = |name: &http::HeaderName| {
        *name == http::header::SET_COOKIE || name.as_str().starts_with("access-control-")
    };
    let names: Vec<http::HeaderName> = fields.keys().filter(|n| vetted(n)).cloned().collect();
    for name in names {
        tracing::debug!(field = %name, "an answer trailer dropped");
        fields.remove(name);
    }
}

/// A frame of an upstream's answer: its trailers vetted ([`vet_answer_trailers`]), data as is.
pub fn answer_frame<D>(frame: Frame<D>) -> Frame<D> {
    match frame.into_trailers() {
        Ok(mut fields) => {
            vet_answer_trailers(&mut fields);
            Frame::trailers(fields)
        }
        Err(frame) => frame,
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

    #[test]
    fn answer_trailers_lose_cookies_and_cors_fields_and_keep_the_rest() {
        let mut fields = http::HeaderMap::new();
        fields.append("set-cookie", "a=1".parse().unwrap());
        fields.append("set-cookie", "b=2".parse().unwrap());
        fields.insert("access-control-allow-credentials", "true".parse().unwrap());
        fields.insert("access-control-allow-origin", "*".parse().unwrap());
        fields.insert("grpc-status", "0".parse().unwrap());
        fields.insert("x-checksum", "9".parse().unwrap());
        let frame = answer_frame(Frame::<Bytes>::trailers(fields));
        let kept = frame.into_trailers().unwrap();
        let mut names: Vec<&str> = kept.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status", "x-checksum"]);
        let data = answer_frame(Frame::data(Bytes::from_static(b"x")));
        assert_eq!(data.into_data().unwrap(), "x");
    }
}
