// mimalloc: less CPU per request than glibc's allocator under proxy load. `no_thp` keeps it off
// transparent huge pages, which otherwise add ~15 MiB of RSS (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vestibule::cli::main()
}
