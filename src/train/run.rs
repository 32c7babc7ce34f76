//! The training loop, top to bottom: prepare data, build or restore the model and optimizer,
//! then per step: controls, learning rate, accumulated forward/backward, finite check, clip,
//! AdamW, log, evaluate, checkpoint. Then the final evaluation and save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use super::checkpoint::{self, Parts, TrainerState};
use super::controls::{Clock, Controller, StopSignal};
use super::step::{evaluate_part, forward_backward_all, Accumulated, EvalPart, MicroBatch};
use super::{device, emit, Injection, RunSpec, TrainError};
use crate::config::{Precision, RunConfig};
use crate::data::{self, Batcher, DataConfig, EpochOrder, PreparedData, Tokenizer, TokenizerSpec};
use crate::engine::Engine;
use crate::events::*;
use crate::model::diagnostics::{norm_stats, HISTOGRAM_BINS};
use crate::model::dropout::Dropout;
use crate::model::generate::{generate, Sampling};
use crate::model::params::init_weights;
use crate::model::{Gpt, GptConfig, Trainable};
use crate::optim::grads::Grads;
use crate::optim::{self, AdamW, AdamWConfig, LrSchedule};

/// Non-finite steps in a row after which the run stops.
pub const MAX_CONSECUTIVE_SKIPS: u64 = 5;

pub fn data_config(cfg: &RunConfig, cache_dir: &Path) -> DataConfig {
    DataConfig {
        dataset: cfg.dataset.clone(),
        dataset_config: cfg.dataset_config.clone(),
        subset_ratio: cfg.subset_ratio,
        tokenizer: cfg.tokenizer_spec(),
        eval_split: cfg.eval_split,
        cache_dir: cache_dir.to_path_buf(),
    }
}

/// Data preparation with its progress reported as events.
pub fn prepare_data(cfg: &RunConfig, cache_dir: &Path, tx: &Sender<Event>) -> Result<PreparedData, TrainError> {
    let report = |p: data::Progress| {
        emit(tx, Event::Prepare(PrepareProgress { stage: p.stage, done: p.done, total: p.total, unit: p.unit }));
    };
    let data = data::prepare(&data_config(cfg, cache_dir), &report)?;
    for note in &data.notes {
        emit(tx, Event::Message { level: Level::Info, text: note.clone() });
    }
    Ok(data)
}

/// The device, compute dtype and engine of a run; bf16 on the CPU is refused (nothing there
/// computes it faster than f32, and the fused kernels are f32).
pub fn placement(cfg: &RunConfig) -> Result<(Device, DType, Engine), TrainError> {
    let device = device::select(cfg.device)?;
    let dtype = match cfg.dtype {
        Precision::Bf16 if device.is_cpu() => {
            return Err(TrainError::Unsupported(
                "dtype bf16 needs a CUDA device; on CPU difflab trains in f32 (set --dtype f32)".into(),
            ))
        }
        Precision::Bf16 => DType::BF16,
        Precision::F32 => DType::F32,
    };
    let engine = Engine::choose(&device, dtype, cfg.dropout);
    Ok((device, dtype, engine))
}

/// The model a run starts from, and the checkpoint it comes from when resuming.
pub struct Start {
    pub model: GptConfig,
    pub weights: BTreeMap<String, Tensor>,
    pub resume: Option<checkpoint::Resume>,
}

/// The model a run starts from: its checkpoint when resuming, else fresh from the seed.
pub fn starting_model(cfg: &RunConfig, vocab_size: usize, device: &Device) -> Result<Start, TrainError> {
    match &cfg.resume_from_checkpoint {
        Some(s) => {
            let r = checkpoint::load(&checkpoint::resolve(s, Path::new(&cfg.output_dir))?, device)?;
            Ok(Start { model: r.model.clone(), weights: r.weights.clone(), resume: Some(r) })
        }
        None => {
            let model = cfg.model_config(vocab_size);
            let weights = init_weights(&model, cfg.seed, device)?;
            Ok(Start { model, weights, resume: None })
        }
    }
}

