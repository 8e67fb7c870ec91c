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
            decay_shape: DecayShape::OneSqrt,
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

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The effective model config.
    pub model: ModelConfig,
    /// Scalar parameters.
    pub n_params: usize,
    /// Step the run started from (0 unless resumed).
    pub first_step: u64,
    /// Step it stopped at.
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

/// Reads the `run.json` a run wrote, to resume it.
pub fn load_run_config(run_dir: &Path) -> Result<TrainConfig> {
    let path = run_dir.join("run.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "reading", e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })
}

/// Trains, writing checkpoints and metrics into `config.out_dir`.
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
            return Err(Error::NonFinite {
                step: step + 1,
                loss: ce,
                grad_norm: stats.grad_norm,
            });
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
    let n_tokens = (last_step.saturating_sub(first_step)) as f64 * (b * t) as f64;
    Ok(TrainReport {
        run_dir,
        n_params: params.n_params(),
        model: config.model.clone(),
        first_step,
        last_step,
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
/// (`--decay-steps` is `decay-steps`). It is the schema of `--config run.toml`, and the CLI
/// builds one from its flags, so a file and flags combine by [`TrainOverrides::or`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TrainOverrides {
    pub model: Option<ModelKind>,
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub intermediate: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    pub aux_loss_coef: Option<f64>,
    pub tie_embeddings: Option<bool>,
    pub steps: Option<u64>,
    pub stop_after: Option<u64>,
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub schedule: Option<ScheduleKind>,
    pub warmup: Option<u64>,
    pub decay_steps: Option<u64>,
    pub decay_shape: Option<DecayShape>,
    pub lr_spike: Option<String>,
    pub weight_decay: Option<f64>,
    pub grad_clip: Option<f64>,
    pub save_every: Option<u64>,
    pub seed: Option<u64>,
    pub data: Option<Vec<PathBuf>>,
    pub init: Option<PathBuf>,
    pub init_optimizer: Option<bool>,
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
    pub fn or(self, fallback: TrainOverrides) -> TrainOverrides {
        macro_rules! pick {
            ($($f:ident),*) => { TrainOverrides { $($f: self.$f.or(fallback.$f)),* } };
        }
        pick!(
            model,
            layers,
            hidden,
            intermediate,
            heads,
            kv_heads,
            experts,
            top_k,
            aux_loss_coef,
            tie_embeddings,
            steps,
            stop_after,
            batch,
            seq,
            lr,
            min_lr,
            schedule,
            warmup,
            decay_steps,
            decay_shape,
            lr_spike,
            weight_decay,
            grad_clip,
            save_every,
            seed,
            data,
            init,
            init_optimizer,
            out
        )
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
