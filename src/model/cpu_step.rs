//! The training step written out, llm.c style, for f32 on the CPU: the forward keeps the
//! activations each layer's backward needs, and the backward adds straight into one gradient
//! buffer per parameter. This skips candle's autograd, whose bookkeeping (a zero-filled slot
//! and an extra add for every intermediate tensor, gradients kept for constants) cost as much
//! as the matmuls at these sizes. The math is the model's (`gpt.rs`); tests hold the two to
//! the same gradients, and the golden tests run through this path. With gradient
//! checkpointing only each block's input is kept and the block is recomputed in the backward.
//! Dropout is not written out: with dropout on, training takes the autograd path.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Storage, StorageRef, Tensor, Var};
use rayon::prelude::*;

use super::config::GptConfig;
use super::params::param_specs;
use super::rope::RotaryTables;
use crate::engine::cpu::attention::{self, Dims, Rope};
use crate::engine::cpu::head;
use crate::engine::cpu::kernels::{
    add_into, gelu, gelu_backward, layer_norm, layer_norm_backward, linear, linear_backward, Matmuls, Panels, Weight,
};
use crate::engine::cpu::ops::slice;

/// One block's parameters (or gradients), indexed by the constants below, in
/// `BLOCK_NAMES` order.
struct PerBlock<T>([T; 12]);

const BLOCK_NAMES: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];
const LN_1_W: usize = 0;
const LN_1_B: usize = 1;
const ATTN_W: usize = 2;
const ATTN_B: usize = 3;
const PROJ_W: usize = 4;
const PROJ_B: usize = 5;
const LN_2_W: usize = 6;
const LN_2_B: usize = 7;
const FC_W: usize = 8;
const FC_B: usize = 9;
const MLP_W: usize = 10;
const MLP_B: usize = 11;

/// Mutable views of two distinct fields of a gradient block.
fn pair(g: &mut PerBlock<Vec<f32>>, a: usize, b: usize) -> (&mut [f32], &mut [f32]) {
    let (lo, hi) = g.0.split_at_mut(b);
    (&mut lo[a], &mut hi[0])
}

/// Every parameter, as its floats (borrowed from the `Var`s for the step).
struct Weights<'a> {
    wte: &'a [f32],
    wpe: Option<&'a [f32]>,
    h: Vec<PerBlock<&'a [f32]>>,
    ln_f_w: &'a [f32],
    ln_f_b: &'a [f32],
}

/// Gradient buffers, the same shapes.
struct GradBuffers {
    wte: Vec<f32>,
    wpe: Option<Vec<f32>>,
    h: Vec<PerBlock<Vec<f32>>>,
    ln_f_w: Vec<f32>,
    ln_f_b: Vec<f32>,
}

/// One block's kept activations (all but `x_in` are empty under checkpointing until recomputed).
#[derive(Default)]
struct Acts {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Option<Vec<f32>>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    h: Vec<f32>,
    g: Vec<f32>,
}

/// A part of the gradient buffers that the backward finishes at once, in the order it
/// finishes them (`Section::in_order`): ln_f right after the head, each block from the last to
/// the first, then the embeddings (`wte` also takes the head's gradient, so it is final only at
/// the very end). A section's buffers are in `HostGrads::buffers_mut` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Section {
    FinalNorm,
    Block(usize),
    Embeddings,
}

impl Section {
    /// The length of the section's first buffer: `ln_f.weight`, a block's `ln_1.weight`, `wte`.
    pub fn first_len(self, cfg: &GptConfig) -> usize {
        match self {
            Section::FinalNorm | Section::Block(_) => cfg.n_embd,
            Section::Embeddings => cfg.vocab_size * cfg.n_embd,
        }
    }

    pub fn in_order(n_layer: usize) -> impl Iterator<Item = Section> {
        std::iter::once(Section::FinalNorm)
            .chain((0..n_layer).rev().map(Section::Block))
            .chain(std::iter::once(Section::Embeddings))
    }
}

