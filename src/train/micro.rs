//! The forward and backward of micro-batches (plain, or with gradient checkpointing), one at a
//! time or side by side on single-threaded workers, their gradients summed.

use candle_core::{Result, Tensor, Var};

use std::sync::mpsc::Sender;

use super::overlap::{self, Reduce, ReduceTimes};
use crate::dist::{Collective, Wire};
use crate::engine::{Engine, Matmuls, Placement};
use crate::model::dropout::Dropout;
use crate::model::{cpu_step, Gpt, Trainable};
use crate::optim::grads::{accumulate, Grads};

pub struct MicroStep {
    /// The micro-batch's mean token loss (unscaled).
    pub loss: f64,
    /// `||d_t||` for every (b, t), differential models only.
    pub diff_norms: Option<Vec<f32>>,
}

/// Gradients summed over the micro-batches of one optimizer step.
#[derive(Default)]
pub enum Accumulated {
    #[default]
    Empty,
    /// The written-out CPU step's buffers, added into in place.
    Host(cpu_step::HostGrads),
    /// Autograd's gradients, summed as tensors.
    Tensors(Grads),
}

impl Accumulated {
    /// Sums the gradients over the processes of `world`, in place.
    pub fn all_reduce(&mut self, world: &dyn Collective, wire: Wire, bucket_bytes: usize) -> Result<()> {
        let fail = |e: crate::dist::DistError| candle_core::Error::Msg(e.to_string());
        match self {
            Accumulated::Empty => candle_core::bail!("no gradients to sum: this process had no micro-batch"),
            Accumulated::Host(h) => {
                let mut buffers: Vec<&mut [f32]> = h.buffers_mut().collect();
                crate::dist::all_reduce_buckets(world, &mut buffers, bucket_bytes, wire).map_err(fail)?;
            }
            // host tensors (the CPU autograd engine, with dropout) go in buckets too, in the
            // map's key order, the same on every rank
            Accumulated::Tensors(grads) if grads.values().all(|g| g.device().is_cpu()) => {
                let mut host: Vec<Vec<f32>> =
                    grads.values().map(|g| g.flatten_all()?.to_vec1::<f32>()).collect::<Result<_>>()?;
                let mut buffers: Vec<&mut [f32]> = host.iter_mut().map(|v| v.as_mut_slice()).collect();
                crate::dist::all_reduce_buckets(world, &mut buffers, bucket_bytes, wire).map_err(fail)?;
                for (g, sum) in grads.values_mut().zip(host) {
                    *g = Tensor::from_vec(sum, g.shape(), g.device())?;
                }
            }
            // device tensors: summed where they are (NCCL on the GPU)
            Accumulated::Tensors(grads) => {
                for g in grads.values_mut() {
                    *g = world.all_reduce_tensor(g).map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    pub fn into_grads(self, cfg: &crate::model::GptConfig) -> Result<Grads> {
        match self {
            Accumulated::Empty => Ok(Grads::new()),
            Accumulated::Host(h) => h.into_tensors(cfg),
            Accumulated::Tensors(g) => Ok(g),
        }
    }

    fn add(&mut self, grads: Grads) -> Result<()> {
        match self {
            Accumulated::Tensors(acc) => accumulate(acc, grads),
            _ => {
                *self = Accumulated::Tensors(grads);
                Ok(())
            }
        }
    }
}

/// Single-threaded workers that run whole micro-batches side by side (see `forward_backward_all`),
/// one per thread of the global pool, made once.
pub(super) fn workers() -> &'static [rayon::ThreadPool] {
    static WORKERS: std::sync::OnceLock<Vec<rayon::ThreadPool>> = std::sync::OnceLock::new();
    WORKERS.get_or_init(|| {
        (0..rayon::current_num_threads())
            .filter_map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("difflab-micro-{i}"))
                    .build()
                    .ok()
            })
            .collect()
    })
}

/// Extra memory a second side-by-side worker may take (its gradient sums and one
/// micro-batch's activations) for `forward_backward_all` to use it.
const WORKER_MEMORY_LIMIT: u64 = 256 << 20;

