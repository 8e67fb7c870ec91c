//! The directory view of a location, local or remote: what run discovery, checkpoint detection
//! and marker files need. Each function takes a `Path` that is either a local path or an
//! object-store URL ([`super::is_url`]) and behaves the same on both, so callers hold one code
//! path. On a store, a "directory" is a key prefix with objects under it (stores have no empty
//! folders) and listing one is a delimited LIST request.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;

use super::{block_on, is_url, store_error, Location, ObjectStoreExt};
use crate::error::{Error, Result};

/// A file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A file (an object).
    File,
    /// A folder (a prefix with objects under it).
    Dir,
    /// Neither (a socket, a dangling link): listed so callers can skip it knowingly.
    Other,
}

/// One child of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The child's name.
    pub name: String,
    /// The child's path (`dir.join(name)`).
    pub path: PathBuf,
    /// File or folder (following symlinks, as `Path::is_dir` does).
    pub kind: EntryKind,
}

/// The children of `dir`, in no particular order. A remote prefix with nothing under it is an
/// error (404), as a missing local directory is.
pub fn list_dir(dir: &Path) -> Result<Vec<DirEntry>> {
    if !is_url(dir) {
        let io = |e| Error::io(dir, "listing", e);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let kind = if path.is_dir() {
                EntryKind::Dir
            } else if path.is_file() {
                EntryKind::File
            } else {
                EntryKind::Other
            };
            out.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                path,
                kind,
            });
        }
        return Ok(out);
    }
    let location = Location::parse(dir)?;
    let listing = block_on(location.store.list_with_delimiter(Some(&location.key)))
        .map_err(|e| store_error(&location.url, "listing", &e))?;
    if listing.objects.is_empty() && listing.common_prefixes.is_empty() {
        return Err(Error::Remote {
            url: location.url,
            action: "listing",
            status: Some(404),
            reason: "no objects under this prefix".into(),
        });
    }
    let entry = |key: &object_store::path::Path, kind| {
        let name = key.filename().unwrap_or_default().to_string();
        DirEntry {
            path: dir.join(&name),
            name,
            kind,
        }
    };
    let mut out: Vec<DirEntry> = listing
        .common_prefixes
        .iter()
        .map(|p| entry(p, EntryKind::Dir))
        .collect();
    out.extend(
        listing
            .objects
            .iter()
            .map(|o| entry(&o.location, EntryKind::File)),
    );
    Ok(out)
}

/// Whether `path` is a file (an object). Local: `Path::is_file`. Remote: a HEAD request, where
/// 404 is `false` and any other failure (credentials, network) is an error.
pub fn probe_file(path: &Path) -> Result<bool> {
    if !is_url(path) {
        return Ok(path.is_file());
    }
    let location = Location::parse(path)?;
    match block_on(location.store.head(&location.key)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_error(&location.url, "reading", &e)),
    }
}

/// Whether `path` is a folder. Remote: whether any object lies under the prefix.
pub fn is_dir(path: &Path) -> Result<bool> {
    if !is_url(path) {
        return Ok(path.is_dir());
    }
    let location = Location::parse(path)?;
    let mut stream = location.store.list(Some(&location.key));
    let first =
        block_on(stream.try_next()).map_err(|e| store_error(&location.url, "listing", &e))?;
    Ok(first.is_some())
}

/// The whole of a small file: `Ok(None)` when it is larger than `max_bytes` (it is then not
/// the small document the caller expected, and nothing is read).
pub fn read_bounded(path: &Path, max_bytes: u64) -> Result<Option<Vec<u8>>> {
    if !is_url(path) {
        let n_bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "reading metadata of", e))?
            .len();
        if n_bytes > max_bytes {
            return Ok(None);
        }
        return std::fs::read(path)
            .map(Some)
            .map_err(|e| Error::io(path, "reading", e));
    }
    let object = super::RemoteObject::open(path)?;
    if object.n_bytes() > max_bytes {
        return Ok(None);
    }
    Ok(Some(object.read_range(0..object.n_bytes())?.to_vec()))
}

/// Every object under `dir`, as paths relative to it, sorted; at most `limit` of them (more is
/// `Ok(None)`).
pub fn list_recursive(dir: &Path, limit: usize) -> Result<Option<Vec<String>>> {
    let location = Location::parse(dir)?;
    let prefix = location.key.clone();
    let mut stream = location.store.list(Some(&prefix));
    let mut out = Vec::new();
    loop {
        let next =
            block_on(stream.try_next()).map_err(|e| store_error(&location.url, "listing", &e))?;
        let Some(meta) = next else { break };
        let rel: Vec<String> = meta
            .location
            .prefix_match(&prefix)
            .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
            .unwrap_or_default();
        if rel.is_empty() {
            continue;
        }
        out.push(rel.join("/"));
        if out.len() > limit {
            return Ok(None);
        }
    }
    out.sort();
    Ok(Some(out))
}

/// What a HEAD request says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub n_bytes: u64,
    /// The store's entity tag (on S3, `<md5>-<parts>` for a multipart upload).
    pub e_tag: Option<String>,
}

/// HEAD of one object.
pub fn head(url: &Path) -> Result<ObjectInfo> {
    let location = Location::parse(url)?;
    let meta = block_on(location.store.head(&location.key))
        .map_err(|e| store_error(&location.url, "reading", &e))?;
    Ok(ObjectInfo {
        n_bytes: meta.size,
        e_tag: meta.e_tag,
    })
}
