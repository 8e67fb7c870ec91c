//! Pins: the watcher's own copies of a checkpoint's files, so neither rotation nor an in-place
//! rewrite by the trainer changes what a window member holds.
//!
//! Trainers delete old checkpoints (`save_total_limit`, rotation), often before the window that
//! needs them has passed, and some rewrite a checkpoint in place: a rollback after a loss spike
//! calls `save_pretrained` again, which opens the existing files with `O_TRUNC`. A hard link
//! survives the deletion but not the rewrite: it is the same inode, so the pinned bytes change or
//! vanish under the merge. So each weight file is pinned, in this order of preference:
//!
//! 1. **reflink** (`ioctl(FICLONE)`, Btrfs, XFS with `reflink=1`, bcachefs, ZFS 2.2+): a new
//!    inode sharing the data blocks copy-on-write. The trainer's rewrite allocates new blocks;
//!    ours keep the old bytes. It costs metadata only.
//! 2. **copy** (`copy_file_range`, in-kernel, server-side on NFS 4.2), when the filesystem
//!    keeps at least as much free space after the copy as the copy takes: a new inode with
//!    its own blocks. It costs a full read and write and the disk space of the window.
//! 3. **hard link**, only when a copy would eat into the last half of the free space (a full
//!    disk under a training run is worse than a shared inode). This is the one method where
//!    the trainer can change pinned bytes; it is reported as [`PinKind::Linked`] and guarded
//!    (below). A failed link falls back to a copy only on `EXDEV`, `EPERM` or `EMLINK` (the
//!    filesystem cannot link this file); any other error, `EEXIST` above all, is an error.
//!
//! Every file is created with `O_EXCL` in a fresh staging directory: a pin never truncates or
//! overwrites anything. The file pinned is the one that was validated: a symlink (the HF cache
//! layout, `snapshots/<rev>/model.safetensors -> ../../blobs/<sha>`) is followed, and the inode
//! pinned must be the inode [`pma_format::Checkpoint::open`] validated. Index and sidecars are small and
//! always copied; sidecars are what a merge would copy ([`pma_format::plan_sidecars`]: files and
//! folders, no training state, no symlink out of the checkpoint). Safetensors shard names with
//! a directory part are refused: those pins are flat.
//!
//! Every format is pinned the same way ([`AnyCheckpoint`]): the weight files are what the
//! format's reader reads, each pinned as above at its path inside the checkpoint, so the pin
//! opens as the same format and framework layout:
//! - torch DCP: `.metadata` and every `.distcp` file it names, in their folder
//!   (`model_and_optim/` for OLMo-core, `pytorch_model_fsdp_0/` for accelerate);
//! - torch.save: `pytorch_model.bin` (or the index and its shards), DeepSpeed's
//!   `mp_rank_00_model_states.pt` (at the top of the pin, where detection finds it without the
//!   run's `latest`), Megatron's `mp_rank_00/model_optim_rng.pt`.
//!
//! A DCP or torch.save reader keeps no inode to compare with, so such a pin is validated
//! itself once its files are in place: it must open, and hold the same tensors (names, dtypes,
//! shapes) as the checkpoint the watcher validated.
//!
//! Measured on the development machine (ext4 on a virtio disk, 2 cores shared with other
//! builds; ext4 has no reflink), pinning one 1 GiB file, 3 rounds, source in the page cache:
//! - reflink: not supported on ext4, `EOPNOTSUPP` after 0.07–0.16 ms, then the next method;
//! - copy (`copy_file_range` + fsync): 5.4, 6.7 and 10.5 s under load (100–200 MB/s); 2.0 s
//!   (`cp` + `sync`) when the disk was quieter; plus 1 GiB of disk per pinned GiB;
//! - hard link: 0.08–0.17 ms, no disk.
//!
//! (`PMA_PIN_BENCH_DIR=/some/fs cargo test -p pma-merge --lib pin_cost -- --ignored
//! --nocapture` repeats it on the filesystem to be used.)
//! On a reflink filesystem a pin costs what a link costs, so that is where a watcher beside a
//! large run belongs; on ext4 a window of N members costs N checkpoint copies.
//!
//! Each pin records its files' size, mtime and ctime in [`MANIFEST_NAME`]. [`verify`] re-checks
//! them (ctime only for pins that own their inode: unlinking the trainer's name changes the
//! ctime of a shared inode), and the watcher calls [`recheck_members`] before each update and
//! [`check_unchanged`] before committing it: a damaged member is pinned again from the trainer's
//! copy when that still validates, and otherwise dropped from the window, each with a
//! [`WatchEvent::PinDamaged`] instead of failing on every restart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pma_format::torch_save::TORCH_BIN_INDEX_FILE;
use pma_format::{
    AnyCheckpoint, FileStamp, Layout, SidecarKind, TensorStore, INDEX_FILE_NAME, SINGLE_FILE_NAME,
};
use serde::{Deserialize, Serialize};

