//! The Hugging Face `save_pretrained` layout: `config.json` + `model.safetensors`.
//!
//! Tensor names are `GPT2LMHeadModel`'s without the tied `lm_head.weight`; the file carries
//! `{"format": "pt"}` metadata, which transformers requires. Loading accepts names with or
//! without the `transformer.` prefix (the hub's own `gpt2` files have none), ignores the old
//! `attn.bias` / `attn.masked_bias` mask buffers and a stored `lm_head.weight`, and refuses a
//! file that disagrees with its `config.json`, naming the tensor.
//!
//! difflab's own directories also hold `checksums.json`, the CRC-32C of every file, written
//! last and checked before anything is read: a flipped bit in a model or optimizer file is
//! refused by name instead of training on or scoring garbage. CRC-32C, not SHA-256: the threat
//! is corruption (disks, copies, a crash), not tampering; it catches every burst up to 32 bits
//! and all but 2^-32 of random damage, runs at memory speed (SSE4.2), and `crc32c` is already
//! here for TensorBoard. A directory without the file (an HF download) loads as before.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use super::config::{GptConfig, HfConfig};
use super::params::param_specs;
use crate::atomic_file;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "checksums.json";
/// The run settings difflab writes beside every model it saves: its mark on a folder.
pub const RUN_CONFIG: &str = "difflab_config.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid config.json: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path} is not a valid {what} ({reason}); the checkpoint is damaged: use the previous checkpoint-N")]
    Damaged { path: PathBuf, what: &'static str, reason: String },
    #[error(
        "{path} is not a readable safetensors file ({reason}); it is truncated or corrupt: save or download it again"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} has no tensor `{name}`, which its config.json requires")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?} but config.json implies {expected:?}")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {dtype:?}; only float tensors are accepted")]
    Dtype { path: PathBuf, name: String, dtype: safetensors::Dtype },
    #[error("{path}: tensor `{name}` is not part of a model with this config.json (rope {rope}, differential {differential})")]
    Unexpected { path: PathBuf, name: String, rope: bool, differential: bool },
    #[error("{path}: tensor `{name}` holds NaN or infinite values; refusing to save it")]
    NonFinite { path: PathBuf, name: String },
    #[error("{path} does not match its checksum in {MANIFEST_FILE} (CRC-32C {found}, recorded {recorded}): the file is corrupt. Use the previous checkpoint instead (--resume_from_checkpoint <output_dir>/checkpoint-N, or eval --checkpoint on it), or save the model again")]
    Checksum { path: PathBuf, recorded: String, found: String },
    #[error("{path} is not a valid {MANIFEST_FILE} ({reason}); the folder's files cannot be checked: use the previous checkpoint-N, or save the model again")]
    Manifest { path: PathBuf, reason: String },
    #[error("{dir} was written by difflab (it holds {RUN_CONFIG}) but its {MANIFEST_FILE} is missing, so its files cannot be checked (a save cut short, or a file deleted): use the previous checkpoint-N, or save the model again")]
    ManifestMissing { dir: PathBuf },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl CheckpointError {
    /// Bad input (exit 2: a missing, damaged or foreign checkpoint), or a failure to write one
    /// or of the tensors themselves (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, CheckpointError::Write { .. } | CheckpointError::NonFinite { .. } | CheckpointError::Candle(_))
    }
}

fn crc_of(path: &Path) -> Result<String, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Read { path: path.to_path_buf(), source })?;
    Ok(format!("{:08x}", crc32c::crc32c(&bytes)))
}

/// Records the CRC-32C of `files` (names in `dir`) in `checksums.json`, atomically: the last
/// write of a save.
pub fn write_manifest(dir: &Path, files: &[&str]) -> Result<(), CheckpointError> {
    let mut sums = serde_json::Map::new();
    for f in files {
        sums.insert(f.to_string(), crc_of(&dir.join(f))?.into());
    }
    let path = dir.join(MANIFEST_FILE);
    let text =
        serde_json::to_string_pretty(&serde_json::json!({ "algorithm": "crc32c", "files": sums })).unwrap_or_default();
    atomic_file::write(&path, text.as_bytes()).map_err(|source| CheckpointError::Write { path, source })
}

/// Drops `checksums.json` before files of `dir` are rewritten in place, so that a crash half
/// way leaves a directory without a manifest (loaded unchecked) rather than a wrong one.
pub fn remove_manifest(dir: &Path) -> Result<(), CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::Write { path, source: e }),
        _ => Ok(()),
    }
}

