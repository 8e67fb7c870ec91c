//! Sleeping between polls, woken early by inotify where the kernel offers it.
//!
//! Polling is the contract: networked and parallel filesystems drop inotify events, so inotify
//! only ever shortens a wait, never replaces the timer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Waits for the next poll: a timer, with an inotify fd on the run dir where there is one.
pub(super) struct Wakeup {
    fd: Option<i32>,
}

impl Wakeup {
    pub(super) fn new(run_dir: &Path) -> Wakeup {
        Wakeup {
            fd: inotify_on(run_dir),
        }
    }

    /// Sleeps up to `interval`, returning early on `stop` or on a change in the run dir.
    pub(super) fn wait(&mut self, interval: Duration, stop: &AtomicBool) {
        // The config bounds the interval; a deadline past the clock's range still must not
        // panic, so it saturates to a day.
        let now = Instant::now();
        let deadline = now
            .checked_add(interval)
            .unwrap_or_else(|| now + Duration::from_secs(24 * 3600));
        const SLICE: Duration = Duration::from_millis(100);
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let slice = (deadline - now).min(SLICE);
            if self.changed_within(slice) {
                // Let the writer get a little further before looking.
                std::thread::sleep(SLICE.min(deadline.saturating_duration_since(Instant::now())));
                return;
            }
        }
    }

    fn changed_within(&mut self, d: Duration) -> bool {
        let Some(fd) = self.fd else {
            std::thread::sleep(d);
            return false;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; poll only writes `revents`.
        let rc = unsafe { libc::poll(&mut pfd, 1, d.as_millis() as libc::c_int) };
        if rc <= 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a local buffer from our own non-blocking fd.
        while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        true
    }
}

impl Drop for Wakeup {
    fn drop(&mut self) {
        if let Some(fd) = self.fd {
            // SAFETY: closing the fd we opened.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(target_os = "linux")]
fn inotify_on(dir: &Path) -> Option<i32> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: plain syscalls; the fd is closed on failure and in Drop.
    unsafe {
        let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;
        if libc::inotify_add_watch(fd, c.as_ptr(), mask) < 0 {
            libc::close(fd);
            return None;
        }
        Some(fd)
    }
}

#[cfg(not(target_os = "linux"))]
fn inotify_on(_dir: &Path) -> Option<i32> {
    None
}
