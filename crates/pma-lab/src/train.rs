//! The training loop: fresh runs, PMA-init forks, exact resume.
//!
//! [`train`] takes a [`TrainConfig`] and reports through a [`Progress`]. It writes into
//! `out_dir`:
//! - `run.json`: the effective config, so `--resume` needs nothing else;
//! - `metrics.jsonl`: one [`StepMetrics`] object per step;
//! - `step-XXXXXXX/` every `save_every` steps and at the last step (see [`crate::checkpoint`]).
//!
//! Three ways to start:
//! - fresh: weights drawn from `seed`, zero optimizer moments;
//! - `init = Some(ckpt)` (PMA-init): weights from any checkpoint, raw or merged, with its own
//!   `config.json`; a fresh optimizer unless `init_optimizer`; a schedule of its own. Annealing
//!   forks, continued training and spike recovery all start this way.
//! - `resume = true`: continue the run in `out_dir` from its latest checkpoint. Weights, moments,
//!   step counter and sampler state are restored exactly, so N straight steps and K steps + resume
//!   + N−K steps give bit-identical weights.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState, TRAINER_STATE_VERSION};
use crate::config::{ModelConfig, ModelKind};
use crate::data::{encode_bytes, split_tokens, DataSource, WindowSampler};
use crate::error::{Error, Result};
use crate::model::Params;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::{DecayShape, LrSpike, Schedule, ScheduleKind};

/// Salt that separates the weight-init stream from the data stream of the same seed.
const INIT_SEED_SALT: u64 = 0x5EED_1417_0000_0001;

/// Everything a training run needs. Plain data; [`Default`] is a 4-layer, 128-wide dense model
/// on the embedded corpus with a WSD schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Model shape (ignored when `init` is set: the checkpoint's `config.json` wins).
    pub model: ModelConfig,
    /// Total updates of the run (the schedule spans these).
    pub steps: u64,
    /// Stop after this many updates although the schedule spans `steps` (then `--resume`).
    pub stop_after: Option<u64>,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final LR of the decay; `None` is `lr / 10`.
    pub min_lr: Option<f64>,
    /// Schedule family.
    pub schedule: ScheduleKind,
    /// Linear warmup steps; `None` is `min(100, steps / 10)`.
    pub warmup_steps: Option<u64>,
    /// WSD decay steps; `None` is `steps / 5`.
    pub decay_steps: Option<u64>,
    /// WSD decay shape.
    pub decay_shape: DecayShape,
    /// A deliberate LR spike.
    pub lr_spike: Option<LrSpike>,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// Checkpoint every this many steps (and always at the last step); 0 saves only the last.
    pub save_every: u64,
    /// Seed of the weight init and of the window sampler.
    pub seed: u64,
    /// Training text (its first 95%; the rest is the validation split).
    pub data: DataSource,
    /// Start from these weights (PMA-init).
    pub init: Option<PathBuf>,
    /// With `init`, also load its `optimizer.safetensors`.
    pub init_optimizer: bool,
    /// Continue the run in `out_dir` from its latest checkpoint.
    pub resume: bool,
    /// The run directory.
    pub out_dir: PathBuf,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelConfig::default(),
            steps: 1000,
            stop_after: None,
            batch_size: 16,
            seq_len: 128,
            lr: 3e-3,
            min_lr: None,
            schedule: ScheduleKind::Wsd,
            warmup_steps: None,
            decay_steps: None,
            decay_shape: DecayShape::OneMinusSqrt,
            lr_spike: None,
            optimizer: AdamWConfig::default(),
            save_every: 100,
            seed: 0,
            data: DataSource::Embedded,
            init: None,
            init_optimizer: false,
            resume: false,
            out_dir: PathBuf::from("run"),
        }
    }
}

