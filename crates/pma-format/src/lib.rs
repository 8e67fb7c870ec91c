//! `pma-format`: the safetensors format and HF checkpoint directories, with no ML dependencies.
//!
//! Its job is to get bytes in and out of checkpoints safely and fast. Reading validates every
//! header in stages ([`Header`]) and maps files read-only ([`SafetensorsFile`]); a [`Checkpoint`]
//! ties a single file or an index plus shards together and addresses tensors by name. Writing
//! streams a header and then data in order ([`StreamWriter`]), splits outputs into HF-style shards
//! ([`plan_shards`]), and stages outputs beside their target so they appear atomically
//! ([`StagedOutput`], [`write_file_atomic`]: the one atomic-write helper of every crate).
//! Merges read through the format-neutral [`TensorStore`] / [`TensorSource`] view, which
//! [`Checkpoint`] implements. [`dtype`] holds the exact f64 codecs every merge uses.
//!
//! Checkpoints written by training frameworks are read too, in place and without executing
//! anything: [`dcp`] opens torch.distributed.checkpoint directories ([`DcpCheckpoint`]: the
//! `.metadata` pickle through the safe [`pickle`] reader, items as torch.save zips via
//! [`torchzip`] or as a safetensors blob), and [`torch_save`] opens torch.save files
//! ([`TorchSaveCheckpoint`]: `pytorch_model.bin`, sharded `.bin` with its index, DeepSpeed and
//! Megatron-legacy `.pt`). Every tensor of either is a [`TensorSource`] over global
//! coordinates ([`ChunkedTensor`]), so members with different chunk layouts merge exactly, and
//! each entry carries an [`EntryRole`] (model weight or training state).
//!
//! ```no_run
//! use pma_format::Checkpoint;
//! let ckpt = Checkpoint::open(std::path::Path::new("run/step-0001000"))?;
//! for t in ckpt.tensors() {
//!     println!("{} {:?} {:?}", t.info.name, t.info.dtype, t.info.shape);
//! }
//! # Ok::<(), pma_format::Error>(())
//! ```
#![deny(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod dcp;
pub mod dcp_out;
pub mod dtype;
mod error;
pub mod fault;
pub mod file;
pub mod header;
pub mod layout;
pub mod member;
pub mod pickle;
pub mod region;
pub mod remote;
pub mod sidecar;
pub mod sidecar_policy;
pub mod source;
pub mod torch_save;
pub mod torchzip;
pub mod writer;

pub use atomic::{write_file_atomic, OutputKind, Publish};
pub use checkpoint::{
    Checkpoint, Layout, ShardIndex, TensorRef, INDEX_FILE_NAME, SIDECAR_FILES, SINGLE_FILE_NAME,
};
pub use dcp::{
    classify_key, find_dcp_dir, ChunkedTensor, DcpBytes, DcpCheckpoint, DcpChunk, DcpEntry,
    DcpTensor, EntryRole, StorageLocation,
};
pub use dtype::{DtypeClass, FloatDtype};
pub use error::{Error, Result};
pub use file::{FileStamp, SafetensorsFile};
pub use header::{Header, TensorInfo, MAX_HEADER_BYTES};
pub use layout::{detect_checkpoint, CheckpointFormat, DetectedCheckpoint, Framework};
pub use member::{AnyCheckpoint, StoreEntry};
pub use region::{Region, TensorSource};
pub use remote::{is_url, DirEntry, EntryKind, PublishReport};
pub use safetensors::Dtype;
pub use sidecar::{copy_sidecar, read_sidecar};
pub use sidecar_policy::{
    plan_sidecars, Sidecar, SidecarKind, SidecarPlan, SkipReason, SkippedSidecar,
};
pub use source::{LogicalTensor, SafetensorsTensor, TensorStore};
pub use torch_save::{TorchSaveCheckpoint, TorchSaveFile, TorchSaveTensor};
pub use writer::{
    available_bytes, copy_file_synced, encode_header, plan_shards, shard_file_name,
    write_file_synced, write_index, write_safetensors, DirectIo, StagedOutput, StreamWriter,
    TensorSpec,
};
