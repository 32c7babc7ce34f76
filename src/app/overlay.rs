//! The view of several curves at once: a sweep's trials as they run, an LR range test, or
//! runs being compared. Built from `SweepEvent`s, `LrFindEvent`s or loaded runs.

use std::collections::VecDeque;

use super::dashboard::LOG_LINES;
use crate::research::compare::{self, RunLog};
use crate::research::lr_find::LrFindEvent;
use crate::research::study::{self, StudyEvent};
use crate::research::sweep::{self as sweeps, SweepEvent};
use crate::series::Series;
use crate::sinks::human::describe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    Sweep,
    LrFind,
    Compare,
    /// A study: one curve per (arm, seed), coloured by arm, with each arm's band over seeds.
    Study,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub label: String,
    pub loss: Series,
    pub eval: Series,
    pub status: String,
    /// The colour group: the curve's own index, or its arm in a study.
    pub group: usize,
}

/// A colour group's band: `(group, low edge, high edge)`, each `(step, loss)`.
pub type GroupBand = (usize, Vec<(f64, f64)>, Vec<(f64, f64)>);

#[derive(Debug, Clone)]
pub struct Overlay {
    pub kind: OverlayKind,
    pub title: String,
    pub curves: Vec<Trace>,
    /// Text under the chart: the table, the suggestion.
    pub table: Vec<String>,
    pub log: VecDeque<String>,
    pub status: String,
    pub finished: bool,
    pub log_y: bool,
    /// LR range test: suggestion marks at log10(lr).
    pub marks: Vec<f64>,
    /// A study's arm labels, in order.
    pub arms: Vec<String>,
}

impl Overlay {
    pub fn new(kind: OverlayKind, title: &str) -> Self {
        Self {
            kind,
            title: title.into(),
            curves: vec![],
            table: vec![],
            log: VecDeque::new(),
            status: "starting".into(),
            finished: false,
            log_y: false,
            marks: vec![],
            arms: vec![],
        }
    }

