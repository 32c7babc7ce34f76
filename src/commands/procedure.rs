//! What a sweep or a study will run, resolved and checked before anything starts: shared by
//! the `sweep` and `study` commands and by the lab, which starts a procedure preset from the
//! picker.

use std::path::PathBuf;

use anyhow::Context;

use super::BadInput;
use crate::config::keys::parse_flag_value;
use crate::config::{Origin, RunArgs, RunConfig, SweepSpec};
use crate::data::prepare::default_cache_dir;
use crate::research::study::{self, Arm, RunPlan};
use crate::research::sweep::{self, SweepPlan};
use crate::train::output_dir::{lock_procedure, ProcedureLock};
use crate::tui::UiOptions;

/// A sweep ready to start.
pub struct Planned {
    /// The sweep's folder, held until the sweep ends.
    pub lock: ProcedureLock,
    pub base: RunConfig,
    pub preset: Option<String>,
    pub plan: SweepPlan,
    /// The resolution's warnings (accepted misspellings, notes), for the caller to show.
    pub warnings: Vec<String>,
}

/// The swept key and its values: a flag given a comma list, else the preset's `sweep:` (one
/// key, or a grid of two). Each trial is checked by resolving the run with its values.
pub fn plan(args: &RunArgs) -> anyhow::Result<Planned> {
    // a comma list sweeps its key, unless the key's values are lists themselves
    let swept = |(k, v): &&(String, String)| {
        v.contains(',')
            && crate::config::keys::find(k).is_none_or(|key| key.kind != crate::config::keys::ValueKind::List)
    };
    let lists: Vec<&(String, String)> = args.flags.iter().filter(swept).collect();
    if lists.len() > 1 {
        return Err(BadInput(format!(
            "sweep one key at a time from the command line (a grid of two goes in a preset's `sweep:`); got lists for {}",
            lists.iter().map(|(k, _)| format!("--{k}")).collect::<Vec<_>>().join(" and ")
        ))
        .into());
    }
    let fixed =
        RunArgs { preset: args.preset.clone(), flags: args.flags.iter().filter(|f| !swept(f)).cloned().collect() };
    let resolved = fixed.resolve()?;
    let spec = match lists.first() {
        Some((key, list)) => SweepSpec { axes: vec![(key.clone(), sweep_values(key, list)?)] },
        None => resolved.sweep.clone().ok_or_else(|| {
            BadInput("nothing to sweep: give one flag a list (e.g. --learning_rate 1e-3,3e-4,1e-4) or use a preset with `sweep:`".into())
        })?,
    };
    // a flag given one value for a swept key wins over the preset's list
    let axes: Vec<(String, Vec<serde_json::Value>)> = spec
        .axes
        .into_iter()
        .filter(|(k, _)| lists.first().is_some_and(|(l, _)| l == k) || !fixed.flags.iter().any(|(f, _)| f == k))
        .collect();
    let spec = SweepSpec { axes };
    let trials = spec.trials();
    if trials.len() < 2 {
        return Err(BadInput(format!(
            "{}: a sweep needs at least two values",
            spec.axes.iter().map(|a| format!("--{}", a.0)).collect::<Vec<_>>().join(", ")
        ))
        .into());
    }
    for trial in &trials {
        let mut flags = fixed.flags.clone();
        flags.extend(trial.iter().map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_string))));
        RunArgs { preset: fixed.preset.clone(), flags }
            .resolve()
            .with_context(|| format!("the trial {}", SweepPlan::label(trial)))?;
    }
    // every trial's folder checked before anything runs: one that holds a run with other
    // settings stops the sweep here (exit 2), the folder as it was; a second sweep into the
    // same folder is refused at once
    let root = PathBuf::from(&resolved.config.output_dir);
    let lock = lock_procedure(&root).map_err(|e| BadInput(e.to_string()))?;
    for trial in &trials {
        let checked = sweep::with_values(&resolved.config, trial, &root.join(SweepPlan::label(trial)))
            .map_err(BadInput)
            .and_then(|cfg| {
                study::plan(&cfg).map_err(|e| BadInput(format!("the trial {}: {e}", SweepPlan::label(trial))))
            });
        if let Err(e) = checked {
            lock.abandon();
            return Err(e.into());
        }
    }
    let keys = spec.axes.iter().map(|a| a.0.clone()).collect();
    Ok(Planned {
        lock,
        base: resolved.config,
        preset: resolved.preset,
        plan: SweepPlan { keys, trials },
        warnings: resolved.warnings,
    })
}

/// A flag's comma list as the values to sweep: each typed by its key; an empty place or a value
/// given twice is refused, quoting the list.
fn sweep_values(key: &str, list: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut values: Vec<serde_json::Value> = vec![];
    for (i, raw) in list.split(',').map(str::trim).enumerate() {
        if raw.is_empty() {
            return Err(BadInput(format!(
                "--{key} {list:?}: value {} of the list is empty; give values separated by single commas",
                i + 1
            ))
            .into());
        }
        let value = parse_flag_value(key, raw)?;
        if values.contains(&value) {
            return Err(
                BadInput(format!("--{key} {list:?}: {raw} is given twice; a sweep runs each value once")).into()
            );
        }
        values.push(value);
    }
    Ok(values)
}

