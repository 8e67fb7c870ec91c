//! The `O_DIRECT` sink: an aligned staging buffer whose full blocks go to the device directly.
//!
//! Bypassing the page cache saves the copy into it and the dirty-page bookkeeping, and leaves
//! almost nothing for the final fsync. Only whole aligned blocks go this way; the unaligned tail
//! of a file goes through the page cache ([`super::stream::StreamWriter::finish`]).

use std::fs::File;
use std::path::Path;

/// Files at least this large are written with `O_DIRECT` where the filesystem allows it.
pub(crate) const DIRECT_MIN_BYTES: u64 = 16 << 20;
/// Size and alignment of the direct-I/O staging buffer.
pub(crate) const DIRECT_BUF_BYTES: usize = 8 << 20;
const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    pub(crate) len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN)
            .expect("constant layout is valid");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed) and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN)
            .expect("constant layout is valid");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The `O_DIRECT` side of a writer: bytes gather in an aligned buffer and go to the device in
/// large aligned writes, bypassing the page cache. That saves the copy into the cache and the
/// dirty-page bookkeeping, and the final fsync has almost nothing left to flush.
#[derive(Debug)]
pub(crate) struct DirectSink {
    pub(crate) file: File,
    pub(crate) buf: AlignedBuf,
    pub(crate) filled: usize,
}

impl DirectSink {
    /// Copies as much of `bytes` as fits into the buffer and advances `bytes` past it; returns
    /// whether the buffer is now full (the owner then writes it out).
    pub(crate) fn fill(&mut self, bytes: &mut &[u8]) -> bool {
        let n = (self.buf.len - self.filled).min(bytes.len());
        self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        *bytes = &bytes[n..];
        self.filled == self.buf.len
    }

    pub(crate) fn buf_slice(&self, n: usize) -> &[u8] {
        // SAFETY: ptr is valid for buf.len >= n initialised bytes.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr(), n) }
    }
}

pub(crate) fn sink_len_aligned(n: usize) -> usize {
    n / DIRECT_ALIGN * DIRECT_ALIGN
}

#[cfg(target_os = "linux")]
pub(crate) fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn open_direct(_path: &Path) -> Option<File> {
    None
}
