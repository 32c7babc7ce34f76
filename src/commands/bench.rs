//! `difflab bench`: training-step throughput and memory on random tokens, with the flags and
//! recipe of `shared/bench/bench_train.py` (AdamW 0.9/0.95, wd 0.1 on 2-D weights, clip 1.0,
//! warmup + cosine, accumulation; the first steps untimed), so the two print comparable
//! JSON lines. Adds MFU against an f32 matmul measured in-process on the same threads.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::engine::cpu::kernels::{matmul, Layout};
use candle_core::{DType, Device, Tensor};
use clap::{Arg, ArgMatches, Command};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::keys;
use crate::config::{DeviceSpec, Precision, RunConfig};
use crate::dist::{Wire, World};
use crate::engine::Placement;
use crate::model::params::init_weights;
use crate::model::{GptConfig, Trainable};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use crate::train::micro::{side_by_side, MicroBatch};
use crate::train::step::{self, Recipe};
use crate::train::{device, evaluate::evaluate};

/// Run settings bench shares with `train`, with bench_train.py's defaults: their help and type
/// come from the key table.
const SHARED: &[(&str, &str)] = &[
    ("n_layer", "2"),
    ("n_head", "2"),
    ("n_embd", "128"),
    ("block_size", "128"),
    ("micro_batch_size", "2"),
    ("batch_size", "16"),
    // train's default (bench_train.py defaults to false, so comparisons pass --rope)
    ("rope", "true"),
    ("research", "false"),
    ("weight_decay", "0.1"),
    ("dropout", "0.0"),
    ("seed", "1337"),
    ("gradient_checkpointing", "false"),
    ("device", "cpu"),
    ("dtype", "f32"),
];

/// bench_train.py's own flags: `(flag, default, help)`, as it spells them.
const OWN: &[(&str, &str, &str)] = &[
    ("vocab_size", "50257", "vocabulary (random ids)"),
    ("steps", "13", "optimizer steps, untimed warm-up included"),
    ("warmup_steps", "3", "first steps excluded from timing"),
    ("lr", "6e-4", "peak learning rate"),
    ("min_lr", "6e-5", "cosine floor"),
    ("lr_warmup_steps", "2", "linear LR warm-up steps"),
    ("grad_clip", "1.0", "global-norm clip"),
    ("log_every", "0", "per-step lines on stderr every N steps"),
];

fn flags() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    let shared = SHARED.iter().map(|(name, default)| (*name, *default, keys::find(name).map_or("", |k| k.help)));
    shared.chain(OWN.iter().copied())
}

pub fn args(mut cmd: Command) -> Command {
    for (name, default, help) in flags() {
        cmd = cmd.arg(Arg::new(name).long(name).default_value(default).help(help).allow_hyphen_values(true));
    }
    cmd
}