impl TrainConfig {
    /// The schedule with defaults filled in.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            peak_lr: self.lr,
            min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            warmup_steps: self.warmup_steps.unwrap_or((self.steps / 10).min(100)),
            decay_steps: self.decay_steps.unwrap_or(self.steps / 5),
            decay_shape: self.decay_shape,
            total_steps: self.steps,
            spike: self.lr_spike,
        }
    }

    /// Checks ranges before anything is written.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(Error::InvalidTrainConfig { field, reason });
        if self.steps == 0 {
            return bad("steps", "must be positive".into());
        }
        if self.batch_size == 0 {
            return bad("batch", "must be positive".into());
        }
        if self.seq_len < 2 {
            return bad("seq", format!("{} is too short (at least 2)", self.seq_len));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} is not a positive number", self.lr));
        }
        if let Some(m) = self.min_lr {
            if !(m >= 0.0 && m <= self.lr) {
                return bad("min-lr", format!("{m} is not in [0, lr = {}]", self.lr));
            }
        }
        if self.init_optimizer && self.init.is_none() {
            return bad("init-optimizer", "needs --init".into());
        }
        if self.resume && self.init.is_some() {
            return bad("init", "cannot be combined with --resume".into());
        }
        if self.init.is_none() {
            self.model.validate()?;
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Updates done, this one included.
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    /// LR of this update.
    pub lr: f64,
    /// Cross-entropy of this batch before the update (nats/token).
    pub loss: f64,
    /// Load-balancing loss (MoE).
    pub aux_loss: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Throughput of this step.
    pub tokens_per_sec: f64,
}

/// Receives training events. Every method has a no-op default.
pub trait Progress {
    /// The run is about to take updates `first_step + 1 ..= last_step`.
    fn start(&self, _first_step: u64, _last_step: u64) {}
    /// An update finished.
    fn step(&self, _metrics: &StepMetrics) {}
    /// A checkpoint was written.
    fn checkpoint(&self, _step: u64, _path: &Path) {}
    /// The run ended.
    fn finish(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// How a call to [`train`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum TrainOutcome {
    /// Every update up to the stop point was taken.
    Completed,
    /// Update `step` gave a non-finite loss or gradient norm. The run stopped there: that update
    /// is neither logged nor saved, so the run directory ends at the update before.
    Diverged {
        /// The update that diverged.
        step: u64,
        /// Its cross-entropy.
        loss: f64,
        /// Its gradient norm before clipping.
        grad_norm: f64,
    },
}

impl TrainOutcome {
    /// The step that diverged, if the run did.
    pub fn diverged_at(&self) -> Option<u64> {
        match self {
            TrainOutcome::Completed => None,
            TrainOutcome::Diverged { step, .. } => Some(*step),
        }
    }

