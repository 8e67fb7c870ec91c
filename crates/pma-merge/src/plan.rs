//! Turning selected checkpoints and weights into a validated [`MergePlan`].
//!
//! Planning reads only headers. It checks everything that can be known before the first output
//! byte: tensor names match across inputs, shapes agree, dtypes are mergeable, and the output
//! fits on disk. The plan fixes the output order (the newest checkpoint's physical order, so its
//! file is read sequentially), the output dtype of every tensor, the shard layout and the
//! provenance metadata. `pma merge --dry-run` prints exactly this.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, dtype_name};
use pma_format::{
    AnyCheckpoint, Dtype, DtypeClass, FloatDtype, LogicalTensor, Region, TensorSpec, TensorStore,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::weights::Weights;

/// HF's default `max_shard_size` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// One input of a merge.
#[derive(Debug)]
pub struct MergeInput {
    /// Training step, when known.
    pub step: Option<u64>,
    /// The opened checkpoint, in any format.
    pub checkpoint: AnyCheckpoint,
}

impl MergeInput {
    /// The checkpoint as planning and execution see it: logical tensors and a byte source for
    /// each, whatever the format.
    pub fn store(&self) -> &dyn TensorStore {
        &self.checkpoint
    }
}

/// Settings of a merge that are not about which checkpoints take part.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    /// Output dtype for every float tensor; `None` keeps the newest checkpoint's dtype.
    pub out_dtype: Option<FloatDtype>,
    /// Largest output shard, in bytes.
    pub max_shard_bytes: u64,
    /// Write one bare `.safetensors` file instead of an HF directory.
    pub single_file: bool,
    /// Merge through NaN/Inf inputs (reported as warnings) instead of failing.
    pub allow_nonfinite: bool,
    /// Output format; `None` follows the input (see [`MergePlan::output_format`]).
    pub format: Option<OutputFormat>,
    /// DCP output only: copy every entry of the newest member that is not merged (optimizer and
    /// scheduler state, dataloader bytes) and its non-DCP files (`common.pt`,
    /// `metadata.json`) byte for byte, so training can resume from the merge. Without it the
    /// output is model-only. Which entries that covers is decided by
    /// [`crate::dcp_output::verbatim_entries`]. (Stands in for key selection's own
    /// `--keep-state newest` setting until the plan carries it.)
    pub keep_state_newest: bool,
}

/// The format a merge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Hugging Face safetensors: a sharded directory, or one bare file.
    Hf,
    /// A torch.distributed.checkpoint directory with the newest member's chunk layout (one
    /// chunk per tensor when the newest member is not DCP), `TORCH_SAVE` items.
    Dcp,
}

impl OutputFormat {
    /// `"hf"` or `"dcp"`, as the `--format` flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Hf => "hf",
            OutputFormat::Dcp => "dcp",
        }
    }
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            out_dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            single_file: false,
            allow_nonfinite: false,
            format: None,
            keep_state_newest: false,
        }
    }
}

/// How a tensor is produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TensorMode {
    /// Weighted sum in f64, rounded once to this dtype.
    Average(#[serde(serialize_with = "ser_float")] FloatDtype),
    /// Bit-identical in every input; copied from the newest.
    Copy,
}

fn ser_float<S: serde::Serializer>(d: &FloatDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// One output tensor and where its inputs live.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name, shape and output dtype.
    pub spec: TensorSpec,
    /// Average or copy.
    pub mode: TensorMode,
    /// The tensor in each input, oldest first.
    pub sources: Vec<LogicalTensor>,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.spec.shape.iter().product()
    }
}

/// A validated merge, ready to execute.
#[derive(Debug)]
pub struct MergePlan {
    /// Inputs, oldest first.
    pub inputs: Vec<MergeInput>,
    /// One weight per input.
    pub weights: Weights,
    /// Output tensors in write order.
    pub tensors: Vec<PlannedTensor>,
    /// Output files: name and the range of `tensors` each holds.
    pub shards: Vec<(String, Range<usize>)>,
    /// Whether the output is one bare file rather than a directory.
    pub single_file: bool,
    /// Header `__metadata__` of every output file.
    pub metadata: BTreeMap<String, String>,
    /// Settings the plan was built with.
    pub config: MergeConfig,
}

