//! Partitioned merges: one plan, its output files split among K processes (a Slurm array, a
//! Kubernetes Indexed Job, torchrun ranks) on a shared filesystem, then one finalize step that
//! checks and publishes the output.
//!
//! Every part builds the same [`MergePlan`] from headers alone and calls [`Partition::new`],
//! which is a pure function of that plan and K:
//! - an HF output is split by its safetensors shards; when the plan has fewer output shards
//!   than parts, its shards are cut again at `min(max_shard_bytes, ceil(tensor bytes / K))`, so
//!   every part has work (the output then equals a single-process merge with that
//!   `--max-shard-size`, which reports carry);
//! - a DCP output is split by its `.distcp` files, whose exact sizes the DCP writer plans from
//!   the layout ([`pma_format::dcp_out::DcpLayout::planned_files`]). It is never cut: the
//!   layout is the newest member's, which the trainer reloads with. With fewer files than parts
//!   (a single-rank checkpoint has one), the parts beyond them get no files and write only
//!   their manifest, so a job array sized for the largest run still works and the finalize
//!   still sees every part;
//! - files go to parts greedily by bytes, largest first, each to the part with the fewest bytes
//!   so far (ties: lower file index, lower part index), so the assignment is deterministic;
//! - the plan hash (SHA-256 of inputs, their file sizes and mtimes, weights, flags, every
//!   tensor's layout, the shard layout, for DCP every chunk's box and file and every kept item,
//!   and K) tells parts made from different plans apart.
//!
//! Part I writes its files into `.OUT.pma-parts/part-I-of-K/` beside OUT, with a
//! `manifest.json` (plan hash; per file its name, size, CRC-32 computed from the bytes on their
//! way to the writer, inode and mtime once durable). A DCP part's files are byte for byte those
//! of the single-process merge (a `--keep-state newest` item is copied by the part whose file
//! holds it), and it writes no `.metadata`. The part directory is staged and
//! published as a whole through [`StagedOutput`] with [`Publish::Replace`], so a retried part
//! replaces its previous attempt atomically and a killed one leaves only a staging path (removed
//! by the next attempt on the same host, and by the finalize).
//!
//! [`finalize`] reads K from the manifests, checks each against its own plan hash and every file
//! against its manifest entry ([`PartCheck`]), then links the files into a staged output, writes
//! the shard index and sidecars (DCP: `.metadata`, a function of the layout alone, and the
//! newest member's state files), and publishes OUT atomically; the parts directory is removed
//! last. The output files' bytes depend only on the plan, so the result is bit-identical to
//! [`crate::execute`] of the same plan.
//!
//! What "corrupted" means decides the finalize's cost. A part killed mid-write has no manifest
//! (it is written last, after every file is fsync'd), so it is missing. Any later change made
//! through the filesystem (a retried or concurrent part replacing a file, a truncation, a write
//! into it) changes the file's inode, size or mtime, which the manifest records: checking them
//! ([`PartCheck::Stamp`], the default) costs one `stat` per file. Only a change that keeps
//! all three (silent media corruption, or a writer that sets the mtime back) needs the bytes
//! read back against their CRC-32 ([`PartCheck::Contents`]): on one machine that read was a
//! third of a merge's time (parts + finalize 1.48x a single process, bench/parts_bench.sh), and
//! across nodes the finalize would read the whole output from the shared filesystem while each
//! part reads only 1/K of the inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use pma_format::atomic::{create_dir_all_synced, OutputKind, Publish};
use pma_format::dcp_out::{DcpLayout, DcpWriter};
use pma_format::dtype::dtype_name;
use pma_format::{StagedOutput, TensorSpec};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::executor::{copy_sidecars, write_dcp_files, write_shard_files, ExecOptions};
use crate::pipeline::{Job, ShardFile, Sink};
use crate::plan::{layout_shards, MergePlan, PlanSummary};
use crate::progress::Progress;

/// Suffix of the shared staging directory beside OUT: `.NAME` + this.
pub const PARTS_DIR_SUFFIX: &str = ".pma-parts";
/// The manifest inside each part directory.
pub const MANIFEST_FILE_NAME: &str = "manifest.json";
/// Version of the manifest layout.
pub(crate) const MANIFEST_SCHEMA: u32 = 2;

/// The shared staging directory of the parts of output `out`: `.NAME.pma-parts` beside it, a
/// name every part and the finalize derive from OUT alone.
pub fn parts_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}{PARTS_DIR_SUFFIX}"))
}

pub(crate) fn part_dir_name(part: usize, parts: usize) -> String {
    format!("part-{part}-of-{parts}")
}

/// Reads `part-I-of-K` back.
pub(crate) fn parse_part_dir_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("part-")?;
    let (i, k) = rest.split_once("-of-")?;
    Some((i.parse().ok()?, k.parse().ok()?))
}

