//! Learning-rate schedules: linear warmup from 0, then cosine, linear or constant decay to
//! `min_ratio` of the peak at the last step (as transformers' `get_*_schedule_with_warmup`,
//! with an optional floor).

use serde::{Deserialize, Serialize};

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Half a cosine from the peak to the floor.
    Cosine,
    /// A straight line from the peak to the floor.
    Linear,
    /// The peak until the end.
    Constant,
}

/// A learning rate for every optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Steps of linear warmup (the first step uses `peak / warmup`).
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Decay after warmup.
    pub decay: Decay,
    /// Floor as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> Schedule {
        Schedule {
            peak: 1e-3,
            warmup: 4,
            total: 20,
            decay,
            min_ratio: 0.1,
        }
    }

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        let s = sched(Decay::Cosine);
        let lrs: Vec<f64> = (0..4).map(|i| s.lr(i)).collect();
        assert_eq!(lrs, vec![2.5e-4, 5e-4, 7.5e-4, 1e-3]);
        assert_eq!(s.lr(4), 1e-3);
    }

    #[test]
    fn decays_reach_the_floor_at_the_end() {
        for d in [Decay::Cosine, Decay::Linear] {
            let s = sched(d);
            assert!((s.lr(20) - 1e-4).abs() < 1e-12, "{d:?}: {}", s.lr(20));
            let mid = s.lr(12);
            assert!((mid - 5.5e-4).abs() < 1e-12, "{d:?} midpoint {mid}");
            assert!(
                (5..20).all(|i| s.lr(i) < s.lr(i - 1)),
                "{d:?} not decreasing"
            );
        }
        assert_eq!(sched(Decay::Constant).lr(19), 1e-3);
    }
}
