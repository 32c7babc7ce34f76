//! Ctrl-C and SIGTERM, for the headless runs and the TUI alike, through signal-hook's safe
//! flag handlers (a handler may only touch an atomic; no channel is async-signal-safe).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

/// An interrupt that has arrived and not been taken yet.
#[derive(Debug, Clone, Default)]
pub struct Interrupts(Arc<AtomicBool>);

impl Interrupts {
    /// Sets `flag` on every SIGINT / SIGTERM.
    pub fn set_flag(flag: Arc<AtomicBool>) -> io::Result<()> {
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(())
    }

    /// A signal that arrives while `flag` is already set ends the process at once, with the
    /// shell's code for it (130 for SIGINT, 143 for SIGTERM). Register before `set_flag`, so
    /// the first signal only sets the flag.
    pub fn exit_on_second(flag: Arc<AtomicBool>) -> io::Result<()> {
        for (signal, code) in [(SIGINT, 130), (SIGTERM, 143)] {
            signal_hook::flag::register_conditional_shutdown(signal, code, flag.clone())?;
        }
        Ok(())
    }

    /// Interrupts the TUI takes one at a time (it restores the terminal itself, so it never
    /// exits from a handler).
    pub fn install() -> io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        Self::set_flag(flag.clone())?;
        Ok(Self(flag))
    }

    /// Whether an interrupt arrived since the last call.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}
