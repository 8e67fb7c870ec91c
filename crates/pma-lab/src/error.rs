//! The one error type of `pma-lab`.
//!
//! Format and candle failures are wrapped as they come; everything the lab itself checks (model
//! configs, checkpoint contents, corpora, run directories) has its own variant that names the file
//! or field and says what was expected against what was found.

use std::path::PathBuf;

/// Everything that can go wrong building, training or evaluating a lab model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a safetensors file or checkpoint directory failed.
    /// (Boxed: the format crate's error carries paths, names and shapes, and would make every
    /// lab `Result` large.)
    #[error(transparent)]
    Format(Box<pma_format::Error>),
    /// A tensor operation failed (shape mismatch inside the model, allocation, device).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// An OS-level I/O failure.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What we were doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, trainer_state.json, run.json) did not parse.
    #[error("{}: invalid json: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A TOML run config did not parse.
    #[error("{}: invalid run config: {source}", path.display())]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: toml::de::Error,
    },
    /// A model config field is missing or out of range.
    #[error("model config: {field}: {reason}")]
    InvalidModelConfig {
        /// The field (HF spelling).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A training or eval setting is out of range.
    #[error("train config: {field}: {reason}")]
    InvalidTrainConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `config.json` names an architecture the lab cannot run.
    #[error("{}: architecture '{found}' is not supported (expected LlamaForCausalLM or MixtralForCausalLM)", path.display())]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture found.
        found: String,
    },
    /// A checkpoint has no `config.json` next to its weights.
    #[error("{}: no config.json beside the weights", path.display())]
    MissingConfig {
        /// The checkpoint.
        path: PathBuf,
    },
    /// A parameter the model needs is not in the checkpoint.
    #[error("{}: missing tensor '{tensor}'", path.display())]
    MissingTensor {
        /// The checkpoint or file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor has a different shape than the config implies.
    #[error("{}: tensor '{tensor}': expected shape {expected:?}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The checkpoint or file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<u64>,
    },
    /// A tensor the model needs is not stored as a float.
    #[error("{}: tensor '{tensor}': dtype {dtype} is not a float dtype", path.display())]
    UnsupportedDtype {
        /// The checkpoint or file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The dtype found.
        dtype: String,
    },
    /// The corpus is too short for even one window.
    #[error("corpus {what} has {n_tokens} tokens, too few for one window of {window_tokens}")]
    CorpusTooSmall {
        /// Which part (`train split`, `validation split`, `eval data`).
        what: &'static str,
        /// Tokens available.
        n_tokens: usize,
        /// Tokens one window needs.
        window_tokens: usize,
    },
    /// `--resume` found no checkpoint to resume from.
    #[error("{}: no step-XXXXXXX checkpoint with trainer_state.json to resume from", path.display())]
    NothingToResume {
        /// The run directory.
        path: PathBuf,
    },
    /// A fresh run was pointed at a run directory that already holds checkpoints.
    #[error("{}: run directory already holds checkpoints (resume it, or pick another --out)", path.display())]
    RunDirOccupied {
        /// The run directory.
        path: PathBuf,
    },
    /// A checkpoint's `trainer_state.json` is missing a field or has a bad value.
    #[error("{}: trainer state: {reason}", path.display())]
    InvalidTrainerState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The loss or gradient became NaN or infinite.
    #[error("non-finite loss {loss} or gradient norm {grad_norm} at step {step}")]
    NonFinite {
        /// The step.
        step: u64,
        /// The loss.
        loss: f64,
        /// The global gradient norm.
        grad_norm: f64,
    },
    /// Training or evaluation text is larger than the lab loads.
    #[error("{}: the text files add up to more than {max_bytes} bytes, the most the lab loads", path.display())]
    DataTooLarge {
        /// The file that crossed the limit.
        path: PathBuf,
        /// The limit.
        max_bytes: u64,
    },
    /// A resumed run was given settings that differ from the ones it recorded, so it could not
    /// continue exactly.
    #[error("{}: an exact resume keeps the recorded settings, but these differ: {changed}; start a new run from a checkpoint (init) to change them", path.display())]
    ResumeSettingsChanged {
        /// The run's `run.json`.
        path: PathBuf,
        /// Each changed setting, with its recorded and its given value.
        changed: String,
    },
}

impl From<pma_format::Error> for Error {
    fn from(e: pma_format::Error) -> Error {
        Error::Format(Box::new(e))
    }
}

/// Result with the lab's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Error {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}
