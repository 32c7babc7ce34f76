use std::process::ExitCode;

/// Training frees and reallocates the same large activation buffers every step. glibc hands
/// blocks above its mmap threshold back to the kernel on free, so each step page-faults them
/// in again (it showed as ~10% of CPU time in `perf`). Keep them in the heap instead.
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory_for_reuse();
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
