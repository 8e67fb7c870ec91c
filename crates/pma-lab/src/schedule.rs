//! Learning-rate schedules, in steps, all with linear warmup.
//!
//! - `constant`: warmup, then the peak LR for good.
//! - `wsd` (warmup–stable–decay): warmup, the peak LR, then over the last `decay_steps` steps a
//!   decay to `min_lr` with shape `linear`, `cosine` or `1-sqrt`. The paper's checkpoint series
//!   come from the stable phase; annealing forks start a fresh run from a checkpoint with
//!   `warmup_steps = 0` and `decay_steps = steps`.
//! - `cosine`: warmup, then a half cosine from the peak to `min_lr` at the last step.
//!
//! `lr_at(step)` takes the 0-based index of the update, so step 0 already has a nonzero LR
//! (`peak / warmup_steps`), and the last update of a decay lands exactly on `min_lr`.

use serde::{Deserialize, Serialize};

/// The schedule family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Warmup, then constant.
    Constant,
    /// Warmup, stable, decay.
    #[default]
    Wsd,
    /// Warmup, then cosine to `min_lr`.
    Cosine,
}

/// Shape of the WSD decay phase: the one definition, shared with the decay-emulating merges.
pub use pma_merge::DecayShape;

/// A deliberate LR spike: the LR is multiplied by `factor` for `len_steps` steps from `step`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSpike {
    /// First spiked step (0-based update index).
    pub step: u64,
    /// LR multiplier.
    pub factor: f64,
    /// Number of spiked steps.
    pub len_steps: u64,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "wsd" => Ok(ScheduleKind::Wsd),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => Err(format!(
                "unknown schedule '{other}' (expected constant, wsd or cosine)"
            )),
        }
    }
}

impl std::str::FromStr for LrSpike {
    type Err = String;
    /// `STEP:FACTOR:LEN`, e.g. `300:20:10`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("lr spike '{s}' is not STEP:FACTOR:LEN (e.g. 300:20:10)");
        let [step, factor, len] = parts.as_slice() else {
            return Err(bad());
        };
        let spike = LrSpike {
            step: step.parse().map_err(|_| bad())?,
            factor: factor.parse().map_err(|_| bad())?,
            len_steps: len.parse().map_err(|_| bad())?,
        };
        if !(spike.factor > 0.0 && spike.factor.is_finite()) {
            return Err(format!(
                "lr spike factor {} must be a positive number",
                spike.factor
            ));
        }
        Ok(spike)
    }
}

/// A complete schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Family.
    pub kind: ScheduleKind,
    /// Peak LR.
    pub peak_lr: f64,
    /// Final LR of the decay (`wsd`, `cosine`).
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// WSD decay steps (at the end of the run).
    pub decay_steps: u64,
    /// WSD decay shape.
    pub decay_shape: DecayShape,
    /// Steps in the run.
    pub total_steps: u64,
    /// Optional spike.
    pub spike: Option<LrSpike>,
}

