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
    if local.is_file() {
        let location = Location::parse(url)?;
        if !overwrite && !existing(&location)?.is_empty() {
            return Err(Error::RemoteOutputExists { url: location.url });
        }
        let mut report = PublishReport::default();
        upload_file(local, &location, "", &mut report)?;
        return Ok(report);
    }
    let mut files = Vec::new();
    collect_files(local, Path::new(""), &mut files)?;
    let mut publication = Publication::begin(url, overwrite, &files)?;
    publication.upload_dir(local)?;
    if let Some(rel) = commit_file(&files) {
        publication.upload(&local.join(rel), rel)?;
    }
    Ok(publication.finish())
}

/// The file of `files` (relative paths) that makes the output loadable, uploaded last.
fn commit_file(files: &[String]) -> Option<&'static str> {
    COMMIT_FILES
        .iter()
        .find(|c| files.iter().any(|f| f == *c))
        .copied()
}

/// A directory output being published to a store in steps: [`Publication::begin`] unpublishes
/// the old output, [`Publication::upload_dir`] sends local files, the caller streams the large
/// files itself ([`ObjectWriter`] at [`Publication::url_of`]) and sends the commit file last.
/// This is how a merge to a store writes its shards without staging them on local disk.
#[derive(Debug)]
pub struct Publication {
    location: Location,
    report: PublishReport,
}

impl Publication {
    /// Starts publishing an output made of `files` (relative paths) at `url`. Refuses an
    /// existing output unless `overwrite`; with it, deletes the old commit file first (the old
    /// output stops being loadable before any of its files changes), then the old objects that
    /// the new output lacks.
    pub fn begin(url: &Path, overwrite: bool, files: &[String]) -> Result<Publication> {
        let location = Location::parse(url)?;
        let old = existing(&location)?;
        if !old.is_empty() && !overwrite {
            return Err(Error::RemoteOutputExists { url: location.url });
        }
        let mut report = PublishReport::default();
        for c in COMMIT_FILES {
            if old.iter().any(|o| o == c) {
                delete(&location.child(c))?;
            }
        }
        let new: BTreeSet<&String> = files.iter().collect();
        for rel in old.iter().filter(|o| !o.is_empty() && !new.contains(o)) {
            if !COMMIT_FILES.contains(&rel.as_str()) {
                delete(&location.child(rel))?;
            }
            report.deleted.push(rel.clone());
        }
        Ok(Publication { location, report })
    }

    /// The URL of `rel` in the output.
    pub fn url_of(&self, rel: &str) -> PathBuf {
        PathBuf::from(self.location.child(rel).url)
    }

    /// Uploads every file under `local` as the same relative path, except a commit file.
    pub fn upload_dir(&mut self, local: &Path) -> Result<()> {
        let mut files = Vec::new();
        collect_files(local, Path::new(""), &mut files)?;
        for rel in files.iter().filter(|f| !COMMIT_FILES.contains(&f.as_str())) {
            self.upload(&local.join(rel), rel)?;
        }
        Ok(())
    }

    /// Uploads the local file `path` as `rel`.
    pub fn upload(&mut self, path: &Path, rel: &str) -> Result<()> {
        upload_file(path, &self.location.child(rel), rel, &mut self.report)
    }

    /// What was uploaded and deleted.
    pub fn finish(self) -> PublishReport {
        self.report
    }

    /// Gives up after a failure: deletes, best effort, what this publication uploaded and the
    /// objects `rels` (files the caller streamed), so that a failed write leaves no partial
    /// output behind to block a rerun. The first error is the one to report, so failures here
    /// are ignored (an object left over holds no commit file: it is not a checkpoint).
    pub fn discard(self, rels: &[String]) {
        for rel in self.report.uploaded.iter().chain(rels) {
            let _ = delete(&self.location.child(rel));
        }
    }
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

/// One object written as a stream: bytes are gathered into parts of [`PART_BYTES_ENV`] bytes,
/// each uploaded as soon as it is full while the caller goes on producing the next, with at
/// most [`PARTS_IN_FLIGHT`] parts uploading at once (a `write` waits for one to finish past
/// that). Memory is therefore at most `PARTS_IN_FLIGHT + 1` parts, whatever the object's size,
/// and nothing touches local disk. An object no larger than one part is sent by one PUT at
/// [`ObjectWriter::finish`]. The object appears whole at `finish` or not at all: a writer
/// dropped unfinished (an error, a cancelled merge) aborts its multipart upload.
pub struct ObjectWriter {
    location: Location,
    part_bytes: usize,
    /// Bytes gathered before the multipart upload starts (at most one part).
    head: Vec<u8>,
    upload: Option<WriteMultipart>,
    n_bytes: u64,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("url", &self.location.url)
            .field("n_bytes", &self.n_bytes)
            .finish()
    }
}

impl ObjectWriter {
    /// A writer of the object at `url` (replaced when complete if it exists: callers check
    /// first, see [`check_output_absent`]). Sends nothing until the first part is full.
    pub fn create(url: &Path) -> Result<ObjectWriter> {
        Ok(ObjectWriter {
            location: Location::parse(url)?,
            part_bytes: part_bytes(),
            head: Vec::new(),
            upload: None,
            n_bytes: 0,
        })
    }

    fn fail(&self, e: &object_store::Error) -> Error {
        store_error(&self.location.url, "uploading", e)
    }

    /// Appends `bytes`, waiting while [`PARTS_IN_FLIGHT`] parts are uploading.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.n_bytes += bytes.len() as u64;
        if self.upload.is_none() {
            let room = self.part_bytes - self.head.len();
            if bytes.len() <= room {
                self.head.extend_from_slice(bytes);
                return Ok(());
            }
            let upload = block_on(self.location.store.put_multipart(&self.location.key))
                .map_err(|e| self.fail(&e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_bytes);
            let head = std::mem::take(&mut self.head);
            // The writer spawns each full part's upload onto the current runtime.
            let _runtime = super::enter();
            writer.write(&head);
            self.upload = Some(writer);
        }
        let writer = self.upload.as_mut().expect("started above");
        while !bytes.is_empty() {
            // One part at a time, so that a large write cannot queue more than the bound.
            let n = bytes.len().min(self.part_bytes);
            let waited = block_on(writer.wait_for_capacity(PARTS_IN_FLIGHT));
            if let Err(e) = waited {
                return Err(store_error(&self.location.url, "uploading", &e));
            }
            let _runtime = super::enter();
            writer.write(&bytes[..n]);
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Uploads what is left and completes the object; returns its length in bytes.
    pub fn finish(mut self) -> Result<u64> {
        match self.upload.take() {
            None => {
                let payload = PutPayload::from(std::mem::take(&mut self.head));
                block_on(self.location.store.put(&self.location.key, payload))
                    .map_err(|e| self.fail(&e))?;
            }
            Some(writer) => {
                let _runtime = super::enter();
                block_on(writer.finish()).map_err(|e| self.fail(&e))?;
            }
        }
        Ok(self.n_bytes)
    }

    /// Whether the object is being sent as a multipart upload (it outgrew one part).
    pub fn is_multipart(&self) -> bool {
        self.upload.is_some()
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(writer) = self.upload.take() {
            // Unfinished: abort, so no parts are left behind to be billed (a failed abort
            // leaves parts the store's lifecycle rules expire).
            let _runtime = super::enter();
            let _ = block_on(writer.abort());
        }
    }
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
