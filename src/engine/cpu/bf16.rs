//! bf16 matmuls on AVX512-BF16: `dst (m x n) = [dst +] scale * a . b` with f32 operands rounded
//! to bf16 (round to nearest even) as they are packed, products summed in f32 by `vdpbf16ps`,
//! and an f32 result: PyTorch autocast's arithmetic for a matmul, keeping the f32 output.
//!
//! The blocking is the usual one (Goto / BLIS): for each `KC`-deep slice of `k` and `NC`-wide
//! slice of `n`, `b` is packed once into `NR`-column panels; each `MC`-row block of `a` is packed
//! into `MR`-row panels by the thread that multiplies it, and a `MR x NR` register tile runs
//! over the pair. Packing is where the f32 -> bf16 conversion happens, so it is paid once per
//! element per block, not per product.
//!
//! `vdpbf16ps` multiplies pairs: lane `j` of the result gains `a0*b0[j] + a1*b1[j]` where
//! `(a0, a1)` and `(b0[j], b1[j])` are consecutive along `k`. So both packed operands hold
//! 32-bit words, each a pair of bf16 values at `k = 2p, 2p + 1` (the odd `k`'s partner is 0):
//! a panel is `kp = ceil(kc / 2)` rows of `W` words (`W` = `MR` for `a`, `NR` for `b`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of the register tile: 12 x 2 accumulators of 16 lanes, two `b` vectors and one
/// broadcast fit the 32 zmm registers.
const MR: usize = 12;
/// Columns of the register tile (two zmm of 16 f32).
const NR: usize = 32;
/// Depth of a packed slice: a `b` panel is `KC x NR` bf16 = 16 KiB, in L1 with its `a` panel.
const KC: usize = 256;
/// Rows of `a` one task packs and multiplies (10 panels, 60 KiB packed: in L2).
const MC: usize = 10 * MR;
/// Columns of `b` packed at once (1 MiB packed).
const NC: usize = 2048;

/// Whether this CPU runs the kernels (`avx512f` and `avx512_bf16`, as `/proc/cpuinfo` spells it).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits: the scalar form of what
/// `vcvtneps2bf16` does, for the ragged edges.
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `dst[i] = bf16(src[i])`, 16 at a time. The CPU must have AVX512-BF16 (`available()`).
pub fn to_bf16(src: &[f32], dst: &mut [u16]) {
    assert!(available() && src.len() == dst.len(), "to_bf16: {} values into {}", src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    // Safety: checked above.
    unsafe {
        to_bf16_wide(src, dst)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn to_bf16_wide(src: &[f32], dst: &mut [u16]) {
    let mut s = src.chunks_exact(16);
    let mut d = dst.chunks_exact_mut(16);
    for (s, d) in (&mut s).zip(&mut d) {
        // Safety: 16 values each side.
        unsafe {
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
            _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(v));
        }
    }
    s.remainder().iter().zip(d.into_remainder()).for_each(|(x, o)| *o = bf16_bits(*x));
}

/// A matrix in memory: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// A bf16 matrix in memory (as its bits): element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct StridedBf16 {
    pub ptr: *const u16,
    pub rs: usize,
    pub cs: usize,
}

/// The left operand of `gemm`: f32 values (rounded as they are packed), or bf16 already.
#[derive(Clone, Copy)]
pub enum Left {
    F32(Strided),
    Bf16(StridedBf16),
}

/// A raw pointer that tasks share; each writes only its own rows (see `gemm`).
#[derive(Clone, Copy)]
struct Shared<T>(T);
// Safety: used for pointers into buffers that outlive the tasks, where the tasks' regions are
// disjoint (C's row blocks) or only read (the operands, the packed `b`).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The value (a method, so closures capture the whole `Shared`, not its field).
    fn get(&self) -> T {
        self.0
    }
}

