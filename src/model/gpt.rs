//! GPT-2 (pre-LayerNorm) with learned positions or RoPE, and the differential variant.
//!
//! Names and layouts are exactly `transformers.GPT2LMHeadModel`'s (Conv1D weights are
//! `[in, out]`), so a checkpoint loads name for name. Shapes: `B` batch, `T` sequence,
//! `C` = n_embd, `H` heads, `hd` = C / H, `V` vocab.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::GptConfig;
use super::dropout::{maybe_dropout, Dropout};
use super::ops;
use super::rope::RotaryTables;
use crate::engine::cpu::attention::{CausalAttention, Rope};
use crate::engine::{Kernels, Placement};

/// HF's Conv1D: `y = x · W + b` with `W` stored `[in, out]`.
#[derive(Debug, Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    pub fn load(vb: VarBuilder, n_in: usize, n_out: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((n_in, n_out), "weight")?, bias: vb.get(n_out, "bias")? })
    }

    /// `(B, T, in) -> (B, T, out)`. Weights are cast here, not at load time, so a bf16
    /// forward always reads the current f32 master weights.
    pub fn forward(&self, xs: &Tensor, k: Kernels) -> Result<Tensor> {
        let w = self.weight.to_dtype(xs.dtype())?;
        let b = self.bias.to_dtype(xs.dtype())?;
        ops::linear(k, xs, &w, &b) // (B, T, in) -> (B, T, out)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    pub fn forward(&self, xs: &Tensor, k: Kernels) -> Result<Tensor> {
        let w = self.weight.to_dtype(xs.dtype())?;
        let b = self.bias.to_dtype(xs.dtype())?;
        ops::layer_norm(k, xs, &w, &b, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) c_attn: Conv1D,
    pub(super) c_proj: Conv1D,
    pub(super) n_head: usize,
}

impl Attention {
    pub fn load(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_attn: Conv1D::load(vb.pp("c_attn"), c, 3 * c)?,
            c_proj: Conv1D::load(vb.pp("c_proj"), c, c)?,
            n_head: cfg.n_head,
        })
    }

    pub fn forward(&self, xs: &Tensor, ctx: &SeqContext, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let qkv = self.c_attn.forward(xs, ctx.kernels)?; // (B, T, 3C), q | k | v along the last dim
        let dropout_on = dropout.as_ref().is_some_and(|d| d.is_active());
        let ys = if let (false, Kernels::FusedCpu(mm)) = (dropout_on, ctx.kernels) {
            // one op from qkv to merged heads; dropout on the probabilities has no fused kernel,
            // so the cpu-autograd engine composes attention while dropout is on
            let op = CausalAttention::new(self.n_head, ctx.rope_host.clone(), qkv.track_op(), mm);
            qkv.contiguous()?.apply_op1(op)?
        } else {
            self.composed(&qkv, ctx, dropout)?
        };
        self.c_proj.forward(&ys, ctx.kernels)
    }

    /// Attention from composed ops: the path every device and dropout have.
    fn composed(&self, qkv: &Tensor, ctx: &SeqContext, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let (b_sz, seq_len, c3) = qkv.dims3()?;
        let c = c3 / 3;
        let hd = c / self.n_head;
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)?
                .reshape((b_sz, seq_len, self.n_head, hd))?
                .transpose(1, 2)? // (B, H, T, hd)
                .contiguous()
        };
        let (mut q, mut k, v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some(rope) = &ctx.rope {
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        // Scale q before the matmul: touches (B,H,T,hd) instead of (B,H,T,T).
        let q = (q * (1.0 / (hd as f64).sqrt()))?;
        let scores = q.matmul(&k.t()?)?; // (B, H, T, T)
        let probs = ops::causal_softmax(ctx.kernels, &scores, &ctx.mask)?;
        let probs = maybe_dropout(&probs, dropout)?;
        probs
            .matmul(&v)? // (B, H, T, hd)
            .transpose(1, 2)? // (B, T, H, hd)
            .reshape((b_sz, seq_len, c))
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) c_fc: Conv1D,
    pub(super) c_proj: Conv1D,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self { c_fc: Conv1D::load(vb.pp("c_fc"), c, 4 * c)?, c_proj: Conv1D::load(vb.pp("c_proj"), 4 * c, c)? })
    }

    pub fn forward(&self, xs: &Tensor, k: Kernels) -> Result<Tensor> {
        self.c_proj.forward(&ops::gelu(k, &self.c_fc.forward(xs, k)?)?, k)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub(super) ln_1: LayerNorm,
    pub(super) attn: Attention,
    pub(super) ln_2: LayerNorm,
    pub(super) mlp: Mlp,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        let (c, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), c, eps)?,
            attn: Attention::load(vb.pp("attn"), cfg)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), c, eps)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    /// `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, dropout on both residual branches.
    pub fn forward(&self, xs: &Tensor, ctx: &SeqContext, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let k = ctx.kernels;
        let attn = self.attn.forward(&self.ln_1.forward(xs, k)?, ctx, &mut dropout)?;
        let xs = (xs + maybe_dropout(&attn, &mut dropout)?)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&xs, k)?, k)?;
        xs + maybe_dropout(&mlp, &mut dropout)?
    }
}

