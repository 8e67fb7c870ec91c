//! torch.distributed.checkpoint (DCP) checkpoints, read in place.
//!
//! A DCP checkpoint is a directory with a `.metadata` pickle (the only index) and `.distcp`
//! files holding items back to back (`tests/fixtures/dcp/FORMAT.md` has the byte layout).
//! [`DcpCheckpoint::open`] decodes `.metadata` with the safe [`crate::pickle`] reader
//! ([`metadata`] interprets it), maps every `.distcp` file it names, and validates everything
//! before a single tensor byte is read:
//! - every named file exists and every byte range lies inside it;
//! - each tensor's chunks lie in its global shape and tile it exactly ([`chunks`]);
//! - each chunk's item is what `.metadata` says: a torch.save zip (`PK\x03\x04`) whose
//!   `data.pkl` rebuilds a tensor of the chunk's dtype and shape, with its storage entry large
//!   enough for the view; or, for `SerializationFormat.SAFETENSORS`, an entry of the file's
//!   safetensors blob named by the FQN whose `DCP_SHARDING_INFO.saved_offsets` are the chunk's.
//!
//! Each tensor entry then reads through [`TensorSource`] ([`source::ChunkedTensor`]): any box
//! of the global tensor, gathered from whichever chunks cover it, zero-copy when one chunk
//! holds the run contiguously. Members of a run may use different chunk layouts (a run
//! re-sharded from 2 to 4 ranks); since every source reads global coordinates, a merge over
//! them is exact whatever each member's layout.
//!
//! Entries are classified ([`EntryRole`]) so a merge can default to model weights: training
//! state (optimizer, scheduler, dataloader, train_state, RNG, Megatron `_extra_state` objects)
//! and every bytes entry are never averaged.
//!
//! ```no_run
//! use pma_format::dcp::{DcpCheckpoint, EntryRole};
//! use pma_format::{Region, TensorSource};
//! let ckpt = DcpCheckpoint::open(std::path::Path::new("run/step-100"))?;
//! let mut scratch = Vec::new();
//! for t in ckpt.tensors().filter(|t| t.role == EntryRole::Model) {
//!     let whole = Region::full(&t.shape);
//!     let bytes = t.read(&whole, 0..whole.numel(), &mut scratch)?;
//!     println!("{} {:?} {} bytes", t.fqn, t.dtype, bytes.len());
//! }
//! # Ok::<(), pma_format::Error>(())
//! ```

pub mod chunks;
pub mod metadata;
pub mod source;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use metadata::StorageLocation;
pub use source::{ChunkedTensor, MappedFile};

use crate::dtype::{dtype_bits, dtype_name};
use crate::error::{Error, Result};
use crate::header::{Header, MAX_HEADER_BYTES};
use crate::pickle;
use crate::region::{Region, TensorSource};
use crate::torch_save::{locate_view, open_archive_in, rebuild_tensor};
use crate::Dtype;
use metadata::RawEntry;
use source::StoredChunk;

/// The name of DCP's index file.
pub const METADATA_FILE: &str = ".metadata";

/// Whether an entry is a model weight (merged by default) or other training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryRole {
    /// A model weight or buffer.
    Model,
    /// Optimizer, scheduler, dataloader, train state, RNG state, framework extra state, or any
    /// bytes entry: never averaged by default.
    TrainingState,
}

/// First key components that name training state (torchtitan, OLMo-core, Megatron, ...).
const STATE_PREFIXES: [&str; 17] = [
    "optimizer",
    "optim",
    "optimizers",
    "train_state",
    "trainer",
    "dataloader",
    "data_loader",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "rng",
    "rng_state",
    "rng_states",
    "extra_state",
    "args",
    "checkpoint_version",
    "iteration",
];

/// Classifies a tensor key: training state if its first `.`-component (after a leading
/// `model.`, which accelerate and OLMo-core put on weights) is one of optimizer / optim /
/// train_state / dataloader / lr_scheduler / scheduler / rng / extra_state / ..., or if it holds
/// Megatron's `._extra_state` or `/shard_`; a model weight otherwise. This is the rule of
/// `tools/dcp_reference.py`, so pma merges exactly what the reference merges.
pub fn classify_key(key: &str) -> EntryRole {
    let key = key.strip_prefix("model.").unwrap_or(key);
    if key.contains("._extra_state") || key.contains("/shard_") {
        return EntryRole::TrainingState;
    }
    let first = key.split('.').next().unwrap_or(key);
    if STATE_PREFIXES.contains(&first) {
        EntryRole::TrainingState
    } else {
        EntryRole::Model
    }
}

