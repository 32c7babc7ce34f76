//! Every run setting, once: its name (the CLI flag and the preset key, as the research code
//! spells them), its type, its default, its help, what it is about (`Role`) and what a resume
//! may do with it (`OnResume`). The CLI and `--help`, preset parsing, `RunConfig::default`, the
//! resume and eval merges, the "comparable runs" check of compare and study, and bench's flags
//! are all read off this table.

use serde_json::{Map, Value};

use super::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Bool,
    /// Non-negative integer.
    Int,
    Float,
    Str,
    /// Integer or unset (`null`).
    OptInt,
    /// String or unset (`null`).
    OptStr,
    /// Whole numbers, written `256,512` (a preset may write a number or a YAML list): stored as
    /// the comma string.
    List,
}

impl ValueKind {
    pub fn value_name(self) -> &'static str {
        match self {
            ValueKind::Bool => "true|false",
            ValueKind::Int | ValueKind::OptInt => "N",
            ValueKind::Float => "X",
            ValueKind::Str | ValueKind::OptStr => "S",
            ValueKind::List => "N,N,..",
        }
    }
}

/// What a setting is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The model's shape and variant.
    Model,
    /// What a model trains and is scored on: runs that differ here have incomparable losses.
    Data,
    /// The batch and how it is computed.
    Batch,
    /// AdamW, clipping and the LR schedule.
    Optimisation,
    /// How long the run is.
    Length,
    /// How often it logs, evaluates and saves, and what it writes.
    Cadence,
    /// Where and in what precision it computes.
    Placement,
    /// Init, data order and dropout masks.
    Seed,
    /// The run's folder and how this invocation (re)starts it.
    Place,
    /// What the command does (evaluate a checkpoint instead of training).
    Mode,
}

/// What resuming from a checkpoint does with a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnResume {
    /// The checkpoint's value; a flag or preset that contradicts it is refused.
    Kept,
    /// The checkpoint's value unless a flag or preset sets another (named at start).
    MayChange,
    /// Says how this invocation starts, not what the run is: never taken from a checkpoint.
    Invocation,
}

pub struct KeySpec {
    pub name: &'static str,
    pub kind: ValueKind,
    /// As it would be written on the command line (`none`: unset).
    pub default: &'static str,
    pub help: &'static str,
    pub role: Role,
    pub on_resume: OnResume,
}

use OnResume::*;
use Role::*;
use ValueKind::*;

const fn key(
    name: &'static str,
    kind: ValueKind,
    default: &'static str,
    role: Role,
    on_resume: OnResume,
    help: &'static str,
) -> KeySpec {
    KeySpec { name, kind, default, help, role, on_resume }
}

