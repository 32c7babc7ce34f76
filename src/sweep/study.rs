//! A study: two or more arms (settings) times N seeds, each a full run in
//! `<output_dir>/<arm>/seed-<s>`, and the answer with error bars: per arm the final and best
//! eval loss and perplexity (mean ± sd over seeds), each arm's difference from the first paired
//! by seed with a 95% t interval, tokens seen, and the settings the arms differ in.
//!
//! Every arm sees the same data and tokenizer (arms that differ in them are refused), and the
//! same seed gives every arm the same data order, so differences pair by seed. A study resumes:
//! a finished run with the same settings is reused, an interrupted one resumes from its last
//! checkpoint, and a folder holding a run with other settings stops the study before it starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use serde::Serialize;

use super::compare::{self, Run};
use crate::config::RunConfig;
use crate::events::{Event, RunStatus};
use crate::sinks::figures::{self, Band, Extras, Line, XAxis};
use crate::sinks::{self, metrics::METRICS_FILE};
use crate::train::{self, RunSpec, StopSignal};

/// One arm: its label (the overrides it was given, or its preset) and its resolved settings.
#[derive(Debug, Clone)]
pub struct Arm {
    pub label: String,
    pub config: RunConfig,
    pub preset: Option<String>,
}

/// Keys that say what a model is trained and scored on: arms must agree on them.
pub const DATA_KEYS: [&str; 7] =
    ["dataset", "dataset_config", "subset_ratio", "tokenizer", "block_size", "eval_split", "eval_max_blocks"];

/// Keys that may differ between a run's saved settings and the study's without making it
/// another run: where it lives and how it was (re)started.
const PLACE_KEYS: [&str; 3] = ["output_dir", "resume_from_checkpoint", "overwrite_output_dir"];

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("a study needs at least two arms (e.g. --arm research=false --arm research=true); got {0}")]
    TooFewArms(usize),
    #[error("a study needs at least one seed (--seeds 3, or --seeds 1,2,3)")]
    NoSeeds,
    #[error("arms must train and score on the same data; they differ in {key}: {values}. Set it once for the study, not per arm")]
    DataDiffers { key: String, values: String },
    #[error("two arms have the same label {0:?}; give them different settings")]
    SameLabel(String),
    #[error("{dir} holds a run with other settings ({differences}); give the study a new --output_dir, or remove that folder")]
    Stale { dir: PathBuf, differences: String },
}

/// What happens to one (arm, seed) run when the study starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Finished earlier with the same settings: read, not run.
    Reuse,
    /// Interrupted after a checkpoint: continued from it.
    Resume,
    /// Run from the start (a folder left without a checkpoint is cleared).
    Fresh { clear: bool },
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Plan::Reuse => "finished earlier: reused",
            Plan::Resume => "resumed from its last checkpoint",
            Plan::Fresh { clear: true } => "from the start (its folder held no checkpoint)",
            Plan::Fresh { clear: false } => "from the start",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedResult {
    pub arm: String,
    pub seed: u64,
    pub output_dir: String,
    /// "completed", "reused", "stopped", "failed" or "skipped".
    pub status: String,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub steps: u64,
    pub tokens_seen: Option<u64>,
    /// `(step, eval loss)`.
    pub eval_curve: Vec<(f64, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl SeedResult {
    fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "reused")
    }
}

