//! Secrets rotate without a restart: `oidc.client_secret_file` and `session.keys_file` are read
//! again on every reload (an explicit one, as SIGHUP makes, or a change of the configuration file
//! or of one of these files on disk). A bad new file is refused and the running secrets stay.
//! Against the real OpenID provider, whose client secret is `vestibule-secret`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support::browser::Browser;
use crate::support::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A second session key (32 bytes, base64), test only.
const KEY2: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY=";

/// [`login_toml`] with its inline secrets replaced by the two files in `dir`.
/// Without PAR, so that a refused secret shows at the token endpoint (`code_rejected`).
fn with_secret_files(port: u16, issuer: &str, dir: &Path) -> TomlConfig {
    login_toml(port, issuer, "")
        .add("oidc.par", "never")
        .remove("oidc.client_secret")
        .add(
            "oidc.client_secret_file",
            dir.join("client_secret").display().to_string(),
        )
        .remove("session.keys")
        .add(
            "session.keys_file",
            dir.join("session_keys").display().to_string(),
        )
}

/// A proxy with the real provider whose client secret (`vestibule-secret`) and session keys
/// (`KEY`) are read from files in the returned directory; `config` adds to its configuration.
/// Returns the keys file too, and the provider, which must outlive the proxy's use.
async fn keys_file_proxy(
    config: impl FnOnce(TomlConfig) -> TomlConfig,
) -> (Proxy, provider::TestProvider, tempfile::TempDir, PathBuf) {
    let port = free_port();
    let provider = provider::start(port, serde_json::json!({}));
    let secrets = tempfile::tempdir().unwrap();
    let keys_file = secrets.path().join("session_keys");
    std::fs::write(secrets.path().join("client_secret"), "vestibule-secret").unwrap();
    std::fs::write(&keys_file, format!("{KEY}\n")).unwrap();
    let proxy = start_proxy(config(with_secret_files(
        port,
        &provider.issuer,
        secrets.path(),
    )))
    .await;
    wait_ready(&proxy).await;
    (proxy, provider, secrets, keys_file)
}

/// A proxy with the real provider whose client secret file holds a secret the provider no
/// longer takes (`the-old-secret`; the provider's is `vestibule-secret`), and session keys
/// (`KEY`) from a file beside it. Returns the secret file and the proxy's base URL too; the
/// provider and the directory must outlive the proxy's use.
async fn stale_secret_proxy() -> (
    Proxy,
    provider::TestProvider,
    tempfile::TempDir,
    PathBuf,
    String,
) {
    let port = free_port();
    let provider = provider::start(port, serde_json::json!({}));
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("client_secret");
    std::fs::write(&secret_file, "the-old-secret\n").unwrap();
    std::fs::write(secrets.path().join("session_keys"), format!("{KEY}\n")).unwrap();
    let proxy = start_proxy(with_secret_files(port, &provider.issuer, secrets.path())).await;
    wait_ready(&proxy).await;
    let base = format!("http://127.0.0.1:{port}");
    (proxy, provider, secrets, secret_file, base)
}

async fn user_status(browser: &mut Browser, base: &str) -> u16 {
    browser
        .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
        .await
        .status
}

#[tokio::test]
async fn a_rotated_client_secret_file_is_used_for_the_next_token_call() {
    let (proxy, _provider, _secrets, secret_file, base) = stale_secret_proxy().await;

    // The provider rotated the secret: the old one is refused at the token endpoint.
    let refused = Browser::default().login(&base, "alice", "alice", "/").await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.text().contains("code_rejected"),
        "{}",
        refused.text()
    );

    std::fs::write(&secret_file, "vestibule-secret\n").unwrap();
    proxy.app.reload("SIGHUP");
    let mut alice = Browser::default();
    let done = alice.login(&base, "alice", "alice", "/").await;
    assert_eq!(done.status, 302, "the new secret is used: {}", done.text());
    assert_eq!(user_status(&mut alice, &base).await, 200);

    // An empty file is refused; the secret in effect stays.
    std::fs::write(&secret_file, "\n").unwrap();
    proxy.app.reload("SIGHUP");
    let again = Browser::default().login(&base, "bob", "bob", "/").await;
    assert_eq!(again.status, 302, "{}", again.text());
}

