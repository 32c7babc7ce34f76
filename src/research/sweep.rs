//! The research tutor's method, automated: sweep one setting (the learning rate, usually) over
//! a list of values, stop trials that diverge or stall, and suggest a stable range; find an
//! LR with the range test; compare runs.
//!
//! A sweep runs on its own thread and talks to the headless printer or the TUI through typed
//! `SweepEvent`s, as a single run does through `Event`s.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use serde::Serialize;

use super::compare;
use super::divergence::{Monitor, Verdict};
use super::study;
use crate::config::RunConfig;
use crate::events::{Control, ControlMsg, ControlOrigin, Event, RunStatus};
use crate::session::{Console, Observed, RunSession};
use crate::sinks;
use crate::train::output_dir::ProcedureLock;
use crate::train::{self, RunSpec, StopSignal};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialResult {
    pub label: String,
    pub value: serde_json::Value,
    pub output_dir: String,
    pub final_loss: Option<f64>,
    pub best_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub steps: u64,
    /// Completed, lagging, diverged, stalled, stopped, failed or skipped.
    pub status: RunStatus,
    /// Ended in an earlier session of the sweep and read back, not run again.
    #[serde(default)]
    pub reused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TrialResult {
    /// A trial with its status and none of its numbers yet.
    fn new(label: &str, value: &serde_json::Value, output_dir: String, status: RunStatus) -> Self {
        TrialResult {
            label: label.into(),
            value: value.clone(),
            output_dir,
            final_loss: None,
            best_loss: None,
            eval_loss: None,
            perplexity: None,
            steps: 0,
            status,
            reused: false,
            note: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSummary {
    pub key: String,
    /// What the trials' eval figures were computed on (`RunConfig::evaluated_on`).
    pub evaluated_on: String,
    pub trials: Vec<TrialResult>,
    /// The highest learning rate that neither diverged, stalled nor lagged.
    pub highest_stable: Option<f64>,
    /// The evidence: the stable trial with the lowest final eval loss (the lowest best train
    /// loss when no trial was evaluated; `recommended_by` says which).
    pub recommended: Option<f64>,
    /// Why `recommended` was chosen: "lowest eval loss 1.7400 among 3 stable trials".
    pub recommended_by: Option<String>,
    /// The tutor's rule of thumb, kept apart from the evidence: the differential variant one
    /// notch below the recommended LR (the next lower stable value swept, else half of it). Only
    /// for a sweep of the baseline: it is how the tutor picks the differential arm's LR from it.
    pub one_notch_lower: Option<f64>,
    /// The model the trials train ("differential + RoPE").
    pub variant: String,
    /// The best trial at an end of the grid: where the best may lie, and what to try next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
}

/// When the recommended learning rate is the highest or lowest value swept, the best may lie
/// beyond it: says so, with the next two values continuing the grid's spacing (its geometric
/// step), rounded to one significant digit.
pub fn edge_of_grid(trials: &[TrialResult], recommended: f64) -> Option<String> {
    let mut values: Vec<f64> = trials.iter().filter_map(|t| t.value.as_f64()).filter(|v| *v > 0.0).collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let (lo, hi) = (*values.first()?, *values.last()?);
    if values.len() < 2 {
        return None;
    }
    let step = (hi / lo).powf(1.0 / (values.len() - 1) as f64);
    let round = |x: f64| {
        let e = x.log10().floor();
        match (x / 10f64.powf(e)).round() {
            // 9.6e-3 rounds to 1e-2, not 10e-3
            10.0 => format!("1e{}", e + 1.0),
            m => format!("{m}e{e}"),
        }
    };
    if recommended == hi {
        Some(format!("best at the top of the grid: try {}, {}", round(hi * step), round(hi * step * step)))
    } else if recommended == lo {
        Some(format!("best at the bottom of the grid: try {}, {}", round(lo / step), round(lo / step / step)))
    } else {
        None
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SweepEvent {
    TrialStart {
        index: usize,
        of: usize,
        label: String,
    },
    Train {
        index: usize,
        event: Event,
    },
    TrialEnd(TrialResult),
    /// The summary, and where it was written or why it could not be.
    Done {
        summary: SweepSummary,
        written: Result<PathBuf, String>,
    },
}

/// `learning_rate-0.001` style directory names.
pub fn trial_label(key: &str, value: &serde_json::Value) -> String {
    let v = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("{key}-{}", v.replace('/', "_"))
}

/// What a sweep runs: the swept keys (one, or two for a grid) and each trial's values.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPlan {
    pub keys: Vec<String>,
    pub trials: Vec<Vec<(String, serde_json::Value)>>,
}

impl SweepPlan {
    /// The `key` of the summary: the swept key, or `a x b` for a grid.
    pub fn key(&self) -> String {
        self.keys.join(" x ")
    }

    /// A trial's directory name: `learning_rate-0.001`, or `learning_rate-0.001+warmup_steps-10`.
    pub fn label(trial: &[(String, serde_json::Value)]) -> String {
        trial.iter().map(|(k, v)| trial_label(k, v)).collect::<Vec<_>>().join("+")
    }

    /// A trial's value in the table and JSON: the value, or an object for a grid.
    pub fn value(trial: &[(String, serde_json::Value)]) -> serde_json::Value {
        match trial {
            [(_, v)] => v.clone(),
            _ => serde_json::Value::Object(trial.iter().cloned().collect()),
        }
    }
}

/// A learning rate above the sweep's best whose best loss is this many times the best trial's
/// trained, but too unstably to use: its loss plateaus far above the others (a demo sweep at
/// 1e-1 ends at 3.5 nats where 1e-2 reaches 1.5), which the tutor's "does not fall" misses
/// because the loss still creeps down.
pub const LAG_RATIO: f64 = 1.5;

/// Marks completed trials of a learning-rate sweep, above the best trial's value, whose best
/// loss is more than `LAG_RATIO` times the best as "lagging", with a note saying by how much.
/// Lower learning rates that lag are only slow, and stay "completed".
pub fn mark_lagging(key: &str, trials: &mut [TrialResult]) {
    if key != "learning_rate" {
        return;
    }
    let best = trials
        .iter()
        .filter(|t| stable(t))
        .filter_map(|t| Some((t.best_loss?, t.value.as_f64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let Some((best_loss, best_lr)) = best else { return };
    for t in trials.iter_mut().filter(|t| stable(t)) {
        if let (Some(loss), Some(lr)) = (t.best_loss, t.value.as_f64()) {
            if lr > best_lr && loss > LAG_RATIO * best_loss {
                t.status = RunStatus::Lagging;
                t.note = Some(format!(
                    "best loss {loss:.4} is {:.1}x the best trial's {best_loss:.4} (learning_rate {best_lr:e})",
                    loss / best_loss
                ));
            }
        }
    }
}

/// What a learning-rate sweep suggests, from its trials.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggestion {
    pub highest_stable: f64,
    pub recommended: f64,
    pub recommended_by: String,
    pub one_notch_lower: f64,
}

/// The suggestion of a learning-rate sweep: among the stable trials ("completed": neither
/// diverged, stalled nor lagging), the one with the lowest final eval loss (else the lowest
/// best train loss, said so); the highest stable value beside it; and the tutor's "one notch
/// lower" below the recommended one, labelled as a hint.
pub fn suggest(key: &str, trials: &[TrialResult]) -> Option<Suggestion> {
    if key != "learning_rate" {
        return None;
    }
    let stable: Vec<&TrialResult> = trials.iter().filter(|t| stable(t) && t.value.as_f64().is_some()).collect();
    let lr = |t: &TrialResult| t.value.as_f64().unwrap_or(f64::NAN);
    let highest_stable = stable.iter().map(|t| lr(t)).max_by(f64::total_cmp)?;
    let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
    let by_eval = stable.iter().filter_map(|t| Some((finite(t.eval_loss)?, lr(t)))).min_by(|a, b| a.0.total_cmp(&b.0));
    let (recommended, recommended_by) = match by_eval {
        Some((loss, lr)) => (lr, format!("lowest eval loss {loss:.4} among {} stable trials", stable.len())),
        None => {
            let (loss, lr) =
                stable.iter().filter_map(|t| Some((finite(t.best_loss)?, lr(t)))).min_by(|a, b| a.0.total_cmp(&b.0))?;
            (lr, format!("lowest train loss {loss:.4} among {} stable trials (no trial was evaluated)", stable.len()))
        }
    };
    let below = stable.iter().map(|t| lr(t)).filter(|v| *v < recommended).max_by(f64::total_cmp);
    Some(Suggestion {
        highest_stable,
        recommended,
        recommended_by,
        one_notch_lower: below.unwrap_or(recommended / 2.0),
    })
}

pub struct SweepHandle {
    pub events: Receiver<SweepEvent>,
    pub stop: StopSignal,
    thread: JoinHandle<SweepSummary>,
}

impl SweepHandle {
    pub fn join(self) -> Option<SweepSummary> {
        self.thread.join().ok()
    }
}

/// Runs the trials one after another, each a complete run in `<output_dir>/<key>-<value>`.
/// A trial that ended in an earlier session of the same sweep (its verdict in `summary.json`,
/// its settings unchanged) is reused; one interrupted after a checkpoint resumes from it.
/// `lock` holds the sweep's folder until the thread ends.
pub fn spawn(
    base: RunConfig,
    preset: Option<String>,
    plan: SweepPlan,
    cache_dir: PathBuf,
    lock: ProcedureLock,
) -> SweepHandle {
    let (tx, events) = unbounded();
    let stop = StopSignal::default();
    let stop_for_thread = stop.clone();
    let thread =
        crate::research::spawn_holding("sweep", lock, move || run(base, preset, plan, cache_dir, tx, stop_for_thread));
    SweepHandle { events, stop, thread }
}

/// The base settings with a trial's values, in its own folder.
pub fn with_values(base: &RunConfig, trial: &[(String, serde_json::Value)], dir: &Path) -> Result<RunConfig, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    for (key, value) in trial {
        v[key] = value.clone();
    }
    v["output_dir"] = serde_json::Value::String(dir.display().to_string());
    serde_json::from_value(v).map_err(|e| format!("{}: {e}", SweepPlan::label(trial)))
}

/// Verdicts a finished trial keeps when the sweep runs again.
const ENDED: [RunStatus; 5] =
    [RunStatus::Completed, RunStatus::EarlyStopped, RunStatus::Lagging, RunStatus::Diverged, RunStatus::Stalled];

/// A trial that trained to its own end (its plan, or early stopping on a plateau): stable.
fn stable(t: &TrialResult) -> bool {
    matches!(t.status, RunStatus::Completed | RunStatus::EarlyStopped)
}

/// The trials an earlier session of this sweep ended, from its `summary.json`.
fn earlier_trials(root: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(root.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|s| s["trials"].as_array().cloned())
        .unwrap_or_default()
}

fn reused(
    earlier: &[serde_json::Value],
    label: &str,
    value: &serde_json::Value,
    cfg: &RunConfig,
) -> Option<TrialResult> {
    // the trial's own log, with the same settings as now (else it is another trial's result)
    let dir = Path::new(&cfg.output_dir);
    if !dir.join(sinks::metrics::METRICS_FILE).is_file() {
        return None;
    }
    let plan = study::plan(cfg).ok()?;
    let status_of = |t: &serde_json::Value| serde_json::from_value::<RunStatus>(t["status"].clone()).ok();
    let from_summary = earlier.iter().find(|t| t["label"] == label && status_of(t).is_some_and(|s| ENDED.contains(&s)));
    if let (Some(t), study::RunPlan::Reuse | study::RunPlan::Fresh { .. }) = (from_summary, &plan) {
        let status = status_of(t).unwrap_or(RunStatus::Completed);
        // lagging is judged against the other trials again
        let verdict = if status == RunStatus::Lagging { RunStatus::Completed } else { status };
        let mut result = TrialResult {
            reused: true,
            note: Some(match t["note"].as_str().filter(|_| status != RunStatus::Lagging) {
                Some(n) => format!("{n} (reused from an earlier session)"),
                None => "reused from an earlier session".into(),
            }),
            ..TrialResult::new(label, value, cfg.output_dir.clone(), verdict)
        };
        // the verdict from the summary; the numbers from the trial's own record
        fill_from_log(&mut result, dir);
        return Some(result);
    }
    // finished, but the sweep ended before its summary: the numbers from the trial's log
    if plan != study::RunPlan::Reuse {
        return None;
    }
    let mut result = TrialResult {
        reused: true,
        note: Some("reused from its finished log".into()),
        ..TrialResult::new(label, value, cfg.output_dir.clone(), RunStatus::Completed)
    };
    fill_from_log(&mut result, dir);
    Some(result)
}

/// A trial's numbers from its run's record (its log, repaired from its saved state where they
/// disagree, which the note then says): the last and best logged loss, the last evaluation, the
/// steps. A trial whose record holds no step cannot count as a stable one.
fn fill_from_log(result: &mut TrialResult, dir: &Path) {
    let run = match compare::load(dir) {
        Ok(run) => run,
        Err(e) => {
            result.status = RunStatus::Failed;
            result.note = Some(format!("its log cannot be read: {e}"));
            return;
        }
    };
    result.final_loss = run.loss.last().map(|p| p.1);
    result.best_loss = run.loss.iter().map(|p| p.1).min_by(f64::total_cmp);
    result.eval_loss = run.final_eval_loss;
    result.perplexity = run.final_perplexity;
    result.steps = run.steps;
    let mut notes: Vec<String> = result.note.take().into_iter().chain(run.repairs).collect();
    if run.steps == 0 && result.status == RunStatus::Completed {
        result.status = RunStatus::Failed;
        notes.push("its log records no step".into());
    }
    result.note = (!notes.is_empty()).then(|| notes.join("; "));
}

fn run(
    base: RunConfig,
    preset: Option<String>,
    plan: SweepPlan,
    cache_dir: PathBuf,
    tx: Sender<SweepEvent>,
    stop: StopSignal,
) -> SweepSummary {
    let root = PathBuf::from(&base.output_dir);
    let earlier = earlier_trials(&root);
    let key = plan.key();
    let mut trials = vec![];
    let n = plan.trials.len();
    for (index, trial_values) in plan.trials.iter().enumerate() {
        let label = SweepPlan::label(trial_values);
        let value = SweepPlan::value(trial_values);
        let dir = root.join(&label);
        let mut result = TrialResult::new(&label, &value, dir.display().to_string(), RunStatus::Skipped);
        if stop.requested() {
            result.note = Some("the sweep was stopped".into());
            let _ = tx.send(SweepEvent::TrialEnd(result.clone()));
            trials.push(result);
            continue;
        }
        let _ = tx.send(SweepEvent::TrialStart { index, of: n, label: label.clone() });
        match with_values(&base, trial_values, &dir) {
            Ok(cfg) => match reused(&earlier, &label, &value, &cfg) {
                Some(earlier) => result = earlier,
                None => trial(cfg, preset.clone(), &cache_dir, index, &tx, &stop, &mut result),
            },
            Err(e) => {
                result.status = RunStatus::Failed;
                result.note = Some(e);
            }
        }
        let _ = tx.send(SweepEvent::TrialEnd(result.clone()));
        trials.push(result);
    }
    mark_lagging(&key, &mut trials);
    let suggestion = suggest(&key, &trials);
    // the tutor's hint is for choosing the differential arm's LR from a sweep of the baseline
    let baseline = !base.research && !plan.keys.iter().any(|k| k == "research");
    let summary = SweepSummary {
        key,
        evaluated_on: base.evaluated_on(),
        highest_stable: suggestion.as_ref().map(|s| s.highest_stable),
        recommended: suggestion.as_ref().map(|s| s.recommended),
        recommended_by: suggestion.as_ref().map(|s| s.recommended_by.clone()),
        one_notch_lower: suggestion.as_ref().filter(|_| baseline).map(|s| s.one_notch_lower),
        variant: base.model_config(0).variant_name(),
        edge: suggestion.as_ref().and_then(|s| edge_of_grid(&trials, s.recommended)),
        trials,
    };
    let path = root.join("summary.json");
    let written = std::fs::create_dir_all(root.join("figures"))
        .and_then(|_| {
            let json = serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)?;
            crate::atomic_file::write(&path, json.as_bytes())?;
            for (name, png) in figures(&summary)? {
                crate::atomic_file::write(&root.join("figures").join(name), &png.bytes)?;
            }
            Ok(())
        })
        .map(|_| path.clone())
        .map_err(|e| format!("cannot write {} and its figures: {e}", path.display()));
    let _ = tx.send(SweepEvent::Done { summary: summary.clone(), written });
    summary
}

fn trial(
    mut cfg: RunConfig,
    preset: Option<String>,
    cache_dir: &Path,
    index: usize,
    tx: &Sender<SweepEvent>,
    stop: &StopSignal,
    result: &mut TrialResult,
) {
    // interrupted after a checkpoint: on from it; left without one: cleared; another run's: refused
    match study::plan(&cfg) {
        Ok(study::RunPlan::Resume) => cfg.resume_from_checkpoint = Some("latest".into()),
        Ok(study::RunPlan::Fresh { clear }) => cfg.overwrite_output_dir = clear,
        // finished with these settings but not reusable (no verdict): run it again
        Ok(study::RunPlan::Reuse) => cfg.overwrite_output_dir = true,
        Err(e) => {
            result.status = RunStatus::Failed;
            result.note = Some(e.to_string());
            return;
        }
    }
    let spec = RunSpec {
        config: cfg,
        preset,
        cache_dir: cache_dir.to_path_buf(),
        inject_nonfinite: vec![],
        world: Default::default(),
    };
    // the sweep's stop flag is this trial's too: stopping the sweep stops the running trial
    let session = match RunSession::start(spec, stop.clone(), Console::Quiet) {
        Ok(session) => session,
        Err(e) => {
            result.status = RunStatus::Failed;
            result.note = Some(e.to_string());
            return;
        }
    };
    let controls = session.controls();
    let stop_trial = || {
        let _ = controls.send(ControlMsg { control: Control::Stop { save: false }, origin: ControlOrigin::Sweep });
    };
    let mut monitor: Option<Monitor> = None;
    let mut verdict = Verdict::Ok;
    let outcome = session.run(&mut |seen| {
        let Observed::Event(event) = seen else { return };
        match event {
            Event::TrainBegin(b) => {
                let logged = (b.total_steps / b.config["logging_steps"].as_u64().unwrap_or(1).max(1)) as usize;
                monitor = Some(Monitor::for_steps(logged));
            }
            Event::Progress(p) => {
                result.steps = p.step;
                result.final_loss = Some(p.loss);
                result.best_loss = Some(result.best_loss.map_or(p.loss, |b| b.min(p.loss)));
                if let (Some(m), Verdict::Ok) = (monitor.as_mut(), verdict) {
                    verdict = m.observe(p.loss);
                    if verdict != Verdict::Ok {
                        stop_trial();
                    }
                }
            }
            Event::Skipped(_) if verdict == Verdict::Ok => {
                verdict = Verdict::Diverged;
                stop_trial();
            }
            Event::Evaluate(e) if e.at_training_length() => {
                result.eval_loss = Some(e.eval_loss);
                result.perplexity = Some(e.perplexity);
            }
            _ => {}
        }
        let _ = tx.send(SweepEvent::Train { index, event: event.clone() });
    });
    result.status = match (verdict, &outcome.error) {
        (Verdict::Diverged, _) => RunStatus::Diverged,
        (Verdict::Stalled, _) => RunStatus::Stalled,
        (Verdict::Ok, Some(train::TrainError::Diverged { .. })) => RunStatus::Diverged,
        (Verdict::Ok, _) => outcome.status,
    };
    if let Some(e) = outcome.error {
        result.note = Some(e.to_string());
    }
    // the whole run's numbers (a resumed trial's earlier steps too), from its record
    fill_from_log(result, &outcome.output_dir);
}

/// `sweep_loss.png`: eval loss (final and best) against the swept LR on a log axis, the trials
/// that diverged, stalled or lagged marked at their best train loss; `sweep_curves.png`: each
/// trial's eval loss over its steps.
pub fn figures(s: &SweepSummary) -> std::io::Result<Vec<(&'static str, crate::sinks::figures::Png)>> {
    use crate::sinks::figures::{self, Extras, Line, XAxis, PALETTE, RED};
    let mut out = vec![];
    let lr = |t: &TrialResult| t.value.as_f64().filter(|v| *v > 0.0).map(f64::log10);
    if s.key == "learning_rate" {
        let steady = |t: &&TrialResult| stable(t);
        let points = |f: &dyn Fn(&TrialResult) -> Option<f64>| -> Vec<(f64, f64)> {
            s.trials.iter().filter(steady).filter_map(|t| Some((lr(t)?, f(t)?))).collect()
        };
        let unstable: Vec<(f64, f64)> = s
            .trials
            .iter()
            .filter(|t| matches!(t.status, RunStatus::Diverged | RunStatus::Stalled | RunStatus::Lagging))
            .filter_map(|t| Some((lr(t)?, t.best_loss.filter(|l| l.is_finite())?)))
            .collect();
        let mut lines = vec![
            Line {
                label: "final eval loss (stable trials)",
                points: points(&|t| t.eval_loss),
                color: figures::BLUE,
                markers: true,
            },
            Line {
                label: "best train loss (stable trials)",
                points: points(&|t| t.best_loss),
                color: PALETTE[7],
                markers: true,
            },
        ];
        if !unstable.is_empty() {
            lines.push(Line {
                label: "diverged, stalled or lagging (best train loss)",
                points: unstable,
                color: RED,
                markers: true,
            });
        }
        let marks = s.recommended.map(|r| vec![(r.log10(), format!("recommended {r:e}"))]).unwrap_or_default();
        let title = format!("{}: loss against learning rate", s.variant);
        let extras = Extras { marks, ..Default::default() };
        out.push((
            "sweep_loss.png",
            figures::chart_with(&title, XAxis::Log10Lr, "loss (nats per token)", lines, extras)?,
        ));
    }
    let runs: Vec<(String, Vec<(f64, f64)>)> = s
        .trials
        .iter()
        .filter_map(|t| {
            Some((
                t.value.to_string().trim_matches('"').to_string(),
                compare::load(Path::new(&t.output_dir)).ok()?.eval,
            ))
        })
        .filter(|(_, eval)| !eval.is_empty())
        .collect();
    if !runs.is_empty() {
        let labels: Vec<String> = runs.iter().map(|(v, _)| format!("{} {v}", s.key)).collect();
        let lines = runs
            .iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, ((_, eval), label))| Line {
                label,
                points: eval.clone(),
                color: PALETTE[i % PALETTE.len()],
                markers: true,
            })
            .collect();
        let title = format!("{}: eval loss of each trial", s.variant);
        out.push((
            "sweep_curves.png",
            figures::chart_with(&title, XAxis::Steps, "eval loss (nats per token)", lines, Extras::default())?,
        ));
    }
    Ok(out)
}

/// The sweep table as text.
pub fn table(s: &SweepSummary) -> String {
    // the value and its status first: what a narrow terminal still shows
    let mut out = format!(
        "{:<14} {:<10} {:>10} {:>10} {:>10} {:>9} {:>6}\n",
        s.key, "status", "train last", "train best", "eval loss", "eval ppl", "steps"
    );
    let f = |x: Option<f64>, p: usize| x.map_or("-".into(), |v| format!("{v:.p$}"));
    for t in &s.trials {
        out.push_str(&format!(
            "{:<14} {:<10} {:>10} {:>10} {:>10} {:>9} {:>6}\n",
            t.value.to_string().trim_matches('"'),
            t.status,
            f(t.final_loss, 4),
            f(t.best_loss, 4),
            f(t.eval_loss, 4),
            f(t.perplexity, 2),
            t.steps
        ));
    }
    match (s.highest_stable, s.recommended) {
        (Some(h), Some(r)) => {
            out.push_str(&format!(
                "recommended learning_rate {r:e} for the {}: {}; stable up to {h:e}\n",
                s.variant,
                s.recommended_by.as_deref().unwrap_or("")
            ));
            if let Some(edge) = &s.edge {
                out.push_str(&format!("{edge} (the best may lie beyond the values swept)\n"));
            }
            if let Some(lower) = s.one_notch_lower {
                out.push_str(&format!(
                    "tutor's hint for the differential variant, from this baseline sweep: one notch lower, {lower:e} (a rule of thumb, not measured here)\n"
                ));
            }
        }
        _ if s.key == "learning_rate" => {
            out.push_str("no learning rate trained stably: lower the range tenfold and sweep again\n")
        }
        _ => {}
    }
    out.push_str(&format!("eval loss on {}\n", s.evaluated_on));
    // why a trial ended as it did, after the suggestion so a short pane still shows that
    for t in s.trials.iter().filter(|t| t.note.is_some()) {
        out.push_str(&format!(
            "{} {}: {}\n",
            t.value.to_string().trim_matches('"'),
            t.status,
            t.note.as_deref().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: f64, status: &str) -> TrialResult {
        TrialResult::new("", &serde_json::json!(v), String::new(), status.parse().unwrap())
    }

    fn evaluated(v: f64, status: &str, eval: f64) -> TrialResult {
        TrialResult { eval_loss: Some(eval), best_loss: Some(eval - 0.1), ..t(v, status) }
    }

    fn pick(trials: &[TrialResult]) -> Option<(f64, f64, f64)> {
        suggest("learning_rate", trials).map(|s| (s.highest_stable, s.recommended, s.one_notch_lower))
    }

    #[test]
    fn the_recommendation_is_the_stable_trial_with_the_lowest_eval_loss() {
        // the shape the old rule got wrong: "one notch below the highest stable" picked 1e-3
        // with eval loss 3.73 over 1e-2 with 1.74
        let trials = [
            evaluated(1e-1, "diverged", f64::NAN),
            evaluated(1e-2, "completed", 1.74),
            evaluated(1e-3, "completed", 3.73),
            evaluated(1e-5, "stalled", 6.0),
        ];
        assert_eq!(pick(&trials), Some((1e-2, 1e-2, 1e-3)));
        let s = suggest("learning_rate", &trials).unwrap();
        assert!(s.recommended_by.contains("lowest eval loss 1.7400 among 2 stable"), "{}", s.recommended_by);
        // the best eval below the highest stable value: recommended there, highest still reported
        let trials =
            [evaluated(3e-2, "completed", 2.9), evaluated(1e-2, "completed", 2.1), evaluated(3e-3, "completed", 2.4)];
        assert_eq!(pick(&trials), Some((3e-2, 1e-2, 3e-3)));
        // a diverged trial's low loss never counts, however low
        assert_eq!(
            pick(&[evaluated(1e-1, "lagging", 0.5), evaluated(1e-4, "completed", 3.0)]),
            Some((1e-4, 1e-4, 5e-5))
        );
        // no evaluation: the best train loss, said so
        let s = suggest("learning_rate", &[with_loss(1e-3, 2.0), with_loss(1e-2, 1.5)]).unwrap();
        assert_eq!((s.recommended, s.one_notch_lower), (1e-2, 1e-3));
        assert!(s.recommended_by.contains("no trial was evaluated"));
        assert_eq!(pick(&[t(1.0, "diverged")]), None);
        assert_eq!(suggest("warmup_steps", &trials), None);
        assert_eq!(trial_label("learning_rate", &serde_json::json!(0.001)), "learning_rate-0.001");
    }

    #[test]
    fn the_table_labels_train_and_eval_columns_and_keeps_the_hint_apart() {
        let trials = vec![evaluated(1e-2, "completed", 1.74), evaluated(1e-3, "completed", 3.73)];
        let sg = suggest("learning_rate", &trials).unwrap();
        let summary = SweepSummary {
            key: "learning_rate".into(),
            evaluated_on: "builtin".into(),
            trials,
            highest_stable: Some(sg.highest_stable),
            recommended: Some(sg.recommended),
            recommended_by: Some(sg.recommended_by),
            one_notch_lower: Some(sg.one_notch_lower),
            variant: "baseline + RoPE".into(),
            edge: None,
        };
        let text = table(&summary);
        assert!(text.lines().next().is_some_and(|h| h.contains("train last") && h.contains("eval loss")), "{text}");
        assert!(text.contains("eval loss on builtin"), "{text}");
        assert!(
            text.contains("recommended learning_rate 1e-2 for the baseline + RoPE: lowest eval loss 1.7400"),
            "{text}"
        );
        assert!(
            text.contains("tutor's hint for the differential variant, from this baseline sweep: one notch lower, 1e-3"),
            "{text}"
        );
        // the best at the top of the grid: said, with what to try next
        let edge = edge_of_grid(&summary.trials, 1e-2);
        let text = table(&SweepSummary { edge, ..summary });
        assert!(text.contains("best at the top of the grid: try 1e-1, 1e0"), "{text}");
    }

    /// The best at an end of the grid names the next two values on the grid's own spacing.
    #[test]
    fn the_edge_of_the_grid_names_the_next_values_to_try() {
        let grid = [t(1e-4, "completed"), t(1e-3, "completed"), t(1e-2, "completed")];
        assert_eq!(edge_of_grid(&grid, 1e-2).as_deref(), Some("best at the top of the grid: try 1e-1, 1e0"));
        assert_eq!(edge_of_grid(&grid, 1e-4).as_deref(), Some("best at the bottom of the grid: try 1e-5, 1e-6"));
        assert_eq!(edge_of_grid(&grid, 1e-3), None, "inside the grid: nothing to add");
        // a half-decade grid continues by half-decades; 9.5e-3 rounds to 1e-2
        let half = [t(1e-3, "completed"), t(3.0e-3, "completed"), t(9.0e-3, "completed")];
        assert_eq!(edge_of_grid(&half, 9.0e-3).as_deref(), Some("best at the top of the grid: try 3e-2, 8e-2"));
        let near = [t(3.1e-3, "completed"), t(9.6e-3, "completed")];
        assert_eq!(edge_of_grid(&near, 3.1e-3).as_deref(), Some("best at the bottom of the grid: try 1e-3, 3e-4"));
        assert_eq!(edge_of_grid(&[t(1e-3, "completed")], 1e-3), None, "one value is no grid");
    }

    fn with_loss(v: f64, best: f64) -> TrialResult {
        TrialResult { best_loss: Some(best), ..t(v, "completed") }
    }

    #[test]
    fn a_high_lr_whose_loss_plateaus_far_above_the_best_is_lagging_not_stable() {
        // the demo sweep's shape: 1e-1 still falls but ends at 3.47 where 1e-2 reaches 1.48
        let mut trials = [with_loss(1e-1, 3.47), with_loss(3e-2, 1.67), with_loss(1e-2, 1.48), with_loss(1e-3, 2.5)];
        mark_lagging("learning_rate", &mut trials);
        let status: Vec<&str> = trials.iter().map(|t| t.status.as_str()).collect();
        // 1e-3 is as far behind, but below the best value: slow, not unstable
        assert_eq!(status, ["lagging", "completed", "completed", "completed"]);
        assert!(trials[0].note.as_deref().is_some_and(|n| n.contains("2.3x")), "{:?}", trials[0].note);
        // 1e-1 is no longer stable: the highest stable is 3e-2; the best (train) loss is 1e-2's
        let s = suggest("learning_rate", &trials).unwrap();
        assert_eq!((s.highest_stable, s.recommended), (3e-2, 1e-2));
        // other keys are left as they are
        let mut other = [with_loss(1.0, 9.0), with_loss(0.0, 1.0)];
        mark_lagging("warmup_steps", &mut other);
        assert!(other.iter().all(|t| t.status == "completed"));
    }
}
