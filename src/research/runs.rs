//! The runs under an outputs folder, for the picker's run list: status, steps, final eval loss,
//! when, and what a resume would start from.

use std::path::{Path, PathBuf};

use super::compare::load;
use crate::events::RunStatus;
use crate::sinks::metrics::METRICS_FILE;

/// A run found under an outputs folder, as the picker's run list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PastRun {
    pub dir: PathBuf,
    /// The path below the outputs folder: `demo`, `demo-lr-sweep/lr-1e-3`, `study/arm/seed-1`.
    pub name: String,
    /// `completed`, `stopped`, `diverged`, ... or `running` (a trainer holds it now) or
    /// `interrupted` (no end recorded and no trainer).
    pub status: RunStatus,
    pub steps: u64,
    pub max_steps: Option<u64>,
    pub final_eval_loss: Option<f64>,
    /// When its metrics were last written, seconds since the Unix epoch.
    pub modified: f64,
    /// The newest checkpoint's step, if it has one (what a resume starts from).
    pub checkpoint: Option<u64>,
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl PastRun {
    /// Resuming makes sense for a run that ended early and has a checkpoint, and no trainer now.
    pub fn resumable(&self) -> bool {
        self.checkpoint.is_some()
            && !matches!(self.status, RunStatus::Completed | RunStatus::EarlyStopped | RunStatus::Running)
    }
}

/// Runs under `root` (up to three folders down: runs, sweep trials, study seeds), newest first,
/// at most `limit` of them (the newest by modification time are read).
pub fn list_runs(root: &Path, limit: usize) -> Vec<PastRun> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = vec![];
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let metrics = dir.join(METRICS_FILE);
        if let Ok(meta) = std::fs::metadata(&metrics) {
            found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), dir));
            continue;
        }
        if depth < 3 {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            // checkpoints and TensorBoard folders hold no runs
            stack.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with("checkpoint-")))
                    .map(|p| (p, depth + 1)),
            );
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    found
        .into_iter()
        .take(limit)
        .filter_map(|(modified, dir)| {
            let run = load(&dir).ok()?;
            Some(PastRun {
                name: dir.strip_prefix(root).map(|p| p.display().to_string()).unwrap_or_else(|_| run.name.clone()),
                status: run.status,
                steps: run.steps,
                max_steps: run.config.get("max_steps").and_then(|v| v.as_u64()),
                final_eval_loss: run.final_eval_loss,
                modified: modified.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
                checkpoint: crate::train::checkpoint::list(&dir).last().map(|c| c.0),
                config: run.config,
                dir,
            })
        })
        .collect()
}
