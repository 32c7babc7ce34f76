//! Model and optimizer properties beyond the golden tensors: every parameter trains, a
//! finite-difference check, init statistics, accumulation, weight decay, checkpoint I/O.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use difflab::engine::{Engine, Kernels};
use difflab::model::gpt::next_token_loss;
use difflab::model::hf::{load_pretrained, save_pretrained, CheckpointError};
use difflab::model::params::{init_weights, param_specs};
use difflab::model::{GptConfig, Trainable};
use difflab::optim::{grads, AdamW, AdamWConfig};

fn tiny(rope: bool, differential: bool) -> GptConfig {
    tiny_config(61, rope, differential)
}

fn variants() -> Vec<GptConfig> {
    vec![tiny(false, false), tiny(false, true), tiny(true, false), tiny(true, true)]
}

fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    let mut x = seed;
    let ids: Vec<u32> = (0..b * t)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for cfg in variants() {
        let model = Trainable::on_weights(&cfg, init_weights(&cfg, 7, &Device::Cpu).unwrap()).unwrap();
        let ids = random_ids(2, 12, cfg.vocab_size, 1);
        let out = model.gpt.forward(&ids, None).unwrap();
        let loss = next_token_loss(&out.logits, &ids).unwrap();
        let g = model.named_grads(loss.backward().unwrap());
        assert_eq!(
            g.len(),
            model.vars.len(),
            "rope {} diff {}: a parameter got no gradient",
            cfg.rope,
            cfg.differential
        );
        // detached: an optimizer state built from a gradient must not hold the step's graph
        assert!(g.values().all(|t| !t.track_op()), "gradients carry no graph");
        for (name, grad) in &g {
            let v = to_vec(grad);
            assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
            assert!(v.iter().any(|x| *x != 0.0), "{name}: all-zero gradient (graph cut?)");
        }
    }
}

/// Central differences in f64 against autograd, on a 1-layer 16-wide model.
#[test]
fn finite_difference_gradient_check_f64() {
    for (rope, differential) in [(false, false), (true, true)] {
        let cfg = GptConfig { n_layer: 1, n_embd: 16, n_head: 2, vocab_size: 23, ..tiny(rope, differential) };
        let weights: BTreeMap<String, Tensor> = init_weights(&cfg, 3, &Device::Cpu)
            .unwrap()
            .into_iter()
            // perturb LayerNorm / biases away from 1 / 0 so every term is exercised
            .map(|(k, t)| {
                let n = t.elem_count();
                let noise: Vec<f64> = (0..n).map(|i| 0.1 * ((i as f64) * 12.9898 + n as f64).sin()).collect();
                let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
                (k, (t.to_dtype(DType::F64).unwrap() + noise).unwrap())
            })
            .collect();
        let ids = random_ids(2, 6, cfg.vocab_size, 5);
        let loss_of = |w: &BTreeMap<String, Tensor>| -> f64 {
            let m = Trainable::on_weights(&cfg, w.clone()).unwrap().detached().unwrap();
            next_token_loss(&m.forward(&ids, None).unwrap().logits, &ids).unwrap().to_scalar::<f64>().unwrap()
        };
        let model = Trainable::on_weights(&cfg, weights.clone()).unwrap();
        let loss = next_token_loss(&model.gpt.forward(&ids, None).unwrap().logits, &ids).unwrap();
        let g = model.named_grads(loss.backward().unwrap());
        let h = 1e-6;
        for (name, w) in &weights {
            let flat: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
            let analytic: Vec<f64> = g[name].flatten_all().unwrap().to_vec1().unwrap();
            // a few coordinates per tensor, spread over it
            for idx in [0, flat.len() / 3, flat.len() - 1] {
                let probe = |delta: f64| {
                    let mut f = flat.clone();
                    f[idx] += delta;
                    let mut ws = weights.clone();
                    ws.insert(name.clone(), Tensor::from_vec(f, w.shape(), &Device::Cpu).unwrap());
                    loss_of(&ws)
                };
                let numeric = (probe(h) - probe(-h)) / (2.0 * h);
                let err = (numeric - analytic[idx]).abs();
                assert!(
                    err < 1e-6 + 1e-4 * numeric.abs(),
                    "{name}[{idx}]: autograd {} vs numeric {numeric}",
                    analytic[idx]
                );
            }
        }
    }
}

