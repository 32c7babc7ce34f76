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
    pub tokens_per_step: Option<u64>,
    /// `(step, training seconds)` at each progress marker (pauses excluded).
    pub elapsed: Vec<(f64, f64)>,
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
    let (mut tokens_per_step, mut steps, mut marks, mut elapsed) = (None, 0u64, vec![], vec![]);
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
                loss.push((p.step, p.loss));
                elapsed.push((p.step, p.elapsed));
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
        tokens_per_step,
        elapsed: last_per_step(elapsed),
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

/// The shortest path suffixes that tell `dirs` apart: `research=false/seed-42` and
/// `research=true/seed-42` rather than `seed-42` twice.
pub fn distinguishing_names(dirs: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> =
        dirs.iter().map(|d| d.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect()).collect();
    let longest = parts.iter().map(Vec::len).max().unwrap_or(1);
    let suffix = |p: &Vec<String>, k: usize| p[p.len().saturating_sub(k)..].join("/");
    let k = (1..=longest)
        .find(|&k| {
            let mut names: Vec<String> = parts.iter().map(|p| suffix(p, k)).collect();
            names.sort();
            names.windows(2).all(|w| w[0] != w[1])
        })
        .unwrap_or(longest);
    parts.iter().map(|p| suffix(p, k)).collect()
}

/// What the overlay's x axis counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareX {
    Steps,
    Tokens,
    Seconds,
}

impl std::str::FromStr for CompareX {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "step" | "steps" => Ok(CompareX::Steps),
            "tokens" => Ok(CompareX::Tokens),
            "time" | "seconds" => Ok(CompareX::Seconds),
            other => Err(format!("--x {other:?}: use step, tokens or time")),
        }
    }
}

impl CompareX {
    /// The x of a run's `step` in this axis: tokens seen, or its training seconds at that step
    /// (interpolated between progress markers).
    fn at(self, r: &RunLog, step: f64) -> Option<f64> {
        match self {
            CompareX::Steps => Some(step),
            CompareX::Tokens => Some(step * r.tokens_per_step? as f64),
            CompareX::Seconds => {
                let after = r.elapsed.iter().position(|p| p.0 >= step)?;
                let (s1, t1) = r.elapsed[after];
                if after == 0 || s1 == step {
                    return Some(t1 * step / s1.max(1.0));
                }
                let (s0, t0) = r.elapsed[after - 1];
                Some(t0 + (t1 - t0) * (step - s0) / (s1 - s0))
            }
        }
    }
}

/// How the overlay is drawn: its x axis, and whether the loss is on a log axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareView {
    pub x: CompareX,
    pub log_y: bool,
}

/// The overlay as a PNG: each run's train loss as a line and its evaluations as points, in
/// one colour per run, with LR changes and pauses marked (labels stacked where they meet). The
/// untrained model's evaluation (step 0, near ln V) would flatten every later difference: it is
/// left out of the axes and quoted in the title.
pub fn figure(runs: &[RunLog], view: CompareView) -> std::io::Result<figures::Png> {
    let labels: Vec<(String, String)> =
        runs.iter().map(|r| (format!("{} train", r.name), format!("{} eval", r.name))).collect();
    let y = |v: f64| if view.log_y { v.log10() } else { v };
    let mut lines = vec![];
    let mut at_start = vec![];
    for (i, (r, (train, eval))) in runs.iter().zip(&labels).enumerate() {
        let color = figures::PALETTE[i % figures::PALETTE.len()];
        let mut series = Series::default();
        r.loss.iter().filter_map(|&(s, l)| Some((view.x.at(r, s)?, y(l)))).for_each(|(x, l)| series.push(x, l));
        lines.push(Line { label: train, points: series.envelope(1600), color, markers: false });
        at_start.extend(r.eval.iter().filter(|e| e.0 == 0.0).map(|e| e.1));
        let points: Vec<(f64, f64)> =
            r.eval.iter().filter(|e| e.0 > 0.0).filter_map(|&(s, l)| Some((view.x.at(r, s)?, y(l)))).collect();
        if !points.is_empty() {
            lines.push(Line { label: eval, points, color, markers: true });
        }
    }
    let marks = runs
        .iter()
        .flat_map(|r| {
            r.marks.iter().filter_map(move |(s, what)| {
                let label = if runs.len() > 1 { format!("{}: {what}", r.name) } else { what.clone() };
                Some((view.x.at(r, *s)?, label))
            })
        })
        .collect();
    let start = match at_start.first() {
        Some(l) => format!("; step-0 eval {l:.2}, left out"),
        None => String::new(),
    };
    let title = format!("{} runs: train loss (lines), eval loss (points){start}", runs.len());
    let (axis, y_label) = match (view.x, view.log_y) {
        (CompareX::Steps, _) => (XAxis::Steps, "loss (nats per token)"),
        (CompareX::Tokens, _) => (XAxis::Tokens, "loss (nats per token)"),
        (CompareX::Seconds, _) => (XAxis::Seconds, "loss (nats per token)"),
    };
    let y_label = if view.log_y { "log10 of the loss (nats per token)" } else { y_label };
    figures::chart_with(&title, axis, y_label, lines, Extras { marks, ..Default::default() })
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
            tokens_per_step: Some(100),
            elapsed: vec![],
            steps: 10,
            marks: vec![],
            repairs: vec![],
        }
    }

    /// Two arms' seed-42 runs are told apart by their arm, not named `seed-42` twice.
    #[test]
    fn names_are_the_shortest_suffixes_that_differ() {
        let dirs: Vec<PathBuf> = ["/s/research=false/seed-42", "/s/research=true/seed-42", "/s/research=true/seed-43"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            distinguishing_names(&dirs),
            ["research=false/seed-42", "research=true/seed-42", "research=true/seed-43"]
        );
        let plain: Vec<PathBuf> = ["/a/base", "/b/diff"].iter().map(PathBuf::from).collect();
        assert_eq!(distinguishing_names(&plain), ["base", "diff"]);
    }

    /// Tokens count `tokens_per_step` per step; seconds interpolate the progress markers.
    #[test]
    fn the_x_axes_convert_steps() {
        let mut r = run("a", serde_json::json!({}), 3.0);
        r.elapsed = vec![(10.0, 2.0), (20.0, 6.0)];
        assert_eq!(CompareX::Steps.at(&r, 15.0), Some(15.0));
        assert_eq!(CompareX::Tokens.at(&r, 15.0), Some(1500.0));
        assert_eq!(CompareX::Seconds.at(&r, 15.0), Some(4.0));
        assert_eq!(CompareX::Seconds.at(&r, 5.0), Some(1.0));
        assert_eq!(CompareX::Seconds.at(&r, 25.0), None, "past the last marker: unknown, not guessed");
        r.tokens_per_step = None;
        assert_eq!(CompareX::Tokens.at(&r, 15.0), None);
        assert!("epochs".parse::<CompareX>().unwrap_err().contains("step, tokens or time"));
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
