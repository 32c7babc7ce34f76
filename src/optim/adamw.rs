//! AdamW as `torch.optim.AdamW`, with named, saveable state.
//!
//! candle's `AdamW` hides its moments (so a run cannot resume exactly) and has no parameter
//! groups (so biases and LayerNorm would be decayed); this one keeps `m` and `v` per parameter
//! name and decays only the parameters marked as such. On the CPU the update runs in place
//! (`cpu`), elsewhere as tensor ops.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

use super::cpu;

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

/// A parameter's first and second moments.
enum Moments {
    /// `[m | v]` in one CPU buffer, updated in place.
    Packed(Tensor),
    Split {
        m: Tensor,
        v: Tensor,
    },
}

struct Slot {
    var: Var,
    decays: bool,
    moments: Moments,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Optimizer steps taken (PyTorch's `state["step"]`, the same for every parameter).
    step: u64,
    slots: BTreeMap<String, Slot>,
    /// The constants of the last update and the parameters it changed, from which
    /// `last_update_squares` recovers the update without a copy of the old weights.
    last: Option<(cpu::Apply, Vec<String>)>,
}

/// One parameter's last update `delta` against the weights `theta` it was applied to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateSquares {
    /// `||delta||^2`.
    pub update: f64,
    /// `||theta_before||^2`.
    pub weight: f64,
}

fn fresh_moments(var: &Var) -> Result<Moments> {
    let t = var.as_tensor();
    Ok(if cpu::applies(&[t]) {
        Moments::Packed(Tensor::zeros(2 * t.elem_count(), DType::F32, t.device())?)
    } else {
        Moments::Split { m: t.zeros_like()?, v: t.zeros_like()? }
    })
}

impl AdamW {
    /// `decays(name, var)` says which parameters get weight decay (the 2-D ones: embeddings and matrices, never biases or LayerNorm).
    pub fn new(vars: &BTreeMap<String, Var>, cfg: AdamWConfig, decays: impl Fn(&str, &Var) -> bool) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                Ok((name.clone(), Slot { var: var.clone(), decays: decays(name, var), moments: fresh_moments(var)? }))
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, step: 0, slots, last: None })
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`, on gradients scaled by `grad_scale` (the clipping
    /// factor). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        let mut updated = Vec::with_capacity(self.slots.len());
        for (name, slot) in self.slots.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            updated.push(name.clone());
            // decoupled decay, as torch: theta <- theta (1 - lr wd)
            let decay = if slot.decays { 1.0 - lr * weight_decay } else { 1.0 };
            let theta = slot.var.as_tensor();
            match &mut slot.moments {
                Moments::Packed(mv) if cpu::applies(&[g, theta]) => {
                    mv.inplace_op2(
                        g,
                        &cpu::MomentUpdate { beta1: beta1 as f32, beta2: beta2 as f32, grad_scale: grad_scale as f32 },
                    )?;
                    theta.inplace_op2(
                        mv,
                        &cpu::Apply {
                            decay: decay as f32,
                            step_size: step_size as f32,
                            bias2_sqrt: bias2_sqrt as f32,
                            eps: eps as f32,
                        },
                    )?;
                }
                Moments::Packed(_) => candle_core::bail!("adamw: {name}: gradient not on the CPU"),
                Moments::Split { m, v } => {
                    let g = (g.to_dtype(DType::F32)? * grad_scale)?;
                    // m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
                    *m = ((&*m * beta1)? + (&g * (1.0 - beta1))?)?;
                    *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let denom = ((v.sqrt()? / bias2_sqrt)? + eps)?;
                    let updated = ((theta * decay)? - ((&*m / denom)? * step_size)?)?;
                    slot.var.set(&updated)?;
                }
            }
        }
        let apply = cpu::Apply {
            decay: (1.0 - lr * weight_decay) as f32,
            step_size: step_size as f32,
            bias2_sqrt: bias2_sqrt as f32,
            eps: eps as f32,
        };
        self.last = Some((apply, updated));
        Ok(())
    }

    /// The last update of each parameter it changed, as sums of squares (Karpathy's
    /// update-to-weight ratio is `sqrt(update / weight)`). Recovered from the weights and
    /// moments after the step: `theta_before = (theta + s u) / d`, `u = m / (sqrt(v) / b2 + eps)`,
    /// so no copy of the old weights is kept. Empty before the first step.
    pub fn last_update_squares(&self) -> Result<BTreeMap<String, UpdateSquares>> {
        let Some((apply, names)) = &self.last else { return Ok(BTreeMap::new()) };
        let mut out = BTreeMap::new();
        for name in names {
            let Some(slot) = self.slots.get(name) else { continue };
            let decay = if slot.decays { apply.decay } else { 1.0 };
            let theta = slot.var.as_tensor();
            let squares = match &slot.moments {
                Moments::Packed(mv) => cpu::update_squares(theta, mv, apply, decay)?,
                Moments::Split { m, v } => {
                    let u = (m / ((v.sqrt()? / apply.bias2_sqrt as f64)? + apply.eps as f64)?)?;
                    let before = ((theta.to_dtype(DType::F32)? + (u * apply.step_size as f64)?)? / decay as f64)?;
                    let delta = (theta.to_dtype(DType::F32)? - &before)?;
                    let sum = |t: Tensor| t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>();
                    (sum(delta)?, sum(before)?)
                }
            };
            out.insert(name.clone(), UpdateSquares { update: squares.0, weight: squares.1 });
        }
        Ok(out)
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for saving.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, slot) in &self.slots {
            let shape = slot.var.as_tensor().shape().clone();
            let (m, v) = match &slot.moments {
                Moments::Packed(mv) => {
                    let n = shape.elem_count();
                    (mv.narrow(0, 0, n)?.reshape(&shape)?, mv.narrow(0, n, n)?.reshape(&shape)?)
                }
                Moments::Split { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("exp_avg.{name}"), m);
            out.insert(format!("exp_avg_sq.{name}"), v);
        }
        Ok(out)
    }

    /// Restores moments and step count saved by `state_tensors`; every slot must be present.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> std::result::Result<(), String> {
        for (name, slot) in self.slots.iter_mut() {
            let shape = slot.var.as_tensor().dims().to_vec();
            let get = |key: String| -> std::result::Result<Tensor, String> {
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != shape.as_slice() {
                    return Err(format!("optimizer state `{key}` has shape {:?}, expected {shape:?}", t.dims()));
                }
                t.to_device(slot.var.device()).and_then(|t| t.to_dtype(DType::F32)).map_err(|e| e.to_string())
            };
            let (m, v) = (get(format!("exp_avg.{name}"))?, get(format!("exp_avg_sq.{name}"))?);
            slot.moments = match slot.moments {
                Moments::Packed(_) => Moments::Packed(
                    Tensor::cat(
                        &[m.flatten_all().map_err(|e| e.to_string())?, v.flatten_all().map_err(|e| e.to_string())?],
                        0,
                    )
                    .map_err(|e| e.to_string())?,
                ),
                Moments::Split { .. } => Moments::Split { m, v },
            };
        }
        self.step = step;
        Ok(())
    }
}