/// Mean and sample standard deviation (n - 1) of a few numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    /// `None` for a single value.
    pub sd: Option<f64>,
    pub n: usize,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Option<Stat> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = (n > 1).then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Some(Stat { mean, sd, n })
    }

    fn text(&self, decimals: usize) -> String {
        match self.sd {
            Some(sd) => format!("{:.p$} ± {sd:.p$}", self.mean, p = decimals),
            None => format!("{:.p$}", self.mean, p = decimals),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmSummary {
    pub label: String,
    pub seeds_finished: usize,
    pub final_eval_loss: Option<Stat>,
    pub best_eval_loss: Option<Stat>,
    pub final_perplexity: Option<Stat>,
    /// The same for every finished seed of an arm, or the smallest and largest.
    pub tokens_seen: Option<(u64, u64)>,
}

/// An arm's final eval loss minus the first arm's, paired by seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub arm: String,
    pub against: String,
    pub seeds: Vec<u64>,
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    /// The 95% interval of the mean difference, `mean ± t(0.975, n-1) sd / sqrt(n)`.
    pub interval: Option<(f64, f64)>,
    pub t_quantile: Option<f64>,
    /// What the interval is worth: "n = 2: t = 12.71, the interval is too wide to mean much".
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub arms: Vec<ArmSummary>,
    pub differences: Vec<Difference>,
    pub seeds: Vec<u64>,
    pub runs: Vec<SeedResult>,
    /// The settings the arms differ in, each arm's value.
    pub differing_keys: BTreeMap<String, Vec<serde_json::Value>>,
    /// What every figure was computed on: "builtin, validation split (64 of all blocks), ..."
    pub evaluated_on: String,
    /// Every run finished (none stopped, failed or skipped).
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StudyEvent {
    RunStart { index: usize, of: usize, arm: usize, seed: u64, plan: Plan },
    Train { index: usize, event: Event },
    RunEnd { index: usize, result: SeedResult },
    Done(Summary),
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (table to 30, then
/// 2.0 to 1.96: within 2% beyond).
pub fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        31..=60 => 2.0,
        _ => 1.96,
    }
}

/// The arm's directory name: its label with path separators replaced.
pub fn arm_dir(label: &str) -> String {
    label.replace(['/', '\\', ' '], "_").replace(',', "+")
}

/// Checks the arms against each other before anything runs.
pub fn check_arms(arms: &[Arm], seeds: &[u64]) -> Result<(), StudyError> {
    if arms.len() < 2 {
        return Err(StudyError::TooFewArms(arms.len()));
    }
    if seeds.is_empty() {
        return Err(StudyError::NoSeeds);
    }
    let values: Vec<serde_json::Value> =
        arms.iter().map(|a| serde_json::to_value(&a.config).unwrap_or_default()).collect();
    for key in DATA_KEYS {
        let vals: Vec<&serde_json::Value> = values.iter().map(|v| &v[key]).collect();
        if vals.windows(2).any(|w| w[0] != w[1]) {
            let values = arms.iter().zip(&vals).map(|(a, v)| format!("{} in {}", v, a.label)).collect::<Vec<_>>();
            return Err(StudyError::DataDiffers { key: key.into(), values: values.join(", ") });
        }
    }
    let mut labels: Vec<String> = arms.iter().map(|a| arm_dir(&a.label)).collect();
    labels.sort();
    if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
        return Err(StudyError::SameLabel(w[0].clone()));
    }
    Ok(())
}

/// The settings of one (arm, seed) run.
pub fn run_config(root: &Path, arm: &Arm, seed: u64) -> RunConfig {
    let mut cfg = arm.config.clone();
    cfg.seed = seed;
    cfg.output_dir = root.join(arm_dir(&arm.label)).join(format!("seed-{seed}")).display().to_string();
    cfg.resume_from_checkpoint = None;
    cfg.overwrite_output_dir = false;
    cfg
}

/// How the run in `cfg.output_dir` starts: reused, resumed or fresh; a folder holding another
/// run's results is an error naming the settings that differ.
pub fn plan(cfg: &RunConfig) -> Result<Plan, StudyError> {
    let dir = Path::new(&cfg.output_dir);
    if !dir.join(METRICS_FILE).is_file() {
        return Ok(Plan::Fresh { clear: dir.is_dir() });
    }
    let Ok(earlier) = compare::load(dir) else { return Ok(Plan::Fresh { clear: true }) };
    let wanted = serde_json::to_value(cfg).unwrap_or_default();
    let differences: Vec<String> = earlier
        .config
        .iter()
        .filter(|(k, _)| !PLACE_KEYS.contains(&k.as_str()))
        .filter(|(k, v)| wanted.get(k.as_str()).is_some_and(|w| w != *v))
        .map(|(k, v)| format!("{k} {v} there, {} here", wanted[k.as_str()]))
        .collect();
    if !differences.is_empty() && !earlier.config.is_empty() {
        return Err(StudyError::Stale { dir: dir.to_path_buf(), differences: differences.join(", ") });
    }
    if earlier.status.as_deref() == Some("completed") {
        return Ok(Plan::Reuse);
    }
    let has_checkpoint = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")))
        .unwrap_or(false);
    Ok(if has_checkpoint { Plan::Resume } else { Plan::Fresh { clear: true } })
}

pub struct StudyHandle {
    pub events: Receiver<StudyEvent>,
    pub stop: StopSignal,
    thread: JoinHandle<Summary>,
}

impl StudyHandle {
    pub fn join(self) -> Option<Summary> {
        self.thread.join().ok()
    }
}

/// Runs every (arm, seed) in turn (seed-major: after the first seed every arm has a result).
pub fn spawn(root: PathBuf, arms: Vec<Arm>, seeds: Vec<u64>, plans: Vec<Plan>, cache_dir: PathBuf) -> StudyHandle {
    let (tx, events) = unbounded();
    let stop = StopSignal::default();
    let stop_for_thread = stop.clone();
    let thread = std::thread::Builder::new()
        .name("difflab-study".into())
        .spawn(move || run(&root, &arms, &seeds, &plans, &cache_dir, &tx, &stop_for_thread))
        .unwrap_or_else(|e| panic!("cannot start the study thread: {e}"));
    StudyHandle { events, stop, thread }
}

/// The order runs go in: `(arm, seed)`, seed-major.
pub fn order(arms: usize, seeds: &[u64]) -> Vec<(usize, u64)> {
    seeds.iter().flat_map(|&s| (0..arms).map(move |a| (a, s))).collect()
}

fn run(
    root: &Path,
    arms: &[Arm],
    seeds: &[u64],
    plans: &[Plan],
    cache_dir: &Path,
    tx: &Sender<StudyEvent>,
    stop: &StopSignal,
) -> Summary {
    let order = order(arms.len(), seeds);
    let mut results = vec![];
    for (index, ((arm_index, seed), plan)) in order.iter().zip(plans).enumerate() {
        let arm = &arms[*arm_index];
        let cfg = run_config(root, arm, *seed);
        let result = if stop.requested() {
            SeedResult {
                status: "skipped".into(),
                note: Some("the study was stopped".into()),
                ..empty(&arm.label, *seed, &cfg.output_dir)
            }
        } else {
            let _ = tx.send(StudyEvent::RunStart {
                index,
                of: order.len(),
                arm: *arm_index,
                seed: *seed,
                plan: plan.clone(),
            });
            one_run(cfg, arm, *seed, plan, cache_dir, index, tx, stop)
        };
        let _ = tx.send(StudyEvent::RunEnd { index, result: result.clone() });
        results.push(result);
    }
    let summary = summarize(arms, seeds, results);
    let _ = write(root, &summary);
    let _ = tx.send(StudyEvent::Done(summary.clone()));
    summary
}

fn empty(arm: &str, seed: u64, dir: &str) -> SeedResult {
    SeedResult {
        arm: arm.into(),
        seed,
        output_dir: dir.into(),
        status: "failed".into(),
        final_eval_loss: None,
        best_eval_loss: None,
        steps: 0,
        tokens_seen: None,
        eval_curve: vec![],
        note: None,
    }
}

/// A run's result from its `metrics.jsonl`.
fn read_result(arm: &str, seed: u64, dir: &Path, status: &str) -> SeedResult {
    let mut r = empty(arm, seed, &dir.display().to_string());
    r.status = status.into();
    match compare::load(dir) {
        Ok(run) => fill(&mut r, &run),
        Err(e) => {
            r.status = "failed".into();
            r.note = Some(e.to_string());
        }
    }
    r
}

fn fill(r: &mut SeedResult, run: &Run) {
    r.final_eval_loss = run.final_eval_loss;
    r.best_eval_loss = run.eval.iter().map(|e| e.1).filter(|v| v.is_finite()).min_by(f64::total_cmp);
    r.steps = run.steps;
    r.tokens_seen = run.tokens_seen;
    r.eval_curve = run.eval.clone();
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    mut cfg: RunConfig,
    arm: &Arm,
    seed: u64,
    plan: &Plan,
    cache_dir: &Path,
    index: usize,
    tx: &Sender<StudyEvent>,
    stop: &StopSignal,
) -> SeedResult {
    let dir = PathBuf::from(&cfg.output_dir);
    match plan {
        Plan::Reuse => return read_result(&arm.label, seed, &dir, "reused"),
        Plan::Resume => cfg.resume_from_checkpoint = Some("latest".into()),
        Plan::Fresh { clear } => cfg.overwrite_output_dir = *clear,
    }
    let mut result = empty(&arm.label, seed, &cfg.output_dir);
    let _claim = match train::output_dir::claim(&cfg) {
        Ok(claim) => claim,
        Err(e) => {
            result.note = Some(e.to_string());
            return result;
        }
    };
    let mut sinks = sinks::file_sinks(&dir, &cfg).unwrap_or_default();
    let spec = RunSpec {
        config: cfg,
        preset: arm.preset.clone(),
        cache_dir: cache_dir.to_path_buf(),
        inject_nonfinite: vec![],
        world: Default::default(),
    };
    let handle = train::spawn_with(spec, stop.clone());
    for event in handle.events.iter() {
        sinks.handle(&event);
        let _ = tx.send(StudyEvent::Train { index, event });
    }
    sinks.finish();
    let status = match handle.join() {
        Ok(end) if end.status == RunStatus::Completed => "completed",
        Ok(_) => "stopped",
        Err(e) => {
            result.note = Some(e.to_string());
            "failed"
        }
    };
    let note = result.note.take();
    let mut result = read_result(&arm.label, seed, &dir, status);
    result.note = note.or(result.note);
    if status != "completed" {
        result.status = status.into();
    }
    result
}

/// The numbers of the study from its runs' results.
pub fn summarize(arms: &[Arm], seeds: &[u64], runs: Vec<SeedResult>) -> Summary {
    fn finished_of<'a>(runs: &'a [SeedResult], label: &'a str) -> impl Iterator<Item = &'a SeedResult> + 'a {
        runs.iter().filter(move |r| r.arm == label && r.finished())
    }

    let arm_summaries: Vec<ArmSummary> = arms
        .iter()
        .map(|a| {
            let finals: Vec<f64> = finished_of(&runs, &a.label).filter_map(|r| r.final_eval_loss).collect();
            let bests: Vec<f64> = finished_of(&runs, &a.label).filter_map(|r| r.best_eval_loss).collect();
            let tokens: Vec<u64> = finished_of(&runs, &a.label).filter_map(|r| r.tokens_seen).collect();
            ArmSummary {
                label: a.label.clone(),
                seeds_finished: finished_of(&runs, &a.label).count(),
                final_eval_loss: Stat::of(&finals),
                best_eval_loss: Stat::of(&bests),
                final_perplexity: Stat::of(&finals.iter().map(|l| l.exp()).collect::<Vec<_>>()),
                tokens_seen: tokens.iter().min().zip(tokens.iter().max()).map(|(a, b)| (*a, *b)),
            }
        })
        .collect();
    let first = &arms[0].label;
    let final_of = |arm: &str, seed: u64| {
        runs.iter().find(|r| r.arm == arm && r.seed == seed && r.finished()).and_then(|r| r.final_eval_loss)
    };
    let differences = arms[1..]
        .iter()
        .map(|a| {
            let pairs: Vec<(u64, f64)> =
                seeds.iter().filter_map(|&s| Some((s, final_of(&a.label, s)? - final_of(first, s)?))).collect();
            difference(&a.label, first, &pairs)
        })
        .collect();
    let configs: Vec<Run> = arms
        .iter()
        .map(|a| {
            let mut config = match serde_json::to_value(&a.config) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => Default::default(),
            };
            config.remove("seed");
            Run {
                dir: PathBuf::new(),
                name: a.label.clone(),
                loss: vec![],
                eval: vec![],
                final_eval_loss: None,
                final_perplexity: None,
                status: None,
                config,
                tokens_seen: None,
                steps: 0,
                marks: vec![],
            }
        })
        .collect();
    let evaluated_on = arms[0].config.evaluated_on();
    let complete = runs.iter().all(SeedResult::finished) && runs.len() == arms.len() * seeds.len();
    Summary {
        arms: arm_summaries,
        differences,
        seeds: seeds.to_vec(),
        differing_keys: compare::differing_keys(&configs),
        runs,
        evaluated_on,
        complete,
    }
}

