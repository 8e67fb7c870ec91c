//! A validated, memory-mapped, read-only safetensors file.
//!
//! Tensor bytes are served straight from the mapping: an mmap'd read of page-cached data runs
//! several times faster than `read(2)`, which copies. Mapped pages count towards a process's RSS,
//! so a streaming consumer calls [`SafetensorsFile::release`] on ranges it has finished with; the
//! pages stay in the page cache but leave our address space, which keeps RSS flat whatever the
//! checkpoint size. [`SafetensorsFile::prefetch`] asks the kernel to start reading ahead, so that
//! on a cold cache the disk works while we compute.
//!
//! A file on an object store ([`crate::remote`]) has no mapping: its header comes by two ranged
//! GETs through the same staged validation, and its tensor bytes by ranged GETs
//! ([`SafetensorsFile::read_remote`]), prefetch and release driving the downloads instead of
//! the kernel.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};
use crate::header::{Header, TensorInfo};

/// What a file was when it was opened: which inode, and its size and times, to tell later
/// whether it is still the file that was validated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStamp {
    /// Device of the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub n_bytes: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status-change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of an open file or of a path's metadata.
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            n_bytes: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// An open safetensors file whose header has been validated against its length.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    header: Header,
    stamp: FileStamp,
    backing: Backing,
}

/// Where a file's bytes are.
#[derive(Debug)]
enum Backing {
    /// A local file, mapped read-only.
    Mapped {
        // Declared before `mmap`: unregistered before the mapping goes (fields drop in order).
        guard: crate::fault::Registration,
        mmap: Mmap,
    },
    /// An object on an object store, read by ranged GETs.
    Remote(crate::remote::RemoteObject),
}

impl SafetensorsFile {
    /// Opens `path` read-only, validates its header and length, and maps it.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        if crate::remote::is_url(path) {
            return SafetensorsFile::open_remote(path);
        }
        let mut file = File::open(path).map_err(|e| Error::io(path, "opening", e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(path, "reading metadata of", e))?;
        let stamp = FileStamp::of(&meta);
        let file_len = meta.len();
        let header = Header::read_from(path, &mut file, file_len)?;
        // SAFETY: the mapping is read-only and pma never writes its inputs; deletion keeps the
        // inode alive. A trainer may still truncate the file in place: a read past the new end
        // then raises SIGBUS, which `fault` turns into zeros plus a recorded fault that
        // `check_faults` reports, so no caller trusts bytes read after a truncation.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mapping", e))?;
        if mmap.len() as u64 != file_len {
            return Err(Error::FileLength {
                path: path.into(),
                expected: file_len,
                found: mmap.len() as u64,
            });
        }
        let guard = crate::fault::register(mmap.as_ptr(), mmap.len());
        Ok(SafetensorsFile {
            path: path.into(),
            header,
            stamp,
            backing: Backing::Mapped { guard, mmap },
        })
    }

    /// Opens an object-store URL: a HEAD for the size, the header by two ranged GETs (its
    /// length, then the JSON), validated as a local file's is. Nothing else is read.
    fn open_remote(path: &Path) -> Result<SafetensorsFile> {
        let object = crate::remote::RemoteObject::open(path)?;
        let file_len = object.n_bytes();
        let header = Header::read_from(path, &mut object.reader(), file_len)?;
        Ok(SafetensorsFile {
            path: path.into(),
            header,
            stamp: FileStamp {
                n_bytes: file_len,
                ..FileStamp::default()
            },
            backing: Backing::Remote(object),
        })
    }

    /// Whether the bytes are on an object store (read them with
    /// [`SafetensorsFile::read_remote`]) rather than mapped.
    pub fn is_remote(&self) -> bool {
        matches!(self.backing, Backing::Remote(_))
    }

    /// Bytes `range` (relative to `tensor`'s bytes) of a remote file, by one ranged GET or
    /// from a prefetched download. A mapped file serves the same bytes from its mapping.
    pub fn read_remote(&self, tensor: &TensorInfo, range: Range<u64>) -> Result<bytes::Bytes> {
        let r = self.absolute(tensor, range);
        match &self.backing {
            Backing::Remote(object) => object.read_range(r.start as u64..r.end as u64),
            Backing::Mapped { mmap, .. } => Ok(bytes::Bytes::copy_from_slice(&mmap[r])),
        }
    }

    /// The inode, size and times the file had when it was opened and validated.
    pub fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// Fails if any read of this file's mapping hit a truncation (SIGBUS): every byte read from
    /// it since it was opened must then be treated as garbage. Call it after reading.
    pub fn check_faults(&self) -> Result<()> {
        let Backing::Mapped { guard, .. } = &self.backing else {
            return Ok(()); // ranged reads return the bytes or an error, never zeros
        };
        if guard.faulted() {
            return Err(Error::FileChangedWhileMapped {
                path: self.path.clone(),
            });
        }
        Ok(())
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

    /// The bytes of `tensor` (which must come from this file's header), straight from the
    /// mapping; `None` for a remote file, whose bytes come by [`SafetensorsFile::read_remote`].
    pub fn mapped_tensor_bytes(&self, tensor: &TensorInfo) -> Option<&[u8]> {
        let range = self.absolute(tensor, 0..tensor.n_bytes());
        match &self.backing {
            Backing::Mapped { mmap, .. } => Some(&mmap[range]),
            Backing::Remote(_) => None,
        }
    }

    /// The bytes of `tensor` (which must come from this file's header).
    ///
    /// # Panics
    /// On a remote file ([`SafetensorsFile::is_remote`]), which has no mapping: only code that
    /// opened local files (the lab, tests) calls this; merges read through
    /// [`crate::TensorSource`].
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        self.mapped_tensor_bytes(tensor)
            .expect("tensor_bytes is only called on local (mapped) files")
    }

    /// Asks the kernel to read `range` (relative to `tensor`'s bytes) ahead of use.
    pub fn prefetch(&self, tensor: &TensorInfo, range: Range<u64>) {
        let r = self.absolute(tensor, range);
        if r.is_empty() {
            return;
        }
        match &self.backing {
            // Advice is a hint: failure changes speed, never results.
            Backing::Mapped { mmap, .. } => {
                let _ = mmap.advise_range(Advice::WillNeed, r.start, r.len());
            }
            Backing::Remote(object) => object.prefetch(r.start as u64..r.end as u64),
        }
    }

    /// Drops the pages a read of `range` (relative to `tensor`'s bytes) mapped from this
    /// process's address space ([`unmap_read`]). They stay in the page cache; a later access
    /// faults them back in.
    pub fn release(&self, tensor: &TensorInfo, range: Range<u64>) {
        let r = self.absolute(tensor, range);
        match &self.backing {
            Backing::Mapped { mmap, .. } => unmap_read(mmap, r.start as u64..r.end as u64),
            Backing::Remote(object) => object.release(r.start as u64..r.end as u64),
        }
    }

    fn absolute(&self, tensor: &TensorInfo, range: Range<u64>) -> Range<usize> {
        let base = self.header.data_start() + tensor.begin;
        debug_assert!(range.end <= tensor.n_bytes());
        // Header validation guarantees data_start + end <= file length == mmap length.
        (base + range.start) as usize..(base + range.end) as usize
    }
}

