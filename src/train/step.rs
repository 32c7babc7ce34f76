//! One optimizer step, the one every caller takes (train, lr-find, bench, golden-check): which
//! blocks it trains on, this process's micro-batches forward and backward (side by side where
//! the engine allows), the gradients and loss summed over the processes, then the global norm,
//! clipping and AdamW. `gradients` and `apply` are its two halves, so a caller can look at the
//! gradients in between (golden-check compares them, the trainer's fault injection spoils them).

use std::time::Instant;

use candle_core::{Device, Result, Tensor};

use super::micro::{forward_backward_all, Accumulated, MicroBatch};
use super::overlap::{Reduce, ReduceTimes};
use crate::data::{Batcher, EpochOrder};
use crate::dist::{Collective, Wire};
use crate::engine::Placement;
use crate::model::dropout::Dropout;
use crate::model::Trainable;
use crate::optim::grads::Grads;
use crate::optim::{self, AdamW, Update};

/// How a run's steps are computed: the same for every step.
pub struct Recipe<'a> {
    pub placement: &'a Placement,
    pub world: &'a dyn Collective,
    /// Micro-batches in a step over all processes; each one's loss is scaled by one over this,
    /// so the sum over processes is the one-process step.
    pub micro_batches: usize,
    pub checkpointing: bool,
    pub dropout: f64,
    pub seed: u64,
    /// The gradients' dtype between processes (`grad_reduce_dtype`).
    pub grad_wire: Wire,
    /// Sum the gradients over the processes during the backward where the engine allows
    /// (`grad_reduce_overlap`).
    pub grad_overlap: bool,
    /// Bytes in a bucket of gradients on the wire (`ddp_bucket_cap_mb`).
    pub bucket_bytes: usize,
}

/// A step's gradients and loss, summed over the processes.
pub struct Gradients {
    pub grads: Grads,
    /// The step's mean token loss over all its micro-batches.
    pub loss: f64,
    /// `||d_t||` for every token of this process's share (differential models only).
    pub diff_norms: Option<Vec<f32>>,
    /// What summing over the processes cost (zero in one process).
    pub reduce: ReduceTimes,
}

/// Forward and backward over `batches`, this process's micro-batches of `step` with their index
/// in the step (which seeds their dropout masks), and the gradients of the step's mean loss
/// summed over the processes. `between` runs before each micro-batch, or group of them run side
/// by side (the trainer polls its controls there).
pub fn gradients(
    model: &Trainable,
    recipe: &Recipe,
    step: u64,
    batches: &[(usize, MicroBatch)],
    between: &mut dyn FnMut(),
) -> Result<Gradients> {
    let scale = 1.0 / recipe.micro_batches as f64;
    let micro: Vec<MicroBatch> = batches.iter().map(|(_, b)| *b).collect();
    let dropout = |k: usize| dropout_for(recipe.dropout, recipe.seed, step, batches[k].0);
    let mut acc = Accumulated::default();
    let several = recipe.world.world_size() > 1;
    let reduce = several.then_some(Reduce {
        world: recipe.world,
        wire: recipe.grad_wire,
        overlap: recipe.grad_overlap,
        bucket_bytes: recipe.bucket_bytes,
    });
    let (outs, overlapped) = forward_backward_all(
        recipe.placement.engine,
        model,
        &micro,
        scale,
        &dropout,
        recipe.checkpointing,
        &mut acc,
        between,
        reduce,
    )?;
    let (mut loss, mut diff_norms) = (0.0, None::<Vec<f32>>);
    for out in outs {
        loss += out.loss * scale;
        if let Some(norms) = out.diff_norms {
            diff_norms.get_or_insert_with(Vec::new).extend(norms);
        }
    }
    // each process's share is scaled by one over all micro-batches: the sum is the whole step
    let mut times = overlapped.unwrap_or_default();
    if several {
        let started = Instant::now();
        if overlapped.is_none() {
            acc.all_reduce(recipe.world, recipe.grad_wire, recipe.bucket_bytes)?;
        }
        let mut sum = [loss];
        recipe.world.all_reduce_sum_f64(&mut sum).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        loss = sum[0];
        let after = started.elapsed().as_secs_f64();
        times = ReduceTimes { busy: times.busy + after, waited: times.waited + after };
    }
    Ok(Gradients { grads: acc.into_grads(model.gpt.config())?, loss, diff_norms, reduce: times })
}