/// Called with each section's buffers as soon as the backward has finished them, moved out of
/// the gradient sums (`HostGrads::put` gives them back), so that they can be summed over the
/// processes while the backward goes on.
pub type OnFinished<'a> = &'a mut dyn FnMut(Section, Vec<Vec<f32>>);

impl GradBuffers {
    fn take(&mut self, s: Section) -> Vec<Vec<f32>> {
        use std::mem::take;
        match s {
            Section::FinalNorm => vec![take(&mut self.ln_f_w), take(&mut self.ln_f_b)],
            Section::Block(i) => self.h.get_mut(i).map_or_else(Vec::new, |b| b.0.iter_mut().map(take).collect()),
            Section::Embeddings => std::iter::once(take(&mut self.wte)).chain(self.wpe.as_mut().map(take)).collect(),
        }
    }

    fn put(&mut self, s: Section, buffers: Vec<Vec<f32>>) -> Result<()> {
        let slots: Vec<&mut Vec<f32>> = match s {
            Section::FinalNorm => vec![&mut self.ln_f_w, &mut self.ln_f_b],
            Section::Block(i) => self.h.get_mut(i).map_or_else(Vec::new, |b| b.0.iter_mut().collect()),
            Section::Embeddings => std::iter::once(&mut self.wte).chain(self.wpe.as_mut()).collect(),
        };
        if slots.len() != buffers.len() {
            candle_core::bail!("{s:?}: {} gradient buffers given back for {} slots", buffers.len(), slots.len())
        }
        slots.into_iter().zip(buffers).for_each(|(slot, b)| *slot = b);
        Ok(())
    }
}

pub struct MicroOutcome {
    pub loss: f64,
    pub diff_norms: Option<Vec<f32>>,
}

/// Gradient buffers summed over the micro-batches of a step: each backward adds into them,
/// so accumulation costs nothing and they are made once per optimizer step.
pub struct HostGrads(GradBuffers);

impl HostGrads {
    /// Every gradient buffer, in a fixed order (the same on every process).
    pub fn buffers_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        let g = &mut self.0;
        std::iter::once(g.wte.as_mut_slice())
            .chain(g.wpe.iter_mut().map(|v| v.as_mut_slice()))
            .chain(g.h.iter_mut().flat_map(|b| b.0.iter_mut().map(|v| v.as_mut_slice())))
            .chain([g.ln_f_w.as_mut_slice(), g.ln_f_b.as_mut_slice()])
    }

    /// Adds another worker's sums into these (the same model: the same buffers in the same order).
    pub fn add(&mut self, mut other: HostGrads) {
        for (acc, x) in self.buffers_mut().zip(other.buffers_mut()) {
            crate::engine::cpu::kernels::add_into(acc, x);
        }
    }

    /// Moves `s`'s buffers out (empty ones stay in their place).
    pub fn take(&mut self, s: Section) -> Vec<Vec<f32>> {
        self.0.take(s)
    }

    /// Puts `s`'s buffers back, as `take` or `OnFinished` gave them out.
    pub fn put(&mut self, s: Section, buffers: Vec<Vec<f32>>) -> Result<()> {
        self.0.put(s, buffers)
    }

    /// The sums as tensors named and shaped as `param_specs` says.
    pub fn into_tensors(self, cfg: &GptConfig) -> Result<BTreeMap<String, Tensor>> {
        let g = self.0;
        let mut flat: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        flat.insert("transformer.wte.weight".into(), g.wte);
        if let Some(p) = g.wpe {
            flat.insert("transformer.wpe.weight".into(), p);
        }
        for (i, block) in g.h.into_iter().enumerate() {
            for (name, data) in BLOCK_NAMES.iter().zip(block.0) {
                flat.insert(format!("transformer.h.{i}.{name}"), data);
            }
        }
        flat.insert("transformer.ln_f.weight".into(), g.ln_f_w);
        flat.insert("transformer.ln_f.bias".into(), g.ln_f_b);
        param_specs(cfg)
            .into_iter()
            .map(|spec| {
                let data = flat
                    .remove(&spec.name)
                    .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for {}", spec.name)))?;
                Ok((spec.name, Tensor::from_vec(data, spec.shape, &Device::Cpu)?))
            })
            .collect()
    }
}