/// The paired difference of `pairs` (seed, arm - first) with its 95% interval.
pub fn difference(arm: &str, against: &str, pairs: &[(u64, f64)]) -> Difference {
    let ds: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let stat = Stat::of(&ds);
    let (interval, t, note) = match stat {
        Some(Stat { mean, sd: Some(sd), n }) => {
            let t = t_975(n - 1);
            let half = t * sd / (n as f64).sqrt();
            let note = if n < 3 {
                format!("n = {n}: t = {t:.2}, the interval is too wide to mean much; run 3 or more seeds")
            } else {
                let verdict = if mean + half < 0.0 || mean - half > 0.0 {
                    "excludes 0: the arms differ at 95%"
                } else {
                    "includes 0: no difference shown at 95%"
                };
                format!("n = {n}, t = {t:.3}: the interval {verdict}")
            };
            (Some((mean - half, mean + half)), Some(t), note)
        }
        Some(_) => (None, None, "one seed: no interval (run 3 or more seeds)".to_string()),
        None => (None, None, "no seed finished in both arms".to_string()),
    };
    Difference {
        arm: arm.into(),
        against: against.into(),
        seeds: pairs.iter().map(|p| p.0).collect(),
        mean: stat.map(|s| s.mean),
        sd: stat.and_then(|s| s.sd),
        interval,
        t_quantile: t,
        note,
    }
}

