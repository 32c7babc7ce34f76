//! Causal self-attention on the CPU, straight from the `c_attn` output: `qkv (B, T, 3C)` ->
//! `y (B, T, C)` with the heads already merged.
//!
//! Per (batch, head), in parallel: gather q and k (rotated when RoPE is on), `S = q k^T /
//! sqrt(hd)`, causal softmax in place, `y_h = P v` written into its head's columns of `y`.
//! The backward recomputes q and k, takes `P` from the forward (kept when it fits, else
//! recomputed), and writes `dq`, `dk`, `dv` into one `(B, T, 3C)` gradient. Against the
//! composed path this removes the head split/merge copies, the scale and mask ops, and
//! candle's zero-filled gradient slots for every `(B, H, T, T)` tensor. Dropout on the
//! attention probabilities is not fused: with dropout on, the model takes the composed path.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{gemm_strided, Matmuls};
use super::ops::slice;
use super::simd;

/// Keep the attention probabilities between forward and backward up to this size (bytes).
pub const KEEP_BYTES: usize = 256 << 20;

/// Rotary tables `(T, hd)` as plain floats.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
}

impl Rope {
    /// Host copies of `cos` and `sin` tables, each `(T, hd)` row-major.
    pub fn new(cos: Vec<f32>, sin: Vec<f32>) -> Self {
        Self { cos: Arc::new(cos), sin: Arc::new(sin) }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub h: usize,
    pub hd: usize,
    /// The matmuls' arithmetic.
    pub mm: Matmuls,
}

impl Dims {
    pub fn new(b: usize, t: usize, c: usize, n_head: usize, mm: Matmuls) -> Self {
        Self { b, t, c, h: n_head, hd: c / n_head, mm }
    }

    fn of(l: &Layout, n_head: usize, mm: Matmuls) -> Result<Self> {
        let &[b, t, c3] = l.dims() else { candle_core::bail!("attention: qkv must be (B, T, 3C), got {:?}", l.dims()) };
        let c = c3 / 3;
        if c3 % 3 != 0 || c % n_head != 0 {
            candle_core::bail!("attention: width {c3} is not 3 x a multiple of {n_head} heads")
        }
        Ok(Self::new(b, t, c, n_head, mm))
    }

    /// Floats of the attention probabilities of a batch.
    pub fn probs_len(&self) -> usize {
        self.b * self.h * self.t * self.t
    }
}

/// A raw pointer that parallel tasks write disjoint parts through.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// Safety: every task writes a region no other task touches (its own head's columns).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// A method, not a field access: closures then capture the whole `Shared` (Send + Sync),
    /// not the bare pointer.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Rotates each `(x[i], x[i + hd/2])` pair by the position's angle (or back).
fn rotate(rows: &mut [f32], t: usize, hd: usize, rope: &Rope, inverse: bool) {
    let half = hd / 2;
    for pos in 0..t {
        let row = &mut rows[pos * hd..(pos + 1) * hd];
        let (cos, sin) = (&rope.cos[pos * hd..pos * hd + half], &rope.sin[pos * hd..pos * hd + half]);
        for i in 0..half {
            let (a, b) = (row[i], row[i + half]);
            let s = if inverse { -sin[i] } else { sin[i] };
            row[i] = a * cos[i] - b * s;
            row[i + half] = b * cos[i] + a * s;
        }
    }
}

/// Head `head`'s q and k of batch `bi` as `(T, hd)` rows, rotated when RoPE is on.
fn qk(qkv: &[f32], d: &Dims, rope: &Option<Rope>, bi: usize, head: usize, q: &mut [f32], k: &mut [f32]) {
    for pos in 0..d.t {
        let src = (bi * d.t + pos) * 3 * d.c + head * d.hd;
        q[pos * d.hd..(pos + 1) * d.hd].copy_from_slice(&qkv[src..src + d.hd]);
        k[pos * d.hd..(pos + 1) * d.hd].copy_from_slice(&qkv[src + d.c..src + d.c + d.hd]);
    }
    if let Some(r) = rope {
        rotate(q, d.t, d.hd, r, false);
        rotate(k, d.t, d.hd, r, false);
    }
}

/// Query rows per block of the causal matmuls. Block `[r0, r1)` of queries only sees keys
/// `0..r1`, so the products skip the blocks above the diagonal: at T = 1024 about 47% of the
/// attention matmul work (at T = 256, 37%).
const ROW_BLOCK: usize = 64;

/// `(r0, r1)` row blocks covering `0..t`.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(ROW_BLOCK).map(move |r0| (r0, (r0 + ROW_BLOCK).min(t)))
}

