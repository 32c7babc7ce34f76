//! Differential-norm diagnostics: statistics and a histogram of `||d_t||_2` over a batch.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    pub count: usize,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Counts of `bins` equal-width bins over `[min, max]`, the last bin closed (`torch.histc`).
    pub hist_counts: Vec<u64>,
    /// `bins + 1` edges.
    pub hist_edges: Vec<f64>,
    /// Sum and sum of squares, for TensorBoard's histogram proto.
    pub sum: f64,
    pub sum_squares: f64,
}

pub const HISTOGRAM_BINS: usize = 20;

pub fn norm_stats(values: &[f32], bins: usize) -> Option<NormStats> {
    if values.is_empty() || bins == 0 {
        return None;
    }
    let n = values.len() as f64;
    let (mut sum, mut sum_squares) = (0.0f64, 0.0f64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values {
        let v = v as f64;
        sum += v;
        sum_squares += v * v;
        min = min.min(v);
        max = max.max(v);
    }
    let mean = sum / n;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let width = (max - min) / bins as f64;
    let hist_edges: Vec<f64> = (0..=bins).map(|i| min + width * i as f64).collect();
    let mut hist_counts = vec![0u64; bins];
    for &v in values {
        let bin = if width > 0.0 { (((v as f64 - min) / width) as usize).min(bins - 1) } else { bins / 2 };
        hist_counts[bin] += 1;
    }
    Some(NormStats { count: values.len(), mean, std: var.sqrt(), min, max, hist_counts, hist_edges, sum, sum_squares })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_to_count_and_max_lands_in_last_bin() {
        let v = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        let s = norm_stats(&v, 4).unwrap();
        assert_eq!(s.hist_counts, vec![1, 1, 1, 2]);
        assert_eq!(s.mean, 2.0);
        assert!((s.std - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.hist_edges, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn constant_values_do_not_divide_by_zero() {
        let s = norm_stats(&[0.5; 7], 20).unwrap();
        assert_eq!(s.hist_counts.iter().sum::<u64>(), 7);
        assert_eq!(s.std, 0.0);
    }
}
