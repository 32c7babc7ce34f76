//! Fused CPU kernels with a real backward: causal softmax, LayerNorm, tanh-GELU and the tied
//! head with its cross-entropy. Each replaces a chain of composed ops (one allocation and one pass each)
//! by one parallel pass forward and one backward. candle's own fused kernels have no
//! backward and cut the graph (candle-training.md §1.2); these are `CustomOp`s whose `bwd`
//! is another kernel, so gradients flow. `ops` uses them for contiguous f32 on the CPU and the
//! composed versions elsewhere (CUDA, f64 gradient checks); tests hold the two equal.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd;

/// Rows processed per rayon task: big enough that scheduling does not dominate.
const MIN_CHUNK_ELEMS: usize = 16 * 1024;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &'static str) -> Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn rows_per_task(row_len: usize) -> usize {
    (MIN_CHUNK_ELEMS / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------- causal softmax

/// `softmax` over the last dim of attention scores `(.., T, T)` with the causal mask applied
/// inside (key `j > query i` gets probability 0). Scores must already be scaled.
pub struct CausalSoftmax;

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "difflab-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let t = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        let per_task = rows_per_task(t);
        y.par_chunks_mut(per_task * t).zip(x.par_chunks(per_task * t)).enumerate().for_each(|(task, (yc, xc))| {
            for (r, (yr, xr)) in yc.chunks_mut(t).zip(xc.chunks(t)).enumerate() {
                // the query position of this row within its (T, T) matrix
                let i = (task * per_task + r) % t;
                let valid = &xr[..=i];
                let sum = simd::exp_shifted(valid, simd::max(valid), &mut yr[..=i]);
                let inv = 1.0 / sum;
                yr[..=i].iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?))
    }
}

