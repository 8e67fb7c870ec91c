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
    /// A pickle (DCP `.metadata` or a torch.save `data.pkl`) that the safe reader refuses.
    #[error("{}: {what}: pickle refused {source}", path.display())]
    Pickle {
        /// The file holding the pickle.
        path: PathBuf,
        /// Which pickle (`.metadata`, or the item / entry it belongs to).
        what: String,
        /// Where and why.
        #[source]
        source: crate::pickle::PickleError,
    },
    /// A torch.save zip archive (a file, or a DCP item) that cannot be read in place.
    #[error("{}: {what}: {source}", path.display())]
    Zip {
        /// The file holding the archive.
        path: PathBuf,
        /// Which archive (the DCP entry, or the file itself).
        what: String,
        /// What is wrong.
        #[source]
        source: crate::torchzip::ZipError,
    },
    /// A DCP checkpoint directory without `.metadata` (incomplete, or not DCP).
    #[error("{}: no .metadata: not a DCP checkpoint, or the save did not finish", path.display())]
    DcpNoMetadata {
        /// The directory.
        path: PathBuf,
    },
    /// `.metadata` decodes as a pickle but not into the structure torch writes.
    #[error("{}: {at}: {reason}", path.display())]
    DcpMetadata {
        /// The `.metadata` file.
        path: PathBuf,
        /// Where in the structure (`state_dict_metadata['x'].chunks[1]`).
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// `.metadata` has a class (global) where one of DCP's dataclasses is expected.
    #[error("{}: {at}: expected {expected}, found {found}", path.display())]
    DcpUnexpectedClass {
        /// The `.metadata` file.
        path: PathBuf,
        /// Where in the structure.
        at: String,
        /// The dataclass expected there.
        expected: &'static str,
        /// What the pickle has instead.
        found: String,
    },
    /// `.metadata` names a `.distcp` file that does not exist.
    #[error("{}: entry '{entry}' is stored in '{file}', which does not exist (incomplete checkpoint?)", path.display())]
    DcpMissingFile {
        /// The checkpoint directory.
        path: PathBuf,
        /// The relative path `.metadata` names.
        file: String,
        /// One entry stored there.
        entry: String,
    },
    /// A byte range `.metadata` names runs past the end of its file.
    #[error("{}: entry '{entry}': item [{offset}, +{length}) runs past the end of the {file_bytes}-byte file (truncated?)", path.display())]
    DcpItemPastEnd {
        /// The `.distcp` file.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// Item offset.
        offset: u64,
        /// Item length.
        length: u64,
        /// File length.
        file_bytes: u64,
    },
    /// A chunk lies (partly) outside its tensor's global shape.
    #[error("{}: tensor '{tensor}': chunk at {offsets:?} of size {sizes:?} lies outside the shape {shape:?}", path.display())]
    ChunkOutOfBounds {
        /// The `.metadata` file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Chunk offsets.
        offsets: Vec<u64>,
        /// Chunk sizes.
        sizes: Vec<u64>,
        /// The global shape.
        shape: Vec<u64>,
    },
    /// Two chunks of a tensor overlap.
    #[error("{}: tensor '{tensor}': chunks at {first:?} and {second:?} overlap", path.display())]
    ChunkOverlap {
        /// The `.metadata` file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Offsets of one chunk.
        first: Vec<u64>,
        /// Offsets of the other.
        second: Vec<u64>,
    },
    /// The chunks of a tensor leave part of it uncovered.
    #[error("{}: tensor '{tensor}': chunks cover {covered} of its {numel} elements (a hole)", path.display())]
    ChunkHole {
        /// The `.metadata` file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Elements covered.
        covered: u64,
        /// Elements in the tensor.
        numel: u64,
    },
    /// A stored item disagrees with what `.metadata` says about it (dtype, shape, offsets).
    #[error("{}: tensor '{tensor}': {what}: expected {expected}, found {found}", path.display())]
    DcpItemMismatch {
        /// The `.distcp` file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What was compared.
        what: &'static str,
        /// What `.metadata` says.
        expected: String,
        /// What the item holds.
        found: String,
    },
    /// A torch.save pickle with a structure pma does not read (not a tensor where one must be,
    /// an unknown storage class, ...).
    #[error("{}: '{key}': {reason}", path.display())]
    TorchSave {
        /// The file.
        path: PathBuf,
        /// The key (or DCP entry) concerned.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A torch.save file in the legacy (pre-1.6, non-zip) format.
    #[error("{}: legacy torch.save format: re-save it with torch>=1.6 (torch.save(obj, f)) or convert to safetensors", path.display())]
    TorchLegacyFormat {
        /// The file.
        path: PathBuf,
    },
    /// A tensor view reaches past the end of its storage.
    #[error("{}: tensor '{tensor}': view needs {needed} bytes of storage but the storage has {found}", path.display())]
    StorageTooSmall {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Bytes the view reaches.
        needed: u64,
        /// Bytes the storage has.
        found: u64,
    },
    /// A read asked for a region or element range outside the tensor (a caller bug).
    #[error("tensor '{tensor}' of shape {shape:?}: region at {:?} of size {:?}, elements {elems:?}, is out of bounds", region.offsets, region.sizes)]
    RegionOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
        /// The region asked for (boxed: it would make every `Result` of this crate larger).
        region: Box<crate::Region>,
        /// The element range asked for.
        elems: std::ops::Range<u64>,
    },
    /// A DCP output chunk's rank differs from its tensor's.
    #[error("tensor '{fqn}': chunk at {offsets:?} sizes {sizes:?} does not have the rank of shape {shape:?}")]
    DcpChunkRank {
        /// The tensor.
        fqn: String,
        /// Its global shape.
        shape: Vec<u64>,
        /// The chunk's offsets.
        offsets: Vec<u64>,
        /// The chunk's sizes.
        sizes: Vec<u64>,
    },
    /// A DCP output chunk reaches past its tensor's shape.
    #[error("tensor '{fqn}': chunk at {offsets:?} sizes {sizes:?} lies outside shape {shape:?}")]
    DcpChunkOutOfBounds {
        /// The tensor.
        fqn: String,
        /// Its global shape.
        shape: Vec<u64>,
        /// The chunk's offsets.
        offsets: Vec<u64>,
        /// The chunk's sizes.
        sizes: Vec<u64>,
    },
    /// Two DCP output chunks of one tensor overlap.
    #[error("tensor '{fqn}': chunks at {first:?} and {second:?} overlap")]
    DcpChunkOverlap {
        /// The tensor.
        fqn: String,
        /// Offsets of one chunk.
        first: Vec<u64>,
        /// Offsets of the other.
        second: Vec<u64>,
    },
    /// DCP output chunks leave holes in their tensor.
    #[error("tensor '{fqn}' of shape {shape:?}: its {n_chunks} chunks cover {covered} of {numel} elements (holes)")]
    DcpChunkCoverage {
        /// The tensor.
        fqn: String,
        /// Its global shape.
        shape: Vec<u64>,
        /// How many chunks it has.
        n_chunks: usize,
        /// Elements covered.
        covered: u64,
        /// Elements in the tensor.
        numel: u64,
    },
    /// A tensor's element or byte count overflows u64.
    #[error("tensor '{fqn}': shape {shape:?} is too large to address")]
    DcpTensorTooLarge {
        /// The tensor.
        fqn: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// A dtype that a torch.save pickle cannot name (no typed storage class).
    #[error("tensor '{fqn}': dtype {dtype:?} cannot be written as a torch.save tensor")]
    DcpUnsupportedDtype {
        /// The tensor.
        fqn: String,
        /// Its dtype.
        dtype: safetensors::Dtype,
    },
    /// A DCP output file name that is not a plain file name in the output directory.
    #[error("entry '{fqn}': output file name '{file}' is not a plain file name")]
    DcpBadFileName {
        /// The entry.
        fqn: String,
        /// The file name given.
        file: String,
    },
    /// The same key is given twice in a DCP output layout.
    #[error("entry '{fqn}' appears more than once in the DCP output layout")]
    DcpDuplicateEntry {
        /// The key.
        fqn: String,
    },
    /// Verbatim chunks of one tensor disagree on its dtype or shape.
    #[error("entry '{fqn}': verbatim chunks disagree: {expected} vs {found}")]
    DcpVerbatimMismatch {
        /// The key.
        fqn: String,
        /// dtype and shape of the first chunk.
        expected: String,
        /// dtype and shape of a later chunk.
        found: String,
    },
    /// A verbatim item's byte range lies past the end of its source file.
    #[error("{}: entry '{fqn}': item [{offset}, +{length}) runs past the end of the {file_bytes}-byte file", path.display())]
    DcpVerbatimRange {
        /// The source file.
        path: PathBuf,
        /// The key.
        fqn: String,
        /// Item offset.
        offset: u64,
        /// Item length.
        length: u64,
        /// Source file length.
        file_bytes: u64,
    },
    /// The DCP writer was driven out of layout order.
    #[error("{}: DCP writer expected {expected}, got {found}", path.display())]
    DcpChunkOrder {
        /// The output directory.
        path: PathBuf,
        /// What the layout says comes next.
        expected: String,
        /// What the caller did.
        found: String,
    },
    /// A DCP writer was asked to write a data file its layout does not have.
    #[error("{}: the DCP layout has no data file '{file}'", path.display())]
    DcpFileNotPlanned {
        /// The output directory.
        path: PathBuf,
        /// The file asked for.
        file: String,
    },
    /// A data file gathered for `.metadata` does not have the length the layout plans for it.
    #[error("{}: DCP data file is {found} bytes, but the layout plans {expected}", path.display())]
    DcpFileLength {
        /// The data file.
        path: PathBuf,
        /// Planned length.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// A DCP output chunk got more or fewer bytes than its region holds.
    #[error("{}: tensor '{fqn}': chunk at {offsets:?} holds {expected} bytes, got {found}", path.display())]
    DcpChunkLength {
        /// The output file.
        path: PathBuf,
        /// The tensor.
        fqn: String,
        /// The chunk's offsets.
        offsets: Vec<u64>,
        /// Bytes the region holds.
        expected: u64,
        /// Bytes given (so far, when too many).
        found: u64,
    },
    /// A sidecar file (`config.json`, `tokenizer.json`, ...) that pma will not copy: a symlink
    /// leading out of the checkpoint, or not a regular file.
    #[error("{}: not copied as a sidecar: {reason}", path.display())]
    UnsafeSidecar {
        /// The sidecar's path in the checkpoint.
        path: PathBuf,
        /// Why (where the link leads).
        reason: String,
    },
    /// A mapped file was truncated or rewritten while it was being read (it raised SIGBUS);
    /// the bytes read from it cannot be trusted.
    #[error("{}: the file changed while it was being read (truncated under the mapping); its data cannot be trusted", path.display())]
    FileChangedWhileMapped {
        /// The file.
        path: PathBuf,
    },
    /// A checkpoint directory holds more entries than a sidecar walk visits.
    #[error("{}: more than {limit} files and folders beside the weights; refusing to copy them all as sidecars", path.display())]
    TooManySidecars {
        /// The checkpoint directory.
        path: PathBuf,
        /// The most entries the walk visits.
        limit: usize,
    },
    /// No checkpoint format pma reads was recognised at a path.
    #[error("{}: not a checkpoint pma can read (looked for {looked_for})", path.display())]
    UnknownCheckpointFormat {
        /// The file or directory.
        path: PathBuf,
        /// What was looked for.
        looked_for: String,
    },
    /// A torch.save checkpoint split over model-parallel ranks, which pma cannot reassemble.
    #[error("{}: holds {ranks} model-parallel ranks ({example}, ...); only a single-rank (TP=PP=1) torch.save checkpoint can be read; convert it to torch_dist or HF first", path.display())]
    ModelParallelTorchSave {
        /// The checkpoint directory.
        path: PathBuf,
        /// How many rank files or folders it holds.
        ranks: usize,
        /// One of their names.
        example: String,
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
    /// An object store request failed (see [`crate::remote`]): the URL, what was being done,
    /// and the HTTP status when the server answered. Credentials never appear in `reason`.
    #[error("{url}: {action} failed{}: {reason}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Remote {
        /// The object or prefix URL.
        url: String,
        /// What we were doing (`reading`, `listing`, `uploading`, ...).
        action: &'static str,
        /// The HTTP status the server answered with, if it answered.
        status: Option<u16>,
        /// What the store said, with credentials redacted.
        reason: String,
    },
    /// A URL that names no object store pma can use, or an operation object storage cannot do.
    #[error("{url}: {reason}")]
    RemoteUnsupported {
        /// The URL.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An output URL that already holds objects, without `--overwrite`.
    #[error(
        "{url}: the output already exists on the object store (pass --overwrite to replace it)"
    )]
    RemoteOutputExists {
        /// The output URL.
        url: String,
    },
    /// An output file that must be put in place by a server-side copy (replacing an old file
    /// with `--overwrite`, or gathering a partitioned merge's shards) is larger than the store
    /// copies in one request.
    #[error(
        "{url}: the object is {n_bytes} bytes and S3 copies at most {max_bytes} bytes in one \
         request, so it cannot be copied into place; the output is unchanged (use a smaller \
         --max-shard-size, or write to a new prefix)"
    )]
    RemoteCopyTooLarge {
        /// The URL of the object to be copied into place.
        url: String,
        /// The new object's size.
        n_bytes: u64,
        /// The largest copy the store makes.
        max_bytes: u64,
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
