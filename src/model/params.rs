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

/// How a fresh parameter is initialised (GPT-2's: normal(0, 0.02), the residual projections
/// scaled by 1/sqrt(2 n_layer), biases 0, LayerNorm weights 1).
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

/// The layer a parameter belongs to, for per-layer statistics: `wte`, `wpe`, `h.<i>`,
/// `ln_f`, and `(<i>, name)` to put them in model order (embeddings, blocks, final norm).
pub fn layer_of(name: &str) -> (usize, String) {
    let bare = name.strip_prefix("transformer.").unwrap_or(name);
    let mut parts = bare.split('.');
    match (parts.next(), parts.next()) {
        (Some("wte"), _) => (0, "wte".into()),
        (Some("wpe"), _) => (1, "wpe".into()),
        (Some("h"), Some(i)) => (2 + i.parse::<usize>().unwrap_or(usize::MAX - 3), format!("h.{i}")),
        (Some(first), _) => (usize::MAX, first.to_string()),
        (None, _) => (usize::MAX, bare.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_come_in_model_order() {
        let cfg = GptConfig {
            vocab_size: 10,
            n_positions: 8,
            n_embd: 4,
            n_layer: 12,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
            rope: false,
            rope_theta: 10_000.0,
            differential: true,
            dropout: 0.0,
        };
        let mut layers: Vec<(usize, String)> = param_specs(&cfg).iter().map(|p| layer_of(&p.name)).collect();
        layers.sort();
        layers.dedup();
        let names: Vec<String> = layers.into_iter().map(|l| l.1).collect();
        let mut want = vec!["wte".to_string(), "wpe".into()];
        want.extend((0..12).map(|i| format!("h.{i}")));
        want.push("ln_f".into());
        assert_eq!(names, want, "h.10 comes after h.9, not after h.1");
    }
}
