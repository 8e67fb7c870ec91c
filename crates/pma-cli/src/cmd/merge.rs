//! `pma merge`: select checkpoints, build a plan, execute it, report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use pma_format::FloatDtype;
use pma_merge::{
    check_output_placement, check_plan_output, discover_run, execute, parse_byte_size,
    parse_token_count, resolve_threads, Action, CheckpointSeries, DecayShape, ExecOptions,
    KeySelectionConfig, KeySummary, MergeConfig, MergePlan, MergeReport, OutputFormat, PlanSummary,
    Selection, WeightSpec, DEFAULT_EMA_ALPHA,
};

use super::render::{human, print_json, versioned};
use super::UsageError;
use crate::progress::{self, ByteBar};
use crate::text::escape_control;

/// Averaging method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Simple moving average: w_i = 1/N.
    Sma,
    /// Exponential moving average: w_N = α, w_1 = (1−α)^(N−1).
    Ema,
    /// Weighted moving average: w_i ∝ i, newest heaviest.
    Wma,
    /// Emulates a linear learning-rate decay over the window (WSM; about SMA).
    DecayLinear,
    /// Emulates a cosine learning-rate decay over the window (WSM).
    DecayCosine,
    /// Emulates a 1−√x learning-rate decay over the window (WSM; Megatron's minus-sqrt).
    #[value(name = "decay-1-sqrt", alias = "decay-minus-sqrt")]
    Decay1Sqrt,
    /// pma watch only: EMA over the whole history, updated once per checkpoint: E = (1−α)·E + α·x.
    EmaStream,
}

/// How to weight the checkpoints: shared by `pma merge` and `pma watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct MethodArgs {
    /// Averaging method.
    #[arg(
        long,
        value_enum,
        required_unless_present = "weights",
        conflicts_with = "weights"
    )]
    pub method: Option<MethodArg>,
    /// EMA smoothing: the newest checkpoint's weight (ema, ema-stream).
    #[arg(long, default_value_t = DEFAULT_EMA_ALPHA)]
    pub alpha: f64,
    /// Explicit weights, oldest first (instead of --method; pma watch needs --last equal to
    /// their count).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Option<Vec<f64>>,
    /// Rescale --weights to sum to 1.
    #[arg(long, requires = "weights")]
    pub normalize: bool,
}

impl MethodArgs {
    /// The weighting the flags describe; `ema-stream` is not one (it is a `pma watch` mode,
    /// which handles it before asking).
    pub fn weight_spec(&self) -> anyhow::Result<WeightSpec> {
        Ok(match (&self.weights, self.method) {
            (Some(values), _) => WeightSpec::Explicit {
                values: values.clone(),
                normalize: self.normalize,
            },
            (None, Some(MethodArg::Sma)) => WeightSpec::Sma,
            (None, Some(MethodArg::Ema)) => WeightSpec::Ema { alpha: self.alpha },
            (None, Some(MethodArg::Wma)) => WeightSpec::Wma,
            (None, Some(MethodArg::DecayLinear)) => WeightSpec::Decay {
                shape: DecayShape::Linear,
            },
            (None, Some(MethodArg::DecayCosine)) => WeightSpec::Decay {
                shape: DecayShape::Cosine,
            },
            (None, Some(MethodArg::Decay1Sqrt)) => WeightSpec::Decay {
                shape: DecayShape::OneMinusSqrt,
            },
            (None, Some(MethodArg::EmaStream)) => bail!(UsageError(
                "--method ema-stream averages a growing run's whole history and exists only in \
                 pma watch; for a fixed set of checkpoints use --method ema"
                    .into()
            )),
            (None, None) => bail!(UsageError("give --method or --weights".into())),
        })
    }
}

/// Which checkpoints to take: shared by `pma merge` and `pma watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    /// Merge the newest N qualifying checkpoints.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Keep checkpoints V apart (steps, or tokens with --tokens-per-step), counting back from the newest.
    #[arg(long, value_name = "V")]
    pub every: Option<String>,
    /// End the window at this step (or token count with --tokens-per-step).
    #[arg(long, value_name = "STEP")]
    pub at: Option<String>,
    /// Tokens per training step; makes --every and --at token counts ("8B", "500M").
    #[arg(long, value_name = "K")]
    pub tokens_per_step: Option<String>,
    /// Accept as few as N checkpoints when fewer than --last qualify.
    #[arg(long, value_name = "N")]
    pub min: Option<usize>,
}

