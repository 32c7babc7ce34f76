//! `difflab logits`: a saved model's logits for given token ids (or text), as JSON, so other
//! tools can compare against them (scripts/hf_check.py compares with transformers).

use std::path::Path;
use std::process::ExitCode;

use candle_core::{Device, Tensor};

use super::BadInput;
use crate::data::Tokenizer;
use crate::model::hf::load_pretrained;
use crate::model::Trainable;

pub fn run(checkpoint: &Path, ids: Option<&str>, text: Option<&str>) -> anyhow::Result<ExitCode> {
    super::model_dir(checkpoint)?;
    let (cfg, weights) = load_pretrained(checkpoint, &Device::Cpu)?;
    let ids: Vec<u32> = match (ids, text) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim().parse::<u32>().map_err(|_| BadInput(format!("--ids: {s:?} is not a token id"))))
            .collect::<Result<_, _>>()?,
        (None, Some(text)) => {
            let path = checkpoint.join("tokenizer.json");
            Tokenizer::from_file(&path.display().to_string(), &path)?.encode(text)?
        }
        (None, None) => return Err(BadInput("give --ids 1,2,3 or --text \"...\"".into()).into()),
    };
    if ids.is_empty() || ids.len() > cfg.n_positions || ids.iter().any(|&i| i as usize >= cfg.vocab_size) {
        return Err(
            BadInput(format!("need 1..={} ids below the vocabulary size {}", cfg.n_positions, cfg.vocab_size)).into()
        );
    }
    let model = Trainable::on_weights(&cfg, weights)?.detached()?;
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?;
    let logits = model.forward(&input, None)?.logits; // (1, T, V)
    let rows: Vec<Vec<f32>> = logits.squeeze(0)?.to_vec2()?;
    println!("{}", serde_json::json!({ "ids": ids, "shape": logits.dims(), "logits": rows }));
    Ok(ExitCode::SUCCESS)
}
