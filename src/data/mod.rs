//! Everything between a dataset name and batches of token ids.
//!
//! `prepare` resolves the dataset (WikiText through the HF cache, local files, or the built-in
//! corpus), loads or trains the tokenizer, and returns both splits as memory-mapped token
//! streams, tokenizing only when the on-disk token cache has no valid copy.

pub mod batches;
pub mod builtin;
pub mod hub;
pub mod local;
pub mod prepare;
pub mod spec;
pub mod token_cache;
pub mod tokenizer;
pub mod wikitext;

use std::path::{Path, PathBuf};

pub use batches::{Batcher, EpochOrder};
pub use prepare::{prepare, prepare_validation, DataConfig, PreparedData};
pub use spec::TokenizerSpec;
pub use token_cache::TokenStream;
pub use tokenizer::Tokenizer;

/// A dataset split. Evaluation runs on `validation` unless a run asks for `test`
/// (`--eval_split test`, to report the held-out test split once the model is chosen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "validation" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split {s:?} (train, validation or test)")),
        }
    }
}

impl TryFrom<String> for Split {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Split> for String {
    fn from(s: Split) -> String {
        s.name().into()
    }
}

/// Where long preparation work stands, for a progress bar (UI) or a stderr line (headless).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What is being done: "downloading wikitext-103-v1/train-00000-of-00002.parquet".
    pub stage: String,
    pub done: u64,
    /// 0 when unknown.
    pub total: u64,
    pub unit: Unit,
}

pub use crate::events::ProgressUnit as Unit;

impl Progress {
    pub fn bytes(stage: &str, done: u64, total: u64) -> Self {
        Self { stage: stage.into(), done, total, unit: Unit::Bytes }
    }
    pub fn rows(stage: &str, done: u64, total: u64) -> Self {
        Self { stage: stage.into(), done, total, unit: Unit::Rows }
    }
    pub fn task(stage: &str, finished: bool) -> Self {
        Self { stage: stage.into(), done: u64::from(finished), total: 1, unit: Unit::Task }
    }
}

/// The progress callback; `Sync` because tokenization reports from worker threads.
pub type ProgressFn<'a> = dyn Fn(Progress) + Sync + 'a;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// `file` is `repo: `name` (revision r)`.
    #[error("{file} is not in the Hugging Face cache {cache}: {reason}. To fetch it, {hint}")]
    HubMissing { file: String, cache: PathBuf, reason: String, hint: String },
    /// Offline, with more than one file the run needs missing: all of them, one message.
    #[error("{why}, and {count} files this run needs are not in the Hugging Face cache {cache}: {files}. To fetch them, {hint}")]
    HubMissingMany { why: String, count: usize, files: String, cache: PathBuf, hint: String },
    #[error("dataset file {path} does not exist; give a .txt, .parquet or .jsonl file, a folder with train/validation files, `wikitext` or `builtin`")]
    NotFound { path: PathBuf },
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("tokenizer {spec:?}: {reason}")]
    Tokenizer { spec: String, reason: String },
    #[error("{dataset} has no {split} split; {fix}")]
    NoSplit { dataset: String, split: &'static str, fix: String },
    #[error("the {split} split has {tokens} tokens, fewer than one block of {block_size}; fix: lower block_size or use more data (subset_ratio)")]
    TooSmall { split: &'static str, tokens: usize, block_size: usize },
    #[error("token {id} in the {split} split is outside the model's vocabulary of {vocab}; the data was tokenized with another tokenizer")]
    OutOfVocab { split: &'static str, id: u32, vocab: usize },
    #[error("cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
}

impl DataError {
    /// Bad input (exit 2: a missing dataset, a malformed file), or a failure of difflab's own
    /// cache (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, DataError::Cache { .. })
    }

    pub fn unreadable(path: &Path, e: impl std::fmt::Display) -> Self {
        DataError::Unreadable { path: path.to_path_buf(), reason: e.to_string() }
    }
}

/// Reads the `text` column of a Parquet file (null rows read as empty).
pub fn parquet_rows(path: &Path) -> Result<Vec<String>, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = std::fs::File::open(path).map_err(|e| DataError::unreadable(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| DataError::unreadable(path, e))?;
    let has_text = reader.metadata().file_metadata().schema_descr().columns().iter().any(|c| c.name() == "text");
    if !has_text {
        return Err(DataError::Format { path: path.into(), reason: "no column named `text`".into() });
    }
    let mut rows = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for row in reader.get_row_iter(None).map_err(|e| DataError::unreadable(path, e))? {
        let row = row.map_err(|e| DataError::unreadable(path, e))?;
        for (name, field) in row.get_column_iter() {
            if name == "text" {
                rows.push(match field {
                    Field::Str(s) => s.clone(),
                    _ => String::new(),
                });
            }
        }
    }
    Ok(rows)
}

/// A dataset setting resolved to what it names.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Wikitext { config: String },
    Builtin,
    Local(local::LocalDataset),
}

/// The built-in corpus's own seed: the dataset does not change with `--seed`.
pub const BUILTIN_SEED: u64 = 20_261_201;

impl Source {
    pub fn resolve(dataset: &str, dataset_config: &str) -> Result<Self, DataError> {
        match dataset {
            "wikitext" => Ok(Source::Wikitext { config: dataset_config.into() }),
            "builtin" => Ok(Source::Builtin),
            path => Ok(Source::Local(local::LocalDataset::resolve(Path::new(path))?)),
        }
    }

    /// What identifies the data's content, for cache keys: a local file's path, size and
    /// modification time, so an edited file is tokenized again.
    pub fn identity(&self) -> String {
        match self {
            Source::Wikitext { config } => format!("wikitext/{config}@{}", wikitext::REVISION),
            Source::Builtin => format!("builtin-v1/{BUILTIN_SEED}"),
            Source::Local(l) => l.identity(),
        }
    }

    pub fn rows(&self, split: Split, progress: &ProgressFn) -> Result<Vec<String>, DataError> {
        match self {
            Source::Wikitext { config } => wikitext::rows(config, split, progress),
            Source::Builtin => {
                progress(Progress::task("generating the built-in corpus", false));
                let corpus = builtin::generate(BUILTIN_SEED);
                progress(Progress::task("generating the built-in corpus", true));
                match split {
                    Split::Train => Ok(corpus.train),
                    Split::Validation => Ok(corpus.validation),
                    Split::Test => Err(DataError::NoSplit {
                        dataset: "builtin".into(),
                        split: "test",
                        fix: "the built-in corpus has train and validation only; use --eval_split validation".into(),
                    }),
                }
            }
            Source::Local(l) => l.rows(split),
        }
    }
}
