//! The learning-rate range test (Smith 2015; fastai's `lr_find`): train from the start for
//! `num_steps` with the LR growing exponentially from `start_lr` to `end_lr`, record the
//! debiased exponentially smoothed loss, stop once it passes 4x its best (fastai's rule), and
//! suggest LRs: fastai's "valley", the steepest descent, and the minimum's LR / 10.
//!
//! Where this differs from fastai, and why: fastai smooths with beta 0.98, a memory of ~50
//! points, which assumes hundreds of noisy batches. Over the default 100 points the loss falls
//! and blows up within ~20 of them, and 0.98 lags so far that the smoothed minimum sat at 6.31
//! while the raw loss reached 3.15, and the stop fired at LR 5.7 with raw loss 383. So the
//! smoothing's memory is 4% of the run (beta = 1 - 25/steps: 0.75 at 100 steps, fastai's own 0.98
//! from 1250), the stop rule is fastai's on that curve, and the suggestions read a zero-lag
//! curve (the same smoothing run forwards, then backwards) so the steepest fall is found where
//! it is, not a few points late.

use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::data::Batcher;
use crate::dist::{Wire, World};
use crate::events::Event;
use crate::model::Trainable;
use crate::optim::AdamW;
use crate::sinks::figures::{self, Line, XAxis};
use crate::train::device::placement;
use crate::train::run::{adamw_config, prepare_data, starting_model};
use crate::train::step::{self, BlockSchedule, Recipe};
use crate::train::TrainError;

/// The LR of step `i` of `n`.
pub fn lr_at(i: usize, n: usize, start: f64, end: f64) -> f64 {
    start * (end / start).powf(i as f64 / (n.max(2) - 1) as f64)
}

/// fastai's beta, kept once a run is long enough for it.
pub const FASTAI_BETA: f64 = 0.98;
pub const STOP_RATIO: f64 = 4.0;

/// The smoothing for a test of `steps` points: a memory (1 / (1 - beta)) of 4% of them,
/// between 2 points and fastai's 50.
pub fn beta_for(steps: usize) -> f64 {
    (1.0 - 25.0 / steps.max(1) as f64).clamp(0.5, FASTAI_BETA)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub beta: f64,
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
    /// Debiased EMA of `losses` (fastai's `AvgSmoothLoss`), causal: what the stop rule reads.
    pub smoothed: Vec<f64>,
    /// Why it stopped early, if it did.
    pub stopped: Option<String>,
    /// The lowest smoothed loss so far, and its index.
    #[serde(skip)]
    best: Option<(f64, usize)>,
    #[serde(skip)]
    average: f64,
}

impl Curve {
    pub fn new(beta: f64) -> Self {
        Self { beta, lrs: vec![], losses: vec![], smoothed: vec![], stopped: None, best: None, average: 0.0 }
    }

    /// Records a step; returns false once the test should stop: a non-finite loss, or the
    /// smoothed loss above `STOP_RATIO` x its lowest (fastai's `stop_div`).
    pub fn push(&mut self, lr: f64, loss: f64) -> bool {
        if !loss.is_finite() {
            self.stopped = Some(format!("non-finite loss at LR {lr:.2e}"));
            return false;
        }
        let n = self.losses.len() as i32 + 1;
        // fastai: val = lerp(loss, val, beta); value = val / (1 - beta^count)
        self.average = self.beta * self.average + (1.0 - self.beta) * loss;
        let smooth = self.average / (1.0 - self.beta.powi(n));
        self.lrs.push(lr);
        self.losses.push(loss);
        self.smoothed.push(smooth);
        if self.best.is_none_or(|(b, _)| smooth < b) {
            self.best = Some((smooth, self.smoothed.len() - 1));
        }
        let best = self.best.map_or(smooth, |(b, _)| b);
        if n > 1 && smooth > STOP_RATIO * best {
            self.stopped =
                Some(format!("smoothed loss {smooth:.3} passed {STOP_RATIO} x the best {best:.3} at LR {lr:.2e}"));
            return false;
        }
        true
    }