/// Checks every file `checksums.json` lists. A directory without one passes if another tool
/// wrote it (an HF download has none); one difflab wrote (it holds `difflab_config.json`) is
/// refused.
pub fn verify_manifest(dir: &Path) -> Result<(), CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let Ok(text) = fs::read_to_string(&path) else {
        return match dir.join(RUN_CONFIG).is_file() {
            true => Err(CheckpointError::ManifestMissing { dir: dir.to_path_buf() }),
            false => Ok(()),
        };
    };
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Manifest { path: path.clone(), reason: e.to_string() })?;
    let files = manifest["files"]
        .as_object()
        .ok_or_else(|| CheckpointError::Manifest { path: path.clone(), reason: "no `files` map".into() })?;
    for (name, recorded) in files {
        let file = dir.join(name);
        let found = crc_of(&file)?;
        let recorded = recorded.as_str().unwrap_or_default();
        if found != recorded {
            return Err(CheckpointError::Checksum { path: file, recorded: recorded.into(), found });
        }
    }
    Ok(())
}

/// Reads `config.json` from a model directory.
pub fn read_config(dir: &Path) -> Result<(GptConfig, HfConfig), CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(|source| CheckpointError::Read { path: path.clone(), source })?;
    let hf: HfConfig = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Config { path: path.clone(), reason: e.to_string() })?;
    let cfg = hf.to_model().map_err(|reason| CheckpointError::Config { path, reason })?;
    Ok((cfg, hf))
}

/// Loads a model directory: its config and its weights (f32, on `device`), keyed by the
/// canonical `transformer.`-prefixed names.
pub fn load_pretrained(dir: &Path, device: &Device) -> Result<(GptConfig, BTreeMap<String, Tensor>), CheckpointError> {
    verify_manifest(dir)?;
    let (cfg, _) = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors: HashMap<String, Tensor> = read_tensors(&path, device)?
        .into_iter()
        .filter_map(|(name, t)| canonical_name(&name).map(|n| (n, t)))
        .collect();
    let mut weights = BTreeMap::new();
    for spec in param_specs(&cfg) {
        let t = tensors
            .remove(&spec.name)
            .ok_or_else(|| CheckpointError::MissingTensor { path: path.clone(), name: spec.name.clone() })?;
        if t.dims() != spec.shape.as_slice() {
            return Err(CheckpointError::Shape {
                path,
                name: spec.name,
                expected: spec.shape,
                found: t.dims().to_vec(),
            });
        }
        weights.insert(spec.name, t);
    }
    if let Some(name) = tensors.into_keys().next() {
        return Err(CheckpointError::Unexpected { path, name, rope: cfg.rope, differential: cfg.differential });
    }
    Ok((cfg, weights))
}

/// Reads every float tensor of a safetensors file as f32, by its stored name.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Read { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => return Err(CheckpointError::Dtype { path: path.to_path_buf(), name, dtype: other }),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?.to_dtype(DType::F32)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// `h.0.attn.c_attn.weight` and `transformer.h.0...` both map to the prefixed name; buffers
/// that are not parameters map to `None`.
fn canonical_name(name: &str) -> Option<String> {
    let bare = name.strip_prefix("transformer.").unwrap_or(name);
    let is_buffer = bare.ends_with(".attn.bias") || bare.ends_with(".attn.masked_bias");
    if is_buffer || bare == "lm_head.weight" {
        return None;
    }
    Some(format!("transformer.{bare}"))
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed), each file
/// atomically. Non-finite weights are refused: a checkpoint never holds NaN.
pub fn save_pretrained(
    dir: &Path,
    cfg: &GptConfig,
    weights: &BTreeMap<String, Tensor>,
    eos_token_id: Option<u32>,
) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(|source| CheckpointError::Write { path: dir.to_path_buf(), source })?;
    let path = dir.join(WEIGHTS_FILE);
    write_tensors(&path, weights)?;
    let config_path = dir.join(CONFIG_FILE);
    let hf = HfConfig::from_model(cfg, eos_token_id);
    let text = serde_json::to_string_pretty(&hf)
        .map_err(|e| CheckpointError::Config { path: config_path.clone(), reason: e.to_string() })?;
    atomic_file::write(&config_path, text.as_bytes())
        .map_err(|source| CheckpointError::Write { path: config_path, source })
}

/// Writes named tensors (f32 on host) as safetensors with `{"format": "pt"}`, atomically.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), CheckpointError> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        if !all_finite(&t)? {
            return Err(CheckpointError::NonFinite { path: path.to_path_buf(), name: name.clone() });
        }
        host.push((name.as_str(), t));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(host, Some(metadata))
        .map_err(|e| CheckpointError::Write { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
    atomic_file::write(path, &bytes).map_err(|source| CheckpointError::Write { path: path.to_path_buf(), source })
}

pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let sum = t.abs()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(sum.is_finite())
}
