//! Averaging weights, oldest checkpoint first (i = 1..N).
//!
//! Each constructor computes its floats exactly as `shared/tools/reference_merge.py` does, since
//! merges are compared bit for bit: a weight that differs by one ulp changes the output.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default EMA smoothing: the newest checkpoint's weight.
pub const DEFAULT_EMA_ALPHA: f64 = 0.2;

/// How to weight N checkpoints: the one description of an averaging method, used by plans,
/// provenance, `pma merge`, the windowed modes of `pma watch` and (later) the demo.
///
/// It serializes as `{"name": "sma"}`, `{"name": "ema", "alpha": 0.2}`, `{"name": "wma"}`,
/// `{"name": "decay", "shape": "cosine"}` or
/// `{"name": "explicit", "values": [...], "normalize": true}`. `pma watch` records that form in
/// its state as the settings fingerprint, so it must not change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum WeightSpec {
    /// Simple moving average: w_i = 1/N.
    Sma,
    /// Exponential moving average with smoothing `alpha`.
    Ema {
        /// Weight of the newest checkpoint, in (0, 1].
        alpha: f64,
    },
    /// Linearly weighted moving average: w_i ∝ i, newest heaviest.
    Wma,
    /// Weights that emulate decaying the learning rate over the window with `shape`
    /// ([`Weights::decay`]).
    Decay {
        /// The learning-rate decay the merge stands in for.
        shape: DecayShape,
    },
    /// User-given weights, oldest first; N must equal their count.
    Explicit {
        /// The weights as given.
        values: Vec<f64>,
        /// Rescale them to sum to 1.
        normalize: bool,
    },
}

impl WeightSpec {
    /// The method names [`WeightSpec::from_name`] accepts.
    pub const NAMES: [&'static str; 6] = [
        "sma",
        "ema",
        "wma",
        "decay-linear",
        "decay-cosine",
        "decay-1-sqrt",
    ];

    /// The spec called `name` (one of [`WeightSpec::NAMES`], or `decay-minus-sqrt`, Megatron's
    /// name for `decay-1-sqrt`); `alpha` is used by `ema` only.
    pub fn from_name(name: &str, alpha: f64) -> Result<WeightSpec> {
        if let Some(shape) = name.strip_prefix("decay-").and_then(DecayShape::parse) {
            return Ok(WeightSpec::Decay { shape });
        }
        match name {
            "sma" => Ok(WeightSpec::Sma),
            "ema" => Ok(WeightSpec::Ema { alpha }),
            "wma" => Ok(WeightSpec::Wma),
            other => Err(Error::InvalidWeights(format!(
                "unknown method '{other}' (expected one of {})",
                WeightSpec::NAMES.join(", ")
            ))),
        }
    }

    /// The weights for `n` checkpoints, oldest first.
    pub fn weights(&self, n: usize) -> Result<Weights> {
        match self {
            WeightSpec::Sma => Weights::sma(n),
            WeightSpec::Ema { alpha } => Weights::ema(n, *alpha),
            WeightSpec::Wma => Weights::wma(n),
            WeightSpec::Decay { shape } => Weights::decay(n, *shape),
            WeightSpec::Explicit { values, normalize } => {
                if values.len() != n {
                    return Err(Error::InvalidWeights(format!(
                        "{} weights given for {n} checkpoints",
                        values.len()
                    )));
                }
                Weights::explicit(values.clone(), *normalize)
            }
        }
    }

    /// Checks the parameters without a window size: alpha in (0, 1], explicit weights finite
    /// and, with `normalize`, not summing to 0.
    pub fn validate(&self) -> Result<()> {
        let n = match self {
            WeightSpec::Explicit { values, .. } => values.len(),
            _ => 1,
        };
        self.weights(n).map(|_| ())
    }

    /// The window size the spec fixes: the count of explicit weights.
    pub fn fixed_len(&self) -> Option<usize> {
        match self {
            WeightSpec::Explicit { values, .. } => Some(values.len()),
            _ => None,
        }
    }

