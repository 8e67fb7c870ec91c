//! Any checkpoint a merge can read, opened by what [`detect_checkpoint`] finds: HF safetensors,
//! torch DCP or torch.save. [`AnyCheckpoint`] is the one type the merge, inspect, diff and watch
//! code holds for a member; through [`TensorStore`] they see logical tensors and byte sources
//! and never the format. The format-specific parts that remain (DCP bytes items and chunk
//! layouts for a DCP output, safetensors files for watch's pins) are reached by matching on it.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::dcp::{DcpCheckpoint, DcpEntry, EntryRole};
use crate::error::Result;
use crate::layout::{detect_checkpoint, CheckpointFormat, Framework};
use crate::region::TensorSource;
use crate::sidecar_policy::{SidecarPlan, SkipReason, SkippedSidecar};
use crate::source::{LogicalTensor, TensorStore};
use crate::torch_save::TorchSaveCheckpoint;
use crate::{classify_key, Dtype};

/// A checkpoint in any supported format.
#[derive(Debug)]
pub enum AnyCheckpoint {
    /// HF safetensors (a file, a single-file directory or a sharded directory).
    Safetensors(Checkpoint),
    /// A torch.distributed.checkpoint directory.
    Dcp(DcpCheckpoint),
    /// A torch.save file, or a `pytorch_model.bin` directory (single or sharded).
    TorchSave(TorchSaveCheckpoint),
}

/// One entry of a checkpoint as key selection sees it: a tensor (with its dtype) or an opaque
/// bytes item, and whether it is a model weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// Key (tensor name or DCP FQN).
    pub name: String,
    /// The tensor's dtype; `None` for a bytes item.
    pub dtype: Option<Dtype>,
    /// Model weight or training state.
    pub role: EntryRole,
}

impl AnyCheckpoint {
    /// Detects the format of `path` (a file or directory, see [`detect_checkpoint`]) and opens
    /// it, validating as that format's reader does.
    pub fn open(path: &Path) -> Result<AnyCheckpoint> {
        Ok(Self::open_detected(path)?.0)
    }

    /// [`AnyCheckpoint::open`], also returning the framework layout it follows.
    pub fn open_detected(path: &Path) -> Result<(AnyCheckpoint, Framework)> {
        let detected = detect_checkpoint(path)?;
        let ckpt = match &detected.format {
            CheckpointFormat::Safetensors => AnyCheckpoint::Safetensors(Checkpoint::open(path)?),
            CheckpointFormat::Dcp { dir } => AnyCheckpoint::Dcp(DcpCheckpoint::open(dir)?),
            CheckpointFormat::TorchSave { path } => {
                AnyCheckpoint::TorchSave(TorchSaveCheckpoint::open(path)?)
            }
        };
        Ok((ckpt, detected.framework))
    }

    /// `"safetensors"`, `"DCP"` or `"torch.save"`.
    pub fn format_name(&self) -> &'static str {
        match self {
            AnyCheckpoint::Safetensors(_) => "safetensors",
            AnyCheckpoint::Dcp(_) => "DCP",
            AnyCheckpoint::TorchSave(_) => "torch.save",
        }
    }

    /// The safetensors checkpoint, if this is one.
    pub fn as_safetensors(&self) -> Option<&Checkpoint> {
        match self {
            AnyCheckpoint::Safetensors(c) => Some(c),
            _ => None,
        }
    }

    /// The DCP checkpoint, if this is one.
    pub fn as_dcp(&self) -> Option<&DcpCheckpoint> {
        match self {
            AnyCheckpoint::Dcp(c) => Some(c),
            _ => None,
        }
    }

    /// Every entry, tensors and bytes items, in storage order, for key selection. Safetensors
    /// and torch.save hold only tensors; DCP adds its bytes items (dataloader, train state, ...).
    pub fn entries(&self) -> Vec<StoreEntry> {
        match self {
            AnyCheckpoint::Dcp(c) => c
                .entries()
                .iter()
                .map(|e| StoreEntry {
                    name: e.fqn().to_string(),
                    dtype: match e {
                        DcpEntry::Tensor(t) => Some(t.dtype),
                        DcpEntry::Bytes(_) => None,
                    },
                    role: e.role(),
                })
                .collect(),
            _ => self
                .logical_tensors()
                .into_iter()
                .map(|t| StoreEntry {
                    role: classify_key(&t.name),
                    name: t.name,
                    dtype: Some(t.dtype),
                })
                .collect(),
        }
    }

    /// Bytes of tensor data (every tensor, training state included).
    pub fn data_bytes(&self) -> u64 {
        self.logical_tensors().iter().map(|t| t.n_bytes()).sum()
    }

    /// Checks that no mapping of this checkpoint was truncated under us (see
    /// [`crate::fault`]).
    pub fn check_faults(&self) -> Result<()> {
        match self {
            AnyCheckpoint::Safetensors(c) => c.check_faults(),
            _ => self
                .logical_tensors()
                .iter()
                .try_for_each(|t| self.source(&t.name).map_or(Ok(()), |s| s.verify())),
        }
    }

    fn inner(&self) -> &dyn TensorStore {
        match self {
            AnyCheckpoint::Safetensors(c) => c,
            AnyCheckpoint::Dcp(c) => c,
            AnyCheckpoint::TorchSave(c) => c,
        }
    }
}

