//! A run without the TUI: JSON markers on stdout, human lines on stderr, the run directory's
//! files, controls through the run directory's inbox, and Ctrl-C / SIGTERM handling.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::Resolved;
use crate::data::prepare::default_cache_dir;
use crate::signals::Interrupts;
use crate::sinks::{self, human::StderrLog, Sinks, StdoutMarkers};
use crate::train::remote::Inbox;
use crate::train::{self, checkpoint, output_dir, parse_injections, RunSpec, StopSignal};

pub fn spec(resolved: &Resolved) -> RunSpec {
    RunSpec {
        config: resolved.config.clone(),
        preset: resolved.preset.clone(),
        cache_dir: default_cache_dir(),
        inject_nonfinite: std::env::var("DIFFLAB_INJECT_NONFINITE").map(|s| parse_injections(&s)).unwrap_or_default(),
    }
}

/// First SIGINT / SIGTERM: stop at the next step boundary with a final checkpoint. Second:
/// exit at once (every file is written atomically, so nothing is left corrupt).
pub fn install_signal_handlers(stop: &StopSignal) -> std::io::Result<()> {
    Interrupts::exit_on_second(stop.flag())?;
    Interrupts::set_flag(stop.flag())
}

/// The run directory's sinks plus stdout and stderr.
pub fn all_sinks(output_dir: &std::path::Path, config: &crate::config::RunConfig) -> anyhow::Result<Sinks> {
    let mut sinks = sinks::file_sinks(output_dir, config)
        .with_context(|| format!("opening the outputs in {}", output_dir.display()))?;
    sinks.push("stdout", Box::new(StdoutMarkers));
    sinks.push("stderr", Box::new(StderrLog::new()));
    Ok(sinks)
}

pub fn train(resolved: &Resolved) -> anyhow::Result<ExitCode> {
    let mut resolved = resolved.clone();
    checkpoint::reconcile_resume(&mut resolved)?;
    let resolved = &resolved;
    let out = PathBuf::from(&resolved.config.output_dir);
    // held until the run ends: no other process trains into this folder meanwhile
    let _claim = output_dir::claim(&resolved.config)?;
    let mut sinks = all_sinks(&out, &resolved.config)?;
    let stop = StopSignal::default();
    install_signal_handlers(&stop).context("installing signal handlers")?;
    let handle = train::spawn_with(spec(resolved), stop);
    let inbox = Inbox::start(&out, handle.controls.clone()).context("opening the control inbox")?;
    for event in handle.events.iter() {
        sinks.handle(&event);
    }
    sinks.finish();
    drop(inbox);
    for e in &sinks.errors {
        eprintln!("[warning] {e}");
    }
    handle.join()?;
    Ok(ExitCode::SUCCESS)
}