    /// The method's name without parameters: `sma`, `ema`, `wma`, `decay-cosine` (and the
    /// other shapes), `explicit`.
    pub fn name(&self) -> &'static str {
        match self {
            WeightSpec::Sma => "sma",
            WeightSpec::Ema { .. } => "ema",
            WeightSpec::Wma => "wma",
            WeightSpec::Decay { shape } => shape.method_name(),
            WeightSpec::Explicit { .. } => "explicit",
        }
    }

    /// The EMA smoothing, for `ema` only.
    pub fn alpha(&self) -> Option<f64> {
        match self {
            WeightSpec::Ema { alpha } => Some(*alpha),
            _ => None,
        }
    }

    /// A short label: `sma`, `ema0.2`, `wma`, `decay-cosine`, `weights`.
    pub fn label(&self) -> String {
        match self {
            WeightSpec::Sma => "sma".into(),
            WeightSpec::Ema { alpha } => format!("ema{alpha}"),
            WeightSpec::Wma => "wma".into(),
            WeightSpec::Decay { shape } => shape.method_name().into(),
            WeightSpec::Explicit { .. } => "weights".into(),
        }
    }
}

/// Per-checkpoint weights, oldest first, with the spec that produced them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Weights {
    /// How they were made.
    pub method: WeightSpec,
    /// w_1..w_N, oldest first.
    pub values: Vec<f64>,
}

impl Weights {
    /// SMA: w_i = 1/N.
    pub fn sma(n: usize) -> Result<Weights> {
        check_n(n)?;
        Ok(Weights {
            method: WeightSpec::Sma,
            values: vec![1.0 / n as f64; n],
        })
    }

    /// EMA: M(1) = M_1, M(i) = α·M_i + (1−α)·M(i−1), which unrolls to
    /// w_1 = (1−α)^(N−1) and w_i = α·(1−α)^(N−i) for i ≥ 2. They sum to 1.
    pub fn ema(n: usize, alpha: f64) -> Result<Weights> {
        check_n(n)?;
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::InvalidWeights(format!(
                "EMA alpha must be in (0, 1], got {alpha}"
            )));
        }
        let decay = 1.0 - alpha;
        // powf, not powi: the reference uses C pow(), and powi's repeated multiplication can
        // differ from it in the last bit.
        let values = (0..n)
            .map(|i| {
                if i == 0 {
                    decay.powf((n - 1) as f64)
                } else {
                    alpha * decay.powf((n - 1 - i) as f64)
                }
            })
            .collect();
        Ok(Weights {
            method: WeightSpec::Ema { alpha },
            values,
        })
    }

    /// WMA: w_i = i / Σ_{j=1..N} j, newest heaviest.
    pub fn wma(n: usize) -> Result<Weights> {
        check_n(n)?;
        let total = (n * (n + 1)) as f64 / 2.0;
        let values = (1..=n).map(|i| i as f64 / total).collect();
        Ok(Weights {
            method: WeightSpec::Wma,
            values,
        })
    }

    /// Weights that emulate decaying the learning rate with `shape` over the window instead of
    /// training through the decay (WSM, arXiv 2507.17634; Megatron-LM's
    /// `tools/checkpoint/weighted_merge.py`).
    ///
    /// Training from checkpoint M_1 through M_N at a constant rate applies N−1 updates. Scaling
    /// update j by a decay factor d_j and summing is the same as averaging the checkpoints with
    /// c_1 = 1 − d_1, c_j = d_{j−1} − d_j, c_N = d_{N−1}: each checkpoint's weight is the drop in
    /// the factor at its step. With d_j = f(j/N) for the shape f (1 at the start of the decay,
    /// falling towards 0 at its end), the weights are non-negative and sum to 1. The factors
    /// and the oldest weight are computed as Megatron's `schedule_to_merge_coefficients` does
    /// (c_1 = 1 − Σ_{j≥2} c_j), so its `linear` and `minus-sqrt` styles give these floats bit
    /// for bit. Linear decay gives exactly SMA's 1/N when N is a power of two, and SMA up to
    /// rounding otherwise.
    pub fn decay(n: usize, shape: DecayShape) -> Result<Weights> {
        check_n(n)?;
        let mut values = vec![1.0; n];
        if n > 1 {
            let factor = |j: usize| shape.factor(j as f64 / n as f64);
            values[n - 1] = factor(n - 1);
            for (j, w) in values.iter_mut().enumerate().take(n - 1).skip(1) {
                *w = factor(j) - factor(j + 1);
            }
            // Summed oldest first with a leading 0.0, as Python's sum() over the list does.
            let rest: f64 = values[1..].iter().fold(0.0, |acc, w| acc + w);
            values[0] = 1.0 - rest;
        }
        Ok(Weights {
            method: WeightSpec::Decay { shape },
            values,
        })
    }

    /// Explicit weights, oldest first. With `normalize` they are divided by their sum.
    pub fn explicit(values: Vec<f64>, normalize: bool) -> Result<Weights> {
        check_n(values.len())?;
        if let Some(w) = values.iter().find(|w| !w.is_finite()) {
            return Err(Error::InvalidWeights(format!("weight {w} is not finite")));
        }
        let normalized = if normalize {
            let sum: f64 = values.iter().sum();
            if sum == 0.0 {
                return Err(Error::InvalidWeights(
                    "weights sum to 0 and cannot be normalized".into(),
                ));
            }
            values.iter().map(|w| w / sum).collect()
        } else {
            values.clone()
        };
        Ok(Weights {
            method: WeightSpec::Explicit { values, normalize },
            values: normalized,
        })
    }

    /// Number of checkpoints.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Always false for a constructed value (N ≥ 1); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Σ w_i.
    pub fn sum(&self) -> f64 {
        self.values.iter().sum()
    }
}

