//! Sidecar files (`config.json`, `tokenizer.json`, ...) read safely out of a checkpoint.
//!
//! A checkpoint directory is input anyone may have written: a `tokenizer.json` that is a
//! symlink to `~/.ssh/id_ed25519` would otherwise be copied into every merged output. A sidecar
//! is read only when it resolves to a regular file inside the checkpoint directory, or, for the
//! Hugging Face cache layout (`snapshots/<rev>/config.json -> ../../blobs/<sha>`), inside the
//! repository's `blobs/` directory. The resolved file is opened with `O_NOFOLLOW`, so a link
//! swapped in after the check is refused rather than followed, and its size is capped.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest sidecar read (tokenizers are tens of MB at most).
pub const MAX_SIDECAR_BYTES: u64 = 256 << 20;

/// Where a sidecar of checkpoint `root` may resolve to: the checkpoint itself and, for
/// `.../snapshots/<rev>`, the HF cache's `.../blobs`.
fn allowed_roots(root: &Path) -> Result<Vec<PathBuf>> {
    let base = std::fs::canonicalize(root).map_err(|e| Error::io(root, "resolving", e))?;
    let mut roots = vec![base.clone()];
    if let Some(snapshots) = base.parent() {
        if snapshots.file_name().is_some_and(|n| n == "snapshots") {
            if let Some(repo) = snapshots.parent() {
                roots.push(repo.join("blobs"));
            }
        }
    }
    Ok(roots)
}

