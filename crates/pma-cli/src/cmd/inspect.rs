//! `pma inspect` (being written).
use std::process::ExitCode;

/// Arguments of `pma inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma inspect`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma inspect is not built yet")
}
