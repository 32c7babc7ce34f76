//! The training run on its own thread. It owns model, optimizer and data, and
//! talks to the rest only through typed messages: `Event`s out, `ControlMsg`s in.

pub mod checkpoint;
pub mod controls;
pub mod device;
pub mod evaluate;
pub mod micro;
pub mod output_dir;
pub mod overlap;
pub mod remote;
pub mod run;
pub mod step;
pub mod throughput;

use std::path::PathBuf;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::config::RunConfig;
use crate::events::{ControlMsg, Event, TrainEnd};
pub use controls::StopSignal;

/// Everything a run needs besides its channels.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub config: RunConfig,
    pub preset: Option<String>,
    /// difflab's cache (token files, trained tokenizers).
    pub cache_dir: PathBuf,
    /// Fault injection for tests: steps whose loss (`loss@N`) or gradient (`grad@N`) is made
    /// non-finite, or where the trainer panics (`panic@N`). Read from
    /// `DIFFLAB_INJECT_NONFINITE` by the CLI.
    pub inject_nonfinite: Vec<(u64, Injection)>,
    /// The processes this run is one of (a world of one unless launched by mpirun).
    pub world: crate::dist::World,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    Loss,
    Grad,
    /// A panic on the trainer thread (the test of its exit code).
    Panic,
}

/// Parses `loss@3,grad@5,panic@7`.
pub fn parse_injections(spec: &str) -> Vec<(u64, Injection)> {
    spec.split(',')
        .filter_map(|item| {
            let (what, step) = item.trim().split_once('@')?;
            let kind = match what {
                "loss" => Injection::Loss,
                "grad" => Injection::Grad,
                "panic" => Injection::Panic,
                _ => return None,
            };
            Some((step.parse().ok()?, kind))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::hf::CheckpointError),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    OutputDir(#[from] output_dir::OutputDirError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    #[error("{0}")]
    Unsupported(String),
    #[error("the training split has {blocks} blocks of {block_size} tokens, fewer than one batch of {batch_size}; lower batch_size or block_size, or raise subset_ratio")]
    TooFewBlocks { blocks: usize, block_size: usize, batch_size: usize },
    #[error("lr-find needs 0 < start_lr < end_lr and num_steps >= 6 (got {start:e}, {end:e}, {steps})")]
    LrRange { start: f64, end: f64, steps: usize },
    #[error("{dir}: its optimizer state does not fit this model ({reason}); resume from a checkpoint of the same run")]
    OptimizerState { dir: PathBuf, reason: String },
    #[error("resuming from {dir}: {contradictions}. Drop those settings (the checkpoint's are used), or start a new run in another output_dir")]
    ResumeContradicts { dir: PathBuf, contradictions: String },
    #[error("training this model needs about {needed_gib:.1} GiB ({detail}), and this machine has {available_gib:.1} GiB available; lower n_embd, n_layer, micro_batch_size or block_size, or set gradient_checkpointing true")]
    TooBig { needed_gib: f64, available_gib: f64, detail: String },
    #[error("the trainer panicked: {0}")]
    Panicked(String),
    #[error("the loss or gradient was not finite for {steps} steps in a row (last at step {step}); stopping. Lower the learning rate (the tutor: tenfold), or check the data")]
    Diverged { steps: u64, step: u64 },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl TrainError {
    /// Bad input (exit code 2) rather than a failure (exit code 1): each wrapped error says
    /// which it is.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TrainError::Data(e) => e.is_bad_input(),
            TrainError::Checkpoint(e) => e.is_bad_input(),
            TrainError::OutputDir(e) => e.is_bad_input(),
            TrainError::Device(_)
            | TrainError::Unsupported(_)
            | TrainError::TooFewBlocks { .. }
            | TrainError::LrRange { .. }
            | TrainError::OptimizerState { .. }
            | TrainError::ResumeContradicts { .. }
            | TrainError::TooBig { .. } => true,
            TrainError::Dist(_)
            | TrainError::Panicked(_)
            | TrainError::Diverged { .. }
            | TrainError::Candle(_)
            | TrainError::Io { .. } => false,
        }
    }
}

/// A running trainer: its events, its control inbox, its stop flag and its thread.
pub struct TrainHandle {
    pub events: Receiver<Event>,
    pub controls: Sender<ControlMsg>,
    pub stop: StopSignal,
    thread: JoinHandle<Result<TrainEnd, TrainError>>,
}

impl TrainHandle {
    /// Waits for the trainer. A panic in it becomes an error, not a crash.
    pub fn join(self) -> Result<TrainEnd, TrainError> {
        self.thread.join().unwrap_or_else(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(TrainError::Panicked(text))
        })
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Starts the run on a background thread.
pub fn spawn(spec: RunSpec) -> TrainHandle {
    spawn_with(spec, StopSignal::default())
}

pub fn spawn_with(spec: RunSpec, stop: StopSignal) -> TrainHandle {
    let (event_tx, events) = unbounded();
    let (controls, control_rx) = unbounded();
    let stop_for_thread = stop.clone();
    let thread = std::thread::Builder::new()
        .name("difflab-trainer".into())
        .spawn(move || run::train(&spec, &event_tx, control_rx, stop_for_thread))
        .unwrap_or_else(|e| panic!("cannot start the trainer thread: {e}"));
    TrainHandle { events, controls, stop, thread }
}

/// Sends an event; a closed receiver (the UI is gone) is not the trainer's problem.
pub(crate) fn emit(tx: &Sender<Event>, event: Event) {
    let _ = tx.send(event);
}
