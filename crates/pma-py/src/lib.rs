//! `pma._pma`: the native half of the `pma` Python package (the wheel built by maturin).
//!
//! Its job is to expose the library calls the `pma` command makes to Python, and nothing else:
//! every function turns its keyword arguments into the same library configs the CLI builds from
//! flags, makes the same calls, and wraps the library's report in a read-only Python object.
//! There is no second implementation of selection, weighting or merging here.
//!
//! One module per library entry point, each the only place that calls it:
//! - [`merge`]: `CheckpointSeries` → `Selection::select` → weights → `MergePlan::build` →
//!   `execute` (or `summary` on a dry run), reported as a `MergeReport`;
//! - [`inspect`] and [`diff`]: `pma_merge::inspect::inspect` / `pma_merge::diff::diff`;
//! - [`weights`]: the keywords → `WeightSpec` conversion, shared by `merge` and `Watcher`;
//! - [`watch`]: `pma_merge::watch::run`, once per `poll_once()` or on a thread while iterating,
//!   with `pma_merge::watch::run_exec` as the `exec=` hook, as in `pma watch --exec`.
//!
//! Two cross-cutting pieces: [`errors`] maps the library's error enums onto the exception classes
//! of `python/pma/_errors.py`, and [`interrupt`] runs library calls off the GIL while the calling
//! thread keeps running Python's signal handlers, so Ctrl-C cancels a merge cleanly.
//!
//! ```python
//! import pma
//! report = pma.merge(run="checkpoints/", method="ema", alpha=0.2, last=4, out="merged/")
//! print(report.members, report.elapsed_secs)
//! ```
#![deny(missing_docs)]
// The glue passes `pma_merge::Error` through unchanged, once per call, to turn it into a Python
// exception; boxing it here would only add an allocation on the error path.
#![allow(clippy::result_large_err)]

use pyo3::prelude::*;

mod diff;
mod errors;
mod inspect;
mod interrupt;
mod merge;
mod options;
mod watch;
mod weights;

/// The extension module; `python/pma/__init__.py` re-exports everything in it.
#[pymodule]
fn _pma(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(merge::merge, m)?)?;
    m.add_function(wrap_pyfunction!(inspect::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(diff::diff, m)?)?;
    m.add_function(wrap_pyfunction!(weights::weights, m)?)?;
    m.add_class::<merge::MergeReport>()?;
    m.add_class::<merge::Member>()?;
    m.add_class::<inspect::TensorInfo>()?;
    m.add_class::<inspect::TensorStats>()?;
    m.add_class::<diff::DiffReport>()?;
    m.add_class::<diff::TensorDiff>()?;
    m.add_class::<watch::Watcher>()?;
    m.add_class::<watch::WatchEvent>()?;
    Ok(())
}
