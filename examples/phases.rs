use std::time::Instant;
use std::collections::BTreeMap;
use candle_core::{Device, Tensor};
use difflab::model::{params::init_weights, GptConfig, Trainable};
use difflab::optim::{AdamW, AdamWConfig, grads};
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (l, c, t, v, mb) = (a[0], a[1], a[2], a[3], a[4]);
    let cfg = GptConfig { vocab_size: v, n_positions: t, n_embd: c, n_layer: l, n_head: c / 64, layer_norm_epsilon: 1e-5, rope: true, rope_theta: 1e4, differential: false, dropout: 0.0 };
    let model = Trainable::new(&cfg, init_weights(&cfg, 1, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(&model.vars, AdamWConfig::default(), |_, v| v.rank() >= 2).unwrap();
    let x = Tensor::from_vec((0..mb*t).map(|i| ((i*7919) % v) as u32).collect::<Vec<_>>(), (mb, t), &Device::Cpu).unwrap();
    let (mut tf, mut tl, mut tb, mut ta, mut to) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut acc = BTreeMap::new();
    for it in 0..20 {
        let t0 = Instant::now();
        let (hidden, _) = model.gpt.forward_hidden(&x, None).unwrap();
        let t1 = Instant::now();
        let loss = model.gpt.loss(&hidden, &x).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        let store = loss.backward().unwrap();
        let t3 = Instant::now();
        let g = model.named_grads(store);
        grads::accumulate(&mut acc, g).unwrap();
        let t4 = Instant::now();
        if it % 4 == 3 { let n = grads::global_norm(&acc).unwrap(); grads::clip(&mut acc, n, 1.0).unwrap(); opt.step(&acc, 1e-3).unwrap(); acc = BTreeMap::new(); }
        let t5 = Instant::now();
        if it >= 4 { tf += (t1-t0).as_secs_f64(); tl += (t2-t1).as_secs_f64(); tb += (t3-t2).as_secs_f64(); ta += (t4-t3).as_secs_f64(); to += (t5-t4).as_secs_f64(); }
    }
    let n = 16.0;
    println!("per micro-batch ms: fwd {:.1} loss {:.1} bwd {:.1} accumulate {:.1} clip+opt(per 4) {:.1}", tf/n*1e3, tl/n*1e3, tb/n*1e3, ta/n*1e3, to/n*4.0*1e3);
}
