//! `pma merge` (being written).
use std::process::ExitCode;

/// Arguments of `pma merge`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma merge`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma merge is not built yet")
}
