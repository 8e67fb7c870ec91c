//! The one error type of `pma-format`.
//!
//! Every variant names the file (and the tensor where there is one) and says what was expected
//! against what was found, because the user's next step is to go and look at that file.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing safetensors files and HF checkpoint dirs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An OS-level I/O failure.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What we were doing (`opening`, `reading header`, ...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header-length prefix.
    #[error("{}: file is {n_bytes} bytes, too short to hold a safetensors header length", path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        n_bytes: u64,
    },
    /// The header length prefix exceeds [`crate::MAX_HEADER_BYTES`].
    #[error("{}: header claims {n_bytes} bytes, more than the {max_bytes}-byte limit", path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The claimed header length.
        n_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error("{}: header claims {header_bytes} bytes but the file has only {file_bytes} (truncated?)", path.display())]
    HeaderPastEnd {
        /// The file.
        path: PathBuf,
        /// The claimed header length.
        header_bytes: u64,
        /// The file length.
        file_bytes: u64,
    },
    /// The header is not valid UTF-8 JSON of the expected shape.
    #[error("{}: malformed header: {reason}", path.display())]
    MalformedHeader {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A dtype string that is not in the safetensors spec at all.
    #[error("{}: tensor '{tensor}': unknown dtype '{dtype}'", path.display())]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// `shape` × dtype size overflows or disagrees with `data_offsets`.
    #[error("{}: tensor '{tensor}': shape {shape:?} of {dtype:?} needs {} bytes but data_offsets span {found}", path.display(), expected.map_or_else(|| "an overflowing number of".to_string(), |b| b.to_string()))]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its declared shape.
        shape: Vec<u64>,
        /// Its dtype.
        dtype: safetensors::Dtype,
        /// numel × dtype size (`None` on overflow).
        expected: Option<u64>,
        /// end − begin.
        found: u64,
    },
    /// `data_offsets` are reversed, overlap another tensor, leave a hole, or run past the file.
    #[error("{}: tensor '{tensor}': bad data_offsets [{begin}, {end}]: {reason}", path.display())]
    BadOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Declared begin.
        begin: u64,
        /// Declared end.
        end: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file length disagrees with the header (truncated or trailing garbage).
    #[error("{}: file is {found} bytes but its header describes {expected} (truncated or padded)", path.display())]
    FileLength {
        /// The file.
        path: PathBuf,
        /// 8 + header + data bytes.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// A checkpoint directory has neither `model.safetensors` nor an index.
    #[error("{}: not a checkpoint: no model.safetensors or model.safetensors.index.json", path.display())]
    NotACheckpoint {
        /// The directory.
        path: PathBuf,
    },
    /// The index's `weight_map` names a shard that does not exist.
    #[error("{}: index names shard '{shard}' (for tensor '{tensor}') which does not exist", path.display())]
    MissingShard {
        /// The index file.
        path: PathBuf,
        /// The missing file name.
        shard: String,
        /// One tensor mapped to it.
        tensor: String,
    },
    /// The index and the shard files disagree about where a tensor lives.
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    IndexMismatch {
        /// The index or shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What disagrees.
        reason: String,
    },
    /// The same tensor name appears twice in one checkpoint.
    #[error("{}: tensor '{tensor}' appears more than once", path.display())]
    DuplicateTensor {
        /// The file where the second copy was found.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A streaming writer was given more or fewer bytes than its header promised.
    #[error("{}: writer expected {expected} data bytes, got {found}", path.display())]
    WriteLength {
        /// The file being written.
        path: PathBuf,
        /// Declared total.
        expected: u64,
        /// Written so far.
        found: u64,
    },
    /// The output exists and `overwrite` was not set.
    #[error("{}: output already exists and is not empty (use --overwrite to replace it)", path.display())]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// Not enough free space for the output.
    #[error("{}: need {needed} bytes but only {available} are free", path.display())]
    NoSpace {
        /// The output directory.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// A publish moved the old output aside, could not move the new one in, and could not put
    /// the old one back either: it is intact at `moved_to`.
    #[error("{}: could not rename the new output into place ({source}); the old output is intact at {}", path.display(), moved_to.display())]
    OutputMovedAside {
        /// The output path.
        path: PathBuf,
        /// Where the old output now is.
        moved_to: PathBuf,
        /// Why the new output could not be renamed into place.
        #[source]
        source: std::io::Error,
    },
    /// A read asked for elements outside a tensor.
    #[error("{}: tensor '{tensor}': read out of bounds: {detail}", path.display())]
    RegionOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape, the region and the element range asked for.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}
