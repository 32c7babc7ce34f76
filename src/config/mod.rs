//! Run configuration: defaults, presets (`presets/*.yaml`), command-line overrides, and the
//! checks that turn them into one resolved, valid `RunConfig`.
//!
//! Precedence, lowest first: built-in defaults, the preset chain (`extends:` first), flags.
//! Presets and flags share one key set (`keys::KEYS`), spelled as the research code spells
//! its flags, so a preset reads like the tutor's command line.

pub mod keys;
pub mod preset;
pub mod reconcile;
pub mod resolve;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{Split, TokenizerSpec};
use crate::model::GptConfig;
use crate::optim::ScheduleKind;

pub use preset::{Preset, PresetLibrary, Seeds, StudySpec, SweepSpec};
pub use reconcile::{reconcile, ReconcileError, Reconciled};
pub use resolve::{resolve, Origin, Overrides, Resolved};

/// A run as asked for: the preset and the flags as given, `(key, raw value)` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunArgs {
    pub preset: Option<String>,
    pub flags: Vec<(String, String)>,
}

impl RunArgs {
    /// Preset chain + flags -> a resolved, validated config (its warnings in `Resolved`).
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let library = PresetLibrary::load();
        let chain = match &self.preset {
            Some(p) => library.chain(p)?,
            None => vec![],
        };
        let flags: Overrides = self
            .flags
            .iter()
            .map(|(k, v)| Ok((k.clone(), keys::parse_flag_value(k, v)?)))
            .collect::<Result<_, ConfigError>>()?;
        resolve(&chain, &flags)
    }

    /// The arguments that resume the run in `dir` from its newest checkpoint: every setting
    /// then comes from the checkpoint (`train::checkpoint::reconcile_resume`).
    pub fn resuming(dir: &std::path::Path) -> Self {
        let flags = vec![
            ("output_dir".to_string(), dir.display().to_string()),
            ("resume_from_checkpoint".to_string(), "latest".to_string()),
        ];
        Self { preset: None, flags }
    }
}

/// Everything a run needs, resolved: no key is missing. Field names are the keys of `KEYS`
/// (a test holds the two together); `from_map` reads a saved one.
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
    pub lr_scheduler_type: ScheduleKind,
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
    pub tokenizer: TokenizerSpec,
    pub device: DeviceSpec,
    pub dtype: Precision,
    pub grad_reduce_dtype: Precision,
    pub grad_reduce_overlap: bool,
    pub ddp_bucket_cap_mb: usize,
    pub resume_from_checkpoint: Option<String>,
    pub adam_beta1: f64,
    pub adam_epsilon: f64,
    pub rope_theta: f64,
    pub eval_max_blocks: Option<u64>,
    pub overwrite_output_dir: bool,
    pub run_name: Option<String>,
    pub eval_split: Split,
    pub eval_on_start: bool,
    pub sample_prompt: Option<String>,
    pub context_lengths: String,
    pub early_stopping_patience: Option<u64>,
    pub early_stopping_threshold: f64,
}

impl Default for RunConfig {
    /// The key table's defaults (`keys::KEYS`), the one place they are written.
    fn default() -> Self {
        RunConfig::from_map(keys::defaults())
            .unwrap_or_else(|e| panic!("the key table's defaults do not make a RunConfig: {e}"))
    }
}