    /// [`Error::NonFinite`] for a diverged run, for a caller that treats divergence as failure.
    pub fn into_result(self) -> Result<()> {
        match self {
            TrainOutcome::Completed => Ok(()),
            TrainOutcome::Diverged {
                step,
                loss,
                grad_norm,
            } => Err(Error::NonFinite {
                step,
                loss,
                grad_norm,
            }),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Completed, or diverged at a step.
    pub outcome: TrainOutcome,
    /// The updates of this call, in order, as logged to `metrics.jsonl` (a diverged update is
    /// not among them).
    pub curve: Vec<StepMetrics>,
    /// The effective model config.
    pub model: ModelConfig,
    /// Scalar parameters.
    pub n_params: usize,
    /// Step the run started from (0 unless resumed).
    pub first_step: u64,
    /// The last update taken (before the diverged one, if any).
    pub last_step: u64,
    /// Checkpoints written, in order.
    pub checkpoints: Vec<PathBuf>,
    /// Cross-entropy of the last batch.
    pub final_loss: f64,
    /// Training tokens consumed in the run so far.
    pub tokens_seen: u64,
    /// Wall time of the updates taken in this call.
    pub elapsed_secs: f64,
    /// Tokens per second over this call.
    pub tokens_per_sec: f64,
}

/// The device training runs on: CUDA 0 where built with the `cuda` feature and present, else
/// the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// Process-wide settings for CPU training. Call it first thing in `main`, before any thread
/// exists: it sets an environment variable, which is only sound while no other thread can read
/// the environment, so the library never calls it on its own (a test harness has threads).
///
/// - candle's element-wise ops stay on the calling thread (`CANDLE_NUM_THREADS=1`), unless the
///   user set that variable. candle runs element-wise ops of 64K+ elements on a second pool of
///   its own whose workers, and the caller waiting for them, busy-spin. The lab's matmuls and
///   fused kernels already use every rayon thread, so on a machine with as many cores as
///   threads that spinning took a third of the CPU time of a 2-thread training step, on cores
///   the rayon workers needed. The heavy element-wise work is in [`crate::fused`]'s rayon
///   kernels; the few candle element-wise passes left cost less serial than spun. The pool is
///   created on first use; matmul threading
///   (`RAYON_NUM_THREADS`) is unaffected.
/// - glibc's malloc keeps freed memory instead of returning it to the kernel. A step allocates
///   and frees the same few dozen activation-sized buffers; with glibc's adaptive thresholds
///   they were mapped afresh, so a tenth of a step went to page faults and zeroing new pages.
pub fn tune_cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; any value is memory-safe. 32 MiB
        // is glibc's largest mmap threshold on 64-bit; 1 GiB bounds what freed memory it keeps.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Reads the `run.json` a run wrote, to resume it.
pub fn load_run_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join("run.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "reading", e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })
}

/// The config that resumes the run in `run_dir`: its `run.json` with `overrides` applied.
///
/// Only settings that leave the weights unchanged may be given: where this invocation stops
/// (`stop-after`, which belongs to the invocation, not to the run), how often it saves
/// (`save-every`) and the run directory. Any other override that differs from the recorded value
/// would make the result differ from an uninterrupted run, so it is refused with
/// [`Error::ResumeSettingsChanged`], which names each one. Overrides equal to the recorded
/// values are accepted.
pub fn resume_config(run_dir: &Path, overrides: &TrainOverrides) -> Result<TrainConfig> {
    let recorded = load_run_config(run_dir)?;
    let mut config = recorded.clone();
    config.stop_after = None;
    overrides.apply(&mut config)?;
    let mut exact = config.clone();
    exact.stop_after = recorded.stop_after;
    exact.save_every = recorded.save_every;
    exact.out_dir.clone_from(&recorded.out_dir);
    if exact != recorded {
        let as_json = |c: &TrainConfig| serde_json::to_value(c).expect("plain data serializes");
        let mut changed = Vec::new();
        json_diff("", &as_json(&recorded), &as_json(&exact), &mut changed);
        return Err(Error::ResumeSettingsChanged {
            path: run_dir.join("run.json"),
            changed: changed.join(", "),
        });
    }
    config.resume = true;
    config.out_dir = run_dir.to_path_buf();
    // The weights come from the run's own checkpoint; what it was initialised from is history.
    config.init = None;
    config.init_optimizer = false;
    Ok(config)
}

/// Appends `key (recorded R, given G)` for every leaf where `a` and `b` differ.
fn json_diff(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                json_diff(
                    &key,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{prefix} (recorded {a}, given {b})")),
        _ => {}
    }
}

/// Trains, writing checkpoints and metrics into `config.out_dir`.
///
/// A run that diverges is a result, not an error: the report's [`TrainOutcome`] says where.
pub fn train(config: &TrainConfig, progress: &dyn Progress) -> Result<TrainReport> {
    config.validate()?;
    let device = default_device();
    let run_dir = config.out_dir.clone();
    let tokens = encode_bytes(&config.data.load()?);
    let split = split_tokens(&tokens);

    let mut config = config.clone();
    let (params, model, mut optimizer, mut sampler, mut state) = if config.resume {
        let (step, ckpt) = checkpoint::list_checkpoints(&run_dir)?
            .pop()
            .ok_or_else(|| Error::NothingToResume {
                path: run_dir.clone(),
            })?;
        let state = checkpoint::read_trainer_state(&ckpt)?;
        if state.step != step {
            return Err(Error::InvalidTrainerState {
                path: ckpt.join("trainer_state.json"),
                reason: format!("step {} but the directory says {step}", state.step),
            });
        }
        // The checkpoint's config.json is the model; run.json only repeats it.
        let (model_config, params, model) = checkpoint::load_params(&ckpt, DType::F32, &device)?;
        config.model = model_config;
        let mut optimizer = AdamW::new(config.optimizer, &params);
        checkpoint::load_optimizer(&ckpt, &params, &mut optimizer)?;
        let sampler = WindowSampler::from_cursor(state.data);
        truncate_metrics(&run_dir.join("metrics.jsonl"), step)?;
        (params, model, optimizer, sampler, state)
    } else {
        if !checkpoint::list_checkpoints(&run_dir)?.is_empty() {
            return Err(Error::RunDirOccupied {
                path: run_dir.clone(),
            });
        }
        let (params, model) = match &config.init {
            Some(init) => {
                let (mut model_config, params, model) =
                    checkpoint::load_params(init, DType::F32, &device)?;
                model_config.max_position_embeddings =
                    model_config.max_position_embeddings.max(config.seq_len);
                config.model = model_config.clone();
                let mut model = model;
                model.config = model_config;
                (params, model)
            }
            None => {
                config.model.max_position_embeddings = config.seq_len;
                Params::init(
                    &config.model,
                    config.seed ^ INIT_SEED_SALT,
                    DType::F32,
                    &device,
                )?
            }
        };
        let mut optimizer = AdamW::new(config.optimizer, &params);
        if let (Some(init), true) = (&config.init, config.init_optimizer) {
            checkpoint::load_optimizer(init, &params, &mut optimizer)?;
        }
        std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, "creating", e))?;
        let mut run_json =
            serde_json::to_vec_pretty(&config).expect("plain data always serializes");
        run_json.push(b'\n');
        pma_format::write_file_synced(&run_dir.join("run.json"), &run_json)?;
        let metrics = run_dir.join("metrics.jsonl");
        if metrics.exists() {
            std::fs::remove_file(&metrics).map_err(|e| Error::io(&metrics, "removing", e))?;
        }
        let state = TrainerState {
            schema_version: TRAINER_STATE_VERSION,
            step: 0,
            tokens_seen: 0,
            lr: 0.0,
            train_loss: f64::NAN,
            aux_loss: None,
            grad_norm: f64::NAN,
            data: WindowSampler::new(config.seed).cursor(),
            init_from: config.init.clone(),
        };
        (
            params,
            model,
            optimizer,
            WindowSampler::new(config.seed),
            state,
        )
    };

