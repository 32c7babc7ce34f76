//! The training loop, top to bottom: prepare data, build or restore the model and optimizer,
//! then per step: controls, learning rate, the step (`step::gradients`, `step::apply`), log,
//! evaluate, checkpoint. Then the final evaluation and save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use super::checkpoint::{self, Parts, ProgressWindow, TrainerState};
use super::controls::{Clock, Controller, StopSignal};
use super::evaluate::{evaluate_part, EvalPart};
use super::overlap::ReduceTimes;
use super::step::{self, BlockSchedule, Gradients, Recipe};
use super::{device, emit, Injection, RunSpec, TrainError};
use crate::config::RunConfig;
use crate::data::{self, Batcher, DataConfig, PreparedData, Tokenizer, TokenizerSpec};
use crate::engine::Placement;
use crate::events::*;
use crate::model::diagnostics::{norm_stats, HISTOGRAM_BINS};
use crate::model::generate::{generate, Sampling};
use crate::model::params::init_weights;
use crate::model::{Gpt, GptConfig, Trainable};
use crate::optim::{self, AdamW, AdamWConfig, LrSchedule, Update};

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

/// Refuses a model whose training would not fit in this machine's memory (on the CPU; a GPU's
/// memory is not queried), naming the estimate, instead of dying in an allocation.
pub fn fits_in_memory(model: &GptConfig, cfg: &RunConfig, device: &Device) -> Result<(), TrainError> {
    let (Some(available), true) = (device::available_memory(), device.is_cpu()) else { return Ok(()) };
    // bf16 on the CPU may pack the matmul weights into bf16 panels once per step
    let micro = (cfg.micro_batch_size, cfg.block_size);
    let width = super::micro::side_by_side(crate::engine::Engine::CpuStep, model, micro, cfg.gradient_checkpointing);
    let packs = cfg.dtype == crate::config::Precision::Bf16
        && crate::model::cpu_step::packs_weights_once(model, micro, width.min(cfg.accumulation_steps()));
    let panels = if packs { model.bf16_panel_bytes() } else { 0 };
    let needed = model.training_bytes(cfg.micro_batch_size, cfg.block_size, cfg.gradient_checkpointing) + panels;
    if needed <= available {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let params = model.num_parameters() as u64;
    let panels =
        if panels > 0 { format!(", {:.1} GiB for the bf16 weight panels", gib(panels)) } else { String::new() };
    Err(TrainError::TooBig {
        needed_gib: gib(needed),
        available_gib: gib(available),
        detail: format!(
            "{params} parameters: {:.1} GiB for weights, gradients and AdamW moments{panels}; the rest activations at micro_batch_size {}, block_size {}",
            gib(16 * params),
            cfg.micro_batch_size,
            cfg.block_size
        ),
    })
}

/// How the step's gradients travel between processes.
fn wire(cfg: &RunConfig) -> crate::dist::Wire {
    match cfg.grad_reduce_dtype {
        crate::config::Precision::F32 => crate::dist::Wire::F32,
        crate::config::Precision::Bf16 => crate::dist::Wire::Bf16,
    }
}

pub fn adamw_config(cfg: &RunConfig) -> AdamWConfig {
    AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weight_decay: cfg.weight_decay }
}

/// Everything the loop works on, built by `set_up`.
struct Trainer<'a> {
    spec: &'a RunSpec,
    out_dir: PathBuf,
    placement: Placement,
    data: PreparedData,
    model_cfg: GptConfig,
    model: Trainable,
    opt: AdamW,
    state: TrainerState,
    schedule: LrSchedule,
    blocks: BlockSchedule,
    tokens_per_step: u64,
}

/// The whole run. Returns the final figures; errors end the run (reported by the caller).
pub fn train(
    spec: &RunSpec,
    tx: &Sender<Event>,
    controls: Receiver<ControlMsg>,
    stop: StopSignal,
) -> Result<TrainEnd, TrainError> {
    let mut t = set_up(spec, tx)?;
    let mut ctl = Controller::new(controls, stop, t.state.lr_scale);
    let mut emit_ev = |e: Event| emit(tx, e);
    let mut tally = Tally::new(t.state.global_step);
    let failure = train_loop(&mut t, &mut ctl, &mut tally, &mut emit_ev).err();
    wrap_up(&mut t, &ctl, tally, failure, &mut emit_ev)
}