#[tokio::test]
async fn a_rotated_keys_file_keeps_every_session_whose_key_it_still_holds() {
    let (proxy, _provider, _secrets, keys_file) = keys_file_proxy(|c| c).await;
    let base = proxy.url("");

    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);
    // Alice's cookie as sealed under the first key, kept aside (only clones of it are used, so
    // that no resealed cookie replaces it).
    let alice_then = alice.clone();
    // Bob's login is under way: his login cookie is sealed under the first key too.
    let mut bob = Browser::default();
    let bob_callback = bob.login_until_callback(&base, "bob", "/").await;

    // A new key first, the old one kept: nobody is signed out.
    std::fs::write(&keys_file, format!("# rotated\n{KEY2}\n\n{KEY}\n")).unwrap();
    proxy.app.reload("SIGHUP");
    assert_eq!(user_status(&mut alice, &base).await, 200);
    let finished = bob.get(&bob_callback, &[("accept", "text/html")]).await;
    assert_eq!(finished.status, 302, "{}", finished.text());
    assert_eq!(user_status(&mut bob, &base).await, 200);

    // A bad file is refused: the key ring in effect stays.
    std::fs::write(&keys_file, format!("{KEY2}\nnot-a-key\n")).unwrap();
    proxy.app.reload("SIGHUP");
    assert_eq!(user_status(&mut alice_then.clone(), &base).await, 200);

    // The old key retired by a change of the file alone (no explicit reload): a cookie sealed
    // only under it opens no session any more; the ones resealed under the new key still do.
    std::fs::write(&keys_file, format!("{KEY2}\n")).unwrap();
    let stale = alice_then;
    eventually(
        "the changed keys file is picked up",
        Duration::from_secs(10),
        || {
            let mut stale = stale.clone();
            let base = base.clone();
            async move { (user_status(&mut stale, &base).await == 401).then_some(()) }
        },
    )
    .await;
    assert_eq!(user_status(&mut stale.clone(), &base).await, 401);
    assert_eq!(user_status(&mut alice, &base).await, 200);
    assert_eq!(user_status(&mut bob, &base).await, 200);
    let mut alice_again = Browser::default();
    assert_eq!(
        alice_again.login(&base, "alice", "alice", "/").await.status,
        302
    );
    assert_eq!(user_status(&mut alice_again, &base).await, 200);
}

/// The shared DPoP key (`[oidc] dpop` without a key file) is kept in the store sealed with the
/// session keys. A rotation of `keys_file` (the new key first, the old one kept) seals it again
/// with the new key at the reload itself, whether or not any DPoP traffic comes in while both
/// keys are listed: once the old key is removed, every replica (and one started then) still
/// opens the one key that tokens are bound to, instead of making another.
#[tokio::test]
async fn a_keys_file_rotation_seals_the_stored_dpop_key_with_the_new_key_at_the_reload() {
    use base64::Engine as _;
    let (proxy, _provider, _secrets, keys_file) =
        keys_file_proxy(|c| c.add("oidc.dpop", true)).await;
    let store = proxy.app.sessions.store().clone();
    let stored = || {
        let store = store.clone();
        async move {
            let record = store.get(vestibule::state::DPOP_KEY_NAME).await.unwrap()?;
            Some(String::from_utf8(record.value.to_vec()).unwrap())
        }
    };
    let sealed = eventually("the DPoP key is stored", Duration::from_secs(10), stored).await;
    let opened = proxy
        .app
        .keyring()
        .open(vestibule::state::DPOP_KEY_NAME, &sealed)
        .expect("sealed with the session key");
    let new_key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(KEY2)
        .unwrap()
        .try_into()
        .unwrap();
    let new_ring = vestibule::session::seal::Keyring::new(vec![new_key]).unwrap();
    assert!(
        new_ring
            .open(vestibule::state::DPOP_KEY_NAME, &sealed)
            .is_none()
    );

    std::fs::write(&keys_file, format!("{KEY2}\n{KEY}\n")).unwrap();
    proxy.app.reload("SIGHUP");
    let resealed = eventually(
        "the stored DPoP key is sealed with the new key",
        Duration::from_secs(10),
        || {
            let (stored, new_ring) = (stored(), &new_ring);
            async move {
                let sealed = stored.await?;
                new_ring.open(vestibule::state::DPOP_KEY_NAME, &sealed)
            }
        },
    )
    .await;
    assert_eq!(
        resealed.plaintext, opened.plaintext,
        "the stored DPoP key was replaced, not sealed again"
    );
}