/// The most ids the run's tokenizer can have, when known before it loads.
fn vocab_bound(cfg: &RunConfig) -> Option<usize> {
    match cfg.tokenizer_spec() {
        TokenizerSpec::Bpe(n) => Some(n),
        spec => spec.known_vocab_size(),
    }
}

/// Memory the kernel says can be had without swapping (`MemAvailable`), in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Refuses a model whose training would not fit in this machine's memory (on the CPU; a GPU's
/// memory is not queried), naming the estimate, instead of dying in an allocation.
pub fn fits_in_memory(model: &GptConfig, cfg: &RunConfig, device: &Device) -> Result<(), TrainError> {
    let (Some(available), true) = (available_memory(), device.is_cpu()) else { return Ok(()) };
    let needed = model.training_bytes(cfg.micro_batch_size, cfg.block_size, cfg.gradient_checkpointing);
    if needed <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let params = model.num_parameters() as u64;
    Err(TrainError::TooBig {
        needed_gib: gib(needed),
        available_gib: gib(available),
        detail: format!(
            "{params} parameters: {:.1} GiB for weights, gradients and AdamW moments; the rest activations at micro_batch_size {}, block_size {}",
            gib(16 * params),
            cfg.micro_batch_size,
            cfg.block_size
        ),
    })
}

pub fn adamw_config(cfg: &RunConfig) -> AdamWConfig {
    AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weight_decay: cfg.weight_decay }
}

/// Everything the loop works on, built by `set_up`.
struct Run<'a> {
    spec: &'a RunSpec,
    out_dir: PathBuf,
    device: Device,
    engine: Engine,
    data: PreparedData,
    model_cfg: GptConfig,
    model: Trainable,
    opt: AdamW,
    state: TrainerState,
    schedule: LrSchedule,
    train_blocks: usize,
    steps_per_epoch: u64,
    tokens_per_step: u64,
}

/// The whole run. Returns the final figures; errors end the run (reported by the caller).
pub fn train(
    spec: &RunSpec,
    tx: &Sender<Event>,
    controls: Receiver<ControlMsg>,
    stop: StopSignal,
) -> Result<TrainEnd, TrainError> {
    let mut run = set_up(spec, tx)?;
    let mut ctl = Controller::new(controls, stop, run.state.lr_scale);
    let mut emit_ev = |e: Event| emit(tx, e);
    let session_start = run.state.global_step;
    let mut session = Session { start_step: session_start, ..Session::new() };
    let failure = train_loop(&mut run, &mut ctl, &mut session, &mut emit_ev).err();
    wrap_up(&mut run, &ctl, session, session_start, failure, &mut emit_ev)
}

