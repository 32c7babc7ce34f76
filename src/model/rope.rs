//! Rotary position embedding, GPT-NeoX / Llama `rotate_half` style over the full head dim.
//!
//! `inv_freq[i] = theta^(-2i/hd)` for i < hd/2, `emb = cat(freqs, freqs)`,
//! `x' = x cos(emb) + rotate_half(x) sin(emb)`, `rotate_half(x) = cat(-x[hd/2:], x[:hd/2])`.
//! Composed from narrow/cat/mul so it has a backward (candle's fused `rope*` have none).

use candle_core::{Device, Result, Tensor, D};

use crate::engine::cpu::attention::Rope;

/// The cos and sin tables, `(T, hd)` each, computed in f32 as the reference does.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryTables {
    pub fn new(seq_len: usize, head_dim: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let mut cos = Vec::with_capacity(seq_len * head_dim);
        let mut sin = Vec::with_capacity(seq_len * head_dim);
        for pos in 0..seq_len {
            // emb = cat(freqs, freqs): the second half repeats the first
            for _ in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (seq_len, head_dim), device)?,
            sin: Tensor::from_vec(sin, (seq_len, head_dim), device)?,
        })
    }

    /// Positions the tables cover.
    pub fn len(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same tables as host floats, for the CPU engine's fused attention.
    pub fn host(&self) -> Result<Rope> {
        Ok(Rope::new(self.cos.flatten_all()?.to_vec1()?, self.sin.flatten_all()?.to_vec1()?))
    }

    /// Rotates `xs (B, H, T, hd)` by position.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply_from(xs, 0)
    }

    /// Rotates `xs (B, H, T, hd)` whose first row sits at position `start` (generation with a
    /// KV cache: the new tokens come after `start` cached ones).
    pub fn apply_from(&self, xs: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, seq_len, hd) = xs.dims4()?;
        let dtype = xs.dtype();
        let cos = self.cos.narrow(0, start, seq_len)?.to_dtype(dtype)?;
        let sin = self.sin.narrow(0, start, seq_len)?.to_dtype(dtype)?;
        let x1 = xs.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = xs.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        xs.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
    }
}
