// mimalloc: less CPU per request than glibc's allocator under proxy load. `no_thp` keeps it off
// transparent huge pages, which otherwise add ~15 MiB of RSS (see docs/benchmarks.md). `v2`: the
// crate's allocator asks for every block with its alignment, and mimalloc 3.3's aligned path
// over-allocates (its slow path) any block above 1 KiB whose size is not a power of two, ~4 per
// request here (the request's futures, header maps); 2.x serves alignments up to 16 as plain blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vestibule::cli::main()
}