/// Placement, data, model, optimizer, plan; ends with the `train_begin` event.
fn set_up<'a>(spec: &'a RunSpec, tx: &Sender<Event>) -> Result<Trainer<'a>, TrainError> {
    let cfg = &spec.config;
    let out_dir = PathBuf::from(&cfg.output_dir);
    let placement = device::placement(cfg, spec.world.world_size())?;
    // before the data is prepared (minutes, for a large corpus): the vocabulary's bound
    if let Some(vocab) = vocab_bound(cfg) {
        fits_in_memory(&cfg.model_config(vocab), cfg, &placement.device)?;
    }
    check_world(cfg, spec.world.world_size())?;
    std::fs::create_dir_all(&out_dir).map_err(|source| TrainError::Io { path: out_dir.clone(), source })?;
    let data = prepare_shared(spec, tx)?;
    let blocks = check_blocks(cfg, &data)?;
    fits_in_memory(&cfg.model_config(data.tokenizer.vocab_size()), cfg, &placement.device)?;
    let (model_cfg, model, opt, mut state) = restore_or_init(spec, &data, &placement, tx)?;
    let total_steps =
        cfg.max_steps.unwrap_or_else(|| (cfg.num_train_epochs * blocks.steps_per_epoch() as f64).ceil() as u64);
    let schedule = LrSchedule {
        kind: cfg.lr_scheduler_type,
        base_lr: cfg.learning_rate,
        min_lr: 0.0,
        warmup_steps: LrSchedule::warmup_from(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
        total_steps,
    };
    state.max_steps = total_steps;
    let t = Trainer {
        spec,
        out_dir,
        placement,
        data,
        model_cfg,
        model,
        opt,
        state,
        schedule,
        blocks,
        tokens_per_step: (cfg.batch_size * cfg.block_size) as u64,
    };
    emit(tx, Event::TrainBegin(train_begin(&t)));
    if wire(cfg) == crate::dist::Wire::Bf16 && spec.world.world_size() == 1 {
        let text = "grad_reduce_dtype bf16 changes nothing in one process: gradients are summed between processes only (mpirun -n 2 ...)".into();
        emit(tx, Event::Message { level: Level::Warning, text });
    }
    Ok(t)
}

/// The micro-batches of a step must split evenly over the processes.
fn check_world(cfg: &RunConfig, world_size: usize) -> Result<(), TrainError> {
    if cfg.accumulation_steps().is_multiple_of(world_size) {
        return Ok(());
    }
    Err(TrainError::Unsupported(format!(
        "batch_size {} is {} micro-batches of {}, which do not split evenly over {world_size} processes; make batch_size / micro_batch_size a multiple of the number of processes",
        cfg.batch_size,
        cfg.accumulation_steps(),
        cfg.micro_batch_size,
    )))
}

/// Rank 0 prepares the data (downloads, tokenizer, token cache); the others then read the cache.
fn prepare_shared(spec: &RunSpec, tx: &Sender<Event>) -> Result<PreparedData, TrainError> {
    let world = &spec.world;
    if !world.is_root() {
        world.barrier()?;
    }
    let data = prepare_data(&spec.config, &spec.cache_dir, tx)?;
    if world.is_root() {
        world.barrier()?;
    }
    Ok(data)
}

/// The training split must hold a batch and the evaluation split a block.
fn check_blocks(cfg: &RunConfig, data: &PreparedData) -> Result<BlockSchedule, TrainError> {
    let block_size = cfg.block_size;
    let train_blocks = data.train.num_blocks(block_size);
    if data.validation.num_blocks(block_size) == 0 {
        return Err(data::DataError::TooSmall { split: "validation", tokens: data.validation.len(), block_size }.into());
    }
    let blocks = BlockSchedule::new(train_blocks, cfg.batch_size, cfg.micro_batch_size, cfg.seed);
    if blocks.steps_per_epoch() == 0 {
        return Err(TrainError::TooFewBlocks { blocks: train_blocks, block_size, batch_size: cfg.batch_size });
    }
    Ok(blocks)
}

