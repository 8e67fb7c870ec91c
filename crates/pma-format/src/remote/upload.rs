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
//! With `overwrite`, the old output stays as it was, loadable, until the new one is complete:
//! the new files that would replace old ones are written to a staging folder first and copied
//! into place at the commit, the commit file last, and only then are the old output's objects
//! that the new one lacks deleted (see [`Publication`]).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
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
    let uploaded = publication
        .upload_dir(local)
        .and_then(|()| match commit_file(&files) {
            Some(rel) => publication.upload(&local.join(rel), rel),
            None => Ok(()),
        });
    match uploaded {
        Ok(()) => publication.commit(),
        Err(e) => {
            publication.discard(&[]);
            Err(e)
        }
    }
}

/// The file of `files` (relative paths) that makes the output loadable, uploaded last.
fn commit_file(files: &[String]) -> Option<&'static str> {
    COMMIT_FILES
        .iter()
        .find(|c| files.iter().any(|f| f == *c))
        .copied()
}

/// A directory output being published to a store in steps: [`Publication::begin`] lists the
/// old output (touching nothing), [`Publication::upload_dir`] and [`Publication::upload`] send
/// local files, the caller streams the large files itself ([`ObjectWriter`] at
/// [`Publication::url_of`]), and [`Publication::commit`] makes the new output the one at the
/// URL, the commit file last. This is how a merge to a store writes its shards without staging
/// them on local disk.
///
/// Over an existing output (`overwrite`), every file whose key the old output also has, and
/// the commit file, is written under a staging prefix inside the output
/// (`.pma-staging-PID-NANOS/`) instead, so that until the new output is complete the old one
/// is byte for byte what it was, loadable, and a failed merge leaves it so. The commit then:
/// 1. drops staged files equal to the old ones (same size and entity tag: nothing to replace);
/// 2. if any other old file must be replaced, deletes the old commit file first, so that no
///    reader loads the old index over a mix of old and new shards (the output is unloadable,
///    never mixed, while the server-side copies run), then copies the staged files into place;
/// 3. copies the new commit file into place: from here the new output is the one loaded;
/// 4. deletes the old output's objects that the new one lacks (stale shards, the old commit
///    file of another kind, staging left by crashed runs), then the staging prefix.
#[derive(Debug)]
pub struct Publication {
    location: Location,
    report: PublishReport,
    /// The old output's objects, relative to the output ("" is an object at the URL itself).
    old: BTreeSet<String>,
    /// The new output's files.
    new: BTreeSet<String>,
    /// The staging folder's name inside the output, when an old output is being replaced.
    staging: Option<String>,
}

/// Staging folders inside an output start with this (hidden: HF loaders and pma's sidecar
/// copy skip dot-folders).
const STAGING_PREFIX: &str = ".pma-staging-";
/// The largest object S3 copies in one request (5 GiB).
const MAX_COPY_BYTES: u64 = 5 << 30;
/// Server-side copies in flight at once (each a request the store serves on its own).
const COPIES_IN_FLIGHT: usize = 8;

/// The largest object the store at `url` copies server-side in one request, where it has a
/// limit (S3: 5 GiB; a larger one needs a multipart copy, which `object_store` does not make).
pub fn max_copy_bytes(url: &Path) -> Option<u64> {
    let text = url.to_string_lossy();
    (text.starts_with("s3://") || text.starts_with("s3a://")).then_some(MAX_COPY_BYTES)
}

/// Deletes every object under `url` (a prefix), if any.
pub fn remove_prefix(url: &Path) -> Result<()> {
    delete_prefix(&Location::parse(url)?)
}

/// Copies the object at `from` to `to` on the same store, server-side: the new object appears
/// whole, replacing any old one.
pub fn copy_object(from: &Path, to: &Path) -> Result<()> {
    copy(&Location::parse(from)?, &Location::parse(to)?)
}

