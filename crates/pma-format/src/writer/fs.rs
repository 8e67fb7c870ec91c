//! Durable small-file writes and filesystem queries shared by the writers.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes a small file and fsyncs it (at an object-store URL: uploads it).
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    if crate::remote::is_url(path) {
        // One PUT: the object is durable and whole when the store answers.
        let mut object = crate::remote::ObjectWriter::create(path)?;
        object.write(bytes)?;
        return object.finish().map(drop);
    }
    let mut f = File::create(path).map_err(|e| Error::io(path, "creating", e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(path, "writing", e))?;
    f.sync_all().map_err(|e| Error::io(path, "syncing", e))
}

/// Copies `src` to `dst` and fsyncs the copy.
pub fn copy_file_synced(src: &Path, dst: &Path) -> Result<()> {
    // Copy the bytes, not the mode: inputs are often read-only, the output should not be.
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, "reading", e))?;
    write_file_synced(dst, &bytes)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, "syncing directory", e))
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            path,
            "checking free space on",
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(
            path,
            "checking free space on",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether `path` exists as something other than an empty directory.
pub fn output_occupied(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => path.symlink_metadata().is_ok(),
    }
}
