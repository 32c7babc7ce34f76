//! The view of several curves at once: a sweep's trials as they run, an LR range test, or
//! runs being compared. Built from `SweepEvent`s, `LrFindEvent`s or loaded runs.

use std::collections::VecDeque;

use super::dashboard::LOG_LINES;
use crate::series::Series;
use crate::sinks::human::describe;
use crate::sweep::compare::{self, Run};
use crate::sweep::lr_find::LrFindEvent;
use crate::sweep::{self as sweeps, SweepEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sweep,
    LrFind,
    Compare,
}

#[derive(Debug, Clone)]
pub struct Curve {
    pub label: String,
    pub loss: Series,
    pub eval: Series,
    pub status: String,
}

#[derive(Debug, Clone)]
pub struct Overlay {
    pub kind: Kind,
    pub title: String,
    pub curves: Vec<Curve>,
    /// Text under the chart: the table, the suggestion.
    pub table: Vec<String>,
    pub log: VecDeque<String>,
    pub status: String,
    pub finished: bool,
    pub log_y: bool,
    /// LR range test: suggestion marks at log10(lr).
    pub marks: Vec<f64>,
}

impl Overlay {
    pub fn new(kind: Kind, title: &str) -> Self {
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
                self.curves.push(Curve {
                    label: label.clone(),
                    loss: Series::default(),
                    eval: Series::with_capacity(256),
                    status: "running".into(),
                });
                self.table = self.trial_rows();
            }
            SweepEvent::Train { index, event } => {
                if let Some(c) = self.curves.get_mut(*index) {
                    match event {
                        crate::events::Event::Progress(p) => c.loss.push(p.step as f64, p.loss),
                        crate::events::Event::Evaluate(v) => c.eval.push(v.step as f64, v.eval_loss),
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
                    c.status = t.status.clone();
                } else {
                    self.curves.push(Curve {
                        label: t.label.clone(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: t.status.clone(),
                    });
                }
                self.note(format!("{}: {} after {} steps", t.label, t.status, t.steps));
                self.table = self.trial_rows();
            }
            SweepEvent::Done(s) => {
                self.finished = true;
                self.status = "done - q to exit".into();
                self.table = sweeps::table(s).lines().map(str::to_string).collect();
            }
        }
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
                    self.curves.push(Curve {
                        label: "loss".into(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: String::new(),
                    });
                    self.curves.push(Curve {
                        label: "smoothed".into(),
                        loss: Series::default(),
                        eval: Series::default(),
                        status: String::new(),
                    });
                }
                self.curves[0].loss.push(lr.log10(), *loss);
                self.curves[1].loss.push(lr.log10(), *smoothed);
                self.status = format!("lr {lr:.2e}: loss {loss:.4}, smoothed {smoothed:.4}");
            }
            LrFindEvent::Done { curve, suggestions, dir } => {
                self.finished = true;
                self.status = "done - q to exit".into();
                self.marks = [suggestions.steepest, suggestions.valley].into_iter().flatten().map(f64::log10).collect();
                self.table = crate::sweep::lr_find::summary(curve, suggestions);
                self.table.extend([format!("plot: {}", dir.join("lr_find.png").display())]);
            }
        }
    }

    pub fn from_runs(runs: &[Run]) -> Self {
        let mut o = Self::new(Kind::Compare, "compare");
        for r in runs {
            let mut loss = Series::default();
            r.loss.iter().for_each(|&(x, y)| loss.push(x, y));
            let mut eval = Series::default();
            r.eval.iter().for_each(|&(x, y)| eval.push(x, y));
            o.curves.push(Curve { label: r.name.clone(), loss, eval, status: r.status.clone().unwrap_or_default() });
        }
        o.table =
            compare::table(runs).lines().chain(compare::differences_text(runs).lines()).map(str::to_string).collect();
        o.finished = true;
        o.status = format!("{} runs - q to exit", runs.len());
        o
    }
}