/// Which output files each part writes, and the hash every part and the finalize agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Number of parts, K.
    pub parts: usize,
    /// Every output file the parts write, with its exact size: for an HF output the plan's
    /// shards (`files[i]` is [`MergePlan::shards`]`[i]`), for a DCP output its `.distcp` files
    /// in the DCP writer's order.
    pub files: Vec<(String, u64)>,
    /// `shards_of[i]`: indices into [`Partition::files`] (for HF, into [`MergePlan::shards`])
    /// written by part `i`, ascending.
    pub shards_of: Vec<Vec<usize>>,
    /// Bytes (headers included) each part writes.
    pub part_bytes: Vec<u64>,
    /// Hex SHA-256 of the plan and K.
    pub plan_hash: String,
    /// Whether the plan's shards were cut again (smaller) so that every part has work.
    pub resharded: bool,
    /// The layout of a DCP output (the newest member's chunks and files); `None` for HF.
    pub dcp: Option<DcpLayout>,
}

impl Partition {
    /// Partitions `plan` into `parts`, cutting its shards smaller first when it has fewer shards
    /// than parts (see the module docs). A single-file output is one file: it has one part. A
    /// DCP output is partitioned by its `.distcp` files and never cut: parts beyond its file
    /// count get no files.
    pub fn new(plan: &mut MergePlan, parts: usize) -> Result<Partition> {
        if parts == 0 {
            return Err(Error::InvalidPartCount {
                parts,
                reason: "there must be at least one part",
            });
        }
        let mut resharded = false;
        let mut dcp = None;
        let files = if plan.output_format() == crate::plan::OutputFormat::Dcp {
            let layout = crate::dcp_output::dcp_layout(plan)?;
            let files = layout.planned_files()?;
            dcp = Some(layout);
            files
        } else {
            if plan.single_file && parts > 1 {
                return Err(Error::InvalidPartCount {
                    parts,
                    reason: "a single-file output (OUT ending in .safetensors) is one file and \
                             cannot be split; write an HF directory instead",
                });
            }
            if plan.shards.len() < parts {
                let total: u64 = plan.tensors.iter().map(|t| t.spec.n_bytes()).sum();
                let per_part = total.div_ceil(parts as u64).max(1);
                let max = plan.config.max_shard_bytes.min(per_part);
                if max < plan.config.max_shard_bytes {
                    plan.config.max_shard_bytes = max;
                    plan.shards = layout_shards(&plan.tensors, plan.single_file, max);
                    resharded = true;
                }
            }
            (0..plan.shards.len())
                .map(|i| (plan.shards[i].0.clone(), shard_file_bytes(plan, i)))
                .collect()
        };
        let mut order: Vec<usize> = (0..files.len()).collect();
        // Largest first; equal sizes in file order (sort_by_key is stable).
        order.sort_by_key(|&i| std::cmp::Reverse(files[i].1));
        let mut shards_of = vec![Vec::new(); parts];
        let mut part_bytes = vec![0u64; parts];
        for i in order {
            let lightest = (0..parts)
                .min_by_key(|&p| (part_bytes[p], p))
                .expect("parts > 0");
            shards_of[lightest].push(i);
            part_bytes[lightest] += files[i].1;
        }
        for s in &mut shards_of {
            s.sort_unstable();
        }
        Ok(Partition {
            parts,
            plan_hash: plan_hash(plan, parts, dcp.as_ref().map(|l| (l, files.as_slice())))?,
            files,
            shards_of,
            part_bytes,
            resharded,
            dcp,
        })
    }

    /// Names of the files part `part` writes, in [`Partition::files`] order.
    pub(crate) fn names_of(&self, part: usize) -> Vec<&str> {
        self.shards_of[part]
            .iter()
            .map(|&i| self.files[i].0.as_str())
            .collect()
    }
}

/// The HF shards part `part` writes, each at `dir/NAME`.
pub(crate) fn shard_files_of(
    plan: &MergePlan,
    partition: &Partition,
    part: usize,
    dir: &Path,
) -> Vec<ShardFile> {
    partition.shards_of[part]
        .iter()
        .map(|&i| {
            let (name, range) = &plan.shards[i];
            ShardFile {
                path: dir.join(name),
                tensors: range
                    .clone()
                    .map(|t| (t, plan.tensors[t].spec.clone()))
                    .collect(),
            }
        })
        .collect()
}

/// Bytes of output shard `i`, header included.
fn shard_file_bytes(plan: &MergePlan, i: usize) -> u64 {
    let specs = plan.shard_specs(i);
    pma_format::encode_header(&specs, &plan.metadata).len() as u64
        + specs.iter().map(TensorSpec::n_bytes).sum::<u64>()
}

