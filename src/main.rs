// mimalloc: less CPU per request than glibc's allocator under proxy load. The crate's `v2`
// (mimalloc 2.x): mimalloc 3.x, which the crate uses otherwise, serves every block above 1 KiB
// whose size is not a power of two through its over-allocating aligned path (the crate asks for
// each block with its alignment); 2.x serves them as plain blocks (docs/benchmarks.md, round
// 15). 2.x leaves transparent huge pages to the kernel's default, which added ~14 MiB of RSS
// with 10,000 active sessions (round 12): `main` turns them off for the process first, unless
// the operator asked mimalloc for large OS pages (its `madvise` for them is built in: no
// `no_thp`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the runtime and its memory: a huge page would hold ~2 MiB of mostly unused heap per
    // fault. Faults from here on take small pages; the flag is the process's (and its children's).
    // A kernel without it (or a sandbox that refuses the call) keeps its default. Not when the
    // operator asked for them (`MIMALLOC_ALLOW_LARGE_OS_PAGES=1`, `cli::huge_pages_asked`).
    if !vestibule::cli::huge_pages_asked() {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
    vestibule::cli::main()
}