/// How many micro-batches `forward_backward_all` runs side by side for this model and
/// micro-batch shape on `engine`: one per thread when the written-out CPU step runs small
/// matrices (a worker's extra memory within `WORKER_MEMORY_LIMIT`), else 1.
pub fn side_by_side(
    engine: Engine,
    cfg: &crate::model::GptConfig,
    micro: (usize, usize),
    checkpointing: bool,
) -> usize {
    let params = cfg.num_parameters() as u64;
    let extra = 4 * params + cfg.training_bytes(micro.0, micro.1, checkpointing).saturating_sub(16 * params);
    if engine == Engine::CpuStep && extra <= WORKER_MEMORY_LIMIT {
        workers().len().clamp(1, max_workers())
    } else {
        1
    }
}

/// The path a step takes, as `train_begin`, the start line and bench name it: the placement's
/// (engine, bf16 matmuls), how bf16 packs the weights, and the micro-batches side by side when
/// `width` (from `side_by_side`, at most the step's micro-batches) is over 1.
pub fn describe(placement: &Placement, cfg: &crate::model::GptConfig, micro: (usize, usize), width: usize) -> String {
    let mut path = placement.path();
    if placement.engine == Engine::CpuStep && placement.matmuls == Matmuls::Bf16 {
        path += if cpu_step::packs_weights_once(cfg, micro, width) {
            ", weights packed once per step"
        } else {
            ", weights packed in each product"
        };
    }
    if width > 1 {
        path += &format!(", {width} micro-batches side by side");
    }
    path
}

/// `DIFFLAB_MICRO_WORKERS=N` caps the micro-batches run side by side (1: one at a time, each
/// split across all threads, as before; for comparing the two).
pub(super) fn max_workers() -> usize {
    // read once: this is asked every step and every evaluation
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("DIFFLAB_MICRO_WORKERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(usize::MAX)
    })
}

/// Forward and backward of the micro-batches in `batches`, gradients of `loss * scale` added
/// into `acc`, in groups of `side_by_side(..)`: micro-batch `i` of a group runs on worker `i`
/// with single-threaded kernels, each worker sums its own gradients, and the sums are added
/// in worker order at the end (so a run's numbers do not depend on timing). At the small
/// matrices of the sanity shapes, splitting every matmul across two cores costs more than it
/// gains; a core per micro-batch keeps both busy. `between` runs before each group (the
/// trainer polls its controls there). One group of one is `forward_backward`.
///
/// With `reduce` overlapping on the written-out step, the last group's backward hands its
/// finished sections to a communication thread that sums them over the processes as it goes
/// (`overlap`): `acc` then holds the sums over the processes, and the second value says what
/// that cost. Otherwise (`None`) the caller sums `acc` over the processes.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_all(
    engine: Engine,
    model: &Trainable,
    batches: &[MicroBatch],
    scale: f64,
    dropout_seeds: &dyn Fn(usize) -> Option<Dropout>,
    checkpointing: bool,
    acc: &mut Accumulated,
    between: &mut dyn FnMut(),
    reduce: Option<Reduce>,
) -> Result<(Vec<MicroStep>, Option<ReduceTimes>)> {
    let Some(first) = batches.first() else { return Ok((vec![], None)) };
    let micro = first.ids.dims2()?;
    let width = side_by_side(engine, model.gpt.config(), micro, checkpointing).min(batches.len());
    let reduce = reduce.filter(|r| overlap::applies(engine, r.overlap));
    // bf16 matmuls: the weights converted and packed once for all of this step's micro-batches,
    // where that costs no memory over f32 (else each product packs them)
    let panels = if engine == Engine::CpuStep
        && model.placement().matmuls == Matmuls::Bf16
        && cpu_step::packs_weights_once(model.gpt.config(), micro, width)
    {
        Some(panels_for(model)?)
    } else {
        None
    };
    let shared = Shared { model, scale, checkpointing, packed: panels.as_ref() };
    let ran = if width <= 1 {
        one_at_a_time(engine, shared, batches, dropout_seeds, acc, between, reduce)
    } else if dropout_seeds(0).is_some_and(|d| d.is_active()) {
        Err(candle_core::Error::Msg("the cpu-step engine has no dropout; a run with dropout takes cpu-autograd".into()))
    } else {
        in_groups(shared, batches, width, acc, between, reduce)
    };
    keep_panels(panels);
    ran
}

/// What every micro-batch of a step shares.
#[derive(Clone, Copy)]
struct Shared<'a> {
    model: &'a Trainable,
    /// One over the step's micro-batches (over all processes).
    scale: f64,
    checkpointing: bool,
    /// With bf16 matmuls, the step's packed weights (or none: each product packs them).
    packed: Option<&'a cpu_step::PackedWeights>,
}

