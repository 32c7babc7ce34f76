use std::process::ExitCode;

fn main() -> ExitCode {
    let invocation = match difflab::cli::parse(std::env::args_os()) {
        Ok(inv) => inv,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2)
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    match difflab::commands::run(invocation) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(difflab::commands::exit_code(&e))
        }
    }
}