    let schedule = config.schedule();
    let first_step = state.step;
    let last_step = config
        .stop_after
        .map_or(config.steps, |s| s.min(config.steps));
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, "opening", e))?;
    let (b, t) = (config.batch_size, config.seq_len);
    let mut checkpoints = Vec::new();
    let mut curve = Vec::new();
    let mut outcome = TrainOutcome::Completed;
    let started = Instant::now();
    progress.start(first_step, last_step);
    for step in first_step..last_step {
        let step_started = Instant::now();
        let (x, y) = sampler.next_batch(&split.train, b, t)?;
        let inputs = Tensor::from_vec(x, (b, t), &device)?;
        let targets = Tensor::from_vec(y, (b, t), &device)?;
        let loss = model.loss(&inputs, &targets)?;
        let grads = loss.total.backward()?;
        let lr = schedule.lr_at(step);
        let ce = f64::from(loss.ce.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let aux = match &loss.aux {
            Some(a) => Some(f64::from(a.to_dtype(DType::F32)?.to_scalar::<f32>()?)),
            None => None,
        };
        let stats = optimizer.update(&params, &grads, lr)?;
        if !ce.is_finite() || !stats.grad_norm.is_finite() {
            // The weights are now poisoned: stop without logging or saving this update.
            outcome = TrainOutcome::Diverged {
                step: step + 1,
                loss: ce,
                grad_norm: stats.grad_norm,
            };
            break;
        }
        state.step = step + 1;
        state.tokens_seen += (b * t) as u64;
        state.lr = lr;
        state.train_loss = ce;
        state.aux_loss = aux;
        state.grad_norm = stats.grad_norm;
        state.data = sampler.cursor();
        let m = StepMetrics {
            step: state.step,
            tokens: state.tokens_seen,
            lr,
            loss: ce,
            aux_loss: aux,
            grad_norm: stats.grad_norm,
            tokens_per_sec: (b * t) as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
        };
        let mut line = serde_json::to_vec(&m).expect("plain data always serializes");
        line.push(b'\n');
        metrics_file
            .write_all(&line)
            .map_err(|e| Error::io(&metrics_path, "appending to", e))?;
        progress.step(&m);
        curve.push(m);
        let due = config.save_every > 0 && state.step % config.save_every == 0;
        if due || state.step == last_step {
            let path =
                checkpoint::save_checkpoint(&run_dir, &config.model, &params, &optimizer, &state)?;
            progress.checkpoint(state.step, &path);
            checkpoints.push(path);
        }
    }
    progress.finish();
    let elapsed_secs = started.elapsed().as_secs_f64();
    let n_tokens = (state.step - first_step) as f64 * (b * t) as f64;
    Ok(TrainReport {
        run_dir,
        outcome,
        curve,
        n_params: params.n_params(),
        model: config.model.clone(),
        first_step,
        last_step: state.step,
        checkpoints,
        final_loss: state.train_loss,
        tokens_seen: state.tokens_seen,
        elapsed_secs,
        tokens_per_sec: n_tokens / elapsed_secs.max(1e-9),
    })
}

