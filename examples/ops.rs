use std::time::Instant;
use candle_core::{Device, Tensor, Var};
use difflab::model::ops;
fn time<F: FnMut()>(name: &str, mut f: F) { for _ in 0..3 { f(); } let n = 20; let t = Instant::now(); for _ in 0..n { f(); } println!("{name:<40} {:8.2} ms", t.elapsed().as_secs_f64()/n as f64*1e3); }
fn main() {
    let d = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 256, 256), &d).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1., (256, 1024), &d).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 1., 1024, &d).unwrap()).unwrap();
    let x2 = x.as_tensor().reshape((1024, 256)).unwrap();
    time("matmul 1024x256x1024", || { x2.matmul(w.as_tensor()).unwrap(); });
    time("linear fwd", || { ops::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap(); });
    time("linear fwd+bwd", || { ops::linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap(); });
    let y = Tensor::randn(0f32, 1., (1024, 1024), &d).unwrap();
    time("dx = dy W^T", || { y.matmul(&w.as_tensor().t().unwrap()).unwrap(); });
    time("dW = x^T dy", || { x2.t().unwrap().matmul(&y).unwrap(); });
    time("sum_all+backward trivial", || { x.as_tensor().sum_all().unwrap().backward().unwrap(); });
    let g = Var::from_tensor(&Tensor::ones(256, candle_core::DType::F32, &d).unwrap()).unwrap();
    let z = Var::from_tensor(&Tensor::zeros(256, candle_core::DType::F32, &d).unwrap()).unwrap();
    time("layernorm fwd+bwd", || { ops::layer_norm(x.as_tensor(), g.as_tensor(), z.as_tensor(), 1e-5).unwrap().sum_all().unwrap().backward().unwrap(); });
    let h4 = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 1024), &d).unwrap()).unwrap();
    time("gelu fwd+bwd 1M", || { ops::gelu(h4.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap(); });
    time("add residual fwd+bwd", || { (x.as_tensor() + x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap(); });
}
