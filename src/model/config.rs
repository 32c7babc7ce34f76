//! The model's shape, and the Hugging Face `config.json` that carries it.
//!
//! `GptConfig` is the runtime config (no options, everything resolved). `HfConfig` is the file
//! schema: `transformers.GPT2Config` keys plus `rope`, `rope_theta` and `differential`, so a plain
//! baseline opens in `GPT2LMHeadModel.from_pretrained` and the other variants say what they are.

use serde::{Deserialize, Serialize};

/// `model_type` of a plain GPT-2 baseline (learned positions, no differential embedding).
pub const GPT2_MODEL_TYPE: &str = "gpt2";
/// `model_type` of every other variant: transformers must not load them as GPT-2, which would
/// silently drop RoPE or the differential path and give wrong logits.
pub const DIFFLAB_MODEL_TYPE: &str = "difflab";
pub const DIFFLAB_ARCHITECTURE: &str = "DifflabForCausalLM";
pub const GPT2_ARCHITECTURE: &str = "GPT2LMHeadModel";

#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Longest sequence the model takes (`wpe` rows when `rope` is false).
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
    /// Rotary position embedding on q and k instead of learned `wpe`.
    pub rope: bool,
    pub rope_theta: f64,
    /// Differential input embeddings (the research variant, `--research true`).
    pub differential: bool,
    /// Dropout on embeddings, attention probabilities and both residual branches.
    pub dropout: f32,
}

impl GptConfig {
    /// The variant in words, as logs, headers and the picker name it.
    pub fn variant_name(&self) -> String {
        let pos = if self.rope { "RoPE" } else { "learned positions" };
        if self.differential {
            format!("differential + {pos}")
        } else {
            format!("baseline ({pos})")
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The longest sequence the model can read, when it has a limit: learned positions (`wpe`,
    /// `rope: false`, the differential variant included) have a row for each of `n_positions`
    /// and none beyond. RoPE models have no limit (their rotary tables are made for any length).
    pub fn learned_positions(&self) -> Option<usize> {
        (!self.rope).then_some(self.n_positions)
    }

    /// A plain GPT-2 is the only variant that may call itself `gpt2`.
    pub fn is_plain_gpt2(&self) -> bool {
        !self.rope && !self.differential
    }

    /// Parameter count (the tied head is counted once).
    pub fn num_parameters(&self) -> usize {
        let c = self.n_embd;
        let per_block = 2 * 2 * c // ln_1, ln_2
            + c * 3 * c + 3 * c // c_attn
            + c * c + c // attn.c_proj
            + c * 4 * c + 4 * c // c_fc
            + 4 * c * c + c; // mlp.c_proj
        let wpe = if self.rope { 0 } else { self.n_positions * c };
        self.vocab_size * c + wpe + self.n_layer * per_block + 2 * c
    }

    /// Bytes a training step needs, estimated before anything is allocated: f32 weights,
    /// gradients and two AdamW moments (16 bytes a parameter), the activations one micro-batch
    /// of `b` blocks of `t` tokens keeps for its backward (per layer and token: 16 widths of
    /// f32 plus a row of attention probabilities per head; only each block's input with
    /// gradient checkpointing, plus one block's worth), and the head's logits for the batch.
    pub fn training_bytes(&self, b: usize, t: usize, checkpointing: bool) -> u64 {
        let (c, h, l) = (self.n_embd as u64, self.n_head as u64, self.n_layer as u64);
        let tokens = (b * t) as u64;
        let per_layer = tokens * (16 * c + h * t as u64) * 4;
        let activations = if checkpointing { l * tokens * c * 4 + per_layer } else { l * per_layer };
        let logits = tokens * self.vocab_size as u64 * 4;
        16 * self.num_parameters() as u64 + activations + logits
    }

    /// Bytes of the bf16 panels the CPU's bf16 step packs its matmul weights into once per
    /// step (`cpu_step::PackedWeights`): two bf16 copies of `wte` and of each block's four
    /// matmul weights (`12 C^2`).
    pub fn bf16_panel_bytes(&self) -> u64 {
        let c = self.n_embd as u64;
        4 * (self.vocab_size as u64 * c + self.n_layer as u64 * 12 * c * c)
    }

    /// Bytes an evaluation needs at `t` tokens a sequence in batches of `b` (no graph): the
    /// weights, one layer's working set (a few widths of f32 and the attention probabilities
    /// per head), and a vocabulary block of logits per row.
    pub fn eval_bytes(&self, b: usize, t: usize) -> u64 {
        let (c, h) = (self.n_embd as u64, self.n_head as u64);
        let tokens = (b * t) as u64;
        let layer = tokens * (16 * c + h * t as u64) * 4;
        let logits = tokens * (self.vocab_size.min(2048) as u64) * 4;
        4 * self.num_parameters() as u64 + layer + logits
    }

    /// Model FLOPs per trained token, forward and backward: nanoGPT's `estimate_mfu` (PaLM
    /// appendix B) count, `6 N + 12 L C T`, with the causal half of attention not subtracted.
    pub fn flops_per_token(&self, block_size: usize) -> f64 {
        let n = self.num_parameters() as f64;
        let (l, c, t) = (self.n_layer as f64, self.n_embd as f64, block_size as f64);
        6.0 * n + 12.0 * l * c * t
    }
}

/// `config.json` as transformers writes it for `GPT2Config`, plus this project's keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_ctx: Option<usize>,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub resid_pdrop: f32,
    #[serde(default)]
    pub embd_pdrop: f32,
    #[serde(default)]
    pub attn_pdrop: f32,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_cache: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default = "default_torch_dtype")]
    pub torch_dtype: String,
    /// difflab: rotary position embedding instead of `wpe`. Absent in HF GPT-2 files (= false).
    #[serde(default)]
    pub rope: bool,
    /// difflab: RoPE base (GPT-NeoX / Llama convention).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// difflab: differential input embeddings (blocks see e_t - e_{t-1}; e is added back on top).
    #[serde(default)]
    pub differential: bool,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}