/// AdamW at `lr` on `g`, clipped to `max_grad_norm`, unless the loss or the gradient norm is
/// not finite: then nothing changes and `applied` is false.
pub fn apply(opt: &mut AdamW, g: &Gradients, lr: f64, max_grad_norm: f64) -> Result<Update> {
    if !g.loss.is_finite() {
        return Ok(Update { grad_norm: f64::NAN, applied: false });
    }
    optim::step(opt, &g.grads, lr, max_grad_norm)
}

/// The dropout masks of micro-batch `index` of `step`: a stream of its own, so that a share of
/// the micro-batches on each of several processes draws the masks one process would.
pub fn dropout_for(p: f64, seed: u64, step: u64, index: usize) -> Option<Dropout> {
    let stream = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    Some(Dropout::new(p as f32, stream)).filter(Dropout::is_active)
}

/// Which blocks each step trains on: a seeded shuffle per epoch, `batch_size` consecutive
/// blocks of it per step, cut into micro-batches of which each process takes every
/// world-size-th. Step `s` always gets the same blocks, so a resumed run sees what an unbroken
/// one would.
pub struct BlockSchedule {
    blocks: usize,
    batch_size: usize,
    micro_batch_size: usize,
    seed: u64,
    order: Option<EpochOrder>,
}

impl BlockSchedule {
    pub fn new(train_blocks: usize, batch_size: usize, micro_batch_size: usize, seed: u64) -> Self {
        Self { blocks: train_blocks, batch_size, micro_batch_size, seed, order: None }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        (self.blocks / self.batch_size.max(1)) as u64
    }

    /// This process's micro-batches of `step`: `(index in the step, block numbers)`.
    pub fn micro_batches(&mut self, step: u64, rank: usize, world_size: usize) -> Vec<(usize, Vec<usize>)> {
        let per_epoch = self.steps_per_epoch().max(1);
        let epoch = step / per_epoch;
        if self.order.as_ref().is_none_or(|o| o.epoch != epoch) {
            self.order = Some(EpochOrder::new(self.blocks, self.seed, epoch));
        }
        let offset = ((step % per_epoch) as usize) * self.batch_size;
        let Some(order) = &self.order else { return vec![] };
        order
            .blocks(offset, self.batch_size)
            .chunks(self.micro_batch_size)
            .enumerate()
            .filter(|(i, _)| i % world_size == rank)
            .map(|(i, blocks)| (i, blocks.to_vec()))
            .collect()
    }
}

/// The token ids of `micro_batches` on `device`.
pub fn load(batcher: &Batcher, micro_batches: &[(usize, Vec<usize>)], device: &Device) -> Result<Vec<(usize, Tensor)>> {
    micro_batches.iter().map(|(i, blocks)| Ok((*i, batcher.batch(blocks, device)?))).collect()
}

/// `load`'s tensors as micro-batches whose blocks are their own labels.
pub fn as_batches(ids: &[(usize, Tensor)]) -> Vec<(usize, MicroBatch<'_>)> {
    ids.iter().map(|(i, ids)| (*i, MicroBatch { ids, targets: None })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_gets_the_same_blocks_and_processes_share_them() {
        let mut one = BlockSchedule::new(40, 8, 2, 7);
        let all: Vec<usize> = one.micro_batches(6, 0, 1).into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(all.len(), 8);
        // a fresh schedule (a resumed run) gives step 6 the same blocks
        let again: Vec<usize> =
            BlockSchedule::new(40, 8, 2, 7).micro_batches(6, 0, 1).into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(all, again);
        // two processes take alternate micro-batches, together the whole batch
        let (r0, r1) = (one.micro_batches(6, 0, 2), one.micro_batches(6, 1, 2));
        assert_eq!(r0.iter().map(|m| m.0).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(r1.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 3]);
        let mut joined: Vec<(usize, Vec<usize>)> = r0.into_iter().chain(r1).collect();
        joined.sort();
        assert_eq!(joined.into_iter().flat_map(|(_, b)| b).collect::<Vec<_>>(), all);
        // step 5 is the sixth batch of epoch 1 (5 steps an epoch): another shuffle than epoch 0
        assert_eq!(one.steps_per_epoch(), 5);
    }

    #[test]
    fn dropout_streams_differ_by_step_and_micro_batch() {
        assert!(dropout_for(0.0, 1, 2, 3).is_none());
        let mut a = dropout_for(0.5, 1, 2, 3).unwrap();
        let mut b = dropout_for(0.5, 1, 2, 4).unwrap();
        let ones = Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap();
        let (ma, mb) = (a.apply(&ones).unwrap(), b.apply(&ones).unwrap());
        assert_ne!(ma.to_vec1::<f32>().unwrap(), mb.to_vec1::<f32>().unwrap());
    }
}
