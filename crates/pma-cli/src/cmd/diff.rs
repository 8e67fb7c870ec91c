//! `pma diff` (being written).
use std::process::ExitCode;

/// Arguments of `pma diff`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma diff`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma diff is not built yet")
}
