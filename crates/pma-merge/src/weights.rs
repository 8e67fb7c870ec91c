//! Averaging weights, oldest checkpoint first (i = 1..N).
//!
//! Each constructor computes its floats exactly as `shared/tools/reference_merge.py` does, since
//! merges are compared bit for bit: a weight that differs by one ulp changes the output.

use serde::Serialize;

use crate::error::{Error, Result};

/// Default EMA smoothing: the newest checkpoint's weight.
pub const DEFAULT_EMA_ALPHA: f64 = 0.2;

/// How to weight N checkpoints: the one description of an averaging method, used by plans,
/// provenance, `pma merge`, the windowed modes of `pma watch` and (later) the demo.
///
/// It serializes as `{"name": "sma"}`, `{"name": "ema", "alpha": 0.2}`, `{"name": "wma"}` or
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
    pub const NAMES: [&'static str; 3] = ["sma", "ema", "wma"];

    /// The spec called `name` (`sma`, `ema`, `wma`); `alpha` is used by `ema` only.
    pub fn from_name(name: &str, alpha: f64) -> Result<WeightSpec> {
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

    /// The method's name without parameters: `sma`, `ema`, `wma`, `explicit`.
    pub fn name(&self) -> &'static str {
        match self {
            WeightSpec::Sma => "sma",
            WeightSpec::Ema { .. } => "ema",
            WeightSpec::Wma => "wma",
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

    /// A short label: `sma`, `ema0.2`, `wma`, `weights`.
    pub fn label(&self) -> String {
        match self {
            WeightSpec::Sma => "sma".into(),
            WeightSpec::Ema { alpha } => format!("ema{alpha}"),
            WeightSpec::Wma => "wma".into(),
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
