//! `[oidc]`: the OpenID provider and this client.

use super::*;

pub(super) fn oidc_config(
    raw: raw::Oidc,
    base: &Path,
    problems: &mut Problems,
) -> Option<OidcConfig> {
    let raw::Oidc {
        issuer,
        client_id,
        client_secret,
        client_secret_file,
        client_auth,
        client_key_file,
        client_published_key_files,
        client_assertion_file,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew,
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh,
        clock_skew,
        provider_timeout,
        userinfo,
        dpop,
        dpop_key_file,
        par,
        // Read by `build` (they need the file's directory).
        ca_file: _,
        tls_client_cert: _,
        tls_client_key: _,
    } = raw;
    let provider_timeout = duration(
        provider_timeout,
        "oidc.provider_timeout",
        DEFAULT_PROVIDER_TIMEOUT,
        problems,
    );
    if provider_timeout.is_zero() {
        problems.add(
            "oidc.provider_timeout",
            "must be longer than 0s; write e.g. \"25s\"",
        );
    }
    let allow_http_issuer = allow_http_issuer.unwrap_or(false);
    let issuer = match issuer {
        None => {
            problems.add("oidc.issuer", "is required: the provider's issuer URL, e.g. \"https://idp.example.com/realms/app\"");
            None
        }
        Some(text) => match url::Url::parse(&text) {
            Ok(u) if u.scheme() == "https" => Some(u),
            Ok(u) if u.scheme() == "http" => {
                let loopback = match u.host() {
                    Some(url::Host::Domain(d)) => d == "localhost",
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    None => false,
                };
                if !allow_http_issuer {
                    problems.add("oidc.issuer", format!("{text:?} uses plain http; use https, or set allow_http_issuer = true for a loopback issuer in development"));
                } else if !loopback {
                    problems.add("oidc.issuer", format!("{text:?} uses plain http on a non-loopback host; allow_http_issuer only permits 127.0.0.1, ::1 or localhost"));
                }
                Some(u)
            }
            _ => {
                problems.add(
                    "oidc.issuer",
                    format!("{text:?} is not an https URL; write e.g. \"https://idp.example.com\""),
                );
                None
            }
        },
    };
    let client_id = client_id.filter(|c| !c.is_empty());
    if client_id.is_none() {
        problems.add(
            "oidc.client_id",
            "is required: the client id registered at the provider",
        );
    }
    let client_auth = one_of(
        client_auth,
        "oidc.client_auth",
        ClientAuth::ClientSecretBasic,
        problems,
    );
    let (client_secret, client_secret_file) =
        client_secret_from(client_secret, client_secret_file, base, problems);
    // Private keys and an assertion: a value where nothing is may be the secret itself.
    let file = |value: Option<String>, path: &str, problems: &mut Problems| {
        let text = value?;
        let resolved = base.join(&text);
        if let Some(missing) = no_secret_file(&resolved) {
            problems.add(path, missing);
        } else if !resolved.is_file() {
            problems.add(path, format!("{text:?} is not a file"));
        }
        Some(resolved)
    };
    // Keys, read by the client's credential at start and on every reload: watched, so that a
    // key rotated on disk is applied without SIGHUP. (The assertion file is read again by the
    // credential itself when it changes.)
    let key_file = |value: Option<String>, path: &str, problems: &mut Problems| {
        let resolved = file(value, path, problems)?;
        if let Ok(bytes) = crate::config::read_file(&resolved, crate::config::MAX_FILE) {
            super::watched(&resolved, &bytes, problems);
        }
        Some(resolved)
    };
    let client_key_file = key_file(client_key_file, "oidc.client_key_file", problems);
    let client_published_key_files: Vec<PathBuf> = client_published_key_files
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| {
            key_file(
                Some(f),
                &format!("oidc.client_published_key_files[{i}]"),
                problems,
            )
        })
        .collect();
    let client_assertion_file = file(
        client_assertion_file,
        "oidc.client_assertion_file",
        problems,
    );
    let has_secret = client_secret.is_some() || client_secret_file.is_some();
    match client_auth {
        ClientAuth::ClientSecretBasic
        | ClientAuth::ClientSecretPost
        | ClientAuth::TlsClientAuth
        | ClientAuth::SelfSignedTlsClientAuth => {
            if !client_auth.is_mtls() && !has_secret {
                problems.add(
                    "oidc.client_secret",
                    format!(
                        "is required for {}; write client_secret = \"${{VESTIBULE_CLIENT_SECRET}}\", or client_secret_file = \"/run/secrets/client-secret\"",
                        client_auth.name()
                    ),
                );
            }
            if client_auth.is_mtls() && has_secret {
                problems.add(
                    "oidc.client_secret",
                    format!(
                        "is not used with client_auth = {:?}: the client certificate authenticates the client; remove it",
                        client_auth.name()
                    ),
                );
            }
            for (set, key) in [
                (client_key_file.is_some(), "oidc.client_key_file"),
                (
                    !client_published_key_files.is_empty(),
                    "oidc.client_published_key_files",
                ),
                (
                    client_assertion_file.is_some(),
                    "oidc.client_assertion_file",
                ),
            ] {
                if set {
                    problems.add(
                        key,
                        format!(
                            "is only used with client_auth = \"private_key_jwt\", not {:?}",
                            client_auth.name()
                        ),
                    );
                }
            }
        }
        ClientAuth::PrivateKeyJwt => {
            if has_secret {
                problems.add(
                    "oidc.client_secret",
                    "is not used with client_auth = \"private_key_jwt\"; remove it",
                );
            }
            match (&client_key_file, &client_assertion_file) {
                (None, None) => problems.add(
                    "oidc.client_auth",
                    "\"private_key_jwt\" needs client_key_file (a PEM private key, EC P-256 or RSA) or client_assertion_file (a client assertion the platform keeps fresh)",
                ),
                (Some(_), Some(_)) => problems.add(
                    "oidc.client_assertion_file",
                    "cannot be set together with client_key_file; choose one",
                ),
                _ => {}
            }
            if client_assertion_file.is_some() && !client_published_key_files.is_empty() {
                problems.add(
                    "oidc.client_published_key_files",
                    "is only used with client_key_file",
                );
            }
        }
    }
    let scopes = scopes.unwrap_or_else(|| {
        ["openid", "profile", "email", "offline_access"]
            .map(String::from)
            .to_vec()
    });
    if !scopes.iter().any(|s| s == "openid") {
        problems.add("oidc.scopes", "must include \"openid\"");
    }
    scope_tokens(&scopes, "oidc.scopes", problems);
    let post_logout_redirect = post_logout_redirect.unwrap_or_else(|| "/".into());
    if !is_local_path(&post_logout_redirect) {
        problems.add(
            "oidc.post_logout_redirect",
            format!("{post_logout_redirect:?} must be a local path such as \"/\""),
        );
    }
    let reserved = [
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    ];
    let extra_auth_params: Vec<(String, String)> =
        extra_auth_params.unwrap_or_default().into_iter().collect();
    for (key, _) in &extra_auth_params {
        if reserved.contains(&key.as_str()) {
            problems.add(
                format!("oidc.extra_auth_params.{key}"),
                "is set by Vestibule itself and cannot be overridden",
            );
        }
    }
    let dpop = dpop.unwrap_or(false);
    let dpop_key_file = dpop_key_file.map(std::path::PathBuf::from);
    if dpop_key_file.is_some() && !dpop {
        problems.add(
            "oidc.dpop_key_file",
            "is only used with dpop = true; set oidc.dpop = true or remove the key file",
        );
    }
    let par = one_of(par, "oidc.par", Par::Auto, problems);
    let roles_claim = roles_claim.unwrap_or_else(|| "roles".into());
    if roles_claim.is_empty() || roles_claim.split('.').any(str::is_empty) {
        problems.add("oidc.roles_claim", format!("{roles_claim:?} is not a claim path; write e.g. \"roles\" or \"realm_access.roles\""));
    }
    Some(OidcConfig {
        issuer: issuer?,
        client_id: client_id?,
        client_secret,
        client_secret_file,
        client_auth,
        client_key_file,
        client_published_key_files,
        client_assertion_file,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew: duration(
            refresh_skew,
            "oidc.refresh_skew",
            Duration::from_secs(60),
            problems,
        ),
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh: metadata_refresh_config(metadata_refresh, problems),
        clock_skew: duration_at_most(
            clock_skew,
            "oidc.clock_skew",
            DEFAULT_CLOCK_SKEW,
            (MAX_CLOCK_SKEW, "5m"),
            ": an expired ID token, logout token or access token would be accepted that long after it expired; write e.g. \"60s\"",
            problems,
        ),
        provider_timeout,
        userinfo: userinfo.unwrap_or(false),
        dpop,
        dpop_key_file,
        par,
        ca_file: None,
        tls_client: None,
    })
}

