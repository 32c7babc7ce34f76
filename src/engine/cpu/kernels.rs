//! The CPU kernels behind the fused ops and the written-out training step: plain functions on
//! row-major `f32` slices, parallel inside (rayon, gemm). No tensors, no graph.

use rayon::prelude::*;

use super::{bf16, simd};

/// Elements per rayon task: big enough that scheduling does not dominate.
pub const MIN_TASK_ELEMS: usize = 16 * 1024;

pub fn rows_per_task(row_len: usize) -> usize {
    (MIN_TASK_ELEMS / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------- matmul

/// The arithmetic of the matmuls (everything else is f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matmuls {
    /// f32 products and sums (the gemm crate).
    F32,
    /// Operands rounded to bf16, products summed in f32, f32 results: PyTorch autocast's
    /// arithmetic, on AVX512-BF16 (`bf16`). Only chosen where `bf16::available()`.
    Bf16,
}

/// `dst (m x n) = [dst +] a . b`, every operand given as (pointer, row stride, column
/// stride), in the arithmetic `mm` names. The one place that calls a matmul kernel.
///
/// # Safety
///
/// Each pointer must address its whole matrix with the given strides; with `Matmuls::Bf16`
/// the CPU must have AVX512-BF16 (`bf16::available()`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    accumulate: bool,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    scale: f32,
    parallel: bool,
    mm: Matmuls,
) {
    if mm == Matmuls::Bf16 {
        let (a, b) = (bf16::Strided { ptr: a.0, rs: a.1, cs: a.2 }, bf16::Strided { ptr: b.0, rs: b.1, cs: b.2 });
        // Safety: the caller's promise, passed on.
        return unsafe {
            bf16::gemm((m, n, k), dst, accumulate, bf16::Left::F32(a), bf16::Right::Strided(b), scale, parallel)
        };
    }
    let par = if parallel { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        accumulate,
        a.0,
        a.2 as isize,
        a.1 as isize,
        b.0,
        b.2 as isize,
        b.1 as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    )
}

/// Which operand is stored transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `a (m x k) . b (k x n)`
    Ab,
    /// `a (m x k) . b^T`, `b` stored `(n x k)`
    ABt,
    /// `a^T . b (k x n)`, `a` stored `(k x m)`
    AtB,
}

/// `dst (m x n) [+]= a . b` for contiguous row-major operands, in the given layout.
pub fn matmul(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    layout: Layout,
    accumulate: bool,
    mm: Matmuls,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul: operands smaller than {m}x{k}x{n}");
    let a_op = match layout {
        Layout::AtB => (a.as_ptr(), 1, m),
        _ => (a.as_ptr(), k, 1),
    };
    let b_op = match layout {
        Layout::ABt => (b.as_ptr(), 1, k),
        _ => (b.as_ptr(), n, 1),
    };
    // Safety: the sizes were checked above and the strides address row-major storage.
    unsafe { gemm_strided((m, n, k), (dst.as_mut_ptr(), n), accumulate, a_op, b_op, 1.0, true, mm) }
}

/// A weight matrix `W (rows x cols)`, row-major, packed for bf16 matmuls in both the
/// orientations the step multiplies by: `W` (the forward, `x . W`) and `W^T` (the input's
/// gradient, `dy . W^T`). Made once per optimizer step and shared by its micro-batches.
pub struct Panels {
    plain: bf16::PackedB,
    transposed: bf16::PackedB,
}

impl Panels {
    /// Packs `w (rows x cols)`. The CPU must have AVX512-BF16 (`bf16::available()`).
    pub fn new(w: &[f32], (rows, cols): (usize, usize)) -> Panels {
        assert!(bf16::available() && w.len() == rows * cols, "panels: {} values for {rows}x{cols}", w.len());
        let at = |rs, cs| bf16::Strided { ptr: w.as_ptr(), rs, cs };
        // Safety: checked above; both views address the rows x cols values.
        unsafe {
            Panels {
                plain: bf16::PackedB::new((rows, cols), at(cols, 1)),
                transposed: bf16::PackedB::new((cols, rows), at(1, cols)),
            }
        }
    }

