//! Outputs that appear atomically: built in a staging path beside the target, fsync'd, and
//! renamed into place, so a reader sees either the old output or the complete new one, never a
//! mix.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::writer::fs::{output_occupied, sync_dir};

/// An output (a directory or a single file) under construction beside its final path.
///
/// Dropping it without [`StagedOutput::commit`] removes the staging path, so a failed run leaves
/// the target exactly as it was.
#[derive(Debug)]
pub struct StagedOutput {
    target: PathBuf,
    staging: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl StagedOutput {
    /// Prepares to write `target`. Fails with [`Error::OutputExists`] if it is occupied and
    /// `overwrite` is false. `is_dir` chooses a directory or a single file.
    pub fn create(target: &Path, is_dir: bool, overwrite: bool) -> Result<StagedOutput> {
        if output_occupied(target) && !overwrite {
            return Err(Error::OutputExists {
                path: target.into(),
            });
        }
        let parent = parent_dir(target);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "creating", e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let staging = parent.join(format!(".{name}.pma-tmp-{}-{nanos}", std::process::id()));
        if is_dir {
            std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, "creating", e))?;
        }
        Ok(StagedOutput {
            target: target.into(),
            staging,
            is_dir,
            committed: false,
        })
    }

    /// Where to write: the staging directory, or the staging file path.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Makes the staged output durable and moves it into place, replacing any old output.
    pub fn commit(mut self) -> Result<()> {
        if self.is_dir {
            sync_dir(&self.staging)?;
        } else {
            File::open(&self.staging)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&self.staging, "syncing", e))?;
        }
        let parent = parent_dir(&self.target);
        if self.target.symlink_metadata().is_ok() {
            // Swap atomically where the kernel can, so readers never see the target missing;
            // the old output then sits at the staging path and is removed.
            if exchange(&self.staging, &self.target).is_ok() {
                self.committed = true;
                sync_dir(&parent)?;
                remove_path(&self.staging);
                return Ok(());
            }
            let old = self.staging.with_extension("old");
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io(&self.target, "moving aside", e))?;
            std::fs::rename(&self.staging, &self.target)
                .map_err(|e| Error::io(&self.target, "renaming into", e))?;
            self.committed = true;
            sync_dir(&parent)?;
            remove_path(&old);
            return Ok(());
        }
        std::fs::rename(&self.staging, &self.target)
            .map_err(|e| Error::io(&self.target, "renaming into", e))?;
        self.committed = true;
        sync_dir(&parent)
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            remove_path(&self.staging);
        }
    }
}

fn remove_path(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated paths; renameat2 is a plain syscall.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_output_refuses_existing_and_replaces_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"x").unwrap();
        let e = StagedOutput::create(&target, true, false).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }));
        let staged = StagedOutput::create(&target, true, true).unwrap();
        std::fs::write(staged.path().join("new"), b"y").unwrap();
        staged.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        // Nothing left behind beside the target.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let staged = StagedOutput::create(&dir.path().join("out"), true, false).unwrap();
        std::fs::write(staged.path().join("a"), b"y").unwrap();
        drop(staged);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