pub const DEFAULT_METADATA_REFRESH: Duration = Duration::from_secs(3600);
/// Every instance fetches the discovery document and the key set this often at most; a key the
/// provider adds in between is fetched on first use anyway.
pub const MIN_METADATA_REFRESH: Duration = Duration::from_secs(60);
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The leeway of every `exp` and `iat` check: clocks in sync by NTP differ by far less.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

fn metadata_refresh_config(value: Option<String>, problems: &mut Problems) -> Duration {
    let text = value.clone().unwrap_or_default();
    let path = "oidc.metadata_refresh";
    let period = duration(value, path, DEFAULT_METADATA_REFRESH, problems);
    if period < MIN_METADATA_REFRESH {
        problems.add(
            path,
            format!(
                "{text:?} is shorter than 1m: every instance would fetch the provider's discovery document and keys that often; write e.g. \"1h\""
            ),
        );
        return DEFAULT_METADATA_REFRESH;
    }
    period
}

/// Whether `file` holds an EC P-256 private key in PEM (PKCS#8 or SEC1), the only kind a DPoP
/// proof is signed with here (ES256). The key itself never appears in a message.
pub(super) fn check_dpop_key(file: &std::path::Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let pem = crate::config::read_file(file, crate::config::MAX_FILE).map_err(|e| {
        // The system's own errors by their kind ("entity not found"), Vestibule's in words.
        match e.kind() {
            std::io::ErrorKind::Other => format!("cannot be read ({e})"),
            kind => format!("cannot be read ({kind})"),
        }
    })?;
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| "holds no PEM private key; write an EC P-256 key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)".to_string())?;
    aws_lc_rs::signature::EcdsaKeyPair::from_private_key_der(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_der(),
    )
    .map(|_| ())
    .map_err(|_| "is not an EC P-256 private key (DPoP proofs are signed with ES256)".to_string())
}