/// `oidc.client_auth` is restart-only. A file prepared for the next restart that switches the
/// client to `private_key_jwt` (valid on its own: a key file, no secret) was put in effect with
/// the running method and no secret: every code exchange and refresh authenticated with an
/// empty secret until a restart. The running credential is kept whole instead.
#[tokio::test]
async fn a_reload_for_another_client_auth_keeps_the_running_secret_until_a_restart() {
    let port = free_port();
    let provider = provider::start(port, serde_json::json!({}));
    let config = login_toml(port, &provider.issuer, "").add("oidc.par", "never");
    let proxy = start_proxy(config.clone()).await;
    wait_ready(&proxy).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);

    let key = proxy.dir.path().join("client-key.pem");
    std::fs::write(&key, include_str!("../fixtures/ec-p256.pem")).unwrap();
    let next = config
        .remove("oidc.client_secret")
        .add("oidc.client_auth", "private_key_jwt")
        .add("oidc.client_key_file", key.to_str().unwrap());
    std::fs::write(proxy.dir.path().join("config.toml"), next.text()).unwrap();
    proxy.app.reload("SIGHUP");

    let bob = Browser::default().login(&base, "bob", "bob", "/").await;
    assert_eq!(bob.status, 302, "{}", bob.text());
}

/// The watcher compares the files with what the running configuration was built from, not with
/// what they hold once the app has started: a keys file rotated between the load and the end of
/// the start (a Kubernetes Secret updated while the replica waits for Redis) is applied, where
/// it used to be taken for the running one and this replica kept the old ring.
#[tokio::test]
async fn a_keys_file_rotated_while_the_app_starts_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("session_keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let text = config_toml("")
        .remove("session.keys")
        .add("session.keys_file", keys.to_str().unwrap())
        .text();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    // What `vestibule` does: load, then (bind and) start the app.
    let config = vestibule::config::Config::load(&path).unwrap();
    std::fs::write(&keys, format!("{KEY2}\n{KEY}\n")).unwrap();
    let app = vestibule::app::App::start(config, path.clone())
        .await
        .unwrap();
    eventually(
        "the rotated keys file is applied",
        Duration::from_secs(5),
        || async { (app.live.load().config.session.keys.len() == 2).then_some(()) },
    )
    .await;
}

/// A third session key (32 bytes, base64), test only.
const KEY3: &str = "WllYV1ZVVFNSUVBPTk1MS0pJSEdGRURDQkE5ODc2NTQ=";

/// The 32 bytes of a base64 session key.
fn key_bytes(key: &str) -> [u8; 32] {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap()
        .try_into()
        .unwrap()
}

/// The configuration file `proxy` runs from, as written at its start.
fn running_toml(proxy: &Proxy) -> TomlConfig {
    TomlConfig::parse(&std::fs::read_to_string(proxy.dir.path().join("config.toml")).unwrap())
}

/// The client secret in the configuration in effect (the credential is swapped before it).
fn client_secret(proxy: &Proxy) -> Option<String> {
    let live = proxy.app.live.load();
    let secret = live.config.oidc.client_secret.as_ref()?;
    Some(secret.expose().to_string())
}

/// A configuration file staged for the next restart that the running process refuses (it turns
/// `oidc.dpop`, restart-only, on, and adds a `token_binding = "dpop"` route, which the running
/// client without DPoP cannot serve) blocked every rotation of a secret file until the restart:
/// the whole reload was refused, silently for the secrets. The secret files are read again on
/// their own, at the running paths (the staged file names a keys file of its own, which is not
/// the one in effect), while the staged file stays refused.
#[tokio::test]
async fn a_keys_file_rotation_is_applied_while_the_configuration_file_is_refused() {
    let (proxy, _provider, secrets, keys_file) = keys_file_proxy(|c| c).await;
    let base = proxy.url("");
    let mut alice = Browser::default();
    assert_eq!(alice.login(&base, "alice", "alice", "/").await.status, 302);
    // Sealed under KEY only, kept aside.
    let alice_then = alice.clone();

    let staged_keys = secrets.path().join("staged_session_keys");
    std::fs::write(&staged_keys, format!("{KEY3}\n")).unwrap();
    let staged = running_toml(&proxy)
        .add("oidc.dpop", true)
        .set("session.keys_file", staged_keys.display().to_string())
        .text();
    let staged = format!(
        "{staged}\n[[routes]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:9\"\ntoken = \"user\"\ntoken_binding = \"dpop\"\n"
    );
    std::fs::write(proxy.dir.path().join("config.toml"), &staged).unwrap();
    let keys = || proxy.app.live.load().config.session.keys.clone();
    let refused = || {
        let live = proxy.app.live.load();
        live.config.routes.is_empty() && !live.config.oidc.dpop
    };
    proxy.app.reload("SIGHUP");
    assert!(refused(), "the staged file is refused");
    assert_eq!(keys(), [key_bytes(KEY)]);

    // A new key first, the old one kept: applied at once by an explicit reload.
    std::fs::write(&keys_file, format!("{KEY2}\n{KEY}\n")).unwrap();
    proxy.app.reload("SIGHUP");
    assert_eq!(
        keys(),
        [key_bytes(KEY2), key_bytes(KEY)],
        "the running keys file is read again with the configuration file refused"
    );
    assert!(refused());
    assert_eq!(user_status(&mut alice_then.clone(), &base).await, 200);

    // A bad keys file is refused on its own: the ring in effect stays.
    std::fs::write(&keys_file, format!("{KEY2}\nnot-a-key\n")).unwrap();
    proxy.app.reload("SIGHUP");
    assert_eq!(keys(), [key_bytes(KEY2), key_bytes(KEY)]);

    // The old key retired by a change of the file alone, which the watcher applies.
    std::fs::write(&keys_file, format!("{KEY2}\n")).unwrap();
    eventually(
        "the rotated keys file is applied by the watcher",
        Duration::from_secs(10),
        || async { (keys() == [key_bytes(KEY2)]).then_some(()) },
    )
    .await;
    assert!(refused());
    assert_eq!(user_status(&mut alice_then.clone(), &base).await, 401);
    let mut alice_again = Browser::default();
    assert_eq!(
        alice_again.login(&base, "alice", "alice", "/").await.status,
        302
    );
    assert_eq!(user_status(&mut alice_again, &base).await, 200);
}

