//! What a DCP output holds: the [`DcpLayout`] of a plan, the entries kept from the newest
//! member, and the newest member's other files.
//!
//! A merge into DCP writes every planned tensor ([`MergePlan::tensors`]) with the newest
//! member's chunk layout ([`MergePlan::dcp_chunks`]): the same boxes in the same
//! `__R_K.distcp` files, so a trainer loads the merge with the parallelism it saved with. The
//! merged bytes stream through the pipeline ([`crate::pipeline::DcpSink`]); members with other
//! layouts are read in global coordinates, so the result does not depend on them.
//!
//! With [`MergeConfig::keep_state_newest`](crate::MergeConfig::keep_state_newest) the output is
//! also a checkpoint training can resume from: every entry [`verbatim_entries`] names (optimizer
//! and scheduler state, dataloader and train-state bytes) is copied item by item from the newest
//! member ([`VerbatimItem`]: each `TORCH_SAVE` item is a self-contained torch.save archive, so
//! only its place in `.metadata` changes), and so are the newest checkpoint directory's files
//! that are not DCP data ([`state_files`]: Megatron's `common.pt` and `metadata.json`). Without
//! it the output is model-only.

use std::path::{Path, PathBuf};

use pma_format::dcp::DcpEntry;
use pma_format::dcp_out::{DcpLayout, DcpTensor, VerbatimItem, VerbatimKind};

use crate::error::{Error, Result};
use crate::plan::MergePlan;

/// The one data file of a DCP output whose newest member has no chunk layout (not DCP): rank 0's
/// first file, as torch names it.
pub const SINGLE_RANK_FILE: &str = "__0_0.distcp";

/// Bytes a tensor item adds to its data, at most: the zip headers of a torch.save archive
/// (seven entries, 64-byte alignment, ZIP64 records) and its `data.pkl`. Our items add about
/// 1.3 KiB; torch's own about 1.6 KiB.
const ITEM_OVERHEAD_BYTES: u64 = 4096;
/// `.metadata` bytes per item, at most, besides the key itself.
const METADATA_BYTES_PER_ITEM: u64 = 512;

/// The entries of the newest member a DCP output copies byte for byte, in the newest member's
/// order: with `keep_state_newest`, every entry of the newest DCP member that is not one of the
/// plan's tensors; otherwise none (a model-only output).
///
/// This is the one place that decides what is kept. When key selection is part of the plan,
/// this becomes the entries whose action is "keep newest".
pub fn verbatim_entries(plan: &MergePlan) -> Vec<String> {
    if !plan.config.keep_state_newest {
        return Vec::new();
    }
    let Some(newest) = plan.inputs[plan.inputs.len() - 1].checkpoint.as_dcp() else {
        return Vec::new();
    };
    let planned: std::collections::HashSet<&str> =
        plan.tensors.iter().map(|t| t.spec.name.as_str()).collect();
    newest
        .entries()
        .iter()
        .map(DcpEntry::fqn)
        .filter(|fqn| !planned.contains(fqn))
        .map(String::from)
        .collect()
}

/// The layout of the plan's DCP output: its tensors (plan order, so a job's tensor index is
/// the layout's) with their output chunks, and the kept entries as verbatim items in the files
/// the newest member keeps them in.
pub fn dcp_layout(plan: &MergePlan) -> Result<DcpLayout> {
    let tensors = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| DcpTensor {
            fqn: t.spec.name.clone(),
            dtype: t.spec.dtype,
            shape: t.spec.shape.clone(),
            chunks: plan.dcp_chunks(i),
        })
        .collect();
    Ok(DcpLayout {
        tensors,
        verbatim: verbatim_items(plan)?,
        ..DcpLayout::default()
    })
}

fn verbatim_items(plan: &MergePlan) -> Result<Vec<VerbatimItem>> {
    let fqns = verbatim_entries(plan);
    if fqns.is_empty() {
        return Ok(Vec::new());
    }
    let newest = plan.inputs[plan.inputs.len() - 1]
        .checkpoint
        .as_dcp()
        .expect("verbatim_entries names entries of a DCP newest member only");
    let not_copyable = |fqn: &str, reason: String| Error::KeepStateNotCopyable {
        path: newest.dir().into(),
        entry: fqn.into(),
        reason,
    };
    let mut items = Vec::new();
    for fqn in &fqns {
        let entry = newest
            .entry(fqn)
            .ok_or_else(|| not_copyable(fqn, "no such entry".into()))?;
        match entry {
            DcpEntry::Bytes(b) => items.push(VerbatimItem {
                fqn: fqn.clone(),
                kind: VerbatimKind::Bytes,
                source: newest.dir().join(&b.storage.relative_path),
                offset: b.storage.offset,
                length: b.storage.length,
                file: b.storage.relative_path.clone(),
            }),
            DcpEntry::Tensor(t) => {
                for c in &t.chunks {
                    // A SAFETENSORS-serialized chunk is an entry of its file's safetensors blob,
                    // not a self-contained item: there is nothing to copy that a TORCH_SAVE
                    // reader could load.
                    let is_zip = newest
                        .item_bytes(&c.storage)
                        .is_some_and(|b| b.starts_with(b"PK\x03\x04"));
                    if !is_zip {
                        return Err(not_copyable(
                            fqn,
                            format!(
                                "its chunk at {:?} in {} is not a torch.save item (the \
                                 SAFETENSORS serialization), so it cannot be copied into a \
                                 TORCH_SAVE output; merge without keeping state",
                                c.region.offsets, c.storage.relative_path
                            ),
                        ));
                    }
                    items.push(VerbatimItem {
                        fqn: fqn.clone(),
                        kind: VerbatimKind::Tensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            region: c.region.clone(),
                        },
                        source: newest.dir().join(&c.storage.relative_path),
                        offset: c.storage.offset,
                        length: c.storage.length,
                        file: c.storage.relative_path.clone(),
                    });
                }
            }
        }
    }
    Ok(items)
}

