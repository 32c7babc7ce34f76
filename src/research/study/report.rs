//! A study in words and pictures: the text table, `study.json` and the figures.

use std::path::Path;

use super::stats::{bands, Stat, StudySummary};
use crate::sinks::figures::{self, Band, Extras, Line, XAxis};

/// The study as text: the arms' table, the differences, the settings that differ.
pub fn table(s: &StudySummary) -> String {
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
    out.push_str(
        "(± is the standard deviation over an arm's finished seeds, n - 1 in the denominator; n is the seeds column)\n",
    );
    for d in &s.differences {
        out.push_str(&difference_line(d, "final eval loss"));
    }
    lengths_table(s, w, &mut out);
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

fn difference_line(d: &super::stats::Difference, what: &str) -> String {
    let mean = d.mean.map_or("-".into(), |m| format!("{m:+.4}"));
    let interval = d.interval.map_or(String::new(), |(lo, hi)| format!(", 95% CI [{lo:+.4}, {hi:+.4}]"));
    format!("{} - {} ({what}, paired by seed): {mean}{interval}; {}\n", d.arm, d.against, d.note)
}

/// The eval loss at each context length, an arm a row, and the paired differences per length.
fn lengths_table(s: &StudySummary, w: usize, out: &mut String) {
    if s.lengths.is_empty() {
        return;
    }
    out.push_str("eval loss by context length (mean ± sd over seeds; the same validation tokens at every length):\n");
    out.push_str(&format!("{:<w$}", "arm"));
    for l in &s.lengths {
        out.push_str(&format!("  {:>17}", format!("{} tokens", l.context_length)));
    }
    out.push('\n');
    for (i, a) in s.arms.iter().enumerate() {
        out.push_str(&format!("{:<w$}", a.label));
        for l in &s.lengths {
            let cell = l.arms.get(i).and_then(|(_, st)| st.as_ref()).map_or("-".into(), |st| st.text(4));
            out.push_str(&format!("  {cell:>17}"));
        }
        out.push('\n');
    }
    for l in &s.lengths {
        for d in &l.differences {
            out.push_str(&difference_line(d, &format!("eval loss at {} tokens", l.context_length)));
        }
    }
}

/// Eval loss against context length, a line per arm (its mean over seeds) over the band of its
/// seeds (min to max).
fn extrapolation(s: &StudySummary) -> std::io::Result<figures::Png> {
    let labels: Vec<String> = s.arms.iter().map(|a| format!("{} (n = {})", a.label, a.seeds_finished)).collect();
    let x = |l: usize| (l as f64).log2();
    let lines: Vec<Line> = labels
        .iter()
        .enumerate()
        .map(|(i, label)| Line {
            label,
            points: s
                .lengths
                .iter()
                .filter_map(|l| Some((x(l.context_length), l.arms.get(i)?.1.as_ref()?.mean)))
                .collect(),
            color: figures::PALETTE[i % figures::PALETTE.len()],
            markers: true,
        })
        .collect();
    let bands = (0..s.arms.len())
        .map(|i| Band {
            points: s
                .lengths
                .iter()
                .filter_map(|l| Some((x(l.context_length), l.ranges.get(i).copied().flatten()?)))
                .map(|(x, (lo, hi))| (x, lo, hi))
                .collect(),
            color: figures::PALETTE[i % figures::PALETTE.len()],
        })
        .collect();
    let title = "eval loss against context length: mean, band min-max over seeds";
    figures::chart_with(
        title,
        XAxis::Log2Length,
        "eval loss (nats per token)",
        lines,
        Extras { bands, ..Default::default() },
    )
}

/// `study.json` and the figures under `<root>/figures/`.
pub fn write(root: &Path, s: &StudySummary) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("figures"))?;
    let json = serde_json::to_string_pretty(s).map_err(std::io::Error::other)?;
    crate::atomic_file::write(&root.join("study.json"), json.as_bytes())?;
    for (name, png) in render(s)? {
        crate::atomic_file::write(&root.join("figures").join(format!("{name}.png")), &png.bytes)?;
    }
    Ok(())
}

fn render(s: &StudySummary) -> std::io::Result<Vec<(&'static str, figures::Png)>> {
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
    let labels: Vec<String> = bands
        .iter()
        .map(|(l, _)| {
            let n = s.arms.iter().find(|a| a.label == *l).map_or(0, |a| a.seeds_finished);
            format!("{l} (mean over n = {n}, band: min-max)")
        })
        .collect();
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
    // the final loss of every seed, one column per arm: each arm's seeds in its colour, and
    // each seed's arms joined by a grey line, the pairing the interval rests on
    let arms: Vec<String> = s.arms.iter().map(|a| a.label.clone()).collect();
    let final_of = |arm: &str, seed: u64| {
        s.runs.iter().find(|r| r.arm == arm && r.seed == seed && r.finished()).and_then(|r| r.final_eval_loss)
    };
    let mut lines: Vec<Line> = s
        .seeds
        .iter()
        .enumerate()
        .map(|(i, seed)| Line {
            // one legend entry for all of them
            label: if i == 0 { "one seed across the arms (a grey line per seed)" } else { "" },
            points: s
                .arms
                .iter()
                .enumerate()
                .filter_map(|(a, arm)| Some((a as f64, final_of(&arm.label, *seed)?)))
                .collect(),
            color: figures::LIGHT_GREY,
            markers: false,
        })
        .collect();
    let arm_labels: Vec<String> = s.arms.iter().map(|a| format!("{} (n = {})", a.label, a.seeds_finished)).collect();
    lines.extend(s.arms.iter().zip(&arm_labels).enumerate().map(|(a, (arm, label))| Line {
        label,
        points: s.seeds.iter().filter_map(|seed| Some((a as f64, final_of(&arm.label, *seed)?))).collect(),
        color: figures::PALETTE[a % figures::PALETTE.len()],
        markers: true,
    }));
    let extras = Extras { categories: arms, ..Default::default() };
    let finals = figures::chart_with(
        "final eval loss per seed",
        XAxis::Categories,
        "final eval loss (nats per token)",
        lines,
        extras,
    )?;
    let mut out = vec![("study_eval_loss", curves), ("study_final_loss", finals)];
    if !s.lengths.is_empty() {
        out.push(("study_extrapolation", extrapolation(s)?));
    }
    Ok(out)
}
