//! Reading any box of a logical tensor out of the chunks that store it.
//!
//! A [`ChunkedTensor`] is one member's view of one tensor: a set of chunks, each a box of the
//! global tensor whose elements sit in a memory-mapped file with their own element strides. DCP
//! tensors have one chunk per shard; a torch.save tensor is one chunk that covers the whole
//! tensor, possibly strided (column-major, a view into a larger storage). Chunks are validated
//! when built (in bounds of the file, tiling the tensor exactly), so a read never fails on
//! stored data, only on a caller asking for elements that do not exist.
//!
//! A read asks for the row-major elements `elems` of a [`Region`]. When one row-major chunk
//! holds them all contiguously (the common case: the merge cuts its jobs along the newest
//! member's chunks, or reads a Shard(0) tensor row-block by row-block), the read returns a
//! borrow of the mapping: no copy. Otherwise it gathers into the caller's scratch buffer, one
//! innermost-dimension run at a time (a `memcpy` when the chunk's last stride is 1, an element
//! gather otherwise), visiting only the chunks that intersect the bounding box of the asked
//! elements. Memory is therefore bounded by the element range the caller asks for, however
//! large a chunk is: a chunk bigger than any buffer streams through successive ranges.
//!
//! Data may start at any byte (DCP items are packed back to back), so everything is handled as
//! byte slices; no pointer is ever cast to a wider type.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap};

use super::chunks::{contains, intersect};
use crate::dtype::dtype_bits;
use crate::error::{Error, Result};
use crate::region::{Region, TensorSource};
use crate::Dtype;

/// A file mapped read-only, shared by every chunk stored in it; or an object on an object
/// store ([`crate::remote`]) read by ranged GETs, which has no mapping: its readers go through
/// [`MappedFile::read_at`], which borrows from a mapping and copies from a store.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    backing: Backing,
}

/// Where a [`MappedFile`]'s bytes are.
#[derive(Debug)]
enum Backing {
    Mapped {
        // Declared before `mmap`: unregistered before the mapping goes (fields drop in order).
        guard: crate::fault::Registration,
        mmap: Mmap,
    },
    Remote(crate::remote::RemoteObject),
}

