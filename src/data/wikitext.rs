//! WikiText from `Salesforce/wikitext` (Parquet on `main`, pinned), one row per line of the
//! original `wiki.*.tokens` files.

use std::path::PathBuf;

use hf_hub::RepoType;

use super::hub::{fetch, HubFile};
use super::{parquet_rows, DataError, ProgressFn, Split};

pub const REPO: &str = "Salesforce/wikitext";
/// `main` at "Convert dataset to Parquet (#8)", 2024-01-04.
pub const REVISION: &str = "b08601e04326c79dfdd32d625aee71d232d685c3";
pub const CONFIGS: [&str; 4] = ["wikitext-103-v1", "wikitext-103-raw-v1", "wikitext-2-v1", "wikitext-2-raw-v1"];

/// GPT-2 BPE tokens in each config's train split, for step estimates before any download
/// (wikitext-103-raw-v1: 117,920,140, counted with the GPT-2 tokenizer; the non-raw variant is within a
/// few percent). WikiText-2 is ~2% of it.
pub fn gpt2_train_tokens(config: &str) -> Option<u64> {
    match config {
        "wikitext-103-v1" | "wikitext-103-raw-v1" => Some(117_920_140),
        "wikitext-2-v1" | "wikitext-2-raw-v1" => Some(2_391_884),
        _ => None,
    }
}

/// The Parquet files of one split.
pub fn files(config: &str, split: Split) -> Vec<HubFile> {
    let names: Vec<String> = match split {
        Split::Train if config.starts_with("wikitext-103") => {
            (0..2).map(|i| format!("{config}/train-0000{i}-of-00002.parquet")).collect()
        }
        Split::Train => vec![format!("{config}/train-00000-of-00001.parquet")],
        Split::Validation => vec![format!("{config}/validation-00000-of-00001.parquet")],
        Split::Test => vec![format!("{config}/test-00000-of-00001.parquet")],
    };
    names
        .into_iter()
        .map(|filename| HubFile {
            repo_id: REPO.into(),
            repo_type: RepoType::Dataset,
            revision: REVISION.into(),
            filename,
        })
        .collect()
}

/// The local paths of a split's files, fetched into the HF cache if needed.
pub fn fetch_split(config: &str, split: Split, progress: &ProgressFn) -> Result<Vec<PathBuf>, DataError> {
    files(config, split).iter().map(|f| fetch(f, progress)).collect()
}

/// The rows of a split (fetched first if needed).
pub fn rows(config: &str, split: Split, progress: &ProgressFn) -> Result<Vec<String>, DataError> {
    let mut out = vec![];
    for path in fetch_split(config, split, progress)? {
        out.extend(parquet_rows(&path)?);
    }
    Ok(out)
}
