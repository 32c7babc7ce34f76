//! Several runs side by side: their curves (from each `metrics.jsonl`, last value per step),
//! final eval loss and perplexity with differences against the first run, and the config keys
//! in which they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::keys::{self, OnResume, Role};
use crate::events::{ControlAction, Event, RunStatus};
use crate::series::Series;
use crate::sinks::figures::{self, Extras, Line, XAxis};
use crate::sinks::metrics::{self, METRICS_FILE};
use crate::train::checkpoint::{self, TrainerState};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunLog {
    pub dir: PathBuf,
    pub name: String,
    /// `(step, loss)`, last value per step.
    pub loss: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
    pub final_eval_loss: Option<f64>,
    pub final_perplexity: Option<f64>,
    /// How its last session ended (`train_end`), else `running` while a trainer holds the folder
    /// and `interrupted` when none does (a kill).
    pub status: RunStatus,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Training tokens the run has seen: its last step x tokens per step.
    pub tokens_seen: Option<u64>,
    /// The last step reached.
    pub steps: u64,
    /// Learning-rate changes by hand (`scale_lr` controls), `(step, "lr x0.5")`, and pauses.
    pub marks: Vec<(f64, String)>,
    /// Where the log disagreed with the run's saved state and the state was taken, one line
    /// each ("the log lacks the evaluation at step 60 ...").
    pub repairs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0} has no {METRICS_FILE} and holds no runs: give output_dir paths of difflab runs, or a sweep or study folder")]
    NotARun(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Keeps the last value for each step, in step order (resumed runs log some steps twice).
fn last_per_step(points: Vec<(u64, f64)>) -> Vec<(f64, f64)> {
    let map: BTreeMap<u64, f64> = points.into_iter().collect();
    map.into_iter().map(|(s, v)| (s as f64, v)).collect()
}

/// The runs a path names: the run itself, or every run inside a sweep's or study's folder
/// (`<sweep>/<trial>`, `<study>/<arm>/seed-<s>`), in path order.
pub fn load_all(dir: &Path) -> Result<Vec<RunLog>, CompareError> {
    if dir.join(METRICS_FILE).is_file() {
        return Ok(vec![load(dir)?]);
    }
    let mut found = vec![];
    let children = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    for child in children(dir) {
        if child.join(METRICS_FILE).is_file() {
            found.push(child);
        } else {
            found.extend(children(&child).into_iter().filter(|g| g.join(METRICS_FILE).is_file()));
        }
    }
    if found.is_empty() {
        return Err(CompareError::NotARun(dir.to_path_buf()));
    }
    found
        .iter()
        .map(|d| {
            let mut run = load(d)?;
            // a study's runs are named by arm and seed: `research=true/seed-42`
            run.name = d.strip_prefix(dir).map(|p| p.display().to_string()).unwrap_or(run.name);
            Ok(run)
        })
        .collect()
}

pub fn load(dir: &Path) -> Result<RunLog, CompareError> {
    let path = dir.join(METRICS_FILE);
    if !path.is_file() {
        return Err(CompareError::NotARun(dir.to_path_buf()));
    }
    let events = metrics::read(&path).map_err(|source| CompareError::Read { path: path.clone(), source })?;
    let (mut loss, mut eval, mut config, mut status) = (vec![], vec![], serde_json::Map::new(), None);
    let (mut tokens_per_step, mut steps, mut marks) = (None, 0u64, vec![]);
    for e in events {
        match e {
            Event::TrainBegin(b) => {
                if let serde_json::Value::Object(m) = b.config {
                    config = m;
                }
                tokens_per_step = Some(b.tokens_per_step);
                status = None;
            }
            Event::Progress(p) => {
                steps = steps.max(p.step);
                loss.push((p.step, p.loss))
            }
            Event::Evaluate(v) if v.at_training_length() => eval.push((v.step, v.eval_loss)),
            Event::Control(c) if matches!(c.action, ControlAction::ScaleLr | ControlAction::Pause) => {
                let what = match c.action {
                    ControlAction::Pause => "pause".to_string(),
                    _ => format!("lr x{}", c.lr_scale),
                };
                marks.push((c.step as f64, what));
            }
            Event::TrainEnd(end) => {
                steps = steps.max(end.step);
                status = Some(end.status)
            }
            _ => {}
        }
    }
    let mut eval = last_per_step(eval);
    let repairs = match saved_state(dir) {
        Some((state_path, state)) => {
            steps = steps.max(state.global_step);
            repair(&mut eval, &state, &state_path)
        }
        None => vec![],
    };
    let final_eval_loss = eval.last().map(|e| e.1);
    let status = match (status, crate::train::remote::is_live(dir)) {
        (_, true) => RunStatus::Running,
        (Some(s), false) => s,
        (None, false) => RunStatus::Interrupted,
    };
    Ok(RunLog {
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string()),
        dir: dir.to_path_buf(),
        loss: last_per_step(loss),
        eval,
        final_eval_loss,
        final_perplexity: final_eval_loss.map(f64::exp),
        status,
        config,
        tokens_seen: tokens_per_step.map(|t| t * steps),
        steps,
        marks,
        repairs,
    })
}

