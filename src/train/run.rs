//! The training loop, top to bottom: prepare data, build or restore the model and optimizer,
//! then per step: controls, learning rate, accumulated forward/backward, finite check, clip,
//! AdamW, log, evaluate, checkpoint. Then the final evaluation and save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use super::checkpoint::{self, Parts, TrainerState};
use super::controls::{Clock, Controller, StopSignal};
use super::step::{evaluate, forward_backward, Accumulated, MicroBatch};
use super::{device, emit, Injection, RunSpec, TrainError};
use crate::config::RunConfig;
use crate::data::{self, Batcher, DataConfig, EpochOrder, PreparedData, Unit};
use crate::events::*;
use crate::model::diagnostics::{norm_stats, HISTOGRAM_BINS};
use crate::model::dropout::Dropout;
use crate::model::params::init_weights;
use crate::model::{GptConfig, Trainable};
use crate::optim::grads::{clip_factor, global_norm, Grads};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, ScheduleKind};

/// Non-finite steps in a row after which the run stops.
pub const MAX_CONSECUTIVE_SKIPS: u64 = 5;

pub fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn model_config(cfg: &RunConfig, vocab_size: usize) -> GptConfig {
    GptConfig {
        vocab_size,
        n_positions: cfg.block_size,
        n_embd: cfg.n_embd,
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        layer_norm_epsilon: 1e-5,
        rope: cfg.rope,
        rope_theta: cfg.rope_theta,
        differential: cfg.research,
        dropout: cfg.dropout as f32,
    }
}

pub fn variant_name(m: &GptConfig) -> String {
    let pos = if m.rope { "rope" } else { "learned positions" };
    if m.differential { format!("differential + {pos}") } else { format!("baseline ({pos})") }
}

pub fn data_config(cfg: &RunConfig, cache_dir: &Path) -> DataConfig {
    DataConfig {
        dataset: cfg.dataset.clone(),
        dataset_config: cfg.dataset_config.clone(),
        subset_ratio: cfg.subset_ratio,
        tokenizer: cfg.tokenizer_spec(),
        cache_dir: cache_dir.to_path_buf(),
    }
}

/// Data preparation with its progress reported as events.
pub fn prepare_data(cfg: &RunConfig, cache_dir: &Path, tx: &Sender<Event>) -> Result<PreparedData, TrainError> {
    let report = |p: data::Progress| {
        let unit = match p.unit {
            Unit::Bytes => "bytes",
            Unit::Rows => "rows",
            Unit::Task => "task",
        };
        emit(tx, Event::Prepare(PrepareProgress { stage: p.stage, done: p.done, total: p.total, unit: unit.into() }));
    };
    let data = data::prepare(&data_config(cfg, cache_dir), &report)?;
    for note in &data.notes {
        emit(tx, Event::Message { level: Level::Info, text: note.clone() });
    }
    Ok(data)
}

