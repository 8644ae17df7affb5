//! A check on the raw bytes of HTTP/1 requests, ahead of hyper's parser, for framing that
//! hyper accepts but a front door must refuse (request smuggling): a head with both
//! `Content-Length` and `Transfer-Encoding` (hyper drops the length and reads chunks), more than
//! one `Content-Length` or `Transfer-Encoding` line (hyper takes equal lengths), and a bare LF
//! where CRLF belongs (hyper takes it as a line end). Such a head is made unparsable — its final
//! line feed becomes a NUL byte — so hyper answers it with its own 400 and closes the
//! connection; no part of it reaches a handler or an upstream.
//!
//! To find every head on a keep-alive connection, the check follows the framing of the bodies
//! in between (a `Content-Length` is skipped in one step, chunks by their sizes). A chunked body
//! it cannot follow byte for byte as it expects (a bad size, a trailer line ending in a bare LF,
//! which hyper would take) is spoiled: that byte and every later line feed on the connection
//! become NULs, so hyper refuses the body and takes no head after it. A `Transfer-Encoding`
//! line too long to keep is refused like a conflicting one. What it cannot follow at all —
//! HTTP/2, a request asking to switch protocols (`Upgrade`, `CONNECT`: whether a tunnel follows
//! is only known from the answer) — ends the check for the connection, never the connection.
//! A client can therefore turn the
//! check off for its own later requests by asking for an upgrade first; those requests still
//! meet hyper's parser, which removes `Content-Length` beside `Transfer-Encoding` and closes the
//! connection after such a request, and every request reaches an upstream re-framed by
//! Vestibule. Everything else (line syntax, obs-fold, the shape of `Transfer-Encoding`, sizes
//! and counts) stays with hyper's parser and limits.
//!
//! Because it follows the framing, the guard also knows when a connection is closed while the
//! client is still sending (a body refused from its declared length, a head cut off at the size
//! limit). Closing a socket with unread input makes the kernel answer with a reset, and a client
//! still writing then fails with "broken pipe" before it reads its answer. So such a close
//! lingers: the write side is shut (the client sees the answer end), and what still arrives is
//! read and dropped until the client closes too, or for at most [`LINGER`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a close waits, at most, for a client still sending to stop.
pub const LINGER: Duration = Duration::from_secs(3);