#[derive(Debug, Clone, PartialEq)]
pub struct StudyArgs {
    pub run: RunArgs,
    /// Each arm as given: `research=true,learning_rate=5e-4`, or `preset=sanity-diff`.
    pub arms: Vec<String>,
    /// `3` (three seeds from the run's seed up) or `1,2,3`; `None`: the preset's, else 3.
    pub seeds: Option<String>,
    pub ui: UiOptions,
}

/// The seeds: a count N (the run's seed and the N-1 after it) or a list.
pub fn seeds(spec: &str, first: u64) -> Result<Vec<u64>, BadInput> {
    let bad = || BadInput(format!("--seeds {spec:?}: give a count (--seeds 3) or a list (--seeds 1,2,3)"));
    if spec.contains(',') {
        let list: Vec<u64> = spec.split(',').map(|s| s.trim().parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
        let mut unique = list.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != list.len() {
            return Err(BadInput(format!("--seeds {spec:?}: a seed is listed twice")));
        }
        return Ok(list);
    }
    let n: u64 = spec.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    Ok((first..first + n).collect())
}

/// An arm's flags: its `key=value` overrides after the study's own flags, its preset if it
/// names one (`preset=NAME`).
fn arm_args(base: &RunArgs, spec: &str) -> Result<RunArgs, BadInput> {
    if spec.trim().is_empty() {
        return Err(BadInput(format!(
            "--arm {spec:?} is empty: give an arm its settings (e.g. --arm research=true) or a preset (--arm preset=sanity-diff)"
        )));
    }
    let mut args = base.clone();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(BadInput(format!(
                "--arm {spec:?}: {part:?} is not key=value (e.g. --arm research=true,learning_rate=5e-4)"
            )));
        };
        let (key, value) = (key.trim().trim_start_matches("--"), value.trim());
        if key == "preset" {
            args.preset = Some(value.into());
        } else if crate::config::keys::is_procedures_own(key) {
            return Err(BadInput(format!(
                "--arm {spec:?}: {key} is the study's, not an arm's (--output_dir for the study, --seeds for the seeds)"
            )));
        } else {
            args.flags.push((key.into(), value.into()));
        }
    }
    Ok(args)
}

/// A study ready to start: its folder, arms, seeds and what happens to each run.
pub struct Prepared {
    /// The study's folder, held until the study ends.
    pub lock: ProcedureLock,
    pub root: PathBuf,
    pub arms: Vec<Arm>,
    pub seeds: Vec<u64>,
    pub plans: Vec<RunPlan>,
    /// The context lengths every finished run is evaluated at (none: only the training one).
    pub lengths: Vec<usize>,
    /// The resolutions' warnings, each once, for the caller to show.
    pub warnings: Vec<String>,
}

impl Prepared {
    pub fn labels(&self) -> Vec<String> {
        self.arms.iter().map(|a| a.label.clone()).collect()
    }

    pub fn spawn(self) -> study::StudyHandle {
        study::spawn(self.root, self.arms, self.seeds, self.plans, self.lengths, default_cache_dir(), self.lock)
    }
}

/// Resolves the arms and seeds and checks every run's folder, before anything runs.
pub fn prepare(args: &StudyArgs) -> anyhow::Result<Prepared> {
    let (run, lengths) = study_lengths(&args.run)?;
    let args = &StudyArgs { run, ..args.clone() };
    let base = args.run.resolve()?;
    let mut warnings = base.warnings.clone();
    // a study's folder is the command line's, or a study preset's own; a plain run's preset
    // (`demo`: outputs/demo) names a run's folder, not a study's, so it does not count
    let own_folder = match base.origins.get("output_dir") {
        Some(Origin::CommandLine) => true,
        Some(Origin::Preset(_)) => base.study.is_some(),
        _ => false,
    };
    let root = PathBuf::from(if own_folder { base.config.output_dir.clone() } else { "outputs/study".into() });
    // the arms: from --arm, else the preset's `study:` (its settings under the flags)
    let specs: Vec<(String, RunArgs)> = if !args.arms.is_empty() {
        args.arms
            .iter()
            .map(|spec| Ok((spec.trim().to_string(), arm_args(&args.run, spec)?)))
            .collect::<Result<_, BadInput>>()?
    } else if let Some(study) = &base.study {
        study
            .arms
            .iter()
            .map(|(label, values)| {
                let mut flags: Vec<(String, String)> =
                    values.iter().map(|(k, v)| (k.clone(), v.as_str().map_or(v.to_string(), str::to_string))).collect();
                flags.extend(args.run.flags.iter().cloned());
                (label.clone(), RunArgs { preset: args.run.preset.clone(), flags })
            })
            .collect()
    } else {
        return Err(BadInput(
            "a study needs arms: --arm research=false --arm research=true (two or more), or a preset with `study:` (e.g. --preset demo-study)".into(),
        )
        .into());
    };
    let mut arms = vec![];
    for (label, arm_args) in specs {
        let resolved = arm_args.resolve().with_context(|| format!("the arm {label:?}"))?;
        warnings.extend(resolved.warnings.iter().filter(|w| !warnings.contains(w)).cloned().collect::<Vec<_>>());
        let mut config = resolved.config;
        if !resolved.origins.get("eval_on_start").is_some_and(|o| *o != Origin::Default) {
            config.eval_on_start = true;
        }
        arms.push(Arm { label, config, preset: resolved.preset });
    }
    let seed_spec = match (&args.seeds, &base.study) {
        (Some(s), _) => s.clone(),
        (None, Some(study)) => study.seeds.to_string(),
        (None, None) => "3".into(),
    };
    let seeds = seeds(&seed_spec, base.config.seed)?;
    study::check_arms(&arms, &seeds).map_err(|e| BadInput(e.to_string()))?;
    // a second study into this folder is refused at once, before it reads a run
    let lock = lock_procedure(&root).map_err(|e| BadInput(e.to_string()))?;
    let order = study::plan::order(arms.len(), &seeds);
    let plans = order
        .iter()
        .map(|&(a, s)| study::plan(&study::run_config(&root, &arms[a], s)))
        .collect::<Result<Vec<RunPlan>, _>>();
    let plans = match plans {
        Ok(plans) => plans,
        Err(e) => {
            lock.abandon();
            return Err(BadInput(e.to_string()).into());
        }
    };
    Ok(Prepared { lock, root, arms, seeds, plans, lengths, warnings })
}