/// `b` packed once for many products (a weight, once per optimizer step): every `NC x KC`
/// block's panels as `gemm` packs them, so `gemm` skips its own packing.
pub struct PackedB {
    k: usize,
    n: usize,
    k_blocks: usize,
    /// Block `(n0 / NC, k0 / KC)` at `n0 / NC * k_blocks + k0 / KC`.
    blocks: Vec<Vec<u32>>,
}

impl PackedB {
    /// Packs `b (k x n)`, its blocks in parallel.
    ///
    /// # Safety
    ///
    /// `available()` must be true and `b` must address the whole `k x n` matrix.
    pub unsafe fn new((k, n): (usize, usize), b: Strided) -> PackedB {
        let k_blocks = k.div_ceil(KC);
        let blocks = (0..n.div_ceil(NC) * k_blocks)
            .map(|i| {
                let (n0, k0) = (i / k_blocks * NC, i % k_blocks * KC);
                vec![0u32; NC.min(n - n0).div_ceil(NR) * KC.min(k - k0).div_ceil(2) * NR]
            })
            .collect();
        let mut packed = PackedB { k, n, k_blocks, blocks };
        // Safety: the caller's promise.
        unsafe { packed.repack(b) };
        packed
    }

    /// Packs `b` (the same shape) again into these buffers: a weight after an optimizer step.
    ///
    /// # Safety
    ///
    /// As `new`.
    pub unsafe fn repack(&mut self, b: Strided) {
        let (k, n, k_blocks) = (self.k, self.n, self.k_blocks);
        let b = Shared(b);
        self.blocks.par_iter_mut().enumerate().for_each(|(i, out)| {
            let (n0, k0) = (i / k_blocks * NC, i % k_blocks * KC);
            // Safety: the block lies in b (the caller's promise).
            unsafe { pack_b_block(b.get(), (n0, k0), (n, KC.min(k - k0)), out, false) };
        });
    }

    /// `(k, n)`: the shape of the `b` it holds.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Its size in memory.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| 4 * b.len()).sum()
    }
}

/// The right operand of `gemm`: a matrix to pack, or one packed already.
#[derive(Clone, Copy)]
pub enum Right<'a> {
    Strided(Strided),
    Packed(&'a PackedB),
}

/// `dst (m x n, row stride ldc) = [dst +] scale * a (m x k) . b (k x n)` in bf16 products with
/// f32 sums; rayon tasks over blocks of rows when `parallel`. A packed `b` must be `k x n`.
///
/// # Safety
///
/// `available()` must be true; each pointer must address its whole matrix with the given
/// strides, and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    (dst, ldc): (*mut f32, usize),
    accumulate: bool,
    a: Left,
    b: Right<'_>,
    scale: f32,
    parallel: bool,
) {
    if let Right::Packed(p) = b {
        assert!((p.k, p.n) == (k, n), "bf16 gemm: b was packed {}x{}, the product needs {k}x{n}", p.k, p.n);
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // Safety: row i of dst has n elements.
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * ldc), n) }.fill(0.0);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (dst, a) = (Shared(dst), Shared(a));
        let mut own_b: Vec<u32> = Vec::new();
        for n0 in (0..n).step_by(NC) {
            let panels_b = NC.min(n - n0).div_ceil(NR);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let kp = kc.div_ceil(2);
                let packed_b = match b {
                    Right::Packed(p) => Shared(p.blocks[n0 / NC * p.k_blocks + k0 / KC].as_ptr()),
                    Right::Strided(b) => {
                        own_b.resize(panels_b * kp * NR, 0);
                        // Safety: the block lies in b (the caller's promise).
                        unsafe { pack_b_block(b, (n0, k0), (n, kc), &mut own_b, parallel) };
                        Shared(own_b.as_ptr())
                    }
                };
                // Tasks: blocks of MC rows, and where those are few, groups of `b` panels
                // too (each group packs its rows of `a` again: cheap next to its products),
                // so that rayon has a few tasks per thread to balance.
                let blocks = m.div_ceil(MC);
                let groups =
                    if parallel { (4 * rayon::current_num_threads()).div_ceil(blocks).clamp(1, panels_b) } else { 1 };
                let per_group = panels_b.div_ceil(groups);
                let task = |t: usize| {
                    let (m0, group) = (t / groups * MC, t % groups);
                    let rows = (m0, MC.min(m - m0));
                    let cols =
                        (n0 + group * per_group * NR, n0 + (((group + 1) * per_group).min(panels_b) * NR).min(n - n0));
                    // Safety: the block's rows of a and its tiles of dst lie in the matrices;
                    // this task alone writes those tiles; the `b` panels are packed above.
                    unsafe {
                        multiply_block(
                            a.get(),
                            packed_b.get(),
                            (k0, kc),
                            rows,
                            cols,
                            n0,
                            (dst.get(), ldc),
                            accumulate || k0 > 0,
                            scale,
                        )
                    };
                };
                if parallel && blocks * groups > 1 {
                    (0..blocks * groups).into_par_iter().for_each(task);
                } else {
                    (0..blocks * groups).for_each(task);
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, ldc, accumulate, a, b, scale, parallel);
        unreachable!("bf16 matmuls need x86-64 with AVX512-BF16 (check `available()` first)");
    }
}

