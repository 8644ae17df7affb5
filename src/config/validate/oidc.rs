//! `[oidc]`: the OpenID provider and this client.

use super::*;

pub(super) fn oidc_config(raw: raw::Oidc, problems: &mut Problems) -> Option<OidcConfig> {
    let raw::Oidc {
        issuer,
        client_id,
        client_secret,
        client_auth,
        scopes,
        extra_auth_params,
        roles_claim,
        refresh_skew,
        post_logout_redirect,
        allow_http_issuer,
        metadata_refresh,
        clock_skew,
        provider_timeout,
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
    let client_auth = match client_auth.as_deref() {
        Some("private_key_jwt") => {
            problems.add("oidc.client_auth", "\"private_key_jwt\" is not supported yet; use \"client_secret_basic\" or \"client_secret_post\"");
            ClientAuth::ClientSecretBasic
        }
        _ => one_of(
            client_auth,
            "oidc.client_auth",
            ClientAuth::ClientSecretBasic,
            &[
                ("client_secret_basic", ClientAuth::ClientSecretBasic),
                ("client_secret_post", ClientAuth::ClientSecretPost),
                ("tls_client_auth", ClientAuth::TlsClientAuth),
                (
                    "self_signed_tls_client_auth",
                    ClientAuth::SelfSignedTlsClientAuth,
                ),
            ],
            problems,
        ),
    };
    let client_secret = client_secret.filter(|s| !s.is_empty()).map(Secret::new);
    if client_secret.is_none() && !client_auth.is_mtls() {
        problems.add(
            "oidc.client_secret",
            format!(
                "is required for {}; write client_secret = \"${{VESTIBULE_CLIENT_SECRET}}\"",
                match client_auth {
                    ClientAuth::ClientSecretPost => "client_secret_post",
                    _ => "client_secret_basic",
                }
            ),
        );
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
        ca_file: None,
        tls_client: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: raw::Oidc) -> Vec<String> {
        let mut problems = Problems::default();
        let _ = oidc_config(raw, &mut problems);
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
                "oidc.client_auth: \"client_secret_jwt\" is not allowed; use one of \"client_secret_basic\", \"client_secret_post\", \"tls_client_auth\", \"self_signed_tls_client_auth\"",
                "oidc.post_logout_redirect: \"https://evil.example\" must be a local path such as \"/\"",
                "oidc.extra_auth_params.state: is set by Vestibule itself and cannot be overridden",
                "oidc.roles_claim: \"realm..roles\" is not a claim path; write e.g. \"roles\" or \"realm_access.roles\"",
            ]
        );
    }
}
