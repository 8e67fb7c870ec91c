//! `pma train`: train a small Llama-style model and write HF-layout checkpoints.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pma_lab::train::{resume_config, train, Progress, StepMetrics, TrainConfig, TrainOverrides};

/// Arguments of `pma train`. Every flag can also be set in `--config run.toml` under the same
/// name (`decay-steps = 200`); flags win over the file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML run file whose keys are these flag names (e.g. `steps = 2000`, `decay-shape = "1-sqrt"`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The training flags, defined once in the lab.
    #[command(flatten)]
    pub overrides: TrainOverrides,
    /// Continue the run in RUN_DIR from its latest checkpoint (flags given override run.json).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl TryFrom<&Args> for TrainConfig {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<TrainConfig> {
        let mut overrides = args.overrides.clone();
        if let Some(path) = &args.config {
            let file = TrainOverrides::from_toml_file(path)
                .with_context(|| format!("reading {}", path.display()))?;
            overrides = overrides.or(file)?;
        }
        let config = match &args.resume {
            Some(run_dir) => resume_config(run_dir, &overrides)
                .with_context(|| format!("resuming {}", run_dir.display()))?,
            None => {
                let mut c = TrainConfig::default();
                overrides.apply(&mut c)?;
                c
            }
        };
        if let (Some(resume), Some(out)) = (&args.resume, &args.overrides.out) {
            anyhow::ensure!(
                resume == out,
                "--resume {} and --out {} differ",
                resume.display(),
                out.display()
            );
        }
        Ok(config)
    }
}

struct Bar {
    bar: ProgressBar,
}

impl Progress for Bar {
    fn start(&self, first_step: u64, last_step: u64) {
        self.bar.set_length(last_step);
        self.bar.set_position(first_step);
        self.bar.reset_eta();
    }

    fn step(&self, m: &StepMetrics) {
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            m.loss, m.lr, m.grad_norm, m.tokens_per_sec
        ));
    }

    fn checkpoint(&self, _step: u64, path: &std::path::Path) {
        self.bar.println(format!("saved {}", path.display()));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `pma train`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = TrainConfig::try_from(&args)?;
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    // The one rule of progress.rs: drawn only on a terminal, never with --quiet.
    if !crate::progress::shown(args.quiet, false) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let context = || format!("training into {}", config.out_dir.display());
    let report = train(&config, &Bar { bar }).with_context(context)?;
    // For `pma train` a diverged run is a failure: the user asked for the steps.
    report.outcome.into_result().with_context(context)?;
    eprintln!(
        "trained {} params ({}) steps {}..{} in {:.1}s: {:.0} tokens/s, final loss {:.4}, {} checkpoints in {}",
        report.n_params,
        report.model.kind.architecture(),
        report.first_step,
        report.last_step,
        report.elapsed_secs,
        report.tokens_per_sec,
        report.final_loss,
        report.checkpoints.len(),
        report.run_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
