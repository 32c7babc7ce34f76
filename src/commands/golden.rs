//! `difflab golden-check`: the four variants against `shared/golden` on a chosen device and
//! dtype, as a report of worst errors. It is how a GPU host checks the CUDA path with nothing
//! but the binary and the golden directory (`scripts/gpu-check.sh`); the tests run it on the CPU.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Serialize;

use crate::dist::{Wire, World};
use crate::engine::Placement;
use crate::model::gpt::next_token_loss;
use crate::model::hf::load_pretrained;
use crate::model::Trainable;
use crate::optim::{AdamW, AdamWConfig};
use crate::train::micro::MicroBatch;
use crate::train::step;

#[derive(Debug, Clone, Serialize)]
pub struct Tolerances {
    pub logits: f64,
    pub loss: f64,
    /// Per tensor: `||g - g_ref|| / ||g_ref||`.
    pub grad_rel: f64,
    pub weights_after: f64,
}

impl Tolerances {
    /// f32: the golden README's (grads as a relative norm: 1e-3). bf16: what 8 bits of mantissa
    /// allow; weights after three AdamW steps at lr 1e-3 get 6e-3 because Adam normalizes each
    /// update, so a near-zero gradient whose sign flips in bf16 moves its weight by up to 2·lr
    /// per step whatever the gradient error's size.
    pub fn for_placement(placement: &Placement) -> Self {
        if placement.compute_dtype() == "bf16" {
            Self { logits: 0.05, loss: 5e-3, grad_rel: 0.05, weights_after: 6e-3 }
        } else {
            Self { logits: 1e-4, loss: 1e-5, grad_rel: 1e-3, weights_after: 5e-5 }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub variant: String,
    pub logits_max_abs: f64,
    pub loss_abs: f64,
    pub grad_rel_worst: f64,
    pub grad_worst_tensor: String,
    /// Optimizer steps taken: as many as the reference's log lists.
    pub steps: usize,
    pub train_loss_abs_worst: f64,
    /// `|norm - norm_ref| / norm_ref` of the gradient norm before clipping, worst over the steps.
    pub grad_norm_rel_worst: f64,
    pub weights_after_max_abs: f64,
    /// Why the variant failed, when it did.
    pub problems: Vec<String>,
    pub pass: bool,
}

/// The larger of two errors, where NaN (a comparison that cannot be made) wins: `f64::max`
/// would drop it and let a NaN pass.
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn max_abs(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    Ok(host(a)?.iter().zip(host(b)?).map(|(x, y)| (x - y).abs() as f64).fold(0.0, worse))
}

fn rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (host(a)?, host(b)?);
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    Ok(diff / norm.max(1e-12))
}

/// Fails unless `value` is finite and within `tolerance`.
fn within(problems: &mut Vec<String>, what: &str, value: f64, tolerance: f64) {
    if !(value.is_finite() && value <= tolerance) {
        problems.push(format!("{what}: {value:e} (tolerance {tolerance:e})"));
    }
}

/// The reference's training recipe, as its `train_log.json` states it.
struct Recipe {
    log: serde_json::Value,
    lr: f64,
    max_norm: f64,
    adam: AdamWConfig,
    /// As many optimizer steps as the log lists.
    steps: usize,
}

fn reference_recipe(dir: &Path, batches: usize) -> anyhow::Result<Recipe> {
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("train_log.json"))?)?;
    let num = |v: &serde_json::Value, what: &str| {
        v.as_f64().ok_or_else(|| anyhow::anyhow!("{}: train_log.json has no number `{what}`", dir.display()))
    };
    let (lr, max_norm) = (num(&log["lr"], "lr")?, num(&log["grad_clip"], "grad_clip")?);
    let adam = AdamWConfig {
        beta1: num(&log["betas"][0], "betas")?,
        beta2: num(&log["betas"][1], "betas")?,
        eps: num(&log["eps"], "eps")?,
        weight_decay: num(&log["weight_decay"], "weight_decay")?,
    };
    let steps = log["steps"].as_array().map_or(0, Vec::len);
    if steps == 0 || steps > batches {
        anyhow::bail!("{}: train_log.json lists {steps} steps for {batches} batches", dir.display());
    }
    Ok(Recipe { log, lr, max_norm, adam, steps })
}