/// SHA-256 over everything the output bytes and their layout depend on: the provenance metadata
/// (method, weights, dtype, input paths and steps, key selection), the weights' exact bits,
/// the flags, each input file's size and mtime, every output tensor's name, shape, dtype, mode
/// and source dtypes, the shard layout, and K. For a DCP output (`dcp`: its layout and planned
/// files) also the output format, every chunk's box and file, every kept (verbatim) item with
/// its source file's size and mtime, and every data file's planned size.
fn plan_hash(
    plan: &MergePlan,
    parts: usize,
    dcp: Option<(&DcpLayout, &[(String, u64)])>,
) -> Result<String> {
    let mut inputs = Vec::with_capacity(plan.inputs.len());
    for input in &plan.inputs {
        let store = input.store();
        let files: BTreeSet<PathBuf> = plan
            .tensors
            .iter()
            .map(|t| store.file_of_tensor(&t.spec.name))
            .collect();
        inputs.push(serde_json::json!({
            "root": store.root().display().to_string(),
            "files": files.iter().map(|f| file_record(f)).collect::<Result<Vec<_>>>()?,
        }));
    }
    let dcp = match dcp {
        None => serde_json::Value::Null,
        Some((layout, files)) => {
            let chunks: Vec<serde_json::Value> = layout
                .tensors
                .iter()
                .map(|t| {
                    let boxes: Vec<serde_json::Value> = t
                        .chunks
                        .iter()
                        .map(|c| serde_json::json!([c.region.offsets, c.region.sizes, c.file]))
                        .collect();
                    serde_json::json!([t.fqn, boxes])
                })
                .collect();
            let mut verbatim = Vec::with_capacity(layout.verbatim.len());
            for v in &layout.verbatim {
                verbatim.push(serde_json::json!([
                    v.fqn,
                    format!("{:?}", v.kind),
                    file_record(&v.source)?,
                    v.offset,
                    v.length,
                    v.file,
                ]));
            }
            let mut planner_paths: Vec<(&String, String)> = layout
                .planner_paths
                .iter()
                .map(|(k, p)| (k, format!("{p:?}")))
                .collect();
            planner_paths.sort();
            serde_json::json!({
                "chunks": chunks,
                "verbatim": verbatim,
                "planner_paths": planner_paths,
                "files": files,
            })
        }
    };
    let tensors: Vec<serde_json::Value> = plan
        .tensors
        .iter()
        .map(|t| {
            serde_json::json!([
                t.spec.name,
                dtype_name(t.spec.dtype),
                t.spec.shape,
                t.mode,
                t.sources
                    .iter()
                    .map(|s| dtype_name(s.dtype))
                    .collect::<Vec<_>>(),
            ])
        })
        .collect();
    let record = serde_json::json!({
        "schema": MANIFEST_SCHEMA,
        "parts": parts,
        "metadata": plan.metadata,
        "weights_bits": plan.weights.values.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
        "out_dtype": plan.config.out_dtype.map(|d| d.name()),
        "allow_nonfinite": plan.config.allow_nonfinite,
        "single_file": plan.single_file,
        "max_shard_bytes": plan.config.max_shard_bytes,
        "inputs": inputs,
        "tensors": tensors,
        "shards": plan.shards.iter().map(|(n, r)| serde_json::json!([n, r.start, r.end])).collect::<Vec<_>>(),
        "dcp": dcp,
    });
    let mut hasher = Sha256::new();
    hasher.update(record.to_string().as_bytes());
    Ok(hex(&hasher.finalize()))
}

/// An input file's path and what tells a changed one apart, for the plan hash: its size and
/// mtime, or for an object on a store (no mtime a writer controls) its size and entity tag, by
/// one HEAD.
fn file_record(path: &Path) -> Result<serde_json::Value> {
    if pma_format::is_url(path) {
        let info = pma_format::remote::head(path)?;
        return Ok(serde_json::json!([
            path.display().to_string(),
            info.n_bytes,
            info.e_tag
        ]));
    }
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, "reading metadata of", e))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(serde_json::json!([
        path.display().to_string(),
        meta.len(),
        mtime_ns.to_string()
    ]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One output file of a part, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name (an output shard's name).
    pub name: String,
    /// Size in bytes.
    pub n_bytes: u64,
    /// CRC-32 (IEEE) of its bytes.
    pub crc32: u32,
    /// Inode number once written (stable across the nodes of a shared filesystem, unlike the
    /// device number).
    pub inode: u64,
    /// Modification time once written, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The store's entity tag, for a part written to an object store (where inode and mtime
    /// are 0): a replaced object gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
}

/// How [`finalize`] checks each part file against its manifest entry (always: the plan hash,
/// the file list and every size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartCheck {
    /// Also inode and mtime: one `stat` per file. Catches every change made through the
    /// filesystem after the part wrote the file.
    #[default]
    Stamp,
    /// Also the CRC-32 of every byte, read back in parallel: catches silent corruption too, at
    /// the cost of reading the whole output.
    Contents,
}

/// What a part leaves for the finalize: `manifest.json` in its part directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartManifest {
    /// Layout version of this file.
    pub schema_version: u32,
    /// This part, 0-based.
    pub part: usize,
    /// Number of parts, K.
    pub parts: usize,
    /// [`Partition::plan_hash`] of the plan the part computed.
    pub plan_hash: String,
    /// The files it wrote.
    pub files: Vec<ManifestFile>,
}

