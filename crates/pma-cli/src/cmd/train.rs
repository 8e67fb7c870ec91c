//! `pma train`: train a small Llama-style model and write HF-layout checkpoints.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pma_lab::config::ModelKind;
use pma_lab::schedule::{DecayShape, ScheduleKind};
use pma_lab::train::{load_run_config, train, Progress, StepMetrics, TrainConfig, TrainOverrides};

/// Arguments of `pma train`. Every flag can also be set in `--config run.toml` under the same
/// name (`decay-steps = 200`); flags win over the file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML run file whose keys are these flag names (e.g. `steps = 2000`, `decay-shape = "1-sqrt"`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Model family: dense (Llama) or moe (Mixtral).
    #[arg(long, value_name = "dense|moe")]
    pub model: Option<ModelKind>,
    /// Decoder blocks [default: 4].
    #[arg(long, value_name = "L")]
    pub layers: Option<usize>,
    /// Hidden size [default: 128].
    #[arg(long, value_name = "H")]
    pub hidden: Option<usize>,
    /// SwiGLU width (per expert) [default: 8/3 of --hidden, rounded up to 32].
    #[arg(long, value_name = "I")]
    pub intermediate: Option<usize>,
    /// Attention heads [default: 4].
    #[arg(long, value_name = "A")]
    pub heads: Option<usize>,
    /// Key/value heads, fewer than --heads for grouped-query attention [default: --heads].
    #[arg(long, value_name = "KV")]
    pub kv_heads: Option<usize>,
    /// MoE experts per block [default: 8].
    #[arg(long, value_name = "E")]
    pub experts: Option<usize>,
    /// MoE experts per token [default: 2].
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Weight of the MoE load-balancing loss [default: 0.02].
    #[arg(long, value_name = "C")]
    pub aux_loss_coef: Option<f64>,
    /// Tie the output head to the embedding.
    #[arg(long)]
    pub tie_embeddings: bool,
    /// Total optimizer steps; the schedule spans these [default: 1000].
    #[arg(long, value_name = "S")]
    pub steps: Option<u64>,
    /// Stop after this many steps although the schedule spans --steps (continue with --resume).
    #[arg(long, value_name = "S")]
    pub stop_after: Option<u64>,
    /// Sequences per batch [default: 16].
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Tokens per sequence [default: 128].
    #[arg(long, value_name = "T")]
    pub seq: Option<usize>,
    /// Peak learning rate [default: 3e-3].
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Final learning rate of wsd/cosine decays [default: --lr / 10].
    #[arg(long, value_name = "LR")]
    pub min_lr: Option<f64>,
    /// LR schedule: constant, wsd or cosine, all with linear warmup [default: wsd].
    #[arg(long, value_name = "constant|wsd|cosine")]
    pub schedule: Option<ScheduleKind>,
    /// Linear warmup steps [default: min(100, steps/10)].
    #[arg(long, value_name = "W")]
    pub warmup: Option<u64>,
    /// WSD decay steps at the end of the run [default: steps/5].
    #[arg(long, value_name = "D")]
    pub decay_steps: Option<u64>,
    /// WSD decay shape [default: 1-sqrt].
    #[arg(long, value_name = "linear|cosine|1-sqrt")]
    pub decay_shape: Option<DecayShape>,
    /// Multiply the LR by FACTOR for LEN steps from STEP, to provoke a loss spike.
    #[arg(long, value_name = "STEP:FACTOR:LEN")]
    pub lr_spike: Option<String>,
    /// AdamW decoupled weight decay [default: 0.1].
    #[arg(long, value_name = "WD")]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 to disable [default: 1.0].
    #[arg(long, value_name = "NORM")]
    pub grad_clip: Option<f64>,
    /// Write RUN_DIR/step-XXXXXXX/ every K steps (and at the last step) [default: 100].
    #[arg(long, value_name = "K")]
    pub save_every: Option<u64>,
    /// Seed of the weight init and the data sampler [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Train on these text files instead of the embedded Moby-Dick (last 5% held out).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub data: Option<Vec<PathBuf>>,
    /// Start from these weights (any checkpoint, raw or merged): PMA-init. The model shape comes
    /// from its config.json.
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    /// With --init, also load the checkpoint's optimizer.safetensors.
    #[arg(long)]
    pub init_optimizer: bool,
    /// Continue the run in RUN_DIR from its latest checkpoint (flags given override run.json).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Run directory.
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

impl Args {
    fn overrides(&self) -> TrainOverrides {
        TrainOverrides {
            model: self.model,
            layers: self.layers,
            hidden: self.hidden,
            intermediate: self.intermediate,
            heads: self.heads,
            kv_heads: self.kv_heads,
            experts: self.experts,
            top_k: self.top_k,
            aux_loss_coef: self.aux_loss_coef,
            tie_embeddings: self.tie_embeddings.then_some(true),
            steps: self.steps,
            stop_after: self.stop_after,
            batch: self.batch,
            seq: self.seq,
            lr: self.lr,
            min_lr: self.min_lr,
            schedule: self.schedule,
            warmup: self.warmup,
            decay_steps: self.decay_steps,
            decay_shape: self.decay_shape,
            lr_spike: self.lr_spike.clone(),
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            save_every: self.save_every,
            seed: self.seed,
            data: self.data.clone(),
            init: self.init.clone(),
            init_optimizer: self.init_optimizer.then_some(true),
            out: self.out.clone(),
        }
    }
}

impl TryFrom<&Args> for TrainConfig {
    type Error = anyhow::Error;

    fn try_from(args: &Args) -> anyhow::Result<TrainConfig> {
        let mut overrides = args.overrides();
        if let Some(path) = &args.config {
            let file = TrainOverrides::from_toml_file(path)
                .with_context(|| format!("reading {}", path.display()))?;
            overrides = overrides.or(file);
        }
        let mut config = match &args.resume {
            Some(run_dir) => {
                let mut c = load_run_config(run_dir)
                    .with_context(|| format!("reading the run config of {}", run_dir.display()))?;
                c.resume = true;
                // A stop point belongs to the invocation that set it, not to the run.
                c.stop_after = None;
                c.out_dir = run_dir.clone();
                // run.json already holds the resolved model and init; keep them.
                overrides.init = None;
                overrides.init_optimizer = None;
                c.init = None;
                c.init_optimizer = false;
                c
            }
            None => TrainConfig::default(),
        };
        overrides.apply(&mut config)?;
        if let (Some(resume), Some(out)) = (&args.resume, &args.out) {
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
    if args.quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
            .expect("static template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let report = train(&config, &Bar { bar })
        .with_context(|| format!("training into {}", config.out_dir.display()))?;
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
