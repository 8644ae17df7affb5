// mimalloc: less CPU per request than glibc's allocator under proxy load. `no_thp` keeps it off
// transparent huge pages, which otherwise add ~15 MiB of RSS (see docs/benchmarks.md). Not the
// crate's `v2` (mimalloc 2.x): its aligned path is cheaper for blocks above 1 KiB (3.3
// over-allocates them, ~0.2-0.4k instructions per request here), but `no_thp` does not reach
// 2.x's default: peak RSS with 10,000 active sessions went 53 -> 67 MiB (round 12).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vestibule::cli::main()
}