/// The study as text: the arms' table, the differences, the settings that differ.
pub fn table(s: &Summary) -> String {
    let mut out = format!("evaluated on {}; seeds {:?}\n", s.evaluated_on, s.seeds);
    let w = s.arms.iter().map(|a| a.label.chars().count()).max().unwrap_or(3).max(3);
    out.push_str(&format!(
        "{:<w$}  {:>5}  {:>17}  {:>17}  {:>15}  {:>12}\n",
        "arm", "seeds", "final eval loss", "best eval loss", "final ppl", "tokens seen"
    ));
    let stat = |x: &Option<Stat>, d: usize| x.as_ref().map_or("-".into(), |s| s.text(d));
    for a in &s.arms {
        let tokens = match a.tokens_seen {
            Some((lo, hi)) if lo == hi => lo.to_string(),
            Some((lo, hi)) => format!("{lo}-{hi}"),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<w$}  {:>5}  {:>17}  {:>17}  {:>15}  {:>12}\n",
            a.label,
            a.seeds_finished,
            stat(&a.final_eval_loss, 4),
            stat(&a.best_eval_loss, 4),
            stat(&a.final_perplexity, 2),
            tokens
        ));
    }
    for d in &s.differences {
        let mean = d.mean.map_or("-".into(), |m| format!("{m:+.4}"));
        let interval = d.interval.map_or(String::new(), |(lo, hi)| format!(", 95% CI [{lo:+.4}, {hi:+.4}]"));
        out.push_str(&format!(
            "{} - {} (final eval loss, paired by seed): {mean}{interval}; {}\n",
            d.arm, d.against, d.note
        ));
    }
    let tokens: Vec<(u64, u64)> = s.arms.iter().filter_map(|a| a.tokens_seen).collect();
    if tokens.windows(2).any(|w| w[0] != w[1]) || tokens.iter().any(|(lo, hi)| lo != hi) {
        out.push_str(
            "the runs saw different numbers of training tokens: their losses are not comparable as they stand\n",
        );
    }
    if !s.differing_keys.is_empty() {
        let keys: Vec<String> = s
            .differing_keys
            .iter()
            .map(|(k, vs)| format!("{k} ({})", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" | ")))
            .collect();
        out.push_str(&format!("the arms differ in: {}\n", keys.join(", ")));
    }
    for r in s.runs.iter().filter(|r| !r.finished()) {
        out.push_str(&format!(
            "{} seed {}: {}{}\n",
            r.arm,
            r.seed,
            r.status,
            r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
        ));
    }
    out
}

