//! Responses Vestibule makes itself: the body type, and the one place that turns an error
//! condition into a response. Every error has a stable `error` code and a human `message`;
//! API callers get JSON, browser navigations a small HTML page. No internal detail is ever
//! included — causes are logged once, where they happen.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response and forwarded request.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// The body of a request from a client: hyper's, or none at all for a bodiless request read by
/// Vestibule's own HTTP/1 server side (`server::lane`).
pub type Inbound = http_body_util::Either<hyper::body::Incoming, Empty<Bytes>>;

/// `Box::pin(build())`, with the future built in its box: its fields are written straight into
/// the allocation. `Box::pin(future)` builds the whole future on the stack first and then copies
/// all of it into the box — for the request pipeline several KB per request, mostly room for
/// states it has not reached yet (the copy was the largest single item of the open route's
/// profile).
#[inline(always)]
pub fn in_box<F: std::future::Future>(build: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), build()))
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The cause of an error from below, kept as the error it was (for its `Display` and `source`
/// chain in the one log line that reports it) rather than as its text. Two causes are equal when
/// they are the same error.
#[derive(Debug, Clone)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(std::sync::Arc::new(error))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)?;
        let mut source = self.0.source();
        while let Some(next) = source {
            write!(f, ": {next}")?;
            source = next.source();
        }
        Ok(())
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Cause {}

/// Declares [`ErrorCode`] from one table: each code's variant, wire name, HTTP status and message
/// stand on one line, and [`ErrorCode::ALL`] lists them for the docs test.
macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:ident, $message:literal;)*) => {
        /// The stable error codes of the error contract (docs/errors.md).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn code(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }

            pub fn message(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $message,)*
                }
            }
        }
    };
}

error_codes! {
    BadRequest = "bad_request", BAD_REQUEST, "The request is malformed.";
    BadPath = "bad_path", BAD_REQUEST,
        "The request path is ambiguous: an encoded /, \\ or dot segment, a ; parameter, a control character, invalid UTF-8 or a .. above the root.";
    InvalidReturnUrl = "invalid_return_url", BAD_REQUEST,
        "returnUrl must be a local path such as /app.";
    InvalidPrompt = "invalid_prompt", BAD_REQUEST,
        "prompt must be one of none, login, consent or select_account, given once.";
    LoginFailed = "login_failed", BAD_REQUEST,
        "Sign-in could not be completed. Please start again.";
    Unauthenticated = "unauthenticated", UNAUTHORIZED, "Sign-in is required.";
    SessionExpired = "session_expired", UNAUTHORIZED,
        "The session has ended. Please sign in again.";
    StepUpRequired = "step_up_required", UNAUTHORIZED,
        "This needs a stronger or more recent sign-in. Please sign in again.";
    Csrf = "csrf", FORBIDDEN,
        "The request lacks the X-CSRF: 1 header or comes from another site.";
    Forbidden = "forbidden", FORBIDDEN, "You do not have access to this resource.";
    TokenRefused = "token_refused", FORBIDDEN,
        "The identity provider refused a token for this resource.";
    NotFound = "not_found", NOT_FOUND, "Nothing is here.";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED,
        "This method is not allowed here.";
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE, "The request body is too large.";
    HeadersTooLarge = "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE,
        "The request headers are too large.";
    RequestTimeout = "request_timeout", REQUEST_TIMEOUT, "The request body arrived too slowly.";
    RateLimited = "rate_limited", TOO_MANY_REQUESTS,
        "Too many requests from this address. Please retry later.";
    UpstreamUnavailable = "upstream_unavailable", BAD_GATEWAY,
        "The service behind this route is unavailable.";
    UpstreamTimeout = "upstream_timeout", GATEWAY_TIMEOUT,
        "The service behind this route did not answer in time.";
    StoreUnavailable = "store_unavailable", SERVICE_UNAVAILABLE,
        "The session store is unavailable. Please retry shortly.";
    ProviderUnavailable = "provider_unavailable", SERVICE_UNAVAILABLE,
        "The identity provider is unavailable. Please retry shortly.";
    Internal = "internal", INTERNAL_SERVER_ERROR, "Something went wrong.";
}

impl ErrorCode {
    /// A JSON error response; `extra` adds members such as `login_url`.
    pub fn json(self, extra: &[(&str, serde_json::Value)]) -> Response<Body> {
        let mut object = serde_json::Map::new();
        object.insert("error".into(), self.code().into());
        object.insert("message".into(), self.message().into());
        for (key, value) in extra {
            object.insert((*key).into(), value.clone());
        }
        json_response(self.status(), &serde_json::Value::Object(object))
    }

    /// A small HTML page for browser navigations.
    pub fn html(self) -> Response<Body> {
        self.html_with_reason("")
    }

