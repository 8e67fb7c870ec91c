//! What a DCP output holds: the [`DcpLayout`] of a plan, the entries kept from the newest
//! member, and the newest member's other files.
//!
//! A merge into DCP writes every planned tensor ([`MergePlan::tensors`]) with the newest
//! member's chunk layout ([`MergePlan::dcp_chunks`]): the same boxes in the same
//! `__R_K.distcp` files, so a trainer loads the merge with the parallelism it saved with. The
//! merged bytes stream through the pipeline ([`crate::pipeline::DcpSink`]); members with other
//! layouts are read in global coordinates, so the result does not depend on them.
//!
//! With `--keep-state newest` ([`crate::KeySelectionConfig::keep_state_newest`]) the output is
//! also a checkpoint training can resume from: every entry [`verbatim_entries`] names (optimizer
//! and scheduler state, dataloader and train-state bytes) is copied item by item from the newest
//! member ([`VerbatimItem`]: each `TORCH_SAVE` item is a self-contained torch.save archive, so
//! only its place in `.metadata` changes), and so are the newest checkpoint directory's files
//! that are not DCP data ([`state_files`]). Without it the output's entries are the model's
//! only.
//!
//! One exception: Megatron's `torch_dist` loader reads `metadata.json` (which backend wrote the
//! directory) and `common.pt` (the run's `args`, iteration, scheduler) before any tensor, and
//! refuses a directory without them. So a DCP output of a Megatron checkpoint always carries
//! both, copied from the newest member ([`MEGATRON_FILES`]); starting from the merge with
//! `--finetune --no-load-optim --no-load-rng` ignores the iteration and scheduler in
//! `common.pt`.

use std::path::{Path, PathBuf};

use pma_format::dcp::DcpEntry;
use pma_format::dcp_out::{DcpLayout, DcpTensor, VerbatimItem, VerbatimKind};

use crate::error::{Error, Result};
use crate::keys::Action;
use crate::plan::MergePlan;

/// The files of a Megatron `torch_dist` checkpoint directory its loader cannot do without;
/// a DCP output whose newest member has both always gets them.
pub const MEGATRON_FILES: [&str; 2] = ["common.pt", "metadata.json"];

/// The one data file of a DCP output whose newest member has no chunk layout (not DCP): rank 0's
/// first file, as torch names it.
pub const SINGLE_RANK_FILE: &str = "__0_0.distcp";

/// Bytes a tensor item adds to its data, at most: the zip headers of a torch.save archive
/// (64-byte alignment, ZIP64 records) and its `data.pkl`. Our items add about 0.7 KiB, torch's
/// own about 1.6 KiB.
const ITEM_OVERHEAD_BYTES: u64 = 2048;
/// `.metadata` bytes per item, at most, besides its key (which `.metadata` holds twice: in the
/// entry and in the item's index). About 450 are used.
const METADATA_BYTES_PER_ITEM: u64 = 1024;

/// An upper bound on the `.metadata` of `layout`.
pub(crate) fn metadata_bound(layout: &DcpLayout) -> u64 {
    let chunks = layout
        .tensors
        .iter()
        .flat_map(|t| t.chunks.iter().map(move |_| t.fqn.len()));
    let verbatim = layout.verbatim.iter().map(|v| v.fqn.len());
    chunks
        .chain(verbatim)
        .map(|fqn_bytes| METADATA_BYTES_PER_ITEM + 2 * fqn_bytes as u64)
        .sum()
}

/// Whether the output keeps the newest member's state (`--keep-state newest`): the one place
/// that reads the setting.
fn keeps_state(plan: &MergePlan) -> bool {
    plan.config.keys.keep_state_newest
}