/// The model, optimizer and state: from the checkpoint when resuming, else fresh from the seed.
fn restore_or_init(
    spec: &RunSpec,
    data: &PreparedData,
    placement: &Placement,
    tx: &Sender<Event>,
) -> Result<(GptConfig, Trainable, AdamW, TrainerState), TrainError> {
    let (cfg, world_size) = (&spec.config, spec.world.world_size());
    let load_started = Instant::now();
    let Start { model: model_cfg, weights, resume } =
        starting_model(cfg, data.tokenizer.vocab_size(), &placement.device)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    check_vocab(data, model_cfg.vocab_size)?;
    // bf16 compute over f32 master weights and optimizer state (CUDA only: see `placement`)
    let model = Trainable::new(&model_cfg, weights, placement)?;
    let mut opt = AdamW::new(&model.vars, adamw_config(cfg), |_, v| v.rank() >= 2)?;
    let Some(r) = resume else {
        let state = TrainerState { world_size, ..TrainerState::fresh(cfg) };
        return Ok((model_cfg, model, opt, state));
    };
    opt.load_state(&r.optimizer, r.state.optimizer_steps)
        .map_err(|e| TrainError::OptimizerState { dir: r.dir.clone(), reason: e.to_string() })?;
    let text = format!(
        "resuming from {} at step {} (read and checked in {load_seconds:.2} s)",
        r.dir.display(),
        r.state.global_step
    );
    emit(tx, Event::Message { level: Level::Info, text });
    if r.state.world_size != 0 && r.state.world_size != world_size {
        // the global batch is fixed, so the update is the same: only float sums reorder
        let text = format!(
            "the checkpoint was trained by {} processes and this run has {world_size}: the updates are the same, losses may differ in the last digits (float sums in another order)",
            r.state.world_size,
        );
        emit(tx, Event::Message { level: Level::Warning, text });
    }
    let state = TrainerState { world_size, ..r.state };
    Ok((model_cfg, model, opt, state))
}

fn train_begin(t: &Trainer) -> TrainBegin {
    let cfg = &t.spec.config;
    let world = &t.spec.world;
    // micro-batches this process runs side by side (train::micro::forward_backward_all)
    let micro = (cfg.accumulation_steps() / world.world_size()).max(1);
    let engine = t.placement.engine;
    let width = super::micro::side_by_side(
        engine,
        &t.model_cfg,
        (cfg.micro_batch_size, cfg.block_size),
        cfg.gradient_checkpointing,
    )
    .min(micro);
    TrainBegin {
        config: serde_json::Value::Object(cfg.to_map()),
        preset: t.spec.preset.clone(),
        num_parameters: t.model_cfg.num_parameters(),
        device: device::describe(&t.placement.device),
        engine: super::micro::describe(&t.placement, &t.model_cfg, (cfg.micro_batch_size, cfg.block_size), width),
        world_size: world.world_size(),
        // the path the gradients take between processes, where there are several
        backend: match world.world_size() {
            1 => world.backend().into(),
            _ => {
                let mut path = world.backend().to_string();
                if wire(cfg) == crate::dist::Wire::Bf16 {
                    path += ", gradients in bf16";
                }
                if super::overlap::applies(engine, cfg.grad_reduce_overlap) {
                    path += ", all-reduce during the backward";
                }
                path
            }
        },
        variant: t.model_cfg.variant_name(),
        vocab_size: t.model_cfg.vocab_size,
        train_blocks: t.data.train.num_blocks(cfg.block_size),
        validation_blocks: t.data.validation.num_blocks(cfg.block_size),
        steps_per_epoch: t.blocks.steps_per_epoch(),
        total_steps: t.schedule.total_steps,
        start_step: t.state.global_step,
        tokens_per_step: t.tokens_per_step,
        warmup_steps: t.schedule.warmup_steps,
        output_dir: t.out_dir.display().to_string(),
        timestamp: now(),
    }
}