/// A connection whose incoming bytes pass through the framing check.
pub struct Guarded<T> {
    inner: T,
    framing: Framing,
    /// Bytes already taken from `inner` (by the HTTP/1 lane), read and checked first.
    read: bytes::Bytes,
    /// Once the write side is shut while the client was still sending: the end of the linger.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T) -> Self {
        Self::after(inner, bytes::Bytes::new())
    }

    /// `inner`, of which `read` has been read already: those bytes come (and are checked) first.
    pub fn after(inner: T, read: bytes::Bytes) -> Self {
        Guarded {
            inner,
            framing: Framing::default(),
            read,
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = if this.read.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let first = this.read.split_to(this.read.len().min(buf.remaining()));
            buf.put_slice(&first);
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = polled
            && let Some(new) = buf.filled_mut().get_mut(before..)
        {
            this.framing.check(new);
        }
        polled
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Shuts the write side; if the client was still sending, lingers (see the module's notes).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            if !this.framing.mid_request() {
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 8192];
        loop {
            if let Some(end) = this.linger.as_mut()
                && end.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {}
                // The client closed too (or the connection failed): nothing is left to reset.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Where the check is in the byte stream.
#[derive(Debug)]
enum Framing {
    /// Reading a request head.
    Head(Head),
    /// Skipping the rest of a `Content-Length` body.
    Body(u64),
    /// Following a chunked body.
    Chunked(Chunk),
    /// Checking no more: HTTP/2, a protocol switch, or a refused head (hyper closes after it).
    Off,
    /// A body the check could not follow as hyper reads it: its offending byte, and every line
    /// feed after it, became a NUL, so neither that body nor any later head is taken by hyper.
    Spoiled,
}

impl Default for Framing {
    fn default() -> Self {
        Framing::Head(Head::default())
    }
}

/// The positions inside a chunked body.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size(u64),
    /// Spaces after the size, or an extension (hyper bounds their length).
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk; `true` while inside a non-empty line.
    Trailers {
        in_line: bool,
        cr: bool,
    },
}

/// What is known of the head read so far. Only the lines that decide the framing are kept,
/// and only their first [`LINE`] bytes.
#[derive(Debug)]
struct Head {
    line: [u8; LINE],
    line_len: usize,
    /// The last byte of the current line, to tell CRLF from a bare LF.
    last: Option<u8>,
    seen_request_line: bool,
    /// The request line is HTTP/2's connection preface, or `CONNECT`.
    not_http1: bool,
    content_lengths: u32,
    length: Option<u64>,
    transfer_encodings: u32,
    chunked: bool,
    upgrade: bool,
    refused: bool,
}

impl Default for Head {
    fn default() -> Self {
        Head {
            line: [0; LINE],
            line_len: 0,
            last: None,
            seen_request_line: false,
            not_http1: false,
            content_lengths: 0,
            length: None,
            transfer_encodings: 0,
            chunked: false,
            upgrade: false,
            refused: false,
        }
    }
}

/// Bytes kept of a line: enough for `Transfer-Encoding: ` and any sensible value.
const LINE: usize = 96;

impl Framing {
    /// Whether the client is in the middle of sending a request: a head begun, or a body.
    fn mid_request(&self) -> bool {
        match self {
            Framing::Head(head) => head.seen_request_line || head.line_len > 0,
            Framing::Body(_) | Framing::Chunked(_) => true,
            Framing::Off | Framing::Spoiled => false,
        }
    }

    /// Checks bytes just read, in order; may turn a refused head's final LF into a NUL.
    fn check(&mut self, bytes: &mut [u8]) {
        let mut at = 0;
        while at < bytes.len() {
            at = match self {
                Framing::Off => return,
                Framing::Spoiled => {
                    for byte in &mut bytes[at..] {
                        if *byte == b'\n' {
                            *byte = 0;
                        }
                    }
                    return;
                }
                Framing::Body(left) => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - at);
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Framing::default();
                    }
                    at + take
                }
                Framing::Chunked(chunk) => match chunk.step(&bytes[at..]) {
                    Some((taken, Some(next))) => {
                        *chunk = next;
                        at + taken
                    }
                    Some((taken, None)) => {
                        *self = Framing::default();
                        at + taken
                    }
                    None => {
                        // hyper may take what the check cannot follow (a trailer line ending
                        // in a bare LF): stopping here would let later heads pass unchecked.
                        bytes[at] = 0;
                        *self = Framing::Spoiled;
                        at + 1
                    }
                },
                Framing::Head(head) => {
                    let Some(end) = bytes[at..].iter().position(|&b| b == b'\n') else {
                        head.push(&bytes[at..]);
                        return;
                    };
                    head.push(&bytes[at..at + end]);
                    let lf = at + end;
                    if head.end_line() {
                        let next = head.framing();
                        if matches!(next, Framing::Off) && head.refused {
                            bytes[lf] = 0;
                        }
                        *self = next;
                    }
                    lf + 1
                }
            };
        }
    }
}

impl Head {
    fn push(&mut self, bytes: &[u8]) {
        let room = LINE.saturating_sub(self.line_len);
        let keep = room.min(bytes.len());
        self.line[self.line_len.min(LINE)..][..keep].copy_from_slice(&bytes[..keep]);
        self.line_len += bytes.len();
        if let Some(&last) = bytes.last() {
            self.last = Some(last);
        }
    }