#[test]
fn seeded_init_is_reproducible_and_follows_gpt2() {
    let cfg = GptConfig { n_embd: 64, n_layer: 4, vocab_size: 500, ..tiny(false, true) };
    let a = init_weights(&cfg, 42, &Device::Cpu).unwrap();
    let b = init_weights(&cfg, 42, &Device::Cpu).unwrap();
    let c = init_weights(&cfg, 43, &Device::Cpu).unwrap();
    for (name, t) in &a {
        assert_eq!(to_vec(t), to_vec(&b[name]), "{name}: same seed, same weights");
    }
    assert_ne!(to_vec(&a["transformer.wte.weight"]), to_vec(&c["transformer.wte.weight"]));
    let std_of = |t: &Tensor| {
        let v = to_vec(t);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    let proj_std = 0.02 / (2.0f32 * 4.0).sqrt();
    for (name, t) in &a {
        let v = to_vec(t);
        if name.ends_with("c_proj.weight") {
            assert!((std_of(t) - proj_std).abs() < 0.1 * proj_std, "{name} std {}", std_of(t));
        } else if name.ends_with(".weight") && t.rank() == 2 {
            assert!((std_of(t) - 0.02).abs() < 0.002, "{name} std {}", std_of(t));
        } else if name.contains("ln_") && name.ends_with("weight") {
            assert!(v.iter().all(|x| *x == 1.0), "{name} is ones");
        } else {
            assert!(v.iter().all(|x| *x == 0.0), "{name} is zeros");
        }
    }
    assert_eq!(a.len(), param_specs(&cfg).len());
}

#[test]
fn accumulating_k_micro_batches_equals_one_big_batch() {
    let cfg = tiny(true, true);
    let weights = init_weights(&cfg, 9, &Device::Cpu).unwrap();
    let ids = random_ids(4, 10, cfg.vocab_size, 11);
    let model = Trainable::on_weights(&cfg, weights).unwrap();
    let full_loss = next_token_loss(&model.gpt.forward(&ids, None).unwrap().logits, &ids).unwrap();
    let full = model.named_grads(full_loss.backward().unwrap());
    let k = 2;
    let mut acc = BTreeMap::new();
    for i in 0..k {
        let mb = ids.narrow(0, i * 2, 2).unwrap();
        let loss = (next_token_loss(&model.gpt.forward(&mb, None).unwrap().logits, &mb).unwrap() / k as f64).unwrap();
        grads::accumulate(&mut acc, model.named_grads(loss.backward().unwrap())).unwrap();
    }
    for (name, g) in &full {
        assert_close(&format!("accumulated {name}"), &acc[name], g, 1e-6, 1e-4);
    }
}

#[test]
fn weight_decay_touches_only_two_dimensional_parameters() {
    let cfg = tiny(false, false);
    let model = Trainable::on_weights(&cfg, init_weights(&cfg, 1, &Device::Cpu).unwrap()).unwrap();
    let before = model.weights().into_iter().map(|(k, t)| (k, to_vec(&t))).collect::<BTreeMap<_, _>>();
    let adam = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let mut opt = AdamW::new(&model.vars, adam, |_, v| v.rank() >= 2).unwrap();
    // zero gradients: the Adam term vanishes, leaving only the decay
    let zeros: BTreeMap<String, Tensor> =
        model.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().zeros_like().unwrap())).collect();
    let lr = 0.5;
    opt.step(&zeros, lr, 1.0).unwrap();
    for (name, t) in model.weights() {
        let after = to_vec(&t);
        let factor = if t.rank() >= 2 { 1.0 - lr as f32 * 0.1 } else { 1.0 };
        for (a, b) in after.iter().zip(&before[&name]) {
            assert!((a - b * factor).abs() < 1e-7, "{name}: {a} vs {b} * {factor}");
        }
    }
}

