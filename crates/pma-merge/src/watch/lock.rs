//! One watcher per state dir: an exclusive `flock` on `.pma-watch/lock`.
//!
//! `flock` locks are advisory. On a local filesystem they keep two watchers (even in different
//! containers) off one output. On a cluster filesystem they may be node-local:
//! - NFS: Linux emulates `flock` with NFS byte-range locks, cluster-wide only while the server's
//!   lock manager works; mounted with `nolock` or `local_lock=flock|all` the lock is node-local;
//! - Lustre: cluster-wide only with the `flock` mount option; `localflock` makes it node-local,
//!   and with neither `flock` fails (ENOSYS), which is reported as such.
//!
//! So two watchers on two nodes can both "hold" the lock. The lock is a guard against mistakes
//! on one machine, not a cluster-wide mutex.

use std::path::Path;

use super::state::io_error;
use crate::error::{Error, Result};

/// Takes an exclusive, non-blocking `flock` on `state_dir/lock`. Only `EWOULDBLOCK` means that
/// another watcher holds it; any other failure (no lock support on the filesystem, say) is
/// reported as what it is.
pub(super) fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, "opening", e))?;
    // SAFETY: flock on an fd we own; the lock goes with the fd (and with the process).
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(flock_error(path, std::io::Error::last_os_error()));
    }
    Ok(file)
}

fn flock_error(path: std::path::PathBuf, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Error::WatchLocked { path }
    } else {
        Error::WatchLockFailed { path, source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_reported_as_another_watcher() {
        let d = tempfile::tempdir().unwrap();
        let _held = lock_state_dir(d.path()).unwrap();
        let e = lock_state_dir(d.path()).unwrap_err();
        assert!(matches!(e, Error::WatchLocked { .. }), "{e}");
    }

    #[test]
    fn flock_errors_other_than_ewouldblock_are_not_reported_as_another_watcher() {
        for errno in [libc::ENOLCK, libc::EBADF, libc::EINVAL] {
            let e = flock_error("x/lock".into(), std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, Error::WatchLockFailed { .. }), "{e}");
            assert!(!e.to_string().contains("another pma watch"), "{e}");
        }
        let e = flock_error(
            "x/lock".into(),
            std::io::Error::from_raw_os_error(libc::EWOULDBLOCK),
        );
        assert!(matches!(e, Error::WatchLocked { .. }), "{e}");
    }
}
