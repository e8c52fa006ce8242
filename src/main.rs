fn main() -> std::process::ExitCode {
    chimap::cli::main()
}
