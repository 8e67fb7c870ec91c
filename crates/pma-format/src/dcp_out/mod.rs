//! Writing torch Distributed Checkpoint (DCP) directories that stock `dcp.load` reads.
//!
//! A DCP checkpoint is a directory of `.distcp` files, each a run of self-contained *items*,
//! and one `.metadata` pickle that says which item holds which chunk of which tensor (see
//! `shared/fixtures/dcp/FORMAT.md`). This module writes one from a [`DcpLayout`] decided up front
//! (for a merge: the newest member's chunk layout, so the trainer reloads with the same
//! parallelism), streaming each chunk's bytes through bounded buffers.
//!
//! **Why `TORCH_SAVE` items.** torch's default serialization makes every item a complete
//! `torch.save` zip. It is the only one torch's own `FileSystemReader` loads back (torch 2.15
//! cannot read its own `SAFETENSORS` serialization), and because the zip entries are *stored*,
//! an item's length is known before its data exists: [`DcpWriter::create`] lays out every file
//! and offset first, and then the data streams straight through, with only a CRC-32 computed on
//! the way and patched into one local header afterwards (`zip_emit`).
//!
//! **Why protocol 2.** The pickles (`.metadata` and each item's `data.pkl`) are emitted by a
//! minimal writer (`pickle_emit`) that needs no memo and no framing; protocol 2 is what torch
//! itself uses for `data.pkl`, and every Python 3 reads it. The object graph mirrors torch's own
//! (`metadata_emit`), with classes named by their torch module paths.
//!
//! **Why `.metadata` last.** `.metadata` is DCP's only index, and a checkpoint is complete when it
//! exists and every range it names exists. Like torch, [`DcpWriter::finish`] writes
//! `.metadata.tmp` after every data file is written and fsync'd, then renames it. A crash leaves
//! a directory without `.metadata`, which no loader mistakes for a checkpoint. The writer never
//! renames its directory: the caller stages it and publishes it after `finish`.
//!
//! **Verbatim items.** `--keep-state newest` copies optimizer, scheduler and dataloader entries
//! byte for byte from the newest member ([`VerbatimItem`]): each item is a self-contained
//! `torch.save` archive, so only its `_StorageInfo` changes. Megatron writes some bytes items raw
//! (not torch.save payloads); they are copied the same way, and Megatron's own loader reads them,
//! but stock `dcp.load` cannot (FORMAT.md §3).
//!
//! ```no_run
//! use pma_format::dcp_out::{DcpChunk, DcpLayout, DcpTensor, DcpWriter};
//! use pma_format::{Dtype, Region};
//! let layout = DcpLayout {
//!     tensors: vec![DcpTensor {
//!         fqn: "w".into(),
//!         dtype: Dtype::F32,
//!         shape: vec![2, 2],
//!         chunks: vec![DcpChunk { region: Region::full(&[2, 2]), file: "__0_0.distcp".into() }],
//!     }],
//!     ..DcpLayout::default()
//! };
//! let mut w = DcpWriter::create(std::path::Path::new("staging"), layout)?;
//! while let Some((t, c)) = w.next_chunk() {
//!     let (fqn, region) = (w.layout().tensors[t].fqn.clone(), w.layout().tensors[t].chunks[c].region.clone());
//!     w.begin_chunk(&fqn, &region)?;
//!     w.write(&[0u8; 16])?; // row-major bytes of the region, in any number of calls
//!     w.end_chunk()?;
//! }
//! let summary = w.finish()?;
//! # Ok::<(), pma_format::Error>(())
//! ```

mod metadata_emit;
mod pickle_emit;
mod zip_emit;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::dtype::dtype_bits;
use crate::error::{Error, Result};
use crate::writer::direct::{
    open_direct, sink_len_aligned, AlignedBuf, DirectSink, DIRECT_BUF_BYTES, DIRECT_MIN_BYTES,
};
use crate::writer::stream::DirectIo;
use crate::{Dtype, Region};

pub use metadata_emit::PlannerKey;
use metadata_emit::StorageLoc;
use metadata_emit::{emit_metadata, emit_tensor_pickle, torch_names, ChunkMeta, EntryMeta};
use zip_emit::{TensorItemZip, ZIP64_THRESHOLD};

/// The index file DCP loaders look for.
pub const METADATA_FILE_NAME: &str = ".metadata";
/// Where `.metadata` is written before its rename, as torch does.
const METADATA_TMP_NAME: &str = ".metadata.tmp";
/// Buffer between the chunk stream and each output file.
const FILE_BUF_BYTES: usize = 4 << 20;
/// Buffer for copying verbatim items.
const COPY_BUF_BYTES: usize = 1 << 20;
/// Bytes after which the writer asks the kernel to start write-back of what it has written, so
/// the disk works while the merge computes and the final fsync has little left (as `writer.rs`).
const WRITEBACK_WINDOW_BYTES: u64 = 32 << 20;

/// One chunk of an output tensor: its box in the global tensor and the file its item goes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpChunk {
    /// The box, in global coordinates.
    pub region: Region,
    /// The `.distcp` file name (a plain name inside the output directory, e.g. `__0_0.distcp`).
    pub file: String,
}

/// One tensor the caller streams: name, dtype, global shape and its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpTensor {
    /// The DCP key (flattened state-dict name).
    pub fqn: String,
    /// Element dtype (must have a torch storage class: floats, ints, `BOOL`).
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Chunks that tile the tensor exactly (no overlaps, no holes), in write order.
    pub chunks: Vec<DcpChunk>,
}

/// What a verbatim item holds, for its `.metadata` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerbatimKind {
    /// A bytes item (`BytesStorageMetadata`).
    Bytes,
    /// One chunk of a tensor (every chunk of the tensor is its own item, with the same fqn).
    Tensor {
        /// Element dtype.
        dtype: Dtype,
        /// Global shape of the tensor.
        shape: Vec<u64>,
        /// This chunk's box.
        region: Region,
    },
}

/// An item copied byte for byte from an input checkpoint (optimizer or scheduler state,
/// dataloader bytes); only its location in `.metadata` is new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbatimItem {
    /// The DCP key.
    pub fqn: String,
    /// Bytes or tensor chunk.
    pub kind: VerbatimKind,
    /// The input `.distcp` file.
    pub source: PathBuf,
    /// The item's offset in `source`.
    pub offset: u64,
    /// The item's length.
    pub length: u64,
    /// The output file it goes in.
    pub file: String,
}

/// Everything a DCP output will hold, decided before the first byte is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcpLayout {
    /// Tensors whose bytes the caller streams (in `.metadata` order).
    pub tensors: Vec<DcpTensor>,
    /// Items copied from inputs (after the tensors in `.metadata`).
    pub verbatim: Vec<VerbatimItem>,
    /// `planner_data` paths of nested keys (`optimizer.state.w.exp_avg` →
    /// `("optimizer", "state", "w", "exp_avg")`), as the input's `.metadata` has them. Keys not
    /// listed get the flat path `(fqn,)`. Only loaders that rebuild a nested dict from the
    /// checkpoint alone (`dcp_to_torch_save`) use them; `dcp.load` into a state dict does not.
    pub planner_paths: HashMap<String, Vec<PlannerKey>>,
}

/// What [`DcpWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpWriteSummary {
    /// Data files with their lengths, in write order (`.metadata` not included); with
    /// [`DcpWriter::write_only_files`], the selected ones.
    pub files: Vec<(String, u64)>,
    /// CRC-32 of each of `files`, computed from the bytes on their way to the file (never read
    /// back).
    pub checksums: Vec<u32>,
    /// Items written (tensor chunks and verbatim items).
    pub n_items: usize,
    /// Bytes of all data files plus `.metadata`.
    pub n_bytes: u64,
}