/// In the research README's order, then difflab's own. The defaults are the research code's
/// where its README implies them (RoPE on, the baseline, TensorBoard and figures on), HF
/// Trainer's elsewhere (AdamW betas 0.9 / 0.999, eps 1e-8, eval and save every 500 steps); the
/// model defaults to GPT-2 small's shape, and the dataset to the offline built-in corpus so a
/// bare run never needs the network.
pub const KEYS: &[KeySpec] = &[
    key(
        "dataset",
        Str,
        "builtin",
        Data,
        Kept,
        "wikitext, builtin (offline, generated), or a path to .txt/.parquet/.jsonl or a folder",
    ),
    key(
        "dataset_config",
        Str,
        "wikitext-103-v1",
        Data,
        Kept,
        "wikitext config: wikitext-103-v1, wikitext-103-raw-v1, wikitext-2-v1, wikitext-2-raw-v1",
    ),
    key(
        "output_dir",
        Str,
        "outputs/run",
        Place,
        Invocation,
        "where checkpoints, metrics.jsonl, TensorBoard logs and figures go",
    ),
    key("rope", Bool, "true", Model, Kept, "rotary position embedding instead of learned absolute positions"),
    key("research", Bool, "false", Model, Kept, "the differential input-embedding variant"),
    key("eval_only", Bool, "false", Mode, Invocation, "evaluate --checkpoint on the validation split, no training"),
    key(
        "checkpoint",
        OptStr,
        "none",
        Mode,
        Invocation,
        "model directory to evaluate (checkpoint-N, a final output_dir, or an HF GPT-2 dir)",
    ),
    key("log_tensorboard", Bool, "true", Cadence, MayChange, "write TensorBoard event files under output_dir/runs"),
    key(
        "log_figures",
        Bool,
        "true",
        Cadence,
        MayChange,
        "draw loss/LR/grad-norm/diff-norm figures (PNG and TensorBoard images)",
    ),
    key(
        "subset_ratio",
        Float,
        "1.0",
        Data,
        Kept,
        "keep the first fraction of the training rows (wikitext: 0.1 unless set)",
    ),
    key(
        "num_train_epochs",
        Float,
        "1.0",
        Length,
        MayChange,
        "epochs over the training blocks (unless max_steps is set)",
    ),
    key("n_layer", Int, "12", Model, Kept, "transformer blocks"),
    key("n_head", Int, "12", Model, Kept, "attention heads"),
    key("n_embd", Int, "768", Model, Kept, "model width"),
    key("block_size", Int, "1024", Data, Kept, "tokens per training sequence"),
    key("batch_size", Int, "64", Batch, Kept, "sequences per optimizer step"),
    key(
        "micro_batch_size",
        Int,
        "4",
        Batch,
        MayChange,
        "sequences per forward/backward; batch_size / micro_batch_size are accumulated",
    ),
    key("learning_rate", Float, "1e-4", Optimisation, Kept, "peak learning rate"),
    key("lr_scheduler_type", Str, "cosine", Optimisation, Kept, "cosine, linear, constant, constant_with_warmup"),
    key("warmup_steps", Int, "0", Optimisation, Kept, "linear warmup steps (wins over warmup_ratio when > 0)"),
    key("warmup_ratio", Float, "0.0", Optimisation, Kept, "warmup as a fraction of all steps"),
    key("weight_decay", Float, "0.0", Optimisation, Kept, "AdamW decoupled weight decay (2-D weights only)"),
    key("adam_beta2", Float, "0.999", Optimisation, Kept, "AdamW beta2"),
    key("max_grad_norm", Float, "1.0", Optimisation, Kept, "clip the global gradient norm to this"),
    key(
        "gradient_checkpointing",
        Bool,
        "false",
        Batch,
        MayChange,
        "recompute block activations in backward: less memory, more time",
    ),
    key(
        "max_steps",
        OptInt,
        "none",
        Length,
        MayChange,
        "stop after this many optimizer steps (overrides num_train_epochs)",
    ),
    key("eval_steps", Int, "500", Cadence, MayChange, "evaluate every N steps (and at the end)"),
    key("save_steps", Int, "500", Cadence, MayChange, "checkpoint every N steps (0: only at the end)"),
    key("save_total_limit", OptInt, "3", Cadence, MayChange, "keep at most N checkpoints (oldest deleted)"),
    key("logging_steps", Int, "10", Cadence, MayChange, "emit a progress marker every N steps"),
    key("seed", Int, "42", Seed, Kept, "seed for init, data order and dropout"),
    key("dropout", Float, "0.0", Model, Kept, "dropout on embeddings, attention and residual branches"),
    key(
        "tokenizer",
        Str,
        "auto",
        Data,
        Kept,
        "auto (gpt2 for wikitext, bpe:8192 otherwise), gpt2, bpe:N, byte, or a tokenizer.json path",
    ),
    key("device", Str, "auto", Placement, MayChange, "auto, cpu, cuda, cuda:N"),
    key(
        "dtype",
        Str,
        "f32",
        Placement,
        MayChange,
        "f32, or bf16: bf16 compute over f32 master weights (CUDA), bf16 matmuls with f32 sums on AVX512-BF16 (CPU)",
    ),
    key(
        "grad_reduce_dtype",
        Str,
        "f32",
        Placement,
        MayChange,
        "gradients between processes in f32, or bf16 (MPI: half the bytes; summed in f32, rounded to bf16 at each hop)",
    ),
    key(
        "grad_reduce_overlap",
        Bool,
        "true",
        Placement,
        MayChange,
        "sum gradients between processes while the backward runs (cpu-step over MPI, as DDP), or after it (false)",
    ),
    key(
        "ddp_bucket_cap_mb",
        Int,
        "25",
        Placement,
        MayChange,
        "gradients go between processes in buckets of up to this many MB (the first 1 MB while overlapping), as DDP",
    ),
    key(
        "resume_from_checkpoint",
        OptStr,
        "none",
        Place,
        Invocation,
        "checkpoint-N directory to continue from (every setting comes from it), or `latest` in output_dir",
    ),
    key("adam_beta1", Float, "0.9", Optimisation, Kept, "AdamW beta1"),
    key("adam_epsilon", Float, "1e-8", Optimisation, Kept, "AdamW epsilon"),
    key("rope_theta", Float, "10000", Model, Kept, "RoPE base"),
    key(
        "eval_max_blocks",
        OptInt,
        "none",
        Data,
        Kept,
        "evaluate on at most N validation blocks (default: all); such evals are marked partial",
    ),
    key(
        "overwrite_output_dir",
        Bool,
        "false",
        Place,
        Invocation,
        "clear an output_dir that holds an earlier run instead of refusing it",
    ),
    key(
        "run_name",
        OptStr,
        "none",
        Place,
        Invocation,
        "the run's folder inside output_dir; unset with output_dir ending in `/`: <UTC date-time>_<preset>",
    ),
    key(
        "eval_split",
        Str,
        "validation",
        Data,
        Kept,
        "the split evaluations run on: validation, or test (WikiText, or a folder with a test file)",
    ),
    key(
        "eval_on_start",
        Bool,
        "false",
        Cadence,
        MayChange,
        "evaluate the untrained model at step 0 too (HF Trainer's eval_on_start)",
    ),
    key(
        "sample_prompt",
        OptStr,
        "none",
        Cadence,
        MayChange,
        "at each evaluation, continue this text (48 tokens, temperature 0.8, top-k 40, the run's seed) into the log",
    ),
    key(
        "early_stopping_patience",
        OptInt,
        "none",
        Length,
        MayChange,
        "stop when the eval loss has not improved by more than early_stopping_threshold for N evaluations in a row (HF's EarlyStoppingCallback)",
    ),
    key(
        "early_stopping_threshold",
        Float,
        "0.0",
        Length,
        MayChange,
        "how much the eval loss must fall below its best to count as an improvement",
    ),
    key(
        "context_lengths",
        List,
        "",
        Cadence,
        MayChange,
        "also evaluate in windows of these lengths, e.g. 256,512,1024 (train short, test long; RoPE models read any length, learned positions only up to block_size)",
    ),
];