    /// Takes in the line just ended by a LF; true when it was the head's empty last line.
    fn end_line(&mut self) -> bool {
        let crlf = self.last == Some(b'\r');
        if !crlf {
            self.refused = true;
        }
        let length = self.line_len - usize::from(crlf);
        let kept = self.line;
        let line = Line {
            text: &kept[..length.min(LINE)],
            whole: length <= LINE,
        };
        self.line_len = 0;
        self.last = None;
        if length == 0 {
            // Empty lines before the request line are skipped, as hyper does.
            return self.seen_request_line;
        }
        if !self.seen_request_line {
            self.seen_request_line = true;
            self.not_http1 =
                line.text.starts_with(b"PRI * HTTP/2.0") || line.text.starts_with(b"CONNECT ");
            return false;
        }
        self.header(line);
        false
    }

    fn header(&mut self, line: Line<'_>) {
        let Some(colon) = line.text.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&line.text[..colon], line.text[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_lengths += 1;
            let digits = line.whole && !value.is_empty() && value.iter().all(u8::is_ascii_digit);
            self.length = std::str::from_utf8(value)
                .ok()
                .filter(|_| digits)
                .and_then(|v| v.parse().ok());
            if self.length.is_none() {
                self.refused = true;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encodings += 1;
            let last = value.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
            self.chunked = line.whole && last.is_some_and(|l| l.eq_ignore_ascii_case(b"chunked"));
            // Too long to keep whole, its last coding is unknown here but not to hyper (which
            // trims the value): refused, as a `Content-Length` line too long is.
            if !line.whole {
                self.refused = true;
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.upgrade = true;
        }
    }

    /// What follows the head: its body, the next head, or no more checking.
    fn framing(&mut self) -> Framing {
        if self.content_lengths > 0 && self.transfer_encodings > 0
            || self.content_lengths > 1
            || self.transfer_encodings > 1
        {
            self.refused = true;
        }
        if self.refused || self.not_http1 || self.upgrade {
            return Framing::Off;
        }
        match (self.transfer_encodings, self.length) {
            (1, _) if self.chunked => Framing::Chunked(Chunk::Size(0)),
            (1, _) => Framing::Off,
            (_, Some(length)) if length > 0 => Framing::Body(length),
            _ => Framing::default(),
        }
    }
}

struct Line<'a> {
    text: &'a [u8],
    /// The whole line was kept.
    whole: bool,
}

impl Chunk {
    /// Follows a chunked body over `bytes`: how many were taken and where it is then (`None`
    /// once the body has ended). `None` overall: the body is not one hyper accepts.
    fn step(self, bytes: &[u8]) -> Option<(usize, Option<Chunk>)> {
        if let Chunk::Data(left) = self {
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
            let left = left - take as u64;
            let next = if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            };
            return Some((take, Some(next)));
        }
        let byte = *bytes.first()?;
        let next = match (self, byte) {
            (Chunk::Size(size), b) if b.is_ascii_hexdigit() => {
                let digit = u64::from(char::from(b).to_digit(16)?);
                Chunk::Size(size.checked_mul(16)?.checked_add(digit)?)
            }
            (Chunk::Size(size) | Chunk::Extension(size), b'\r') => Chunk::SizeLf(size),
            (Chunk::Size(size), b' ' | b'\t' | b';') => Chunk::Extension(size),
            (Chunk::Extension(size), b) if b != b'\n' => Chunk::Extension(size),
            (Chunk::SizeLf(0), b'\n') => Chunk::Trailers {
                in_line: false,
                cr: false,
            },
            (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size(0),
            (Chunk::Trailers { in_line, cr: true }, b'\n') => {
                if !in_line {
                    return Some((1, None));
                }
                Chunk::Trailers {
                    in_line: false,
                    cr: false,
                }
            }
            (Chunk::Trailers { in_line, cr: false }, b'\r') => {
                Chunk::Trailers { in_line, cr: true }
            }
            (Chunk::Trailers { cr: false, .. }, b) if b != b'\n' => Chunk::Trailers {
                in_line: true,
                cr: false,
            },
            _ => return None,
        };
        Some((1, Some(next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_read_before_come_first_and_are_checked_like_the_rest() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut near, far) = tokio::io::duplex(64);
        let read = bytes::Bytes::from_static(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTrans");
        let mut guarded = Guarded::after(far, read);
        near.write_all(b"fer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        drop(near);
        let mut all = Vec::new();
        guarded.read_to_end(&mut all).await.unwrap();
        let sent = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(all.len(), sent.len());
        assert_eq!(&all[..all.len() - 1], &sent.as_bytes()[..sent.len() - 1]);
        assert_eq!(
            all.last(),
            Some(&0),
            "a refused head split across both reads passed"
        );
    }

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would read.
    fn checked(input: &str, step: usize) -> (Vec<u8>, Framing) {
        let mut framing = Framing::default();
        let mut bytes = input.as_bytes().to_vec();
        for piece in bytes.chunks_mut(step) {
            framing.check(piece);
        }
        (bytes, framing)
    }

    fn refused(input: &str) -> bool {
        let refused = checked(input, input.len()).0.contains(&0);
        for step in [1, 2, 3, 7] {
            assert_eq!(
                checked(input, step).0.contains(&0),
                refused,
                "{input:?} in {step}s"
            );
        }
        refused
    }

    #[test]
    fn well_formed_keep_alive_traffic_passes_untouched() {
        let traffic = concat!(
            "\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\nab\ncd\n\n",
            "POST /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "4;a=b\r\n\n\n\n\n\r\nA \t; x\r\n0123456789\r\n0\r\nT: 1\r\n\r\n",
            "GET /d HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        );
        for step in [1, 2, 5, traffic.len()] {
            let (bytes, framing) = checked(traffic, step);
            assert_eq!(bytes, traffic.as_bytes());
            assert!(matches!(framing, Framing::Head(_)), "{framing:?}");
        }
    }

    #[test]
    fn ambiguous_framing_is_refused_in_any_request_on_the_connection() {
        let first = "POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\n",
        ] {
            assert!(refused(bad), "{bad:?}");
            assert!(
                refused(&format!("{first}{bad}")),
                "after a request: {bad:?}"
            );
        }
        // The refused head's final LF is what changes: hyper cannot parse the head.
        let (bytes, framing) = checked(
            "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            4,
        );
        assert_eq!(bytes.last(), Some(&0));
        assert!(matches!(framing, Framing::Off));
    }

    #[test]
    fn protocols_it_cannot_follow_end_the_check() {
        for input in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
        ] {
            let (bytes, framing) = checked(input, 3);
            assert_eq!(bytes, input.as_bytes());
            assert!(matches!(framing, Framing::Off), "{input:?}: {framing:?}");
        }
    }

    /// A chunked body the check cannot follow is spoiled where it lost track, and so is every
    /// head after it: a bad size line, and a trailer line ending in a bare LF (which hyper
    /// takes as a line end, so stopping the check there would let the next head through).
    #[test]
    fn bodies_it_cannot_follow_are_spoiled_with_every_head_after_them() {
        let next = "POST /b HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        for body in ["5\nhello", "0\r\nA: b\n\r\n\r\n", "zz\r\n"] {
            let input =
                format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}{next}");
            for step in [1, 3, input.len()] {
                let (bytes, framing) = checked(&input, step);
                assert!(
                    matches!(framing, Framing::Spoiled),
                    "{input:?}: {framing:?}"
                );
                let after = &bytes[input.len() - next.len()..];
                assert!(
                    !after.contains(&b'\n'),
                    "{input:?}: a head after it kept a line end"
                );
            }
        }
    }

    /// A `Transfer-Encoding` line too long for the check to keep is refused: hyper would trim
    /// it and read `chunked` where the check saw only spaces.
    #[test]
    fn a_transfer_encoding_line_too_long_to_keep_is_refused() {
        let long = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding:{}chunked\r\n\r\n0\r\n\r\n",
            " ".repeat(LINE)
        );
        assert!(refused(&long));
        let short = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!refused(short));
    }
}