/// One item's place in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ItemRef {
    Chunk { tensor: usize, chunk: usize },
    Verbatim(usize),
}

#[derive(Debug, Clone)]
struct PlannedItem {
    item: ItemRef,
    file: usize,
    offset: u64,
    length: u64,
}

/// A tensor's element count and byte count, checked for overflow.
fn tensor_bytes(fqn: &str, dtype: Dtype, shape: &[u64]) -> Result<u64> {
    let too_large = || Error::DcpTensorTooLarge {
        fqn: fqn.into(),
        shape: shape.to_vec(),
    };
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(too_large)?;
    numel
        .checked_mul(dtype_bits(dtype) / 8)
        .ok_or_else(too_large)
}

fn check_dtype(fqn: &str, dtype: Dtype) -> Result<()> {
    if torch_names(dtype).is_none() {
        return Err(Error::DcpUnsupportedDtype {
            fqn: fqn.into(),
            dtype,
        });
    }
    Ok(())
}

fn check_file_name(fqn: &str, file: &str) -> Result<()> {
    let plain = !file.is_empty()
        && file != "."
        && file != ".."
        && !file.contains(['/', '\\', '\0'])
        && file != METADATA_FILE_NAME
        && file != METADATA_TMP_NAME;
    if plain {
        Ok(())
    } else {
        Err(Error::DcpBadFileName {
            fqn: fqn.into(),
            file: file.into(),
        })
    }
}

/// Checks that `regions` tile a tensor of `shape` exactly: every box inside the shape, no two
/// boxes sharing an element, and their volumes summing to the tensor's element count (which,
/// with no overlaps, means no holes).
fn check_tiling(fqn: &str, shape: &[u64], regions: &[&Region]) -> Result<()> {
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::DcpTensorTooLarge {
            fqn: fqn.into(),
            shape: shape.to_vec(),
        })?;
    let mut covered = 0u64;
    for r in regions {
        if r.offsets.len() != shape.len() || r.sizes.len() != shape.len() {
            return Err(Error::DcpChunkRank {
                fqn: fqn.into(),
                shape: shape.to_vec(),
                offsets: r.offsets.clone(),
                sizes: r.sizes.clone(),
            });
        }
        let inside = r
            .offsets
            .iter()
            .zip(&r.sizes)
            .zip(shape)
            .all(|((&o, &s), &d)| o.checked_add(s).is_some_and(|end| end <= d));
        if !inside {
            return Err(Error::DcpChunkOutOfBounds {
                fqn: fqn.into(),
                shape: shape.to_vec(),
                offsets: r.offsets.clone(),
                sizes: r.sizes.clone(),
            });
        }
        // Inside the shape, so each volume is at most numel, but their sum can still overflow
        // when boxes overlap many times.
        covered = covered.saturating_add(r.numel());
    }
    // Sweep along dim 0: after sorting by offsets, box j can only meet box i while it starts
    // before i ends in dim 0, so each box is compared with its dim-0 neighbours only.
    let nonempty: Vec<&Region> = regions.iter().copied().filter(|r| r.numel() > 0).collect();
    if shape.is_empty() && nonempty.len() > 1 {
        return Err(Error::DcpChunkOverlap {
            fqn: fqn.into(),
            first: Vec::new(),
            second: Vec::new(),
        });
    }
    let mut order: Vec<&Region> = nonempty;
    order.sort_by(|a, b| a.offsets.cmp(&b.offsets));
    for (i, a) in order.iter().enumerate() {
        // 0-dim boxes have no dim 0; more than one of them was rejected above.
        let Some(a_end0) = a.offsets.first().map(|o| o + a.sizes[0]) else {
            break;
        };
        for b in &order[i + 1..] {
            if b.offsets[0] >= a_end0 {
                break;
            }
            let meet = a
                .offsets
                .iter()
                .zip(&a.sizes)
                .zip(b.offsets.iter().zip(&b.sizes))
                .all(|((&ao, &asz), (&bo, &bsz))| ao < bo + bsz && bo < ao + asz);
            if meet {
                return Err(Error::DcpChunkOverlap {
                    fqn: fqn.into(),
                    first: a.offsets.clone(),
                    second: b.offsets.clone(),
                });
            }
        }
    }
    if covered != numel || regions.is_empty() {
        return Err(Error::DcpChunkCoverage {
            fqn: fqn.into(),
            shape: shape.to_vec(),
            n_chunks: regions.len(),
            covered,
            numel,
        });
    }
    Ok(())
}

impl DcpLayout {
    /// Checks the layout without touching the disk: unique keys, dtypes
    /// torch can name, plain file names, and chunks that tile every tensor exactly.
    pub fn validate(&self) -> Result<()> {
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for t in &self.tensors {
            if seen.insert(&t.fqn, ()).is_some() {
                return Err(Error::DcpDuplicateEntry { fqn: t.fqn.clone() });
            }
            check_dtype(&t.fqn, t.dtype)?;
            tensor_bytes(&t.fqn, t.dtype, &t.shape)?;
            for c in &t.chunks {
                check_file_name(&t.fqn, &c.file)?;
            }
            let regions: Vec<&Region> = t.chunks.iter().map(|c| &c.region).collect();
            check_tiling(&t.fqn, &t.shape, &regions)?;
        }
        for group in self.verbatim_groups()? {
            let first = &self.verbatim[group[0]];
            if seen.insert(&first.fqn, ()).is_some() {
                return Err(Error::DcpDuplicateEntry {
                    fqn: first.fqn.clone(),
                });
            }
            for &i in &group {
                check_file_name(&first.fqn, &self.verbatim[i].file)?;
            }
            if let VerbatimKind::Tensor { dtype, shape, .. } = &first.kind {
                check_dtype(&first.fqn, *dtype)?;
                tensor_bytes(&first.fqn, *dtype, shape)?;
                let regions: Vec<&Region> = group
                    .iter()
                    .map(|&i| match &self.verbatim[i].kind {
                        VerbatimKind::Tensor { region, .. } => region,
                        VerbatimKind::Bytes => unreachable!("groups hold one kind"),
                    })
                    .collect();
                check_tiling(&first.fqn, shape, &regions)?;
            }
        }
        Ok(())
    }

    /// Validates the layout and plans it: every data file with its exact length, in write
    /// order, as [`DcpWriter::planned_files`] gives them (the same planner), without a
    /// directory.
    pub fn planned_files(&self) -> Result<Vec<(String, u64)>> {
        self.validate()?;
        let plan = plan_items(self, ZIP64_THRESHOLD)?;
        Ok(plan.files.into_iter().zip(plan.file_bytes).collect())
    }

    /// Verbatim item indices grouped by fqn, groups in order of first appearance. A bytes key
    /// has exactly one item; a tensor key has one per chunk, all of the same dtype and shape.
    fn verbatim_groups(&self) -> Result<Vec<Vec<usize>>> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let describe = |k: &VerbatimKind| match k {
            VerbatimKind::Bytes => "bytes".to_string(),
            VerbatimKind::Tensor { dtype, shape, .. } => format!("{dtype:?}{shape:?}"),
        };
        for (i, v) in self.verbatim.iter().enumerate() {
            match index.get(v.fqn.as_str()) {
                None => {
                    index.insert(&v.fqn, groups.len());
                    groups.push(vec![i]);
                }
                Some(&g) => {
                    let first = &self.verbatim[groups[g][0]];
                    let same = match (&first.kind, &v.kind) {
                        (
                            VerbatimKind::Tensor {
                                dtype: d1,
                                shape: s1,
                                ..
                            },
                            VerbatimKind::Tensor {
                                dtype: d2,
                                shape: s2,
                                ..
                            },
                        ) => d1 == d2 && s1 == s2,
                        (VerbatimKind::Bytes, VerbatimKind::Bytes) => {
                            return Err(Error::DcpDuplicateEntry { fqn: v.fqn.clone() })
                        }
                        _ => false,
                    };
                    if !same {
                        return Err(Error::DcpVerbatimMismatch {
                            fqn: v.fqn.clone(),
                            expected: describe(&first.kind),
                            found: describe(&v.kind),
                        });
                    }
                    groups[g].push(i);
                }
            }
        }
        Ok(groups)
    }
}

