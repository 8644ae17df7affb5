//! The static SPA route: content types, 304s, ranges, precompressed files, fallback rules and
//! traversal attempts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;

async fn spa() -> Proxy {
    spa_in(tempfile::tempdir().unwrap().keep()).await
}

/// Text of a file one level above the site, which no request may reach.
const OUTSIDE: &str = "outside-the-site-9f3c2e";

/// The SPA served from `parent/site`, with a file holding [`OUTSIDE`] in `parent`.
async fn spa_in(parent: std::path::PathBuf) -> Proxy {
    let site = parent.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(parent.join("outside.txt"), OUTSIDE).unwrap();
    std::fs::write(site.join("index.html"), "<!doctype html><title>spa</title>").unwrap();
    std::fs::write(site.join("app.js"), "console.log('0123456789');").unwrap();
    std::fs::write(site.join("style.css"), "body{}").unwrap();
    std::fs::write(site.join("style.css.gz"), b"\x1f\x8bfake-gzip").unwrap();
    let dir = site.display().to_string();
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

/// The SPA's shell (`index.html`, however it is asked for) is revalidated on every navigation,
/// so a deploy reaches users at once: it names the scripts of its own build. Its 304s say so
/// too, and keep the `Vary` of the full answer.
#[tokio::test]
async fn the_spa_shell_is_revalidated_however_it_is_asked_for() {
    let proxy = spa().await;
    for path in ["/", "/index.html", "/dashboard"] {
        let r = get(&proxy.url(path), &[("accept", "text/html")]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{path}");
        let etag = r.header("etag").unwrap().to_string();
        let again = get(
            &proxy.url(path),
            &[("accept", "text/html"), ("if-none-match", &etag)],
        )
        .await;
        assert_eq!(again.status, 304, "{path}");
        assert_eq!(again.header("cache-control"), Some("no-cache"), "{path}");
        assert_eq!(again.header("vary"), r.header("vary"), "{path}");
    }
    // Other files keep the browser's own heuristics (their names change with each build).
    let r = get(&proxy.url("/app.js"), &[]).await;
    assert_eq!(r.header("cache-control"), None);
}

#[tokio::test]
async fn traversal_attempts_never_escape_the_directory() {
    let parent = tempfile::tempdir().unwrap().keep();
    // Enough `..` to climb from the site to `/` whatever the depth of the temporary directory.
    let depth = parent.join("site").components().count();
    let proxy = spa_in(parent).await;
    let ups = |up: &str, n: usize| up.repeat(n);
    let mut paths = Vec::new();
    for up in [
        "../",
        "..%2f",
        "..%2F",
        "%2e%2e/",
        "%2e%2e%2f",
        ".%2e/",
        "..%5c",
    ] {
        paths.push(format!("/{}outside.txt", ups(up, 1)));
        paths.push(format!("/{}etc/passwd", ups(up, depth)));
        paths.push(format!("/static/{}etc%2fpasswd", ups(up, depth + 1)));
    }
    for path in &paths {
        let r = get(&proxy.url(path), &[]).await;
        assert!(
            !r.text().contains(OUTSIDE),
            "{path} read a file outside the site"
        );
        assert!(!r.text().contains("root:"), "{path} leaked a system file");
        assert!(
            r.status == 404 || r.status == 400,
            "{path} gave {}",
            r.status
        );
    }
}

/// Files behind a session are the signed-in user's: a shared cache in front (a CDN) must not
/// keep them for the next visitor, who would get them without a session. The session is a
/// cookie, not `Authorization`, so nothing else tells the cache.
#[tokio::test]
async fn files_behind_a_session_are_private_to_caches_and_public_ones_are_not() {
    let parent = tempfile::tempdir().unwrap().keep();
    for name in ["members", "public"] {
        std::fs::create_dir_all(parent.join(name)).unwrap();
        std::fs::write(parent.join(name).join("report.txt"), "quarterly").unwrap();
    }
    let dir = |name: &str| parent.join(name).display().to_string();
    let proxy = start_proxy(&config_text(&format!(
        "[[routes]]\npath = \"/members/\"\nstatic_dir = \"{}\"\nstrip_prefix = true\nauth = \"required\"\n\
         [[routes]]\npath = \"/public/\"\nstatic_dir = \"{}\"\nstrip_prefix = true\n",
        dir("members"),
        dir("public")
    )))
    .await;
    let cookie = proxy
        .session_cookie(vestibule::session::Session {
            sub: "alice".into(),
            ..Default::default()
        })
        .await;
    let r = get(&proxy.url("/members/report.txt"), &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("private, no-cache"));
    let etag = r.header("etag").unwrap().to_string();
    let again = get(
        &proxy.url("/members/report.txt"),
        &[("cookie", &cookie), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(again.status, 304);
    assert_eq!(again.header("cache-control"), Some("private, no-cache"));
    let open = get(&proxy.url("/public/report.txt"), &[]).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.header("cache-control"), None);
}

/// Files and directories whose names start with a dot (`.env`, `.git`) are never served: they
/// hold what a build leaves behind, not the site. `/.well-known/` is the exception it is meant
/// to be.
#[tokio::test]
async fn dotfiles_are_never_served_but_well_known_is() {
    let site = tempfile::tempdir().unwrap().keep();
    std::fs::write(site.join(".env"), "DB_PASSWORD=hunter2").unwrap();
    std::fs::create_dir_all(site.join(".git")).unwrap();
    std::fs::write(site.join(".git").join("config"), "[remote]").unwrap();
    std::fs::create_dir_all(site.join("a").join(".hidden")).unwrap();
    std::fs::write(site.join("a").join(".hidden").join("x.txt"), "x").unwrap();
    std::fs::create_dir_all(site.join(".well-known")).unwrap();
    std::fs::write(site.join(".well-known").join("security.txt"), "Contact: x").unwrap();
    let proxy = start_proxy(&config_text(&format!(
        "[[routes]]\npath = \"/\"\nstatic_dir = \"{}\"\n",
        site.display()
    )))
    .await;
    for path in [
        "/.env",
        "/.git/config",
        "/a/.hidden/x.txt",
        "/.ENV",
        "/%2eenv",
        "/%2Egit/config",
        "/a/%2ehidden/x.txt",
    ] {
        let r = get(&proxy.url(path), &[]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(!r.text().contains("hunter2"));
    }
    let r = get(&proxy.url("/.well-known/security.txt"), &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "Contact: x"));
}

/// A site with `docs/guide/index.html` and `evil.example/x/index.html` (directories a hostile
/// path could name), served at `/` and, with `strip_prefix`, at `/assets/`.
async fn site_with_directories() -> Proxy {
    let site = tempfile::tempdir().unwrap().keep();
    for dir in ["docs/guide", "evil.example/x"] {
        std::fs::create_dir_all(site.join(dir)).unwrap();
        std::fs::write(site.join(dir).join("index.html"), format!("<p>{dir}</p>")).unwrap();
    }
    let dir = site.display();
    start_proxy(&config_text(&format!(
        "[[routes]]\npath = \"/assets/\"\nstatic_dir = \"{dir}\"\nstrip_prefix = true\n\
         [[routes]]\npath = \"/\"\nstatic_dir = \"{dir}\"\n"
    )))
    .await
}

/// A directory's index is revalidated however it is asked for, on a site without a
/// `spa_fallback` too: as the directory (`/docs/guide/`) or by its name
/// (`/docs/guide/index.html`, a link or a bookmark), the same page with the same build's
/// script names. Asked for by name it was left to the browser's heuristics (a tenth of its age
/// since `Last-Modified`): a deploy would not reach users who had it for hours.
#[tokio::test]
async fn a_directorys_index_is_revalidated_however_it_is_asked_for() {
    let proxy = site_with_directories().await;
    for path in [
        "/docs/guide/",
        "/docs/guide/index.html",
        "/assets/docs/guide/",
        "/assets/docs/guide/index.html",
    ] {
        let r = get(&proxy.url(path), &[("accept", "text/html")]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{path}");
    }
}

/// A directory asked for without its trailing slash is redirected to the path the client asked
/// for with the slash: under the route's prefix as the client sees it (not the path the
/// directory saw, which `strip_prefix` shortened), the query kept.
#[tokio::test]
async fn a_directory_is_redirected_to_its_slash_under_the_routes_prefix_with_the_query() {
    let proxy = site_with_directories().await;
    for (asked, wanted) in [
        ("/assets/docs/guide", "/assets/docs/guide/"),
        (
            "/assets/docs/guide?v=2&tab=a%20b",
            "/assets/docs/guide/?v=2&tab=a%20b",
        ),
        ("/ASSETS/docs/guide", "/ASSETS/docs/guide/"),
        ("/assets/./docs//guide?v=1", "/assets/docs/guide/?v=1"),
        ("/docs/guide?v=3", "/docs/guide/?v=3"),
    ] {
        let r = get(&proxy.url(asked), &[]).await;
        assert!(
            (300..400).contains(&r.status),
            "{asked}: {} {}",
            r.status,
            r.text()
        );
        assert_eq!(r.header("location"), Some(wanted), "{asked}");
        let there = get(&proxy.url(wanted), &[]).await;
        assert_eq!(
            (there.status, there.text().as_str()),
            (200, "<p>docs/guide</p>"),
            "{asked} -> {wanted}"
        );
    }
}

/// However the path is spelt, a directory redirect stays on this origin: never a
/// `Location` a browser reads as another host (`//evil.example/…`, `/\evil.example/…`).
#[tokio::test]
async fn a_directory_redirect_never_leaves_the_origin() {
    let proxy = site_with_directories().await;
    for asked in [
        "//evil.example/x",
        "//evil.example/x?next=1",
        "///evil.example/x",
        "/assets//evil.example/x",
        "/assets/../assets//evil.example/x",
        "/./evil.example/x",
        "/%2Fevil.example/x",
        "/assets/%2F%2Fevil.example/x",
        "/%5Cevil.example/x",
    ] {
        let r = get(&proxy.url(asked), &[]).await;
        let Some(location) = r.header("location") else {
            assert!(
                r.status == 400 || r.status == 404,
                "{asked}: {} without a Location",
                r.status
            );
            continue;
        };
        assert!(
            location.starts_with('/')
                && !location.starts_with("//")
                && !location.starts_with("/\\"),
            "{asked}: Location {location} leaves the origin"
        );
        assert!(location.ends_with("evil.example/x/") || location.contains("evil.example/x/?"));
    }
}
