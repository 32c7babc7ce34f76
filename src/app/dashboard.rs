//! The dashboard's state: everything the screen shows, built from the event stream only.

use std::collections::VecDeque;

use crate::events::{
    ControlAction, ControlRecord, Event, Histogram, LayerStat, Level, PositionBucket, RunStatus, StepRecord, TrainBegin,
};
use crate::series::Series;

/// How many log lines are kept.
pub const LOG_LINES: usize = 400;
/// Lines PgUp / PgDn move the event log.
pub const LOG_PAGE: isize = 5;

/// An evaluation's loss by position: its step and buckets.
pub type PositionCurve = (u64, Vec<PositionBucket>);

/// Smoothing weights cycled by `s` (TensorBoard's default is 0.6).
pub const SMOOTHING: [f64; 4] = [0.6, 0.9, 0.0, 0.3];
/// Progress records kept for the heat maps (the diff-norm histogram and the layer strips).
pub const HEAT_HISTORY: usize = 512;

/// What the lower-left panel shows; `v` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    /// The last diff-norm histogram.
    Histogram,
    /// The diff-norm histograms over time: bins against step.
    HeatMap,
    /// Per-layer gradient norm and update/weight ratio, with the ratio over time.
    Layers,
    /// The eval loss by position in the block: the latest evaluation over the first. Whether
    /// the model uses its context at all (the curve falls along the block) shows here.
    Positions,
}