/// `dx = y * (dy - sum(dy * y))` per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "difflab-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let t = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        let rows = rows_per_task(t) * t;
        dx.par_chunks_mut(rows).zip(y.par_chunks(rows).zip(dy.par_chunks(rows))).for_each(|(dxc, (yc, dyc))| {
            for ((o, yr), gr) in dxc.chunks_mut(t).zip(yc.chunks(t)).zip(dyc.chunks(t)) {
                let dot = simd::dot(yr, gr);
                for ((o, a), b) in o.iter_mut().zip(yr).zip(gr) {
                    *o = a * (b - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- layer norm

pub struct LayerNorm {
    pub eps: f32,
}

/// Per-row mean and 1/std.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "difflab-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        let rows = rows_per_task(c) * c;
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
                let (mean, rstd) = moments(xr, self.eps);
                for j in 0..c {
                    yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let n = x.elem_count();
        // one kernel computes all three: a flat buffer [dx (N*C) | dw (C) | db (C)]
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, c)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + c, c)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "difflab-layer-norm-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let c = w.len();
        let n = x.len();
        let mut out = vec![0f32; n + 2 * c];
        let (dx, params) = out.split_at_mut(n);
        let rows = rows_per_task(c) * c;
        // dx per row; dw/db summed per task, then across tasks
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(rows)
            .zip(x.par_chunks(rows).zip(dy.par_chunks(rows)))
            .map(|(dxc, (xc, gc))| {
                let mut acc = vec![0f32; 2 * c];
                for ((o, xr), gr) in dxc.chunks_mut(c).zip(xc.chunks(c)).zip(gc.chunks(c)) {
                    let (mean, rstd) = moments(xr, self.eps);
                    let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                    for j in 0..c {
                        let xhat = (xr[j] - mean) * rstd;
                        let g = gr[j] * w[j];
                        sum_g += g;
                        sum_gx += g * xhat;
                        acc[j] += gr[j] * xhat;
                        acc[c + j] += gr[j];
                    }
                    let (mg, mgx) = (sum_g / c as f32, sum_gx / c as f32);
                    for j in 0..c {
                        let xhat = (xr[j] - mean) * rstd;
                        o[j] = rstd * (gr[j] * w[j] - mg - xhat * mgx);
                    }
                }
                acc
            })
            .collect();
        for p in partials {
            params.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

// ---------------------------------------------------------------- GELU (tanh)

/// HF `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "difflab-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(MIN_CHUNK_ELEMS).zip(x.par_chunks(MIN_CHUNK_ELEMS)).for_each(|(yc, xc)| simd::gelu(xc, yc));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "difflab-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(MIN_CHUNK_ELEMS)
            .zip(x.par_chunks(MIN_CHUNK_ELEMS).zip(dy.par_chunks(MIN_CHUNK_ELEMS)))
            .for_each(|(oc, (xc, gc))| simd::gelu_backward(xc, gc, oc));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- tied head + cross-entropy

/// Rows of logits held at once: `chunk x V` floats, about 32 MB.
fn head_chunk_rows(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).max(1)
}

/// `dst (m x n) = a (m x k) . b^T` with `b` stored `(n x k)` row-major: the tied head.
fn matmul_a_bt(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize) {
    // Safety: the slices hold m*k, n*k and m*n floats (checked by the callers' shapes), and
    // the strides below address them row-major; gemm writes only dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

/// The tied LM head and the mean cross-entropy in one op: `hidden (N, C)`, `wte (V, C)`,
/// `targets (N)` -> scalar loss. When the logits are small enough (`KEEP_BYTES`) the forward
/// keeps the softmax it computed and the backward only scales it and subtracts the one-hot.
/// Otherwise the logits are made a chunk of rows at a time and never kept whole: the forward
/// keeps each row's log-sum-exp and the backward makes each chunk's logits again. Either way
/// `d_hidden = d_logits . wte` and `d_wte = d_logits^T . hidden` come out contiguous (no
/// transposed gradient is ever added), and log_softmax + gather's four or more `(N, V)`
/// temporaries are gone.
pub struct HeadCrossEntropy {
    pub targets: Arc<Vec<u32>>,
    saved: std::sync::Mutex<Saved>,
}

/// What the forward leaves for the backward.
#[derive(Default)]
struct Saved {
    /// Per-row log-sum-exp.
    lse: Vec<f32>,
    /// The whole softmax `(N, V)`, when it was small enough to keep.
    probs: Option<Vec<f32>>,
}

/// Keep the softmax between forward and backward up to this size (bytes).
const KEEP_BYTES: usize = 128 << 20;

impl HeadCrossEntropy {
    pub fn new(targets: Arc<Vec<u32>>) -> Self {
        Self { targets, saved: std::sync::Mutex::new(Saved::default()) }
    }

    fn saved(&self) -> Result<std::sync::MutexGuard<'_, Saved>> {
        self.saved.lock().map_err(|_| candle_core::Error::Msg("head cross-entropy: poisoned lock".into()))
    }
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "difflab-head-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let c = *l1.dims().last().unwrap_or(&1);
        let (n, v) = (h.len() / c, w.len() / c);
        if n != self.targets.len() || *l2.dims().last().unwrap_or(&0) != c {
            candle_core::bail!("head cross-entropy: hidden {:?}, wte {:?}, {} targets", l1.dims(), l2.dims(), self.targets.len())
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target id {bad} is outside the vocabulary of {v}")
        }
        let keep = n * v * 4 <= KEEP_BYTES;
        let rows = if keep { n } else { head_chunk_rows(v) };
        let mut logits = vec![0f32; rows.min(n) * v];
        let mut lse = vec![0f32; n];
        let mut total = 0f64;
        for start in (0..n).step_by(rows) {
            let m = rows.min(n - start);
            let chunk = &mut logits[..m * v];
            matmul_a_bt(chunk, &h[start * c..(start + m) * c], w, m, v, c);
            let targets = &self.targets[start..start + m];
            total += chunk
                .par_chunks_mut(v)
                .zip(lse[start..start + m].par_iter_mut())
                .zip(targets.par_iter())
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
        let mut saved = self.saved()?;
        saved.lse = lse;
        saved.probs = keep.then_some(logits);
        Ok((CpuStorage::F32(vec![(total / n as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let (n, _) = h.dims2()?;
        let v = w.dim(0)?;
        let scale = g / n as f32;
        let (lse, probs) = {
            let mut saved = self.saved()?;
            (Arc::new(std::mem::take(&mut saved.lse)), saved.probs.take())
        };
        if let Some(mut d) = probs {
            // d_logits = (softmax - onehot) * g / N, in place on the kept softmax
            d.par_chunks_mut(v).zip(self.targets.par_iter()).for_each(|(row, &t)| {
                row.iter_mut().for_each(|p| *p *= scale);
                row[t as usize] -= scale;
            });
            let d = Tensor::from_vec(d, (n, v), h.device())?;
            return Ok((Some(d.matmul(w)?), Some(d.t()?.matmul(h)?)));
        }
        let rows = head_chunk_rows(v);
        let (mut dh, mut dw): (Vec<Tensor>, Option<Tensor>) = (vec![], None);
        for start in (0..n).step_by(rows) {
            let m = rows.min(n - start);
            let hc = h.narrow(0, start, m)?;
            let logits = hc.matmul(&w.t()?)?; // (m, V)
            let d = logits.apply_op1_no_bwd(&SoftmaxMinusOnehot { targets: self.targets.clone(), lse: lse.clone(), start, scale })?;
            dh.push(d.matmul(w)?); // (m, C)
            let dwc = d.t()?.matmul(&hc)?; // (V, C)
            dw = Some(match dw {
                Some(acc) => (acc + dwc)?,
                None => dwc,
            });
        }
        Ok((Some(Tensor::cat(&dh, 0)?), dw))
    }
}

/// `(softmax(logits) - onehot(target)) * scale` for rows `start..` of the batch, from the
/// log-sum-exp the forward kept.
struct SoftmaxMinusOnehot {
    targets: Arc<Vec<u32>>,
    lse: Arc<Vec<f32>>,
    start: usize,
    scale: f32,
}

impl CustomOp1 for SoftmaxMinusOnehot {
    fn name(&self) -> &'static str {
        "difflab-softmax-minus-onehot"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let v = *l.dims().last().unwrap_or(&1);
        let mut d = vec![0f32; x.len()];
        d.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(i, (o, row))| {
            let r = self.start + i;
            simd::scaled_exp_shifted(row, self.lse[r], self.scale, o);
            o[self.targets[r] as usize] -= self.scale;
        });
        Ok((CpuStorage::F32(d), l.shape().clone()))
    }
}

// ---------------------------------------------------------------- linear (HF Conv1D)

/// `y = x . W + b` with `x (N, in)`, `W (in, out)`, `b (out)`. One gemm forward (the bias
/// pre-filled into the output); backward `dx = dy . W^T`, `dW = x^T . dy` and `db` as a
/// parallel column sum. candle's composed broadcast-add backward reduces over rows with a
/// serial strided loop that cost more than both matmuls together.
pub struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "difflab-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
        let (n_in, n_out) = (l2.dims()[0], b.len());
        let n = x.len() / n_in;
        if l1.dims().last() != Some(&n_in) || w.len() != n_in * n_out {
            candle_core::bail!("linear: x {:?}, W {:?}, b {:?}", l1.dims(), l2.dims(), l3.dims())
        }
        let mut y = Vec::with_capacity(n * n_out);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        // Safety: x is (n, in), w is (in, out), y is (n, out), all row-major and of those sizes.
        unsafe {
            gemm::gemm(
                n,
                n_out,
                n_in,
                y.as_mut_ptr(),
                1,
                n_out as isize,
                true, // y = 1 * y + 1 * x.W: the bias is already in y
                x.as_ptr(),
                1,
                n_in as isize,
                w.as_ptr(),
                1,
                n_out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n_out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n_in, n_out) = w.dims2()?;
        let dy = grad.contiguous()?.reshape(((), n_out))?;
        let x2 = x.detach().reshape(((), n_in))?;
        let dx = dy.matmul(&w.detach().t()?)?.reshape(x.shape())?;
        let dw = x2.t()?.matmul(&dy)?;
        let db = dy.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Sums a `(N, C)` matrix over its rows.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "difflab-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let c = *l.dims().last().unwrap_or(&1);
        let rows = rows_per_task(c) * c;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(rows)
            .map(|chunk| {
                let mut acc = vec![0f32; c];
                for row in chunk.chunks(c) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let mut sum = vec![0f32; c];
        for p in partials {
            sum.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        Ok((CpuStorage::F32(sum), Shape::from(c)))
    }
}
