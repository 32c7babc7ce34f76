//! Evaluation without a graph: the mean next-token loss over validation blocks, in batches
//! side by side on the CPU, sharded over processes.

use candle_core::{Device, Result};

use super::micro::{max_workers, workers};
use crate::data::{Batcher, TokenStream};
use crate::model::Gpt;

/// Mean next-token loss over the first `max_blocks` blocks of `stream` (all by default),
/// in batches of `batch`, with a graph-free model. Returns `(loss, predictions)`.
pub fn evaluate(
    gpt: &Gpt,
    stream: &TokenStream,
    block_size: usize,
    batch: usize,
    max_blocks: Option<usize>,
    device: &Device,
) -> Result<(f64, u64)> {
    let part = evaluate_part(gpt, stream, block_size, batch, max_blocks, device, (0, 1))?;
    Ok((part.mean(), part.blocks * (block_size as u64 - 1)))
}

/// One process's share of an evaluation: the sum of its blocks' mean losses, and their count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalPart {
    pub loss_sum: f64,
    pub blocks: u64,
}

impl EvalPart {
    /// The token mean: every block has `block_size - 1` predictions, so the mean of block
    /// means is the mean over tokens.
    pub fn mean(&self) -> f64 {
        if self.blocks > 0 {
            self.loss_sum / self.blocks as f64
        } else {
            f64::NAN
        }
    }
}

/// The batches of an evaluation that fall to `rank` of `world` (every world-th batch), summed.
pub fn evaluate_part(
    gpt: &Gpt,
    stream: &TokenStream,
    block_size: usize,
    batch: usize,
    max_blocks: Option<usize>,
    device: &Device,
    (rank, world): (usize, usize),
) -> Result<EvalPart> {
    let blocks = max_blocks.map_or(stream.num_blocks(block_size), |m| m.min(stream.num_blocks(block_size)));
    let batcher = Batcher { stream, block_size };
    let mine: Vec<(usize, usize)> = (0..blocks)
        .step_by(batch.max(1))
        .enumerate()
        .filter(|(index, _)| index % world == rank)
        .map(|(_, start)| (start, batch.min(blocks - start)))
        .collect();
    let score = |(start, n): (usize, usize)| -> Result<f64> {
        let ids = batcher.sequential(start, n, device)?;
        let (hidden, _) = gpt.forward_hidden(&ids, None)?;
        Ok(gpt.next_token_loss(&hidden, &ids)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64)
    };
    // on the CPU, batches side by side on single-threaded workers, as in training (the forward
    // keeps no activations, so a worker costs one batch's working memory)
    let width = if device.is_cpu() { workers().len().clamp(1, max_workers()) } else { 1 };
    let mut part = EvalPart { loss_sum: 0.0, blocks: 0 };
    for group in mine.chunks(width) {
        let sums: Vec<Result<f64>> = if group.len() == 1 {
            vec![score(group[0])]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = group
                    .iter()
                    .zip(workers())
                    .map(|(b, pool)| {
                        let score = &score;
                        scope.spawn(move || pool.install(|| score(*b)))
                    })
                    .collect();
                handles.into_iter().map(join_worker).collect()
            })
        };
        // summed in batch order, whatever finished first
        for (sum, (_, n)) in sums.into_iter().zip(group) {
            part.loss_sum += sum?;
            part.blocks += *n as u64;
        }
    }
    Ok(part)
}

fn join_worker<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a worker thread panicked".into())))
}
