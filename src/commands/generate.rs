//! `difflab generate`: continue a prompt with a saved model, with the tokenizer saved beside
//! it, streaming the text to stdout and the speed to stderr.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;

use super::BadInput;
use crate::data::Tokenizer;
use crate::model::generate::{generate, Sampling};
use crate::model::hf::load_pretrained;
use crate::model::Trainable;
use crate::train::checkpoint::{TrainerState, TRAINER_STATE};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateArgs {
    pub checkpoint: std::path::PathBuf,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// The most tokens one `generate` call draws: the context slides past the model's window, so
/// memory stays flat, but a million tokens would run for hours without a word.
pub const MAX_NEW_TOKENS: usize = 100_000;

pub fn run(args: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.checkpoint;
    let s = &args.sampling;
    if args.max_new_tokens > MAX_NEW_TOKENS {
        return Err(BadInput(format!(
            "--max_new_tokens {}: at most {MAX_NEW_TOKENS} per call (the context slides past the model's window, so more only takes longer); give a smaller number",
            args.max_new_tokens
        ))
        .into());
    }
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        return Err(BadInput(format!("--temperature {}: must be 0 (greedy) or more", s.temperature)).into());
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(BadInput(format!("--top_p {}: must be in (0, 1]", s.top_p)).into());
    }
    super::model_dir(dir)?;
    let tokenizer = checkpoint_tokenizer(dir)?;
    let (cfg, weights) = load_pretrained(dir, &Device::Cpu)?;
    let mut prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        // GPT-2's convention: an empty prompt starts from <|endoftext|>
        prompt.extend(tokenizer.end_of_text_id());
    }
    if prompt.is_empty() {
        return Err(BadInput(
            "the prompt is empty and the tokenizer has no <|endoftext|> to start from; give --prompt TEXT".into(),
        )
        .into());
    }
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(BadInput(format!(
            "the prompt's token {bad} is outside the model's vocabulary of {}: {}/tokenizer.json is not the model's tokenizer",
            cfg.vocab_size,
            dir.display()
        ))
        .into());
    }
    let gpt = Trainable::on_weights(&cfg, weights)?.detached()?;
    let step: Option<u64> = std::fs::read_to_string(dir.join(TRAINER_STATE))
        .ok()
        .and_then(|t| serde_json::from_str::<TrainerState>(&t).ok())
        .map(|s| s.global_step);
    let how = if s.temperature == 0.0 {
        "greedy".to_string()
    } else {
        format!("temperature {}, top-k {}, top-p {}, seed {}", s.temperature, s.top_k, s.top_p, s.seed)
    };
    eprintln!(
        "[generate] {} ({}, step {}), {} prompt tokens, up to {} new, {how}, KV cache on cpu (window {} tokens: past it the context slides)",
        dir.display(),
        cfg.variant_name(),
        step.map_or("unknown".into(), |s| s.to_string()),
        prompt.len(),
        args.max_new_tokens,
        cfg.n_positions
    );
    let mut out = std::io::stdout().lock();
    write!(out, "{}", args.prompt)?;
    // decode everything drawn so far and print what is new: a byte-level BPE token can be
    // half of a character, which only the next token completes
    let (mut drawn, mut shown) = (Vec::new(), 0usize);
    let started = Instant::now();
    let mut first_token: Option<f64> = None;
    let new = generate(&gpt, &prompt, args.max_new_tokens, s, tokenizer.end_of_text_id(), &mut |id| {
        first_token.get_or_insert(started.elapsed().as_secs_f64());
        drawn.push(id);
        if let Ok(text) = tokenizer.decode(&drawn) {
            if let Some(tail) = text.get(shown..).filter(|t| !t.contains('\u{fffd}')) {
                let _ = write!(out, "{tail}");
                let _ = out.flush();
                shown = text.len();
            }
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    writeln!(out)?;
    // tokens/s of the cached steps: the first token also pays for the prompt
    let steady = match (new.len(), first_token) {
        (n, Some(t0)) if n > 1 => format!("{:.0} tokens/s after the first", (n - 1) as f64 / (secs - t0).max(1e-9)),
        _ => "one token".into(),
    };
    eprintln!(
        "[generate] {} tokens in {secs:.2}s ({:.0} tokens/s overall, {steady}; prompt + first token {:.3}s)",
        new.len(),
        new.len() as f64 / secs.max(1e-9),
        first_token.unwrap_or(secs)
    );
    Ok(ExitCode::SUCCESS)
}

fn checkpoint_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(BadInput(format!(
            "{} has no tokenizer.json: generate needs the tokenizer the model was trained with (difflab saves it in every checkpoint)",
            dir.display()
        ))
        .into());
    }
    Ok(Tokenizer::from_file(&path.display().to_string(), &path)?)
}
