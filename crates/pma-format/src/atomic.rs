//! Outputs that appear atomically: built in a staging path beside the target, fsync'd, and
//! renamed into place, so a reader sees either the old output or the complete new one, never a
//! mix. Every durable write in pma goes through here: merge and watch outputs, the watch state
//! file, lab checkpoints and metrics, the demo's results.
//!
//! The protocol, for a target `DIR/NAME`:
//! 1. the missing ancestors of `DIR` are created and each new directory entry is fsync'd
//!    ([`create_dir_all_synced`]), so the output cannot vanish with its parent after a crash;
//! 2. staging paths `DIR/.NAME.pma-tmp-HOST-PID-N` left by a run on this host whose process is
//!    gone (a merge killed by SIGKILL) are removed; those of live processes or other hosts are
//!    kept and reported ([`StagedOutput::stale_kept`]);
//! 3. the caller writes into [`StagedOutput::path`]; [`StagedOutput::commit`] fsyncs the file
//!    (or the directory: its files are fsync'd by their writers), publishes it, and fsyncs `DIR`.
//!
//! Publishing with [`Publish::Create`] never replaces anything: on Linux it is
//! `renameat2(RENAME_NOREPLACE)`, so of two runs racing for one target exactly one wins and the
//! other gets [`Error::OutputExists`]. Elsewhere (or on a filesystem without `renameat2`) a file
//! is published with `link(2)`, which fails if the target exists, and a directory with
//! `rename(2)`, which fails onto a non-empty directory. [`Publish::Replace`] swaps an existing
//! target with `RENAME_EXCHANGE` where the kernel can, so readers never see it missing; the
//! portable fallback moves the old output aside and puts it back if the second rename fails, so
//! a failed publish never loses it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::writer::fs::{output_occupied, sync_dir};

/// Whether publishing may replace an existing output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Fail with [`Error::OutputExists`] if the target is occupied (an empty directory counts as
    /// free), both when staging starts and, atomically, when the output is published.
    Create,
    /// Replace whatever is at the target.
    Replace,
}

impl Publish {
    /// [`Publish::Replace`] when `overwrite` is set, else [`Publish::Create`].
    pub fn overwrite_if(overwrite: bool) -> Publish {
        if overwrite {
            Publish::Replace
        } else {
            Publish::Create
        }
    }
}

/// What an output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A single file.
    File,
    /// A directory of files.
    Dir,
}

/// Marks staging paths: `.NAME` + this + `HOST-PID-N`.
const STAGING_MARK: &str = ".pma-tmp-";
/// Suffix of an old output moved aside by the portable replace. Never removed automatically: if
/// a run died between the two renames, it is the only copy of the old output.
const ASIDE_SUFFIX: &str = ".old";

/// An output (a directory or a single file) under construction beside its final path.
///
/// Dropping it without [`StagedOutput::commit`] removes the staging path, so a failed run leaves
/// the target exactly as it was.
#[derive(Debug)]
pub struct StagedOutput {
    target: PathBuf,
    staging: PathBuf,
    kind: OutputKind,
    publish: Publish,
    committed: bool,
    stale_kept: Vec<PathBuf>,
}

