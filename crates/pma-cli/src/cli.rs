//! The command-line surface: global options and one variant per subcommand.

use clap::{Parser, Subcommand};

use crate::cmd;

/// Pre-trained Model Averaging: merge checkpoints of a pre-training run into a better model.
#[derive(Debug, Parser)]
#[command(name = "pma", version, about, long_about = None)]
pub struct Cli {
    /// Subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Merge checkpoints (SMA, EMA, WMA or explicit weights) into a new checkpoint.
    Merge(cmd::merge::Args),
    /// List a checkpoint's tensors, dtypes, shapes and sizes; --stats adds per-tensor statistics.
    Inspect(cmd::inspect::Args),
    /// Per-tensor relative L2 distance and cosine similarity between two checkpoints.
    Diff(cmd::diff::Args),
    /// Watch a training run and keep the merge of its newest checkpoints up to date, crash-safely.
    Watch(cmd::watch::Args),
    /// Train a small Llama-style model (dense or MoE) and write HF-layout checkpoints.
    #[cfg(feature = "lab")]
    Train(cmd::train::Args),
    /// Evaluate checkpoints: validation loss, perplexity, bits per byte, next-token accuracy.
    #[cfg(feature = "lab")]
    Eval(cmd::eval::Args),
    /// The paper's findings in minutes: train, merge, evaluate, and write a report with plots.
    #[cfg(feature = "lab")]
    Demo(cmd::demo::Args),
    /// The full reproduction: early/late, N and V sweeps, annealing prediction, MoE, PMA-init.
    #[cfg(feature = "lab")]
    Reproduce(cmd::demo::ReproduceArgs),
}
