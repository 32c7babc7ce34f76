//! A saved model evaluated at one or several context lengths (train short, test long): the loss
//! and its curve by position, in non-overlapping windows of each length over the same
//! validation tokens. Non-overlapping, not sliding (HF's perplexity guide slides a window by a
//! stride and scores only its last tokens): every token is scored once at every length, and
//! each window's positions run from 0 to `L - 1`, which is what the loss-by-position curve needs
//! and what a model trained on `L`-token blocks saw.
//!
//! `difflab eval --context_lengths` and studies evaluate through here; the run's own folder (or
//! `--out`) gets `extrapolation.json`, `extrapolation.png` and `position_loss.png`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::config::{window_batch, RunConfig};
use crate::data::{self, prepare_validation, tokenizer, ProgressFn, TokenStream, Tokenizer, TokenizerSpec};
use crate::events::{EvalRecord, PositionBucket};
use crate::model::hf::{load_pretrained, CheckpointError};
use crate::model::{Gpt, GptConfig, Trainable};
use crate::sinks::figures::{self, Extras, Line, XAxis};
use crate::train::checkpoint::{TrainerState, TOKENIZER, TRAINER_STATE};
use crate::train::device::{self, DeviceError};
use crate::train::evaluate::evaluate;
use crate::train::run::data_config;

#[derive(Debug, thiserror::Error)]
pub enum LengthsError {
    #[error("{dir}: the model has learned positions (wpe) for {positions} tokens and none beyond, so it cannot read windows of {asked}; ask for lengths up to {positions} (RoPE models read any length)")]
    LearnedPositions { dir: PathBuf, positions: usize, asked: usize },
    #[error("evaluating windows of {length} tokens needs about {needed_gib:.1} GiB and this machine has {available_gib:.1} GiB available; ask for shorter lengths")]
    TooBig { length: usize, needed_gib: f64, available_gib: f64 },
    #[error("the {split} split has {tokens} tokens, fewer than one window of every length asked for ({lcm} tokens: their least common multiple); ask for shorter lengths, or ones that are multiples of each other")]
    TooShort { split: &'static str, tokens: usize, lcm: usize },
    #[error("the tokenizer has {tokenizer} tokens but the model {dir} only {model}; pass the tokenizer it was trained with (--tokenizer)")]
    Vocab { tokenizer: usize, dir: PathBuf, model: usize },
    #[error("{0} has no tokenizer.json and a bpe:N tokenizer cannot be rebuilt for it; pass --tokenizer gpt2 or a tokenizer.json path")]
    NoTokenizer(PathBuf),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("evaluating: {0}")]
    Candle(#[from] candle_core::Error),
}

impl LengthsError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            LengthsError::Data(e) => e.is_bad_input(),
            LengthsError::Checkpoint(e) => e.is_bad_input(),
            LengthsError::Candle(_) => false,
            _ => true,
        }
    }
}

/// A saved model ready to be scored: its weights on the run's placement, its tokenizer and the
/// validation split, and the step it is at.
pub struct SavedModel {
    pub dir: PathBuf,
    pub config: GptConfig,
    pub gpt: Gpt,
    pub validation: TokenStream,
    pub step: u64,
    pub epoch: f64,
    /// Lines about the data (from the cache, and so on).
    pub notes: Vec<String>,
    /// Where and how it computes: device, engine and matmul arithmetic (`Placement::path`).
    pub path: String,
}