impl StagedOutput {
    /// Prepares to write `target`. Fails with [`Error::OutputExists`] if it is occupied and
    /// `publish` is [`Publish::Create`]. Removes staging paths of `target` left by dead runs on
    /// this host (see the module docs).
    pub fn create(target: &Path, kind: OutputKind, publish: Publish) -> Result<StagedOutput> {
        if publish == Publish::Create && output_occupied(target) {
            return Err(Error::OutputExists {
                path: target.into(),
            });
        }
        let parent = parent_dir(target);
        create_dir_all_synced(&parent)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stale_kept = clean_stale_staging(&parent, &name);
        let staging = parent.join(staging_name(&name));
        if kind == OutputKind::Dir {
            std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, "creating", e))?;
        }
        Ok(StagedOutput {
            target: target.into(),
            staging,
            kind,
            publish,
            committed: false,
            stale_kept,
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

    /// Staging paths of this target found beside it that were not removed: they belong to a
    /// live process, to another host (a shared filesystem), or hold an old output moved aside by
    /// a run that died mid-replace. A caller may report them; pma never guesses they are dead.
    pub fn stale_kept(&self) -> &[PathBuf] {
        &self.stale_kept
    }

    /// Makes the staged output durable and moves it into place (see [`Publish`]).
    pub fn commit(mut self) -> Result<()> {
        match self.kind {
            OutputKind::Dir => sync_dir(&self.staging)?,
            OutputKind::File => File::open(&self.staging)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&self.staging, "syncing", e))?,
        }
        match self.publish {
            Publish::Create => publish_no_replace(&self.staging, &self.target, self.kind)?,
            Publish::Replace => {
                publish_replace(&self.staging, &self.target, self.kind)?;
                // After an exchange the staging path holds the old output.
                remove_path(&self.staging);
            }
        }
        self.committed = true;
        sync_dir(&parent_dir(&self.target))
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            remove_path(&self.staging);
        }
    }
}

/// Writes a small file atomically and durably: staged beside `path`, fsync'd, published as
/// `publish` says, parent directory fsync'd.
pub fn write_file_atomic(path: &Path, bytes: &[u8], publish: Publish) -> Result<()> {
    let staged = StagedOutput::create(path, OutputKind::File, publish)?;
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(staged.path())
        .map_err(|e| Error::io(staged.path(), "creating", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(staged.path(), "writing", e))?;
    drop(f);
    staged.commit()
}

/// `create_dir_all` that fsyncs the parent of every directory it creates, so a new output's
/// path survives a crash along with the output.
pub fn create_dir_all_synced(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while cur.symlink_metadata().is_err() {
        missing.push(cur);
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Another process made it meanwhile: it is there, which is all we need.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(d, "creating", e)),
        }
        sync_dir(&parent_dir(d))?;
    }
    Ok(())
}

fn staging_name(name: &str) -> String {
    // The counter keeps two outputs of one process for one target apart; the time keeps a
    // recycled pid from meeting its predecessor's name.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        ".{name}{STAGING_MARK}{}-{}-{nanos}x{seq}",
        host_name(),
        std::process::id()
    )
}

/// This host's name as it appears in staging names (filename-safe).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is a valid out-buffer of the given length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let raw = if rc == 0 {
        &buf[..end]
    } else {
        &b"unknown"[..]
    };
    let host: String = raw
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    if host.is_empty() {
        "unknown".into()
    } else {
        host
    }
}

/// The owner recorded in a staging name's tail `HOST-PID-N` (no `.old` suffix).
fn staging_owner(tail: &str) -> Option<(&str, u32)> {
    let mut parts = tail.rsplitn(3, '-');
    let _unique = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let host = parts.next()?;
    Some((host, pid))
}

/// Whether a process with this pid exists on this host (EPERM: it exists, owned by another user).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes staging paths of `name` in `dir` whose owner is a dead process on this host; returns
/// the others (see [`StagedOutput::stale_kept`]).
fn clean_stale_staging(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}{STAGING_MARK}");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let host = host_name();
    let me = std::process::id();
    let mut kept = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(tail) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let path = entry.path();
        if tail.ends_with(ASIDE_SUFFIX) {
            kept.push(path);
            continue;
        }
        match staging_owner(tail) {
            Some((_, pid)) if pid == me => {}
            Some((h, pid)) if h == host && !pid_alive(pid) => remove_path(&path),
            _ => kept.push(path),
        }
    }
    kept.sort();
    kept
}

fn is_exists(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) | Some(libc::ENOTDIR) | Some(libc::EISDIR)
    )
}

