//! `pma.weights` and the weighting keywords of `pma.merge`: the only caller of the library's
//! `Weights` constructors in this crate.

use pma_merge::Weights;
use pyo3::prelude::*;

use crate::errors::{config_error, to_py_err};

/// EMA smoothing when none is given (the CLI's `--alpha` default).
pub(crate) const DEFAULT_ALPHA: f64 = 0.2;

/// How to weight the selected checkpoints: a method, or explicit weights (the CLI's `MethodArgs`).
#[derive(Debug, Clone)]
pub(crate) enum WeightChoice {
    /// SMA, EMA with smoothing `alpha`, or WMA.
    Method(MethodName, f64),
    /// Given weights, oldest first, optionally rescaled to sum to 1.
    Explicit(Vec<f64>, bool),
}

/// The averaging methods of `pma merge --method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MethodName {
    Sma,
    Ema,
    Wma,
}

impl MethodName {
    /// Parses `sma`, `ema` or `wma`.
    pub(crate) fn parse(name: &str) -> PyResult<MethodName> {
        match name.to_ascii_lowercase().as_str() {
            "sma" => Ok(MethodName::Sma),
            "ema" => Ok(MethodName::Ema),
            "wma" => Ok(MethodName::Wma),
            _ => Err(config_error(format!(
                "unknown method '{name}' (expected sma, ema or wma)"
            ))),
        }
    }
}

impl WeightChoice {
    /// Validates the `method`/`alpha`/`weights`/`normalize` keywords together. `weights`
    /// replaces `method`, which must then be left at its default `"ema"` (or be `None`).
    pub(crate) fn from_keywords(
        method: Option<&str>,
        alpha: f64,
        weights: Option<Vec<f64>>,
        normalize: bool,
    ) -> PyResult<WeightChoice> {
        match (method, weights) {
            (Some(m), Some(_)) if !m.eq_ignore_ascii_case("ema") => Err(config_error(
                "give method or weights, not both (weights are explicit, oldest first)",
            )),
            (_, Some(w)) => Ok(WeightChoice::Explicit(w, normalize)),
            (_, None) if normalize => Err(config_error("normalize needs explicit weights")),
            (Some(m), None) => Ok(WeightChoice::Method(MethodName::parse(m)?, alpha)),
            (None, None) => Err(config_error("give method or weights")),
        }
    }

    /// Weights for `n` checkpoints.
    pub(crate) fn weights(&self, n: usize) -> pma_merge::Result<Weights> {
        match self {
            WeightChoice::Method(MethodName::Sma, _) => Weights::sma(n),
            WeightChoice::Method(MethodName::Ema, alpha) => Weights::ema(n, *alpha),
            WeightChoice::Method(MethodName::Wma, _) => Weights::wma(n),
            WeightChoice::Explicit(values, normalize) => {
                Weights::explicit(values.clone(), *normalize)
            }
        }
    }
}

/// The averaging weights pma uses for ``n`` checkpoints, oldest first.
///
/// ``method`` is ``"sma"`` (w_i = 1/n), ``"ema"`` (w_1 = (1-alpha)^(n-1),
/// w_i = alpha*(1-alpha)^(n-i); ``alpha`` defaults to 0.2) or ``"wma"`` (w_i = i / sum(1..n)).
/// These are the exact floats a merge multiplies by; they sum to 1 up to rounding.
#[pyfunction]
#[pyo3(signature = (method, n, alpha=None))]
pub(crate) fn weights(method: &str, n: usize, alpha: Option<f64>) -> PyResult<Vec<f64>> {
    let choice = WeightChoice::Method(MethodName::parse(method)?, alpha.unwrap_or(DEFAULT_ALPHA));
    Ok(choice.weights(n).map_err(to_py_err)?.values)
}
