//! What a watcher tells its caller: one [`WatchEvent`] per thing that happened, and the
//! [`WatchReport`] it returns.

use std::path::PathBuf;

use serde::Serialize;

use super::pins::PinKind;

/// One thing that happened, for the log (`events.jsonl`) and the terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum WatchEvent {
    /// Resumed from a committed state.
    Resumed {
        /// Generation of the state.
        generation: u64,
        /// Last processed step.
        last_step: Option<u64>,
    },
    /// A new checkpoint appeared in the run dir.
    Seen {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
    },
    /// A checkpoint is not complete yet; it is looked at again on the next poll.
    Waiting {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An incomplete checkpoint was passed over for good, because a newer one is complete.
    SkippedIncomplete {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
        /// Why it is incomplete.
        reason: String,
    },
    /// A checkpoint's files were pinned into the state dir.
    Pinned {
        /// Its step.
        step: u64,
        /// Hard-linked or copied.
        kind: PinKind,
    },
    /// A checkpoint was counted without an output (the window is still filling).
    Counted {
        /// Its step.
        step: u64,
        /// Members so far.
        members: usize,
        /// Members needed for an output.
        needed: usize,
    },
    /// A merged checkpoint was written and committed. A caller that acts on new outputs (an
    /// evaluation hook, say) does so here: the output is durable and recorded in the state.
    Merged {
        /// The newest member's step.
        step: u64,
        /// The output dir.
        output: PathBuf,
        /// Steps of the members, oldest first (for ema-stream: just the new one).
        members: Vec<u64>,
        /// Their weights (empty for ema-stream).
        weights: Vec<f64>,
        /// Wall time of the update, in seconds.
        elapsed_secs: f64,
        /// Bytes read.
        read_bytes: u64,
        /// Bytes written (output plus tensor state).
        written_bytes: u64,
    },
    /// A pinned member's files changed (an in-place rewrite by the trainer, a disk fault):
    /// it was pinned again from the trainer's copy, or dropped from the window.
    PinDamaged {
        /// Its step.
        step: u64,
        /// What changed.
        reason: String,
        /// Pinned again (true) or dropped from the window (false).
        repinned: bool,
    },
    /// An update found an input changed under it and was not committed; it is tried again.
    UpdateRetried {
        /// What changed.
        reason: String,
    },
    /// A pin was released: the checkpoint left the window.
    Unpinned {
        /// Its step.
        step: u64,
    },
    /// An old output was deleted (`keep`).
    Pruned {
        /// The deleted output.
        output: PathBuf,
    },
}

/// What a watcher did before it returned.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    /// Steps processed in this run, in order.
    pub processed: Vec<u64>,
    /// Outputs written in this run.
    pub outputs: Vec<PathBuf>,
    /// Steps skipped as incomplete.
    pub skipped: Vec<u64>,
    /// Whether it stopped because of a signal.
    pub interrupted: bool,
    /// The committed state after the run.
    pub last_step: Option<u64>,
}