/// Publishes `staging` at `target` only if nothing is there (an empty directory counts as
/// nothing, as for [`output_occupied`]).
fn publish_no_replace(staging: &Path, target: &Path, kind: OutputKind) -> Result<()> {
    let exists = || Error::OutputExists {
        path: target.into(),
    };
    match rename_noreplace(staging, target) {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => {
            // An empty directory is free: take its place, but only if it is still empty (rmdir
            // fails on anything else) and nobody else took it meanwhile (NOREPLACE again).
            if target.is_dir() && std::fs::remove_dir(target).is_ok() {
                return match rename_noreplace(staging, target) {
                    Ok(()) => Ok(()),
                    Err(e) if is_exists(&e) => Err(exists()),
                    Err(e) => Err(Error::io(target, "renaming into", e)),
                };
            }
            Err(exists())
        }
        Err(e) if unsupported(&e) => publish_no_replace_portable(staging, target, kind),
        Err(e) => Err(Error::io(target, "renaming into", e)),
    }
}

/// Without `renameat2`: `link(2)` never replaces a file, and `rename(2)` of a directory fails
/// onto a non-empty directory or a file (and replaces only an empty directory, which is free).
fn publish_no_replace_portable(staging: &Path, target: &Path, kind: OutputKind) -> Result<()> {
    let result = match kind {
        OutputKind::File => std::fs::hard_link(staging, target).map(|()| remove_path(staging)),
        OutputKind::Dir => std::fs::rename(staging, target),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Err(Error::OutputExists {
            path: target.into(),
        }),
        Err(e) => Err(Error::io(target, "renaming into", e)),
    }
}

/// Publishes `staging` at `target`, replacing what is there. After it returns `Ok`, `staging`
/// holds the old output (if any was exchanged) or nothing.
fn publish_replace(staging: &Path, target: &Path, kind: OutputKind) -> Result<()> {
    let Ok(meta) = target.symlink_metadata() else {
        return std::fs::rename(staging, target).map_err(|e| Error::io(target, "renaming into", e));
    };
    // Swap atomically where the kernel can, so readers never see the target missing.
    if exchange(staging, target).is_ok() {
        return Ok(());
    }
    if kind == OutputKind::File && !meta.is_dir() {
        // rename(2) replaces a file atomically everywhere.
        return std::fs::rename(staging, target).map_err(|e| Error::io(target, "renaming into", e));
    }
    let mut aside = staging.as_os_str().to_owned();
    aside.push(ASIDE_SUFFIX);
    let aside = PathBuf::from(aside);
    replace_by_two_renames(staging, target, &aside, &mut |a, b| std::fs::rename(a, b))
}

