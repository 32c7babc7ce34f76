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
use crate::config::{Resolved, RunConfig, Source};
use crate::model::hf::{self as model_ckpt, CheckpointError, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::GptConfig;
use crate::train::TrainError;

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub const RUN_CONFIG: &str = "difflab_config.json";
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

/// Settings a resumed run must share with its checkpoint: the model's shape and variant, the
/// data and its tokenizer, the blocks and batches, the seed (the data order and dropout masks
/// are functions of it).
pub const RESUME_KEYS: [&str; 13] = [
    "n_layer",
    "n_head",
    "n_embd",
    "rope",
    "rope_theta",
    "research",
    "tokenizer",
    "dataset",
    "dataset_config",
    "subset_ratio",
    "block_size",
    "batch_size",
    "seed",
];

/// For a run that resumes: each of `RESUME_KEYS` set by a flag or a preset must equal the
/// checkpoint's (a contradiction is refused, naming every key); the ones left at their
/// defaults take the checkpoint's, so `train_begin` records what is really trained.
pub fn reconcile_resume(resolved: &mut Resolved) -> Result<(), TrainError> {
    let Some(spec) = resolved.config.resume_from_checkpoint.clone() else { return Ok(()) };
    let dir = resolve(&spec, Path::new(&resolved.config.output_dir))?;
    let path = dir.join(RUN_CONFIG);
    let Ok(text) = fs::read_to_string(&path) else { return Ok(()) }; // not a difflab checkpoint
    let saved: serde_json::Value = serde_json::from_str(&text).map_err(|e| CheckpointError::Damaged {
        path: path.clone(),
        what: RUN_CONFIG,
        reason: e.to_string(),
    })?;
    let mut config = serde_json::to_value(&resolved.config).unwrap_or_default();
    let mut contradictions = vec![];
    for key in RESUME_KEYS {
        let (ours, theirs) = (&config[key], &saved[key]);
        if theirs.is_null() || ours == theirs {
            continue;
        }
        match resolved.origins.get(key) {
            Some(origin) if *origin != Source::Default => {
                contradictions.push(format!("{key} = {ours} ({origin}) but the checkpoint has {theirs}"))
            }
            _ => config[key] = theirs.clone(),
        }
    }
    if !contradictions.is_empty() {
        return Err(TrainError::ResumeContradicts { dir, contradictions: contradictions.join("; ") });
    }
    resolved.config = serde_json::from_value(config).map_err(|e| CheckpointError::Damaged {
        path,
        what: RUN_CONFIG,
        reason: e.to_string(),
    })?;
    Ok(())
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
