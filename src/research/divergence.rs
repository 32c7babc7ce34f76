//! When a trial has gone wrong: a non-finite loss, a loss far above its running minimum, or no
//! decrease over a window. Pure and incremental, so a sweep can stop a trial the moment it
//! happens and tests can feed it curves whose answer is known.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Still learning (or the run ended cleanly).
    Ok,
    /// Non-finite loss, or loss above `ratio` x its running minimum.
    Diverged,
    /// The loss has not fallen by `min_drop` (relative) over `window` steps.
    Stalled,
}

#[derive(Debug, Clone)]
pub struct Monitor {
    /// Loss above this multiple of the best so far is divergence (fastai / Lightning use 4).
    pub ratio: f64,
    /// Steps compared for a stall: the mean of the last `window` against the `window` before.
    pub window: usize,
    /// The relative drop between those two means below which the trial has stalled.
    pub min_drop: f64,
    /// Stalls are only looked for up to this many points: a too-small LR shows early, and a
    /// good run flattens as its schedule decays to 0 at the end.
    pub stall_until: usize,
    losses: Vec<f64>,
    best: f64,
}

impl Monitor {
    pub fn new(ratio: f64, window: usize, min_drop: f64, stall_until: usize) -> Self {
        Self { ratio, window: window.max(1), min_drop, stall_until, losses: vec![], best: f64::INFINITY }
    }

    /// The defaults for a trial of `total_points` logged points: 4x the minimum; a window of a
    /// fifth of the run (at least 5 points), 1% drop, stalls looked for in the first half.
    pub fn for_steps(total_points: usize) -> Self {
        let window = (total_points / 5).max(5);
        Self::new(4.0, window, 0.01, (total_points / 2).max(2 * window))
    }

    pub fn observe(&mut self, loss: f64) -> Verdict {
        if !loss.is_finite() {
            return Verdict::Diverged;
        }
        self.losses.push(loss);
        self.best = self.best.min(loss);
        if loss > self.ratio * self.best {
            return Verdict::Diverged;
        }
        let w = self.window;
        let n = self.losses.len();
        if n >= 2 * w && n <= self.stall_until {
            let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
            let (before, last) = (mean(&self.losses[n - 2 * w..n - w]), mean(&self.losses[n - w..]));
            if last > before * (1.0 - self.min_drop) {
                return Verdict::Stalled;
            }
        }
        Verdict::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(curve: impl Iterator<Item = f64>, window: usize) -> (Verdict, usize) {
        let mut m = Monitor::new(4.0, window, 0.01, usize::MAX);
        for (i, l) in curve.enumerate() {
            let v = m.observe(l);
            if v != Verdict::Ok {
                return (v, i);
            }
        }
        (Verdict::Ok, usize::MAX)
    }

    #[test]
    fn a_falling_curve_is_fine() {
        assert_eq!(run((0..200).map(|i| 8.0 * (-i as f64 / 50.0).exp() + 2.0), 20).0, Verdict::Ok);
    }

    #[test]
    fn nan_and_blow_ups_diverge_where_they_happen() {
        let nan = (0..50).map(|i| if i == 30 { f64::NAN } else { 5.0 - i as f64 * 0.01 });
        assert_eq!(run(nan, 10), (Verdict::Diverged, 30));
        // falls to 2.0 by step 20, then explodes: 4 x 2.0 = 8 is crossed at step 26
        let blow = (0..60).map(|i| if i <= 20 { 6.0 - i as f64 * 0.2 } else { 2.0 * 1.3f64.powi(i - 20) });
        assert_eq!(run(blow, 10), (Verdict::Diverged, 26));
    }

    #[test]
    fn a_run_that_flattens_late_is_not_a_stall() {
        // falls for 60 points then flat for 40 (a cosine schedule reaching 0)
        let curve: Vec<f64> = (0..100).map(|i| if i < 60 { 6.0 - i as f64 * 0.05 } else { 3.0 }).collect();
        let mut m = Monitor::for_steps(100);
        assert!(curve.iter().all(|l| m.observe(*l) == Verdict::Ok));
    }

    #[test]
    fn a_flat_curve_stalls_after_two_windows() {
        let flat = (0..100).map(|i| 6.9 + 0.001 * (i as f64 * 0.7).sin());
        assert_eq!(run(flat, 10), (Verdict::Stalled, 19));
    }
}
