use std::process::ExitCode;

fn main() -> ExitCode {
    gateway_userspace::cli::main()
}
