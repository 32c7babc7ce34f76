//! The tied LM head and its cross-entropy on the CPU: `hidden (N, C)`, `wte (V, C)`,
//! `targets (N)`. When `N x V` logits fit in `KEEP_BYTES` the forward keeps the softmax it
//! computed and the backward only scales it and subtracts the one-hot. Otherwise logits are
//! made a chunk of rows at a time and never kept whole: the forward keeps each row's
//! log-sum-exp and the backward makes each chunk again. Either way `d_hidden = d_logits . wte`
//! and `d_wte = d_logits^T . hidden` come out contiguous, and log_softmax + gather's four or
//! more `(N, V)` temporaries never exist.

use rayon::prelude::*;

use super::kernels::{matmul, matmul_bf16_left, matmul_weight, Layout, Matmuls, Weight};
use super::{bf16, simd};

/// Keep the softmax between forward and backward up to this size (bytes).
const KEEP_BYTES: usize = 128 << 20;

thread_local! {
    /// The last logits buffer this thread made, for the next micro-batch: a fresh one is
    /// zeroed by the allocator (4% of a sanity-gpt2vocab step), and every element is written
    /// by the matmul before it is read anyway.
    static SPARE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The last kept bf16 gradient this thread made, likewise: one of 26 MB a micro-batch at
    /// GPT-2's vocabulary, allocated afresh, fragments the heap and the resident size grows.
    static SPARE_BF16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats whose contents are whatever it last held (zeros where it grew).
fn scratch(len: usize) -> Vec<f32> {
    let mut v = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v.truncate(len);
    v
}

/// Keeps `v` for the next `scratch` on this thread (the larger of it and the one kept).
fn spare(v: Vec<f32>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if v.len() > s.len() {
            *s = v;
        }
    });
}

/// Whether the training forward keeps `rows x vocab` probabilities (or, with bf16 matmuls,
/// their gradient in bf16) for the backward, rather than making the logits again there.
pub fn keeps_whole(rows: usize, vocab: usize) -> bool {
    rows * vocab * 4 <= KEEP_BYTES
}

/// Rows of logits made at once when they are not kept: about 32 MB.
fn chunk_rows(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).max(1)
}

/// Rows of logits made at once when the gradient is kept in bf16: the f32 buffer stays small
/// (6 MB at GPT-2's vocabulary), the kept gradient is half the size of a kept softmax.
const BF16_ROWS: usize = 32;

/// What the forward leaves for the backward.
pub struct Saved {
    lse: Vec<f32>,
    probs: Option<Vec<f32>>,
    /// With bf16 matmuls: `softmax - onehot` per row, rounded to bf16 as the matmuls of the
    /// backward would round it (autocast casts the logits' gradient to bf16 there too).
    grad_bf16: Option<Vec<u16>>,
}

/// Mean cross-entropy of `hidden . wte^T` against `targets`. Without `for_backward` (an
/// evaluation) the logits are made a chunk at a time and reduced to their log-sum-exp, never
/// normalised or kept.
pub fn forward(
    h: &[f32],
    wte: Weight,
    c: usize,
    targets: &[u32],
    for_backward: bool,
    mm: Matmuls,
) -> Result<(f32, Saved), String> {
    let w = wte.values;
    let (n, v) = (h.len() / c, w.len() / c);
    if n != targets.len() {
        return Err(format!("head cross-entropy: {n} rows but {} targets", targets.len()));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(format!("target id {bad} is outside the vocabulary of {v}"));
    }
    // all rows in one matmul when they fit (gemm packs `wte` once per call: per chunk of a
    // few rows, re-packing the whole vocabulary costs as much as the products)
    let keep = for_backward && keeps_whole(n, v);
    if !for_backward {
        let (lse, losses) = log_sum_exp_by_vocab_block(h, w, c, targets, mm);
        let total: f64 = losses.iter().map(|l| *l as f64).sum();
        return Ok(((total / n.max(1) as f64) as f32, Saved { lse, probs: None, grad_bf16: None }));
    }
    if keep && mm == Matmuls::Bf16 {
        return Ok(forward_keeping_bf16(h, wte, c, targets));
    }
    let rows = if keep { n } else { chunk_rows(v) };
    let mut logits = scratch(rows.min(n) * v);
    let mut lse = vec![0f32; n];
    let mut total = 0f64;
    for start in (0..n).step_by(rows) {
        let m = rows.min(n - start);
        let chunk = &mut logits[..m * v];
        matmul_weight(chunk, &h[start * c..(start + m) * c], wte, (m, c, v), true, false, mm);
        total += chunk
            .par_chunks_mut(v)
            .zip(lse[start..start + m].par_iter_mut())
            .zip(targets[start..start + m].par_iter())
            .map(|((row, l), &t)| {
                let max = simd::max(row);
                let target_logit = row[t as usize];
                if keep {
                    // the row becomes its softmax, for the backward
                    let sum = simd::exp_shifted_in_place(row, max);
                    *l = max + sum.ln();
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|p| *p *= inv);
                } else {
                    *l = max + simd::sum_exp_shifted(row, max).ln();
                }
                (*l - target_logit) as f64
            })
            .sum::<f64>();
    }
    let probs = if keep {
        Some(logits)
    } else {
        spare(logits);
        None
    };
    Ok(((total / n as f64) as f32, Saved { lse, probs, grad_bf16: None }))
}