/// What one part reports.
#[derive(Debug, Clone, Serialize)]
pub struct PartReport {
    /// This part, 0-based.
    pub part: usize,
    /// Number of parts.
    pub parts: usize,
    /// The part's directory (inside [`parts_dir`]).
    pub dir: PathBuf,
    /// Files written, with sizes and checksums.
    pub files: Vec<ManifestFile>,
    /// The plan hash every part and the finalize must share.
    pub plan_hash: String,
    /// The plan's shard size limit; lowered from the requested one when the plan had fewer
    /// shards than parts (a single-process merge with this `--max-shard-size` is identical).
    pub max_shard_bytes: u64,
    /// Whether the shards were cut smaller so every part has work.
    pub resharded: bool,
    /// Output files of the whole merge, all parts together (fewer than the parts for a DCP
    /// output with fewer `.distcp` files: the parts beyond them write none).
    pub output_files: usize,
    /// Tensor bytes read.
    pub bytes_read: u64,
    /// Wall time, in seconds.
    pub elapsed_secs: f64,
    /// NaN/Inf found with `allow_nonfinite`.
    pub warnings: Vec<crate::NonFiniteWarning>,
}

/// What the finalize reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinalizeReport {
    /// The plan that was executed (by the parts).
    pub plan: PlanSummary,
    /// Number of parts found.
    pub parts: usize,
    /// Where the output now is.
    pub output: PathBuf,
    /// Sidecar files copied from the newest checkpoint (for a DCP output, its kept state
    /// files).
    pub sidecars: Vec<String>,
    /// Wall time of the finalize, in seconds.
    pub elapsed_secs: f64,
}