/// A tensor entry of a DCP checkpoint: its metadata, chunk layout, and a [`TensorSource`].
#[derive(Debug, Clone)]
pub struct DcpTensor {
    /// The state-dict key (FQN).
    pub fqn: String,
    /// Element dtype (`TensorProperties.dtype`).
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
    /// The chunks, in `.metadata` order: each a box of the tensor and where its item is.
    pub chunks: Vec<DcpChunk>,
    /// Model weight or training state.
    pub role: EntryRole,
    source: Arc<ChunkedTensor>,
}

/// One chunk of a tensor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpChunk {
    /// The box of the global tensor this chunk holds.
    pub region: Region,
    /// The item that stores it.
    pub storage: StorageLocation,
}

/// A bytes entry (`BytesStorageMetadata`): opaque, never merged, copyable item by item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpBytes {
    /// The state-dict key.
    pub fqn: String,
    /// Where the item is.
    pub storage: StorageLocation,
}

/// One `.metadata` entry.
#[derive(Debug, Clone)]
pub enum DcpEntry {
    /// A tensor.
    Tensor(DcpTensor),
    /// A bytes item.
    Bytes(DcpBytes),
}

impl DcpEntry {
    /// The entry's key.
    pub fn fqn(&self) -> &str {
        match self {
            DcpEntry::Tensor(t) => &t.fqn,
            DcpEntry::Bytes(b) => &b.fqn,
        }
    }

    /// Model weight or training state (bytes entries are always training state).
    pub fn role(&self) -> EntryRole {
        match self {
            DcpEntry::Tensor(t) => t.role,
            DcpEntry::Bytes(_) => EntryRole::TrainingState,
        }
    }
}

impl DcpTensor {
    /// The tensor's reader, shareable across threads and outliving the checkpoint handle.
    pub fn source(&self) -> Arc<ChunkedTensor> {
        self.source.clone()
    }
}

impl TensorSource for DcpTensor {
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
        self.source.read(region, elems, scratch)
    }

    fn prefetch(&self, region: &Region, elems: Range<u64>) {
        self.source.prefetch(region, elems)
    }

    fn release(&self, region: &Region, elems: Range<u64>) {
        self.source.release(region, elems)
    }

    fn verify(&self) -> Result<()> {
        self.source.verify()
    }
}

/// An open, validated DCP checkpoint.
#[derive(Debug)]
pub struct DcpCheckpoint {
    dir: PathBuf,
    entries: Vec<DcpEntry>,
    by_fqn: HashMap<String, usize>,
    files: HashMap<String, Arc<MappedFile>>,
}