    /// [`ErrorCode::html`] that also names a stable `reason`, a fixed identifier such as
    /// `token_type_invalid` (docs/errors.md lists them). Anything but `[a-z0-9_]` is dropped, so
    /// no input can reach the page through it.
    pub fn html_with_reason(self, reason: &str) -> Response<Body> {
        let reason: String = reason
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .take(64)
            .collect();
        let reason = if reason.is_empty() {
            reason
        } else {
            format!("; reason: {reason}")
        };
        let page = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{status}</title></head>\
             <body><h1>{title}</h1><p>{message}</p><p><a href=\"/\">Return to the application</a></p>\
             <p><small>error: {code}{reason}</small></p></body></html>",
            status = self.status().as_u16(),
            title = self.status().canonical_reason().unwrap_or("Error"),
            message = self.message(),
            code = self.code(),
        );
        let mut response = Response::new(full(page));
        *response.status_mut() = self.status();
        set_common(response.headers_mut(), "text/html; charset=utf-8");
        response
    }

    /// HTML for a browser navigation, JSON for a script.
    pub fn respond(self, reader: Reader) -> Response<Body> {
        match reader {
            Reader::Page => self.html(),
            Reader::Script => self.json(&[]),
        }
    }
}

fn set_common(headers: &mut HeaderMap, content_type: &'static str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    set_common(response.headers_mut(), "application/json");
    response
}

/// What a `Location` cannot carry as it is (RFC 3986: a URI is visible ASCII): controls, the
/// space and every byte of a non-ASCII character are percent-encoded; `%` stays, so what is
/// encoded already is not encoded twice.
const NOT_IN_A_URI: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ');

pub fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::FOUND;
    let location = percent_encoding::utf8_percent_encode(location, NOT_IN_A_URI).to_string();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Who reads an answer: a browser navigating (HTML pages and redirects) or a script (JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Page,
    Script,
}

impl Reader {
    pub fn of(headers: &HeaderMap) -> Self {
        if is_navigation(headers) {
            Reader::Page
        } else {
            Reader::Script
        }
    }
}

/// Is this request a top-level browser navigation (which wants HTML and redirects)?
pub fn is_navigation(headers: &HeaderMap) -> bool {
    // A `HeaderName` value: looked up by text, the name is parsed on every call.
    const SEC_FETCH_MODE: http::HeaderName = http::HeaderName::from_static("sec-fetch-mode");
    if let Some(mode) = headers.get(SEC_FETCH_MODE) {
        return mode.as_bytes() == b"navigate";
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

/// Buffers a worker lends for one answer's writing and takes back, the last one given back lent
/// first. A buffer of each connection's own sat out of the core's caches between its answers once
/// there are a few hundred connections, and was written into cold every time; the one given back
/// last is the one the last answer used. An idle connection holds none. Only the worker's own
/// thread takes the lock (uncontended); it makes the pool `Sync`, as the futures borrowing it
/// must be `Send`.
#[derive(Default)]
pub struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

/// The most buffers a pool keeps, and the largest it keeps (answers are flushed at 64 KiB).
pub const BUFFERS_KEPT: usize = 16;
pub const BUFFER_KEPT_SIZE: usize = 80 * 1024;

impl Buffers {
    /// An empty buffer, the one given back last if any.
    pub fn lend(&self) -> Lent<'_> {
        let kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        Lent {
            buf: kept.unwrap_or_else(|| Vec::with_capacity(1024)),
            home: self,
        }
    }

    /// How many buffers are kept.
    pub fn kept(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// A buffer lent by [`Buffers`], given back when dropped.
pub struct Lent<'p> {
    pub buf: Vec<u8>,
    home: &'p Buffers,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > BUFFER_KEPT_SIZE {
            return;
        }
        buf.clear();
        let mut kept = self
            .home
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < BUFFERS_KEPT {
            kept.push(buf);
        }
    }
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    #[test]
    fn lent_buffers_are_given_back_and_the_last_one_is_lent_first() {
        let buffers = Buffers::default();
        let mut first = buffers.lend();
        first.buf.extend_from_slice(b"an answer");
        let place = first.buf.as_ptr();
        drop(first);
        let again = buffers.lend();
        assert_eq!(
            again.buf.as_ptr(),
            place,
            "the buffer given back is lent again"
        );
        assert!(again.buf.is_empty(), "and comes back empty");
        // Two at once: two buffers; both kept.
        let other = buffers.lend();
        assert_ne!(other.buf.as_ptr(), place);
        drop((again, other));
        assert_eq!(buffers.kept(), 2);
        // One grown past what is kept is let go.
        let mut grown = buffers.lend();
        grown.buf.reserve(BUFFER_KEPT_SIZE * 2);
        drop(grown);
        assert_eq!(buffers.kept(), 1);
        // And no more than BUFFERS_KEPT are kept.
        let many: Vec<Lent<'_>> = (0..BUFFERS_KEPT + 4).map(|_| buffers.lend()).collect();
        drop(many);
        assert_eq!(buffers.kept(), BUFFERS_KEPT);
    }
}

#[cfg(test)]
mod redirect_tests {
    use super::*;

    /// A return URL with characters a header cannot carry as they are (a path in another
    /// script, a space) still redirects there, percent-encoded, never without a `Location`.
    #[test]
    fn a_redirect_to_a_path_with_non_ascii_characters_says_where() {
        for (to, location) in [
            ("/café?q=ü", "/caf%C3%A9?q=%C3%BC"),
            ("/a b", "/a%20b"),
            ("/already%20encoded", "/already%20encoded"),
            (
                "https://idp.example/logout?x=1",
                "https://idp.example/logout?x=1",
            ),
        ] {
            let response = redirect(to);
            assert_eq!(response.status(), StatusCode::FOUND);
            assert_eq!(
                response
                    .headers()
                    .get(header::LOCATION)
                    .map(|v| v.as_bytes()),
                Some(location.as_bytes()),
                "{to}"
            );
        }
    }
}
