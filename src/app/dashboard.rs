//! The dashboard's state: everything the screen shows, built from the event stream only.

use std::collections::VecDeque;

use crate::events::{ControlAction, Event, Histogram, Level, RunStatus, TrainBegin};
use crate::series::Series;

/// How many log lines are kept.
pub const LOG_LINES: usize = 400;
/// Lines PgUp / PgDn move the event log.
pub const LOG_PAGE: isize = 5;

/// Smoothing weights cycled by `s` (TensorBoard's default is 0.6).
pub const SMOOTHING: [f64; 4] = [0.6, 0.9, 0.0, 0.3];

#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub log_y: bool,
    pub smoothing: f64,
}

impl View {
    /// The smoothing `s` would switch to.
    pub fn next_smoothing(&self) -> f64 {
        let i = SMOOTHING.iter().position(|s| *s == self.smoothing).unwrap_or(0);
        SMOOTHING[(i + 1) % SMOOTHING.len()]
    }

    pub fn cycle_smoothing(&mut self) {
        self.smoothing = self.next_smoothing();
    }
}

/// Where a chart marks something that happened at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    LrChange,
    Pause,
    Checkpoint,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Preparing { stage: String, done: u64, total: u64 },
    Training,
    Paused,
    Finished { status: RunStatus },
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Dashboard {
    pub title: String,
    pub begin: Option<TrainBegin>,
    pub status: Status,
    pub paused: bool,
    pub loss: Series,
    pub eval: Series,
    pub lr: Series,
    pub grad_norm: Series,
    pub marks: Vec<(u64, MarkKind)>,
    pub step: u64,
    pub epoch: f64,
    pub last_loss: Option<f64>,
    pub last_lr: Option<f64>,
    pub last_grad_norm: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// Training seconds (pauses excluded) at the last progress marker.
    pub elapsed: f64,
    pub eval_loss: Option<f64>,
    /// The last evaluation scored only part of the validation split (`eval_max_blocks`).
    pub eval_partial: bool,
    pub perplexity: Option<f64>,
    pub diff: Option<DiffStats>,
    pub lr_scale: f64,
    pub skipped: u64,
    pub log: VecDeque<LogLine>,
    /// Lines the event log is scrolled up from its newest (0: following new events).
    pub log_scroll: usize,
    /// The trainer's latest ETA, seconds.
    pub eta: Option<f64>,
    /// The trainer's resident memory, MiB.
    pub rss_mib: Option<f64>,
    pub view: View,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiffStats {
    pub step: u64,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub hist: Option<Histogram>,
}

impl Dashboard {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.into(),
            begin: None,
            status: Status::Preparing { stage: "starting".into(), done: 0, total: 0 },
            paused: false,
            loss: Series::default(),
            eval: Series::with_capacity(512),
            lr: Series::default(),
            grad_norm: Series::default(),
            marks: vec![],
            step: 0,
            epoch: 0.0,
            last_loss: None,
            last_lr: None,
            last_grad_norm: None,
            tokens_per_second: None,
            elapsed: 0.0,
            eval_loss: None,
            eval_partial: false,
            perplexity: None,
            diff: None,
            lr_scale: 1.0,
            skipped: 0,
            log: VecDeque::new(),
            log_scroll: 0,
            eta: None,
            rss_mib: None,
            view: View { log_y: false, smoothing: SMOOTHING[0] },
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.status, Status::Finished { .. } | Status::Failed(_))
    }

    pub fn is_differential(&self) -> bool {
        self.begin.as_ref().is_some_and(|b| b.config["research"].as_bool() == Some(true))
    }

    pub fn max_grad_norm(&self) -> Option<f64> {
        self.begin.as_ref().and_then(|b| b.config["max_grad_norm"].as_f64())
    }

    pub fn total_steps(&self) -> u64 {
        self.begin.as_ref().map_or(0, |b| b.total_steps)
    }

    /// Seconds to the end: the trainer's estimate (its session's pace, evaluations included),
    /// else at the recent rate; pauses do not count.
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.eta.is_some() {
            return self.eta;
        }
        let b = self.begin.as_ref()?;
        let tps = self.tokens_per_second.filter(|t| *t > 0.0)?;
        let left = b.total_steps.saturating_sub(self.step);
        Some(left as f64 * b.tokens_per_step as f64 / tps)
    }

    fn log(&mut self, level: Level, text: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine { level, text });
        // scrolled back, the view stays on the lines being read as new ones arrive
        if self.log_scroll > 0 {
            self.log_scroll = (self.log_scroll + 1).min(self.log.len().saturating_sub(1));
        }
    }

    /// Scrolls the event log `lines` up (older) or down (newer); 0 follows new events.
    pub fn scroll_log(&mut self, lines: isize) {
        let max = self.log.len().saturating_sub(1) as isize;
        self.log_scroll = (self.log_scroll as isize + lines).clamp(0, max) as usize;
    }

    pub fn log_warning(&mut self, text: String) {
        self.log(Level::Warning, text);
    }

    /// A mark is kept once per (step, kind), in step order.
    fn mark(&mut self, step: u64, kind: MarkKind) {
        if !self.marks.contains(&(step, kind)) {
            self.marks.push((step, kind));
            // bounded: keep the latest thousand
            if self.marks.len() > 1000 {
                self.marks.remove(0);
            }
        }
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Prepare(p) => {
                if self.begin.is_none() {
                    self.status = Status::Preparing { stage: p.stage.clone(), done: p.done, total: p.total };
                }
            }
            Event::Message { level, text } => self.log(*level, text.clone()),
            Event::TrainBegin(b) => {
                if let Some(p) = &b.preset {
                    self.title = p.clone();
                }
                self.step = b.start_step;
                self.status = Status::Training;
                self.log(
                    Level::Info,
                    format!(
                        "training {} ({} parameters) on {}, engine {}, steps {}..{}",
                        b.variant, b.num_parameters, b.device, b.engine, b.start_step, b.total_steps
                    ),
                );
                self.begin = Some(b.clone());
            }
            Event::Progress(p) => {
                let x = p.step as f64;
                self.loss.push(x, p.loss);
                self.lr.push(x, p.learning_rate);
                self.grad_norm.push(x, p.grad_norm);
                self.step = p.step;
                self.epoch = p.epoch;
                self.last_loss = Some(p.loss);
                self.last_lr = Some(p.learning_rate);
                self.last_grad_norm = Some(p.grad_norm);
                self.tokens_per_second = Some(p.tokens_per_second);
                self.elapsed = p.elapsed;
                self.eta = p.eta_seconds;
                self.rss_mib = p.rss_mib.or(self.rss_mib);
                if let (Some(mean), Some(std), Some(min), Some(max)) =
                    (p.diff_norm_mean, p.diff_norm_std, p.diff_norm_min, p.diff_norm_max)
                {
                    self.diff = Some(DiffStats { step: p.step, mean, std, min, max, hist: p.diff_norm_hist.clone() });
                }
                if matches!(self.status, Status::Preparing { .. }) {
                    self.status = Status::Training;
                }
            }
            Event::Evaluate(e) => {
                self.eval.push(e.step as f64, e.eval_loss);
                self.eval_loss = Some(e.eval_loss);
                self.eval_partial = e.eval_blocks < e.validation_blocks;
                self.perplexity = Some(e.perplexity);
                self.log(
                    Level::Info,
                    format!(
                        "step {}: eval loss {:.4}, perplexity {:.2}{}",
                        e.step,
                        e.eval_loss,
                        e.perplexity,
                        e.partial_note()
                    ),
                );
            }
            Event::Checkpoint(c) => {
                self.mark(c.step, MarkKind::Checkpoint);
                self.log(Level::Info, format!("step {}: checkpoint {} ({})", c.step, c.path, c.reason));
            }
            Event::Control(c) => {
                self.lr_scale = c.lr_scale;
                match c.action {
                    ControlAction::Pause => {
                        self.paused = true;
                        self.status = Status::Paused;
                        self.mark(c.step, MarkKind::Pause);
                    }
                    ControlAction::Resume => {
                        self.paused = false;
                        self.status = Status::Training;
                    }
                    ControlAction::ScaleLr => self.mark(c.step, MarkKind::LrChange),
                    _ => {}
                }
                self.log(
                    Level::Info,
                    format!(
                        "step {}: {} ({}; LR x{})",
                        c.step,
                        c.action.as_str().replace('_', " "),
                        c.origin,
                        c.lr_scale
                    ),
                );
            }
            Event::Skipped(s) => {
                self.skipped += 1;
                self.log(
                    Level::Warning,
                    format!("step {}: skipped, {} ({} in a row)", s.step, s.reason, s.consecutive),
                );
            }
            Event::Sample(s) => {
                let text = s.text.replace('\n', " / ");
                self.log(Level::Info, format!("step {} sample: {}{text}", s.step, s.prompt));
            }
            Event::TrainEnd(e) => {
                self.paused = false;
                self.step = e.step;
                match &e.error {
                    Some(err) => {
                        self.status = Status::Failed(err.clone());
                        self.log(Level::Error, err.clone());
                    }
                    None => {
                        self.status = Status::Finished { status: e.status };
                        self.log(Level::Info, format!("{} at step {} after {:.0}s", e.status, e.step, e.train_runtime));
                    }
                }
            }
        }
    }

    /// The trainer thread ended. An error it returned before any `train_end` (bad data, a
    /// missing dataset offline) is shown here, not as a crash.
    pub fn trainer_done(&mut self, result: Result<(), String>) {
        match result {
            Err(e) if !matches!(self.status, Status::Failed(_)) => {
                self.status = Status::Failed(e.clone());
                self.log(Level::Error, e);
            }
            Ok(()) if !self.finished() => self.status = Status::Finished { status: RunStatus::Stopped },
            _ => {}
        }
    }
}