/// `study.json` and the figures under `<root>/figures/`.
pub fn write(root: &Path, s: &Summary) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("figures"))?;
    let json = serde_json::to_string_pretty(s).map_err(std::io::Error::other)?;
    crate::atomic_file::write(&root.join("study.json"), json.as_bytes())?;
    for (name, png) in render(s)? {
        crate::atomic_file::write(&root.join("figures").join(format!("{name}.png")), &png.bytes)?;
    }
    Ok(())
}

/// `(step, mean, min, max)` of eval loss over seeds, at each step every seed reached.
pub type SeedBand = Vec<(f64, f64, f64, f64)>;

/// Per arm, its band over its finished seeds.
pub fn bands(s: &Summary) -> Vec<(String, SeedBand)> {
    s.arms
        .iter()
        .map(|a| {
            let curves: Vec<&Vec<(f64, f64)>> =
                s.runs.iter().filter(|r| r.arm == a.label && r.finished()).map(|r| &r.eval_curve).collect();
            (a.label.clone(), band_of(&curves))
        })
        .collect()
}

/// `(step, mean, min, max)` over the curves, at the steps all of them have.
pub fn band_of(curves: &[&Vec<(f64, f64)>]) -> SeedBand {
    let Some(first) = curves.first() else { return vec![] };
    first
        .iter()
        .filter_map(|&(step, _)| {
            let ys: Vec<f64> =
                curves.iter().filter_map(|c| c.iter().find(|p| p.0 == step).map(|p| p.1)).collect::<Vec<_>>();
            (ys.len() == curves.len()).then(|| {
                let mean = ys.iter().sum::<f64>() / ys.len() as f64;
                let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(*y), b.max(*y)));
                (step, mean, lo, hi)
            })
        })
        .collect()
}

