//! HF checkpoints: a single `.safetensors` file, a directory with `model.safetensors`, or a
//! directory with `model.safetensors.index.json` and its shards.
//!
//! Tensors are addressed by name, never by file, because two checkpoints of one run may be
//! sharded differently. Opening a checkpoint validates every shard's header and length and
//! cross-checks the index against the shards, so a truncated or half-copied checkpoint is
//! rejected here, before anything is merged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::file::SafetensorsFile;
use crate::header::{TensorInfo, MAX_HEADER_BYTES};
use crate::sidecar_policy::{plan_sidecars, SidecarPlan};

/// Name of the single-file weights in an HF directory.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// Name of the shard index in an HF directory.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
/// The config and tokenizer files every HF model directory may hold. Merges no longer copy by
/// this list (it dropped `vocab.txt`, `modules.json`, `1_Pooling/`, custom `*.py`, ...): they
/// copy everything but weights and training state, see [`crate::sidecar_policy`].
pub const SIDECAR_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// The `model.safetensors.index.json` document.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardIndex {
    /// `{"total_size": bytes}`; other keys are kept.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Tensor name → shard file name.
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Reads and parses an index file.
    pub fn read(path: &Path) -> Result<ShardIndex> {
        if crate::remote::is_url(path) {
            let object = crate::remote::RemoteObject::open(path)?;
            if object.n_bytes() > MAX_HEADER_BYTES {
                return Err(Error::HeaderTooLarge {
                    path: path.into(),
                    n_bytes: object.n_bytes(),
                    max_bytes: MAX_HEADER_BYTES,
                });
            }
            let text = object.read_range(0..object.n_bytes())?;
            return ShardIndex::parse(path, &text);
        }
        let n_bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "reading metadata of", e))?
            .len();
        if n_bytes > MAX_HEADER_BYTES {
            return Err(Error::HeaderTooLarge {
                path: path.into(),
                n_bytes,
                max_bytes: MAX_HEADER_BYTES,
            });
        }
        let text = std::fs::read(path).map_err(|e| Error::io(path, "reading", e))?;
        ShardIndex::parse(path, &text)
    }

    /// Parses an index document (`path` is only used in errors) and checks that every shard
    /// name is a plain file name: one path component, so it can neither escape the checkpoint
    /// directory nor collide with another shard once pinned flat.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
        let index: ShardIndex =
            serde_json::from_slice(bytes).map_err(|e| Error::MalformedHeader {
                path: path.into(),
                reason: format!("index: {e}"),
            })?;
        for (tensor, shard) in &index.weight_map {
            let mut parts = Path::new(shard.as_str()).components();
            let plain = matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(n)), None) if n == shard.as_str()
            );
            if !plain {
                return Err(Error::IndexMismatch {
                    path: path.into(),
                    tensor: tensor.clone(),
                    reason: format!("shard name '{shard}' is not a plain file name"),
                });
            }
        }
        Ok(index)
    }
}

/// How a checkpoint is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A bare `.safetensors` file.
    File,
    /// A directory holding `model.safetensors`.
    SingleFileDir,
    /// A directory holding an index and shards.
    Sharded,
}

/// Where one tensor of a checkpoint lives.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// The tensor's header entry.
    pub info: TensorInfo,
}

