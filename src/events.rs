//! The only types that cross threads: events out of the trainer, controls into it.
//!
//! Plain owned data (no tensors), serialisable: the stdout markers and `metrics.jsonl` are
//! these events as JSON objects named by their `"event"` key. Every sink (TUI, stdout,
//! metrics.jsonl, TensorBoard, figures) consumes the same stream.

use serde::{Deserialize, Serialize};

fn one() -> usize {
    1
}

/// Seconds since the Unix epoch: the wall time events and event files carry.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `2026-12-03_14-05-09` (UTC) for Unix seconds `t`: sorts by time, safe in a folder name.
pub fn utc_stamp(t: f64) -> String {
    let secs = t.max(0.0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}_{:02}-{:02}-{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Data preparation: downloads, corpus generation, tokenizer training, tokenization.
    Prepare(PrepareProgress),
    /// A human-readable line for the log (stderr headless, the event pane in the TUI).
    Message {
        level: Level,
        text: String,
    },
    TrainBegin(TrainBegin),
    Progress(StepRecord),
    Evaluate(EvalRecord),
    Checkpoint(CheckpointRecord),
    /// A control the trainer applied, at the step boundary where it took effect.
    Control(ControlRecord),
    /// A step whose loss or gradient was not finite: no update was made.
    Skipped(SkippedRecord),
    /// What the model writes after `sample_prompt`, at an evaluation.
    Sample(SampleRecord),
    TrainEnd(TrainEnd),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub step: u64,
    pub prompt: String,
    /// The continuation only (the prompt not repeated).
    pub text: String,
    /// How it was drawn: "temperature 0.8, top-k 40, seed 42".
    pub sampling: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareProgress {
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub unit: ProgressUnit,
}

/// What a `Prepare` event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressUnit {
    Bytes,
    Rows,
    /// A step with no count (training a tokenizer): `done == total` when finished.
    Task,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBegin {
    /// The resolved configuration, every key.
    pub config: serde_json::Value,
    pub preset: Option<String>,
    pub num_parameters: usize,
    pub device: String,
    /// The engine that computes the steps (`engine::Engine`'s name: `cpu-step`,
    /// `cpu-autograd`, `autograd`); shown, never matched on.
    #[serde(default)]
    pub engine: String,
    /// Processes training together (1 unless launched by mpirun) and their collective backend
    /// (`single`, `mpi`, `nccl`); tokens per second count all of them.
    #[serde(default = "one")]
    pub world_size: usize,
    #[serde(default)]
    pub backend: String,
    pub variant: String,
    pub vocab_size: usize,
    pub train_blocks: usize,
    pub validation_blocks: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// 0, or the step a resumed run continues from.
    pub start_step: u64,
    pub tokens_per_step: u64,
    pub warmup_steps: u64,
    pub output_dir: String,
    pub timestamp: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps completed.
    pub step: u64,
    /// Fractional epoch, as HF Trainer logs it.
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    /// Global norm before clipping.
    pub grad_norm: f64,
    /// Over the steps since the previous marker, pauses excluded.
    pub tokens_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_std: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_max: Option<f64>,
    /// Histogram of the differential norms of every token of the step's batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_hist: Option<Histogram>,
    /// Seconds of training so far, pauses excluded.
    pub elapsed: f64,
    /// Resident memory of the (rank 0) process, MiB (on CUDA the device's use is in the
    /// device line; this is the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_mib: Option<f64>,
    /// Seconds left to the last step at this session's pace so far, pauses excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Memory in use on the CUDA device (all of its processes: total minus free), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mib: Option<f64>,
    /// Per layer (`wte`, `wpe`, `h.0` .. `h.N`, `ln_f`), in model order: this step's gradient
    /// norm and its update-to-weight ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerStat>>,
}

/// One layer's gradient and update at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStat {
    pub name: String,
    /// L2 norm of the layer's gradients before clipping.
    pub grad_norm: f64,
    /// `||theta_after - theta_before|| / ||theta_before||` over the layer's parameters.
    pub update_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    /// `counts.len() + 1` edges.
    pub edges: Vec<f64>,
    pub sum: f64,
    pub sum_squares: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    pub eval_loss: f64,
    pub perplexity: f64,
    pub eval_tokens: u64,
    pub eval_tokens_per_second: f64,
    /// Validation blocks this evaluation scored, of `validation_blocks` (fewer with
    /// `eval_max_blocks`: a partial evaluation). 0 in logs of older versions.
    #[serde(default)]
    pub eval_blocks: u64,
    #[serde(default)]
    pub validation_blocks: u64,
    /// The split scored: "validation", or "test" with `eval_split: test`.
    #[serde(default = "validation_split")]
    pub split: String,
    /// The window length scored when it is not the training length (`context_lengths`: train
    /// short, test long); unset: the training length. Curves of a run's eval loss read only
    /// the unset ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// The mean loss at each position of the windows (non-overlapping windows of the scored
    /// length, every one of the same validation tokens), in buckets of positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_loss: Option<Vec<PositionBucket>>,
}

/// The mean loss of the predictions at positions `from..to` of every window: position `p`
/// predicts token `p + 1` from the `p + 1` tokens before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionBucket {
    pub from: usize,
    pub to: usize,
    pub loss: f64,
    /// Predictions averaged: windows x positions.
    pub predictions: u64,
}

fn validation_split() -> String {
    "validation".into()
}

impl EvalRecord {
    /// Whether this is an evaluation at the training length (the run's eval curve).
    pub fn at_training_length(&self) -> bool {
        self.context_length.is_none()
    }

