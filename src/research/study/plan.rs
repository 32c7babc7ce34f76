//! Before a study starts: its arms checked against each other, each (arm, seed) run's settings
//! and folder, and what happens to it (reused, resumed, run from the start, or refused because
//! its folder holds a run with other settings).

use std::path::{Path, PathBuf};

use super::Arm;
use crate::config::keys::{self, OnResume, Role};
use crate::config::RunConfig;
use crate::research::compare;
use crate::sinks::metrics::METRICS_FILE;

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("a study needs at least two arms (e.g. --arm research=false --arm research=true); got {0}")]
    TooFewArms(usize),
    #[error("a study needs at least one seed (--seeds 3, or --seeds 1,2,3)")]
    NoSeeds,
    #[error("arms must train and score on the same data; they differ in {key}: {values}. Set it once for the study, not per arm")]
    DataDiffers { key: String, values: String },
    #[error("two arms have the same label {0:?}; give them different settings")]
    SameLabel(String),
    #[error("{dir} holds a run with other settings ({differences}); give the study a new --output_dir, or remove that folder")]
    Stale { dir: PathBuf, differences: String },
}

/// What happens to one (arm, seed) run when the study starts.
#[derive(Debug, Clone, PartialEq)]
pub enum RunPlan {
    /// Finished earlier with the same settings: read, not run.
    Reuse,
    /// Interrupted after a checkpoint: continued from it.
    Resume,
    /// RunLog from the start (a folder left without a checkpoint is cleared).
    Fresh { clear: bool },
}

impl std::fmt::Display for RunPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunPlan::Reuse => "finished earlier: reused",
            RunPlan::Resume => "resumed from its last checkpoint",
            RunPlan::Fresh { clear: true } => "from the start (its folder held no checkpoint)",
            RunPlan::Fresh { clear: false } => "from the start",
        })
    }
}

/// The arm's directory name: its label with path separators replaced.
pub fn arm_dir(label: &str) -> String {
    label.replace(['/', '\\', ' '], "_").replace(',', "+")
}

/// Checks the arms against each other before anything runs.
pub fn check_arms(arms: &[Arm], seeds: &[u64]) -> Result<(), StudyError> {
    if arms.len() < 2 {
        return Err(StudyError::TooFewArms(arms.len()));
    }
    if seeds.is_empty() {
        return Err(StudyError::NoSeeds);
    }
    let values: Vec<serde_json::Value> =
        arms.iter().map(|a| serde_json::to_value(&a.config).unwrap_or_default()).collect();
    for key in keys::with_role(Role::Data) {
        let vals: Vec<&serde_json::Value> = values.iter().map(|v| &v[key]).collect();
        if vals.windows(2).any(|w| w[0] != w[1]) {
            let values = arms.iter().zip(&vals).map(|(a, v)| format!("{} in {}", v, a.label)).collect::<Vec<_>>();
            return Err(StudyError::DataDiffers { key: key.into(), values: values.join(", ") });
        }
    }
    let mut labels: Vec<String> = arms.iter().map(|a| arm_dir(&a.label)).collect();
    labels.sort();
    if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
        return Err(StudyError::SameLabel(w[0].clone()));
    }
    Ok(())
}

/// The settings of one (arm, seed) run.
pub fn run_config(root: &Path, arm: &Arm, seed: u64) -> RunConfig {
    let mut cfg = arm.config.clone();
    cfg.seed = seed;
    cfg.output_dir = root.join(arm_dir(&arm.label)).join(format!("seed-{seed}")).display().to_string();
    cfg.resume_from_checkpoint = None;
    cfg.overwrite_output_dir = false;
    cfg
}

/// How the run in `cfg.output_dir` starts: reused, resumed or fresh; a folder holding another
/// run's results is an error naming the settings that differ.
pub fn plan(cfg: &RunConfig) -> Result<RunPlan, StudyError> {
    let dir = Path::new(&cfg.output_dir);
    if !dir.join(METRICS_FILE).is_file() {
        return Ok(RunPlan::Fresh { clear: dir.is_dir() });
    }
    let Ok(earlier) = compare::load(dir) else { return Ok(RunPlan::Fresh { clear: true }) };
    let wanted = serde_json::to_value(cfg).unwrap_or_default();
    let differences: Vec<String> = earlier
        .config
        .iter()
        // how a run is started and what it logs (its eval cadence, its extra context lengths)
        // do not make it another run: the trained model is the same
        .filter(|(k, _)| {
            keys::find(k).is_none_or(|key| key.on_resume != OnResume::Invocation && key.role != Role::Cadence)
        })
        .filter(|(k, v)| wanted.get(k.as_str()).is_some_and(|w| w != *v))
        .map(|(k, v)| format!("{k} {v} there, {} here", wanted[k.as_str()]))
        .collect();
    if !differences.is_empty() && !earlier.config.is_empty() {
        return Err(StudyError::Stale { dir: dir.to_path_buf(), differences: differences.join(", ") });
    }
    if earlier.status.is_finished() {
        return Ok(RunPlan::Reuse);
    }
    let has_checkpoint = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")))
        .unwrap_or(false);
    Ok(if has_checkpoint { RunPlan::Resume } else { RunPlan::Fresh { clear: true } })
}

/// The order runs go in: `(arm, seed)`, seed-major.
pub fn order(arms: usize, seeds: &[u64]) -> Vec<(usize, u64)> {
    seeds.iter().flat_map(|&s| (0..arms).map(move |a| (a, s))).collect()
}
