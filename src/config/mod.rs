//! Run configuration: defaults, presets (`presets/*.yaml`), command-line overrides, and the
//! checks that turn them into one resolved, valid `RunConfig`.
//!
//! Precedence, lowest first: built-in defaults, the preset chain (`extends:` first), flags.
//! Presets and flags share one key set (`keys::KEYS`), spelled as the research code spells
//! its flags, so a preset reads like the tutor's command line.

pub mod keys;
pub mod preset;
pub mod resolve;

use serde::{Deserialize, Serialize};

pub use preset::{Preset, PresetLibrary};
pub use resolve::{resolve, Overrides, Resolved, Source};

/// Everything a run needs, resolved: no key is missing. Field names are the keys of `KEYS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub dataset: String,
    pub dataset_config: String,
    pub output_dir: String,
    pub rope: bool,
    pub research: bool,
    pub eval_only: bool,
    pub checkpoint: Option<String>,
    pub log_tensorboard: bool,
    pub log_figures: bool,
    pub subset_ratio: f64,
    pub num_train_epochs: f64,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    pub warmup_steps: u64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta2: f64,
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub max_steps: Option<u64>,
    pub eval_steps: u64,
    pub save_steps: u64,
    pub save_total_limit: Option<u64>,
    pub logging_steps: u64,
    pub seed: u64,
    pub dropout: f64,
    pub tokenizer: String,
    pub device: String,
    pub dtype: String,
    pub resume_from_checkpoint: Option<String>,
    pub adam_beta1: f64,
    pub adam_epsilon: f64,
    pub rope_theta: f64,
    pub eval_max_blocks: Option<u64>,
}

impl Default for RunConfig {
    /// The research code's defaults where its README implies them (RoPE on, baseline,
    /// TensorBoard and figures on, a training subset), HF Trainer's elsewhere (AdamW betas
    /// 0.9/0.999, eps 1e-8). The model defaults to GPT-2 small's shape. The dataset defaults
    /// to the offline built-in corpus so a bare run never needs the network.
    fn default() -> Self {
        Self {
            dataset: "builtin".into(),
            dataset_config: "wikitext-103-v1".into(),
            output_dir: "outputs/run".into(),
            rope: true,
            research: false,
            eval_only: false,
            checkpoint: None,
            log_tensorboard: true,
            log_figures: true,
            subset_ratio: 1.0,
            num_train_epochs: 1.0,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
            batch_size: 64,
            micro_batch_size: 4,
            learning_rate: 1e-4,
            lr_scheduler_type: "cosine".into(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta2: 0.999,
            max_grad_norm: 1.0,
            gradient_checkpointing: false,
            max_steps: None,
            eval_steps: 500,
            save_steps: 500,
            save_total_limit: Some(3),
            logging_steps: 10,
            seed: 42,
            dropout: 0.0,
            tokenizer: "auto".into(),
            device: "auto".into(),
            dtype: "f32".into(),
            resume_from_checkpoint: None,
            adam_beta1: 0.9,
            adam_epsilon: 1e-8,
            rope_theta: 10_000.0,
            eval_max_blocks: None,
        }
    }
}

impl RunConfig {
    /// The tokenizer spec with `auto` resolved.
    pub fn tokenizer_spec(&self) -> String {
        if self.tokenizer != "auto" {
            self.tokenizer.clone()
        } else if self.dataset == "wikitext" {
            "gpt2".into()
        } else {
            "bpe:8192".into()
        }
    }

    pub fn accumulation_steps(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: unknown key `{key}`; did you mean `{nearest}`? (`difflab train --help` lists every key)")]
    UnknownKey { origin: String, key: String, nearest: String },
    #[error("{origin}: key `{key}` must be {expected}, got {got}")]
    WrongType { origin: String, key: String, expected: String, got: String },
    #[error("{origin}: {key} = {value}: {problem}; fix: {fix}")]
    Invalid { origin: String, key: String, value: String, problem: String, fix: String },
    #[error("preset `{name}` not found; available: {available} (or give a path to a .yaml file)")]
    UnknownPreset { name: String, available: String },
    #[error("cannot read preset {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: not valid YAML ({reason}); a preset is a flat `key: value` mapping")]
    Yaml { path: String, reason: String },
    #[error("{path}: `extends` forms a cycle: {chain}")]
    ExtendsCycle { path: String, chain: String },
    #[error("{origin}: `sweep` must map exactly one key to a list of values, e.g. `sweep: {{learning_rate: [1e-3, 3e-4]}}`")]
    BadSweep { origin: String },
}