    /// " (partial: K of N validation blocks)" when not every block was scored; " on the test
    /// split" when that is what was scored.
    pub fn partial_note(&self) -> String {
        let split = if self.split == "validation" { String::new() } else { format!(" on the {} split", self.split) };
        if self.eval_blocks < self.validation_blocks {
            format!("{split} (partial: {} of {} {} blocks)", self.eval_blocks, self.validation_blocks, self.split)
        } else {
            split
        }
    }
}

impl Default for EvalRecord {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0.0,
            eval_loss: f64::NAN,
            perplexity: f64::NAN,
            eval_tokens: 0,
            eval_tokens_per_second: 0.0,
            eval_blocks: 0,
            validation_blocks: 0,
            split: validation_split(),
            context_length: None,
            position_loss: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub path: String,
    pub reason: CheckpointReason,
    /// Checkpoints deleted by `save_total_limit`.
    #[serde(default)]
    pub deleted: Vec<String>,
    /// Seconds the save took (written, synced and renamed into place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRecord {
    pub step: u64,
    pub action: ControlAction,
    /// The LR multiplier in force after this control.
    pub lr_scale: f64,
    pub origin: ControlOrigin,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedRecord {
    pub step: u64,
    pub reason: String,
    pub consecutive: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainEnd {
    pub step: u64,
    pub epoch: f64,
    /// Mean training loss over every step the run applied, whether or not it was resumed
    /// (`train_loss_steps` of them).
    pub train_loss: Option<f64>,
    #[serde(default)]
    pub train_loss_steps: u64,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
    /// The lowest evaluation loss at the training length over the whole run, resumes included.
    #[serde(default)]
    pub best_eval_loss: Option<f64>,
    /// Training seconds, pauses excluded.
    pub train_runtime: f64,
    pub tokens_per_second: f64,
    pub skipped_steps: u64,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub output_dir: String,
}

/// Runtime controls, applied by the trainer at the next step boundary (pause: the next
/// micro-step boundary).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case")]
pub enum Control {
    Pause,
    Resume,
    CheckpointNow,
    /// Multiply the schedule's LR by this factor from the next step on (cumulative).
    ScaleLr {
        factor: f64,
    },
    Stop {
        save: bool,
    },
}

impl Control {
    pub fn action(&self) -> ControlAction {
        match self {
            Control::Pause => ControlAction::Pause,
            Control::Resume => ControlAction::Resume,
            Control::CheckpointNow => ControlAction::Checkpoint,
            Control::ScaleLr { .. } => ControlAction::ScaleLr,
            Control::Stop { save: true } => ControlAction::StopAndSave,
            Control::Stop { save: false } => ControlAction::Stop,
        }
    }
}

/// A control with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlMsg {
    #[serde(flatten)]
    pub control: Control,
    pub origin: ControlOrigin,
}

/// Enums whose wire form is their snake_case name, shown the same way to people.
macro_rules! named {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),*
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // pad: honours width and alignment in tables (`{:<10}`)
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)*
                    other => Err(format!("{other:?} is not one of {}", [$($text),*].join(", "))),
                }
            }
        }

        /// Compares with the wire name (`status == "completed"`).
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

named!(
    /// What a control did, as `control` events record it.
    ControlAction { Pause = "pause", Resume = "resume", Checkpoint = "checkpoint", ScaleLr = "scale_lr", Stop = "stop", StopAndSave = "stop_and_save" }
);
named!(
    /// Where a control came from: the TUI, a `watch`er, a signal, the channel API, or a sweep.
    ControlOrigin { Ui = "ui", Watch = "watch", Signal = "signal", Api = "api", Sweep = "sweep" }
);
named!(
    /// Why a checkpoint was written.
    CheckpointReason { SaveSteps = "save_steps", Control = "control", Final = "final", Stop = "stop" }
);
named!(
    /// Where a run stands: how it ended (`train_end` has the first three), what a sweep judged
    /// it (diverged, stalled, lagging), what a procedure did with it (skipped, reused), or,
    /// for a run read from its folder, that it is still training or was cut off.
    RunStatus {
        Completed = "completed", Stopped = "stopped", EarlyStopped = "early_stopped", Failed = "failed",
        Diverged = "diverged", Stalled = "stalled",
        Lagging = "lagging", Skipped = "skipped", Reused = "reused", Running = "running", Interrupted = "interrupted",
    }
);

impl RunStatus {
    /// A run that trained to an end of its own: its plan, or early stopping on a plateau
    /// (reused: one such, read back). Its final figures stand for the run.
    pub fn is_finished(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::EarlyStopped | RunStatus::Reused)
    }
}

impl Event {
    /// The stdout markers: the research code's console markers.
    pub fn is_marker(&self) -> bool {
        matches!(self, Event::TrainBegin(_) | Event::Progress(_) | Event::Evaluate(_) | Event::TrainEnd(_))
    }

    /// What `metrics.jsonl` records: the markers plus controls, checkpoints, skipped steps,
    /// samples, and warnings and errors (a refused control, say: a watcher sees them too).
    pub fn is_logged(&self) -> bool {
        self.is_marker()
            || matches!(self, Event::Checkpoint(_) | Event::Control(_) | Event::Skipped(_) | Event::Sample(_))
            || matches!(self, Event::Message { level: Level::Warning | Level::Error, .. })
    }

    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"event\":\"message\",\"level\":\"error\",\"text\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_calendar_dates() {
        assert_eq!(utc_stamp(0.0), "1970-01-01_00-00-00");
        assert_eq!(utc_stamp(1_796_306_709.0), "2026-12-03_14-05-09");
        assert_eq!(utc_stamp(951_782_400.0), "2000-02-29_00-00-00");
    }
}