use super::state::{create_dir_all, io_error, remove_any, step_dir_name, sync_dir, Member};
use super::WatchEvent;
use crate::error::{Error, Result};

/// The per-pin record of what each pinned file was, in [`MANIFEST_DIR`] of the pin directory.
pub const MANIFEST_NAME: &str = "pma-pin.json";
/// The hidden folder of a pin that holds its manifest. Hidden, so a merge from the pin never
/// copies the manifest as a sidecar (hidden folders are not sidecars); pins made before it
/// existed hold [`MANIFEST_NAME`] at their top, and still verify.
pub const MANIFEST_DIR: &str = ".pma-pin";

/// How a pin holds its weight files (the least isolated method used for any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinKind {
    /// At least one file hard-linked: shares the trainer's inode (no space for a copy).
    Linked,
    /// At least one file copied, none linked.
    Copied,
    /// Every file reflinked (copy-on-write clone).
    Reflinked,
}

/// How one file was pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    Reflink,
    Copy,
    Link,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PinnedFile {
    name: String,
    method: Method,
    n_bytes: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    files: Vec<PinnedFile>,
}

/// Pins `checkpoint` (opened from the trainer's path `source`) as `pins_dir/step-XXXXXXX` and
/// returns that path. An existing pin of that step is reused: pins only appear complete.
pub fn pin(
    checkpoint: &AnyCheckpoint,
    source: &Path,
    step: u64,
    pins_dir: &Path,
) -> Result<(PathBuf, PinKind)> {
    let target = pins_dir.join(step_dir_name(step));
    if target.is_dir() {
        return Ok((target, PinKind::Copied));
    }
    create_dir_all(pins_dir)?;
    let staging = pins_dir.join(format!(".{}.pma-tmp", step_dir_name(step)));
    remove_any(&staging);
    create_dir_all(&staging)?;
    let pinned = pin_into(checkpoint, source, &staging);
    let manifest = match pinned {
        Ok(m) => m,
        Err(e) => {
            remove_any(&staging);
            return Err(e);
        }
    };
    let kind = if manifest.files.iter().any(|f| f.method == Method::Link) {
        PinKind::Linked
    } else if manifest.files.iter().any(|f| f.method == Method::Copy) {
        PinKind::Copied
    } else {
        PinKind::Reflinked
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    create_dir_all(&staging.join(MANIFEST_DIR))?;
    write_new(&staging.join(MANIFEST_DIR).join(MANIFEST_NAME), &bytes)?;
    sync_tree(&staging)?;
    std::fs::rename(&staging, &target).map_err(|e| io_error(&target, "renaming into", e))?;
    sync_dir(pins_dir)?;
    Ok((target, kind))
}

/// A file to pin: where it is, its path inside the pin, and the stamp it must still have.
struct WeightFile {
    src: PathBuf,
    name: String,
    validated: FileStamp,
}

fn pin_into(checkpoint: &AnyCheckpoint, source: &Path, staging: &Path) -> Result<Manifest> {
    let weights = weight_files(checkpoint, source)?;
    // Copy when the filesystem keeps at least as much free space as the copies take.
    let total: u64 = weights.iter().map(|w| w.validated.n_bytes).sum();
    let free = pma_format::available_bytes(staging)?;
    let may_copy = free >= total.saturating_mul(2);
    let mut files = Vec::new();
    for w in weights {
        let dst = staging.join(&w.name);
        if let Some(parent) = dst.parent() {
            create_dir_all(parent)?;
        }
        let method = pin_file(&w.src, w.validated, &dst, may_copy)?;
        files.push(record(&dst, w.name, method)?);
    }
    if let AnyCheckpoint::Safetensors(c) = checkpoint {
        if c.layout() == Layout::Sharded {
            let src = c.root().join(INDEX_FILE_NAME);
            let bytes = if pma_format::is_url(&src) {
                pma_format::remote::read_bounded(&src, pma_format::MAX_HEADER_BYTES)?.ok_or_else(
                    || Error::PinRefused {
                        path: src.clone(),
                        reason: "the index grew past the header limit since it was read".into(),
                    },
                )?
            } else {
                std::fs::read(&src).map_err(|e| io_error(&src, "reading", e))?
            };
            write_new(&staging.join(INDEX_FILE_NAME), &bytes)?;
        }
    }
    pin_sidecars(checkpoint, staging)?;
    if !matches!(checkpoint, AnyCheckpoint::Safetensors(_)) {
        check_pinned(checkpoint, staging)?;
    }
    Ok(Manifest { files })
}

/// The files `checkpoint`'s reader reads, with their paths inside the pin.
fn weight_files(checkpoint: &AnyCheckpoint, source: &Path) -> Result<Vec<WeightFile>> {
    // Formats whose readers keep no stamp: take it now; the pin is validated once made.
    let stamped = |src: PathBuf, name: String| -> Result<WeightFile> {
        let meta = std::fs::metadata(&src).map_err(|e| io_error(&src, "reading metadata of", e))?;
        Ok(WeightFile {
            validated: FileStamp::of(&meta),
            src,
            name,
        })
    };
    match checkpoint {
        AnyCheckpoint::Safetensors(c) => c
            .files()
            .iter()
            .map(|f| {
                let name = match c.layout() {
                    Layout::File => SINGLE_FILE_NAME.to_string(),
                    _ => plain_name(c.root(), f.path())?,
                };
                Ok(WeightFile {
                    src: f.path().into(),
                    name,
                    validated: f.stamp(),
                })
            })
            .collect(),
        AnyCheckpoint::Dcp(d) => {
            let dir = d.dir();
            let mut names = vec![pma_format::dcp::METADATA_FILE];
            names.extend(d.data_files());
            names
                .into_iter()
                .map(|n| {
                    let src = dir.join(n);
                    let name = inner_name(source, &src)?;
                    stamped(src, name)
                })
                .collect()
        }
        AnyCheckpoint::TorchSave(t) => {
            let root = t.root();
            let mut srcs: Vec<PathBuf> = t.files().iter().map(|f| f.path().into()).collect();
            if root.is_dir() && root.join(TORCH_BIN_INDEX_FILE).is_file() {
                srcs.push(root.join(TORCH_BIN_INDEX_FILE));
            }
            srcs.into_iter()
                .map(|src| {
                    let file_name = src
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // DeepSpeed's model file goes to the top: detection finds it there without
                    // the `latest` tag file an HF Trainer checkpoint points through.
                    let deepspeed = file_name.starts_with("mp_rank_")
                        && file_name.ends_with("_model_states.pt");
                    let name = if deepspeed || !src.starts_with(source) {
                        file_name
                    } else {
                        inner_name(source, &src)?
                    };
                    stamped(src, name)
                })
                .collect()
        }
    }
}

/// `path` relative to the checkpoint folder `source`, checked to stay inside it (only plain
/// components). A checkpoint that is a file is its own name.
fn inner_name(source: &Path, path: &Path) -> Result<String> {
    let rel = match path.strip_prefix(source) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel,
        _ => Path::new(path.file_name().unwrap_or_default()),
    };
    let plain = !rel.as_os_str().is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(Error::PinRefused {
            path: path.into(),
            reason: "the file lies outside the checkpoint folder".into(),
        });
    }
    Ok(rel.to_string_lossy().into_owned())
}

