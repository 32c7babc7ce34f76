//! Merging defaults, presets and flags into one `RunConfig`, and checking it.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::keys::{canonical_key, check_value};
use super::preset::{Preset, StudySpec, SweepSpec};
use super::{ConfigError, DeviceSpec, Precision, RunConfig};
use crate::data::{Split, TokenizerSpec};
use crate::optim::ScheduleKind;

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Default,
    Preset(String),
    CommandLine,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::Preset(origin) => f.write_str(origin),
            Origin::CommandLine => f.write_str("command line"),
        }
    }
}

/// Settings from the command line, already typed: `(key, value)` in the order given.
pub type Overrides = Vec<(String, Value)>;

#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: RunConfig,
    /// Which source set each key that is not a default.
    pub origins: BTreeMap<String, Origin>,
    /// One line each: accepted misspellings and the like.
    pub warnings: Vec<String>,
    /// The preset's name, if one was used.
    pub preset: Option<String>,
    /// The preset's `sweep:` (one key and its values, or a grid of two), if any.
    pub sweep: Option<SweepSpec>,
    /// The preset's `study:` (arms and seeds), if any.
    pub study: Option<StudySpec>,
}

/// Maps an accepted misspelling to its key, with a warning.
pub fn resolve(chain: &[Preset], flags: &Overrides) -> Result<Resolved, ConfigError> {
    let mut merged: Map<String, Value> = super::keys::defaults();
    let mut origins = BTreeMap::new();
    let mut warnings = vec![];
    for preset in chain {
        warnings.extend(preset.warnings.iter().cloned());
        for (key, value) in &preset.values {
            merged.insert(key.clone(), value.clone());
            origins.insert(key.clone(), Origin::Preset(preset.origin.clone()));
        }
    }
    for (key, value) in flags {
        let key = canonical_key(key, "command line", &mut warnings);
        merged.insert(key.clone(), check_value("command line", &key, value)?);
        origins.insert(key, Origin::CommandLine);
    }
    let origin_of = |key: &str| origins.get(key).cloned().unwrap_or(Origin::Default).to_string();

    // the research code trains on "WikiText-103 (subset by default)": a tenth of the training
    // rows unless subset_ratio is set (presets set it; all of it is --subset_ratio 1.0)
    if merged.get("dataset").and_then(Value::as_str) == Some("wikitext") && !origins.contains_key("subset_ratio") {
        merged.insert("subset_ratio".into(), Value::from(WIKITEXT_DEFAULT_SUBSET));
        warnings.push(format!(
            "note: wikitext without subset_ratio trains on the first {}% of the training rows (subset_ratio {WIKITEXT_DEFAULT_SUBSET}); --subset_ratio 1.0 for all of them",
            WIKITEXT_DEFAULT_SUBSET * 100.0
        ));
    }
    if merged.get("lr_scheduler_type").and_then(Value::as_str) == Some("consine") {
        warnings.push(format!(
            "warning: {}: lr_scheduler_type `consine` is read as `cosine` (the tutor's spelling)",
            origin_of("lr_scheduler_type")
        ));
        merged.insert("lr_scheduler_type".into(), Value::String("cosine".into()));
    }
    // the typed keys, parsed here so a bad value is refused naming its key, origin and fix
    for (key, fix) in TYPED_KEYS {
        if let Some(Value::String(v)) = merged.get(*key) {
            if let Err(problem) = parse_typed(key, v) {
                return Err(invalid(origin_of(key), key, v, problem, *fix));
            }
        }
    }
    let config: RunConfig = serde_json::from_value(Value::Object(merged)).map_err(|e| ConfigError::WrongType {
        origin: "configuration".into(),
        key: "?".into(),
        expected: "valid settings".into(),
        got: e.to_string(),
    })?;
    validate(&config, &origin_of)?;
    if let Some(max) = config.max_steps.filter(|m| config.warmup_steps > *m) {
        if config.lr_scheduler_type.to_string() != "constant" {
            // linear warmup: the last step's LR is max / warmup of the peak
            warnings.push(format!(
                "warning: warmup_steps {} ({}) is more than max_steps {max} ({}): the learning rate never reaches its set value (it ends warmup-bound at {:.0}% of it); lower warmup_steps or raise max_steps",
                config.warmup_steps,
                origin_of("warmup_steps"),
                origin_of("max_steps"),
                100.0 * max as f64 / config.warmup_steps as f64
            ));
        }
    }
    let sweep = chain.iter().rev().find_map(|p| p.sweep.clone());
    let study = chain.iter().rev().find_map(|p| p.study.clone());
    Ok(Resolved { config, origins, warnings, preset: chain.last().map(|p| p.name.clone()), sweep, study })
}

/// WikiText's default `subset_ratio` (other datasets default to all of it): a tenth of
/// WikiText-103 is 11.8M GPT-2 tokens, a run a CPU can finish in a day at the sanity shape.
pub const WIKITEXT_DEFAULT_SUBSET: f64 = 0.1;

