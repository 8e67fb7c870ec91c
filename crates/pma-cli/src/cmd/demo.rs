//! `pma demo` / `pma reproduce` (being written).
use std::process::ExitCode;

/// Arguments of `pma demo`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Arguments of `pma reproduce`.
#[derive(Debug, clap::Args)]
pub struct ReproduceArgs {}

/// Runs `pma demo`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma demo is not built yet")
}

/// Runs `pma reproduce`.
pub fn run_reproduce(_args: ReproduceArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("pma reproduce is not built yet")
}
