//! Progress reporting without printing: long operations call a [`Progress`] sink.

/// Receives progress of a long operation. All methods default to doing nothing.
pub trait Progress: Sync {
    /// The operation will process `total_bytes`.
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The operation finished (successfully or not).
    fn finish(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
