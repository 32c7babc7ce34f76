//! Preset files: flat `key: value` YAML with the CLI's key names, plus `description`,
//! `extends` (another preset, applied first) and `sweep` (one key and a list of values).
//!
//! The project's `presets/*.yaml` are compiled into the binary, so `difflab --preset demo`
//! works from any directory; a user folder (`$DIFFLAB_PRESET_DIR`, else
//! `~/.config/difflab/presets`) adds more and may shadow them. A path works too.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::keys::{canonical_key, check_value};
use super::ConfigError;

/// The project's presets, embedded at build time. A test checks this list against `presets/`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("demo", include_str!("../../presets/demo.yaml")),
    ("sanity-baseline", include_str!("../../presets/sanity-baseline.yaml")),
    ("sanity-diff", include_str!("../../presets/sanity-diff.yaml")),
    ("mid-baseline", include_str!("../../presets/mid-baseline.yaml")),
    ("mid-diff", include_str!("../../presets/mid-diff.yaml")),
    ("full-baseline", include_str!("../../presets/full-baseline.yaml")),
    ("full-diff", include_str!("../../presets/full-diff.yaml")),
    // procedures: sweeps and studies (README, "The tutor's procedure")
    ("demo-lr-sweep", include_str!("../../presets/demo-lr-sweep.yaml")),
    ("demo-study", include_str!("../../presets/demo-study.yaml")),
    ("sanity-lr-sweep", include_str!("../../presets/sanity-lr-sweep.yaml")),
    ("sanity-diff-lr-sweep", include_str!("../../presets/sanity-diff-lr-sweep.yaml")),
    ("sanity-study", include_str!("../../presets/sanity-study.yaml")),
    ("mid-study", include_str!("../../presets/mid-study.yaml")),
];

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    /// Where it came from, as shown in messages: `presets/demo.yaml` or a file path.
    pub origin: String,
    pub description: String,
    pub extends: Option<String>,
    /// Type-checked settings, keys canonical.
    pub values: Map<String, Value>,
    pub sweep: Option<SweepSpec>,
    pub study: Option<StudySpec>,
    pub warnings: Vec<String>,
}

/// A preset's `sweep:`: one key and its values, or two keys whose values make a grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// `(key, values)`, one or two of them, in alphabetical order (the preset's mapping is
    /// read into a sorted map).
    pub axes: Vec<(String, Vec<Value>)>,
}

impl SweepSpec {
    /// Every trial's settings: the values of one key, or the grid of two (the first key outer).
    pub fn trials(&self) -> Vec<Vec<(String, Value)>> {
        let mut trials: Vec<Vec<(String, Value)>> = vec![vec![]];
        for (key, values) in &self.axes {
            trials = trials
                .into_iter()
                .flat_map(|t| {
                    values.iter().map(move |v| {
                        let mut t = t.clone();
                        t.push((key.clone(), v.clone()));
                        t
                    })
                })
                .collect();
        }
        trials
    }
}

/// A preset's `study:`: arms (settings over the preset's) and seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct StudySpec {
    /// `(label, settings)`: `name:` in the file, else `key=value,...`.
    pub arms: Vec<(String, Map<String, Value>)>,
    /// A count (from the run's seed up) or a list.
    pub seeds: Seeds,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Seeds {
    Count(u64),
    List(Vec<u64>),
}

impl std::fmt::Display for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seeds::Count(n) => write!(f, "{n}"),
            Seeds::List(l) => write!(f, "{}", l.iter().map(u64::to_string).collect::<Vec<_>>().join(",")),
        }
    }
}

/// The line a top-level `key:` is written on, for messages that point into the file.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_end();
            !l.starts_with([' ', '\t', '#', '-'])
                && l.split(':').next().is_some_and(|k| k.trim().trim_matches(['"', '\'']) == key)
                && l.contains(':')
        })
        .map(|i| i + 1)
}

