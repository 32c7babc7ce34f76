//! Gradients summed over the processes while the backward goes on, as PyTorch DDP does. The
//! written-out step hands each section of its gradient buffers over as soon as it has finished
//! them (`cpu_step::Section`: ln_f, the blocks from the last to the first, the embeddings); a
//! communication thread sums each section over this process's side-by-side workers (in worker
//! order, as the sums after the backward are, so the numbers are the same) and pushes it into
//! the buckets that go over the network (`dist::Buckets`, the first one small so the network
//! starts early), while the workers go on with the blocks below. The step waits only for what
//! is left when its own backward ends.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use candle_core::Result;

use crate::dist::{Buckets, Collective, Wire, FIRST_BUCKET_BYTES};
use crate::engine::cpu::kernels::add_into;
use crate::engine::Engine;
use crate::model::cpu_step::{HostGrads, Section};
use crate::model::GptConfig;

/// How a step's gradients are summed over the processes.
#[derive(Clone, Copy)]
pub struct Reduce<'a> {
    pub world: &'a dyn Collective,
    pub wire: Wire,
    /// Sum during the backward where the engine allows (`grad_reduce_overlap`).
    pub overlap: bool,
    /// Bytes in a bucket on the wire (`ddp_bucket_cap_mb`).
    pub bucket_bytes: usize,
}

/// Whether a step on `engine` sums its gradients during the backward when `overlap` asks for it:
/// the written-out step hands its sections over; autograd (dropout on the CPU) and the GPU
/// sum after the backward.
pub fn applies(engine: Engine, overlap: bool) -> bool {
    overlap && engine == Engine::CpuStep
}

/// What summing over the processes cost a step, in seconds: inside the collective calls, and
/// waiting for them after this process's backward (the part not hidden behind it).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ReduceTimes {
    pub busy: f64,
    pub waited: f64,
}

/// A finished section of worker `.0`'s gradients.
pub type Handed = (usize, Section, Vec<Vec<f32>>);

/// Every section of the model's gradients, summed over the workers and the processes.
pub type SummedSections = Vec<(Section, Vec<Vec<f32>>)>;

/// Runs `backward`, whose `active` workers hand their finished sections through the sender it
/// gets, beside a communication thread that sums them (and `idle`, the sums of workers with no
/// micro-batch in this group, from earlier ones) over the workers and the processes. Returns
/// what `backward` returned, and the summed sections with the time they cost.
pub fn overlapped<R>(
    reduce: Reduce,
    cfg: &GptConfig,
    active: usize,
    idle: Vec<HostGrads>,
    backward: impl FnOnce(&Sender<Handed>) -> R,
) -> (R, Result<(SummedSections, ReduceTimes)>) {
    std::thread::scope(|scope| {
        let (tx, rx) = channel();
        let comm = std::thread::Builder::new()
            .name("difflab-all-reduce".into())
            .spawn_scoped(scope, move || sum_sections(reduce, cfg, active, idle, rx));
        let out = backward(&tx);
        drop(tx); // the workers' copies are gone with them: the thread sees the end
        let waiting = Instant::now();
        let summed = match comm {
            Ok(handle) => {
                handle.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("the all-reduce thread panicked".into())))
            }
            Err(e) => Err(candle_core::Error::Msg(format!("could not start the all-reduce thread: {e}"))),
        };
        let waited = waiting.elapsed().as_secs_f64();
        (out, summed.map(|(sections, busy)| (sections, ReduceTimes { busy, waited })))
    })
}

/// The communication thread: for each section in the backward's order, the active workers'
/// buffers (as they arrive) plus the idle workers', added in worker order, then into the
/// buckets. Returns the sections summed and the seconds inside collective calls.
fn sum_sections(
    reduce: Reduce,
    cfg: &GptConfig,
    active: usize,
    mut idle: Vec<HostGrads>,
    handed: Receiver<Handed>,
) -> Result<(SummedSections, f64)> {
    let fail = |e: crate::dist::DistError| candle_core::Error::Msg(e.to_string());
    let first = FIRST_BUCKET_BYTES.min(reduce.bucket_bytes);
    let mut buckets = Buckets::new(reduce.world, (first, reduce.bucket_bytes), reduce.wire);
    let mut arrived: HashMap<Section, Vec<Option<Vec<Vec<f32>>>>> = HashMap::new();
    let order: Vec<Section> = Section::in_order(cfg.n_layer).collect();
    // each section's successor's first buffer, so a bucket goes as soon as it is complete
    let next_first: Vec<Option<usize>> = (0..order.len()).map(|i| order.get(i + 1).map(|s| s.first_len(cfg))).collect();
    let mut layout = Vec::with_capacity(order.len());
    for &s in &order {
        while arrived.get(&s).is_none_or(|w| w.iter().any(Option::is_none)) {
            let (worker, section, buffers) = handed.recv().map_err(|_| {
                candle_core::Error::Msg(format!("the backward ended before handing over the gradients of {s:?}"))
            })?;
            let slots = arrived.entry(section).or_insert_with(|| vec![None; active]);
            match slots.get_mut(worker) {
                Some(slot) => *slot = Some(buffers),
                None => candle_core::bail!("gradients from worker {worker}, of {active}"),
            }
        }
        let mut workers = arrived.remove(&s).into_iter().flatten().flatten();
        let mut sum = workers.next().unwrap_or_default();
        for other in workers.chain(idle.iter_mut().map(|p| p.take(s))) {
            if other.len() != sum.len() {
                candle_core::bail!(
                    "{s:?}: {} gradient buffers from one worker, {} from another",
                    other.len(),
                    sum.len()
                )
            }
            sum.iter_mut().zip(&other).for_each(|(a, x)| add_into(a, x));
        }
        layout.push((s, sum.len()));
        // the length after each buffer: the next in this section, or the next section's first
        let following = next_first.get(layout.len() - 1).copied().flatten();
        let mut nexts: Vec<Option<usize>> = sum.iter().skip(1).map(|b| Some(b.len())).collect();
        nexts.push(following);
        for (b, next) in sum.into_iter().zip(nexts) {
            buckets.push(b, next).map_err(fail)?;
        }
    }
    let summed = buckets.finish().map_err(fail)?;
    let mut buffers = summed.buffers.into_iter();
    let sections = layout.into_iter().map(|(s, n)| (s, buffers.by_ref().take(n).collect())).collect();
    Ok((sections, summed.busy_seconds))
}
