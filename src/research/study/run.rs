//! The study's thread: every (arm, seed) in turn, each a run session of its own.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::plan::{order, run_config, RunPlan};
use super::stats::{summarize, StudySummary};
use super::{report, Arm, SeedResult};
use crate::config::RunConfig;
use crate::events::{Event, RunStatus};
use crate::research::compare::{self, RunLog};
use crate::research::lengths;
use crate::session::{Console, Observed, RunSession};
use crate::train::output_dir::ProcedureLock;
use crate::train::{RunSpec, StopSignal};

#[derive(Debug, Clone, PartialEq)]
pub enum StudyEvent {
    RunStart {
        index: usize,
        of: usize,
        arm: usize,
        seed: u64,
        plan: RunPlan,
    },
    Train {
        index: usize,
        event: Event,
    },
    RunEnd {
        index: usize,
        result: SeedResult,
    },
    /// The summary, and where `study.json` was written or why it could not be.
    Done {
        summary: StudySummary,
        written: Result<PathBuf, String>,
    },
}

pub struct StudyHandle {
    pub events: Receiver<StudyEvent>,
    pub stop: StopSignal,
    thread: JoinHandle<StudySummary>,
}

impl StudyHandle {
    pub fn join(self) -> Option<StudySummary> {
        self.thread.join().ok()
    }
}

/// Runs every (arm, seed) in turn (seed-major: after the first seed every arm has a result).
/// `lock` holds the study's folder until the thread ends.
pub fn spawn(
    root: PathBuf,
    arms: Vec<Arm>,
    seeds: Vec<u64>,
    plans: Vec<RunPlan>,
    lengths: Vec<usize>,
    cache_dir: PathBuf,
    lock: ProcedureLock,
) -> StudyHandle {
    let (tx, events) = unbounded();
    let stop = StopSignal::default();
    let stop_for_thread = stop.clone();
    let thread = crate::research::spawn_holding("study", lock, move || {
        run(&root, &arms, &seeds, &plans, &lengths, &cache_dir, &tx, &stop_for_thread)
    });
    StudyHandle { events, stop, thread }
}

