//! `pma.weights` and the weighting keywords of `pma.merge` and `pma.Watcher`: the one place this
//! crate turns Python keywords into the library's [`WeightSpec`] (the CLI's
//! `MethodArgs::weight_spec`).

use pma_merge::{WeightSpec, DEFAULT_EMA_ALPHA};
use pyo3::prelude::*;

use crate::errors::{config_error, to_py_err};

/// EMA smoothing when none is given (the CLI's `--alpha` default).
pub(crate) const DEFAULT_ALPHA: f64 = DEFAULT_EMA_ALPHA;

/// Validates the `method`/`alpha`/`weights`/`normalize` keywords together. `weights` replaces
/// `method`, which must then be left at its default `"ema"` (or be `None`). Method names are
/// case-insensitive; `ema-stream` is a `Watcher` mode, which handles it before asking.
pub(crate) fn weight_spec(
    method: Option<&str>,
    alpha: f64,
    weights: Option<Vec<f64>>,
    normalize: bool,
) -> PyResult<WeightSpec> {
    match (method, weights) {
        (Some(m), Some(_)) if !m.eq_ignore_ascii_case("ema") => Err(config_error(
            "give method or weights, not both (weights are explicit, oldest first)",
        )),
        (_, Some(values)) => Ok(WeightSpec::Explicit { values, normalize }),
        (_, None) if normalize => Err(config_error("normalize needs explicit weights")),
        (Some(m), None) if m.eq_ignore_ascii_case("ema-stream") => Err(config_error(
            "method='ema-stream' averages a growing run's whole history and exists only in \
             pma.Watcher; for a fixed set of checkpoints use method='ema'",
        )),
        (Some(m), None) => WeightSpec::from_name(&m.to_ascii_lowercase(), alpha).map_err(to_py_err),
        (None, None) => Err(config_error("give method or weights")),
    }
}

/// The averaging weights pma uses for ``n`` checkpoints, oldest first.
///
/// ``method`` is ``"sma"`` (w_i = 1/n), ``"ema"`` (w_1 = (1-alpha)^(n-1),
/// w_i = alpha*(1-alpha)^(n-i); ``alpha`` defaults to 0.2), ``"wma"`` (w_i = i / sum(1..n)), or
/// a decay-emulating method (WSM), ``"decay-linear"``, ``"decay-cosine"`` or ``"decay-1-sqrt"``:
/// with the LR factor f over the window, w_j = f((j-1)/n) - f(j/n) for j >= 2, w_n = f((n-1)/n)
/// and w_1 = 1 - sum of the others.
/// These are the exact floats a merge multiplies by; they sum to 1 up to rounding.
#[pyfunction]
#[pyo3(signature = (method, n, alpha=None))]
pub(crate) fn weights(method: &str, n: usize, alpha: Option<f64>) -> PyResult<Vec<f64>> {
    let spec = weight_spec(Some(method), alpha.unwrap_or(DEFAULT_ALPHA), None, false)?;
    Ok(spec.weights(n).map_err(to_py_err)?.values)
}
