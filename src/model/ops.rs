//! Layer primitives that keep the autograd graph.
//!
//! candle's fused `softmax_last_dim`, `layer_norm`, `rms_norm` and `rope*` kernels have no
//! backward and cut the graph without an error (shared/docs/reference/candle-training.md §1.2),
//! so every primitive here is built from ops that have one.

use candle_core::{DType, Result, Tensor, D};

/// LayerNorm over the last dim, composed (mean, variance, normalise, affine).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = upcast(xs)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dim of causal attention scores `(B, H, T, T)` after adding the
/// additive mask `(T, T)` (0 on and below the diagonal, -inf above).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let scores = scores.broadcast_add(mask)?;
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// GELU, tanh approximation (HF `gelu_new`).
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    xs.gelu()
}

/// Mean token cross-entropy of `logits (N, V)` against `targets (N)` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(&upcast(logits)?, targets)
}

/// The additive causal mask `(T, T)`: 0 where key <= query, -inf above the diagonal.
pub fn causal_mask(seq_len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
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