/// What the loop keeps over this process's session of the run.
struct Tally {
    clock: Clock,
    /// The step this session started at (0, or where it resumed).
    start_step: u64,
    last_eval: Option<EvalRecord>,
    last_saved_step: Option<u64>,
    /// What the gradient and loss all-reduce cost (several processes only).
    reduce: ReduceTimes,
    consecutive_skips: u64,
    /// The run stopped itself on a plateau (`early_stopping_patience`).
    early_stopped: bool,
}

impl Tally {
    fn new(start_step: u64) -> Self {
        Self {
            clock: Clock::started(),
            start_step,
            last_eval: None,
            last_saved_step: None,
            reduce: ReduceTimes::default(),
            consecutive_skips: 0,
            early_stopped: false,
        }
    }
}

/// Steps until the plan is done, a stop is asked for, or the run diverges (`Err`, which the
/// wrap-up reports). Errors of the machinery itself (a failed save) are returned too.
fn train_loop(
    t: &mut Trainer,
    ctl: &mut Controller,
    tally: &mut Tally,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let cfg = &t.spec.config;
    let total_steps = t.schedule.total_steps;
    // the untrained model's score (HF Trainer's eval_on_start): where every curve starts
    if cfg.eval_on_start && t.state.global_step == 0 {
        evaluate_now(t, tally, 0, emit_ev)?;
    }
    while t.state.global_step < total_steps {
        let step = t.state.global_step;
        apply_controls(t, ctl, tally, step, emit_ev)?;
        if ctl.stop.is_some() {
            break;
        }
        // learning rate: the schedule, times the user's multiplier
        let lr = t.schedule.lr_at(step) * ctl.lr_scale;
        let started = Instant::now();
        let (g, update) = one_step(t, ctl, tally, step, lr, emit_ev)?;
        let seconds = started.elapsed().as_secs_f64();
        advance(t);
        record(t, tally, &g, update, lr, seconds, emit_ev)?;
        drop(g);
        // evaluations and saves fall on their steps whether or not this step's update was made
        let done = t.state.global_step;
        if done.is_multiple_of(cfg.eval_steps) && done < total_steps {
            evaluate_now(t, tally, done, emit_ev)?;
            if let Some(text) = plateau(t) {
                emit_ev(Event::Message { level: Level::Info, text });
                tally.early_stopped = true;
                ctl.stop = Some(true);
            }
        }
        if cfg.save_steps > 0 && done.is_multiple_of(cfg.save_steps) && done < total_steps {
            save_checkpoint(t, ctl.lr_scale, CheckpointReason::SaveSteps, emit_ev, &mut tally.last_saved_step)?;
        }
    }
    Ok(())
}