/// The training forward with bf16 matmuls: logits `BF16_ROWS` rows at a time, each row's
/// softmax minus its one-hot kept in bf16 for the backward.
fn forward_keeping_bf16(h: &[f32], wte: Weight, c: usize, targets: &[u32]) -> (f32, Saved) {
    let (n, v) = (h.len() / c, wte.values.len() / c);
    let rows = BF16_ROWS.min(n);
    let mut logits = scratch(rows * v);
    let mut kept = SPARE_BF16.with(|s| std::mem::take(&mut *s.borrow_mut()));
    kept.resize(n * v, 0); // every element is written below
    let mut lse = vec![0f32; n];
    let mut total = 0f64;
    for start in (0..n).step_by(rows) {
        let m = rows.min(n - start);
        let chunk = &mut logits[..m * v];
        matmul_weight(chunk, &h[start * c..(start + m) * c], wte, (m, c, v), true, false, Matmuls::Bf16);
        total += chunk
            .par_chunks_mut(v)
            .zip(kept[start * v..(start + m) * v].par_chunks_mut(v))
            .zip(lse[start..start + m].par_iter_mut().zip(targets[start..start + m].par_iter()))
            .map(|((row, out), (l, &t))| {
                let max = simd::max(row);
                let target_logit = row[t as usize];
                let sum = simd::exp_shifted_in_place(row, max);
                *l = max + sum.ln();
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|p| *p *= inv);
                row[t as usize] -= 1.0;
                bf16::to_bf16(row, out);
                (*l - target_logit) as f64
            })
            .sum::<f64>();
    }
    spare(logits);
    ((total / n as f64) as f32, Saved { lse, probs: None, grad_bf16: Some(kept) })
}

/// Vocabulary entries per block of the forward-only loss: a block of `wte` (1 MB at C = 128)
/// and its logits for a few hundred rows stay in cache.
const VOCAB_BLOCK: usize = 2048;

/// The forward without a backward (evaluation): logits a block of the vocabulary at a time for
/// all rows, each row's log-sum-exp kept online (running max and rescaled sum, as flash
/// attention does). `wte` is read and packed once instead of once per chunk of rows, and no
/// logits leave the cache. Returns each row's log-sum-exp and its loss.
fn log_sum_exp_by_vocab_block(h: &[f32], w: &[f32], c: usize, targets: &[u32], mm: Matmuls) -> (Vec<f32>, Vec<f32>) {
    let (n, v) = (h.len() / c, w.len() / c);
    let (mut max, mut sum, mut target_logit) = (vec![f32::NEG_INFINITY; n], vec![0f32; n], vec![0f32; n]);
    let vb = VOCAB_BLOCK.min(v);
    let mut block = vec![0f32; n * vb];
    for start in (0..v).step_by(vb) {
        let nb = vb.min(v - start);
        let logits = &mut block[..n * nb];
        matmul(logits, h, &w[start * c..(start + nb) * c], (n, c, nb), Layout::ABt, false, mm);
        logits
            .par_chunks(nb)
            .zip(max.par_iter_mut().zip(sum.par_iter_mut()))
            .zip(target_logit.par_iter_mut().zip(targets.par_iter()))
            .for_each(|((row, (m, s)), (tl, &t))| {
                let new_max = m.max(simd::max(row));
                *s = *s * (*m - new_max).exp() + simd::sum_exp_shifted(row, new_max);
                *m = new_max;
                if let Some(x) = (t as usize).checked_sub(start).filter(|i| *i < nb) {
                    *tl = row[x];
                }
            });
    }
    let lse: Vec<f32> = max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect();
    let losses = lse.iter().zip(&target_logit).map(|(l, t)| l - t).collect();
    (lse, losses)
}

