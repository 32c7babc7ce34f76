//! Optimisation, PyTorch / Hugging Face semantics: AdamW with decoupled weight decay on 2-D
//! parameters only, global-norm clipping, gradient accumulation and the LR schedules.

pub mod adamw;
pub mod cpu;
pub mod grads;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{LrSchedule, ScheduleKind};

use candle_core::Result;

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