fn guard(v: &Var) -> (StorageRef<'_>, &candle_core::Layout) {
    v.as_tensor().storage_and_layout()
}

/// Forward and backward of one micro-batch. `ids (B, T)`; `targets (B, T)` or none for the
/// next-token loss of the blocks themselves. Gradients of `loss * scale` are added into
/// `grads` (made zero when `None`). With bf16 matmuls, `packed` holds this step's weight panels.
/// With `on_finished`, each section's buffers are handed to it as the backward finishes them
/// (and are missing from `grads` until put back).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    cfg: &GptConfig,
    vars: &BTreeMap<String, Var>,
    ids: &Tensor,
    targets: Option<&Tensor>,
    scale: f64,
    checkpointing: bool,
    (mm, packed): (Matmuls, Option<&PackedWeights>),
    grads: &mut Option<HostGrads>,
    on_finished: Option<OnFinished>,
) -> Result<MicroOutcome> {
    let (b, t) = ids.dims2()?;
    let ids: Vec<u32> = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    let targets: Option<Vec<u32>> =
        targets.map(|t| t.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()).transpose()?;
    with_weights(cfg, vars, |w| {
        let step = Step { cfg, w, b, t, rope: rope_tables(cfg, t)?, mm, packed };
        let mut g = match grads.take() {
            Some(HostGrads(g)) => g,
            None => step.zero_grads(),
        };
        let out = step.run(&ids, targets.as_deref(), scale as f32, checkpointing, &mut g, on_finished);
        *grads = Some(HostGrads(g));
        out
    })
}

/// Calls `f` with every parameter's floats, borrowed from the `Var`s (reads only; the
/// optimizer writes later).
fn with_weights<R>(cfg: &GptConfig, vars: &BTreeMap<String, Var>, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
    let guards: BTreeMap<&str, (StorageRef<'_>, &candle_core::Layout)> =
        vars.iter().map(|(k, v)| (k.as_str(), guard(v))).collect();
    let get = |name: &str| -> Result<&[f32]> {
        let (storage, layout) =
            guards.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))?;
        match &**storage {
            Storage::Cpu(cpu) => slice(cpu, layout, "cpu step"),
            _ => candle_core::bail!("cpu step: {name} is not on the CPU"),
        }
    };
    let w = Weights {
        wte: get("transformer.wte.weight")?,
        wpe: if cfg.rope { None } else { Some(get("transformer.wpe.weight")?) },
        h: (0..cfg.n_layer)
            .map(|i| {
                let fields: Vec<&[f32]> =
                    BLOCK_NAMES.iter().map(|n| get(&format!("transformer.h.{i}.{n}"))).collect::<Result<_>>()?;
                let fields: [&[f32]; 12] =
                    fields.try_into().map_err(|_| candle_core::Error::Msg("block fields".into()))?;
                Ok(PerBlock(fields))
            })
            .collect::<Result<_>>()?,
        ln_f_w: get("transformer.ln_f.weight")?,
        ln_f_b: get("transformer.ln_f.bias")?,
    };
    f(&w)
}

/// Whether bf16 matmuls pack the weights once per step (`PackedWeights`) rather than in every
/// product: when the panels take no more memory than keeping the head's gradient in bf16 saves
/// (for `workers` micro-batches of `b x t` at once), so bf16 training never needs more memory
/// than f32 (at GPT-2 small the panels are 0.5 GB and the head keeps nothing). The products are
/// the same bit for bit either way; packing once saves the conversions.
pub fn packs_weights_once(cfg: &GptConfig, (b, t): (usize, usize), workers: usize) -> bool {
    let rows = b * t;
    let saved = if head::keeps_whole(rows, cfg.vocab_size) { workers * rows * cfg.vocab_size * 2 } else { 0 };
    cfg.bf16_panel_bytes() <= saved as u64
}

