//! Reading and writing lab checkpoints.
//!
//! A training checkpoint is a directory `RUN_DIR/step-XXXXXXX/` (7-digit step) holding:
//! - `model.safetensors` (f32, HF names) and `config.json` — an HF checkpoint `transformers` and
//!   `pma merge` read as is;
//! - `optimizer.safetensors`: `{name}.exp_avg` and `{name}.exp_avg_sq` per parameter, kept
//!   apart so merges never see it;
//! - `trainer_state.json`: step, tokens seen, LR, losses, gradient norm, and the data cursor
//!   (sampler RNG state and windows drawn).
//!
//! Each directory is staged beside its final path and renamed into place, so a crash never
//! leaves a half-written `step-*` directory for `--resume` to pick up.
//!
//! Loading accepts anything the merge engine writes: one file or a sharded index, in bf16, f16,
//! f32 or f64; values are decoded to the model dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pma_format::{
    write_file_synced, write_safetensors, Checkpoint, Dtype, DtypeClass, OutputKind, Publish,
    StagedOutput, TensorSpec,
};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::DataCursor;
use crate::error::{Error, Result};
use crate::model::{Llama, Params};
use crate::optim::AdamW;

/// Version of `trainer_state.json`.
pub const TRAINER_STATE_VERSION: u32 = 1;

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Schema version.
    pub schema_version: u32,
    /// Updates taken in this run.
    pub step: u64,
    /// Training tokens consumed in this run.
    pub tokens_seen: u64,
    /// LR of the last update.
    pub lr: f64,
    /// Cross-entropy of the last batch (nats/token).
    pub train_loss: f64,
    /// Load-balancing loss of the last batch (MoE).
    pub aux_loss: Option<f64>,
    /// Global gradient norm of the last update, before clipping.
    pub grad_norm: f64,
    /// Where the sampler stands.
    pub data: DataCursor,
    /// The checkpoint this run was initialised from (`--init`), if any.
    pub init_from: Option<PathBuf>,
}

/// `RUN_DIR/step-XXXXXXX`.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("step-{step:07}"))
}