/// Packs the `b` panels of the block at `(n0, k0)`: columns `n0..` (up to `NC`, within `n`), rows
/// `k0..k0 + kc`, into `out`; the panels in parallel when `parallel`.
///
/// # Safety
///
/// `b` must address the block; `out` holds its panels.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_b_block(b: Strided, (n0, k0): (usize, usize), (n, kc): (usize, usize), out: &mut [u32], parallel: bool) {
    let kp = kc.div_ceil(2);
    let b = Shared(b);
    let pack_panel = |(j, panel): (usize, &mut [u32])| {
        let b = b.get();
        let col = n0 + j * NR;
        // Safety: the panel's columns col.. (at most NR, within n) and rows k0..k0 + kc lie in b.
        unsafe { pack(b.ptr.add(k0 * b.rs + col * b.cs), (b.rs, b.cs), kc, NR.min(n - col), NR, panel) };
    };
    if parallel {
        out.par_chunks_mut(kp * NR).enumerate().for_each(pack_panel);
    } else {
        out.chunks_mut(kp * NR).enumerate().for_each(pack_panel);
    }
}

/// One task of `gemm`: packs rows `m0..m0 + mc` of `a` (columns `k0..k0 + kc`) into `MR`-row
/// panels and multiplies them by the packed `b` panels of columns `c0..c1` (`b`'s block starts at
/// column `n0`), each `MR x NR` tile of `dst` summed into when `beta`.
///
/// # Safety
///
/// The rows of `a`, the `b` panels and the tiles of `dst` must lie in their matrices, and no
/// other task may write these tiles.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_block(
    a: Left,
    packed_b: *const u32,
    (k0, kc): (usize, usize),
    (m0, mc): (usize, usize),
    (c0, c1): (usize, usize),
    n0: usize,
    (dst, ldc): (*mut f32, usize),
    beta: bool,
    scale: f32,
) {
    let kp = kc.div_ceil(2);
    let mut packed_a = vec![0u32; mc.div_ceil(MR) * kp * MR];
    for (i, out) in packed_a.chunks_mut(kp * MR).enumerate() {
        let (row, lines) = (m0 + i * MR, MR.min(mc - i * MR));
        // Safety: rows row.. (at most MR, within the block) and columns k0..k0 + kc of a.
        unsafe {
            match a {
                Left::F32(a) => pack(a.ptr.add(row * a.rs + k0 * a.cs), (a.cs, a.rs), kc, lines, MR, out),
                Left::Bf16(a) => pack_bf16(a.ptr.add(row * a.rs + k0 * a.cs), (a.cs, a.rs), kc, lines, MR, out),
            }
        };
    }
    for col in (c0..c1).step_by(NR) {
        let j = (col - n0) / NR;
        for (i, panel_a) in packed_a.chunks(kp * MR).enumerate() {
            let row = m0 + i * MR;
            // Safety: the tile (row.., col..) lies in dst (the caller's promise).
            unsafe {
                tile(
                    kp,
                    panel_a.as_ptr(),
                    packed_b.add(j * kp * NR),
                    (dst.add(row * ldc + col), ldc),
                    (MR.min(mc - i * MR), NR.min(c1 - col)),
                    beta,
                    scale,
                )
            };
        }
    }
}

