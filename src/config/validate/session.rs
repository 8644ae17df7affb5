//! `[session]` and `[session.redis]`.

use super::*;

pub(super) fn session_config(
    raw: raw::Session,
    base: &Path,
    problems: &mut Problems,
) -> Option<SessionConfig> {
    let raw::Session {
        store,
        cookie_name,
        cookie_secure,
        same_site,
        idle_timeout,
        absolute_timeout,
        keys,
        keys_file,
        max_entries,
        max_per_user,
        cache_ttl,
        cache_entries,
        redis,
    } = raw;
    let cookie_secure = cookie_secure.unwrap_or(true);
    let mut cookie_name = cookie_name.unwrap_or_else(|| "__Host-vestibule".into());
    // Browsers refuse a cookie named `__Host-…` or `__Secure-…` (in any case) without `Secure`:
    // over plain http the prefix goes, or no sign-in could complete.
    if !cookie_secure {
        for prefix in ["__Host-", "__Secure-"] {
            if let Some(head) = cookie_name.get(..prefix.len())
                && head.eq_ignore_ascii_case(prefix)
            {
                cookie_name = cookie_name[prefix.len()..].to_string();
            }
        }
    }
    if cookie_name.is_empty()
        || !cookie_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.add(
            "session.cookie_name",
            format!("{cookie_name:?} is not a cookie name; use letters, digits, - _ ."),
        );
    }
    let same_site = one_of(same_site, "session.same_site", SameSite::Lax, problems);
    let idle_timeout = duration(
        idle_timeout,
        "session.idle_timeout",
        Duration::from_secs(30 * 60),
        problems,
    );
    let absolute_timeout = duration(
        absolute_timeout,
        "session.absolute_timeout",
        Duration::from_secs(12 * 3600),
        problems,
    );
    if idle_timeout > absolute_timeout {
        problems.add(
            "session.idle_timeout",
            "is longer than session.absolute_timeout; make it shorter",
        );
    }
    let (keys, keys_file) = match (keys, keys_file) {
        (Some(_), Some(_)) => {
            problems.add(
                "session.keys_file",
                "is set together with keys; keep one of the two",
            );
            (Vec::new(), None)
        }
        (None, Some(name)) => keys_from_file(&name, base, problems),
        (None, None) => {
            problems.add("session.keys", "is required: keys = [\"${VESTIBULE_SESSION_KEY}\"], each made by `vestibule keygen`, or keys_file = \"/run/secrets/session-keys\"");
            (Vec::new(), None)
        }
        (Some(list), None) if list.is_empty() => {
            problems.add(
                "session.keys",
                "is empty; add at least one key made by `vestibule keygen`",
            );
            (Vec::new(), None)
        }
        (Some(list), None) => {
            let keys = list
                .iter()
                .enumerate()
                .filter_map(|(i, text)| {
                    let key = session_key(text);
                    if key.is_none() {
                        problems.add(format!("session.keys[{i}]"), "is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`");
                    }
                    key
                })
                .collect();
            (keys, None)
        }
    };
    let max_entries = match max_entries {
        None => 100_000,
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            problems.add(
                "session.max_entries",
                format!("{n} must be a positive number"),
            );
            100_000
        }
    };
    let max_per_user = match max_per_user {
        None => DEFAULT_MAX_PER_USER,
        Some(n) if (1..=MAX_PER_USER as i64).contains(&n) => n as usize,
        Some(n) => {
            problems.add(
                "session.max_per_user",
                format!(
                    "{n} is out of range; use 1 to {MAX_PER_USER} (a login beyond it ends the user's oldest session)"
                ),
            );
            DEFAULT_MAX_PER_USER
        }
    };
    let cache_entries = match cache_entries {
        None => None,
        Some(n) if (1..=MAX_CACHE_ENTRIES as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            problems.add(
                "session.cache_entries",
                format!(
                    "{n} is out of range; use 1 to {MAX_CACHE_ENTRIES}, or cache_ttl = \"0s\" for no cache"
                ),
            );
            None
        }
    };
    let store = match store.as_deref().unwrap_or("memory") {
        "memory" => Some(StoreConfig::Memory),
        "redis" => redis_config(redis, problems).map(StoreConfig::Redis),
        other => {
            problems.add(
                "session.store",
                format!("{other:?} is not allowed; use one of \"memory\", \"redis\""),
            );
            None
        }
    };
    Some(SessionConfig {
        store: store?,
        cookie_name,
        cookie_secure,
        same_site,
        idle_timeout,
        absolute_timeout,
        keys,
        keys_file,
        max_entries,
        max_per_user,
        cache_ttl: duration(
            cache_ttl,
            "session.cache_ttl",
            Duration::from_secs(5),
            problems,
        ),
        cache_entries,
    })
}