/// Runs part `part` of `parts` of `plan` for output `out`: writes its output files (HF shards or
/// DCP `.distcp` files) and manifest into its directory under [`parts_dir`]`(out)`, replacing a
/// previous attempt atomically.
pub fn execute_part(
    plan: &mut MergePlan,
    part: usize,
    parts: usize,
    out: &Path,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<PartReport> {
    let started = std::time::Instant::now();
    let pdir = parts_dir(out);
    crate::placement::check_plan_output(plan, out)?;
    crate::placement::check_plan_output(plan, &pdir)?;
    if part >= parts {
        return Err(Error::PartOutOfRange { part, parts });
    }
    // Fail before computing anything when the finalize could not publish.
    if !opts.overwrite && pma_format::writer::output_occupied(out) {
        return Err(pma_format::Error::OutputExists { path: out.into() }.into());
    }
    let partition = Partition::new(plan, parts)?;
    create_dir_all_synced(&pdir)?;
    let staged = StagedOutput::create(
        &pdir.join(part_dir_name(part, parts)),
        OutputKind::Dir,
        Publish::Replace,
    )?;
    // Each file with the CRC-32 of the bytes that went into it, computed on their way to the
    // writer: a part never reads its output back (written with `O_DIRECT`, it is not cached).
    let (written, report): (Vec<(PathBuf, u32)>, _) = match &partition.dcp {
        Some(layout) => {
            let names: Vec<String> = partition
                .names_of(part)
                .into_iter()
                .map(String::from)
                .collect();
            let (report, summary) =
                write_dcp_files(plan, layout.clone(), staged.path(), &names, opts, progress)?;
            let written = summary
                .files
                .iter()
                .zip(summary.checksums)
                .map(|((name, _), crc)| (staged.path().join(name), crc))
                .collect();
            (written, report)
        }
        None => {
            let files = shard_files_of(plan, &partition, part, staged.path());
            let paths: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
            let mut crcs = ChecksumSink::new(plan, &files);
            let report = write_shard_files(plan, files, false, &mut crcs, opts, progress)?;
            let crcs = crcs.hashers.into_iter().map(crc32fast::Hasher::finalize);
            (paths.into_iter().zip(crcs).collect(), report)
        }
    };
    let mut manifest_files = Vec::with_capacity(written.len());
    for (path, crc32) in &written {
        // The writers fsync'd the files: this stamp is the durable one.
        let stamp = file_stamp(path)?;
        manifest_files.push(ManifestFile {
            name: file_name(path),
            n_bytes: stamp.n_bytes,
            crc32: *crc32,
            inode: stamp.ino,
            mtime_ns: mtime_ns(&stamp),
            e_tag: None,
        });
    }
    let manifest = PartManifest {
        schema_version: MANIFEST_SCHEMA,
        part,
        parts,
        plan_hash: partition.plan_hash.clone(),
        files: manifest_files,
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    pma_format::write_file_synced(&staged.path().join(MANIFEST_FILE_NAME), &text)?;
    staged.commit()?;
    Ok(PartReport {
        part,
        parts,
        dir: pdir.join(part_dir_name(part, parts)),
        files: manifest.files,
        plan_hash: partition.plan_hash,
        max_shard_bytes: plan.config.max_shard_bytes,
        resharded: partition.resharded,
        output_files: partition.files.len(),
        bytes_read: report.read_bytes,
        elapsed_secs: started.elapsed().as_secs_f64(),
        warnings: report.warnings,
    })
}

/// Checks the parts written for `out` against `plan` and publishes the output (see the module
/// docs). Any missing, stale or corrupted part (as `check` sees it) fails with an error naming
/// it, and nothing is published.
pub fn finalize(
    plan: &mut MergePlan,
    out: &Path,
    opts: &ExecOptions<'_>,
    check: PartCheck,
) -> Result<FinalizeReport> {
    let started = std::time::Instant::now();
    let pdir = parts_dir(out);
    crate::placement::check_plan_output(plan, out)?;
    let publish = Publish::overwrite_if(opts.overwrite);
    if publish == Publish::Create && pma_format::writer::output_occupied(out) {
        return Err(pma_format::Error::OutputExists { path: out.into() }.into());
    }
    let manifests = read_manifests(&pdir)?;
    let parts = part_count(&manifests, &pdir)?;
    let partition = Partition::new(plan, parts)?;
    let mut to_verify: Vec<(PathBuf, u32)> = Vec::new();
    for part in 0..parts {
        let dir = pdir.join(part_dir_name(part, parts));
        let manifest = checked_manifest(&manifests, &partition, &pdir, part)?;
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let stamp = file_stamp(&path).map_err(|e| Error::PartCorrupt {
                path: path.clone(),
                reason: format!("cannot be read: {e}"),
            })?;
            if stamp.n_bytes != f.n_bytes {
                return Err(Error::PartCorrupt {
                    path,
                    reason: format!(
                        "is {} bytes but its manifest says {}",
                        stamp.n_bytes, f.n_bytes
                    ),
                });
            }
            if (stamp.ino, mtime_ns(&stamp)) != (f.inode, f.mtime_ns) {
                return Err(Error::PartCorrupt {
                    path,
                    reason: format!(
                        "was changed after its part wrote it (inode {}, mtime {} ns; its \
                         manifest says inode {}, mtime {} ns)",
                        stamp.ino,
                        mtime_ns(&stamp),
                        f.inode,
                        f.mtime_ns
                    ),
                });
            }
            if check == PartCheck::Contents {
                to_verify.push((path, f.crc32));
            }
        }
    }
    verify_crcs(&to_verify, |path| checksum(path).map(|(_, crc32)| crc32))?;

    let kind = if plan.single_file && partition.dcp.is_none() {
        OutputKind::File
    } else {
        OutputKind::Dir
    };
    let staged = StagedOutput::create(out, kind, publish)?;
    for part in 0..parts {
        let dir = pdir.join(part_dir_name(part, parts));
        for name in partition.names_of(part) {
            let dst = if kind == OutputKind::File {
                staged.path().to_path_buf()
            } else {
                staged.path().join(name)
            };
            // A link, not a move: if publishing fails, the parts are still there for a retry.
            link_or_copy(&dir.join(name), &dst)?;
        }
    }
    let mut sidecars = Vec::new();
    let mut summary = plan.summary(opts.threads.max(1));
    if let Some(layout) = &partition.dcp {
        // `.metadata` is a function of the layout alone: the single-process merge's.
        let writer = DcpWriter::create(staged.path(), layout.clone())?;
        let metadata_bytes = writer.write_metadata_only()?;
        let state_files = crate::dcp_output::state_files(plan)?;
        sidecars = crate::dcp_output::copy_state_files(&state_files, staged.path())?;
        let mut n_bytes = metadata_bytes + partition.files.iter().map(|(_, n)| n).sum::<u64>();
        for name in &sidecars {
            n_bytes += file_stamp(&staged.path().join(name))?.n_bytes;
        }
        summary.bytes_written = n_bytes;
    } else if !plan.single_file {
        if plan.shards.len() > 1 {
            pma_format::write_index(staged.path(), &plan.index_listing())?;
        }
        let newest = &plan.inputs[plan.inputs.len() - 1];
        sidecars = copy_sidecars(newest.store(), plan.config.out_dtype, staged.path())?.copied;
    }
    staged.commit()?;
    // The output is published; the parts are no longer needed. A failure here leaves only a
    // hidden directory behind, not a wrong output.
    let _ = std::fs::remove_dir_all(&pdir);
    Ok(FinalizeReport {
        plan: summary,
        parts,
        output: out.to_path_buf(),
        sidecars,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// The CRC-32 of each of a part's files, computed from the bytes on their way to the file
/// writer (each file's header first, then its tensors in write order, as the writer lays them
/// out), so a part never reads its output back (written with `O_DIRECT`, it is not cached).
pub(crate) struct ChecksumSink {
    /// File of each output tensor; `None` for tensors of other parts.
    file_of: Vec<Option<usize>>,
    pub(crate) hashers: Vec<crc32fast::Hasher>,
}

impl ChecksumSink {
    pub(crate) fn new(plan: &MergePlan, files: &[ShardFile]) -> ChecksumSink {
        let mut file_of = vec![None; plan.tensors.len()];
        let hashers = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let specs: Vec<TensorSpec> = f.tensors.iter().map(|(_, s)| s.clone()).collect();
                for (t, _) in &f.tensors {
                    file_of[*t] = Some(i);
                }
                let mut h = crc32fast::Hasher::new();
                h.update(&pma_format::encode_header(&specs, &plan.metadata));
                h
            })
            .collect();
        ChecksumSink { file_of, hashers }
    }
}

impl Sink for &mut ChecksumSink {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        if let Some(Some(f)) = self.file_of.get(job.tensor) {
            self.hashers[*f].update(&outputs[0]);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Checks each file of `files` against its manifest CRC-32, as `crc_of` computes it. Reading
/// the whole output back is the finalize's main cost, so files are read in parallel (a parallel
/// filesystem or an object store serves several readers faster than one); the first bad file
/// in part order is reported.
pub(crate) fn verify_crcs(
    files: &[(PathBuf, u32)],
    crc_of: impl Fn(&Path) -> Result<u32> + Sync,
) -> Result<()> {
    let verified: Vec<Result<()>> = files
        .par_iter()
        .map(|(path, expected)| {
            let crc32 = crc_of(path).map_err(|e| Error::PartCorrupt {
                path: path.clone(),
                reason: format!("cannot be read: {e}"),
            })?;
            if crc32 != *expected {
                return Err(Error::PartCorrupt {
                    path: path.clone(),
                    reason: format!("has CRC-32 {crc32:08x} but its manifest says {expected:08x}"),
                });
            }
            Ok(())
        })
        .collect();
    verified.into_iter().collect()
}

/// Every part manifest under `pdir`, by (part, parts). Hidden entries (a part's staging path)
/// are skipped.
fn read_manifests(pdir: &Path) -> Result<BTreeMap<(usize, usize), PartManifest>> {
    let no_parts = || Error::NoParts { dir: pdir.into() };
    let entries = std::fs::read_dir(pdir).map_err(|_| no_parts())?;
    let mut manifests = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(pdir, "listing", e))?;
        let name = entry.file_name();
        let Some((part, parts)) = name.to_str().and_then(parse_part_dir_name) else {
            continue;
        };
        let path = entry.path().join(MANIFEST_FILE_NAME);
        let text = std::fs::read(&path).map_err(|e| Error::PartCorrupt {
            path: path.clone(),
            reason: format!("cannot be read: {e}"),
        })?;
        manifests.insert((part, parts), parse_manifest(&path, &text, part, parts)?);
    }
    if manifests.is_empty() {
        return Err(no_parts());
    }
    Ok(manifests)
}

/// The manifest `text` read from `path`, in the directory of part `part` of `parts`.
pub(crate) fn parse_manifest(
    path: &Path,
    text: &[u8],
    part: usize,
    parts: usize,
) -> Result<PartManifest> {
    let manifest: PartManifest = serde_json::from_slice(text).map_err(|e| Error::PartCorrupt {
        path: path.into(),
        reason: format!("is not a part manifest: {e}"),
    })?;
    if manifest.schema_version != MANIFEST_SCHEMA
        || (manifest.part, manifest.parts) != (part, parts)
    {
        return Err(Error::PartCorrupt {
            path: path.into(),
            reason: format!(
                "records part {} of {} (schema {}) but sits in {}",
                manifest.part,
                manifest.parts,
                manifest.schema_version,
                part_dir_name(part, parts)
            ),
        });
    }
    Ok(manifest)
}

/// K, as the manifests found in `pdir` agree on it.
pub(crate) fn part_count(
    manifests: &BTreeMap<(usize, usize), PartManifest>,
    pdir: &Path,
) -> Result<usize> {
    let counts: BTreeSet<usize> = manifests.keys().map(|&(_, k)| k).collect();
    if counts.len() > 1 {
        return Err(Error::PartCountsDisagree {
            dir: pdir.into(),
            counts: counts.into_iter().collect(),
        });
    }
    Ok(counts.into_iter().next().unwrap_or(0))
}

/// The manifest of `part`, checked against the partition: present, made from the same plan,
/// and listing exactly the files the plan gives that part. The files themselves are checked
/// by the caller, which knows where they are.
pub(crate) fn checked_manifest<'a>(
    manifests: &'a BTreeMap<(usize, usize), PartManifest>,
    partition: &Partition,
    pdir: &Path,
    part: usize,
) -> Result<&'a PartManifest> {
    let parts = partition.parts;
    let path = pdir
        .join(part_dir_name(part, parts))
        .join(MANIFEST_FILE_NAME);
    let Some(manifest) = manifests.get(&(part, parts)) else {
        return Err(Error::PartMissing {
            dir: pdir.into(),
            part,
            parts,
        });
    };
    if manifest.plan_hash != partition.plan_hash {
        return Err(Error::PartStale { path, part, parts });
    }
    let expected = partition.names_of(part);
    let found: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if expected != found {
        return Err(Error::PartCorrupt {
            path,
            reason: format!("lists files {found:?} but the plan gives this part {expected:?}"),
        });
    }
    Ok(manifest)
}