/// Loads the model in `dir` and the validation split `cfg` names (its data, tokenizer, split).
pub fn open(dir: &Path, cfg: &RunConfig, progress: &ProgressFn) -> Result<SavedModel, LengthsError> {
    let placement = device::placement(cfg, 1)?;
    let (config, weights) = load_pretrained(dir, &placement.device)?;
    let cache = data::prepare::default_cache_dir();
    let tokenizer = tokenizer_for(dir, &cfg.tokenizer_spec(), &cache, progress)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(LengthsError::Vocab {
            tokenizer: tokenizer.vocab_size(),
            dir: dir.into(),
            model: config.vocab_size,
        });
    }
    let (validation, notes) = prepare_validation(&data_config(cfg, &cache), &tokenizer, progress)?;
    // the step the model is at: its trainer_state.json (checkpoints and finished runs have one)
    let state: Option<TrainerState> =
        std::fs::read_to_string(dir.join(TRAINER_STATE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let gpt = Trainable::new(&config, weights, &placement)?.detached()?;
    let path = format!("{}, {}", device::describe(&placement.device), placement.path());
    Ok(SavedModel {
        path,
        dir: dir.into(),
        config,
        gpt,
        validation,
        step: state.as_ref().map_or(0, |s| s.global_step),
        epoch: state.as_ref().map_or(0.0, |s| s.epoch),
        notes,
    })
}

/// The checkpoint's own tokenizer.json when it carries one, else the configured tokenizer
/// (`gpt2` for an HF GPT-2 directory).
fn tokenizer_for(
    dir: &Path,
    spec: &TokenizerSpec,
    cache: &Path,
    progress: &ProgressFn,
) -> Result<Tokenizer, LengthsError> {
    let own = dir.join(TOKENIZER);
    if own.is_file() {
        return Ok(Tokenizer::from_file(&own.display().to_string(), &own)?);
    }
    if matches!(spec, TokenizerSpec::Bpe(_)) {
        return Err(LengthsError::NoTokenizer(dir.into()));
    }
    let mut no_rows = || Ok(vec![]);
    Ok(tokenizer::load(spec, cache, "", &mut no_rows, progress)?)
}

/// What an evaluation at several lengths scores: the first `tokens` validation tokens, the same
/// at every length, in `tokens / L` windows of each `L`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub tokens: usize,
    pub lengths: Vec<usize>,
}

impl Span {
    /// The lengths' common span: of the `available` tokens (the split, or the run's
    /// `eval_max_blocks` of its training length), the most that every length divides (a multiple
    /// of their least common multiple), so each length reads exactly the same tokens.
    pub fn common(available: usize, lengths: &[usize], split: &'static str) -> Result<Span, LengthsError> {
        let lcm = lengths.iter().fold(1usize, |a, &b| a / gcd(a, b) * b);
        if lcm > available {
            return Err(LengthsError::TooShort { split, tokens: available, lcm });
        }
        Ok(Span { tokens: available / lcm * lcm, lengths: lengths.to_vec() })
    }