pub fn parse(name: &str, origin: &str, text: &str) -> Result<Preset, ConfigError> {
    let yaml_error = |reason: String| ConfigError::Yaml { path: origin.into(), reason };
    // serde-saphyr: a pure-Rust YAML parser that refuses duplicate keys and non-finite floats
    // (`.nan` would become JSON null) and says where, as "line L column C: ..."; the first line
    // of its report is the message (the rest is a drawing of the spot)
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| {
        let report = e.to_string();
        let first = report.lines().next().unwrap_or("").trim_start_matches("error: ");
        // the parser's advice is for programmers configuring it; say what to do in the file
        let first = first
            .replace(", set DuplicateKeyPolicy in Options if acceptable", "; keep one")
            .replace("rejected by the configured policy", "is not a number a run can use; write a finite one");
        // a type name is advice to whoever wrote the parser's caller, not to the file's author
        let first = if first.contains("Option<") || first.contains("invalid type") {
            let at = first.split(": ").next().filter(|p| p.starts_with("line ")).unwrap_or("");
            format!(
                "{at}{}a key or value is missing (every line is `key: value`)",
                if at.is_empty() { "" } else { ": " }
            )
        } else {
            first.to_string()
        };
        yaml_error(first)
    })?;
    let map = match doc {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        // said by kind, never echoed: the file may be anything (`--preset /etc/passwd`)
        other => {
            let kind = match &other {
                Value::String(s) => format!("a text of {} characters", s.chars().count()),
                Value::Array(a) => format!("a list of {} items", a.len()),
                _ => "a single value".to_string(),
            };
            return Err(ConfigError::Yaml {
                path: origin.into(),
                reason: format!("the document is {kind}, not a mapping"),
            });
        }
    };
    let mut preset = Preset {
        name: name.into(),
        origin: origin.into(),
        description: String::new(),
        extends: None,
        values: Map::new(),
        sweep: None,
        study: None,
        warnings: vec![],
    };
    if !map.keys().any(|k| k != "description") {
        return Err(ConfigError::EmptyPreset { path: origin.into() });
    }
    // every bad key of the file at once, not one per attempt
    let mut problems = vec![];
    for (key, value) in map {
        match key.as_str() {
            "description" | "extends" => {
                let Value::String(s) = value else {
                    return Err(ConfigError::WrongType {
                        origin: origin.into(),
                        key,
                        expected: "a string".into(),
                        got: value.to_string(),
                    });
                };
                if key == "description" {
                    preset.description = s
                } else {
                    preset.extends = Some(s)
                }
            }
            "sweep" => preset.sweep = Some(parse_sweep(origin, value, &mut preset.warnings)?),
            "study" => preset.study = Some(parse_study(origin, value, &mut preset.warnings)?),
            _ => {
                // "presets/x.yaml line 7": where the key is, for every message about it
                let at = line_of(text, &key).map_or(origin.to_string(), |n| format!("{origin} line {n}"));
                let key = canonical_key(&key, &at, &mut preset.warnings);
                match check_value(&at, &key, &value) {
                    Ok(value) => drop(preset.values.insert(key, value)),
                    Err(e) => problems.push(e),
                }
            }
        }
    }
    match problems.len() {
        0 => Ok(preset),
        1 => Err(problems.remove(0)),
        _ => Err(ConfigError::Several(problems.iter().map(ToString::to_string).collect())),
    }
}

fn parse_sweep(origin: &str, value: Value, warnings: &mut Vec<String>) -> Result<SweepSpec, ConfigError> {
    let bad = || ConfigError::BadSweep { origin: origin.into() };
    let Value::Object(m) = value else { return Err(bad()) };
    if m.is_empty() || m.len() > 2 {
        return Err(bad());
    }
    let mut axes = vec![];
    for (key, values) in m {
        let key = canonical_key(&key, origin, warnings);
        let Value::Array(values) = values else { return Err(bad()) };
        if values.is_empty() {
            return Err(bad());
        }
        // a bad value names the file, the key and its place in the list
        let values = values
            .iter()
            .enumerate()
            .map(|(i, v)| check_value(&format!("{origin}: sweep.{key}[{i}]"), &key, v))
            .collect::<Result<Vec<_>, _>>()?;
        axes.push((key, values));
    }
    Ok(SweepSpec { axes })
}

fn parse_study(origin: &str, value: Value, warnings: &mut Vec<String>) -> Result<StudySpec, ConfigError> {
    let bad = |what: String| ConfigError::BadStudy { origin: origin.into(), problem: what };
    let Value::Object(mut m) = value else { return Err(bad("`study` must be a mapping".into())) };
    let seeds = match m.remove("seeds") {
        None => Seeds::Count(3),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => Seeds::Count(n.as_u64().unwrap_or(3)),
        Some(Value::Array(list)) if !list.is_empty() => Seeds::List(
            list.iter()
                .enumerate()
                .map(|(i, v)| v.as_u64().ok_or_else(|| bad(format!("seeds[{i}] is {v}, not a whole number"))))
                .collect::<Result<_, _>>()?,
        ),
        Some(other) => return Err(bad(format!("seeds is {other}: give a count (3) or a list ([1, 2, 3])"))),
    };
    let Some(Value::Array(list)) = m.remove("arms") else {
        return Err(bad("`study` needs `arms:`, a list of two or more mappings of settings".into()));
    };
    if let Some(extra) = m.keys().next() {
        return Err(bad(format!("unknown key `{extra}` (a study has `arms` and `seeds`)")));
    }
    if list.len() < 2 {
        return Err(bad(format!("{} arm(s); a study needs two or more", list.len())));
    }
    let mut arms = vec![];
    for (i, arm) in list.into_iter().enumerate() {
        let Value::Object(arm) = arm else { return Err(bad(format!("arms[{i}] is {arm}, not a mapping"))) };
        let at = format!("{origin}: study.arms[{i}]");
        let (mut name, mut values) = (None, Map::new());
        for (key, value) in arm {
            if key == "name" {
                name = Some(
                    value
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("arms[{i}].name is {value}, not a string")))?,
                );
                continue;
            }
            let key = canonical_key(&key, &at, warnings);
            if super::keys::is_procedures_own(&key) {
                return Err(bad(format!("arms[{i}] sets `{key}`, which is the study's (its folders, its seeds)")));
            }
            let value = check_value(&at, &key, &value)?;
            values.insert(key, value);
        }
        let label = name.unwrap_or_else(|| {
            values
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string)))
                .collect::<Vec<_>>()
                .join(",")
        });
        arms.push((label, values));
    }
    Ok(StudySpec { arms, seeds })
}