/// Drops `metrics.jsonl` lines past `step`, so a resumed run does not log a step twice.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, "reading", e)),
    };
    let kept: String = text
        .lines()
        .filter(|line| serde_json::from_str::<StepMetrics>(line).is_ok_and(|m| m.step <= step))
        .flat_map(|line| [line, "\n"])
        .collect();
    // Staged beside the file, fsync'd, renamed over it, directory fsync'd: a crash leaves the
    // old metrics or the new ones.
    Ok(pma_format::write_file_atomic(
        path,
        kept.as_bytes(),
        pma_format::Publish::Replace,
    )?)
}

/// A flat, all-optional view of a [`TrainConfig`] whose keys are the `pma train` flag names
/// (`--decay-steps` is `decay-steps`). It is the one definition of the training flags: the schema
/// of `--config run.toml` and, with the `clap` feature, the flags themselves (the CLI flattens it
/// into its `train` arguments), so a file and flags combine by [`TrainOverrides::or`]. Adding a
/// flag is one field here and one line in [`TrainOverrides::apply`].
///
/// The doc comments are the `--help` text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainOverrides {
    /// Model family: dense (Llama) or moe (Mixtral).
    #[cfg_attr(feature = "clap", arg(long, value_name = "dense|moe"))]
    pub model: Option<ModelKind>,
    /// Decoder blocks [default: 4].
    #[cfg_attr(feature = "clap", arg(long, value_name = "L"))]
    pub layers: Option<usize>,
    /// Hidden size [default: 128].
    #[cfg_attr(feature = "clap", arg(long, value_name = "H"))]
    pub hidden: Option<usize>,
    /// SwiGLU width (per expert) [default: 8/3 of --hidden, rounded up to 32].
    #[cfg_attr(feature = "clap", arg(long, value_name = "I"))]
    pub intermediate: Option<usize>,
    /// Attention heads [default: 4].
    #[cfg_attr(feature = "clap", arg(long, value_name = "A"))]
    pub heads: Option<usize>,
    /// Key/value heads, fewer than --heads for grouped-query attention [default: --heads].
    #[cfg_attr(feature = "clap", arg(long, value_name = "KV"))]
    pub kv_heads: Option<usize>,
    /// MoE experts per block [default: 8].
    #[cfg_attr(feature = "clap", arg(long, value_name = "E"))]
    pub experts: Option<usize>,
    /// MoE experts per token [default: 2].
    #[cfg_attr(feature = "clap", arg(long, value_name = "K"))]
    pub top_k: Option<usize>,
    /// Weight of the MoE load-balancing loss [default: 0.02].
    #[cfg_attr(feature = "clap", arg(long, value_name = "C"))]
    pub aux_loss_coef: Option<f64>,
    /// Tie the output head to the embedding.
    // A flag on the command line (present = true, absent = unset, so a run file can still set
    // it), a boolean in the run file.
    #[cfg_attr(
        feature = "clap",
        arg(long, num_args = 0, default_missing_value = "true")
    )]
    pub tie_embeddings: Option<bool>,
    /// Total optimizer steps; the schedule spans these [default: 1000].
    #[cfg_attr(feature = "clap", arg(long, value_name = "S"))]
    pub steps: Option<u64>,
    /// Stop after this many steps although the schedule spans --steps (continue with --resume).
    #[cfg_attr(feature = "clap", arg(long, value_name = "S"))]
    pub stop_after: Option<u64>,
    /// Sequences per batch [default: 16].
    #[cfg_attr(feature = "clap", arg(long, value_name = "B"))]
    pub batch: Option<usize>,
    /// Tokens per sequence [default: 128].
    #[cfg_attr(feature = "clap", arg(long, value_name = "T"))]
    pub seq: Option<usize>,
    /// Peak learning rate [default: 3e-3].
    #[cfg_attr(feature = "clap", arg(long, value_name = "LR"))]
    pub lr: Option<f64>,
    /// Final learning rate of wsd/cosine decays [default: --lr / 10].
    #[cfg_attr(feature = "clap", arg(long, value_name = "LR"))]
    pub min_lr: Option<f64>,
    /// LR schedule: constant, wsd or cosine, all with linear warmup [default: wsd].
    #[cfg_attr(feature = "clap", arg(long, value_name = "constant|wsd|cosine"))]
    pub schedule: Option<ScheduleKind>,
    /// Linear warmup steps [default: min(100, steps/10)].
    #[cfg_attr(feature = "clap", arg(long, value_name = "W"))]
    pub warmup: Option<u64>,
    /// WSD decay steps at the end of the run [default: steps/5].
    #[cfg_attr(feature = "clap", arg(long, value_name = "D"))]
    pub decay_steps: Option<u64>,
    /// WSD decay shape [default: 1-sqrt].
    #[cfg_attr(feature = "clap", arg(long, value_name = "linear|cosine|1-sqrt"))]
    pub decay_shape: Option<DecayShape>,
    /// Multiply the LR by FACTOR for LEN steps from STEP, to provoke a loss spike.
    #[cfg_attr(feature = "clap", arg(long, value_name = "STEP:FACTOR:LEN"))]
    pub lr_spike: Option<String>,
    /// AdamW decoupled weight decay [default: 0.1].
    #[cfg_attr(feature = "clap", arg(long, value_name = "WD"))]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 to disable [default: 1.0].
    #[cfg_attr(feature = "clap", arg(long, value_name = "NORM"))]
    pub grad_clip: Option<f64>,
    /// Write RUN_DIR/step-XXXXXXX/ every K steps (and at the last step) [default: 100].
    #[cfg_attr(feature = "clap", arg(long, value_name = "K"))]
    pub save_every: Option<u64>,
    /// Seed of the weight init and the data sampler [default: 0].
    #[cfg_attr(feature = "clap", arg(long, value_name = "S"))]
    pub seed: Option<u64>,
    /// Train on these text files instead of the embedded Moby-Dick (last 5% held out).
    #[cfg_attr(feature = "clap", arg(long, value_name = "FILE", num_args = 1..))]
    pub data: Option<Vec<PathBuf>>,
    /// Start from these weights (any checkpoint, raw or merged): PMA-init. The model shape comes
    /// from its config.json.
    #[cfg_attr(feature = "clap", arg(long, value_name = "CKPT"))]
    pub init: Option<PathBuf>,
    /// With --init, also load the checkpoint's optimizer.safetensors.
    #[cfg_attr(
        feature = "clap",
        arg(long, num_args = 0, default_missing_value = "true")
    )]
    pub init_optimizer: Option<bool>,
    /// Run directory.
    // Required unless the flattening command has a `resume` argument that is given.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "RUN_DIR", required_unless_present = "resume")
    )]
    pub out: Option<PathBuf>,
}

