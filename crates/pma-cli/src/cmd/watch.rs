//! `pma watch`: keep the merge of a running job's newest checkpoints up to date, crash-safely.
//!
//! The library does the watching and reports events; this module turns flags into a
//! [`WatchConfig`], appends every event as one JSON line to the log, and renders it on stderr
//! (or as JSON lines on stdout with `--json`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use pma_format::FloatDtype;
use pma_merge::watch::{
    Averaging, WatchConfig, WatchEvent, WindowMethod, EVENT_LOG_NAME, EVENT_SCHEMA_VERSION,
};

use super::merge::{human, OutputArgs, SelectArgs};

/// Averaging method of `pma watch`: the windowed methods of `pma merge`, plus `ema-stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchMethodArg {
    /// Simple moving average over the window: w_i = 1/N.
    Sma,
    /// Exponential moving average over the window: w_N = α, w_1 = (1−α)^(N−1).
    Ema,
    /// Weighted moving average over the window: w_i ∝ i, newest heaviest.
    Wma,
    /// EMA over the whole history, updated once per checkpoint: E = (1−α)·E + α·x.
    EmaStream,
}

/// How to weight the checkpoints (the flags of `pma merge`, plus ema-stream).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchMethodArgs {
    /// Averaging method.
    #[arg(
        long,
        value_enum,
        required_unless_present = "weights",
        conflicts_with = "weights"
    )]
    pub method: Option<WatchMethodArg>,
    /// EMA smoothing: the newest checkpoint's weight (ema and ema-stream).
    #[arg(long, default_value_t = 0.2)]
    pub alpha: f64,
    /// Explicit weights, oldest first (instead of --method; needs --last equal to their count).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Option<Vec<f64>>,
    /// Rescale --weights to sum to 1.
    #[arg(long, requires = "weights")]
    pub normalize: bool,
    /// SMA by a running f64 sum: each update reads only the new checkpoint, the one leaving the
    /// window and the sum (may differ from an exact recompute by 1 ulp in rare elements).
    #[arg(long)]
    pub incremental: bool,
    /// Dtype of the ema-stream state kept between updates.
    #[arg(long, default_value = "f32", value_parser = parse_state_dtype)]
    pub state_dtype: FloatDtype,
}

/// Arguments of `pma watch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training run's directory (step-1000/, checkpoint-1000/, iter_0001000/, ...).
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Where merged checkpoints go, as step-XXXXXXX/ (the watcher's state is in .pma-watch/).
    #[arg(long, value_name = "MERGED_DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub method: WatchMethodArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Keep only the newest K merged checkpoints.
    #[arg(long, value_name = "K")]
    pub keep: Option<usize>,
    /// Run a shell command on each new merged dir; {} is its path (e.g. 'pma eval {}').
    /// A failure is logged and the watcher goes on.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Process whatever is ready, then exit (for cron and Slurm).
    #[arg(long)]
    pub once: bool,
    /// Seconds between polls of the run directory (inotify may wake it earlier).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub interval: f64,
    /// Seconds a checkpoint's files must stay unchanged before it counts as complete.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub settle: f64,
    /// Also wait for this marker: inside the checkpoint (trainer_state.json), or in RUN_DIR
    /// holding the latest step (latest_checkpointed_iteration.txt).
    #[arg(long, value_name = "NAME")]
    pub ready_file: Option<String>,
    /// Event log, one JSON object per line [default: MERGED_DIR/.pma-watch/events.jsonl].
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Print events as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on stderr except errors.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_state_dtype(s: &str) -> Result<FloatDtype, String> {
    match FloatDtype::parse(s) {
        Some(d @ (FloatDtype::F32 | FloatDtype::F64)) => Ok(d),
        _ => Err(format!("state dtype '{s}' must be f32 or f64")),
    }
}

fn seconds(v: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v).with_context(|| format!("{flag} {v} is not a valid duration"))
}

impl TryFrom<&Args> for WatchConfig {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<WatchConfig> {
        let selection = args.select.selection()?;
        if selection.at.is_some() {
            bail!("--at fixes the window's end; pma watch follows the newest checkpoint");
        }
        let m = &args.method;
        let averaging = match (m.method, &m.weights) {
            (Some(WatchMethodArg::EmaStream), _) => {
                if selection.last.is_some() || selection.every.is_some() || m.incremental {
                    bail!(
                        "ema-stream averages the whole history: drop --last/--every/--incremental"
                    );
                }
                Averaging::EmaStream {
                    alpha: m.alpha,
                    state_dtype: m.state_dtype,
                }
            }
            (Some(WatchMethodArg::Sma), None) if m.incremental => {
                if selection.every.is_some() {
                    bail!("--incremental slides over consecutive checkpoints; drop --every");
                }
                Averaging::IncrementalSma {
                    last: selection.last,
                    min: selection.min,
                }
            }
            _ if m.incremental => bail!("--incremental works with --method sma only"),
            (method, weights) => Averaging::Window {
                method: match (method, weights) {
                    (_, Some(w)) => WindowMethod::Explicit {
                        values: w.clone(),
                        normalize: m.normalize,
                    },
                    (Some(WatchMethodArg::Sma), None) => WindowMethod::Sma,
                    (Some(WatchMethodArg::Ema), None) => WindowMethod::Ema { alpha: m.alpha },
                    (Some(WatchMethodArg::Wma), None) => WindowMethod::Wma,
                    _ => bail!("give --method or --weights"),
                },
                last: selection.last,
                every: selection.every,
                min: selection.min,
            },
        };
        let config = WatchConfig {
            averaging,
            out_dtype: args.output.dtype,
            max_shard_bytes: args.output.max_shard_size,
            allow_nonfinite: args.output.allow_nonfinite,
            threads: args.output.threads(),
            keep: args.keep,
            exec: args.exec.clone(),
            once: args.once,
            interval: seconds(args.interval, "--interval")?,
            settle: seconds(args.settle, "--settle")?,
            ready_file: args.ready_file.clone(),
            ..WatchConfig::new(args.run_dir.clone(), args.out.clone())
        };
        config.validate()?;
        Ok(config)
    }
}

