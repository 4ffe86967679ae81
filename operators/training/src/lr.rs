//! Learning-rate schedules as diffusers' `get_scheduler` computes them: linear warmup from 0,
//! then constant or a half cosine to 0. Step `i` is the `i`-th optimizer step, from 0.

use serde::{Deserialize, Serialize};

/// The shape after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    /// Stay at the peak.
    #[default]
    Constant,
    /// Half a cosine down to 0 at `total_steps`.
    Cosine,
}

/// A learning-rate schedule.
///
/// ```
/// use latentflow_training::{LrDecay, LrSchedule};
///
/// let s = LrSchedule { peak: 1e-4, warmup_steps: 10, decay: LrDecay::Cosine, total_steps: 110 };
/// assert_eq!(s.at(0), 0.0);
/// assert_eq!(s.at(5), 5e-5);
/// assert_eq!(s.at(10), 1e-4);
/// assert!((s.at(60) - 5e-5).abs() < 1e-12);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Learning rate after warmup.
    pub peak: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// After warmup.
    pub decay: LrDecay,
    /// Steps the cosine spans (ignored for constant).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        match self.decay {
            LrDecay::Constant => self.peak,
            LrDecay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = (step - self.warmup_steps) as f64 / span;
                self.peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_after_warmup_and_cosine_reaches_zero() {
        let c = LrSchedule { peak: 2.0, warmup_steps: 4, decay: LrDecay::Constant, total_steps: 0 };
        assert_eq!((0..6).map(|s| c.at(s)).collect::<Vec<_>>(), [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]);
        let no_warmup = LrSchedule { warmup_steps: 0, ..c };
        assert_eq!(no_warmup.at(0), 2.0);
        let cos = LrSchedule { peak: 1.0, warmup_steps: 0, decay: LrDecay::Cosine, total_steps: 100 };
        assert_eq!(cos.at(0), 1.0);
        assert!(cos.at(100).abs() < 1e-12 && cos.at(150) >= 0.0);
        assert!((1..100).all(|s| cos.at(s) < cos.at(s - 1)));
    }
}