impl Shared<'_> {
    /// The written-out step on `batch`, adding into `host`, handing finished sections to
    /// `on_finished` where given.
    fn written_out(
        &self,
        batch: &MicroBatch,
        host: &mut Option<cpu_step::HostGrads>,
        on_finished: Option<cpu_step::OnFinished>,
    ) -> Result<cpu_step::MicroOutcome> {
        let m = self.model;
        let arithmetic = (m.placement().matmuls, self.packed);
        let (ids, targets) = (batch.ids, batch.targets);
        cpu_step::forward_backward(
            m.gpt.config(),
            &m.vars,
            ids,
            targets,
            self.scale,
            self.checkpointing,
            arithmetic,
            host,
            on_finished,
        )
    }
}

/// The micro-batches one after another, each with all threads; the last one's sections summed
/// over the processes during its backward when `reduce` is given.
fn one_at_a_time(
    engine: Engine,
    s: Shared,
    batches: &[MicroBatch],
    dropout_seeds: &dyn Fn(usize) -> Option<Dropout>,
    acc: &mut Accumulated,
    between: &mut dyn FnMut(),
    reduce: Option<Reduce>,
) -> Result<(Vec<MicroStep>, Option<ReduceTimes>)> {
    let (mut steps, mut times) = (Vec::with_capacity(batches.len()), None);
    for (i, batch) in batches.iter().enumerate() {
        between();
        match reduce {
            Some(r) if i + 1 == batches.len() => {
                let (step, t) = last_overlapped(s, batch, acc, r)?;
                steps.push(step);
                times = Some(t);
            }
            _ => steps.push(forward_backward(engine, s, batch, dropout_seeds(i).as_mut(), acc)?),
        }
    }
    Ok((steps, times))
}

/// The micro-batches in groups of `width` side by side (see `forward_backward_all`); the last
/// group's sections summed over the processes during its backward when `reduce` is given.
fn in_groups(
    s: Shared,
    batches: &[MicroBatch],
    width: usize,
    acc: &mut Accumulated,
    between: &mut dyn FnMut(),
    reduce: Option<Reduce>,
) -> Result<(Vec<MicroStep>, Option<ReduceTimes>)> {
    let (mut steps, mut times) = (Vec::with_capacity(batches.len()), None);
    let mut parts: Vec<Option<cpu_step::HostGrads>> = (0..width).map(|_| None).collect();
    if let Accumulated::Host(h) = std::mem::take(acc) {
        parts[0] = Some(h);
    }
    let groups: Vec<&[MicroBatch]> = batches.chunks(width).collect();
    for (g, group) in groups.iter().enumerate() {
        between();
        let outs = match reduce {
            Some(r) if g + 1 == groups.len() => {
                let (outs, t) = last_group_overlapped(s, group, &mut parts, r)?;
                times = Some(t);
                outs
            }
            _ => side_by_side_group(s, group, &mut parts, None).into_iter().collect::<Result<Vec<_>>>()?,
        };
        steps.extend(outs.into_iter().map(|out| MicroStep { loss: out.loss, diff_norms: out.diff_norms }));
    }
    let mut parts = parts.into_iter().flatten();
    if let Some(mut sum) = parts.next() {
        for p in parts {
            sum.add(p);
        }
        *acc = Accumulated::Host(sum);
    }
    Ok((steps, times))
}

/// The step's last group side by side, each worker handing its finished sections to the
/// communication thread, which adds the workers without a micro-batch here on the way. Leaves
/// the sums over the workers and the processes in `parts[0]`, the other parts empty.
fn last_group_overlapped(
    s: Shared,
    group: &[MicroBatch],
    parts: &mut [Option<cpu_step::HostGrads>],
    reduce: Reduce,
) -> Result<(Vec<cpu_step::MicroOutcome>, ReduceTimes)> {
    let idle: Vec<cpu_step::HostGrads> = parts[group.len()..].iter_mut().filter_map(Option::take).collect();
    let cfg = s.model.gpt.config();
    let (outs, summed) =
        overlap::overlapped(reduce, cfg, group.len(), idle, |hand| side_by_side_group(s, group, parts, Some(hand)));
    // a worker's own failure first: the communication thread's is only that it stopped
    let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
    let (sections, times) = summed?;
    let mut sum = parts[0].take().ok_or_else(|| candle_core::Error::Msg("worker 0 left no gradients".into()))?;
    for (section, buffers) in sections {
        sum.put(section, buffers)?;
    }
    // the other workers' buffers were added into these and are empty now
    parts.iter_mut().for_each(|p| *p = None);
    parts[0] = Some(sum);
    Ok((outs, times))
}

