//! Learning-rate schedules, the Hugging Face closed forms (`transformers.optimization`).
//!
//! The LR of optimizer step `s` (0-based) is `base_lr * factor(s)`; as in HF, warmup starts
//! from 0 at step 0.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
    ConstantWithWarmup,
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 4] = [Self::Cosine, Self::Linear, Self::Constant, Self::ConstantWithWarmup];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cosine => "cosine",
            Self::Linear => "linear",
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            format!("unknown lr_scheduler_type {s:?}; expected one of cosine, linear, constant, constant_with_warmup")
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    /// Where the cosine ends (0 in HF's `cosine`; the bench's reference recipe sets a floor).
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// Warmup is `warmup_steps` if > 0, else `ceil(warmup_ratio * total_steps)` (HF `get_warmup_steps`).
    pub fn warmup_from(warmup_steps: u64, warmup_ratio: f64, total_steps: u64) -> u64 {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as u64
        }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        match self.kind {
            ScheduleKind::Cosine if step >= self.warmup_steps => {
                self.min_lr + (self.base_lr - self.min_lr) * self.factor(step)
            }
            _ => self.base_lr * self.factor(step),
        }
    }

    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warming = step < self.warmup_steps;
        let warm = s / w.max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup => {
                if warming {
                    warm
                } else {
                    1.0
                }
            }
            ScheduleKind::Linear => {
                if warming {
                    warm
                } else {
                    ((n - s) / (n - w).max(1.0)).max(0.0)
                }
            }
            ScheduleKind::Cosine => {
                if warming {
                    warm
                } else {
                    // num_cycles = 0.5: half a cosine from 1 down to 0
                    let progress = (s - w) / (n - w).max(1.0);
                    (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> LrSchedule {
        LrSchedule { kind, base_lr: 1e-3, min_lr: 0.0, warmup_steps: 10, total_steps: 110 }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    // Values worked out from transformers.optimization's lambdas by hand:
    // warmup s/w; cosine 0.5(1 + cos(pi (s-w)/(n-w))); linear (n-s)/(n-w).
    #[test]
    fn cosine_matches_hf() {
        let s = sched(ScheduleKind::Cosine);
        close(s.lr_at(0), 0.0);
        close(s.lr_at(5), 5e-4);
        close(s.lr_at(10), 1e-3);
        close(s.lr_at(35), 1e-3 * 0.5 * (1.0 + (PI / 4.0).cos())); // 8.5355e-4
        close(s.lr_at(60), 5e-4);
        close(s.lr_at(110), 0.0);
    }

    #[test]
    fn linear_matches_hf() {
        let s = sched(ScheduleKind::Linear);
        close(s.lr_at(3), 3e-4);
        close(s.lr_at(35), 7.5e-4);
        close(s.lr_at(60), 5e-4);
        close(s.lr_at(110), 0.0);
        close(s.lr_at(200), 0.0);
    }

    #[test]
    fn constant_and_constant_with_warmup_match_hf() {
        let c = sched(ScheduleKind::Constant);
        close(c.lr_at(0), 1e-3);
        close(c.lr_at(99), 1e-3);
        let w = sched(ScheduleKind::ConstantWithWarmup);
        close(w.lr_at(0), 0.0);
        close(w.lr_at(5), 5e-4);
        close(w.lr_at(50), 1e-3);
    }

    #[test]
    fn warmup_steps_win_over_ratio_and_ratio_rounds_up() {
        assert_eq!(LrSchedule::warmup_from(50, 0.1, 1000), 50);
        assert_eq!(LrSchedule::warmup_from(0, 0.03, 1000), 30);
        assert_eq!(LrSchedule::warmup_from(0, 0.03, 1001), 31);
        assert_eq!(LrSchedule::warmup_from(0, 0.0, 1000), 0);
        // no warmup: cosine starts at the base LR
        let s = LrSchedule { kind: ScheduleKind::Cosine, base_lr: 1.0, min_lr: 0.0, warmup_steps: 0, total_steps: 4 };
        close(s.lr_at(0), 1.0);
        close(s.lr_at(2), 0.5);
    }

    #[test]
    fn names_parse_and_print() {
        for k in ScheduleKind::ALL {
            assert_eq!(k.as_str().parse::<ScheduleKind>().unwrap(), k);
        }
        assert!("cosin".parse::<ScheduleKind>().unwrap_err().contains("cosin"));
    }
}
