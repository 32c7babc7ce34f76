//! A run's saved settings under what this invocation set explicitly: the one merge behind
//! resume (`train::checkpoint::reconcile_resume`) and eval (`commands::eval`). Nothing falls
//! back to a default silently: every key takes the saved value unless a flag or preset sets it
//! and the caller allows that key to change, and each such override is named.

use serde_json::{Map, Value};

use super::keys::{KeySpec, OnResume, KEYS};
use super::{Origin, Resolved, RunConfig};

/// The merged settings and what the invocation changed in them.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled {
    pub config: RunConfig,
    /// One line per key set explicitly to another value than the saved one:
    /// "max_steps 200 (command line) instead of the run's 100".
    pub overrides: Vec<String>,
    /// The keys those lines are about, in table order.
    pub overridden: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReconcileError {
    /// Explicit values of keys that may not change, one line each.
    #[error("{}", .0.join("; "))]
    Contradicts(Vec<String>),
    /// The saved settings do not make a configuration (a damaged or foreign file).
    #[error("{0}")]
    Damaged(String),
}

/// `saved` (a run's `difflab_config.json`) with `resolved`'s explicit settings (flags and
/// presets, not defaults) on top where `may_change(key)` allows, and this invocation's own
/// `Invocation` keys (its folder, its checkpoint). An explicit value that differs from the saved
/// one on a key that may not change is a contradiction; all of them are returned together.
pub fn reconcile(
    saved: &Map<String, Value>,
    resolved: &Resolved,
    may_change: impl Fn(&KeySpec) -> bool,
) -> Result<Reconciled, ReconcileError> {
    let ours = resolved.config.to_map();
    let mut merged = ours.clone();
    let (mut overrides, mut overridden, mut contradictions) = (vec![], vec![], vec![]);
    for key in KEYS {
        let (name, mine) = (key.name, &ours[key.name]);
        let Some(theirs) = saved.get(name) else { continue }; // a file of an older version
        let explicit = resolved.origins.get(name).filter(|o| **o != Origin::Default);
        match (key.on_resume, explicit) {
            (OnResume::Invocation, _) => {}
            (_, Some(origin)) if mine != theirs => {
                if may_change(key) {
                    overrides.push(format!("{name} {} ({origin}) instead of the run's {}", show(mine), show(theirs)));
                    overridden.push(name);
                } else {
                    contradictions.push(format!("{name} = {} ({origin}) but the run has {}", show(mine), show(theirs)));
                }
            }
            _ => {
                merged.insert(name.to_string(), theirs.clone());
            }
        }
    }
    if !contradictions.is_empty() {
        return Err(ReconcileError::Contradicts(contradictions));
    }
    let config = RunConfig::from_map(merged).map_err(|e| ReconcileError::Damaged(e.to_string()))?;
    Ok(Reconciled { config, overrides, overridden })
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, RunArgs};

    fn resolved(flags: &[(&str, &str)]) -> Resolved {
        RunArgs { preset: None, flags: flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
            .resolve()
            .unwrap()
    }

    fn saved() -> Map<String, Value> {
        let mut c = RunConfig { learning_rate: 3e-3, max_steps: Some(100), n_layer: 2, ..RunConfig::default() };
        c.output_dir = "outputs/cc".into();
        c.to_map()
    }

    #[test]
    fn defaults_never_override_a_saved_setting() {
        // the bug this replaces: a resume with only the checkpoint trained at the default LR
        let r = reconcile(&saved(), &resolved(&[]), |_| true).unwrap();
        assert_eq!((r.config.learning_rate, r.config.max_steps, r.config.n_layer), (3e-3, Some(100), 2));
        assert!(r.overrides.is_empty());
        // this invocation's own folder is kept: the caller decides where a run continues
        assert_eq!(r.config.output_dir, "outputs/run");
    }

    #[test]
    fn an_allowed_flag_overrides_and_is_named_a_forbidden_one_is_refused() {
        let may = |k: &KeySpec| k.on_resume == OnResume::MayChange;
        let r = reconcile(&saved(), &resolved(&[("max_steps", "200"), ("learning_rate", "3e-3")]), may).unwrap();
        assert_eq!(r.config.max_steps, Some(200));
        assert_eq!(r.overrides, ["max_steps 200 (command line) instead of the run's 100"]);
        assert_eq!(r.overridden, ["max_steps"]);
        let e = reconcile(&saved(), &resolved(&[("learning_rate", "1e-4"), ("n_layer", "3")]), may).unwrap_err();
        let ReconcileError::Contradicts(lines) = e else { panic!("{e:?}") };
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("n_layer = 3 (command line) but the run has 2"), "{lines:?}");
    }

    #[test]
    fn a_saved_file_of_an_older_version_takes_defaults_for_what_it_lacks() {
        let mut old = saved();
        old.remove("sample_prompt");
        let flags: Overrides = vec![];
        let r = reconcile(&old, &crate::config::resolve(&[], &flags).unwrap(), |_| false).unwrap();
        assert_eq!(r.config.sample_prompt, None);
        let mut bad = saved();
        bad.insert("n_layer".into(), Value::from("two"));
        assert!(matches!(reconcile(&bad, &resolved(&[]), |_| false), Err(ReconcileError::Damaged(_))));
    }
}
