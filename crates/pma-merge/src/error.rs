//! The one error type of `pma-merge`.

use std::path::PathBuf;

/// Everything that can go wrong planning or running a merge, inspect or diff.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A format-level problem (I/O, malformed header, missing shard, ...).
    #[error(transparent)]
    Format(#[from] pma_format::Error),
    /// No checkpoints were given or found.
    #[error("{}: no checkpoints found (expected subdirectories like step-1000, checkpoint-1000, iter_0001000 or global_step1000)", path.display())]
    EmptyRun {
        /// The run directory.
        path: PathBuf,
    },
    /// Fewer checkpoints qualify than were asked for.
    #[error("asked for {wanted} checkpoints but only {found} qualify{detail} (a lower minimum count accepts fewer)")]
    NotEnoughCheckpoints {
        /// How many were asked for.
        wanted: usize,
        /// How many qualified.
        found: usize,
        /// Which selection rules were in force.
        detail: String,
    },
    /// A selection rule needs steps but a checkpoint's name carries none.
    #[error("{}: cannot tell the step from this name, but selecting by step interval or end step needs steps", path.display())]
    NoStep {
        /// The checkpoint.
        path: PathBuf,
    },
    /// Bad weights or method parameters.
    #[error("invalid weights: {0}")]
    InvalidWeights(String),
    /// Bad selection parameters.
    #[error("invalid selection: {0}")]
    InvalidSelection(String),
    /// A tensor is missing from one checkpoint.
    #[error("{}: tensor '{tensor}' is missing (present in {})", path.display(), reference.display())]
    MissingTensor {
        /// The checkpoint lacking it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// A checkpoint that has it.
        reference: PathBuf,
    },
    /// Shapes differ between checkpoints.
    #[error("{}: tensor '{tensor}' has shape {found:?} but {} has {expected:?}", path.display(), reference.display())]
    ShapeMismatch {
        /// The checkpoint with the odd shape.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Shape in the reference checkpoint.
        expected: Vec<u64>,
        /// Shape here.
        found: Vec<u64>,
        /// The reference checkpoint.
        reference: PathBuf,
    },
    /// A dtype pma cannot average (F8, sub-byte, complex).
    #[error("{}: tensor '{tensor}': unsupported dtype {dtype} (pma averages F64, F32, F16, BF16 and copies integer/BOOL tensors)", path.display())]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: String,
    },
    /// A tensor is float in one checkpoint and integer/BOOL (or another integer type) in another.
    #[error("{}: tensor '{tensor}' is {found} but {} has it as {expected}", path.display(), reference.display())]
    DtypeMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Dtype in the reference checkpoint.
        expected: String,
        /// Dtype here.
        found: String,
        /// The reference checkpoint.
        reference: PathBuf,
    },
    /// A non-float tensor differs between checkpoints.
    #[error("{}: non-float tensor '{tensor}' differs from {} (integer and BOOL tensors must be identical to be merged)", path.display(), reference.display())]
    ExactTensorDiffers {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The newest checkpoint, whose copy is used.
        reference: PathBuf,
    },
    /// NaN or Inf values in an input.
    #[error("{}: tensor '{tensor}' has {count} non-finite (NaN/Inf) values (merging anyway must be allowed explicitly)", path.display())]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// How many.
        count: u64,
    },
    /// The merge was interrupted (e.g. by a signal) before completion.
    #[error("interrupted; the output was not written")]
    Interrupted,
    /// A worker thread pool could not be built.
    #[error("cannot start {threads} worker threads: {reason}")]
    ThreadPool {
        /// Requested threads.
        threads: usize,
        /// Why.
        reason: String,
    },
    /// The watcher's state dir holds state made with different settings.
    #[error("{}: watch state was made with {found} but this run asks for {expected}; use another output dir, or delete the state dir to start over", path.display())]
    WatchStateMismatch {
        /// The state file.
        path: PathBuf,
        /// The settings of this run.
        expected: String,
        /// The settings recorded in the state.
        found: String,
    },
    /// The watcher's state file cannot be parsed or refers to files that are gone.
    #[error("{}: corrupt watch state: {reason}", path.display())]
    WatchStateCorrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Bad watch settings.
    #[error("invalid watch settings: {0}")]
    InvalidWatchConfig(String),
    /// Another watcher holds the state dir.
    #[error("{}: another pma watch is running on this output (lock held)", path.display())]
    WatchLocked {
        /// The lock file.
        path: PathBuf,
    },
    /// More worker threads were asked for than pma accepts.
    #[error(
        "{requested} worker threads asked for; at most {max} are accepted (0 means all cores)"
    )]
    TooManyThreads {
        /// The requested count.
        requested: usize,
        /// [`crate::threads::MAX_THREADS`].
        max: usize,
    },
    /// The output would be written over, inside, or around a run directory or an input.
    #[error("{}: the output would be {relation} {}; pma never writes inside a run directory or an input, so choose an output outside both", out.display(), input.display())]
    OutputOverlapsInput {
        /// The output, as given.
        out: PathBuf,
        /// The run directory or input it collides with.
        input: PathBuf,
        /// How: "the same path as", "inside", "a directory containing".
        relation: &'static str,
    },
    /// The state dir's lock could not be taken for a reason other than another watcher.
    #[error("{}: cannot lock the watch state: {source}", path.display())]
    WatchLockFailed {
        /// The lock file.
        path: PathBuf,
        /// The `flock` error.
        source: std::io::Error,
    },
    /// A checkpoint file cannot be pinned safely.
    #[error("{}: cannot pin: {reason}", path.display())]
    PinRefused {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A pinned window member changed while an update read it; the update was not committed.
    #[error("pinned checkpoint of step {step} changed during the update: {reason}")]
    PinChanged {
        /// The member's step.
        step: u64,
        /// What changed.
        reason: String,
    },
    /// A `--include` / `--exclude` glob does not compile.
    #[error("{flag} '{pattern}': not a valid glob: {reason}")]
    InvalidGlob {
        /// The flag (`--include` or `--exclude`).
        flag: &'static str,
        /// The pattern as given.
        pattern: String,
        /// What the glob parser found wrong.
        reason: String,
    },
    /// A `--include` glob selects no entry, so a typo would silently merge nothing extra.
    #[error("--include '{pattern}' selects nothing: {detail}")]
    IncludeSelectsNothing {
        /// The pattern as given.
        pattern: String,
        /// What it matched instead (no key at all, or only keys it cannot select).
        detail: String,
    },
    /// A run's latest-checkpoint marker (`latest_checkpointed_iteration.txt`, `latest`) holds
    /// neither a step nor `release`.
    #[error("{}: latest-checkpoint marker holds {content:?}, expected a step (1000, global_step1000) or release", path.display())]
    BadLatestMarker {
        /// The marker file.
        path: PathBuf,
        /// Its content (at most the first 64 characters).
        content: String,
    },
    /// Key selection leaves no tensor to write (`--exclude` matched every weight, or the
    /// checkpoint holds no model weights).
    #[error("{}: no tensor is selected for the output ({left_out} entries are left out or kept; see --dry-run, and --include / --exclude)", path.display())]
    NothingSelected {
        /// The newest member, whose entries were selected from.
        path: PathBuf,
        /// Entries not merged or copied.
        left_out: usize,
    },
    /// A DCP output was asked for with a bare `.safetensors` output path.
    #[error("a DCP output is a directory; give an output path not ending in .safetensors, or --format hf")]
    DcpSingleFile,
    /// `keep_state_newest` cannot copy an entry of the newest member byte for byte.
    #[error("{}: cannot keep entry '{entry}' of the newest checkpoint: {reason}", path.display())]
    KeepStateNotCopyable {
        /// The newest checkpoint.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// Why it cannot be copied.
        reason: String,
    },
    /// A partitioned merge's part count is unusable.
    #[error("{parts} parts: {reason}")]
    InvalidPartCount {
        /// The part count asked for.
        parts: usize,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// A part number is not below the part count.
    #[error("part {part} is out of range: the parts of a {parts}-part merge are numbered 0 to {}", parts.saturating_sub(1))]
    PartOutOfRange {
        /// The part asked for (0-based).
        part: usize,
        /// The part count.
        parts: usize,
    },
    /// `--finalize` found no parts to publish.
    #[error("{}: no parts found; run the parts first (--part I --parts K, with the same inputs, flags and --out)", dir.display())]
    NoParts {
        /// The parts directory.
        dir: PathBuf,
    },
    /// The parts directory holds parts of merges with different part counts.
    #[error("{}: holds parts of merges with different part counts {counts:?}; remove the stale part directories (or the whole directory) and rerun the parts", dir.display())]
    PartCountsDisagree {
        /// The parts directory.
        dir: PathBuf,
        /// The part counts found.
        counts: Vec<usize>,
    },
    /// A part of a partitioned merge has not been written.
    #[error("{}: part {part} of {parts} is missing (not run, still running, or failed); run it with --part {part} --parts {parts}", dir.display())]
    PartMissing {
        /// The parts directory.
        dir: PathBuf,
        /// The missing part.
        part: usize,
        /// The part count.
        parts: usize,
    },
    /// A part was computed from a different plan (other inputs, flags, or inputs changed since).
    #[error("{}: part {part} of {parts} was made from a different plan (other inputs, flags or part count, or inputs changed since); rerun it with the same command as the finalize", path.display())]
    PartStale {
        /// Its manifest.
        path: PathBuf,
        /// The part.
        part: usize,
        /// The part count.
        parts: usize,
    },
    /// A part's manifest or one of its files is damaged.
    #[error("{}: corrupt part output: {reason}; rerun that part", path.display())]
    PartCorrupt {
        /// The manifest or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