/// A learning-rate decay shape: the factor f(x) the rate is multiplied by at fraction x of the
/// decay, falling from f(0) = 1. The one definition: the lab's WSD schedules decay with it and
/// the decay-emulating merges weigh with it, so an emulation and the run it emulates agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DecayShape {
    /// f(x) = 1 − x (WSD's usual decay).
    #[serde(rename = "linear")]
    Linear,
    /// f(x) = (1 + cos πx) / 2.
    #[serde(rename = "cosine")]
    Cosine,
    /// f(x) = 1 − √x (Hägele et al. 2024; Megatron's `minus-sqrt`).
    #[default]
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl DecayShape {
    /// Every shape, in the order help texts list them.
    pub const ALL: [DecayShape; 3] = [
        DecayShape::Linear,
        DecayShape::Cosine,
        DecayShape::OneMinusSqrt,
    ];

    /// `linear`, `cosine`, `1-sqrt` (or `minus-sqrt`, Megatron's name).
    pub fn parse(s: &str) -> Option<DecayShape> {
        match s {
            "linear" => Some(DecayShape::Linear),
            "cosine" => Some(DecayShape::Cosine),
            "1-sqrt" | "minus-sqrt" => Some(DecayShape::OneMinusSqrt),
            _ => None,
        }
    }

    /// `linear`, `cosine`, `1-sqrt`.
    pub fn name(self) -> &'static str {
        match self {
            DecayShape::Linear => "linear",
            DecayShape::Cosine => "cosine",
            DecayShape::OneMinusSqrt => "1-sqrt",
        }
    }

    /// The method name that selects this shape: `decay-linear`, `decay-cosine`,
    /// `decay-1-sqrt`.
    pub fn method_name(self) -> &'static str {
        match self {
            DecayShape::Linear => "decay-linear",
            DecayShape::Cosine => "decay-cosine",
            DecayShape::OneMinusSqrt => "decay-1-sqrt",
        }
    }

    /// The learning-rate factor at fraction `x` of the decay, clamped to [0, 1].
    pub fn factor(self, x: f64) -> f64 {
        let x = x.clamp(0.0, 1.0);
        match self {
            DecayShape::Linear => 1.0 - x,
            DecayShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
            DecayShape::OneMinusSqrt => 1.0 - x.sqrt(),
        }
    }
}

