//! The learning-rate range test (Smith 2015; fastai's `lr_find`): train from the start for
//! `num_steps` with the LR growing exponentially from `start_lr` to `end_lr`, record the
//! debiased smoothed loss (beta 0.98), stop once it passes 4x the best, and suggest LRs: the
//! steepest descent of the smoothed curve against log LR, and fastai's "valley".

use serde::{Deserialize, Serialize};

/// The LR of step `i` of `n`.
pub fn lr_at(i: usize, n: usize, start: f64, end: f64) -> f64 {
    start * (end / start).powf(i as f64 / (n.max(2) - 1) as f64)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
    /// Debiased EMA (beta 0.98) of `losses`.
    pub smoothed: Vec<f64>,
    /// Why it stopped early, if it did.
    pub stopped: Option<String>,
}

pub const BETA: f64 = 0.98;
pub const STOP_RATIO: f64 = 4.0;

impl Curve {
    /// Records a step; returns false once the test should stop.
    pub fn push(&mut self, lr: f64, loss: f64) -> bool {
        if !loss.is_finite() {
            self.stopped = Some(format!("non-finite loss at LR {lr:.2e}"));
            return false;
        }
        let n = self.losses.len() as i32 + 1;
        let prev = self.smoothed.last().map_or(0.0, |s| s * (1.0 - BETA.powi(n - 1)));
        let avg = BETA * prev + (1.0 - BETA) * loss;
        let smooth = avg / (1.0 - BETA.powi(n));
        self.lrs.push(lr);
        self.losses.push(loss);
        self.smoothed.push(smooth);
        let best = self.smoothed.iter().copied().fold(f64::INFINITY, f64::min);
        if n > 1 && smooth > STOP_RATIO * best {
            self.stopped =
                Some(format!("smoothed loss {smooth:.3} passed {STOP_RATIO} x the best {best:.3} at LR {lr:.2e}"));
            return false;
        }
        true
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestions {
    /// Where the smoothed loss falls fastest against log LR.
    pub steepest: Option<f64>,
    /// fastai's default: a point two thirds down the longest valley of the curve.
    pub valley: Option<f64>,
}

/// The points suggestions look at: fastai drops the first tenth and the last five.
fn trimmed(c: &Curve) -> (&[f64], &[f64]) {
    let n = c.smoothed.len();
    let start = n / 10;
    let end = n.saturating_sub(5).max(start);
    (&c.lrs[start..end], &c.smoothed[start..end])
}

pub fn suggest(c: &Curve) -> Suggestions {
    let (lrs, losses) = trimmed(c);
    if lrs.len() < 3 {
        return Suggestions { steepest: None, valley: None };
    }
    Suggestions { steepest: steepest(lrs, losses), valley: valley(lrs, losses) }
}

/// The LR where `d loss / d log(lr)` is most negative.
pub fn steepest(lrs: &[f64], losses: &[f64]) -> Option<f64> {
    (1..lrs.len().min(losses.len()))
        .map(|i| (i, (losses[i] - losses[i - 1]) / (lrs[i].ln() - lrs[i - 1].ln())))
        .filter(|(_, g)| g.is_finite())
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| lrs[i - 1])
}

/// fastai's `valley`: the longest run of decreasing losses (as a longest decreasing
/// subsequence), then the point `1/3 + 1/6` of the way along it.
pub fn valley(lrs: &[f64], losses: &[f64]) -> Option<f64> {
    let n = losses.len();
    if n == 0 {
        return None;
    }
    let mut lds = vec![1usize; n];
    let (mut max_start, mut max_end) = (0usize, 0usize);
    for i in 1..n {
        for j in 0..i {
            if losses[i] < losses[j] && lds[i] < lds[j] + 1 {
                lds[i] = lds[j] + 1;
            }
            if lds[max_end] < lds[i] {
                max_end = i;
                // fastai's start index (one before the run; -1 clamps to 0)
                max_start = max_end.saturating_sub(lds[max_end]);
            }
        }
    }
    let sections = (max_end - max_start) as f64 / 3.0;
    let idx = max_start + sections as usize + (sections / 2.0) as usize;
    lrs.get(idx).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic range-test curve: flat, a steep fall centred on 1e-3, a floor, then a blow-up.
    fn synthetic() -> Curve {
        let mut c = Curve::default();
        for i in 0..100 {
            let lr = lr_at(i, 100, 1e-7, 10.0);
            let x = lr.log10();
            // a logistic drop of 4 nats centred at log10 lr = -3, then exponential growth past 1e-1
            let loss =
                2.0 + 4.0 / (1.0 + ((x + 3.0) * 3.0).exp()) + if x > -1.0 { (x + 1.0).powi(2) * 30.0 } else { 0.0 };
            if !c.push(lr, loss) {
                break;
            }
        }
        c
    }

    #[test]
    fn the_schedule_spans_start_to_end_exponentially() {
        assert!((lr_at(0, 100, 1e-7, 10.0) - 1e-7).abs() < 1e-20);
        assert!((lr_at(99, 100, 1e-7, 10.0) - 10.0).abs() < 1e-9);
        assert!((lr_at(50, 101, 1e-6, 1.0) - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn it_stops_past_four_times_the_best_and_suggests_in_the_steep_part() {
        let c = synthetic();
        assert!(c.stopped.as_ref().is_some_and(|s| s.contains("passed 4")), "{:?}", c.stopped);
        assert!(c.lrs.len() < 100);
        let s = suggest(&c);
        let steep = s.steepest.unwrap();
        // smoothing lags the curve: the steepest smoothed descent sits just right of 1e-3
        assert!((1e-3..1e-1).contains(&steep), "steepest {steep:e}");
        let valley = s.valley.unwrap();
        assert!((1e-4..1e-1).contains(&valley), "valley {valley:e}");
    }

    #[test]
    fn valley_matches_fastai_on_a_hand_worked_case() {
        // the longest decreasing run is indices 2..=8 (7 points): lds = [1,1,1,2,3,4,5,6,7,1]
        let losses = [5.0, 6.0, 9.0, 8.0, 7.0, 6.5, 6.0, 5.5, 5.0, 9.0];
        let lrs: Vec<f64> = (0..10).map(|i| 10f64.powi(i)).collect();
        // max_end 8, max_start 8 - 7 = 1; sections 7/3 = 2.33: idx = 1 + 2 + 1 = 4
        assert_eq!(valley(&lrs, &losses), Some(1e4));
        // the steepest fall is from index 1 to 2: reported at the lower LR of the pair
        assert_eq!(steepest(&lrs, &[3.0, 2.0, 0.5, 0.4]), Some(10.0));
    }
}

// ---------------------------------------------------------------- the runner

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use crossbeam_channel::Sender;

use crate::config::RunConfig;
use crate::data::{Batcher, EpochOrder};
use crate::events::Event;
use crate::model::Trainable;
use crate::optim::{self, AdamW};
use crate::sinks::figures::{self, Line, XAxis};
use crate::train::run::{adamw_config, placement, prepare_data, starting_model};
use crate::train::step::{forward_backward, Accumulated, MicroBatch};
use crate::train::TrainError;

#[derive(Debug, Clone, PartialEq)]
pub enum LrFindEvent {
    Train(Event),
    Point { lr: f64, loss: f64, smoothed: f64 },
    Done { curve: Curve, suggestions: Suggestions, dir: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub start: f64,
    pub end: f64,
    pub steps: usize,
}

/// Runs the range test from the run's starting point (fresh from its seed, or its
/// `resume_from_checkpoint`) on a copy of the model; writes `<output_dir>/lr_find/` (curve and
/// suggestions as JSON, the plot as PNG) and touches nothing else of the run.
pub fn run(
    cfg: &RunConfig,
    cache_dir: &Path,
    range: Range,
    tx: &Sender<LrFindEvent>,
) -> Result<(Curve, Suggestions), TrainError> {
    if !(range.start > 0.0 && range.end > range.start && range.steps >= 6) {
        return Err(TrainError::LrRange { start: range.start, end: range.end, steps: range.steps });
    }
    let (device, dtype, engine) = placement(cfg)?;
    // preparation progress, forwarded live
    let (etx, erx) = crossbeam_channel::unbounded::<Event>();
    let data = std::thread::scope(|s| {
        s.spawn(|| {
            for e in erx.iter() {
                let _ = tx.send(LrFindEvent::Train(e));
            }
        });
        let data = prepare_data(cfg, cache_dir, &etx);
        drop(etx);
        data
    })?;
    let start = starting_model(cfg, data.tokenizer.vocab_size(), &device)?;
    let (model_cfg, weights) = (start.model, start.weights);
    // a copy: `weights` are fresh tensors, so the run's checkpoint is never written
    let model = Trainable::new(&model_cfg, weights)?.with_dtype(dtype)?.with_engine(engine);
    let mut opt = AdamW::new(&model.vars, adamw_config(cfg), |_, v| v.rank() >= 2)?;
    let blocks = data.train.num_blocks(cfg.block_size);
    if blocks < cfg.batch_size {
        return Err(TrainError::TooFewBlocks { blocks, block_size: cfg.block_size, batch_size: cfg.batch_size });
    }
    let batcher = Batcher { stream: &data.train, block_size: cfg.block_size };
    let per_epoch = blocks / cfg.batch_size;
    let mut curve = Curve::default();
    let accumulation = cfg.accumulation_steps();
    for i in 0..range.steps {
        let lr = lr_at(i, range.steps, range.start, range.end);
        let order = EpochOrder::new(blocks, cfg.seed, (i / per_epoch) as u64);
        let offset = (i % per_epoch) * cfg.batch_size;
        let mut acc = Accumulated::default();
        let mut loss = 0.0;
        for micro in order.blocks(offset, cfg.batch_size).chunks(cfg.micro_batch_size) {
            let ids: Tensor = batcher.batch(micro, &device)?;
            let out = forward_backward(
                engine,
                &model,
                &MicroBatch { ids: &ids, targets: None },
                1.0 / accumulation as f64,
                None,
                cfg.gradient_checkpointing,
                &mut acc,
            )?;
            loss += out.loss / accumulation as f64;
        }
        let grads = acc.into_grads(&model_cfg)?;
        let go_on = curve.push(lr, loss);
        if let Some(&smoothed) = curve.smoothed.last() {
            let _ = tx.send(LrFindEvent::Point { lr, loss, smoothed });
        }
        if !go_on {
            break;
        }
        if !optim::step(&mut opt, &grads, lr, cfg.max_grad_norm)?.applied {
            curve.stopped.get_or_insert_with(|| format!("non-finite gradient at LR {lr:.2e}"));
            break;
        }
    }
    let suggestions = suggest(&curve);
    let dir = PathBuf::from(&cfg.output_dir).join("lr_find");
    write(&dir, &curve, &suggestions).map_err(|source| TrainError::Io { path: dir.clone(), source })?;
    let _ = tx.send(LrFindEvent::Done { curve: curve.clone(), suggestions: suggestions.clone(), dir });
    Ok((curve, suggestions))
}

fn write(dir: &Path, curve: &Curve, s: &Suggestions) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::json!({ "curve": curve, "suggestions": s });
    crate::atomic_file::write(
        &dir.join("lr_find.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default().as_bytes(),
    )?;
    // fastai's view: the blow-up at the end would flatten everything else, so the y range
    // stops a little above the smoothed curve's highest point before its last five
    let keep = curve.smoothed.len().saturating_sub(5).max(1);
    let cap = curve.smoothed[..keep.min(curve.smoothed.len())].iter().copied().fold(f64::NEG_INFINITY, f64::max) * 1.15;
    let pts = |ys: &[f64]| {
        curve.lrs.iter().zip(ys).filter(|(_, y)| **y <= cap).map(|(l, y)| (l.log10(), *y)).collect::<Vec<_>>()
    };
    let mut lines = vec![
        Line { label: "loss", points: pts(&curve.losses), color: figures::PALETTE[7], markers: false },
        Line { label: "smoothed loss (EMA 0.98)", points: pts(&curve.smoothed), color: figures::BLUE, markers: false },
    ];
    let mark = |lr: f64| {
        let i = curve.lrs.iter().position(|l| *l >= lr).unwrap_or(0);
        vec![(lr.log10(), curve.smoothed.get(i).copied().unwrap_or(0.0))]
    };
    if let Some(lr) = s.steepest {
        lines.push(Line { label: "steepest descent", points: mark(lr), color: figures::RED, markers: true });
    }
    if let Some(lr) = s.valley {
        lines.push(Line { label: "valley", points: mark(lr), color: figures::GREEN, markers: true });
    }
    let png = figures::chart("LR range test", XAxis::Log10Lr, "loss (nats per token)", lines, None)?;
    crate::atomic_file::write(&dir.join("lr_find.png"), &png.bytes)
}