/// The client secret, written inline or read from `client_secret_file` (trimmed; a trailing
/// newline is not part of it), and the file it came from.
fn client_secret_from(
    inline: Option<String>,
    file: Option<String>,
    base: &Path,
    problems: &mut Problems,
) -> (Option<Secret>, Option<PathBuf>) {
    let inline = inline.filter(|s| !s.is_empty()).map(Secret::new);
    let Some(name) = file else {
        return (inline, None);
    };
    if inline.is_some() {
        problems.add(
            "oidc.client_secret_file",
            "is set together with client_secret; keep one of the two",
        );
    }
    let Some((path, text)) = secret_file(&name, base, "oidc.client_secret_file", problems) else {
        return (None, Some(base.join(&name)));
    };
    (client_secret_text(&name, &text, problems), Some(path))
}

/// The client secret the text of the file `name` holds (trimmed), or a problem if it is empty.
pub(super) fn client_secret_text(
    name: &str,
    text: &str,
    problems: &mut Problems,
) -> Option<Secret> {
    let secret = text.trim();
    if secret.is_empty() {
        problems.add(
            "oidc.client_secret_file",
            format!("{name:?} is empty; write the client secret into it"),
        );
        return None;
    }
    Some(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: raw::Oidc) -> Vec<String> {
        let mut problems = Problems::default();
        let _ = oidc_config(raw, Path::new("/nonexistent"), &mut problems);
        printed(problems)
    }

    /// RFC 6749 §3.3, as for a route's scopes: `"profile email"` in one entry is two scopes.
    #[test]
    fn scopes_that_are_not_one_scope_token_are_refused_with_their_value() {
        let oidc = raw::Oidc {
            issuer: Some("https://idp.example".into()),
            client_id: Some("c".into()),
            client_secret: Some("s".into()),
            scopes: Some(vec![
                "openid".into(),
                "profile email".into(),
                "x\u{7f}".into(),
            ]),
            ..Default::default()
        };
        assert_eq!(
            check(oidc),
            [
                r#"oidc.scopes[1]: "profile email" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
                r#"oidc.scopes[2]: "x\u{7f}" is not one scope (RFC 6749 §3.3: printable ASCII, no spaces, quotes or backslashes); list each scope as its own entry"#,
            ]
        );
    }

    #[test]
    fn golden_oidc_messages() {
        assert_eq!(
            check(raw::Oidc::default()),
            [
                "oidc.issuer: is required: the provider's issuer URL, e.g. \"https://idp.example.com/realms/app\"",
                "oidc.client_id: is required: the client id registered at the provider",
                "oidc.client_secret: is required for client_secret_basic; write client_secret = \"${VESTIBULE_CLIENT_SECRET}\", or client_secret_file = \"/run/secrets/client-secret\"",
            ]
        );
        assert_eq!(
            check(raw::Oidc {
                issuer: Some("http://10.0.0.1/realm".into()),
                allow_http_issuer: Some(true),
                client_id: Some("spa".into()),
                client_secret: Some("s".into()),
                client_auth: Some("client_secret_jwt".into()),
                post_logout_redirect: Some("https://evil.example".into()),
                extra_auth_params: Some([("state".to_string(), "x".to_string())].into()),
                roles_claim: Some("realm..roles".into()),
                ..Default::default()
            }),
            [
                "oidc.issuer: \"http://10.0.0.1/realm\" uses plain http on a non-loopback host; allow_http_issuer only permits 127.0.0.1, ::1 or localhost",
                "oidc.client_auth: \"client_secret_jwt\" is not allowed; use one of \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\", \"tls_client_auth\", \"self_signed_tls_client_auth\"",
                "oidc.post_logout_redirect: \"https://evil.example\" must be a local path such as \"/\"",
                "oidc.extra_auth_params.state: is set by Vestibule itself and cannot be overridden",
                "oidc.roles_claim: \"realm..roles\" is not a claim path; write e.g. \"roles\" or \"realm_access.roles\"",
            ]
        );
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_client_secret_file_is_read_trimmed_and_every_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let with_file = |file: &str, inline: Option<&str>| {
            let mut problems = Problems::default();
            let config = oidc_config(
                raw::Oidc {
                    issuer: Some("https://idp.example.com".into()),
                    client_id: Some("spa".into()),
                    client_secret: inline.map(String::from),
                    client_secret_file: Some(file.into()),
                    ..Default::default()
                },
                dir.path(),
                &mut problems,
            );
            (config, printed(problems))
        };
        std::fs::write(dir.path().join("secret"), "s3cr3t\n").unwrap();
        let (config, found) = with_file("secret", None);
        assert!(found.is_empty(), "{found:?}");
        let config = config.unwrap();
        assert_eq!(config.client_secret, Some(Secret::new("s3cr3t")));
        assert_eq!(config.client_secret_file, Some(dir.path().join("secret")));
        assert_eq!(
            with_file("secret", Some("inline")).1,
            ["oidc.client_secret_file: is set together with client_secret; keep one of the two"]
        );
        std::fs::write(dir.path().join("empty"), " \n").unwrap();
        assert_eq!(
            with_file("empty", None).1,
            ["oidc.client_secret_file: \"empty\" is empty; write the client secret into it"]
        );
        assert_eq!(
            with_file("missing", None).1,
            [
                "oidc.client_secret_file: names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it"
            ]
        );
        std::fs::create_dir(dir.path().join("a-directory")).unwrap();
        let (_, found) = with_file("a-directory", None);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("oidc.client_secret_file: cannot read \"a-directory\": "),
            "{found:?}"
        );
        assert!(!found[0].contains("s3cr3t"));
    }

    #[test]
    fn private_key_jwt_needs_one_key_source_and_no_secret() {
        let with = |client_auth: &str| raw::Oidc {
            issuer: Some("https://idp.example".into()),
            client_id: Some("spa".into()),
            client_auth: Some(client_auth.into()),
            ..Default::default()
        };
        assert_eq!(
            check(raw::Oidc {
                client_secret: Some("s".into()),
                ..with("private_key_jwt")
            }),
            [
                "oidc.client_secret: is not used with client_auth = \"private_key_jwt\"; remove it",
                "oidc.client_auth: \"private_key_jwt\" needs client_key_file (a PEM private key, EC P-256 or RSA) or client_assertion_file (a client assertion the platform keeps fresh)",
            ]
        );
        assert_eq!(
            check(raw::Oidc {
                client_key_file: Some("key.pem".into()),
                client_assertion_file: Some("token".into()),
                ..with("private_key_jwt")
            }),
            [
                "oidc.client_key_file: names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it",
                "oidc.client_assertion_file: names no file (value not shown: it may be the secret itself, written where the path of its file belongs); write the path of the file that holds it",
                "oidc.client_assertion_file: cannot be set together with client_key_file; choose one",
            ]
        );
        assert_eq!(
            check(raw::Oidc {
                issuer: Some("https://idp.example".into()),
                client_id: Some("spa".into()),
                client_secret: Some("s".into()),
                client_published_key_files: Some(vec!["/".into()]),
                ..Default::default()
            }),
            [
                "oidc.client_published_key_files[0]: \"/\" is not a file",
                "oidc.client_published_key_files: is only used with client_auth = \"private_key_jwt\", not \"client_secret_basic\"",
            ]
        );
        // A certificate authenticates the client: a secret next to it would never be sent.
        assert_eq!(
            check(raw::Oidc {
                client_secret: Some("s".into()),
                ..with("tls_client_auth")
            }),
            [
                "oidc.client_secret: is not used with client_auth = \"tls_client_auth\": the client certificate authenticates the client; remove it",
            ]
        );
    }
}
