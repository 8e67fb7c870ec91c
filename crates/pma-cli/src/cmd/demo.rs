//! `pma demo` and `pma reproduce`: train, merge, evaluate and report the paper's findings.
//!
//! Both parse their flags into a [`pma_demo::experiment::DemoConfig`], call
//! [`pma_demo::experiment::run`], and print the summary table and the report's path. Progress
//! goes to stderr: a bar per stage on a terminal, one line per stage otherwise.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pma_demo::experiment::{run as run_demo, DemoConfig, Progress};
use pma_demo::profile::{Profile, Scale, Scope};

/// Flags shared by `pma demo` and `pma reproduce`.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Output directory: runs/, merges/, plots/, results.json and report.md go here.
    #[arg(long, value_name = "DIR", default_value = "pma-demo-out")]
    pub out: PathBuf,
    /// Seed of the main run; every other run's seed is derived from it (all are in the report).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Replace a previous demo's output in --out (only the entries a demo writes are removed).
    #[arg(long)]
    pub overwrite: bool,
    /// Merge threads (0 = all cores).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Arguments of `pma demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size: tiny (CI, under 2 minutes), quick (about 2.5 minutes on 2 cores), full (under 40 minutes).
    #[arg(long, value_name = "tiny|quick|full", default_value = "quick")]
    pub profile: Scale,
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,
}

/// Arguments of `pma reproduce`.
#[derive(Debug, clap::Args)]
pub struct ReproduceArgs {
    /// Size: tiny (seconds per run, to check the pipeline), quick, full (about 11 minutes measured on a loaded 2-core box; budgeted for under an hour).
    #[arg(long, value_name = "tiny|quick|full", default_value = "full")]
    pub profile: Scale,
    /// Shared flags.
    #[command(flatten)]
    pub common: Common,
}

/// Runs `pma demo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    execute(Scope::Demo, args.profile, args.common)
}

/// Runs `pma reproduce`.
pub fn run_reproduce(args: ReproduceArgs) -> anyhow::Result<ExitCode> {
    execute(Scope::Reproduce, args.profile, args.common)
}

fn execute(scope: Scope, scale: Scale, common: Common) -> anyhow::Result<ExitCode> {
    let config = DemoConfig {
        scope,
        profile: Profile::new(scale),
        seed: common.seed,
        out_dir: common.out.clone(),
        overwrite: common.overwrite,
        threads: common.threads,
    };
    let progress = StageProgress::new(common.quiet);
    // No SIGINT handler here: the lab's trainer has no cancel hook, so a handler would only take
    // effect at the next stage boundary. Ctrl-C kills the process at once instead; checkpoints
    // and merges are written atomically, so what is on disk stays valid.
    let results = run_demo(&config, &progress, None)
        .with_context(|| format!("running pma {} into {}", scope.name(), common.out.display()))?;
    out!("{}", pma_demo::report::summary_table(&results))?;
    outln!("\nreport: {}", common.out.join("report.md").display())?;
    Ok(ExitCode::SUCCESS)
}

/// Stage progress on stderr: an indicatif bar on a terminal, otherwise one line per stage.
struct StageProgress {
    quiet: bool,
    tty: bool,
    state: Mutex<Option<(ProgressBar, String, Instant)>>,
}

impl StageProgress {
    fn new(quiet: bool) -> StageProgress {
        StageProgress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(None),
        }
    }
}

impl Progress for StageProgress {
    fn stage(&self, label: &str, total: u64) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::hidden();
        if self.tty {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:<28} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                    .expect("static template is valid")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        bar.set_length(total);
        bar.set_prefix(label.to_string());
        if !self.tty {
            eprintln!("{label}: {total} to do");
        }
        *self.state.lock().expect("progress lock is never poisoned") =
            Some((bar, label.to_string(), Instant::now()));
    }

    fn advance(&self, message: &str) {
        if let Some((bar, label, _)) = &*self.state.lock().expect("progress lock is never poisoned")
        {
            bar.inc(1);
            bar.set_message(message.to_string());
            // Without a terminal, a line at each quarter of a long stage shows it is alive.
            let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
            if !self.tty && len >= 40 && pos < len && pos % len.div_ceil(4) == 0 {
                eprintln!("{label}: {pos}/{len} {message}");
            }
        }
    }

    fn finish_stage(&self) {
        if let Some((bar, label, started)) = self
            .state
            .lock()
            .expect("progress lock is never poisoned")
            .take()
        {
            bar.finish_and_clear();
            eprintln!(
                "{label}: {} done in {:.1}s",
                bar.position(),
                started.elapsed().as_secs_f64()
            );
        }
    }
}
