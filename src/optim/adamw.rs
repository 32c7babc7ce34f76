//! AdamW as `torch.optim.AdamW`, with named, saveable state.
//!
//! candle's `AdamW` hides its moments (so a run cannot resume exactly) and has no parameter
//! groups (so biases and LayerNorm would be decayed); this one keeps `m` and `v` per parameter
//! name and decays only the parameters marked as such.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct Slot {
    var: Var,
    decays: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Optimizer steps taken (PyTorch's `state["step"]`, the same for every parameter).
    step: u64,
    slots: BTreeMap<String, Slot>,
}

impl AdamW {
    /// `decays(name, var)` says which parameters get weight decay (2-D ones, per DESIGN §2).
    pub fn new(
        vars: &BTreeMap<String, Var>,
        cfg: AdamWConfig,
        decays: impl Fn(&str, &Var) -> bool,
    ) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok((name.clone(), Slot { var: var.clone(), decays: decays(name, var), m: zeros.clone(), v: zeros }))
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, step: 0, slots })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        for (name, slot) in self.slots.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            // m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g²
            slot.m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((slot.v.sqrt()? / bias2_sqrt)? + eps)?;
            let theta = slot.var.as_tensor();
            // decoupled decay first, as torch: θ ← θ (1 - lr wd)
            let theta = if slot.decays && weight_decay != 0.0 { (theta * (1.0 - lr * weight_decay))? } else { theta.clone() };
            let updated = (theta - ((&slot.m / denom)? * step_size)?)?;
            slot.var.set(&updated)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for saving.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, slot) in &self.slots {
            out.insert(format!("exp_avg.{name}"), slot.m.clone());
            out.insert(format!("exp_avg_sq.{name}"), slot.v.clone());
        }
        out
    }

    /// Restores moments and step count saved by `state_tensors`; every slot must be present.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> std::result::Result<(), String> {
        for (name, slot) in self.slots.iter_mut() {
            for (key, dst) in [(format!("exp_avg.{name}"), &mut slot.m), (format!("exp_avg_sq.{name}"), &mut slot.v)] {
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != dst.dims() {
                    return Err(format!("optimizer state `{key}` has shape {:?}, expected {:?}", t.dims(), dst.dims()));
                }
                *dst = t.to_device(dst.device()).map_err(|e| e.to_string())?;
            }
        }
        self.step = step;
        Ok(())
    }
}
