//! From a dataset setting to both splits as token streams, through the token cache.

use std::path::PathBuf;
use std::time::Instant;

use super::token_cache::{self, Invalid};
use super::tokenizer::{self, Tokenizer};
use super::{DataError, Progress, ProgressFn, Source, Split, TokenStream};

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    pub dataset: String,
    pub dataset_config: String,
    pub subset_ratio: f64,
    /// Resolved tokenizer spec (no `auto`).
    pub tokenizer: String,
    /// difflab's cache: token files and trained tokenizers.
    pub cache_dir: PathBuf,
}

/// difflab's cache directory: `$DIFFLAB_CACHE`, else `$XDG_CACHE_HOME/difflab`, else
/// `~/.cache/difflab`.
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("DIFFLAB_CACHE").unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .or_else(|| env("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("difflab")
    })
}

pub struct PreparedData {
    pub tokenizer: Tokenizer,
    pub train: TokenStream,
    pub validation: TokenStream,
    /// What happened, for the log: cache hits, rebuilds, throughput.
    pub notes: Vec<String>,
}

/// Keeps the first `ratio` of the rows (at least one), as `subset_ratio` does.
pub fn subset(mut rows: Vec<String>, ratio: f64) -> Vec<String> {
    if ratio < 1.0 {
        let keep = ((rows.len() as f64 * ratio).floor() as usize).max(1).min(rows.len());
        rows.truncate(keep);
    }
    rows
}

pub fn prepare(cfg: &DataConfig, progress: &ProgressFn) -> Result<PreparedData, DataError> {
    let source = Source::resolve(&cfg.dataset, &cfg.dataset_config)?;
    let mut notes = vec![];
    let train_id = format!("{}|train|subset={}", source.identity(), cfg.subset_ratio);
    // The training rows are read at most once, whether the BPE or the token cache needs them.
    let mut train_rows: Option<Vec<String>> = None;
    let mut load_train = |progress: &ProgressFn| -> Result<Vec<String>, DataError> {
        if let Some(rows) = &train_rows {
            return Ok(rows.clone());
        }
        let rows = subset(source.rows(Split::Train, progress)?, cfg.subset_ratio);
        train_rows = Some(rows.clone());
        Ok(rows)
    };
    let tokenizer = tokenizer::load(&cfg.tokenizer, &cfg.cache_dir, &train_id, &mut || load_train(progress), progress)?;

    let mut streams = vec![];
    for split in [Split::Train, Split::Validation] {
        let id = match split {
            Split::Train => train_id.clone(),
            Split::Validation => format!("{}|validation", source.identity()),
        };
        let key = format!("{id}|tokenizer={:016x}", tokenizer.fingerprint());
        let path = token_cache::path_for(&cfg.cache_dir, &key);
        match token_cache::open(&path) {
            Ok(stream) => {
                notes.push(format!("{}: {} tokens from the cache {}", split.name(), stream.len(), path.display()));
                streams.push(stream);
                continue;
            }
            Err(Invalid::Corrupt(why)) => notes.push(format!("{}: cache {} is corrupt ({why}); rebuilding it", split.name(), path.display())),
            Err(Invalid::Missing) => {}
        }
        let rows = match split {
            Split::Train => load_train(progress)?,
            Split::Validation => source.rows(Split::Validation, progress)?,
        };
        let bytes: usize = rows.iter().map(String::len).sum();
        let started = Instant::now();
        let ids = tokenizer.encode_rows(&rows, &format!("tokenizing {}", split.name()), progress)?;
        let secs = started.elapsed().as_secs_f64();
        notes.push(format!(
            "{}: tokenized {} rows ({:.1} MB) into {} tokens in {secs:.2}s ({:.1} MB/s)",
            split.name(),
            rows.len(),
            bytes as f64 / 1e6,
            ids.len(),
            bytes as f64 / 1e6 / secs.max(1e-9)
        ));
        token_cache::write(&path, &ids, tokenizer.vocab_size()).map_err(|source| DataError::Cache { path: path.clone(), source })?;
        let stream = match token_cache::open(&path) {
            Ok(s) => s,
            Err(_) => TokenStream::from_vec(ids),
        };
        streams.push(stream);
    }
    progress(Progress::task("data ready", true));
    let validation = streams.pop().ok_or_else(|| DataError::Format { path: cfg.cache_dir.clone(), reason: "no splits".into() })?;
    let train = streams.pop().ok_or_else(|| DataError::Format { path: cfg.cache_dir.clone(), reason: "no splits".into() })?;
    Ok(PreparedData { tokenizer, train, validation, notes })
}