/// Keys a preset file may hold besides the run settings.
pub const PRESET_ONLY_KEYS: &[&str] = &["description", "extends", "sweep", "study"];

/// The tutor's misspellings, accepted with a warning: `(alias, key)`.
pub const KEY_ALIASES: &[(&str, &str)] = &[("n_later", "n_layer")];

pub fn find(name: &str) -> Option<&'static KeySpec> {
    let name = KEY_ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |(_, real)| *real);
    KEYS.iter().find(|k| k.name == name)
}

/// The names of the keys with `role`, in table order.
pub fn with_role(role: Role) -> impl Iterator<Item = &'static str> {
    KEYS.iter().filter(move |k| k.role == role).map(|k| k.name)
}

/// Keys a study or sweep sets for each of its runs (the folder, the seed), which an arm or a
/// trial may not set itself.
pub fn is_procedures_own(name: &str) -> bool {
    find(name).is_some_and(|k| matches!(k.role, Role::Place | Role::Seed))
}

/// Every key at its default, as the JSON a `RunConfig` serializes to.
pub fn defaults() -> Map<String, Value> {
    KEYS.iter()
        .map(|k| {
            // the table's own defaults parse (tested): a failure is a typo in the table
            let value = parse_flag_value(k.name, k.default)
                .unwrap_or_else(|e| panic!("the key table's default for {} does not parse: {e}", k.name));
            (k.name.to_string(), value)
        })
        .collect()
}

/// The valid key nearest to a misspelt one (Levenshtein), for "did you mean".
pub fn nearest(name: &str) -> &'static str {
    KEYS.iter()
        .map(|k| k.name)
        .chain(PRESET_ONLY_KEYS.iter().copied())
        .min_by_key(|k| edit_distance(name, k))
        .unwrap_or("dataset")
}

pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn canonical_key(key: &str, origin: &str, warnings: &mut Vec<String>) -> String {
    match KEY_ALIASES.iter().find(|(alias, _)| *alias == key) {
        Some((alias, real)) => {
            warnings.push(format!("warning: {origin}: `{alias}` is read as `{real}` (the tutor's spelling)"));
            real.to_string()
        }
        None => key.to_string(),
    }
}