/// The matmul weights packed for bf16 matmuls (`Panels`: each weight in both orientations):
/// made once per optimizer step, before its micro-batches, and read by all of them, so a weight
/// is converted to bf16 once per step rather than once per product (`packs_weights_once`).
pub struct PackedWeights {
    /// The model's `(vocab_size, n_embd, n_layer)`.
    shape: (usize, usize, usize),
    wte: Panels,
    /// Per block: `c_attn`, `attn.c_proj`, `c_fc`, `mlp.c_proj` (`MATMUL_FIELDS`).
    h: Vec<[Panels; 4]>,
}

/// The block fields that are matmul weights, with their shapes as multiples of `n_embd`.
const MATMUL_FIELDS: [(usize, (usize, usize)); 4] =
    [(ATTN_W, (1, 3)), (PROJ_W, (1, 1)), (FC_W, (1, 4)), (MLP_W, (4, 1))];

impl PackedWeights {
    /// Packs the weights as they are now. The CPU must have AVX512-BF16.
    pub fn new(cfg: &GptConfig, vars: &BTreeMap<String, Var>) -> Result<PackedWeights> {
        let c = cfg.n_embd;
        with_weights(cfg, vars, |w| {
            Ok(PackedWeights {
                shape: (cfg.vocab_size, c, cfg.n_layer),
                wte: Panels::new(w.wte, (cfg.vocab_size, c)),
                h: w.h.iter().map(|p| MATMUL_FIELDS.map(|(f, (r, k))| Panels::new(p.0[f], (r * c, k * c)))).collect(),
            })
        })
    }

    /// Whether these are panels of `cfg`'s weights (to pack again rather than make anew).
    pub fn is_for(&self, cfg: &GptConfig) -> bool {
        self.shape == (cfg.vocab_size, cfg.n_embd, cfg.n_layer)
    }

    /// Packs the weights as they are now into these panels (made for the same model).
    pub fn repack(&mut self, cfg: &GptConfig, vars: &BTreeMap<String, Var>) -> Result<()> {
        with_weights(cfg, vars, |w| {
            self.wte.repack(w.wte);
            for (panels, p) in self.h.iter_mut().zip(&w.h) {
                for (slot, (f, _)) in panels.iter_mut().zip(MATMUL_FIELDS) {
                    slot.repack(p.0[f]);
                }
            }
            Ok(())
        })
    }

    /// Their size in memory: 4 bytes a matmul weight (two bf16 copies).
    pub fn bytes(&self) -> usize {
        self.wte.bytes() + self.h.iter().flatten().map(Panels::bytes).sum::<usize>()
    }
}

fn rope_tables(cfg: &GptConfig, t: usize) -> Result<Option<Rope>> {
    if !cfg.rope {
        return Ok(None);
    }
    Ok(Some(RotaryTables::new(t, cfg.head_dim(), cfg.rope_theta, &Device::Cpu)?.host()?))
}

struct Step<'a> {
    cfg: &'a GptConfig,
    w: &'a Weights<'a>,
    b: usize,
    t: usize,
    rope: Option<Rope>,
    /// The matmuls' arithmetic (f32, or bf16 products as autocast computes them).
    mm: Matmuls,
    /// With bf16 matmuls, the step's packed weights.
    packed: Option<&'a PackedWeights>,
}

/// `a + b` as a new buffer.
fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = a.to_vec();
    add_into(&mut out, b);
    out
}