/// The largest page-cache folio a fault may map at once on x86-64 and arm64 with 4 KiB pages
/// (a PMD, 2 MiB); folios are aligned to their size in the file.
pub(crate) const FOLIO_SPAN: u64 = 2 << 20;

/// Drops from our RSS every page a read inside `r` (file offsets) of `mmap` may have mapped,
/// not only those inside it. A fault maps the whole page-cache folio it hits (up to
/// [`FOLIO_SPAN`] on kernel 6.18, large folios being what readahead makes of a sequential
/// read), so a job's read maps up to 2 MiB beyond each end of its range, and dropping only the
/// range left those mapped: with 8 inputs and 8 jobs in flight per batch, a W8 DCP merge
/// peaked at 290-320 MiB RSS, against 114 MiB with the folios dropped whole (no slower:
/// `bench/dcp_bench.sh`). A neighbouring job still reading those pages faults them back in,
/// the same bytes from the page cache.
pub(crate) fn unmap_read(mmap: &Mmap, r: Range<u64>) {
    let start = r.start / FOLIO_SPAN * FOLIO_SPAN;
    let end = r
        .end
        .div_ceil(FOLIO_SPAN)
        .saturating_mul(FOLIO_SPAN)
        .min(mmap.len() as u64);
    if end > start {
        // SAFETY: MADV_DONTNEED on a read-only shared file mapping only discards our page
        // table entries; the contents are re-read from the file on the next access, so no
        // slice we hand out can observe different bytes. `start` is folio-, so page-aligned;
        // the kernel rounds the length up to the mapping's last page.
        let _ = unsafe {
            mmap.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dtype, TensorSpec};
    use std::collections::BTreeMap;

    #[test]
    fn truncated_under_the_mapping_died_with_sigbus() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("model.safetensors");
        let data: Vec<u8> = (0..1u32 << 20)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let spec = TensorSpec {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![1 << 20],
        };
        crate::write_safetensors(&path, &[(spec, &data[..])], &BTreeMap::new()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        let t = f.tensors()[0].clone();
        assert_eq!(&f.tensor_bytes(&t)[..8], &data[..8]);
        f.check_faults().unwrap();
        // A trainer rewriting the file in place: open(O_TRUNC) from another handle.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.release(&t, 0..t.n_bytes());
        // Without the handler this read kills the test process with SIGBUS.
        let sum: u64 = f.tensor_bytes(&t).iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 0, "faulted pages read as zeros");
        let e = f.check_faults().unwrap_err();
        assert!(matches!(e, Error::FileChangedWhileMapped { .. }), "{e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        assert!(crate::fault::fault_count() > 0);
        // Another mapping of another file is unaffected.
        let other = d.path().join("other.safetensors");
        let spec = TensorSpec {
            name: "v".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        };
        crate::write_safetensors(&other, &[(spec, &[0u8; 8][..])], &BTreeMap::new()).unwrap();
        SafetensorsFile::open(&other)
            .unwrap()
            .check_faults()
            .unwrap();
    }
}