/// An opened, fully validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    layout: Layout,
    files: Vec<SafetensorsFile>,
    tensors: Vec<TensorRef>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a checkpoint file or directory and validates all of it. `path` may be an
    /// object-store URL ([`crate::remote`]): the same layouts are found by HEAD requests and
    /// every header is read by ranged GETs.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        use crate::remote::probe_file;
        if probe_file(path)? {
            let file = SafetensorsFile::open(path)?;
            return Checkpoint::assemble(path, Layout::File, vec![file]);
        }
        let index_path = path.join(INDEX_FILE_NAME);
        if probe_file(&index_path)? {
            return Checkpoint::open_sharded(path, &index_path);
        }
        let single = path.join(SINGLE_FILE_NAME);
        if probe_file(&single)? {
            let file = SafetensorsFile::open(&single)?;
            return Checkpoint::assemble(path, Layout::SingleFileDir, vec![file]);
        }
        if crate::remote::is_url(path) && !crate::remote::is_dir(path)? {
            return Err(Error::Remote {
                url: path.to_string_lossy().into_owned(),
                action: "opening",
                status: Some(404),
                reason: "no such object or prefix".into(),
            });
        }
        if !crate::remote::is_url(path) && !path.exists() {
            return Err(Error::io(
                path,
                "opening",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Err(Error::NotACheckpoint { path: path.into() })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Checkpoint> {
        let index = ShardIndex::read(index_path)?;
        // Shard files in name order, which for HF names is also shard order.
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let tensor = index
                .weight_map
                .iter()
                .find(|(_, f)| f == shard)
                .map(|(t, _)| t.clone())
                .unwrap_or_default();
            // ShardIndex::parse checked the name is one plain component.
            let shard_path = dir.join(shard.as_str());
            if !crate::remote::probe_file(&shard_path)? {
                return Err(Error::MissingShard {
                    path: index_path.into(),
                    shard: shard.to_string(),
                    tensor,
                });
            }
            files.push(SafetensorsFile::open(&shard_path)?);
        }
        for (i, file) in files.iter().enumerate() {
            for t in file.tensors() {
                match index.weight_map.get(&t.name) {
                    Some(f) if f == shard_names[i] => {}
                    Some(f) => {
                        return Err(Error::IndexMismatch {
                            path: file.path().into(),
                            tensor: t.name.clone(),
                            reason: format!("found in this shard but the index maps it to '{f}'"),
                        })
                    }
                    None => {
                        return Err(Error::IndexMismatch {
                            path: file.path().into(),
                            tensor: t.name.clone(),
                            reason: "found in this shard but absent from the index".into(),
                        })
                    }
                }
            }
        }
        let ckpt = Checkpoint::assemble(dir, Layout::Sharded, files)?;
        for (name, shard) in &index.weight_map {
            if ckpt.get(name).is_none() {
                return Err(Error::IndexMismatch {
                    path: index_path.into(),
                    tensor: name.clone(),
                    reason: format!("the index maps it to '{shard}' but that shard lacks it"),
                });
            }
        }
        Ok(ckpt)
    }

    fn assemble(root: &Path, layout: Layout, files: Vec<SafetensorsFile>) -> Result<Checkpoint> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (fi, file) in files.iter().enumerate() {
            for info in file.tensors() {
                if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                    return Err(Error::DuplicateTensor {
                        path: file.path().into(),
                        tensor: info.name.clone(),
                    });
                }
                tensors.push(TensorRef {
                    file: fi,
                    info: info.clone(),
                });
            }
        }
        Ok(Checkpoint {
            root: root.into(),
            layout,
            files,
            tensors,
            by_name,
        })
    }

    /// The path this checkpoint was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How it is laid out.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The safetensors files, in shard order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// All tensors, in physical order (shard, then offset).
    pub fn tensors(&self) -> &[TensorRef] {
        &self.tensors
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The file holding `tensor`.
    pub fn file_of(&self, tensor: &TensorRef) -> &SafetensorsFile {
        &self.files[tensor.file]
    }

    /// Fails, naming the file, if a read of any of this checkpoint's files hit a truncation
    /// since it was opened (see [`crate::fault`]).
    pub fn check_faults(&self) -> Result<()> {
        self.files
            .iter()
            .try_for_each(SafetensorsFile::check_faults)
    }

    /// The bytes of `tensor`.
    pub fn bytes(&self, tensor: &TensorRef) -> &[u8] {
        self.files[tensor.file].tensor_bytes(&tensor.info)
    }

    /// Total tensor bytes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.info.n_bytes()).sum()
    }

    /// Total bytes of the safetensors files, headers included.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.header().file_len()).sum()
    }

    /// Total number of elements across all tensors.
    pub fn param_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.info.numel()).sum()
    }

    /// The sidecars (config, tokenizer, custom code, module folders, ...) beside the weights,
    /// files and folders, each folder before its contents: every entry of
    /// [`Checkpoint::sidecar_plan`]'s copy list. Empty when that walk fails.
    pub fn sidecars(&self) -> Vec<PathBuf> {
        self.sidecar_plan()
            .map(|plan| plan.copy.iter().map(|s| self.root.join(&s.path)).collect())
            .unwrap_or_default()
    }

    /// What a merge copies beside its output, and what it leaves behind and why: every
    /// non-weight file and folder of the checkpoint directory except training state, hidden
    /// folders and symlinks that leave it ([`crate::plan_sidecars`]). A bare `.safetensors`
    /// file has no sidecars.
    pub fn sidecar_plan(&self) -> Result<SidecarPlan> {
        if self.layout == Layout::File {
            return Ok(SidecarPlan::default());
        }
        plan_sidecars(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_with_subdirectories_were_accepted() {
        let p = Path::new("model.safetensors.index.json");
        let ok = br#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#;
        assert_eq!(ShardIndex::parse(p, ok).unwrap().weight_map.len(), 1);
        for shard in [
            "sub/model.safetensors",
            "../model.safetensors",
            "/abs",
            "",
            ".",
            "a/",
        ] {
            let doc = serde_json::json!({ "weight_map": { "a": shard } }).to_string();
            let e = ShardIndex::parse(p, doc.as_bytes()).unwrap_err();
            assert!(
                matches!(&e, Error::IndexMismatch { reason, .. } if reason.contains("plain")),
                "{shard:?}: {e}"
            );
        }
    }
}
