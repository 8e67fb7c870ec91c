//! `pma eval`: validation loss, perplexity, bits per byte and next-token accuracy of checkpoints.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use pma_lab::data::DataSource;
use pma_lab::eval::{eval_tokens, evaluate_on, EvalConfig, EvalReport};

use super::render::SCHEMA_VERSION;

/// Arguments of `pma eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoints to evaluate (directories with config.json and weights, any float dtype).
    #[arg(required = true, value_name = "CKPT")]
    pub checkpoints: Vec<PathBuf>,
    /// Evaluate on the whole of these files instead of the embedded corpus's validation split
    /// (give the checkpoints first: every word after --data is a file).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Window length in tokens [default: the model's training length].
    #[arg(long, value_name = "T")]
    pub seq: Option<usize>,
    /// Windows per forward pass (speed only).
    #[arg(long, value_name = "B", default_value_t = 16)]
    pub batch: usize,
    /// One JSON object per checkpoint and line on stdout.
    #[arg(long)]
    pub json: bool,
}

impl From<&Args> for EvalConfig {
    fn from(args: &Args) -> EvalConfig {
        EvalConfig {
            data: match &args.data {
                Some(files) if !files.is_empty() => DataSource::Files(files.clone()),
                _ => DataSource::Embedded,
            },
            seq_len: args.seq,
            batch_size: args.batch,
        }
    }
}

fn render_json(r: &EvalReport) -> String {
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "checkpoint": r.checkpoint,
        "val_loss": r.val_loss,
        "ppl": r.ppl,
        "bpb": r.bpb,
        "accuracy": r.accuracy,
        "tokens": r.tokens,
    })
    .to_string()
}

/// Runs `pma eval`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = EvalConfig::from(&args);
    let tokens = eval_tokens(&config.data).context("loading eval data")?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:>10} {:>10} {:>8} {:>9} {:>10}  checkpoint",
            "val_loss", "ppl", "bpb", "accuracy", "tokens"
        )?;
    }
    for ckpt in &args.checkpoints {
        let started = std::time::Instant::now();
        let r = evaluate_on(ckpt, &tokens, &config)
            .with_context(|| format!("evaluating {}", ckpt.display()))?;
        let secs = started.elapsed().as_secs_f64();
        if args.json {
            writeln!(out, "{}", render_json(&r))?;
        } else {
            writeln!(
                out,
                "{:>10.4} {:>10.3} {:>8.4} {:>9.4} {:>10}  {}",
                r.val_loss,
                r.ppl,
                r.bpb,
                r.accuracy,
                r.tokens,
                r.checkpoint.display()
            )?;
        }
        out.flush()?;
        eprintln!(
            "evaluated {} in {secs:.1}s ({:.0} tokens/s)",
            ckpt.display(),
            r.tokens as f64 / secs.max(1e-9)
        );
    }
    Ok(ExitCode::SUCCESS)
}