/// Keys whose strings parse into types, with the fix to offer for a bad one.
const TYPED_KEYS: &[(&str, &str)] = &[
    ("lr_scheduler_type", "use cosine, linear, constant or constant_with_warmup"),
    ("device", "use auto, cpu, cuda or cuda:N"),
    ("dtype", "use f32, or bf16 on CUDA"),
    ("grad_reduce_dtype", "use f32, or bf16 (processes over MPI)"),
    ("tokenizer", "use gpt2, byte, bpe:N (e.g. bpe:8192) or a tokenizer.json path"),
    ("eval_split", "use validation, or test"),
];

fn parse_typed(key: &str, v: &str) -> Result<(), String> {
    match key {
        "lr_scheduler_type" => v.parse::<ScheduleKind>().map(drop),
        "device" => v.parse::<DeviceSpec>().map(drop),
        "dtype" | "grad_reduce_dtype" => v.parse::<Precision>().map(drop),
        // training text is not an evaluation split: its loss is the train loss
        "eval_split" => match v.parse::<Split>()? {
            Split::Train => Err("evaluations run on held-out text".into()),
            _ => Ok(()),
        },
        _ => v.parse::<TokenizerSpec>().map(drop),
    }
}

fn invalid(
    origin: String,
    key: &str,
    value: impl ToString,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid { origin, key: key.into(), value: value.to_string(), problem: problem.into(), fix: fix.into() }
}

/// The invariants a run relies on, each refused with the key, its origin and a fix.
pub fn validate(c: &RunConfig, origin_of: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    validate_shape(c, origin_of)?;
    validate_ranges(c, origin_of)?;
    validate_the_rest(c, origin_of)
}

/// Sizes that must be whole and positive, and divide as the model and batch need.
fn validate_shape(c: &RunConfig, origin_of: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let at_least_one = [
        ("n_layer", c.n_layer),
        ("n_head", c.n_head),
        ("n_embd", c.n_embd),
        ("batch_size", c.batch_size),
        ("micro_batch_size", c.micro_batch_size),
        ("eval_steps", c.eval_steps as usize),
        ("logging_steps", c.logging_steps as usize),
        ("ddp_bucket_cap_mb", c.ddp_bucket_cap_mb),
    ];
    for (key, v) in at_least_one {
        if v == 0 {
            return Err(invalid(origin_of(key), key, v, "must be at least 1", format!("set {key} to 1 or more")));
        }
    }
    if c.block_size < 2 {
        return Err(invalid(
            origin_of("block_size"),
            "block_size",
            c.block_size,
            "a block needs at least 2 tokens (input and next-token label)",
            "set block_size to 2 or more",
        ));
    }
    // a rule between two keys blames the one the command line gave, if one of them it was
    let from_flags = |key: &str| origin_of(key) == Origin::CommandLine.to_string();
    if !c.batch_size.is_multiple_of(c.micro_batch_size) {
        if from_flags("micro_batch_size") && !from_flags("batch_size") {
            let fits = (1..=c.micro_batch_size).rev().find(|m| c.batch_size.is_multiple_of(*m)).unwrap_or(1);
            return Err(invalid(
                origin_of("micro_batch_size"),
                "micro_batch_size",
                c.micro_batch_size,
                format!("does not divide batch_size {} ({})", c.batch_size, origin_of("batch_size")),
                format!("use a micro_batch_size that divides {}, e.g. {fits}", c.batch_size),
            ));
        }
        let lower = c.batch_size / c.micro_batch_size * c.micro_batch_size;
        return Err(invalid(
            origin_of("batch_size"),
            "batch_size",
            c.batch_size,
            format!("not divisible by micro_batch_size {}", c.micro_batch_size),
            format!("use a multiple of micro_batch_size, e.g. batch_size {}", lower.max(c.micro_batch_size)),
        ));
    }
    let head_key = if from_flags("n_head") && !from_flags("n_embd") { "n_head" } else { "n_embd" };
    let (value, other) = match head_key {
        "n_head" => (c.n_head, format!("n_embd {} ({})", c.n_embd, origin_of("n_embd"))),
        _ => (c.n_embd, format!("n_head {}", c.n_head)),
    };
    if !c.n_embd.is_multiple_of(c.n_head) {
        let problem = match head_key {
            "n_head" => format!("does not divide {other}"),
            _ => format!("not divisible by {other}"),
        };
        let fix = match head_key {
            "n_head" => {
                let fits = (1..=c.n_head).rev().find(|h| c.n_embd.is_multiple_of(*h)).unwrap_or(1);
                format!("choose an n_head that divides n_embd {}, e.g. {fits}", c.n_embd)
            }
            _ => "choose n_embd a multiple of n_head (head size = n_embd / n_head)".to_string(),
        };
        return Err(invalid(origin_of(head_key), head_key, value, problem, fix));
    }
    if c.rope && !(c.n_embd / c.n_head).is_multiple_of(2) {
        return Err(invalid(
            origin_of(head_key),
            head_key,
            value,
            format!("RoPE needs an even head size, and n_embd / n_head = {} is odd", c.n_embd / c.n_head),
            "change n_embd or n_head so the head size is even, or set rope false",
        ));
    }
    Ok(())
}