/// How to write the output: shared by `pma merge` and `pma watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Output dtype of float tensors (default: the newest checkpoint's).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<FloatDtype>,
    /// Largest output shard ("5GB" = 5·10⁹ bytes, "2GiB", ...).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Worker threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Merge even if inputs hold NaN/Inf (reported as warnings).
    #[arg(long)]
    pub allow_nonfinite: bool,
}

/// What `--keep-state` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeepStateArg {
    /// Copy training state (optimizer, scheduler, dataloader, ...) verbatim from the newest
    /// checkpoint, so a run can resume from the merge.
    Newest,
}

/// Which entries of the checkpoints are merged (default: model weights only).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Also merge float tensors matching GLOB (repeatable; `*` crosses dots). Optimizer state is
    /// merged only by a glob that names it, e.g. 'optimizer.*'. Bytes items never are.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out entries matching GLOB, whatever else matches them (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Keep the entries that are not merged (training state) instead of leaving them out.
    #[arg(long, value_enum, value_name = "WHICH")]
    pub keep_state: Option<KeepStateArg>,
}

impl KeyArgs {
    /// The library's key-selection options.
    pub fn config(&self) -> KeySelectionConfig {
        KeySelectionConfig {
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            keep_state_newest: self.keep_state == Some(KeepStateArg::Newest),
        }
    }
}

/// Output format of `pma merge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Hugging Face safetensors: a sharded directory, or one file when --out ends in .safetensors.
    Hf,
    /// A torch.distributed.checkpoint directory that `dcp.load` reads, with the newest
    /// checkpoint's chunk layout (one chunk per tensor if the newest is not DCP).
    Dcp,
}

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> OutputFormat {
        match f {
            FormatArg::Hf => OutputFormat::Hf,
            FormatArg::Dcp => OutputFormat::Dcp,
        }
    }
}

/// Arguments of `pma merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoints to merge, oldest first: HF safetensors (dir or file), torch DCP dirs, or
    /// torch.save checkpoints (pytorch_model.bin, DeepSpeed global_stepN, ...). Or use --run.
    #[arg(value_name = "CKPT")]
    pub checkpoints: Vec<PathBuf>,
    /// A run directory of step-named checkpoints (step-1000, checkpoint-1000, iter_0001000, ...).
    #[arg(long, value_name = "RUN_DIR")]
    pub run: Option<PathBuf>,
    #[command(flatten)]
    pub method: MethodArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
    /// Output format (default: dcp when the newest checkpoint is DCP and --out does not end in
    /// .safetensors, hf otherwise).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Print the plan without reading tensor data.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan and summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar, no warnings on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Output: an HF checkpoint directory, a file ending in .safetensors, or (--format dcp) a
    /// DCP checkpoint directory.
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    /// Merge only part I (0-based) of a partitioned merge, writing its share of the output
    /// files (HF shards, or a DCP output's .distcp files) beside OUT for --finalize; `auto` reads I (and K) from a Slurm array, a Kubernetes Indexed Job or
    /// torchrun. Every part and the finalize take the same inputs, flags and --out.
    #[arg(long, value_name = "I|auto", conflicts_with = "finalize")]
    pub part: Option<String>,
    /// Number of parts K of a partitioned merge (with --part; checked against the environment
    /// with --part auto).
    #[arg(long, value_name = "K")]
    pub parts: Option<usize>,
    /// Check the parts written by --part runs and publish OUT (same inputs, flags and --out;
    /// the number of parts is read from their manifests).
    #[arg(long)]
    pub finalize: bool,
    /// With --finalize: also read every part file back and check its CRC-32, to catch silent
    /// corruption (by default the finalize checks each file's size, inode and mtime against its
    /// part's manifest, or an object's size and ETag, which catches any change made through the
    /// filesystem or the store, without reading the output).
    #[arg(long, requires = "finalize")]
    pub verify_parts: bool,
}

