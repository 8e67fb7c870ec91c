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
pub mod dtype;
mod error;
pub mod file;
pub mod header;
pub mod region;
pub mod source;
pub mod writer;

pub use atomic::{write_file_atomic, OutputKind, Publish};
pub use checkpoint::{
    Checkpoint, Layout, ShardIndex, TensorRef, INDEX_FILE_NAME, SIDECAR_FILES, SINGLE_FILE_NAME,
};
pub use dtype::{DtypeClass, FloatDtype};
pub use error::{Error, Result};
pub use file::SafetensorsFile;
pub use header::{Header, TensorInfo, MAX_HEADER_BYTES};
pub use region::{Region, TensorSource};
pub use safetensors::Dtype;
pub use source::{LogicalTensor, SafetensorsTensor, TensorStore};
pub use writer::{
    available_bytes, copy_file_synced, encode_header, plan_shards, shard_file_name,
    write_file_synced, write_index, write_safetensors, DirectIo, StagedOutput, StreamWriter,
    TensorSpec,
};