/// The newest DCP member's files that a kept-state output copies: with `keep_state_newest`,
/// every regular file of its directory that is not DCP data (`.metadata`, `*.distcp`) and not
/// hidden, such as Megatron's `common.pt` and `metadata.json`; sorted. A symlink is copied only
/// if it resolves to a file inside the checkpoint. Folders are not copied.
pub fn state_files(plan: &MergePlan) -> Result<Vec<PathBuf>> {
    if !plan.config.keep_state_newest {
        return Ok(Vec::new());
    }
    let Some(newest) = plan.inputs[plan.inputs.len() - 1].checkpoint.as_dcp() else {
        return Ok(Vec::new());
    };
    let dir = newest.dir();
    let read = std::fs::read_dir(dir).map_err(|e| io_error(dir, "listing", e))?;
    let mut files = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| io_error(dir, "listing", e))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with('.') || name_str.ends_with(".distcp") {
            continue;
        }
        let path = entry.path();
        // Never follows a link out of the checkpoint (see pma_format::sidecar).
        let Ok(resolved) = pma_format::sidecar::resolve_sidecar(dir, &path) else {
            continue;
        };
        if resolved.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Copies `files` (from [`state_files`]) into `dir`, streaming, each fsync'd. Returns their
/// names.
pub(crate) fn copy_state_files(files: &[PathBuf], dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::with_capacity(files.len());
    for src in files {
        let name = src.file_name().expect("listed files have names");
        let dst = dir.join(name);
        let mut from = std::fs::File::open(src).map_err(|e| io_error(src, "opening", e))?;
        let mut to = std::fs::File::create(&dst).map_err(|e| io_error(&dst, "creating", e))?;
        std::io::copy(&mut from, &mut to).map_err(|e| io_error(&dst, "copying", e))?;
        to.sync_all().map_err(|e| io_error(&dst, "syncing", e))?;
        names.push(name.to_string_lossy().into_owned());
    }
    Ok(names)
}

/// The files of the plan's DCP output, in write order: its data files, `.metadata`, and the
/// kept state files.
pub fn file_names(plan: &MergePlan) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    };
    for t in 0..plan.tensors.len() {
        for c in plan.dcp_chunks(t) {
            add(&c.file);
        }
    }
    // A layout that cannot be built fails the merge before it writes; the listing shows what it
    // can.
    if let Ok(items) = verbatim_items(plan) {
        for v in &items {
            add(&v.file);
        }
    }
    add(pma_format::dcp_out::METADATA_FILE_NAME);
    for f in state_files(plan).unwrap_or_default() {
        add(&f.file_name().unwrap_or_default().to_string_lossy());
    }
    names
}

/// An upper bound on the bytes of the plan's DCP output (the exact figure is known once the
/// writer has planned its items): tensor data plus a bound on each item's archive overhead and
/// `.metadata` entry, the kept items and the kept files.
pub fn estimated_bytes(plan: &MergePlan) -> u64 {
    let mut total = 0u64;
    let mut n_items = 0u64;
    for (i, t) in plan.tensors.iter().enumerate() {
        let elem_bytes = pma_format::dtype::dtype_bits(t.spec.dtype) / 8;
        for c in plan.dcp_chunks(i) {
            total += c.region.numel() * elem_bytes + ITEM_OVERHEAD_BYTES;
            n_items += 1;
        }
        total += t.spec.name.len() as u64;
    }
    for v in verbatim_items(plan).unwrap_or_default() {
        total += v.length + v.fqn.len() as u64;
        n_items += 1;
    }
    for f in state_files(plan).unwrap_or_default() {
        total += std::fs::metadata(&f).map_or(0, |m| m.len());
    }
    total + n_items * METADATA_BYTES_PER_ITEM
}

/// A `pma-format` I/O error on `path`, in this crate's error.
pub(crate) fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> Error {
    pma_format::Error::Io {
        path: path.into(),
        action,
        source,
    }
    .into()
}
