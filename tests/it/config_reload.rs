//! How a configuration reaches the running process without a signal, in each shape the file
//! system shows it: a Kubernetes ConfigMap or Secret volume swapping its `..data` symbolic link,
//! an editor renaming a new file over the old one, and a tool that truncates the file and writes
//! it in parts. Each either applies the whole new configuration or keeps the running one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The proxy started from the configuration file at `path` (as the binary would be).
async fn start_at(
    path: &Path,
) -> (
    Arc<vestibule::app::App>,
    tokio_util::sync::CancellationToken,
) {
    let config = vestibule::config::Config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    let bound = vestibule::server::bind(&config).await.unwrap();
    let app = vestibule::app::App::start(config, path.to_path_buf())
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(vestibule::server::serve(
        app.clone(),
        bound,
        shutdown.clone(),
    ));
    (app, shutdown)
}

/// `[[routes]]` blocks for `/r0/` … `/r{n-1}/` (to an address nothing listens on: only the
/// configuration is looked at).
fn routes(n: usize) -> String {
    (0..n)
        .map(|i| format!("[[routes]]\npath = \"/r{i}/\"\nupstream = \"http://127.0.0.1:9\"\n"))
        .collect()
}

/// The route paths in effect.
fn paths(app: &vestibule::app::App) -> Vec<String> {
    let live = app.live.load();
    live.config.routes.iter().map(|r| r.path.clone()).collect()
}

/// Kubernetes updates a ConfigMap or Secret volume by writing the new files into a new
/// directory and swapping the `..data` link to it; the files the program opens are links
/// through `..data`. The configuration file and the keys file beside it change together, and
/// both are applied.
#[tokio::test]
async fn a_kubernetes_volume_swap_applies_the_new_files_together() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("session-keys");
    let version = |name: &str, n: usize, keys: &str| {
        let at = dir.path().join(name);
        std::fs::create_dir(&at).unwrap();
        let text = config_toml(&routes(n))
            .remove("session.keys")
            .add("session.keys_file", keys_file.display().to_string())
            .text();
        std::fs::write(at.join("config.toml"), text).unwrap();
        std::fs::write(at.join("session-keys"), keys).unwrap();
    };
    let other = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY=";
    version("..2026_12_07_10_00_00.1", 1, &format!("{KEY}\n"));
    std::os::unix::fs::symlink("..2026_12_07_10_00_00.1", dir.path().join("..data")).unwrap();
    for file in ["config.toml", "session-keys"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), dir.path().join(file)).unwrap();
    }
    let (app, shutdown) = start_at(&dir.path().join("config.toml")).await;
    assert_eq!(paths(&app), ["/r0/"]);

    version("..2026_12_07_10_05_00.2", 2, &format!("{other}\n{KEY}\n"));
    std::os::unix::fs::symlink("..2026_12_07_10_05_00.2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(dir.path().join("..2026_12_07_10_00_00.1")).unwrap();
    eventually(
        "the swapped volume is applied",
        Duration::from_secs(10),
        || async { (paths(&app).len() == 2).then_some(()) },
    )
    .await;
    let live = app.live.load();
    assert_eq!(
        live.config.session.keys.len(),
        2,
        "the keys file came with it"
    );
    shutdown.cancel();
}

/// An editor writes the new text to a temporary file and renames it over the old one.
#[tokio::test]
async fn a_file_renamed_over_the_configuration_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text(&routes(1))).unwrap();
    let (app, shutdown) = start_at(&path).await;
    let temporary = dir.path().join(".config.toml.swp");
    std::fs::write(&temporary, config_text(&routes(3))).unwrap();
    std::fs::rename(&temporary, &path).unwrap();
    eventually(
        "the renamed file is applied",
        Duration::from_secs(10),
        || async { (paths(&app).len() == 3).then_some(()) },
    )
    .await;
    shutdown.cancel();
}

/// A tool that truncates the file and writes it in parts leaves it half-written for a while,
/// and a file cut after a complete route is a valid configuration: the watcher applied such a
/// part (a site with some of its routes, every other path answered 404 until the next look),
/// and then the next. A change is applied once two looks a second apart find the same bytes:
/// only the whole file is ever in effect.
#[tokio::test]
async fn a_file_being_written_in_parts_is_not_applied_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let (before, after) = (1, 8);
    std::fs::write(&path, config_text(&routes(before))).unwrap();
    let (app, shutdown) = start_at(&path).await;

    // Every set of routes in effect, sampled while the file is written and until it applies.
    let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (app, seen, done) = (app.clone(), seen.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                seen.lock().unwrap().insert(paths(&app).len());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Truncated, then the head and the first route (what ran before), then a route every 250 ms.
    let parts: Vec<String> =
        std::iter::once(config_text(&routes(before)))
            .chain((before..after).map(|i| {
                format!("[[routes]]\npath = \"/r{i}/\"\nupstream = \"http://127.0.0.1:9\"\n")
            }))
            .collect();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for part in &parts {
            file.write_all(part.as_bytes()).unwrap();
            file.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eventually(
        "the whole file is applied",
        Duration::from_secs(10),
        || async { (paths(&app).len() == after).then_some(()) },
    )
    .await;
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    seen.lock().unwrap().insert(paths(&app).len());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [before, after].into(),
        "route counts in effect while the file was written"
    );
    shutdown.cancel();
}
