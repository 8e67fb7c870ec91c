//! A validated, memory-mapped, read-only safetensors file.
//!
//! Tensor bytes are served straight from the mapping: an mmap'd read of page-cached data runs
//! several times faster than `read(2)`, which copies. Mapped pages count towards a process's RSS,
//! so a streaming consumer calls [`SafetensorsFile::release`] on ranges it has finished with; the
//! pages stay in the page cache but leave our address space, which keeps RSS flat whatever the
//! checkpoint size. [`SafetensorsFile::prefetch`] asks the kernel to start reading ahead, so that
//! on a cold cache the disk works while we compute.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};
use crate::header::{Header, TensorInfo};

/// An open safetensors file whose header has been validated against its length.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    mmap: Mmap,
}

impl SafetensorsFile {
    /// Opens `path` read-only, validates its header and length, and maps it.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let mut file = File::open(path).map_err(|e| Error::io(path, "opening", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "reading metadata of", e))?
            .len();
        let header = Header::read_from(path, &mut file, file_len)?;
        // SAFETY: the mapping is read-only. pma never writes its inputs, and the contract with
        // trainers (which write a checkpoint once, then only delete it) is that files are not
        // truncated in place while a merge reads them; deletion keeps the inode alive.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mapping", e))?;
        if mmap.len() as u64 != file_len {
            return Err(Error::FileLength {
                path: path.into(),
                expected: file_len,
                found: mmap.len() as u64,
            });
        }
        Ok(SafetensorsFile {
            path: path.into(),
            header,
            mmap,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensors in data-offset order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The bytes of `tensor` (which must come from this file's header).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        let range = self.absolute(tensor, 0..tensor.n_bytes());
        &self.mmap[range]
    }

    /// Asks the kernel to read `range` (relative to `tensor`'s bytes) ahead of use.
    pub fn prefetch(&self, tensor: &TensorInfo, range: Range<u64>) {
        let r = self.absolute(tensor, range);
        if r.is_empty() {
            return;
        }
        // Advice is a hint: failure changes speed, never results.
        let _ = self.mmap.advise_range(Advice::WillNeed, r.start, r.len());
    }

    /// Drops the whole pages inside `range` (relative to `tensor`'s bytes) from this process's
    /// address space. They stay in the page cache; a later access faults them back in.
    pub fn release(&self, tensor: &TensorInfo, range: Range<u64>) {
        let r = self.absolute(tensor, range);
        let page = page_size();
        let start = r.start.div_ceil(page) * page;
        let end = r.end / page * page;
        if end > start {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping only discards our page
            // table entries; the contents are re-read from the file on the next access, so no
            // slice we hand out can observe different bytes.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    fn absolute(&self, tensor: &TensorInfo, range: Range<u64>) -> Range<usize> {
        let base = self.header.data_start() + tensor.begin;
        debug_assert!(range.end <= tensor.n_bytes());
        // Header validation guarantees data_start + end <= file length == mmap length.
        (base + range.start) as usize..(base + range.end) as usize
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