/// Runs `pma watch`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = WatchConfig::try_from(&args)?;
    let log_path = args
        .log
        .clone()
        .unwrap_or_else(|| config.state_dir().join(EVENT_LOG_NAME));
    if let Some(dir) = log_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening the event log {}", log_path.display()))?;
    let stop = crate::cmd::interrupt_flag();
    let mut log_error: Option<std::io::Error> = None;
    let mut sink = |event: &WatchEvent| {
        let line = event_line(event);
        // One write per line, so concurrent readers (tail -f) never see half a record.
        if let Err(e) = log.write_all(line.as_bytes()) {
            log_error.get_or_insert(e);
        }
        if args.json {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
        } else if !args.quiet {
            eprintln!("{}", render(event));
        }
    };
    let report = pma_merge::watch::run(&config, stop, &mut sink)
        .with_context(|| format!("watching {}", config.run_dir.display()))?;
    if let Some(e) = log_error {
        eprintln!("warning: writing the event log {}: {e}", log_path.display());
    }
    if args.json {
        let v = serde_json::json!({ "schema_version": EVENT_SCHEMA_VERSION, "report": report });
        outln!("{v}")?;
    } else if !args.quiet {
        eprintln!(
            "{} checkpoint(s) processed, {} merged output(s) written{}",
            report.processed.len(),
            report.outputs.len(),
            if report.interrupted {
                "; stopped by signal after the last complete update"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One log record: the event plus a schema version and a Unix timestamp.
fn event_line(event: &WatchEvent) -> String {
    let mut v = serde_json::to_value(event).expect("events serialize");
    if let serde_json::Value::Object(map) = &mut v {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        map.insert("schema_version".into(), EVENT_SCHEMA_VERSION.into());
        map.insert("time".into(), time.into());
    }
    format!("{v}\n")
}

fn render(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Resumed {
            generation,
            last_step,
        } => format!(
            "resumed: state generation {generation}, last step {}",
            last_step.map_or("-".into(), |s| s.to_string())
        ),
        WatchEvent::Seen { step, path } => format!("seen: step {step} ({})", path.display()),
        WatchEvent::Waiting { step, reason, .. } => format!("waiting: step {step}: {reason}"),
        WatchEvent::SkippedIncomplete { step, reason, .. } => {
            format!("skipped incomplete: step {step}: {reason}")
        }
        WatchEvent::Pinned { step, kind } => format!("pinned: step {step} ({kind:?})"),
        WatchEvent::Counted {
            step,
            members,
            needed,
        } => format!("counted: step {step} (window {members}/{needed}, no output yet)"),
        WatchEvent::Merged {
            step,
            output,
            members,
            elapsed_secs,
            read_bytes,
            written_bytes,
            ..
        } => format!(
            "merged: step {step} -> {} ({} member(s), {} read, {} written, {elapsed_secs:.2}s)",
            output.display(),
            members.len(),
            human(*read_bytes),
            human(*written_bytes),
        ),
        WatchEvent::PinDamaged {
            step,
            reason,
            repinned,
        } => format!(
            "pin damaged: step {step}: {reason}; {}",
            if *repinned {
                "pinned again from the trainer's copy"
            } else {
                "dropped from the window"
            }
        ),
        WatchEvent::UpdateRetried { reason } => format!("update retried: {reason}"),
        WatchEvent::Unpinned { step } => format!("unpinned: step {step}"),
        WatchEvent::Pruned { output } => format!("pruned: {}", output.display()),
        WatchEvent::Exec {
            command,
            success,
            code,
            error,
            elapsed_secs,
            ..
        } => match (success, error) {
            (true, _) => format!("exec ok ({elapsed_secs:.1}s): {command}"),
            (false, Some(e)) => format!("exec could not start: {command}: {e}"),
            (false, None) => format!(
                "exec failed (exit {}): {command}",
                code.map_or("signal".into(), |c| c.to_string())
            ),
        },
    }
}