pub fn check_variant(dir: &Path, placement: &Placement) -> anyhow::Result<VariantReport> {
    let tol = Tolerances::for_placement(placement);
    let device = &placement.device;
    let load = |f: &str| -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
        Ok(candle_core::safetensors::load(dir.join(f), device)?)
    };
    let (cfg, weights) = load_pretrained(&dir.join("model"), device)?;
    let r = load("reference.safetensors")?;
    let model = Trainable::new(&cfg, weights, placement)?;
    let out = model.detached()?.forward(&r["input_ids"], None)?;
    let logits_max_abs = max_abs(&out.logits, &r["logits"])?;
    let scalar = |t: &Tensor| -> anyhow::Result<f64> {
        Ok(t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_scalar::<f64>()?)
    };
    let loss_abs = (scalar(&next_token_loss(&out.logits, &r["input_ids"])?)? - scalar(&r["loss"])?).abs();

    // the reference's training steps, as many as its log lists, with the recipe it states
    let batches = load("train_batches.safetensors")?;
    let want_grads = load("grads_step0.safetensors")?;
    let Recipe { log, lr, max_norm, adam, steps } = reference_recipe(dir, batches["batches"].dim(0)?)?;
    let num = |v: &serde_json::Value, what: &str| {
        v.as_f64().ok_or_else(|| anyhow::anyhow!("{}: train_log.json has no number `{what}`", dir.display()))
    };
    let mut opt = AdamW::new(&model.vars, adam, |_, v| v.rank() >= 2)?;
    let world = World::single();
    let recipe = step::Recipe {
        placement,
        world: &*world,
        micro_batches: 1,
        checkpointing: false,
        dropout: 0.0,
        seed: 0,
        grad_wire: Wire::F32,
        grad_overlap: false,
        bucket_bytes: crate::dist::BUCKET_BYTES,
    };
    let mut problems = vec![];
    let (mut grad_rel_worst, mut grad_worst_tensor) = (f64::NAN, String::new());
    let (mut train_loss_abs_worst, mut grad_norm_rel_worst) = (0.0f64, 0.0f64);
    for s in 0..steps {
        let batch = batches["batches"].i(s)?;
        let t = batch.dim(1)? - 1;
        let (x, y) = (batch.narrow(1, 0, t)?, batch.narrow(1, 1, t)?);
        let g =
            step::gradients(&model, &recipe, s as u64, &[(0, MicroBatch { ids: &x, targets: Some(&y) })], &mut || {})?;
        let grads: &BTreeMap<String, Tensor> = &g.grads;
        if s == 0 {
            (grad_rel_worst, grad_worst_tensor) = compare_grads(grads, &want_grads, &mut problems)?;
        }
        let entry = &log["steps"][s];
        train_loss_abs_worst = worse(train_loss_abs_worst, (g.loss - num(&entry["loss"], "steps[].loss")?).abs());
        let update = step::apply(&mut opt, &g, lr, max_norm)?;
        let want_norm = num(&entry["grad_norm_before_clip"], "steps[].grad_norm_before_clip")?;
        grad_norm_rel_worst =
            worse(grad_norm_rel_worst, (update.grad_norm - want_norm).abs() / want_norm.abs().max(1e-12));
        if !update.applied {
            problems.push(format!("step {s}: the gradient norm is {}: no update", update.grad_norm));
        }
    }
    let (_, after) = load_pretrained(&dir.join("model_after_train"), device)?;
    let mut weights_after_max_abs = 0.0f64;
    for (name, w) in model.weights() {
        let Some(want) = after.get(&name) else {
            problems.push(format!("model_after_train has no {name}"));
            continue;
        };
        weights_after_max_abs = worse(weights_after_max_abs, max_abs(&w, want)?);
    }
    within(&mut problems, "logits max |diff|", logits_max_abs, tol.logits);
    within(&mut problems, "loss |diff|", loss_abs, tol.loss);
    within(&mut problems, &format!("gradient rel. error ({grad_worst_tensor})"), grad_rel_worst, tol.grad_rel);
    within(&mut problems, "training loss |diff|", train_loss_abs_worst, tol.loss.max(1e-5));
    // the norm is a sum over every gradient: held to the gradients' own tolerance
    within(&mut problems, "gradient norm before clipping, rel. error", grad_norm_rel_worst, tol.grad_rel);
    within(
        &mut problems,
        &format!("weights after {steps} steps, max |diff|"),
        weights_after_max_abs,
        tol.weights_after,
    );
    Ok(VariantReport {
        variant: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        logits_max_abs,
        loss_abs,
        grad_rel_worst,
        grad_worst_tensor,
        steps,
        train_loss_abs_worst,
        grad_norm_rel_worst,
        weights_after_max_abs,
        pass: problems.is_empty(),
        problems,
    })
}

/// The worst relative error of step 0's gradients against the reference's, and its tensor; a
/// difference in the names is a problem.
fn compare_grads(
    grads: &BTreeMap<String, Tensor>,
    want: &std::collections::HashMap<String, Tensor>,
    problems: &mut Vec<String>,
) -> anyhow::Result<(f64, String)> {
    let ours: Vec<&String> = grads.keys().collect();
    let mut theirs: Vec<&String> = want.keys().collect();
    theirs.sort();
    if ours != theirs {
        problems.push(format!("gradient names differ: ours {ours:?}, the reference's {theirs:?}"));
    }
    let (mut worst, mut tensor) = (0.0f64, String::new());
    for (name, grad) in grads {
        let Some(want) = want.get(name) else { continue };
        let e = rel(grad, want)?;
        if e.is_nan() || e > worst || tensor.is_empty() {
            tensor = name.clone();
        }
        worst = worse(worst, e);
    }
    Ok((worst, tensor))
}

/// The placement `golden-check --device D --dtype T` checks: bf16 on the CPU is the path
/// training takes there (bf16 matmuls in the written-out step; refused without AVX512-BF16),
/// elsewhere the model computes in `dtype` on `device`.
pub fn placement(device: &Device, dtype: DType) -> Result<Placement, crate::train::device::DeviceError> {
    match (device.is_cpu(), dtype) {
        (true, DType::BF16) => crate::train::device::cpu_bf16(0.0, 1),
        _ => Ok(Placement::of(device, dtype)),
    }
}

/// Every variant under `golden_dir`, computed on `placement`.
pub fn check(golden_dir: &Path, placement: &Placement) -> anyhow::Result<(Vec<VariantReport>, Tolerances)> {
    let mut variants: Vec<_> = std::fs::read_dir(golden_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    variants.sort();
    if variants.is_empty() {
        anyhow::bail!("{} holds no golden variants (rope*_diff*/reference.safetensors)", golden_dir.display());
    }
    let reports = variants.iter().map(|v| check_variant(v, placement)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok((reports, Tolerances::for_placement(placement)))
}