/// The portable replace: move the old output aside, move the new one in, remove the old one. If
/// the second rename fails the old output is put back, so a failed publish never loses it; if
/// even that fails, the error says where the old output is.
fn replace_by_two_renames(
    staging: &Path,
    target: &Path,
    aside: &Path,
    rename: &mut dyn FnMut(&Path, &Path) -> std::io::Result<()>,
) -> Result<()> {
    rename(target, aside).map_err(|e| Error::io(target, "moving aside", e))?;
    if let Err(e) = rename(staging, target) {
        return Err(match rename(aside, target) {
            Ok(()) => Error::io(target, "renaming into", e),
            Err(_) => Error::OutputMovedAside {
                path: target.into(),
                moved_to: aside.into(),
                source: e,
            },
        });
    }
    remove_path(aside);
    Ok(())
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    ) || e.kind() == std::io::ErrorKind::Unsupported
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
fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> std::io::Result<()> {
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
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

#[cfg(target_os = "linux")]
fn rename_noreplace(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_NOREPLACE)
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(not(target_os = "linux"))]
fn rename_noreplace(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn staged_output_refuses_existing_and_replaces_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"x").unwrap();
        let e = StagedOutput::create(&target, OutputKind::Dir, Publish::Create).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }));
        let staged = StagedOutput::create(&target, OutputKind::Dir, Publish::Replace).unwrap();
        std::fs::write(staged.path().join("new"), b"y").unwrap();
        staged.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        // Nothing left behind beside the target.
        assert_eq!(entries(dir.path()), ["out"]);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let staged = StagedOutput::create(&out, OutputKind::Dir, Publish::Create).unwrap();
        std::fs::write(staged.path().join("a"), b"y").unwrap();
        drop(staged);
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn concurrent_no_replace_publish_has_exactly_one_winner() {
        // Issue 11.6: two merges to one OUT without --overwrite must not both succeed. All
        // racers pass the up-front check (OUT is free), then publish at once.
        const RACERS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let barrier = std::sync::Barrier::new(RACERS);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RACERS)
                .map(|i| {
                    let (target, barrier) = (&target, &barrier);
                    s.spawn(move || {
                        let staged =
                            StagedOutput::create(target, OutputKind::Dir, Publish::Create)?;
                        std::fs::write(staged.path().join("who"), i.to_string()).unwrap();
                        barrier.wait();
                        staged.commit()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..RACERS).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, Error::OutputExists { .. }), "{e}");
            }
        }
        let who = std::fs::read_to_string(target.join("who")).unwrap();
        assert_eq!(who, winners[0].to_string());
        assert_eq!(entries(dir.path()), ["out"]);
    }

    #[test]
    fn concurrent_no_replace_publish_of_files_has_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.json");
        let a = StagedOutput::create(&target, OutputKind::File, Publish::Create).unwrap();
        let b = StagedOutput::create(&target, OutputKind::File, Publish::Create).unwrap();
        std::fs::write(a.path(), b"a").unwrap();
        std::fs::write(b.path(), b"b").unwrap();
        a.commit().unwrap();
        let e = b.commit().unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"a");
        assert_eq!(entries(dir.path()), ["f.json"]);
    }

    #[test]
    fn no_replace_publish_takes_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        let staged = StagedOutput::create(&target, OutputKind::Dir, Publish::Create).unwrap();
        std::fs::write(staged.path().join("x"), b"x").unwrap();
        staged.commit().unwrap();
        assert!(target.join("x").is_file());
    }

    #[test]
    fn portable_no_replace_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        // A file target that exists stays as it was.
        let target = dir.path().join("f");
        std::fs::write(&target, b"old").unwrap();
        let staging = dir.path().join("s");
        std::fs::write(&staging, b"new").unwrap();
        let e = publish_no_replace_portable(&staging, &target, OutputKind::File).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        // A free file target is taken, and the staging name is gone.
        std::fs::remove_file(&target).unwrap();
        publish_no_replace_portable(&staging, &target, OutputKind::File).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!staging.exists());
        // A non-empty directory target stays as it was.
        let dtarget = dir.path().join("d");
        std::fs::create_dir(&dtarget).unwrap();
        std::fs::write(dtarget.join("old"), b"").unwrap();
        let dstaging = dir.path().join("ds");
        std::fs::create_dir(&dstaging).unwrap();
        std::fs::write(dstaging.join("new"), b"").unwrap();
        let e = publish_no_replace_portable(&dstaging, &dtarget, OutputKind::Dir).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }), "{e}");
        assert!(dtarget.join("old").exists() && dstaging.join("new").exists());
    }

    #[test]
    fn replace_fallback_keeps_out_when_second_rename_fails() {
        // Issue 11.6: the non-Linux replace must never lose OUT when its second rename fails.
        let dir = tempfile::tempdir().unwrap();
        let (staging, target, aside) = (
            dir.path().join("s"),
            dir.path().join("out"),
            dir.path().join("s.old"),
        );
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("new"), b"").unwrap();
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"").unwrap();
        let mut calls = 0;
        let mut failing_second = |a: &Path, b: &Path| {
            calls += 1;
            if calls == 2 {
                return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
            }
            std::fs::rename(a, b)
        };
        let e = replace_by_two_renames(&staging, &target, &aside, &mut failing_second).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Io {
                    action: "renaming into",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            target.join("old").exists(),
            "the old output is back in place"
        );
        assert!(!aside.exists());

        // When even the restore fails, the error says where the old output is.
        let mut calls = 0;
        let mut failing_after_first = |a: &Path, b: &Path| {
            calls += 1;
            if calls >= 2 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            std::fs::rename(a, b)
        };
        let e = replace_by_two_renames(&staging, &target, &aside, &mut failing_after_first)
            .unwrap_err();
        match e {
            Error::OutputMovedAside { moved_to, .. } => {
                assert_eq!(moved_to, aside);
                assert!(aside.join("old").exists());
            }
            other => panic!("expected OutputMovedAside, got {other}"),
        }

        // The happy path: new in place, old removed.
        std::fs::rename(&aside, &target).unwrap();
        replace_by_two_renames(&staging, &target, &aside, &mut |a, b| std::fs::rename(a, b))
            .unwrap();
        assert!(target.join("new").exists() && !aside.exists() && !staging.exists());
    }

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn stale_staging_dir_of_killed_run_is_cleaned_or_reported() {
        // Issue 11.9: a merge killed by SIGKILL leaves `.OUT.pma-tmp-*`; the next run removes
        // it when its owner is a dead process on this host, and reports the ones it cannot judge.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let host = host_name();
        let dead = dir
            .path()
            .join(format!(".out{STAGING_MARK}{host}-{}-1x0", dead_pid()));
        let live = dir.path().join(format!(".out{STAGING_MARK}{host}-1-1x0")); // pid 1 always lives
        let foreign = dir.path().join(format!(
            ".out{STAGING_MARK}some-other-node-{}-1x0",
            dead_pid()
        ));
        let aside = dir.path().join(format!(
            ".out{STAGING_MARK}{host}-{}-1x0{ASIDE_SUFFIX}",
            dead_pid()
        ));
        let unrelated = dir
            .path()
            .join(format!(".other{STAGING_MARK}{host}-{}-1x0", dead_pid()));
        for d in [&dead, &live, &foreign, &aside, &unrelated] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("shard"), b"partial").unwrap();
        }
        let staged = StagedOutput::create(&target, OutputKind::Dir, Publish::Create).unwrap();
        assert!(!dead.exists(), "the dead run's staging dir is removed");
        let mut expected = vec![live.clone(), foreign.clone(), aside.clone()];
        expected.sort();
        assert_eq!(staged.stale_kept(), expected.as_slice());
        assert!(live.exists() && foreign.exists() && aside.exists() && unrelated.exists());
        staged.commit().unwrap();
    }

    #[test]
    fn staging_owner_parses_hosts_with_dashes() {
        assert_eq!(staging_owner("node-12-4242-77x0"), Some(("node-12", 4242)));
        assert_eq!(staging_owner("4242-77"), None);
        assert_eq!(staging_owner("h-x-77"), None);
    }

    #[test]
    fn created_parent_directories_are_synced_and_output_lands() {
        // Issue 11.10: parents created for an output are fsync'd (exercised: every level is
        // created and synced on the way down, and the commit syncs the last one).
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/c/out.json");
        write_file_atomic(&target, b"{}", Publish::Create).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        let e = write_file_atomic(&target, b"[]", Publish::Create).unwrap_err();
        assert!(matches!(e, Error::OutputExists { .. }));
        write_file_atomic(&target, b"[]", Publish::Replace).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"[]");
        assert_eq!(entries(&dir.path().join("a/b/c")), ["out.json"]);
        // An existing path is fine, and a file in the way is an error naming it.
        create_dir_all_synced(&dir.path().join("a/b")).unwrap();
        let e = create_dir_all_synced(&target.join("x")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