impl MappedFile {
    /// Opens and maps `path` read-only; an object-store URL is opened for ranged reads.
    pub fn open(path: &Path) -> Result<Arc<MappedFile>> {
        if crate::remote::is_url(path) {
            return Ok(Arc::new(MappedFile {
                path: path.into(),
                backing: Backing::Remote(crate::remote::RemoteObject::open(path)?),
            }));
        }
        let file = File::open(path).map_err(|e| Error::io(path, "opening", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "reading metadata of", e))?
            .len();
        let mmap = if len == 0 {
            // Mapping an empty file fails on some systems; an empty map reads the same.
            memmap2::MmapOptions::new()
                .len(0)
                .map_anon()
                .map_err(|e| Error::io(path, "mapping", e))?
                .make_read_only()
                .map_err(|e| Error::io(path, "mapping", e))?
        } else {
            // SAFETY: read-only mapping of an input; as for `SafetensorsFile`, pma never writes
            // its inputs and trainers do not truncate a finished checkpoint in place.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mapping", e))?;
            // The pipeline reads each byte once, front to back, and drops its pages right after
            // (`release`). Marked sequential, dropping them skips the kernel's "page was
            // accessed" bookkeeping (an LRU move under a lock, per folio): that bookkeeping was
            // two thirds of `madvise(DONTNEED)`'s cost, a tenth of a warm W8 DCP merge's CPU.
            // Advice is a hint: failure changes speed, never results.
            let _ = mmap.advise(Advice::Sequential);
            mmap
        };
        // A trainer may truncate a `.distcp` or `.bin` under us: the fault module turns the
        // SIGBUS into zeros and a recorded fault that `check_faults` reports.
        let guard = crate::fault::register(mmap.as_ptr(), mmap.len());
        Ok(Arc::new(MappedFile {
            path: path.into(),
            backing: Backing::Mapped { guard, mmap },
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        match &self.backing {
            Backing::Mapped { mmap, .. } => mmap.len() as u64,
            Backing::Remote(object) => object.n_bytes(),
        }
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fails if a read of this mapping hit a truncation (see [`crate::fault`]).
    pub fn check_faults(&self) -> Result<()> {
        if let Backing::Mapped { guard, .. } = &self.backing {
            if guard.faulted() {
                return Err(Error::FileChangedWhileMapped {
                    path: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The whole mapping; `None` for an object on a store.
    pub fn mapped(&self) -> Option<&[u8]> {
        match &self.backing {
            Backing::Mapped { mmap, .. } => Some(mmap),
            Backing::Remote(_) => None,
        }
    }

    /// The bytes `range` of the file: borrowed from the mapping, or fetched (one ranged GET,
    /// or from blocks a prefetch announced). A range past the end is
    /// [`Error::TooShort`], naming the file.
    pub fn read_at(&self, range: Range<u64>) -> Result<std::borrow::Cow<'_, [u8]>> {
        if range.start > range.end || range.end > self.len() {
            return Err(Error::TooShort {
                path: self.path.clone(),
                n_bytes: self.len(),
            });
        }
        match &self.backing {
            Backing::Mapped { mmap, .. } => Ok(std::borrow::Cow::Borrowed(
                &mmap[range.start as usize..range.end as usize],
            )),
            Backing::Remote(object) => {
                Ok(std::borrow::Cow::Owned(object.read_range(range)?.to_vec()))
            }
        }
    }

    /// The item `[base, base + len)` for a parser that reads only a few structures of it (a
    /// torch.save zip: its end records and central directory, its local headers, `data.pkl`):
    /// the mapping itself, or for an object on a store its first [`ITEM_HEAD_BYTES`] and last
    /// [`ITEM_TAIL_BYTES`] fetched into an anonymous zero-filled map of the item's length.
    /// Pages of that map never written are never resident, so a multi-GB item costs two small
    /// GETs and no memory; a structure the parser looks for outside the fetched windows reads
    /// as zeros and fails its signature check (an error naming the file, never a wrong value).
    pub(crate) fn item_view(&self, base: u64, len: u64) -> Result<ItemView<'_>> {
        let end = base.checked_add(len).filter(|&e| e <= self.len());
        let Some(end) = end else {
            return Err(Error::TooShort {
                path: self.path.clone(),
                n_bytes: self.len(),
            });
        };
        if let Backing::Mapped { mmap, .. } = &self.backing {
            return Ok(ItemView::Mapped(&mmap[base as usize..end as usize]));
        }
        let mut view = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_anon()
            .map_err(|e| Error::io(&self.path, "mapping a view of", e))?;
        let (head, tail) = item_windows(len);
        view[..head as usize].copy_from_slice(&self.read_at(base..base + head)?);
        if tail > 0 {
            let from = len - tail;
            view[from as usize..].copy_from_slice(&self.read_at(base + from..end)?);
        }
        Ok(ItemView::Fetched(view))
    }

    fn prefetch(&self, r: Range<u64>) {
        let mmap = match &self.backing {
            Backing::Mapped { mmap, .. } => mmap,
            Backing::Remote(object) => return object.prefetch(r),
        };
        // On a warm cache the advice is pure cost: the kernel still looks up every 4 KiB page
        // of the range (5% of a warm W8 DCP merge's CPU, on the pipeline's serial prefetch
        // path). When the range's first and last pages are cached, the ones between (read
        // with them) almost always are too; a page that is not faults in when read.
        if r.start < r.end && !(self.is_cached(r.start) && self.is_cached(r.end - 1)) {
            // Advice is a hint: failure changes speed, never results.
            let _ = mmap.advise_range(
                Advice::WillNeed,
                r.start as usize,
                (r.end - r.start) as usize,
            );
        }
    }

    /// Whether the page holding byte `at` is in the page cache (mapped by us or not). A failed
    /// query answers no, so the caller prefetches.
    fn is_cached(&self, at: u64) -> bool {
        let Backing::Mapped { mmap, .. } = &self.backing else {
            return false;
        };
        if at >= self.len() {
            return false;
        }
        let page = page_size();
        let start = at / page * page;
        let mut vec = 0u8;
        // SAFETY: one page of our own live mapping, and a one-byte result vector for it.
        let rc = unsafe {
            libc::mincore(
                mmap.as_ptr().add(start as usize) as *mut libc::c_void,
                1,
                &mut vec,
            )
        };
        rc == 0 && vec & 1 == 1
    }

    /// Drops from our RSS what parsing bytes `r` mapped ([`crate::file::unmap_read`]); a
    /// remote object keeps nothing behind a parse.
    pub(crate) fn release_around(&self, r: Range<u64>) {
        if let Backing::Mapped { mmap, .. } = &self.backing {
            crate::file::unmap_read(mmap, r);
        }
    }

    /// Done with bytes `r`: a mapping drops the pages their read mapped
    /// ([`crate::file::unmap_read`]), a remote object the blocks that held them.
    pub(crate) fn release(&self, r: Range<u64>) {
        match &self.backing {
            Backing::Mapped { mmap, .. } => crate::file::unmap_read(mmap, r),
            Backing::Remote(object) => object.release(r),
        }
    }
}

/// The bytes of one item, see [`MappedFile::item_view`].
pub(crate) enum ItemView<'a> {
    Mapped(&'a [u8]),
    Fetched(memmap2::MmapMut),
}

impl std::ops::Deref for ItemView<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ItemView::Mapped(b) => b,
            ItemView::Fetched(m) => m,
        }
    }
}

/// What [`MappedFile::item_view`] fetches of a remote item's start: torch.save writes
/// `data.pkl` (small: one tensor's pickle), `byteorder` and the storage's local header first.
/// An item no larger than both windows together comes in one GET.
pub(crate) const ITEM_HEAD_BYTES: u64 = 64 << 10;
/// ... and of its end: the trailing small records, the central directory and the end records
/// (within the last 64 KiB + 22 bytes, the end record's search range, and little before it).
pub(crate) const ITEM_TAIL_BYTES: u64 = 128 << 10;

/// How many bytes of an item of `len` bytes [`MappedFile::item_view`] fetches from its start
/// and from its end: at most [`ITEM_HEAD_BYTES`], then at most [`ITEM_TAIL_BYTES`] of the rest.
fn item_windows(len: u64) -> (u64, u64) {
    if len <= ITEM_HEAD_BYTES + ITEM_TAIL_BYTES {
        return (len, 0);
    }
    (ITEM_HEAD_BYTES, ITEM_TAIL_BYTES)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// One stored box of a tensor: where its element `[0, .., 0]` is and how it is strided.
#[derive(Debug, Clone)]
pub(crate) struct StoredChunk {
    /// The box in global coordinates.
    pub region: Region,
    /// The file holding the bytes.
    pub file: Arc<MappedFile>,
    /// Absolute byte offset in `file` of the chunk's first element.
    pub base: u64,
    /// Element strides of the stored layout, per dimension.
    pub strides: Vec<u64>,
}

impl StoredChunk {
    /// Byte extent `[base, base + span)` the chunk's elements reach, or `None` on overflow.
    /// Empty chunks reach nothing.
    pub(crate) fn span_bytes(&self, item_bytes: u64) -> Option<u64> {
        if self.region.sizes.contains(&0) {
            return Some(0);
        }
        let last = self
            .region
            .sizes
            .iter()
            .zip(&self.strides)
            .try_fold(0u64, |a, (&n, &s)| a.checked_add((n - 1).checked_mul(s)?))?;
        last.checked_add(1)?.checked_mul(item_bytes)
    }

    /// Whether the stored order is row-major over the chunk's own sizes (dims of size 1 may
    /// carry any stride).
    fn is_row_major(&self) -> bool {
        let mut expect = 1u64;
        for d in (0..self.strides.len()).rev() {
            let n = self.region.sizes[d];
            if n != 1 && self.strides[d] != expect {
                return false;
            }
            expect = expect.saturating_mul(n);
        }
        true
    }
}

/// A logical tensor stored as validated chunks; the [`TensorSource`] of DCP and torch.save
/// tensors. Cloning shares the mappings.
#[derive(Debug, Clone)]
pub struct ChunkedTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    item_bytes: u64,
    chunks: Vec<StoredChunk>,
    row_major: Vec<bool>,
}

impl ChunkedTensor {
    /// Builds a tensor from chunks the caller has validated: they tile `shape` exactly and each
    /// chunk's [`StoredChunk::span_bytes`] lies inside its file.
    pub(crate) fn new(
        name: String,
        dtype: Dtype,
        shape: Vec<u64>,
        chunks: Vec<StoredChunk>,
    ) -> Self {
        let row_major = chunks.iter().map(StoredChunk::is_row_major).collect();
        ChunkedTensor {
            name,
            dtype,
            shape,
            item_bytes: dtype_bits(dtype) / 8,
            chunks,
            row_major,
        }
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file holding the tensor's first stored chunk (named in errors).
    pub fn first_file(&self) -> Option<&Path> {
        self.chunks.first().map(|c| c.file.path())
    }

    /// The boxes the tensor is stored in (one per chunk), in stored order.
    pub fn chunk_regions(&self) -> impl Iterator<Item = &Region> {
        self.chunks.iter().map(|c| &c.region)
    }

    fn out_of_bounds(&self, region: &Region, elems: &Range<u64>) -> Error {
        Error::RegionOutOfBounds {
            tensor: self.name.clone(),
            shape: self.shape.clone(),
            region: Box::new(region.clone()),
            elems: elems.clone(),
        }
    }

    /// Checks the request and returns the global multi-indices of its first and last elements
    /// and its bounding box. `None` for an empty range.
    fn bounds(&self, region: &Region, elems: &Range<u64>) -> Result<Option<(Vec<u64>, Region)>> {
        let ndim = self.shape.len();
        let fits = region.offsets.len() == ndim
            && region.sizes.len() == ndim
            && (0..ndim).all(|d| {
                region.offsets[d]
                    .checked_add(region.sizes[d])
                    .is_some_and(|e| e <= self.shape[d])
            });
        // In bounds of the validated shape, so the product cannot overflow.
        if !fits || elems.start > elems.end || elems.end > region.numel() {
            return Err(self.out_of_bounds(region, elems));
        }
        if elems.start == elems.end {
            return Ok(None);
        }
        let first = unravel(elems.start, &region.sizes);
        let last = unravel(elems.end - 1, &region.sizes);
        let k = (0..ndim).find(|&d| first[d] != last[d]).unwrap_or(ndim);
        let mut bbox = Region {
            offsets: Vec::with_capacity(ndim),
            sizes: Vec::with_capacity(ndim),
        };
        for d in 0..ndim {
            let (o, n) = match d.cmp(&k) {
                std::cmp::Ordering::Less => (first[d], 1),
                std::cmp::Ordering::Equal => (first[d], last[d] - first[d] + 1),
                std::cmp::Ordering::Greater => (0, region.sizes[d]),
            };
            bbox.offsets.push(region.offsets[d] + o);
            bbox.sizes.push(n);
        }
        let first_global = first
            .iter()
            .zip(&region.offsets)
            .map(|(i, o)| i + o)
            .collect();
        Ok(Some((first_global, bbox)))
    }

    /// Element index (within the chunk's storage, from its base) of global index `g`.
    fn storage_index(chunk: &StoredChunk, g: &[u64]) -> u64 {
        g.iter()
            .zip(&chunk.region.offsets)
            .zip(&chunk.strides)
            .map(|((gi, o), s)| (gi - o) * s)
            .sum()
    }

    /// Absolute byte ranges of each intersecting chunk's data that a read of `bbox` touches.
    fn touched(&self, region: &Region, elems: Range<u64>) -> Vec<(&StoredChunk, Range<u64>)> {
        let Ok(Some((_, bbox))) = self.bounds(region, &elems) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (c, &rm) in self.chunks.iter().zip(&self.row_major) {
            let Some(i) = intersect(&c.region, &bbox) else {
                continue;
            };
            out.push((c, touch_range(c, rm, &i, self.item_bytes)));
        }
        out
    }
}

/// Absolute byte range of chunk `c`'s data that a read of its part `i` (an intersection with
/// the asked box) touches: tight for a row-major chunk, its whole span otherwise.
fn touch_range(c: &StoredChunk, row_major: bool, i: &Region, item_bytes: u64) -> Range<u64> {
    if row_major {
        let hi: Vec<u64> = i
            .offsets
            .iter()
            .zip(&i.sizes)
            .map(|(o, n)| o + n - 1)
            .collect();
        let a = ChunkedTensor::storage_index(c, &i.offsets) * item_bytes;
        let b = (ChunkedTensor::storage_index(c, &hi) + 1) * item_bytes;
        c.base + a..c.base + b
    } else {
        let span = c.span_bytes(item_bytes).unwrap_or(0);
        c.base..c.base + span
    }
}

/// Row-major multi-index of linear index `i` in a box of `sizes`.
fn unravel(mut i: u64, sizes: &[u64]) -> Vec<u64> {
    let mut idx = vec![0; sizes.len()];
    for d in (0..sizes.len()).rev() {
        idx[d] = i % sizes[d];
        i /= sizes[d];
    }
    idx
}

impl TensorSource for ChunkedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[u64] {
        &self.shape
    }

    fn read<'a>(
        &'a self,
        region: &Region,
        elems: Range<u64>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        let Some((first, bbox)) = self.bounds(region, &elems)? else {
            scratch.clear();
            return Ok(&scratch[..]);
        };
        let isz = self.item_bytes;
        let n = elems.end - elems.start;
        let ndim = self.shape.len();
        // Zero copy: one row-major chunk holds the whole run contiguously. Chunks do not
        // overlap, so at most one chunk contains the bounding box.
        if let Some(ci) = self.chunks.iter().position(|c| contains(&c.region, &bbox)) {
            let c = &self.chunks[ci];
            if self.row_major[ci] {
                let last_local = unravel(elems.end - 1, &region.sizes);
                let last: Vec<u64> = last_local
                    .iter()
                    .zip(&region.offsets)
                    .map(|(i, o)| i + o)
                    .collect();
                let s = Self::storage_index(c, &first);
                let e = Self::storage_index(c, &last);
                if e - s == n - 1 {
                    let range = c.base + s * isz..c.base + (e + 1) * isz;
                    if let Some(mapped) = c.file.mapped() {
                        return Ok(&mapped[range.start as usize..range.end as usize]);
                    }
                    scratch.clear();
                    scratch.extend_from_slice(&c.file.read_at(range)?);
                    return Ok(&scratch[..]);
                }
            }
        }
        scratch.clear();
        scratch.resize((n * isz) as usize, 0);
        if ndim == 0 {
            // Not reached (a 0-dim chunk is row-major and contains the scalar), kept total.
            let c = &self.chunks[0];
            scratch.copy_from_slice(&c.file.read_at(c.base..c.base + isz)?);
            return Ok(&scratch[..]);
        }
        // Row-major strides of the asked region, to place each run in the output.
        let mut rstride = vec![1u64; ndim];
        for d in (0..ndim - 1).rev() {
            rstride[d] = rstride[d + 1] * region.sizes[d + 1];
        }
        let inner = ndim - 1;
        for (c, &rm) in self.chunks.iter().zip(&self.row_major) {
            let Some(i) = intersect(&c.region, &bbox) else {
                continue;
            };
            // A mapping is read in place; a remote chunk's touched bytes are fetched once
            // (from the blocks the pipeline prefetched) and gathered from that copy.
            let (bytes, origin) = match c.file.mapped() {
                Some(m) => (std::borrow::Cow::Borrowed(m), 0),
                None => {
                    let r = touch_range(c, rm, &i, isz);
                    (c.file.read_at(r.clone())?, r.start)
                }
            };
            let run = i.sizes[inner];
            let last_stride = c.strides[inner];
            // Odometer over the outer dimensions of the intersection, one innermost run each.
            let mut g = i.offsets.clone();
            'rows: loop {
                let lin0: u64 = (0..ndim)
                    .map(|d| (g[d] - region.offsets[d]) * rstride[d])
                    .sum();
                let s = lin0.max(elems.start);
                let e = (lin0 + run).min(elems.end);
                if s < e {
                    let src0 = Self::storage_index(c, &g) + (s - lin0) * last_stride;
                    let dst = ((s - elems.start) * isz) as usize;
                    let count = e - s;
                    if last_stride == 1 || count == 1 {
                        let from = (c.base + src0 * isz - origin) as usize;
                        let len = (count * isz) as usize;
                        scratch[dst..dst + len].copy_from_slice(&bytes[from..from + len]);
                    } else {
                        let w = isz as usize;
                        for j in 0..count {
                            let from = (c.base + (src0 + j * last_stride) * isz - origin) as usize;
                            let at = dst + j as usize * w;
                            scratch[at..at + w].copy_from_slice(&bytes[from..from + w]);
                        }
                    }
                }
                let mut d = inner;
                loop {
                    if d == 0 {
                        break 'rows;
                    }
                    d -= 1;
                    g[d] += 1;
                    if g[d] < i.offsets[d] + i.sizes[d] {
                        break;
                    }
                    g[d] = i.offsets[d];
                }
            }
        }
        Ok(&scratch[..])
    }

    fn prefetch(&self, region: &Region, elems: Range<u64>) {
        for (c, r) in self.touched(region, elems) {
            c.file.prefetch(r);
        }
    }

    fn release(&self, region: &Region, elems: Range<u64>) {
        for (c, r) in self.touched(region, elems) {
            c.file.release(r);
        }
    }

    fn verify(&self) -> Result<()> {
        self.chunks.iter().try_for_each(|c| c.file.check_faults())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    /// xorshift64*: a tiny deterministic generator, so one proptest seed drives a whole layout.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random tensor of I32 elements whose value is their global row-major index, stored as
    /// a grid of chunks, each with its own random dimension order (row-major, column-major,
    /// anything between), packed into one file at odd (unaligned) offsets.
    fn random_tensor(seed: u64) -> (tempfile::NamedTempFile, ChunkedTensor) {
        let mut rng = Rng(seed | 1);
        let ndim = rng.below(4) as usize;
        let shape: Vec<u64> = (0..ndim).map(|_| 1 + rng.below(6)).collect();
        // Cut points per dim -> grid boxes.
        let cuts: Vec<Vec<u64>> = shape
            .iter()
            .map(|&n| {
                let mut c: Vec<u64> = (1..n).filter(|_| rng.below(3) == 0).collect();
                c.insert(0, 0);
                c.push(n);
                c
            })
            .collect();
        let mut boxes = vec![Region {
            offsets: vec![],
            sizes: vec![],
        }];
        for c in &cuts {
            let mut next = Vec::new();
            for b in &boxes {
                for w in c.windows(2) {
                    let mut nb = b.clone();
                    nb.offsets.push(w[0]);
                    nb.sizes.push(w[1] - w[0]);
                    next.push(nb);
                }
            }
            boxes = next;
        }
        let mut bytes = Vec::new();
        let mut placed = Vec::new();
        for b in boxes {
            bytes.push(0xAA); // misalign every chunk
            let base = bytes.len() as u64;
            // A random storage order of the dims: strides follow it.
            let mut order: Vec<usize> = (0..ndim).collect();
            for i in (1..ndim).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut strides = vec![0u64; ndim];
            let mut acc = 1;
            for &d in order.iter().rev() {
                strides[d] = acc;
                acc *= b.sizes[d];
            }
            let numel = b.numel();
            let mut data = vec![0u8; numel as usize * 4];
            for lin in 0..numel {
                let local = unravel(lin, &b.sizes);
                let s: u64 = local.iter().zip(&strides).map(|(i, s)| i * s).sum();
                let mut g = 0u64;
                for d in 0..ndim {
                    g = g * shape[d] + b.offsets[d] + local[d];
                }
                data[s as usize * 4..s as usize * 4 + 4].copy_from_slice(&(g as u32).to_le_bytes());
            }
            bytes.extend_from_slice(&data);
            placed.push((b, base, strides));
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.flush().unwrap();
        let file = MappedFile::open(f.path()).unwrap();
        let chunks = placed
            .into_iter()
            .map(|(region, base, strides)| StoredChunk {
                region,
                file: file.clone(),
                base,
                strides,
            })
            .collect();
        (f, ChunkedTensor::new("t".into(), Dtype::I32, shape, chunks))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn any_region_and_range_reads_the_right_elements(seed in any::<u64>(), pick in any::<u64>()) {
            let (_f, t) = random_tensor(seed);
            let shape = t.shape().to_vec();
            let mut rng = Rng(pick | 1);
            let mut region = Region { offsets: vec![], sizes: vec![] };
            for &n in &shape {
                let o = rng.below(n);
                region.offsets.push(o);
                region.sizes.push(1 + rng.below(n - o));
            }
            let n = region.numel();
            let a = rng.below(n + 1);
            let b = a + rng.below(n - a + 1);
            let mut scratch = Vec::new();
            let got = t.read(&region, a..b, &mut scratch).unwrap().to_vec();
            let mut want = Vec::new();
            for lin in a..b {
                let local = unravel(lin, &region.sizes);
                let mut g = 0u64;
                for d in 0..shape.len() {
                    g = g * shape[d] + region.offsets[d] + local[d];
                }
                want.extend_from_slice(&(g as u32).to_le_bytes());
            }
            prop_assert_eq!(got, want);
            t.prefetch(&region, a..b);
            t.release(&region, a..b);
        }
    }

    #[test]
    fn a_file_truncated_under_the_mapping_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("__0_0.distcp");
        let n: u64 = 1 << 20;
        let data: Vec<u8> = (0..n).flat_map(|i| (i as u32).to_le_bytes()).collect();
        std::fs::write(&path, &data).unwrap();
        let file = MappedFile::open(&path).unwrap();
        let chunk = StoredChunk {
            region: Region::full(&[n]),
            file,
            base: 0,
            strides: vec![1],
        };
        let t = ChunkedTensor::new("w".into(), Dtype::I32, vec![n], vec![chunk]);
        let full = Region::full(&[n]);
        let mut scratch = Vec::new();
        t.read(&full, 0..2, &mut scratch).unwrap();
        t.verify().unwrap();
        // A trainer rewriting the file in place (open with O_TRUNC).
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        t.release(&full, 0..n);
        // Without the fault handler this read kills the test process with SIGBUS.
        let got = t.read(&full, n - 4..n, &mut scratch).unwrap();
        assert!(got.iter().all(|&b| b == 0), "faulted pages read as zeros");
        let e = t.verify().unwrap_err();
        assert!(matches!(e, Error::FileChangedWhileMapped { .. }), "{e}");
        assert!(e.to_string().contains("__0_0.distcp"), "{e}");
    }

    #[test]
    fn cache_residency_is_read_per_page_and_past_the_end_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("__0_0.distcp");
        std::fs::write(&path, vec![7u8; 3 * 4096 + 5]).unwrap();
        // Reading the file puts every page in the page cache, whatever the filesystem.
        assert_eq!(std::fs::read(&path).unwrap().len(), 3 * 4096 + 5);
        let file = MappedFile::open(&path).unwrap();
        assert!(file.is_cached(0) && file.is_cached(3 * 4096 + 4));
        assert!(!file.is_cached(3 * 4096 + 5) && !file.is_cached(u64::MAX));
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(!MappedFile::open(empty.path()).unwrap().is_cached(0));
    }

    /// Regression: an item larger than both windows got no tail window, so the zip's end
    /// records (at its end) read as zeros.
    #[test]
    fn remote_item_windows_cover_the_start_and_the_end() {
        assert_eq!(item_windows(0), (0, 0));
        assert_eq!(item_windows(100), (100, 0));
        let both = ITEM_HEAD_BYTES + ITEM_TAIL_BYTES;
        assert_eq!(item_windows(both), (both, 0));
        assert_eq!(item_windows(both + 10), (ITEM_HEAD_BYTES, ITEM_TAIL_BYTES));
        assert_eq!(item_windows(100 << 20), (ITEM_HEAD_BYTES, ITEM_TAIL_BYTES));
    }

    #[test]
    fn empty_files_map_as_empty() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let m = MappedFile::open(f.path()).unwrap();
        assert!(m.is_empty() && m.mapped().is_some_and(|b| b.is_empty()));
    }

    #[test]
    fn out_of_bounds_requests_are_errors() {
        let (_f, t) = random_tensor(7);
        let shape = t.shape().to_vec();
        let mut scratch = Vec::new();
        let full = Region::full(&shape);
        let n = full.numel();
        assert!(matches!(
            t.read(&full, 0..n + 1, &mut scratch),
            Err(Error::RegionOutOfBounds { .. })
        ));
        let wrong_rank = Region {
            offsets: vec![0; shape.len() + 1],
            sizes: vec![1; shape.len() + 1],
        };
        assert!(t.read(&wrong_rank, 0..1, &mut scratch).is_err());
        assert!(t.read(&full, n..n, &mut scratch).unwrap().is_empty());
    }
}