impl RunConfig {
    /// Settings as JSON (a saved `difflab_config.json`, or a merge): keys it lacks (a file of an
    /// older version) take the table's defaults, keys the table does not know are refused.
    pub fn from_map(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, serde_json::Error> {
        let mut all = keys::defaults();
        all.extend(map);
        serde_json::from_value(serde_json::Value::Object(all))
    }

    /// The settings as the JSON object they are saved as.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }

    /// The tokenizer with `auto` resolved against the dataset.
    pub fn tokenizer_spec(&self) -> TokenizerSpec {
        self.tokenizer.resolved(&self.dataset)
    }

    /// The model this run trains, for a tokenizer of `vocab_size` ids. Every caller that
    /// builds a model from a run's settings (train, lr-find, bench, the picker) comes here.
    pub fn model_config(&self, vocab_size: usize) -> GptConfig {
        GptConfig {
            vocab_size,
            n_positions: self.block_size,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            layer_norm_epsilon: 1e-5,
            rope: self.rope,
            rope_theta: self.rope_theta,
            differential: self.research,
            dropout: self.dropout as f32,
        }
    }

    /// Optimizer steps of the run: `max_steps`, else an estimate from the training tokens where
    /// they are known before the data is (WikiText with the GPT-2 tokenizer). `(steps, exact)`.
    pub fn estimated_steps(&self) -> Option<(u64, bool)> {
        if let Some(n) = self.max_steps {
            return Some((n, true));
        }
        let tokens = match (self.dataset.as_str(), self.tokenizer_spec()) {
            ("wikitext", TokenizerSpec::Gpt2) => crate::data::wikitext::gpt2_train_tokens(&self.dataset_config)?,
            _ => return None,
        };
        let blocks = (tokens as f64 * self.subset_ratio / self.block_size as f64).floor();
        let per_epoch = (blocks / self.batch_size as f64).floor();
        Some(((per_epoch * self.num_train_epochs).ceil() as u64, false))
    }

    /// The run's own folder: `output_dir/run_name` with a run name; with none and an
    /// `output_dir` ending in `/` (a folder of runs, as HF Trainer's `runs/<date>_<host>` and W&B
    /// name runs), `output_dir/<UTC date-time>_<label>`, so two runs never share a folder.
    /// Called once, where a run starts (`stamp`: `events::utc_stamp` of now).
    pub fn named(mut self, stamp: &str, label: &str) -> RunConfig {
        let name = match &self.run_name {
            Some(name) => Some(name.clone()),
            None if self.output_dir.ends_with('/') => {
                // "differential + RoPE" -> "differential-RoPE"
                let words: Vec<&str> = label
                    .split(|c: char| !(c.is_ascii_alphanumeric() || "_.".contains(c)))
                    .filter(|w| !w.is_empty())
                    .collect();
                Some(format!("{stamp}_{}", words.join("-")))
            }
            None => None,
        };
        if let Some(name) = name {
            self.output_dir = std::path::Path::new(&self.output_dir).join(name).display().to_string();
            self.run_name = None;
        }
        self
    }

    /// The data by name: "wikitext wikitext-103-v1", "builtin", or the path.
    pub fn data_name(&self) -> String {
        match self.dataset.as_str() {
            "wikitext" => format!("wikitext {}", self.dataset_config),
            other => other.to_string(),
        }
    }

    /// What an evaluation of this run scores, for every table that shows eval figures:
    /// "builtin, tokenizer bpe:2048, validation split (the first 64 blocks of 128 tokens)".
    pub fn evaluated_on(&self) -> String {
        let blocks = self.eval_max_blocks.map_or("all".to_string(), |n| format!("the first {n}"));
        format!(
            "{}, tokenizer {}, {} split ({blocks} blocks of {} tokens)",
            self.data_name(),
            self.tokenizer_spec(),
            self.eval_split.name(),
            self.block_size
        )
    }

    pub fn accumulation_steps(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }

    /// `context_lengths` as numbers (validated when resolved: whole numbers >= 2, each once).
    pub fn context_length_list(&self) -> Vec<usize> {
        parse_lengths(&self.context_lengths).unwrap_or_default()
    }

    /// Blocks per evaluation batch: see `eval_batch_size`.
    pub fn eval_batch_size(&self) -> usize {
        eval_batch_size(self.micro_batch_size, self.block_size)
    }
}

/// `128,256,512` -> the lengths, or what is wrong with the list ("" is none).
pub fn parse_lengths(list: &str) -> Result<Vec<usize>, String> {
    let mut out: Vec<usize> = vec![];
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: usize = part.parse().map_err(|_| format!("{part:?} is not a whole number"))?;
        if n < 2 {
            return Err(format!("{n} is too short: a window needs 2 tokens (an input and its next token)"));
        }
        if out.contains(&n) {
            return Err(format!("{n} is given twice"));
        }
        out.push(n);
    }
    Ok(out)
}

