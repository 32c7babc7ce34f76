//! Evaluation without a graph: the loss of every prediction of non-overlapping windows of
//! `length` tokens (the training length, or longer ones: train short, test long), summed by
//! position, in batches side by side on the CPU and sharded over processes. The mean over all
//! positions is the eval loss; the sums by position are its curve along the context.

use candle_core::{DType, Device, Result};

use super::micro::{max_workers, workers};
use crate::data::{Batcher, TokenStream};
use crate::events::PositionBucket;
use crate::model::Gpt;

/// Positions of an evaluation's curve are grouped into at most this many buckets.
pub const POSITION_BUCKETS: usize = 32;

/// What an evaluation scored: the loss sums at each position of its windows, and the windows.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPart {
    /// Position `p` (predicting token `p + 1`): the sum of its losses over the windows.
    pub position_sums: Vec<f64>,
    pub windows: u64,
}

impl EvalPart {
    pub fn empty(length: usize) -> Self {
        Self { position_sums: vec![0.0; length.saturating_sub(1)], windows: 0 }
    }

    /// Predictions scored: `length - 1` a window (each block is its own label, as HF's).
    pub fn predictions(&self) -> u64 {
        self.windows * self.position_sums.len() as u64
    }

    /// The mean loss over every prediction: the eval loss (NaN when nothing was scored).
    pub fn mean(&self) -> f64 {
        match self.predictions() {
            0 => f64::NAN,
            n => self.position_sums.iter().sum::<f64>() / n as f64,
        }
    }

    /// The mean loss by position, in `POSITION_BUCKETS` equal groups of positions at most (one a
    /// position when there are fewer).
    pub fn buckets(&self) -> Vec<PositionBucket> {
        let positions = self.position_sums.len();
        let n = positions.clamp(1, POSITION_BUCKETS);
        (0..n)
            .map(|i| (i * positions / n, (i + 1) * positions / n))
            .filter(|(from, to)| to > from)
            .map(|(from, to)| {
                let predictions = self.windows * (to - from) as u64;
                let sum: f64 = self.position_sums[from..to].iter().sum();
                PositionBucket { from, to, loss: sum / predictions.max(1) as f64, predictions }
            })
            .collect()
    }

    /// The sums as one buffer (for a sum over processes): by position, then the windows.
    pub fn to_buffer(&self) -> Vec<f64> {
        let mut v = self.position_sums.clone();
        v.push(self.windows as f64);
        v
    }

    pub fn from_buffer(mut v: Vec<f64>) -> Self {
        let windows = v.pop().unwrap_or(0.0) as u64;
        Self { position_sums: v, windows }
    }

    fn add(&mut self, other: &EvalPart) {
        self.position_sums.iter_mut().zip(&other.position_sums).for_each(|(a, b)| *a += b);
        self.windows += other.windows;
    }
}

/// The first `max_windows` windows of `length` tokens of `stream` (all by default), in batches
/// of `batch` windows, with a graph-free model.
pub fn evaluate(
    gpt: &Gpt,
    stream: &TokenStream,
    length: usize,
    batch: usize,
    max_windows: Option<usize>,
    device: &Device,
) -> Result<EvalPart> {
    evaluate_part(gpt, stream, length, batch, max_windows, device, (0, 1))
}

/// The batches of an evaluation that fall to `rank` of `world` (every world-th batch), summed.
pub fn evaluate_part(
    gpt: &Gpt,
    stream: &TokenStream,
    length: usize,
    batch: usize,
    max_windows: Option<usize>,
    device: &Device,
    (rank, world): (usize, usize),
) -> Result<EvalPart> {
    let windows = max_windows.map_or(stream.num_blocks(length), |m| m.min(stream.num_blocks(length)));
    let batcher = Batcher { stream, block_size: length };
    let mine: Vec<(usize, usize)> = (0..windows)
        .step_by(batch.max(1))
        .enumerate()
        .filter(|(index, _)| index % world == rank)
        .map(|(_, start)| (start, batch.min(windows - start)))
        .collect();
    let score = |(start, n): (usize, usize)| -> Result<EvalPart> {
        let ids = batcher.sequential(start, n, device)?;
        let (hidden, _) = gpt.forward_hidden(&ids, None)?;
        let losses = gpt.token_losses(&hidden, &ids)?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // (n, L-1)
        let mut part = EvalPart::empty(length);
        for row in &losses {
            part.position_sums.iter_mut().zip(row).for_each(|(s, l)| *s += *l as f64);
        }
        part.windows = n as u64;
        Ok(part)
    };
    // on the CPU, batches side by side on single-threaded workers, as in training (the forward
    // keeps no activations, so a worker costs one batch's working memory)
    let width = if device.is_cpu() { workers().len().clamp(1, max_workers()) } else { 1 };
    let mut total = EvalPart::empty(length);
    for group in mine.chunks(width) {
        let parts: Vec<Result<EvalPart>> = if group.len() == 1 {
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
        for part in parts {
            total.add(&part?);
        }
    }
    Ok(total)
}

fn join_worker<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a worker thread panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_position_once_and_average_by_predictions() {
        let part = EvalPart { position_sums: (0..127).map(|p| 2.0 * p as f64).collect(), windows: 2 };
        let b = part.buckets();
        assert_eq!(b.len(), 32);
        assert_eq!((b[0].from, b.last().unwrap().to), (0, 127));
        assert!(b.windows(2).all(|w| w[0].to == w[1].from));
        // bucket 0 holds positions 0..3 of 2 windows: losses (0+2+4)/(2*3) = 1
        assert_eq!((b[0].to, b[0].predictions, b[0].loss), (3, 6, 1.0));
        let weighted: f64 = b.iter().map(|b| b.loss * b.predictions as f64).sum::<f64>() / part.predictions() as f64;
        assert!((weighted - part.mean()).abs() < 1e-12);
        // few positions: one bucket each
        assert_eq!(EvalPart { position_sums: vec![1.0; 7], windows: 1 }.buckets().len(), 7);
        assert!(EvalPart::empty(10).mean().is_nan());
        assert_eq!(EvalPart::from_buffer(part.to_buffer()), part);
    }
}
