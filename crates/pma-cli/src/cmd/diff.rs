//! `pma diff`: per-tensor relative L2 distance and cosine similarity of two checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use pma_merge::diff::{diff, DiffReport};

use super::render::{print_json, versioned};

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
        render(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn render(r: &DiffReport) {
    let w = r
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:w$}  {:>12}  {:>12}", "name", "rel_l2", "cosine");
    for t in &r.tensors {
        println!("{:w$}  {:>12.6e}  {:>12.8}", t.name, t.rel_l2, t.cosine);
    }
    println!(
        "{:w$}  {:>12.6e}  {:>12.8}",
        "TOTAL", r.total.rel_l2, r.total.cosine
    );
    for n in &r.only_in_a {
        println!("only in A: {n}");
    }
    for n in &r.only_in_b {
        println!("only in B: {n}");
    }
    for n in &r.shape_mismatch {
        println!("shape differs: {n}");
    }
    for (n, same) in &r.non_float {
        println!(
            "non-float {n}: {}",
            if *same { "identical" } else { "differs" }
        );
    }
}