/// The entries of the newest member a DCP output copies byte for byte, in the newest member's
/// order: those key selection decided to keep ([`Action::KeepNewest`], only with
/// `--keep-state newest`), when the newest member is DCP; otherwise none (a model-only output).
///
/// This is the one place that decides which entries are kept.
pub fn verbatim_entries(plan: &MergePlan) -> Vec<String> {
    if !keeps_state(plan)
        || plan.inputs[plan.inputs.len() - 1]
            .checkpoint
            .as_dcp()
            .is_none()
    {
        return Vec::new();
    }
    plan.keys
        .names(Action::KeepNewest)
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

/// The newest DCP member's files that the DCP output copies, sorted: with `keep_state_newest`,
/// every regular file of its directory that is not DCP data (`.metadata`, `*.distcp`) and not
/// hidden; without it, Megatron's [`MEGATRON_FILES`] when the directory has both. A symlink is
/// copied only if it resolves to a file inside the checkpoint. Folders are not copied.
pub fn state_files(plan: &MergePlan) -> Result<Vec<PathBuf>> {
    let Some(newest) = plan.inputs[plan.inputs.len() - 1].checkpoint.as_dcp() else {
        return Ok(Vec::new());
    };
    let megatron = MEGATRON_FILES
        .iter()
        .all(|f| newest.dir().join(f).is_file());
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
        let needed = megatron && MEGATRON_FILES.contains(&name_str.as_ref());
        if !keeps_state(plan) && !needed {
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
    for (i, t) in plan.tensors.iter().enumerate() {
        let elem_bytes = pma_format::dtype::dtype_bits(t.spec.dtype) / 8;
        for c in plan.dcp_chunks(i) {
            let meta = METADATA_BYTES_PER_ITEM + 2 * t.spec.name.len() as u64;
            total += c.region.numel() * elem_bytes + ITEM_OVERHEAD_BYTES + meta;
        }
    }
    for v in verbatim_items(plan).unwrap_or_default() {
        total += v.length + METADATA_BYTES_PER_ITEM + 2 * v.fqn.len() as u64;
    }
    for f in state_files(plan).unwrap_or_default() {
        total += std::fs::metadata(&f).map_or(0, |m| m.len());
    }
    total
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

#[cfg(test)]
mod tests {
    use pma_format::{classify_key, EntryRole};

    use super::*;
    use crate::plan::{MergeConfig, OutputFormat};
    use crate::{CheckpointSeries, Selection, WeightSpec};

    /// The SMA plan of fixture `run`, as default key selection (plus `exclude`) makes it.
    fn fixture_plan(run: &str, keep_state: bool, exclude: &[&str]) -> MergePlan {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures/dcp")
            .join(run);
        let series = CheckpointSeries::discover(&dir).unwrap();
        let (inputs, _) = Selection::default()
            .select(&series, true)
            .unwrap()
            .into_inputs();
        let weights = WeightSpec::Sma.weights(inputs.len()).unwrap();
        let config = MergeConfig {
            keys: crate::KeySelectionConfig {
                keep_state_newest: keep_state,
                exclude: exclude.iter().map(|e| e.to_string()).collect(),
                ..Default::default()
            },
            ..MergeConfig::default()
        };
        MergePlan::build(inputs, weights, config).unwrap()
    }

    #[test]
    fn verbatim_entries_are_the_newest_entries_not_merged_and_only_with_keep_state() {
        let plan = fixture_plan("run-fsdp2", false, &[]);
        assert_eq!(plan.output_format(), OutputFormat::Dcp);
        assert!(verbatim_entries(&plan).is_empty());
        assert!(dcp_layout(&plan).unwrap().verbatim.is_empty());

        let plan = fixture_plan("run-fsdp2", true, &[]);
        let kept = verbatim_entries(&plan);
        let newest = plan.inputs[3].checkpoint.as_dcp().unwrap();
        let want: Vec<&str> = newest
            .entries()
            .iter()
            .map(DcpEntry::fqn)
            .filter(|f| classify_key(f) == EntryRole::TrainingState || f.contains("dataloader"))
            .collect();
        assert_eq!(kept, want);
        assert!(kept.iter().any(|k| k.ends_with(".exp_avg")));
        assert!(kept.iter().any(|k| k == "lr_scheduler.last_epoch"));
        // One item per chunk of a kept tensor, each from the file the newest keeps it in.
        let layout = dcp_layout(&plan).unwrap();
        let n_items: usize = newest
            .entries()
            .iter()
            .filter(|e| kept.iter().any(|k| k == e.fqn()))
            .map(|e| match e {
                DcpEntry::Tensor(t) => t.chunks.len(),
                DcpEntry::Bytes(_) => 1,
            })
            .sum();
        assert_eq!(layout.verbatim.len(), n_items);
    }

    #[test]
    fn keep_state_of_a_safetensors_serialized_newest_is_refused_naming_the_entry() {
        let plan = fixture_plan("run-safetensors", true, &[]);
        match dcp_layout(&plan) {
            Err(Error::KeepStateNotCopyable { entry, .. }) => {
                assert!(entry.starts_with("train_state."), "{entry}")
            }
            other => panic!("expected KeepStateNotCopyable, got {other:?}"),
        }
        // Its bytes items are torch.save zips like any other: a plan that keeps only those
        // (the training-state tensors excluded) is fine.
        let plan = fixture_plan("run-safetensors", true, &["train_state.*"]);
        let layout = dcp_layout(&plan).unwrap();
        assert!(layout
            .verbatim
            .iter()
            .all(|v| v.kind == VerbatimKind::Bytes));
        assert!(!layout.verbatim.is_empty());
    }

    #[test]
    fn estimate_bounds_the_bytes_written() {
        let tmp = tempfile::tempdir().unwrap();
        for (run, keep) in [("run-single", false), ("run-megatron", true)] {
            let plan = fixture_plan(run, keep, &[]);
            let estimate = plan.bytes_written();
            let out = tmp.path().join(run);
            let report = crate::execute(
                &plan,
                &out,
                &crate::ExecOptions::default(),
                &crate::NoProgress,
            )
            .unwrap();
            let written = report.plan.bytes_written;
            assert!(estimate >= written, "{run}: {estimate} < {written}");
            // ... and not by much: a few KiB per item.
            assert!(
                estimate < written + 8192 * 64,
                "{run}: {estimate} vs {written}"
            );
            assert_eq!(report.plan.files, file_names(&plan));
        }
    }
}
