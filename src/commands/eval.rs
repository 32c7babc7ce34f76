//! `difflab eval` / `--eval_only true`: the validation loss and perplexity of a saved model
//! (a checkpoint-N dir, a final output_dir, or any HF GPT-2 layout dir).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use super::BadInput;
use crate::config::{reconcile, Resolved, RunConfig};
use crate::data::prepare::default_cache_dir;
use crate::data::{prepare_validation, tokenizer, Progress, Tokenizer, TokenizerSpec};
use crate::events::{EvalRecord, Event};
use crate::model::hf::load_pretrained;
use crate::model::Trainable;
use crate::sinks::human::{describe, StderrLog};
use crate::sinks::Sink;
use crate::train::checkpoint::{TrainerState, RUN_CONFIG, TOKENIZER, TRAINER_STATE};
use crate::train::run::data_config;
use crate::train::{device, evaluate::evaluate};

/// The checkpoint's own tokenizer.json when it carries one, else the configured tokenizer
/// (`gpt2` for an HF GPT-2 directory).
fn tokenizer_for(dir: &Path, spec: &TokenizerSpec, cache: &Path) -> anyhow::Result<Tokenizer> {
    let own = dir.join(TOKENIZER);
    if own.is_file() {
        return Ok(Tokenizer::from_file(&own.display().to_string(), &own)?);
    }
    if matches!(spec, TokenizerSpec::Bpe(_)) {
        return Err(BadInput(format!("{} has no tokenizer.json and a bpe:N tokenizer cannot be rebuilt for it; pass --tokenizer gpt2 or a tokenizer.json path", dir.display())).into());
    }
    let mut no_rows = || Ok(vec![]);
    Ok(tokenizer::load(spec, cache, "", &mut no_rows, &|p: Progress| report(&p))?)
}

fn report(p: &Progress) {
    let _ = StderrLog::new().handle(&Event::Prepare(crate::events::PrepareProgress {
        stage: p.stage.clone(),
        done: p.done,
        total: p.total,
        unit: p.unit,
    }));
}

/// The configuration an evaluation uses: the run's own saved settings (data, tokenizer, block
/// size, eval blocks, batch) when the directory is difflab's, with the flags and preset given
/// on top. Returns it and where it came from, naming each setting a flag changed.
fn eval_config(resolved: &Resolved, dir: &Path) -> anyhow::Result<(RunConfig, String)> {
    let saved_path = dir.join(RUN_CONFIG);
    let Ok(text) = std::fs::read_to_string(&saved_path) else {
        return Ok((resolved.config.clone(), "the flags (no difflab_config.json in the directory)".into()));
    };
    let bad = |e: String| {
        BadInput(format!("{} is not valid ({e}); pass --dataset, --tokenizer and --block_size", saved_path.display()))
    };
    let saved = match serde_json::from_str::<serde_json::Value>(&text).map_err(|e| bad(e.to_string()))? {
        serde_json::Value::Object(m) => m,
        other => return Err(bad(format!("it holds {other}, not settings")).into()),
    };
    // an evaluation may score a run on anything asked for: every explicit flag counts
    let reconciled = reconcile(&saved, resolved, |_| true).map_err(|e| bad(e.to_string()))?;
    let origin = if reconciled.overridden.is_empty() {
        "the run's own settings".to_string()
    } else {
        format!("the run's own settings, {} from the flags", reconciled.overridden.join(", "))
    };
    Ok((reconciled.config, origin))
}

pub fn run(resolved: &Resolved) -> anyhow::Result<ExitCode> {
    super::print_warnings(&resolved.warnings);
    let dir = PathBuf::from(resolved.config.checkpoint.clone().unwrap_or_else(|| resolved.config.output_dir.clone()));
    super::model_dir(&dir)?;
    let (cfg, origin) = eval_config(resolved, &dir)?;
    let cfg = &cfg;
    let placement = device::placement(cfg, 1)?;
    let device = &placement.device;
    let (model_cfg, weights) = load_pretrained(&dir, device)?;
    let cache = default_cache_dir();
    let tokenizer = tokenizer_for(&dir, &cfg.tokenizer_spec(), &cache)?;
    if tokenizer.vocab_size() > model_cfg.vocab_size {
        return Err(BadInput(format!(
            "the tokenizer has {} tokens but the model {} only {}; pass the tokenizer it was trained with (--tokenizer)",
            tokenizer.vocab_size(),
            dir.display(),
            model_cfg.vocab_size
        ))
        .into());
    }
    let (stream, notes) = prepare_validation(&data_config(cfg, &cache), &tokenizer, &|p| report(&p))?;
    for n in notes {
        eprintln!("[info] {n}");
    }
    let block_size = cfg.block_size.min(model_cfg.n_positions);
    if block_size < cfg.block_size {
        eprintln!(
            "[info] block_size {} is longer than the model's n_positions; evaluating in blocks of {block_size}",
            cfg.block_size
        );
    }
    // the step the model is at: its trainer_state.json (checkpoints and finished runs have one)
    let state: Option<TrainerState> =
        std::fs::read_to_string(dir.join(TRAINER_STATE)).ok().and_then(|t| serde_json::from_str(&t).ok());
    let validation_blocks = stream.num_blocks(block_size);
    let max = cfg.eval_max_blocks.map(|n| n as usize);
    let blocks = max.map_or(validation_blocks, |m| m.min(validation_blocks));
    let data = cfg.data_name();
    eprintln!(
        "[eval] {} at step {}: {data}, {} split, {blocks} of {validation_blocks} blocks of {block_size} tokens, tokenizer {} ({origin})",
        dir.display(),
        state.as_ref().map_or("unknown (no trainer_state.json)".to_string(), |s| s.global_step.to_string()),
        cfg.eval_split.name(),
        cfg.tokenizer_spec(),
    );
    let gpt = Trainable::new(&model_cfg, weights, &placement)?.detached()?;
    let started = Instant::now();
    let (loss, predictions) = evaluate(
        &gpt,
        &stream,
        block_size,
        crate::config::eval_batch_size(cfg.micro_batch_size, block_size),
        max,
        device,
    )
    .with_context(|| format!("evaluating {}", dir.display()))?;
    if predictions == 0 {
        return Err(BadInput(format!(
            "the {} split has fewer than {block_size} tokens: lower --block_size",
            cfg.eval_split.name()
        ))
        .into());
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = predictions + predictions / (block_size as u64 - 1);
    let event = Event::Evaluate(EvalRecord {
        step: state.as_ref().map_or(0, |s| s.global_step),
        epoch: state.as_ref().map_or(0.0, |s| s.epoch),
        eval_loss: loss,
        perplexity: loss.exp(),
        eval_tokens: tokens,
        eval_tokens_per_second: tokens as f64 / secs.max(1e-9),
        eval_blocks: blocks as u64,
        validation_blocks: validation_blocks as u64,
        split: cfg.eval_split.name().into(),
    });
    println!("{}", event.to_json_line());
    if let Some(line) = describe(&event) {
        eprintln!("{line} | {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