/// Data, model, optimizer, plan; ends with the `train_begin` event.
fn set_up<'a>(spec: &'a RunSpec, tx: &Sender<Event>) -> Result<Run<'a>, TrainError> {
    let cfg = &spec.config;
    let out_dir = PathBuf::from(&cfg.output_dir);
    let (device, dtype, engine) = placement(cfg)?;
    // before the data is prepared (minutes, for a large corpus): the vocabulary's bound
    if let Some(vocab) = vocab_bound(cfg) {
        fits_in_memory(&cfg.model_config(vocab), cfg, &device)?;
    }
    std::fs::create_dir_all(&out_dir).map_err(|source| TrainError::Io { path: out_dir.clone(), source })?;

    let world = &spec.world;
    if !cfg.accumulation_steps().is_multiple_of(world.world_size()) {
        return Err(TrainError::Unsupported(format!(
            "batch_size {} is {} micro-batches of {}, which do not split evenly over {} processes; make batch_size / micro_batch_size a multiple of the number of processes",
            cfg.batch_size,
            cfg.accumulation_steps(),
            cfg.micro_batch_size,
            world.world_size()
        )));
    }
    // rank 0 prepares the data (downloads, tokenizer, token cache); the others then read the cache
    if !world.is_root() {
        world.barrier()?;
    }
    let data = prepare_data(cfg, &spec.cache_dir, tx)?;
    if world.is_root() {
        world.barrier()?;
    }
    let block_size = cfg.block_size;
    let train_blocks = data.train.num_blocks(block_size);
    let validation_blocks = data.validation.num_blocks(block_size);
    if validation_blocks == 0 {
        return Err(data::DataError::TooSmall { split: "validation", tokens: data.validation.len(), block_size }.into());
    }
    let steps_per_epoch = (train_blocks / cfg.batch_size) as u64;
    if steps_per_epoch == 0 {
        return Err(TrainError::TooFewBlocks { blocks: train_blocks, block_size, batch_size: cfg.batch_size });
    }

    fits_in_memory(&cfg.model_config(data.tokenizer.vocab_size()), cfg, &device)?;
    let load_started = Instant::now();
    let Start { model: model_cfg, weights, resume } = starting_model(cfg, data.tokenizer.vocab_size(), &device)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    check_vocab(&data, model_cfg.vocab_size)?;
    // bf16 compute over f32 master weights and optimizer state (CUDA only: checked above)
    let model = Trainable::new(&model_cfg, weights)?.with_dtype(dtype)?.with_engine(engine);
    let mut opt = AdamW::new(&model.vars, adamw_config(cfg), |_, v| v.rank() >= 2)?;
    let mut state = match &resume {
        Some(r) => {
            opt.load_state(&r.optimizer, r.state.optimizer_steps)
                .map_err(|e| TrainError::OptimizerState { dir: r.dir.clone(), reason: e.to_string() })?;
            emit(
                tx,
                Event::Message {
                    level: Level::Info,
                    text: format!(
                        "resuming from {} at step {} (read and checked in {load_seconds:.2} s)",
                        r.dir.display(),
                        r.state.global_step
                    ),
                },
            );
            if r.state.world_size != 0 && r.state.world_size != world.world_size() {
                // the global batch is fixed, so the update is the same: only float sums reorder
                let text = format!(
                    "the checkpoint was trained by {} processes and this run has {}: the updates are the same, losses may differ in the last digits (float sums in another order)",
                    r.state.world_size,
                    world.world_size()
                );
                emit(tx, Event::Message { level: Level::Warning, text });
            }
            let mut state = r.state.clone();
            state.world_size = world.world_size();
            state
        }
        None => TrainerState { world_size: world.world_size(), ..TrainerState::fresh(cfg) },
    };

    let total_steps = cfg.max_steps.unwrap_or_else(|| (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64);
    let warmup = LrSchedule::warmup_from(cfg.warmup_steps, cfg.warmup_ratio, total_steps);
    let schedule = LrSchedule {
        kind: cfg.lr_scheduler_type,
        base_lr: cfg.learning_rate,
        min_lr: 0.0,
        warmup_steps: warmup,
        total_steps,
    };
    state.max_steps = total_steps;
    let tokens_per_step = (cfg.batch_size * block_size) as u64;
    emit(
        tx,
        Event::TrainBegin(TrainBegin {
            config: serde_json::to_value(cfg).unwrap_or_default(),
            preset: spec.preset.clone(),
            num_parameters: model_cfg.num_parameters(),
            device: device::describe(&device),
            engine: {
                // micro-batches this process runs side by side (train::step::forward_backward_all)
                let micro = (cfg.accumulation_steps() / world.world_size()).max(1);
                let width = super::step::side_by_side(
                    engine,
                    &model_cfg,
                    (cfg.micro_batch_size, block_size),
                    cfg.gradient_checkpointing,
                )
                .min(micro);
                match width {
                    1 => engine.as_str().into(),
                    w => format!("{}, {w} micro-batches side by side", engine.as_str()),
                }
            },
            world_size: world.world_size(),
            backend: world.backend().into(),
            variant: model_cfg.variant_name(),
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
        }),
    );
    Ok(Run {
        spec,
        out_dir,
        device,
        engine,
        data,
        model_cfg,
        model,
        opt,
        state,
        schedule,
        train_blocks,
        steps_per_epoch,
        tokens_per_step,
    })
}

