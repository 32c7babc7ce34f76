//! Seeded dropout. candle's CPU generator cannot be seeded, so masks come from our own
//! ChaCha stream: the same seed gives the same masks, and a recomputed block (gradient
//! checkpointing) replays them by cloning the generator first.

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct Dropout {
    p: f32,
    rng: ChaCha8Rng,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        Self { p, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    pub fn apply(&mut self, xs: &Tensor) -> Result<Tensor> {
        if !self.is_active() {
            return Ok(xs.clone());
        }
        let keep = 1.0 - self.p;
        let scale = 1.0 / keep;
        let mask: Vec<f32> =
            (0..xs.elem_count()).map(|_| if self.rng.random::<f32>() < keep { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs.mul(&mask)
    }
}

/// Applies dropout when training (`Some`), passes through when evaluating (`None`).
pub fn maybe_dropout(xs: &Tensor, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(xs),
        None => Ok(xs.clone()),
    }
}
