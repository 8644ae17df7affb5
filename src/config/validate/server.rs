//! `[server]`: the public listener.

use super::*;

pub(super) fn server_config(
    raw: raw::Server,
    base: &Path,
    problems: &mut Problems,
) -> Option<ServerConfig> {
    // Read first, so that their problems come first.
    let connections = limits::connections(&raw, problems);
    let raw::Server {
        listen,
        public_url,
        bff_prefix,
        trusted_proxies,
        request_timeout,
        max_body,
        tls,
        cors_origins,
        shutdown_grace,
        header_read_timeout,
        max_header_size,
        workers,
        // Read by `limits::connections`.
        max_connections: _,
        max_connections_per_client: _,
        connection_idle_timeout: _,
        body_read_timeout: _,
        body_min_rate: _,
        send_timeout: _,
        http2_max_concurrent_streams: _,
        http2_keep_alive_interval: _,
        http2_keep_alive_timeout: _,
    } = raw;
    let listen = socket(listen, "server.listen", "0.0.0.0:8080", problems);
    let public_url = match public_url {
        None => {
            problems.add(
                "server.public_url",
                "is required: the origin browsers use, e.g. \"https://app.example.com\"",
            );
            None
        }
        Some(text) => match url::Url::parse(&text) {
            Ok(u)
                if (u.scheme() == "https" || u.scheme() == "http")
                    && u.host().is_some()
                    && (u.path() == "/" || u.path().is_empty())
                    && u.query().is_none() =>
            {
                Some(u)
            }
            Ok(_) => {
                problems.add("server.public_url", format!("{text:?} must be an http(s) origin without path or query, e.g. \"https://app.example.com\""));
                None
            }
            Err(_) => {
                problems.add(
                    "server.public_url",
                    format!("{text:?} is not a URL; write e.g. \"https://app.example.com\""),
                );
                None
            }
        },
    };
    let bff_prefix = bff_prefix.unwrap_or_else(|| "/bff".into());
    if !is_local_path(&bff_prefix) || bff_prefix.ends_with('/') || bff_prefix.len() < 2 {
        problems.add(
            "server.bff_prefix",
            format!("{bff_prefix:?} must start with / and not end with /, e.g. \"/bff\""),
        );
    }
    let trusted_proxies = trusted_proxies
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(ipv4_if_mapped);
            parsed
                .map_err(|_| {
                    problems.add(
                        format!("server.trusted_proxies[{i}]"),
                        format!(
                            "{text:?} is not a CIDR; write e.g. \"10.0.0.0/8\" or \"192.0.2.1\""
                        ),
                    )
                })
                .ok()
        })
        .collect();
    let tls = tls.and_then(|tls| {
        let resolve = |v: Option<String>, key: &str, problems: &mut Problems| match v {
            None => {
                problems.add(
                    format!("server.tls.{key}"),
                    "is required when [server] tls is set: a PEM file path",
                );
                None
            }
            Some(p) => {
                let path = base.join(&p);
                // The key's value may be the PEM key itself, written where its path belongs.
                let missing = (key == "key").then(|| no_secret_file(&path)).flatten();
                if let Some(missing) = missing {
                    problems.add(format!("server.tls.{key}"), missing);
                } else if !path.is_file() {
                    problems.add(
                        format!("server.tls.{key}"),
                        format!("file {p:?} does not exist"),
                    );
                }
                Some(path)
            }
        };
        let cert = resolve(tls.cert, "cert", problems);
        let key = resolve(tls.key, "key", problems);
        Some(TlsConfig {
            cert: cert?,
            key: key?,
        })
    });
    let cors_origins = cors_origins
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, text)| match url::Url::parse(&text) {
            Ok(u) if u.host().is_some() && (u.path() == "/" || u.path().is_empty()) => {
                Some(origin_text(&u))
            }
            _ => {
                problems.add(
                    format!("server.cors_origins[{i}]"),
                    format!("{text:?} is not an origin; write e.g. \"https://admin.example.com\""),
                );
                None
            }
        })
        .collect();
    let max_header_size = size(
        max_header_size,
        "server.max_header_size",
        64 << 10,
        problems,
    );
    if max_header_size < 1024 {
        problems.add("server.max_header_size", "must be at least 1KiB");
    }
    let workers = match workers {
        None => None,
        Some(n @ 1..=1024) => usize::try_from(n).ok(),
        Some(n) => {
            problems.add(
                "server.workers",
                format!("{n} is out of range; use 1 to 1024, or leave it out for one per CPU"),
            );
            None
        }
    };
    let server = ServerConfig {
        listen,
        workers,
        public_origin: public_url
            .as_ref()
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default(),
        public_url: public_url?,
        bff_prefix,
        trusted_proxies,
        request_timeout: duration(
            request_timeout,
            "server.request_timeout",
            Duration::from_secs(30),
            problems,
        ),
        max_body: size(max_body, "server.max_body", 10 << 20, problems),
        tls,
        cors_origins,
        shutdown_grace: duration(
            shutdown_grace,
            "server.shutdown_grace",
            Duration::from_secs(30),
            problems,
        ),
        header_read_timeout: duration(
            header_read_timeout,
            "server.header_read_timeout",
            Duration::from_secs(10),
            problems,
        ),
        max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
        connections,
    };
    Some(server)
}