/// Fractions in their unit interval, rates and scales above 0.
fn validate_ranges(c: &RunConfig, origin_of: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let unit = |key: &str, v: f64, lo_open: bool| -> Result<(), ConfigError> {
        let ok = if lo_open { v > 0.0 && v <= 1.0 } else { (0.0..1.0).contains(&v) };
        if ok {
            Ok(())
        } else {
            let range = if lo_open { "in (0, 1]" } else { "in [0, 1)" };
            Err(invalid(origin_of(key), key, v, format!("must be {range}"), format!("set {key} {range}")))
        }
    };
    unit("subset_ratio", c.subset_ratio, true)?;
    unit("warmup_ratio", c.warmup_ratio, false)?;
    unit("dropout", c.dropout, false)?;
    unit("adam_beta1", c.adam_beta1, false)?;
    unit("adam_beta2", c.adam_beta2, false)?;
    for (key, v) in [
        ("learning_rate", c.learning_rate),
        ("num_train_epochs", c.num_train_epochs),
        ("max_grad_norm", c.max_grad_norm),
        ("adam_epsilon", c.adam_epsilon),
        ("rope_theta", c.rope_theta),
    ] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(invalid(origin_of(key), key, v, "must be a positive number", format!("set {key} above 0")));
        }
    }
    if c.weight_decay < 0.0 {
        return Err(invalid(
            origin_of("weight_decay"),
            "weight_decay",
            c.weight_decay,
            "must not be negative",
            "set weight_decay to 0 or more",
        ));
    }
    Ok(())
}

/// Evaluation blocks and lengths, the folder, the step limit and the WikiText config.
fn validate_the_rest(c: &RunConfig, origin_of: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let lengths = super::parse_lengths(&c.context_lengths).map_err(|problem| {
        invalid(
            origin_of("context_lengths"),
            "context_lengths",
            format!("{:?}", c.context_lengths),
            problem,
            "give whole numbers >= 2 separated by commas, e.g. 256,512,1024",
        )
    })?;
    if let Some(too_long) = lengths.iter().find(|l| !c.rope && **l > c.block_size) {
        return Err(invalid(
            origin_of("context_lengths"),
            "context_lengths",
            too_long,
            format!(
                "the model has learned positions (rope false: wpe) for block_size {} tokens and none beyond",
                c.block_size
            ),
            format!("keep the lengths up to {}, or train with rope true", c.block_size),
        ));
    }
    if c.early_stopping_patience == Some(0) {
        return Err(invalid(
            origin_of("early_stopping_patience"),
            "early_stopping_patience",
            0,
            "would stop at the first evaluation",
            "give 1 or more evaluations, or leave it unset",
        ));
    }
    if !(c.early_stopping_threshold >= 0.0 && c.early_stopping_threshold.is_finite()) {
        return Err(invalid(
            origin_of("early_stopping_threshold"),
            "early_stopping_threshold",
            c.early_stopping_threshold,
            "must be 0 or more",
            "set early_stopping_threshold to 0 or a small positive loss, e.g. 0.001",
        ));
    }
    if c.eval_max_blocks == Some(0) {
        return Err(invalid(
            origin_of("eval_max_blocks"),
            "eval_max_blocks",
            0,
            "an evaluation of no blocks has no loss",
            "drop eval_max_blocks to score every validation block, or set it to 1 or more",
        ));
    }
    if c.output_dir.trim().is_empty() {
        return Err(invalid(
            origin_of("output_dir"),
            "output_dir",
            "\"\"",
            "is empty",
            "give a folder, e.g. outputs/my-run",
        ));
    }
    if c.max_steps == Some(0) {
        return Err(invalid(
            origin_of("max_steps"),
            "max_steps",
            0,
            "must be at least 1",
            "drop max_steps to train by epochs, or set it to 1 or more",
        ));
    }
    if c.dataset == "wikitext" {
        const CONFIGS: [&str; 4] = ["wikitext-103-v1", "wikitext-103-raw-v1", "wikitext-2-v1", "wikitext-2-raw-v1"];
        if !CONFIGS.contains(&c.dataset_config.as_str()) {
            return Err(invalid(
                origin_of("dataset_config"),
                "dataset_config",
                &c.dataset_config,
                "not a WikiText config",
                format!("use one of {}", CONFIGS.join(", ")),
            ));
        }
    }
    Ok(())
}