/// One session key: 32 bytes of base64 (standard, or URL-safe without padding).
fn session_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let text = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
}

/// The keys of `keys_file`: one a line, the first seals; blank lines and `#` comments are
/// skipped. Any bad line refuses the whole file (a reload keeps the key ring in effect).
fn keys_from_file(
    name: &str,
    base: &Path,
    problems: &mut Problems,
) -> (Vec<[u8; 32]>, Option<PathBuf>) {
    let Some((path, text)) = secret_file(name, base, "session.keys_file", problems) else {
        return (Vec::new(), Some(base.join(name)));
    };
    (keys_from_text(name, &text, problems), Some(path))
}

/// The keys the text of the keys file `name` holds (see [`keys_from_file`]).
pub(super) fn keys_from_text(name: &str, text: &str, problems: &mut Problems) -> Vec<[u8; 32]> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match session_key(line) {
            Some(key) => keys.push(key),
            None => problems.add(
                "session.keys_file",
                format!(
                    "line {} of {name:?} is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`",
                    i + 1
                ),
            ),
        }
    }
    if keys.is_empty()
        && text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim().starts_with('#'))
    {
        problems.add(
            "session.keys_file",
            format!("{name:?} holds no key; write one key a line, each made by `vestibule keygen`"),
        );
    }
    keys
}

/// Whether `text` is a Redis URL the client takes (as the store will parse it at start: a bad
/// port, database or query used to pass `check` and fail the start naming no key); a problem at
/// `path` if not, the value never shown.
fn redis_url(text: &str, path: &str, problems: &mut Problems) -> bool {
    if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
        problems.add(
            path,
            "must start with redis:// or rediss:// (value not shown: it may hold a password)",
        );
        return false;
    }
    if redis::IntoConnectionInfo::into_connection_info(text).is_err() {
        problems.add(
            path,
            "is not a Redis URL the client can use: check the host, the port, the database number after the / and the query (value not shown: it may hold a password)",
        );
        return false;
    }
    true
}

/// `session.redis.timeout` when unset: long enough for a reconnect, short enough that a user
/// waiting on a stalled Redis gets a 503 rather than a hang.
const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_STORE_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(30);