/// What the loop accumulates over this process's steps.
struct Session {
    clock: Clock,
    /// The step this session started at (0, or where it resumed).
    start_step: u64,
    loss_sum: f64,
    loss_count: u64,
    window: Window,
    last_eval: Option<EvalRecord>,
    last_saved_step: Option<u64>,
    /// Seconds spent in the gradient and loss all-reduce (several processes only).
    reduce_seconds: f64,
}

impl Session {
    fn new() -> Self {
        Self {
            clock: Clock::started(),
            start_step: 0,
            loss_sum: 0.0,
            loss_count: 0,
            window: Window::default(),
            last_eval: None,
            last_saved_step: None,
            reduce_seconds: 0.0,
        }
    }
}

/// Steps until the plan is done, a stop is asked for, or the run diverges (`Err`, which the
/// wrap-up reports). Errors of the machinery itself (a failed save) are returned too.
fn train_loop(
    run: &mut Run,
    ctl: &mut Controller,
    s: &mut Session,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let cfg = &run.spec.config;
    let total_steps = run.schedule.total_steps;
    let accumulation = cfg.accumulation_steps();
    let mut order: Option<EpochOrder> = None;
    let mut consecutive_skips = 0u64;

    // the untrained model's score (HF Trainer's eval_on_start): where every curve starts
    if cfg.eval_on_start && run.state.global_step == 0 {
        evaluate_now(run, s, 0, emit_ev)?;
    }
    while run.state.global_step < total_steps {
        let step = run.state.global_step;
        apply_controls(run, ctl, s, step, emit_ev)?;
        if ctl.stop.is_some() {
            break;
        }

        // learning rate: the schedule, times the user's multiplier
        let lr = run.schedule.lr_at(step) * ctl.lr_scale;

        // this step's blocks: epoch-seeded shuffle, consecutive batches within the epoch
        let epoch = step / run.steps_per_epoch;
        if order.as_ref().is_none_or(|o| o.epoch != epoch) {
            order = Some(EpochOrder::new(run.train_blocks, cfg.seed, epoch));
        }
        let offset = ((step % run.steps_per_epoch) as usize) * cfg.batch_size;
        let blocks = order.as_ref().map(|o| o.blocks(offset, cfg.batch_size).to_vec()).unwrap_or_default();

        // forward/backward over the micro-batches, gradients accumulated
        let started = Instant::now();
        let mut acc = Accumulated::default();
        let mut step_loss = 0.0;
        // every token of the step's batch (this process's share of it), not the last micro-batch's
        let mut diff_norms: Option<Vec<f32>> = None;
        let batcher = Batcher { stream: &run.data.train, block_size: cfg.block_size };
        let world = &run.spec.world;
        // this rank's share of the step's micro-batches: every world_size-th, from its rank
        let mine: Vec<(usize, &[usize])> = blocks
            .chunks(cfg.micro_batch_size)
            .enumerate()
            .filter(|(i, _)| i % world.world_size() == world.rank())
            .collect();
        let ids: Vec<Tensor> =
            mine.iter().map(|(_, micro)| batcher.batch(micro, &run.device)).collect::<Result<_, _>>()?;
        let batches: Vec<MicroBatch> = ids.iter().map(|ids| MicroBatch { ids, targets: None }).collect();
        // a mask stream per micro-batch, so that a share of them on each of several processes
        // draws the masks one process would
        let dropout_for = |k: usize| {
            let i = mine[k].0 as u64;
            let d = Dropout::new(
                cfg.dropout as f32,
                cfg.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            d.is_active().then_some(d)
        };
        // controls are polled between micro-batches (or groups of them run side by side)
        let is_root = world.is_root();
        let mut between = || {
            if is_root {
                ctl.poll(step, emit_ev);
                while ctl.paused {
                    ctl.wait(step, &mut s.clock, emit_ev);
                }
            }
        };
        let outs = forward_backward_all(
            run.engine,
            &run.model,
            &batches,
            1.0 / accumulation as f64,
            &dropout_for,
            cfg.gradient_checkpointing,
            &mut acc,
            &mut between,
        )?;
        for out in outs {
            step_loss += out.loss / accumulation as f64;
            if let Some(norms) = out.diff_norms {
                diff_norms.get_or_insert_with(Vec::new).extend(norms);
            }
        }
        // the sums over all ranks: each rank's gradients and loss are its share of the whole
        // batch's (scaled by 1 / all micro-batches), so the sum is the one-process step
        if world.world_size() > 1 {
            let reduce_started = Instant::now();
            acc.all_reduce(&**world)?;
            let mut loss = [step_loss];
            world.all_reduce_sum_f64(&mut loss)?;
            step_loss = loss[0];
            s.reduce_seconds += reduce_started.elapsed().as_secs_f64();
        }
        let mut grads = acc.into_grads(&run.model_cfg)?;
        inject(run.spec, step, &mut step_loss, &mut grads)?;

        // per-layer gradient norms, on the steps that log them (a pass over the gradients)
        let logs = (step + 1).is_multiple_of(cfg.logging_steps) || step + 1 == total_steps;
        let grad_squares = if logs { Some(optim::grads::squares(&grads)?) } else { None };

        // the update, unless the loss or the gradient is not finite
        let update = if step_loss.is_finite() {
            optim::step(&mut run.opt, &grads, lr, cfg.max_grad_norm)?
        } else {
            optim::Update { grad_norm: f64::NAN, applied: false }
        };
        drop(grads);
        let elapsed_step = started.elapsed().as_secs_f64();

        let state = &mut run.state;
        state.global_step += 1;
        let done = state.global_step;
        state.epoch = done as f64 / run.steps_per_epoch as f64;
        state.data_epoch = done / run.steps_per_epoch;
        state.data_offset = (done % run.steps_per_epoch) * cfg.batch_size as u64;

        if update.applied {
            consecutive_skips = 0;
            state.optimizer_steps = run.opt.steps_taken();
            s.loss_sum += step_loss;
            s.loss_count += 1;
            s.window.add(step_loss, elapsed_step, run.tokens_per_step);
            if done.is_multiple_of(cfg.logging_steps) || done == total_steps {
                let elapsed = s.clock.elapsed().as_secs_f64();
                let mut rec = s.window.record(done, state.epoch, lr, update.grad_norm, diff_norms.as_deref(), elapsed);
                // the pace of this session so far (a resumed run's earlier steps are not in it)
                let ran = done.saturating_sub(s.start_step);
                rec.eta_seconds = (ran > 0).then(|| elapsed / ran as f64 * total_steps.saturating_sub(done) as f64);
                rec.rss_mib = Some(device::rss_mib().0).filter(|m| m.is_finite());
                rec.gpu_mib = device::gpu_used_mib(&run.device);
                if let Some(g) = &grad_squares {
                    rec.layers = Some(optim::layer_stats(g, &run.opt.last_update_squares()?));
                }
                emit_ev(Event::Progress(rec));
                s.window = Window::default();
            }
        } else {
            consecutive_skips += 1;
            state.skipped_steps += 1;
            let reason = if step_loss.is_finite() {
                format!("gradient norm is {}", update.grad_norm)
            } else {
                format!("loss is {step_loss}")
            };
            emit_ev(Event::Skipped(SkippedRecord { step: done, reason, consecutive: consecutive_skips }));
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                return Err(TrainError::Diverged { steps: consecutive_skips, step: done });
            }
        }
        // evaluations and saves fall on their steps whether or not this step's update was made
        if done.is_multiple_of(cfg.eval_steps) && done < total_steps {
            evaluate_now(run, s, done, emit_ev)?;
        }
        if cfg.save_steps > 0 && done.is_multiple_of(cfg.save_steps) && done < total_steps {
            save_checkpoint(run, ctl.lr_scale, CheckpointReason::SaveSteps, emit_ev, &mut s.last_saved_step)?;
        }
    }
    Ok(())
}