impl Step<'_> {
    /// Block `i`'s matmul weight `field` (`p` its values), with its panels when packed.
    fn weight<'w>(&'w self, i: usize, p: &PerBlock<&'w [f32]>, field: usize) -> Weight<'w> {
        let slot = MATMUL_FIELDS.iter().position(|(f, _)| *f == field);
        Weight { values: p.0[field], panels: self.packed.zip(slot).map(|(w, s)| &w.h[i][s]) }
    }

    fn wte(&self) -> Weight<'_> {
        Weight { values: self.w.wte, panels: self.packed.map(|w| &w.wte) }
    }

    fn n(&self) -> usize {
        self.b * self.t
    }

    /// LayerNorm's epsilon from the config (HF `layer_norm_epsilon`), as the autograd path uses.
    fn eps(&self) -> f32 {
        self.cfg.layer_norm_epsilon as f32
    }

    fn dims(&self) -> Dims {
        Dims::new(self.b, self.t, self.cfg.n_embd, self.cfg.n_head, self.mm)
    }

    /// Runs block `p` from `x_in`, filling every activation (the probabilities if `keep_probs`).
    fn block_forward(&self, i: usize, x_in: Vec<f32>, keep_probs: bool) -> (Acts, Vec<f32>) {
        let p = &self.w.h[i];
        let (n, c) = (self.n(), self.cfg.n_embd);
        let d = self.dims();
        let mut a = Acts { x_in, ..Default::default() };
        a.ln1 = vec![0f32; n * c];
        layer_norm(&a.x_in, p.0[LN_1_W], p.0[LN_1_B], self.eps(), &mut a.ln1);
        a.qkv = vec![0f32; n * 3 * c];
        linear(&a.ln1, self.weight(i, p, ATTN_W), p.0[ATTN_B], &mut a.qkv, self.mm);
        a.att = vec![0f32; n * c];
        if keep_probs && d.probs_len() * 4 <= attention::KEEP_BYTES {
            let mut probs = vec![0f32; d.probs_len()];
            attention::forward(&a.qkv, &d, &self.rope, &mut a.att, Some(&mut probs));
            a.probs = Some(probs);
        } else {
            attention::forward(&a.qkv, &d, &self.rope, &mut a.att, None);
        }
        let mut proj = vec![0f32; n * c];
        linear(&a.att, self.weight(i, p, PROJ_W), p.0[PROJ_B], &mut proj, self.mm);
        a.x_mid = add(&a.x_in, &proj);
        a.ln2 = vec![0f32; n * c];
        layer_norm(&a.x_mid, p.0[LN_2_W], p.0[LN_2_B], self.eps(), &mut a.ln2);
        a.h = vec![0f32; n * 4 * c];
        linear(&a.ln2, self.weight(i, p, FC_W), p.0[FC_B], &mut a.h, self.mm);
        a.g = vec![0f32; n * 4 * c];
        gelu(&a.h, &mut a.g);
        let mut mlp = proj; // reuse: same size
        linear(&a.g, self.weight(i, p, MLP_W), p.0[MLP_B], &mut mlp, self.mm);
        let x_out = add(&a.x_mid, &mlp);
        (a, x_out)
    }

    /// `dx_in` from `dx_out`, adding into the block's gradients `g`.
    fn block_backward(&self, i: usize, a: &Acts, dx_out: &[f32], g: &mut PerBlock<Vec<f32>>) -> Vec<f32> {
        let p = &self.w.h[i];
        let (n, c) = (self.n(), self.cfg.n_embd);
        // MLP: dx_out flows to the residual and into mlp.c_proj
        let mut d_g = vec![0f32; n * 4 * c];
        let (dw, db) = pair(g, MLP_W, MLP_B);
        linear_backward(&a.g, self.weight(i, p, MLP_W), dx_out, Some((&mut d_g, false)), dw, db, self.mm);
        let mut d_h = vec![0f32; n * 4 * c];
        gelu_backward(&a.h, &d_g, &mut d_h);
        drop(d_g);
        let mut d_ln2 = vec![0f32; n * c];
        let (dw, db) = pair(g, FC_W, FC_B);
        linear_backward(&a.ln2, self.weight(i, p, FC_W), &d_h, Some((&mut d_ln2, false)), dw, db, self.mm);
        drop(d_h);
        let mut dx_mid = dx_out.to_vec();
        let (dw, db) = pair(g, LN_2_W, LN_2_B);
        layer_norm_backward(&a.x_mid, p.0[LN_2_W], &d_ln2, self.eps(), &mut dx_mid, true, dw, db);
        // attention
        let mut d_att = d_ln2; // reuse: same size
        let (dw, db) = pair(g, PROJ_W, PROJ_B);
        linear_backward(&a.att, self.weight(i, p, PROJ_W), &dx_mid, Some((&mut d_att, false)), dw, db, self.mm);
        let mut d_qkv = vec![0f32; n * 3 * c];
        attention::backward(&a.qkv, &d_att, a.probs.as_deref(), &self.dims(), &self.rope, &mut d_qkv);
        let mut d_ln1 = d_att; // reuse
        let (dw, db) = pair(g, ATTN_W, ATTN_B);
        linear_backward(&a.ln1, self.weight(i, p, ATTN_W), &d_qkv, Some((&mut d_ln1, false)), dw, db, self.mm);
        let mut dx_in = dx_mid;
        let (dw, db) = pair(g, LN_1_W, LN_1_B);
        layer_norm_backward(&a.x_in, p.0[LN_1_W], &d_ln1, self.eps(), &mut dx_in, true, dw, db);
        dx_in
    }

    /// `e = wte[ids]`, and the blocks' input: `d` (differential) or `e`, plus `wpe`; with the
    /// differential path, `||d_t||` per row.
    fn embed(&self, ids: &[u32]) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        let (b, t, c, cfg) = (self.b, self.t, self.cfg.n_embd, self.cfg);
        let mut e = vec![0f32; b * t * c];
        e.par_chunks_mut(c)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| row.copy_from_slice(&self.w.wte[id as usize * c..(id as usize + 1) * c]));
        let mut x0 = if cfg.differential {
            let mut d = e.clone();
            for bi in 0..b {
                for pos in (1..t).rev() {
                    let (prev, cur) = d[(bi * t + pos - 1) * c..(bi * t + pos + 1) * c].split_at_mut(c);
                    // d_t = e_t - e_(t-1), from e (prev still holds e_(t-1): we go backwards)
                    cur.iter_mut().zip(prev.iter()).for_each(|(x, p)| *x -= p);
                }
            }
            d
        } else {
            e.clone()
        };
        let diff_norms = cfg
            .differential
            .then(|| x0.chunks(c).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).collect::<Vec<_>>());
        if let Some(wpe) = self.w.wpe {
            x0.par_chunks_mut(c)
                .enumerate()
                .for_each(|(r, row)| row.iter_mut().zip(&wpe[(r % t) * c..(r % t + 1) * c]).for_each(|(x, p)| *x += p));
        }
        (e, x0, diff_norms)
    }

    /// The embeddings' gradients from `dx`, the gradient at the blocks' input, and (differential)
    /// `d_e_top`, the gradient of the token embedding added back after the last block.
    fn embed_backward(&self, ids: &[u32], dx: Vec<f32>, d_e_top: Option<Vec<f32>>, g: &mut GradBuffers) {
        let (b, t, c, cfg) = (self.b, self.t, self.cfg.n_embd, self.cfg);
        if let Some(dwpe) = g.wpe.as_mut() {
            for (r, row) in dx.chunks(c).enumerate() {
                dwpe[(r % t) * c..(r % t + 1) * c].iter_mut().zip(row).for_each(|(a, x)| *a += x);
            }
        }
        let mut d_e = if cfg.differential {
            // d_t = e_t - e_(t-1): de_t = dd_t - dd_(t+1)
            let mut de = dx.clone();
            for bi in 0..b {
                for pos in 0..t - 1 {
                    let cur = &mut de[(bi * t + pos) * c..(bi * t + pos + 1) * c];
                    let next_dd = &dx[(bi * t + pos + 1) * c..(bi * t + pos + 2) * c];
                    cur.iter_mut().zip(next_dd).for_each(|(x, n)| *x -= n);
                }
            }
            de
        } else {
            dx
        };
        if let Some(top) = d_e_top {
            add_into(&mut d_e, &top);
        }
        for (row, &id) in d_e.chunks(c).zip(ids) {
            g.wte[id as usize * c..(id as usize + 1) * c].iter_mut().zip(row).for_each(|(a, x)| *a += x);
        }
    }

    fn run(
        &self,
        ids: &[u32],
        targets: Option<&[u32]>,
        scale: f32,
        checkpointing: bool,
        g: &mut GradBuffers,
        mut on_finished: Option<OnFinished>,
    ) -> Result<MicroOutcome> {
        let (b, t, c, cfg) = (self.b, self.t, self.cfg.n_embd, self.cfg);
        let n = b * t;
        let v = cfg.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {v}")
        }

        let (e, x0, diff_norms) = self.embed(ids);

        // ---- blocks (keeping activations, or only block inputs under checkpointing)
        let mut acts: Vec<Acts> = Vec::with_capacity(cfg.n_layer);
        let mut x = x0;
        for i in 0..self.w.h.len() {
            if checkpointing {
                let (_, out) = self.block_forward(i, x.clone(), false);
                acts.push(Acts { x_in: x, ..Default::default() });
                x = out;
            } else {
                let (a, out) = self.block_forward(i, x, true);
                acts.push(a);
                x = out;
            }
        }

        // ---- top: ln_f(x + e), the head and the loss on the predicting rows
        let z = if cfg.differential { add(&x, &e) } else { x };
        let mut hidden = vec![0f32; n * c];
        layer_norm(&z, self.w.ln_f_w, self.w.ln_f_b, self.eps(), &mut hidden);
        // next-token: every position but a block's last predicts the id after it
        let (rows, labels): (Vec<usize>, Vec<u32>) = match targets {
            Some(tg) => ((0..n).collect(), tg.to_vec()),
            None => (0..n).filter(|r| r % t != t - 1).map(|r| (r, ids[r + 1])).unzip(),
        };
        let mut picked = vec![0f32; rows.len() * c];
        picked
            .par_chunks_mut(c)
            .zip(rows.par_iter())
            .for_each(|(dst, &r)| dst.copy_from_slice(&hidden[r * c..(r + 1) * c]));
        let (loss, saved) =
            head::forward(&picked, self.wte(), c, &labels, true, self.mm).map_err(candle_core::Error::Msg)?;

        // ---- backward
        let mut d_picked = vec![0f32; picked.len()];
        head::backward(saved, &picked, self.wte(), c, &labels, scale, &mut d_picked, &mut g.wte, self.mm);
        drop(picked);
        let mut d_hidden = vec![0f32; n * c];
        for (src, &r) in d_picked.chunks(c).zip(&rows) {
            d_hidden[r * c..(r + 1) * c].copy_from_slice(src);
        }
        let mut dx = vec![0f32; n * c];
        layer_norm_backward(&z, self.w.ln_f_w, &d_hidden, self.eps(), &mut dx, false, &mut g.ln_f_w, &mut g.ln_f_b);
        drop((z, d_hidden));
        let mut finished = |s: Section, g: &mut GradBuffers| {
            if let Some(f) = on_finished.as_mut() {
                f(s, g.take(s))
            }
        };
        finished(Section::FinalNorm, g);
        // with the differential path, d(x_L + e)/de is the same gradient
        let d_e_top = cfg.differential.then(|| dx.clone());
        for (i, a) in acts.iter_mut().enumerate().rev() {
            if checkpointing {
                let (full, _) = self.block_forward(i, std::mem::take(&mut a.x_in), true);
                *a = full;
            }
            dx = self.block_backward(i, a, &dx, &mut g.h[i]);
            *a = Acts::default(); // free this block's activations now
            finished(Section::Block(i), g);
        }

        self.embed_backward(ids, dx, d_e_top, g);
        finished(Section::Embeddings, g);
        Ok(MicroOutcome { loss: loss as f64, diff_norms })
    }

    fn zero_grads(&self) -> GradBuffers {
        let w = self.w;
        GradBuffers {
            wte: vec![0f32; w.wte.len()],
            wpe: w.wpe.map(|p| vec![0f32; p.len()]),
            h: w.h.iter().map(|p| PerBlock(p.0.map(|f| vec![0f32; f.len()]))).collect(),
            ln_f_w: vec![0f32; w.ln_f_w.len()],
            ln_f_b: vec![0f32; w.ln_f_b.len()],
        }
    }
}
