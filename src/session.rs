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

use crate::config::RunConfig;
use crate::events::{ControlMsg, Event, Level, RunStatus, TrainEnd};
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
    #[error("opening the control inbox of {dir}: {source}")]
    Inbox { dir: PathBuf, source: std::io::Error },
}

impl SessionError {
    /// Bad input (a folder that holds another run, a folder in use) rather than a failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, SessionError::Claim(e) if e.is_bad_input())
    }

    /// The folder, when the run was refused because its output folder holds another run.
    pub fn taken(&self) -> Option<&std::path::Path> {
        match self {
            SessionError::Claim(TrainError::OutputDir(crate::train::output_dir::OutputDirError::Taken {
                dir, ..
            })) => Some(dir),
            _ => None,
        }
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
    stop: StopSignal,
    /// stdout and stderr, when printing.
    console: Sinks,
    /// The folder's files: opened at `train_begin`, when every check of the run has passed, so
    /// a run refused before it (too big, no data) leaves the folder as it found it.
    files: Option<Sinks>,
    config: RunConfig,
    output_dir: PathBuf,
    /// Why the folder's files could not be opened (the run is then stopped).
    outputs_failed: Option<std::io::Error>,
    inbox: Option<Inbox>,
    claim: Option<output_dir::Claim>,
}

impl RunSession {
    /// Claims the folder, starts the trainer (stopped by `stop`) and the folder's control inbox;
    /// the sinks open when the trainer begins.
    pub fn start(spec: RunSpec, stop: StopSignal, console: Console) -> Result<RunSession, SessionError> {
        let output_dir = PathBuf::from(&spec.config.output_dir);
        let config = spec.config.clone();
        let mut printing = Sinks::default();
        // the other ranks print nothing (their errors reach the caller's monitor)
        if console == Console::Print && spec.world.is_root() {
            printing.push("stdout", Box::new(StdoutMarkers));
            printing.push("stderr", Box::new(StderrLog::new()));
        }
        let session = |handle, inbox, claim| RunSession {
            handle,
            stop: stop.clone(),
            console: printing,
            files: None,
            config,
            output_dir: output_dir.clone(),
            outputs_failed: None,
            inbox,
            claim,
        };
        if !spec.world.is_root() {
            return Ok(session(train::spawn_with(spec, stop.clone()), None, None));
        }
        // held until the run ends: no other process trains into this folder meanwhile
        let claim = output_dir::claim(&spec.config)?;
        let handle = train::spawn_with(spec, stop.clone());
        let inbox = Inbox::start(&output_dir, handle.controls.clone())
            .map_err(|source| SessionError::Inbox { dir: output_dir.clone(), source })?;
        Ok(session(handle, Some(inbox), Some(claim)))
    }

    /// Where controls for this run go (the monitor may hold a clone).
    pub fn controls(&self) -> Sender<ControlMsg> {
        self.handle.controls.clone()
    }

    /// Every event through the sinks, then to `monitor`, until the trainer ends; what the
    /// control inbox refused goes the same way, as warnings.
    pub fn run(mut self, monitor: &mut dyn FnMut(Observed)) -> RunOutcome {
        loop {
            match self.handle.events.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(event) => self.pass(&event, monitor),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            for text in self.inbox.as_ref().map(Inbox::take_refusals).unwrap_or_default() {
                self.pass(&Event::Message { level: Level::Warning, text }, monitor);
            }
        }
        for sinks in self.files.iter_mut().chain([&mut self.console]) {
            let failed_before = sinks.errors.len();
            sinks.finish();
            for e in &sinks.errors[failed_before..] {
                monitor(Observed::SinkFailed(e));
            }
        }
        drop(self.inbox.take());
        // refused before it began: the folder as it was found
        if let (None, Some(claim)) = (&self.files, self.claim.take()) {
            claim.release_unused();
        }
        let output_dir = self.output_dir;
        let joined = match (self.handle.join(), self.outputs_failed) {
            (Ok(_), Some(source)) => Err(TrainError::Io { path: output_dir.clone(), source }),
            (joined, _) => joined,
        };
        match joined {
            Ok(end) => RunOutcome { status: end.status, end: Some(end), error: None, output_dir },
            Err(e) => RunOutcome { status: RunStatus::Failed, end: None, error: Some(e), output_dir },
        }
    }

    fn pass(&mut self, event: &Event, monitor: &mut dyn FnMut(Observed)) {
        if matches!(event, Event::TrainBegin(_)) && self.files.is_none() && self.claim.is_some() {
            match sinks::file_sinks(&self.output_dir, &self.config) {
                Ok(files) => self.files = Some(files),
                Err(e) => {
                    let text =
                        format!("cannot open the outputs in {}: {e}; stopping the run", self.output_dir.display());
                    monitor(Observed::SinkFailed(&text));
                    self.outputs_failed = Some(e);
                    self.stop.request();
                }
            }
        }
        for sinks in self.files.iter_mut().chain([&mut self.console]) {
            let failed_before = sinks.errors.len();
            sinks.handle(event);
            for e in &sinks.errors[failed_before..] {
                monitor(Observed::SinkFailed(e));
            }
        }
        monitor(Observed::Event(event));
    }
}
