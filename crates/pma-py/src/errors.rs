//! Library errors as Python exceptions.
//!
//! The exception classes live in `python/pma/_errors.py` (plain Python, so some can also inherit
//! from `ValueError` or `OSError`); this module picks the class for each variant and builds the
//! message exactly as the CLI prints it after `error: ` (anyhow's `{:#}`: the error, then each
//! `source()` joined by `: `). New library variants fall back to the nearest base class, so the
//! mapping never fails to compile when the library grows.

use pyo3::prelude::*;

/// The Python exception for a `pma-merge` error.
pub(crate) fn to_py_err(err: pma_merge::Error) -> PyErr {
    make(class_name(&err), cli_message(&err))
}

/// A `ConfigError` for an argument the glue itself rejects (the CLI's clap/`bail!` checks).
pub(crate) fn config_error(message: impl Into<String>) -> PyErr {
    make("ConfigError", message.into())
}

/// Which class of `pma._errors` a library error becomes.
fn class_name(err: &pma_merge::Error) -> &'static str {
    use pma_format::Error as F;
    use pma_merge::Error as M;
    match err {
        M::Format(f) => match f {
            F::Io { .. } | F::WriteLength { .. } => "IoError",
            F::OutputExists { .. } => "OutputExistsError",
            F::NoSpace { .. } => "NoSpaceError",
            // Everything else is a malformed or unsupported input: safetensors, pickle, zip,
            // torch.save, DCP metadata and chunks, sidecars.
            _ => "FormatError",
        },
        // Run and checkpoint problems: a bad latest marker, a checkpoint that cannot be pinned
        // or changed under an update (the watcher retries those; one reaching Python means it
        // could not recover).
        M::EmptyRun { .. }
        | M::NotEnoughCheckpoints { .. }
        | M::NoStep { .. }
        | M::BadLatestMarker { .. }
        | M::PinRefused { .. }
        | M::PinChanged { .. } => "InputError",
        M::MissingTensor { .. }
        | M::ShapeMismatch { .. }
        | M::UnsupportedDtype { .. }
        | M::DtypeMismatch { .. }
        | M::ExactTensorDiffers { .. } => "MismatchError",
        M::NonFinite { .. } => "NonFiniteError",
        // Arguments: weights, selection, watch settings, thread count, key globs, and an output
        // placed over, inside or around its inputs.
        M::InvalidWeights(_)
        | M::InvalidSelection(_)
        | M::InvalidWatchConfig(_)
        | M::TooManyThreads { .. }
        | M::OutputOverlapsInput { .. }
        | M::InvalidGlob { .. }
        | M::IncludeSelectsNothing { .. } => "ConfigError",
        M::WatchStateMismatch { .. } | M::WatchStateCorrupt { .. } | M::WatchLocked { .. } => {
            "WatchStateError"
        }
        // flock failed for a reason other than another watcher (no lock support, say): the OS
        // refused, as with any other I/O error.
        M::WatchLockFailed { .. } => "IoError",
        M::Interrupted => "Interrupted",
        _ => "PmaError",
    }
}

/// The message as `pma` prints it: `{err:#}` of the anyhow chain.
fn cli_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Instantiates `pma._errors.<class>(message)`.
fn make(class: &'static str, message: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("pma._errors")
            .and_then(|m| m.getattr(class))
            .and_then(|cls| cls.call1((message,)))
        {
            Ok(exc) => PyErr::from_value(exc),
            // Only if the package is damaged (pma._errors missing): the import error says so.
            Err(e) => e,
        }
    })
}