#[derive(Debug, Clone)]
pub struct PresetLibrary {
    /// `(name, origin, text)`; later entries shadow earlier ones of the same name.
    entries: Vec<(String, String, String)>,
}

impl PresetLibrary {
    pub fn builtin() -> Self {
        Self {
            entries: BUILTIN
                .iter()
                .map(|(name, text)| (name.to_string(), format!("presets/{name}.yaml"), text.to_string()))
                .collect(),
        }
    }

    /// Built-ins plus `user_dir` (unreadable files are skipped here and reported on use).
    pub fn with_user_dir(mut self, dir: &Path) -> Self {
        let Ok(read) = std::fs::read_dir(dir) else { return self };
        let mut files: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for path in files {
            let (Some(stem), Ok(text)) = (path.file_stem(), std::fs::read_to_string(&path)) else { continue };
            let name = stem.to_string_lossy().into_owned();
            self.entries.retain(|(n, _, _)| *n != name);
            self.entries.push((name, path.display().to_string(), text));
        }
        self
    }

    /// The default library: built-ins plus `$DIFFLAB_PRESET_DIR` or `~/.config/difflab/presets`.
    pub fn load() -> Self {
        match user_dir() {
            Some(dir) => Self::builtin().with_user_dir(&dir),
            None => Self::builtin(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _, _)| n.clone()).collect()
    }

    /// Every preset, parsed; a broken one comes back as its error (the picker shows it).
    pub fn all(&self) -> Vec<Result<Preset, ConfigError>> {
        self.entries.iter().map(|(n, o, t)| parse(n, o, t)).collect()
    }

    /// A preset by name, or by path to a YAML file.
    pub fn get(&self, name_or_path: &str) -> Result<Preset, ConfigError> {
        let looks_like_path =
            name_or_path.ends_with(".yaml") || name_or_path.ends_with(".yml") || name_or_path.contains('/');
        if looks_like_path {
            let path = Path::new(name_or_path);
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Read { path: name_or_path.into(), reason: e.to_string() })?;
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            return parse(&name, name_or_path, &text);
        }
        match self.entries.iter().find(|(n, _, _)| n == name_or_path) {
            Some((n, o, t)) => parse(n, o, t),
            None => {
                let names = self.names();
                let nearest = names.iter().min_by_key(|n| super::keys::edit_distance(name_or_path, n));
                let available = match nearest {
                    Some(n) if super::keys::edit_distance(name_or_path, n) <= 3 => {
                        format!("{} (did you mean `{n}`?)", names.join(", "))
                    }
                    _ => names.join(", "),
                };
                Err(ConfigError::UnknownPreset { name: name_or_path.into(), available })
            }
        }
    }

    /// The preset and everything it extends, base first. A preset met twice (by name or by
    /// any path to the same file) is a cycle, refused naming the chain.
    pub fn chain(&self, name_or_path: &str) -> Result<Vec<Preset>, ConfigError> {
        let mut chain = vec![self.get(name_or_path)?];
        let mut seen = vec![identity(&chain[0])];
        while let Some(parent) = chain.last().and_then(|p| p.extends.clone()) {
            let holder = chain.last().map(|p| p.origin.clone()).unwrap_or_default();
            let next = self.get(&parent).map_err(|e| match e {
                ConfigError::UnknownPreset { name, available } => {
                    ConfigError::ExtendsMissing { path: holder, name, available }
                }
                other => other,
            })?;
            if seen.contains(&identity(&next)) {
                let mut names: Vec<_> = chain.iter().map(|p| p.origin.clone()).collect();
                names.push(next.origin);
                return Err(ConfigError::ExtendsCycle { path: chain[0].origin.clone(), chain: names.join(" -> ") });
            }
            seen.push(identity(&next));
            chain.push(next);
        }
        chain.reverse();
        Ok(chain)
    }
}

/// What makes two presets the same one: the canonical path of its file (a built-in's origin
/// names no file here: its name).
fn identity(p: &Preset) -> String {
    std::fs::canonicalize(&p.origin).map_or_else(|_| p.origin.clone(), |c| c.display().to_string())
}

fn user_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DIFFLAB_PRESET_DIR") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/difflab/presets"))
}
