//! The four variants against the tensors of an independent PyTorch implementation
//! (../shared/golden, see its README): forward, loss, diff norms, gradients, three AdamW steps.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use difflab::dist::World;
use difflab::model::diagnostics::norm_stats;
use difflab::model::gpt::next_token_loss;
use difflab::model::hf::load_pretrained;
use difflab::model::Trainable;
use difflab::optim::{grads, AdamW, AdamWConfig};
use difflab::train::micro::MicroBatch;
use difflab::train::step::{gradients, Recipe};

fn reference(variant: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_dir(variant).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn reference_json(variant: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(golden_dir(variant).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn forward_logits_hidden_and_loss_match() {
    for variant in VARIANTS {
        let (cfg, weights) = load_pretrained(&golden_dir(variant).join("model"), &Device::Cpu).unwrap();
        let model = Trainable::on_weights(&cfg, weights).unwrap().detached().unwrap();
        let r = reference(variant);
        let ids = &r["input_ids"];
        let out = model.forward(ids, None).unwrap();
        assert_close(&format!("{variant} logits"), &out.logits, &r["logits"], 1e-4, 0.0);
        assert_close(&format!("{variant} hidden_ln_f"), &out.hidden, &r["hidden_ln_f"], 1e-4, 0.0);
        // targets are the inputs shifted left with the last column ignored: next-token loss
        let loss = next_token_loss(&out.logits, ids).unwrap().to_scalar::<f32>().unwrap();
        let want = r["loss"].to_scalar::<f32>().unwrap();
        assert!((loss - want).abs() < 1e-5, "{variant} loss {loss} vs {want}");
        // the training path (fused head + loss, no logits) gives the same
        let fused = model.next_token_loss(&out.hidden, ids).unwrap().to_scalar::<f32>().unwrap();
        assert!((fused - want).abs() < 1e-5, "{variant} fused loss {fused} vs {want}");
    }
}

#[test]
fn diff_norms_stats_and_histogram_match() {
    for variant in ["rope0_diff1", "rope1_diff1"] {
        let (cfg, weights) = load_pretrained(&golden_dir(variant).join("model"), &Device::Cpu).unwrap();
        let model = Trainable::on_weights(&cfg, weights).unwrap().detached().unwrap();
        let r = reference(variant);
        let out = model.forward(&r["input_ids"], None).unwrap();
        let norms = out.diff_norms.expect("differential variant reports diff norms");
        assert_close(&format!("{variant} diff_norms"), &norms, &r["diff_norms"], 1e-5, 0.0);
        let stats = norm_stats(&to_vec(&norms), 20).unwrap();
        let want = &reference_json(variant)["diff_norm_stats"];
        assert_eq!(stats.count as u64, want["count"].as_u64().unwrap());
        for key in ["mean", "std", "min", "max"] {
            let got = match key {
                "mean" => stats.mean,
                "std" => stats.std,
                "min" => stats.min,
                _ => stats.max,
            };
            assert!((got - want[key].as_f64().unwrap()).abs() < 1e-5, "{variant} {key}: {got} vs {}", want[key]);
        }
        let counts: Vec<u64> = want["hist_counts"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(stats.hist_counts, counts, "{variant} histogram");
        let edges: Vec<f64> = want["hist_edges"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (g, w) in stats.hist_edges.iter().zip(&edges) {
            assert!((g - w).abs() < 1e-6, "{variant} edge {g} vs {w}");
        }
    }
    // baselines report no diff norms
    let (cfg, weights) = load_pretrained(&golden_dir("rope1_diff0").join("model"), &Device::Cpu).unwrap();
    let model = Trainable::on_weights(&cfg, weights).unwrap().detached().unwrap();
    let out = model.forward(&reference("rope1_diff0")["input_ids"], None).unwrap();
    assert!(out.diff_norms.is_none());
}

/// `x = batches[s, :, :-1]`, `y = batches[s, :, 1:]`.
fn train_batch(variant: &str, step: usize) -> (Tensor, Tensor) {
    let b =
        candle_core::safetensors::load(golden_dir(variant).join("train_batches.safetensors"), &Device::Cpu).unwrap();
    let batch = b["batches"].i(step).unwrap(); // (B, T+1)
    let t = batch.dim(1).unwrap() - 1;
    (batch.narrow(1, 0, t).unwrap(), batch.narrow(1, 1, t).unwrap())
}

/// The trainer's step (on the CPU in f32: the written-out forward and backward).
fn step_loss_and_grads(model: &Trainable, x: &Tensor, y: &Tensor) -> (f32, BTreeMap<String, Tensor>) {
    assert_eq!(model.placement().engine, difflab::engine::Engine::CpuStep);
    let world = World::single();
    let recipe = Recipe {
        placement: model.placement(),
        world: &*world,
        micro_batches: 1,
        checkpointing: false,
        dropout: 0.0,
        seed: 0,
        grad_wire: difflab::dist::Wire::F32,
        grad_overlap: false,
        bucket_bytes: difflab::dist::BUCKET_BYTES,
    };
    let g = gradients(model, &recipe, 0, &[(0, MicroBatch { ids: x, targets: Some(y) })], &mut || {}).unwrap();
    (g.loss as f32, g.grads)
}

/// candle's autograd through the model's fused ops.
fn autograd_loss_and_grads(model: &Trainable, x: &Tensor, y: &Tensor) -> (f32, BTreeMap<String, Tensor>) {
    let (hidden, _) = model.gpt.forward_hidden(x, None).unwrap();
    let loss = model.gpt.loss(&hidden, y).unwrap();
    let value = loss.to_scalar::<f32>().unwrap();
    (value, model.named_grads(loss.backward().unwrap()))
}

#[test]
fn gradients_of_step0_match() {
    for variant in VARIANTS {
        let (cfg, weights) = load_pretrained(&golden_dir(variant).join("model"), &Device::Cpu).unwrap();
        let model = Trainable::on_weights(&cfg, weights).unwrap();
        let (x, y) = train_batch(variant, 0);
        let want =
            candle_core::safetensors::load(golden_dir(variant).join("grads_step0.safetensors"), &Device::Cpu).unwrap();
        // both the trainer's step and the autograd path meet the reference
        for (path, (_, grads)) in
            [("step", step_loss_and_grads(&model, &x, &y)), ("autograd", autograd_loss_and_grads(&model, &x, &y))]
        {
            assert_eq!(grads.len(), want.len(), "{variant} {path}: every parameter has a gradient");
            for (name, g) in &grads {
                let w = want.get(name).unwrap_or_else(|| panic!("{variant}: no golden gradient for {name}"));
                assert_close(&format!("{variant} {path} grad {name}"), g, w, 1e-5, 1e-3);
            }
        }
    }
}

#[test]
fn three_adamw_steps_match() {
    for variant in VARIANTS {
        let dir = golden_dir(variant);
        let (cfg, weights) = load_pretrained(&dir.join("model"), &Device::Cpu).unwrap();
        let model = Trainable::on_weights(&cfg, weights).unwrap();
        let log: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("train_log.json")).unwrap()).unwrap();
        let adam = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(&model.vars, adam, |_, v| v.rank() >= 2).unwrap();
        for (s, want) in log["steps"].as_array().unwrap().iter().enumerate() {
            let (x, y) = train_batch(variant, s);
            let (loss, g) = step_loss_and_grads(&model, &x, &y);
            let norm = grads::global_norm(&g).unwrap();
            let want_loss = want["loss"].as_f64().unwrap();
            let want_norm = want["grad_norm_before_clip"].as_f64().unwrap();
            assert!((loss as f64 - want_loss).abs() < 1e-5, "{variant} step {s} loss {loss} vs {want_loss}");
            assert!((norm - want_norm).abs() < 1e-5, "{variant} step {s} grad norm {norm} vs {want_norm}");
            opt.step(&g, 1e-3, grads::clip_factor(norm, 1.0)).unwrap();
        }
        let (_, after) = load_pretrained(&dir.join("model_after_train"), &Device::Cpu).unwrap();
        for (name, w) in model.weights() {
            assert_close(&format!("{variant} weight {name} after 3 steps"), &w, &after[&name], 5e-5, 0.0);
        }
    }
}

/// `difflab golden-check` (the GPU host's check) passes on the CPU in f32, with the CPU's bf16
/// path (bf16 matmuls on AVX512-BF16, what `--device cpu --dtype bf16` trains with), and with
/// the composed ops computing in bf16 (the arithmetic of the CUDA bf16 path, run on the CPU).
#[test]
fn golden_check_passes_in_f32_and_bf16() {
    use difflab::commands::golden;
    use difflab::engine::{Engine, Matmuls, Placement};
    let golden_dir = common::shared_dir().join("golden");
    let mut placements = vec![
        Placement::of(&Device::Cpu, candle_core::DType::F32),
        Placement::of(&Device::Cpu, candle_core::DType::BF16),
    ];
    match golden::placement(&Device::Cpu, candle_core::DType::BF16) {
        Ok(p) => {
            // the CPU's bf16 path: the written-out step with bf16 matmuls, not f32 under a bf16 name
            assert_eq!((p.engine, p.matmuls, p.compute_dtype()), (Engine::CpuStep, Matmuls::Bf16, "bf16"));
            placements.push(p)
        }
        Err(e) => {
            assert!(!difflab::engine::cpu::bf16::available());
            eprintln!("CPU bf16 path not checked: {e}");
        }
    }
    for placement in placements {
        let (reports, tolerances) = golden::check(&golden_dir, &placement).unwrap();
        assert_eq!(reports.len(), 4);
        for r in &reports {
            assert!(r.pass, "{} {:?} {r:?}", placement.path(), placement.dtype);
        }
        // the bf16 paths really round: their errors are far above f32's, within bf16's bounds
        if placement.compute_dtype() == "bf16" {
            assert!(tolerances.logits > 1e-3 && reports.iter().all(|r| r.logits_max_abs > 1e-4), "{reports:?}");
        }
    }
}

/// A writable copy of one golden variant, alone in a temporary golden directory.
fn golden_copy(variant: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = golden_dir(variant);
    let dst = tmp.path().join(variant);
    for sub in ["", "model", "model_after_train"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap().flatten() {
            if entry.path().is_file() {
                std::fs::copy(entry.path(), dst.join(sub).join(entry.file_name())).unwrap();
            }
        }
    }
    (tmp, dst)
}

fn check_f32(golden: &std::path::Path) -> difflab::commands::golden::VariantReport {
    let placement = difflab::engine::Placement::of(&Device::Cpu, candle_core::DType::F32);
    let (reports, _) = difflab::commands::golden::check(golden, &placement).unwrap();
    assert_eq!(reports.len(), 1);
    reports.into_iter().next().unwrap()
}

/// ... and fails when the model is wrong: a copy of one variant whose start weights are nudged.
#[test]
fn golden_check_fails_on_perturbed_weights() {
    let (tmp, dst) = golden_copy("rope1_diff1");
    let weights_path = dst.join("model").join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
    let wte = weights["transformer.wte.weight"].affine(1.0, 0.01).unwrap();
    weights.insert("transformer.wte.weight".into(), wte);
    candle_core::safetensors::save(&weights, &weights_path).unwrap();
    let report = check_f32(tmp.path());
    assert!(!report.pass, "{report:?}");
    assert!(report.logits_max_abs > 1e-4);
}

/// A NaN cannot pass: one NaN in one reference gradient fails the check (a `max` that drops
/// NaN, or a `>` that is false for it, would let it through).
#[test]
fn golden_check_fails_on_a_nan_gradient() {
    let (tmp, dst) = golden_copy("rope0_diff1");
    let path = dst.join("grads_step0.safetensors");
    let mut grads = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let g = &grads["transformer.ln_f.bias"];
    let mut v: Vec<f32> = g.to_vec1().unwrap();
    v[3] = f32::NAN;
    grads.insert("transformer.ln_f.bias".into(), Tensor::new(v, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&grads, &path).unwrap();
    let report = check_f32(tmp.path());
    assert!(!report.pass, "{report:?}");
    assert!(report.grad_rel_worst.is_nan() && report.grad_worst_tensor == "transformer.ln_f.bias", "{report:?}");
}

/// ... and fails when our gradient set differs from the reference's (a gradient missing).
#[test]
fn golden_check_fails_when_the_gradient_names_differ() {
    let (tmp, dst) = golden_copy("rope0_diff0");
    let path = dst.join("grads_step0.safetensors");
    let mut grads = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    grads.insert("transformer.h.9.extra.weight".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&grads, &path).unwrap();
    let report = check_f32(tmp.path());
    assert!(!report.pass && report.problems.iter().any(|p| p.contains("gradient names differ")), "{report:?}");
}

/// ... and fails when the logged gradient norm before clipping is not ours.
#[test]
fn golden_check_compares_the_logged_gradient_norm() {
    let (tmp, dst) = golden_copy("rope1_diff0");
    let path = dst.join("train_log.json");
    let mut log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let norm = log["steps"][1]["grad_norm_before_clip"].as_f64().unwrap();
    log["steps"][1]["grad_norm_before_clip"] = (norm * 1.01).into();
    std::fs::write(&path, log.to_string()).unwrap();
    let report = check_f32(tmp.path());
    assert!(!report.pass && report.grad_norm_rel_worst > 5e-3, "{report:?}");
}

/// The number of optimizer steps comes from the reference's log: a golden set extended to five
/// steps (two more batches, the weights after five AdamW steps, five log entries) passes, and
/// fails if its log is cut back to three steps (the weights after no longer match).
#[test]
fn golden_check_runs_as_many_steps_as_the_log_lists() {
    use difflab::commands::golden::VariantReport;
    let (tmp, dst) = golden_copy("rope1_diff1");
    let batches_path = dst.join("train_batches.safetensors");
    let mut batches = candle_core::safetensors::load(&batches_path, &Device::Cpu).unwrap();
    let three = batches["batches"].clone();
    let five = Tensor::cat(&[&three, &three.narrow(0, 0, 2).unwrap()], 0).unwrap();
    batches.insert("batches".into(), five.clone());
    candle_core::safetensors::save(&batches, &batches_path).unwrap();
    // five steps of the recipe, with the trainer's step (itself held to the 3-step reference above)
    let log_path = dst.join("train_log.json");
    let mut log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    let (cfg, weights) = load_pretrained(&dst.join("model"), &Device::Cpu).unwrap();
    let model = Trainable::on_weights(&cfg, weights).unwrap();
    let adam = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(&model.vars, adam, |_, v| v.rank() >= 2).unwrap();
    let mut entries = vec![];
    for s in 0..5 {
        let batch = five.i(s).unwrap();
        let t = batch.dim(1).unwrap() - 1;
        let (x, y) = (batch.narrow(1, 0, t).unwrap(), batch.narrow(1, 1, t).unwrap());
        let (loss, grads) = step_loss_and_grads(&model, &x, &y);
        let update = difflab::optim::step(&mut opt, &grads, 1e-3, 1.0).unwrap();
        entries.push(serde_json::json!({"step": s, "loss": loss, "grad_norm_before_clip": update.grad_norm}));
    }
    difflab::model::hf::save_pretrained(&dst.join("model_after_train"), &cfg, &model.weights(), None).unwrap();
    log["steps"] = entries.clone().into();
    std::fs::write(&log_path, log.to_string()).unwrap();
    let report: VariantReport = check_f32(tmp.path());
    assert!(report.pass && report.steps == 5, "{report:?}");
    log["steps"] = entries[..3].to_vec().into();
    std::fs::write(&log_path, log.to_string()).unwrap();
    let report = check_f32(tmp.path());
    assert!(!report.pass && report.steps == 3, "three steps cannot reach the weights after five: {report:?}");
}