#[test]
fn save_then_load_gives_identical_logits_and_the_right_model_type() {
    for cfg in variants() {
        let dir = tempfile::tempdir().unwrap();
        let weights = init_weights(&cfg, 5, &Device::Cpu).unwrap();
        let model = Trainable::on_weights(&cfg, weights.clone()).unwrap().detached().unwrap();
        save_pretrained(dir.path(), &cfg, &weights, None).unwrap();
        let (cfg2, w2) = load_pretrained(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(cfg2, cfg);
        let reloaded = Trainable::on_weights(&cfg2, w2).unwrap().detached().unwrap();
        let ids = random_ids(1, 9, cfg.vocab_size, 2);
        let a = model.forward(&ids, None).unwrap().logits;
        let b = reloaded.forward(&ids, None).unwrap().logits;
        assert_eq!(to_vec(&a), to_vec(&b));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        let plain = !cfg.rope && !cfg.differential;
        assert_eq!(config["model_type"], if plain { "gpt2" } else { "difflab" });
        assert_eq!(config["architectures"][0], if plain { "GPT2LMHeadModel" } else { "DifflabForCausalLM" });
        // transformers refuses safetensors without {"format": "pt"}
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}

/// Rewrites a model directory's tensors through `edit`.
fn rewrite(dir: &std::path::Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect();
    edit(&mut tensors);
    let tensors: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn loading_accepts_bare_names_and_ignores_mask_buffers() {
    let cfg = tiny(false, false);
    let dir = tempfile::tempdir().unwrap();
    let weights = init_weights(&cfg, 5, &Device::Cpu).unwrap();
    save_pretrained(dir.path(), &cfg, &weights, None).unwrap();
    rewrite(dir.path(), |t| {
        let old = std::mem::take(t);
        for (k, v) in old {
            t.insert(k.trim_start_matches("transformer.").to_string(), v);
        }
        t.insert("h.0.attn.bias".into(), Tensor::ones((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap());
        t.insert("h.1.attn.masked_bias".into(), Tensor::new(-1e4f32, &Device::Cpu).unwrap());
    });
    let (_, loaded) = load_pretrained(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded.len(), weights.len());
    assert_eq!(to_vec(&loaded["transformer.h.1.mlp.c_fc.weight"]), to_vec(&weights["transformer.h.1.mlp.c_fc.weight"]));
}

#[test]
fn bad_files_are_refused_with_a_message_naming_the_tensor_or_file() {
    let cfg = tiny(true, true);
    let weights = init_weights(&cfg, 5, &Device::Cpu).unwrap();
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        save_pretrained(dir.path(), &cfg, &weights, None).unwrap();
        dir
    };

    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.insert("transformer.h.1.mlp.c_fc.weight".into(), Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, CheckpointError::Shape { .. }), "{err}");
    assert!(err.to_string().contains("transformer.h.1.mlp.c_fc.weight"), "{err}");

    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.remove("transformer.h.0.ln_2.bias");
    });
    let err = load_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("transformer.h.0.ln_2.bias"), "{err}");

    let dir = fresh();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // a learned-position table in a RoPE model's file contradicts its config
    let dir = fresh();
    rewrite(dir.path(), |t| {
        t.insert("transformer.wpe.weight".into(), Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_pretrained(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("transformer.wpe.weight"), "{err}");

    // NaN weights are never written
    let dir = tempfile::tempdir().unwrap();
    let mut bad = weights.clone();
    bad.insert("transformer.ln_f.bias".into(), Tensor::new(&[f32::NAN; 32], &Device::Cpu).unwrap());
    let err = save_pretrained(dir.path(), &cfg, &bad, None).unwrap_err();
    assert!(matches!(err, CheckpointError::NonFinite { .. }), "{err}");
    assert!(!dir.path().join("model.safetensors").exists());
}

#[test]
fn model_and_optimizer_do_not_depend_on_the_terminal_crates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in ["model", "optim", "data", "train"] {
        let dir = root.join(module);
        if !dir.exists() {
            continue;
        }
        for entry in walk(&dir) {
            let text = std::fs::read_to_string(&entry).unwrap();
            for forbidden in ["ratatui", "crossterm"] {
                assert!(!text.contains(forbidden), "{} mentions {forbidden}", entry.display());
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

/// The fused CPU kernels against the composed ops every device has: same values, same
/// gradients (inputs and parameters).
#[test]
fn fused_kernels_equal_the_composed_ops_forward_and_backward() {
    use candle_core::Var;
    use difflab::model::ops;
    let dev = Device::Cpu;
    let noise = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f64 * 0.7 + seed as f64 * 13.1).sin() * 2.0) as f32).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let close = |what: &str, a: &Tensor, b: &Tensor| assert_close(what, a, b, 2e-6, 1e-4);

    // layer norm: x, weight, bias
    let (x, w, b) = (noise(&[6, 5, 24], 1), noise(&[24], 2), noise(&[24], 3));
    let probe = noise(&[6, 5, 24], 4).as_detached_tensor();
    let run = |fused: bool| {
        let y = if fused {
            ops::layer_norm(
                Kernels::FusedCpu(difflab::engine::Matmuls::F32),
                x.as_tensor(),
                w.as_tensor(),
                b.as_tensor(),
                1e-5,
            )
        } else {
            ops::composed_layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
        }
        .unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y, [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).unwrap().clone()))
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    close("layer norm", &y1, &y2);
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        close(&format!("layer norm grad {i}"), a, b);
    }

    // linear: x (B, T, in), W (in, out), b (out)
    let (x, w, b) = (noise(&[3, 5, 16], 11), noise(&[16, 24], 12), noise(&[24], 13));
    let probe = noise(&[3, 5, 24], 14).as_detached_tensor();
    let run = |fused: bool| {
        let y = if fused {
            ops::linear(Kernels::FusedCpu(difflab::engine::Matmuls::F32), x.as_tensor(), w.as_tensor(), b.as_tensor())
        } else {
            ops::composed_linear(x.as_tensor(), w.as_tensor(), b.as_tensor())
        }
        .unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y, [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).unwrap().clone()))
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    close("linear", &y1, &y2);
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        close(&format!("linear grad {i}"), a, b);
    }

    // causal softmax over (B, H, T, T)
    let t = 9;
    let s = noise(&[2, 3, t, t], 5);
    let mask = ops::causal_mask(t, &dev).unwrap();
    let probe = noise(&[2, 3, t, t], 6).as_detached_tensor();
    let run = |fused: bool| {
        let y = if fused {
            ops::causal_softmax(Kernels::FusedCpu(difflab::engine::Matmuls::F32), s.as_tensor(), &mask)
        } else {
            ops::composed_causal_softmax(s.as_tensor(), &mask)
        }
        .unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(s.as_tensor()).unwrap().clone())
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    close("causal softmax", &y1, &y2);
    close("causal softmax grad", &g1, &g2);

    // gelu
    let x = noise(&[7, 33], 7);
    let run = |fused: bool| {
        let y = if fused {
            ops::gelu(Kernels::FusedCpu(difflab::engine::Matmuls::F32), x.as_tensor()).unwrap()
        } else {
            x.as_tensor().gelu().unwrap()
        };
        let g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(x.as_tensor()).unwrap().clone())
    };
    let ((y1, g1), (y2, g2)) = (run(true), run(false));
    close("gelu", &y1, &y2);
    // candle's own tanh-GELU backward rounds its constants to 6 digits: allow for that
    assert_close("gelu grad", &g1, &g2, 1e-4, 1e-4);

    // the tied head + cross-entropy: gradients for the hidden states and the embedding,
    // over more rows than one chunk holds (V = 70000: chunks of ~120 rows)
    for (rows, vocab) in [(11usize, 37usize), (300, 70_000)] {
        let hidden = noise(&[rows, 16], 8);
        let wte = noise(&[vocab, 16], 9);
        let targets =
            Tensor::from_vec((0..rows as u32).map(|i| (i * 5) % vocab as u32).collect::<Vec<_>>(), rows, &dev).unwrap();
        let run = |fused: bool| {
            let l = if fused {
                ops::head_cross_entropy(
                    Kernels::FusedCpu(difflab::engine::Matmuls::F32),
                    hidden.as_tensor(),
                    wte.as_tensor(),
                    &targets,
                )
            } else {
                ops::composed_head_cross_entropy(hidden.as_tensor(), wte.as_tensor(), &targets)
            }
            .unwrap();
            let g = (&l * 3.0).unwrap().backward().unwrap();
            (l, g.get(hidden.as_tensor()).unwrap().clone(), g.get(wte.as_tensor()).unwrap().clone())
        };
        let ((l1, h1, w1), (l2, h2, w2)) = (run(true), run(false));
        assert_close("head cross-entropy", &l1, &l2, 1e-5, 1e-5);
        close("head cross-entropy d hidden", &h1, &h2);
        close("head cross-entropy d wte", &w1, &w2);
    }
}

