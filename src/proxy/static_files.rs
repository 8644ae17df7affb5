//! Static SPA files, served by tower-http's `ServeDir` (content types, Last-Modified, ranges,
//! precompressed `.br`/`.gz`, no traversal), plus a weak ETag with 304s and the SPA fallback:
//! `index.html` only for navigations, so a missing `.js` or `.css` stays a 404. A directory
//! asked for without its trailing slash is redirected to the client's own path with it (the
//! route's prefix and the query kept, never another host).

use crate::reply::{Body, BoxError, ErrorCode, Reader};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use std::path::Path;
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

/// Serves `path` of `dir`. `private`: the route is behind a session (or a feature flag), so its
/// files are the signed-in user's: every answer says `Cache-Control: private, no-cache`, so that
/// no shared cache in front keeps them for the next visitor (the session is a cookie, which
/// tells a cache nothing), and the browser asks again (a cheap 304) rather than show them after
/// a logout.
pub async fn serve(
    dir: &Path,
    spa_fallback: Option<&str>,
    path: &str,
    req: &Request<()>,
    private: bool,
) -> Response<Body> {
    let mut response = serve_file(dir, spa_fallback, path, req).await;
    if private
        && matches!(
            response.status(),
            StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
    {
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
    }
    response
}

async fn serve_file(
    dir: &Path,
    spa_fallback: Option<&str>,
    path: &str,
    req: &Request<()>,
) -> Response<Body> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return ErrorCode::MethodNotAllowed.json(&[]);
    }
    let reader = Reader::of(req.headers());
    if is_hidden(path) {
        return ErrorCode::NotFound.respond(reader);
    }
    let inner = match rebuild(req, path) {
        Some(r) => r,
        None => return ErrorCode::NotFound.respond(reader),
    };
    let service = ServeDir::new(dir).precompressed_br().precompressed_gzip();
    let mut response = match service.oneshot(inner).await {
        Ok(r) => r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
        Err(never) => match never {},
    };
    // A directory asked for without its slash: ServeDir sends the client to the path it was
    // given, which lacks the route's prefix when `strip_prefix` took it off, and the query.
    // (ServeDir's only redirect; its 304s are 3xx too.)
    if response.status() == StatusCode::TEMPORARY_REDIRECT {
        let Some(location) = directory_location(req.uri()) else {
            return ErrorCode::NotFound.respond(reader);
        };
        response.headers_mut().insert(header::LOCATION, location);
        return response;
    }
    // The shell asked for by name or as a directory's index, and a directory's index asked
    // for by name (what ServeDir serves for the directory): revalidated, as the fallback is.
    let shell = path.ends_with('/')
        || path.ends_with("/index.html")
        || spa_fallback.is_some_and(|f| path.strip_prefix('/') == Some(f));
    if shell && response.status() == StatusCode::OK {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if response.status() == StatusCode::NOT_FOUND {
        let fallback = spa_fallback.filter(|_| reader == Reader::Page);
        let Some(file) = fallback else {
            return ErrorCode::NotFound.respond(reader);
        };
        let inner = match rebuild(req, path) {
            Some(r) => r,
            None => return ErrorCode::NotFound.respond(reader),
        };
        response = match ServeFile::new(dir.join(file)).oneshot(inner).await {
            Ok(r) => r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
            Err(never) => match never {},
        };
        if response.status() == StatusCode::NOT_FOUND {
            return ErrorCode::NotFound.respond(reader);
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    with_etag(req, response)
}

/// Whether `path` names a file or directory whose name starts with a dot (`.env`, `.git/`): what
/// a build or a checkout leaves in a directory, never the site. `/.well-known/` is served.
fn is_hidden(path: &str) -> bool {
    path.split('/')
        .enumerate()
        .any(|(at, segment)| segment.starts_with('.') && !(at == 1 && segment == ".well-known"))
}

/// Where a directory asked for without its trailing slash is found: the path the client asked
/// for (the route's prefix included, canonical), the slash added, the query kept. Only ever a
/// path on this origin: `None` for one a browser would read as another host (`//host/…`,
/// `/\host/…`), which a canonical path never is.
fn directory_location(uri: &Uri) -> Option<HeaderValue> {
    let path = uri.path();
    let below_root = path.strip_prefix('/')?;
    if below_root.starts_with(['/', '\\']) {
        return None;
    }
    let query = uri.query();
    let mut text = String::with_capacity(path.len() + 2 + query.map_or(0, str::len));
    text.push_str(path);
    text.push('/');
    if let Some(query) = query {
        text.push('?');
        text.push_str(query);
    }
    HeaderValue::from_str(&text).ok()
}

/// A body-less copy of the request with the path the directory should see.
fn rebuild(req: &Request<()>, path: &str) -> Option<Request<http_body_util::Empty<bytes::Bytes>>> {
    let mut builder = Request::builder().method(req.method()).uri(path);
    for (name, value) in req.headers() {
        builder = builder.header(name, value);
    }
    builder.body(http_body_util::Empty::new()).ok()
}

/// Adds a weak ETag derived from size, modification time and encoding, and answers 304 when
/// the browser already holds it.
fn with_etag(req: &Request<()>, mut response: Response<Body>) -> Response<Body> {
    if response.status() != StatusCode::OK {
        return response;
    }
    let h = response.headers();
    let (Some(modified), Some(length)) =
        (h.get(header::LAST_MODIFIED), h.get(header::CONTENT_LENGTH))
    else {
        return response;
    };
    let encoding = h
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes())
        .unwrap_or(b"identity");
    let mut seed = Vec::new();
    seed.extend_from_slice(modified.as_bytes());
    seed.extend_from_slice(length.as_bytes());
    seed.extend_from_slice(encoding);
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&seed);
    let tag = format!("W/\"{}\"", hex::encode(&digest[..8]));
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let Ok(value) = HeaderValue::from_str(&tag) else {
        return response;
    };
    if matches {
        let mut not_modified = Response::new(crate::reply::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        not_modified.headers_mut().insert(header::ETAG, value);
        // What the full answer says of caching stands for its 304 (RFC 9110 §15.4.5).
        for name in [header::LAST_MODIFIED, header::CACHE_CONTROL, header::VARY] {
            if let Some(v) = response.headers().get(&name) {
                not_modified.headers_mut().insert(name, v.clone());
            }
        }
        return not_modified;
    }
    response.headers_mut().insert(header::ETAG, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(uri: &str) -> Option<String> {
        let uri: Uri = uri.parse().unwrap();
        directory_location(&uri).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn a_directory_location_is_the_clients_path_with_a_slash_and_the_query() {
        assert_eq!(location("/assets/dir").as_deref(), Some("/assets/dir/"));
        assert_eq!(
            location("/assets/dir?v=1&x=%20").as_deref(),
            Some("/assets/dir/?v=1&x=%20")
        );
        assert_eq!(location("/a%2Fb").as_deref(), Some("/a%2Fb/"));
    }

    #[test]
    fn a_directory_location_never_names_another_host() {
        for hostile in [
            "//evil.example/x",
            "//evil.example",
            "///evil.example/x",
            "/\\evil.example/x",
            "*",
        ] {
            assert_eq!(location(hostile), None, "{hostile}");
        }
    }
}
