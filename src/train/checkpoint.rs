//! Trainer checkpoints, HF Trainer style: `output_dir/checkpoint-<step>/` with `config.json`,
//! `model.safetensors`, `tokenizer.json`, `optimizer.safetensors`, `trainer_state.json` and the
//! resolved run config.
//!
//! A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed
//! into place: a crash at any moment leaves the previous checkpoints untouched and no half
//! checkpoint under a real name. What to delete under `save_total_limit` is a pure function.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::atomic_file;
use crate::config::keys::OnResume;
use crate::config::{reconcile, Origin, ReconcileError, Resolved, RunConfig};
use crate::model::hf::{self as model_ckpt, CheckpointError, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::GptConfig;
use crate::train::TrainError;

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub use crate::model::hf::RUN_CONFIG;
const PREFIX: &str = "checkpoint-";

/// `trainer_state.json`: HF Trainer's keys plus what an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    pub epoch: f64,
    pub max_steps: u64,
    pub num_train_epochs: f64,
    pub train_batch_size: usize,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    /// Evaluations so far, as HF's `log_history` entries.
    pub log_history: Vec<serde_json::Value>,
    /// The "lower LR" multiplier in force: persists through resume.
    pub lr_scale: f64,
    pub seed: u64,
    /// AdamW steps taken (differs from `global_step` when non-finite steps were skipped).
    pub optimizer_steps: u64,
    pub skipped_steps: u64,
    /// Where the data stands: epoch and block offset of the next step. Block order is a
    /// seeded shuffle per epoch and dropout masks are seeded per step, so (seed, step) is the
    /// whole random state.
    pub data_epoch: u64,
    pub data_offset: u64,
    pub difflab_version: String,
    /// The processes that trained it (0 in checkpoints of older versions).
    #[serde(default)]
    pub world_size: usize,
    /// The sum and number of the training losses of every step applied so far, so the run's
    /// mean train loss is the same whether or not it was resumed (0 in older checkpoints).
    #[serde(default)]
    pub train_loss_sum: f64,
    #[serde(default)]
    pub train_loss_steps: u64,
    /// The steps since the last progress marker, so the first marker after a resume averages
    /// the same steps an unbroken run's would.
    #[serde(default)]
    pub progress_window: ProgressWindow,
    /// Evaluations in a row that did not improve on the best by the early-stopping threshold.
    #[serde(default)]
    pub evals_without_improvement: u64,
}

/// Losses and throughput since the last progress marker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressWindow {
    pub loss_sum: f64,
    pub steps: u64,
    pub seconds: f64,
    pub tokens: u64,
}

impl ProgressWindow {
    pub fn add(&mut self, loss: f64, seconds: f64, tokens: u64) {
        self.loss_sum += loss;
        self.steps += 1;
        self.seconds += seconds;
        self.tokens += tokens;
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.steps.max(1) as f64
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

impl TrainerState {
    /// A run's state before its first step.
    pub fn fresh(cfg: &RunConfig) -> Self {
        TrainerState {
            global_step: 0,
            epoch: 0.0,
            max_steps: 0,
            num_train_epochs: cfg.num_train_epochs,
            train_batch_size: cfg.batch_size,
            best_metric: None,
            best_model_checkpoint: None,
            log_history: vec![],
            lr_scale: 1.0,
            seed: cfg.seed,
            optimizer_steps: 0,
            skipped_steps: 0,
            data_epoch: 0,
            data_offset: 0,
            difflab_version: env!("CARGO_PKG_VERSION").into(),
            world_size: 1,
            train_loss_sum: 0.0,
            train_loss_steps: 0,
            progress_window: ProgressWindow::default(),
            evals_without_improvement: 0,
        }
    }
}

pub struct Parts<'a> {
    pub model: &'a GptConfig,
    pub weights: &'a BTreeMap<String, Tensor>,
    pub optimizer: &'a BTreeMap<String, Tensor>,
    pub tokenizer_json: &'a str,
    pub run_config: &'a RunConfig,
    pub state: &'a TrainerState,
    pub eos_token_id: Option<u32>,
}

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Write { path: path.to_path_buf(), source }
}

/// The fault-injection hook of the crash tests, half-way through writing the N-th checkpoint:
/// `DIFFLAB_FAULT=abort_during_save:N` kills the process, `enospc_during_save:N` fails the
/// write as a full disk would.
fn fault_point(dir: &Path) -> Result<(), CheckpointError> {
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let fault = std::env::var("DIFFLAB_FAULT").unwrap_or_default();
    let at = |kind: &str| fault.strip_prefix(kind).and_then(|v| v.parse::<u64>().ok()) == Some(n);
    if at("abort_during_save:") {
        std::process::abort();
    }
    if at("enospc_during_save:") {
        let source = std::io::Error::from_raw_os_error(libc::ENOSPC);
        return Err(CheckpointError::Write { path: dir.join(OPTIMIZER), source });
    }
    Ok(())
}

