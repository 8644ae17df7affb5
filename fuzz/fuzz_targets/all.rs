//! Every fuzz target in one libFuzzer binary, so they are built and linked once rather than once
//! each. Each target is a module here, `fuzz_targets/<name>.rs` with a `pub fn fuzz(data: &[u8])`,
//! and has its own seeds in `corpus/<name>/`; the process runs the one named by the environment
//! variable `VESTIBULE_FUZZ_TARGET` (read once, at start-up). `scripts/fuzz` sets it; by hand:
//! `VESTIBULE_FUZZ_TARGET=return_url cargo +nightly fuzz run all corpus/return_url`.
#![no_main]

mod common;

mod baggage;
mod config_parse;
mod cookie_open;
mod jws_parse;
mod lane_head;
mod logout_token;
mod path_canonicalize;
mod return_url;
mod upstream_answer;
mod www_authenticate;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const VARIABLE: &str = "VESTIBULE_FUZZ_TARGET";

/// Every target by name (its module's and its corpus directory's).
const TARGETS: [(&str, fn(&[u8])); 10] = [
    ("baggage", baggage::fuzz),
    ("config_parse", config_parse::fuzz),
    ("cookie_open", cookie_open::fuzz),
    ("jws_parse", jws_parse::fuzz),
    ("lane_head", lane_head::fuzz),
    ("logout_token", logout_token::fuzz),
    ("path_canonicalize", path_canonicalize::fuzz),
    ("return_url", return_url::fuzz),
    ("upstream_answer", upstream_answer::fuzz),
    ("www_authenticate", www_authenticate::fuzz),
];

/// The target this process runs, chosen before the first input.
static TARGET: OnceLock<fn(&[u8])> = OnceLock::new();

/// Picks the target `VESTIBULE_FUZZ_TARGET` names, or ends the process saying which exist.
fn choose() {
    let names = || TARGETS.map(|(name, _)| name).join(" ");
    let wanted = std::env::var(VARIABLE).unwrap_or_default();
    match TARGETS.iter().find(|(name, _)| *name == wanted) {
        Some((_, fuzz)) => {
            let _ = TARGET.set(*fuzz);
        }
        None if wanted.is_empty() => {
            eprintln!("set {VARIABLE} to the fuzz target to run: {}", names());
            std::process::exit(2);
        }
        None => {
            eprintln!(
                "{VARIABLE}={wanted:?} is no fuzz target; there are: {}",
                names()
            );
            std::process::exit(2);
        }
    }
}

fuzz_target!(init: choose(), |data: &[u8]| {
    if let Some(fuzz) = TARGET.get() {
        fuzz(data);
    }
});