fn redis_config(raw: Option<raw::Redis>, problems: &mut Problems) -> Option<RedisConfig> {
    let Some(raw::Redis {
        url,
        sentinel,
        cluster,
        key_prefix,
        timeout,
        // Read by `build` (it needs the file's directory).
        ca_file: _,
    }) = raw
    else {
        problems.add("session.redis", "is required when store = \"redis\": add [session.redis] with url = \"redis://127.0.0.1:6379\"");
        return None;
    };
    let cluster: Vec<Secret> = cluster
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter(|(i, u)| redis_url(u, &format!("session.redis.cluster[{i}]"), problems))
        .map(|(_, u)| Secret::new(u))
        .collect();
    let sentinel = sentinel.and_then(|s| {
        let master = s.master.filter(|m| !m.is_empty());
        if master.is_none() {
            problems.add(
                "session.redis.sentinel.master",
                "is required: the name of the monitored master",
            );
        }
        let nodes: Vec<Secret> = s
            .nodes
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter(|(i, u)| redis_url(u, &format!("session.redis.sentinel.nodes[{i}]"), problems))
            .map(|(_, u)| Secret::new(u))
            .collect();
        if nodes.is_empty() {
            problems.add(
                "session.redis.sentinel.nodes",
                "needs at least one sentinel address, e.g. \"redis://s1:26379\"",
            );
        }
        Some(SentinelConfig {
            master: master?,
            nodes,
        })
    });
    if sentinel.is_some() && !cluster.is_empty() {
        problems.add(
            "session.redis",
            "sets both sentinel and cluster; choose one",
        );
    }
    let url = url.unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    redis_url(&url, "session.redis.url", problems);
    let timeout = duration(
        timeout,
        "session.redis.timeout",
        DEFAULT_STORE_TIMEOUT,
        problems,
    );
    if !(MIN_STORE_TIMEOUT..=MAX_STORE_TIMEOUT).contains(&timeout) {
        problems.add(
            "session.redis.timeout",
            "must be between 50ms and 30s: a request waits this long for Redis before it gets a 503",
        );
    }
    Some(RedisConfig {
        url: Secret::new(url),
        sentinel,
        cluster,
        key_prefix: key_prefix.unwrap_or_else(|| "vestibule:".into()),
        timeout: timeout.clamp(MIN_STORE_TIMEOUT, MAX_STORE_TIMEOUT),
        ca_file: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn check(raw: raw::Session) -> (Option<SessionConfig>, Vec<String>) {
        let mut problems = Problems::default();
        let config = session_config(raw, Path::new("."), &mut problems);
        (config, printed(problems))
    }

    #[test]
    fn golden_session_messages() {
        let (_, found) = check(raw::Session {
            cookie_name: Some("my cookie".into()),
            idle_timeout: Some("2h".into()),
            absolute_timeout: Some("1h".into()),
            max_entries: Some(0),
            store: Some("disk".into()),
            ..Default::default()
        });
        assert_eq!(
            found,
            [
                "session.cookie_name: \"my cookie\" is not a cookie name; use letters, digits, - _ .",
                "session.idle_timeout: is longer than session.absolute_timeout; make it shorter",
                "session.keys: is required: keys = [\"${VESTIBULE_SESSION_KEY}\"], each made by `vestibule keygen`, or keys_file = \"/run/secrets/session-keys\"",
                "session.max_entries: 0 must be a positive number",
                "session.store: \"disk\" is not allowed; use one of \"memory\", \"redis\"",
            ]
        );
        let (_, found) = check(raw::Session {
            keys: Some(vec![KEY.into()]),
            store: Some("redis".into()),
            redis: Some(raw::Redis {
                sentinel: Some(raw::Sentinel {
                    master: None,
                    nodes: Some(vec!["redis://s1:26379".into()]),
                }),
                cluster: Some(vec!["http://user:pw@n1".into(), "redis://n2:6379".into()]),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            found,
            [
                "session.redis.cluster[0]: must start with redis:// or rediss:// (value not shown: it may hold a password)",
                "session.redis.sentinel.master: is required: the name of the monitored master",
            ]
        );
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn keys_file_holds_one_key_a_line_and_every_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let keys_file = |text: &str| {
            std::fs::write(dir.path().join("keys"), text).unwrap();
            let mut problems = Problems::default();
            let config = session_config(
                raw::Session {
                    keys_file: Some("keys".into()),
                    ..Default::default()
                },
                dir.path(),
                &mut problems,
            );
            (config, printed(problems))
        };
        let second = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY=";
        let (config, found) = keys_file(&format!("# newest first\n{second}\n\n  {KEY}  \r\n"));
        assert!(found.is_empty(), "{found:?}");
        let config = config.unwrap();
        assert_eq!(
            config.keys,
            [
                *b"ABCDEFGHIJKLMNOPQRSTUVWXYZ123456",
                *b"0123456789abcdef0123456789abcdef"
            ]
        );
        assert_eq!(config.keys_file, Some(dir.path().join("keys")));
        assert_eq!(
            keys_file(&format!("{KEY}\nhunter2\n")).1,
            [
                "session.keys_file: line 2 of \"keys\" is not 32 bytes of base64 (value not shown); make one with `vestibule keygen`"
            ]
        );
        assert_eq!(
            keys_file("# nothing yet\n\n").1,
            [
                "session.keys_file: \"keys\" holds no key; write one key a line, each made by `vestibule keygen`"
            ]
        );
        let mut problems = Problems::default();
        let _ = session_config(
            raw::Session {
                keys_file: Some("missing".into()),
                ..Default::default()
            },
            dir.path(),
            &mut problems,
        );
        assert_eq!(
            printed(problems),
            [
                "session.keys_file: names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it"
            ]
        );
        let (_, found) = check(raw::Session {
            keys: Some(vec![KEY.into()]),
            keys_file: Some("keys".into()),
            ..Default::default()
        });
        assert_eq!(
            found,
            ["session.keys_file: is set together with keys; keep one of the two"]
        );
    }

    /// `check` said OK to a Redis URL the client cannot use (a port past 65535, a database
    /// that is not a number, an unclosed `[`), and the start then failed with "Redis URL did
    /// not parse", naming no key. Each is refused at load, by key, the value never shown.
    #[test]
    fn a_redis_url_the_client_cannot_use_is_refused_by_key_without_its_value() {
        let bad = [
            "redis://:s3cr3t@h:99999",
            "redis://:s3cr3t@127.0.0.1:6379/not-a-number",
            "rediss://:s3cr3t@[::1",
            "redis://:s3cr3t@127.0.0.1:6379/0?protocol=s3cr3t",
        ];
        for url in bad {
            let redis = |url: &str| raw::Redis {
                url: Some(url.into()),
                ..Default::default()
            };
            let session = |redis| raw::Session {
                keys: Some(vec![KEY.into()]),
                store: Some("redis".into()),
                redis: Some(redis),
                ..Default::default()
            };
            let (_, found) = check(session(redis(url)));
            assert_eq!(
                found,
                [
                    "session.redis.url: is not a Redis URL the client can use: check the host, the port, the database number after the / and the query (value not shown: it may hold a password)"
                ],
                "{url}"
            );
            let (_, found) = check(session(raw::Redis {
                cluster: Some(vec!["redis://n1:6379".into(), url.into()]),
                ..redis("redis://127.0.0.1:6379")
            }));
            assert_eq!(
                found,
                [
                    "session.redis.cluster[1]: is not a Redis URL the client can use: check the host, the port, the database number after the / and the query (value not shown: it may hold a password)"
                ],
                "{url}"
            );
        }
        for good in [
            "redis://127.0.0.1:6379",
            "rediss://:p%40ss@redis.example:6380/2",
            "redis://user:pw@[::1]:6379/0",
            "redis://h?protocol=resp3",
        ] {
            let (config, found) = check(raw::Session {
                keys: Some(vec![KEY.into()]),
                store: Some("redis".into()),
                redis: Some(raw::Redis {
                    url: Some(good.into()),
                    ..Default::default()
                }),
                ..Default::default()
            });
            assert!(found.is_empty() && config.is_some(), "{good}: {found:?}");
        }
    }

    #[test]
    fn an_insecure_cookie_loses_the_host_prefix() {
        let (config, found) = check(raw::Session {
            keys: Some(vec![KEY.into()]),
            cookie_secure: Some(false),
            ..Default::default()
        });
        assert_eq!(found, Vec::<String>::new());
        assert_eq!(config.map(|c| c.cookie_name).as_deref(), Some("vestibule"));
    }

    /// Browsers refuse a cookie whose name starts with `__Secure-` or `__Host-` (in any case)
    /// without `Secure`: with `cookie_secure = false`, such a session cookie, its login-state
    /// cookies and its logout cookie would never be stored, and no sign-in would ever complete.
    #[test]
    fn an_insecure_cookie_loses_any_prefix_that_demands_secure() {
        for (name, expected) in [
            ("__Secure-app", "app"),
            ("__secure-app", "app"),
            ("__HOST-app", "app"),
            ("__Host-app", "app"),
            ("app", "app"),
        ] {
            let (config, found) = check(raw::Session {
                keys: Some(vec![KEY.into()]),
                cookie_secure: Some(false),
                cookie_name: Some(name.into()),
                ..Default::default()
            });
            assert_eq!(found, Vec::<String>::new(), "{name}");
            let config = config.unwrap();
            // The login-state and logout cookies are named after it (`cookies::host_only_base`).
            assert_eq!(config.cookie_name, expected, "{name}");
        }
    }
}