/// Every data file of a layout, its length, and every item's place: what [`DcpWriter`] writes
/// and `.metadata` records, decided before any byte exists.
#[derive(Debug)]
struct ItemPlan {
    files: Vec<String>,
    file_bytes: Vec<u64>,
    /// Items file by file (files in order of first appearance), each file's verbatim items
    /// first.
    items: Vec<PlannedItem>,
}

/// Plans a validated `layout`: the one planner behind [`DcpWriter::create`] and
/// [`DcpLayout::planned_files`].
fn plan_items(layout: &DcpLayout, threshold: u64) -> Result<ItemPlan> {
    // Files in order of first appearance: tensor chunks, then verbatim items.
    let mut files: Vec<String> = Vec::new();
    let mut file_index: HashMap<String, usize> = HashMap::new();
    let mut per_file: Vec<Vec<ItemRef>> = Vec::new();
    let mut add = |name: &str, item: ItemRef, files: &mut Vec<String>| {
        let i = *file_index.entry(name.to_string()).or_insert_with(|| {
            files.push(name.to_string());
            per_file.push(Vec::new());
            files.len() - 1
        });
        per_file[i].push(item);
    };
    for (t, tensor) in layout.tensors.iter().enumerate() {
        for (c, chunk) in tensor.chunks.iter().enumerate() {
            add(
                &chunk.file,
                ItemRef::Chunk {
                    tensor: t,
                    chunk: c,
                },
                &mut files,
            );
        }
    }
    for (v, item) in layout.verbatim.iter().enumerate() {
        add(&item.file, ItemRef::Verbatim(v), &mut files);
    }
    let mut items = Vec::new();
    let mut file_bytes = vec![0u64; files.len()];
    for (f, refs) in per_file.iter().enumerate() {
        let mut pos = 0u64;
        // Verbatim items of a file go first, like torch's BYTE_IO items: the writer copies
        // them when the file opens, before the caller's first chunk there.
        let verbatim_first = refs
            .iter()
            .filter(|i| matches!(i, ItemRef::Verbatim(_)))
            .chain(refs.iter().filter(|i| matches!(i, ItemRef::Chunk { .. })));
        for &item in verbatim_first {
            let length = match item {
                ItemRef::Verbatim(v) => layout.verbatim[v].length,
                ItemRef::Chunk { tensor, chunk } => {
                    let t = &layout.tensors[tensor];
                    chunk_zip(t, &t.chunks[chunk].region, threshold)
                        .0
                        .total_len()
                }
            };
            items.push(PlannedItem {
                item,
                file: f,
                offset: pos,
                length,
            });
            pos = pos
                .checked_add(length)
                .ok_or_else(|| Error::DcpTensorTooLarge {
                    fqn: files[f].clone(),
                    shape: Vec::new(),
                })?;
        }
        file_bytes[f] = pos;
    }
    Ok(ItemPlan {
        files,
        file_bytes,
        items,
    })
}

/// The file currently being written.
///
/// Large files go to the device with `O_DIRECT` where the filesystem allows it, as the
/// safetensors writer does ([`crate::writer::stream`]): bytes gather in an aligned buffer whose
/// full blocks bypass the page cache (perf of a W8 DCP merge showed the copy into the page cache,
/// `copy_folio_from_iter_atomic`, at 16-20% of all samples). A chunk's CRC is patched into its
/// local header after its bytes: in the buffer if the header is still there, otherwise through
/// the page cache. That write lands in a block wholly before the buffer's start (direct writes
/// are whole aligned blocks), so it never overlaps a later direct write, and the kernel keeps
/// the two paths coherent. The unaligned tail of a file goes through the page cache too.
#[derive(Debug)]
struct OpenFile {
    index: usize,
    path: PathBuf,
    out: BufWriter<File>,
    /// The `O_DIRECT` side; while it is set, bytes go there instead of `out`.
    direct: Option<DirectSink>,
    /// File offset of the first byte of `direct`'s buffer: every byte before it is written.
    direct_from: u64,
    /// Bytes handed to this file so far (the file offset of the next byte).
    pos: u64,
    /// File offset up to which write-back has been started.
    writeback_from: u64,
    /// CRC-32 of the file's final bytes so far: fed by the writer item by item (a chunk's
    /// header only once its CRC is patched in), never by reading the file back.
    crc: crc32fast::Hasher,
}