/// The same for `oidc.client_secret_file`, with a configuration file that simply has an error:
/// the token endpoint sees the rotated secret without an explicit reload.
#[tokio::test]
async fn a_client_secret_file_rotation_is_applied_while_the_configuration_file_is_refused() {
    let (proxy, _provider, _secrets, secret_file, base) = stale_secret_proxy().await;
    let refused = Browser::default().login(&base, "alice", "alice", "/").await;
    assert_eq!(refused.status, 400, "{}", refused.text());

    let staged = running_toml(&proxy).add("server.no_such_key", 1).text();
    std::fs::write(proxy.dir.path().join("config.toml"), staged).unwrap();
    std::fs::write(&secret_file, "vestibule-secret\n").unwrap();
    eventually(
        "the rotated client secret is applied by the watcher",
        Duration::from_secs(10),
        || async { (client_secret(&proxy).as_deref() == Some("vestibule-secret")).then_some(()) },
    )
    .await;
    let done = Browser::default().login(&base, "alice", "alice", "/").await;
    assert_eq!(done.status, 302, "the new secret is used: {}", done.text());

    // An empty file is refused; the secret in effect stays.
    std::fs::write(&secret_file, "\n").unwrap();
    proxy.app.reload("SIGHUP");
    let again = Browser::default().login(&base, "bob", "bob", "/").await;
    assert_eq!(again.status, 302, "{}", again.text());
}

/// While a change of `oidc.client_auth` waits for a restart, the running credential is kept
/// whole; its `client_secret_file` was no longer watched (the watcher followed the staged
/// file's secret files, here none) nor read again (the secret in memory was kept): a rotation
/// of it waited for the restart. It stays watched, and the token endpoint sees the new secret.
#[tokio::test]
async fn a_client_auth_change_waiting_for_a_restart_keeps_the_running_secret_file_rotating() {
    let (proxy, _provider, _secrets, secret_file, base) = stale_secret_proxy().await;

    let key = proxy.dir.path().join("client-key.pem");
    std::fs::write(&key, include_str!("../fixtures/ec-p256.pem")).unwrap();
    let staged = running_toml(&proxy)
        .remove("oidc.client_secret_file")
        .add("oidc.client_auth", "private_key_jwt")
        .add("oidc.client_key_file", key.to_str().unwrap())
        .text();
    std::fs::write(proxy.dir.path().join("config.toml"), &staged).unwrap();
    proxy.app.reload("SIGHUP");
    assert_eq!(
        proxy.app.live.load().config.sources.text,
        staged,
        "the staged file is applied, its credential kept for the restart"
    );
    let refused = Browser::default().login(&base, "alice", "alice", "/").await;
    assert_eq!(refused.status, 400, "{}", refused.text());

    std::fs::write(&secret_file, "vestibule-secret\n").unwrap();
    eventually(
        "the rotated running client secret is applied by the watcher",
        Duration::from_secs(10),
        || async { (client_secret(&proxy).as_deref() == Some("vestibule-secret")).then_some(()) },
    )
    .await;
    let done = Browser::default().login(&base, "alice", "alice", "/").await;
    assert_eq!(done.status, 302, "the new secret is used: {}", done.text());
}
