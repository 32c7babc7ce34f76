//! The trainer's side of the control channel: pause, resume, checkpoint now, scale the LR,
//! stop. Controls are applied at step boundaries (pause also between micro-batches), and each
//! applied control is reported as an event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::events::{Control, ControlAction, ControlMsg, ControlOrigin, ControlRecord, Event, Level};

/// A stop request that a signal handler can set (no channel is async-signal-safe).
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Training time with pauses taken out.
#[derive(Debug)]
pub struct Clock {
    running_since: Option<Instant>,
    banked: Duration,
}

impl Clock {
    pub fn started() -> Self {
        Self { running_since: Some(Instant::now()), banked: Duration::ZERO }
    }
    pub fn pause(&mut self) {
        if let Some(t) = self.running_since.take() {
            self.banked += t.elapsed();
        }
    }
    pub fn resume(&mut self) {
        if self.running_since.is_none() {
            self.running_since = Some(Instant::now());
        }
    }
    pub fn elapsed(&self) -> Duration {
        self.banked + self.running_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

pub struct Controller {
    rx: Receiver<ControlMsg>,
    stop_signal: StopSignal,
    pub lr_scale: f64,
    pub paused: bool,
    pub checkpoint_requested: bool,
    /// `Some(save)` once a stop was asked for.
    pub stop: Option<bool>,
}

impl Controller {
    pub fn new(rx: Receiver<ControlMsg>, stop_signal: StopSignal, lr_scale: f64) -> Self {
        Self { rx, stop_signal, lr_scale, paused: false, checkpoint_requested: false, stop: None }
    }

    /// Applies every pending control without blocking; `emit` reports each one applied.
    pub fn poll(&mut self, step: u64, emit: &mut dyn FnMut(Event)) {
        self.check_signal(step, emit);
        while let Ok(msg) = self.rx.try_recv() {
            self.apply(msg, step, emit);
        }
    }

    /// While paused: blocks (the clock stopped) until a control or a signal arrives, applies
    /// it and returns, so the caller can act on it (a checkpoint while paused) and wait again.
    pub fn wait(&mut self, step: u64, clock: &mut Clock, emit: &mut dyn FnMut(Event)) {
        clock.pause();
        loop {
            if self.check_signal(step, emit) {
                break;
            }
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(msg) => {
                    self.apply(msg, step, emit);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {}
                // every sender gone (the UI quit without a stop): carry on training
                Err(RecvTimeoutError::Disconnected) => {
                    self.paused = false;
                    break;
                }
            }
        }
        if !self.paused {
            clock.resume();
        }
    }

    fn check_signal(&mut self, step: u64, emit: &mut dyn FnMut(Event)) -> bool {
        if self.stop_signal.requested() && self.stop.is_none() {
            self.stop = Some(true);
            self.paused = false;
            emit(self.record(step, ControlAction::StopAndSave, ControlOrigin::Signal));
            return true;
        }
        false
    }

    fn apply(&mut self, msg: ControlMsg, step: u64, emit: &mut dyn FnMut(Event)) {
        match msg.control {
            Control::Pause if self.paused => return,
            Control::Resume if !self.paused => return,
            Control::Pause => self.paused = true,
            Control::Resume => self.paused = false,
            Control::CheckpointNow => self.checkpoint_requested = true,
            // "lower the LR": a factor in (0, 1]; anything else would raise it, flip its sign
            // or poison it with NaN, and is refused in the log
            Control::ScaleLr { factor } if !(factor > 0.0 && factor <= 1.0) => {
                let text = format!(
                    "refused a control from {}: scale_lr by {factor} (the LR can only be lowered, by a factor in (0, 1])",
                    msg.origin
                );
                emit(Event::Message { level: Level::Warning, text });
                return;
            }
            Control::ScaleLr { factor } => self.lr_scale *= factor,
            Control::Stop { save } => {
                self.stop = Some(save);
                self.paused = false;
            }
        }
        emit(self.record(step, msg.control.action(), msg.origin));
    }

    fn record(&self, step: u64, action: ControlAction, origin: ControlOrigin) -> Event {
        Event::Control(ControlRecord { step, action, lr_scale: self.lr_scale, origin })
    }
}
