//! The client's address as Vestibule can vouch for it.

use http::{HeaderMap, HeaderName};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The address a request comes from, after trusted proxies.
///
/// A peer outside `trusted` is the client itself: whatever `X-Forwarded-For` it sent is its own
/// claim and is ignored. A trusted peer appended the address it saw to `X-Forwarded-For`; the
/// entries are read right to left, stepping over trusted proxies, and the first one that is not
/// a trusted proxy is the client. When every entry is trusted, the left-most is the client; when
/// the entry to read is not an address, the chain is broken there and the last address vouched
/// for (a trusted proxy) stands in for the client.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Read as bytes, every line: a line with bytes outside ASCII is not skipped whole (its
    // entries to the right may be a trusted proxy's, those to the left the client's own); an
    // entry that is not an address breaks the chain where it stands.
    let lines: Vec<&[u8]> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .map(http::HeaderValue::as_bytes)
        .collect();
    let mut vouched = peer;
    for entry in lines
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(|&b| b == b','))
    {
        let entry = std::str::from_utf8(entry.trim_ascii()).ok();
        let Some(ip) = entry.and_then(parse) else {
            return vouched;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        vouched = ip;
    }
    vouched
}

/// A client address as the limits count it: IPv4 as is, IPv6 by its /64 (the block one
/// subscriber usually holds, so that a client cannot take a new budget or a new share of the
/// connections with each address of its block).
pub(super) fn client_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) >> 64) | (1 << 127),
        },
    }
}

/// `192.0.2.1`, `2001:db8::1`, and the forms with a port: `192.0.2.1:80`, `[2001:db8::1]:80`.
/// An IPv4-mapped address (`::ffff:192.0.2.1`, what a proxy listening on `[::]` saw of an IPv4
/// peer) is the IPv4 address, as `trusted_proxies` names it.
fn parse(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in xff {
            map.append("x-forwarded-for", line.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["198.51.100.7"]);
        assert_eq!(
            client_address(ip("203.0.113.9"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("203.0.113.9"), &h, &[]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_trusted_peer_names_the_client_in_the_right_most_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        // The client may prepend anything; only what trusted proxies appended counts.
        let h = headers(&["1.1.1.1, 203.0.113.5, 192.168.1.1"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("203.0.113.5")
        );
        // Several header lines are one list, in order.
        let h = headers(&["1.1.1.1", "203.0.113.5", "10.1.1.1"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn ports_and_brackets_are_understood() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["203.0.113.5:4711"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("203.0.113.5")
        );
        let h = headers(&["[2001:db8::7]:443"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("2001:db8::7")
        );
        let h = headers(&["[2001:db8::8]"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("2001:db8::8")
        );
    }

    #[test]
    fn without_forwarded_for_or_with_only_trusted_entries_the_last_vouched_address_stands() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
        let h = headers(&["10.9.9.9, 10.0.0.3"]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("10.9.9.9"));
    }

    /// A line that is not visible ASCII (the client wrote `\x80x`, a trusted proxy appended
    /// the address it saw to that line) is read entry by entry: skipped whole, the address the
    /// client wrote to its left stood for the client.
    #[test]
    fn a_line_that_is_not_ascii_is_read_entry_by_entry_and_breaks_the_chain_where_it_must() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut h = headers(&["198.51.100.66"]);
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\x80x, 203.0.113.5").unwrap(),
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("203.0.113.5")
        );
        let mut h = headers(&["198.51.100.66"]);
        h.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\x80x, 10.1.1.1").unwrap(),
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("10.1.1.1"),
            "the chain ends at the entry that is not an address"
        );
    }

    #[test]
    fn a_broken_entry_ends_the_chain_at_the_last_vouched_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&["203.0.113.5, unknown, 10.0.0.3"]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.3"));
        let h = headers(&["garbage"]);
        assert_eq!(client_address(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
    }
}