/// The whole run. Returns the final figures; errors end the run (reported by the caller).
pub fn train(spec: &RunSpec, tx: &Sender<Event>, controls: Receiver<ControlMsg>, stop: StopSignal) -> Result<TrainEnd, TrainError> {
    let cfg = &spec.config;
    let out_dir = PathBuf::from(&cfg.output_dir);
    let device = device::select(&cfg.device)?;
    if cfg.dtype == "bf16" && device.is_cpu() {
        return Err(TrainError::Config("dtype bf16 needs a CUDA device; on CPU difflab trains in f32 (set --dtype f32)".into()));
    }
    std::fs::create_dir_all(&out_dir).map_err(|source| TrainError::Io { path: out_dir.clone(), source })?;

    // ---- data
    let data = prepare_data(cfg, &spec.cache_dir, tx)?;
    let block_size = cfg.block_size;
    let train_blocks = data.train.num_blocks(block_size);
    let validation_blocks = data.validation.num_blocks(block_size);
    if validation_blocks == 0 {
        return Err(data::DataError::TooSmall { split: "validation", tokens: data.validation.len(), block_size }.into());
    }
    let steps_per_epoch = (train_blocks / cfg.batch_size) as u64;
    if steps_per_epoch == 0 {
        return Err(TrainError::Config(format!(
            "the training split has {train_blocks} blocks of {block_size} tokens, fewer than one batch of {}; lower batch_size or block_size, or raise subset_ratio",
            cfg.batch_size
        )));
    }

    // ---- model and optimizer: resumed, or fresh from the seed
    let resume = match &cfg.resume_from_checkpoint {
        Some(s) => Some(checkpoint::load(&checkpoint::resolve(s, &out_dir)?, &device)?),
        None => None,
    };
    let (model_cfg, weights) = match &resume {
        Some(r) => (r.model.clone(), r.weights.clone()),
        None => {
            let m = model_config(cfg, data.tokenizer.vocab_size());
            let w = init_weights(&m, cfg.seed, &device)?;
            (m, w)
        }
    };
    check_vocab(&data, model_cfg.vocab_size)?;
    // bf16 compute over f32 master weights and optimizer state (CUDA only: checked above)
    let compute = if cfg.dtype == "bf16" { DType::BF16 } else { DType::F32 };
    let model = Trainable::new(&model_cfg, weights)?.with_dtype(compute)?;
    let adam = AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weight_decay: cfg.weight_decay };
    let mut opt = AdamW::new(&model.vars, adam, |_, v| v.rank() >= 2)?;
    let mut state = match &resume {
        Some(r) => {
            opt.load_state(&r.optimizer, r.state.optimizer_steps).map_err(|e| TrainError::Config(format!("{}: {e}", r.dir.display())))?;
            emit(tx, Event::Message { level: Level::Info, text: format!("resuming from {} at step {}", r.dir.display(), r.state.global_step) });
            r.state.clone()
        }
        None => TrainerState {
            global_step: 0,
            epoch: 0.0,
            max_steps: 0,
            num_train_epochs: cfg.num_train_epochs,
            train_batch_size: cfg.batch_size,
            best_metric: None,
            best_model_checkpoint: None,
            log_history: vec![],
            lr_scale: 1.0,
            seed: cfg.seed,
            optimizer_steps: 0,
            skipped_steps: 0,
            data_epoch: 0,
            data_offset: 0,
            difflab_version: env!("CARGO_PKG_VERSION").into(),
        },
    };

    // ---- plan
    let total_steps = cfg.max_steps.unwrap_or_else(|| (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64);
    let kind: ScheduleKind = cfg.lr_scheduler_type.parse().map_err(TrainError::Config)?;
    let warmup = LrSchedule::warmup_from(cfg.warmup_steps, cfg.warmup_ratio, total_steps);
    let schedule = LrSchedule { kind, base_lr: cfg.learning_rate, warmup_steps: warmup, total_steps };
    state.max_steps = total_steps;
    let accumulation = cfg.accumulation_steps();
    let tokens_per_step = (cfg.batch_size * block_size) as u64;
    let run_config = serde_json::to_value(cfg).unwrap_or_default();
    emit(tx, Event::TrainBegin(TrainBegin {
        config: run_config,
        preset: spec.preset.clone(),
        num_parameters: model_cfg.num_parameters(),
        device: device::describe(&device),
        variant: variant_name(&model_cfg),
        vocab_size: model_cfg.vocab_size,
        train_blocks,
        validation_blocks,
        steps_per_epoch,
        total_steps,
        start_step: state.global_step,
        tokens_per_step,
        warmup_steps: warmup,
        output_dir: out_dir.display().to_string(),
        timestamp: now(),
    }));

    let mut ctl = Controller::new(controls, stop, state.lr_scale);
    let mut clock = Clock::started();
    let mut emit_ev = |e: Event| emit(tx, e);
    let batcher = Batcher { stream: &data.train, block_size };
    let mut order: Option<EpochOrder> = None;
    let mut consecutive_skips = 0u64;
    let mut loss_sum = 0.0;
    let mut loss_count = 0u64;
    let mut window = Window::new(clock.elapsed().as_secs_f64());
    let mut last_eval: Option<EvalRecord> = None;
    let mut last_saved_step: Option<u64> = None;
    let mut failure: Option<TrainError> = None;
    let session_start = state.global_step;

    let ctx = Ctx { spec, model: &model, model_cfg: &model_cfg, data: &data, out_dir: &out_dir, device: &device };
    let epoch_of = |step: u64| step as f64 / steps_per_epoch as f64;

    // ---- the loop
    while state.global_step < total_steps {
        let step = state.global_step;
        ctl.poll(step, &mut emit_ev);
        while ctl.paused {
            ctl.wait(step, &mut clock, &mut emit_ev);
            if ctl.checkpoint_requested {
                save_checkpoint(&ctx, &opt, &mut state, ctl.lr_scale, "control", &mut emit_ev, &mut last_saved_step)?;
                ctl.checkpoint_requested = false;
            }
        }
        if ctl.checkpoint_requested {
            save_checkpoint(&ctx, &opt, &mut state, ctl.lr_scale, "control", &mut emit_ev, &mut last_saved_step)?;
            ctl.checkpoint_requested = false;
        }
        if ctl.stop.is_some() {
            break;
        }

        // learning rate: the schedule, times the user's multiplier
        let lr = schedule.lr_at(step) * ctl.lr_scale;

        // this step's blocks: epoch-seeded shuffle, consecutive batches within the epoch
        let epoch = step / steps_per_epoch;
        if order.as_ref().is_none_or(|o| o.epoch != epoch) {
            order = Some(EpochOrder::new(train_blocks, cfg.seed, epoch));
        }
        let offset = ((step % steps_per_epoch) as usize) * cfg.batch_size;
        let blocks = order.as_ref().map(|o| o.blocks(offset, cfg.batch_size).to_vec()).unwrap_or_default();

        // forward/backward over the micro-batches, gradients accumulated
        let started = Instant::now();
        let mut dropout = Dropout::new(cfg.dropout as f32, cfg.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut acc = Accumulated::default();
        let mut step_loss = 0.0;
        let mut diff_norms = None;
        for micro in blocks.chunks(cfg.micro_batch_size) {
            ctl.poll(step, &mut emit_ev);
            while ctl.paused {
                ctl.wait(step, &mut clock, &mut emit_ev);
            }
            let ids = batcher.batch(micro, &device)?;
            let d = if dropout.is_active() { Some(&mut dropout) } else { None };
            let batch = MicroBatch { ids: &ids, targets: None };
            let out = forward_backward(&model, &batch, 1.0 / accumulation as f64, d, cfg.gradient_checkpointing, &mut acc)?;
            step_loss += out.loss / accumulation as f64;
            diff_norms = out.diff_norms.or(diff_norms);
        }
        let mut grads = acc.into_grads(&model_cfg)?;
        inject(spec, step, &mut step_loss, &mut grads)?;
        let norm = global_norm(&grads)?;
        let elapsed_step = started.elapsed().as_secs_f64();

        state.global_step += 1;
        let done = state.global_step;
        state.epoch = epoch_of(done);
        state.data_epoch = done / steps_per_epoch;
        state.data_offset = (done % steps_per_epoch) * cfg.batch_size as u64;

        if !step_loss.is_finite() || !norm.is_finite() {
            consecutive_skips += 1;
            state.skipped_steps += 1;
            let what = if step_loss.is_finite() { "gradient norm" } else { "loss" };
            emit_ev(Event::Skipped(SkippedRecord {
                step: done,
                reason: format!("{what} is {}", if step_loss.is_finite() { norm } else { step_loss }),
                consecutive: consecutive_skips,
            }));
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                failure = Some(TrainError::Diverged { steps: consecutive_skips, step: done });
                break;
            }
            continue;
        }
        consecutive_skips = 0;
        opt.step(&grads, lr, clip_factor(norm, cfg.max_grad_norm))?;
        drop(grads);
        state.optimizer_steps = opt.steps_taken();
        loss_sum += step_loss;
        loss_count += 1;
        window.add(step_loss, elapsed_step, tokens_per_step);

        if done % cfg.logging_steps == 0 || done == total_steps {
            emit_ev(Event::Progress(window.record(done, state.epoch, lr, norm, diff_norms.as_deref(), clock.elapsed().as_secs_f64())));
            window = Window::new(clock.elapsed().as_secs_f64());
        }
        if done % cfg.eval_steps == 0 && done < total_steps {
            let rec = run_eval(&ctx, done, state.epoch)?;
            note_eval(&mut state, &rec);
            emit_ev(Event::Evaluate(rec.clone()));
            last_eval = Some(rec);
        }
        if cfg.save_steps > 0 && done % cfg.save_steps == 0 && done < total_steps {
            save_checkpoint(&ctx, &opt, &mut state, ctl.lr_scale, "save_steps", &mut emit_ev, &mut last_saved_step)?;
        }
    }

    // ---- the end: final evaluation and save, unless stopped without saving or failed
    let stopped = ctl.stop.is_some() || failure.is_some();
    let save_at_end = failure.is_none() && ctl.stop != Some(false);
    let done = state.global_step;
    if failure.is_none() && last_eval.as_ref().is_none_or(|e| e.step != done) && done > session_start {
        let rec = run_eval(&ctx, done, state.epoch)?;
        note_eval(&mut state, &rec);
        emit_ev(Event::Evaluate(rec.clone()));
        last_eval = Some(rec);
    }
    if save_at_end && done > 0 {
        let reason = if stopped { "stop" } else { "final" };
        if last_saved_step != Some(done) {
            save_checkpoint(&ctx, &opt, &mut state, ctl.lr_scale, reason, &mut emit_ev, &mut last_saved_step)?;
        }
        let weights = model.weights();
        checkpoint::save_model_dir(&out_dir, &parts(&ctx, &opt, &state, &weights)?.as_parts())?;
    }
    let runtime = clock.elapsed().as_secs_f64();
    let trained = done - session_start;
    let end = TrainEnd {
        step: done,
        epoch: state.epoch,
        train_loss: (loss_count > 0).then(|| loss_sum / loss_count as f64),
        eval_loss: last_eval.as_ref().map(|e| e.eval_loss),
        perplexity: last_eval.as_ref().map(|e| e.perplexity),
        train_runtime: runtime,
        tokens_per_second: (trained * tokens_per_step) as f64 / runtime.max(1e-9),
        skipped_steps: state.skipped_steps,
        status: if failure.is_some() { "failed" } else if stopped { "stopped" } else { "completed" }.into(),
        error: failure.as_ref().map(|e| e.to_string()),
        output_dir: out_dir.display().to_string(),
    };
    emit_ev(Event::TrainEnd(end.clone()));
    match failure {
        Some(e) => Err(e),
        None => Ok(end),
    }
}