/// Per-sequence-length constants shared by every block: the causal mask and RoPE tables.
#[derive(Debug, Clone)]
pub struct SeqContext {
    mask: Tensor,
    rope: Option<RotaryTables>,
    /// The same tables as host floats, for the fused attention.
    rope_host: Option<Rope>,
    kernels: Kernels,
}

/// What the embedding stage hands to the blocks.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// Input of the first block `(B, T, C)`: `wte[ids] (+ wpe)`, or `d (+ wpe)` when differential.
    pub xs: Tensor,
    /// The token embedding `e = wte[ids]` `(B, T, C)`, added back after the blocks when differential.
    pub tokens: Option<Tensor>,
    /// `||d_t||_2` over channels `(B, T)`, differential only (detached: diagnostics).
    pub diff_norms: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Gpt {
    pub(super) wte: Tensor,
    pub(super) wpe: Option<Tensor>,
    pub(super) h: Vec<Block>,
    pub(super) ln_f: LayerNorm,
    cfg: GptConfig,
    /// Activation dtype: f32 on CPU; bf16 on CUDA with `dtype: bf16` (weights stay f32).
    dtype: DType,
    /// The kernels behind every op, chosen with the engine.
    kernels: Kernels,
}

pub struct Output {
    /// `(B, T, V)`, f32 (f64 for an f64 model).
    pub logits: Tensor,
    /// After `ln_f`, `(B, T, C)`.
    pub hidden: Tensor,
    pub diff_norms: Option<Tensor>,
}

