//! `pma watch` (being written).
use std::process::ExitCode;

/// Arguments of `pma watch`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `pma watch`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma watch is not built yet")
}
