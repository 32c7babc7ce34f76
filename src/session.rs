//! One run, started and seen through: the one way every caller (headless `train`, the lab, a
//! sweep's trial, a study's run) trains. It claims the run's folder (one run per folder, held
//! by a lock while it trains), opens its file sinks, starts the trainer thread and the
//! folder's control inbox, passes every event through the sinks and then to the caller's
//! monitor, and ends in one `RunOutcome` with the run's `RunStatus`. Callers add monitors, not
//! copies of this.
//!
//! On a rank other than 0 of a multi-process run nothing is claimed or written: rank 0 owns the
//! folder, and the controls reach the other ranks through the trainer's broadcast.

use std::path::PathBuf;

use crossbeam_channel::Sender;

use crate::events::{ControlMsg, Event, RunStatus, TrainEnd};
use crate::sinks::{self, human::StderrLog, Sinks, StdoutMarkers};
use crate::train::remote::Inbox;
use crate::train::{self, output_dir, RunSpec, StopSignal, TrainError, TrainHandle};

/// Which outputs a run writes besides its folder's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// Files only (the TUI, sweeps and studies show the events themselves).
    Quiet,
    /// Also the JSON markers on stdout and human lines on stderr (headless).
    Print,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Claim(#[from] TrainError),
    #[error("opening the outputs in {dir}: {source}")]
    Outputs { dir: PathBuf, source: std::io::Error },
    #[error("opening the control inbox of {dir}: {source}")]
    Inbox { dir: PathBuf, source: std::io::Error },
}

impl SessionError {
    /// Bad input (a folder that holds another run, a folder in use) rather than a failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, SessionError::Claim(e) if e.is_bad_input())
    }
}

/// What the caller's monitor sees, in order.
pub enum Observed<'a> {
    /// An event, after the sinks have it.
    Event(&'a Event),
    /// A sink that failed (a full disk) and was dropped; the run goes on.
    SinkFailed(&'a str),
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: RunStatus,
    /// The run's `train_end` figures, unless it failed.
    pub end: Option<TrainEnd>,
    pub error: Option<TrainError>,
    pub output_dir: PathBuf,
}

/// A run that is training.
pub struct RunSession {
    handle: TrainHandle,
    sinks: Sinks,
    output_dir: PathBuf,
    _inbox: Option<Inbox>,
    _claim: Option<output_dir::Claim>,
}

impl RunSession {
    /// Claims the folder, opens the sinks, starts the trainer (stopped by `stop`) and the
    /// folder's control inbox.
    pub fn start(spec: RunSpec, stop: StopSignal, console: Console) -> Result<RunSession, SessionError> {
        let output_dir = PathBuf::from(&spec.config.output_dir);
        if !spec.world.is_root() {
            let handle = train::spawn_with(spec, stop);
            return Ok(RunSession { handle, sinks: Sinks::default(), output_dir, _inbox: None, _claim: None });
        }
        // held until the run ends: no other process trains into this folder meanwhile
        let claim = output_dir::claim(&spec.config)?;
        let outputs = |source| SessionError::Outputs { dir: output_dir.clone(), source };
        let mut sinks = sinks::file_sinks(&output_dir, &spec.config).map_err(outputs)?;
        if console == Console::Print {
            sinks.push("stdout", Box::new(StdoutMarkers));
            sinks.push("stderr", Box::new(StderrLog::new()));
        }
        let handle = train::spawn_with(spec, stop);
        let inbox = Inbox::start(&output_dir, handle.controls.clone())
            .map_err(|source| SessionError::Inbox { dir: output_dir.clone(), source })?;
        Ok(RunSession { handle, sinks, output_dir, _inbox: Some(inbox), _claim: Some(claim) })
    }

    /// Where controls for this run go (the monitor may hold a clone).
    pub fn controls(&self) -> Sender<ControlMsg> {
        self.handle.controls.clone()
    }

    /// Every event through the sinks, then to `monitor`, until the trainer ends.
    pub fn run(mut self, monitor: &mut dyn FnMut(Observed)) -> RunOutcome {
        for event in self.handle.events.iter() {
            let failed_before = self.sinks.errors.len();
            self.sinks.handle(&event);
            for e in &self.sinks.errors[failed_before..] {
                monitor(Observed::SinkFailed(e));
            }
            monitor(Observed::Event(&event));
        }
        let failed_before = self.sinks.errors.len();
        self.sinks.finish();
        for e in &self.sinks.errors[failed_before..] {
            monitor(Observed::SinkFailed(e));
        }
        let output_dir = self.output_dir;
        match self.handle.join() {
            Ok(end) => RunOutcome { status: end.status, end: Some(end), error: None, output_dir },
            Err(e) => RunOutcome { status: RunStatus::Failed, end: None, error: Some(e), output_dir },
        }
    }
}
