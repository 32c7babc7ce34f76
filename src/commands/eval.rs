//! `difflab eval` / `--eval_only true`: the validation loss and perplexity of a saved model
//! (a checkpoint-N dir, a final output_dir, or any HF GPT-2 layout dir), at the training length
//! or, with `--context_lengths`, at each length asked for, with the loss by position.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::BadInput;
use crate::config::{reconcile, Resolved, RunConfig};
use crate::data::Progress;
use crate::events::Event;
use crate::research::lengths::{self, Extrapolation};
use crate::sinks::human::{describe, StderrLog};
use crate::sinks::Sink;
use crate::train::checkpoint::RUN_CONFIG;

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

pub fn run(resolved: &Resolved, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    super::print_warnings(&resolved.warnings);
    let dir = PathBuf::from(resolved.config.checkpoint.clone().unwrap_or_else(|| resolved.config.output_dir.clone()));
    super::model_dir(&dir)?;
    let (cfg, origin) = eval_config(resolved, &dir)?;
    let model = lengths::open(&dir, &cfg, &|p| report(&p))?;
    for n in &model.notes {
        eprintln!("[info] {n}");
    }
    let asked = cfg.context_length_list();
    let labelled = !asked.is_empty();
    let lengths = match labelled {
        true => asked,
        // the training length: an HF model's own window when it is shorter than block_size
        false => match model.config.learned_positions().filter(|p| *p < cfg.block_size) {
            Some(positions) => {
                eprintln!("[info] block_size {} is longer than the model's {positions} positions; evaluating in blocks of {positions}", cfg.block_size);
                vec![positions]
            }
            None => vec![cfg.block_size],
        },
    };
    let span = lengths::check(&model, &cfg, &lengths)?;
    let scored = match labelled {
        true => {
            let windows: Vec<String> = span.lengths.iter().map(|l| format!("{} of {l}", span.tokens / l)).collect();
            format!("{} (windows: {})", span.layout(), windows.join(", "))
        }
        false => {
            let length = span.lengths[0];
            format!("{} of {} blocks of {length} tokens", span.tokens / length, model.validation.num_blocks(length))
        }
    };
    eprintln!(
        "[eval] {} at step {}: {}, {} split, {scored}, tokenizer {} ({origin}) | {}",
        dir.display(),
        model.step,
        cfg.data_name(),
        cfg.eval_split.name(),
        cfg.tokenizer_spec(),
        model.path,
    );
    let records = lengths::evaluate_lengths(&model, &cfg, &span, labelled, &mut |rec| {
        let event = Event::Evaluate(rec.clone());
        println!("{}", event.to_json_line());
        if let Some(line) = describe(&event) {
            eprintln!("{line} | {}", dir.display());
        }
    })
    .with_context(|| format!("evaluating {}", dir.display()))?;
    if labelled {
        let folder = out.map_or_else(|| run_folder(&dir), Path::to_path_buf);
        let written = Extrapolation::new(&model, &cfg, &span, &records)
            .write(&folder)
            .with_context(|| format!("writing the extrapolation figures into {}", folder.display()))?;
        for path in written {
            eprintln!("[eval] wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder of the run a model belongs to: a checkpoint's parent, else the folder itself.
fn run_folder(dir: &Path) -> PathBuf {
    let is_checkpoint = dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"));
    match dir.parent().filter(|_| is_checkpoint) {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => dir.to_path_buf(),
    }
}
