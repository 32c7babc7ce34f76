//! A run without the TUI: JSON markers on stdout, human lines on stderr, the run directory's
//! files, controls through the run directory's inbox, and Ctrl-C / SIGTERM handling.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::{DeviceSpec, Resolved, RunConfig};
use crate::data::prepare::default_cache_dir;
use crate::dist::{self, World};
use crate::events::{Event, Level};
use crate::session::{Console, Observed, RunSession};
use crate::signals::Interrupts;
use crate::train::{self, checkpoint, parse_injections, RunSpec, StopSignal};

pub fn spec(resolved: &Resolved, world: World) -> RunSpec {
    RunSpec {
        config: resolved.config.clone(),
        preset: resolved.preset.clone(),
        cache_dir: default_cache_dir(),
        inject_nonfinite: std::env::var("DIFFLAB_INJECT_NONFINITE").map(|s| parse_injections(&s)).unwrap_or_default(),
        world,
    }
}

/// The processes this run is one of: MPI ranks on the CPU, NCCL ranks on CUDA devices (one
/// GPU a process, `cuda:<local rank>`), or just this one.
fn world_of(config: &mut RunConfig) -> anyhow::Result<World> {
    match dist::launched_as() {
        Some((rank, size, _)) if size > 1 && matches!(config.device, DeviceSpec::Cuda(_)) => {
            gpu_world(config, rank, size)
        }
        _ => Ok(dist::cpu_world()?),
    }
}

#[cfg(feature = "cuda")]
fn gpu_world(config: &mut RunConfig, rank: usize, size: usize) -> anyhow::Result<World> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let local = var("OMPI_COMM_WORLD_LOCAL_RANK").or_else(|| var("LOCAL_RANK")).unwrap_or(rank);
    config.device = DeviceSpec::Cuda(Some(local));
    let candle_core::Device::Cuda(device) = train::device::select(config.device)? else {
        anyhow::bail!("cuda:{local} is not a CUDA device")
    };
    let dir = std::path::PathBuf::from(&config.output_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating output_dir {}", dir.display()))?;
    let nccl = dist::nccl::NcclWorld::initialize(&device, rank, size, &dir)?;
    Ok(World(std::sync::Arc::new(nccl)))
}

#[cfg(not(feature = "cuda"))]
fn gpu_world(config: &mut RunConfig, _: usize, _: usize) -> anyhow::Result<World> {
    Err(train::device::DeviceError::NoCudaBuild(config.device.to_string()).into())
}

/// First SIGINT / SIGTERM: stop at the next step boundary with a final checkpoint. Second:
/// exit at once (every file is written atomically, so nothing is left corrupt).
pub fn install_signal_handlers(stop: &StopSignal) -> std::io::Result<()> {
    Interrupts::exit_on_second(stop.flag())?;
    Interrupts::set_flag(stop.flag())
}

/// The run `resolved` names, made ready to start: resumed from its checkpoint's settings (the
/// lines saying so, and what a flag overrides, added to its warnings), else its folder named.
pub fn prepare(resolved: &Resolved) -> anyhow::Result<Resolved> {
    let mut resolved = resolved.clone();
    let lines = checkpoint::reconcile_resume(&mut resolved)?;
    resolved.warnings.extend(lines);
    if resolved.config.resume_from_checkpoint.is_none() {
        super::name_run(&mut resolved)?;
    }
    Ok(resolved)
}

pub fn train(resolved: &Resolved) -> anyhow::Result<ExitCode> {
    let mut resolved = prepare(resolved)?;
    super::print_warnings(&resolved.warnings);
    let world = world_of(&mut resolved.config)?;
    let stop = StopSignal::default();
    install_signal_handlers(&stop).context("installing signal handlers")?;
    let root = world.is_root();
    let session = RunSession::start(spec(&resolved, world), stop, Console::Print)?;
    let outcome = session.run(&mut |seen| match seen {
        Observed::SinkFailed(e) => eprintln!("[warning] {e}"),
        // the other ranks print nothing but their errors
        Observed::Event(Event::Message { level: Level::Error, text }) if !root => eprintln!("[error] {text}"),
        Observed::Event(_) => {}
    });
    match outcome.error {
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}