    /// Packs `w` (the same shape) again into these panels.
    pub fn repack(&mut self, w: &[f32]) {
        let (rows, cols) = (self.plain.k(), self.plain.n());
        assert!(w.len() == rows * cols, "panels: {} values for {rows}x{cols}", w.len());
        let at = |rs, cs| bf16::Strided { ptr: w.as_ptr(), rs, cs };
        // Safety: panels exist only where the CPU has AVX512-BF16; both views address w.
        unsafe {
            self.plain.repack(at(cols, 1));
            self.transposed.repack(at(1, cols));
        }
    }

    /// Their size in memory.
    pub fn bytes(&self) -> usize {
        self.plain.bytes() + self.transposed.bytes()
    }
}

/// A weight as the matmuls take it: its values, and its bf16 panels when made for this step.
#[derive(Clone, Copy)]
pub struct Weight<'a> {
    pub values: &'a [f32],
    pub panels: Option<&'a Panels>,
}

impl<'a> From<&'a [f32]> for Weight<'a> {
    fn from(values: &'a [f32]) -> Self {
        Weight { values, panels: None }
    }
}

/// `dst (m x n) [+]= a (m x k) . W`, or `a . W^T` when `transposed` (`W` stored `n x k`), `a`
/// row-major: from the weight's panels when it has them and the matmuls are bf16.
pub fn matmul_weight(
    dst: &mut [f32],
    a: &[f32],
    w: Weight,
    (m, k, n): (usize, usize, usize),
    transposed: bool,
    accumulate: bool,
    mm: Matmuls,
) {
    let (Matmuls::Bf16, Some(panels)) = (mm, w.panels) else {
        let layout = if transposed { Layout::ABt } else { Layout::Ab };
        return matmul(dst, a, w.values, (m, k, n), layout, accumulate, mm);
    };
    assert!(dst.len() >= m * n && a.len() >= m * k, "matmul: operands smaller than {m}x{k}x{n}");
    let packed = if transposed { &panels.transposed } else { &panels.plain };
    let a = bf16::Left::F32(bf16::Strided { ptr: a.as_ptr(), rs: k, cs: 1 });
    // Safety: the sizes were checked above (and the panels' against the product by gemm);
    // panels exist only where the CPU has AVX512-BF16.
    unsafe { bf16::gemm((m, n, k), (dst.as_mut_ptr(), n), accumulate, a, bf16::Right::Packed(packed), 1.0, true) }
}

/// `dst (m x n) += scale * a . b` where `a` is already bf16 (its bits; stored `k x m` when
/// `a_transposed`) and `b (k x n)` a row-major matrix (a weight's plain panels when it has them).
/// The CPU must have AVX512-BF16.
pub fn matmul_bf16_left(
    dst: &mut [f32],
    a: &[u16],
    b: Weight,
    (m, k, n): (usize, usize, usize),
    a_transposed: bool,
    scale: f32,
) {
    assert!(
        bf16::available() && dst.len() >= m * n && a.len() >= m * k && b.values.len() >= k * n,
        "matmul: operands smaller than {m}x{k}x{n}"
    );
    let (rs, cs) = if a_transposed { (1, m) } else { (k, 1) };
    let left = bf16::Left::Bf16(bf16::StridedBf16 { ptr: a.as_ptr(), rs, cs });
    let right = match b.panels {
        Some(p) => bf16::Right::Packed(&p.plain),
        None => bf16::Right::Strided(bf16::Strided { ptr: b.values.as_ptr(), rs: n, cs: 1 }),
    };
    // Safety: the sizes and the instruction set were checked above.
    unsafe { bf16::gemm((m, n, k), (dst.as_mut_ptr(), n), true, left, right, scale, true) }
}

/// `acc += x`, element by element, in parallel.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(MIN_TASK_ELEMS)
        .zip(x.par_chunks(MIN_TASK_ELEMS))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
}

// ---------------------------------------------------------------- linear

/// `y (N x out) = x (N x in) . W (in x out) + b`.
pub fn linear(x: &[f32], w: Weight, b: &[f32], y: &mut [f32], mm: Matmuls) {
    let (n_out, n_in) = (b.len(), w.values.len() / b.len());
    let n = x.len() / n_in;
    for row in y.chunks_mut(n_out).take(n) {
        row.copy_from_slice(b);
    }
    matmul_weight(y, x, w, (n, n_in, n_out), false, true, mm);
}

