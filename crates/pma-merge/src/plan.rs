//! Turning selected checkpoints and weights into a validated [`MergePlan`].
//!
//! Planning reads only headers. It checks everything that can be known before the first output
//! byte: tensor names match across inputs, shapes agree, dtypes are mergeable, and the output
//! fits on disk. The plan fixes the output order (the newest checkpoint's physical order, so its
//! file is read sequentially), the output dtype of every tensor, the shard layout and the
//! provenance metadata. `pma merge --dry-run` prints exactly this.
//!
//! Which entries are output at all is key selection's call ([`crate::keys`]): the newest
//! member's entries are classified (model weight, training state, bytes item), the user's
//! `--include` / `--exclude` / `--keep-state` applied, and only the entries it merges or copies
//! become output tensors. Every check that compares members (present in all, same shape,
//! compatible dtype) applies to those entries only, so a member may lack optimizer state that is
//! left out, but never a weight that is merged. The whole [`KeySelection`] stays on the plan:
//! a DCP output copies its `KeepNewest` entries verbatim from the newest member.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, dtype_name};
use pma_format::{
    AnyCheckpoint, Dtype, DtypeClass, FloatDtype, LogicalTensor, Region, TensorSpec, TensorStore,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::keys::{select_keys, Action, KeyEntry, KeySelection, KeySelectionConfig, KeySummary};
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
    /// Which entries are merged, copied, kept or left out (default: model weights only).
    pub keys: KeySelectionConfig,
    /// Output format; `None` follows the input (see [`MergePlan::output_format`]).
    pub format: Option<OutputFormat>,
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
            keys: KeySelectionConfig::default(),
            format: None,
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

/// Output regions for a whole tensor of `shape` written row-major (an HF output), cut along
/// `chunks` when they are bands of whole rows (FSDP's `Shard(0)`, the common DCP layout): then
/// each job lies inside one member chunk and reads it in place instead of gathering across a
/// chunk boundary, and the bands in row order are still the tensor's row-major bytes. Any
/// other layout (column splits, a 2-D mesh) gives the one full region.
fn hf_bands(shape: &[u64], mut chunks: Vec<Region>) -> Vec<Region> {
    let full = vec![Region::full(shape)];
    let is_band = |r: &Region| {
        !shape.is_empty()
            && r.offsets.len() == shape.len()
            && r.sizes.len() == shape.len()
            && (1..shape.len()).all(|d| r.offsets[d] == 0 && r.sizes[d] == shape[d])
    };
    if chunks.len() < 2 || !chunks.iter().all(is_band) {
        return full;
    }
    chunks.retain(|r| r.sizes[0] > 0);
    chunks.sort_by_key(|r| r.offsets[0]);
    // The bands must tile dim 0 exactly, in order (the reader validated the member's tiling;
    // this keeps the function total).
    let mut next = 0;
    for r in &chunks {
        if r.offsets[0] != next {
            return full;
        }
        next += r.sizes[0];
    }
    if next != shape[0] {
        return full;
    }
    chunks
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
    /// What happens to each entry of the newest member: [`Action::Merge`] and [`Action::Copy`]
    /// entries are [`MergePlan::tensors`]; [`Action::KeepNewest`] entries are for an output
    /// format that keeps training state (DCP) to copy verbatim from the newest member.
    pub keys: KeySelection,
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
    /// Which entries are merged, copied, kept from the newest or left out, grouped by prefix.
    pub keys: KeySummary,
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
        let keys = select_entries(&inputs, &config.keys)?;
        let newest = inputs[inputs.len() - 1].store();
        // A set, not `keys.decision` per tensor: models have up to ~100k tensors.
        let written: std::collections::HashSet<&str> = keys
            .names(Action::Merge)
            .chain(keys.names(Action::Copy))
            .collect();
        let mut tensors = Vec::new();
        for reference in newest.logical_tensors() {
            if written.contains(reference.name.as_str()) {
                tensors.push(plan_tensor(&inputs, &reference, config.out_dtype)?);
            }
        }
        if tensors.is_empty() {
            return Err(Error::NothingSelected {
                path: newest.root().into(),
                left_out: keys.count(Action::LeaveOut) + keys.count(Action::KeepNewest),
            });
        }
        let shards = layout_shards(&tensors, config.single_file, config.max_shard_bytes);
        let metadata = provenance(&inputs, &weights, &config);
        Ok(MergePlan {
            inputs,
            weights,
            tensors,
            shards,
            single_file: config.single_file,
            metadata,
            config,
            keys,
        })
    }

    /// The output regions of every tensor: for HF, regions whose concatenation is the whole
    /// tensor in row-major order (an HF output stores whole tensors): the newest DCP member's
    /// row bands when its chunks are bands of whole rows ([`hf_bands`]), else one region; for
    /// DCP, the tensor's output chunks ([`Self::dcp_chunks`]).
    pub fn job_regions(&self) -> Vec<Vec<Region>> {
        match self.output_format() {
            OutputFormat::Hf => (0..self.tensors.len())
                .map(|t| {
                    let shape = &self.tensors[t].spec.shape;
                    let chunks: Vec<Region> =
                        match self.inputs[self.inputs.len() - 1].checkpoint.as_dcp() {
                            Some(_) => self.dcp_chunks(t).into_iter().map(|c| c.region).collect(),
                            None => Vec::new(),
                        };
                    hf_bands(shape, chunks)
                })
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

    /// Every shard's name with its tensors, as the shard index lists them.
    pub fn index_listing(&self) -> Vec<(String, Vec<&TensorSpec>)> {
        self.shards
            .iter()
            .map(|(name, range)| {
                let specs = self.tensors[range.clone()]
                    .iter()
                    .map(|t| &t.spec)
                    .collect();
                (name.clone(), specs)
            })
            .collect()
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
            keys: self.keys.summary(),
        }
    }
}

/// The output files of `tensors` (in write order): one bare file, or HF shards of at most
/// `max_shard_bytes` each (a larger tensor gets a shard of its own).
pub(crate) fn layout_shards(
    tensors: &[PlannedTensor],
    single_file: bool,
    max_shard_bytes: u64,
) -> Vec<(String, Range<usize>)> {
    let sizes: Vec<u64> = tensors.iter().map(|t| t.spec.n_bytes()).collect();
    let ranges = if single_file {
        std::iter::once(0..tensors.len()).collect()
    } else {
        pma_format::plan_shards(&sizes, max_shard_bytes)
    };
    let n = ranges.len();
    ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| (pma_format::shard_file_name(i, n), r))
        .collect()
}