/// Each row's cross-entropy of `hidden . wte^T` against `targets`, without a backward (the loss
/// by position of an evaluation): the forward-only path, the losses kept per row.
pub fn token_losses(h: &[f32], w: &[f32], c: usize, targets: &[u32], mm: Matmuls) -> Result<Vec<f32>, String> {
    let (n, v) = (h.len() / c, w.len() / c);
    if n != targets.len() {
        return Err(format!("head cross-entropy: {n} rows but {} targets", targets.len()));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(format!("target id {bad} is outside the vocabulary of {v}"));
    }
    Ok(log_sum_exp_by_vocab_block(h, w, c, targets, mm).1)
}

/// Gradients of `g * loss`: `dh += d_logits . wte`, `dw += d_logits^T . h`, with
/// `d_logits = (softmax - onehot) * g / N`.
#[allow(clippy::too_many_arguments)] // the inputs and outputs of the math, as slices
pub fn backward(
    saved: Saved,
    h: &[f32],
    wte: Weight,
    c: usize,
    targets: &[u32],
    g: f32,
    dh: &mut [f32],
    dw: &mut [f32],
    mm: Matmuls,
) {
    let (n, v) = (h.len() / c, wte.values.len() / c);
    let scale = g / n as f32;
    let to_grad = |rows: &mut [f32], start: usize, lse: Option<&[f32]>| {
        rows.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let r = start + i;
            match lse {
                // logits -> (softmax - onehot) * scale
                Some(lse) => simd::scaled_exp_shifted_in_place(row, lse[r], scale),
                // a kept softmax: just scale
                None => row.iter_mut().for_each(|p| *p *= scale),
            }
            row[targets[r] as usize] -= scale;
        });
    };
    let mut emit = |d: &[f32], start: usize, m: usize| {
        matmul_weight(&mut dh[start * c..(start + m) * c], d, wte, (m, v, c), false, true, mm);
        matmul(dw, d, &h[start * c..(start + m) * c], (v, m, c), Layout::AtB, true, mm);
    };
    if let Some(mut d) = saved.probs {
        to_grad(&mut d, 0, None);
        emit(&d, 0, n);
        spare(d);
        return;
    }
    if let Some(kept) = saved.grad_bf16 {
        // the kept gradient is the matmuls' left operand as it is: dh = d . wte, dwte = d^T . h
        matmul_bf16_left(dh, &kept, wte, (n, v, c), false, scale);
        matmul_bf16_left(dw, &kept, h.into(), (v, n, c), true, scale);
        SPARE_BF16.with(|s| *s.borrow_mut() = kept);
        return;
    }
    let rows = chunk_rows(v);
    let mut d = scratch(rows.min(n) * v);
    for start in (0..n).step_by(rows) {
        let m = rows.min(n - start);
        let chunk = &mut d[..m * v];
        matmul_weight(chunk, &h[start * c..(start + m) * c], wte, (m, c, v), true, false, mm);
        to_grad(chunk, start, Some(&saved.lse));
        emit(chunk, start, m);
    }
    spare(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward-only loss (vocabulary blocks, online log-sum-exp) equals the training
    /// forward's, over a vocabulary that is not a whole number of blocks, with targets in every
    /// block and logits large enough that a missing rescale would show.
    #[test]
    fn the_blocked_forward_equals_the_training_forward() {
        let (n, c, v) = (37, 16, 2 * VOCAB_BLOCK + 301);
        let noise = |i: usize, k: f32| ((i as f32 * 12.9898).sin() * 43758.547).fract() * k;
        let h: Vec<f32> = (0..n * c).map(|i| noise(i, 3.0)).collect();
        let w: Vec<f32> = (0..v * c).map(|i| noise(i + 7, 2.0)).collect();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 977) % v) as u32).collect();
        assert!(targets.iter().any(|t| *t as usize >= 2 * VOCAB_BLOCK), "a target in the ragged last block");
        let (kept, saved) = forward(&h, w.as_slice().into(), c, &targets, true, Matmuls::F32).unwrap();
        let (blocked, lse) = forward(&h, w.as_slice().into(), c, &targets, false, Matmuls::F32).unwrap();
        assert!(saved.probs.is_some() && lse.probs.is_none());
        assert!((kept - blocked).abs() <= 1e-5 * kept.abs(), "{kept} vs {blocked}");
        for (a, b) in saved.lse.iter().zip(&lse.lse) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
    }
}
