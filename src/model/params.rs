//! The parameter list of a configuration: names, shapes and initialisation, in one place.
//!
//! Names are `transformers.GPT2LMHeadModel`'s without the tied `lm_head.weight`. Fresh
//! weights come from our own seeded generator (candle's CPU RNG cannot be seeded), one
//! stream per tensor derived from the seed and the name, so adding a tensor never shifts the
//! others.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::GptConfig;
use crate::fingerprint::fnv1a;

/// How a fresh parameter is initialised (GPT-2, per DESIGN §1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// 2-D tensors (embeddings and matrices) get weight decay; biases and LayerNorm do not.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// Every parameter of `cfg`, sorted by name.
pub fn param_specs(cfg: &GptConfig) -> Vec<ParamSpec> {
    let c = cfg.n_embd;
    let std = 0.02;
    // GPT-2 scales the residual projections by 1/sqrt(2 n_layer) ("Language Models are
    // Unsupervised Multitask Learners", §2.3): each block adds two branches to the stream.
    let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let mut specs = vec![];
    let mut add = |name: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { name, shape, init });
    add("transformer.wte.weight".into(), vec![cfg.vocab_size, c], Init::Normal { std });
    if !cfg.rope {
        add("transformer.wpe.weight".into(), vec![cfg.n_positions, c], Init::Normal { std });
    }
    for i in 0..cfg.n_layer {
        let p = format!("transformer.h.{i}");
        for ln in ["ln_1", "ln_2"] {
            add(format!("{p}.{ln}.weight"), vec![c], Init::Ones);
            add(format!("{p}.{ln}.bias"), vec![c], Init::Zeros);
        }
        add(format!("{p}.attn.c_attn.weight"), vec![c, 3 * c], Init::Normal { std });
        add(format!("{p}.attn.c_attn.bias"), vec![3 * c], Init::Zeros);
        add(format!("{p}.attn.c_proj.weight"), vec![c, c], Init::Normal { std: proj_std });
        add(format!("{p}.attn.c_proj.bias"), vec![c], Init::Zeros);
        add(format!("{p}.mlp.c_fc.weight"), vec![c, 4 * c], Init::Normal { std });
        add(format!("{p}.mlp.c_fc.bias"), vec![4 * c], Init::Zeros);
        add(format!("{p}.mlp.c_proj.weight"), vec![4 * c, c], Init::Normal { std: proj_std });
        add(format!("{p}.mlp.c_proj.bias"), vec![c], Init::Zeros);
    }
    add("transformer.ln_f.weight".into(), vec![c], Init::Ones);
    add("transformer.ln_f.bias".into(), vec![c], Init::Zeros);
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Fresh weights for `cfg`: the same seed gives the same tensors on every run and machine.
pub fn init_weights(cfg: &GptConfig, seed: u64, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    param_specs(cfg)
        .into_iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = match spec.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal { std } => {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(spec.name.as_bytes()));
                    let normal = Normal::new(0.0f32, std as f32).map_err(candle_core::Error::wrap)?;
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            Ok((spec.name, Tensor::from_vec(data, spec.shape, device)?))
        })
        .collect()
}