impl Panel {
    pub fn next(self) -> Self {
        match self {
            Panel::Histogram => Panel::HeatMap,
            Panel::HeatMap => Panel::Layers,
            Panel::Layers => Panel::Positions,
            Panel::Positions => Panel::Histogram,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Panel::Histogram => "hist",
            Panel::HeatMap => "heat",
            Panel::Layers => "layers",
            Panel::Positions => "position",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub log_y: bool,
    pub smoothing: f64,
    pub panel: Panel,
}

impl View {
    /// The smoothing `s` would switch to.
    pub fn next_smoothing(&self) -> f64 {
        let i = SMOOTHING.iter().position(|s| *s == self.smoothing).unwrap_or(0);
        SMOOTHING[(i + 1) % SMOOTHING.len()]
    }

    pub fn cycle_smoothing(&mut self) {
        self.smoothing = self.next_smoothing();
    }
}

/// Where a chart marks something that happened at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    LrChange,
    Pause,
    Checkpoint,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Preparing { stage: String, done: u64, total: u64 },
    Training,
    Paused,
    Finished { status: RunStatus },
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Dashboard {
    pub title: String,
    pub begin: Option<TrainBegin>,
    pub status: Status,
    pub paused: bool,
    pub loss: Series,
    pub eval: Series,
    pub lr: Series,
    pub grad_norm: Series,
    pub marks: Vec<(u64, MarkKind)>,
    pub step: u64,
    pub epoch: f64,
    pub last_loss: Option<f64>,
    pub last_lr: Option<f64>,
    pub last_grad_norm: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// Training seconds (pauses excluded) at the last progress marker.
    pub elapsed: f64,
    pub eval_loss: Option<f64>,
    /// The last evaluation scored only part of the validation split (`eval_max_blocks`).
    pub eval_partial: bool,
    /// The eval loss by position at the training length: the first evaluation's and the
    /// latest's, `(step, buckets)`.
    pub positions: Option<(PositionCurve, PositionCurve)>,
    pub perplexity: Option<f64>,
    pub diff: Option<DiffStats>,
    pub lr_scale: f64,
    pub skipped: u64,
    pub log: VecDeque<LogLine>,
    /// Lines the event log is scrolled up from its newest (0: following new events).
    pub log_scroll: usize,
    /// The trainer's latest ETA, seconds.
    pub eta: Option<f64>,
    /// The trainer's resident memory, MiB.
    pub rss_mib: Option<f64>,
    /// Memory in use on the CUDA device, MiB.
    pub gpu_mib: Option<f64>,
    /// The diff-norm histograms of the last `HEAT_HISTORY` progress records, by step.
    pub diff_history: VecDeque<(u64, Histogram)>,
    /// Per-layer statistics of the last `HEAT_HISTORY` progress records, by step.
    pub layer_history: VecDeque<(u64, Vec<LayerStat>)>,
    pub view: View,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiffStats {
    pub step: u64,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub hist: Option<Histogram>,
}

/// The diff-norm histograms over time on one value axis: the last `cols` histograms of
/// `history` (oldest first), each re-binned onto `rows` equal bins over `[lo, hi]` (the
/// range of all of them; a bin's count is shared out by overlap) and scaled so that the
/// column's fullest bin is 1. Row 0 is the lowest value. `None` without histograms.
pub fn heat_columns(history: &VecDeque<(u64, Histogram)>, cols: usize, rows: usize) -> Option<HeatMap> {
    let shown: Vec<&(u64, Histogram)> = history.iter().skip(history.len().saturating_sub(cols)).collect();
    let lo = shown.iter().filter_map(|(_, h)| h.edges.first().copied()).fold(f64::INFINITY, f64::min);
    let hi = shown.iter().filter_map(|(_, h)| h.edges.last().copied()).fold(f64::NEG_INFINITY, f64::max);
    if shown.is_empty() || rows == 0 || !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    let width = (hi - lo).max(1e-12) / rows as f64;
    let columns = shown
        .iter()
        .map(|(_, h)| {
            let mut col = vec![0.0f64; rows];
            for (i, &count) in h.counts.iter().enumerate() {
                let (a, b) = (h.edges[i], h.edges.get(i + 1).copied().unwrap_or(h.edges[i]));
                if b <= a {
                    // a zero-width bin (all values equal): it falls in one row
                    col[(((a - lo) / width) as usize).min(rows - 1)] += count as f64;
                    continue;
                }
                for (r, cell) in col.iter_mut().enumerate() {
                    let (ra, rb) = (lo + width * r as f64, lo + width * (r + 1) as f64);
                    let overlap = (b.min(rb) - a.max(ra)).max(0.0);
                    *cell += count as f64 * overlap / (b - a);
                }
            }
            let top = col.iter().copied().fold(0.0, f64::max);
            if top > 0.0 {
                col.iter_mut().for_each(|c| *c /= top);
            }
            col
        })
        .collect();
    let steps = (shown.first().map_or(0, |s| s.0), shown.last().map_or(0, |s| s.0));
    Some(HeatMap { lo, hi, steps, columns })
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeatMap {
    pub lo: f64,
    pub hi: f64,
    /// The first and last step shown.
    pub steps: (u64, u64),
    /// One column per histogram, `rows` cells each in `[0, 1]`, row 0 lowest.
    pub columns: Vec<Vec<f64>>,
}

/// Appends, dropping the oldest past `HEAT_HISTORY` (a resumed run's repeated steps replace
/// the later ones, so the history stays in step order).
fn push_capped<T>(history: &mut VecDeque<(u64, T)>, item: (u64, T)) {
    while history.back().is_some_and(|(s, _)| *s >= item.0) {
        history.pop_back();
    }
    history.push_back(item);
    if history.len() > HEAT_HISTORY {
        history.pop_front();
    }
}

impl Dashboard {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.into(),
            begin: None,
            status: Status::Preparing { stage: "starting".into(), done: 0, total: 0 },
            paused: false,
            loss: Series::default(),
            eval: Series::with_capacity(512),
            lr: Series::default(),
            grad_norm: Series::default(),
            marks: vec![],
            step: 0,
            epoch: 0.0,
            last_loss: None,
            last_lr: None,
            last_grad_norm: None,
            tokens_per_second: None,
            elapsed: 0.0,
            eval_loss: None,
            eval_partial: false,
            positions: None,
            perplexity: None,
            diff: None,
            lr_scale: 1.0,
            skipped: 0,
            log: VecDeque::new(),
            log_scroll: 0,
            eta: None,
            rss_mib: None,
            gpu_mib: None,
            diff_history: VecDeque::new(),
            layer_history: VecDeque::new(),
            view: View { log_y: false, smoothing: SMOOTHING[0], panel: Panel::Histogram },
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.status, Status::Finished { .. } | Status::Failed(_))
    }

    pub fn is_differential(&self) -> bool {
        self.begin.as_ref().is_some_and(|b| b.config["research"].as_bool() == Some(true))
    }

    pub fn max_grad_norm(&self) -> Option<f64> {
        self.begin.as_ref().and_then(|b| b.config["max_grad_norm"].as_f64())
    }

    pub fn total_steps(&self) -> u64 {
        self.begin.as_ref().map_or(0, |b| b.total_steps)
    }

    /// Seconds to the end: the trainer's estimate (its session's pace, evaluations included),
    /// else at the recent rate; pauses do not count.
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.eta.is_some() {
            return self.eta;
        }
        let b = self.begin.as_ref()?;
        let tps = self.tokens_per_second.filter(|t| *t > 0.0)?;
        let left = b.total_steps.saturating_sub(self.step);
        Some(left as f64 * b.tokens_per_step as f64 / tps)
    }

    fn log(&mut self, level: Level, text: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine { level, text });
        // scrolled back, the view stays on the lines being read as new ones arrive
        if self.log_scroll > 0 {
            self.log_scroll = (self.log_scroll + 1).min(self.log.len().saturating_sub(1));
        }
    }