fn parse_dtype(s: &str) -> Result<FloatDtype, String> {
    FloatDtype::parse(s)
        .ok_or_else(|| format!("unknown dtype '{s}' (expected bf16, f16, f32 or f64)"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_byte_size(s).ok_or_else(|| format!("cannot read '{s}' as a size (e.g. 5GB, 500MB, 2GiB)"))
}

/// Reads a step count, or a token count divided by tokens-per-step.
fn steps(value: &str, tokens_per_step: Option<u64>, flag: &str) -> anyhow::Result<u64> {
    match tokens_per_step {
        None => value.parse().with_context(|| {
            format!(
                "{flag} '{value}' is not a step number (give --tokens-per-step for token counts)"
            )
        }),
        Some(k) => {
            let tokens = parse_token_count(value)
                .with_context(|| format!("{flag} '{value}' is not a token count"))?;
            if tokens % k != 0 {
                bail!(UsageError(format!(
                    "{flag} {value} = {tokens} tokens is not a whole number of {k}-token steps"
                )));
            }
            Ok(tokens / k)
        }
    }
}

impl SelectArgs {
    /// The library selection, with token counts converted to steps.
    pub fn selection(&self) -> anyhow::Result<Selection> {
        let tokens_per_step = match &self.tokens_per_step {
            Some(s) => Some(parse_token_count(s).filter(|&k| k > 0).with_context(|| {
                format!("--tokens-per-step '{s}' is not a positive token count")
            })?),
            None => None,
        };
        Ok(Selection {
            last: self.last,
            every: self
                .every
                .as_deref()
                .map(|v| steps(v, tokens_per_step, "--every"))
                .transpose()?,
            at: self
                .at
                .as_deref()
                .map(|v| steps(v, tokens_per_step, "--at"))
                .transpose()?,
            min: self.min,
        })
    }
}

impl OutputArgs {
    /// The library merge config for an output at `out`.
    pub fn config(&self, out: &std::path::Path) -> MergeConfig {
        MergeConfig {
            out_dtype: self.dtype,
            max_shard_bytes: self.max_shard_size,
            single_file: out.extension().is_some_and(|e| e == "safetensors"),
            allow_nonfinite: self.allow_nonfinite,
            ..MergeConfig::default()
        }
    }

    /// Worker threads, 0 resolved to all cores; an absurd count is an error.
    pub fn threads(&self) -> anyhow::Result<usize> {
        Ok(resolve_threads(self.threads)?)
    }
}

/// Builds the selection, weights and config from arguments; opens the checkpoints.
pub fn plan_from_args(args: &Args) -> anyhow::Result<(MergePlan, Vec<pma_merge::Skipped>)> {
    let selection = args.select.selection()?;
    // Checkpoints newer than a framework's latest-complete marker (Megatron's
    // latest_checkpointed_iteration.txt, DeepSpeed's latest) may still be being written.
    let mut unfinished = Vec::new();
    let (series, from_run) = match (&args.run, args.checkpoints.is_empty()) {
        (Some(run), true) => {
            let mut found = discover_run(run)?;
            let beyond: Vec<PathBuf> = found
                .beyond_latest()
                .iter()
                .map(|e| e.path.clone())
                .collect();
            if let Some(marker) = &found.latest {
                for path in &beyond {
                    unfinished.push(pma_merge::Skipped {
                        path: path.clone(),
                        reason: format!("newer than the latest marker {}", marker.path.display()),
                    });
                }
            }
            found.series.entries.retain(|e| !beyond.contains(&e.path));
            (found.series, true)
        }
        (None, false) => (CheckpointSeries::from_paths(&args.checkpoints), false),
        (Some(_), false) => bail!(UsageError(
            "give either checkpoints or --run, not both".into()
        )),
        (None, true) => bail!(UsageError(
            "nothing to merge: give checkpoints (oldest first) or --run RUN_DIR".into()
        )),
    };
    let spec = args.method.weight_spec()?;
    if let Some(run) = &args.run {
        check_output_placement(&args.out, &[run.as_path()])?;
    }
    let (inputs, mut skipped) = selection.select(&series, from_run)?.into_inputs();
    skipped.extend(unfinished);
    let weights = spec.weights(inputs.len())?;
    let mut config = MergeConfig {
        keys: args.keys.config(),
        ..args.output.config(&args.out)
    };
    config.format = args.format.map(OutputFormat::from);
    if config.format == Some(OutputFormat::Dcp) && config.single_file {
        bail!(UsageError(format!(
            "--format dcp writes a directory, but --out {} ends in .safetensors",
            args.out.display()
        )));
    }
    let plan = MergePlan::build(inputs, weights, config)?;
    check_plan_output(&plan, &args.out)?;
    Ok((plan, skipped))
}

/// Runs `pma merge`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.part.is_some() || args.parts.is_some() || args.finalize {
        return super::merge_parts::run(args);
    }
    let remote_out = pma_format::is_url(&args.out);
    if remote_out && !args.dry_run {
        // Refused before a byte is read, as a local existing output is.
        pma_format::remote::check_output_absent(&args.out, args.overwrite)?;
    }
    let (plan, skipped) = plan_from_args(&args)?;
    if !args.quiet {
        warn_skipped(&skipped);
    }
    if !args.quiet && !args.dry_run {
        // The dry run lists these with the plan.
        for w in &plan.keys.warnings {
            eprintln!("warning: {w}");
        }
    }
    let kept = plan.keys.count(Action::KeepNewest);
    if !args.quiet && kept > 0 && plan.output_format() == OutputFormat::Hf {
        // An HF output holds tensors only; training state travels in a DCP output.
        eprintln!(
            "warning: --keep-state newest: the {kept} training-state entries it keeps are not \
             written to an HF safetensors output"
        );
    }
    let threads = args.output.threads()?;
    if args.dry_run {
        let summary = plan.summary(threads);
        if args.json {
            print_json(&versioned(
                serde_json::json!({ "dry_run": true, "plan": summary }),
            ))?;
        } else {
            print_plan(&summary, &args.out)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let interrupted = crate::cmd::interrupt_flag();
    let bar = ByteBar::new("merging", progress::shown(args.quiet, args.json));
    let opts = ExecOptions {
        threads,
        overwrite: args.overwrite,
        cancel: Some(interrupted),
        direct_io: pma_format::DirectIo::from_env(),
    };
    let report = if remote_out {
        execute_to_store(&plan, &args, &opts, &bar)?
    } else {
        execute(&plan, &args.out, &opts, &bar)?
    };
    if !args.quiet {
        warn_nonfinite(&report.warnings);
    }
    if args.json {
        print_json(&versioned(
            serde_json::json!({ "dry_run": false, "report": report }),
        ))?;
    } else if !args.quiet {
        print_report(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A merge whose --out is an object-store URL. An HF output streams its shards into multipart
/// uploads as it merges, with only the sidecars staged locally
/// ([`pma_merge::execute_to_store`]); a DCP output is written and validated in a local staging
/// folder, then published with the commit file last ([`pma_format::remote::publish`]). Staging
/// is under `PMA_STAGING_DIR`, or the system temp dir, and is removed whatever happens.
fn execute_to_store(
    plan: &MergePlan,
    args: &Args,
    opts: &ExecOptions,
    bar: &ByteBar,
) -> anyhow::Result<MergeReport> {
    let staging = UploadStaging::create()?;
    let name = args
        .out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_os_string());
    let local = staging.0.join(name);
    if plan.output_format() == OutputFormat::Hf {
        // Shards stream straight into multipart uploads; only the sidecars are staged.
        std::fs::create_dir(&local)
            .with_context(|| format!("creating the staging folder {}", local.display()))?;
        return Ok(pma_merge::execute_to_store(
            plan, &args.out, &local, opts, bar,
        )?);
    }
    let mut report = execute(plan, &local, opts, bar)?;
    pma_format::remote::publish(&local, &args.out, args.overwrite)?;
    report.output = args.out.clone();
    Ok(report)
}

/// A local folder for what an upload to an object store stages (sidecars, an index, a DCP
/// output), under `PMA_STAGING_DIR` or the system temp dir; removed, whatever happens, when
/// dropped.
pub(crate) struct UploadStaging(pub(crate) PathBuf);

impl UploadStaging {
    pub(crate) fn create() -> anyhow::Result<UploadStaging> {
        let base = std::env::var_os("PMA_STAGING_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let staging =
            UploadStaging(base.join(format!(".pma-upload-{}-{nanos}", std::process::id())));
        std::fs::create_dir_all(&staging.0)
            .with_context(|| format!("creating the staging folder {}", staging.0.display()))?;
        Ok(staging)
    }
}

impl Drop for UploadStaging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Warns (stderr) about checkpoints left out of the selection as incomplete.
pub(crate) fn warn_skipped(skipped: &[pma_merge::Skipped]) {
    for s in skipped {
        eprintln!(
            "warning: skipping incomplete checkpoint {}: {}",
            s.path.display(),
            s.reason
        );
    }
}

/// Warns (stderr) about NaN/Inf merged through with `--allow-nonfinite`.
pub(crate) fn warn_nonfinite(warnings: &[pma_merge::NonFiniteWarning]) {
    for w in warnings {
        eprintln!(
            "warning: {}: tensor '{}' has {} non-finite values (merged anyway)",
            w.path.display(),
            w.tensor,
            w.count
        );
    }
}

fn print_plan(s: &PlanSummary, out: &std::path::Path) -> std::io::Result<()> {
    outln!("method: {:?}", s.method)?;
    outln!(
        "{:>4}  {:>12}  {:>10}  {:>12}  path",
        "#",
        "step",
        "weight",
        "bytes"
    )?;
    for (i, inp) in s.inputs.iter().enumerate() {
        let step = inp.step.map_or("-".to_string(), |s| s.to_string());
        outln!(
            "{:>4}  {:>12}  {:>10.6}  {:>12}  {}",
            i + 1,
            step,
            inp.weight,
            human(inp.bytes),
            inp.path.display()
        )?;
    }
    let dtypes: Vec<String> = s
        .output_dtypes
        .iter()
        .map(|(d, n)| format!("{d}: {n}"))
        .collect();
    outln!(
        "output: {} ({})",
        out.display(),
        match (s.format, s.single_file) {
            (OutputFormat::Dcp, _) => "DCP directory, newest checkpoint's chunk layout",
            (OutputFormat::Hf, true) => "single file",
            (OutputFormat::Hf, false) => "HF directory",
        }
    )?;
    outln!("  files: {}", s.files.join(", "))?;
    outln!(
        "  tensors: {} ({} params), dtypes: {}",
        s.n_tensors,
        s.n_params,
        dtypes.join(", ")
    )?;
    outln!(
        "  read: {}  write: {}  memory: {}",
        human(s.bytes_read),
        human(s.bytes_written),
        human(s.memory_bytes)
    )?;
    print_keys(&s.keys)
}

/// One line per group of keys, merged first; key names come from the checkpoint, so they are
/// escaped.
fn print_keys(k: &KeySummary) -> std::io::Result<()> {
    outln!(
        "keys: {} merged, {} copied, {} kept from the newest, {} left out",
        k.merged,
        k.copied,
        k.kept_newest,
        k.left_out
    )?;
    let w = k
        .groups
        .iter()
        .map(|g| escape_control(&g.prefix).chars().count())
        .max()
        .unwrap_or(0);
    for g in &k.groups {
        let action = match g.action {
            Action::Merge => "merged",
            Action::Copy => "copied",
            Action::KeepNewest => "kept",
            Action::LeaveOut => "left out",
        };
        outln!(
            "  {action:8}  {:w$}  {:>6}  {}",
            escape_control(&g.prefix),
            g.count,
            escape_control(&g.reason)
        )?;
    }
    for warning in &k.warnings {
        outln!("  warning: {}", escape_control(warning))?;
    }
    Ok(())
}

fn print_report(r: &MergeReport) -> std::io::Result<()> {
    outln!(
        "merged {} checkpoints ({}) -> {} ({}) in {:.2}s, {}/s read, {} written",
        r.plan.inputs.len(),
        r.plan.method_label(),
        r.output.display(),
        r.plan.format.name(),
        r.elapsed_secs,
        human(r.read_bytes_per_sec as u64),
        human(r.plan.bytes_written),
    )?;
    if !r.sidecars.is_empty() {
        outln!("  copied beside it: {}", r.sidecars.join(", "))?;
    }
    for s in &r.sidecars_skipped {
        outln!("  left out: {} ({})", s.path, s.reason)?;
    }
    Ok(())
}
