//! `pma inspect`: what a checkpoint holds, and optionally per-tensor statistics.
//!
//! Any format opens ([`AnyCheckpoint`]: HF safetensors, torch DCP, torch.save) and every tensor
//! is read through its [`TensorSource`], in global coordinates, so a DCP tensor split into
//! chunks reports the same statistics as the gathered tensor would. Statistics stream each
//! tensor in bounded blocks (accumulating in f64) and release the pages they have read, so
//! inspecting a 200 GB checkpoint needs no more memory than a small one.

use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, dtype_bits, dtype_name, for_each_f64};
use pma_format::{
    AnyCheckpoint, DtypeClass, Layout, LogicalTensor, Region, TensorSource, TensorStore,
};
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
    /// The file holding it (for a DCP tensor, the file of its first chunk).
    pub file: String,
    /// DCP: how many chunks the tensor is stored in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    /// With `--stats`, for float tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<TensorStats>,
}

/// An opaque bytes item of a DCP checkpoint (dataloader or train state, a pickled object).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BytesItemSummary {
    /// Key.
    pub name: String,
    /// Length of the item, in bytes.
    pub n_bytes: u64,
}

/// What only a DCP checkpoint has.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DcpSummary {
    /// Chunks over all tensors.
    pub n_chunks: usize,
    /// Bytes items, in `.metadata` order.
    pub bytes_items: Vec<BytesItemSummary>,
}

/// The report of `pma inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// The checkpoint.
    pub path: PathBuf,
    /// `safetensors`, `DCP` or `torch.save`.
    pub format: String,
    /// Whose layout it follows (`HF safetensors`, `torchtitan DCP`, `DeepSpeed torch.save`, ...).
    pub framework: String,
    /// Safetensors: `file`, `single-file dir` or `sharded`; otherwise `dir` or `file`.
    pub layout: String,
    /// Data files (safetensors shards, `.distcp` files, torch.save files).
    pub files: Vec<String>,
    /// Tensors in physical order.
    pub tensors: Vec<TensorSummary>,
    /// Total elements.
    pub n_params: u64,
    /// Total tensor bytes.
    pub n_bytes: u64,
    /// `__metadata__` of the first file (safetensors only).
    pub metadata: std::collections::BTreeMap<String, String>,
    /// DCP only: chunk count and bytes items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcp: Option<DcpSummary>,
}