impl Gpt {
    /// The model from `vb` (names = checkpoint keys), computing as `placement` says: activations
    /// in its dtype (parameters keep theirs), ops on its engine's kernels.
    pub fn load(vb: VarBuilder, cfg: &GptConfig, placement: &Placement) -> Result<Self> {
        let vb_t = vb.pp("transformer");
        let c = cfg.n_embd;
        let h = (0..cfg.n_layer).map(|i| Block::load(vb_t.pp("h").pp(i), cfg)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: vb_t.get((cfg.vocab_size, c), "wte.weight")?,
            wpe: if cfg.rope { None } else { Some(vb_t.get((cfg.n_positions, c), "wpe.weight")?) },
            h,
            ln_f: LayerNorm::load(vb_t.pp("ln_f"), c, cfg.layer_norm_epsilon)?,
            cfg: cfg.clone(),
            dtype: placement.dtype,
            kernels: placement.kernels(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn device(&self) -> &candle_core::Device {
        self.wte.device()
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    pub fn blocks(&self) -> &[Block] {
        &self.h
    }

    pub fn seq_context(&self, seq_len: usize) -> Result<SeqContext> {
        if let Some(limit) = self.cfg.learned_positions().filter(|limit| seq_len > *limit) {
            candle_core::bail!("sequence of {seq_len} tokens is longer than the {limit} learned positions")
        }
        let device = self.wte.device();
        let rope = if self.cfg.rope {
            Some(RotaryTables::new(seq_len, self.cfg.head_dim(), self.cfg.rope_theta, device)?)
        } else {
            None
        };
        let rope_host = match (&rope, self.kernels) {
            (Some(r), Kernels::FusedCpu(_)) => Some(r.host()?),
            _ => None,
        };
        Ok(SeqContext {
            mask: ops::causal_mask(seq_len, device)?.to_dtype(self.dtype)?,
            rope,
            rope_host,
            kernels: self.kernels,
        })
    }

    /// Token ids `(B, T)` -> block input.
    pub fn embed(&self, ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Embedded> {
        let (b_sz, seq_len) = ids.dims2()?;
        let c = self.cfg.n_embd;
        let e = self
            .wte
            .index_select(&ids.flatten_all()?, 0)? // (B*T, C)
            .reshape((b_sz, seq_len, c))?
            .to_dtype(self.dtype)?;
        let (mut xs, tokens, diff_norms) = if self.cfg.differential {
            // d_0 = e_0, d_t = e_t - e_{t-1}
            let d = if seq_len > 1 {
                let delta = (e.narrow(1, 1, seq_len - 1)? - e.narrow(1, 0, seq_len - 1)?)?;
                Tensor::cat(&[&e.narrow(1, 0, 1)?, &delta], 1)?
            } else {
                e.clone()
            };
            let norms = ops::upcast(&d.detach())?.sqr()?.sum(D::Minus1)?.sqrt()?; // (B, T)
            (d, Some(e), Some(norms))
        } else {
            (e, None, None)
        };
        if let Some(wpe) = &self.wpe {
            // narrow, not index_select(arange): its backward is a cheap pad instead of index_add
            let pos = wpe.narrow(0, 0, seq_len)?.to_dtype(self.dtype)?; // (T, C)
            xs = xs.broadcast_add(&pos)?;
        }
        let xs = match dropout {
            Some(d) => d.apply(&xs)?,
            None => xs,
        };
        Ok(Embedded { xs, tokens, diff_norms })
    }

    /// Last block output (+ the token embedding when differential) -> `ln_f` -> `(B, T, C)`.
    pub fn final_hidden(&self, xs: &Tensor, tokens: Option<&Tensor>) -> Result<Tensor> {
        let xs = match tokens {
            Some(e) => (xs + e)?,
            None => xs.clone(),
        };
        self.ln_f.forward(&xs, self.kernels)
    }

    /// Tied head: `hidden (B, T, C) -> logits (B, T, V)`, in f32 at least.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len, c) = hidden.dims3()?;
        let wte = self.wte.to_dtype(hidden.dtype())?;
        let logits = hidden
            .reshape((b_sz * seq_len, c))?
            .matmul(&wte.t()?)? // (B*T, V)
            .reshape((b_sz, seq_len, ()))?;
        ops::upcast(&logits)
    }

    /// Everything but the head: ids `(B, T)` -> hidden after `ln_f` `(B, T, C)`, and the
    /// diff norms. `dropout` is `Some` when training.
    pub fn forward_hidden(&self, ids: &Tensor, mut dropout: Option<&mut Dropout>) -> Result<(Tensor, Option<Tensor>)> {
        let (_, seq_len) = ids.dims2()?;
        let ctx = self.seq_context(seq_len)?;
        let emb = self.embed(ids, dropout.as_deref_mut())?;
        let mut xs = emb.xs;
        for block in &self.h {
            xs = block.forward(&xs, &ctx, dropout.as_deref_mut())?;
        }
        Ok((self.final_hidden(&xs, emb.tokens.as_ref())?, emb.diff_norms))
    }

    /// The whole model: ids `(B, T)` -> logits.
    pub fn forward(&self, ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Output> {
        let (hidden, diff_norms) = self.forward_hidden(ids, dropout)?;
        let logits = self.logits(&hidden)?;
        Ok(Output { logits, hidden, diff_norms })
    }

    /// Mean cross-entropy of `hidden (B, S, C)` through the tied head against `targets (B, S)`,
    /// without materialising all the logits on the CPU.
    pub fn loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len, c) = hidden.dims3()?;
        let hidden = hidden.reshape((b_sz * seq_len, c))?;
        ops::head_cross_entropy(self.kernels, &hidden, &self.wte, &targets.flatten_all()?.to_dtype(DType::U32)?)
    }

    /// Each prediction's loss of a block batch, `(B, T-1)`: position `p` of `hidden` predicting
    /// `ids` at `p + 1` (evaluation only: no backward).
    pub fn token_losses(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len, c) = hidden.dims3()?;
        let preds = hidden.narrow(1, 0, seq_len - 1)?.reshape((b_sz * (seq_len - 1), c))?;
        let targets = ids.narrow(1, 1, seq_len - 1)?.flatten_all()?;
        ops::head_token_losses(self.kernels, &preds, &self.wte, &targets)?.reshape((b_sz, seq_len - 1))
    }

    /// HF's causal-LM loss of a block batch: positions `0..T-1` of `hidden` predict `ids`
    /// at `1..T` (`labels = input_ids`, shifted inside the loss).
    pub fn next_token_loss(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (_, seq_len) = ids.dims2()?;
        self.loss(&hidden.narrow(1, 0, seq_len - 1)?, &ids.narrow(1, 1, seq_len - 1)?)
    }
}

/// Mean next-token loss of a block batch: `logits (B, T, V)` at positions `0..T-1` predict
/// `ids` at `1..T` (HF: `labels = input_ids`, shifted inside the loss), so `B·(T-1)` predictions.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b_sz, seq_len, vocab) = logits.dims3()?;
    let preds = logits.narrow(1, 0, seq_len - 1)?.reshape((b_sz * (seq_len - 1), vocab))?;
    let targets = ids.narrow(1, 1, seq_len - 1)?.flatten_all()?.to_dtype(DType::U32)?;
    ops::cross_entropy(&preds, &targets)
}