/// Packs one panel: `lines` lines (rows of `a`, columns of `b`) of `kc` values along `k`,
/// element `(k, line)` at `src + k * sk + line * sl`, into `ceil(kc / 2)` rows of `width` words,
/// word `(p, line)` the bf16 pair at `k = 2p, 2p + 1`. Lines past `lines` and the partner of
/// an odd last `k` are 0.
///
/// # Safety
///
/// `src` must address the `kc x lines` values; `out` holds `ceil(kc / 2) * width` words.
#[cfg(target_arch = "x86_64")]
unsafe fn pack(src: *const f32, (sk, sl): (usize, usize), kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    debug_assert!(out.len() >= kp * width && lines <= width);
    // Safety (all three): reads stay within the kc x lines values, writes within out.
    if sl == 1 {
        unsafe { pack_across(src, sk, kc, lines, width, out) }
    } else if sk == 1 {
        unsafe { pack_along(src, sl, kc, lines, width, out) }
    } else {
        for p in 0..kp {
            let row = &mut out[p * width..(p + 1) * width];
            for (l, word) in row.iter_mut().enumerate() {
                *word = if l < lines {
                    let lo = unsafe { *src.add(2 * p * sk + l * sl) };
                    let hi = if 2 * p + 1 < kc { unsafe { *src.add((2 * p + 1) * sk + l * sl) } } else { 0.0 };
                    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
                } else {
                    0
                };
            }
        }
    }
}

/// `pack` where the lines are contiguous (`sl == 1`): 16 lines at a time from two rows of
/// `k`, converted, interleaved into pairs and stored whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_across(src: *const f32, sk: usize, kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    for p in 0..kc.div_ceil(2) {
        for l0 in (0..width).step_by(16) {
            let valid = lines.saturating_sub(l0).min(16);
            let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
            // Safety: masked loads read only the `valid` lines; the odd k's partner is zero.
            let (lo, hi) = unsafe {
                let lo = _mm512_maskz_loadu_ps(mask, src.add(2 * p * sk + l0));
                let hi = if 2 * p + 1 < kc {
                    _mm512_maskz_loadu_ps(mask, src.add((2 * p + 1) * sk + l0))
                } else {
                    _mm512_setzero_ps()
                };
                (lo, hi)
            };
            let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(lo)));
            let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(hi)));
            let words = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            let fits: __mmask16 = ((1u32 << (width - l0).min(16)) - 1) as __mmask16;
            // Safety: the store is masked to this row's `width` words.
            unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(p * width + l0) as *mut i32, fits, words) };
        }
    }
}

