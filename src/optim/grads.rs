//! Named gradients: accumulation over micro-batches, global norm and the clipping factor.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};

use super::cpu;

pub type Grads = BTreeMap<String, Tensor>;

/// Adds `more` into `acc` (gradient accumulation), in place on the CPU.
pub fn accumulate(acc: &mut Grads, more: Grads) -> Result<()> {
    for (name, g) in more {
        match acc.get(&name) {
            Some(prev) if cpu::applies(&[prev, &g]) => cpu::add_into(prev, &g)?,
            Some(prev) => {
                let sum = (prev + g)?;
                acc.insert(name, sum);
            }
            None => {
                acc.insert(name, g);
            }
        }
    }
    Ok(())
}

/// The global L2 norm over all gradients (one host sync on a GPU).
pub fn global_norm(grads: &Grads) -> Result<f64> {
    Ok(squares(grads)?.values().sum::<f64>().sqrt())
}

/// Each gradient's sum of squares, by parameter name (one host sync on a GPU).
pub fn squares(grads: &Grads) -> Result<BTreeMap<String, f64>> {
    if grads.is_empty() {
        return Ok(BTreeMap::new());
    }
    let values = if grads.values().all(|g| cpu::applies(&[g])) {
        grads.values().map(cpu::sum_squares).collect::<Result<Vec<_>>>()?
    } else {
        let sums = grads.values().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<Result<Vec<_>>>()?;
        Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?
    };
    Ok(grads.keys().cloned().zip(values).collect())
}

/// `min(1, max_norm / (norm + 1e-6))`: what torch's `clip_grad_norm_` scales gradients by.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}