fn default_torch_dtype() -> String {
    "float32".into()
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn yes() -> bool {
    true
}

impl HfConfig {
    pub fn from_model(cfg: &GptConfig, eos_token_id: Option<u32>) -> Self {
        let (model_type, arch) = if cfg.is_plain_gpt2() {
            (GPT2_MODEL_TYPE, GPT2_ARCHITECTURE)
        } else {
            (DIFFLAB_MODEL_TYPE, DIFFLAB_ARCHITECTURE)
        };
        Self {
            architectures: vec![arch.into()],
            model_type: model_type.into(),
            vocab_size: cfg.vocab_size,
            n_positions: cfg.n_positions,
            n_ctx: Some(cfg.n_positions),
            n_embd: cfg.n_embd,
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: cfg.layer_norm_epsilon,
            resid_pdrop: cfg.dropout,
            embd_pdrop: cfg.dropout,
            attn_pdrop: cfg.dropout,
            initializer_range: default_init_range(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            use_cache: false,
            bos_token_id: eos_token_id,
            eos_token_id,
            torch_dtype: default_torch_dtype(),
            rope: cfg.rope,
            rope_theta: cfg.rope_theta,
            differential: cfg.differential,
        }
    }

    /// The runtime config, refusing what this model does not implement.
    pub fn to_model(&self) -> Result<GptConfig, String> {
        if self.activation_function != "gelu_new" && self.activation_function != "gelu_pytorch_tanh" {
            return Err(format!("activation_function {:?} is not supported (only gelu_new)", self.activation_function));
        }
        if self.n_inner.is_some_and(|n| n != 4 * self.n_embd) {
            return Err(format!("n_inner {:?} is not supported (only 4 * n_embd)", self.n_inner));
        }
        if !self.tie_word_embeddings {
            return Err("tie_word_embeddings false is not supported".into());
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        Ok(GptConfig {
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            layer_norm_epsilon: self.layer_norm_epsilon,
            rope: self.rope,
            rope_theta: self.rope_theta,
            differential: self.differential,
            dropout: self.resid_pdrop,
        })
    }
}
