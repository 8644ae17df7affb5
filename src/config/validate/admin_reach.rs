//! A route whose upstream is the admin listener itself: the public listener would serve
//! `/metrics` and `/jwks` (and `/readyz`'s view of the store and provider) to anyone, through
//! the route. Nor may a route's upstream be the public listener itself (a loop). Decided from the upstream URL and `admin.listen` alone, without resolving names:
//! every spelling that is known to reach the listener counts (its address, `localhost`, a
//! loopback or unspecified address when it listens on loopback or everywhere); a name or another
//! address of the host's own is not known at load.

use super::*;
use std::net::IpAddr;

/// The problem of the route whose key is `key`, if its upstream is the admin listener at `admin`.
pub(super) fn problem(key: &str, route: &RouteConfig, admin: SocketAddr) -> Option<ConfigError> {
    let url = reached(route, admin)?;
    Some(ConfigError {
        path: format!("{key}.upstream"),
        message: format!(
            "{:?} reaches the admin listener (admin.listen = {admin}), whose /metrics and /jwks \
             this route would serve to browsers; point the route at its service, or move \
             admin.listen to another port",
            url.as_str()
        ),
    })
}

/// The problem of the route whose key is `key`, if its upstream is the public listener at
/// `public` itself: each of its requests would come back in as a request of Vestibule's own
/// (from its address, maybe a trusted proxy's), without the browser's session cookie, and go
/// round again (until the connection limit) or to whichever route owns the path it is sent to.
pub(super) fn loop_problem(
    key: &str,
    route: &RouteConfig,
    public: SocketAddr,
) -> Option<ConfigError> {
    let url = reached(route, public)?;
    Some(ConfigError {
        path: format!("{key}.upstream"),
        message: format!(
            "{:?} reaches the public listener itself (server.listen = {public}): the route's \
             requests would come back to Vestibule, without the browser's session, round and \
             round or to another route; point the route at its service",
            url.as_str()
        ),
    })
}

/// The upstream URL of `route` when it reaches the listener bound to `listen` (a port of 0 is
/// known only once bound: nothing reaches it here).
fn reached(route: &RouteConfig, listen: SocketAddr) -> Option<&url::Url> {
    let Target::Upstream(base) = &route.target else {
        return None;
    };
    let url = &base.url;
    if listen.port() == 0 || url.port_or_known_default() != Some(listen.port()) {
        return None;
    }
    let host = url.host()?;
    reaches(&host, listen.ip()).then_some(url)
}

/// Whether a connection to `host` (on the listener's port) reaches a listener bound to `bound`.
fn reaches(host: &url::Host<&str>, bound: IpAddr) -> bool {
    let bound = unmapped(bound);
    match host {
        // RFC 6761 §6.3: `localhost` and the names below it are the loopback addresses.
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost"))
                && (bound.is_unspecified() || bound == LOOPBACK_V4 || bound == LOOPBACK_V6)
        }
        url::Host::Ipv4(ip) => reaches_ip(IpAddr::V4(*ip), bound),
        url::Host::Ipv6(ip) => reaches_ip(unmapped(IpAddr::V6(*ip)), bound),
    }
}

const LOOPBACK_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const LOOPBACK_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

/// `::ffff:a.b.c.d` as `a.b.c.d`, the address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn reaches_ip(ip: IpAddr, bound: IpAddr) -> bool {
    let local = ip.is_loopback() || ip.is_unspecified();
    ip == bound
        // Bound everywhere, every loopback address is the host's: `0.0.0.0`'s IPv4 ones, `::`'s
        // of both families (a dual-stack socket).
        || (bound.is_unspecified() && local && (bound.is_ipv6() || ip.is_ipv4()))
        // A connection to the unspecified address goes to the loopback one of its family.
        || (ip.is_unspecified() && bound == if ip.is_ipv4() { LOOPBACK_V4 } else { LOOPBACK_V6 })
}
