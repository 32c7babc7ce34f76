//! A study's numbers: per arm mean ± sd over seeds, the paired difference against the first
//! arm with its 95% t interval, and the eval-loss bands over seeds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{Arm, SeedResult};
use crate::events::RunStatus;
use crate::research::compare::{self, RunLog};

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

    pub fn text(&self, decimals: usize) -> String {
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
pub struct StudySummary {
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
    /// With `context_lengths`: each length's eval loss per arm over seeds, and the paired
    /// differences against the first arm evaluated at that length (train short, test long).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lengths: Vec<LengthStats>,
}

/// One context length across the study's arms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthStats {
    pub context_length: usize,
    /// Each arm's eval loss at this length over its finished seeds (its label, the stat).
    pub arms: Vec<(String, Option<Stat>)>,
    /// Each arm's `(min, max)` over seeds: the band of the figure.
    pub ranges: Vec<Option<(f64, f64)>>,
    pub differences: Vec<Difference>,
}

/// The study's runs at each context length they were evaluated at.
fn length_stats(arms: &[Arm], seeds: &[u64], runs: &[SeedResult]) -> Vec<LengthStats> {
    let mut lengths: Vec<usize> = runs.iter().flat_map(|r| r.at_lengths.iter().map(|p| p.0)).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let at = |arm: &str, seed: u64, length: usize| {
        let run = runs.iter().find(|r| r.arm == arm && r.seed == seed && r.finished())?;
        run.at_lengths.iter().find(|p| p.0 == length).map(|p| p.1)
    };
    lengths
        .into_iter()
        .map(|length| {
            let values: Vec<Vec<f64>> =
                arms.iter().map(|a| seeds.iter().filter_map(|&s| at(&a.label, s, length)).collect()).collect();
            // against the first arm evaluated at this length: learned positions stop at their
            // block size, and a comparison with nothing would say nothing
            let reference = values.iter().position(|v| !v.is_empty());
            let differences = reference
                .map(|r| {
                    let against = &arms[r].label;
                    arms.iter()
                        .zip(&values)
                        .enumerate()
                        .filter(|(i, (_, v))| *i != r && !v.is_empty())
                        .map(|(_, (a, _))| {
                            let pairs: Vec<(u64, f64)> = seeds
                                .iter()
                                .filter_map(|&s| Some((s, at(&a.label, s, length)? - at(against, s, length)?)))
                                .collect();
                            difference(&a.label, against, &pairs)
                        })
                        .collect()
                })
                .unwrap_or_default();
            LengthStats {
                context_length: length,
                arms: arms.iter().zip(&values).map(|(a, v)| (a.label.clone(), Stat::of(v))).collect(),
                ranges: values
                    .iter()
                    .map(|v| {
                        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        (lo <= hi).then_some((lo, hi))
                    })
                    .collect(),
                differences,
            }
        })
        .collect()
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

/// The numbers of the study from its runs' results.
pub fn summarize(arms: &[Arm], seeds: &[u64], runs: Vec<SeedResult>) -> StudySummary {
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
    let configs: Vec<RunLog> = arms
        .iter()
        .map(|a| {
            let mut config = match serde_json::to_value(&a.config) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => Default::default(),
            };
            config.remove("seed");
            RunLog {
                dir: PathBuf::new(),
                name: a.label.clone(),
                loss: vec![],
                eval: vec![],
                final_eval_loss: None,
                final_perplexity: None,
                status: RunStatus::Completed,
                config,
                tokens_seen: None,
                tokens_per_step: None,
                elapsed: vec![],
                steps: 0,
                marks: vec![],
                repairs: vec![],
            }
        })
        .collect();
    let evaluated_on = arms[0].config.evaluated_on();
    let complete = runs.iter().all(SeedResult::finished) && runs.len() == arms.len() * seeds.len();
    StudySummary {
        arms: arm_summaries,
        differences,
        seeds: seeds.to_vec(),
        differing_keys: compare::differing_keys(&configs),
        lengths: length_stats(arms, seeds, &runs),
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

/// `(step, mean, min, max)` of eval loss over seeds, at each step every seed reached.
pub type SeedBand = Vec<(f64, f64, f64, f64)>;

/// Per arm, its band over its finished seeds.
pub fn bands(s: &StudySummary) -> Vec<(String, SeedBand)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the learned arm's block size, the differences are taken against the first arm that
    /// was evaluated there; arms not evaluated at a length are left out of its differences.
    #[test]
    fn length_differences_are_against_the_first_arm_evaluated_at_that_length() {
        let arm = |label: &str| Arm { label: label.into(), config: crate::config::RunConfig::default(), preset: None };
        let arms = [arm("learned"), arm("rope"), arm("rope+diff")];
        let result = |a: &str, seed: u64, at: &[(usize, f64)]| SeedResult {
            arm: a.into(),
            seed,
            output_dir: String::new(),
            status: RunStatus::Completed,
            final_eval_loss: Some(at[0].1),
            best_eval_loss: None,
            steps: 10,
            tokens_seen: None,
            eval_curve: vec![],
            at_lengths: at.to_vec(),
            note: None,
        };
        let runs = [
            result("learned", 1, &[(128, 2.0)]),
            result("learned", 2, &[(128, 2.2)]),
            result("rope", 1, &[(128, 1.9), (512, 2.5)]),
            result("rope", 2, &[(128, 2.0), (512, 2.7)]),
            result("rope+diff", 1, &[(128, 1.95), (512, 2.3)]),
            result("rope+diff", 2, &[(128, 2.05), (512, 2.4)]),
        ];
        let stats = length_stats(&arms, &[1, 2], &runs);
        assert_eq!(stats.iter().map(|l| l.context_length).collect::<Vec<_>>(), [128, 512]);
        let against: Vec<(&str, &str)> =
            stats[0].differences.iter().map(|d| (d.arm.as_str(), d.against.as_str())).collect();
        assert_eq!(against, [("rope", "learned"), ("rope+diff", "learned")]);
        assert_eq!(stats[1].differences.len(), 1, "learned is not evaluated at 512: {:?}", stats[1].differences);
        let d = &stats[1].differences[0];
        assert_eq!((d.arm.as_str(), d.against.as_str()), ("rope+diff", "rope"));
        // paired by seed: -0.2 and -0.3
        assert!((d.mean.unwrap() + 0.25).abs() < 1e-12, "{d:?}");
        assert!(stats[1].arms[0].1.is_none(), "the learned arm has no figure at 512");
    }

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
