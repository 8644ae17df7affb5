//! `[limits]` and the connection keys of `[server]` and `[admin]`: how much an anonymous client
//! may make Vestibule do. Errors name the TOML path and the range, like every other key.

use super::super::{ConnectionLimits, LimitsConfig, raw};
use super::{Problems, duration, size};
use std::time::Duration;

pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The least default share of one client address (unless `max_connections` is smaller): a
/// browser holds up to 6 HTTP/1 connections to a host, plus its WebSockets and event streams,
/// and an office behind one NAT address holds that many for each of its users.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT_FLOOR: usize = 256;
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_BODY_MIN_RATE: u64 = 500;
/// As nginx's `send_timeout`.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// RFC 9113 §6.5.2 advises no fewer than 100; each stream may hold an upstream connection, so one
/// HTTP/2 connection weighs up to this many HTTP/1 ones (Apache httpd and h2o use 100 too).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
pub const DEFAULT_HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_LOGIN_PER_MINUTE: u32 = 60;
pub const DEFAULT_CALLBACK_PER_MINUTE: u32 = 60;
pub const DEFAULT_BACKCHANNEL_LOGOUT_PER_MINUTE: u32 = 600;
pub const DEFAULT_TRACKED_ADDRESSES: usize = 100_000;

/// An integer key within `min..=max`; out of range is reported and the default kept.
pub(super) fn count(
    value: Option<i64>,
    path: &str,
    default: u64,
    (min, max): (u64, u64),
    problems: &mut Problems,
) -> u64 {
    let Some(n) = value else { return default };
    match u64::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => n,
        _ => {
            problems.add(path, format!("{n} is out of range; use {min} to {max}"));
            default
        }
    }
}

/// A duration that must not be zero.
fn positive(
    value: Option<String>,
    path: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    let d = duration(value, path, default, problems);
    if d.is_zero() {
        problems.add(path, "must be longer than 0s");
        return default;
    }
    d
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The connection keys of `[server]` (`server_config` leaves them to this).
pub(super) fn connections(raw: &raw::Server, problems: &mut Problems) -> ConnectionLimits {
    let interval = duration(
        raw.http2_keep_alive_interval.clone(),
        "server.http2_keep_alive_interval",
        DEFAULT_HTTP2_KEEP_ALIVE_INTERVAL,
        problems,
    );
    let max_connections = to_usize(count(
        raw.max_connections,
        "server.max_connections",
        DEFAULT_MAX_CONNECTIONS as u64,
        (1, 1_000_000),
        problems,
    ));
    ConnectionLimits {
        max_connections,
        max_connections_per_client: to_usize(count(
            raw.max_connections_per_client,
            "server.max_connections_per_client",
            default_per_client(max_connections) as u64,
            (0, 1_000_000),
            problems,
        )),
        idle_timeout: positive(
            raw.connection_idle_timeout.clone(),
            "server.connection_idle_timeout",
            DEFAULT_CONNECTION_IDLE_TIMEOUT,
            problems,
        ),
        body_read_timeout: positive(
            raw.body_read_timeout.clone(),
            "server.body_read_timeout",
            DEFAULT_BODY_READ_TIMEOUT,
            problems,
        ),
        body_min_rate: size(
            raw.body_min_rate.clone(),
            "server.body_min_rate",
            DEFAULT_BODY_MIN_RATE,
            problems,
        ),
        send_timeout: positive(
            raw.send_timeout.clone(),
            "server.send_timeout",
            DEFAULT_SEND_TIMEOUT,
            problems,
        ),
        http2_max_concurrent_streams: to_u32(count(
            raw.http2_max_concurrent_streams,
            "server.http2_max_concurrent_streams",
            u64::from(DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS),
            (1, 10_000),
            problems,
        )),
        http2_keep_alive_interval: (!interval.is_zero()).then_some(interval),
        http2_keep_alive_timeout: positive(
            raw.http2_keep_alive_timeout.clone(),
            "server.http2_keep_alive_timeout",
            DEFAULT_HTTP2_KEEP_ALIVE_TIMEOUT,
            problems,
        ),
    }
}

/// A quarter of `max_connections`: one address must not hold every place, and four addresses
/// that each hold their share are already a distributed attack (which no cap per address stops).
/// At least [`DEFAULT_MAX_CONNECTIONS_PER_CLIENT_FLOOR`] (or `max_connections`, if fewer), so
/// that a small listener does not cap a NAT'd office at a handful of connections.
fn default_per_client(max_connections: usize) -> usize {
    (max_connections / 4).max(max_connections.min(DEFAULT_MAX_CONNECTIONS_PER_CLIENT_FLOOR))
}

pub(super) fn admin_max_connections(value: Option<i64>, problems: &mut Problems) -> usize {
    to_usize(count(
        value,
        "admin.max_connections",
        DEFAULT_ADMIN_MAX_CONNECTIONS as u64,
        (1, 100_000),
        problems,
    ))
}

pub(super) fn limits_config(raw: raw::Limits, problems: &mut Problems) -> LimitsConfig {
    let raw::Limits {
        login_per_minute,
        callback_per_minute,
        backchannel_logout_per_minute,
        tracked_addresses,
    } = raw;
    let mut rate = |value, key: &str, default: u32| {
        to_u32(count(
            value,
            &format!("limits.{key}"),
            u64::from(default),
            (0, 1_000_000),
            problems,
        ))
    };
    LimitsConfig {
        login_per_minute: rate(
            login_per_minute,
            "login_per_minute",
            DEFAULT_LOGIN_PER_MINUTE,
        ),
        callback_per_minute: rate(
            callback_per_minute,
            "callback_per_minute",
            DEFAULT_CALLBACK_PER_MINUTE,
        ),
        backchannel_logout_per_minute: rate(
            backchannel_logout_per_minute,
            "backchannel_logout_per_minute",
            DEFAULT_BACKCHANNEL_LOGOUT_PER_MINUTE,
        ),
        tracked_addresses: to_usize(count(
            tracked_addresses,
            "limits.tracked_addresses",
            DEFAULT_TRACKED_ADDRESSES as u64,
            (1, 10_000_000),
            problems,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::printed;
    use super::*;

    #[test]
    fn golden_limits_messages() {
        let mut problems = Problems::default();
        let limits = limits_config(
            raw::Limits {
                login_per_minute: Some(-1),
                tracked_addresses: Some(0),
                ..Default::default()
            },
            &mut problems,
        );
        assert_eq!(limits.login_per_minute, DEFAULT_LOGIN_PER_MINUTE);
        let connections = connections(
            &raw::Server {
                max_connections: None,
                connection_idle_timeout: Some("0s".into()),
                body_read_timeout: None,
                body_min_rate: None,
                send_timeout: Some("0s".into()),
                http2_max_concurrent_streams: Some(0),
                http2_keep_alive_interval: Some("0s".into()),
                http2_keep_alive_timeout: None,
                ..Default::default()
            },
            &mut problems,
        );
        assert_eq!(connections.http2_keep_alive_interval, None);
        assert_eq!(
            printed(problems),
            [
                "limits.login_per_minute: -1 is out of range; use 0 to 1000000",
                "limits.tracked_addresses: 0 is out of range; use 1 to 10000000",
                "server.connection_idle_timeout: must be longer than 0s",
                "server.send_timeout: must be longer than 0s",
                "server.http2_max_concurrent_streams: 0 is out of range; use 1 to 10000",
            ]
        );
    }
}
