//! The CPU matmul kernels at the model's shapes: `cargo bench --bench matmul`.
//!
//! GFLOP/s of the f32 path (the gemm crate) and the bf16 path (`engine::cpu::bf16`, AVX512-BF16)
//! for each linear layer's forward and two backward products at the demo, small and mid sizes,
//! and the tied head at GPT-2's vocabulary, on every rayon thread. Plain `main`: the best of
//! several repetitions is the figure.

use std::time::Instant;

use difflab::engine::cpu::bf16;
use difflab::engine::cpu::kernels::{gemm_strided, Matmuls};

/// (what, m, n, k, a transposed, b transposed)
type Shape = (&'static str, usize, usize, usize, bool, bool);

fn gflops(shape: Shape, mm: Matmuls) -> f64 {
    let (_, m, n, k, at, bt) = shape;
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut c = vec![0f32; m * n];
    let a_op = if at { (a.as_ptr(), 1, m) } else { (a.as_ptr(), k, 1) };
    let b_op = if bt { (b.as_ptr(), 1, k) } else { (b.as_ptr(), n, 1) };
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let t = Instant::now();
        // Safety: a, b and c hold the shapes the strides describe.
        unsafe { gemm_strided((m, n, k), (c.as_mut_ptr(), n), false, a_op, b_op, 1.0, true, mm) };
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

fn main() {
    let shapes: Vec<Shape> = vec![
        ("small c_fc fwd   x.W", 1024, 2048, 512, false, false),
        ("small c_fc dx    dy.W^T", 1024, 512, 2048, false, true),
        ("small c_fc dW    x^T.dy", 512, 2048, 1024, true, false),
        ("mid c_attn fwd   x.W", 2048, 2304, 768, false, false),
        ("mid c_proj dx    dy.W^T", 2048, 768, 768, false, true),
        ("mid c_fc dW      x^T.dy", 768, 3072, 2048, true, false),
        ("head logits      h.wte^T", 256, 50257, 768, false, true),
        ("head dh          d.wte", 256, 768, 50257, false, false),
        ("head dwte        d^T.h", 50257, 768, 256, true, false),
        ("square 1024", 1024, 1024, 1024, false, false),
    ];
    println!("threads: {}, AVX512-BF16: {}", rayon::current_num_threads(), bf16::available());
    println!(
        "{:<26} {:>6} {:>6} {:>6} {:>10} {:>10} {:>6}",
        "product", "m", "n", "k", "f32 GF/s", "bf16 GF/s", "ratio"
    );
    for s in shapes {
        let f = gflops(s, Matmuls::F32);
        let b = if bf16::available() { gflops(s, Matmuls::Bf16) } else { f64::NAN };
        println!("{:<26} {:>6} {:>6} {:>6} {:>10.1} {:>10.1} {:>6.2}", s.0, s.1, s.2, s.3, f, b, b / f);
    }
}
