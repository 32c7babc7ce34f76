//! In-place optimizer kernels for CPU tensors: gradient accumulation, the global norm, and the
//! AdamW update in two passes (moments, then the parameter) with the clipping factor folded
//! in. The tensor-op version allocates a temporary for each of its ten or so operations per
//! parameter; these write into the existing buffers.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::engine::cpu::kernels::MIN_TASK_ELEMS as CHUNK;

fn src<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::engine::cpu::ops::slice(s, l, "optimizer")
}

fn dst<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("optimizer: tensor not contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("optimizer: f32 only"),
    }
}

/// `dst += src`.
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "difflab-add-into"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        let (x, acc) = (src(s, sl)?, dst(d, dl)?);
        crate::engine::cpu::kernels::add_into(acc, x);
        Ok(())
    }
}

/// Whether the in-place kernels can take these tensors (f32, contiguous, on the CPU).
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `acc += g` in place.
pub fn add_into(acc: &Tensor, g: &Tensor) -> Result<()> {
    acc.inplace_op2(g, &AddInto)
}

/// Sum of squares, in f64, without a squared temporary.
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    crate::engine::cpu::ops::with_host(t, |x| {
        x.par_chunks(CHUNK).map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>()).sum()
    })
}

/// The packed moments `[m | v]` of one parameter: `m = b1 m + (1-b1) g s`,
/// `v = b2 v + (1-b2) (g s)^2`, `s` the clipping factor.
pub struct MomentUpdate {
    pub beta1: f32,
    pub beta2: f32,
    pub grad_scale: f32,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "difflab-adamw-moments"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        let (g, mv) = (src(s, sl)?, dst(d, dl)?);
        let n = g.len();
        let (m, v) = mv.split_at_mut(n);
        let (b1, b2, k) = (self.beta1, self.beta2, self.grad_scale);
        m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((m, v), g)| {
            for ((m, v), g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                let g = g * k;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
            }
        });
        Ok(())
    }
}

/// `theta = theta (1 - lr wd) - step_size m / (sqrt(v) / bias2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Apply {
    pub decay: f32,
    pub step_size: f32,
    pub bias2_sqrt: f32,
    pub eps: f32,
}

impl InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "difflab-adamw-apply"
    }

    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        let (mv, theta) = (src(s, sl)?, dst(d, dl)?);
        let n = theta.len();
        let (m, v) = mv.split_at(n);
        let inv_b2 = 1.0 / self.bias2_sqrt;
        theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(th, (m, v))| {
            for ((t, m), v) in th.iter_mut().zip(m).zip(v) {
                *t = *t * self.decay - self.step_size * m / (v.sqrt() * inv_b2 + self.eps);
            }
        });
        Ok(())
    }
}

/// `(||delta||^2, ||theta_before||^2)` of the update `apply` (with decay `decay`) made to
/// `theta`, from the weights after it and the packed moments `[m | v]` it used.
pub fn update_squares(theta: &Tensor, mv: &Tensor, apply: &Apply, decay: f32) -> Result<(f64, f64)> {
    let theta = theta.flatten_all()?;
    crate::engine::cpu::ops::with_host(&theta, |th| {
        crate::engine::cpu::ops::with_host(mv, |mv| {
            let (m, v) = mv.split_at(th.len());
            let (s, d, inv_b2, eps) =
                (apply.step_size as f64, decay as f64, 1.0 / apply.bias2_sqrt as f64, apply.eps as f64);
            th.par_chunks(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .map(|(th, (m, v))| {
                    let (mut du, mut w) = (0.0f64, 0.0f64);
                    for ((t, m), v) in th.iter().zip(m).zip(v) {
                        let u = *m as f64 / ((*v as f64).sqrt() * inv_b2 + eps);
                        let before = (*t as f64 + s * u) / d;
                        du += (*t as f64 - before).powi(2);
                        w += before * before;
                    }
                    (du, w)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
        })
    })?
}
