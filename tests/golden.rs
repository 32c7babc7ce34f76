//! The four variants against the tensors of an independent PyTorch implementation
//! (../shared/golden, see its README): forward, loss, diff norms, gradients, three AdamW steps.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use difflab::model::diagnostics::norm_stats;
use difflab::model::gpt::next_token_loss;
use difflab::model::hf::load_pretrained;
use difflab::model::Trainable;
use difflab::optim::{grads, AdamW, AdamWConfig};
use difflab::train::step::{forward_backward, Accumulated, MicroBatch};

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
        let model = Trainable::new(&cfg, weights).unwrap().detached().unwrap();
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
        let model = Trainable::new(&cfg, weights).unwrap().detached().unwrap();
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
    let model = Trainable::new(&cfg, weights).unwrap().detached().unwrap();
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

/// The trainer's step (on the CPU: the written-out forward and backward).
fn step_loss_and_grads(model: &Trainable, x: &Tensor, y: &Tensor) -> (f32, BTreeMap<String, Tensor>) {
    let mut acc = Accumulated::default();
    let out = forward_backward(
        difflab::engine::Engine::CpuStep,
        model,
        &MicroBatch { ids: x, targets: Some(y) },
        1.0,
        None,
        false,
        &mut acc,
    )
    .unwrap();
    (out.loss as f32, acc.into_grads(model.gpt.config()).unwrap())
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
        let model = Trainable::new(&cfg, weights).unwrap();
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
        let model = Trainable::new(&cfg, weights).unwrap();
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

/// `difflab golden-check` (the GPU host's check) passes on the CPU in f32 and with bf16
/// compute, the mixed-precision path `--dtype bf16` trains with.
#[test]
fn golden_check_passes_in_f32_and_bf16() {
    let golden = common::shared_dir().join("golden");
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
        let (reports, _) = difflab::commands::golden::check(&golden, &Device::Cpu, dtype).unwrap();
        assert_eq!(reports.len(), 4);
        for r in &reports {
            assert!(r.pass, "{dtype:?} {r:?}");
        }
    }
}

/// ... and fails when the model is wrong: a copy of one variant whose start weights are nudged.
#[test]
fn golden_check_fails_on_perturbed_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let src = golden_dir("rope1_diff1");
    let dst = tmp.path().join("rope1_diff1");
    for sub in ["", "model", "model_after_train"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap().flatten() {
            if entry.path().is_file() {
                std::fs::copy(entry.path(), dst.join(sub).join(entry.file_name())).unwrap();
            }
        }
    }
    let weights_path = dst.join("model").join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&weights_path, &Device::Cpu).unwrap();
    let wte = weights["transformer.wte.weight"].affine(1.0, 0.01).unwrap();
    weights.insert("transformer.wte.weight".into(), wte);
    candle_core::safetensors::save(&weights, &weights_path).unwrap();
    let (reports, _) = difflab::commands::golden::check(tmp.path(), &Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(reports.len(), 1);
    assert!(!reports[0].pass, "{:?}", reports[0]);
    assert!(reports[0].logits_max_abs > 1e-4);
}
