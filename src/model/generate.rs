//! Sampling text with a KV cache: each new token runs the blocks on one position, attending to
//! the keys and values of every earlier one, instead of the whole sequence again.
//!
//! Every variant steps incrementally: learned positions read `wpe[p]`, RoPE rotates q and k
//! at position `p`, and the differential variant feeds `d_p = e_p - e_{p-1}`, so the cache
//! keeps the previous token's embedding `e_{p-1}` (and adds `e_p` back before `ln_f`, as the
//! full forward does). `cached_forward` is tested against the full forward at every position.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::gpt::{Block, Gpt};
use super::ops;
use super::rope::RotaryTables;

/// The keys and values of every position seen so far, per block, and what the next step's
/// embedding needs.
pub struct KvCache {
    /// `(k, v)` per block, `(B, H, L, hd)` each.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The last token's embedding `(B, 1, C)`: the differential step subtracts it.
    last_embedding: Option<Tensor>,
    rope: Option<RotaryTables>,
    /// Positions cached.
    pub len: usize,
}

impl KvCache {
    pub fn new(gpt: &Gpt) -> Result<Self> {
        let cfg = gpt.config();
        let rope = if cfg.rope {
            Some(RotaryTables::new(cfg.n_positions, cfg.head_dim(), cfg.rope_theta, gpt.device())?)
        } else {
            None
        };
        Ok(Self { layers: vec![None; cfg.n_layer], last_embedding: None, rope, len: 0 })
    }
}

/// How far past its training length a RoPE model generates before its context slides.
pub const ROPE_WINDOW: usize = 8;

impl Gpt {
    /// The context generation keeps before it slides: the learned positions, or for RoPE
    /// `ROPE_WINDOW` times the training length.
    pub fn window(&self) -> usize {
        let cfg = self.config();
        cfg.learned_positions().unwrap_or(ROPE_WINDOW * cfg.n_positions)
    }

    /// Logits `(B, n, V)` for `ids (B, n)` that follow the `cache.len` positions already in
    /// `cache`; the cache then holds them too. The same numbers as `forward` on the whole
    /// sequence, at the new positions.
    pub fn cached_forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b_sz, n) = ids.dims2()?;
        let (start, c) = (cache.len, self.config().n_embd);
        if let Some(limit) = self.config().learned_positions().filter(|limit| start + n > *limit) {
            candle_core::bail!("{} positions exceed the {limit} learned positions", start + n)
        }
        // RoPE reads any position: the tables grow with the sequence
        if let Some(rope) = cache.rope.as_mut().filter(|r| r.len() < start + n) {
            let cfg = self.config();
            *rope = RotaryTables::new((start + n).next_power_of_two(), cfg.head_dim(), cfg.rope_theta, self.device())?;
        }
        let e = self.wte.index_select(&ids.flatten_all()?, 0)?.reshape((b_sz, n, c))?.to_dtype(self.dtype())?;
        let mut xs = if self.config().differential {
            // d_p = e_p - e_{p-1}, with d_0 = e_0 at the start of the sequence
            let previous = match &cache.last_embedding {
                Some(last) => last.clone(),
                None => e.narrow(1, 0, 1)?.zeros_like()?,
            };
            let shifted = if n > 1 { Tensor::cat(&[&previous, &e.narrow(1, 0, n - 1)?], 1)? } else { previous };
            (&e - shifted)?
        } else {
            e.clone()
        };
        if let Some(wpe) = &self.wpe {
            xs = xs.broadcast_add(&wpe.narrow(0, start, n)?.to_dtype(self.dtype())?)?;
        }
        // query i (at start + i) sees keys 0..=start + i
        let mask = if n > 1 { Some(step_mask(start, n, xs.device())?.to_dtype(self.dtype())?) } else { None };
        for (block, layer) in self.h.iter().zip(cache.layers.iter_mut()) {
            xs = self.cached_block(block, &xs, layer, cache.rope.as_ref(), start, mask.as_ref())?;
        }
        cache.last_embedding = Some(e.narrow(1, n - 1, 1)?);
        cache.len += n;
        let tokens = if self.config().differential { Some(&e) } else { None };
        self.logits(&self.final_hidden(&xs, tokens)?)
    }

    fn cached_block(
        &self,
        block: &Block,
        xs: &Tensor,
        layer: &mut Option<(Tensor, Tensor)>,
        rope: Option<&RotaryTables>,
        start: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let k = self.kernels();
        let (b_sz, n, c) = xs.dims3()?;
        let attn = &block.attn;
        let (h, hd) = (attn.n_head, c / attn.n_head);
        let qkv = attn.c_attn.forward(&block.ln_1.forward(xs, k)?, k)?; // (B, n, 3C)
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)?.reshape((b_sz, n, h, hd))?.transpose(1, 2)?.contiguous()
            // (B, H, n, hd)
        };
        let (mut q, mut key, value) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some(rope) = rope {
            q = rope.apply_from(&q, start)?;
            key = rope.apply_from(&key, start)?;
        }
        let (keys, values) = match layer.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &key], 2)?, Tensor::cat(&[&pv, &value], 2)?),
            None => (key, value),
        }; // (B, H, L, hd)
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let mut scores = q.matmul(&keys.t()?)?; // (B, H, n, L)
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&ops::upcast(&scores)?)?.to_dtype(scores.dtype())?;
        let ys = probs.matmul(&values)?.transpose(1, 2)?.reshape((b_sz, n, c))?; // (B, n, C)
        *layer = Some((keys, values));
        let xs = (xs + attn.c_proj.forward(&ys, k)?)?;
        let mlp = block.mlp.forward(&block.ln_2.forward(&xs, k)?, k)?;
        xs + mlp
    }
}