    /// Scrolls the event log `lines` up (older) or down (newer); 0 follows new events.
    pub fn scroll_log(&mut self, lines: isize) {
        let max = self.log.len().saturating_sub(1) as isize;
        self.log_scroll = (self.log_scroll as isize + lines).clamp(0, max) as usize;
    }

    pub fn log_warning(&mut self, text: String) {
        self.log(Level::Warning, text);
    }

    /// A mark is kept once per (step, kind), in step order.
    fn mark(&mut self, step: u64, kind: MarkKind) {
        if !self.marks.contains(&(step, kind)) {
            self.marks.push((step, kind));
            // bounded: keep the latest thousand
            if self.marks.len() > 1000 {
                self.marks.remove(0);
            }
        }
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Prepare(p) => {
                if self.begin.is_none() {
                    self.status = Status::Preparing { stage: p.stage.clone(), done: p.done, total: p.total };
                }
            }
            Event::Message { level, text } => self.log(*level, text.clone()),
            Event::TrainBegin(b) => self.on_begin(b),
            Event::Progress(p) => self.on_progress(p),
            // a longer window than the training one: a line in the log, not the run's curve
            Event::Evaluate(e) if !e.at_training_length() => {
                let text = format!(
                    "step {}: eval loss in windows of {}: {:.4}",
                    e.step,
                    e.context_length.unwrap_or(0),
                    e.eval_loss
                );
                self.log(Level::Info, text);
            }
            Event::Evaluate(e) => {
                if let Some(buckets) = &e.position_loss {
                    let latest = (e.step, buckets.clone());
                    self.positions = Some(match self.positions.take() {
                        Some((first, _)) => (first, latest),
                        None => (latest.clone(), latest),
                    });
                }
                self.eval.push(e.step as f64, e.eval_loss);
                self.eval_loss = Some(e.eval_loss);
                self.eval_partial = e.eval_blocks < e.validation_blocks;
                self.perplexity = Some(e.perplexity);
                let text = format!(
                    "step {}: eval loss {:.4}, perplexity {:.2}{}",
                    e.step,
                    e.eval_loss,
                    e.perplexity,
                    e.partial_note()
                );
                self.log(Level::Info, text);
            }
            Event::Checkpoint(c) => {
                self.mark(c.step, MarkKind::Checkpoint);
                self.log(Level::Info, format!("step {}: checkpoint {} ({})", c.step, c.path, c.reason));
            }
            Event::Control(c) => self.on_control(c),
            Event::Skipped(s) => {
                self.skipped += 1;
                let text = format!("step {}: skipped, {} ({} in a row)", s.step, s.reason, s.consecutive);
                self.log(Level::Warning, text);
            }
            Event::Sample(s) => {
                let text = s.text.replace('\n', " / ");
                self.log(Level::Info, format!("step {} sample: {}{text}", s.step, s.prompt));
            }
            Event::TrainEnd(e) => {
                self.paused = false;
                self.step = e.step;
                match &e.error {
                    Some(err) => {
                        self.status = Status::Failed(err.clone());
                        self.log(Level::Error, err.clone());
                    }
                    None => {
                        self.status = Status::Finished { status: e.status };
                        self.log(Level::Info, format!("{} at step {} after {:.0}s", e.status, e.step, e.train_runtime));
                    }
                }
            }
        }
    }

    fn on_begin(&mut self, b: &TrainBegin) {
        if let Some(p) = &b.preset {
            self.title = p.clone();
        }
        // a baseline has no differential norms: its lower-left panel shows the layers
        if b.config["research"].as_bool() == Some(false) && self.view.panel != Panel::Layers {
            self.view.panel = Panel::Layers;
        }
        self.step = b.start_step;
        self.status = Status::Training;
        let text = format!(
            "training {} ({} parameters) on {}, engine {}, steps {}..{}",
            b.variant, b.num_parameters, b.device, b.engine, b.start_step, b.total_steps
        );
        self.log(Level::Info, text);
        self.begin = Some(b.clone());
    }

    fn on_progress(&mut self, p: &StepRecord) {
        let x = p.step as f64;
        self.loss.push(x, p.loss);
        self.lr.push(x, p.learning_rate);
        self.grad_norm.push(x, p.grad_norm);
        self.step = p.step;
        self.epoch = p.epoch;
        self.last_loss = Some(p.loss);
        self.last_lr = Some(p.learning_rate);
        self.last_grad_norm = Some(p.grad_norm);
        self.tokens_per_second = Some(p.tokens_per_second);
        self.elapsed = p.elapsed;
        self.eta = p.eta_seconds;
        self.rss_mib = p.rss_mib.or(self.rss_mib);
        self.gpu_mib = p.gpu_mib.or(self.gpu_mib);
        if let Some(h) = &p.diff_norm_hist {
            push_capped(&mut self.diff_history, (p.step, h.clone()));
        }
        if let Some(layers) = &p.layers {
            push_capped(&mut self.layer_history, (p.step, layers.clone()));
        }
        if let (Some(mean), Some(std), Some(min), Some(max)) =
            (p.diff_norm_mean, p.diff_norm_std, p.diff_norm_min, p.diff_norm_max)
        {
            self.diff = Some(DiffStats { step: p.step, mean, std, min, max, hist: p.diff_norm_hist.clone() });
        }
        if matches!(self.status, Status::Preparing { .. }) {
            self.status = Status::Training;
        }
    }

    fn on_control(&mut self, c: &ControlRecord) {
        self.lr_scale = c.lr_scale;
        match c.action {
            ControlAction::Pause => {
                self.paused = true;
                self.status = Status::Paused;
                self.mark(c.step, MarkKind::Pause);
            }
            ControlAction::Resume => {
                self.paused = false;
                self.status = Status::Training;
            }
            ControlAction::ScaleLr => self.mark(c.step, MarkKind::LrChange),
            _ => {}
        }
        let action = c.action.as_str().replace('_', " ");
        self.log(Level::Info, format!("step {}: {action} ({}; LR x{})", c.step, c.origin, c.lr_scale));
    }

    /// The trainer thread ended. An error it returned before any `train_end` (bad data, a
    /// missing dataset offline) is shown here, not as a crash.
    pub fn trainer_done(&mut self, result: Result<(), String>) {
        match result {
            Err(e) if !matches!(self.status, Status::Failed(_)) => {
                self.status = Status::Failed(e.clone());
                self.log(Level::Error, e);
            }
            Ok(()) if !self.finished() => self.status = Status::Finished { status: RunStatus::Stopped },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: Vec<u64>, lo: f64, hi: f64) -> Histogram {
        let n = counts.len();
        Histogram {
            counts,
            edges: (0..=n).map(|i| lo + (hi - lo) * i as f64 / n as f64).collect(),
            sum: 0.0,
            sum_squares: 0.0,
        }
    }

    #[test]
    fn heat_map_columns_share_one_value_axis() {
        let history: VecDeque<(u64, Histogram)> =
            [(10, hist(vec![7, 0], 0.0, 1.0)), (20, hist(vec![0, 3], 0.0, 2.0)), (30, hist(vec![5, 5], 1.0, 1.0))]
                .into();
        let map = heat_columns(&history, 10, 4).unwrap();
        assert_eq!((map.lo, map.hi, map.steps), (0.0, 2.0, (10, 30)));
        // [0, 0.5] -> row 0; [1, 2] -> rows 2 and 3; all equal to 1.0 -> row 2
        assert_eq!(map.columns[0], vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(map.columns[1], vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(map.columns[2], vec![0.0, 0.0, 1.0, 0.0]);
        // only the newest that fit
        let last = heat_columns(&history, 1, 4).unwrap();
        assert_eq!((last.columns.len(), last.steps), (1, (30, 30)));
        assert!(heat_columns(&VecDeque::new(), 10, 4).is_none());
    }

    #[test]
    fn histories_stay_in_step_order_and_capped() {
        let mut d = Dashboard::new("run");
        let progress = |step: u64| {
            Event::Progress(crate::events::StepRecord {
                step,
                diff_norm_hist: Some(hist(vec![1], 0.0, 1.0)),
                layers: Some(vec![LayerStat { name: "h.0".into(), grad_norm: 1.0, update_ratio: 1e-3 }]),
                ..Default::default()
            })
        };
        for step in 1..=HEAT_HISTORY as u64 + 10 {
            d.apply(&progress(step));
        }
        assert_eq!(d.diff_history.len(), HEAT_HISTORY);
        assert_eq!(d.layer_history.front().map(|l| l.0), Some(11));
        // a resumed run logs steps again from its checkpoint: the later ones are replaced
        d.apply(&progress(500));
        let steps: Vec<u64> = d.layer_history.iter().rev().take(2).map(|l| l.0).collect();
        assert_eq!(steps, vec![500, 499]);
        assert!(d.layer_history.len() < HEAT_HISTORY);
    }
}