/// The files of a model directory besides the checkpoint's optimizer state.
const MODEL_FILES: [&str; 5] = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER, RUN_CONFIG, TRAINER_STATE];

/// The model (HF layout), the tokenizer, the run config and the trainer state.
fn write_model_files(dir: &Path, p: &Parts) -> Result<(), CheckpointError> {
    model_ckpt::save_pretrained(dir, p.model, p.weights, p.eos_token_id)?;
    let tok = dir.join(TOKENIZER);
    atomic_file::write(&tok, p.tokenizer_json.as_bytes()).map_err(io_err(&tok))?;
    let run = dir.join(RUN_CONFIG);
    let text = serde_json::to_string_pretty(p.run_config).unwrap_or_default();
    atomic_file::write(&run, text.as_bytes()).map_err(io_err(&run))?;
    let state = dir.join(TRAINER_STATE);
    let text = serde_json::to_string_pretty(p.state).unwrap_or_default();
    atomic_file::write(&state, text.as_bytes()).map_err(io_err(&state))
}

/// Writes the final model into `output_dir` itself (as HF Trainer's `save_model` and
/// `save_state`), its checksums last.
pub fn save_model_dir(dir: &Path, p: &Parts) -> Result<(), CheckpointError> {
    model_ckpt::remove_manifest(dir)?;
    write_model_files(dir, p)?;
    model_ckpt::write_manifest(dir, &MODEL_FILES)
}