/// A study's `context_lengths` (the flag's, else its preset's) are the study's, not its runs':
/// every finished run is evaluated at them (a learned-position arm up to its block size), and the
/// runs themselves train without them. Returns the run arguments without them, and the lengths.
fn study_lengths(run: &RunArgs) -> anyhow::Result<(RunArgs, Vec<usize>)> {
    let from_flag = run.flags.iter().rev().find(|(k, _)| k == "context_lengths").map(|(_, v)| v.clone());
    let from_preset = || -> Result<Option<String>, crate::config::ConfigError> {
        let Some(preset) = &run.preset else { return Ok(None) };
        let chain = crate::config::PresetLibrary::load().chain(preset)?;
        Ok(chain.iter().rev().find_map(|p| p.values.get("context_lengths")?.as_str().map(str::to_string)))
    };
    let raw = match from_flag {
        Some(raw) => raw,
        None => from_preset()?.unwrap_or_default(),
    };
    let lengths = crate::config::parse_lengths(&raw).map_err(|problem| {
        BadInput(format!("--context_lengths {raw:?}: {problem}; give whole numbers >= 2, e.g. 256,512,1024"))
    })?;
    let mut run = run.clone();
    run.flags.retain(|(k, _)| k != "context_lengths");
    if !lengths.is_empty() {
        run.flags.push(("context_lengths".into(), String::new()));
    }
    Ok((run, lengths))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_study_goes_to_its_own_folder_not_a_run_presets() {
        let root = |preset: &str, flags: &[(&str, &str)], arms: &[&str]| {
            let run = RunArgs {
                preset: Some(preset.into()),
                flags: flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            };
            let args = StudyArgs {
                run,
                arms: arms.iter().map(|a| a.to_string()).collect(),
                seeds: Some("1".into()),
                ui: UiOptions::default(),
            };
            prepare(&args).unwrap().root
        };
        let arms = ["research=false", "research=true"];
        // demo's outputs/demo is a run's folder: the study goes to outputs/study
        assert_eq!(root("demo", &[], &arms), PathBuf::from("outputs/study"));
        assert_eq!(root("demo-study", &[], &[]), PathBuf::from("outputs/demo-study"));
        assert_eq!(root("demo", &[("output_dir", "elsewhere")], &arms), PathBuf::from("elsewhere"));
    }

    #[test]
    fn seeds_are_a_count_from_the_runs_seed_or_a_list() {
        assert_eq!(seeds("3", 42).unwrap(), vec![42, 43, 44]);
        assert_eq!(seeds("7, 1", 42).unwrap(), vec![7, 1]);
        assert!(seeds("0", 42).is_err() && seeds("x", 1).is_err() && seeds("1,1", 1).is_err());
    }

    #[test]
    fn an_arm_is_overrides_after_the_studys_flags() {
        let base = RunArgs { preset: Some("demo".into()), flags: vec![("max_steps".into(), "10".into())] };
        let a = arm_args(&base, "research=true, learning_rate=5e-4").unwrap();
        assert_eq!(a.flags.last().unwrap(), &("learning_rate".to_string(), "5e-4".to_string()));
        assert_eq!(arm_args(&base, "preset=sanity-diff").unwrap().preset.as_deref(), Some("sanity-diff"));
        assert!(arm_args(&base, "research").is_err());
        assert!(arm_args(&base, "seed=3").unwrap_err().0.contains("--seeds"));
    }
}
