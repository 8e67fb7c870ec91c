//! `pma inspect`: a checkpoint's tensors, and optionally their statistics.

use std::path::PathBuf;
use std::process::ExitCode;

use pma_merge::inspect::{inspect, InspectReport};

use super::render::{human, print_json, versioned};
use crate::text::escape_control;

/// Arguments of `pma inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint: an HF directory or .safetensors file, a torch DCP directory, or a torch.save
    /// checkpoint (pytorch_model.bin, DeepSpeed global_stepN, Megatron iter_N, a .pt file).
    pub checkpoint: PathBuf,
    /// Add norm, mean, std, min, max and NaN/Inf count per tensor (reads all data).
    #[arg(long)]
    pub stats: bool,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pma inspect`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = inspect(&args.checkpoint, args.stats)?;
    if args.json {
        print_json(&versioned(serde_json::json!({ "inspect": report })))?;
    } else {
        render(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render(r: &InspectReport) -> std::io::Result<()> {
    // "torch DCP", "HF safetensors" name their format; "Megatron torch_dist" gets ", DCP".
    let kind = if r.framework.contains(&r.format) {
        r.framework.clone()
    } else {
        format!("{}, {}", r.framework, r.format)
    };
    outln!(
        "{} ({}, {}, {} file{})",
        r.path.display(),
        kind,
        r.layout,
        r.files.len(),
        if r.files.len() == 1 { "" } else { "s" }
    )?;
    let w = r
        .tensors
        .iter()
        .map(|t| escape_control(&t.name).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    if r.tensors.iter().any(|t| t.stats.is_some()) {
        outln!(
            "{:w$}  {:5}  {:>16}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {:>8}",
            "name",
            "dtype",
            "shape",
            "norm",
            "mean",
            "std",
            "min",
            "max",
            "nonfin"
        )?;
    } else {
        outln!(
            "{:w$}  {:5}  {:>20}  {:>12}  {:>10}{}",
            "name",
            "dtype",
            "shape",
            "params",
            "bytes",
            if r.dcp.is_some() { "  chunks" } else { "" }
        )?;
    }
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        match &t.stats {
            Some(s) => outln!(
                "{:w$}  {:5}  {:>16}  {:>11.4e}  {:>11.4e}  {:>11.4e}  {:>11.4e}  {:>11.4e}  {:>8}",
                escape_control(&t.name),
                t.dtype,
                shape,
                s.norm,
                s.mean,
                s.std,
                s.min,
                s.max,
                s.nonfinite
            )?,
            None if r.tensors.iter().any(|t| t.stats.is_some()) => outln!(
                "{:w$}  {:5}  {:>16}  (not a float tensor)",
                escape_control(&t.name),
                t.dtype,
                shape
            )?,
            None => outln!(
                "{:w$}  {:5}  {:>20}  {:>12}  {:>10}{}",
                escape_control(&t.name),
                t.dtype,
                shape,
                t.n_params,
                human(t.n_bytes),
                t.chunks.map_or(String::new(), |n| format!("  {n:>6}"))
            )?,
        }
    }
    outln!(
        "total: {} tensors, {} parameters, {}",
        r.tensors.len(),
        r.n_params,
        human(r.n_bytes)
    )?;
    if let Some(dcp) = &r.dcp {
        outln!(
            "DCP: {} chunks, {} bytes items (never merged)",
            dcp.n_chunks,
            dcp.bytes_items.len()
        )?;
        for b in &dcp.bytes_items {
            outln!("  {}  {}", escape_control(&b.name), human(b.n_bytes))?;
        }
    }
    Ok(())
}