#[allow(clippy::too_many_arguments)]
fn run(
    root: &Path,
    arms: &[Arm],
    seeds: &[u64],
    plans: &[RunPlan],
    lengths: &[usize],
    cache_dir: &Path,
    tx: &Sender<StudyEvent>,
    stop: &StopSignal,
) -> StudySummary {
    let order = order(arms.len(), seeds);
    let mut results = vec![];
    for (index, ((arm_index, seed), plan)) in order.iter().zip(plans).enumerate() {
        let arm = &arms[*arm_index];
        let cfg = run_config(root, arm, *seed);
        let result = if stop.requested() {
            SeedResult {
                status: RunStatus::Skipped,
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
            let mut result = one_run(cfg.clone(), arm, *seed, plan, cache_dir, index, tx, stop);
            if result.finished() && !lengths.is_empty() {
                at_lengths(&mut result, &cfg, lengths, index, tx);
            }
            result
        };
        let _ = tx.send(StudyEvent::RunEnd { index, result: result.clone() });
        results.push(result);
    }
    let summary = summarize(arms, seeds, results);
    let path = root.join("study.json");
    let written = report::write(root, &summary)
        .map(|_| path.clone())
        .map_err(|e| format!("cannot write {} and its figures: {e}", path.display()));
    let _ = tx.send(StudyEvent::Done { summary: summary.clone(), written });
    summary
}

/// The finished model at each of the study's context lengths (train short, test long; a model
/// with learned positions up to its block size, the rest said in its note), its
/// `extrapolation.json` and figures written into the run's folder; a failure is the run's note.
fn at_lengths(result: &mut SeedResult, cfg: &RunConfig, asked: &[usize], index: usize, tx: &Sender<StudyEvent>) {
    let dir = PathBuf::from(&cfg.output_dir);
    let mut lengths: Vec<usize> = asked.to_vec();
    if !lengths.contains(&cfg.block_size) {
        lengths.insert(0, cfg.block_size);
    }
    if !cfg.rope {
        let (fit, past): (Vec<usize>, Vec<usize>) = lengths.iter().partition(|l| **l <= cfg.block_size);
        if !past.is_empty() {
            let note = format!(
                "not evaluated at {past:?}: its learned positions (rope false) end at block_size {}",
                cfg.block_size
            );
            result.note = Some(result.note.take().map_or(note.clone(), |n| format!("{n}; {note}")));
        }
        lengths = fit;
    }
    let evaluated = (|| -> Result<Vec<(usize, f64)>, String> {
        let model = lengths::open(&dir, cfg, &|_| {}).map_err(|e| e.to_string())?;
        let span = lengths::check(&model, cfg, &lengths).map_err(|e| e.to_string())?;
        let records = lengths::evaluate_lengths(&model, cfg, &span, true, &mut |rec| {
            let event = Event::Evaluate(rec.clone());
            let _ = tx.send(StudyEvent::Train { index, event });
        })
        .map_err(|e| e.to_string())?;
        let _ = lengths::Extrapolation::new(&model, cfg, &span, &records).write(&dir);
        Ok(span.lengths.iter().zip(&records).map(|(l, r)| (*l, r.eval_loss)).collect())
    })();
    match evaluated {
        Ok(at) => result.at_lengths = at,
        Err(e) => {
            let note = format!("at the context lengths: {e}");
            result.note = Some(result.note.take().map_or(note.clone(), |n| format!("{n}; {note}")));
        }
    }
}

fn empty(arm: &str, seed: u64, dir: &str) -> SeedResult {
    SeedResult {
        arm: arm.into(),
        seed,
        output_dir: dir.into(),
        status: RunStatus::Failed,
        final_eval_loss: None,
        best_eval_loss: None,
        steps: 0,
        tokens_seen: None,
        eval_curve: vec![],
        at_lengths: vec![],
        note: None,
    }
}

/// A run's result from its `metrics.jsonl`.
fn read_result(arm: &str, seed: u64, dir: &Path, status: RunStatus) -> SeedResult {
    let mut r = empty(arm, seed, &dir.display().to_string());
    r.status = status;
    match compare::load(dir) {
        Ok(run) => fill(&mut r, &run),
        Err(e) => {
            r.status = RunStatus::Failed;
            r.note = Some(e.to_string());
        }
    }
    r
}

fn fill(r: &mut SeedResult, run: &RunLog) {
    r.final_eval_loss = run.final_eval_loss;
    r.best_eval_loss = run.eval.iter().map(|e| e.1).filter(|v| v.is_finite()).min_by(f64::total_cmp);
    r.steps = run.steps;
    r.tokens_seen = run.tokens_seen;
    r.eval_curve = run.eval.clone();
    if !run.repairs.is_empty() {
        r.note = Some(run.repairs.join("; "));
    }
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    mut cfg: RunConfig,
    arm: &Arm,
    seed: u64,
    plan: &RunPlan,
    cache_dir: &Path,
    index: usize,
    tx: &Sender<StudyEvent>,
    stop: &StopSignal,
) -> SeedResult {
    let dir = PathBuf::from(&cfg.output_dir);
    match plan {
        RunPlan::Reuse => return read_result(&arm.label, seed, &dir, RunStatus::Reused),
        RunPlan::Resume => cfg.resume_from_checkpoint = Some("latest".into()),
        RunPlan::Fresh { clear } => cfg.overwrite_output_dir = *clear,
    }
    let mut result = empty(&arm.label, seed, &cfg.output_dir);
    let spec = RunSpec {
        config: cfg,
        preset: arm.preset.clone(),
        cache_dir: cache_dir.to_path_buf(),
        inject_nonfinite: vec![],
        world: Default::default(),
    };
    let session = match RunSession::start(spec, stop.clone(), Console::Quiet) {
        Ok(session) => session,
        Err(e) => {
            result.note = Some(e.to_string());
            return result;
        }
    };
    let outcome = session.run(&mut |seen| {
        if let Observed::Event(event) = seen {
            let _ = tx.send(StudyEvent::Train { index, event: event.clone() });
        }
    });
    let mut result = read_result(&arm.label, seed, &dir, outcome.status);
    if let Some(e) = outcome.error {
        result.note = Some(e.to_string());
    }
    if outcome.status != RunStatus::Completed {
        result.status = outcome.status;
    }
    result
}