/// One group of micro-batches side by side, micro-batch `i` on worker `i` adding into
/// `parts[i]`; with `hand`, each worker hands over its finished sections.
fn side_by_side_group(
    s: Shared,
    group: &[MicroBatch],
    parts: &mut [Option<cpu_step::HostGrads>],
    hand: Option<&Sender<overlap::Handed>>,
) -> Vec<Result<cpu_step::MicroOutcome>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .iter()
            .zip(parts.iter_mut())
            .zip(workers())
            .enumerate()
            .map(|(i, ((batch, part), pool))| {
                let hand = hand.cloned();
                scope.spawn(move || {
                    pool.install(move || {
                        let mut to_comm = |section: cpu_step::Section, b: Vec<Vec<f32>>| {
                            if let Some(tx) = &hand {
                                // a closed channel: the all-reduce thread failed and says why
                                let _ = tx.send((i, section, b));
                            }
                        };
                        let on_finished: Option<cpu_step::OnFinished> = match hand {
                            Some(_) => Some(&mut to_comm),
                            None => None,
                        };
                        s.written_out(batch, part, on_finished)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a micro-batch worker panicked".into()))))
            .collect()
    })
}

/// The step's last micro-batch on the written-out step, one at a time, its sections summed
/// over the processes as the backward finishes them.
fn last_overlapped(
    s: Shared,
    batch: &MicroBatch,
    acc: &mut Accumulated,
    reduce: Reduce,
) -> Result<(MicroStep, ReduceTimes)> {
    let mut host = match std::mem::take(acc) {
        Accumulated::Host(h) => Some(h),
        _ => None,
    };
    let (out, summed) = overlap::overlapped(reduce, s.model.gpt.config(), 1, vec![], |hand| {
        let mut to_comm = |section: cpu_step::Section, b: Vec<Vec<f32>>| {
            let _ = hand.send((0, section, b)); // a closed channel: the all-reduce thread says why
        };
        s.written_out(batch, &mut host, Some(&mut to_comm))
    });
    let out = out?;
    let (sections, times) = summed?;
    let mut host = host.ok_or_else(|| candle_core::Error::Msg("the backward left no gradients".into()))?;
    for (section, buffers) in sections {
        host.put(section, buffers)?;
    }
    *acc = Accumulated::Host(host);
    Ok((MicroStep { loss: out.loss, diff_norms: out.diff_norms }, times))
}

thread_local! {
    /// The last step's bf16 panels, packed again for the next step instead of allocated anew
    /// (a fresh 1 MB block each time leaves the heap fragmented and the resident size growing).
    static PANELS: std::cell::RefCell<Option<cpu_step::PackedWeights>> = const { std::cell::RefCell::new(None) };
}

/// This step's bf16 panels of `model`'s weights: the last step's packed again when they are
/// this model's (the same count and sizes), else new.
fn panels_for(model: &Trainable) -> Result<cpu_step::PackedWeights> {
    let cfg = model.gpt.config();
    match PANELS.with(|p| p.borrow_mut().take()) {
        Some(mut p) if p.is_for(cfg) => {
            p.repack(cfg, &model.vars)?;
            Ok(p)
        }
        _ => cpu_step::PackedWeights::new(cfg, &model.vars),
    }
}

fn keep_panels(packed: Option<cpu_step::PackedWeights>) {
    if packed.is_some() {
        PANELS.with(|p| *p.borrow_mut() = packed);
    }
}

/// A micro-batch: token ids `(B, T)`, and explicit targets `(B, T)` or none (then each block
/// is its own label, shifted inside the loss, as HF: `T - 1` predictions per block).
#[derive(Clone, Copy)]
pub struct MicroBatch<'a> {
    pub ids: &'a Tensor,
    pub targets: Option<&'a Tensor>,
}

fn loss_of(gpt: &Gpt, hidden: &Tensor, batch: &MicroBatch) -> Result<Tensor> {
    match batch.targets {
        None => gpt.next_token_loss(hidden, batch.ids),
        Some(t) => gpt.loss(hidden, t),
    }
}

/// Forward and backward of one micro-batch on `engine`; gradients of `loss * scale` (`scale` =
/// 1 / accumulation steps) are added into `acc`. `cpu-step` runs the written-out step
/// (`cpu_step`, with the step's packed weights under bf16 matmuls), the others candle's
/// autograd over the kernels the model was built with.
fn forward_backward(
    engine: Engine,
    s: Shared,
    batch: &MicroBatch,
    dropout: Option<&mut Dropout>,
    acc: &mut Accumulated,
) -> Result<MicroStep> {
    if engine == Engine::CpuStep {
        if dropout.as_ref().is_some_and(|d| d.is_active()) {
            candle_core::bail!("the cpu-step engine has no dropout; a run with dropout takes cpu-autograd")
        }
        let mut host = match std::mem::take(acc) {
            Accumulated::Host(h) => Some(h),
            _ => None,
        };
        let out = s.written_out(batch, &mut host, None)?;
        if let Some(h) = host {
            *acc = Accumulated::Host(h);
        }
        return Ok(MicroStep { loss: out.loss, diff_norms: out.diff_norms });
    }
    let (model, scale) = (s.model, s.scale);
    let (step, grads) = if s.checkpointing {
        checkpointed(model, batch, scale, dropout)?
    } else {
        autograd(model, batch, scale, dropout)?
    };
    acc.add(grads)?;
    Ok(step)
}

fn autograd(
    model: &Trainable,
    batch: &MicroBatch,
    scale: f64,
    dropout: Option<&mut Dropout>,
) -> Result<(MicroStep, Grads)> {
    let (hidden, diff_norms) = model.gpt.forward_hidden(batch.ids, dropout)?;
    let loss = loss_of(&model.gpt, &hidden, batch)?;
    let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let grads = model.named_grads((loss * scale)?.backward()?);
    Ok((MicroStep { loss: value, diff_norms: norms(diff_norms)? }, grads))
}

fn norms(t: Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.map(|t| t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()
}

/// Gradient checkpointing: the forward keeps only each block's input; the backward
/// recomputes one block at a time and pulls the gradient through it (a vector-Jacobian
/// product), so peak memory holds one block's activations instead of all of them.
/// Dropout masks are replayed from a copy of the generator taken before each block.
fn checkpointed(
    model: &Trainable,
    batch: &MicroBatch,
    scale: f64,
    mut dropout: Option<&mut Dropout>,
) -> Result<(MicroStep, Grads)> {
    let gpt = &model.gpt;
    let ids = batch.ids;
    let (_, seq_len) = ids.dims2()?;
    let ctx = gpt.seq_context(seq_len)?;
    let emb = gpt.embed(ids, dropout.as_deref_mut())?;
    let mut xs = emb.xs.detach();
    let mut saved = Vec::with_capacity(gpt.blocks().len());
    for block in gpt.blocks() {
        saved.push((xs.clone(), dropout.as_deref().cloned()));
        xs = block.forward(&xs, &ctx, dropout.as_deref_mut())?.detach();
    }
    // top segment: ln_f, head and loss, with the last block's output as a leaf
    let top = Var::from_tensor(&xs)?;
    let hidden = gpt.final_hidden(top.as_tensor(), emb.tokens.as_ref())?;
    let loss = loss_of(gpt, &hidden, batch)?;
    let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let store = (loss * scale)?.backward()?;
    let mut upstream = store.get(top.as_tensor()).cloned();
    let mut grads = model.named_grads(store);
    for (block, (input, mut rng)) in gpt.blocks().iter().zip(saved).rev() {
        let Some(g) = upstream.take() else { break };
        let leaf = Var::from_tensor(&input)?;
        let ys = block.forward(leaf.as_tensor(), &ctx, rng.as_mut())?;
        let store = (ys * g)?.sum_all()?.backward()?;
        upstream = store.get(leaf.as_tensor()).cloned();
        accumulate(&mut grads, model.named_grads(store))?;
    }
    if let Some(g) = upstream {
        accumulate(&mut grads, model.named_grads((emb.xs * g)?.sum_all()?.backward()?))?;
    }
    Ok((MicroStep { loss: value, diff_norms: norms(emb.diff_norms)? }, grads))
}