/// The `step-*` checkpoints of a run with their steps, in step order.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(run_dir, "listing", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(run_dir, "listing", e))?;
        let name = entry.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_prefix("step-")) else {
            continue;
        };
        if let Ok(step) = digits.parse::<u64>() {
            if entry.path().join("trainer_state.json").is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn host_f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes `model.safetensors` (f32) and `config.json` into `dir`.
pub fn write_model(dir: &Path, config: &ModelConfig, params: &Params) -> Result<()> {
    let bytes: Vec<Vec<u8>> = params
        .vars
        .iter()
        .map(|(_, v)| f32_bytes(v))
        .collect::<Result<_>>()?;
    let tensors: Vec<(TensorSpec, &[u8])> = params
        .vars
        .iter()
        .zip(&bytes)
        .map(|((name, var), b)| {
            let spec = TensorSpec {
                name: name.clone(),
                dtype: Dtype::F32,
                shape: var.dims().iter().map(|&d| d as u64).collect(),
            };
            (spec, b.as_slice())
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, &pt_metadata())?;
    write_json(&dir.join("config.json"), &config.to_hf_json())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("plain data always serializes");
    text.push(b'\n');
    Ok(write_file_synced(path, &text)?)
}

/// Writes a complete training checkpoint to `RUN_DIR/step-XXXXXXX` atomically.
pub fn save_checkpoint(
    run_dir: &Path,
    config: &ModelConfig,
    params: &Params,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let target = step_dir(run_dir, state.step);
    let staged = StagedOutput::create(&target, OutputKind::Dir, Publish::Replace)?;
    write_model(staged.path(), config, params)?;
    let moments: Vec<(TensorSpec, Vec<u8>)> = params
        .vars
        .iter()
        .enumerate()
        .flat_map(|(i, (name, var))| {
            let shape: Vec<u64> = var.dims().iter().map(|&d| d as u64).collect();
            let spec = |suffix: &str| TensorSpec {
                name: format!("{name}.{suffix}"),
                dtype: Dtype::F32,
                shape: shape.clone(),
            };
            [
                (spec("exp_avg"), host_f32_bytes(&optimizer.exp_avg[i])),
                (spec("exp_avg_sq"), host_f32_bytes(&optimizer.exp_avg_sq[i])),
            ]
        })
        .collect();
    let refs: Vec<(TensorSpec, &[u8])> = moments
        .iter()
        .map(|(s, b)| (s.clone(), b.as_slice()))
        .collect();
    let mut meta = pt_metadata();
    meta.insert("adamw_step".into(), optimizer.step.to_string());
    write_safetensors(&staged.path().join("optimizer.safetensors"), &refs, &meta)?;
    write_json(&staged.path().join("trainer_state.json"), state)?;
    staged.commit()?;
    Ok(target)
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn read_trainer_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join("trainer_state.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "reading", e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })
}

/// An opened checkpoint whose tensors can be decoded by name.
#[derive(Debug)]
pub struct WeightSource {
    checkpoint: Checkpoint,
}

impl WeightSource {
    /// Opens a checkpoint directory (single file or sharded) or a `.safetensors` file.
    pub fn open(path: &Path) -> Result<WeightSource> {
        Ok(WeightSource {
            checkpoint: Checkpoint::open(path)?,
        })
    }

    /// Decodes tensor `name`, checking it has `shape`, into `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let path = self.checkpoint.root();
        let r = self
            .checkpoint
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.into(),
                tensor: name.into(),
            })?;
        if r.info.shape.len() != shape.len()
            || r.info.shape.iter().zip(shape).any(|(&a, &b)| a != b as u64)
        {
            return Err(Error::ShapeMismatch {
                path: path.into(),
                tensor: name.into(),
                expected: shape.to_vec(),
                found: r.info.shape.clone(),
            });
        }
        let DtypeClass::Float(fd) = pma_format::dtype::classify(r.info.dtype) else {
            return Err(Error::UnsupportedDtype {
                path: path.into(),
                tensor: name.into(),
                dtype: pma_format::dtype::dtype_name(r.info.dtype),
            });
        };
        let bytes = self.checkpoint.bytes(r);
        let n: usize = shape.iter().product();
        let t = if dtype == DType::F64 {
            let mut v = vec![0f64; n];
            pma_format::dtype::for_each_f64(fd, bytes, |i, x| v[i] = x);
            Tensor::from_vec(v, shape, device)?
        } else {
            // f32 (or narrower) targets: every stored float dtype converts exactly or rounds once.
            let mut v = vec![0f32; n];
            pma_format::dtype::for_each_f64(fd, bytes, |i, x| v[i] = x as f32);
            Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
        };
        Ok(t)
    }
}

/// Loads a model for inference from any checkpoint with a `config.json`.
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<Llama> {
    let config = ModelConfig::load(path)?;
    let src = WeightSource::open(path)?;
    Llama::build(&config, &mut |name, shape| {
        src.tensor(name, shape, dtype, device)
    })
}

/// Loads trainable parameters from any checkpoint with a `config.json`.
pub fn load_params(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ModelConfig, Params, Llama)> {
    let config = ModelConfig::load(path)?;
    let src = WeightSource::open(path)?;
    let (params, model) = Params::from_values(&config, &mut |name, shape| {
        src.tensor(name, shape, dtype, device)
    })?;
    Ok((config, params, model))
}

/// Loads `optimizer.safetensors` of a checkpoint into an [`AdamW`] for `params`.
pub fn load_optimizer(checkpoint: &Path, params: &Params, optimizer: &mut AdamW) -> Result<()> {
    let path = checkpoint.join("optimizer.safetensors");
    let file = Checkpoint::open(&path)?;
    let step = file.files()[0]
        .header()
        .metadata
        .get("adamw_step")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Error::InvalidTrainerState {
            path: path.clone(),
            reason: "optimizer.safetensors has no adamw_step metadata".into(),
        })?;
    let src = WeightSource { checkpoint: file };
    for (i, (name, var)) in params.vars.iter().enumerate() {
        for (suffix, dst) in [
            ("exp_avg", &mut optimizer.exp_avg[i]),
            ("exp_avg_sq", &mut optimizer.exp_avg_sq[i]),
        ] {
            let t = src.tensor(
                &format!("{name}.{suffix}"),
                var.dims(),
                DType::F32,
                &Device::Cpu,
            )?;
            *dst = t.flatten_all()?.to_vec1()?;
        }
    }
    optimizer.step = step;
    Ok(())
}