/// Runs key selection over the newest member's entries, and checks that no older member holds
/// an entry the newest lacks that would be merged or copied (the newest is the reference, so
/// such an entry is missing there). Older-only entries that would be left out or kept are
/// dropped: they are training state the newest no longer has.
fn select_entries(inputs: &[MergeInput], config: &KeySelectionConfig) -> Result<KeySelection> {
    let newest = &inputs[inputs.len() - 1];
    let mut entries: Vec<KeyEntry> = newest
        .checkpoint
        .entries()
        .iter()
        .map(KeyEntry::from_store)
        .collect();
    let n_newest = entries.len();
    let mut seen: std::collections::HashSet<String> =
        entries.iter().map(|e| e.name.clone()).collect();
    // Where each older-only entry was first seen, for the error.
    let mut first_seen = Vec::new();
    for input in &inputs[..inputs.len() - 1] {
        for e in input.checkpoint.entries() {
            if seen.insert(e.name.clone()) {
                entries.push(KeyEntry::from_store(&e));
                first_seen.push(input.store().root().to_path_buf());
            }
        }
    }
    let mut selection = select_keys(&entries, config)?;
    let extra = selection.decisions.split_off(n_newest);
    if let Some((d, reference)) = extra
        .iter()
        .zip(first_seen)
        .find(|(d, _)| matches!(d.action, Action::Merge | Action::Copy))
    {
        return Err(Error::MissingTensor {
            path: newest.store().root().into(),
            tensor: d.name.clone(),
            reference,
        });
    }
    Ok(selection)
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
    let mut record = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "method": weights.method,
        "weights": weights.values,
        "dtype": config.out_dtype.map(|d| d.name()),
        "inputs": inputs.iter().map(|i| serde_json::json!({
            "path": i.store().root().display().to_string(),
            "step": i.step,
        })).collect::<Vec<_>>(),
    });
    // Recorded only when the user chose, so a plain model merge's header is unchanged.
    if config.keys != KeySelectionConfig::default() {
        record["keys"] = serde_json::json!({
            "include": config.keys.include,
            "exclude": config.keys.exclude,
            "keep_state_newest": config.keys.keep_state_newest,
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightSpec;
    use pma_format::{Checkpoint, TensorSpec};

    use crate::keys::dcp_fixture as fixture;

    fn open(path: &Path) -> MergeInput {
        MergeInput {
            step: None,
            checkpoint: AnyCheckpoint::open(path).expect("checkpoint opens"),
        }
    }

    fn plan(paths: &[PathBuf], keys: KeySelectionConfig) -> Result<MergePlan> {
        let inputs: Vec<MergeInput> = paths.iter().map(|p| open(p)).collect();
        let weights = WeightSpec::Sma.weights(inputs.len())?;
        let config = MergeConfig {
            keys,
            ..Default::default()
        };
        MergePlan::build(inputs, weights, config)
    }

    fn fsdp2() -> Vec<PathBuf> {
        (1..=4)
            .map(|i| fixture(&format!("run-fsdp2/step-0000{i}00")))
            .collect()
    }

    /// Writes a safetensors file of f32 tensors (value 1.0) with these names and shapes.
    fn write(path: &Path, tensors: &[(&str, &[u64])]) {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, s)| {
                1f32.to_le_bytes()
                    .repeat(s.iter().product::<u64>() as usize)
            })
            .collect();
        let specs: Vec<(TensorSpec, &[u8])> = tensors
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                let spec = TensorSpec {
                    name: n.to_string(),
                    dtype: Dtype::F32,
                    shape: s.to_vec(),
                };
                (spec, d.as_slice())
            })
            .collect();
        pma_format::write_safetensors(path, &specs, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn hf_jobs_follow_row_bands_and_nothing_else() {
        let band = |o: u64, n: u64| Region {
            offsets: vec![o, 0],
            sizes: vec![n, 4],
        };
        // Row bands, in any stored order, become the job regions in row order.
        let got = hf_bands(&[10, 4], vec![band(6, 4), band(0, 6)]);
        assert_eq!(got, vec![band(0, 6), band(6, 4)]);
        let full = vec![Region::full(&[10, 4])];
        // Column splits, gaps, a single chunk, and no chunks all give the whole tensor.
        let col = |o: u64| Region {
            offsets: vec![0, o],
            sizes: vec![10, 2],
        };
        assert_eq!(hf_bands(&[10, 4], vec![col(0), col(2)]), full);
        assert_eq!(hf_bands(&[10, 4], vec![band(0, 5), band(6, 4)]), full);
        assert_eq!(hf_bands(&[10, 4], vec![band(0, 10)]), full);
        assert_eq!(hf_bands(&[10, 4], vec![]), full);
        assert_eq!(hf_bands(&[], vec![]), vec![Region::full(&[])]);
    }

    #[test]
    fn dcp_plan_outputs_only_selected_entries() {
        let p = plan(&fsdp2(), KeySelectionConfig::default()).unwrap();
        let names: Vec<&str> = p.tensors.iter().map(|t| t.spec.name.as_str()).collect();
        assert!(names.contains(&"tok_embeddings.weight"));
        assert!(!names.iter().any(|n| n.starts_with("optimizer.")));
        assert!(!names.iter().any(|n| n.starts_with("train_state.")));
        assert_eq!(
            p.keys.count(Action::Merge) + p.keys.count(Action::Copy),
            names.len()
        );
        let copied: Vec<_> = p
            .tensors
            .iter()
            .filter(|t| t.mode == TensorMode::Copy)
            .map(|t| t.spec.name.as_str())
            .collect();
        assert_eq!(copied, ["position_ids"]);
        // The plan keeps a decision for every entry of the newest member, bytes items too.
        let newest = &p.inputs[3].checkpoint;
        assert_eq!(p.keys.decisions.len(), newest.entries().len());
        let s = p.summary(1);
        assert_eq!(s.keys.merged + s.keys.copied, s.n_tensors);
        assert_eq!(s.keys.left_out, p.keys.count(Action::LeaveOut));
        // Model-only: the provenance says nothing about keys.
        assert!(!p.metadata["pma"].contains("\"keys\""));
    }

    #[test]
    fn include_optimizer_plans_it_and_keep_state_does_not_output_it() {
        let keys = KeySelectionConfig {
            include: vec!["optimizer.*".into()],
            ..Default::default()
        };
        let p = plan(&fsdp2(), keys).unwrap();
        let t = p
            .tensors
            .iter()
            .find(|t| t.spec.name == "optimizer.state.tok_embeddings.weight.exp_avg")
            .expect("optimizer moment is planned");
        assert_eq!(t.mode, TensorMode::Average(FloatDtype::F32));
        assert!(p.metadata["pma"].contains("optimizer.*"));

        let keys = KeySelectionConfig {
            keep_state_newest: true,
            ..Default::default()
        };
        let kept = plan(&fsdp2(), keys).unwrap();
        let default = plan(&fsdp2(), KeySelectionConfig::default()).unwrap();
        assert_eq!(kept.tensors.len(), default.tensors.len());
        assert!(kept.keys.count(Action::KeepNewest) > 0);
        assert_eq!(kept.keys.count(Action::LeaveOut), 0);
    }

    #[test]
    fn members_may_lack_left_out_keys_but_not_merged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            dir.path().join("old.safetensors"),
            dir.path().join("new.safetensors"),
        );
        // The older member has optimizer state the newest lacks: left out, so fine.
        write(&old, &[("w", &[2]), ("optimizer.state.w.exp_avg", &[2])]);
        write(&new, &[("w", &[2])]);
        let p = plan(&[old.clone(), new.clone()], KeySelectionConfig::default()).unwrap();
        assert_eq!(p.tensors.len(), 1);
        assert_eq!(p.keys.decisions.len(), 1, "older-only entries are dropped");
        // Asked to merge it, the newest is missing it.
        let keys = KeySelectionConfig {
            include: vec!["optimizer.*".into()],
            ..Default::default()
        };
        let err = plan(&[old.clone(), new.clone()], keys).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { path, tensor, reference }
                if path == &new && tensor == "optimizer.state.w.exp_avg" && reference == &old),
            "{err}"
        );
        // A merged weight missing from an older member names that member.
        let old = dir.path().join("old2.safetensors");
        write(&old, &[("optimizer.state.w.exp_avg", &[2])]);
        let err = plan(&[old.clone(), new.clone()], KeySelectionConfig::default()).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { path, tensor, reference }
                if path == &old && tensor == "w" && reference == &new),
            "{err}"
        );
    }

    #[test]
    fn shape_disagreement_on_a_merged_key_names_both_members() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            dir.path().join("old.safetensors"),
            dir.path().join("new.safetensors"),
        );
        write(&old, &[("w", &[3]), ("optimizer.state.w.exp_avg", &[5])]);
        write(&new, &[("w", &[2]), ("optimizer.state.w.exp_avg", &[2])]);
        let err = plan(&[old.clone(), new.clone()], KeySelectionConfig::default()).unwrap_err();
        assert!(
            matches!(&err, Error::ShapeMismatch { path, tensor, expected, found, reference }
                if path == &old && tensor == "w" && expected == &[2] && found == &[3]
                    && reference == &new),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("old.safetensors") && msg.contains("new.safetensors"),
            "{msg}"
        );
        // Only `w` is compared: excluding it leaves nothing to write, which is its own error.
        let keys = KeySelectionConfig {
            exclude: vec!["w".into()],
            ..Default::default()
        };
        let err = plan(&[old, new], keys).unwrap_err();
        assert!(
            matches!(err, Error::NothingSelected { left_out: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn plain_safetensors_plans_are_unchanged_by_selection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(&path, &[("b", &[3]), ("a", &[2, 2])]);
        let p = plan(&[path.clone(), path.clone()], KeySelectionConfig::default()).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let want: Vec<&str> = ckpt
            .tensors()
            .iter()
            .map(|t| t.info.name.as_str())
            .collect();
        let got: Vec<&str> = p.tensors.iter().map(|t| t.spec.name.as_str()).collect();
        assert_eq!(got, want);
        assert_eq!(p.keys.count(Action::Merge), 2);
    }
}
