//! A study: two or more arms (settings) times N seeds, each a full run in
//! `<output_dir>/<arm>/seed-<s>`, and the answer with error bars: per arm the final and best
//! eval loss and perplexity (mean ± sd over seeds), each arm's difference from the first paired
//! by seed with a 95% t interval, tokens seen, and the settings the arms differ in.
//!
//! Every arm sees the same data and tokenizer (arms that differ in them are refused), and the
//! same seed gives every arm the same data order, so differences pair by seed. A study resumes:
//! a finished run with the same settings is reused, an interrupted one resumes from its last
//! checkpoint, and a folder holding a run with other settings stops the study before it starts.
//!
//! `plan` decides what happens to each run before anything starts, `run` trains them on a
//! thread of its own, `stats` turns their results into the numbers, `report` into text,
//! `study.json` and figures.

pub mod plan;
pub mod report;
pub mod run;
pub mod stats;

use serde::Serialize;

use crate::config::RunConfig;
use crate::events::RunStatus;

pub use plan::{check_arms, plan, run_config, RunPlan, StudyError};
pub use report::{table, write};
pub use run::{spawn, StudyEvent, StudyHandle};
pub use stats::{summarize, StudySummary};

/// One arm: its label (the overrides it was given, or its preset) and its resolved settings.
#[derive(Debug, Clone)]
pub struct Arm {
    pub label: String,
    pub config: RunConfig,
    pub preset: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedResult {
    pub arm: String,
    pub seed: u64,
    pub output_dir: String,
    /// Completed, reused, stopped, failed or skipped.
    pub status: RunStatus,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub steps: u64,
    pub tokens_seen: Option<u64>,
    /// `(step, eval loss)`.
    pub eval_curve: Vec<(f64, f64)>,
    /// The finished model's eval loss at each of the study's `context_lengths`: `(length, loss)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub at_lengths: Vec<(usize, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl SeedResult {
    pub fn finished(&self) -> bool {
        self.status.is_finished()
    }
}
