//! Averaging weights, oldest checkpoint first (i = 1..N).
//!
//! Each constructor computes its floats exactly as `shared/tools/reference_merge.py` does, since
//! merges are compared bit for bit: a weight that differs by one ulp changes the output.

use serde::Serialize;

use crate::error::{Error, Result};

/// The averaging method, for plans and provenance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum Method {
    /// Simple moving average.
    Sma,
    /// Exponential moving average with smoothing `alpha`.
    Ema {
        /// Weight of the newest checkpoint.
        alpha: f64,
    },
    /// Linearly weighted moving average.
    Wma,
    /// User-given weights.
    Explicit {
        /// Whether they were rescaled to sum to 1.
        normalized: bool,
    },
}

impl Method {
    /// A short label: `sma`, `ema0.2`, `wma`, `weights`.
    pub fn label(&self) -> String {
        match self {
            Method::Sma => "sma".into(),
            Method::Ema { alpha } => format!("ema{alpha}"),
            Method::Wma => "wma".into(),
            Method::Explicit { .. } => "weights".into(),
        }
    }
}

/// Per-checkpoint weights, oldest first, with the method that produced them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Weights {
    /// How they were made.
    pub method: Method,
    /// w_1..w_N, oldest first.
    pub values: Vec<f64>,
}

impl Weights {
    /// SMA: w_i = 1/N.
    pub fn sma(n: usize) -> Result<Weights> {
        check_n(n)?;
        Ok(Weights {
            method: Method::Sma,
            values: vec![1.0 / n as f64; n],
        })
    }

    /// EMA: M(1) = M_1, M(i) = α·M_i + (1−α)·M(i−1), which unrolls to
    /// w_1 = (1−α)^(N−1) and w_i = α·(1−α)^(N−i) for i ≥ 2. They sum to 1.
    pub fn ema(n: usize, alpha: f64) -> Result<Weights> {
        check_n(n)?;
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::InvalidWeights(format!(
                "--alpha must be in (0, 1], got {alpha}"
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
            method: Method::Ema { alpha },
            values,
        })
    }

    /// WMA: w_i = i / Σ_{j=1..N} j, newest heaviest.
    pub fn wma(n: usize) -> Result<Weights> {
        check_n(n)?;
        let total = (n * (n + 1)) as f64 / 2.0;
        let values = (1..=n).map(|i| i as f64 / total).collect();
        Ok(Weights {
            method: Method::Wma,
            values,
        })
    }

    /// Explicit weights, oldest first. With `normalize` they are divided by their sum.
    pub fn explicit(values: Vec<f64>, normalize: bool) -> Result<Weights> {
        check_n(values.len())?;
        if let Some(w) = values.iter().find(|w| !w.is_finite()) {
            return Err(Error::InvalidWeights(format!("weight {w} is not finite")));
        }
        let values = if normalize {
            let sum: f64 = values.iter().sum();
            if sum == 0.0 {
                return Err(Error::InvalidWeights(
                    "weights sum to 0, cannot --normalize".into(),
                ));
            }
            values.iter().map(|w| w / sum).collect()
        } else {
            values
        };
        Ok(Weights {
            method: Method::Explicit {
                normalized: normalize,
            },
            values,
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
}
