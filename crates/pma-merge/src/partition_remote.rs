//! Partitioned merges whose output is on an object store (`--out s3://...`): the parts and the
//! finalize of [`crate::partition`], with objects where that module has files.
//!
//! The plan, the partition, the manifests and their checks are the shared-filesystem ones; what
//! changes is where the bytes go, and what can stand in for a rename:
//! - part I streams its shards into multipart uploads under the parts prefix beside OUT
//!   (`.NAME.pma-parts/part-I-of-K/`, [`parts_dir`]), each object visible only once complete,
//!   and puts its `manifest.json` last. A retried part first deletes what an earlier attempt
//!   left under its prefix, manifest included, so an attempt killed midway leaves the part
//!   missing, never an old manifest over other bytes.
//! - a manifest records each object's size and entity tag (an object has no inode or mtime);
//!   the finalize HEADs every object and refuses one that was replaced ([`PartCheck::Stamp`]),
//!   or reads each back against its CRC-32 ([`PartCheck::Contents`]).
//! - the finalize publishes through a [`Publication`]: the sidecars first, then the shards,
//!   copied server-side from the parts prefix (no bytes through the finalize, several at once),
//!   then the index last, as the commit. An old output (`--overwrite`) stays loadable until
//!   then. The parts prefix is deleted once the output is published.
//!
//! S3 copies at most 5 GiB in one request, so a part refuses a shard larger than that before
//! it reads anything (`--max-shard-size` keeps shards below it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pma_format::remote::{self, Publication};

use crate::error::{Error, Result};
use crate::executor::{copy_sidecars, write_shard_files, ExecOptions};
use crate::partition::{
    checked_manifest, parse_manifest, parse_part_dir_name, part_count, part_dir_name, parts_dir,
    shard_files_of, verify_crcs, ChecksumSink, FinalizeReport, ManifestFile, PartCheck,
    PartManifest, PartReport, Partition, MANIFEST_FILE_NAME, MANIFEST_SCHEMA,
};
use crate::plan::{MergePlan, OutputFormat};
use crate::progress::Progress;