fn file_stamp(path: &Path) -> Result<pma_format::FileStamp> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, "reading metadata of", e))?;
    Ok(pma_format::FileStamp::of(&meta))
}

/// The stamp's mtime as JSON carries it (an i64 of nanoseconds lasts until the year 2262).
fn mtime_ns(stamp: &pma_format::FileStamp) -> i64 {
    i64::try_from(stamp.mtime_ns).unwrap_or(i64::MAX)
}

/// Size and CRC-32 of a file, read in 1 MiB blocks.
fn checksum(path: &Path) -> Result<(u64, u32)> {
    let mut f = std::fs::File::open(path).map_err(|e| io_error(path, "opening", e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_error(path, "reading", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        n_bytes += n as u64;
    }
    Ok((n_bytes, hasher.finalize()))
}

/// Hard-links `src` to `dst` (same directory tree, no bytes copied); copies and fsyncs where
/// the filesystem has no hard links.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(|e| io_error(dst, "copying into", e))?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(dst, "syncing", e))?;
    Ok(())
}

pub(crate) fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> Error {
    pma_format::Error::Io {
        path: path.into(),
        action,
        source,
    }
    .into()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{MergeConfig, MergeInput};
    use crate::weights::WeightSpec;
    use pma_format::{AnyCheckpoint, Dtype};

    /// Two checkpoints of f32 tensors with these element counts, planned with SMA.
    fn plan(dir: &Path, numels: &[u64], max_shard_bytes: u64, bf16_out: bool) -> MergePlan {
        std::fs::create_dir_all(dir).unwrap();
        let inputs = (0..2)
            .map(|i| {
                let path = dir.join(format!("ckpt-{i}.safetensors"));
                let data: Vec<Vec<u8>> = numels
                    .iter()
                    .map(|&n| 1f32.to_le_bytes().repeat(n as usize))
                    .collect();
                let names: Vec<String> =
                    (0..numels.len()).map(|t| format!("t{t}.weight")).collect();
                let specs: Vec<(TensorSpec, &[u8])> = numels
                    .iter()
                    .zip(&data)
                    .zip(&names)
                    .map(|((&n, d), name)| {
                        let spec = TensorSpec {
                            name: name.clone(),
                            dtype: Dtype::F32,
                            shape: vec![n],
                        };
                        (spec, d.as_slice())
                    })
                    .collect();
                pma_format::write_safetensors(&path, &specs, &BTreeMap::new()).unwrap();
                MergeInput {
                    step: Some(i),
                    checkpoint: AnyCheckpoint::open(&path).unwrap(),
                }
            })
            .collect();
        let config = MergeConfig {
            max_shard_bytes,
            out_dtype: bf16_out.then_some(pma_format::FloatDtype::BF16),
            ..Default::default()
        };
        MergePlan::build(inputs, WeightSpec::Sma.weights(2).unwrap(), config).unwrap()
    }

    #[test]
    fn shards_go_to_the_lightest_part_largest_first() {
        let d = tempfile::tempdir().unwrap();
        // Shards of 400, 100, 300, 200 elements (one tensor each at 1000 bytes max).
        let mut p = plan(d.path(), &[400, 100, 300, 200], 1000, false);
        assert_eq!(p.shards.len(), 4);
        let part = Partition::new(&mut p, 2).unwrap();
        // 400 → part 0, 300 → part 1, 200 → part 1, 100 → part 0: 500 elements each.
        assert_eq!(part.shards_of, vec![vec![0, 1], vec![2, 3]]);
        assert!(!part.resharded);
        // Equal tensor bytes; only the headers' offset digits differ.
        assert!(part.part_bytes[0].abs_diff(part.part_bytes[1]) < 16);
        // Deterministic: the same plan gives the same partition and hash.
        let again = Partition::new(&mut p, 2).unwrap();
        assert_eq!(part, again);
        // K is part of the hash.
        assert_ne!(Partition::new(&mut p, 3).unwrap().plan_hash, part.plan_hash);
        // More parts than shards: the extra part is empty, not an error.
        let five = Partition::new(&mut p, 5).unwrap();
        assert_eq!(five.shards_of.iter().filter(|s| s.is_empty()).count(), 1);
    }

    #[test]
    fn fewer_shards_than_parts_are_cut_smaller() {
        let d = tempfile::tempdir().unwrap();
        let mut p = plan(d.path(), &[100, 100, 100, 100, 100, 100], u64::MAX, false);
        assert_eq!(p.shards.len(), 1);
        let part = Partition::new(&mut p, 3).unwrap();
        assert!(part.resharded);
        assert_eq!(p.config.max_shard_bytes, 800); // 2400 bytes / 3
        assert_eq!(p.shards.len(), 3);
        assert!(part.shards_of.iter().all(|s| s.len() == 1));
        assert!(matches!(
            Partition::new(&mut p, 0),
            Err(Error::InvalidPartCount { parts: 0, .. })
        ));
    }

    #[test]
    fn the_hash_tells_plans_apart() {
        let d = tempfile::tempdir().unwrap();
        let mut a = plan(&d.path().join("a"), &[10, 20], 1000, false);
        let mut b = plan(&d.path().join("b"), &[10, 20], 1000, false);
        let mut c = plan(&d.path().join("c"), &[10, 20], 1000, true);
        assert_ne!(
            Partition::new(&mut a, 1).unwrap().plan_hash,
            Partition::new(&mut b, 1).unwrap().plan_hash,
            "other input paths"
        );
        assert_ne!(
            Partition::new(&mut b, 1).unwrap().plan_hash,
            Partition::new(&mut c, 1).unwrap().plan_hash,
            "another output dtype"
        );
    }

    /// The SMA plan of DCP fixture `run` (a DCP output by default).
    fn dcp_plan(run: &str, keep_state: bool) -> MergePlan {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures/dcp")
            .join(run);
        let series = crate::CheckpointSeries::discover(&dir).unwrap();
        let (inputs, _) = crate::Selection::default()
            .select(&series, true)
            .unwrap()
            .into_inputs();
        let config = MergeConfig {
            keys: crate::KeySelectionConfig {
                keep_state_newest: keep_state,
                ..Default::default()
            },
            ..Default::default()
        };
        MergePlan::build(inputs, WeightSpec::Sma.weights(4).unwrap(), config).unwrap()
    }

    #[test]
    fn dcp_outputs_split_by_distcp_file_and_are_never_cut() {
        let mut p = dcp_plan("run-resharded", false);
        let part = Partition::new(&mut p, 2).unwrap();
        let names: Vec<&str> = part.files.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "__0_0.distcp",
                "__1_0.distcp",
                "__2_0.distcp",
                "__3_0.distcp"
            ]
        );
        assert_eq!(part.shards_of.iter().map(Vec::len).sum::<usize>(), 4);
        assert!(part.shards_of.iter().all(|s| s.len() == 2));
        assert!(!part.resharded);
        let layout = part.dcp.as_ref().unwrap();
        assert_eq!(layout.planned_files().unwrap(), part.files);
        assert_eq!(Partition::new(&mut p, 2).unwrap(), part, "deterministic");
        // More parts than files: the extra ones are empty, the files stay whole.
        let six = Partition::new(&mut p, 6).unwrap();
        assert_eq!(six.files, part.files);
        assert_eq!(six.shards_of.iter().filter(|s| s.is_empty()).count(), 2);
        // Kept state changes the layout (verbatim items), and so the hash.
        let mut kept = dcp_plan("run-resharded", true);
        assert_ne!(
            Partition::new(&mut kept, 2).unwrap().plan_hash,
            part.plan_hash
        );
    }

    #[test]
    fn part_dir_names_round_trip() {
        assert_eq!(parse_part_dir_name(&part_dir_name(3, 16)), Some((3, 16)));
        assert_eq!(parse_part_dir_name("part-x-of-4"), None);
        assert_eq!(parse_part_dir_name(".part-1-of-4.pma-tmp-h-1-2"), None);
        assert_eq!(
            parts_dir(Path::new("/a/merged")),
            Path::new("/a/.merged.pma-parts")
        );
        assert_eq!(parts_dir(Path::new("m")), Path::new("./.m.pma-parts"));
    }
}
