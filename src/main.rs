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
        // one arena: a worker thread's arena is a set of 64 MB heaps that glibc shrinks back to
        // the kernel on free, so the head's 50 MB logits were page-faulted in again every
        // micro-batch (12% of a sanity-gpt2vocab step in the kernel); the main arena keeps them
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Subnormal floats (below ~1.2e-38) take a slow microcode path on x86: a model trained at too
/// high a learning rate fills its softmax tails and Adam moments with them, and a demo sweep's
/// 1e-1 trial ran 10x slower than its 1e-2 trial. Flush them to zero (FTZ, and DAZ for inputs),
/// as CUDA and most BLAS builds do; the values lost are below anything a loss can show. Set on
/// the main thread before any other exists: threads inherit the floating-point environment
/// (POSIX `pthread_create`), so the trainer and the rayon workers get it too.
fn flush_subnormals_to_zero() {
    #[cfg(target_arch = "x86_64")]
    // Safety: reads and writes this thread's MXCSR register only; bits 15 (FTZ) and 6 (DAZ).
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // Safety: sets this thread's FPCR.FZ (bit 24), which only changes subnormal handling.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
}

fn main() -> ExitCode {
    keep_freed_memory_for_reuse();
    flush_subnormals_to_zero();
    let invocation = match difflab::commands::cli::parse(std::env::args_os()) {
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
            eprintln!("error: {}", difflab::commands::describe_error(&e));
            ExitCode::from(difflab::commands::exit_code(&e))
        }
    }
}
