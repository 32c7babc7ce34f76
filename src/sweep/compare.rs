//! Several runs side by side: their curves (from each `metrics.jsonl`, last value per step),
//! final eval loss and perplexity with differences against the first run, and the config keys
//! in which they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::events::{ControlAction, Event};
use crate::sinks::metrics::{self, METRICS_FILE};

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub dir: PathBuf,
    pub name: String,
    /// `(step, loss)`, last value per step.
    pub loss: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
    pub final_eval_loss: Option<f64>,
    pub final_perplexity: Option<f64>,
    pub status: Option<String>,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Training tokens the run has seen: its last step x tokens per step.
    pub tokens_seen: Option<u64>,
    /// The last step reached.
    pub steps: u64,
    /// Learning-rate changes by hand (`scale_lr` controls), `(step, "lr x0.5")`, and pauses.
    pub marks: Vec<(f64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0} has no {METRICS_FILE}: give output_dir paths of difflab runs")]
    NotARun(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Keeps the last value for each step, in step order (resumed runs log some steps twice).
fn last_per_step(points: Vec<(u64, f64)>) -> Vec<(f64, f64)> {
    let map: BTreeMap<u64, f64> = points.into_iter().collect();
    map.into_iter().map(|(s, v)| (s as f64, v)).collect()
}

pub fn load(dir: &Path) -> Result<Run, CompareError> {
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
            Event::Evaluate(v) => eval.push((v.step, v.eval_loss)),
            Event::Control(c) if matches!(c.action, ControlAction::ScaleLr | ControlAction::Pause) => {
                let what = match c.action {
                    ControlAction::Pause => "pause".to_string(),
                    _ => format!("lr x{}", c.lr_scale),
                };
                marks.push((c.step as f64, what));
            }
            Event::TrainEnd(end) => {
                steps = steps.max(end.step);
                status = Some(end.status.to_string())
            }
            _ => {}
        }
    }
    let eval = last_per_step(eval);
    let final_eval_loss = eval.last().map(|e| e.1);
    Ok(Run {
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
    })
}

/// Config keys whose values are not the same in every run (`output_dir` aside), with each run's value.
pub fn differing_keys(runs: &[Run]) -> BTreeMap<String, Vec<serde_json::Value>> {
    let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.config.keys()).collect();
    keys.into_iter()
        .filter(|k| k.as_str() != "output_dir")
        .filter_map(|k| {
            let values: Vec<serde_json::Value> =
                runs.iter().map(|r| r.config.get(k).cloned().unwrap_or(serde_json::Value::Null)).collect();
            values.windows(2).any(|w| w[0] != w[1]).then(|| (k.clone(), values))
        })
        .collect()
}

/// The comparison table as text: one row per run, differences against the first.
pub fn table(runs: &[Run]) -> String {
    let mut out = format!("{:<28} {:>12} {:>10} {:>12} {:>10}  status\n", "run", "eval loss", "ppl", "d loss", "d ppl");
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
            "{:<28} {:>12} {:>10} {:>12} {:>10}  {}\n",
            r.name,
            fmt(r.final_eval_loss, 4),
            fmt(r.final_perplexity, 2),
            d_loss.map_or("-".into(), |d| format!("{d:+.4}")),
            d_ppl.map_or("-".into(), |d| format!("{d:+.2}")),
            r.status.clone().unwrap_or_else(|| "running".into())
        ));
    }
    out
}

pub fn differences_text(runs: &[Run]) -> String {
    let diff = differing_keys(runs);
    if diff.is_empty() {
        return "the runs' configurations are the same\n".into();
    }
    let mut out = String::from("configuration differences:\n");
    for (k, values) in diff {
        let vals: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        out.push_str(&format!("  {k:<22} {}\n", vals.join("  |  ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, cfg: serde_json::Value, eval: f64) -> Run {
        Run {
            dir: name.into(),
            name: name.into(),
            loss: vec![],
            eval: vec![(10.0, eval)],
            final_eval_loss: Some(eval),
            final_perplexity: Some(eval.exp()),
            status: Some("completed".into()),
            config: cfg.as_object().unwrap().clone(),
            tokens_seen: Some(1000),
            steps: 10,
            marks: vec![],
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