/// Writes `checkpoint-<step>` atomically and returns its path.
pub fn save(output_dir: &Path, p: &Parts) -> Result<PathBuf, CheckpointError> {
    let step = p.state.global_step;
    let target = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".{PREFIX}{step}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let written = (|| {
        write_model_files(&tmp, p)?;
        fault_point(&tmp)?;
        model_ckpt::write_tensors(&tmp.join(OPTIMIZER), p.optimizer)?;
        let mut files = MODEL_FILES.to_vec();
        files.push(OPTIMIZER);
        model_ckpt::write_manifest(&tmp, &files)?;
        atomic_file::sync_dir(&tmp).map_err(io_err(&tmp))
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Replace an existing checkpoint of the same step: move it aside first (a directory
    // cannot be renamed over a non-empty one), then drop it once the new one is in place.
    let aside = output_dir.join(format!(".{PREFIX}{step}.old-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        fs::rename(&target, &aside).map_err(io_err(&target))?;
    }
    fs::rename(&tmp, &target).map_err(io_err(&target))?;
    atomic_file::sync_dir(output_dir).map_err(io_err(output_dir))?;
    if had_old {
        let _ = fs::remove_dir_all(&aside);
    }
    Ok(target)
}

/// Completed checkpoints in `output_dir`, oldest step first. Temporary directories (hidden
/// names) are not checkpoints.
pub fn list(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(read) = fs::read_dir(output_dir) else { return vec![] };
    let mut out: Vec<(u64, PathBuf)> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix(PREFIX)?.parse().ok()?;
            p.join(TRAINER_STATE).is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// Which checkpoints `save_total_limit` removes: the oldest beyond `limit`, never `keep`
/// (the best one, as HF keeps `best_model_checkpoint`).
pub fn to_delete(steps: &[u64], limit: Option<u64>, keep: Option<u64>) -> Vec<u64> {
    let Some(limit) = limit else { return vec![] };
    let limit = limit.max(1) as usize;
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    let mut excess = sorted.len().saturating_sub(limit);
    let mut out = vec![];
    for s in sorted {
        if excess == 0 {
            break;
        }
        if Some(s) == keep && limit > 1 {
            continue;
        }
        out.push(s);
        excess -= 1;
    }
    out
}

/// Applies `save_total_limit`; returns the deleted directories. Each is first renamed to a
/// hidden name, then deleted: a kill half way leaves a hidden leftover (removed at the next
/// start), never a half-deleted `checkpoint-N` that looks like a checkpoint.
pub fn rotate(output_dir: &Path, limit: Option<u64>, keep: Option<u64>) -> Vec<PathBuf> {
    let all = list(output_dir);
    let steps: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    let doomed = to_delete(&steps, limit, keep);
    all.into_iter()
        .filter(|(s, _)| doomed.contains(s))
        .filter_map(|(step, p)| {
            let aside = output_dir.join(format!(".{PREFIX}{step}.deleting-{}", std::process::id()));
            fs::rename(&p, &aside).ok()?;
            let _ = fs::remove_dir_all(&aside);
            Some(p)
        })
        .collect()
}

/// A resumed run is the run in its checkpoint: every setting comes from the checkpoint's
/// `difflab_config.json`, the output folder is the one that holds the checkpoint, and a flag
/// or preset may change only the keys the table marks `MayChange` (a longer `max_steps`, the
/// eval cadence, the device, ...), each such change returned as a line to show at start; one
/// that contradicts another key is refused, naming every such key. A checkpoint without the
/// file (an HF model directory) is resumed with the settings given.
pub fn reconcile_resume(resolved: &mut Resolved) -> Result<Vec<String>, TrainError> {
    let Some(spec) = resolved.config.resume_from_checkpoint.clone() else { return Ok(vec![]) };
    let dir = resolve(&spec, Path::new(&resolved.config.output_dir))?;
    if !dir.is_dir() {
        return Err(CheckpointError::Read {
            path: dir,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint directory"),
        }
        .into());
    }
    let path = dir.join(RUN_CONFIG);
    let Ok(text) = fs::read_to_string(&path) else { return Ok(vec![]) }; // not a difflab checkpoint
    let damaged = |reason: String| CheckpointError::Damaged { path: path.clone(), what: RUN_CONFIG, reason };
    let saved = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(other) => return Err(damaged(format!("holds {other}, not settings")).into()),
        Err(e) => return Err(damaged(e.to_string()).into()),
    };
    let may_change = |k: &crate::config::keys::KeySpec| k.on_resume == OnResume::MayChange;
    let reconciled = match reconcile(&saved, resolved, may_change) {
        Ok(r) => r,
        Err(ReconcileError::Contradicts(lines)) => {
            return Err(TrainError::ResumeContradicts { dir, contradictions: lines.join("; ") })
        }
        Err(ReconcileError::Damaged(reason)) => return Err(damaged(reason).into()),
    };
    // the run's own folder: where its checkpoint is
    let home = run_folder(&dir);
    let given = &resolved.config.output_dir;
    let explicit = resolved.origins.get("output_dir").is_some_and(|o| *o != Origin::Default);
    if explicit && !same_folder(Path::new(given), &home) {
        return Err(TrainError::ResumeContradicts {
            dir: dir.clone(),
            contradictions: format!(
                "output_dir = {given:?} but the checkpoint belongs to the run in {:?}, where a resumed run goes on",
                home.display().to_string()
            ),
        });
    }
    let mut config = reconciled.config;
    config.output_dir = home.display().to_string();
    config.resume_from_checkpoint = Some(dir.display().to_string());
    resolved.config = config;
    let mut lines = vec![format!(
        "resuming the run in {} from {} with its own settings",
        home.display(),
        dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    )];
    lines.extend(reconciled.overrides.iter().map(|o| format!("resume: {o}")));
    Ok(lines)
}

/// The folder of the run a checkpoint belongs to: the one that holds it.
fn run_folder(checkpoint: &Path) -> PathBuf {
    match checkpoint.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What a resumed run starts from.
pub struct Resume {
    pub dir: PathBuf,
    pub model: GptConfig,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: TrainerState,
}

/// `spec` is a checkpoint directory, or `latest` for the newest in `output_dir`.
pub fn resolve(spec: &str, output_dir: &Path) -> Result<PathBuf, CheckpointError> {
    if spec == "latest" || spec == "true" {
        return list(output_dir).pop().map(|(_, p)| p).ok_or_else(|| CheckpointError::Read {
            path: output_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no checkpoint-N directory to resume from"),
        });
    }
    Ok(PathBuf::from(spec))
}

pub fn load(dir: &Path, device: &Device) -> Result<Resume, CheckpointError> {
    let (model, weights) = model_ckpt::load_pretrained(dir, device)?;
    let optimizer = model_ckpt::read_tensors(&dir.join(OPTIMIZER), device)?.into_iter().collect();
    let path = dir.join(TRAINER_STATE);
    let text = fs::read_to_string(&path).map_err(|source| CheckpointError::Read { path: path.clone(), source })?;
    let state = serde_json::from_str(&text).map_err(|e| CheckpointError::Damaged {
        path,
        what: TRAINER_STATE,
        reason: e.to_string(),
    })?;
    Ok(Resume { dir: dir.to_path_buf(), model, weights, optimizer, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_and_the_best() {
        assert_eq!(to_delete(&[100, 200, 300, 400], Some(2), None), vec![100, 200]);
        assert_eq!(to_delete(&[300, 100, 200], Some(5), None), Vec::<u64>::new());
        assert_eq!(to_delete(&[100, 200, 300, 400], None, None), Vec::<u64>::new());
        assert_eq!(to_delete(&[100, 200, 300, 400], Some(2), Some(100)), vec![200, 300]);
        assert_eq!(to_delete(&[100, 200], Some(1), Some(100)), vec![100], "limit 1 keeps only the newest");
    }
}
