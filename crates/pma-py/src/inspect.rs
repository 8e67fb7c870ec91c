//! `pma.inspect`: the call `pma inspect` makes (`pma_merge::inspect::inspect`), as a list of
//! [`TensorInfo`].

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::to_py_err;
use crate::interrupt::run_interruptible;

/// Statistics of one float tensor over its finite values (``inspect(..., stats=True)``).
#[pyclass(frozen, get_all, module = "pma")]
#[derive(Debug, Clone)]
pub struct TensorStats {
    /// L2 norm.
    norm: f64,
    /// Mean.
    mean: f64,
    /// Population standard deviation.
    std: f64,
    /// Minimum (NaN when no value is finite).
    min: f64,
    /// Maximum (NaN when no value is finite).
    max: f64,
    /// Number of NaN/Inf values.
    nonfinite: u64,
}

#[pymethods]
impl TensorStats {
    fn __repr__(&self) -> String {
        format!(
            "TensorStats(norm={}, mean={}, std={}, min={}, max={}, nonfinite={})",
            self.norm, self.mean, self.std, self.min, self.max, self.nonfinite
        )
    }
}

/// One tensor of a checkpoint: name, dtype, shape, size, file, and optional statistics.
#[pyclass(frozen, get_all, module = "pma")]
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, as in the safetensors header.
    name: String,
    /// Dtype as safetensors spells it (``BF16``, ``F32``, ``I64``, ...).
    dtype: String,
    /// Shape.
    shape: Vec<u64>,
    /// Number of elements.
    n_params: u64,
    /// Bytes of data.
    n_bytes: u64,
    /// The .safetensors file holding it (a shard name for sharded checkpoints).
    file: String,
    /// Statistics with ``stats=True`` for float tensors, else ``None``.
    stats: Option<TensorStats>,
}

#[pymethods]
impl TensorInfo {
    fn __repr__(&self) -> String {
        format!(
            "TensorInfo(name='{}', dtype='{}', shape={:?}, n_bytes={}, file='{}')",
            self.name, self.dtype, self.shape, self.n_bytes, self.file
        )
    }
}

/// The tensors of a checkpoint (an HF directory, sharded or not, or a .safetensors file), in
/// file order. With ``stats=True`` every float tensor is read and gets norm, mean, std, min,
/// max and a NaN/Inf count, as ``pma inspect --stats`` prints them.
#[pyfunction]
#[pyo3(signature = (path, *, stats=false))]
pub(crate) fn inspect(py: Python<'_>, path: PathBuf, stats: bool) -> PyResult<Vec<TensorInfo>> {
    let report = run_interruptible(py, None, |_| pma_merge::inspect::inspect(&path, stats))?
        .map_err(to_py_err)?;
    Ok(report
        .tensors
        .into_iter()
        .map(|t| TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            n_params: t.n_params,
            n_bytes: t.n_bytes,
            file: t.file,
            stats: t.stats.map(|s| TensorStats {
                norm: s.norm,
                mean: s.mean,
                std: s.std,
                min: s.min,
                max: s.max,
                nonfinite: s.nonfinite,
            }),
        })
        .collect())
}
