//! A run without the TUI: JSON markers on stdout, human lines on stderr, the run directory's
//! files, controls through the run directory's inbox, and Ctrl-C / SIGTERM handling.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{DeviceSpec, Resolved, RunConfig};
use crate::data::prepare::default_cache_dir;
use crate::dist::{self, World};
use crate::events::{Event, Level};
use crate::signals::Interrupts;
use crate::sinks::{self, human::StderrLog, Sinks, StdoutMarkers};
use crate::train::remote::Inbox;
use crate::train::{self, checkpoint, output_dir, parse_injections, RunSpec, StopSignal};

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
    let dir = PathBuf::from(&config.output_dir);
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
    super::name_run(&mut resolved)?;
    checkpoint::reconcile_resume(&mut resolved)?;
    let world = world_of(&mut resolved.config)?;
    let resolved = &resolved;
    let stop = StopSignal::default();
    install_signal_handlers(&stop).context("installing signal handlers")?;
    if !world.is_root() {
        // the other ranks compute; rank 0 owns the folder, writes every file and takes the
        // controls, which reach the others through the trainer's broadcast at each step
        let handle = train::spawn_with(spec(resolved, world), stop);
        for event in handle.events.iter() {
            if let Event::Message { level: Level::Error, text } = event {
                eprintln!("[error] {text}");
            }
        }
        handle.join()?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = PathBuf::from(&resolved.config.output_dir);
    // held until the run ends: no other process trains into this folder meanwhile
    let _claim = output_dir::claim(&resolved.config)?;
    let mut sinks = all_sinks(&out, &resolved.config)?;
    let handle = train::spawn_with(spec(resolved, world), stop);
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