/// Tokens an evaluation batch grows to: the forward keeps no activations, and each batch
/// reads (and packs) the whole tied head once, so small batches spend their time there.
pub const EVAL_BATCH_TOKENS: usize = 2048;

/// Windows per batch of an evaluation at another length than the training one: as many as
/// make `EVAL_BATCH_TOKENS` tokens, at least one (the attention of a long window is the cost).
pub fn window_batch(length: usize) -> usize {
    (EVAL_BATCH_TOKENS / length.max(1)).max(1)
}

/// Blocks per evaluation batch: whole multiples of the training micro-batch up to
/// `EVAL_BATCH_TOKENS` tokens (at least one micro-batch). The loss is the same sum over blocks
/// whatever the batch.
pub fn eval_batch_size(micro_batch_size: usize, block_size: usize) -> usize {
    let micro = micro_batch_size.max(1);
    micro * (EVAL_BATCH_TOKENS / (micro * block_size.max(1))).max(1)
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
    #[error(
        "{path}: sets no run settings and extends no preset; a preset needs at least one key (e.g. `extends: demo`)"
    )]
    EmptyPreset { path: String },
    #[error("{path}: `extends: {name}` names no preset; available: {available} (or a path to a .yaml file)")]
    ExtendsMissing { path: String, name: String, available: String },
    #[error("{path}: `extends` forms a cycle: {chain}")]
    ExtendsCycle { path: String, chain: String },
    #[error(
        "{origin}: `sweep` must map one key (or two, for a grid) to a list of values, e.g. `sweep: {{learning_rate: [1e-3, 3e-4]}}`"
    )]
    BadSweep { origin: String },
    #[error("{}", .0.join("\n"))]
    Several(Vec<String>),
    #[error("{origin}: `study`: {problem}; e.g. `study: {{seeds: 3, arms: [{{name: baseline, research: false}}, {{name: differential, research: true}}]}}`")]
    BadStudy { origin: String, problem: String },
}

/// Where a run computes: `auto | cpu | cuda | cuda:N`, the same string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA 0 when this build has CUDA and a GPU answers, else the CPU.
    Auto,
    Cpu,
    /// `cuda` (`None`: device 0) or `cuda:N`.
    Cuda(Option<usize>),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceSpec::Cuda(Some(n)))
                .ok_or_else(|| "unknown device".to_string()),
        }
    }
}

/// The compute dtype: `f32`, or `bf16` (CUDA; f32 master weights and optimizer state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Precision {
    F32,
    Bf16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err("unknown dtype".into()),
        }
    }
}

/// String forms for serde: the same JSON as before the types existed.
macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    )*};
}
serde_as_string!(DeviceSpec, Precision);

/// Full runs a resolved preset makes: a sweep's trials, a study's arms x seeds, or one.
pub fn runs_of(r: &Resolved) -> usize {
    if let Some(sweep) = &r.sweep {
        return sweep.trials().len();
    }
    match &r.study {
        Some(study) => {
            study.arms.len()
                * match &study.seeds {
                    Seeds::Count(n) => *n as usize,
                    Seeds::List(l) => l.len(),
                }
        }
        None => 1,
    }
}

/// Evaluations of a run of `steps` steps: every `eval_steps` before the end, one at the end,
/// and one at step 0 with `eval_on_start`.
pub fn evaluations(c: &RunConfig, steps: u64) -> u64 {
    steps.saturating_sub(1) / c.eval_steps.max(1) + 1 + u64::from(c.eval_on_start)
}