impl DcpCheckpoint {
    /// Opens the DCP checkpoint in `dir` (the directory holding `.metadata`), validating it as
    /// the module docs describe.
    pub fn open(dir: &Path) -> Result<DcpCheckpoint> {
        let md_path = dir.join(METADATA_FILE);
        if !crate::remote::probe_file(&md_path)? {
            return Err(Error::DcpNoMetadata { path: dir.into() });
        }
        let bytes = if crate::remote::is_url(&md_path) {
            // Ranged GETs of 8 MiB: `.metadata` is read whole, as from a local file.
            let mut bytes = Vec::new();
            crate::remote::download(&md_path, None, &mut bytes)?;
            bytes
        } else {
            std::fs::read(&md_path).map_err(|e| Error::io(&md_path, "reading", e))?
        };
        let value = pickle::parse(&bytes).map_err(|source| Error::Pickle {
            path: md_path.clone(),
            what: METADATA_FILE.into(),
            source,
        })?;
        drop(bytes);
        let raw = metadata::read_metadata(&md_path, &value)?;
        drop(value);

        let mut files: HashMap<String, Arc<MappedFile>> = HashMap::new();
        let mut blobs: HashMap<(String, u64), BlobHeader> = HashMap::new();
        let mut entries = Vec::with_capacity(raw.entries.len());
        for e in raw.entries {
            match e {
                RawEntry::Bytes { fqn } => {
                    let loc = raw.storage.get(&(fqn.clone(), None)).ok_or_else(|| {
                        Error::DcpMetadata {
                            path: md_path.clone(),
                            at: format!("storage_data['{fqn}']"),
                            reason: "bytes entry has no storage".into(),
                        }
                    })?;
                    open_range(dir, &mut files, loc, &fqn)?;
                    entries.push(DcpEntry::Bytes(DcpBytes {
                        fqn,
                        storage: loc.clone(),
                    }));
                }
                RawEntry::Tensor {
                    fqn,
                    dtype,
                    shape,
                    chunks,
                } => {
                    if dtype_bits(dtype) % 8 != 0 {
                        return Err(Error::DcpMetadata {
                            path: md_path.clone(),
                            at: format!("state_dict_metadata['{fqn}']"),
                            reason: format!("sub-byte dtype {}", dtype_name(dtype)),
                        });
                    }
                    chunks::check_coverage(&md_path, &fqn, &shape, &chunks)?;
                    let mut dcp_chunks = Vec::with_capacity(chunks.len());
                    let mut stored = Vec::with_capacity(chunks.len());
                    for region in chunks {
                        let loc = raw
                            .storage
                            .get(&(fqn.clone(), Some(region.offsets.clone())))
                            .ok_or_else(|| Error::DcpMetadata {
                                path: md_path.clone(),
                                at: format!("storage_data['{fqn}']"),
                                reason: format!("no storage for the chunk at {:?}", region.offsets),
                            })?;
                        let file = open_range(dir, &mut files, loc, &fqn)?;
                        let chunk = locate_chunk(&file, loc, &fqn, dtype, &region, &mut blobs);
                        // Parsing the item's zip touched its first and last pages, and a fault
                        // maps the whole folio around a page (2 MiB once the page cache holds
                        // large folios): left mapped, 300 items a file put 300 MiB in our RSS
                        // for a W8 member before the merge read a byte. Drop them now.
                        file.release_around(loc.offset..loc.offset + loc.length);
                        let chunk = chunk?;
                        stored.push(chunk);
                        dcp_chunks.push(DcpChunk {
                            region,
                            storage: loc.clone(),
                        });
                    }
                    let source = ChunkedTensor::new(fqn.clone(), dtype, shape.clone(), stored);
                    entries.push(DcpEntry::Tensor(DcpTensor {
                        role: classify_key(&fqn),
                        fqn,
                        dtype,
                        shape,
                        chunks: dcp_chunks,
                        source: Arc::new(source),
                    }));
                }
            }
        }
        let mut by_fqn = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if by_fqn.insert(e.fqn().to_string(), i).is_some() {
                return Err(Error::DuplicateTensor {
                    path: md_path,
                    tensor: e.fqn().into(),
                });
            }
        }
        // What the per-item releases above left (bytes items, headers of SAFETENSORS blobs):
        // the jobs map what they read.
        for f in files.values() {
            f.release(0..f.len());
        }
        Ok(DcpCheckpoint {
            dir: dir.into(),
            entries,
            by_fqn,
            files,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every entry, in `.metadata` (plan) order.
    pub fn entries(&self) -> &[DcpEntry] {
        &self.entries
    }

    /// The tensor entries.
    pub fn tensors(&self) -> impl Iterator<Item = &DcpTensor> {
        self.entries.iter().filter_map(|e| match e {
            DcpEntry::Tensor(t) => Some(t),
            DcpEntry::Bytes(_) => None,
        })
    }

    /// The bytes entries.
    pub fn bytes_entries(&self) -> impl Iterator<Item = &DcpBytes> {
        self.entries.iter().filter_map(|e| match e {
            DcpEntry::Bytes(b) => Some(b),
            DcpEntry::Tensor(_) => None,
        })
    }

    /// The tensor entry `fqn`.
    pub fn tensor(&self, fqn: &str) -> Option<&DcpTensor> {
        match self.entries.get(*self.by_fqn.get(fqn)?)? {
            DcpEntry::Tensor(t) => Some(t),
            DcpEntry::Bytes(_) => None,
        }
    }

    /// The entry `fqn` (tensor or bytes).
    pub fn entry(&self, fqn: &str) -> Option<&DcpEntry> {
        self.entries.get(*self.by_fqn.get(fqn)?)
    }

    /// The raw bytes of an item (validated at open), to copy it verbatim into another
    /// checkpoint. `loc` must come from this checkpoint.
    pub fn item_bytes(&self, loc: &StorageLocation) -> Option<std::borrow::Cow<'_, [u8]>> {
        let f = self.files.get(&loc.relative_path)?;
        let end = loc.offset.checked_add(loc.length)?;
        f.read_at(loc.offset..end).ok()
    }

    /// The `.distcp` files this checkpoint uses (relative paths), sorted.
    pub fn data_files(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.files.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// Maps (once) the file of `loc` and checks the item's range lies inside it.
fn open_range(
    dir: &Path,
    files: &mut HashMap<String, Arc<MappedFile>>,
    loc: &StorageLocation,
    fqn: &str,
) -> Result<Arc<MappedFile>> {
    let file = match files.get(&loc.relative_path) {
        Some(f) => f.clone(),
        None => {
            let p = dir.join(&loc.relative_path);
            if !crate::remote::probe_file(&p)? {
                return Err(Error::DcpMissingFile {
                    path: dir.into(),
                    file: loc.relative_path.clone(),
                    entry: fqn.into(),
                });
            }
            let f = MappedFile::open(&p)?;
            files.insert(loc.relative_path.clone(), f.clone());
            f
        }
    };
    if loc
        .offset
        .checked_add(loc.length)
        .is_none_or(|e| e > file.len())
    {
        return Err(Error::DcpItemPastEnd {
            path: file.path().into(),
            entry: fqn.into(),
            offset: loc.offset,
            length: loc.length,
            file_bytes: file.len(),
        });
    }
    Ok(file)
}

/// A parsed safetensors blob of a SAFETENSORS-serialized file.
struct BlobHeader {
    header: Header,
    data_start: u64,
    /// FQN → saved offsets, from `DCP_SHARDING_INFO`.
    sharding: HashMap<String, Vec<u64>>,
}

fn item_mismatch(
    file: &MappedFile,
    fqn: &str,
    what: &'static str,
    expected: String,
    found: String,
) -> Error {
    Error::DcpItemMismatch {
        path: file.path().into(),
        tensor: fqn.into(),
        what,
        expected,
        found,
    }
}

/// Checks an item holds the dtype and chunk shape `.metadata` gives (`want`).
fn check_item(
    file: &MappedFile,
    fqn: &str,
    want: (Dtype, &[u64]),
    found: (Dtype, &[u64]),
) -> Result<()> {
    if want.0 != found.0 {
        return Err(item_mismatch(
            file,
            fqn,
            "dtype",
            dtype_name(want.0),
            dtype_name(found.0),
        ));
    }
    if want.1 != found.1 {
        return Err(item_mismatch(
            file,
            fqn,
            "chunk shape",
            format!("{:?}", want.1),
            format!("{:?}", found.1),
        ));
    }
    Ok(())
}

/// Finds where a chunk's elements are, by the item kind (its first 4 bytes).
fn locate_chunk(
    file: &Arc<MappedFile>,
    loc: &StorageLocation,
    fqn: &str,
    dtype: Dtype,
    region: &Region,
    blobs: &mut HashMap<(String, u64), BlobHeader>,
) -> Result<StoredChunk> {
    // SAFETENSORS serialization: the item offset is the start of the file's blob, shared by
    // its entries (parsed once; on a store, no request per entry).
    let key = (loc.relative_path.clone(), loc.offset);
    // The item's view (on a store, its windows: one or two GETs) tells its kind by its first
    // bytes and is then parsed, so the kind costs no request of its own.
    let view = match blobs.contains_key(&key) {
        true => None,
        false => Some(file.item_view(loc.offset, loc.length)?),
    };
    if let Some(view) = view.filter(|v| v.starts_with(b"PK\x03\x04")) {
        let what = format!("tensor '{fqn}' item at {}", loc.offset);
        let (archive, value) = open_archive_in(file, &view, &what)?;
        let t = rebuild_tensor(&value).map_err(|reason| Error::TorchSave {
            path: file.path().into(),
            key: fqn.into(),
            reason,
        })?;
        check_item(file, fqn, (dtype, &region.sizes), (t.dtype, &t.shape))?;
        let mut chunk = locate_view(file, loc.offset, &archive, &t, fqn)?;
        chunk.region = region.clone();
        return Ok(chunk);
    }
    if !blobs.contains_key(&key) {
        let blob = read_blob(file, loc.offset)?;
        blobs.insert(key.clone(), blob);
    }
    let blob = &blobs[&key];
    let info = blob
        .header
        .tensors
        .iter()
        .find(|t| t.name == fqn)
        .ok_or_else(|| {
            item_mismatch(
                file,
                fqn,
                "safetensors entry",
                fqn.into(),
                "no such entry".into(),
            )
        })?;
    check_item(file, fqn, (dtype, &region.sizes), (info.dtype, &info.shape))?;
    match blob.sharding.get(fqn) {
        Some(o) if *o == region.offsets => {}
        other => {
            return Err(item_mismatch(
                file,
                fqn,
                "DCP_SHARDING_INFO saved_offsets",
                format!("{:?}", region.offsets),
                other.map_or("none".into(), |o| format!("{o:?}")),
            ))
        }
    }
    let ndim = region.sizes.len();
    let mut strides = vec![1u64; ndim];
    for d in (0..ndim.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * region.sizes[d + 1];
    }
    Ok(StoredChunk {
        region: region.clone(),
        file: file.clone(),
        base: blob.data_start + info.begin,
        strides,
    })
}

fn read_blob(file: &MappedFile, offset: u64) -> Result<BlobHeader> {
    let path = file.path();
    // The blob's bytes from `offset` on, read in two steps (length, then header) so that a
    // remote blob costs two small GETs.
    let available = file.len().saturating_sub(offset);
    if available < 8 {
        return Err(Error::TooShort {
            path: path.into(),
            n_bytes: available,
        });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&file.read_at(offset..offset + 8)?);
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_BYTES {
        return Err(Error::HeaderTooLarge {
            path: path.into(),
            n_bytes: n,
            max_bytes: MAX_HEADER_BYTES,
        });
    }
    if n > available - 8 {
        return Err(Error::HeaderPastEnd {
            path: path.into(),
            header_bytes: n,
            file_bytes: file.len(),
        });
    }
    let header = Header::parse(path, &file.read_at(offset + 8..offset + 8 + n)?, n)?;
    if header.file_len() > available {
        return Err(Error::FileLength {
            path: path.into(),
            expected: offset + header.file_len(),
            found: file.len(),
        });
    }
    let malformed = |reason: String| Error::MalformedHeader {
        path: path.into(),
        reason,
    };
    let info = header
        .metadata
        .get("DCP_SHARDING_INFO")
        .ok_or_else(|| malformed("no DCP_SHARDING_INFO in __metadata__".into()))?;
    let parsed: HashMap<String, serde_json::Value> =
        serde_json::from_str(info).map_err(|e| malformed(format!("DCP_SHARDING_INFO: {e}")))?;
    let mut sharding = HashMap::with_capacity(parsed.len());
    for (k, v) in parsed {
        let offs = v
            .get("saved_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| malformed(format!("DCP_SHARDING_INFO['{k}'] has no saved_offsets")))?;
        sharding.insert(k, offs);
    }
    Ok(BlobHeader {
        data_start: offset + header.data_start(),
        header,
        sharding,
    })
}

/// Whether `dir` holds a complete DCP checkpoint: `.metadata` exists and every byte range it
/// names exists. Torch renames `.metadata` into place last, so a checkpoint still being
/// written fails this test. A malformed `.metadata` is an error, not "incomplete".
pub fn is_complete(dir: &Path) -> Result<bool> {
    match DcpCheckpoint::open(dir) {
        Ok(_) => Ok(true),
        Err(Error::DcpNoMetadata { .. })
        | Err(Error::DcpMissingFile { .. })
        | Err(Error::DcpItemPastEnd { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Resolves the DCP directory inside a framework's checkpoint directory: `path` itself if it
/// holds `.metadata`, else OLMo-core's `model_and_optim/` or accelerate's
/// `pytorch_model_fsdp_0/` inside it. `None` if none of these is a DCP directory.
pub fn find_dcp_dir(path: &Path) -> Option<PathBuf> {
    ["", "model_and_optim", "pytorch_model_fsdp_0"]
        .iter()
        .map(|sub| {
            if sub.is_empty() {
                path.to_path_buf()
            } else {
                path.join(sub)
            }
        })
        // On a store a HEAD request; a failing one (credentials, network) reads as "not
        // here", and the open that follows reports it.
        .find(|d| crate::remote::probe_file(&d.join(METADATA_FILE)).unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_reference_rule() {
        for k in [
            "tok_embeddings.weight",
            "model.layers.0.attention.wq.weight",
            "position_ids",
            "decoder.layers.mlp.linear_fc1.weight",
        ] {
            assert_eq!(classify_key(k), EntryRole::Model, "{k}");
        }
        for k in [
            "optimizer.state.tok_embeddings.weight.exp_avg",
            "optim.state.x",
            "model.optim.x",
            "train_state.step",
            "lr_scheduler.last_epoch",
            "dataloader.dp_rank_0",
            "decoder.layers.self_attention.linear_qkv._extra_state/shard_0.0_2.2",
        ] {
            assert_eq!(classify_key(k), EntryRole::TrainingState, "{k}");
        }
    }
}