fn render(s: &Summary) -> std::io::Result<Vec<(&'static str, figures::Png)>> {
    let mut bands = bands(s);
    // the untrained model's loss (ln V) would flatten every later difference: it is left out
    // of the chart and quoted in its title
    let start: Vec<f64> = bands.iter().filter_map(|(_, b)| b.first().filter(|p| p.0 == 0.0).map(|p| p.1)).collect();
    if bands.iter().all(|(_, b)| b.len() > 2) {
        bands.iter_mut().for_each(|(_, b)| b.retain(|p| p.0 > 0.0));
    }
    let start_note = match start.first() {
        Some(first) if bands.iter().all(|(_, b)| b.first().is_some_and(|p| p.0 > 0.0)) => {
            format!(" (step 0, left out: {first:.2})")
        }
        _ => String::new(),
    };
    let labels: Vec<String> = bands.iter().map(|(l, _)| format!("{l} (mean, band: min-max over seeds)")).collect();
    let lines: Vec<Line> = bands
        .iter()
        .zip(&labels)
        .enumerate()
        .map(|(i, ((_, b), label))| Line {
            label,
            points: b.iter().map(|p| (p.0, p.1)).collect(),
            color: figures::PALETTE[i % figures::PALETTE.len()],
            markers: false,
        })
        .collect();
    let extras = Extras {
        bands: bands
            .iter()
            .enumerate()
            .map(|(i, (_, b))| Band {
                points: b.iter().map(|p| (p.0, p.2, p.3)).collect(),
                color: figures::PALETTE[i % figures::PALETTE.len()],
            })
            .collect(),
        ..Default::default()
    };
    let title = format!("eval loss over {} seeds{start_note}", s.seeds.len());
    let curves = figures::chart_with(&title, XAxis::Steps, "eval loss (nats per token)", lines, extras)?;
    // the final loss of every seed, one column per arm
    let arms: Vec<String> = s.arms.iter().map(|a| a.label.clone()).collect();
    let seed_labels: Vec<String> = s.seeds.iter().map(|seed| format!("seed {seed}")).collect();
    let points: Vec<Line> = s
        .seeds
        .iter()
        .zip(&seed_labels)
        .enumerate()
        .map(|(i, (seed, label))| Line {
            label,
            points: s
                .arms
                .iter()
                .enumerate()
                .filter_map(|(a, arm)| {
                    let r = s.runs.iter().find(|r| r.arm == arm.label && r.seed == *seed && r.finished())?;
                    Some((a as f64, r.final_eval_loss?))
                })
                .collect(),
            color: figures::PALETTE[i % figures::PALETTE.len()],
            markers: true,
        })
        .collect();
    let extras = Extras { categories: arms, ..Default::default() };
    let finals = figures::chart_with("final eval loss per seed", XAxis::Categories, "eval loss", points, extras)?;
    Ok(vec![("study_eval_loss", curves), ("study_final_loss", finals)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_and_stats() {
        assert_eq!(t_975(1), 12.706);
        assert_eq!(t_975(2), 4.303);
        assert!(t_975(0).is_nan());
        let s = Stat::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.sd, s.n), (2.0, Some(1.0), 3));
        assert_eq!(Stat::of(&[5.0]).unwrap().sd, None);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn the_paired_interval_is_worked_out_and_small_n_is_said() {
        // differences -0.1, -0.2, -0.3: mean -0.2, sd 0.1, t(2) = 4.303: half width 0.24843
        let d = difference("b", "a", &[(1, -0.1), (2, -0.2), (3, -0.3)]);
        let (lo, hi) = d.interval.unwrap();
        let half = 4.303 * 0.1 / 3f64.sqrt();
        assert!((d.mean.unwrap() + 0.2).abs() < 1e-12);
        assert!((lo - (-0.2 - half)).abs() < 1e-9 && (hi - (-0.2 + half)).abs() < 1e-9, "{lo} {hi}");
        assert!(d.note.contains("includes 0"), "{}", d.note);
        let d = difference("b", "a", &[(1, -0.2), (2, -0.21), (3, -0.19)]);
        assert!(d.note.contains("excludes 0"), "{}", d.note);
        let d = difference("b", "a", &[(1, -0.1), (2, -0.3)]);
        assert!(d.note.contains("too wide") && d.t_quantile == Some(12.706), "{}", d.note);
        assert!(difference("b", "a", &[(1, 0.1)]).interval.is_none());
    }

    #[test]
    fn bands_take_the_steps_every_seed_reached() {
        let a = vec![(0.0, 5.0), (10.0, 3.0), (20.0, 2.0)];
        let b = vec![(0.0, 5.2), (10.0, 2.6)];
        let band = band_of(&[&a, &b]);
        assert_eq!(band.len(), 2);
        assert_eq!(band[1].0, 10.0);
        assert!((band[1].1 - 2.8).abs() < 1e-12 && band[1].2 == 2.6 && band[1].3 == 3.0);
    }
}
