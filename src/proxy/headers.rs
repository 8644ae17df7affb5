//! Header rewriting for forwarded requests and relayed responses: hop-by-hop removal,
//! `X-Forwarded-*`, request ids, and removal of Vestibule's own cookies.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The `Upgrade` protocol of a request asking to switch protocols (never `h2c`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    let is_h2c = protocol
        .to_str()
        .is_ok_and(|p| p.trim().eq_ignore_ascii_case("h2c"));
    (wants && !is_h2c).then(|| protocol.clone())
}

/// Removes the named cookies from every `Cookie` header, keeping the others in order.
pub fn remove_cookies(headers: &mut HeaderMap, names: &[&str]) {
    let mut kept: Vec<String> = Vec::new();
    let mut changed = false;
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else {
            changed = true;
            continue;
        };
        for pair in text.split(';') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
            if names.contains(&name) {
                changed = true;
            } else {
                kept.push(pair.to_string());
            }
        }
    }
    if !changed {
        return;
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
}

/// What the proxy knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub ip: IpAddr,
    pub tls: bool,
    /// The peer is a trusted proxy, so its `X-Forwarded-*` headers are believed.
    pub trusted: bool,
}

/// Sets `X-Forwarded-For/Proto/Host`, appending to incoming values only from trusted proxies.
pub fn set_forwarded(headers: &mut HeaderMap, peer: Peer, host: Option<&HeaderValue>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let proto = HeaderName::from_static("x-forwarded-proto");
    let fhost = HeaderName::from_static("x-forwarded-host");
    let ip = peer.ip.to_string();
    let chain = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prior) if peer.trusted && !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(xff, value);
    }
    if !(peer.trusted && headers.contains_key(&proto)) {
        headers.insert(
            proto,
            HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
        );
    }
    if !(peer.trusted && headers.contains_key(&fhost)) {
        match host {
            Some(h) => {
                headers.insert(fhost, h.clone());
            }
            None => {
                headers.remove(fhost);
            }
        }
    }
}

/// Returns the request id, creating one when absent or unusable.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    let name = HeaderName::from_static("x-request-id");
    if let Some(v) = headers.get(&name) {
        let ok = v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    let value = HeaderValue::from_str(&hex::encode(bytes)).unwrap_or(HeaderValue::from_static("0"));
    headers.insert(name, value.clone());
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn own_cookies_are_removed_and_others_kept() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; __Host-vestibule=x; b=2".parse().unwrap(),
        );
        h.append(header::COOKIE, "vestibule-login=y".parse().unwrap());
        remove_cookies(&mut h, &["__Host-vestibule", "vestibule-login"]);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
    }

    #[test]
    fn untrusted_forwarded_for_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        let peer = Peer {
            ip: "10.0.0.1".parse().unwrap(),
            tls: false,
            trusted: false,
        };
        set_forwarded(&mut h, peer, None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1");
        let mut h2 = HeaderMap::new();
        h2.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        set_forwarded(
            &mut h2,
            Peer {
                trusted: true,
                ..peer
            },
            None,
        );
        assert_eq!(h2.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.1");
    }
}