impl OpenFile {
    /// Appends `bytes` at the end of the file.
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let mut rest = bytes;
        while let Some(sink) = self.direct.as_mut() {
            if rest.is_empty() {
                break;
            }
            if sink.fill(&mut rest) {
                let full = sink.filled;
                self.flush_direct(full)?;
            }
        }
        self.out
            .write_all(rest)
            .map_err(|e| Error::io(&self.path, "writing", e))?;
        self.pos += bytes.len() as u64;
        if self.direct.is_none() {
            self.start_writeback_if_due();
        }
        Ok(())
    }

    /// Writes the first `n` (aligned) bytes of the direct buffer; on a filesystem that refuses
    /// `O_DIRECT`, writes the whole buffer through the page cache instead and stays there.
    fn flush_direct(&mut self, n: usize) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let Some(sink) = self.direct.as_mut() else {
            return Ok(());
        };
        match sink.file.write_all_at(sink.buf_slice(n), self.direct_from) {
            Ok(()) => {
                sink.buf.as_mut_slice().copy_within(n..sink.filled, 0);
                sink.filled -= n;
                self.direct_from += n as u64;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let sink = self.direct.take().expect("checked above");
                let f = self.out.get_ref();
                f.write_all_at(sink.buf_slice(sink.filled), self.direct_from)
                    .map_err(|e| Error::io(&self.path, "writing", e))?;
                // Nothing went through `out` while the direct side was set: its buffer is empty.
                self.out
                    .seek(SeekFrom::Start(self.direct_from + sink.filled as u64))
                    .map_err(|e| Error::io(&self.path, "writing", e))?;
                self.writeback_from = self.direct_from;
                Ok(())
            }
            Err(e) => Err(Error::io(&self.path, "writing", e)),
        }
    }

    /// Overwrites `bytes` at `offset`, which is before the end of the file.
    fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let mut written = bytes.len();
        if let Some(sink) = self.direct.as_mut() {
            // Bytes before `direct_from` are on the device; the rest are still in the buffer.
            written = self
                .direct_from
                .saturating_sub(offset)
                .min(bytes.len() as u64) as usize;
            if written < bytes.len() {
                let at = (offset + written as u64 - self.direct_from) as usize;
                let tail = &bytes[written..];
                sink.buf.as_mut_slice()[at..at + tail.len()].copy_from_slice(tail);
            }
        } else {
            self.out
                .flush()
                .map_err(|e| Error::io(&self.path, "writing", e))?;
        }
        if written > 0 {
            self.out
                .get_ref()
                .write_all_at(&bytes[..written], offset)
                .map_err(|e| Error::io(&self.path, "writing", e))?;
        }
        Ok(())
    }

    /// Writes everything still buffered and makes the file durable; returns its length and
    /// CRC-32.
    fn finish(mut self) -> Result<(u64, u32)> {
        if let Some(sink) = self.direct.as_ref() {
            let aligned = sink_len_aligned(sink.filled);
            self.flush_direct(aligned)?;
        }
        if let Some(sink) = self.direct.take() {
            self.out
                .get_ref()
                .write_all_at(sink.buf_slice(sink.filled), self.direct_from)
                .map_err(|e| Error::io(&self.path, "writing", e))?;
        }
        self.out
            .flush()
            .map_err(|e| Error::io(&self.path, "writing", e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, "syncing", e))?;
        Ok((self.pos, self.crc.finalize()))
    }

    /// Starts write-back of the bytes that have reached the kernel, once a window has built up.
    fn start_writeback_if_due(&mut self) {
        let in_kernel = self.pos - self.out.buffer().len() as u64;
        if in_kernel - self.writeback_from < WRITEBACK_WINDOW_BYTES {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a plain syscall on an fd we own. It is a hint: a failure only loses the
            // overlap, and the final fdatasync still makes everything durable.
            unsafe {
                libc::sync_file_range(
                    self.out.get_ref().as_raw_fd(),
                    self.writeback_from as libc::off64_t,
                    (in_kernel - self.writeback_from) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.writeback_from = in_kernel;
    }
}

/// The tensor chunk between `begin_chunk` and `end_chunk`.
#[derive(Debug)]
struct ActiveChunk {
    zip: TensorItemZip,
    /// Absolute file offset of the item.
    item_start: u64,
    expected: u64,
    written: u64,
    crc: crc32fast::Hasher,
}

/// Streams a DCP checkpoint into an existing (staging) directory, in the order of its layout.
///
/// Call order: [`DcpWriter::create`]; then for every chunk [`DcpWriter::next_chunk`] names, in
/// that order, [`DcpWriter::begin_chunk`], any number of [`DcpWriter::write`], and
/// [`DcpWriter::end_chunk`]; then [`DcpWriter::finish`]. Verbatim items are copied by the writer
/// itself as their files come up. Dropping the writer before `finish` leaves a directory without
/// `.metadata`, which is not a checkpoint. After any error the writer's state is unspecified:
/// drop it and discard the staging directory.
///
/// Memory is bounded whatever the chunk size: one 4 MiB file buffer, one 1 MiB copy buffer, and
/// the plan (a few words per item). A chunk's bytes stream through; only their CRC is kept.
#[derive(Debug)]
pub struct DcpWriter {
    dir: PathBuf,
    layout: DcpLayout,
    files: Vec<String>,
    file_bytes: Vec<u64>,
    /// Every item of the layout, file by file: where `.metadata` says it is.
    plan: Vec<PlannedItem>,
    /// Indices into `plan` of the items this writer writes, in order: all of them, or those of
    /// the files [`DcpWriter::write_only_files`] selected.
    order: Vec<usize>,
    /// Per file: whether this writer writes it.
    selected: Vec<bool>,
    /// Whether [`DcpWriter::finish`] writes `.metadata`: not after
    /// [`DcpWriter::write_only_files`], even when it selected every file (a part is never a
    /// checkpoint).
    writes_metadata: bool,
    /// Per file: the CRC-32 of its bytes, once it is closed.
    checksums: Vec<u32>,
    /// Index into `order` of the next item to write.
    next: usize,
    current: Option<OpenFile>,
    active: Option<ActiveChunk>,
    threshold: u64,
    direct_io: DirectIo,
}

impl DcpWriter {
    /// Validates `layout`, plans every file and item offset, and prepares to write into `dir`
    /// (which must exist; files are created as they come up and must not exist yet).
    pub fn create(dir: &Path, layout: DcpLayout) -> Result<DcpWriter> {
        DcpWriter::create_with_threshold(dir, layout, ZIP64_THRESHOLD)
    }

    /// [`DcpWriter::create`] with a ZIP64 threshold (tests force ZIP64 on small items).
    fn create_with_threshold(dir: &Path, layout: DcpLayout, threshold: u64) -> Result<DcpWriter> {
        layout.validate()?;
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, "opening", e))?;
        if !meta.is_dir() {
            return Err(Error::io(
                dir,
                "opening",
                std::io::ErrorKind::NotADirectory.into(),
            ));
        }
        // Every verbatim source range must exist before we write anything.
        for v in &layout.verbatim {
            let file_bytes = std::fs::metadata(&v.source)
                .map_err(|e| Error::io(&v.source, "opening", e))?
                .len();
            if v.offset
                .checked_add(v.length)
                .is_none_or(|end| end > file_bytes)
            {
                return Err(Error::DcpVerbatimRange {
                    path: v.source.clone(),
                    fqn: v.fqn.clone(),
                    offset: v.offset,
                    length: v.length,
                    file_bytes,
                });
            }
        }

        let ItemPlan {
            files,
            file_bytes,
            items: plan,
        } = plan_items(&layout, threshold)?;
        let order = (0..plan.len()).collect();
        let n_files = files.len();
        Ok(DcpWriter {
            dir: dir.to_path_buf(),
            layout,
            files,
            file_bytes,
            plan,
            order,
            selected: vec![true; n_files],
            writes_metadata: true,
            checksums: vec![0; n_files],
            next: 0,
            current: None,
            active: None,
            threshold,
            direct_io: DirectIo::Auto,
        })
    }

    /// Whether large files may bypass the page cache (default [`DirectIo::Auto`]: files of at
    /// least 16 MiB use `O_DIRECT` where the filesystem allows it). Both give identical files.
    pub fn set_direct_io(&mut self, direct_io: DirectIo) {
        self.direct_io = direct_io;
    }

    /// The layout being written.
    pub fn layout(&self) -> &DcpLayout {
        &self.layout
    }

    /// Every tensor chunk as `(tensor index, chunk index)` into [`DcpLayout::tensors`], in the
    /// order the writer expects them (file by file).
    /// With [`DcpWriter::write_only_files`], only the chunks of the selected files.
    pub fn chunk_order(&self) -> Vec<(usize, usize)> {
        self.order
            .iter()
            .filter_map(|&i| match self.plan[i].item {
                ItemRef::Chunk { tensor, chunk } => Some((tensor, chunk)),
                ItemRef::Verbatim(_) => None,
            })
            .collect()
    }

    /// The next chunk the writer expects, as `(tensor index, chunk index)`; `None` when every
    /// chunk has been written and only `finish` remains.
    pub fn next_chunk(&self) -> Option<(usize, usize)> {
        self.order[self.next..]
            .iter()
            .find_map(|&i| match self.plan[i].item {
                ItemRef::Chunk { tensor, chunk } => Some((tensor, chunk)),
                ItemRef::Verbatim(_) => None,
            })
    }

    /// Planned length of every data file, in write order (known before any byte is written).
    pub fn planned_files(&self) -> Vec<(String, u64)> {
        self.files
            .iter()
            .cloned()
            .zip(self.file_bytes.iter().copied())
            .collect()
    }

    fn order_error(&self, found: String) -> Error {
        let expected = match self.next_chunk() {
            Some((t, c)) => {
                let (t, c) = (&self.layout.tensors[t], &self.layout.tensors[t].chunks[c]);
                format!(
                    "chunk of '{}' at {:?} sizes {:?}",
                    t.fqn, c.region.offsets, c.region.sizes
                )
            }
            None => "finish (every chunk is written)".to_string(),
        };
        Error::DcpChunkOrder {
            path: self.dir.clone(),
            expected,
            found,
        }
    }

    /// The chunk being written got `found` bytes where its region holds `expected`.
    fn length_error(&self, expected: u64, found: u64) -> Error {
        let (t, c) = self
            .next_chunk()
            .expect("only called while a chunk is active");
        let tensor = &self.layout.tensors[t];
        Error::DcpChunkLength {
            path: self.dir.join(&tensor.chunks[c].file),
            fqn: tensor.fqn.clone(),
            offsets: tensor.chunks[c].region.offsets.clone(),
            expected,
            found,
        }
    }

    /// Makes `file` the open output file, closing (and fsyncing) the previous one.
    fn open_file(&mut self, file: usize) -> Result<()> {
        if self.current.as_ref().is_some_and(|c| c.index == file) {
            return Ok(());
        }
        self.close_file()?;
        let path = self.dir.join(&self.files[file]);
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "creating", e))?;
        let direct = (self.file_bytes[file] >= DIRECT_MIN_BYTES
            && self.direct_io == DirectIo::Auto)
            .then(|| open_direct(&path))
            .flatten()
            .map(|file| DirectSink {
                file,
                buf: AlignedBuf::new(DIRECT_BUF_BYTES),
                filled: 0,
            });
        // While the direct side takes the bytes, `out` only needs room for a small tail.
        let buf_bytes = if direct.is_some() { 0 } else { FILE_BUF_BYTES };
        self.current = Some(OpenFile {
            index: file,
            path,
            out: BufWriter::with_capacity(buf_bytes, f),
            direct,
            direct_from: 0,
            pos: 0,
            writeback_from: 0,
            crc: crc32fast::Hasher::new(),
        });
        Ok(())
    }

    fn close_file(&mut self) -> Result<()> {
        if let Some(f) = self.current.take() {
            let index = f.index;
            let (n_bytes, crc) = f.finish()?;
            debug_assert_eq!(n_bytes, self.file_bytes[index]);
            self.checksums[index] = crc;
        }
        Ok(())
    }

    /// Copies verbatim items until the next planned item is a chunk (or the plan ends).
    fn copy_verbatim_items(&mut self) -> Result<()> {
        let mut buf = Vec::new();
        while let Some(p) = self.planned_item(self.next) {
            let ItemRef::Verbatim(v) = p.item else {
                break;
            };
            self.open_file(p.file)?;
            let item = &self.layout.verbatim[v];
            let src =
                File::open(&item.source).map_err(|e| Error::io(&item.source, "opening", e))?;
            buf.resize(COPY_BUF_BYTES.min(item.length as usize), 0);
            let cur = self.current.as_mut().expect("opened above");
            debug_assert_eq!(cur.pos, p.offset);
            let mut done = 0u64;
            while done < item.length {
                let n = (item.length - done).min(buf.len() as u64) as usize;
                src.read_exact_at(&mut buf[..n], item.offset + done)
                    .map_err(|e| Error::io(&item.source, "reading", e))?;
                cur.crc.update(&buf[..n]);
                cur.append(&buf[..n])?;
                done += n as u64;
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Starts the chunk of `fqn` at `region`, which must be [`DcpWriter::next_chunk`].
    pub fn begin_chunk(&mut self, fqn: &str, region: &Region) -> Result<()> {
        let found = || {
            format!(
                "begin_chunk('{fqn}', {:?} sizes {:?})",
                region.offsets, region.sizes
            )
        };
        if self.active.is_some() {
            return Err(self.order_error(format!("{} before end_chunk", found())));
        }
        self.copy_verbatim_items()?;
        let Some(p) = self.planned_item(self.next) else {
            return Err(self.order_error(found()));
        };
        let ItemRef::Chunk { tensor, chunk } = p.item else {
            unreachable!("copy_verbatim_items stops at a chunk");
        };
        let t = &self.layout.tensors[tensor];
        if t.fqn != fqn || &t.chunks[chunk].region != region {
            return Err(self.order_error(found()));
        }
        let (zip, expected) = chunk_zip(t, region, self.threshold);
        debug_assert_eq!(zip.total_len(), p.length);
        self.open_file(p.file)?;
        let cur = self.current.as_mut().expect("opened above");
        debug_assert_eq!(cur.pos, p.offset);
        cur.append(zip.prefix())?;
        self.active = Some(ActiveChunk {
            zip,
            item_start: p.offset,
            expected,
            written: 0,
            crc: crc32fast::Hasher::new(),
        });
        Ok(())
    }

    /// Appends bytes of the current chunk: its region's elements in row-major order, in
    /// little-endian byte order, split into calls any way the caller likes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(active) = self.active.as_ref() else {
            return Err(self.order_error(format!("write of {} bytes outside a chunk", bytes.len())));
        };
        let total = active.written + bytes.len() as u64;
        if total > active.expected {
            return Err(self.length_error(active.expected, total));
        }
        let active = self.active.as_mut().expect("checked above");
        let cur = self
            .current
            .as_mut()
            .expect("a chunk is active only in an open file");
        active.crc.update(bytes);
        cur.append(bytes)?;
        active.written = total;
        Ok(())
    }

    /// Ends the current chunk: checks its length, writes the rest of its zip, and patches the
    /// storage entry's CRC into the local header.
    pub fn end_chunk(&mut self) -> Result<()> {
        let Some(active) = self.active.take() else {
            return Err(self.order_error("end_chunk without begin_chunk".into()));
        };
        if active.written != active.expected {
            return Err(self.length_error(active.expected, active.written));
        }
        let cur = self
            .current
            .as_mut()
            .expect("a chunk is active only in an open file");
        let data_crc = active.crc.clone();
        let crc = active.crc.finalize();
        let suffix = active.zip.suffix(crc);
        // The file's CRC: the header as it ends up (its CRC patched in), the data's CRC
        // combined in without hashing the data again, then the rest of the zip.
        let mut prefix = active.zip.prefix().to_vec();
        let at = active.zip.crc_field_offset() as usize;
        prefix[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        cur.crc.update(&prefix);
        cur.crc.combine(&data_crc);
        cur.crc.update(&suffix);
        cur.append(&suffix)?;
        cur.patch(
            active.item_start + active.zip.crc_field_offset(),
            &crc.to_le_bytes(),
        )?;
        self.next += 1;
        Ok(())
    }

    /// Copies the remaining verbatim items, fsyncs every data file, writes `.metadata` (via
    /// `.metadata.tmp`, fsync'd, renamed) and fsyncs the directory. Fails if a chunk is missing.
    ///
    /// With [`DcpWriter::write_only_files`] it writes no `.metadata`: the directory holds only
    /// some of the checkpoint's files, and must not look like a checkpoint.
    pub fn finish(mut self) -> Result<DcpWriteSummary> {
        if self.active.is_some() {
            return Err(self.order_error("finish inside a chunk".into()));
        }
        self.copy_verbatim_items()?;
        if self.next < self.order.len() {
            return Err(self.order_error("finish".into()));
        }
        // Files that hold nothing at all cannot occur: every file comes from an item.
        self.close_file()?;
        let metadata_bytes = if self.writes_metadata {
            self.write_metadata_file()?
        } else {
            sync_dir(&self.dir)?;
            0
        };
        let files = self.planned_files();
        let (files, checksums): (Vec<(String, u64)>, Vec<u32>) = files
            .into_iter()
            .zip(&self.checksums)
            .zip(&self.selected)
            .filter(|(_, &selected)| selected)
            .map(|((f, &crc), _)| (f, crc))
            .unzip();
        let data_bytes: u64 = files.iter().map(|(_, n)| n).sum();
        Ok(DcpWriteSummary {
            files,
            checksums,
            n_items: self.order.len(),
            n_bytes: data_bytes + metadata_bytes,
        })
    }

    /// Writes only `.metadata`, for a directory into which the layout's data files, written by
    /// other writers of the same layout (each with [`DcpWriter::write_only_files`]), have been
    /// gathered: the parts of a partitioned merge. `.metadata` depends only on the layout, so it
    /// is the one a single writer would have written. Checks first that every planned data
    /// file is there with its planned length. Returns `.metadata`'s length.
    pub fn write_metadata_only(self) -> Result<u64> {
        if self.next > 0 || self.current.is_some() || self.active.is_some() {
            return Err(self.order_error("write_metadata_only after writing items".into()));
        }
        for (name, &expected) in self.files.iter().zip(&self.file_bytes) {
            let path = self.dir.join(name);
            let found = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, "opening", e))?
                .len();
            if found != expected {
                return Err(Error::DcpFileLength {
                    path,
                    expected,
                    found,
                });
            }
        }
        self.write_metadata_file()
    }

    /// Writes `.metadata` via `.metadata.tmp` (fsync'd, renamed), as torch does, and fsyncs the
    /// directory. Returns its length.
    fn write_metadata_file(&self) -> Result<u64> {
        let metadata = self.metadata_bytes()?;
        let tmp = self.dir.join(METADATA_TMP_NAME);
        crate::writer::write_file_synced(&tmp, &metadata)?;
        let target = self.dir.join(METADATA_FILE_NAME);
        std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, "renaming into", e))?;
        sync_dir(&self.dir)?;
        Ok(metadata.len() as u64)
    }

    /// Restricts the writer to the data files named in `files` (some of
    /// [`DcpWriter::planned_files`]): only their items are written (their chunks, in
    /// [`DcpWriter::chunk_order`], and their verbatim items), at the offsets the whole layout
    /// gives them, so each file is byte for byte the one a writer of every file writes.
    /// [`DcpWriter::finish`] then writes no `.metadata`. Call before writing anything.
    pub fn write_only_files(&mut self, files: &[String]) -> Result<()> {
        if self.next > 0 || self.current.is_some() || self.active.is_some() {
            return Err(self.order_error("write_only_files after writing items".into()));
        }
        let mut selected = vec![false; self.files.len()];
        for name in files {
            let Some(i) = self.files.iter().position(|f| f == name) else {
                return Err(Error::DcpFileNotPlanned {
                    path: self.dir.clone(),
                    file: name.clone(),
                });
            };
            selected[i] = true;
        }
        self.order = (0..self.plan.len())
            .filter(|&i| selected[self.plan[i].file])
            .collect();
        self.selected = selected;
        self.writes_metadata = false;
        Ok(())
    }

    /// Item `k` of the items this writer writes.
    fn planned_item(&self, k: usize) -> Option<PlannedItem> {
        self.order.get(k).map(|&i| self.plan[i].clone())
    }

    fn metadata_bytes(&self) -> Result<Vec<u8>> {
        let mut locs: HashMap<ItemRef, StorageLoc> = HashMap::new();
        for p in &self.plan {
            locs.insert(
                p.item,
                StorageLoc {
                    file: self.files[p.file].clone(),
                    offset: p.offset,
                    length: p.length,
                },
            );
        }
        let mut entries = Vec::new();
        for (t, tensor) in self.layout.tensors.iter().enumerate() {
            entries.push(EntryMeta::Tensor {
                fqn: &tensor.fqn,
                dtype: tensor.dtype,
                shape: &tensor.shape,
                chunks: tensor
                    .chunks
                    .iter()
                    .enumerate()
                    .map(|(c, chunk)| ChunkMeta {
                        offsets: &chunk.region.offsets,
                        sizes: &chunk.region.sizes,
                        loc: locs[&ItemRef::Chunk {
                            tensor: t,
                            chunk: c,
                        }]
                            .clone(),
                    })
                    .collect(),
            });
        }
        for group in self.layout.verbatim_groups()? {
            let first = &self.layout.verbatim[group[0]];
            entries.push(match &first.kind {
                VerbatimKind::Bytes => EntryMeta::Bytes {
                    fqn: &first.fqn,
                    loc: locs[&ItemRef::Verbatim(group[0])].clone(),
                },
                VerbatimKind::Tensor { dtype, shape, .. } => EntryMeta::Tensor {
                    fqn: &first.fqn,
                    dtype: *dtype,
                    shape,
                    chunks: group
                        .iter()
                        .map(|&i| {
                            let VerbatimKind::Tensor { region, .. } = &self.layout.verbatim[i].kind
                            else {
                                unreachable!("groups hold one kind");
                            };
                            ChunkMeta {
                                offsets: &region.offsets,
                                sizes: &region.sizes,
                                loc: locs[&ItemRef::Verbatim(i)].clone(),
                            }
                        })
                        .collect(),
                },
            });
        }
        Ok(emit_metadata(&entries, |fqn| {
            self.layout.planner_paths.get(fqn).map(Vec::as_slice)
        }))
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "syncing directory", e))
}