/// The additive mask `(n, start + n)` of `n` new queries after `start` cached positions.
fn step_mask(start: usize, n: usize, device: &Device) -> Result<Tensor> {
    let len = start + n;
    let data: Vec<f32> =
        (0..n).flat_map(|i| (0..len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(data, (n, len), device)
}

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token, deterministic).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 40, top_p: 1.0, seed: 0 }
    }
}

/// Draws one token id from `logits` (V).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<(usize, f64)> = logits.iter().map(|&l| l as f64 / s.temperature).enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = order.first().map_or(0.0, |o| o.1);
    let mut probs: Vec<f64> = order.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= s.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax();
    }
    let mut x = rng.random::<f64>() * total;
    for ((id, _), p) in order.iter().zip(&probs) {
        x -= p;
        if x <= 0.0 {
            return *id as u32;
        }
    }
    order.last().map_or(0, |o| o.0 as u32)
}

/// Continues `prompt` by up to `max_new_tokens` tokens (fewer if `stop` is drawn), calling
/// `on_token` with each as it comes. When the sequence reaches the model's window (its learned
/// positions; for RoPE, `ROPE_WINDOW` times the training length, to bound the cache), the cache is
/// rebuilt from the last half of the tokens.
pub fn generate(
    gpt: &Gpt,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    stop: Option<u32>,
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt has no tokens")
    }
    let window = gpt.window();
    let device = gpt.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut tokens: Vec<u32> = prompt[prompt.len().saturating_sub(window)..].to_vec();
    let mut cache = KvCache::new(gpt)?;
    let mut logits =
        last_row(&gpt.cached_forward(&Tensor::new(tokens.as_slice(), &device)?.unsqueeze(0)?, &mut cache)?)?;
    let mut out = vec![];
    for _ in 0..max_new_tokens {
        let next = pick(&logits, sampling, &mut rng);
        out.push(next);
        on_token(next);
        if Some(next) == stop {
            break;
        }
        tokens.push(next);
        let input = if cache.len + 1 > window {
            cache = KvCache::new(gpt)?;
            tokens.drain(..tokens.len() - window / 2);
            tokens.clone()
        } else {
            vec![next]
        };
        logits = last_row(&gpt.cached_forward(&Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?, &mut cache)?)?;
    }
    Ok(out)
}