impl From<Checkpoint> for AnyCheckpoint {
    fn from(c: Checkpoint) -> Self {
        AnyCheckpoint::Safetensors(c)
    }
}

impl TensorStore for AnyCheckpoint {
    fn root(&self) -> &Path {
        self.inner().root()
    }

    fn logical_tensors(&self) -> Vec<LogicalTensor> {
        self.inner().logical_tensors()
    }

    fn logical_tensor(&self, name: &str) -> Option<LogicalTensor> {
        self.inner().logical_tensor(name)
    }

    fn file_of_tensor(&self, name: &str) -> PathBuf {
        self.inner().file_of_tensor(name)
    }

    fn source(&self, name: &str) -> Option<Box<dyn TensorSource + '_>> {
        self.inner().source(name)
    }

    fn sidecars(&self) -> Vec<PathBuf> {
        self.inner().sidecars()
    }

    fn sidecar_plan(&self) -> Result<SidecarPlan> {
        self.inner().sidecar_plan()
    }
}

impl TensorStore for DcpCheckpoint {
    fn root(&self) -> &Path {
        self.dir()
    }

    fn logical_tensors(&self) -> Vec<LogicalTensor> {
        self.tensors()
            .map(|t| LogicalTensor {
                name: t.fqn.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect()
    }

    fn logical_tensor(&self, name: &str) -> Option<LogicalTensor> {
        self.tensor(name).map(|t| LogicalTensor {
            name: t.fqn.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
    }

    fn file_of_tensor(&self, name: &str) -> PathBuf {
        self.tensor(name)
            .and_then(|t| t.source().first_file().map(Path::to_path_buf))
            .unwrap_or_else(|| self.dir().into())
    }

    fn source(&self, name: &str) -> Option<Box<dyn TensorSource + '_>> {
        Some(Box::new(self.tensor(name)?.source()))
    }

    /// The files and folders [`TensorStore::sidecar_plan`] copies, as paths.
    fn sidecars(&self) -> Vec<PathBuf> {
        let root = self.dir();
        self.sidecar_plan()
            .map(|plan| plan.copy.iter().map(|s| root.join(&s.path)).collect())
            .unwrap_or_default()
    }

    /// Every non-weight file and folder of the DCP directory except training state, as for
    /// any checkpoint ([`crate::plan_sidecars`]: `.distcp`, `.metadata`, Megatron's
    /// `common.pt`, optimizer folders are left out), so a DCP → HF export keeps the tokenizer,
    /// config and custom code a trainer saved beside the weights. Megatron's `metadata.json`
    /// (its record of the sharded format, beside `.metadata`) describes the DCP weights, not
    /// the model: it is left out too, or an HF output would claim to be a `torch_dist`
    /// checkpoint.
    fn sidecar_plan(&self) -> Result<SidecarPlan> {
        let mut plan = crate::plan_sidecars(self.dir())?;
        let megatron = Path::new("metadata.json");
        if let Some(i) = plan.copy.iter().position(|s| s.path == megatron) {
            plan.copy.remove(i);
            plan.skipped.push(SkippedSidecar {
                path: megatron.into(),
                reason: SkipReason::Weights,
            });
        }
        Ok(plan)
    }
}

impl TensorStore for TorchSaveCheckpoint {
    fn root(&self) -> &Path {
        TorchSaveCheckpoint::root(self)
    }

    fn logical_tensors(&self) -> Vec<LogicalTensor> {
        self.tensors()
            .map(|t| LogicalTensor {
                name: t.name.clone(),
                dtype: t.source.dtype(),
                shape: t.source.shape().to_vec(),
            })
            .collect()
    }

    fn logical_tensor(&self, name: &str) -> Option<LogicalTensor> {
        self.tensor(name).map(|t| LogicalTensor {
            name: t.name.clone(),
            dtype: t.source.dtype(),
            shape: t.source.shape().to_vec(),
        })
    }

    fn file_of_tensor(&self, name: &str) -> PathBuf {
        self.tensor(name)
            .and_then(|t| t.source.first_file().map(Path::to_path_buf))
            .unwrap_or_else(|| self.root().into())
    }

    fn source(&self, name: &str) -> Option<Box<dyn TensorSource + '_>> {
        Some(Box::new(self.tensor(name)?.source.clone()))
    }

    /// The sidecars of a `pytorch_model.bin` directory (config, tokenizer, custom code, module
    /// folders, ...: see [`TensorStore::sidecar_plan`]); none for a bare file. Empty when the
    /// walk fails.
    fn sidecars(&self) -> Vec<PathBuf> {
        let root = self.root();
        self.sidecar_plan()
            .map(|plan| plan.copy.iter().map(|s| root.join(&s.path)).collect())
            .unwrap_or_default()
    }

    /// Every non-weight file and folder of a `pytorch_model.bin` directory except training
    /// state ([`crate::plan_sidecars`]). A bare `.bin` / `.pt` file (DeepSpeed, Megatron
    /// legacy) has none: the folder around it is the framework's, not the model's.
    fn sidecar_plan(&self) -> Result<SidecarPlan> {
        let root = self.root();
        if !root.is_dir() {
            return Ok(SidecarPlan::default());
        }
        crate::plan_sidecars(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dcp")
            .join(rel)
    }

    #[test]
    fn dcp_members_open_as_tensor_stores_with_bytes_entries_kept_apart() {
        let ckpt = AnyCheckpoint::open(&fixture("run-fsdp2/step-0000100")).unwrap();
        assert_eq!(ckpt.format_name(), "DCP");
        let dcp = ckpt.as_dcp().unwrap();
        let tensors = ckpt.logical_tensors();
        assert_eq!(tensors.len(), dcp.tensors().count());
        let entries = ckpt.entries();
        assert_eq!(entries.len(), dcp.entries().len());
        // Every tensor reads whole through the store, equal to reading the DCP tensor itself.
        let t = &tensors[0];
        let src = ckpt.source(&t.name).unwrap();
        let direct = dcp.tensor(&t.name).unwrap();
        let region = Region::full(&t.shape);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let got = src.read(&region, 0..t.numel(), &mut a).unwrap().to_vec();
        let want = direct.read(&region, 0..t.numel(), &mut b).unwrap();
        assert_eq!(got, want);
        assert!(ckpt.file_of_tensor(&t.name).starts_with(dcp.dir()));
        assert!(ckpt.source("no.such.tensor").is_none());
        assert!(ckpt.sidecars().is_empty());
    }

    #[test]
    fn safetensors_entries_are_tensors_classified_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str| crate::TensorSpec {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![2],
        };
        let data = [0u8; 8];
        crate::write_safetensors(
            &dir.path().join("model.safetensors"),
            &[
                (spec("layers.0.w"), &data[..]),
                (spec("optimizer.state.0.exp_avg"), &data[..]),
            ],
            &Default::default(),
        )
        .unwrap();
        let ckpt = AnyCheckpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.format_name(), "safetensors");
        let roles: Vec<_> = ckpt.entries().into_iter().map(|e| e.role).collect();
        assert_eq!(roles, [EntryRole::Model, EntryRole::TrainingState]);
        assert_eq!(ckpt.data_bytes(), 16);
    }
}
