//! Every run setting, once: its name (the CLI flag and the preset key, as the research code
//! spells them), its type, its default and its help. The CLI, `--help`, preset parsing and
//! the resolved config are all driven by this table.

use serde_json::Value;

use super::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// Non-negative integer.
    Int,
    Float,
    Str,
    /// Integer or unset (`null`).
    OptInt,
    /// String or unset (`null`).
    OptStr,
}

impl Kind {
    pub fn value_name(self) -> &'static str {
        match self {
            Kind::Bool => "true|false",
            Kind::Int | Kind::OptInt => "N",
            Kind::Float => "X",
            Kind::Str | Kind::OptStr => "S",
        }
    }
}

pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn key(name: &'static str, kind: Kind, help: &'static str) -> Key {
    Key { name, kind, help }
}

use Kind::*;

/// In the research README's order, then difflab's own.
pub const KEYS: &[Key] = &[
    key("dataset", Str, "wikitext, builtin (offline, generated), or a path to .txt/.parquet/.jsonl or a folder"),
    key(
        "dataset_config",
        Str,
        "wikitext config: wikitext-103-v1, wikitext-103-raw-v1, wikitext-2-v1, wikitext-2-raw-v1",
    ),
    key("output_dir", Str, "where checkpoints, metrics.jsonl, TensorBoard logs and figures go"),
    key("rope", Bool, "rotary position embedding instead of learned absolute positions"),
    key("research", Bool, "the differential input-embedding variant"),
    key("eval_only", Bool, "evaluate --checkpoint on the validation split, no training"),
    key("checkpoint", OptStr, "model directory to evaluate (checkpoint-N, a final output_dir, or an HF GPT-2 dir)"),
    key("log_tensorboard", Bool, "write TensorBoard event files under output_dir/runs"),
    key("log_figures", Bool, "draw loss/LR/grad-norm/diff-norm figures (PNG and TensorBoard images)"),
    key("subset_ratio", Float, "keep the first fraction of the training rows (wikitext: 0.1 unless set)"),
    key("num_train_epochs", Float, "epochs over the training blocks (unless max_steps is set)"),
    key("n_layer", Int, "transformer blocks"),
    key("n_head", Int, "attention heads"),
    key("n_embd", Int, "model width"),
    key("block_size", Int, "tokens per training sequence"),
    key("batch_size", Int, "sequences per optimizer step"),
    key("micro_batch_size", Int, "sequences per forward/backward; batch_size / micro_batch_size are accumulated"),
    key("learning_rate", Float, "peak learning rate"),
    key("lr_scheduler_type", Str, "cosine, linear, constant, constant_with_warmup"),
    key("warmup_steps", Int, "linear warmup steps (wins over warmup_ratio when > 0)"),
    key("warmup_ratio", Float, "warmup as a fraction of all steps"),
    key("weight_decay", Float, "AdamW decoupled weight decay (2-D weights only)"),
    key("adam_beta2", Float, "AdamW beta2"),
    key("max_grad_norm", Float, "clip the global gradient norm to this"),
    key("gradient_checkpointing", Bool, "recompute block activations in backward: less memory, more time"),
    key("max_steps", OptInt, "stop after this many optimizer steps (overrides num_train_epochs)"),
    key("eval_steps", Int, "evaluate every N steps (and at the end)"),
    key("save_steps", Int, "checkpoint every N steps (0: only at the end)"),
    key("save_total_limit", OptInt, "keep at most N checkpoints (oldest deleted)"),
    key("logging_steps", Int, "emit a progress marker every N steps"),
    key("seed", Int, "seed for init, data order and dropout"),
    key("dropout", Float, "dropout on embeddings, attention and residual branches"),
    key("tokenizer", Str, "auto (gpt2 for wikitext, bpe:8192 otherwise), gpt2, bpe:N, byte, or a tokenizer.json path"),
    key("device", Str, "auto, cpu, cuda, cuda:N"),
    key("dtype", Str, "f32, or bf16 (CUDA: bf16 compute, f32 master weights)"),
    key("resume_from_checkpoint", OptStr, "checkpoint-N directory to continue from, or `latest` in output_dir"),
    key("adam_beta1", Float, "AdamW beta1"),
    key("adam_epsilon", Float, "AdamW epsilon"),
    key("rope_theta", Float, "RoPE base"),
    key(
        "eval_max_blocks",
        OptInt,
        "evaluate on at most N validation blocks (default: all); such evals are marked partial",
    ),
    key("overwrite_output_dir", Bool, "clear an output_dir that holds an earlier run instead of refusing it"),
    key(
        "run_name",
        OptStr,
        "the run's folder inside output_dir; unset with output_dir ending in `/`: <UTC date-time>_<preset>",
    ),
    key(
        "eval_split",
        Str,
        "the split evaluations run on: validation, or test (WikiText, or a folder with a test file)",
    ),
    key("eval_on_start", Bool, "evaluate the untrained model at step 0 too (HF Trainer's eval_on_start)"),
    key(
        "sample_prompt",
        OptStr,
        "at each evaluation, continue this text (48 tokens, temperature 0.8, top-k 40, the run's seed) into the log",
    ),
];

/// Keys a preset file may hold besides the run settings.
pub const PRESET_ONLY_KEYS: &[&str] = &["description", "extends", "sweep", "study"];

/// The tutor's misspellings, accepted with a warning: `(alias, key)`.
pub const KEY_ALIASES: &[(&str, &str)] = &[("n_later", "n_layer")];

pub fn find(name: &str) -> Option<&'static Key> {
    let name = KEY_ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |(_, real)| *real);
    KEYS.iter().find(|k| k.name == name)
}

/// The valid key nearest to a misspelt one (Levenshtein), for "did you mean".
pub fn nearest(name: &str) -> &'static str {
    KEYS.iter()
        .map(|k| k.name)
        .chain(PRESET_ONLY_KEYS.iter().copied())
        .min_by_key(|k| edit_distance(name, k))
        .unwrap_or("dataset")
}

fn edit_distance(a: &str, b: &str) -> usize {
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
    let ok = match (k.kind, value) {
        (Kind::Bool, Value::Bool(_)) => true,
        (Kind::Int | Kind::OptInt, Value::Number(n)) => n.is_u64(),
        (Kind::Float, Value::Number(_)) => true,
        (Kind::Str | Kind::OptStr, Value::String(_)) => true,
        (Kind::OptInt | Kind::OptStr, Value::Null) => true,
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

fn expected_phrase(kind: Kind) -> &'static str {
    match kind {
        Kind::Bool => "true or false",
        Kind::Int => "a whole number >= 0",
        Kind::OptInt => "a whole number >= 0 or null",
        Kind::Float => "a number",
        Kind::Str => "a string",
        Kind::OptStr => "a string or null",
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
        Kind::Bool => match raw.to_ascii_lowercase().as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Kind::OptInt if null => Some(Value::Null),
        Kind::Int | Kind::OptInt => raw.parse::<u64>().ok().map(Value::from),
        Kind::Float => raw.parse::<f64>().ok().filter(|x| x.is_finite()).map(Value::from),
        Kind::OptStr if null || raw.is_empty() => Some(Value::Null),
        Kind::Str | Kind::OptStr => Some(Value::String(raw.into())),
    };
    parsed.ok_or_else(|| ConfigError::WrongType {
        origin: format!("{origin} (--{key})"),
        key: key.into(),
        expected: expected_phrase(k.kind).into(),
        got: format!("{raw:?}"),
    })
}

/// Defaults, then each preset of the chain (base first), then the flags.
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
}
