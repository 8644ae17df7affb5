//! The harness itself, where a fault of its own would pass for a fault of the proxy's.

use crate::support::free_port;
use std::process::Command;

/// Set in the process [`a_port_one_test_process_holds_is_never_given_to_another`] starts.
const CHILD: &str = "VESTIBULE_TEST_PORT_CHILD";

/// A port handed to a server that is down for a while (a Redis killed, to be restarted on the
/// same port) is free to bind meanwhile, but still this test process's: another test process
/// running beside it (`scripts/test` runs the 76 s outage test in one of its own) must not be
/// given it. It was, in CI: the other process's Redis took the port, the first process's proxies
/// reconnected to that foreign server, and both tests saw refresh tokens spent twice.
#[test]
fn a_port_one_test_process_holds_is_never_given_to_another() {
    let held = free_port();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "harness::child_takes_a_port", "--ignored"])
        .args(["--nocapture", "--test-threads=1", "--quiet"])
        .env(CHILD, "1")
        .env("VESTIBULE_TEST_PORT_START", held.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let given: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("port="))
        .unwrap_or_else(|| panic!("the child named no port: {stdout}"))
        .trim()
        .parse()
        .unwrap();
    assert_ne!(
        given, held,
        "another test process was given the port this one holds"
    );
}

/// Run by [`a_port_one_test_process_holds_is_never_given_to_another`] in a process of its own,
/// starting its walk at the port the parent holds.
#[test]
#[ignore = "run in a process of its own by a_port_one_test_process_holds_is_never_given_to_another"]
fn child_takes_a_port() {
    assert_eq!(
        std::env::var(CHILD).as_deref(),
        Ok("1"),
        "run by the parent test"
    );
    println!("port={}", free_port());
}
