//! Pins: the watcher's own references to a checkpoint's files, so rotation loses nothing.
//!
//! Trainers delete old checkpoints (`save_total_limit`, rotation), often before the window that
//! needs them has passed. When a checkpoint is taken, its weight files, index and sidecars are
//! hard-linked into `pins/step-XXXXXXX/`: a hard link is a second name for the same inode, so
//! the trainer's `rm` only removes its own name and the bytes stay until the pin goes. Where a
//! hard link is impossible (another filesystem, a filesystem without links) the file is copied
//! and fsync'd. A pin is assembled under a dot-name and renamed into place, so a pin directory
//! with a step name is always complete.
//!
//! The contract this relies on is the one trainers keep: a checkpoint file is written once and
//! then only deleted, never rewritten in place (a rewrite in place would show through the link).

use std::path::{Path, PathBuf};

use pma_format::{Checkpoint, Layout, INDEX_FILE_NAME, SINGLE_FILE_NAME};
use serde::Serialize;

use super::state::{create_dir_all, io_error, remove_any, step_dir_name, sync_dir};
use crate::error::Result;

/// How a pin holds its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinKind {
    /// Every file hard-linked.
    Linked,
    /// At least one file copied (hard links failed).
    Copied,
}

/// Pins `checkpoint` (opened from the trainer's path) as `pins_dir/step-XXXXXXX` and returns
/// that path. An existing pin of that step is reused: pins only appear complete.
pub fn pin(checkpoint: &Checkpoint, step: u64, pins_dir: &Path) -> Result<(PathBuf, PinKind)> {
    let target = pins_dir.join(step_dir_name(step));
    if target.is_dir() {
        return Ok((target, PinKind::Linked));
    }
    create_dir_all(pins_dir)?;
    let staging = pins_dir.join(format!(".{}.pma-tmp", step_dir_name(step)));
    remove_any(&staging);
    create_dir_all(&staging)?;
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    match checkpoint.layout() {
        Layout::File => files.push((checkpoint.root().into(), SINGLE_FILE_NAME.into())),
        Layout::SingleFileDir | Layout::Sharded => {
            for f in checkpoint.files() {
                let name = f
                    .path()
                    .file_name()
                    .expect("shard paths end in a file name")
                    .to_string_lossy()
                    .into_owned();
                files.push((f.path().into(), name));
            }
            if checkpoint.layout() == Layout::Sharded {
                files.push((
                    checkpoint.root().join(INDEX_FILE_NAME),
                    INDEX_FILE_NAME.into(),
                ));
            }
            for s in checkpoint.sidecars() {
                let name = s
                    .file_name()
                    .expect("sidecar paths end in a file name")
                    .to_string_lossy()
                    .into_owned();
                files.push((s, name));
            }
        }
    }
    let mut kind = PinKind::Linked;
    for (src, name) in &files {
        let dst = staging.join(name);
        match std::fs::hard_link(src, &dst) {
            Ok(()) => {}
            // Gone already: the trainer rotated it away between validation and pinning.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                remove_any(&staging);
                return Err(io_error(src, "pinning", e));
            }
            Err(_) => {
                copy_synced(src, &dst)?;
                kind = PinKind::Copied;
            }
        }
    }
    sync_dir(&staging)?;
    std::fs::rename(&staging, &target).map_err(|e| io_error(&target, "renaming into", e))?;
    sync_dir(pins_dir)?;
    Ok((target, kind))
}

/// Copies a file in bounded chunks (never the whole file in memory) and fsyncs the copy.
fn copy_synced(src: &Path, dst: &Path) -> Result<()> {
    let mut from = std::fs::File::open(src).map_err(|e| io_error(src, "opening", e))?;
    let mut to = std::fs::File::create(dst).map_err(|e| io_error(dst, "creating", e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| io_error(dst, "copying into", e))?;
    to.sync_all().map_err(|e| io_error(dst, "syncing", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pma_format::{Dtype, TensorSpec};
    use std::collections::BTreeMap;

    fn write_ckpt(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        };
        let bytes = [0u8; 8];
        pma_format::write_safetensors(
            &dir.join(SINGLE_FILE_NAME),
            &[(spec, &bytes[..])],
            &BTreeMap::new(),
        )
        .unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join("optimizer.pt"), b"big").unwrap();
    }

    #[test]
    fn pin_survives_deletion_of_the_source() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("run/step-100");
        write_ckpt(&src);
        let ckpt = Checkpoint::open(&src).unwrap();
        let (pinned, kind) = pin(&ckpt, 100, &root.path().join("pins")).unwrap();
        assert_eq!(kind, PinKind::Linked);
        drop(ckpt);
        std::fs::remove_dir_all(&src).unwrap();
        let reopened = Checkpoint::open(&pinned).unwrap();
        assert_eq!(reopened.tensors().len(), 1);
        assert!(pinned.join("config.json").is_file());
        // Optimizer state is not the model: not pinned.
        assert!(!pinned.join("optimizer.pt").exists());
    }

    #[test]
    fn bare_file_checkpoint_is_pinned_as_a_dir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        write_ckpt(&dir);
        let file = root.path().join("step-7.safetensors");
        std::fs::rename(dir.join(SINGLE_FILE_NAME), &file).unwrap();
        let ckpt = Checkpoint::open(&file).unwrap();
        let (pinned, _) = pin(&ckpt, 7, &root.path().join("pins")).unwrap();
        assert!(pinned.join(SINGLE_FILE_NAME).is_file());
        assert!(pinned.ends_with("step-0000007"));
    }
}
