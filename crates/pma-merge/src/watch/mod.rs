//! Online merging beside a running pre-training job: `pma watch`.
//!
//! [`run`] watches a run directory and keeps merged checkpoints of its newest checkpoints up to
//! date in an output directory, one `step-XXXXXXX/` per update, named after the newest member.
//! Checkpoints are processed one at a time, in step order, each exactly once:
//!
//! 1. discovery and completeness ([`ready`]): the run is read as `pma merge` reads it
//!    ([`crate::discover_run`]: step-named folders, torchtitan's `checkpoint/`, and nothing
//!    newer than Megatron's or DeepSpeed's latest marker); a checkpoint counts once it has
//!    settled, carries its ready marker and validates in its format (HF safetensors, torch DCP
//!    or torch.save, through [`pma_format::AnyCheckpoint`]);
//! 2. pinning ([`pins`]): its weight files (shards, or `.metadata` and every `.distcp`, or the
//!    torch.save files) are reflinked, copied or hard-linked into the state dir at once, with
//!    its sidecars, so the trainer's rotation cannot take a window member away;
//! 3. the update, by [`Averaging`]:
//!    - windowed SMA/EMA/WMA over the last N: the merge executor runs on the pinned members, so
//!      the output is bit-identical to `pma merge` of the same checkpoints;
//!    - incremental SMA: a running f64 sum updated with the new and the leaving checkpoint
//!      (`stream`, which reads members of any format and carries the tensors a default
//!      merge writes: model weights, not optimizer state);
//!    - streaming EMA over the whole history, DeepSeek-V3 style ([`stream`]);
//! 4. the commit ([`state`]): the new tensor state and the output are made durable first, then
//!    `state.json` is replaced atomically. A SIGKILL at any point leaves the old or the new state,
//!    and a restart redoes the interrupted update: nothing is counted twice or skipped.
//!
//! Progress goes out as [`WatchEvent`]s through a callback; the caller logs and renders them,
//! and acts on new outputs (`pma watch --exec` runs its command on each
//! [`WatchEvent::Merged`]).
//!
//! The code is split by concern: [`WatchConfig`] and [`Averaging`] (`config`), the events
//! (`event`), the poll loop and [`run`] (`poll`), one update function per averaging mode
//! returning a named outcome (`update`), output provenance (`provenance`), the state dir's
//! `flock` (`lock`) and the inotify wake-up between polls (`wake`).
//!
//! ```no_run
//! use pma_merge::watch::{run, Averaging, WatchConfig};
//! use pma_merge::WeightSpec;
//! let config = WatchConfig {
//!     averaging: Averaging::Window { method: WeightSpec::Sma, last: Some(4), every: None, min: None },
//!     once: true,
//!     ..WatchConfig::new("run".into(), "merged".into())
//! };
//! let stop = std::sync::atomic::AtomicBool::new(false);
//! let report = run(&config, &stop, &mut |event| eprintln!("{event:?}"))?;
//! println!("{} checkpoints processed", report.processed.len());
//! # Ok::<(), pma_merge::Error>(())
//! ```

mod config;
mod event;
mod exec;
mod lock;
pub mod pins;
mod poll;
mod provenance;
pub mod ready;
pub mod state;
mod stream;
mod update;
mod wake;

pub use config::{Averaging, WatchConfig, MAX_WAIT};
pub use event::{WatchEvent, WatchReport};
pub use exec::{run_exec, ExecDone};
pub use poll::run;
pub use stream::StreamRule;

/// Name of the state dir inside the output dir.
pub const STATE_DIR_NAME: &str = ".pma-watch";
/// Name of the event log inside the state dir (written by the CLI, which versions its records).
pub const EVENT_LOG_NAME: &str = "events.jsonl";