/// `P = causal_softmax(q k^T / sqrt(hd))`.
fn probabilities(q: &[f32], k: &[f32], d: &Dims, p: &mut [f32]) {
    let scale = 1.0 / (d.hd as f32).sqrt();
    for (r0, r1) in row_blocks(d.t) {
        // Safety: q and k are (T, hd), p is (T, T), all row-major; rows r0..r1 of p, keys 0..r1.
        unsafe {
            gemm_strided(
                (r1 - r0, r1, d.hd),
                (p[r0 * d.t..].as_mut_ptr(), d.t),
                false,
                (q[r0 * d.hd..].as_ptr(), d.hd, 1),
                (k.as_ptr(), 1, d.hd),
                scale,
                false,
                d.mm,
            )
        };
    }
    // every entry right of the diagonal (computed or not) becomes 0 here
    for (i, row) in p.chunks_mut(d.t).enumerate() {
        let (valid, masked) = row.split_at_mut(i + 1);
        let sum = simd::exp_shifted_in_place(valid, simd::max(valid));
        let inv = 1.0 / sum;
        valid.iter_mut().for_each(|x| *x *= inv);
        masked.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// `y (B, T, C)` from `qkv (B, T, 3C)`; the probabilities go to `keep` when given.
pub fn forward(qkv: &[f32], d: &Dims, rope: &Option<Rope>, y: &mut [f32], keep: Option<&mut [f32]>) {
    assert!(qkv.len() == d.b * d.t * 3 * d.c && y.len() == d.b * d.t * d.c, "attention: buffer sizes");
    let tt = d.t * d.t;
    let out = Shared(y.as_mut_ptr());
    let work = |task: usize, p: &mut [f32]| {
        let (bi, head) = (task / d.h, task % d.h);
        let (mut q, mut k) = (vec![0f32; d.t * d.hd], vec![0f32; d.t * d.hd]);
        qk(qkv, d, rope, bi, head, &mut q, &mut k);
        probabilities(&q, &k, d, p);
        let v = &qkv[bi * d.t * 3 * d.c + 2 * d.c + head * d.hd..];
        for (r0, r1) in row_blocks(d.t) {
            // Safety: y_h is this task's own (T, hd) column block of y (row stride C); v is read
            // with row stride 3C inside qkv; query rows r0..r1 use keys 0..r1 only.
            unsafe {
                gemm_strided(
                    (r1 - r0, d.hd, r1),
                    (out.at((bi * d.t + r0) * d.c + head * d.hd), d.c),
                    false,
                    (p[r0 * d.t..].as_ptr(), d.t, 1),
                    (v.as_ptr(), 3 * d.c, 1),
                    1.0,
                    false,
                    d.mm,
                )
            };
        }
    };
    match keep {
        Some(kept) => kept[..d.probs_len()].par_chunks_mut(tt).enumerate().for_each(|(task, p)| work(task, p)),
        None => (0..d.b * d.h).into_par_iter().for_each(|task| work(task, &mut vec![0f32; tt])),
    }
}

/// `dqkv (B, T, 3C)` (overwritten) from `dy (B, T, C)`; `probs` from the forward, or none to
/// recompute them.
pub fn backward(qkv: &[f32], dy: &[f32], probs: Option<&[f32]>, d: &Dims, rope: &Option<Rope>, dqkv: &mut [f32]) {
    assert!(dqkv.len() == qkv.len() && dy.len() == d.b * d.t * d.c, "attention backward: buffer sizes");
    let tt = d.t * d.t;
    let out = Shared(dqkv.as_mut_ptr());
    (0..d.b * d.h).into_par_iter().for_each(|task| {
        let (bi, head) = (task / d.h, task % d.h);
        let (mut q, mut k) = (vec![0f32; d.t * d.hd], vec![0f32; d.t * d.hd]);
        qk(qkv, d, rope, bi, head, &mut q, &mut k);
        let mut own = vec![];
        let p: &[f32] = match probs {
            Some(all) => &all[task * tt..(task + 1) * tt],
            None => {
                own = vec![0f32; tt];
                probabilities(&q, &k, d, &mut own);
                &own
            }
        };
        let row0 = bi * d.t;
        let v = &qkv[row0 * 3 * d.c + 2 * d.c + head * d.hd..];
        let d_out = &dy[row0 * d.c + head * d.hd..];
        let mut dp = vec![0f32; tt];
        // Block [r0, r1) of rows of P (queries) is non-zero in columns 0..r1 only; block [c0, c1)
        // of its columns (keys) in rows c0..T only. Each product below reads just those parts.
        // Safety: all buffers have the stated shapes; the dv block is this task's own (T, hd)
        // columns of dqkv (row stride 3C).
        unsafe {
            for (c0, c1) in row_blocks(d.t) {
                // dV[c0..c1] = P[c0.., c0..c1]^T dO[c0..]
                gemm_strided(
                    (c1 - c0, d.hd, d.t - c0),
                    (out.at((row0 + c0) * 3 * d.c + 2 * d.c + head * d.hd), 3 * d.c),
                    false,
                    (p[c0 * d.t + c0..].as_ptr(), 1, d.t),
                    (d_out[c0 * d.c..].as_ptr(), d.c, 1),
                    1.0,
                    false,
                    d.mm,
                );
            }
            for (r0, r1) in row_blocks(d.t) {
                // dP[r0..r1, ..r1] = dO[r0..r1] V[..r1]^T; the rest of dp stays 0
                gemm_strided(
                    (r1 - r0, r1, d.hd),
                    (dp[r0 * d.t..].as_mut_ptr(), d.t),
                    false,
                    (d_out[r0 * d.c..].as_ptr(), d.c, 1),
                    (v.as_ptr(), 1, 3 * d.c),
                    1.0,
                    false,
                    d.mm,
                );
            }
        }
        // dS = P * (dP - rowsum(dP * P)); masked entries have P = 0, so dS = 0 there
        for (dpr, pr) in dp.chunks_mut(d.t).zip(p.chunks(d.t)) {
            let dot = simd::dot(dpr, pr);
            dpr.iter_mut().zip(pr).for_each(|(g, y)| *g = y * (*g - dot));
        }
        let (mut dq, mut dk) = query_key_grads(&dp, &q, &k, d);
        if let Some(r) = rope {
            rotate(&mut dq, d.t, d.hd, r, true);
            rotate(&mut dk, d.t, d.hd, r, true);
        }
        for pos in 0..d.t {
            let dst = (row0 + pos) * 3 * d.c + head * d.hd;
            // Safety: this task's own q and k columns of dqkv at this position.
            unsafe {
                std::ptr::copy_nonoverlapping(dq[pos * d.hd..].as_ptr(), out.at(dst), d.hd);
                std::ptr::copy_nonoverlapping(dk[pos * d.hd..].as_ptr(), out.at(dst + d.c), d.hd);
            }
        }
        drop(own);
    });
}

/// `dQ = dS K / sqrt(hd)` and `dK = dS^T Q / sqrt(hd)` for one (batch, head), `dS (T, T)`
/// causal (zero above the diagonal: only the blocks below it are read), q and k `(T, hd)`.
fn query_key_grads(ds: &[f32], q: &[f32], k: &[f32], d: &Dims) -> (Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (d.hd as f32).sqrt();
    let (mut dq, mut dk) = (vec![0f32; d.t * d.hd], vec![0f32; d.t * d.hd]);
    // Safety: dS is (T, T), q, k, dq and dk are (T, hd).
    unsafe {
        for (r0, r1) in row_blocks(d.t) {
            // dQ[r0..r1] = dS[r0..r1, ..r1] K[..r1]
            gemm_strided(
                (r1 - r0, d.hd, r1),
                (dq[r0 * d.hd..].as_mut_ptr(), d.hd),
                false,
                (ds[r0 * d.t..].as_ptr(), d.t, 1),
                (k.as_ptr(), d.hd, 1),
                scale,
                false,
                d.mm,
            );
            // dK[c0..c1] = dS[c0.., c0..c1]^T Q[c0..]   (the same blocks, read as key blocks)
            let (c0, c1) = (r0, r1);
            gemm_strided(
                (c1 - c0, d.hd, d.t - c0),
                (dk[c0 * d.hd..].as_mut_ptr(), d.hd),
                false,
                (ds[c0 * d.t + c0..].as_ptr(), 1, d.t),
                (q[c0 * d.hd..].as_ptr(), d.hd, 1),
                scale,
                false,
                d.mm,
            );
        }
    }
    (dq, dk)
}

/// The attention as a candle op (autograd path).
pub struct CausalAttention {
    pub n_head: usize,
    pub rope: Option<Rope>,
    /// Keep `P` for the backward (false when no backward will run: evaluation).
    pub keep: bool,
    pub mm: Matmuls,
    saved: Mutex<Option<Vec<f32>>>,
}

impl CausalAttention {
    pub fn new(n_head: usize, rope: Option<Rope>, keep: bool, mm: Matmuls) -> Self {
        Self { n_head, rope, keep, mm, saved: Mutex::new(None) }
    }
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("attention: poisoned lock".into())
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "difflab-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l, self.n_head, self.mm)?;
        let qkv = slice(s, l, self.name())?;
        let mut y = vec![0f32; d.b * d.t * d.c];
        if self.keep && d.probs_len() * 4 <= KEEP_BYTES {
            let mut kept = vec![0f32; d.probs_len()];
            forward(qkv, &d, &self.rope, &mut y, Some(&mut kept));
            *self.saved.lock().map_err(poisoned)? = Some(kept);
        } else {
            forward(qkv, &d, &self.rope, &mut y, None);
        }
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().map_err(poisoned)?.take();
        let op =
            AttentionBackward { n_head: self.n_head, rope: self.rope.clone(), mm: self.mm, probs: Mutex::new(saved) };
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

struct AttentionBackward {
    n_head: usize,
    rope: Option<Rope>,
    mm: Matmuls,
    probs: Mutex<Option<Vec<f32>>>,
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "difflab-causal-attention-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1, self.n_head, self.mm)?;
        let (qkv, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let kept = self.probs.lock().map_err(poisoned)?.take();
        let mut dqkv = vec![0f32; qkv.len()];
        backward(qkv, dy, kept.as_deref(), &d, &self.rope, &mut dqkv);
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}