/// A run's authoritative record: the newest `trainer_state.json` (the final model's, or the
/// newest checkpoint's), written with the weights, atomically, after the log lines of its step.
fn saved_state(dir: &Path) -> Option<(PathBuf, TrainerState)> {
    let read = |path: PathBuf| -> Option<(PathBuf, TrainerState)> {
        let state = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        Some((path, state))
    };
    let newest = checkpoint::list(dir).pop().and_then(|(_, c)| read(c.join(checkpoint::TRAINER_STATE)));
    let final_state = read(dir.join(checkpoint::TRAINER_STATE));
    [newest, final_state].into_iter().flatten().max_by_key(|(_, s)| s.global_step)
}

/// The evaluations of `state` the log lacks or gives another value (a line torn by a kill, a
/// log cut back), taken from the state; a line saying so for each.
fn repair(eval: &mut Vec<(f64, f64)>, state: &TrainerState, state_path: &Path) -> Vec<String> {
    let mut repairs = vec![];
    for entry in &state.log_history {
        let (Some(step), Some(loss)) = (entry["step"].as_u64(), entry["eval_loss"].as_f64()) else { continue };
        let step = step as f64;
        let logged = eval.iter().position(|e| e.0 == step);
        let what = match logged {
            Some(i) if (eval[i].1 - loss).abs() <= 1e-9 * loss.abs().max(1.0) => continue,
            Some(i) => {
                let what = format!("gives {:.4}", eval[i].1);
                eval[i].1 = loss;
                what
            }
            None => {
                eval.push((step, loss));
                "lacks it".to_string()
            }
        };
        repairs
            .push(format!("the log's evaluation at step {step} {what}: {loss:.4} taken from {}", state_path.display()));
    }
    eval.sort_by(|a, b| a.0.total_cmp(&b.0));
    repairs
}

/// Config keys whose values are not the same in every run, with each run's value; the keys
/// that say how a run was started (its folder, a resume), not what it is, left aside.
pub fn differing_keys(runs: &[RunLog]) -> BTreeMap<String, Vec<serde_json::Value>> {
    let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.config.keys()).collect();
    keys.into_iter()
        .filter(|k| keys::find(k).is_none_or(|key| key.on_resume != OnResume::Invocation))
        .filter_map(|k| {
            let values: Vec<serde_json::Value> =
                runs.iter().map(|r| r.config.get(k).cloned().unwrap_or(serde_json::Value::Null)).collect();
            values.windows(2).any(|w| w[0] != w[1]).then(|| (k.clone(), values))
        })
        .collect()
}

/// The comparison table as text: one row per run, differences against the first.
pub fn table(runs: &[RunLog]) -> String {
    let w = runs.iter().map(|r| r.name.chars().count()).max().unwrap_or(3).max(12);
    let mut out = format!("{:<w$} {:>12} {:>10} {:>12} {:>10}  status\n", "run", "eval loss", "ppl", "d loss", "d ppl");
    let base = runs.first().and_then(|r| r.final_eval_loss);
    for r in runs {
        let fmt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let d_loss = match (r.final_eval_loss, base) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        let d_ppl = match (r.final_perplexity, base.map(f64::exp)) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        out.push_str(&format!(
            "{:<w$} {:>12} {:>10} {:>12} {:>10}  {}\n",
            r.name,
            fmt(r.final_eval_loss, 4),
            fmt(r.final_perplexity, 2),
            d_loss.map_or("-".into(), |d| format!("{d:+.4}")),
            d_ppl.map_or("-".into(), |d| format!("{d:+.2}")),
            r.status
        ));
    }
    out
}

