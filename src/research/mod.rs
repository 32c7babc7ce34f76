//! The research procedures around single runs: learning-rate sweeps (stopping trials that
//! diverge or stall, and recommending from the evidence), the LR range test, studies (arms x
//! seeds with paired intervals), comparing finished runs, and the list of past runs.
//!
//! Each procedure runs on its own thread and talks to the headless printer or the TUI through
//! typed events, as a single run does through `Event`s; every run it starts is a
//! `session::RunSession`.

pub mod compare;
pub mod divergence;
pub mod lengths;
pub mod lr_find;
pub mod runs;
pub mod study;
pub mod sweep;

/// Starts a procedure's thread, `difflab-<name>`, which holds the procedure's folder (`lock`,
/// its file naming this process) until `work` returns.
fn spawn_holding<T: Send + 'static>(
    name: &str,
    lock: crate::train::output_dir::ProcedureLock,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("difflab-{name}"))
        .spawn(move || {
            let mut held = lock;
            // best effort: the lock holds whether or not its file names us
            let _ = held.mark();
            work()
        })
        .unwrap_or_else(|e| panic!("cannot start the {name} thread: {e}"))
}