/// One optimizer step: this process's micro-batches of the step, their gradients summed over
/// the processes, then AdamW (unless the loss or gradient is not finite). Controls are polled
/// between micro-batches, so a pause takes effect within a step.
fn one_step(
    t: &mut Trainer,
    ctl: &mut Controller,
    tally: &mut Tally,
    step: u64,
    lr: f64,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(Gradients, Update), TrainError> {
    let cfg = &t.spec.config;
    let world = &t.spec.world;
    let micro = t.blocks.micro_batches(step, world.rank(), world.world_size());
    let batcher = Batcher { stream: &t.data.train, block_size: cfg.block_size };
    let ids = step::load(&batcher, &micro, &t.placement.device)?;
    let recipe = Recipe {
        placement: &t.placement,
        world: &**world,
        micro_batches: cfg.accumulation_steps(),
        checkpointing: cfg.gradient_checkpointing,
        dropout: cfg.dropout,
        seed: cfg.seed,
        grad_wire: wire(cfg),
        grad_overlap: cfg.grad_reduce_overlap,
        bucket_bytes: cfg.ddp_bucket_cap_mb.saturating_mul(1 << 20),
    };
    let is_root = world.is_root();
    let clock = &mut tally.clock;
    let mut between = || {
        if is_root {
            ctl.poll(step, emit_ev);
            while ctl.paused {
                ctl.wait(step, clock, emit_ev);
            }
        }
    };
    let mut g = step::gradients(&t.model, &recipe, step, &step::as_batches(&ids), &mut between)?;
    tally.reduce.busy += g.reduce.busy;
    tally.reduce.waited += g.reduce.waited;
    inject(t.spec, step, &mut g)?;
    let update = step::apply(&mut t.opt, &g, lr, cfg.max_grad_norm)?;
    Ok((g, update))
}

/// The step is done: where the run and its data stand now.
fn advance(t: &mut Trainer) {
    let per_epoch = t.blocks.steps_per_epoch();
    let state = &mut t.state;
    state.global_step += 1;
    let done = state.global_step;
    state.epoch = done as f64 / per_epoch as f64;
    state.data_epoch = done / per_epoch;
    state.data_offset = (done % per_epoch) * t.spec.config.batch_size as u64;
}

/// The step's figures: into the train-loss sums and the progress window (a progress marker on
/// logging steps), or a skipped step, which after `MAX_CONSECUTIVE_SKIPS` in a row ends the run.
fn record(
    t: &mut Trainer,
    tally: &mut Tally,
    g: &Gradients,
    update: Update,
    lr: f64,
    seconds: f64,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let (cfg, total_steps) = (&t.spec.config, t.schedule.total_steps);
    let done = t.state.global_step;
    if !update.applied {
        tally.consecutive_skips += 1;
        t.state.skipped_steps += 1;
        let reason = match g.loss.is_finite() {
            true => format!("gradient norm is {}", update.grad_norm),
            false => format!("loss is {}", g.loss),
        };
        emit_ev(Event::Skipped(SkippedRecord { step: done, reason, consecutive: tally.consecutive_skips }));
        if tally.consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
            return Err(TrainError::Diverged { steps: tally.consecutive_skips, step: done });
        }
        return Ok(());
    }
    tally.consecutive_skips = 0;
    let state = &mut t.state;
    state.optimizer_steps = t.opt.steps_taken();
    state.train_loss_sum += g.loss;
    state.train_loss_steps += 1;
    state.progress_window.add(g.loss, seconds, t.tokens_per_step);
    if !(done.is_multiple_of(cfg.logging_steps) || done == total_steps) {
        return Ok(());
    }
    let elapsed = tally.clock.elapsed().as_secs_f64();
    let window = std::mem::take(&mut state.progress_window);
    let mut rec = progress(&window, done, state.epoch, lr, update.grad_norm, g.diff_norms.as_deref(), elapsed);
    // the pace of this session so far (a resumed run's earlier steps are not in it)
    let ran = done.saturating_sub(tally.start_step);
    rec.eta_seconds = (ran > 0).then(|| elapsed / ran as f64 * total_steps.saturating_sub(done) as f64);
    rec.rss_mib = Some(device::rss_mib().0).filter(|m| m.is_finite());
    rec.gpu_mib = device::gpu_used_mib(&t.placement.device);
    // per-layer gradient norms and update ratios (a pass over the gradients, on logging steps)
    rec.layers = Some(optim::layer_stats(&optim::grads::squares(&g.grads)?, &t.opt.last_update_squares()?));
    emit_ev(Event::Progress(rec));
    Ok(())
}

/// With `early_stopping_patience`: the line that says why the run stops, once that many
/// evaluations in a row have not improved on the best.
fn plateau(t: &Trainer) -> Option<String> {
    let cfg = &t.spec.config;
    let patience = cfg.early_stopping_patience?;
    let waited = t.state.evals_without_improvement;
    (waited >= patience).then(|| {
        format!(
            "early stopping: the eval loss has not improved on its best {:.4} by more than {} for {waited} evaluations; stopping at step {} with a checkpoint",
            t.state.best_metric.unwrap_or(f64::NAN),
            cfg.early_stopping_threshold,
            t.state.global_step
        )
    })
}

