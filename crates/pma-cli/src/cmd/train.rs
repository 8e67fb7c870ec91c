//! `pma train` (being written).
use std::process::ExitCode;

/// Arguments of `pma train`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma train`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma train is not built yet")
}