/// Pause (waiting out the pause, saving on request while paused) and checkpoint-now.
fn apply_controls(
    run: &mut Run,
    ctl: &mut Controller,
    s: &mut Session,
    step: u64,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let world = run.spec.world.clone();
    // rank 0 takes the controls (TUI, watch, signals); the others follow its decisions
    if world.is_root() {
        ctl.poll(step, emit_ev);
        loop {
            if ctl.checkpoint_requested {
                save_checkpoint(run, ctl.lr_scale, CheckpointReason::Control, emit_ev, &mut s.last_saved_step)?;
                ctl.checkpoint_requested = false;
            }
            if !ctl.paused {
                break;
            }
            ctl.wait(step, &mut s.clock, emit_ev);
        }
    }
    if world.world_size() > 1 {
        // the LR multiplier and a stop, the same on every rank at this step boundary (the
        // others wait here while rank 0 is paused)
        let stop = match ctl.stop {
            None => 0.0,
            Some(false) => 1.0,
            Some(true) => 2.0,
        };
        let mut shared = [ctl.lr_scale, stop];
        world.broadcast_f64(&mut shared)?;
        ctl.lr_scale = shared[0];
        ctl.stop = match shared[1] as u8 {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        };
    }
    Ok(())
}

/// The final evaluation, unless this session trained nothing or it is already done, and the
/// final save unless the run was stopped without saving.
fn final_eval_and_save(
    run: &mut Run,
    ctl: &Controller,
    s: &mut Session,
    session_start: u64,
    stopped: bool,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let done = run.state.global_step;
    if s.last_eval.as_ref().is_none_or(|e| e.step != done) && done > session_start {
        evaluate_now(run, s, done, emit_ev)?;
    }
    if ctl.stop != Some(false) && done > 0 {
        let reason = if stopped { CheckpointReason::Stop } else { CheckpointReason::Final };
        if s.last_saved_step != Some(done) {
            save_checkpoint(run, ctl.lr_scale, reason, emit_ev, &mut s.last_saved_step)?;
        }
        if run.spec.world.is_root() {
            let weights = run.model.weights();
            checkpoint::save_model_dir(&run.out_dir, &parts(run, &weights)?.as_parts())?;
        }
    }
    Ok(())
}

