//! `pma eval` (being written).
use std::process::ExitCode;

/// Arguments of `pma eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma eval`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma eval is not built yet")
}
