//! `pma inspect`: what a checkpoint holds, and optionally per-tensor statistics.
//!
//! Statistics stream each tensor in bounded blocks (accumulating in f64) and release the pages
//! they have read, so inspecting a 200 GB checkpoint needs no more memory than a small one.

use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, dtype_name, for_each_f64};
use pma_format::{Checkpoint, DtypeClass, Layout, TensorRef};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;

/// Bytes per statistics block.
const STATS_BLOCK_BYTES: u64 = 8 << 20;

/// Statistics of one float tensor, over its finite values.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorStats {
    /// L2 norm.
    pub norm: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum (NaN when there is no finite value).
    pub min: f64,
    /// Maximum (NaN when there is no finite value).
    pub max: f64,
    /// Number of NaN/Inf values.
    pub nonfinite: u64,
}

/// One tensor in an inspect report.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Dtype spec name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Elements.
    pub n_params: u64,
    /// Bytes.
    pub n_bytes: u64,
    /// The file holding it.
    pub file: String,
    /// With `--stats`, for float tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<TensorStats>,
}

/// The report of `pma inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// The checkpoint.
    pub path: PathBuf,
    /// `file`, `single-file dir` or `sharded`.
    pub layout: String,
    /// Safetensors files.
    pub files: Vec<String>,
    /// Tensors in physical order.
    pub tensors: Vec<TensorSummary>,
    /// Total elements.
    pub n_params: u64,
    /// Total tensor bytes.
    pub n_bytes: u64,
    /// `__metadata__` of the first file.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// Inspects the checkpoint at `path`; `with_stats` reads all tensor data.
pub fn inspect(path: &Path, with_stats: bool) -> Result<InspectReport> {
    let ckpt = Checkpoint::open(path)?;
    let tensors: Vec<TensorSummary> = ckpt
        .tensors()
        .par_iter()
        .map(|t| TensorSummary {
            name: t.info.name.clone(),
            dtype: dtype_name(t.info.dtype),
            shape: t.info.shape.clone(),
            n_params: t.info.numel(),
            n_bytes: t.info.n_bytes(),
            file: file_name(ckpt.file_of(t).path()),
            stats: if with_stats {
                tensor_stats(&ckpt, t)
            } else {
                None
            },
        })
        .collect();
    // Statistics read through the maps: a file truncated under us read as zeros (SIGBUS
    // guard), so report that rather than numbers computed from them.
    ckpt.check_faults()?;
    Ok(InspectReport {
        path: path.into(),
        layout: match ckpt.layout() {
            Layout::File => "file",
            Layout::SingleFileDir => "single-file dir",
            Layout::Sharded => "sharded",
        }
        .into(),
        files: ckpt.files().iter().map(|f| file_name(f.path())).collect(),
        n_params: ckpt.param_count(),
        n_bytes: ckpt.data_bytes(),
        metadata: ckpt
            .files()
            .first()
            .map(|f| f.header().metadata.clone())
            .unwrap_or_default(),
        tensors,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Streams `f(block_index_offset, bytes)` over a tensor's bytes in bounded blocks, releasing
/// each block's pages afterwards.
pub(crate) fn for_each_block(
    ckpt: &Checkpoint,
    t: &TensorRef,
    elem_bytes: u64,
    mut f: impl FnMut(&[u8]),
) {
    let file = ckpt.file_of(t);
    let bytes = ckpt.bytes(t);
    let block = (STATS_BLOCK_BYTES / elem_bytes.max(1)).max(1) * elem_bytes.max(1);
    let mut start = 0u64;
    let n = bytes.len() as u64;
    while start < n {
        let end = (start + block).min(n);
        file.prefetch(&t.info, end..(end + block).min(n));
        f(&bytes[start as usize..end as usize]);
        file.release(&t.info, start..end);
        start = end;
    }
}

fn tensor_stats(ckpt: &Checkpoint, t: &TensorRef) -> Option<TensorStats> {
    let DtypeClass::Float(dt) = classify(t.info.dtype) else {
        return None;
    };
    let (mut n, mut sum, mut sumsq, mut nonfinite) = (0u64, 0.0f64, 0.0f64, 0u64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for_each_block(ckpt, t, dt.size_bytes() as u64, |bytes| {
        for_each_f64(dt, bytes, |_, v| {
            if v.is_finite() {
                n += 1;
                sum += v;
                sumsq += v * v;
                min = min.min(v);
                max = max.max(v);
            } else {
                nonfinite += 1;
            }
        })
    });
    let mean = if n > 0 { sum / n as f64 } else { f64::NAN };
    let var = if n > 0 {
        (sumsq / n as f64 - mean * mean).max(0.0)
    } else {
        f64::NAN
    };
    Some(TensorStats {
        norm: sumsq.sqrt(),
        mean,
        std: var.sqrt(),
        min: if n > 0 { min } else { f64::NAN },
        max: if n > 0 { max } else { f64::NAN },
        nonfinite,
    })
}
