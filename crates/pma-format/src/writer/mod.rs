//! Writing safetensors files and HF checkpoint directories: streaming, durable, never torn.
//!
//! - [`encode`]: tensor specs and the header encoding that goes first in every file;
//! - [`direct`]: the `O_DIRECT` sink large files go through;
//! - [`stream`]: [`StreamWriter`], one file written header first, then data in order;
//! - [`shards`]: HF shard planning, shard file names and the shard index;
//! - [`fs`]: durable small-file writes and free-space queries.
//!
//! Outputs are built in a staging path beside the target ([`crate::atomic::StagedOutput`]),
//! fsync'd, and renamed into place, so a reader sees either the old output or the complete new
//! one, never a mix.

pub(crate) mod direct;
pub mod encode;
pub mod fs;
pub mod shards;
pub mod stream;

pub use crate::atomic::StagedOutput;
pub use encode::{encode_header, TensorSpec};
pub use fs::{available_bytes, copy_file_synced, output_occupied, write_file_synced};
pub use shards::{plan_shards, shard_file_name, write_index};
pub use stream::{write_safetensors, DirectIo, StreamWriter};
