//! One module per subcommand. Each exposes `Args` and `run(args) -> anyhow::Result<ExitCode>`,
//! which validates the arguments into a library config, calls the library, and renders.

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub mod diff;
#[cfg(feature = "lab")]
pub mod eval;
pub mod inspect;
pub mod merge;
#[cfg(feature = "lab")]
pub mod train;

/// Dispatches to the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Diff(args) => diff::run(args),
        #[cfg(feature = "lab")]
        Command::Train(args) => train::run(args),
        #[cfg(feature = "lab")]
        Command::Eval(args) => eval::run(args),
    }
}