/// An IPv4-mapped network (`::ffff:10.0.0.0/104`) as the IPv4 network it names: peers and
/// `X-Forwarded-For` entries in that form are read as the IPv4 addresses they are.
fn ipv4_if_mapped(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, ipnet::IpNet::V4),
        _ => net,
    }
}

/// An origin as a browser writes it in `Origin`: `scheme://host[:port]`. For a scheme the URL
/// standard gives an opaque origin (`capacitor://localhost`, `chrome-extension://<id>`: hybrid
/// apps and extensions) the `url` crate serialises the origin as `null`, which is what a
/// sandboxed frame, a `data:` document or a redirected request sends: listed as such, anyone
/// could call with credentials and pass the CSRF check. The text of the scheme, host and port
/// is kept instead, so `null` never matches.
fn origin_text(url: &url::Url) -> String {
    if url.origin().is_tuple() {
        return url.origin().ascii_serialization();
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: raw::Server) -> (Option<ServerConfig>, Vec<String>) {
        let mut problems = Problems::default();
        let config = server_config(raw, Path::new("."), &mut problems);
        (config, printed(problems))
    }

    /// Peers and `X-Forwarded-For` entries in the IPv4-mapped form are read as IPv4 addresses
    /// (`limits::client_address`, the accept loop): a network written in that form must name
    /// the same IPv4 addresses, or a proxy listed so would no longer be trusted.
    #[test]
    fn an_ipv4_mapped_trusted_proxy_is_the_ipv4_network_it_names() {
        let (config, found) = check(raw::Server {
            public_url: Some("https://app.example.com".into()),
            trusted_proxies: Some(vec![
                "::ffff:10.0.0.0/104".into(),
                "::ffff:192.0.2.7".into(),
                "2001:db8::/32".into(),
            ]),
            ..Default::default()
        });
        assert_eq!(found, Vec::<String>::new());
        let nets: Vec<String> = config
            .unwrap()
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    }

    #[test]
    fn golden_server_messages() {
        let (config, found) = check(raw::Server {
            bff_prefix: Some("/bff/".into()),
            trusted_proxies: Some(vec!["10.0.0.0/8".into(), "ten".into()]),
            cors_origins: Some(vec!["admin".into()]),
            max_header_size: Some("512".into()),
            workers: Some(2000),
            ..Default::default()
        });
        assert!(config.is_none());
        assert_eq!(
            found,
            [
                "server.public_url: is required: the origin browsers use, e.g. \"https://app.example.com\"",
                "server.bff_prefix: \"/bff/\" must start with / and not end with /, e.g. \"/bff\"",
                "server.trusted_proxies[1]: \"ten\" is not a CIDR; write e.g. \"10.0.0.0/8\" or \"192.0.2.1\"",
                "server.cors_origins[0]: \"admin\" is not an origin; write e.g. \"https://admin.example.com\"",
                "server.max_header_size: must be at least 1KiB",
                "server.workers: 2000 is out of range; use 1 to 1024, or leave it out for one per CPU",
            ]
        );
        let (_, found) = check(raw::Server {
            public_url: Some("https://app.example.com/app".into()),
            ..Default::default()
        });
        assert_eq!(
            found,
            [
                "server.public_url: \"https://app.example.com/app\" must be an http(s) origin without path or query, e.g. \"https://app.example.com\""
            ]
        );
    }

    /// A hybrid app's or an extension's origin is kept as the browser writes it, never as the
    /// `null` of an opaque origin (which anyone can send).
    #[test]
    fn cors_origins_are_kept_as_browsers_write_them_and_never_as_null() {
        let (config, found) = check(raw::Server {
            public_url: Some("https://app.example.com".into()),
            cors_origins: Some(vec![
                "https://Admin.Example.com:443/".into(),
                "http://localhost:8100".into(),
                "capacitor://localhost".into(),
                "chrome-extension://abcdefghijklmnop".into(),
                "app://Bundle:9".into(),
            ]),
            ..Default::default()
        });
        assert_eq!(found, Vec::<String>::new());
        let Some(config) = config else {
            panic!("no config")
        };
        assert_eq!(
            config.cors_origins,
            [
                "https://admin.example.com",
                "http://localhost:8100",
                "capacitor://localhost",
                "chrome-extension://abcdefghijklmnop",
                "app://bundle:9",
            ]
        );
    }

    #[test]
    fn defaults_fill_what_is_not_written() {
        let (config, found) = check(raw::Server {
            public_url: Some("https://app.example.com:8443".into()),
            ..Default::default()
        });
        assert_eq!(found, Vec::<String>::new());
        let Some(config) = config else {
            panic!("no config")
        };
        assert_eq!(config.public_origin, "https://app.example.com:8443");
        assert_eq!(config.bff_prefix, "/bff");
        assert_eq!(config.max_header_size, 64 << 10);
        assert_eq!(config.workers, None);
    }
}
