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

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The stable error codes of the error contract (docs/errors.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadPath,
    InvalidReturnUrl,
    LoginFailed,
    Unauthenticated,
    SessionExpired,
    StepUpRequired,
    Csrf,
    Forbidden,
    TokenRefused,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    HeadersTooLarge,
    RequestTimeout,
    RateLimited,
    UpstreamUnavailable,
    UpstreamTimeout,
    StoreUnavailable,
    ProviderUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn code(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadPath => "bad_path",
            ErrorCode::InvalidReturnUrl => "invalid_return_url",
            ErrorCode::LoginFailed => "login_failed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::StepUpRequired => "step_up_required",
            ErrorCode::Csrf => "csrf",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TokenRefused => "token_refused",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::BadPath
            | ErrorCode::InvalidReturnUrl
            | ErrorCode::LoginFailed => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated | ErrorCode::SessionExpired | ErrorCode::StepUpRequired => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::Csrf | ErrorCode::Forbidden | ErrorCode::TokenRefused => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::StoreUnavailable | ErrorCode::ProviderUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "The request is malformed.",
            ErrorCode::BadPath => {
                "The request path is ambiguous: an encoded /, \\ or dot segment, a ; parameter, a control character, invalid UTF-8 or a .. above the root."
            }
            ErrorCode::InvalidReturnUrl => "returnUrl must be a local path such as /app.",
            ErrorCode::LoginFailed => "Sign-in could not be completed. Please start again.",
            ErrorCode::Unauthenticated => "Sign-in is required.",
            ErrorCode::SessionExpired => "The session has ended. Please sign in again.",
            ErrorCode::StepUpRequired => {
                "This needs a stronger or more recent sign-in. Please sign in again."
            }
            ErrorCode::Csrf => "The request lacks the X-CSRF: 1 header or comes from another site.",
            ErrorCode::Forbidden => "You do not have access to this resource.",
            ErrorCode::TokenRefused => "The identity provider refused a token for this resource.",
            ErrorCode::NotFound => "Nothing is here.",
            ErrorCode::MethodNotAllowed => "This method is not allowed here.",
            ErrorCode::PayloadTooLarge => "The request body is too large.",
            ErrorCode::HeadersTooLarge => "The request headers are too large.",
            ErrorCode::RequestTimeout => "The request body arrived too slowly.",
            ErrorCode::RateLimited => "Too many requests from this address. Please retry later.",
            ErrorCode::UpstreamUnavailable => "The service behind this route is unavailable.",
            ErrorCode::UpstreamTimeout => "The service behind this route did not answer in time.",
            ErrorCode::StoreUnavailable => {
                "The session store is unavailable. Please retry shortly."
            }
            ErrorCode::ProviderUnavailable => {
                "The identity provider is unavailable. Please retry shortly."
            }
            ErrorCode::Internal => "Something went wrong.",
        }
    }

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

pub fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(location) {
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
    if let Some(mode) = headers.get("sec-fetch-mode") {
        return mode.as_bytes() == b"navigate";
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}
