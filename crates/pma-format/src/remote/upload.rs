//! Publishing a finished local output to an object store.
//!
//! An object store has no rename, so the local staging-then-rename commit becomes an ordering:
//! every shard and sidecar is uploaded first (each file larger than one part as a multipart
//! upload, which the store makes visible only when it completes, and aborts on error), and the
//! file that makes the checkpoint loadable goes **last**: `model.safetensors.index.json` for a
//! sharded output, `model.safetensors` for a single-file directory, `.metadata` for DCP. A
//! reader that checks for that file never sees a half-written checkpoint, and an upload that
//! crashes leaves no commit file. A single-file output (`out.safetensors`) is one object and
//! appears whole or not at all.
//!
//! With `overwrite`, the old commit file is deleted before anything else (the old output stops
//! being loadable), the new files replace the old ones, objects of the old output that the new
//! one lacks are deleted, and the new commit file is uploaded last.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use object_store::{PutPayload, WriteMultipart};

use super::{block_on, store_error, Location, ObjectStoreExt};
use crate::checkpoint::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::error::{Error, Result};

/// Environment variable that sets the multipart part size in bytes (at least 5 MiB on S3).
pub const PART_BYTES_ENV: &str = "PMA_S3_PART_BYTES";
/// Multipart part size when [`PART_BYTES_ENV`] is unset.
pub const DEFAULT_PART_BYTES: usize = 16 << 20;
/// Parts of one upload in flight at once (their buffers are the upload's memory).
const PARTS_IN_FLIGHT: usize = 4;
/// The files that make an output loadable, uploaded last, in this order of preference.
const COMMIT_FILES: &[&str] = &[INDEX_FILE_NAME, SINGLE_FILE_NAME, ".metadata"];

/// What [`publish`] uploaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Files uploaded, as paths relative to the output, the commit file last.
    pub uploaded: Vec<String>,
    /// Of those, the ones sent as multipart uploads.
    pub multipart: Vec<String>,
    /// Objects of an overwritten output that the new one lacks, deleted.
    pub deleted: Vec<String>,
    /// Bytes uploaded.
    pub n_bytes: u64,
}

fn part_bytes() -> usize {
    std::env::var(PART_BYTES_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_PART_BYTES)
}

/// The objects already at `url` (the object itself, or anything under it as a prefix).
fn existing(location: &Location) -> Result<Vec<String>> {
    let mut found = Vec::new();
    match block_on(location.store.head(&location.key)) {
        Ok(_) => found.push(String::new()),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store_error(&location.url, "reading", &e)),
    }
    let prefix = location.key.clone();
    block_on(async {
        let mut stream = location.store.list(Some(&prefix));
        while let Some(meta) = stream.try_next().await? {
            if let Some(parts) = meta.location.prefix_match(&prefix) {
                let rel: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
                found.push(rel.join("/"));
            }
        }
        Ok::<_, object_store::Error>(())
    })
    .map_err(|e| store_error(&location.url, "listing", &e))?;
    Ok(found)
}

/// Refuses an output URL that already holds an object or objects under it, unless
/// `overwrite`. Merges call it before reading anything, so a refused output costs nothing.
pub fn check_output_absent(url: &Path, overwrite: bool) -> Result<()> {
    let location = Location::parse(url)?;
    if !overwrite && !existing(&location)?.is_empty() {
        return Err(Error::RemoteOutputExists { url: location.url });
    }
    Ok(())
}

/// Uploads the finished local output `local` (a file or a directory) to `url`, the commit file
/// last (see the module docs). Refuses an existing output unless `overwrite`.
pub fn publish(local: &Path, url: &Path, overwrite: bool) -> Result<PublishReport> {
    let location = Location::parse(url)?;
    let old = existing(&location)?;
    if !old.is_empty() && !overwrite {
        return Err(Error::RemoteOutputExists { url: location.url });
    }
    let mut report = PublishReport::default();
    if local.is_file() {
        upload_file(local, &location, "", &mut report)?;
        return Ok(report);
    }
    let mut files = Vec::new();
    collect_files(local, Path::new(""), &mut files)?;
    let commit = COMMIT_FILES
        .iter()
        .find(|c| files.iter().any(|f| f == *c))
        .map(|c| c.to_string());
    // The old output stops being loadable before any of its files changes.
    for c in COMMIT_FILES {
        if old.iter().any(|o| o == c) {
            delete(&location.child(c))?;
        }
    }
    for rel in files.iter().filter(|f| Some(*f) != commit.as_ref()) {
        upload_file(&local.join(rel), &location.child(rel), rel, &mut report)?;
    }
    let new: BTreeSet<&String> = files.iter().collect();
    for rel in old.iter().filter(|o| !o.is_empty() && !new.contains(o)) {
        if !COMMIT_FILES.contains(&rel.as_str()) {
            delete(&location.child(rel))?;
        }
        report.deleted.push(rel.clone());
    }
    if let Some(rel) = &commit {
        upload_file(&local.join(rel), &location.child(rel), rel, &mut report)?;
    }
    Ok(report)
}

fn delete(location: &Location) -> Result<()> {
    match block_on(location.store.delete(&location.key)) {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_error(&location.url, "deleting", &e)),
    }
}

fn collect_files(root: &Path, rel: &Path, out: &mut Vec<String>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, "listing", e))?
        .map(|e| e.map(|e| rel.join(e.file_name())))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(&dir, "listing", e))?;
    names.sort();
    for name in names {
        let path = root.join(&name);
        if path.is_dir() {
            collect_files(root, &name, out)?;
        } else {
            out.push(name.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// Uploads one file: a single PUT when it fits in one part, else a multipart upload that is
/// aborted on any error (so no parts are left behind to be billed).
fn upload_file(
    path: &Path,
    location: &Location,
    rel: &str,
    report: &mut PublishReport,
) -> Result<()> {
    let part = part_bytes();
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    let n_bytes = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?
        .len();
    let fail = |e: &object_store::Error| store_error(&location.url, "uploading", e);
    if n_bytes <= part as u64 {
        let mut buf = Vec::with_capacity(n_bytes as usize);
        file.read_to_end(&mut buf)
            .map_err(|e| Error::io(path, "reading", e))?;
        block_on(location.store.put(&location.key, PutPayload::from(buf))).map_err(|e| fail(&e))?;
    } else {
        let upload = block_on(location.store.put_multipart(&location.key)).map_err(|e| fail(&e))?;
        // The writer spawns each part's upload onto the current runtime.
        let _runtime = super::enter();
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let result: Result<()> = (|| {
            let mut buf = vec![0u8; part];
            loop {
                let n =
                    read_full(&mut file, &mut buf).map_err(|e| Error::io(path, "reading", e))?;
                if n == 0 {
                    return Ok(());
                }
                block_on(writer.wait_for_capacity(PARTS_IN_FLIGHT)).map_err(|e| fail(&e))?;
                writer.write(&buf[..n]);
            }
        })();
        match result {
            Ok(()) => {
                block_on(writer.finish()).map_err(|e| fail(&e))?;
            }
            Err(e) => {
                // The original error matters; a failed abort leaves parts the store expires.
                let _ = block_on(writer.abort());
                return Err(e);
            }
        }
        report.multipart.push(rel.to_string());
    }
    report.uploaded.push(rel.to_string());
    report.n_bytes += n_bytes;
    Ok(())
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
