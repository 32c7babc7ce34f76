//! Tokenizers: `gpt2` (the hub's `openai-community/gpt2` tokenizer.json, through the HF
//! cache), `bpe:N` (byte-level BPE trained on the training split, cached by corpus and N),
//! `byte` (one id per byte), or a path to a tokenizer.json. All are HF `tokenizers` objects,
//! so every checkpoint can carry its tokenizer.json.

use std::path::{Path, PathBuf};

use hf_hub::RepoType;
use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

use super::hub::{fetch, HubFile};
use super::spec::TokenizerSpec;
use super::{DataError, Progress, ProgressFn};
use crate::atomic_file;
use crate::fingerprint::fnv1a;

pub const END_OF_TEXT: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The resolved spec: `gpt2`, `bpe:2048`, `byte` or a path.
    pub spec: String,
    json: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({}, vocab {})", self.spec, self.vocab_size())
    }
}

impl Tokenizer {
    pub fn from_json(spec: &str, json: String) -> Result<Self, DataError> {
        let inner = json.parse::<tokenizers::Tokenizer>().map_err(|e| DataError::Tokenizer {
            spec: spec.into(),
            reason: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(Self { inner, spec: spec.into(), json })
    }

    pub fn from_file(spec: &str, path: &Path) -> Result<Self, DataError> {
        let json = std::fs::read_to_string(path).map_err(|e| DataError::Tokenizer {
            spec: spec.into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        // the file is named: a damaged one in a cache is deleted and fetched again
        Self::from_json(spec, json).map_err(|e| {
            let why = match &e {
                DataError::Tokenizer { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            DataError::Tokenizer {
                spec: spec.into(),
                reason: format!("{} ({why}): delete that file and run again to fetch or rebuild it", path.display()),
            }
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer.json text, for checkpoints and hashing.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// A stable fingerprint of the tokenizer, for cache keys.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(self.json.as_bytes())
    }

    pub fn end_of_text_id(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer { spec: self.spec.clone(), reason: e.to_string() })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer { spec: self.spec.clone(), reason: e.to_string() })
    }

    /// Tokenizes every row and concatenates the ids in row order (HF `run_clm.py`'s
    /// `tokenize_function` + `group_texts`), on all cores, reporting rows done.
    pub fn encode_rows(&self, rows: &[String], stage: &str, progress: &ProgressFn) -> Result<Vec<u32>, DataError> {
        const CHUNK: usize = 2_000;
        let total = rows.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        progress(Progress::rows(stage, 0, total));
        let chunks: Vec<Vec<u32>> = rows
            .par_chunks(CHUNK)
            .map(|chunk| {
                let mut ids = Vec::with_capacity(chunk.iter().map(|r| r.len() / 3).sum());
                for row in chunk {
                    ids.extend(self.encode(row)?);
                }
                let n = done.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed) + chunk.len() as u64;
                progress(Progress::rows(stage, n, total));
                Ok(ids)
            })
            .collect::<Result<_, DataError>>()?;
        Ok(chunks.concat())
    }
}

/// `openai-community/gpt2` at the commit `main` names (pinned as the dataset is, so a
/// change on the hub never changes a run's tokens silently).
pub const GPT2_REVISION: &str = "607a30d783dfa663caf39e06633721c8d4cfcd7e";

/// The GPT-2 tokenizer file on the hub.
pub fn gpt2_file() -> HubFile {
    HubFile {
        repo_id: "openai-community/gpt2".into(),
        repo_type: RepoType::Model,
        revision: GPT2_REVISION.into(),
        filename: "tokenizer.json".into(),
    }
}

/// Loads (or trains) the tokenizer named by `spec`. `training_rows` is called only when a
/// BPE has to be trained; `corpus_id` keys the trained file.
pub fn load(
    spec: &TokenizerSpec,
    cache_dir: &Path,
    corpus_id: &str,
    training_rows: &mut dyn FnMut() -> Result<Vec<String>, DataError>,
    progress: &ProgressFn,
) -> Result<Tokenizer, DataError> {
    let name = spec.to_string();
    match spec {
        TokenizerSpec::Gpt2 => {
            let path = fetch(&gpt2_file(), progress)?;
            Tokenizer::from_file(&name, &path)
        }
        TokenizerSpec::Byte => Tokenizer::from_json(&name, byte_tokenizer_json()),
        TokenizerSpec::Bpe(vocab) => {
            let path = bpe_cache_path(cache_dir, corpus_id, *vocab);
            if let Ok(t) = Tokenizer::from_file(&name, &path) {
                return Ok(t);
            }
            let stage = format!("training a byte-level BPE of {vocab} tokens");
            progress(Progress::task(&stage, false));
            let rows = training_rows()?;
            let json =
                train_bpe(&rows, *vocab).map_err(|reason| DataError::Tokenizer { spec: name.clone(), reason })?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| DataError::Cache { path: parent.into(), source })?;
            }
            atomic_file::write(&path, json.as_bytes())
                .map_err(|source| DataError::Cache { path: path.clone(), source })?;
            progress(Progress::task(&stage, true));
            Tokenizer::from_json(&name, json)
        }
        TokenizerSpec::File(path) => Tokenizer::from_file(&name, Path::new(path)),
        TokenizerSpec::Auto => {
            Err(DataError::Tokenizer { spec: name, reason: "`auto` must be resolved against the dataset first".into() })
        }
    }
}

pub fn bpe_cache_path(cache_dir: &Path, corpus_id: &str, vocab: usize) -> PathBuf {
    cache_dir.join("tokenizers").join(format!("bpe{vocab}-{:016x}.json", fnv1a(corpus_id.as_bytes())))
}

/// Trains a GPT-2-style byte-level BPE (all 256 byte symbols, `<|endoftext|>` special).
pub fn train_bpe(rows: &[String], vocab: usize) -> Result<String, String> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_decoder(Some(ByteLevel::default().into()))
            .build()
            .map_err(|e| e.to_string())?;
    tok.train(&mut trainer, rows.iter().filter(|r| !r.is_empty())).map_err(|e| e.to_string())?;
    let tok: tokenizers::Tokenizer = tok.into();
    tok.to_string(false).map_err(|e| e.to_string())
}

/// GPT-2's byte -> printable character map (`bytes_to_unicode` in openai/gpt-2 encoder.py).
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..=b).filter(|x| !printable(*x)).count() - 1;
    char::from_u32(256 + shifted as u32).unwrap_or('?')
}

/// A byte-level BPE with no merges: id = byte value, plus `<|endoftext|>` = 256.
fn byte_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..=255u8).map(|b| (byte_to_char(b).to_string(), serde_json::Value::from(b as u32))).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": END_OF_TEXT, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
    .to_string()
}
