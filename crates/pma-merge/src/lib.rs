//! `pma-merge`: choosing checkpoints of a pre-training run and averaging them, streaming.
//!
//! A merge goes through three stages, each a plain value you can inspect:
//! 1. [`CheckpointSeries`] finds a run's checkpoints and their steps; a [`Selection`] (last N,
//!    every V steps, window ending at a step) picks and opens the members, skipping incomplete
//!    ones.
//! 2. A [`WeightSpec`] (SMA, EMA, WMA or explicit) gives the [`Weights`]; they and a
//!    [`MergeConfig`] turn the inputs into a [`MergePlan`], which validates names, shapes and dtypes from headers alone and fixes the
//!    output layout. This is what `--dry-run` shows.
//! 3. [`execute`] streams the plan to disk with bounded memory and returns a [`MergeReport`]:
//!    HF safetensors, or a torch DCP directory with the newest member's chunk layout
//!    ([`OutputFormat`], [`dcp_output`]).
//!
//! The same crate computes `inspect` statistics ([`inspect`]) and checkpoint distances
//! ([`diff`]).
//!
//! ```no_run
//! use pma_merge::{execute, CheckpointSeries, ExecOptions, MergeConfig, MergePlan, NoProgress, Selection, WeightSpec};
//! let series = CheckpointSeries::discover("run".as_ref())?;
//! let selected = Selection { last: Some(10), ..Default::default() }.select(&series, true)?;
//! let (inputs, _skipped) = selected.into_inputs();
//! let weights = WeightSpec::Ema { alpha: 0.2 }.weights(inputs.len())?;
//! let plan = MergePlan::build(inputs, weights, MergeConfig::default())?;
//! execute(&plan, "merged".as_ref(), &ExecOptions::default(), &NoProgress)?;
//! # Ok::<(), pma_merge::Error>(())
//! ```
#![deny(missing_docs)]

pub mod dcp_output;
pub mod diff;
mod error;
pub mod executor;
pub mod inspect;
pub mod keys;
pub mod partition;
pub mod partition_remote;
pub mod pipeline;
pub mod placement;
pub mod plan;
pub mod progress;
pub mod run_layout;
pub mod series;
pub mod threads;
pub mod watch;
pub mod weights;

pub use dcp_output::verbatim_entries;
pub use error::{Error, Result};
pub use executor::{
    execute, execute_to_store, ExecOptions, MergeReport, NonFiniteWarning, SidecarSkipped,
};
pub use keys::{select_keys, Action, KeyEntry, KeySelection, KeySelectionConfig};
pub use keys::{KeyGroup, KeySummary};
pub use partition::{execute_part, finalize, FinalizeReport, PartCheck, PartReport, Partition};
pub use partition_remote::{execute_part_to_store, finalize_to_store};
pub use placement::{check_output_placement, check_plan_output};
pub use plan::OutputFormat;
pub use plan::{MergeConfig, MergeInput, MergePlan, PlanSummary, DEFAULT_MAX_SHARD_BYTES};
pub use progress::{NoProgress, Progress};
pub use run_layout::{discover_run, LatestHint, RunDiscovery};
pub use series::{
    parse_byte_size, parse_step, parse_token_count, CheckpointEntry, CheckpointSeries, Selected,
    Selection, Skipped,
};
pub use threads::{resolve_threads, MAX_THREADS};
pub use weights::{DecayShape, WeightSpec, Weights, DEFAULT_EMA_ALPHA};
