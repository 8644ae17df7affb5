//! How many sessions the cache holds when `session.cache_entries` is left out: a quarter of the
//! memory the process may use, at what a cached session and its cookie's memo entries cost,
//! between [`DEFAULT_CACHE_ENTRIES`] and [`MAX_CACHE_ENTRIES`].
//!
//! A fixed number is wrong one way or the other: 20,000 keeps a host with 100,000 active users
//! reading Redis on most requests, 200,000 lets a pod with a 256 MiB limit be killed for memory
//! once that many users are active. The cache's tables grow only as sessions come
//! (`table.rs`), so a large size costs nothing until it is used, and a quarter of the limit
//! leaves the rest to everything else.
//!
//! The memory the process may use is the smallest of its cgroup's limit (v2 `memory.max`, or
//! v1 `memory.limit_in_bytes`, where the kernel has no limit it writes `max` or a huge number)
//! and the machine's memory (`MemTotal`); nothing readable gives the floor.

use std::path::Path;

use crate::config::{DEFAULT_CACHE_ENTRIES, MAX_CACHE_ENTRIES};

/// What one cached session costs (its slot and the opened session, claims as JSON text, no ID
/// token: docs/configuration.md measures 1–2 KB).
const SESSION_BYTES: u64 = 2048;
/// What one remembered cookie costs in each serving worker's memo (its slot and the cookie).
const MEMO_BYTES: u64 = 272;

/// The cache's size for a process that may use `limit` bytes and serves with `workers` workers.
pub fn entries_for(limit: Option<u64>, workers: usize) -> usize {
    let Some(limit) = limit else {
        return DEFAULT_CACHE_ENTRIES;
    };
    let per_entry = SESSION_BYTES + MEMO_BYTES * workers.max(1) as u64;
    let entries = usize::try_from(limit / 4 / per_entry).unwrap_or(usize::MAX);
    entries.clamp(DEFAULT_CACHE_ENTRIES, MAX_CACHE_ENTRIES)
}

/// The memory this process may use, as far as the system says (see the module's documentation).
pub fn memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let own = read("/proc/self/cgroup").unwrap_or_default();
    let v2 = cgroup_path(&own, None).and_then(|p| read(&format!("/sys/fs/cgroup{p}/memory.max")));
    let v1 = cgroup_path(&own, Some("memory"))
        .and_then(|p| read(&format!("/sys/fs/cgroup/memory{p}/memory.limit_in_bytes")));
    // A container's own cgroup is usually the root of what it sees.
    let cgroup = [
        v2,
        v1,
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ]
    .into_iter()
    .flatten()
    .filter_map(|text| cgroup_limit(&text))
    .min();
    let machine = read("/proc/meminfo").and_then(|text| mem_total(&text));
    [cgroup, machine].into_iter().flatten().min()
}

/// This process's cgroup path in `/proc/self/cgroup`: the v2 one (`0::/path`), or with
/// `controller` the v1 hierarchy's that has it (`4:memory:/path`); `None` for the root.
fn cgroup_path(text: &str, controller: Option<&str>) -> Option<String> {
    let path = text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let wanted = match controller {
            None => controllers.is_empty(),
            Some(name) => controllers.split(',').any(|c| c == name),
        };
        wanted.then_some(path.trim())
    })?;
    (Path::new(path).is_absolute() && !path.contains("..") && path != "/").then(|| path.to_owned())
}

/// A limit file's bytes; `None` for no limit (`max`, or v1's page-rounded `i64::MAX`).
fn cgroup_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_quarter_of_the_limit_between_the_floor_and_the_most_allowed() {
        // A pod limited to 256 MiB with two workers: ~64 MiB for ~25,000 sessions.
        let pod = entries_for(Some(256 * MIB), 2);
        assert!((25_000..27_000).contains(&pod), "{pod}");
        // Its cache full and every memo full stay within the quarter.
        let used = pod as u64 * (SESSION_BYTES + 2 * MEMO_BYTES);
        assert!(used <= 64 * MIB, "{used}");
        // More workers, more memos: fewer sessions.
        assert!(entries_for(Some(4096 * MIB), 16) < entries_for(Some(4096 * MIB), 2));
        // Never below the fixed default of earlier releases, never above the most allowed.
        assert_eq!(entries_for(Some(64 * MIB), 2), DEFAULT_CACHE_ENTRIES);
        assert_eq!(entries_for(Some(1 << 40), 2), MAX_CACHE_ENTRIES);
        assert_eq!(entries_for(None, 2), DEFAULT_CACHE_ENTRIES);
        assert_eq!(entries_for(Some(0), 0), DEFAULT_CACHE_ENTRIES);
    }

    #[test]
    fn the_limits_are_read_as_the_kernel_writes_them() {
        assert_eq!(cgroup_limit("268435456\n"), Some(256 * MIB));
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(cgroup_limit(""), None);
        assert_eq!(
            mem_total("MemTotal:       24585304 kB\nMemFree: 1 kB\n"),
            Some(24_585_304 * 1024)
        );
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(
            cgroup_path("0::/kubepods/pod1/abc\n", None).as_deref(),
            Some("/kubepods/pod1/abc")
        );
        assert_eq!(cgroup_path("0::/\n", None), None);
        assert_eq!(cgroup_path("0::/../../etc\n", None), None);
        let v1 = "5:devices:/a\n4:cpuacct,memory:/process_api/x\n0::/\n";
        assert_eq!(cgroup_path(v1, None), None);
        assert_eq!(
            cgroup_path(v1, Some("memory")).as_deref(),
            Some("/process_api/x")
        );
        assert_eq!(cgroup_path("1:name=systemd:/x\n", Some("memory")), None);
    }

    #[test]
    fn this_machine_has_a_limit() {
        // /proc/meminfo at least: Linux is all this runs on.
        let limit = memory_limit().expect("a memory size");
        assert!(limit >= 64 * MIB, "{limit}");
    }
}