/// The fused attention (probabilities kept, or recomputed in the backward) against attention
/// composed from candle ops, with and without RoPE.
#[test]
fn fused_attention_equals_composed_attention() {
    // T = 150 crosses the fused kernel's 64-row causal blocks, with a partial last block
    for t in [7, 150] {
        fused_attention_case(t);
    }
}

fn fused_attention_case(t: usize) {
    use candle_core::{Var, D};
    use difflab::engine::cpu::attention::{CausalAttention, Rope};
    use difflab::model::ops;
    use difflab::model::rope::RotaryTables;
    let dev = Device::Cpu;
    let (b, h, hd) = (2, 3, 4);
    let c = h * hd;
    let n = b * t * 3 * c;
    let qkv = Var::from_tensor(
        &Tensor::from_vec((0..n).map(|i| ((i as f32) * 0.37).sin()).collect::<Vec<_>>(), (b, t, 3 * c), &dev).unwrap(),
    )
    .unwrap();
    let probe =
        Tensor::from_vec((0..b * t * c).map(|i| ((i as f32) * 0.11).cos()).collect::<Vec<_>>(), (b, t, c), &dev)
            .unwrap();
    let tables = RotaryTables::new(t, hd, 10_000.0, &dev).unwrap();
    for rope in [false, true] {
        let composed = {
            let x = qkv.as_tensor();
            let heads = |i: usize| {
                x.narrow(D::Minus1, i * c, c)
                    .unwrap()
                    .reshape((b, t, h, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (mut q, mut k, v) = (heads(0), heads(1), heads(2));
            if rope {
                q = tables.apply(&q).unwrap();
                k = tables.apply(&k).unwrap();
            }
            let q = (q * (1.0 / (hd as f64).sqrt())).unwrap();
            let p =
                ops::composed_causal_softmax(&q.matmul(&k.t().unwrap()).unwrap(), &ops::causal_mask(t, &dev).unwrap())
                    .unwrap();
            p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
        };
        let host = rope.then(|| Rope {
            cos: std::sync::Arc::new(tables.cos.flatten_all().unwrap().to_vec1().unwrap()),
            sin: std::sync::Arc::new(tables.sin.flatten_all().unwrap().to_vec1().unwrap()),
        });
        let grad_of = |y: &Tensor| {
            (y * &probe).unwrap().sum_all().unwrap().backward().unwrap().get(qkv.as_tensor()).unwrap().clone()
        };
        let want_grad = grad_of(&composed);
        for keep in [true, false] {
            let y = qkv
                .as_tensor()
                .apply_op1(CausalAttention::new(h, host.clone(), keep, difflab::engine::Matmuls::F32))
                .unwrap();
            assert_close(&format!("attention T {t} rope {rope} keep {keep}"), &y, &composed, 1e-5, 1e-5);
            assert_close(
                &format!("attention grad T {t} rope {rope} keep {keep}"),
                &grad_of(&y),
                &want_grad,
                1e-5,
                1e-4,
            );
        }
    }
}

/// The written-out CPU step (with and without gradient checkpointing) against candle's
/// autograd over the same model: loss, every gradient, diff norms.
#[test]
fn the_written_out_cpu_step_equals_autograd() {
    use difflab::model::cpu_step;
    for mut cfg in variants() {
        // not the 1e-5 default, so both paths must read the config's epsilon
        cfg.layer_norm_epsilon = 1e-3;
        let model = Trainable::on_weights(&cfg, init_weights(&cfg, 21, &Device::Cpu).unwrap()).unwrap();
        let ids = random_ids(3, 12, cfg.vocab_size, 4);
        let (hidden, norms) = model.gpt.forward_hidden(&ids, None).unwrap();
        let loss = model.gpt.next_token_loss(&hidden, &ids).unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap() as f64;
        let want = model.named_grads((loss * 0.5).unwrap().backward().unwrap());
        for checkpointing in [false, true] {
            let what = format!("rope {} diff {} ckpt {checkpointing}", cfg.rope, cfg.differential);
            let mut host = None;
            let out = cpu_step::forward_backward(
                &cfg,
                &model.vars,
                &ids,
                None,
                0.5,
                checkpointing,
                (difflab::engine::Matmuls::F32, None),
                &mut host,
                None,
            )
            .unwrap();
            let grads = host.unwrap().into_tensors(&cfg).unwrap();
            assert!((out.loss - want_loss).abs() < 1e-5, "{what}: loss {} vs {want_loss}", out.loss);
            assert_eq!(grads.len(), want.len(), "{what}");
            for (name, g) in &grads {
                assert_close(&format!("{what} {name}"), g, &want[name], 1e-6, 1e-4);
            }
            match (&out.diff_norms, &norms) {
                (Some(a), Some(b)) => assert_close(
                    &format!("{what} norms"),
                    &Tensor::new(a.as_slice(), &Device::Cpu).unwrap(),
                    &b.flatten_all().unwrap(),
                    1e-6,
                    1e-5,
                ),
                (None, None) => {}
                _ => panic!("{what}: diff norms present on one path only"),
            }
        }
    }
}

/// Gradient checkpointing on candle's autograd (the path of CUDA, bf16 and dropout runs):
/// recomputing each block, with its dropout masks replayed, gives the plain path's loss and
/// gradients.
#[test]
fn autograd_gradient_checkpointing_equals_the_plain_path() {
    use difflab::dist::World;
    use difflab::engine::Placement;
    use difflab::train::micro::MicroBatch;
    use difflab::train::step::{gradients, Recipe};
    // the cpu-autograd engine: dropout on the CPU in f32
    let placement = Placement::new(Device::Cpu, candle_core::DType::F32, 0.1, 1);
    assert_eq!(placement.engine, Engine::CpuAutograd);
    let world = World::single();
    for cfg in variants() {
        let model = Trainable::new(&cfg, init_weights(&cfg, 5, &Device::Cpu).unwrap(), &placement).unwrap();
        let ids = random_ids(2, 12, cfg.vocab_size, 9);
        let batches = [(0, MicroBatch { ids: &ids, targets: None }), (1, MicroBatch { ids: &ids, targets: None })];
        let run = |checkpointing: bool| {
            let recipe = Recipe {
                placement: &placement,
                world: &*world,
                micro_batches: 2,
                checkpointing,
                dropout: 0.1,
                seed: 77,
                grad_wire: difflab::dist::Wire::F32,
                grad_overlap: false,
                bucket_bytes: difflab::dist::BUCKET_BYTES,
            };
            let g = gradients(&model, &recipe, 3, &batches, &mut || {}).unwrap();
            (g.loss, g.grads)
        };
        let (plain_loss, plain) = run(false);
        let (ckpt_loss, ckpt) = run(true);
        let what = format!("rope {} diff {}", cfg.rope, cfg.differential);
        assert!((plain_loss - ckpt_loss).abs() < 1e-6, "{what}: loss {plain_loss} vs {ckpt_loss}");
        assert_eq!(plain.len(), param_specs(&cfg).len(), "{what}: every parameter has a gradient");
        assert_eq!(plain.len(), ckpt.len(), "{what}");
        for (name, g) in &plain {
            assert_close(&format!("{what} {name}"), &ckpt[name], g, 1e-6, 1e-4);
        }
    }
}

/// A second process in this one: every sum doubles what it is given (a twin holding the same
/// gradients), and each call is recorded with its length and the thread that made it.
#[derive(Default)]
struct Mirror(std::sync::Mutex<Vec<(usize, Option<String>)>>);

impl difflab::dist::Collective for Mirror {
    fn backend(&self) -> &'static str {
        "mirror"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), difflab::dist::DistError> {
        self.0.lock().unwrap().push((buf.len(), std::thread::current().name().map(String::from)));
        buf.iter_mut().for_each(|x| *x *= 2.0);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), difflab::dist::DistError> {
        buf.iter_mut().for_each(|x| *x *= 2.0);
        Ok(())
    }
    fn broadcast_f64(&self, _: &mut [f64]) -> Result<(), difflab::dist::DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), difflab::dist::DistError> {
        Ok(())
    }
}

/// The written-out step's gradients summed over the processes during the backward (on the
/// all-reduce thread, each section as the backward finishes it: ln_f first) are bit for bit the
/// ones summed after it (wte first, on the trainer's thread) and twice one process's, for one
/// micro-batch and for three (two side by side, then one beside the other worker's sums), in
/// one-buffer buckets and in 25 MB ones.
#[test]
fn gradients_summed_during_the_backward_equal_those_summed_after_it() {
    use difflab::dist::{Collective, Wire, World, BUCKET_BYTES};
    use difflab::engine::Placement;
    use difflab::model::cpu_step::{self, Section};
    use difflab::train::micro::MicroBatch;
    use difflab::train::step::{gradients, Recipe};
    let placement = Placement::new(Device::Cpu, DType::F32, 0.0, 2);
    assert_eq!(placement.engine, Engine::CpuStep);
    for cfg in variants() {
        let model = Trainable::new(&cfg, init_weights(&cfg, 8, &Device::Cpu).unwrap(), &placement).unwrap();
        let ids: Vec<Tensor> = (0..3).map(|i| random_ids(2, 12, cfg.vocab_size, 40 + i)).collect();
        // each section's first buffer is as long as `first_len` says (a bucket goes as soon as
        // the next buffer would not fit in it, before that buffer's section is finished)
        let mut host = None;
        let f32_step = (difflab::engine::Matmuls::F32, None);
        cpu_step::forward_backward(&cfg, &model.vars, &ids[0], None, 1.0, false, f32_step, &mut host, None).unwrap();
        let mut host = host.unwrap();
        for s in Section::in_order(cfg.n_layer) {
            assert_eq!(host.take(s).first().map(Vec::len), Some(s.first_len(&cfg)), "{s:?}");
        }
        for n in [1, 3] {
            let batches: Vec<(usize, MicroBatch)> =
                ids[..n].iter().enumerate().map(|(i, ids)| (i, MicroBatch { ids, targets: None })).collect();
            let run = |world: &dyn Collective, overlap: bool, bucket_bytes: usize| {
                let recipe = Recipe {
                    placement: &placement,
                    world,
                    micro_batches: 2 * n,
                    checkpointing: false,
                    dropout: 0.0,
                    seed: 1,
                    grad_wire: Wire::F32,
                    grad_overlap: overlap,
                    bucket_bytes,
                };
                gradients(&model, &recipe, 0, &batches, &mut || {}).unwrap()
            };
            let one = run(&*World::single(), false, BUCKET_BYTES);
            let what = format!("rope {} diff {}, {n} micro-batches", cfg.rope, cfg.differential);
            for bucket_bytes in [4, BUCKET_BYTES] {
                let (during, after) = (Mirror::default(), Mirror::default());
                let g_during = run(&during, true, bucket_bytes);
                let g_after = run(&after, false, bucket_bytes);
                assert_eq!((g_during.loss, g_after.loss), (2.0 * one.loss, 2.0 * one.loss), "{what}");
                assert_eq!(g_during.grads.len(), param_specs(&cfg).len(), "{what}");
                for (name, g) in &one.grads {
                    let twice: Vec<f32> =
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| 2.0 * x).collect();
                    for (how, got) in [("during", &g_during.grads), ("after", &g_after.grads)] {
                        let got: Vec<f32> = got[name].flatten_all().unwrap().to_vec1().unwrap();
                        assert!(got == twice, "{what}, summed {how} the backward, {bucket_bytes} B buckets: {name}");
                    }
                }
                let (during, after) = (during.0.into_inner().unwrap(), after.0.into_inner().unwrap());
                if bucket_bytes == 4 {
                    // a bucket a buffer: one call per parameter, in the order each path sums them
                    assert_eq!(
                        (during.len(), after.len()),
                        (param_specs(&cfg).len(), param_specs(&cfg).len()),
                        "{what}"
                    );
                    assert_eq!(during[0].0, cfg.n_embd, "{what}: ln_f.weight is finished first");
                    assert_eq!(after[0].0, cfg.vocab_size * cfg.n_embd, "{what}: after the backward, wte first");
                }
                let thread = Some("difflab-all-reduce".to_string());
                assert!(during.iter().all(|(_, t)| *t == thread), "{what}: {during:?}");
                assert!(after.iter().all(|(_, t)| *t != thread), "{what}: {after:?}");
            }
        }
    }
}