    /// The smoothing without lag: the debiased EMA forwards, then the same backwards over the
    /// result, so a fall or a minimum stays where the raw loss has it.
    pub fn centred(&self) -> Vec<f64> {
        let pass = |xs: &mut dyn Iterator<Item = f64>| -> Vec<f64> {
            let (mut avg, mut out) = (0.0, vec![]);
            for (i, x) in xs.enumerate() {
                avg = self.beta * avg + (1.0 - self.beta) * x;
                out.push(avg / (1.0 - self.beta.powi(i as i32 + 1)));
            }
            out
        };
        let forward = pass(&mut self.losses.iter().copied());
        let mut back = pass(&mut forward.iter().rev().copied());
        back.reverse();
        back
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestions {
    /// fastai's default: a point two thirds down the longest valley of the curve.
    pub valley: Option<f64>,
    /// Where the loss falls fastest against log LR.
    pub steepest: Option<f64>,
    /// A tenth of the LR at the lowest loss (fastai's `minimum`).
    pub minimum: Option<f64>,
    /// The LR at the lowest loss of the zero-lag curve: the bottom, the edge of stability.
    pub bottom: Option<f64>,
    /// The one to use (`recommend`), and why.
    pub recommended: Option<f64>,
    pub recommended_by: Option<String>,
    /// The lowest smoothed loss (the causal curve fastai plots) and the raw loss's lowest.
    pub lowest_smoothed: Option<f64>,
    pub lowest_raw: Option<f64>,
}

/// The points suggestions look at: fastai drops the first tenth and the last five.
fn trimmed(losses: &[f64]) -> (usize, usize) {
    let n = losses.len();
    let start = n / 10;
    (start, n.saturating_sub(5).max(start))
}

pub fn suggest(c: &Curve) -> Suggestions {
    let centred = c.centred();
    let (a, b) = trimmed(&centred);
    let (lrs, losses) = (&c.lrs[a..b], &centred[a..b]);
    let lowest = |xs: &[f64]| xs.iter().copied().filter(|x| x.is_finite()).min_by(f64::total_cmp);
    let mut s = Suggestions {
        valley: None,
        steepest: None,
        minimum: None,
        bottom: None,
        recommended: None,
        recommended_by: None,
        lowest_smoothed: lowest(&c.smoothed),
        lowest_raw: lowest(&c.losses),
    };
    if lrs.len() >= 3 {
        s.valley = valley(lrs, losses);
        s.steepest = steepest(lrs, losses);
        s.bottom = losses.iter().enumerate().min_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| lrs[i]);
        s.minimum = s.bottom.map(|b| b / 10.0);
        if let Some((lr, why)) = recommend(s.steepest, s.bottom) {
            s.recommended = Some(lr);
            s.recommended_by = Some(why);
        }
    }
    s
}

/// The rule: half way, on the log axis, from the steepest fall to the bottom of the zero-lag
/// curve. Below the steepest point the model learns slower than it could; at the bottom the
/// range test is already at its edge of stability, and a run that holds its peak LR for longer
/// than the test's few steps per LR is past it. A sweep's best lies between the two: measured on
/// the demo and a second shape (README: lr-find), this pick was 1.2x and 1.1x from a 6-value
/// sweep's best (6e-3 on both), where fastai's valley was 100x low (the long flat start of a
/// 1e-7 test makes its longest decreasing run start on the plateau), minimum / 10 6-7x low and the
/// steepest point alone 2.2x low.
pub fn recommend(steepest: Option<f64>, bottom: Option<f64>) -> Option<(f64, String)> {
    match (steepest, bottom) {
        (Some(s), Some(b)) if s < b => Some((
            (s * b).sqrt(),
            format!("half way on the log axis from the steepest fall ({s:.1e}) to the bottom of the loss ({b:.1e})"),
        )),
        // no fall before the bottom: the curve never fell, or fell at its first point
        (_, Some(b)) => {
            Some((b / 3.0, format!("a third of the bottom of the loss ({b:.1e}): no steeper fall before it")))
        }
        _ => None,
    }
}

/// The LR where `d loss / d log(lr)` is most negative (the lower LR of the steepest pair).
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

/// The test in words: what ran, why it stopped, the lowest loss, and each suggestion labelled.
pub fn summary(c: &Curve, s: &Suggestions) -> Vec<String> {
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2e}"));
    let span = match (c.lrs.first(), c.lrs.last()) {
        (Some(a), Some(b)) => format!("LR {a:.1e} to {b:.1e}"),
        _ => "no points".into(),
    };
    vec![
        format!(
            "{} points, {span}, smoothing beta {:.2}; {}",
            c.lrs.len(),
            c.beta,
            c.stopped.clone().unwrap_or_else(|| "ran every step".into())
        ),
        format!(
            "lowest loss {} (raw {})",
            s.lowest_smoothed.map_or("-".into(), |v| format!("{v:.3}")),
            s.lowest_raw.map_or("-".into(), |v| format!("{v:.3}"))
        ),
        format!(
            "recommended learning_rate {}: {}",
            f(s.recommended),
            s.recommended_by.as_deref().unwrap_or("the curve has no fall to read")
        ),
        format!("steepest descent:               {}", f(s.steepest)),
        format!("bottom of the loss:             {}", f(s.bottom)),
        format!("minimum / 10 (fastai):          {}", f(s.minimum)),
        format!("valley (fastai's default pick): {}", f(s.valley)),
    ]
}

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

