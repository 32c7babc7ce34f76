//! Human-readable progress on stderr for headless runs: preparation (throttled), messages,
//! one line per progress marker, evaluations, checkpoints, controls.

use std::io::Write;
use std::time::{Duration, Instant};

use super::Sink;
use crate::events::{Event, Level, ProgressUnit};

pub struct StderrLog {
    last_prepare: Option<(String, Instant)>,
}

impl Default for StderrLog {
    fn default() -> Self {
        Self::new()
    }
}

impl StderrLog {
    pub fn new() -> Self {
        Self { last_prepare: None }
    }
}

/// `1234567` -> `1.23M`.
pub fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub fn describe(event: &Event) -> Option<String> {
    Some(match event {
        Event::Prepare(p) => {
            let amount = match p.unit {
                ProgressUnit::Bytes if p.total > 0 => format!(" {}B / {}B", si(p.done as f64), si(p.total as f64)),
                ProgressUnit::Rows if p.total > 0 => format!(" {} / {} rows", p.done, p.total),
                _ => String::new(),
            };
            let pct = if p.total > 0 && p.unit != ProgressUnit::Task { format!(" ({:.0}%)", 100.0 * p.done as f64 / p.total as f64) } else { String::new() };
            let state = if p.unit == ProgressUnit::Task { if p.done >= p.total { " done" } else { " ..." } } else { "" };
            format!("[prepare] {}{amount}{pct}{state}", p.stage)
        }
        Event::Message { level, text } => match level {
            Level::Info => format!("[info] {text}"),
            Level::Warning => format!("[warning] {text}"),
            Level::Error => format!("[error] {text}"),
        },
        Event::TrainBegin(b) => format!(
            "[train] {} | {} parameters | {} | engine {} | {} | {} steps ({} per epoch), {} tokens per step, from step {} -> {}",
            b.variant,
            si(b.num_parameters as f64),
            b.device,
            b.engine,
            if b.world_size > 1 { format!("{} processes ({})", b.world_size, b.backend) } else { "1 process".into() },
            b.total_steps,
            b.steps_per_epoch,
            b.tokens_per_step,
            b.start_step,
            b.output_dir
        ),
        Event::Progress(p) => {
            let diff = p.diff_norm_mean.map(|m| format!(" | diff-norm {m:.3}±{:.3}", p.diff_norm_std.unwrap_or(0.0))).unwrap_or_default();
            let eta = p.eta_seconds.map(|e| format!(" | ETA {}", clock(e))).unwrap_or_default();
            let rss = p.rss_mib.map(|m| format!(" | {m:.0} MiB")).unwrap_or_default()
                + &p.gpu_mib.map(|m| format!(" | GPU {m:.0} MiB")).unwrap_or_default();
            format!(
                "[step {:>6}] loss {:.4} | lr {:.3e} | grad-norm {:.3} | {} tok/s | epoch {:.2}{eta}{rss}{diff}",
                p.step,
                p.loss,
                p.learning_rate,
                p.grad_norm,
                si(p.tokens_per_second),
                p.epoch
            )
        }
        Event::Evaluate(e) => format!(
            "[eval  {:>6}] {}loss {:.4} | perplexity {:.2} | {} tok/s{}",
            e.step,
            e.context_length.map(|l| format!("windows of {l}: ")).unwrap_or_default(),
            e.eval_loss,
            e.perplexity,
            si(e.eval_tokens_per_second),
            e.partial_note()
        ),
        Event::Checkpoint(c) => {
            let deleted = if c.deleted.is_empty() { String::new() } else { format!(" (removed {})", c.deleted.join(", ")) };
            let took = c.seconds.map(|t| format!(" in {t:.2} s")).unwrap_or_default();
            format!("[save  {:>6}] {} ({}){took}{deleted}", c.step, c.path, c.reason)
        }
        Event::Control(c) => format!("[control {:>4}] {} from {} (lr x{})", c.step, c.action, c.origin, c.lr_scale),
        Event::Skipped(s) => format!("[skip  {:>6}] {}: no update ({} in a row)", s.step, s.reason, s.consecutive),
        Event::Sample(s) => {
            format!("[sample {:>5}] {:?} -> {:?} ({})", s.step, s.prompt, s.text, s.sampling)
        }
        Event::TrainEnd(e) => format!(
            "[end] {} at step {} | train loss {} | eval loss {} | perplexity {} | {:.1}s | {} tok/s",
            e.status,
            e.step,
            // the mean over every step applied, resumes included: say over how many
            e.train_loss.map_or("-".into(), |l| format!("{l:.4} (mean of {} steps)", e.train_loss_steps)),
            e.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
            e.perplexity.map_or("-".into(), |p| format!("{p:.2}")),
            e.train_runtime,
            si(e.tokens_per_second)
        ),
    })
}

impl Sink for StderrLog {
    fn handle(&mut self, event: &Event) -> std::io::Result<()> {
        if let Event::Prepare(p) = event {
            // at most a line per second per stage, plus its end
            let finished = p.total > 0 && p.done >= p.total;
            let recent =
                self.last_prepare.as_ref().is_some_and(|(s, t)| *s == p.stage && t.elapsed() < Duration::from_secs(1));
            if recent && !finished {
                return Ok(());
            }
            self.last_prepare = Some((p.stage.clone(), Instant::now()));
        }
        if let Some(line) = describe(event) {
            writeln!(std::io::stderr(), "{line}")?;
        }
        Ok(())
    }
}

/// `1h02m`, `3m20s`, `45s`.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