/// What the helpers below share.
struct Ctx<'a> {
    spec: &'a RunSpec,
    model: &'a Trainable,
    model_cfg: &'a GptConfig,
    data: &'a PreparedData,
    out_dir: &'a Path,
    device: &'a Device,
}

fn check_vocab(data: &PreparedData, vocab: usize) -> Result<(), TrainError> {
    for (split, stream) in [("train", &data.train), ("validation", &data.validation)] {
        if let Some(id) = stream.max_id().filter(|id| *id as usize >= vocab) {
            return Err(data::DataError::OutOfVocab { split, id, vocab }.into());
        }
    }
    Ok(())
}

/// Test fault injection: a non-finite loss or gradient at chosen steps.
fn inject(spec: &RunSpec, step: u64, loss: &mut f64, grads: &mut Grads) -> Result<(), TrainError> {
    for (at, kind) in &spec.inject_nonfinite {
        if *at != step {
            continue;
        }
        match kind {
            Injection::Loss => *loss = f64::NAN,
            Injection::Grad => {
                if let Some(g) = grads.values_mut().next() {
                    *g = (g.ones_like()? * f64::INFINITY)?;
                }
            }
        }
    }
    Ok(())
}

fn run_eval(ctx: &Ctx, step: u64, epoch: f64) -> Result<EvalRecord, TrainError> {
    let cfg = &ctx.spec.config;
    let started = Instant::now();
    let gpt = ctx.model.detached()?;
    let max = cfg.eval_max_blocks.map(|n| n as usize);
    let (loss, predictions) = evaluate(&gpt, &ctx.data.validation, cfg.block_size, cfg.micro_batch_size, max, ctx.device)?;
    let secs = started.elapsed().as_secs_f64();
    let tokens = predictions + predictions / (cfg.block_size as u64 - 1);
    Ok(EvalRecord { step, epoch, eval_loss: loss, perplexity: loss.exp(), eval_tokens: tokens, eval_tokens_per_second: tokens as f64 / secs.max(1e-9) })
}

