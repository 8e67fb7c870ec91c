//! `pma diff`: per-tensor relative L2 distance and cosine similarity of two checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use pma_merge::diff::{diff, DiffReport};

use super::render::{print_json, versioned};
use crate::text::escape_control;

/// Arguments of `pma diff`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// First checkpoint (the reference for relative distances).
    pub a: PathBuf,
    /// Second checkpoint.
    pub b: PathBuf,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pma diff`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = diff(&args.a, &args.b)?;
    if args.json {
        print_json(&versioned(serde_json::json!({ "diff": report })))?;
    } else {
        render(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render(r: &DiffReport) -> std::io::Result<()> {
    let w = r
        .tensors
        .iter()
        .map(|t| escape_control(&t.name).chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    outln!("{:w$}  {:>12}  {:>12}", "name", "rel_l2", "cosine")?;
    for t in &r.tensors {
        outln!(
            "{:w$}  {:>12.6e}  {:>12.8}",
            escape_control(&t.name),
            t.rel_l2,
            t.cosine
        )?;
    }
    outln!(
        "{:w$}  {:>12.6e}  {:>12.8}",
        "TOTAL",
        r.total.rel_l2,
        r.total.cosine
    )?;
    for n in &r.only_in_a {
        outln!("only in A: {n}", n = escape_control(n))?;
    }
    for n in &r.only_in_b {
        outln!("only in B: {n}", n = escape_control(n))?;
    }
    for n in &r.shape_mismatch {
        outln!("shape differs: {n}", n = escape_control(n))?;
    }
    for (n, same) in &r.non_float {
        outln!(
            "non-float {}: {}",
            escape_control(n),
            if *same { "identical" } else { "differs" }
        )?;
    }
    Ok(())
}