/// Gradients of `linear`: `dx [+]= dy W^T`, `dW += x^T dy`, `db += colsum(dy)`.
pub fn linear_backward(
    x: &[f32],
    w: Weight,
    dy: &[f32],
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    db: &mut [f32],
    mm: Matmuls,
) {
    let n_out = db.len();
    let n_in = w.values.len() / n_out;
    let n = x.len() / n_in;
    if let Some((dx, accumulate)) = dx {
        matmul_weight(dx, dy, w, (n, n_out, n_in), true, accumulate, mm);
    }
    matmul(dw, x, dy, (n_in, n, n_out), Layout::AtB, true, mm);
    column_sum(dy, db);
}

/// `acc += sum of the rows of x (N x C)`.
pub fn column_sum(x: &[f32], acc: &mut [f32]) {
    let c = acc.len();
    let partials: Vec<Vec<f32>> = x
        .par_chunks(rows_per_task(c) * c)
        .map(|chunk| {
            let mut part = vec![0f32; c];
            for row in chunk.chunks(c) {
                part.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            part
        })
        .collect();
    for p in partials {
        acc.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
}

// ---------------------------------------------------------------- layer norm

/// A row's mean and 1/std.
pub fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let c = w.len();
    let rows = rows_per_task(c) * c;
    y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
            let (mean, rstd) = moments(xr, eps);
            for j in 0..c {
                yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
            }
        }
    });
}

/// `dx [+]= d LN / dx . dy`; `dw += sum dy * xhat`, `db += sum dy` (moments recomputed).
#[allow(clippy::too_many_arguments)] // the inputs and outputs of the math, as slices
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let rows = rows_per_task(c) * c;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(rows)
        .zip(x.par_chunks(rows).zip(dy.par_chunks(rows)))
        .map(|(dxc, (xc, gc))| {
            let mut acc = vec![0f32; 2 * c];
            for ((o, xr), gr) in dxc.chunks_mut(c).zip(xc.chunks(c)).zip(gc.chunks(c)) {
                let (mean, rstd) = moments(xr, eps);
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
                    let d = rstd * (gr[j] * w[j] - mg - xhat * mgx);
                    if accumulate {
                        o[j] += d
                    } else {
                        o[j] = d
                    }
                }
            }
            acc
        })
        .collect();
    for p in partials {
        dw.iter_mut().zip(&p[..c]).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(&p[c..]).for_each(|(a, v)| *a += v);
    }
}

// ---------------------------------------------------------------- GELU

pub fn gelu(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(MIN_TASK_ELEMS).zip(x.par_chunks(MIN_TASK_ELEMS)).for_each(|(yc, xc)| simd::gelu(xc, yc));
}

pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(MIN_TASK_ELEMS)
        .zip(x.par_chunks(MIN_TASK_ELEMS).zip(dy.par_chunks(MIN_TASK_ELEMS)))
        .for_each(|(oc, (xc, gc))| simd::gelu_backward(xc, gc, oc));
}

// ---------------------------------------------------------------- softmax

/// Causal softmax in place over `(.., T, T)`: row `i` keeps keys `0..=i`, the rest become 0.
pub fn causal_softmax(x: &[f32], t: usize, y: &mut [f32]) {
    let per_task = rows_per_task(t);
    y.par_chunks_mut(per_task * t).zip(x.par_chunks(per_task * t)).enumerate().for_each(|(task, (yc, xc))| {
        for (r, (yr, xr)) in yc.chunks_mut(t).zip(xc.chunks(t)).enumerate() {
            let i = (task * per_task + r) % t;
            let (valid, masked) = yr.split_at_mut(i + 1);
            let sum = simd::exp_shifted(&xr[..=i], simd::max(&xr[..=i]), valid);
            let inv = 1.0 / sum;
            valid.iter_mut().for_each(|o| *o *= inv);
            masked.iter_mut().for_each(|o| *o = 0.0);
        }
    });
}

/// `dx = y * (dy - sum(dy * y))` per row of length `t`.
pub fn softmax_backward(y: &[f32], dy: &[f32], t: usize, dx: &mut [f32]) {
    let rows = rows_per_task(t) * t;
    dx.par_chunks_mut(rows).zip(y.par_chunks(rows).zip(dy.par_chunks(rows))).for_each(|(dxc, (yc, dyc))| {
        for ((o, yr), gr) in dxc.chunks_mut(t).zip(yc.chunks(t)).zip(dyc.chunks(t)) {
            let dot = simd::dot(yr, gr);
            for ((o, a), b) in o.iter_mut().zip(yr).zip(gr) {
                *o = a * (b - dot);
            }
        }
    });
}