/// The final evaluation and save (unless stopped without saving, or failed), then `train_end`.
fn wrap_up(
    run: &mut Run,
    ctl: &Controller,
    mut s: Session,
    session_start: u64,
    failure: Option<TrainError>,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<TrainEnd, TrainError> {
    let mut failure = failure;
    let stopped = ctl.stop.is_some() || failure.is_some();
    let done = run.state.global_step;
    if failure.is_none() {
        // a failure here (a full disk, say) is reported in train_end like any other
        if let Err(e) = final_eval_and_save(run, ctl, &mut s, session_start, stopped, emit_ev) {
            failure = Some(e);
        }
    }
    let runtime = s.clock.elapsed().as_secs_f64();
    let trained = done - session_start;
    let world = &run.spec.world;
    if world.world_size() > 1 {
        let share = 100.0 * s.reduce_seconds / runtime.max(1e-9);
        let text = format!(
            "{} processes ({}): the gradient and loss all-reduce took {:.2} s of {:.2} s of training on rank 0 ({share:.1}%)",
            world.world_size(),
            world.backend(),
            s.reduce_seconds,
            runtime
        );
        emit_ev(Event::Message { level: Level::Info, text });
    }
    let end = TrainEnd {
        step: done,
        epoch: run.state.epoch,
        train_loss: (s.loss_count > 0).then(|| s.loss_sum / s.loss_count as f64),
        eval_loss: s.last_eval.as_ref().map(|e| e.eval_loss),
        perplexity: s.last_eval.as_ref().map(|e| e.perplexity),
        train_runtime: runtime,
        tokens_per_second: (trained * run.tokens_per_step) as f64 / runtime.max(1e-9),
        skipped_steps: run.state.skipped_steps,
        status: if failure.is_some() {
            RunStatus::Failed
        } else if stopped {
            RunStatus::Stopped
        } else {
            RunStatus::Completed
        },
        error: failure.as_ref().map(|e| e.to_string()),
        output_dir: run.out_dir.display().to_string(),
    };
    if failure.is_none() && world.is_root() {
        // for the picker's estimates: what this shape runs at here (best effort: a cache that
        // cannot be written costs the estimate, not the run)
        let measured =
            super::throughput::Measured { tokens_per_second: end.tokens_per_second, when: now(), steps: trained };
        let key = super::throughput::key(&run.spec.config, world.world_size());
        let _ = super::throughput::record(&run.spec.cache_dir, key, measured);
    }
    emit_ev(Event::TrainEnd(end.clone()));
    match failure {
        Some(e) => Err(e),
        None => Ok(end),
    }
}

fn check_vocab(data: &PreparedData, vocab: usize) -> Result<(), TrainError> {
    for (split, stream) in [("train", &data.train), ("validation", &data.validation)] {
        if let Some(id) = stream.max_id().filter(|id| *id as usize >= vocab) {
            return Err(data::DataError::OutOfVocab { split, id, vocab }.into());
        }
    }
    Ok(())
}

/// Test fault injection: a non-finite loss or gradient, or a panic, at chosen steps.
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
            Injection::Panic => panic!("injected at step {step} (DIFFLAB_INJECT_NONFINITE)"),
        }
    }
    Ok(())
}