impl Publication {
    /// Starts publishing an output made of `files` (relative paths) at `url`. Refuses an
    /// existing output unless `overwrite`; with it, nothing of the old output changes until
    /// [`Publication::commit`].
    pub fn begin(url: &Path, overwrite: bool, files: &[String]) -> Result<Publication> {
        let location = Location::parse(url)?;
        let old: BTreeSet<String> = existing(&location)?.into_iter().collect();
        if !old.is_empty() && !overwrite {
            return Err(Error::RemoteOutputExists { url: location.url });
        }
        let staging = (!old.is_empty()).then(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{STAGING_PREFIX}{}-{nanos}", std::process::id())
        });
        Ok(Publication {
            location,
            report: PublishReport::default(),
            old,
            new: files.iter().cloned().collect(),
            staging,
        })
    }

    /// Whether `rel` is written under the staging folder (see the type's docs).
    fn is_staged(&self, rel: &str) -> bool {
        self.staging.is_some() && (self.old.contains(rel) || COMMIT_FILES.contains(&rel))
    }

    /// Where `rel` is written before the commit.
    fn written_at(&self, rel: &str) -> Location {
        match &self.staging {
            Some(staging) if self.is_staged(rel) => {
                self.location.child(&format!("{staging}/{rel}"))
            }
            _ => self.location.child(rel),
        }
    }

    /// The URL to write `rel` of the output at: its place in the output, or in the staging
    /// folder when it replaces an old object (see the type's docs).
    pub fn url_of(&self, rel: &str) -> PathBuf {
        PathBuf::from(self.written_at(rel).url)
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
        let at = self.written_at(rel);
        upload_file(path, &at, rel, &mut self.report)
    }

    /// Copies objects already on the same store into the output, each `(url, rel)` to where
    /// `rel` is written, server-side (no bytes through this process), several at once. This is
    /// how a partitioned merge's finalize gathers the shards its parts uploaded. Objects larger
    /// than one copy request allows are refused before anything is copied.
    pub fn copy_in(&mut self, objects: &[(PathBuf, String)]) -> Result<()> {
        let mut pairs = Vec::with_capacity(objects.len());
        for (from, rel) in objects {
            let from = Location::parse(from)?;
            if let Some(max_bytes) = max_copy_bytes(Path::new(&from.url)) {
                let meta = block_on(from.store.head(&from.key))
                    .map_err(|e| store_error(&from.url, "reading", &e))?;
                if meta.size > max_bytes {
                    return Err(Error::RemoteCopyTooLarge {
                        url: from.url,
                        n_bytes: meta.size,
                        max_bytes,
                    });
                }
                self.report.n_bytes += meta.size;
            }
            pairs.push((from, self.written_at(rel), rel.clone()));
        }
        block_on(
            futures::stream::iter(pairs.iter().map(|(from, to, _)| async move {
                to.store
                    .copy(&from.key, &to.key)
                    .await
                    .map_err(|e| store_error(&to.url, "copying into place", &e))
            }))
            .buffer_unordered(COPIES_IN_FLIGHT)
            .try_collect::<Vec<()>>(),
        )?;
        self.report
            .uploaded
            .extend(pairs.into_iter().map(|(_, _, rel)| rel));
        Ok(())
    }

    /// Makes the new output the one at the URL (steps 1-4 of the type's docs), once every
    /// file has been written; returns what was uploaded and deleted. Without an old output
    /// there is nothing to do: the caller wrote the commit file last.
    pub fn commit(mut self) -> Result<PublishReport> {
        let Some(staging) = self.staging.clone() else {
            return Ok(self.report);
        };
        let staged: Vec<String> = self
            .new
            .iter()
            .filter(|rel| self.is_staged(rel))
            .cloned()
            .collect();
        let (commit, others): (Vec<String>, Vec<String>) = staged
            .into_iter()
            .partition(|rel| COMMIT_FILES.contains(&rel.as_str()));
        let mut replace = Vec::new();
        for rel in others {
            if !same_object(&self.written_at(&rel), &self.location.child(&rel))? {
                replace.push(rel);
            }
        }
        // Refused before anything of the old output changes, rather than halfway through.
        if let Some(max_bytes) = max_copy_bytes(Path::new(&self.location.url)) {
            for rel in replace.iter().chain(&commit) {
                let staged = self.written_at(rel);
                let meta = block_on(staged.store.head(&staged.key))
                    .map_err(|e| store_error(&staged.url, "reading", &e))?;
                if meta.size > max_bytes {
                    return Err(Error::RemoteCopyTooLarge {
                        url: self.location.child(rel).url,
                        n_bytes: meta.size,
                        max_bytes,
                    });
                }
            }
        }
        if !replace.is_empty() {
            for c in COMMIT_FILES.iter().filter(|c| self.old.contains(**c)) {
                delete(&self.location.child(c))?;
            }
        }
        for rel in replace.iter().chain(&commit) {
            copy(&self.written_at(rel), &self.location.child(rel))?;
        }
        for rel in self
            .old
            .iter()
            .filter(|o| !o.is_empty() && !self.new.contains(*o))
        {
            delete(&self.location.child(rel))?;
            self.report.deleted.push(rel.clone());
        }
        delete_prefix(&self.location.child(&staging))?;
        Ok(self.report)
    }

    /// Gives up after a failure: deletes, best effort, what this publication wrote (what it
    /// uploaded and the files `rels` the caller streamed), and never an object of the old
    /// output, so that a failed write leaves the old output as it was, or nothing to block a
    /// rerun. The first error is the one to report, so failures here are ignored (an object
    /// left over holds no commit file: it is not a checkpoint).
    pub fn discard(self, rels: &[String]) {
        for rel in self.report.uploaded.iter().chain(rels) {
            if self.is_staged(rel) || !self.old.contains(rel) {
                let _ = delete(&self.written_at(rel));
            }
        }
        if let Some(staging) = &self.staging {
            let _ = delete_prefix(&self.location.child(staging));
        }
    }
}

/// Whether two objects hold the same bytes, by their size and entity tag (an MD5 of the
/// content, or of the parts for a multipart upload: equal tags mean equal bytes, while equal
/// bytes uploaded in other parts may differ, which only costs a copy).
fn same_object(a: &Location, b: &Location) -> Result<bool> {
    let head = |l: &Location| match block_on(l.store.head(&l.key)) {
        Ok(meta) => Ok(Some(meta)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_error(&l.url, "reading", &e)),
    };
    let (Some(a), Some(b)) = (head(a)?, head(b)?) else {
        return Ok(false);
    };
    Ok(a.size == b.size && a.e_tag.is_some() && a.e_tag == b.e_tag)
}

/// A server-side copy (no bytes through this process; S3 copies objects up to 5 GB so).
fn copy(from: &Location, to: &Location) -> Result<()> {
    block_on(from.store.copy(&from.key, &to.key))
        .map_err(|e| store_error(&to.url, "copying into place", &e))
}

/// Deletes every object under `location` (a staging folder).
fn delete_prefix(location: &Location) -> Result<()> {
    let keys: Vec<object_store::path::Path> = block_on(
        location
            .store
            .list(Some(&location.key))
            .map_ok(|meta| meta.location)
            .try_collect(),
    )
    .map_err(|e| store_error(&location.url, "listing", &e))?;
    for key in keys {
        match block_on(location.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error(&location.url, "deleting", &e)),
        }
    }
    Ok(())
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