/// Checks a value's type against its key (preset files give typed YAML values).
pub fn check_value(origin: &str, key: &str, value: &Value) -> Result<Value, ConfigError> {
    let Some(k) = find(key) else {
        return Err(ConfigError::UnknownKey { origin: origin.into(), key: key.into(), nearest: nearest(key).into() });
    };
    // a list as a preset may write it: `256`, `[256, 512]` or "256,512"
    if k.kind == ValueKind::List {
        let items = match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_u64() => Some(n.to_string()),
            Value::Array(a) => {
                a.iter().map(|v| v.as_u64().map(|n| n.to_string())).collect::<Option<Vec<_>>>().map(|v| v.join(","))
            }
            _ => None,
        };
        return items.map(Value::String).ok_or_else(|| ConfigError::WrongType {
            origin: origin.into(),
            key: key.into(),
            expected: expected_phrase(k.kind).into(),
            got: value.to_string(),
        });
    }
    let ok = match (k.kind, value) {
        (ValueKind::Bool, Value::Bool(_)) => true,
        (ValueKind::Int | ValueKind::OptInt, Value::Number(n)) => n.is_u64(),
        (ValueKind::Float, Value::Number(_)) => true,
        (ValueKind::Str | ValueKind::OptStr, Value::String(_)) => true,
        (ValueKind::OptInt | ValueKind::OptStr, Value::Null) => true,
        _ => false,
    };
    if ok {
        Ok(value.clone())
    } else {
        Err(ConfigError::WrongType {
            origin: origin.into(),
            key: key.into(),
            expected: expected_phrase(k.kind).into(),
            got: value.to_string(),
        })
    }
}

fn expected_phrase(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::Bool => "true or false",
        ValueKind::Int => "a whole number >= 0",
        ValueKind::OptInt => "a whole number >= 0 or null",
        ValueKind::Float => "a number",
        ValueKind::Str => "a string",
        ValueKind::List => "whole numbers, as `256,512` or a list",
        ValueKind::OptStr => "a string or null",
    }
}

/// Types a command-line string by its key: `--rope true`, `--n_layer 2`, `--learning_rate 1e-3`.
pub fn parse_flag_value(key: &str, raw: &str) -> Result<Value, ConfigError> {
    let origin = "command line";
    let k = find(key).ok_or_else(|| ConfigError::UnknownKey {
        origin: origin.into(),
        key: key.into(),
        nearest: nearest(key).into(),
    })?;
    let null = matches!(raw.to_ascii_lowercase().as_str(), "none" | "null");
    let parsed = match k.kind {
        ValueKind::Bool => match raw.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        ValueKind::OptInt if null => Some(Value::Null),
        ValueKind::Int | ValueKind::OptInt => raw.parse::<u64>().ok().map(Value::from),
        ValueKind::Float => raw.parse::<f64>().ok().filter(|x| x.is_finite()).map(Value::from),
        ValueKind::OptStr if null || raw.is_empty() => Some(Value::Null),
        ValueKind::Str | ValueKind::OptStr | ValueKind::List => Some(Value::String(raw.into())),
    };
    parsed.ok_or_else(|| ConfigError::WrongType {
        origin: format!("{origin} (--{key})"),
        key: key.into(),
        expected: expected_phrase(k.kind).into(),
        got: format!("{raw:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_key_is_found() {
        assert_eq!(nearest("learning_rte"), "learning_rate");
        assert_eq!(nearest("n_layers"), "n_layer");
        assert_eq!(nearest("micro_batch"), "micro_batch_size");
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = KEYS.iter().map(|k| k.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KEYS.len());
    }

    #[test]
    fn every_run_config_field_is_in_the_table_once_and_every_default_parses() {
        // the struct's fields, as it serializes them, against the table's names
        let fields: Vec<String> = match serde_json::to_value(crate::config::RunConfig::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            other => panic!("RunConfig serializes to {other:?}"),
        };
        let mut names: Vec<String> = KEYS.iter().map(|k| k.name.to_string()).collect();
        names.sort();
        let mut sorted = fields.clone();
        sorted.sort();
        assert_eq!(sorted, names, "RunConfig's fields and the key table differ");
        for k in KEYS {
            assert!(parse_flag_value(k.name, k.default).is_ok(), "{}: default {:?}", k.name, k.default);
        }
        // a default read back is the table's: the config is made from it, not written twice
        let back = serde_json::to_value(crate::config::RunConfig::default()).unwrap();
        assert_eq!(back, Value::Object(defaults()));
    }

    #[test]
    fn roles_name_the_data_keys_and_resume_policies() {
        let data: Vec<&str> = with_role(Role::Data).collect();
        assert_eq!(
            data,
            ["dataset", "dataset_config", "subset_ratio", "block_size", "tokenizer", "eval_max_blocks", "eval_split"]
        );
        assert_eq!(find("max_steps").unwrap().on_resume, OnResume::MayChange);
        assert_eq!(find("learning_rate").unwrap().on_resume, OnResume::Kept);
        assert_eq!(find("output_dir").unwrap().on_resume, OnResume::Invocation);
    }
}
