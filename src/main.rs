//! The `sani` binary: everything is in the library; see [`sani::cli`] for the commands and the
//! exit-code contract.

fn main() -> std::process::ExitCode {
    sani::cli::main()
}