impl std::str::FromStr for DecayShape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        DecayShape::parse(s)
            .ok_or_else(|| format!("unknown decay shape '{s}' (expected linear, cosine or 1-sqrt)"))
    }
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidWeights("need at least one checkpoint".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_matches_recurrence_and_sums_to_one() {
        let w = Weights::ema(4, 0.2).unwrap();
        // Unroll M(i) = a M_i + (1-a) M(i-1) with indicator checkpoints.
        let mut m = vec![1.0, 0.0, 0.0, 0.0];
        for i in 1..4 {
            for (j, v) in m.iter_mut().enumerate() {
                *v *= 0.8;
                if j == i {
                    *v += 0.2;
                }
            }
        }
        for (a, b) in w.values.iter().zip(&m) {
            assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        }
        assert!((w.sum() - 1.0).abs() < 1e-12);
        assert_eq!(w.values[3], 0.2);
    }

    #[test]
    fn wma_and_sma() {
        assert_eq!(Weights::wma(4).unwrap().values, vec![0.1, 0.2, 0.3, 0.4]);
        assert_eq!(Weights::sma(4).unwrap().values, vec![0.25; 4]);
        assert!(Weights::sma(0).is_err());
        assert!(Weights::ema(3, 0.0).is_err());
        assert!(Weights::ema(3, 1.5).is_err());
    }

    #[test]
    fn explicit_normalize() {
        let w = Weights::explicit(vec![1.0, 3.0], true).unwrap();
        assert_eq!(w.values, vec![0.25, 0.75]);
        assert!(Weights::explicit(vec![1.0, -1.0], true).is_err());
        assert!(Weights::explicit(vec![f64::NAN], false).is_err());
    }

    #[test]
    fn spec_gives_the_constructors_bits() {
        for n in 1..6 {
            assert_eq!(
                WeightSpec::Sma.weights(n).unwrap(),
                Weights::sma(n).unwrap()
            );
            assert_eq!(
                WeightSpec::Wma.weights(n).unwrap(),
                Weights::wma(n).unwrap()
            );
            let ema = WeightSpec::Ema { alpha: 0.1 }.weights(n).unwrap();
            assert_eq!(ema, Weights::ema(n, 0.1).unwrap());
        }
        let spec = WeightSpec::Explicit {
            values: vec![1.0, 3.0],
            normalize: true,
        };
        assert_eq!(spec.weights(2).unwrap().values, vec![0.25, 0.75]);
        assert!(spec.weights(3).is_err(), "count must match the window");
        assert_eq!(spec.fixed_len(), Some(2));
        assert!(WeightSpec::Ema { alpha: 0.0 }.validate().is_err());
        let ema = WeightSpec::from_name("ema", 0.3).unwrap();
        assert_eq!(
            (ema.label(), ema.name(), ema.alpha()),
            ("ema0.3".into(), "ema", Some(0.3))
        );
        assert_eq!(
            (WeightSpec::Wma.name(), WeightSpec::Wma.alpha()),
            ("wma", None)
        );
        assert!(WeightSpec::from_name("ema-stream", 0.3).is_err());
    }

    #[test]
    fn decay_weights_reproduce_training_through_the_decay() {
        // Checkpoints of a scalar "model" after each constant-rate step; averaging them with the
        // decay weights must equal taking the same steps scaled by f(j/N).
        let theta = [0.3, -1.7, 2.25, 0.5, 4.0, -3.0, 1.0];
        for shape in DecayShape::ALL {
            for n in 1..=theta.len() {
                let w = Weights::decay(n, shape).unwrap();
                assert!(
                    w.values.iter().all(|&c| c >= 0.0),
                    "{shape:?} {n}: {:?}",
                    w.values
                );
                assert!((w.sum() - 1.0).abs() < 1e-15, "{shape:?} {n}");
                let merged: f64 = w.values.iter().zip(&theta).map(|(c, t)| c * t).sum();
                let decayed = theta[0]
                    + (1..n)
                        .map(|j| shape.factor(j as f64 / n as f64) * (theta[j] - theta[j - 1]))
                        .sum::<f64>();
                assert!((merged - decayed).abs() < 1e-12, "{shape:?} {n}");
            }
        }
    }

    #[test]
    fn decay_weights_match_megatron_and_known_values() {
        // Linear decay is a uniform average (exactly, for powers of two).
        for n in [1, 2, 4, 8, 16] {
            let w = Weights::decay(n, DecayShape::Linear).unwrap();
            assert_eq!(w.values, Weights::sma(n).unwrap().values);
        }
        // Megatron's minus-sqrt over 4 checkpoints: factors 1, 1/2, 1-√.5, 1-√.75, so the
        // oldest checkpoint keeps half the weight.
        let w = WeightSpec::from_name("decay-minus-sqrt", 0.0)
            .unwrap()
            .weights(4)
            .unwrap();
        let (s5, s75) = (0.5f64.sqrt(), 0.75f64.sqrt());
        let expect = [
            1.0 - ((0.5 - (1.0 - s5)) + ((1.0 - s5) - (1.0 - s75)) + (1.0 - s75)),
            0.5 - (1.0 - s5),
            (1.0 - s5) - (1.0 - s75),
            1.0 - s75,
        ];
        assert_eq!(w.values, expect);
        assert!((w.values[0] - 0.5).abs() < 1e-15);
        // Cosine keeps the newest checkpoint's weight small: f((N-1)/N) = (1 - cos(π/N)) / 2.
        let w = Weights::decay(10, DecayShape::Cosine).unwrap();
        assert!((w.values[9] - (1.0 - (std::f64::consts::PI / 10.0).cos()) / 2.0).abs() < 1e-16);
        assert!(w.values[9] < 0.025 && w.values[0] < 0.025);
        assert!(
            w.values[4] > w.values[0],
            "cosine weighs the middle most: {:?}",
            w.values
        );
    }

    #[test]
    fn decay_names_round_trip() {
        for shape in DecayShape::ALL {
            let spec = WeightSpec::from_name(shape.method_name(), 0.2).unwrap();
            assert_eq!(spec, WeightSpec::Decay { shape });
            assert_eq!(
                (spec.name(), spec.label()),
                (shape.method_name(), shape.method_name().into())
            );
            assert!(WeightSpec::NAMES.contains(&shape.method_name()));
        }
        assert!(WeightSpec::from_name("decay-exp", 0.2).is_err());
        assert!(WeightSpec::from_name("decay-", 0.2).is_err());
        assert_eq!(
            serde_json::to_string(&WeightSpec::Decay {
                shape: DecayShape::OneMinusSqrt
            })
            .unwrap(),
            r#"{"name":"decay","shape":"1-sqrt"}"#
        );
    }

    #[test]
    fn spec_serializes_as_the_watch_fingerprint_always_has() {
        let json = |s: &WeightSpec| serde_json::to_string(s).unwrap();
        assert_eq!(json(&WeightSpec::Sma), r#"{"name":"sma"}"#);
        assert_eq!(
            json(&WeightSpec::Ema { alpha: 0.2 }),
            r#"{"name":"ema","alpha":0.2}"#
        );
        assert_eq!(
            json(&WeightSpec::Explicit {
                values: vec![1.0],
                normalize: false
            }),
            r#"{"name":"explicit","values":[1.0],"normalize":false}"#
        );
    }
}
