//! The static SPA route: content types, 304s, ranges, precompressed files, fallback rules and
//! traversal attempts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;

async fn spa() -> Proxy {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(
        site.path().join("index.html"),
        "<!doctype html><title>spa</title>",
    )
    .unwrap();
    std::fs::write(site.path().join("app.js"), "console.log('0123456789');").unwrap();
    std::fs::write(site.path().join("style.css"), "body{}").unwrap();
    std::fs::write(site.path().join("style.css.gz"), b"\x1f\x8bfake-gzip").unwrap();
    let dir = site.path().display().to_string();
    std::mem::forget(site);
    start_proxy(&config_text(&format!(
        "[[routes]]\npath = \"/\"\nstatic_dir = \"{dir}\"\nspa_fallback = \"index.html\"\n"
    )))
    .await
}

#[tokio::test]
async fn files_have_content_types_and_etags_that_give_304() {
    let proxy = spa().await;
    let r = get(&proxy.url("/app.js"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().contains("javascript"));
    let etag = r.header("etag").unwrap().to_string();
    assert!(r.header("last-modified").is_some());
    let again = get(&proxy.url("/app.js"), &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
}

#[tokio::test]
async fn range_requests_and_precompressed_files_work() {
    let proxy = spa().await;
    let r = get(&proxy.url("/app.js"), &[("range", "bytes=0-6")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.text(), "console");
    let gz = get(&proxy.url("/style.css"), &[("accept-encoding", "gzip")]).await;
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert!(gz.header("content-type").unwrap().contains("css"));
}

#[tokio::test]
async fn fallback_serves_index_only_to_navigations() {
    let proxy = spa().await;
    let nav = get(
        &proxy.url("/dashboard/settings"),
        &[("accept", "text/html")],
    )
    .await;
    assert_eq!(nav.status, 200);
    assert!(nav.text().contains("<title>spa</title>"));
    let script = get(&proxy.url("/missing.js"), &[("accept", "*/*")]).await;
    assert_eq!(script.status, 404);
    let css = get(&proxy.url("/missing.css"), &[]).await;
    assert_eq!(css.status, 404);
}

#[tokio::test]
async fn traversal_attempts_never_escape_the_directory() {
    let proxy = spa().await;
    for path in [
        "/..%2f..%2fetc/passwd",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%5c..%5cetc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
    ] {
        let r = get(&proxy.url(path), &[]).await;
        assert!(
            r.status == 404 || r.status == 400,
            "{path} gave {}",
            r.status
        );
        assert!(!r.text().contains("root:"), "{path} leaked a system file");
    }
}