    pub fn note(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    pub fn apply_sweep(&mut self, e: &SweepEvent) {
        match e {
            SweepEvent::TrialStart { index, of, label } => {
                self.status = format!("trial {}/{of}: {label}", index + 1);
                self.curves.push(Trace {
                    label: label.clone(),
                    loss: Series::default(),
                    eval: Series::with_capacity(256),
                    status: "running".into(),
                    group: *index,
                });
                self.table = self.trial_rows();
            }
            SweepEvent::Train { index, event } => {
                if let Some(c) = self.curves.get_mut(*index) {
                    match event {
                        crate::events::Event::Progress(p) => c.loss.push(p.step as f64, p.loss),
                        crate::events::Event::Evaluate(v) if v.at_training_length() => {
                            c.eval.push(v.step as f64, v.eval_loss)
                        }
                        _ => {}
                    }
                }
                if !matches!(event, crate::events::Event::Progress(_) | crate::events::Event::Prepare(_)) {
                    if let Some(line) = describe(event) {
                        self.note(line);
                    }
                }
            }
            SweepEvent::TrialEnd(t) => {
                if let Some(c) = self.curves.iter_mut().find(|c| c.label == t.label) {
                    c.status = t.status.to_string();
                } else {
                    self.curves.push(Trace {
                        label: t.label.clone(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: t.status.to_string(),
                        group: self.curves.len(),
                    });
                }
                self.note(format!("{}: {} after {} steps", t.label, t.status, t.steps));
                self.table = self.trial_rows();
            }
            SweepEvent::Done { summary: s, written } => {
                if let Err(e) = written {
                    self.note(e.clone());
                }
                self.finished = true;
                self.status = "done - q to exit".into();
                self.table = sweeps::table(s).lines().map(str::to_string).collect();
            }
        }
    }

    pub fn apply_study(&mut self, e: &StudyEvent) {
        match e {
            StudyEvent::RunStart { index, of, arm, seed, plan } => {
                let label = format!("{} s{seed}", self.arms.get(*arm).cloned().unwrap_or_default());
                self.status = format!("run {}/{of}: {label} ({plan})", index + 1);
                self.curves.push(Trace {
                    label,
                    loss: Series::default(),
                    eval: Series::with_capacity(256),
                    status: "running".into(),
                    group: *arm,
                });
                self.table = self.trial_rows();
            }
            StudyEvent::Train { event, .. } => {
                if let Some(c) = self.curves.last_mut() {
                    match event {
                        crate::events::Event::Progress(p) => c.loss.push(p.step as f64, p.loss),
                        crate::events::Event::Evaluate(v) if v.at_training_length() => {
                            c.eval.push(v.step as f64, v.eval_loss)
                        }
                        _ => {}
                    }
                    if let crate::events::Event::Progress(p) = event {
                        c.status = format!("step {}", p.step);
                    }
                }
                if matches!(event, crate::events::Event::Evaluate(_) | crate::events::Event::TrainEnd(_)) {
                    if let Some(line) = describe(event) {
                        self.note(line);
                    }
                }
            }
            StudyEvent::RunEnd { result, .. } => {
                let label = format!("{} s{}", result.arm, result.seed);
                match self.curves.iter_mut().rev().find(|c| c.label == label) {
                    Some(c) => {
                        c.status = result.status.to_string();
                        // a reused run shows the curve it left
                        if c.eval.is_empty() {
                            result.eval_curve.iter().for_each(|&(x, y)| c.eval.push(x, y));
                        }
                    }
                    None => {
                        let group = self.arms.iter().position(|a| *a == result.arm).unwrap_or(0);
                        let mut eval = Series::default();
                        result.eval_curve.iter().for_each(|&(x, y)| eval.push(x, y));
                        self.curves.push(Trace {
                            label: label.clone(),
                            loss: Series::default(),
                            eval,
                            status: result.status.to_string(),
                            group,
                        });
                    }
                }
                let loss = result.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
                self.note(format!("{label}: {} (final eval loss {loss})", result.status));
                self.table = self.trial_rows();
            }
            StudyEvent::Done { summary: s, written } => {
                if let Err(e) = written {
                    self.note(e.clone());
                }
                self.finished = true;
                self.status = "done - q to exit".into();
                self.table = study::table(s).lines().map(str::to_string).collect();
            }
        }
    }

    /// Per colour group with two or more curves: the band of their eval points, `(group, low,
    /// high)` at the steps every curve of the group has reached.
    pub fn bands(&self) -> Vec<GroupBand> {
        let mut groups: Vec<usize> = self.curves.iter().map(|c| c.group).collect();
        groups.sort_unstable();
        groups.dedup();
        groups
            .into_iter()
            .filter_map(|g| {
                let evals: Vec<Vec<(f64, f64)>> = self
                    .curves
                    .iter()
                    .filter(|c| c.group == g && !c.eval.is_empty())
                    .map(|c| c.eval.buckets().iter().map(|b| (b.x_last, b.last)).collect())
                    .collect();
                (evals.len() >= 2).then(|| {
                    let band = study::stats::band_of(&evals.iter().collect::<Vec<_>>());
                    (g, band.iter().map(|p| (p.0, p.2)).collect(), band.iter().map(|p| (p.0, p.3)).collect())
                })
            })
            .collect()
    }

    fn trial_rows(&self) -> Vec<String> {
        self.curves.iter().map(|c| format!("{:<30} {}", c.label, c.status)).collect()
    }

    pub fn apply_lr_find(&mut self, e: &LrFindEvent) {
        match e {
            LrFindEvent::Train(ev) => {
                if let crate::events::Event::Prepare(p) = ev {
                    self.status = format!("preparing: {}", p.stage);
                } else if let Some(line) = describe(ev) {
                    self.note(line);
                }
            }
            LrFindEvent::Point { lr, loss, smoothed } => {
                if self.curves.is_empty() {
                    self.curves.push(Trace {
                        label: "loss".into(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: String::new(),
                        group: 0,
                    });
                    self.curves.push(Trace {
                        label: "smoothed".into(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: String::new(),
                        group: 1,
                    });
                }
                self.curves[0].loss.push(lr.log10(), *loss);
                self.curves[1].loss.push(lr.log10(), *smoothed);
                self.status = format!("lr {lr:.2e}: loss {loss:.4}, smoothed {smoothed:.4}");
            }
            LrFindEvent::Done { curve, suggestions, dir } => {
                self.finished = true;
                self.status = "done - q to exit".into();
                self.marks = [suggestions.recommended, suggestions.steepest, suggestions.bottom]
                    .into_iter()
                    .flatten()
                    .map(f64::log10)
                    .collect();
                self.table = crate::research::lr_find::summary(curve, suggestions);
                self.table.extend([format!("plot: {}", dir.join("lr_find.png").display())]);
            }
        }
    }

    pub fn from_runs(runs: &[RunLog]) -> Self {
        let mut o = Self::new(OverlayKind::Compare, "compare");
        for r in runs {
            let mut loss = Series::default();
            r.loss.iter().for_each(|&(x, y)| loss.push(x, y));
            let mut eval = Series::default();
            r.eval.iter().for_each(|&(x, y)| eval.push(x, y));
            let group = o.curves.len();
            o.curves.push(Trace { label: r.name.clone(), loss, eval, status: r.status.to_string(), group });
        }
        o.table =
            compare::table(runs).lines().chain(compare::differences_text(runs).lines()).map(str::to_string).collect();
        o.finished = true;
        o.status = format!("{} runs - q to exit", runs.len());
        o
    }
}