/// One input as shown in plans and reports.
#[derive(Debug, Clone, Serialize)]
pub struct InputSummary {
    /// Path.
    pub path: PathBuf,
    /// Step, if known.
    pub step: Option<u64>,
    /// Weight.
    pub weight: f64,
    /// Bytes of tensor data read from it.
    pub bytes: u64,
}

/// What `--dry-run` prints: everything about a merge except its result.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    /// Method and its parameters.
    pub method: crate::weights::WeightSpec,
    /// Inputs oldest first, with weights.
    pub inputs: Vec<InputSummary>,
    /// Output dtypes and how many tensors get each (`"bf16": 291`, `"copy": 1`).
    pub output_dtypes: BTreeMap<String, usize>,
    /// Output files.
    pub files: Vec<String>,
    /// Whether the output is a bare file.
    pub single_file: bool,
    /// Output format.
    pub format: OutputFormat,
    /// Number of tensors.
    pub n_tensors: usize,
    /// Number of parameters.
    pub n_params: u64,
    /// Tensor bytes read across all inputs.
    pub bytes_read: u64,
    /// Bytes written (headers included).
    pub bytes_written: u64,
    /// Working memory the executor needs, in bytes.
    pub memory_bytes: u64,
}

impl MergePlan {
    /// Validates inputs against each other and lays out the output.
    pub fn build(
        inputs: Vec<MergeInput>,
        weights: Weights,
        config: MergeConfig,
    ) -> Result<MergePlan> {
        if inputs.is_empty() {
            return Err(Error::InvalidWeights("no checkpoints to merge".into()));
        }
        if config.format == Some(OutputFormat::Dcp) && config.single_file {
            return Err(Error::DcpSingleFile);
        }
        if inputs.len() != weights.len() {
            return Err(Error::InvalidWeights(format!(
                "{} weights given for {} checkpoints",
                weights.len(),
                inputs.len()
            )));
        }
        let newest = inputs[inputs.len() - 1].store();
        // Names present elsewhere but not in the newest are as fatal as the reverse.
        for input in &inputs[..inputs.len() - 1] {
            if let Some(t) = input
                .store()
                .logical_tensors()
                .into_iter()
                .find(|t| newest.logical_tensor(&t.name).is_none())
            {
                return Err(Error::MissingTensor {
                    path: newest.root().into(),
                    tensor: t.name,
                    reference: input.store().root().into(),
                });
            }
        }
        let newest_tensors = newest.logical_tensors();
        let mut tensors = Vec::with_capacity(newest_tensors.len());
        for reference in &newest_tensors {
            tensors.push(plan_tensor(&inputs, reference, config.out_dtype)?);
        }
        let sizes: Vec<u64> = tensors.iter().map(|t| t.spec.n_bytes()).collect();
        let ranges = if config.single_file {
            std::iter::once(0..tensors.len()).collect()
        } else {
            pma_format::plan_shards(&sizes, config.max_shard_bytes)
        };
        let n = ranges.len();
        let shards = ranges
            .into_iter()
            .enumerate()
            .map(|(i, r)| (pma_format::shard_file_name(i, n), r))
            .collect();
        let metadata = provenance(&inputs, &weights, &config);
        Ok(MergePlan {
            inputs,
            weights,
            tensors,
            shards,
            single_file: config.single_file,
            metadata,
            config,
        })
    }

    /// The output regions of every tensor: for HF, one region covering each tensor (an HF
    /// output stores whole tensors); for DCP, the tensor's output chunks ([`Self::dcp_chunks`]).
    pub fn job_regions(&self) -> Vec<Vec<Region>> {
        match self.output_format() {
            OutputFormat::Hf => self
                .tensors
                .iter()
                .map(|t| vec![Region::full(&t.spec.shape)])
                .collect(),
            OutputFormat::Dcp => (0..self.tensors.len())
                .map(|t| self.dcp_chunks(t).into_iter().map(|c| c.region).collect())
                .collect(),
        }
    }

