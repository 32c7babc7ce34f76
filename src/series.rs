//! A time series with bounded memory that keeps spikes: points are kept as they come until the
//! capacity is reached, then neighbouring buckets merge pairwise, each bucket remembering its
//! minimum and maximum (and where they were), its mean and its last value. A million steps fit
//! in a few thousand buckets, and a one-step loss spike survives every merge. Used by the
//! figures and the TUI charts; no drawing here.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub x_first: f64,
    pub x_last: f64,
    pub min: f64,
    pub x_at_min: f64,
    pub max: f64,
    pub x_at_max: f64,
    pub sum: f64,
    pub last: f64,
    pub count: u64,
}

impl Bucket {
    fn new(x: f64, y: f64) -> Self {
        Self { x_first: x, x_last: x, min: y, x_at_min: x, max: y, x_at_max: x, sum: y, last: y, count: 1 }
    }

    fn absorb(&mut self, o: &Bucket) {
        if o.min < self.min {
            self.min = o.min;
            self.x_at_min = o.x_at_min;
        }
        if o.max > self.max {
            self.max = o.max;
            self.x_at_max = o.x_at_max;
        }
        self.x_last = o.x_last;
        self.sum += o.sum;
        self.last = o.last;
        self.count += o.count;
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

#[derive(Debug, Clone)]
pub struct Series {
    buckets: Vec<Bucket>,
    /// Raw points per bucket at the current resolution (doubles on each compaction).
    width: u64,
    capacity: usize,
}

impl Default for Series {
    fn default() -> Self {
        Self::with_capacity(2048)
    }
}

impl Series {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { buckets: Vec::new(), width: 1, capacity: capacity.max(2) }
    }

    /// Appends a point. A point at or before the last x (a resumed run re-logging steps)
    /// replaces everything from that x on: the last value per step wins.
    pub fn push(&mut self, x: f64, y: f64) {
        if !y.is_finite() {
            return;
        }
        if self.buckets.last().is_some_and(|b| x <= b.x_last) {
            self.truncate_from(x);
        }
        match self.buckets.last_mut() {
            Some(b) if b.count < self.width => b.absorb(&Bucket::new(x, y)),
            _ => self.buckets.push(Bucket::new(x, y)),
        }
        if self.buckets.len() > self.capacity {
            self.compact();
        }
    }

    fn truncate_from(&mut self, x: f64) {
        while self.buckets.last().is_some_and(|b| b.x_first >= x) {
            self.buckets.pop();
        }
        // a merged bucket straddling x: keep it (its points before x are real)
    }

    fn compact(&mut self) {
        let merged: Vec<Bucket> = self
            .buckets
            .chunks(2)
            .map(|pair| {
                let mut b = pair[0];
                if let Some(o) = pair.get(1) {
                    b.absorb(o);
                }
                b
            })
            .collect();
        self.buckets = merged;
        self.width *= 2;
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn last(&self) -> Option<(f64, f64)> {
        self.buckets.last().map(|b| (b.x_last, b.last))
    }

    pub fn y_range(&self) -> Option<(f64, f64)> {
        let lo = self.buckets.iter().map(|b| b.min).fold(f64::INFINITY, f64::min);
        let hi = self.buckets.iter().map(|b| b.max).fold(f64::NEG_INFINITY, f64::max);
        (lo <= hi).then_some((lo, hi))
    }

    /// Points to draw, at most `max_points`: every bucket's extremes in x order, re-bucketed
    /// min/max when there are more buckets than that. Spikes are never averaged away.
    pub fn envelope(&self, max_points: usize) -> Vec<(f64, f64)> {
        let group = self.buckets.len().div_ceil((max_points / 2).max(1)).max(1);
        let mut out = Vec::with_capacity(self.buckets.len().min(max_points) + 2);
        for chunk in self.buckets.chunks(group) {
            let mut b = chunk[0];
            for o in &chunk[1..] {
                b.absorb(o);
            }
            if b.count == 1 {
                out.push((b.x_first, b.last));
            } else if b.x_at_min <= b.x_at_max {
                out.push((b.x_at_min, b.min));
                out.push((b.x_at_max, b.max));
            } else {
                out.push((b.x_at_max, b.max));
                out.push((b.x_at_min, b.min));
            }
        }
        out
    }

    /// The debiased exponential moving average (TensorBoard's smoothing) over bucket means,
    /// one point per bucket.
    pub fn smoothed(&self, weight: f64) -> Vec<(f64, f64)> {
        let mut ema = 0.0;
        let mut debias = 0.0;
        self.buckets
            .iter()
            .map(|b| {
                ema = ema * weight + (1.0 - weight) * b.mean();
                debias = debias * weight + (1.0 - weight);
                (b.x_last, ema / debias)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stays_bounded_for_a_million_points_and_a_spike_survives() {
        let mut s = Series::with_capacity(1000);
        for i in 0..1_000_000u64 {
            let y = if i == 777_777 { 50.0 } else { 1.0 + (i as f64 * 0.001).sin() * 0.1 };
            s.push(i as f64, y);
        }
        assert!(s.buckets().len() <= 1000);
        let (lo, hi) = s.y_range().unwrap();
        assert_eq!(hi, 50.0, "the one-step spike is kept");
        assert!(lo > 0.89);
        let pts = s.envelope(200);
        assert!(pts.len() <= 200);
        assert!(pts.iter().any(|&(x, y)| y == 50.0 && x == 777_777.0), "drawn at its step");
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0), "x increases");
    }

    #[test]
    fn a_resumed_run_replaces_the_steps_it_logs_again() {
        let mut s = Series::with_capacity(100);
        for i in 1..=10 {
            s.push(i as f64, 10.0 - i as f64);
        }
        // resumed from step 6: steps 7.. come again
        s.push(7.0, 100.0);
        s.push(8.0, 100.0);
        assert_eq!(s.last(), Some((8.0, 100.0)));
        assert_eq!(s.buckets().len(), 8);
        assert_eq!(s.y_range(), Some((4.0, 100.0)));
    }

    #[test]
    fn smoothing_is_debiased_and_nan_is_ignored() {
        let mut s = Series::default();
        s.push(1.0, 2.0);
        s.push(2.0, f64::NAN);
        s.push(3.0, 2.0);
        let sm = s.smoothed(0.9);
        assert_eq!(sm.len(), 2);
        assert!((sm[0].1 - 2.0).abs() < 1e-12, "no pull towards 0 at the start");
    }
}