/// Inspects the checkpoint at `path` (any format); `with_stats` reads all tensor data.
pub fn inspect(path: &Path, with_stats: bool) -> Result<InspectReport> {
    let (ckpt, framework) = AnyCheckpoint::open_detected(path)?;
    let logical = ckpt.logical_tensors();
    let tensors = logical
        .par_iter()
        .map(|t| {
            let stats = if with_stats {
                tensor_stats(&ckpt, t)?
            } else {
                None
            };
            Ok(TensorSummary {
                name: t.name.clone(),
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                n_params: t.numel(),
                n_bytes: t.n_bytes(),
                file: file_name(&ckpt.file_of_tensor(&t.name)),
                chunks: ckpt
                    .as_dcp()
                    .and_then(|d| d.tensor(&t.name))
                    .map(|d| d.chunks.len()),
                stats,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Statistics read through the maps: a file truncated under us read as zeros (SIGBUS
    // guard), so report that rather than numbers computed from them.
    ckpt.check_faults()?;
    let (layout, files, metadata) = match &ckpt {
        AnyCheckpoint::Safetensors(c) => (
            match c.layout() {
                Layout::File => "file",
                Layout::SingleFileDir => "single-file dir",
                Layout::Sharded => "sharded",
            },
            c.files().iter().map(|f| file_name(f.path())).collect(),
            c.files()
                .first()
                .map(|f| f.header().metadata.clone())
                .unwrap_or_default(),
        ),
        AnyCheckpoint::Dcp(c) => (
            "dir",
            c.data_files().into_iter().map(String::from).collect(),
            Default::default(),
        ),
        AnyCheckpoint::TorchSave(c) => (
            if c.root().is_dir() { "dir" } else { "file" },
            c.files().iter().map(|f| file_name(f.path())).collect(),
            Default::default(),
        ),
    };
    let dcp = ckpt.as_dcp().map(|d| DcpSummary {
        n_chunks: d.tensors().map(|t| t.chunks.len()).sum(),
        bytes_items: d
            .bytes_entries()
            .map(|b| BytesItemSummary {
                name: b.fqn.clone(),
                n_bytes: b.storage.length,
            })
            .collect(),
    });
    Ok(InspectReport {
        path: path.into(),
        format: ckpt.format_name().into(),
        framework: framework.to_string(),
        layout: layout.into(),
        files,
        n_params: logical.iter().map(LogicalTensor::numel).sum(),
        n_bytes: ckpt.data_bytes(),
        metadata,
        dcp,
        tensors,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Streams `f(bytes)` over a tensor's elements, in row-major order, in blocks of about
/// [`STATS_BLOCK_BYTES`], releasing each block's pages afterwards. Blocks hold whole elements.
pub(crate) fn for_each_block(
    src: &dyn TensorSource,
    mut f: impl FnMut(std::ops::Range<u64>, &[u8]) -> Result<()>,
) -> Result<()> {
    let region = Region::full(src.shape());
    let n = region.numel();
    let elem_bytes = (dtype_bits(src.dtype()) / 8).max(1);
    let block = (STATS_BLOCK_BYTES / elem_bytes).max(1);
    let mut scratch = Vec::new();
    let mut start = 0u64;
    while start < n {
        let end = (start + block).min(n);
        src.prefetch(&region, end..(end + block).min(n));
        let bytes = src.read(&region, start..end, &mut scratch)?;
        f(start..end, bytes)?;
        src.release(&region, start..end);
        start = end;
    }
    // A mapping truncated under us read as zeros: say so rather than use them.
    src.verify()?;
    Ok(())
}

fn tensor_stats(ckpt: &AnyCheckpoint, t: &LogicalTensor) -> Result<Option<TensorStats>> {
    let DtypeClass::Float(dt) = classify(t.dtype) else {
        return Ok(None);
    };
    let Some(src) = ckpt.source(&t.name) else {
        return Ok(None);
    };
    let (mut n, mut sum, mut sumsq, mut nonfinite) = (0u64, 0.0f64, 0.0f64, 0u64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for_each_block(src.as_ref(), |_, bytes| {
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
        });
        Ok(())
    })?;
    let mean = if n > 0 { sum / n as f64 } else { f64::NAN };
    let var = if n > 0 {
        (sumsq / n as f64 - mean * mean).max(0.0)
    } else {
        f64::NAN
    };
    Ok(Some(TensorStats {
        norm: sumsq.sqrt(),
        mean,
        std: var.sqrt(),
        min: if n > 0 { min } else { f64::NAN },
        max: if n > 0 { max } else { f64::NAN },
        nonfinite,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::keys::dcp_fixture as fixture;

    #[test]
    fn dcp_inspect_reports_format_chunks_and_bytes_items() {
        let r = inspect(&fixture("run-megatron/iter_0000100"), true).unwrap();
        assert_eq!(
            (r.format.as_str(), r.framework.as_str()),
            ("DCP", "Megatron torch_dist")
        );
        let dcp = r.dcp.as_ref().expect("a DCP report");
        assert_eq!(dcp.bytes_items.len(), 4);
        assert!(dcp
            .bytes_items
            .iter()
            .all(|b| b.name.contains("._extra_state/shard_") && b.n_bytes > 0));
        let chunks: usize = r.tensors.iter().map(|t| t.chunks.unwrap()).sum();
        assert_eq!(chunks, dcp.n_chunks);
        // Stacked layers [2, 16, 8] are stored as one chunk per layer and rank.
        let qkv = r
            .tensors
            .iter()
            .find(|t| t.name == "decoder.layers.self_attention.linear_qkv.weight")
            .unwrap();
        assert_eq!(qkv.shape, [2, 16, 8]);
        assert!(qkv.chunks.unwrap() > 1);
        let stats = qkv.stats.as_ref().unwrap();
        assert!(stats.norm > 0.0 && stats.nonfinite == 0);
        assert_eq!(
            r.n_params,
            r.tensors.iter().map(|t| t.n_params).sum::<u64>()
        );
        // Safetensors reports keep their layout and no DCP part.
        let r = inspect(&fixture("run-megatron/expected/sma-n4.safetensors"), false).unwrap();
        assert_eq!(
            (r.format.as_str(), r.layout.as_str()),
            ("safetensors", "file")
        );
        assert!(r.dcp.is_none() && r.tensors.iter().all(|t| t.chunks.is_none()));
    }
}
