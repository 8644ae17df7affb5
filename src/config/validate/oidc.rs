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
        &[
            ("client_secret_basic", ClientAuth::ClientSecretBasic),
            ("client_secret_post", ClientAuth::ClientSecretPost),
            ("private_key_jwt", ClientAuth::PrivateKeyJwt),
        ],
        problems,
    );
    let client_secret = client_secret.filter(|s| !s.is_empty()).map(Secret::new);
    let file = |value: Option<String>, path: &str, problems: &mut Problems| {
        let text = value?;
        let resolved = base.join(&text);
        if !resolved.is_file() {
            problems.add(path, format!("file {text:?} does not exist"));
        }
        Some(resolved)
    };
    let client_key_file = file(client_key_file, "oidc.client_key_file", problems);
    let client_published_key_files: Vec<PathBuf> = client_published_key_files
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| {
            file(
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
    match client_auth {
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            if client_secret.is_none() {
                problems.add(
                    "oidc.client_secret",
                    format!(
                        "is required for {}; write client_secret = \"${{VESTIBULE_CLIENT_SECRET}}\"",
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
            if client_secret.is_some() {
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
    let roles_claim = roles_claim.unwrap_or_else(|| "roles".into());
    if roles_claim.is_empty() || roles_claim.split('.').any(str::is_empty) {
        problems.add("oidc.roles_claim", format!("{roles_claim:?} is not a claim path; write e.g. \"roles\" or \"realm_access.roles\""));
    }
    Some(OidcConfig {
        issuer: issuer?,
        client_id: client_id?,
        client_secret,
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
        metadata_refresh: duration(
            metadata_refresh,
            "oidc.metadata_refresh",
            Duration::from_secs(3600),
            problems,
        ),
        clock_skew: duration(
            clock_skew,
            "oidc.clock_skew",
            Duration::from_secs(60),
            problems,
        ),
        provider_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: raw::Oidc) -> Vec<String> {
        let mut problems = Problems::default();
        let _ = oidc_config(raw, Path::new("/nonexistent"), &mut problems);
        printed(problems)
    }

    #[test]
    fn golden_oidc_messages() {
        assert_eq!(
            check(raw::Oidc::default()),
            [
                "oidc.issuer: is required: the provider's issuer URL, e.g. \"https://idp.example.com/realms/app\"",
                "oidc.client_id: is required: the client id registered at the provider",
                "oidc.client_secret: is required for client_secret_basic; write client_secret = \"${VESTIBULE_CLIENT_SECRET}\"",
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
                "oidc.client_auth: \"client_secret_jwt\" is not allowed; use one of \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\"",
                "oidc.post_logout_redirect: \"https://evil.example\" must be a local path such as \"/\"",
                "oidc.extra_auth_params.state: is set by Vestibule itself and cannot be overridden",
                "oidc.roles_claim: \"realm..roles\" is not a claim path; write e.g. \"roles\" or \"realm_access.roles\"",
            ]
        );
    }

    #[test]
    fn private_key_jwt_needs_one_key_source_and_no_secret() {
        let base = raw::Oidc {
            issuer: Some("https://idp.example".into()),
            client_id: Some("spa".into()),
            client_auth: Some("private_key_jwt".into()),
            ..Default::default()
        };
        assert_eq!(
            check(raw::Oidc {
                client_secret: Some("s".into()),
                ..base
            }),
            [
                "oidc.client_secret: is not used with client_auth = \"private_key_jwt\"; remove it",
                "oidc.client_auth: \"private_key_jwt\" needs client_key_file (a PEM private key, EC P-256 or RSA) or client_assertion_file (a client assertion the platform keeps fresh)",
            ]
        );
        let base = raw::Oidc {
            issuer: Some("https://idp.example".into()),
            client_id: Some("spa".into()),
            client_auth: Some("private_key_jwt".into()),
            ..Default::default()
        };
        assert_eq!(
            check(raw::Oidc {
                client_key_file: Some("key.pem".into()),
                client_assertion_file: Some("token".into()),
                ..base
            }),
            [
                "oidc.client_key_file: file \"key.pem\" does not exist",
                "oidc.client_assertion_file: file \"token\" does not exist",
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
                "oidc.client_published_key_files[0]: file \"/\" does not exist",
                "oidc.client_published_key_files: is only used with client_auth = \"private_key_jwt\", not \"client_secret_basic\"",
            ]
        );
    }
}