/// `pack` where `k` is contiguous (`sk == 1`): 16 lines at a time, 32 values of each converted
/// to 16 pairs, then the 16 x 16 words transposed in registers so that each row of pairs is
/// stored whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_along(src: *const f32, sl: usize, kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    for l0 in (0..width).step_by(16) {
        let store: __mmask16 = ((1u32 << (width - l0).min(16)) - 1) as __mmask16;
        for k0 in (0..kc).step_by(32) {
            let valid = (kc - k0).min(32);
            let (m_lo, m_hi) =
                (((1u32 << valid.min(16)) - 1) as __mmask16, ((1u32 << valid.saturating_sub(16)) - 1) as __mmask16);
            let mut rows = [_mm512_setzero_si512(); 16];
            for (l, row) in rows.iter_mut().enumerate() {
                if l0 + l < lines {
                    // Safety: masked loads read only line l0 + l's values k0..k0 + valid.
                    let line = unsafe { src.add((l0 + l) * sl + k0) };
                    let (lo, hi) =
                        unsafe { (_mm512_maskz_loadu_ps(m_lo, line), _mm512_maskz_loadu_ps(m_hi, line.add(16))) };
                    *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
            let pairs = transpose16(rows);
            for (i, row) in pairs.iter().enumerate().take(valid.div_ceil(2)) {
                // Safety: row k0 / 2 + i of the panel, masked to its `width` words.
                unsafe {
                    _mm512_mask_storeu_epi32(out.as_mut_ptr().add((k0 / 2 + i) * width + l0) as *mut i32, store, *row)
                };
            }
        }
    }
}

/// The transpose of a 16 x 16 matrix of 32-bit words held as 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(mut r: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let b = 4 * i;
        r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for h in [0, 8] {
        for j in 0..4 {
            t[h + j] = _mm512_shuffle_i32x4::<0x88>(r[h + j], r[h + j + 4]);
            t[h + j + 4] = _mm512_shuffle_i32x4::<0xdd>(r[h + j], r[h + j + 4]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
        r[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
    }
    r
}

/// `pack` from bf16 values: the same panels, no rounding.
///
/// # Safety
///
/// As `pack`.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_bf16(src: *const u16, (sk, sl): (usize, usize), kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    let kp = kc.div_ceil(2);
    debug_assert!(out.len() >= kp * width && lines <= width);
    // Safety (all three): reads stay within the kc x lines values, writes within out.
    if sl == 1 {
        unsafe { pack_bf16_across(src, sk, kc, lines, width, out) }
    } else if sk == 1 {
        unsafe { pack_bf16_along(src, sl, kc, lines, width, out) }
    } else {
        for p in 0..kp {
            for (l, word) in out[p * width..(p + 1) * width].iter_mut().enumerate() {
                *word = if l < lines {
                    let lo = unsafe { *src.add(2 * p * sk + l * sl) } as u32;
                    let hi = if 2 * p + 1 < kc { (unsafe { *src.add((2 * p + 1) * sk + l * sl) }) as u32 } else { 0 };
                    lo | hi << 16
                } else {
                    0
                };
            }
        }
    }
}

/// `pack_across` from bf16: 16 lines of two rows of `k` widened and interleaved into pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_bf16_across(src: *const u16, sk: usize, kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    for p in 0..kc.div_ceil(2) {
        for l0 in (0..width).step_by(16) {
            let valid = lines.saturating_sub(l0).min(16);
            let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
            // Safety: masked loads read only the `valid` lines; the odd k's partner is zero.
            let (lo, hi) = unsafe {
                let lo = _mm256_maskz_loadu_epi16(mask, src.add(2 * p * sk + l0) as *const i16);
                let hi = if 2 * p + 1 < kc {
                    _mm256_maskz_loadu_epi16(mask, src.add((2 * p + 1) * sk + l0) as *const i16)
                } else {
                    _mm256_setzero_si256()
                };
                (lo, hi)
            };
            let words = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
            let fits: __mmask16 = ((1u32 << (width - l0).min(16)) - 1) as __mmask16;
            // Safety: the store is masked to this row's `width` words.
            unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(p * width + l0) as *mut i32, fits, words) };
        }
    }
}