pub fn flags_from(m: &ArgMatches) -> Vec<(String, String)> {
    flags().filter_map(|(n, _, _)| m.get_one::<String>(n).map(|v| (n.to_string(), v.clone()))).collect()
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
    Candle(#[from] candle_core::Error),
}

impl BenchError {
    /// A flag or a combination bench cannot run is bad input; a tensor error is a failure.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, BenchError::Candle(_))
    }
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

/// Best matmul throughput (GFLOP/s) of `n x n` by `n x n` in the placement's arithmetic, on the
/// threads training uses: the denominator of MFU. With bf16 matmuls on the CPU that is the bf16
/// kernel's own rate, measured here in the same process.
pub fn matmul_peak_gflops(placement: &Placement) -> Result<f64, BenchError> {
    let n = 1024;
    let mut best = f64::INFINITY;
    if placement.device.is_cpu() && placement.dtype == DType::F32 {
        let (a, b) = (vec![1f32; n * n], vec![1f32; n * n]);
        let mut c = vec![0f32; n * n];
        for _ in 0..12 {
            let t = Instant::now();
            matmul(&mut c, &a, &b, (n, n, n), Layout::Ab, false, placement.matmuls);
            best = best.min(t.elapsed().as_secs_f64());
        }
    } else {
        let (device, dtype) = (&placement.device, placement.dtype);
        let a = Tensor::ones((n, n), dtype, device)?;
        let b = Tensor::ones((n, n), dtype, device)?;
        for _ in 0..12 {
            let t = Instant::now();
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// What bench runs: the shared settings as a run's, and bench_train.py's own.
struct Setup {
    run: RunConfig,
    vocab: usize,
    steps: usize,
    untimed: usize,
    schedule: LrSchedule,
    adam: AdamWConfig,
    grad_clip: f64,
    log_every: usize,
}

fn setup(o: &Opts) -> Result<Setup, BenchError> {
    let int = |k: &str| o.get::<usize>(k, "a whole number");
    let (mb, bs, steps, untimed) = (int("micro_batch_size")?, int("batch_size")?, int("steps")?, int("warmup_steps")?);
    if mb == 0 || bs % mb != 0 {
        return Err(BenchError::Invalid(format!("batch_size {bs} must be a multiple of micro_batch_size {mb}")));
    }
    if steps <= untimed {
        return Err(BenchError::Invalid(format!("steps {steps} must exceed warmup_steps {untimed}")));
    }
    let (n_head, n_embd) = (int("n_head")?, int("n_embd")?);
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(BenchError::Invalid(format!("n_embd {n_embd} must be divisible by n_head {n_head}")));
    }
    // the run's settings, so the model, device, dtype and engine are chosen as `train` chooses them
    let run = RunConfig {
        n_layer: int("n_layer")?,
        n_head,
        n_embd,
        block_size: int("block_size")?,
        micro_batch_size: mb,
        batch_size: bs,
        rope: o.bool("rope")?,
        research: o.bool("research")?,
        gradient_checkpointing: o.bool("gradient_checkpointing")?,
        dropout: o.get::<f64>("dropout", "a number")?,
        seed: o.get::<u64>("seed", "a whole number")?,
        device: o.get::<DeviceSpec>("device", "cpu, cuda or cuda:N")?,
        dtype: o.get::<Precision>("dtype", "f32, or bf16 on CUDA")?,
        ..RunConfig::default()
    };
    // the reference's recipe: AdamW 0.9 / 0.95, warmup, then cosine down to min_lr
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: o.get::<f64>("lr", "a number")?,
        min_lr: o.get::<f64>("min_lr", "a number")?,
        warmup_steps: o.get::<u64>("lr_warmup_steps", "a whole number")?,
        total_steps: steps as u64,
    };
    let adam =
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: o.get::<f64>("weight_decay", "a number")? };
    Ok(Setup {
        vocab: int("vocab_size")?,
        steps,
        untimed,
        schedule,
        adam,
        grad_clip: o.get::<f64>("grad_clip", "a number")?,
        log_every: int("log_every")?,
        run,
    })
}

/// The timed steps' figures.
struct Timing {
    step_secs: Vec<f64>,
    timed: f64,
    /// Per step: forward + backward of the micro-batches (gradients summed, in place), then
    /// gradients to tensors + norm + AdamW.
    forward_backward: f64,
    optimizer: f64,
    first_loss: Option<f64>,
    last_loss: f64,
}

/// `plan.steps` training steps on random tokens (the first `untimed` not timed).
fn train_steps(
    p: &Setup,
    model: &Trainable,
    placement: &Placement,
    rng: &mut ChaCha8Rng,
) -> Result<Timing, BenchError> {
    let (run, dev) = (&p.run, &placement.device);
    let mut opt = AdamW::new(&model.vars, p.adam, |_, v| v.rank() >= 2)?;
    let world = World::single();
    let recipe = Recipe {
        placement,
        world: &*world,
        micro_batches: run.accumulation_steps(),
        checkpointing: run.gradient_checkpointing,
        dropout: run.dropout,
        seed: run.seed,
        grad_wire: Wire::F32,
        grad_overlap: false,
        bucket_bytes: crate::dist::BUCKET_BYTES,
    };
    let (mb, block) = (run.micro_batch_size, run.block_size);
    let mut t = Timing {
        step_secs: vec![],
        timed: 0.0,
        forward_backward: 0.0,
        optimizer: 0.0,
        first_loss: None,
        last_loss: f64::NAN,
    };
    let mut timed_start = None;
    for i in 0..p.steps {
        if i == p.untimed {
            dev.synchronize()?;
            timed_start = Some(Instant::now());
        }
        let started = Instant::now();
        let seqs: Vec<(Tensor, Tensor)> = (0..run.accumulation_steps())
            .map(|_| {
                let seq: Vec<u32> = (0..mb * (block + 1)).map(|_| rng.random_range(0..p.vocab as u32)).collect();
                let seq = Tensor::from_vec(seq, (mb, block + 1), dev)?;
                Ok((seq.narrow(1, 0, block)?, seq.narrow(1, 1, block)?))
            })
            .collect::<candle_core::Result<_>>()?;
        let batches: Vec<(usize, MicroBatch)> =
            seqs.iter().enumerate().map(|(k, (x, y))| (k, MicroBatch { ids: x, targets: Some(y) })).collect();
        let t0 = Instant::now();
        let g = step::gradients(model, &recipe, i as u64, &batches, &mut || {})?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let norm = step::apply(&mut opt, &g, p.schedule.lr_at(i as u64), p.grad_clip)?.grad_norm;
        dev.synchronize()?;
        if i >= p.untimed {
            t.forward_backward += (t1 - t0).as_secs_f64();
            t.optimizer += t1.elapsed().as_secs_f64();
        }
        t.step_secs.push(started.elapsed().as_secs_f64());
        t.last_loss = g.loss;
        t.first_loss.get_or_insert(g.loss);
        if p.log_every > 0 && (i % p.log_every == 0 || i == p.steps - 1) {
            eprintln!("step {i} loss {:.4} gnorm {norm:.3} dt {:.3}s", g.loss, t.step_secs[i]);
        }
    }
    t.timed = timed_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    Ok(t)
}

/// Evaluation tokens/s, measured as the trainer evaluates: batches of `eval_batch_size` blocks
/// (side by side on the CPU), here 4 per thread of random tokens, on a graph-free model.
fn eval_throughput(p: &Setup, model: &Trainable, dev: &Device, rng: &mut ChaCha8Rng) -> Result<f64, BenchError> {
    let eval_model = model.detached()?;
    let (block, batch) = (p.run.block_size, p.run.eval_batch_size());
    let eval_blocks = 4 * batch * rayon::current_num_threads();
    let stream = crate::data::TokenStream::from_vec(
        (0..eval_blocks * block).map(|_| rng.random_range(0..p.vocab as u32)).collect::<Vec<_>>(),
    );
    let started = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        evaluate(&eval_model, &stream, block, batch, None, dev)?;
    }
    Ok((reps * eval_blocks * block) as f64 / started.elapsed().as_secs_f64())
}

