//! `pma watch`: keep the merge of a running job's newest checkpoints up to date, crash-safely.
//!
//! The library does the watching and reports events; this module turns flags into a
//! [`WatchConfig`], and its event sink appends every event as one JSON line to the log, renders
//! it on stderr (or as JSON lines on stdout with `--json`) and runs `--exec` on each new output.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use pma_format::FloatDtype;
use pma_merge::watch::{run_exec, Averaging, WatchConfig, WatchEvent, EVENT_LOG_NAME, MAX_WAIT};

use super::merge::{MethodArg, MethodArgs, OutputArgs, SelectArgs};
use super::render::{human, print_json_line, versioned};

/// Arguments of `pma watch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training run's directory (step-1000/, checkpoint-1000/, iter_0001000/,
    /// global_step1000/, torchtitan's checkpoint/step-1000/, ...), in HF safetensors, torch DCP
    /// or torch.save; outputs are HF safetensors.
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// Where merged checkpoints go, as step-XXXXXXX/ (the watcher's state is in .pma-watch/).
    #[arg(long, value_name = "MERGED_DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub method: MethodArgs,
    /// SMA by a running f64 sum: each update reads only the new checkpoint, the one leaving the
    /// window and the sum (may differ from an exact recompute by 1 ulp in rare elements).
    #[arg(long)]
    pub incremental: bool,
    /// Dtype of the ema-stream state kept between updates.
    #[arg(long, default_value = "f32", value_parser = parse_state_dtype)]
    pub state_dtype: FloatDtype,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Also average float tensors matching GLOB into every output (repeatable; `*` crosses
    /// dots), as `pma merge --include`. Optimizer state is averaged only by a glob that names it.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out entries matching GLOB from every output, whatever else matches them
    /// (repeatable), as `pma merge --exclude`.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
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

/// Seconds as a duration of at most [`MAX_WAIT`] (a day): longer waits are a unit mistake, and
/// far longer ones overflow the clock.
fn seconds(v: f64, flag: &str) -> anyhow::Result<Duration> {
    let d = Duration::try_from_secs_f64(v)
        .with_context(|| format!("{flag} {v} is not a valid duration"))?;
    if d > MAX_WAIT {
        bail!(
            "{flag} {v} is longer than a day ({} seconds), the most accepted",
            MAX_WAIT.as_secs()
        );
    }
    Ok(d)
}

impl TryFrom<&Args> for WatchConfig {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<WatchConfig> {
        let selection = args.select.selection()?;
        if selection.at.is_some() {
            bail!("--at fixes the window's end; pma watch follows the newest checkpoint");
        }
        let averaging = match args.method.method {
            Some(MethodArg::EmaStream) if args.method.weights.is_none() => {
                if selection.last.is_some() || selection.every.is_some() || args.incremental {
                    bail!(
                        "ema-stream averages the whole history: drop --last/--every/--incremental"
                    );
                }
                Averaging::EmaStream {
                    alpha: args.method.alpha,
                    state_dtype: args.state_dtype,
                }
            }
            Some(MethodArg::Sma) if args.incremental && args.method.weights.is_none() => {
                if selection.every.is_some() {
                    bail!("--incremental slides over consecutive checkpoints; drop --every");
                }
                Averaging::IncrementalSma {
                    last: selection.last,
                    min: selection.min,
                }
            }
            _ if args.incremental => bail!("--incremental works with --method sma only"),
            _ => {
                if selection.last.is_none() {
                    bail!(
                        "a windowed watch needs --last N: without it every checkpoint stays \
                         pinned in MERGED_DIR/.pma-watch forever, so the trainer's \
                         save_total_limit frees no disk and the disk fills under the run. \
                         Give --last N, or average the whole history with --incremental \
                         (--method sma) or --method ema-stream, which keep no pins"
                    );
                }
                Averaging::Window {
                    method: args.method.weight_spec()?,
                    last: selection.last,
                    every: selection.every,
                    min: selection.min,
                }
            }
        };
        let config = WatchConfig {
            averaging,
            out_dtype: args.output.dtype,
            max_shard_bytes: args.output.max_shard_size,
            allow_nonfinite: args.output.allow_nonfinite,
            threads: args.output.threads,
            keep: args.keep,
            once: args.once,
            interval: seconds(args.interval, "--interval")?,
            settle: seconds(args.settle, "--settle")?,
            ready_file: args.ready_file.clone(),
            direct_io: pma_format::DirectIo::from_env(),
            keys: pma_merge::KeySelectionConfig {
                include: args.include.clone(),
                exclude: args.exclude.clone(),
                keep_state_newest: false,
            },
            ..WatchConfig::new(args.run_dir.clone(), args.out.clone())
        };
        config.validate()?;
        // Checked here as well as in the library: the event log is created inside MERGED_DIR
        // before the library runs, and must not land in the run dir either.
        pma_merge::check_output_placement(&config.out_dir, &[config.run_dir.as_path()])?;
        Ok(config)
    }
}

/// Runs `pma watch`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Every way the flags can fail to describe a watcher is a usage error (exit 2).
    let config = WatchConfig::try_from(&args).map_err(|e| super::UsageError(format!("{e:#}")))?;
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
    let mut emit = |record: serde_json::Value, text: String| {
        let record = stamped(record);
        // One write per line, so concurrent readers (tail -f) never see half a record.
        if let Err(e) = log.write_all(format!("{record}\n").as_bytes()) {
            log_error.get_or_insert(e);
        }
        if args.json {
            // A closed stdout must not stop the watcher: the log still has every event.
            let _ = print_json_line(&record);
        } else if !args.quiet {
            eprintln!("{text}");
        }
    };
    let mut sink = |event: &WatchEvent| {
        emit(
            serde_json::to_value(event).expect("events serialize"),
            render(event),
        );
        if let (WatchEvent::Merged { output, .. }, Some(cmd)) = (event, &args.exec) {
            // The update is committed before `Merged` is sent, so the hook sees a durable
            // output; a failing hook is logged and the watcher goes on.
            let done = run_exec(cmd, output);
            emit(
                serde_json::to_value(&done).expect("exec records serialize"),
                done.render(),
            );
        }
    };
    let report = pma_merge::watch::run(&config, stop, &mut sink)
        .with_context(|| format!("watching {}", config.run_dir.display()))?;
    if let Some(e) = log_error {
        eprintln!("warning: writing the event log {}: {e}", log_path.display());
    }
    if args.json {
        print_json_line(&versioned(serde_json::json!({ "report": report })))?;
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

/// A log record: the event plus the schema version and a Unix timestamp.
fn stamped(record: serde_json::Value) -> serde_json::Value {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut v = versioned(record);
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("time".into(), time.into());
    }
    v
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
    }
}
