//! The one error type of `pma-demo`.
//!
//! Lab and merge failures are wrapped as they come. What the demo itself checks (the output
//! directory, its own files, plots, the shape of an experiment) has a variant of its own that
//! names the file or setting involved.

use std::path::PathBuf;

/// Everything that can go wrong running the demo or rendering its report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Training or evaluation failed. (Boxed, like the merge error, to keep `Result` small.)
    #[error(transparent)]
    Lab(Box<pma_lab::Error>),
    /// Selecting or merging checkpoints failed.
    #[error(transparent)]
    Merge(Box<pma_merge::Error>),
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
    /// A JSON file (results.json, metrics.jsonl) did not parse.
    #[error("{}: invalid json: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The output directory already holds a demo and `overwrite` was not set.
    #[error("{}: already holds demo output (pass --overwrite to replace it)", path.display())]
    OutDirOccupied {
        /// The output directory.
        path: PathBuf,
    },
    /// A profile setting cannot produce the experiment it describes.
    #[error("profile: {field}: {reason}")]
    InvalidProfile {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Drawing or encoding a plot failed.
    #[error("{}: plotting: {reason}", path.display())]
    Plot {
        /// The PNG being drawn.
        path: PathBuf,
        /// The backend's complaint.
        reason: String,
    },
    /// The run was interrupted through the cancel flag.
    #[error("interrupted")]
    Cancelled,
}

impl From<pma_lab::Error> for Error {
    fn from(e: pma_lab::Error) -> Error {
        Error::Lab(Box::new(e))
    }
}

impl From<pma_merge::Error> for Error {
    fn from(e: pma_merge::Error) -> Error {
        Error::Merge(Box::new(e))
    }
}

impl Error {
    pub(crate) fn io(
        path: &std::path::Path,
        action: &'static str,
        source: std::io::Error,
    ) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