fn note_eval(state: &mut TrainerState, rec: &EvalRecord) {
    state.log_history.push(serde_json::json!({
        "step": rec.step, "epoch": rec.epoch, "eval_loss": rec.eval_loss, "perplexity": rec.perplexity
    }));
    if state.best_metric.is_none_or(|b| rec.eval_loss < b) {
        state.best_metric = Some(rec.eval_loss);
        state.best_model_checkpoint = None;
    }
}

fn parts<'a>(ctx: &'a Ctx, opt: &AdamW, state: &'a TrainerState, weights: &'a BTreeMap<String, Tensor>) -> Result<OwnedParts<'a>, TrainError> {
    Ok(OwnedParts { ctx, state, weights, optimizer: opt.state_tensors()? })
}

/// The optimizer state materialised next to borrowed parts, for one save.
struct OwnedParts<'a> {
    ctx: &'a Ctx<'a>,
    state: &'a TrainerState,
    weights: &'a BTreeMap<String, Tensor>,
    optimizer: BTreeMap<String, Tensor>,
}

impl OwnedParts<'_> {
    fn as_parts(&self) -> Parts<'_> {
        Parts {
            model: self.ctx.model_cfg,
            weights: self.weights,
            optimizer: &self.optimizer,
            tokenizer_json: self.ctx.data.tokenizer.json(),
            run_config: &self.ctx.spec.config,
            state: self.state,
            eos_token_id: self.ctx.data.tokenizer.end_of_text_id(),
        }
    }
}