    /// The format this plan writes: [`MergeConfig::format`] if set; otherwise a bare
    /// `.safetensors` file when one was asked for, DCP when the newest member is DCP, and HF
    /// safetensors otherwise (DCP in gives DCP out; safetensors and torch.save give HF).
    pub fn output_format(&self) -> OutputFormat {
        match self.config.format {
            Some(f) => f,
            None if self.single_file => OutputFormat::Hf,
            None if self.inputs[self.inputs.len() - 1]
                .checkpoint
                .as_dcp()
                .is_some() =>
            {
                OutputFormat::Dcp
            }
            None => OutputFormat::Hf,
        }
    }

    /// The chunks of output tensor `tensor` in a DCP output: the newest member's chunk boxes,
    /// each in the file (`__R_K.distcp`) the newest member keeps it in, so the trainer reloads
    /// with the parallelism it saved with. When the newest member is not DCP there is no layout
    /// to follow, and the tensor is one chunk in `__0_0.distcp` (`dcp.load` reshards on load).
    pub fn dcp_chunks(&self, tensor: usize) -> Vec<pma_format::dcp_out::DcpChunk> {
        let spec = &self.tensors[tensor].spec;
        let newest = &self.inputs[self.inputs.len() - 1].checkpoint;
        match newest.as_dcp().and_then(|d| d.tensor(&spec.name)) {
            Some(t) => t
                .chunks
                .iter()
                .map(|c| pma_format::dcp_out::DcpChunk {
                    region: c.region.clone(),
                    file: c.storage.relative_path.clone(),
                })
                .collect(),
            None => vec![pma_format::dcp_out::DcpChunk {
                region: Region::full(&spec.shape),
                file: crate::dcp_output::SINGLE_RANK_FILE.into(),
            }],
        }
    }

    /// Tensor specs of shard `i`, in write order.
    pub fn shard_specs(&self, i: usize) -> Vec<TensorSpec> {
        self.tensors[self.shards[i].1.clone()]
            .iter()
            .map(|t| t.spec.clone())
            .collect()
    }

    /// Bytes written, headers included (for a DCP output, an upper bound: see
    /// [`crate::dcp_output::estimated_bytes`]).
    pub fn bytes_written(&self) -> u64 {
        if self.output_format() == OutputFormat::Dcp {
            return crate::dcp_output::estimated_bytes(self);
        }
        (0..self.shards.len())
            .map(|i| {
                let specs = self.shard_specs(i);
                pma_format::encode_header(&specs, &self.metadata).len() as u64
                    + specs.iter().map(TensorSpec::n_bytes).sum::<u64>()
            })
            .sum()
    }

    /// Tensor bytes read from each input.
    pub fn bytes_read_per_input(&self) -> Vec<u64> {
        (0..self.inputs.len())
            .map(|i| self.tensors.iter().map(|t| t.sources[i].n_bytes()).sum())
            .collect()
    }

    /// Checks the output's filesystem has room for it.
    pub fn check_space(&self, out: &Path) -> Result<()> {
        let mut dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // The output's parent may not exist yet; ask the nearest ancestor that does.
        while !dir.exists() {
            match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => dir = p,
                _ => {
                    dir = Path::new(".");
                    break;
                }
            }
        }
        let needed = self.bytes_written();
        let available = pma_format::available_bytes(dir)?;
        if available < needed {
            return Err(pma_format::Error::NoSpace {
                path: dir.into(),
                needed,
                available,
            }
            .into());
        }
        Ok(())
    }

    /// The dry-run view of this plan.
    pub fn summary(&self, threads: usize) -> PlanSummary {
        let per_input = self.bytes_read_per_input();
        let mut output_dtypes = BTreeMap::new();
        for t in &self.tensors {
            let key = match t.mode {
                TensorMode::Average(d) => d.name().to_string(),
                TensorMode::Copy => format!("copy ({})", dtype_name(t.spec.dtype)),
            };
            *output_dtypes.entry(key).or_insert(0) += 1;
        }
        PlanSummary {
            method: self.weights.method.clone(),
            inputs: self
                .inputs
                .iter()
                .zip(&self.weights.values)
                .zip(&per_input)
                .map(|((inp, &weight), &bytes)| InputSummary {
                    path: inp.store().root().into(),
                    step: inp.step,
                    weight,
                    bytes,
                })
                .collect(),
            output_dtypes,
            files: match self.output_format() {
                OutputFormat::Hf => self.shards.iter().map(|(n, _)| n.clone()).collect(),
                OutputFormat::Dcp => crate::dcp_output::file_names(self),
            },
            single_file: self.single_file,
            format: self.output_format(),
            n_tensors: self.tensors.len(),
            n_params: self.tensors.iter().map(PlannedTensor::numel).sum(),
            bytes_read: per_input.iter().sum(),
            bytes_written: self.bytes_written(),
            memory_bytes: crate::executor::working_memory_bytes(threads),
        }
    }
}

