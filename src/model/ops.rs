//! Layer primitives that keep the autograd graph.
//!
//! candle's fused `softmax_last_dim`, `layer_norm`, `rms_norm` and `rope*` kernels have no
//! backward and cut the graph without an error (their `CustomOp`s define no `bwd`), so every
//! primitive here is built from ops that have one. Each takes the `Kernels` the run's
//! engine chose: the fused CPU ops (`engine::cpu::ops`, with their own backward) or the
//! composed chain.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, D};

use crate::engine::cpu::ops as fused;
use crate::engine::Kernels;

/// `y = x . W + b` for `x (.., in)`, `W (in, out)` (HF Conv1D layout).
pub fn linear(k: Kernels, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if let Kernels::FusedCpu(mm) = k {
        return xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, fused::Linear(mm));
    }
    composed_linear(xs, weight, bias)
}

pub fn composed_linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let n_in = dims[dims.len() - 1];
    let mut out = dims.clone();
    let last = out.len() - 1;
    out[last] = weight.dim(1)?;
    xs.reshape(((), n_in))?.matmul(weight)?.broadcast_add(bias)?.reshape(out)
}

/// LayerNorm over the last dim.
pub fn layer_norm(k: Kernels, xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if matches!(k, Kernels::FusedCpu(_)) {
        return xs.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            fused::LayerNormOp { eps: eps as f32 },
        );
    }
    composed_layer_norm(xs, weight, bias, eps)
}

/// LayerNorm, composed (mean, variance, normalise, affine): the path every device has.
pub fn composed_layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = upcast(xs)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dim of causal attention scores `(B, H, T, T)`; keys after the query
/// get probability 0. `mask` is the additive `(T, T)` mask the composed path uses.
pub fn causal_softmax(k: Kernels, scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if matches!(k, Kernels::FusedCpu(_)) {
        return scores.contiguous()?.apply_op1(fused::CausalSoftmax);
    }
    composed_causal_softmax(scores, mask)
}

/// Composed causal softmax; half-precision scores are normalised in f32.
pub fn composed_causal_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let scores = upcast(scores)?.broadcast_add(&upcast(mask)?)?;
    candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)
}

/// GELU, tanh approximation (HF `gelu_new`).
pub fn gelu(k: Kernels, xs: &Tensor) -> Result<Tensor> {
    if matches!(k, Kernels::FusedCpu(_)) {
        return xs.contiguous()?.apply_op1(fused::Gelu);
    }
    xs.gelu()
}

/// Mean token cross-entropy of `logits (N, V)` against `targets (N)` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(&upcast(logits)?, targets)
}

/// The tied head and the loss together: `hidden (N, C)`, `wte (V, C)`, `targets (N)` ->
/// mean cross-entropy of `hidden . wte^T`. Fused (logits made a chunk at a time) on the CPU.
pub fn head_cross_entropy(k: Kernels, hidden: &Tensor, wte: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if let Kernels::FusedCpu(mm) = k {
        let targets = Arc::new(targets.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?);
        // without a graph (evaluation) nothing is kept for a backward
        let for_backward = hidden.track_op() || wte.track_op();
        return hidden
            .contiguous()?
            .apply_op2(&wte.contiguous()?, fused::HeadCrossEntropy::new(targets, for_backward, mm));
    }
    composed_head_cross_entropy(hidden, wte, targets)
}

/// Each row's loss through the tied head (evaluation: no backward): `hidden (N, C)`, `wte (V,
/// C)`, `targets (N)` -> `(N)` in f32.
pub fn head_token_losses(k: Kernels, hidden: &Tensor, wte: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.flatten_all()?;
    if let Kernels::FusedCpu(mm) = k {
        let targets = Arc::new(targets.to_vec1::<u32>()?);
        return hidden
            .detach()
            .contiguous()?
            .apply_op2(&wte.detach().contiguous()?, fused::HeadTokenLosses { targets, mm });
    }
    let wte = wte.to_dtype(hidden.dtype())?;
    let log_probs = candle_nn::ops::log_softmax(&upcast(&hidden.matmul(&wte.t()?)?)?, candle_core::D::Minus1)?;
    log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// The head matmul in the compute dtype (bf16 on CUDA), the loss in f32.
pub fn composed_head_cross_entropy(hidden: &Tensor, wte: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let wte = wte.to_dtype(hidden.dtype())?;
    cross_entropy(&hidden.matmul(&wte.t()?)?, targets)
}

/// The additive causal mask `(T, T)`: 0 where key <= query, -inf above the diagonal.
pub fn causal_mask(seq_len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq_len).flat_map(|i| (0..seq_len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// Half-precision tensors are computed in f32 where precision matters (norms, softmax, loss);
/// f32 and f64 pass through.
pub fn upcast(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}