fn save_checkpoint(
    ctx: &Ctx,
    opt: &AdamW,
    state: &mut TrainerState,
    lr_scale: f64,
    reason: &str,
    emit_ev: &mut dyn FnMut(Event),
    last_saved: &mut Option<u64>,
) -> Result<(), TrainError> {
    state.lr_scale = lr_scale;
    let step = state.global_step;
    let best_now = state.log_history.last().and_then(|e| e["step"].as_u64()) == Some(step)
        && state.best_metric.is_some()
        && state.log_history.last().and_then(|e| e["eval_loss"].as_f64()) == state.best_metric;
    if best_now {
        state.best_model_checkpoint = Some(checkpoint::checkpoint_dir(ctx.out_dir, step).display().to_string());
    }
    let weights = ctx.model.weights();
    let owned = parts(ctx, opt, state, &weights)?;
    let path = checkpoint::save(ctx.out_dir, &owned.as_parts())?;
    let keep = state.best_model_checkpoint.as_ref().and_then(|p| p.rsplit('-').next()?.parse().ok());
    let deleted = checkpoint::rotate(ctx.out_dir, ctx.spec.config.save_total_limit, keep);
    *last_saved = Some(step);
    emit_ev(Event::Checkpoint(CheckpointRecord {
        step,
        path: path.display().to_string(),
        reason: reason.into(),
        deleted: deleted.iter().map(|p| p.display().to_string()).collect(),
    }));
    Ok(())
}

/// Losses and throughput since the last progress marker.
struct Window {
    loss_sum: f64,
    steps: u64,
    seconds: f64,
    tokens: u64,
}

impl Window {
    fn new(_at: f64) -> Self {
        Self { loss_sum: 0.0, steps: 0, seconds: 0.0, tokens: 0 }
    }

    fn add(&mut self, loss: f64, seconds: f64, tokens: u64) {
        self.loss_sum += loss;
        self.steps += 1;
        self.seconds += seconds;
        self.tokens += tokens;
    }

    fn record(&self, step: u64, epoch: f64, lr: f64, grad_norm: f64, diff: Option<&[f32]>, elapsed: f64) -> StepRecord {
        let stats = diff.and_then(|d| norm_stats(d, HISTOGRAM_BINS));
        StepRecord {
            step,
            epoch,
            loss: self.loss_sum / self.steps.max(1) as f64,
            learning_rate: lr,
            grad_norm,
            tokens_per_second: self.tokens as f64 / self.seconds.max(1e-9),
            diff_norm_mean: stats.as_ref().map(|s| s.mean),
            diff_norm_std: stats.as_ref().map(|s| s.std),
            diff_norm_min: stats.as_ref().map(|s| s.min),
            diff_norm_max: stats.as_ref().map(|s| s.max),
            diff_norm_hist: stats.map(|s| Histogram { counts: s.hist_counts, edges: s.hist_edges, sum: s.sum, sum_squares: s.sum_squares }),
            elapsed,
        }
    }
}