/// The largest manifest read back (a part of a 100B model lists a few hundred files).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Runs part `part` of `parts` of `plan` for `out`, an object-store URL: uploads its shards
/// and then its manifest under [`parts_dir`]`(out)` (see the module docs).
pub fn execute_part_to_store(
    plan: &mut MergePlan,
    part: usize,
    parts: usize,
    out: &Path,
    opts: &ExecOptions<'_>,
    progress: &dyn Progress,
) -> Result<PartReport> {
    let started = std::time::Instant::now();
    let pdir = checked_parts_dir(out, plan)?;
    crate::placement::check_plan_output(plan, out)?;
    crate::placement::check_plan_output(plan, &pdir)?;
    if part >= parts {
        return Err(Error::PartOutOfRange { part, parts });
    }
    // Fail before computing anything when the finalize could not publish.
    remote::check_output_absent(out, opts.overwrite)?;
    let partition = Partition::new(plan, parts)?;
    let dir = pdir.join(part_dir_name(part, parts));
    if let Some(max_bytes) = remote::max_copy_bytes(out) {
        for &i in &partition.shards_of[part] {
            let (name, n_bytes) = &partition.files[i];
            if *n_bytes > max_bytes {
                return Err(pma_format::Error::RemoteCopyTooLarge {
                    url: dir.join(name).display().to_string(),
                    n_bytes: *n_bytes,
                    max_bytes,
                }
                .into());
            }
        }
    }
    remote::remove_prefix(&dir)?;
    let files = shard_files_of(plan, &partition, part, &dir);
    let names: Vec<String> = partition
        .names_of(part)
        .into_iter()
        .map(String::from)
        .collect();
    let mut crcs = ChecksumSink::new(plan, &files);
    let report = write_shard_files(plan, files, false, &mut crcs, opts, progress)?;
    let mut manifest_files = Vec::with_capacity(names.len());
    for (name, hasher) in names.into_iter().zip(crcs.hashers) {
        // Complete uploads only: the entity tag is that of the bytes the finalize will copy.
        let info = remote::head(&dir.join(&name))?;
        manifest_files.push(ManifestFile {
            name,
            n_bytes: info.n_bytes,
            crc32: hasher.finalize(),
            inode: 0,
            mtime_ns: 0,
            e_tag: info.e_tag,
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
    let mut writer = remote::ObjectWriter::create(&dir.join(MANIFEST_FILE_NAME))?;
    writer.write(&text)?;
    writer.finish()?;
    Ok(PartReport {
        part,
        parts,
        dir,
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

/// Checks the parts uploaded for `out`, an object-store URL, against `plan` and publishes the
/// output (see the module docs). `staging` is a local folder the caller owns and removes, for
/// the sidecars and the index on their way up. Any missing, stale or changed part fails with
/// an error naming it, and nothing is published.
pub fn finalize_to_store(
    plan: &mut MergePlan,
    out: &Path,
    staging: &Path,
    opts: &ExecOptions<'_>,
    check: PartCheck,
) -> Result<FinalizeReport> {
    let started = std::time::Instant::now();
    let pdir = checked_parts_dir(out, plan)?;
    crate::placement::check_plan_output(plan, out)?;
    remote::check_output_absent(out, opts.overwrite)?;
    let manifests = read_manifests(&pdir)?;
    let parts = part_count(&manifests, &pdir)?;
    let partition = Partition::new(plan, parts)?;
    // (object in the parts prefix, its name in the output), in part order.
    let mut objects: Vec<(PathBuf, String)> = Vec::new();
    let mut to_verify: Vec<(PathBuf, u32)> = Vec::new();
    for part in 0..parts {
        let dir = pdir.join(part_dir_name(part, parts));
        let manifest = checked_manifest(&manifests, &partition, &pdir, part)?;
        for f in &manifest.files {
            let url = dir.join(&f.name);
            let info = remote::head(&url).map_err(|e| Error::PartCorrupt {
                path: url.clone(),
                reason: format!("cannot be read: {e}"),
            })?;
            if info.n_bytes != f.n_bytes {
                return Err(Error::PartCorrupt {
                    path: url,
                    reason: format!(
                        "is {} bytes but its manifest says {}",
                        info.n_bytes, f.n_bytes
                    ),
                });
            }
            if info.e_tag != f.e_tag {
                return Err(Error::PartCorrupt {
                    path: url,
                    reason: format!(
                        "was replaced after its part wrote it (entity tag {:?}; its manifest \
                         says {:?})",
                        info.e_tag, f.e_tag
                    ),
                });
            }
            if check == PartCheck::Contents {
                to_verify.push((url.clone(), f.crc32));
            }
            objects.push((url, f.name.clone()));
        }
    }
    verify_crcs(&to_verify, |url| {
        let mut hasher = Crc32Writer(crc32fast::Hasher::new());
        remote::download(url, None, &mut hasher)?;
        Ok(hasher.0.finalize())
    })?;

    let mut sidecars = Vec::new();
    if plan.single_file {
        // One object at OUT itself: the copy replaces an old one whole.
        remote::copy_object(&objects[0].0, out)?;
    } else {
        let newest = &plan.inputs[plan.inputs.len() - 1];
        sidecars = copy_sidecars(newest.store(), plan.config.out_dtype, staging)?.copied;
        let index = pma_format::checkpoint::INDEX_FILE_NAME;
        let mut names: Vec<String> = plan.shards.iter().map(|(n, _)| n.clone()).collect();
        if plan.shards.len() > 1 {
            pma_format::write_index(staging, &plan.index_listing())?;
            names.push(index.to_string());
        }
        names.extend(sidecars.iter().map(|s| s.trim_end_matches('/').to_string()));
        let mut publication = Publication::begin(out, opts.overwrite, &names)?;
        let published = publication
            .upload_dir(staging)
            .and_then(|()| publication.copy_in(&objects))
            .and_then(|()| match plan.shards.len() > 1 {
                true => publication.upload(&staging.join(index), index),
                false => Ok(()),
            });
        match published {
            Ok(()) => {
                publication.commit()?;
            }
            Err(e) => {
                publication.discard(&[]);
                return Err(e.into());
            }
        }
    }
    // The output is published; the parts are no longer needed. A failure here leaves only a
    // hidden prefix behind, not a wrong output.
    let _ = remote::remove_prefix(&pdir);
    Ok(FinalizeReport {
        plan: plan.summary(opts.threads.max(1)),
        parts,
        output: out.to_path_buf(),
        sidecars,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// [`parts_dir`] of an output URL, which must lie below a bucket (the parts go beside it), for
/// an HF output.
fn checked_parts_dir(out: &Path, plan: &MergePlan) -> Result<PathBuf> {
    let text = out.to_string_lossy();
    if plan.output_format() == OutputFormat::Dcp {
        // A DCP part writes through the DCP writer into a local directory; a DCP output goes
        // to a store whole, staged locally (crate docs of pma_format::remote).
        return Err(pma_format::Error::RemoteUnsupported {
            url: text.into_owned(),
            reason: "a partitioned merge to an object store writes HF safetensors; partition a \
                     DCP output on a shared filesystem, or run one merge to the store"
                .into(),
        }
        .into());
    }
    let below_bucket = text
        .split_once("://")
        .and_then(|(_, rest)| rest.trim_end_matches('/').split_once('/'))
        .is_some_and(|(_, key)| !key.is_empty());
    if !below_bucket {
        return Err(pma_format::Error::RemoteUnsupported {
            url: text.into_owned(),
            reason: "a partitioned merge stages its parts beside --out, so --out must be a \
                     prefix inside the bucket, not the bucket itself"
                .into(),
        }
        .into());
    }
    Ok(parts_dir(out))
}

/// Every part manifest under the prefix `pdir`, by (part, parts). A part folder without a
/// manifest (a part still running, or killed) is left out: the finalize calls it missing.
fn read_manifests(pdir: &Path) -> Result<BTreeMap<(usize, usize), PartManifest>> {
    let no_parts = || Error::NoParts { dir: pdir.into() };
    let entries = remote::list_dir(pdir).map_err(|_| no_parts())?;
    let mut manifests = BTreeMap::new();
    for entry in entries {
        let Some((part, parts)) = parse_part_dir_name(&entry.name) else {
            continue;
        };
        let url = entry.path.join(MANIFEST_FILE_NAME);
        if !remote::probe_file(&url)? {
            continue;
        }
        let text =
            remote::read_bounded(&url, MAX_MANIFEST_BYTES)?.ok_or_else(|| Error::PartCorrupt {
                path: url.clone(),
                reason: format!("is larger than {MAX_MANIFEST_BYTES} bytes"),
            })?;
        manifests.insert((part, parts), parse_manifest(&url, &text, part, parts)?);
    }
    if manifests.is_empty() {
        return Err(no_parts());
    }
    Ok(manifests)
}

/// Feeds the bytes written to it into a CRC-32.
struct Crc32Writer(crc32fast::Hasher);

impl std::io::Write for Crc32Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
