//! Optimisation, PyTorch / Hugging Face semantics: AdamW with decoupled weight decay on 2-D
//! parameters only, global-norm clipping, gradient accumulation and the LR schedules.

pub mod adamw;
pub mod cpu;
pub mod grads;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{LrSchedule, ScheduleKind};

use std::collections::BTreeMap;

use candle_core::Result;

use crate::events::LayerStat;
use crate::model::params::layer_of;
use adamw::UpdateSquares;
use grads::{clip_factor, global_norm, Grads};

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the norm was not finite: the weights and moments were left alone.
    pub applied: bool,
}

/// The optimizer step every caller takes (train, lr-find, bench, golden-check): the global
/// gradient norm, then, when it is finite, AdamW at `lr` with the gradients clipped to
/// `max_grad_norm` (torch's `clip_grad_norm_`, folded into the update).
pub fn step(opt: &mut AdamW, grads: &Grads, lr: f64, max_grad_norm: f64) -> Result<Update> {
    let grad_norm = global_norm(grads)?;
    if !grad_norm.is_finite() {
        return Ok(Update { grad_norm, applied: false });
    }
    opt.step(grads, lr, clip_factor(grad_norm, max_grad_norm))?;
    Ok(Update { grad_norm, applied: true })
}

/// Per layer, in model order: the gradient norm (from each parameter's gradient sum of
/// squares) and the update-to-weight ratio (from the optimizer's last update). A layer the
/// update did not touch has ratio 0.
pub fn layer_stats(grad_squares: &BTreeMap<String, f64>, updates: &BTreeMap<String, UpdateSquares>) -> Vec<LayerStat> {
    // (order, name) -> (grad^2, update^2, weight^2)
    let mut layers: BTreeMap<(usize, String), (f64, f64, f64)> = BTreeMap::new();
    for (name, g) in grad_squares {
        layers.entry(layer_of(name)).or_default().0 += g;
    }
    for (name, u) in updates {
        let sums = layers.entry(layer_of(name)).or_default();
        sums.1 += u.update;
        sums.2 += u.weight;
    }
    layers
        .into_iter()
        .map(|((_, name), (g, u, w))| LayerStat {
            name,
            grad_norm: g.sqrt(),
            update_ratio: if w > 0.0 { (u / w).sqrt() } else { 0.0 },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn vars() -> BTreeMap<String, Var> {
        let d = Device::Cpu;
        let t = |v: Vec<f32>, shape: &[usize]| Var::from_tensor(&Tensor::from_vec(v, shape, &d).unwrap()).unwrap();
        [
            ("transformer.h.0.attn.c_attn.weight".to_string(), t(vec![0.5, -1.0, 2.0, 0.25], &[2, 2])),
            ("transformer.h.0.ln_1.bias".to_string(), t(vec![0.1, -0.2], &[2])),
            ("transformer.wte.weight".to_string(), t(vec![1.0, 2.0, -3.0, 0.5, 0.0, 1.5], &[3, 2])),
        ]
        .into()
    }

    /// The ratios recovered after the step equal those of the weights copied before it.
    #[test]
    fn update_ratios_match_the_weights_before_and_after() {
        let vars = vars();
        let mut opt = AdamW::new(&vars, AdamWConfig { weight_decay: 0.1, ..Default::default() }, |_, v| {
            v.as_tensor().rank() >= 2
        })
        .unwrap();
        let grads: Grads = vars
            .iter()
            .enumerate()
            .map(|(i, (n, v))| (n.clone(), ((v.as_tensor() * (0.3 + i as f64)).unwrap() + 0.05).unwrap()))
            .collect();
        let mut stats = vec![];
        for lr in [1e-2, 3e-3] {
            let before: BTreeMap<String, Vec<f32>> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            step(&mut opt, &grads, lr, 1.0).unwrap();
            let updates = opt.last_update_squares().unwrap();
            assert_eq!(updates.len(), 3);
            for (name, v) in &vars {
                let after: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let du: f64 = after.iter().zip(&before[name]).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
                let w: f64 = before[name].iter().map(|b| (*b as f64).powi(2)).sum();
                let got = updates[name];
                assert!((got.update - du).abs() <= 1e-3 * du, "{name}: update {} vs {du}", got.update);
                assert!((got.weight - w).abs() <= 1e-5 * w, "{name}: weight {} vs {w}", got.weight);
            }
            stats = layer_stats(&grads::squares(&grads).unwrap(), &updates);
        }
        let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["wte", "h.0"]);
        // h.0's gradient norm is over both of its parameters
        let g: f64 = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.bias"]
            .iter()
            .map(|n| grads[*n].sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64)
            .sum();
        assert!((stats[1].grad_norm - g.sqrt()).abs() < 1e-6, "{stats:?}");
        assert!(stats.iter().all(|s| s.update_ratio > 0.0 && s.update_ratio < 0.1), "{stats:?}");
    }
}
