//! `difflab study`: arms x seeds, headless or in the TUI, and the answer with error bars.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{resolve_run, BadInput};
use crate::config::{RunArgs, Source};
use crate::data::prepare::default_cache_dir;
use crate::events::Event;
use crate::signals::Interrupts;
use crate::sinks::human::describe;
use crate::sweep::study::{self, Arm, Plan, StudyEvent};
use crate::tui::UiOptions;

#[derive(Debug, Clone, PartialEq)]
pub struct StudyArgs {
    pub run: RunArgs,
    /// Each arm as given: `research=true,learning_rate=5e-4`, or `preset=sanity-diff`.
    pub arms: Vec<String>,
    /// `3` (three seeds from the run's seed up) or `1,2,3`.
    pub seeds: String,
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
        } else if ["output_dir", "seed"].contains(&key) {
            return Err(BadInput(format!(
                "--arm {spec:?}: {key} is the study's, not an arm's (--output_dir for the study, --seeds for the seeds)"
            )));
        } else {
            args.flags.push((key.into(), value.into()));
        }
    }
    Ok(args)
}

pub fn run(args: &StudyArgs) -> anyhow::Result<ExitCode> {
    let base = resolve_run(&args.run)?;
    // a study's default folder is its own, and it scores the untrained model too (the curves'
    // common start) unless told otherwise
    let explicit = |key: &str| base.origins.get(key).is_some_and(|o| *o != Source::Default);
    let root =
        PathBuf::from(if explicit("output_dir") { base.config.output_dir.clone() } else { "outputs/study".into() });
    let mut arms = vec![];
    for spec in &args.arms {
        let arm_args = arm_args(&args.run, spec)?;
        let resolved = resolve_run(&arm_args).with_context(|| format!("the arm {spec:?}"))?;
        let mut config = resolved.config;
        if !resolved.origins.get("eval_on_start").is_some_and(|o| *o != Source::Default) {
            config.eval_on_start = true;
        }
        arms.push(Arm { label: spec.trim().to_string(), config, preset: resolved.preset });
    }
    let seeds = seeds(&args.seeds, base.config.seed)?;
    study::check_arms(&arms, &seeds).map_err(|e| BadInput(e.to_string()))?;
    let order = study::order(arms.len(), &seeds);
    let plans = order
        .iter()
        .map(|&(a, s)| study::plan(&study::run_config(&root, &arms[a], s)))
        .collect::<Result<Vec<Plan>, _>>()
        .map_err(|e| BadInput(e.to_string()))?;
    let reused = plans.iter().filter(|p| **p == Plan::Reuse).count();
    eprintln!(
        "[study] {} arms x {} seeds {:?} = {} runs in {}{}",
        arms.len(),
        seeds.len(),
        seeds,
        order.len(),
        root.display(),
        if reused > 0 { format!(" ({reused} finished earlier: reused)") } else { String::new() }
    );
    let labels: Vec<String> = arms.iter().map(|a| a.label.clone()).collect();
    let handle = study::spawn(root.clone(), arms, seeds, plans, default_cache_dir());
    if args.ui.draws() {
        return super::lab::study(handle, &root, labels, args.ui);
    }
    // Ctrl-C stops the running run with a checkpoint and skips the rest; a second one exits
    Interrupts::exit_on_second(handle.stop.flag())?;
    Interrupts::set_flag(handle.stop.flag())?;
    let mut current = String::new();
    let mut done = None;
    for e in handle.events.iter() {
        match e {
            StudyEvent::RunStart { index, of, arm, seed, plan } => {
                current = format!("{} s{seed}", labels[arm]);
                eprintln!("[study] run {}/{of}: {current} ({plan})", index + 1);
            }
            StudyEvent::Train { event, .. } => {
                if let Some(line) = describe(&event).filter(|_| !matches!(event, Event::Prepare(_))) {
                    eprintln!("[{current}] {line}");
                }
            }
            StudyEvent::RunEnd { result, .. } => {
                let loss = result.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
                eprintln!("[study] {current}: {} (final eval loss {loss})", result.status);
            }
            StudyEvent::Done(summary) => {
                print!("{}", study::table(&summary));
                println!("study: {}", root.join("study.json").display());
                println!("figures: {}", root.join("figures").display());
                done = Some(summary.complete);
            }
        }
    }
    handle.join();
    Ok(match done {
        Some(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