/// Where a range test's files go: `<output_dir>-lr_find/`, beside the run's folder and never in
/// it (a finished run's folder stays as it finished).
pub fn folder(cfg: &RunConfig) -> PathBuf {
    PathBuf::from(format!("{}-lr_find", cfg.output_dir.trim_end_matches('/')))
}

/// Runs the range test from the run's starting point (fresh from its seed, or its
/// `resume_from_checkpoint`) on a copy of the model; writes `folder(cfg)` (curve and suggestions
/// as JSON, the plot as PNG) and touches nothing of the run.
pub fn run(
    cfg: &RunConfig,
    cache_dir: &Path,
    range: Range,
    tx: &Sender<LrFindEvent>,
) -> Result<(Curve, Suggestions), TrainError> {
    if !(range.start > 0.0 && range.end > range.start && range.steps >= 6) {
        return Err(TrainError::LrRange { start: range.start, end: range.end, steps: range.steps });
    }
    let placement = placement(cfg, 1)?;
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
    let start = starting_model(cfg, data.tokenizer.vocab_size(), &placement.device)?;
    // a copy: `weights` are fresh tensors, so the run's checkpoint is never written
    let model = Trainable::new(&start.model, start.weights, &placement)?;
    let mut opt = AdamW::new(&model.vars, adamw_config(cfg), |_, v| v.rank() >= 2)?;
    let blocks = data.train.num_blocks(cfg.block_size);
    let mut schedule = BlockSchedule::new(blocks, cfg.batch_size, cfg.micro_batch_size, cfg.seed);
    if schedule.steps_per_epoch() == 0 {
        return Err(TrainError::TooFewBlocks { blocks, block_size: cfg.block_size, batch_size: cfg.batch_size });
    }
    let batcher = Batcher { stream: &data.train, block_size: cfg.block_size };
    let world = World::single();
    let recipe = Recipe {
        placement: &placement,
        world: &*world,
        micro_batches: cfg.accumulation_steps(),
        checkpointing: cfg.gradient_checkpointing,
        dropout: cfg.dropout,
        seed: cfg.seed,
        grad_wire: Wire::F32,
        grad_overlap: false,
        bucket_bytes: crate::dist::BUCKET_BYTES,
    };
    let mut curve = Curve::new(beta_for(range.steps));
    for i in 0..range.steps {
        let lr = lr_at(i, range.steps, range.start, range.end);
        let ids = step::load(&batcher, &schedule.micro_batches(i as u64, 0, 1), &placement.device)?;
        let g = step::gradients(&model, &recipe, i as u64, &step::as_batches(&ids), &mut || {})?;
        let go_on = curve.push(lr, g.loss);
        if let Some(&smoothed) = curve.smoothed.last() {
            let _ = tx.send(LrFindEvent::Point { lr, loss: g.loss, smoothed });
        }
        if !go_on {
            break;
        }
        if !step::apply(&mut opt, &g, lr, cfg.max_grad_norm)?.applied {
            curve.stopped.get_or_insert_with(|| format!("non-finite gradient at LR {lr:.2e}"));
            break;
        }
    }
    let suggestions = suggest(&curve);
    let dir = folder(cfg);
    write(&dir, &curve, &suggestions).map_err(|source| TrainError::Io { path: dir.clone(), source })?;
    let _ = tx.send(LrFindEvent::Done { curve: curve.clone(), suggestions: suggestions.clone(), dir });
    Ok((curve, suggestions))
}