pub fn run(flags: &[(String, String)]) -> Result<serde_json::Value, BenchError> {
    let (baseline_rss, _) = device::rss_mib();
    let p = setup(&Opts(flags.iter().cloned().collect()))?;
    let placement = device::placement(&p.run, 1)?;
    let peak = matmul_peak_gflops(&placement)?;
    let cfg = p.run.model_config(p.vocab);
    let model = Trainable::new(&cfg, init_weights(&cfg, p.run.seed, &placement.device)?, &placement)?;
    let mut rng = ChaCha8Rng::seed_from_u64(p.run.seed + 1);
    let t = train_steps(&p, &model, &placement, &mut rng)?;
    let (_, peak_rss) = device::rss_mib();
    let eval_tps = eval_throughput(&p, &model, &placement.device, &mut rng)?;
    Ok(report(&p, &cfg, &placement, &t, peak, (baseline_rss, peak_rss), eval_tps))
}

fn report(
    p: &Setup,
    cfg: &GptConfig,
    placement: &Placement,
    t: &Timing,
    peak: f64,
    (baseline_rss, peak_rss): (f64, f64),
    eval_tps: f64,
) -> serde_json::Value {
    let r = &p.run;
    let timed_steps = p.steps - p.untimed;
    let mut sorted = t.step_secs[p.untimed..].to_vec();
    sorted.sort_by(f64::total_cmp);
    let tps = timed_steps as f64 * (r.batch_size * r.block_size) as f64 / t.timed;
    let flops = cfg.flops_per_token(r.block_size);
    let achieved = flops * tps / 1e9;
    let per_step = |secs: f64| 1000.0 * secs / timed_steps as f64;
    let micro = (r.micro_batch_size, r.block_size);
    let width = side_by_side(placement.engine, cfg, micro, r.gradient_checkpointing).min(r.accumulation_steps());
    json!({
        "config": {
            "n_layer": r.n_layer, "n_head": r.n_head, "n_embd": r.n_embd, "block_size": r.block_size,
            "vocab_size": p.vocab, "micro_batch_size": r.micro_batch_size, "batch_size": r.batch_size,
            "grad_accum": r.accumulation_steps(), "steps": p.steps, "warmup_steps_excluded": p.untimed,
            "rope": r.rope, "research": r.research, "gradient_checkpointing": r.gradient_checkpointing,
            "dropout": r.dropout, "seed": r.seed, "device": device::describe(&placement.device),
            "dtype": placement.compute_dtype(), "engine": crate::train::micro::describe(placement, cfg, micro, width),
        },
        "n_params": cfg.num_parameters(),
        "threads": rayon::current_num_threads(),
        // micro-batches run side by side, one per single-threaded worker (1: one at a time)
        "micro_batches_side_by_side": width,
        "tokens_per_second": tps,
        "timed_seconds": t.timed,
        "step_ms_median": 1000.0 * sorted[sorted.len() / 2],
        "peak_rss_mib": peak_rss,
        "baseline_rss_mib": baseline_rss,
        "model_flops_per_token": flops,
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "mfu": achieved / peak,
        "phase_ms_per_step": {"forward_backward": per_step(t.forward_backward), "norm_and_adamw": per_step(t.optimizer)},
        "eval_tokens_per_second": eval_tps,
        "first_loss": t.first_loss,
        "final_loss": t.last_loss,
        "ln_vocab": (p.vocab as f64).ln(),
    })
}