impl TrainOverrides {
    /// Reads a TOML run file.
    pub fn from_toml_file(path: &Path) -> Result<TrainOverrides> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading", e))?;
        toml::from_str(&text).map_err(|source| Error::Toml {
            path: path.into(),
            source,
        })
    }

    /// Field by field, `self` where set, else `fallback`.
    ///
    /// Fails only for a path that is not UTF-8, which `run.json` could not record either.
    pub fn or(self, fallback: TrainOverrides) -> Result<TrainOverrides> {
        // Through the run-file form, so the field list is not written out again: unset fields
        // are absent from the table, set ones replace the fallback's. TOML (not JSON) keeps NaN
        // and infinities, so a bad `--lr nan` still reaches `validate`.
        let table = |o: &TrainOverrides| -> Result<toml::Table> {
            toml::Table::try_from(o).map_err(|e| Error::InvalidTrainConfig {
                field: "paths",
                reason: format!("{e} (paths must be UTF-8 to be recorded in run.json)"),
            })
        };
        let mut merged = table(&fallback)?;
        merged.extend(table(&self)?);
        Ok(merged
            .try_into()
            .expect("a table of the struct's own fields deserializes back"))
    }

    /// Writes the set fields into `config`.
    pub fn apply(&self, config: &mut TrainConfig) -> Result<()> {
        let m = &mut config.model;
        if let Some(v) = self.model {
            m.kind = v;
        }
        if let Some(v) = self.layers {
            m.num_layers = v;
        }
        if let Some(v) = self.hidden {
            m.hidden_size = v;
            if self.intermediate.is_none() {
                m.intermediate_size = crate::config::default_intermediate_size(v);
            }
        }
        if let Some(v) = self.intermediate {
            m.intermediate_size = v;
        }
        if let Some(v) = self.heads {
            m.num_heads = v;
            if self.kv_heads.is_none() {
                m.num_kv_heads = v;
            }
        }
        if let Some(v) = self.kv_heads {
            m.num_kv_heads = v;
        }
        if let Some(v) = self.experts {
            m.num_experts = v;
        }
        if let Some(v) = self.top_k {
            m.top_k = v;
        }
        if let Some(v) = self.aux_loss_coef {
            m.router_aux_loss_coef = v;
        }
        if let Some(v) = self.tie_embeddings {
            m.tie_word_embeddings = v;
        }
        macro_rules! set {
            ($($src:ident => $dst:expr),* $(,)?) => { $(if let Some(v) = self.$src.clone() { $dst = v; })* };
        }
        set!(
            steps => config.steps,
            batch => config.batch_size,
            seq => config.seq_len,
            lr => config.lr,
            schedule => config.schedule,
            decay_shape => config.decay_shape,
            weight_decay => config.optimizer.weight_decay,
            grad_clip => config.optimizer.grad_clip,
            save_every => config.save_every,
            seed => config.seed,
            init_optimizer => config.init_optimizer,
            out => config.out_dir,
        );
        if self.stop_after.is_some() {
            config.stop_after = self.stop_after;
        }
        if self.min_lr.is_some() {
            config.min_lr = self.min_lr;
        }
        if self.warmup.is_some() {
            config.warmup_steps = self.warmup;
        }
        if self.decay_steps.is_some() {
            config.decay_steps = self.decay_steps;
        }
        if let Some(s) = &self.lr_spike {
            config.lr_spike = Some(s.parse().map_err(|reason| Error::InvalidTrainConfig {
                field: "lr-spike",
                reason,
            })?);
        }
        if let Some(files) = &self.data {
            config.data = if files.is_empty() {
                DataSource::Embedded
            } else {
                DataSource::Files(files.clone())
            };
        }
        if self.init.is_some() {
            config.init = self.init.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_prefers_set_fields_and_keeps_the_fallbacks_others() {
        let flags = TrainOverrides {
            steps: Some(20),
            lr: Some(f64::NAN),
            data: Some(vec!["a.txt".into()]),
            ..TrainOverrides::default()
        };
        let file = TrainOverrides {
            steps: Some(10),
            seed: Some(7),
            tie_embeddings: Some(true),
            ..TrainOverrides::default()
        };
        let merged = flags.or(file).unwrap();
        assert_eq!(merged.steps, Some(20));
        assert_eq!(merged.seed, Some(7));
        assert_eq!(merged.tie_embeddings, Some(true));
        assert_eq!(merged.data, Some(vec![PathBuf::from("a.txt")]));
        // A NaN is kept, for validate to reject, not dropped in favour of the default.
        assert!(merged.lr.is_some_and(f64::is_nan));
        assert_eq!(merged.out, None);
    }

    fn recorded_run(dir: &Path) -> TrainConfig {
        let config = TrainConfig {
            steps: 40,
            lr: 1e-3,
            init: Some(dir.join("base/step-0000010")),
            init_optimizer: true,
            stop_after: Some(20),
            out_dir: dir.join("run"),
            ..TrainConfig::default()
        };
        std::fs::create_dir_all(&config.out_dir).unwrap();
        let json = serde_json::to_vec_pretty(&config).unwrap();
        std::fs::write(config.out_dir.join("run.json"), json).unwrap();
        config
    }

    /// Regression (issue 11): `--resume` silently accepted overrides that break exact resume.
    #[test]
    fn resume_refuses_settings_that_change_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let recorded = recorded_run(dir.path());
        let run = &recorded.out_dir;
        for (overrides, named) in [
            (
                TrainOverrides {
                    lr: Some(2e-3),
                    ..TrainOverrides::default()
                },
                "lr (recorded 0.001, given 0.002)",
            ),
            (
                TrainOverrides {
                    steps: Some(80),
                    ..TrainOverrides::default()
                },
                "steps (recorded 40, given 80)",
            ),
            (
                TrainOverrides {
                    layers: Some(2),
                    ..TrainOverrides::default()
                },
                "model.num_layers (recorded 4, given 2)",
            ),
            (
                TrainOverrides {
                    data: Some(vec!["other.txt".into()]),
                    ..TrainOverrides::default()
                },
                "data",
            ),
            (
                TrainOverrides {
                    init: Some("elsewhere".into()),
                    ..TrainOverrides::default()
                },
                "init",
            ),
        ] {
            match resume_config(run, &overrides) {
                Err(Error::ResumeSettingsChanged { path, changed }) => {
                    assert_eq!(path, run.join("run.json"));
                    assert!(changed.contains(named), "{changed} lacks {named}");
                }
                other => panic!("{overrides:?}: expected ResumeSettingsChanged, got {other:?}"),
            }
        }
    }

    #[test]
    fn resume_accepts_stop_save_and_the_recorded_values() {
        let dir = tempfile::tempdir().unwrap();
        let recorded = recorded_run(dir.path());
        let run = &recorded.out_dir;
        let c = resume_config(run, &TrainOverrides::default()).unwrap();
        assert!(c.resume);
        assert_eq!(c.stop_after, None, "a stop point belongs to its invocation");
        assert_eq!((c.init.clone(), c.init_optimizer), (None, false));
        assert_eq!(c.lr, recorded.lr);
        let given = TrainOverrides {
            stop_after: Some(30),
            save_every: Some(5),
            lr: Some(1e-3),
            steps: Some(40),
            init: recorded.init.clone(),
            out: Some(run.clone()),
            ..TrainOverrides::default()
        };
        let c = resume_config(run, &given).unwrap();
        assert_eq!((c.stop_after, c.save_every), (Some(30), 5));
        c.validate().unwrap();
    }

    /// The training flags are defined once: parsing them fills `TrainOverrides`, unset flags
    /// stay unset (so a run file can fill them), and every flag is a run-file key.
    #[cfg(feature = "clap")]
    #[test]
    fn flags_are_the_run_file_keys() {
        use clap::{CommandFactory, Parser};

        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            overrides: TrainOverrides,
            #[arg(long)]
            resume: Option<PathBuf>,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "t",
            "--out",
            "run",
            "--decay-steps",
            "200",
            "--decay-shape",
            "1-sqrt",
            "--model",
            "moe",
            "--tie-embeddings",
            "--data",
            "a.txt",
            "b.txt",
        ])
        .unwrap();
        let o = cli.overrides;
        assert_eq!(o.decay_steps, Some(200));
        assert_eq!(o.decay_shape, Some(DecayShape::OneMinusSqrt));
        assert_eq!(o.model, Some(ModelKind::Moe));
        assert_eq!(o.tie_embeddings, Some(true));
        assert_eq!(o.init_optimizer, None);
        assert_eq!(o.steps, None);
        assert_eq!(o.data, Some(vec!["a.txt".into(), "b.txt".into()]));
        assert_eq!(o.out, Some(PathBuf::from("run")));
        // --out is required unless --resume names the run.
        assert!(Cli::try_parse_from(["t"]).is_err());
        assert!(Cli::try_parse_from(["t", "--resume", "run"]).is_ok());
        assert!(Cli::try_parse_from(["t", "--out", "r", "--tie-embeddings=false"]).is_err());

        let mut flags: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|l| l != "resume")
            .collect();
        flags.sort();
        let all_set = TrainOverrides {
            model: Some(ModelKind::Dense),
            layers: Some(1),
            hidden: Some(1),
            intermediate: Some(1),
            heads: Some(1),
            kv_heads: Some(1),
            experts: Some(1),
            top_k: Some(1),
            aux_loss_coef: Some(1.0),
            tie_embeddings: Some(true),
            steps: Some(1),
            stop_after: Some(1),
            batch: Some(1),
            seq: Some(1),
            lr: Some(1.0),
            min_lr: Some(1.0),
            schedule: Some(ScheduleKind::Wsd),
            warmup: Some(1),
            decay_steps: Some(1),
            decay_shape: Some(DecayShape::Linear),
            lr_spike: Some("1:2:3".into()),
            weight_decay: Some(1.0),
            grad_clip: Some(1.0),
            save_every: Some(1),
            seed: Some(1),
            data: Some(vec!["a".into()]),
            init: Some("i".into()),
            init_optimizer: Some(true),
            out: Some("o".into()),
        };
        let mut keys: Vec<String> = toml::Table::try_from(&all_set)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        assert_eq!(flags, keys);
    }
}