/// Where sidecar `path` of checkpoint `root` leads, or why it must not be read.
pub fn resolve_sidecar(root: &Path, path: &Path) -> Result<PathBuf> {
    let unsafe_sidecar = |reason: String| Error::UnsafeSidecar {
        path: path.into(),
        reason,
    };
    let resolved = std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolving", e))?;
    if !allowed_roots(root)?.iter().any(|r| resolved.starts_with(r)) {
        return Err(unsafe_sidecar(format!(
            "it is a link to {}, outside the checkpoint",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// Opens sidecar `path` of checkpoint `root` for reading (see the module docs for what is
/// refused) and returns it with its length.
fn open_sidecar(root: &Path, path: &Path) -> Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let resolved = resolve_sidecar(root, path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&resolved)
        .map_err(|e| Error::io(path, "opening sidecar", e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "reading metadata of", e))?;
    if !meta.is_file() {
        return Err(Error::UnsafeSidecar {
            path: path.into(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_SIDECAR_BYTES {
        return Err(Error::UnsafeSidecar {
            path: path.into(),
            reason: format!(
                "{} bytes, more than the {MAX_SIDECAR_BYTES}-byte limit",
                meta.len()
            ),
        });
    }
    Ok((file, meta.len()))
}

/// Reads sidecar `path` of checkpoint `root` (see the module docs for what is refused).
pub fn read_sidecar(root: &Path, path: &Path) -> Result<Vec<u8>> {
    if crate::remote::is_url(path) {
        return crate::remote::read_bounded(path, MAX_SIDECAR_BYTES)?.ok_or_else(|| {
            Error::UnsafeSidecar {
                path: path.into(),
                reason: format!("more than the {MAX_SIDECAR_BYTES}-byte limit"),
            }
        });
    }
    let (file, n_bytes) = open_sidecar(root, path)?;
    let mut bytes = Vec::with_capacity(n_bytes as usize);
    file.take(MAX_SIDECAR_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "reading", e))?;
    Ok(bytes)
}

/// Copies sidecar `path` of checkpoint `root` into `dst`, a new file (`O_EXCL`: nothing is
/// overwritten), and fsyncs it; refuses what [`read_sidecar`] refuses. The bytes go through
/// the kernel (`copy_file_range`), so a large sidecar (a tokenizer, a module's own weights)
/// never sits in memory. Returns the bytes copied.
pub fn copy_sidecar(root: &Path, path: &Path, dst: &Path) -> Result<u64> {
    if crate::remote::is_url(path) {
        // Streamed by ranged GETs, so a large sidecar never sits in memory.
        let n_bytes = crate::remote::RemoteObject::open(path)?.n_bytes();
        if n_bytes > MAX_SIDECAR_BYTES {
            return Err(Error::UnsafeSidecar {
                path: path.into(),
                reason: format!("{n_bytes} bytes, more than the {MAX_SIDECAR_BYTES}-byte limit"),
            });
        }
        let mut to = create_copy(dst)?;
        let n_bytes = crate::remote::download(path, Some(n_bytes), &mut to)?;
        to.sync_all().map_err(|e| Error::io(dst, "syncing", e))?;
        return Ok(n_bytes);
    }
    let (file, _) = open_sidecar(root, path)?;
    let mut to = create_copy(dst)?;
    let n_bytes = std::io::copy(&mut file.take(MAX_SIDECAR_BYTES), &mut to)
        .map_err(|e| Error::io(dst, "copying into", e))?;
    to.sync_all().map_err(|e| Error::io(dst, "syncing", e))?;
    Ok(n_bytes)
}

/// The new file a sidecar is copied into (`O_EXCL`: nothing is overwritten).
fn create_copy(dst: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .map_err(|e| Error::io(dst, "creating", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_symlink_out_of_the_checkpoint_was_copied() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"private key").unwrap();
        let ckpt = d.path().join("run/step-1");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::os::unix::fs::symlink(&secret, ckpt.join("tokenizer.json")).unwrap();
        let e = read_sidecar(&ckpt, &ckpt.join("tokenizer.json")).unwrap_err();
        assert!(matches!(e, Error::UnsafeSidecar { .. }), "{e}");
        assert!(e.to_string().contains("outside the checkpoint"), "{e}");
        // A relative link that climbs out is refused the same way.
        std::os::unix::fs::symlink("../../secret", ckpt.join("vocab.json")).unwrap();
        let e = read_sidecar(&ckpt, &ckpt.join("vocab.json")).unwrap_err();
        assert!(matches!(e, Error::UnsafeSidecar { .. }), "{e}");
    }

    #[test]
    fn sidecars_inside_the_checkpoint_and_hf_blobs_are_read() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--org--m");
        let snap = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs/123"), b"{\"a\":1}").unwrap();
        std::os::unix::fs::symlink("../../blobs/123", snap.join("config.json")).unwrap();
        assert_eq!(
            read_sidecar(&snap, &snap.join("config.json")).unwrap(),
            b"{\"a\":1}"
        );
        std::fs::write(snap.join("real.json"), b"x").unwrap();
        std::os::unix::fs::symlink("real.json", snap.join("vocab.json")).unwrap();
        assert_eq!(read_sidecar(&snap, &snap.join("vocab.json")).unwrap(), b"x");
        // A directory is not a sidecar.
        std::fs::create_dir(snap.join("merges.txt")).unwrap();
        let e = read_sidecar(&snap, &snap.join("merges.txt")).unwrap_err();
        assert!(matches!(e, Error::UnsafeSidecar { .. }), "{e}");
    }

    #[test]
    fn copy_sidecar_refuses_escaping_links_and_existing_targets() {
        let d = tempfile::tempdir().unwrap();
        let ckpt = d.path().join("ckpt");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join("vocab.txt"), b"[PAD]\nhello\n").unwrap();
        std::fs::write(d.path().join("secret"), b"key").unwrap();
        std::os::unix::fs::symlink("../secret", ckpt.join("notes.txt")).unwrap();
        let dst = d.path().join("vocab.txt");
        assert_eq!(
            copy_sidecar(&ckpt, &ckpt.join("vocab.txt"), &dst).unwrap(),
            12
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"[PAD]\nhello\n");
        let e = copy_sidecar(&ckpt, &ckpt.join("vocab.txt"), &dst).unwrap_err();
        assert!(e.to_string().contains("creating"), "{e}");
        let e = copy_sidecar(&ckpt, &ckpt.join("notes.txt"), &d.path().join("n")).unwrap_err();
        assert!(matches!(e, Error::UnsafeSidecar { .. }), "{e}");
        assert!(!d.path().join("n").exists());
    }
}