/// Pause (waiting out the pause, saving on request while paused) and checkpoint-now.
fn apply_controls(
    t: &mut Trainer,
    ctl: &mut Controller,
    tally: &mut Tally,
    step: u64,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let world = t.spec.world.clone();
    // rank 0 takes the controls (TUI, watch, signals); the others follow its decisions
    if world.is_root() {
        ctl.poll(step, emit_ev);
        loop {
            if ctl.checkpoint_requested {
                save_checkpoint(t, ctl.lr_scale, CheckpointReason::Control, emit_ev, &mut tally.last_saved_step)?;
                ctl.checkpoint_requested = false;
            }
            if !ctl.paused {
                break;
            }
            ctl.wait(step, &mut tally.clock, emit_ev);
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
    t: &mut Trainer,
    ctl: &Controller,
    tally: &mut Tally,
    stopped: bool,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let done = t.state.global_step;
    if tally.last_eval.as_ref().is_none_or(|e| e.step != done) && done > tally.start_step {
        evaluate_now(t, tally, done, emit_ev)?;
    }
    if ctl.stop != Some(false) && done > 0 {
        let reason = if stopped { CheckpointReason::Stop } else { CheckpointReason::Final };
        if tally.last_saved_step != Some(done) {
            save_checkpoint(t, ctl.lr_scale, reason, emit_ev, &mut tally.last_saved_step)?;
        }
        if t.spec.world.is_root() {
            let weights = t.model.weights();
            checkpoint::save_model_dir(&t.out_dir, &parts(t, &weights)?.as_parts())?;
        }
    }
    Ok(())
}

/// The final evaluation and save (unless stopped without saving, or failed), then `train_end`.
fn wrap_up(
    t: &mut Trainer,
    ctl: &Controller,
    mut tally: Tally,
    failure: Option<TrainError>,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<TrainEnd, TrainError> {
    let mut failure = failure;
    let stopped = ctl.stop.is_some() || failure.is_some();
    if failure.is_none() {
        // a failure here (a full disk, say) is reported in train_end like any other
        if let Err(e) = final_eval_and_save(t, ctl, &mut tally, stopped, emit_ev) {
            failure = Some(e);
        }
    }
    let runtime = tally.clock.elapsed().as_secs_f64();
    let world = &t.spec.world;
    if world.world_size() > 1 {
        let ReduceTimes { busy, waited } = tally.reduce;
        let share = 100.0 * waited / runtime.max(1e-9);
        // overlapped, the calls ran beside the backward: only the wait after it costs time
        let hidden = match busy - waited {
            h if h > 0.0005 => format!(" (the calls ran {busy:.2} s in all, {h:.2} s of it during the backward)"),
            _ => String::new(),
        };
        let text = format!(
            "{} processes ({}): the gradient and loss all-reduce took {waited:.2} s of {runtime:.2} s of training on rank 0 ({share:.1}%){hidden}",
            world.world_size(),
            world.backend(),
        );
        emit_ev(Event::Message { level: Level::Info, text });
    }
    let state = &t.state;
    let trained = state.global_step - tally.start_step;
    // the run's last figures: this session's evaluation, or (a resume with nothing left to
    // train) the one its state recorded at this step
    let last_eval = match &tally.last_eval {
        Some(e) => Some((e.eval_loss, e.perplexity)),
        None => state.log_history.last().filter(|e| e["step"].as_u64() == Some(state.global_step)).and_then(|e| {
            let loss = e["eval_loss"].as_f64()?;
            Some((loss, loss.exp()))
        }),
    };
    let end = TrainEnd {
        step: state.global_step,
        epoch: state.epoch,
        // over every step the run applied, resumed or not (the sums live in the checkpoints)
        train_loss: (state.train_loss_steps > 0).then(|| state.train_loss_sum / state.train_loss_steps as f64),
        train_loss_steps: state.train_loss_steps,
        eval_loss: last_eval.map(|e| e.0),
        perplexity: last_eval.map(|e| e.1),
        best_eval_loss: state.best_metric,
        train_runtime: runtime,
        tokens_per_second: (trained * t.tokens_per_step) as f64 / runtime.max(1e-9),
        skipped_steps: state.skipped_steps,
        status: match (&failure, stopped) {
            (Some(_), _) => RunStatus::Failed,
            (None, true) if tally.early_stopped => RunStatus::EarlyStopped,
            (None, true) => RunStatus::Stopped,
            (None, false) => RunStatus::Completed,
        },
        error: failure.as_ref().map(|e| e.to_string()),
        output_dir: t.out_dir.display().to_string(),
    };
    if failure.is_none() && world.is_root() {
        // for the picker's estimates: what this shape runs at here (best effort: a cache that
        // cannot be written costs the estimate, not the run)
        let measured =
            super::throughput::Measured { tokens_per_second: end.tokens_per_second, when: now(), steps: trained };
        let key = super::throughput::key(&t.spec.config, world.world_size());
        let _ = super::throughput::record(&t.spec.cache_dir, key, measured);
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
fn inject(spec: &RunSpec, step: u64, g: &mut Gradients) -> Result<(), TrainError> {
    for (at, kind) in &spec.inject_nonfinite {
        if *at != step {
            continue;
        }
        match kind {
            Injection::Loss => g.loss = f64::NAN,
            Injection::Grad => {
                if let Some(grad) = g.grads.values_mut().next() {
                    *grad = (grad.ones_like()? * f64::INFINITY)?;
                }
            }
            Injection::Panic => panic!("injected at step {step} (DIFFLAB_INJECT_NONFINITE)"),
        }
    }
    Ok(())
}

/// Evaluates now and records it (event, `log_history`, best metric); then at the run's extra
/// context lengths, if any (train short, test long: their events carry the length, and the
/// run's eval curve does not read them).
fn evaluate_now(
    t: &mut Trainer,
    tally: &mut Tally,
    step: u64,
    emit_ev: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let cfg = &t.spec.config;
    let gpt = t.model.detached()?;
    let max = cfg.eval_max_blocks.map(|n| n as usize);
    let rec = evaluate_at(t, &gpt, step, cfg.block_size, max)?;
    note_eval(&mut t.state, &rec, cfg.early_stopping_threshold);
    emit_ev(Event::Evaluate(rec.clone()));
    // the same validation tokens in longer windows: as many as fit in the ones just scored
    let scored = rec.eval_blocks as usize * cfg.block_size;
    for length in cfg.context_length_list().into_iter().filter(|l| *l != cfg.block_size) {
        let mut extra = evaluate_at(t, &gpt, step, length, Some(scored / length))?;
        extra.context_length = Some(length);
        emit_ev(Event::Evaluate(extra));
    }
    tally.last_eval = Some(rec);
    if let (Some(prompt), true) = (&cfg.sample_prompt, t.spec.world.is_root()) {
        emit_ev(Event::Sample(sample(&gpt, &t.data.tokenizer, prompt, step, cfg.seed)?));
    }
    Ok(())
}

/// The validation split in windows of `length` tokens (at most `max_windows`), sharded over the
/// processes by batch and summed: the loss, and its curve by position.
fn evaluate_at(
    t: &Trainer,
    gpt: &Gpt,
    step: u64,
    length: usize,
    max_windows: Option<usize>,
) -> Result<EvalRecord, TrainError> {
    let cfg = &t.spec.config;
    let started = Instant::now();
    let world = &t.spec.world;
    let batch = crate::config::eval_batch_size(cfg.micro_batch_size, length);
    let batch = if length == cfg.block_size { batch } else { crate::config::window_batch(length) };
    let stream = &t.data.validation;
    let part = evaluate_part(
        gpt,
        stream,
        length,
        batch,
        max_windows,
        &t.placement.device,
        (world.rank(), world.world_size()),
    )?;
    let mut sums = part.to_buffer();
    world.all_reduce_sum_f64(&mut sums)?;
    let part = EvalPart::from_buffer(sums);
    let loss = part.mean();
    let tokens = part.windows * length as u64;
    Ok(EvalRecord {
        step,
        epoch: t.state.epoch,
        eval_loss: loss,
        perplexity: loss.exp(),
        eval_tokens: tokens,
        eval_tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        eval_blocks: part.windows,
        validation_blocks: stream.num_blocks(length) as u64,
        split: cfg.eval_split.name().into(),
        context_length: None,
        position_loss: Some(part.buckets()),
    })
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

fn note_eval(state: &mut TrainerState, rec: &EvalRecord, threshold: f64) {
    state.log_history.push(serde_json::json!({
        "step": rec.step, "epoch": rec.epoch, "eval_loss": rec.eval_loss, "perplexity": rec.perplexity
    }));
    // HF's EarlyStoppingCallback: an improvement is a fall below the best by more than the threshold
    // (a NaN loss improves on nothing)
    let improved = state.best_metric.is_none_or(|best| best - rec.eval_loss > threshold);
    if improved {
        state.evals_without_improvement = 0;
    } else {
        state.evals_without_improvement += 1;
    }
    if state.best_metric.is_none_or(|b| rec.eval_loss < b) {
        state.best_metric = Some(rec.eval_loss);
        state.best_model_checkpoint = None;
    }
}

fn parts<'a>(t: &'a Trainer, weights: &'a BTreeMap<String, Tensor>) -> Result<OwnedParts<'a>, TrainError> {
    Ok(OwnedParts { t, weights, optimizer: t.opt.state_tensors()? })
}

/// The optimizer state materialised next to borrowed parts, for one save.
struct OwnedParts<'a> {
    t: &'a Trainer<'a>,
    weights: &'a BTreeMap<String, Tensor>,
    optimizer: BTreeMap<String, Tensor>,
}

impl OwnedParts<'_> {
    fn as_parts(&self) -> Parts<'_> {
        Parts {
            model: &self.t.model_cfg,
            weights: self.weights,
            optimizer: &self.optimizer,
            tokenizer_json: self.t.data.tokenizer.json(),
            run_config: &self.t.spec.config,
            state: &self.t.state,
            eos_token_id: self.t.data.tokenizer.end_of_text_id(),
        }
    }
}

fn save_checkpoint(
    t: &mut Trainer,
    lr_scale: f64,
    reason: CheckpointReason,
    emit_ev: &mut dyn FnMut(Event),
    last_saved: &mut Option<u64>,
) -> Result<(), TrainError> {
    // only rank 0 writes; the others hold the same weights
    if !t.spec.world.is_root() {
        *last_saved = Some(t.state.global_step);
        return Ok(());
    }
    let state = &mut t.state;
    state.lr_scale = lr_scale;
    let step = state.global_step;
    let best_now = state.log_history.last().and_then(|e| e["step"].as_u64()) == Some(step)
        && state.best_metric.is_some()
        && state.log_history.last().and_then(|e| e["eval_loss"].as_f64()) == state.best_metric;
    if best_now {
        state.best_model_checkpoint = Some(checkpoint::checkpoint_dir(&t.out_dir, step).display().to_string());
    }
    let started = Instant::now();
    let weights = t.model.weights();
    let owned = parts(t, &weights)?;
    let path = checkpoint::save(&t.out_dir, &owned.as_parts())?;
    let seconds = Some(started.elapsed().as_secs_f64());
    let keep = t.state.best_model_checkpoint.as_ref().and_then(|p| p.rsplit('-').next()?.parse().ok());
    let deleted = checkpoint::rotate(&t.out_dir, t.spec.config.save_total_limit, keep);
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

/// The progress marker of the steps in `window`.
fn progress(
    window: &ProgressWindow,
    step: u64,
    epoch: f64,
    lr: f64,
    grad_norm: f64,
    diff: Option<&[f32]>,
    elapsed: f64,
) -> StepRecord {
    let stats = diff.and_then(|d| norm_stats(d, HISTOGRAM_BINS));
    StepRecord {
        step,
        epoch,
        loss: window.mean_loss(),
        learning_rate: lr,
        grad_norm,
        tokens_per_second: window.tokens_per_second(),
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
