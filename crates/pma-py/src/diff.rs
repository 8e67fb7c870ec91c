//! `pma.diff`: the call `pma diff` makes (`pma_merge::diff::diff`), as a [`DiffReport`].

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::to_py_err;
use crate::interrupt::run_interruptible;

/// Distance between one tensor (or all of them, for ``DiffReport.total``) in two checkpoints.
#[pyclass(frozen, get_all, module = "pma")]
#[derive(Debug, Clone)]
pub struct TensorDiff {
    /// Tensor name (``"TOTAL"`` for the total).
    name: String,
    /// ||a - b|| / ||a|| (inf when a is zero and b is not, 0 when both are zero).
    rel_l2: f64,
    /// a.b / (||a|| ||b||) (1 when both are zero).
    cosine: f64,
    /// ||a||.
    norm_a: f64,
    /// ||b||.
    norm_b: f64,
}

#[pymethods]
impl TensorDiff {
    fn __repr__(&self) -> String {
        format!(
            "TensorDiff(name='{}', rel_l2={}, cosine={})",
            self.name, self.rel_l2, self.cosine
        )
    }
}

impl From<pma_merge::diff::TensorDiff> for TensorDiff {
    fn from(d: pma_merge::diff::TensorDiff) -> TensorDiff {
        TensorDiff {
            name: d.name,
            rel_l2: d.rel_l2,
            cosine: d.cosine,
            norm_a: d.norm_a,
            norm_b: d.norm_b,
        }
    }
}

/// How far apart two checkpoints are, per float tensor and in total (``pma diff``).
#[pyclass(frozen, get_all, module = "pma")]
#[derive(Debug)]
pub struct DiffReport {
    /// The first checkpoint (the reference of relative distances).
    a: PathBuf,
    /// The second checkpoint.
    b: PathBuf,
    /// Per float tensor present in both with equal shapes, in A's order.
    tensors: Vec<TensorDiff>,
    /// All compared tensors taken as one vector.
    total: TensorDiff,
    /// Names only in A.
    only_in_a: Vec<String>,
    /// Names only in B.
    only_in_b: Vec<String>,
    /// Names whose shapes differ (not compared).
    shape_mismatch: Vec<String>,
    /// ``(name, identical)`` for integer/BOOL tensors.
    non_float: Vec<(String, bool)>,
}

#[pymethods]
impl DiffReport {
    fn __repr__(&self) -> String {
        format!(
            "DiffReport(a='{}', b='{}', tensors={}, total_rel_l2={}, total_cosine={})",
            self.a.display(),
            self.b.display(),
            self.tensors.len(),
            self.total.rel_l2,
            self.total.cosine
        )
    }
}

/// Per-tensor relative L2 distance and cosine similarity between checkpoints ``a`` and ``b``,
/// accumulated in f64, as ``pma diff`` computes them.
#[pyfunction]
pub(crate) fn diff(py: Python<'_>, a: PathBuf, b: PathBuf) -> PyResult<DiffReport> {
    let r = run_interruptible(py, None, |_| pma_merge::diff::diff(&a, &b))?.map_err(to_py_err)?;
    Ok(DiffReport {
        a: r.a,
        b: r.b,
        tensors: r.tensors.into_iter().map(TensorDiff::from).collect(),
        total: r.total.into(),
        only_in_a: r.only_in_a,
        only_in_b: r.only_in_b,
        shape_mismatch: r.shape_mismatch,
        non_float: r.non_float,
    })
}