/// Evaluates now and records it (event, `log_history`, best metric).
fn evaluate_now(run: &mut Run, s: &mut Session, step: u64, emit_ev: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
    let cfg = &run.spec.config;
    let started = Instant::now();
    let gpt = run.model.detached()?;
    let max = cfg.eval_max_blocks.map(|n| n as usize);
    // sharded over the processes by batch, and summed
    let world = &run.spec.world;
    let shard = (world.rank(), world.world_size());
    let part =
        evaluate_part(&gpt, &run.data.validation, cfg.block_size, cfg.eval_batch_size(), max, &run.device, shard)?;
    let mut sums = [part.loss_sum, part.blocks as f64];
    world.all_reduce_sum_f64(&mut sums)?;
    let part = EvalPart { loss_sum: sums[0], blocks: sums[1] as u64 };
    let (loss, predictions) = (part.mean(), part.blocks * (cfg.block_size as u64 - 1));
    let secs = started.elapsed().as_secs_f64();
    let tokens = predictions + predictions / (cfg.block_size as u64 - 1);
    let validation_blocks = run.data.validation.num_blocks(cfg.block_size) as u64;
    let rec = EvalRecord {
        step,
        epoch: run.state.epoch,
        eval_loss: loss,
        perplexity: loss.exp(),
        eval_tokens: tokens,
        eval_tokens_per_second: tokens as f64 / secs.max(1e-9),
        eval_blocks: predictions / (cfg.block_size as u64 - 1),
        validation_blocks,
        split: cfg.eval_split.name().into(),
    };
    note_eval(&mut run.state, &rec);
    emit_ev(Event::Evaluate(rec.clone()));
    s.last_eval = Some(rec);
    if let (Some(prompt), true) = (&cfg.sample_prompt, world.is_root()) {
        emit_ev(Event::Sample(sample(&gpt, &run.data.tokenizer, prompt, step, cfg.seed)?));
    }
    Ok(())
}