/// Why the runs' losses cannot be set side by side, if they cannot: other data, tokenizer or
/// eval split, or different numbers of training tokens.
pub fn not_comparable(runs: &[RunLog]) -> Vec<String> {
    let diff = differing_keys(runs);
    let mut why: Vec<String> = keys::with_role(Role::Data)
        .filter_map(|k| diff.get(k).map(|vs| format!("{k} differs ({})", join(vs))))
        .collect();
    let tokens: Vec<Option<u64>> = runs.iter().map(|r| r.tokens_seen).collect();
    if tokens.windows(2).any(|w| w[0] != w[1]) {
        let seen: Vec<String> = tokens.iter().map(|t| t.map_or("?".into(), |t| t.to_string())).collect();
        why.push(format!("they saw different numbers of training tokens ({})", seen.join(" | ")));
    }
    why
}

fn join(values: &[serde_json::Value]) -> String {
    values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" | ")
}

pub fn differences_text(runs: &[RunLog]) -> String {
    let diff = differing_keys(runs);
    let mut out = String::new();
    for why in not_comparable(runs) {
        out.push_str(&format!("not comparable: {why}\n"));
    }
    for r in runs {
        for repair in &r.repairs {
            out.push_str(&format!("{}: {repair}\n", r.name));
        }
    }
    if diff.is_empty() {
        out.push_str("the runs' configurations are the same\n");
        return out;
    }
    out.push_str("configuration differences:\n");
    for (k, values) in diff {
        let vals: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        out.push_str(&format!("  {k:<22} {}\n", vals.join("  |  ")));
    }
    out
}

/// The overlay as a PNG: each run's train loss as a line and its evaluations as points, in
/// one colour per run, with LR changes and pauses marked.
pub fn figure(runs: &[RunLog]) -> std::io::Result<figures::Png> {
    let labels: Vec<(String, String)> =
        runs.iter().map(|r| (format!("{} train", r.name), format!("{} eval", r.name))).collect();
    let mut lines = vec![];
    for (i, (r, (train, eval))) in runs.iter().zip(&labels).enumerate() {
        let color = figures::PALETTE[i % figures::PALETTE.len()];
        let mut series = Series::default();
        r.loss.iter().for_each(|&(x, y)| series.push(x, y));
        lines.push(Line { label: train, points: series.envelope(1600), color, markers: false });
        if !r.eval.is_empty() {
            lines.push(Line { label: eval, points: r.eval.clone(), color, markers: true });
        }
    }
    let marks = runs
        .iter()
        .flat_map(|r| {
            r.marks
                .iter()
                .map(move |(x, what)| (*x, if runs.len() > 1 { format!("{}: {what}", r.name) } else { what.clone() }))
        })
        .collect();
    let title = format!("{} runs: train loss (lines), eval loss (points)", runs.len());
    figures::chart_with(&title, XAxis::Steps, "loss (nats per token)", lines, Extras { marks, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, cfg: serde_json::Value, eval: f64) -> RunLog {
        RunLog {
            dir: name.into(),
            name: name.into(),
            loss: vec![],
            eval: vec![(10.0, eval)],
            final_eval_loss: Some(eval),
            final_perplexity: Some(eval.exp()),
            status: RunStatus::Completed,
            config: cfg.as_object().unwrap().clone(),
            tokens_seen: Some(1000),
            steps: 10,
            marks: vec![],
            repairs: vec![],
        }
    }

    #[test]
    fn differences_and_the_table() {
        let runs = vec![
            run(
                "base",
                serde_json::json!({"research": false, "learning_rate": 1e-3, "n_layer": 2, "output_dir": "a"}),
                3.0,
            ),
            run(
                "diff",
                serde_json::json!({"research": true, "learning_rate": 5e-4, "n_layer": 2, "output_dir": "b"}),
                2.5,
            ),
        ];
        let d = differing_keys(&runs);
        assert_eq!(d.keys().collect::<Vec<_>>(), vec!["learning_rate", "research"]);
        let t = table(&runs);
        assert!(t.contains("-0.5000"), "{t}");
        assert!(t.contains(&format!("{:+.2}", 2.5f64.exp() - 3f64.exp())), "{t}");
        assert_eq!(last_per_step(vec![(1, 1.0), (2, 2.0), (2, 3.0), (1, 4.0)]), vec![(1.0, 4.0), (2.0, 3.0)]);
    }
}