/// The last position's logits of `(1, n, V)`.
fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let n = logits.dim(1)?;
    logits.narrow(1, n - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::init_weights;
    use crate::model::{GptConfig, Trainable};

    fn model(rope: bool, differential: bool) -> Gpt {
        let cfg = GptConfig {
            vocab_size: 61,
            n_positions: 16,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
            rope,
            rope_theta: 10_000.0,
            differential,
            dropout: 0.0,
        };
        let weights = init_weights(&cfg, 7, &Device::Cpu).unwrap();
        Trainable::on_weights(&cfg, weights).unwrap().detached().unwrap()
    }

    #[test]
    fn the_cached_step_equals_the_full_forward_at_every_position_for_every_variant() {
        let ids: Vec<u32> = vec![3, 17, 17, 40, 5, 60, 0, 22, 9, 9, 31, 2];
        for (rope, differential) in [(false, false), (true, false), (false, true), (true, true)] {
            let gpt = model(rope, differential);
            let full = gpt.forward(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None);
            let full: Vec<Vec<f32>> = full.unwrap().logits.squeeze(0).unwrap().to_vec2().unwrap();
            // a prompt of 3 in one call, then one token at a time
            let mut cache = KvCache::new(&gpt).unwrap();
            let mut cached: Vec<Vec<f32>> = vec![];
            let prefill = Tensor::new(&ids[..3], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            cached.extend(gpt.cached_forward(&prefill, &mut cache).unwrap().squeeze(0).unwrap().to_vec2().unwrap());
            for &id in &ids[3..] {
                let one = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                cached.extend(gpt.cached_forward(&one, &mut cache).unwrap().squeeze(0).unwrap().to_vec2().unwrap());
            }
            assert_eq!(cached.len(), ids.len());
            let worst = full
                .iter()
                .flatten()
                .zip(cached.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
            assert!(worst < 1e-4, "rope {rope} differential {differential}: max |full - cached| = {worst}");
        }
    }

    /// RoPE models read past their training length (n_positions 16 here): the cached steps at
    /// positions 16..40 equal the full forward over the 40 tokens, the rotary tables grown on
    /// the way; a model with learned positions refuses the 17th.
    #[test]
    fn rope_models_step_past_their_training_length_as_the_full_forward_does() {
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 61).collect();
        for differential in [false, true] {
            let gpt = model(true, differential);
            let all = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let full: Vec<Vec<f32>> = gpt.forward(&all, None).unwrap().logits.squeeze(0).unwrap().to_vec2().unwrap();
            let mut cache = KvCache::new(&gpt).unwrap();
            let mut cached: Vec<Vec<f32>> = vec![];
            for &id in &ids {
                let one = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                cached.extend(gpt.cached_forward(&one, &mut cache).unwrap().squeeze(0).unwrap().to_vec2().unwrap());
            }
            let worst = full[16..]
                .iter()
                .flatten()
                .zip(cached[16..].iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
            assert!(worst < 1e-4, "differential {differential}: max |full - cached| past 16 = {worst}");
        }
        let learned = model(false, true);
        let all = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let err = learned.forward(&all, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("16 learned positions"), "{err}");
    }

    #[test]
    fn a_differential_model_depends_on_the_previous_token() {
        // the same last token after different previous tokens: different logits, so the
        // cache really carries e_{p-1} (a cache that dropped it would give equal rows)
        let gpt = model(true, true);
        let last = |prev: u32| {
            let mut cache = KvCache::new(&gpt).unwrap();
            let t = Tensor::new(&[prev, 11u32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            last_row(&gpt.cached_forward(&t, &mut cache).unwrap()).unwrap()
        };
        assert_ne!(last(1), last(2));
    }

    #[test]
    fn greedy_is_deterministic_and_sampling_follows_its_seed() {
        let gpt = model(false, true);
        let greedy = Sampling { temperature: 0.0, ..Default::default() };
        let run = |s: &Sampling| generate(&gpt, &[1, 2, 3], 30, s, None, &mut |_| {}).unwrap();
        // 30 new tokens after 3 pass n_positions 16: the cache is rebuilt on the way
        assert_eq!(run(&greedy).len(), 30);
        assert_eq!(run(&greedy), run(&greedy));
        let seeded = Sampling { seed: 5, ..Default::default() };
        assert_eq!(run(&seeded), run(&seeded));
        assert_ne!(run(&seeded), run(&Sampling { seed: 6, ..Default::default() }));
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_likeliest_tokens() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let k1 = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 };
        assert!((0..50).all(|_| pick(&logits, &k1, &mut rng) == 1));
        // p = 0.5: token 1 alone holds ~51% of the mass after softmax of [0, 5, 4.9, -3]
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 0 };
        assert!((0..50).all(|_| pick(&logits, &p, &mut rng) == 1));
        let both = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 };
        let drawn: std::collections::BTreeSet<u32> = (0..200).map(|_| pick(&logits, &both, &mut rng)).collect();
        assert_eq!(drawn, [1, 2].into_iter().collect());
    }
}
