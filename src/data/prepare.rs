//! From a dataset setting to both splits as token streams, through the token cache.

use std::path::PathBuf;
use std::time::Instant;

use super::spec::TokenizerSpec;
use super::token_cache::{self, Invalid};
use super::tokenizer::{self, Tokenizer};
use super::{hub, wikitext, DataError, Progress, ProgressFn, Source, Split, TokenStream};

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    pub dataset: String,
    pub dataset_config: String,
    pub subset_ratio: f64,
    /// Resolved tokenizer spec (no `auto`).
    pub tokenizer: TokenizerSpec,
    /// The split evaluations run on: validation, or test when a run reports it.
    pub eval_split: Split,
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
    /// The evaluation split (`DataConfig::eval_split`: validation unless test was asked for).
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
    prepare_all(cfg, progress).map_err(|e| every_missing_file(cfg, e))
}

/// Offline (`HF_HUB_OFFLINE`, or no network: the first download failed), one missing hub file
/// is seldom alone: the error names every file the run may need (the tokenizer, the training and
/// evaluation splits) that is not in the cache.
fn every_missing_file(cfg: &DataConfig, e: DataError) -> DataError {
    let DataError::HubMissing { reason, .. } = &e else { return e };
    let why = match hub::offline() {
        true => "HF_HUB_OFFLINE is set".to_string(),
        false => format!("the hub cannot be reached ({reason})"),
    };
    let mut needed = vec![];
    if cfg.tokenizer == TokenizerSpec::Gpt2 {
        needed.push(tokenizer::gpt2_file());
    }
    if cfg.dataset == "wikitext" {
        needed.extend(wikitext::files(&cfg.dataset_config, Split::Train));
        needed.extend(wikitext::files(&cfg.dataset_config, cfg.eval_split));
    }
    let cache = hub::cache_dir();
    let missing: Vec<hub::HubFile> = needed.into_iter().filter(|f| hub::cached(&cache, f).is_none()).collect();
    if missing.len() < 2 {
        return e;
    }
    DataError::HubMissingMany {
        why,
        count: missing.len(),
        files: missing.iter().map(|f| format!("{}: `{}`", f.repo_id, f.filename)).collect::<Vec<_>>().join(", "),
        cache,
        hint: hub::download_hint(&missing),
    }
}

fn prepare_all(cfg: &DataConfig, progress: &ProgressFn) -> Result<PreparedData, DataError> {
    let source = Source::resolve(&cfg.dataset, &cfg.dataset_config)?;
    let train_id = format!("{}|train|subset={}", source.identity(), cfg.subset_ratio);
    // The training rows are read at most once, whether the BPE or the token cache needs them.
    let mut train_rows: Option<Vec<String>> = None;
    let mut load_train = || -> Result<Vec<String>, DataError> {
        if let Some(rows) = &train_rows {
            return Ok(rows.clone());
        }
        let rows = subset(source.rows(Split::Train, progress)?, cfg.subset_ratio);
        train_rows = Some(rows.clone());
        Ok(rows)
    };
    let tokenizer = tokenizer::load(&cfg.tokenizer, &cfg.cache_dir, &train_id, &mut load_train, progress)?;
    let mut notes = vec![];
    let train = tokenized(cfg, &tokenizer, Split::Train, &train_id, &mut load_train, &mut notes, progress)?;
    let validation = tokenized_validation(cfg, &source, &tokenizer, &mut notes, progress)?;
    progress(Progress::task("data ready", true));
    Ok(PreparedData { tokenizer, train, validation, notes })
}

/// Only the validation split, with a given tokenizer (evaluating a checkpoint).
pub fn prepare_validation(
    cfg: &DataConfig,
    tokenizer: &Tokenizer,
    progress: &ProgressFn,
) -> Result<(TokenStream, Vec<String>), DataError> {
    let source = Source::resolve(&cfg.dataset, &cfg.dataset_config)?;
    let mut notes = vec![];
    let stream = tokenized_validation(cfg, &source, tokenizer, &mut notes, progress)?;
    Ok((stream, notes))
}

fn tokenized_validation(
    cfg: &DataConfig,
    source: &Source,
    tokenizer: &Tokenizer,
    notes: &mut Vec<String>,
    progress: &ProgressFn,
) -> Result<TokenStream, DataError> {
    let split = cfg.eval_split;
    let id = format!("{}|{}", source.identity(), split.name());
    tokenized(cfg, tokenizer, split, &id, &mut || source.rows(split, progress), notes, progress)
}

/// A split's tokens from the cache, or tokenized (and cached) from its rows.
fn tokenized(
    cfg: &DataConfig,
    tokenizer: &Tokenizer,
    split: Split,
    id: &str,
    rows: &mut dyn FnMut() -> Result<Vec<String>, DataError>,
    notes: &mut Vec<String>,
    progress: &ProgressFn,
) -> Result<TokenStream, DataError> {
    let key = format!("{id}|tokenizer={:016x}", tokenizer.fingerprint());
    let path = token_cache::path_for(&cfg.cache_dir, &key);
    match token_cache::open(&path) {
        Ok(stream) => {
            notes.push(format!("{}: {} tokens from the cache {}", split.name(), stream.len(), path.display()));
            return Ok(stream);
        }
        Err(Invalid::Corrupt(why)) => {
            notes.push(format!("{}: cache {} is corrupt ({why}); rebuilding it", split.name(), path.display()))
        }
        Err(Invalid::Missing) => {}
    }
    let rows = rows()?;
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
    token_cache::write(&path, &ids, tokenizer.vocab_size())
        .map_err(|source| DataError::Cache { path: path.clone(), source })?;
    Ok(token_cache::open(&path).unwrap_or_else(|_| TokenStream::from_vec(ids)))
}
