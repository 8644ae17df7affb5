fn main() -> std::process::ExitCode {
    vestibule::cli::main()
}