/// `pack_along` from bf16: 32 values of a line are already its 16 pairs; 16 lines transposed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_bf16_along(src: *const u16, sl: usize, kc: usize, lines: usize, width: usize, out: &mut [u32]) {
    for l0 in (0..width).step_by(16) {
        let store: __mmask16 = ((1u32 << (width - l0).min(16)) - 1) as __mmask16;
        for k0 in (0..kc).step_by(32) {
            let valid = (kc - k0).min(32);
            let mask: __mmask32 = ((1u64 << valid) - 1) as __mmask32;
            let mut rows = [_mm512_setzero_si512(); 16];
            for (l, row) in rows.iter_mut().enumerate() {
                if l0 + l < lines {
                    // Safety: a masked load of line l0 + l's values k0..k0 + valid.
                    *row = unsafe { _mm512_maskz_loadu_epi16(mask, src.add((l0 + l) * sl + k0) as *const i16) };
                }
            }
            let pairs = transpose16(rows);
            for (i, row) in pairs.iter().enumerate().take(valid.div_ceil(2)) {
                // Safety: row k0 / 2 + i of the panel, masked to its `width` words.
                unsafe {
                    _mm512_mask_storeu_epi32(out.as_mut_ptr().add((k0 / 2 + i) * width + l0) as *mut i32, store, *row)
                };
            }
        }
    }
}