/// The `sample_prompt` continuation: 48 tokens, temperature 0.8, top-k 40, the run's seed (the
/// same draw at every evaluation, so what changes is the model).
fn sample(gpt: &Gpt, tokenizer: &Tokenizer, prompt: &str, step: u64, seed: u64) -> Result<SampleRecord, TrainError> {
    let sampling = Sampling { temperature: 0.8, top_k: 40, top_p: 1.0, seed };
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        ids.extend(tokenizer.end_of_text_id());
    }
    let text = match ids.is_empty() {
        true => String::new(),
        false => {
            let out = generate(gpt, &ids, 48, &sampling, tokenizer.end_of_text_id(), &mut |_| {})?;
            tokenizer.decode(&out)?
        }
    };
    Ok(SampleRecord {
        step,
        prompt: prompt.into(),
        text,
        sampling: format!("temperature {}, top-k {}, seed {seed}", sampling.temperature, sampling.top_k),
    })
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

fn parts<'a>(run: &'a Run, weights: &'a BTreeMap<String, Tensor>) -> Result<OwnedParts<'a>, TrainError> {
    Ok(OwnedParts { run, weights, optimizer: run.opt.state_tensors()? })
}

/// The optimizer state materialised next to borrowed parts, for one save.
struct OwnedParts<'a> {
    run: &'a Run<'a>,
    weights: &'a BTreeMap<String, Tensor>,
    optimizer: BTreeMap<String, Tensor>,
}

impl OwnedParts<'_> {
    fn as_parts(&self) -> Parts<'_> {
        Parts {
            model: &self.run.model_cfg,
            weights: self.weights,
            optimizer: &self.optimizer,
            tokenizer_json: self.run.data.tokenizer.json(),
            run_config: &self.run.spec.config,
            state: &self.run.state,
            eos_token_id: self.run.data.tokenizer.end_of_text_id(),
        }
    }
}

fn save_checkpoint(
    run: &mut Run,
    lr_scale: f64,
    reason: CheckpointReason,
    emit_ev: &mut dyn FnMut(Event),
    last_saved: &mut Option<u64>,
) -> Result<(), TrainError> {
    // only rank 0 writes; the others hold the same weights
    if !run.spec.world.is_root() {
        *last_saved = Some(run.state.global_step);
        return Ok(());
    }
    let state = &mut run.state;
    state.lr_scale = lr_scale;
    let step = state.global_step;
    let best_now = state.log_history.last().and_then(|e| e["step"].as_u64()) == Some(step)
        && state.best_metric.is_some()
        && state.log_history.last().and_then(|e| e["eval_loss"].as_f64()) == state.best_metric;
    if best_now {
        state.best_model_checkpoint = Some(checkpoint::checkpoint_dir(&run.out_dir, step).display().to_string());
    }
    let started = Instant::now();
    let weights = run.model.weights();
    let owned = parts(run, &weights)?;
    let path = checkpoint::save(&run.out_dir, &owned.as_parts())?;
    let seconds = Some(started.elapsed().as_secs_f64());
    let keep = run.state.best_model_checkpoint.as_ref().and_then(|p| p.rsplit('-').next()?.parse().ok());
    let deleted = checkpoint::rotate(&run.out_dir, run.spec.config.save_total_limit, keep);
    *last_saved = Some(step);
    emit_ev(Event::Checkpoint(CheckpointRecord {
        step,
        path: path.display().to_string(),
        reason,
        deleted: deleted.iter().map(|p| p.display().to_string()).collect(),
        seconds,
    }));
    Ok(())
}

/// Losses and throughput since the last progress marker.
#[derive(Default)]
struct Window {
    loss_sum: f64,
    steps: u64,
    seconds: f64,
    tokens: u64,
}

impl Window {
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
            diff_norm_hist: stats.map(|s| Histogram {
                counts: s.hist_counts,
                edges: s.hist_edges,
                sum: s.sum,
                sum_squares: s.sum_squares,
            }),
            elapsed,
            ..Default::default()
        }
    }
}