fn plan_tensor(
    inputs: &[MergeInput],
    reference: &LogicalTensor,
    out_dtype: Option<FloatDtype>,
) -> Result<PlannedTensor> {
    let newest = inputs[inputs.len() - 1].store();
    let name = &reference.name;
    let ref_class = classify(reference.dtype);
    if ref_class == DtypeClass::Unsupported {
        return Err(Error::UnsupportedDtype {
            path: newest.file_of_tensor(name),
            tensor: name.clone(),
            dtype: dtype_name(reference.dtype),
        });
    }
    let mut sources = Vec::with_capacity(inputs.len());
    for input in inputs {
        let ckpt = input.store();
        let t = ckpt
            .logical_tensor(name)
            .ok_or_else(|| Error::MissingTensor {
                path: ckpt.root().into(),
                tensor: name.clone(),
                reference: newest.root().into(),
            })?;
        let class = classify(t.dtype);
        if class == DtypeClass::Unsupported {
            return Err(Error::UnsupportedDtype {
                path: ckpt.file_of_tensor(name),
                tensor: name.clone(),
                dtype: dtype_name(t.dtype),
            });
        }
        if t.shape != reference.shape {
            return Err(Error::ShapeMismatch {
                path: ckpt.root().into(),
                tensor: name.clone(),
                expected: reference.shape.clone(),
                found: t.shape.clone(),
                reference: newest.root().into(),
            });
        }
        let compatible = match (class, ref_class) {
            (DtypeClass::Float(_), DtypeClass::Float(_)) => true,
            (DtypeClass::Exact, DtypeClass::Exact) => t.dtype == reference.dtype,
            _ => false,
        };
        if !compatible {
            return Err(Error::DtypeMismatch {
                path: ckpt.root().into(),
                tensor: name.clone(),
                expected: dtype_name(reference.dtype),
                found: dtype_name(t.dtype),
                reference: newest.root().into(),
            });
        }
        sources.push(t);
    }
    let (mode, dtype): (TensorMode, Dtype) = match classify(reference.dtype) {
        DtypeClass::Float(newest_dtype) => {
            let d = out_dtype.unwrap_or(newest_dtype);
            (TensorMode::Average(d), d.dtype())
        }
        _ => (TensorMode::Copy, reference.dtype),
    };
    Ok(PlannedTensor {
        spec: TensorSpec {
            name: name.clone(),
            dtype,
            shape: reference.shape.clone(),
        },
        mode,
        sources,
    })
}

/// `__metadata__` of the output: HF's `format: pt`, plus a `pma` entry recording how it was made.
fn provenance(
    inputs: &[MergeInput],
    weights: &Weights,
    config: &MergeConfig,
) -> BTreeMap<String, String> {
    let record = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "method": weights.method,
        "weights": weights.values,
        "dtype": config.out_dtype.map(|d| d.name()),
        "inputs": inputs.iter().map(|i| serde_json::json!({
            "path": i.store().root().display().to_string(),
            "step": i.step,
        })).collect::<Vec<_>>(),
    });
    let mut m = BTreeMap::new();
    m.insert("format".to_string(), "pt".to_string());
    m.insert("pma".to_string(), record.to_string());
    m
}

impl PlanSummary {
    /// Short method label (`sma`, `ema0.2`, `wma`, `weights`).
    pub fn method_label(&self) -> String {
        self.method.label()
    }
}