/// Copies the sidecars a merge of the checkpoint would copy ([`TensorStore::sidecar_plan`]),
/// folders included, at the same paths. One that turned into a link out of the checkpoint
/// since the plan was made is left out (the weights are what the pin is for).
fn pin_sidecars(checkpoint: &AnyCheckpoint, staging: &Path) -> Result<()> {
    let plan = checkpoint.sidecar_plan()?;
    let root = checkpoint.root();
    for entry in &plan.copy {
        let dst = staging.join(&entry.path);
        match entry.kind {
            SidecarKind::Dir => create_dir_all(&dst)?,
            // A weight file pinned at that path already (a shard in a folder of its own).
            SidecarKind::File if dst.exists() => {}
            SidecarKind::File => {
                match pma_format::copy_sidecar(root, &root.join(&entry.path), &dst) {
                    Ok(_) | Err(pma_format::Error::UnsafeSidecar { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Checks that the pin in `staging` opens and holds the tensors of the validated `checkpoint`.
fn check_pinned(checkpoint: &AnyCheckpoint, staging: &Path) -> Result<()> {
    let pinned = AnyCheckpoint::open(staging).map_err(|e| Error::PinRefused {
        path: checkpoint.root().into(),
        reason: format!("the pinned copy does not open: {e}"),
    })?;
    if pinned.logical_tensors() != checkpoint.logical_tensors() {
        return Err(Error::PinRefused {
            path: checkpoint.root().into(),
            reason: "the pinned copy holds other tensors than the checkpoint that was validated \
                     (it changed while being pinned)"
                .into(),
        });
    }
    Ok(())
}

/// fsyncs every folder of a pin, deepest first, so each file's entry is durable before the
/// pin is renamed into place.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, "listing", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, "listing", e))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// The file name of `path` inside checkpoint `root`; refused when it has a directory part
/// (`sub/model-00001.safetensors`): pins are flat, and two such shards could collide.
fn plain_name(root: &Path, path: &Path) -> Result<String> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let mut parts = rel.components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(name)), None) => Ok(name.to_string_lossy().into()),
        _ => Err(Error::PinRefused {
            path: path.into(),
            reason: "shard names with a directory part cannot be pinned".into(),
        }),
    }
}

/// Pins one validated file as the new file `dst`: reflink, else copy (when `may_copy`), else
/// hard link. Never writes to an existing file.
fn pin_file(src: &Path, validated: FileStamp, dst: &Path, may_copy: bool) -> Result<Method> {
    if pma_format::is_url(src) {
        // A store has no links: the pin is a download, by ranged GETs, of the object that was
        // validated (refused if its size changed since).
        let mut to = create_new(dst)?;
        pma_format::remote::download(src, Some(validated.n_bytes), &mut to).map_err(|e| {
            Error::PinRefused {
                path: src.into(),
                reason: e.to_string(),
            }
        })?;
        to.sync_all().map_err(|e| io_error(dst, "syncing", e))?;
        return Ok(Method::Copy);
    }
    // Opening follows symlinks to the file that was validated; check it is that very inode.
    let from = std::fs::File::open(src).map_err(|e| io_error(src, "opening", e))?;
    let meta = from
        .metadata()
        .map_err(|e| io_error(src, "reading metadata of", e))?;
    let now = FileStamp::of(&meta);
    if (now.dev, now.ino, now.n_bytes) != (validated.dev, validated.ino, validated.n_bytes) {
        return Err(Error::PinRefused {
            path: src.into(),
            reason: "the file was replaced or resized after it was validated".into(),
        });
    }
    let mut to = create_new(dst)?;
    if reflink(&from, &to).is_ok() {
        to.sync_all().map_err(|e| io_error(dst, "syncing", e))?;
        return Ok(Method::Reflink);
    }
    if may_copy {
        copy_into(&from, src, &mut to, dst)?;
        return Ok(Method::Copy);
    }
    drop(to);
    std::fs::remove_file(dst).map_err(|e| io_error(dst, "removing", e))?;
    match link_followed(src, dst) {
        Ok(()) => {
            let linked = std::fs::metadata(dst).map_err(|e| io_error(dst, "checking", e))?;
            let linked = FileStamp::of(&linked);
            if (linked.dev, linked.ino) != (validated.dev, validated.ino) {
                let _ = std::fs::remove_file(dst);
                return Err(Error::PinRefused {
                    path: src.into(),
                    reason: "the file was replaced while it was being pinned".into(),
                });
            }
            Ok(Method::Link)
        }
        // The filesystem cannot link this file: copy after all, into a new file.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK)
            ) =>
        {
            let mut to = create_new(dst)?;
            copy_into(&from, src, &mut to, dst)?;
            Ok(Method::Copy)
        }
        Err(e) => Err(io_error(dst, "hard-linking", e)),
    }
}

/// `O_CREAT | O_EXCL`: fails rather than touch a file that exists.
fn create_new(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| io_error(path, "creating", e))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = create_new(path)?;
    f.write_all(bytes)
        .map_err(|e| io_error(path, "writing", e))?;
    f.sync_all().map_err(|e| io_error(path, "syncing", e))
}

/// Copies in the kernel (`copy_file_range` via `io::copy`), never the whole file in memory.
fn copy_into(
    mut from: &std::fs::File,
    src: &Path,
    to: &mut std::fs::File,
    dst: &Path,
) -> Result<()> {
    use std::io::Seek;
    from.seek(std::io::SeekFrom::Start(0))
        .map_err(|e| io_error(src, "seeking", e))?;
    std::io::copy(&mut from, to).map_err(|e| io_error(dst, "copying into", e))?;
    to.sync_all().map_err(|e| io_error(dst, "syncing", e))
}

/// `ioctl(FICLONE)`: a copy-on-write clone of `from` into the empty file `to`.
fn reflink(from: &std::fs::File, to: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // _IOW(0x94, 9, int), from linux/fs.h.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open and ours.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A hard link to the file `src` resolves to (`linkat(AT_SYMLINK_FOLLOW)`): linking a symlink
/// itself would pin a relative link that dangles in the pin directory.
fn link_followed(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (s, d) = (c(src)?, c(dst)?);
    // SAFETY: two NUL-terminated paths; linkat only reads them.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            s.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn record(path: &Path, name: String, method: Method) -> Result<PinnedFile> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, "reading metadata of", e))?;
    let s = FileStamp::of(&meta);
    Ok(PinnedFile {
        name,
        method,
        n_bytes: s.n_bytes,
        mtime_ns: s.mtime_ns as i64,
        ctime_ns: s.ctime_ns as i64,
    })
}

/// Checks that a pin still holds what was pinned: every file with its recorded size and
/// mtime (and ctime, for files the pin owns), and the checkpoint validates. Returns why not.
pub fn verify(pin_dir: &Path) -> std::result::Result<(), String> {
    let mut manifest_path = pin_dir.join(MANIFEST_DIR).join(MANIFEST_NAME);
    if !manifest_path.exists() {
        manifest_path = pin_dir.join(MANIFEST_NAME); // a pin made before MANIFEST_DIR
    }
    match std::fs::read(&manifest_path) {
        Ok(bytes) => {
            let manifest: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
            for f in &manifest.files {
                // Only paths inside the pin are looked at, whatever the manifest says.
                let inside = Path::new(&f.name)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(format!(
                        "{}: '{}' is not a path inside the pin",
                        manifest_path.display(),
                        f.name
                    ));
                }
                let p = pin_dir.join(&f.name);
                let meta =
                    std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                let now = FileStamp::of(&meta);
                let changed = !meta.is_file()
                    || now.n_bytes != f.n_bytes
                    || now.mtime_ns as i64 != f.mtime_ns
                    || (f.method != Method::Link && now.ctime_ns as i64 != f.ctime_ns);
                if changed {
                    return Err(format!(
                        "{} changed since it was pinned ({} bytes then, {} now)",
                        p.display(),
                        f.n_bytes,
                        now.n_bytes
                    ));
                }
            }
        }
        // A pin made before manifests existed: validation is all there is to check.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", manifest_path.display())),
    }
    AnyCheckpoint::open(pin_dir)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Re-checks the pins of `members` (before an update): a damaged pin is rebuilt from the
/// trainer's copy when that still validates, else the member leaves the window. Each repair
/// is reported as a [`WatchEvent::PinDamaged`].
pub fn recheck_members(
    pins_dir: &Path,
    members: &mut Vec<Member>,
    sink: &mut dyn FnMut(&WatchEvent),
) {
    members.retain(|m| {
        let dir = pins_dir.join(step_dir_name(m.step));
        let Err(reason) = verify(&dir) else {
            return true;
        };
        remove_any(&dir);
        let repinned = AnyCheckpoint::open(&m.source)
            .ok()
            .and_then(|c| pin(&c, &m.source, m.step, pins_dir).ok())
            .is_some_and(|(p, _)| verify(&p).is_ok());
        sink(&WatchEvent::PinDamaged {
            step: m.step,
            reason,
            repinned,
        });
        repinned
    });
}

/// Checks the pins an update read (before it is committed). A damaged one fails the update
/// with [`Error::PinChanged`]; nothing is committed, and the next attempt repairs it through
/// [`recheck_members`].
pub fn check_unchanged(pins_dir: &Path, members: &[Member]) -> Result<()> {
    for m in members {
        if let Err(reason) = verify(&pins_dir.join(step_dir_name(m.step))) {
            return Err(Error::PinChanged {
                step: m.step,
                reason,
            });
        }
    }
    Ok(())
}

/// Whether `e` means an input changed under an update (retry it), not a bad input.
pub fn is_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::PinChanged { .. } | Error::Format(pma_format::Error::FileChangedWhileMapped { .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pma_format::{Checkpoint, Dtype, TensorSpec};
    use std::collections::BTreeMap;

    fn write_ckpt(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        };
        let bytes = [7u8; 8];
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
        let ckpt = AnyCheckpoint::open(&src).unwrap();
        let (pinned, kind) = pin(&ckpt, &src, 100, &root.path().join("pins")).unwrap();
        assert_ne!(kind, PinKind::Linked, "this disk has room for a copy");
        drop(ckpt);
        std::fs::remove_dir_all(&src).unwrap();
        let reopened = Checkpoint::open(&pinned).unwrap();
        assert_eq!(reopened.tensors().len(), 1);
        assert!(pinned.join("config.json").is_file());
        // Optimizer state is not the model: not pinned.
        assert!(!pinned.join("optimizer.pt").exists());
        verify(&pinned).unwrap();
    }

    #[test]
    fn pin_shared_the_trainers_inode_on_in_place_rewrite() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("run/step-100");
        write_ckpt(&src);
        let ckpt = AnyCheckpoint::open(&src).unwrap();
        let (pinned, _) = pin(&ckpt, &src, 100, &root.path().join("pins")).unwrap();
        let before = std::fs::read(pinned.join(SINGLE_FILE_NAME)).unwrap();
        // save_pretrained on rollback: open(O_TRUNC) and write other bytes.
        std::fs::write(src.join(SINGLE_FILE_NAME), b"rewritten").unwrap();
        assert_eq!(
            std::fs::read(pinned.join(SINGLE_FILE_NAME)).unwrap(),
            before
        );
        verify(&pinned).unwrap();
    }

    #[test]
    fn symlinked_shard_was_pinned_as_a_dangling_link() {
        let root = tempfile::tempdir().unwrap();
        // The HF cache layout: the weights are a relative link into blobs/.
        let repo = root.path().join("models--o--m");
        let snap = repo.join("snapshots/rev");
        write_ckpt(&repo.join("blobs-src"));
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::rename(
            repo.join("blobs-src").join(SINGLE_FILE_NAME),
            repo.join("blobs/abc"),
        )
        .unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink("../../blobs/abc", snap.join(SINGLE_FILE_NAME)).unwrap();
        let ckpt = Checkpoint::open(&snap).unwrap();
        let pins = root.path().join("pins");
        let any = AnyCheckpoint::open(&snap).unwrap();
        let (pinned, _) = pin(&any, &snap, 5, &pins).unwrap();
        let meta = std::fs::symlink_metadata(pinned.join(SINGLE_FILE_NAME)).unwrap();
        assert!(meta.is_file(), "the pin holds the file, not a link");
        Checkpoint::open(&pinned).unwrap();
        // The link-only path (no room to copy) links the target too.
        let dst = root.path().join("linked.safetensors");
        let f = &ckpt.files()[0];
        assert_eq!(
            pin_file(f.path(), f.stamp(), &dst, false).unwrap(),
            Method::Link
        );
        assert!(std::fs::symlink_metadata(&dst).unwrap().is_file());
    }

    #[test]
    fn copy_fallback_truncated_an_existing_target() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("step-1");
        write_ckpt(&src);
        let ckpt = Checkpoint::open(&src).unwrap();
        let f = &ckpt.files()[0];
        let dst = root.path().join("victim");
        std::fs::write(&dst, b"the trainer's bytes").unwrap();
        for may_copy in [true, false] {
            let e = pin_file(f.path(), f.stamp(), &dst, may_copy).unwrap_err();
            assert!(e.to_string().contains("victim"), "{e}");
            assert_eq!(std::fs::read(&dst).unwrap(), b"the trainer's bytes");
        }
    }

    #[test]
    fn shard_names_with_subdirectories_were_flattened() {
        let root = Path::new("/run/step-1");
        assert_eq!(
            plain_name(root, &root.join("model-1.safetensors")).unwrap(),
            "model-1.safetensors"
        );
        let e = plain_name(root, &root.join("a/model-1.safetensors")).unwrap_err();
        assert!(matches!(e, Error::PinRefused { .. }), "{e}");
    }

    #[test]
    fn damaged_member_failed_forever_instead_of_being_repinned() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("run/step-100");
        write_ckpt(&src);
        let pins = root.path().join("pins");
        let (pinned, _) = pin(&AnyCheckpoint::open(&src).unwrap(), &src, 100, &pins).unwrap();
        // Damage the pin (a disk fault, a hand-run truncate).
        std::fs::write(pinned.join(SINGLE_FILE_NAME), b"").unwrap();
        assert!(verify(&pinned).is_err());
        let mut members = vec![Member {
            step: 100,
            source: src.clone(),
        }];
        let err = check_unchanged(&pins, &members).unwrap_err();
        assert!(is_damage(&err), "{err}");
        let mut events = Vec::new();
        recheck_members(&pins, &mut members, &mut |e| events.push(e.clone()));
        assert_eq!(members.len(), 1, "re-pinned from the trainer's copy");
        assert!(matches!(
            events[..],
            [WatchEvent::PinDamaged {
                step: 100,
                repinned: true,
                ..
            }]
        ));
        verify(&pinned).unwrap();
        // Damaged again, and the trainer's copy is gone: dropped from the window.
        std::fs::write(pinned.join(SINGLE_FILE_NAME), b"").unwrap();
        std::fs::remove_dir_all(&src).unwrap();
        events.clear();
        recheck_members(&pins, &mut members, &mut |e| events.push(e.clone()));
        assert!(members.is_empty());
        assert!(matches!(
            events[..],
            [WatchEvent::PinDamaged {
                repinned: false,
                ..
            }]
        ));
    }

    #[test]
    fn bare_file_checkpoint_is_pinned_as_a_dir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        write_ckpt(&dir);
        let file = root.path().join("step-7.safetensors");
        std::fs::rename(dir.join(SINGLE_FILE_NAME), &file).unwrap();
        let ckpt = AnyCheckpoint::open(&file).unwrap();
        let (pinned, _) = pin(&ckpt, &file, 7, &root.path().join("pins")).unwrap();
        assert!(pinned.join(SINGLE_FILE_NAME).is_file());
        assert!(pinned.ends_with("step-0000007"));
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    fn dcp_fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures/dcp")
            .join(rel)
    }

    #[test]
    fn dcp_pin_keeps_its_folder_and_survives_rotation() {
        let root = tempfile::tempdir().unwrap();
        // OLMo-core: the DCP folder is `model_and_optim/`, beside `train/` and a config.
        let src = root.path().join("run/step100");
        copy_dir(
            &dcp_fixture("run-single/step-0000100"),
            &src.join("model_and_optim"),
        );
        std::fs::create_dir_all(src.join("train")).unwrap();
        std::fs::write(src.join("train/rank0.pt"), b"state").unwrap();
        std::fs::write(src.join("config.json"), b"{}").unwrap();
        let ckpt = AnyCheckpoint::open(&src).unwrap();
        let tensors = ckpt.logical_tensors();
        let (pinned, kind) = pin(&ckpt, &src, 100, &root.path().join("pins")).unwrap();
        assert_ne!(kind, PinKind::Linked, "this disk has room for a copy");
        drop(ckpt);
        std::fs::remove_dir_all(&src).unwrap();
        let reopened = AnyCheckpoint::open(&pinned).unwrap();
        assert_eq!(reopened.format_name(), "DCP");
        assert_eq!(reopened.logical_tensors(), tensors);
        assert!(pinned.join("model_and_optim/.metadata").is_file());
        assert!(
            !pinned.join("train").exists(),
            "training state is not pinned"
        );
        verify(&pinned).unwrap();
        // The manifest covers `.metadata` and every `.distcp`: losing one is damage.
        let manifest: Manifest = serde_json::from_slice(
            &std::fs::read(pinned.join(MANIFEST_DIR).join(MANIFEST_NAME)).unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names[0], "model_and_optim/.metadata");
        assert!(
            names[1..].iter().all(|n| n.ends_with(".distcp")),
            "{names:?}"
        );
        std::fs::remove_file(pinned.join(names[1])).unwrap();
        assert!(verify(&pinned).is_err());
    }

    #[test]
    fn megatron_dcp_pin_reopens_with_the_same_tensors() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("iter_0000200");
        copy_dir(&dcp_fixture("run-megatron/iter_0000200"), &src);
        let ckpt = AnyCheckpoint::open(&src).unwrap();
        let (pinned, _) = pin(&ckpt, &src, 200, &root.path().join("pins")).unwrap();
        let reopened = AnyCheckpoint::open(&pinned).unwrap();
        assert_eq!(reopened.logical_tensors(), ckpt.logical_tensors());
        assert_eq!(reopened.entries(), ckpt.entries(), "bytes items pinned too");
        // common.pt is training state; a DCP checkpoint has no model sidecars.
        assert!(!pinned.join("common.pt").exists());
    }

    #[test]
    fn pins_carry_the_sidecars_a_merge_copies() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("run/step-100");
        write_ckpt(&src);
        std::fs::create_dir_all(src.join("1_Pooling")).unwrap();
        std::fs::write(src.join("1_Pooling/config.json"), b"{}").unwrap();
        std::fs::write(src.join("vocab.txt"), b"a\nb\n").unwrap();
        std::fs::write(src.join("modeling_x.py"), b"# code").unwrap();
        std::fs::write(root.path().join("secret"), b"key").unwrap();
        std::os::unix::fs::symlink("../../secret", src.join("notes.txt")).unwrap();
        let ckpt = AnyCheckpoint::open(&src).unwrap();
        let (pinned, _) = pin(&ckpt, &src, 100, &root.path().join("pins")).unwrap();
        let from_pin = AnyCheckpoint::open(&pinned)
            .unwrap()
            .sidecar_plan()
            .unwrap();
        let from_src = ckpt.sidecar_plan().unwrap();
        // The pin's own manifest (hidden) is not a sidecar; everything else matches.
        assert_eq!(from_pin.copy, from_src.copy);
        assert!(!pinned.join("notes.txt").exists());
        assert_eq!(
            std::fs::read(pinned.join("1_Pooling/config.json")).unwrap(),
            b"{}"
        );
    }

    /// Measures the cost of each pin method on a 1 GiB file (the figures in the module docs).
    #[test]
    #[ignore = "writes 3 GiB; run by hand with --release --nocapture"]
    fn pin_cost() {
        let base =
            std::env::var_os("PMA_PIN_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
        let dir = tempfile::tempdir_in(base).unwrap();
        let src = dir.path().join("src");
        let chunk = vec![0x5au8; 1 << 20];
        let mut f = std::fs::File::create(&src).unwrap();
        for _ in 0..1024 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        let stamp = FileStamp::of(&f.metadata().unwrap());
        let from = std::fs::File::open(&src).unwrap();
        for round in 0..3 {
            let t = std::time::Instant::now();
            let to = create_new(&dir.path().join(format!("r{round}"))).unwrap();
            let r = reflink(&from, &to);
            eprintln!("reflink: {:?} in {:?}", r.err(), t.elapsed());
            let dst = dir.path().join(format!("c{round}"));
            let t = std::time::Instant::now();
            let mut to = create_new(&dst).unwrap();
            copy_into(&from, &src, &mut to, &dst).unwrap();
            eprintln!("copy: {:?}", t.elapsed());
            std::fs::remove_file(&dst).unwrap();
            let dst = dir.path().join(format!("l{round}"));
            let t = std::time::Instant::now();
            assert_eq!(pin_file(&src, stamp, &dst, false).unwrap(), Method::Link);
            eprintln!("link: {:?}", t.elapsed());
        }
    }
}
