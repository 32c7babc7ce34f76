//! Local datasets: a `.txt` (a row per line), `.parquet` (column `text`) or `.jsonl` (field
//! `text`) file, or a folder holding train and validation files (and optionally test). A
//! single file holds out its last rows for validation.
//!
//! A folder may be laid out as the WikiText zips unpack: `wiki.train.raw`, `wiki.valid.raw`,
//! `wiki.test.raw` (or `.tokens`), read as text, one row per line.

use std::path::{Path, PathBuf};

use super::{parquet_rows, DataError, Split};

/// The share of a single file's rows held out for validation (HF `run_clm.py` uses 5%).
pub const VALIDATION_FRACTION: f64 = 0.05;

#[derive(Debug, Clone, PartialEq)]
pub enum LocalDataset {
    File(PathBuf),
    Folder { train: PathBuf, validation: PathBuf, test: Option<PathBuf> },
}

/// `.raw` and `.tokens` are the WikiText zips' own text files.
const EXTENSIONS: [&str; 5] = ["txt", "parquet", "jsonl", "raw", "tokens"];

/// Which split a file in a dataset folder holds, from the words of its name:
/// `train.txt`, `validation-00000.parquet`, `wiki.valid.raw`, `my_test.jsonl`.
fn split_of(file: &Path) -> Option<Split> {
    let stem = file.file_stem()?.to_str()?.to_ascii_lowercase();
    let words: Vec<&str> = stem.split(['.', '-', '_']).collect();
    let has = |names: &[&str]| words.iter().any(|w| names.contains(w));
    if has(&["train"]) {
        Some(Split::Train)
    } else if has(&["validation", "valid", "val"]) {
        Some(Split::Validation)
    } else if has(&["test"]) {
        Some(Split::Test)
    } else {
        None
    }
}

fn supported(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e))
}

impl LocalDataset {
    pub fn resolve(path: &Path) -> Result<Self, DataError> {
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| DataError::unreadable(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| supported(f))
                .collect();
            // `.raw` before `.tokens`, `train.jsonl` before `train.txt`: the same pick every time
            files.sort();
            let find = |split: Split| files.iter().find(|f| split_of(f) == Some(split)).cloned();
            return match (find(Split::Train), find(Split::Validation)) {
                (Some(train), Some(validation)) => {
                    Ok(LocalDataset::Folder { train, validation, test: find(Split::Test) })
                }
                _ => Err(DataError::Format {
                    path: path.into(),
                    reason: "a dataset folder needs a train file and a validation file (train.txt and validation.txt, .parquet/.jsonl, or the WikiText zip's wiki.train.raw and wiki.valid.raw)".into(),
                }),
            };
        }
        if !path.exists() {
            return Err(DataError::NotFound { path: path.into() });
        }
        if !supported(path) {
            return Err(DataError::Format {
                path: path.into(),
                reason: "unsupported file type; use .txt, .parquet or .jsonl".into(),
            });
        }
        Ok(LocalDataset::File(path.to_path_buf()))
    }

    pub fn identity(&self) -> String {
        let stamp = |p: &Path| {
            let meta = std::fs::metadata(p).ok();
            let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            format!("{}:{len}:{mtime}", abs.display())
        };
        match self {
            LocalDataset::File(p) => format!("file/{}", stamp(p)),
            LocalDataset::Folder { train, validation, test } => format!(
                "folder/{}/{}{}",
                stamp(train),
                stamp(validation),
                test.as_deref().map(|t| format!("/{}", stamp(t))).unwrap_or_default()
            ),
        }
    }

    pub fn rows(&self, split: Split) -> Result<Vec<String>, DataError> {
        match self {
            LocalDataset::Folder { train, validation, test } => match split {
                Split::Train => read_rows(train),
                Split::Validation => read_rows(validation),
                Split::Test => read_rows(test.as_ref().ok_or_else(|| DataError::NoSplit {
                    dataset: validation.parent().unwrap_or(validation).display().to_string(),
                    split: "test",
                    fix: "add a test file (test.txt, or the WikiText zip's wiki.test.raw) or use --eval_split validation"
                        .into(),
                })?),
            },
            LocalDataset::File(path) if split == Split::Test => Err(DataError::NoSplit {
                dataset: path.display().to_string(),
                split: "test",
                fix: "a single file splits into train and validation only; give a folder with a test file or use --eval_split validation".into(),
            }),
            LocalDataset::File(path) => {
                let mut rows = read_rows(path)?;
                if rows.len() < 2 {
                    return Err(DataError::Format {
                        path: path.clone(),
                        reason: "needs at least 2 rows to hold one out for validation".into(),
                    });
                }
                let held_out = held_out_rows(rows.len());
                let validation = rows.split_off(rows.len() - held_out);
                Ok(if split == Split::Train { rows } else { validation })
            }
        }
    }
}

/// How many of `n >= 2` rows a single file holds out: the last 5%, at least one, never all.
pub fn held_out_rows(n: usize) -> usize {
    ((n as f64 * VALIDATION_FRACTION).ceil() as usize).max(1).min(n.saturating_sub(1))
}

pub fn read_rows(path: &Path) -> Result<Vec<String>, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_rows(path),
        Some("jsonl") => jsonl_rows(path),
        _ => {
            let text = std::fs::read_to_string(path).map_err(|e| DataError::unreadable(path, e))?;
            Ok(text_rows(&text))
        }
    }
}

/// Lines as WikiText rows: a non-blank line keeps its `\n`, a blank line is an empty row.
pub fn text_rows(text: &str) -> Vec<String> {
    text.split_inclusive('\n')
        .map(|line| if line.trim().is_empty() { String::new() } else { line.to_string() })
        .collect()
}

fn jsonl_rows(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::unreadable(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| DataError::Format {
                path: path.into(),
                reason: format!("line {}: not JSON ({e})", i + 1),
            })?;
            v.get("text").and_then(|t| t.as_str()).map(str::to_string).ok_or_else(|| DataError::Format {
                path: path.into(),
                reason: format!("line {}: no string field `text`", i + 1),
            })
        })
        .collect()
}