/// The CPU's bf16 step (bf16 matmuls on AVX512-BF16): its gradients follow the f32 step's to
/// bf16's error (and differ: the matmuls round), the weights packed once for the step (and
/// packed again after an update) give exactly what packing them in every product gives, and the
/// packed panels take the memory the run's estimate counts for them.
#[test]
fn the_bf16_step_follows_the_f32_step_and_its_packed_weights_change_nothing() {
    use difflab::engine::Matmuls;
    use difflab::model::cpu_step::{forward_backward, PackedWeights};
    if !difflab::engine::cpu::bf16::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    for cfg in variants() {
        let cfg = GptConfig { n_positions: 64, ..cfg };
        let model = Trainable::on_weights(&cfg, init_weights(&cfg, 11, &Device::Cpu).unwrap()).unwrap();
        let ids = random_ids(3, 37, cfg.vocab_size, 5);
        // packed from other weights, then again from these (as each step repacks the last)
        let other = Trainable::on_weights(&cfg, init_weights(&cfg, 12, &Device::Cpu).unwrap()).unwrap();
        let mut packed = PackedWeights::new(&cfg, &other.vars).unwrap();
        assert!(packed.is_for(&cfg));
        packed.repack(&cfg, &model.vars).unwrap();
        let grads = |arith: (Matmuls, Option<&PackedWeights>)| {
            let mut g = None;
            let out = forward_backward(&cfg, &model.vars, &ids, None, 1.0, false, arith, &mut g, None).unwrap();
            (out.loss, g.unwrap().into_tensors(&cfg).unwrap())
        };
        let (loss32, g32) = grads((Matmuls::F32, None));
        let (loss16, g16) = grads((Matmuls::Bf16, Some(&packed)));
        let (loss_unpacked, g_unpacked) = grads((Matmuls::Bf16, None));
        assert!((loss32 - loss16).abs() < 5e-3 && loss32 != loss16, "loss f32 {loss32} vs bf16 {loss16}");
        assert_eq!(loss16, loss_unpacked);
        let mut worst = 0f32;
        for (name, want) in &g32 {
            let got = &g16[name];
            let rel = max_abs_diff(got, want) / to_vec(want).iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            assert!(rel < 0.05, "{name}: bf16 gradient off by {rel:.3} of its largest entry");
            worst = worst.max(rel);
            assert_eq!(to_vec(got), to_vec(&g_unpacked[name]), "{name}: packed once vs per product");
        }
        assert!(worst > 1e-5, "the bf16 gradients equal the f32 ones: nothing was rounded");
        let (estimate, bytes) = (cfg.bf16_panel_bytes() as f64, packed.bytes() as f64);
        assert!(estimate <= bytes && bytes <= 1.35 * estimate, "panels {bytes} bytes, estimated {estimate}");
    }
}

/// bf16 packs the weights once per step only where the panels cost no memory over f32: at the
/// sanity shape (two micro-batches of 2 x 128 side by side, the head's bf16 gradient saves 51 MB,
/// the panels take 27 MB) but not at GPT-2 small (0.5 GB of panels, a head that keeps nothing).
#[test]
fn weights_are_packed_once_per_step_only_where_that_costs_no_memory() {
    use difflab::model::cpu_step::packs_weights_once;
    let shape = |n_layer, n_embd| GptConfig { n_layer, n_embd, n_head: 2, vocab_size: 50257, ..tiny(true, true) };
    assert!(packs_weights_once(&shape(2, 128), (2, 128), 2));
    assert!(!packs_weights_once(&shape(2, 128), (2, 128), 1), "one micro-batch saves 26 MB: less than the panels");
    assert!(!packs_weights_once(&shape(12, 768), (1, 1024), 1));
}