/// A resolved preset in words: the run it makes, and for a procedure the trials or arms it
/// expands to. `difflab presets NAME` prints it; the picker shows its procedure line.
/// The model each of a study's arms trains (an arm may set `research` or `rope`).
fn arm_variants(r: &Resolved) -> Vec<String> {
    let Some(study) = &r.study else { return vec![] };
    study
        .arms
        .iter()
        .map(|(_, values)| {
            let mut arm = r.config.clone();
            if let Some(b) = values.get("research").and_then(Value::as_bool) {
                arm.research = b;
            }
            if let Some(b) = values.get("rope").and_then(Value::as_bool) {
                arm.rope = b;
            }
            arm.model_config(0).variant_name()
        })
        .collect()
}

/// Each arm's model, for a study whose arms train different variants.
pub fn variants_by_arm(r: &Resolved) -> Option<String> {
    let variants = arm_variants(r);
    let study = r.study.as_ref()?;
    let distinct: std::collections::BTreeSet<&String> = variants.iter().collect();
    (distinct.len() > 1).then(|| {
        study.arms.iter().zip(&variants).map(|((label, _), v)| format!("{label}: {v}")).collect::<Vec<_>>().join(" | ")
    })
}

pub fn describe(r: &Resolved) -> Vec<String> {
    let c = &r.config;
    let steps = |c: &RunConfig| match c.estimated_steps() {
        Some((n, true)) => format!("{n} steps"),
        Some((n, false)) => format!("~{n} steps ({} epochs)", c.num_train_epochs),
        None => format!("{} epochs (steps known once the data is)", c.num_train_epochs),
    };
    let evals = |c: &RunConfig| match c.estimated_steps() {
        Some((n, _)) => {
            let saves = if c.save_steps == 0 {
                "a checkpoint at the end".to_string()
            } else {
                format!("a checkpoint every {} steps", c.save_steps)
            };
            format!(", {} evaluations, {saves}", evaluations(c, n))
        }
        None => String::new(),
    };
    let data = format!("{} (subset {}), eval on {}", c.data_name(), c.subset_ratio, c.eval_split.name());
    let variant = match variants_by_arm(r) {
        Some(_) => "variant by arm (below)".to_string(),
        None => c.model_config(0).variant_name(),
    };
    let mut out = vec![
        format!("model      {} layers x {} wide, {} heads, {variant}", c.n_layer, c.n_embd, c.n_head),
        format!("data       {data}, tokenizer {}", c.tokenizer_spec()),
        format!(
            "batch      {} x block {} ({} x {} micro)",
            c.batch_size,
            c.block_size,
            c.accumulation_steps(),
            c.micro_batch_size
        ),
        format!(
            "optimizer  AdamW lr {:e}, {} schedule, warmup {} steps / ratio {}, weight decay {}, clip {}",
            c.learning_rate, c.lr_scheduler_type, c.warmup_steps, c.warmup_ratio, c.weight_decay, c.max_grad_norm
        ),
        format!("length     {}{}", steps(c), evals(c)),
        format!("output     {}", c.output_dir),
    ];
    if let Some(sweep) = &r.sweep {
        let trials = sweep.trials();
        let axes: Vec<String> = sweep
            .axes
            .iter()
            .map(|(k, vs)| format!("{k} in [{}]", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")))
            .collect();
        out.push(format!("sweep      {} = {} trials x {}", axes.join(" x "), trials.len(), steps(c)));
        for t in trials {
            out.push(format!(
                "  trial    {}",
                t.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    if let Some(study) = &r.study {
        let seeds = match &study.seeds {
            Seeds::Count(n) => format!("{n} seeds ({}..={})", c.seed, c.seed + n - 1),
            Seeds::List(l) => format!("seeds {l:?}"),
        };
        let n = match &study.seeds {
            Seeds::Count(n) => *n as usize,
            Seeds::List(l) => l.len(),
        };
        out.push(format!(
            "study      {} arms x {seeds} = {} runs x {}",
            study.arms.len(),
            study.arms.len() * n,
            steps(c)
        ));
        for ((label, values), variant) in study.arms.iter().zip(arm_variants(r)) {
            let v: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push(format!("  arm      {label}: {}, training {variant}", v.join(", ")));
        }
    }
    out
}