/// One `MR x NR` tile of `dst` from a packed `a` panel and `b` panel `kp` pairs deep: `rows x
/// cols` of it are stored (the rest is padding), as `scale * sum`, added to `dst` when `beta`.
///
/// # Safety
///
/// The panels hold `kp * MR` and `kp * NR` words; `dst` addresses `rows x cols` with row
/// stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(
    kp: usize,
    a: *const u32,
    b: *const u32,
    (dst, ldc): (*mut f32, usize),
    (rows, cols): (usize, usize),
    beta: bool,
    scale: f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        // Safety: within the panels (kp rows each).
        let (b0, b1) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_epi32(b.add(p * NR) as *const i32)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_epi32(b.add(p * NR + 16) as *const i32)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = unsafe { *a.add(p * MR + r) } as i32;
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    let s = _mm512_set1_ps(scale);
    let masks = [((1u32 << cols.min(16)) - 1) as __mmask16, ((1u64 << cols.saturating_sub(16)) - 1) as __mmask16];
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for h in 0..2 {
            // Safety: masked to the tile's `cols` columns of row r.
            unsafe {
                let at = dst.add(r * ldc + 16 * h);
                let mut v = _mm512_mul_ps(acc[h], s);
                if beta {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], at));
                }
                _mm512_mask_storeu_ps(at, masks[h], v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transpose_of_sixteen_rows_is_their_columns() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let words: Vec<i32> = (0..256).collect();
        // Safety: AVX-512 is available (checked above); each row reads 16 of the 256 words.
        let rows: [__m512i; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_epi32(words[16 * i..].as_ptr()) });
        let mut got = [0i32; 256];
        for (i, row) in unsafe { transpose16(rows) }.iter().enumerate() {
            unsafe { _mm512_storeu_epi32(got[16 * i..].as_mut_ptr(), *row) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[16 * i + j], words[16 * j + i], "({i}, {j})");
            }
        }
    }

    /// `x` as the kernels multiply it.
    fn round_to_bf16(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    #[test]
    fn the_vector_conversion_rounds_as_the_scalar_one() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // 37 values: two vectors and a tail; ties, tiny, huge and negative values
        let mut src: Vec<f32> =
            (0..37).map(|i| (1.0 + i as f32 / 256.0) * if i % 2 == 0 { 1.0 } else { -3e-3 }).collect();
        // halfway between two bf16 values: ties go to the even one (1.0, and 1 + 2^-6)
        src[3] = 1.0 + 1.0 / 256.0;
        src[20] = 1.0 + 3.0 / 256.0;
        let mut wide = vec![0u16; src.len()];
        to_bf16(&src, &mut wide);
        let scalar: Vec<u16> = src.iter().map(|x| bf16_bits(*x)).collect();
        assert_eq!(wide, scalar);
        assert_eq!((wide[3], wide[20]), (0x3f80, 0x3f82));
        assert!(src.iter().any(|x| round_to_bf16(*x) != *x), "some values needed rounding");
    }

    /// A matrix stored with the given layout, and an accessor for its element (i, j).
    struct Stored {
        data: Vec<f32>,
        rs: usize,
        cs: usize,
    }

    impl Stored {
        /// `rows x cols` of pseudo-random values, row-major, transposed, or with padded strides.
        fn new(rows: usize, cols: usize, layout: usize, seed: u32) -> Stored {
            let (rs, cs, len) = match layout {
                0 => (cols, 1, rows * cols),
                1 => (1, rows, rows * cols),
                _ => (2 * cols + 3, 2, rows * (2 * cols + 3)),
            };
            let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
            let data = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state % 20_000) as f32 / 10_000.0 - 1.0
                })
                .collect();
            Stored { data, rs, cs }
        }

        fn at(&self, i: usize, j: usize) -> f32 {
            self.data[i * self.rs + j * self.cs]
        }

        fn strided(&self) -> Strided {
            Strided { ptr: self.data.as_ptr(), rs: self.rs, cs: self.cs }
        }

        /// The values rounded to bf16, with the same layout.
        fn bits(&self) -> Vec<u16> {
            self.data.iter().map(|x| bf16_bits(*x)).collect()
        }
    }

    /// Ragged shapes (none a multiple of the 12 x 32 tile, the 256-deep slice or the 120-row
    /// block but some), every operand layout, overwrite and accumulate, serial and parallel:
    /// each entry equals the f64 sum of the bf16-rounded products to f32 accumulation error.
    #[test]
    fn matches_a_reference_on_ragged_shapes_and_every_layout() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let shapes = [(1, 1, 1), (13, 33, 7), (25, 65, 257), (121, 40, 513), (12, 32, 256), (3, 2070, 2), (130, 5, 31)];
        let mut case = 0u32;
        for &(m, n, k) in &shapes {
            for la in 0..3 {
                for lb in 0..3 {
                    case += 1;
                    let (a, b) = (Stored::new(m, k, la, case), Stored::new(k, n, lb, case + 1000));
                    let (accumulate, scale, parallel) =
                        (case.is_multiple_of(2), if case.is_multiple_of(3) { 0.125 } else { 1.0 }, case % 4 < 2);
                    let ldc = n + 5;
                    let before: Vec<f32> = (0..m * ldc).map(|i| (i % 7) as f32 - 3.0).collect();
                    let mut dst = before.clone();
                    // every third case takes b packed beforehand, as weights are
                    // Safety: the operands and dst have the stated shapes and strides.
                    let packed = (case % 3 == 1).then(|| unsafe { PackedB::new((k, n), b.strided()) });
                    let right = packed.as_ref().map_or(Right::Strided(b.strided()), Right::Packed);
                    // every other case takes a as bf16 already, as the head's kept gradient is
                    let a_bits = a.bits();
                    let left = if case % 2 == 1 {
                        Left::Bf16(StridedBf16 { ptr: a_bits.as_ptr(), rs: a.rs, cs: a.cs })
                    } else {
                        Left::F32(a.strided())
                    };
                    unsafe { gemm((m, n, k), (dst.as_mut_ptr(), ldc), accumulate, left, right, scale, parallel) };
                    for i in 0..m {
                        for j in 0..n {
                            let (mut sum, mut size) = (0f64, 0f64);
                            for p in 0..k {
                                let x = round_to_bf16(a.at(i, p)) as f64 * round_to_bf16(b.at(p, j)) as f64;
                                sum += x;
                                size += x.abs();
                            }
                            let want = scale as f64 * sum + if accumulate { before[i * ldc + j] as f64 } else { 0.0 };
                            let got = dst[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + size),
                                "{m}x{n}x{k} layouts {la}/{lb} at ({i}, {j}): {got} vs {want}"
                            );
                        }
                        // the padding past n in each row is untouched
                        assert_eq!(&dst[i * ldc + n..(i + 1) * ldc], &before[i * ldc + n..(i + 1) * ldc]);
                    }
                }
            }
        }
    }
}