/// The zip plan of one tensor chunk's item, and the chunk's data bytes.
fn chunk_zip(tensor: &DcpTensor, region: &Region, threshold: u64) -> (TensorItemZip, u64) {
    let (_, storage) = torch_names(tensor.dtype).expect("layout validated the dtype");
    let pickle = emit_tensor_pickle(storage, &region.sizes);
    // Validation bounds the region's bytes by the tensor's, which did not overflow.
    let n_bytes = region.numel() * (dtype_bits(tensor.dtype) / 8);
    (TensorItemZip::new(&pickle, n_bytes, threshold), n_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offsets: &[u64], sizes: &[u64]) -> Region {
        Region {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        }
    }

    fn tensor(fqn: &str, shape: &[u64], regions: &[Region]) -> DcpTensor {
        DcpTensor {
            fqn: fqn.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            chunks: regions
                .iter()
                .enumerate()
                .map(|(i, r)| DcpChunk {
                    region: r.clone(),
                    file: format!("__{i}_0.distcp"),
                })
                .collect(),
        }
    }

    fn layout(tensors: Vec<DcpTensor>) -> DcpLayout {
        DcpLayout {
            tensors,
            ..DcpLayout::default()
        }
    }

    #[test]
    fn column_blocks_and_grids_tile() {
        let cols: Vec<Region> = (0..4).map(|k| region(&[0, 4 * k], &[16, 4])).collect();
        layout(vec![tensor("wo", &[16, 16], &cols)])
            .validate()
            .unwrap();
        let grid = [
            region(&[0, 0], &[2, 3]),
            region(&[0, 3], &[2, 2]),
            region(&[2, 0], &[3, 3]),
            region(&[2, 3], &[3, 2]),
        ];
        layout(vec![tensor("g", &[5, 5], &grid)])
            .validate()
            .unwrap();
        layout(vec![tensor("s", &[], &[region(&[], &[])])])
            .validate()
            .unwrap();
    }

    #[test]
    fn overlapping_chunks_are_rejected() {
        let l = layout(vec![tensor(
            "w",
            &[4, 4],
            &[region(&[0, 0], &[3, 4]), region(&[2, 0], &[2, 4])],
        )]);
        assert!(matches!(
            l.validate(),
            Err(Error::DcpChunkOverlap { fqn, first, second })
                if fqn == "w" && first == [0, 0] && second == [2, 0]
        ));
        // Overlap only in a later dim, with a disjoint box sorted between them.
        let l = layout(vec![tensor(
            "w",
            &[4, 4],
            &[
                region(&[0, 0], &[4, 2]),
                region(&[0, 2], &[1, 2]),
                region(&[1, 1], &[3, 3]),
            ],
        )]);
        assert!(matches!(l.validate(), Err(Error::DcpChunkOverlap { .. })));
    }

    #[test]
    fn holes_out_of_bounds_and_rank_are_rejected() {
        let l = layout(vec![tensor("w", &[4, 4], &[region(&[0, 0], &[2, 4])])]);
        assert!(matches!(
            l.validate(),
            Err(Error::DcpChunkCoverage {
                covered: 8,
                numel: 16,
                ..
            })
        ));
        let l = layout(vec![tensor("w", &[4, 4], &[region(&[0, 2], &[4, 4])])]);
        assert!(matches!(
            l.validate(),
            Err(Error::DcpChunkOutOfBounds { .. })
        ));
        let l = layout(vec![tensor(
            "w",
            &[4, 4],
            &[region(&[u64::MAX, 0], &[2, 4])],
        )]);
        assert!(matches!(
            l.validate(),
            Err(Error::DcpChunkOutOfBounds { .. })
        ));
        let l = layout(vec![tensor("w", &[4, 4], &[region(&[0], &[4])])]);
        assert!(matches!(l.validate(), Err(Error::DcpChunkRank { .. })));
        let l = layout(vec![tensor("w", &[4], &[])]);
        assert!(matches!(
            l.validate(),
            Err(Error::DcpChunkCoverage { n_chunks: 0, .. })
        ));
        let l = layout(vec![tensor(
            "w",
            &[u64::MAX, 4],
            &[region(&[0, 0], &[1, 4])],
        )]);
        assert!(matches!(l.validate(), Err(Error::DcpTensorTooLarge { .. })));
    }

    #[test]
    fn dtype_names_and_keys_are_checked() {
        let mut t = tensor("f8", &[2], &[region(&[0], &[2])]);
        t.dtype = Dtype::F8_E4M3;
        assert!(matches!(
            layout(vec![t]).validate(),
            Err(Error::DcpUnsupportedDtype { fqn, .. }) if fqn == "f8"
        ));
        for bad in ["", "..", "a/b", ".metadata", ".metadata.tmp"] {
            let mut t = tensor("w", &[2], &[region(&[0], &[2])]);
            t.chunks[0].file = bad.into();
            assert!(matches!(
                layout(vec![t]).validate(),
                Err(Error::DcpBadFileName { file, .. }) if file == bad
            ));
        }
        let t = tensor("w", &[2], &[region(&[0], &[2])]);
        assert!(matches!(
            layout(vec![t.clone(), t]).validate(),
            Err(Error::DcpDuplicateEntry { fqn }) if fqn == "w"
        ));
    }

    #[test]
    fn verbatim_keys_are_checked() {
        let item = |fqn: &str, kind: VerbatimKind| VerbatimItem {
            fqn: fqn.into(),
            kind,
            source: "src".into(),
            offset: 0,
            length: 1,
            file: "__0_0.distcp".into(),
        };
        let mut l = layout(vec![tensor("w", &[2], &[region(&[0], &[2])])]);
        l.verbatim = vec![item("w", VerbatimKind::Bytes)];
        assert!(matches!(l.validate(), Err(Error::DcpDuplicateEntry { .. })));
        let t = |shape: &[u64], r: Region| VerbatimKind::Tensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            region: r,
        };
        l.verbatim = vec![
            item("m", t(&[4], region(&[0], &[2]))),
            item("m", t(&[5], region(&[2], &[2]))),
        ];
        assert!(matches!(
            l.validate(),
            Err(Error::DcpVerbatimMismatch { .. })
        ));
        l.verbatim = vec![
            item("m", t(&[4], region(&[0], &[2]))),
            item("m", t(&[4], region(&[2], &[2]))),
            item("b", VerbatimKind::Bytes),
        ];
        l.validate().unwrap();
        l.verbatim[1] = item("m", t(&[4], region(&[1], &[2])));
        assert!(matches!(l.validate(), Err(Error::DcpChunkOverlap { .. })));
    }

    #[test]
    fn writer_enforces_order_and_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(vec![tensor(
            "w",
            &[4, 2],
            &[region(&[0, 0], &[2, 2]), region(&[2, 0], &[2, 2])],
        )]);
        let mut w = DcpWriter::create(dir.path(), l.clone()).unwrap();
        assert_eq!(w.chunk_order(), [(0, 0), (0, 1)]);
        assert!(matches!(
            w.begin_chunk("w", &region(&[2, 0], &[2, 2])),
            Err(Error::DcpChunkOrder { .. })
        ));
        assert!(matches!(w.write(&[0; 4]), Err(Error::DcpChunkOrder { .. })));
        w.begin_chunk("w", &region(&[0, 0], &[2, 2])).unwrap();
        w.write(&[0; 10]).unwrap();
        assert!(matches!(
            w.write(&[0; 7]),
            Err(Error::DcpChunkLength {
                expected: 16,
                found: 17,
                ..
            })
        ));
        assert!(matches!(
            w.end_chunk(),
            Err(Error::DcpChunkLength {
                expected: 16,
                found: 10,
                ..
            })
        ));

        let dir = tempfile::tempdir().unwrap();
        let mut w = DcpWriter::create(dir.path(), l).unwrap();
        w.begin_chunk("w", &region(&[0, 0], &[2, 2])).unwrap();
        w.write(&[1; 16]).unwrap();
        w.end_chunk().unwrap();
        assert_eq!(w.next_chunk(), Some((0, 1)));
        assert!(matches!(w.finish(), Err(Error::DcpChunkOrder { .. })));
        assert!(!dir.path().join(METADATA_FILE_NAME).exists());
    }

    /// ZIP64 fields on every entry (threshold 0) of a real checkpoint: torch's miniz reader and
    /// Python's zipfile must both accept them, as they will on multi-GiB chunks. Needs torch
    /// (`PMA_PYTHON`); SKIPPED without it unless `PMA_REQUIRE_TORCH=1`.
    #[test]
    fn torch_loads_items_with_forced_zip64() {
        let py = std::env::var("PMA_PYTHON").unwrap_or_else(|_| "python3".into());
        let has_torch = std::process::Command::new(&py)
            .args(["-c", "import torch.distributed.checkpoint"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_torch {
            assert!(
                std::env::var("PMA_REQUIRE_TORCH").map_or(true, |v| v != "1"),
                "PMA_REQUIRE_TORCH=1 but '{py}' cannot import torch"
            );
            eprintln!("SKIPPED torch_loads_items_with_forced_zip64: '{py}' has no torch");
            return;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src_path = root.join("tests/fixtures/dcp_out/run-single-sma-n4.safetensors");
        let src = crate::SafetensorsFile::open(&src_path).unwrap();
        let tensors = src
            .tensors()
            .iter()
            .map(|t| DcpTensor {
                fqn: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                chunks: vec![DcpChunk {
                    region: Region::full(&t.shape),
                    file: "__0_0.distcp".into(),
                }],
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut w = DcpWriter::create_with_threshold(dir.path(), layout(tensors), 0).unwrap();
        for t in src.tensors() {
            w.begin_chunk(&t.name, &Region::full(&t.shape)).unwrap();
            w.write(src.tensor_bytes(t)).unwrap();
            w.end_chunk().unwrap();
        }
        w.finish().unwrap();
        let out = std::process::Command::new(&py)
            .arg(root.join("tests/dcp_out_check.py"))
            .arg("load")
            .arg(dir.path())
            .arg(&src_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn direct_and_cached_writes_give_identical_files() {
        // One 16 MiB+ file (large enough for O_DIRECT): a chunk longer than the direct buffer
        // (its CRC is patched after its header reached the device), small chunks (patched in
        // the buffer), and odd lengths, written in pieces that straddle the buffer's blocks.
        let chunk = |offset: u64, size: u64| DcpChunk {
            region: region(&[offset], &[size]),
            file: "__0_0.distcp".into(),
        };
        let big = (DIRECT_BUF_BYTES / 4 + 12_345) as u64;
        let tensors = vec![
            DcpTensor {
                fqn: "small".into(),
                dtype: Dtype::F32,
                shape: vec![3001],
                chunks: vec![chunk(0, 1000), chunk(1000, 2001)],
            },
            DcpTensor {
                fqn: "big".into(),
                dtype: Dtype::F32,
                shape: vec![2 * big],
                chunks: vec![chunk(0, big), chunk(big, big)],
            },
            DcpTensor {
                fqn: "odd".into(),
                dtype: Dtype::F32,
                shape: vec![777],
                chunks: vec![chunk(0, 777)],
            },
        ];
        let write = |direct_io: DirectIo| {
            let dir = tempfile::tempdir().unwrap();
            let mut w = DcpWriter::create(dir.path(), layout(tensors.clone())).unwrap();
            w.set_direct_io(direct_io);
            assert!(w.planned_files()[0].1 >= DIRECT_MIN_BYTES);
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            while let Some((t, c)) = w.next_chunk() {
                let tensor = &w.layout().tensors[t];
                let (fqn, r) = (tensor.fqn.clone(), tensor.chunks[c].region.clone());
                w.begin_chunk(&fqn, &r).unwrap();
                let mut left = r.numel() as usize * 4;
                while left > 0 {
                    let n = left.min(1_000_003);
                    let bytes: Vec<u8> = (0..n)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect();
                    w.write(&bytes).unwrap();
                    left -= n;
                }
                w.end_chunk().unwrap();
            }
            let planned = w.planned_files();
            let summary = w.finish().unwrap();
            let files: Vec<Vec<u8>> = planned
                .iter()
                .map(|(name, _)| std::fs::read(dir.path().join(name)).unwrap())
                .collect();
            // The CRC-32 computed on the way holds whichever path the bytes and patches took.
            let crcs: Vec<u32> = files.iter().map(|f| crc32fast::hash(f)).collect();
            assert_eq!(summary.checksums, crcs);
            (dir, files)
        };
        let (_d1, direct) = write(DirectIo::Auto);
        let (_d2, cached) = write(DirectIo::Off);
        assert_eq!(direct.len(), cached.len());
        for (a, b) in direct.iter().zip(&cached) {
            assert!(a == b, "files differ");
        }
    }

    /// Writes every chunk `w` expects, chunk `c` of tensor `t` filled with bytes `t·16 + c`.
    fn write_all_chunks(mut w: DcpWriter) -> DcpWriteSummary {
        while let Some((t, c)) = w.next_chunk() {
            let tensor = &w.layout().tensors[t];
            let (fqn, r) = (tensor.fqn.clone(), tensor.chunks[c].region.clone());
            w.begin_chunk(&fqn, &r).unwrap();
            w.write(&vec![(t * 16 + c) as u8; r.numel() as usize * 4])
                .unwrap();
            w.end_chunk().unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn writers_of_some_files_each_write_the_whole_writers_bytes() {
        let source = tempfile::tempdir().unwrap();
        let kept = source.path().join("kept.bin");
        std::fs::write(&kept, b"0123456789abcdef").unwrap();
        let mut l = layout(vec![
            tensor(
                "a",
                &[6, 2],
                &[region(&[0, 0], &[2, 2]), region(&[2, 0], &[4, 2])],
            ),
            tensor("b", &[3], &[region(&[0], &[3])]),
        ]);
        // A verbatim item in the second file: it travels with that file's writer.
        l.verbatim = vec![VerbatimItem {
            fqn: "state".into(),
            kind: VerbatimKind::Bytes,
            source: kept.clone(),
            offset: 4,
            length: 10,
            file: "__1_0.distcp".into(),
        }];
        let whole = tempfile::tempdir().unwrap();
        let w = DcpWriter::create(whole.path(), l.clone()).unwrap();
        let planned = w.planned_files();
        assert_eq!(l.planned_files().unwrap(), planned, "one planner");
        let summary = write_all_chunks(w);
        let names: Vec<String> = planned.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, ["__0_0.distcp", "__1_0.distcp"]);
        for ((name, _), crc) in summary.files.iter().zip(&summary.checksums) {
            let bytes = std::fs::read(whole.path().join(name)).unwrap();
            assert_eq!(crc32fast::hash(&bytes), *crc, "{name}");
        }

        let gathered = tempfile::tempdir().unwrap();
        for name in &names {
            let part = tempfile::tempdir().unwrap();
            let mut w = DcpWriter::create(part.path(), l.clone()).unwrap();
            w.write_only_files(std::slice::from_ref(name)).unwrap();
            let s = write_all_chunks(w);
            assert_eq!(s.files.len(), 1);
            assert!(!part.path().join(METADATA_FILE_NAME).exists());
            let bytes = std::fs::read(part.path().join(name)).unwrap();
            assert!(
                bytes == std::fs::read(whole.path().join(name)).unwrap(),
                "{name}"
            );
            assert_eq!(crc32fast::hash(&bytes), s.checksums[0], "{name}");
            std::fs::write(gathered.path().join(name), bytes).unwrap();
        }
        // One file missing: refused, naming it.
        let first = gathered.path().join(&names[0]);
        let held = std::fs::read(&first).unwrap();
        std::fs::write(&first, &held[1..]).unwrap();
        let w = DcpWriter::create(gathered.path(), l.clone()).unwrap();
        assert!(matches!(
            w.write_metadata_only(),
            Err(Error::DcpFileLength { path, .. }) if path == first
        ));
        std::fs::write(&first, &held).unwrap();
        let w = DcpWriter::create(gathered.path(), l.clone()).unwrap();
        w.write_metadata_only().unwrap();
        let meta = |d: &Path| std::fs::read(d.join(METADATA_FILE_NAME)).unwrap();
        assert!(meta(gathered.path()) == meta(whole.path()));

        let mut w = DcpWriter::create(whole.path(), l).unwrap();
        assert!(matches!(
            w.write_only_files(&["__9_0.distcp".to_string()]),
            Err(Error::DcpFileNotPlanned { file, .. }) if file == "__9_0.distcp"
        ));
    }

    #[test]
    fn writer_plans_lengths_and_writes_metadata_last() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(vec![tensor(
            "w",
            &[4, 2],
            &[region(&[0, 0], &[2, 2]), region(&[2, 0], &[2, 2])],
        )]);
        let mut w = DcpWriter::create(dir.path(), l).unwrap();
        let planned = w.planned_files();
        while let Some((t, c)) = w.next_chunk() {
            let r = w.layout().tensors[t].chunks[c].region.clone();
            w.begin_chunk("w", &r).unwrap();
            for _ in 0..16 {
                w.write(&[c as u8]).unwrap();
            }
            w.end_chunk().unwrap();
        }
        let summary = w.finish().unwrap();
        assert_eq!(summary.files, planned);
        assert_eq!(summary.n_items, 2);
        for (name, len) in &planned {
            let on_disk = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert_eq!(on_disk, *len, "{name}");
        }
        let meta = std::fs::read(dir.path().join(METADATA_FILE_NAME)).unwrap();
        assert!(meta.starts_with(b"\x80\x02"));
        assert!(!dir.path().join(METADATA_TMP_NAME).exists());
        let total: u64 = planned.iter().map(|f| f.1).sum::<u64>() + meta.len() as u64;
        assert_eq!(summary.n_bytes, total);
    }
}