fn write(dir: &Path, curve: &Curve, s: &Suggestions) -> std::io::Result<()> {
    let e = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1e}"));
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
        Line { label: "smoothed loss (zero lag)", points: pts(&curve.centred()), color: figures::BLUE, markers: false },
    ];
    let centred = curve.centred();
    let mark = |lr: f64| {
        let i = curve.lrs.iter().position(|l| *l >= lr).unwrap_or(curve.lrs.len().saturating_sub(1));
        vec![(lr.log10(), centred.get(i).copied().unwrap_or(0.0).min(cap))]
    };
    // every suggestion, its value in its label; the recommendation last, drawn over the others
    let labels = [
        (format!("steepest descent {}", e(s.steepest)), s.steepest, figures::RED),
        (format!("bottom of the loss {}", e(s.bottom)), s.bottom, figures::PALETTE[3]),
        (format!("minimum / 10 (fastai) {}", e(s.minimum)), s.minimum, figures::PALETTE[4]),
        (format!("valley (fastai's default) {}", e(s.valley)), s.valley, figures::GREEN),
        (format!("recommended {}", e(s.recommended)), s.recommended, figures::PALETTE[5]),
    ];
    for (label, lr, color) in &labels {
        if let Some(lr) = lr {
            lines.push(Line { label, points: mark(*lr), color: *color, markers: true });
        }
    }
    let title = format!("LR range test: recommended learning_rate {}", e(s.recommended));
    let png = figures::chart(&title, XAxis::Log10Lr, "loss (nats per token)", lines, None)?;
    crate::atomic_file::write(&dir.join("lr_find.png"), &png.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(beta: f64, losses: impl Fn(f64) -> f64) -> Curve {
        let mut c = Curve::new(beta);
        for i in 0..100 {
            let lr = lr_at(i, 100, 1e-7, 10.0);
            if !c.push(lr, losses(lr.log10())) {
                break;
            }
        }
        c
    }

    /// The reported shape: flat at ln(50257) = 10.8 until LR 1e-4, a fall to 3.15 centred on
    /// 3e-3, then a blow-up that reaches hundreds by LR 1 (a GPT-2-vocabulary model), with a
    /// little batch-to-batch noise. With beta 0.98 it gives what was reported: the smoothed
    /// minimum ~2.5x the raw one, and a stop at raw loss ~380.
    fn reported(x: f64) -> f64 {
        let fall = 3.15 + 7.65 / (1.0 + ((x + 2.5) * 4.0).exp());
        let noise = 0.03 * (x * 37.0).sin();
        fall + noise + if x > -1.5 { 10f64.powf((x + 1.5) * 2.0) - 1.0 } else { 0.0 }
    }

    #[test]
    fn the_schedule_spans_start_to_end_exponentially() {
        assert!((lr_at(0, 100, 1e-7, 10.0) - 1e-7).abs() < 1e-20);
        assert!((lr_at(99, 100, 1e-7, 10.0) - 10.0).abs() < 1e-9);
        assert!((lr_at(50, 101, 1e-6, 1.0) - 1e-3).abs() < 1e-12);
        assert_eq!((beta_for(100), beta_for(2000), beta_for(10)), (0.75, 0.98, 0.5));
    }

    #[test]
    fn the_reported_curve_is_read_where_the_loss_is() {
        // where the true curve falls fastest against log LR: its logistic's centre, 10^-2.5
        let old = run(FASTAI_BETA, reported);
        let old_s = suggest(&old);
        let new = run(beta_for(100), reported);
        let s = suggest(&new);
        let raw_min = new.losses.iter().copied().fold(f64::INFINITY, f64::min);
        // beta 0.98 (before): the smoothed curve never got near the raw minimum, and the stop
        // fired long after the raw loss had blown past 4x it
        assert!(old_s.lowest_smoothed.unwrap() > 1.5 * raw_min, "before: {:?}", old_s.lowest_smoothed);
        let old_stop = *old.losses.last().unwrap();
        assert!(old_stop > 20.0 * raw_min, "before: stopped at raw loss {old_stop}");
        // now: the lowest smoothed loss within 15% of the raw minimum (a V two points wide
        // cannot be smoothed without some loss of depth)
        assert!(s.lowest_smoothed.unwrap() < 1.15 * raw_min, "{:?} vs raw {raw_min}", s.lowest_smoothed);
        // the stop fires within 4 points of the raw loss passing 4x its minimum (before: 10),
        // before the raw loss reaches 12x it (before: over 100x)
        let first_over = new.losses.iter().position(|l| *l > STOP_RATIO * raw_min).unwrap();
        assert!(new.losses.len() <= first_over + 4, "stopped {} points after", new.losses.len() - first_over);
        assert!(*new.losses.last().unwrap() < 12.0 * raw_min, "stopped at raw {}", new.losses.last().unwrap());
        assert!(new.stopped.as_ref().is_some_and(|w| w.contains("passed 4")), "{:?}", new.stopped);
        // the steepest descent within a factor 3 of 10^-2.5, on the fall, not at the blow-up
        let steep = s.steepest.unwrap().log10();
        assert!((steep + 2.5).abs() < 0.5, "steepest at 1e{steep:.2}");
        // fastai's valley: half way along the longest decreasing run, which starts on the
        // slowly falling plateau here; below the bottom, never in the blow-up
        let valley = s.valley.unwrap().log10();
        assert!((-5.0..-2.0).contains(&valley), "valley at 1e{valley:.2}");
        // before, the steepest descent of the lagging curve sat far from the fall's centre
        let old_steep = old_s.steepest.unwrap().log10();
        assert!((old_steep + 2.5).abs() > 1.0, "before: steepest at 1e{old_steep:.2}");
        let words = summary(&new, &s).join("\n");
        assert!(words.contains("valley (fastai's default pick)") && words.contains("lowest loss 3.7"), "{words}");
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

    #[test]
    fn fastais_smoothing_is_debiased_and_the_centred_curve_has_no_lag() {
        let mut c = Curve::new(0.98);
        c.push(1e-3, 5.0);
        // debiased: the first smoothed value is the first loss, not 2% of it
        assert!((c.smoothed[0] - 5.0).abs() < 1e-12);
        // a step from 5 to 1: the causal EMA is still above 1 at the end; the centred curve
        // puts the fall where it is (its midpoint between the two levels at the step)
        let mut c = Curve::new(0.75);
        for i in 0..40 {
            c.push(1e-3, if i < 20 { 5.0 } else { 1.0 });
        }
        let centred = c.centred();
        assert!(c.smoothed[22] > 2.5 && centred[22] < 2.0, "causal {} centred {}", c.smoothed[22], centred[22]);
        assert!(centred[14] > 4.5 && centred[26] < 1.5, "{} {}", centred[14], centred[26]);
    }

    /// Half way between the steepest fall and the bottom on the log axis; with no fall before
    /// the bottom, a third of the bottom, said so.
    #[test]
    fn the_recommendation_is_read_between_the_fall_and_the_bottom() {
        let (lr, why) = recommend(Some(1e-3), Some(1e-2)).unwrap();
        assert!((lr - 10f64.powf(-2.5)).abs() < 1e-12, "{lr}");
        assert!(why.contains("steepest fall (1.0e-3)") && why.contains("bottom of the loss (1.0e-2)"), "{why}");
        let (lr, why) = recommend(Some(1e-2), Some(1e-2)).unwrap();
        assert!((lr - 1e-2 / 3.0).abs() < 1e-15 && why.contains("no steeper fall before it"), "{why}");
        assert_eq!(recommend(None, None), None);
        // on the reported curve: between its fall's centre (10^-2.5) and where it turns up
        let s = suggest(&run(beta_for(100), reported));
        let r = s.recommended.unwrap();
        assert!(s.steepest.unwrap() < r && r < s.bottom.unwrap(), "{s:?}");
    }
}
