//! `difflab bench`: training-step throughput and memory on random tokens, with the flags and
//! recipe of `shared/bench/bench_train.py` (AdamW 0.9/0.95, wd 0.1 on 2-D weights, clip 1.0,
//! warmup + cosine, accumulation; the first steps untimed), so the two print comparable
//! JSON lines. Adds MFU against an f32 matmul measured in-process on the same threads.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Arg, ArgMatches, Command};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::{DeviceSpec, Precision, RunConfig};
use crate::model::params::init_weights;
use crate::model::Trainable;
use crate::optim::{self, AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use crate::train::run::placement;
use crate::train::step::{forward_backward_all, side_by_side, Accumulated, MicroBatch};
use crate::train::{device, TrainError};

/// `(flag, default, help)`, as bench_train.py spells them.
const FLAGS: &[(&str, &str, &str)] = &[
    ("n_layer", "2", "transformer blocks"),
    ("n_head", "2", "attention heads"),
    ("n_embd", "128", "model width"),
    ("block_size", "128", "tokens per sequence"),
    ("vocab_size", "50257", "vocabulary (random ids)"),
    ("micro_batch_size", "2", "sequences per forward/backward"),
    ("batch_size", "16", "sequences per optimizer step"),
    ("steps", "13", "optimizer steps, untimed warm-up included"),
    ("warmup_steps", "3", "first steps excluded from timing"),
    (
        "rope",
        "true",
        "rotary positions (train's default; bench_train.py defaults to false, so comparisons pass --rope)",
    ),
    ("research", "false", "differential variant"),
    ("lr", "6e-4", "peak learning rate"),
    ("min_lr", "6e-5", "cosine floor"),
    ("lr_warmup_steps", "2", "linear LR warm-up steps"),
    ("weight_decay", "0.1", "AdamW weight decay on 2-D weights"),
    ("grad_clip", "1.0", "global-norm clip"),
    ("dropout", "0.0", "dropout"),
    ("seed", "1337", "seed"),
    ("gradient_checkpointing", "false", "recompute block activations in backward"),
    ("device", "cpu", "cpu, cuda, cuda:N"),
    ("dtype", "f32", "f32, or bf16 on CUDA"),
    ("log_every", "0", "per-step lines on stderr every N steps"),
];

pub fn args(mut cmd: Command) -> Command {
    for (name, default, help) in FLAGS {
        cmd = cmd.arg(Arg::new(*name).long(*name).default_value(*default).help(*help).allow_hyphen_values(true));
    }
    cmd
}

pub fn flags_from(m: &ArgMatches) -> Vec<(String, String)> {
    FLAGS.iter().filter_map(|(n, _, _)| m.get_one::<String>(n).map(|v| (n.to_string(), v.clone()))).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--{flag}: {value:?} is not valid ({expected})")]
    Flag { flag: String, value: String, expected: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    Placement(#[from] TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

struct Opts(BTreeMap<String, String>);

impl Opts {
    fn get<T: std::str::FromStr>(&self, k: &str, expected: &'static str) -> Result<T, BenchError> {
        let v = self.0.get(k).cloned().unwrap_or_default();
        v.parse().map_err(|_| BenchError::Flag { flag: k.into(), value: v, expected })
    }
    fn bool(&self, k: &str) -> Result<bool, BenchError> {
        match self.0.get(k).map(|s| s.to_ascii_lowercase()).as_deref() {
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            other => {
                Err(BenchError::Flag { flag: k.into(), value: other.unwrap_or("").into(), expected: "true or false" })
            }
        }
    }
}

/// Best f32 matmul throughput (GFLOP/s) of `n x n` by `n x n` on `device`, on the threads
/// training uses: the denominator of MFU.
pub fn matmul_peak_gflops(device: &Device, dtype: DType) -> Result<f64, BenchError> {
    let n = 1024;
    let a = Tensor::ones((n, n), dtype, device)?;
    let b = Tensor::ones((n, n), dtype, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..12 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        drop(c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

pub fn run(flags: &[(String, String)]) -> Result<serde_json::Value, BenchError> {
    let (baseline_rss, _) = device::rss_mib();
    let o = Opts(flags.iter().cloned().collect());
    let int = |k: &str| o.get::<usize>(k, "a whole number");
    let (n_layer, n_head, n_embd, block, vocab) =
        (int("n_layer")?, int("n_head")?, int("n_embd")?, int("block_size")?, int("vocab_size")?);
    let (mb, bs, steps, untimed) = (int("micro_batch_size")?, int("batch_size")?, int("steps")?, int("warmup_steps")?);
    if mb == 0 || bs % mb != 0 {
        return Err(BenchError::Invalid(format!("batch_size {bs} must be a multiple of micro_batch_size {mb}")));
    }
    if steps <= untimed {
        return Err(BenchError::Invalid(format!("steps {steps} must exceed warmup_steps {untimed}")));
    }
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(BenchError::Invalid(format!("n_embd {n_embd} must be divisible by n_head {n_head}")));
    }
    let (rope, research, ckpt) = (o.bool("rope")?, o.bool("research")?, o.bool("gradient_checkpointing")?);
    let (lr, min_lr, wd, clip_to, dropout) = (
        o.get::<f64>("lr", "a number")?,
        o.get::<f64>("min_lr", "a number")?,
        o.get::<f64>("weight_decay", "a number")?,
        o.get::<f64>("grad_clip", "a number")?,
        o.get::<f32>("dropout", "a number")?,
    );
    let (seed, lr_warmup, log_every) = (
        o.get::<u64>("seed", "a whole number")?,
        o.get::<u64>("lr_warmup_steps", "a whole number")?,
        int("log_every")?,
    );
    // the run's settings, so the model, device, dtype and engine are chosen as `train` chooses them
    let run = RunConfig {
        n_layer,
        n_head,
        n_embd,
        block_size: block,
        rope,
        research,
        dropout: dropout as f64,
        device: o.get::<DeviceSpec>("device", "cpu, cuda or cuda:N")?,
        dtype: o.get::<Precision>("dtype", "f32, or bf16 on CUDA")?,
        ..RunConfig::default()
    };
    let (dev, dtype, engine) = placement(&run)?;

    let peak = matmul_peak_gflops(&dev, dtype)?;
    let cfg = run.model_config(vocab);
    let model = Trainable::new(&cfg, init_weights(&cfg, seed, &dev)?)?.with_dtype(dtype)?.with_engine(engine);
    // the reference's recipe: warmup, then cosine down to min_lr
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: lr,
        min_lr,
        warmup_steps: lr_warmup,
        total_steps: steps as u64,
    };
    let mut opt =
        AdamW::new(&model.vars, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd }, |_, v| {
            v.rank() >= 2
        })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let accum = bs / mb;
    let tokens_per_step = (bs * block) as f64;
    let mut step_secs = vec![];
    // per-phase time over the timed steps: forward+backward of the micro-batches (gradients
    // accumulated in place), then gradients to tensors + norm + AdamW
    let (mut t_fwd_bwd, mut t_optimizer) = (0.0f64, 0.0f64);
    let (mut first_loss, mut last_loss) = (None, f64::NAN);
    let mut timed_start = None;
    for step in 0..steps {
        if step == untimed {
            dev.synchronize()?;
            timed_start = Some(Instant::now());
        }
        let t = Instant::now();
        let mut acc = Accumulated::default();
        let mut loss_sum = 0.0;
        let seqs: Vec<(Tensor, Tensor)> = (0..accum)
            .map(|_| {
                let seq: Vec<u32> = (0..mb * (block + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
                let seq = Tensor::from_vec(seq, (mb, block + 1), &dev)?;
                Ok((seq.narrow(1, 0, block)?, seq.narrow(1, 1, block)?))
            })
            .collect::<candle_core::Result<_>>()?;
        let batches: Vec<MicroBatch> = seqs.iter().map(|(x, y)| MicroBatch { ids: x, targets: Some(y) }).collect();
        let dropout_for = |k: usize| {
            let d =
                crate::model::dropout::Dropout::new(dropout, seed ^ step as u64 ^ (k as u64).wrapping_mul(0x9E37_79B9));
            d.is_active().then_some(d)
        };
        let t0 = Instant::now();
        let outs = forward_backward_all(
            engine,
            &model,
            &batches,
            1.0 / accum as f64,
            &dropout_for,
            ckpt,
            &mut acc,
            &mut || {},
        )?;
        dev.synchronize()?;
        loss_sum += outs.iter().map(|o| o.loss).sum::<f64>();
        if step >= untimed {
            t_fwd_bwd += t0.elapsed().as_secs_f64();
        }
        let t0 = Instant::now();
        let grads = acc.into_grads(&cfg)?;
        let norm = optim::step(&mut opt, &grads, schedule.lr_at(step as u64), clip_to)?.grad_norm;
        dev.synchronize()?;
        if step >= untimed {
            t_optimizer += t0.elapsed().as_secs_f64();
        }
        step_secs.push(t.elapsed().as_secs_f64());
        last_loss = loss_sum / accum as f64;
        first_loss.get_or_insert(last_loss);
        if log_every > 0 && (step % log_every == 0 || step == steps - 1) {
            eprintln!("step {step} loss {last_loss:.4} gnorm {norm:.3} dt {:.3}s", step_secs[step]);
        }
    }
    let timed = timed_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let timed_steps = steps - untimed;
    let mut sorted = step_secs[untimed..].to_vec();
    sorted.sort_by(f64::total_cmp);
    let tps = timed_steps as f64 * tokens_per_step / timed;
    let flops = cfg.flops_per_token(block);
    let achieved = flops * tps / 1e9;
    let (_, peak_rss) = device::rss_mib();
    // evaluation: forward only, on a graph-free model
    let eval_model = model.detached()?;
    // as the trainer evaluates: batches of `eval_batch_size` blocks (side by side on the CPU),
    // here 4 per thread of random tokens, the loss summed in block order
    let eval_blocks = 4 * crate::config::eval_batch_size(mb, block) * rayon::current_num_threads();
    let eval_stream = crate::data::TokenStream::from_vec(
        (0..eval_blocks * block).map(|_| rng.random_range(0..vocab as u32)).collect::<Vec<_>>(),
    );
    let eval_start = Instant::now();
    let eval_reps = 3;
    for _ in 0..eval_reps {
        crate::train::step::evaluate(
            &eval_model,
            &eval_stream,
            block,
            crate::config::eval_batch_size(mb, block),
            None,
            &dev,
        )?;
    }
    let eval_tps = (eval_reps * eval_blocks * block) as f64 / eval_start.elapsed().as_secs_f64();
    let per_step = |t: f64| 1000.0 * t / timed_steps as f64;
    Ok(json!({
        "config": {
            "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block, "vocab_size": vocab,
            "micro_batch_size": mb, "batch_size": bs, "grad_accum": accum, "steps": steps,
            "warmup_steps_excluded": untimed, "rope": rope, "research": research,
            "gradient_checkpointing": ckpt, "dropout": dropout, "seed": seed,
            "device": device::describe(&dev), "dtype": format!("{dtype:?}").to_lowercase(), "engine": engine.as_str(),
        },
        "n_params": cfg.num_parameters(),
        "threads": rayon::current_num_threads(),
        // micro-batches run side by side, one per single-threaded worker (1: one at a time)
        "micro_batches_side_by_side": side_by_side(engine, &cfg, (mb, block), ckpt).min(accum),
        "tokens_per_second": tps,
        "timed_seconds": timed,
        "step_ms_median": 1000.0 * sorted[sorted.len() / 2],
        "peak_rss_mib": peak_rss,
        "baseline_rss_mib": baseline_rss,
        "model_flops_per_token": flops,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "mfu": achieved / peak,
        "phase_ms_per_step": {"forward_backward": per_step(t_fwd_bwd), "norm_and_adamw": per_step(t_optimizer)},
        "eval_tokens_per_second": eval_tps,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "ln_vocab": (vocab as f64).ln(),
    }))
}
