//! The only types that cross threads: events out of the trainer, controls into it.
//!
//! Plain owned data (no tensors), serialisable: the stdout markers and `metrics.jsonl` are
//! these events as JSON objects named by their `"event"` key. Every sink (TUI, stdout,
//! metrics.jsonl, TensorBoard, figures) consumes the same stream.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Data preparation: downloads, corpus generation, tokenizer training, tokenization.
    Prepare(PrepareProgress),
    /// A human-readable line for the log (stderr headless, the event pane in the TUI).
    Message { level: Level, text: String },
    TrainBegin(TrainBegin),
    Progress(StepRecord),
    Evaluate(EvalRecord),
    Checkpoint(CheckpointRecord),
    /// A control the trainer applied, at the step boundary where it took effect.
    Control(ControlRecord),
    /// A step whose loss or gradient was not finite: no update was made.
    Skipped(SkippedRecord),
    TrainEnd(TrainEnd),
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
    /// "bytes", "rows" or "task".
    pub unit: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBegin {
    /// The resolved configuration, every key.
    pub config: serde_json::Value,
    pub preset: Option<String>,
    pub num_parameters: usize,
    pub device: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Histogram of the differential norms of this step's last micro-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_norm_hist: Option<Histogram>,
    /// Seconds of training so far, pauses excluded.
    pub elapsed: f64,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub path: String,
    /// "save_steps", "control", "final", "stop".
    pub reason: String,
    /// Checkpoints deleted by `save_total_limit`.
    #[serde(default)]
    pub deleted: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRecord {
    pub step: u64,
    /// "pause", "resume", "checkpoint", "scale_lr", "stop", "stop_and_save".
    pub action: String,
    /// The LR multiplier in force after this control.
    pub lr_scale: f64,
    /// Where the control came from: "ui", "watch", "signal", "api".
    pub origin: String,
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
    /// Mean training loss over the steps of this session.
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
    /// Training seconds, pauses excluded.
    pub train_runtime: f64,
    pub tokens_per_second: f64,
    pub skipped_steps: u64,
    /// "completed", "stopped", "failed".
    pub status: String,
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
    ScaleLr { factor: f64 },
    Stop { save: bool },
}

impl Control {
    pub fn action(&self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::CheckpointNow => "checkpoint",
            Control::ScaleLr { .. } => "scale_lr",
            Control::Stop { save: true } => "stop_and_save",
            Control::Stop { save: false } => "stop",
        }
    }
}

/// A control with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlMsg {
    #[serde(flatten)]
    pub control: Control,
    pub origin: String,
}

impl Event {
    /// The stdout markers of DESIGN §4 (the research code's console markers).
    pub fn is_marker(&self) -> bool {
        matches!(self, Event::TrainBegin(_) | Event::Progress(_) | Event::Evaluate(_) | Event::TrainEnd(_))
    }

    /// What `metrics.jsonl` records: the markers plus controls, checkpoints and skipped steps.
    pub fn is_logged(&self) -> bool {
        self.is_marker() || matches!(self, Event::Checkpoint(_) | Event::Control(_) | Event::Skipped(_))
    }

    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"event\":\"message\",\"level\":\"error\",\"text\":\"{e}\"}}"))
    }
}
