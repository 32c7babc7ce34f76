//! Named gradients: accumulation over micro-batches, global norm and clipping.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};

pub type Grads = BTreeMap<String, Tensor>;

/// Adds `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut Grads, more: Grads) -> Result<()> {
    for (name, g) in more {
        let sum = match acc.remove(&name) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        acc.insert(name, sum);
    }
    Ok(())
}

/// The global L2 norm over all gradients, summed on the device with one host sync.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let squares = grads
        .values()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let total = Tensor::stack(&squares, 0)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))` (torch's `clip_grad_norm_`).
pub fn clip(grads: &mut Grads, norm: f64, max_norm: f64) -> Result<()> {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}