    /// How the windows are laid, for headers and JSON.
    pub fn layout(&self) -> String {
        format!(
            "non-overlapping windows over the same first {} validation tokens at every length (each token scored once per length)",
            self.tokens
        )
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Refuses lengths the model cannot read (learned positions) or this machine cannot hold,
/// before any work; returns the span every length scores.
pub fn check(model: &SavedModel, cfg: &RunConfig, lengths: &[usize]) -> Result<Span, LengthsError> {
    let longest = lengths.iter().copied().max().unwrap_or(cfg.block_size);
    if let Some(positions) = model.config.learned_positions().filter(|p| longest > *p) {
        return Err(LengthsError::LearnedPositions { dir: model.dir.clone(), positions, asked: longest });
    }
    if let Some(available) = device::available_memory().filter(|_| model.gpt.device().is_cpu()) {
        // a batch per worker, side by side
        let needed = 2 * model.config.eval_bytes(window_batch(longest), longest);
        if needed > available {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(LengthsError::TooBig {
                length: longest,
                needed_gib: gib(needed),
                available_gib: gib(available),
            });
        }
    }
    let cap = cfg.eval_max_blocks.map_or(usize::MAX, |n| n as usize * cfg.block_size);
    Span::common(model.validation.len().min(cap), lengths, cfg.eval_split.name())
}

/// Scores `span` at each of its lengths (in order), calling `each` with every length's record
/// as it is done. Records carry their `context_length` when `labelled` (not the training
/// length's plain evaluation).
pub fn evaluate_lengths(
    model: &SavedModel,
    cfg: &RunConfig,
    span: &Span,
    labelled: bool,
    each: &mut dyn FnMut(&EvalRecord),
) -> Result<Vec<EvalRecord>, LengthsError> {
    let mut out = vec![];
    for &length in &span.lengths {
        let started = Instant::now();
        let windows = span.tokens / length;
        let batch = match length == cfg.block_size {
            true => cfg.eval_batch_size(),
            false => window_batch(length),
        };
        let part = evaluate(&model.gpt, &model.validation, length, batch, Some(windows), model.gpt.device())?;
        let loss = part.mean();
        let tokens = part.windows * length as u64;
        let rec = EvalRecord {
            step: model.step,
            epoch: model.epoch,
            eval_loss: loss,
            perplexity: loss.exp(),
            eval_tokens: tokens,
            eval_tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            eval_blocks: part.windows,
            validation_blocks: model.validation.num_blocks(length) as u64,
            split: cfg.eval_split.name().into(),
            context_length: labelled.then_some(length),
            position_loss: Some(part.buckets()),
        };
        each(&rec);
        out.push(rec);
    }
    Ok(out)
}

/// `extrapolation.json`: what was scored, how, and every length's loss and curve.
#[derive(Debug, Clone, Serialize)]
pub struct Extrapolation {
    pub model: String,
    pub step: u64,
    pub trained_length: usize,
    pub evaluated_on: String,
    pub layout: String,
    pub tokens: usize,
    pub lengths: Vec<LengthResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthResult {
    pub context_length: usize,
    pub eval_loss: f64,
    pub perplexity: f64,
    pub windows: u64,
    pub tokens: u64,
    pub eval_tokens_per_second: f64,
    pub position_loss: Vec<PositionBucket>,
}

impl Extrapolation {
    pub fn new(model: &SavedModel, cfg: &RunConfig, span: &Span, records: &[EvalRecord]) -> Self {
        let lengths = span
            .lengths
            .iter()
            .zip(records)
            .map(|(&context_length, r)| LengthResult {
                context_length,
                eval_loss: r.eval_loss,
                perplexity: r.perplexity,
                windows: r.eval_blocks,
                tokens: r.eval_tokens,
                eval_tokens_per_second: r.eval_tokens_per_second,
                position_loss: r.position_loss.clone().unwrap_or_default(),
            })
            .collect();
        Extrapolation {
            model: model.dir.display().to_string(),
            step: model.step,
            trained_length: model.config.n_positions,
            evaluated_on: format!(
                "{}, tokenizer {}, {} split",
                cfg.data_name(),
                cfg.tokenizer_spec(),
                cfg.eval_split.name()
            ),
            layout: span.layout(),
            tokens: span.tokens,
            lengths,
        }
    }

    /// `extrapolation.json`, `extrapolation.png` and `position_loss.png` in `dir`; their paths.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join("extrapolation.json");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::atomic_file::write(&json, text.as_bytes())?;
        let mut written = vec![json];
        for (name, png) in self.figures()? {
            let path = dir.join(name);
            crate::atomic_file::write(&path, &png.bytes)?;
            written.push(path);
        }
        Ok(written)
    }

    fn figures(&self) -> std::io::Result<Vec<(&'static str, figures::Png)>> {
        let trained = [((self.trained_length as f64).log2(), format!("trained at {}", self.trained_length))];
        let loss: Vec<(f64, f64)> =
            self.lengths.iter().map(|l| ((l.context_length as f64).log2(), l.eval_loss)).collect();
        let label = format!("eval loss ({} tokens at every length)", self.tokens);
        let lines = vec![Line { label: &label, points: loss, color: figures::BLUE, markers: true }];
        let extras = Extras { marks: trained.to_vec(), ..Default::default() };
        let title = format!("loss against context length, step {}", self.step);
        let extrapolation =
            figures::chart_with(&title, XAxis::Log2Length, "eval loss (nats per token)", lines, extras)?;
        let labels: Vec<String> = self.lengths.iter().map(|l| format!("windows of {}", l.context_length)).collect();
        let lines = self
            .lengths
            .iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (l, label))| Line {
                label,
                points: l.position_loss.iter().map(|b| ((b.from + b.to) as f64 / 2.0, b.loss)).collect(),
                color: figures::PALETTE[i % figures::PALETTE.len()],
                markers: false,
            })
            .collect();
        let marks = vec![(self.trained_length as f64, format!("trained at {}", self.trained_length))];
        let title = format!("loss by position in the window, step {}", self.step);
        let positions = figures::chart_with(
            &title,
            XAxis::Position,
            "eval loss (nats per token)",
            lines,
            Extras { marks, ..Default::default() },
        )?;
        Ok(vec![("extrapolation.png", extrapolation), ("position_loss.png", positions)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_span_is_a_multiple_of_every_length() {
        let s = Span::common(10_000, &[128, 256, 1024], "validation").unwrap();
        assert_eq!(s.tokens, 9 * 1024);
        assert!(s.lengths.iter().all(|l| s.tokens.is_multiple_of(*l)));
        let s = Span::common(10_000, &[96, 128], "validation").unwrap();
        assert_eq!(s.tokens, 9984, "lcm 384");
        assert!(matches!(Span::common(500, &[1024], "validation"), Err(LengthsError::TooShort { lcm: 1024, .. })));
    }
}
