//! Blocks and batches: a token stream cut into `block_size` blocks (remainder dropped), visited
//! in a fresh seeded shuffle each epoch; each block is both input and label (HF `run_clm.py`).

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::TokenStream;

/// The block order of one epoch: a permutation seeded by `(seed, epoch)`, so a resumed run
/// visits the same blocks as an uninterrupted one.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    pub epoch: u64,
    order: Vec<usize>,
}

impl EpochOrder {
    pub fn new(num_blocks: usize, seed: u64, epoch: u64) -> Self {
        let mut order: Vec<usize> = (0..num_blocks).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        order.shuffle(&mut rng);
        Self { epoch, order }
    }

    pub fn blocks(&self, start: usize, n: usize) -> &[usize] {
        &self.order[start..start + n]
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Builds `(B, T)` u32 tensors of token ids from block indices.
pub struct Batcher<'a> {
    pub stream: &'a TokenStream,
    pub block_size: usize,
}

impl Batcher<'_> {
    pub fn batch(&self, blocks: &[usize], device: &Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(blocks.len() * self.block_size);
        for &b in blocks {
            self.stream.extend_into(b * self.block_size, self.block_size, &mut ids);
        }
        Tensor::from_vec(ids, (blocks.len(), self.block_size), device)
    }

    /// Consecutive blocks `start..start + n` (evaluation walks the split in order).
    pub fn sequential(&self, start: usize, n: usize, device: &Device) -> Result<Tensor> {
        let blocks: Vec<usize> = (start..start + n).collect();
        self.batch(&blocks, device)
    }
}