impl Schedule {
    /// The LR of update `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = self.base_lr_at(step);
        match self.spike {
            Some(s) if step >= s.step && step - s.step < s.len_steps => base * s.factor,
            _ => base,
        }
    }

    fn base_lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.peak_lr - self.min_lr;
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Wsd => {
                let decay = self.decay_steps.min(self.total_steps);
                let start = self
                    .total_steps
                    .saturating_sub(decay)
                    .max(self.warmup_steps);
                if step < start || decay == 0 {
                    return self.peak_lr;
                }
                let len = self.total_steps - start;
                let p = (step - start + 1) as f64 / len as f64;
                self.min_lr + span * self.decay_shape.factor(p)
            }
            ScheduleKind::Cosine => {
                let len = self.total_steps.saturating_sub(self.warmup_steps);
                if len == 0 {
                    return self.peak_lr;
                }
                let p = (step - self.warmup_steps + 1) as f64 / len as f64;
                self.min_lr + span * DecayShape::Cosine.factor(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, shape: DecayShape) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            decay_steps: 20,
            decay_shape: shape,
            total_steps: 100,
            spike: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_is_linear_for_every_kind() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Wsd,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind, DecayShape::Linear);
            assert!(close(s.lr_at(0), 0.1));
            assert!(close(s.lr_at(4), 0.5));
            assert!(close(s.lr_at(9), 1.0));
        }
    }

    #[test]
    fn constant_stays_at_peak() {
        let s = sched(ScheduleKind::Constant, DecayShape::Linear);
        assert!((10..100).all(|t| close(s.lr_at(t), 1.0)));
    }

    #[test]
    fn wsd_is_stable_then_decays_to_min_with_each_shape() {
        for shape in [
            DecayShape::Linear,
            DecayShape::Cosine,
            DecayShape::OneMinusSqrt,
        ] {
            let s = sched(ScheduleKind::Wsd, shape);
            assert!((10..80).all(|t| close(s.lr_at(t), 1.0)));
            assert!(s.lr_at(80) < 1.0);
            assert!(close(s.lr_at(99), 0.1), "{shape:?} ends at {}", s.lr_at(99));
            assert!(
                (80..99).all(|t| s.lr_at(t + 1) < s.lr_at(t)),
                "{shape:?} not decreasing"
            );
        }
        // Half way through the decay (step 89, p = 10/20): linear 0.55, cosine 0.55, 1-sqrt below.
        let mid = |shape| sched(ScheduleKind::Wsd, shape).lr_at(89);
        assert!(close(mid(DecayShape::Linear), 0.1 + 0.9 * 0.5));
        assert!(close(mid(DecayShape::Cosine), 0.1 + 0.9 * 0.5));
        assert!(close(
            mid(DecayShape::OneMinusSqrt),
            0.1 + 0.9 * (1.0 - 0.5f64.sqrt())
        ));
        // 1-sqrt drops fastest early in the decay, cosine slowest.
        let early = |shape| sched(ScheduleKind::Wsd, shape).lr_at(83);
        assert!(early(DecayShape::OneMinusSqrt) < early(DecayShape::Linear));
        assert!(early(DecayShape::Linear) < early(DecayShape::Cosine));
    }

    #[test]
    fn pure_decay_fork_starts_near_peak() {
        let s = Schedule {
            warmup_steps: 0,
            decay_steps: 50,
            total_steps: 50,
            ..sched(ScheduleKind::Wsd, DecayShape::Linear)
        };
        assert!(close(s.lr_at(0), 0.1 + 0.9 * (1.0 - 1.0 / 50.0)));
        assert!(close(s.lr_at(49), 0.1));
    }

    #[test]
    fn cosine_is_half_way_at_mid_run_and_ends_at_min() {
        let s = sched(ScheduleKind::Cosine, DecayShape::Linear);
        assert!(close(s.lr_at(54), 0.55));
        assert!(close(s.lr_at(99), 0.1));
    }

    #[test]
    fn parses_cli_spellings() {
        assert_eq!(
            "1-sqrt".parse::<DecayShape>().unwrap(),
            DecayShape::OneMinusSqrt
        );
        assert_eq!("wsd".parse::<ScheduleKind>().unwrap(), ScheduleKind::Wsd);
        let spike: LrSpike = "300:20:10".parse().unwrap();
        assert_eq!((spike.step, spike.factor, spike.len_steps), (300, 20.0, 10));
        assert!("300:20".parse::<LrSpike>().is_err());
        assert!("300:-1:5".parse::<LrSpike>().is_err());
    }

    #[test]
    fn spike_multiplies_lr_for_its_length() {
        let s = Schedule {
            spike: Some(LrSpike {
                step: 30,
                factor: 10.0,
                len_steps: 5,
            }),
            ..sched(ScheduleKind::Constant, DecayShape::Linear)
        };
        assert!(close(s.lr_at(29), 1.0));
        assert!((30..35).all(|t| close(s.lr_at(t), 10.0)));
        assert!(close(s.lr_at(35), 1.0));
    }
}
