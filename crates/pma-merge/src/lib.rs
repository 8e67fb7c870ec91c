//! `pma-merge`: choosing checkpoints of a pre-training run and averaging them, streaming.
//!
//! A merge goes through three stages, each a plain value you can inspect:
//! 1. [`CheckpointSeries`] finds a run's checkpoints and their steps; a [`Selection`] (last N,
//!    every V steps, window ending at a step) picks and opens the members, skipping incomplete
//!    ones.
//! 2. [`Weights`] (SMA, EMA, WMA or explicit) and a [`MergeConfig`] turn them into a
//!    [`MergePlan`], which validates names, shapes and dtypes from headers alone and fixes the
//!    output layout. This is what `--dry-run` shows.
//! 3. [`execute`] streams the plan to disk with bounded memory and returns a [`MergeReport`].
//!
//! The same crate computes `inspect` statistics ([`inspect`]) and checkpoint distances
//! ([`diff`]).
//!
//! ```no_run
//! use pma_merge::{execute, CheckpointSeries, ExecOptions, MergeConfig, MergeInput, MergePlan, NoProgress, Selection, Weights};
//! let series = CheckpointSeries::discover("run".as_ref())?;
//! let selected = Selection { last: Some(10), ..Default::default() }.select(&series, true)?;
//! let inputs: Vec<MergeInput> = selected.checkpoints.into_iter()
//!     .map(|(step, checkpoint)| MergeInput { step, checkpoint }).collect();
//! let weights = Weights::ema(inputs.len(), 0.2)?;
//! let plan = MergePlan::build(inputs, weights, MergeConfig::default())?;
//! execute(&plan, "merged".as_ref(), &ExecOptions::default(), &NoProgress)?;
//! # Ok::<(), pma_merge::Error>(())
//! ```
#![deny(missing_docs)]

pub mod diff;
mod error;
pub mod executor;
pub mod inspect;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod series;
pub mod watch;
pub mod weights;

pub use error::{Error, Result};
pub use executor::{execute, ExecOptions, MergeReport, NonFiniteWarning};
pub use plan::{MergeConfig, MergeInput, MergePlan, PlanSummary, DEFAULT_MAX_SHARD_BYTES};
pub use progress::{NoProgress, Progress};
pub use series::{
    parse_byte_size, parse_step, parse_token_count, CheckpointEntry, CheckpointSeries, Selected,
    Selection, Skipped,
};
pub use weights::{Method, Weights};
