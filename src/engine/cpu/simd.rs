//! Vectorised elementwise kernels for the fused ops: exp, tanh-GELU and row sums, written so
//! LLVM vectorises them, and compiled three times (AVX-512, AVX2+FMA, baseline) with the best
//! picked at run time. libm's scalar `expf`/`tanhf` were over half the time of the softmax,
//! cross-entropy and GELU kernels.

/// `e^x`, Cephes `expf`: range reduction by ln 2 (split in two constants) and a degree-6
/// polynomial; within 2 ulp of `f32::exp` on [-87, 88]. Below -87 it returns ~1e-38 (not 0),
/// which no caller can tell from 0 in a sum.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a call
    const ROUND: f32 = 12_582_912.0;
    #[allow(clippy::manual_clamp)] // max/min map NaN to a bound; clamp would keep it
    let x = x.max(-87.0).min(88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    #[allow(clippy::excessive_precision)] // the fitted coefficients as published
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // n sits in the low mantissa bits of `shifted`: reading them as an integer avoids a
    // float-to-int conversion, which would stop the loop from vectorising
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `tanh x = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})`: no overflow, absolute error ~1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let t = exp(-2.0 * x.abs());
    ((1.0 - t) / (1.0 + t)).copysign(x)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// Sum with 16 independent accumulators (a plain fold cannot be vectorised: float addition
/// is not associative).
#[inline(always)]
fn sum16(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max16(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[inline(always)]
fn exp_shifted_impl(xs: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = exp(x - shift);
    }
    sum16(out)
}

#[inline(always)]
fn exp_shifted_in_place_impl(xs: &mut [f32], shift: f32) -> f32 {
    for x in xs.iter_mut() {
        *x = exp(*x - shift);
    }
    sum16(xs)
}

#[inline(always)]
fn sum_exp_shifted_impl(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|x| exp(x - shift)).sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += exp(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn scaled_exp_shifted_in_place_impl(xs: &mut [f32], shift: f32, scale: f32) {
    for x in xs.iter_mut() {
        *x = exp(*x - shift) * scale;
    }
}

#[inline(always)]
fn gelu_impl(xs: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(xs) {
        *o = 0.5 * v * (1.0 + tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v)));
    }
}

#[inline(always)]
fn gelu_backward_impl(xs: &[f32], dy: &[f32], out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(xs).zip(dy) {
        let t = tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
        let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
        *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * d_inner);
    }
}

#[inline(always)]
fn max_impl(xs: &[f32]) -> f32 {
    max16(xs)
}

#[inline(always)]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Defines `pub fn $name` running `$imp` compiled for the best instruction set available.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident = $imp:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn wide($($arg: $ty),*) -> $ret {
                        $imp($($arg),*)
                    }
                    // Safety: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn wide($($arg: $ty),*) -> $ret {
                        $imp($($arg),*)
                    }
                    // Safety: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

dispatch!(
    /// `out = exp(xs - shift)`; returns the sum of `out`.
    exp_shifted = exp_shifted_impl(xs: &[f32], shift: f32, out: &mut [f32]) -> f32
);
dispatch!(
    /// `xs = exp(xs - shift)`; returns the new sum.
    exp_shifted_in_place = exp_shifted_in_place_impl(xs: &mut [f32], shift: f32) -> f32
);
dispatch!(
    /// `sum(exp(xs - shift))` without writing anything.
    sum_exp_shifted = sum_exp_shifted_impl(xs: &[f32], shift: f32) -> f32
);
dispatch!(
    /// `xs = exp(xs - shift) * scale`.
    scaled_exp_shifted_in_place = scaled_exp_shifted_in_place_impl(xs: &mut [f32], shift: f32, scale: f32) -> ()
);
dispatch!(
    /// HF `gelu_new`.
    gelu = gelu_impl(xs: &[f32], out: &mut [f32]) -> ()
);
dispatch!(
    /// `dy * gelu'(x)`.
    gelu_backward = gelu_backward_impl(xs: &[f32], dy: &[f32], out: &mut [f32]) -> ()
);
dispatch!(
    /// The largest element (-inf for an empty slice).
    max = max_impl(xs: &[f32]) -> f32
);
dispatch!(
    /// `sum(a * b)`.
    dot = dot_impl(a: &[f32], b: &[f32]) -> f32
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(-1e30) < 1e-37 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn tanh_and_gelu_match_libm() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.005).collect();
        for &x in &xs {
            assert!((tanh(x) - x.tanh()).abs() < 2e-7, "tanh({x})");
        }
        let mut out = vec![0f32; xs.len()];
        gelu(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh());
            assert!((y - want).abs() < 1e-6, "gelu({x})");
        }
    }

    #[test]
    fn reductions_are_right_on_ragged_lengths() {
        for n in [0, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let want: f32 = xs.iter().sum();
            assert!((sum16(&xs) - want).abs() < 1e-5);
            assert!((dot(&xs, &xs) - xs.iter().map(|x| x * x).sum::<f32>()).abs() < 1e-4);
            assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut out = vec![0f32; n];
            let s = exp_shifted(&xs, 0.5, &mut out);
            assert!((s - sum_exp_shifted(&xs, 0.5)).abs() < 1e-4);
        }
    }
}
