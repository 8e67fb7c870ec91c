//! torch.save checkpoints (zip format, torch ≥ 1.6), read lazily, and the `data.pkl` tensor
//! rebuild shared with DCP items.
//!
//! A torch.save archive pickles its object graph into `data.pkl` and every storage into its own
//! stored zip entry `data/<key>`. A tensor pickles as
//! `torch._utils._rebuild_tensor_v2(PERSID(('storage', torch.<Dtype>Storage, key, location,
//! numel)), storage_offset, size, stride, requires_grad, backward_hooks)`: a strided view of a
//! storage. [`rebuild_tensor`] reads that call without running it, and the checkpoint maps the
//! storage entry and serves the view through the same [`ChunkedTensor`] engine as a one-chunk
//! DCP tensor, so views with offsets, strides (column-major, transposed) and several tensors on
//! one storage all read in place. Nothing is copied when the checkpoint is opened.
//!
//! A state dict is a `dict` or `collections.OrderedDict` of name → tensor. [`TorchSaveFile`]
//! walks the top-level object, flattening nested dicts with `.`-joined names, and descends into
//! the wrappers frameworks add (`module` for DeepSpeed's `mp_rank_00_model_states.pt`, `model`
//! for Megatron's legacy `model_optim_rng.pt`, `state_dict`): when the top level holds one of
//! these keys, only the first that is present is read, so optimizer state and `args` beside it
//! are left out. The rule for everything else is safe by construction: a leaf that is a tensor
//! rebuild is a tensor; any other leaf (an int, a string, an `argparse.Namespace`, a call of a
//! global pma does not know) is skipped and reported in [`TorchSaveFile::skipped`], because it
//! cannot be a weight and nothing in it is ever executed. Only a tensor whose rebuild is
//! malformed is an error.
//!
//! The legacy (pre-1.6) format is a bare pickle stream starting with a magic number; it is
//! refused with [`Error::TorchLegacyFormat`], which says how to convert it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dcp::source::{ChunkedTensor, MappedFile, StoredChunk};
use crate::dtype::dtype_bits;
use crate::error::{Error, Result};
use crate::pickle::{self, Value};
use crate::region::Region;
use crate::torchzip::TorchArchive;
use crate::Dtype;

/// A tensor as `data.pkl` describes it: a strided view of a storage entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledTensor {
    /// Element dtype (from the storage class, or the explicit dtype of `_rebuild_tensor_v3`).
    pub dtype: Dtype,
    /// The storage key: the entry is `<prefix>data/<key>`.
    pub storage_key: String,
    /// Elements in the storage, as the persistent id declares.
    pub storage_numel: u64,
    /// First element of the view in the storage.
    pub storage_offset: u64,
    /// The view's shape.
    pub shape: Vec<u64>,
    /// The view's element strides.
    pub strides: Vec<u64>,
}

/// The dtype a torch dtype name (`bfloat16`, `float32`, ...) denotes, for the dtypes pma reads.
pub fn torch_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "bfloat16" => Dtype::BF16,
        "float16" | "half" => Dtype::F16,
        "float32" | "float" => Dtype::F32,
        "float64" | "double" => Dtype::F64,
        "int64" | "long" => Dtype::I64,
        "int32" | "int" => Dtype::I32,
        "int16" | "short" => Dtype::I16,
        "int8" => Dtype::I8,
        "uint8" => Dtype::U8,
        "uint16" => Dtype::U16,
        "uint32" => Dtype::U32,
        "uint64" => Dtype::U64,
        "bool" => Dtype::BOOL,
        "float8_e4m3fn" => Dtype::F8_E4M3,
        "float8_e5m2" => Dtype::F8_E5M2,
        _ => return None,
    })
}

/// The dtype of a legacy typed-storage class name (`BFloat16Storage`, ...).
fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "BFloat16Storage" => Dtype::BF16,
        "HalfStorage" => Dtype::F16,
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

fn dims(v: &Value) -> Option<Vec<u64>> {
    let items = match v {
        Value::Tuple(t) | Value::List(t) => t,
        // torch.Size((..)) when pickled through its reduce.
        Value::Reduce { callable, args } if callable.as_global() == Some(("torch", "Size")) => {
            match args.as_ref() {
                Value::Tuple(a) if a.len() == 1 => return dims(&a[0]),
                _ => return None,
            }
        }
        _ => return None,
    };
    items
        .iter()
        .map(|x| x.as_int().and_then(|i| u64::try_from(i).ok()))
        .collect()
}

/// Whether `v` is a call that rebuilds a tensor (so a malformed one is an error, not a leaf).
pub fn is_tensor_rebuild(v: &Value) -> bool {
    matches!(v, Value::Reduce { callable, .. } | Value::Object { class: callable, .. }
        if matches!(callable.as_global(), Some(("torch._utils", n)) if n.starts_with("_rebuild_tensor") || n.starts_with("_rebuild_parameter")))
}

/// Reads a `_rebuild_tensor_v2` / `_v3` call (or `_rebuild_parameter*` wrapping one) without
/// running it. The error string says what is malformed.
pub fn rebuild_tensor(v: &Value) -> std::result::Result<PickledTensor, String> {
    let (callable, args) = match v {
        Value::Reduce { callable, args } => (callable, args),
        // A BUILD after the rebuild (tensor subclasses' state): the state does not move bytes.
        Value::Object {
            class,
            args,
            state: _,
        } => (class, args),
        other => return Err(format!("expected a tensor, found {}", other.describe())),
    };
    let Value::Tuple(args) = args.as_ref() else {
        return Err("rebuild arguments are not a tuple".into());
    };
    let name = match callable.as_global() {
        Some(("torch._utils", n)) => n,
        _ => return Err(format!("expected a tensor, found {}", v.describe())),
    };
    match name {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let inner = args.first().ok_or("parameter without data")?;
            rebuild_tensor(inner)
        }
        "_rebuild_tensor_v2" | "_rebuild_tensor_v3" | "_rebuild_tensor" => {
            let [pid, offset, size, stride, rest @ ..] = args.as_slice() else {
                return Err(format!("{name} with {} arguments", args.len()));
            };
            let Value::PersistentId(pid) = pid else {
                return Err(format!(
                    "storage is {}, not a persistent id",
                    pid.describe()
                ));
            };
            let Value::Tuple(p) = pid.as_ref() else {
                return Err("storage persistent id is not a tuple".into());
            };
            let [kind, class, key, _location, numel] = p.as_slice() else {
                return Err(format!(
                    "storage persistent id has {} fields, not 5",
                    p.len()
                ));
            };
            if kind.as_str() != Some("storage") {
                return Err(format!("persistent id of kind {}", kind.describe()));
            }
            let mut dtype = match class.as_global() {
                Some(("torch", c)) => storage_dtype(c),
                _ => None,
            };
            if name == "_rebuild_tensor_v3" {
                // (storage, offset, size, stride, requires_grad, hooks, dtype, metadata)
                if let Some((m, n)) = rest.get(2).and_then(|d| d.as_global()) {
                    if m == "torch" {
                        dtype = torch_dtype(n);
                    }
                }
            }
            let dtype = dtype.ok_or_else(|| format!("unsupported storage {}", class.describe()))?;
            let storage_key = key
                .as_str()
                .ok_or("storage key is not a string")?
                .to_string();
            if storage_key.is_empty() || storage_key.contains(['/', '\\']) || storage_key == ".." {
                return Err(format!("bad storage key {storage_key:?}"));
            }
            let storage_numel = numel
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or("storage numel is not a non-negative int")?;
            let storage_offset = offset
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or("storage_offset is not a non-negative int")?;
            let shape = dims(size).ok_or("size is not a tuple of non-negative ints")?;
            let strides = dims(stride).ok_or("stride is not a tuple of non-negative ints")?;
            if shape.len() != strides.len() {
                return Err(format!(
                    "size {shape:?} and stride {strides:?} differ in rank"
                ));
            }
            Ok(PickledTensor {
                dtype,
                storage_key,
                storage_numel,
                storage_offset,
                shape,
                strides,
            })
        }
        other => Err(format!("unsupported tensor rebuild torch._utils.{other}")),
    }
}

/// Locates a pickled tensor's bytes in an archive that starts at `archive_base` (absolute) in
/// `file`: checks the storage entry holds `storage_numel` elements and the view stays inside
/// them, and returns the stored chunk covering the whole view.
pub(crate) fn locate_view(
    file: &Arc<MappedFile>,
    archive_base: u64,
    archive: &TorchArchive,
    t: &PickledTensor,
    key: &str,
) -> Result<StoredChunk> {
    let path = file.path();
    let entry = archive
        .record(&format!("data/{}", t.storage_key))
        .map_err(|source| Error::Zip {
            path: path.into(),
            what: format!("'{key}'"),
            source,
        })?;
    let isz = dtype_bits(t.dtype) / 8;
    let too_small = |needed: Option<u64>| Error::StorageTooSmall {
        path: path.into(),
        tensor: key.into(),
        needed: needed.unwrap_or(u64::MAX),
        found: entry.size,
    };
    let storage_bytes = t.storage_numel.checked_mul(isz);
    if storage_bytes.is_none_or(|b| b > entry.size) {
        return Err(too_small(storage_bytes));
    }
    let view = StoredChunk {
        region: Region::full(&t.shape),
        file: file.clone(),
        base: 0,
        strides: t.strides.clone(),
    };
    let span = view.span_bytes(isz);
    let needed = span.and_then(|s| {
        if s == 0 {
            Some(0)
        } else {
            t.storage_offset.checked_mul(isz)?.checked_add(s)
        }
    });
    if needed.is_none_or(|n| n > t.storage_numel * isz) {
        return Err(too_small(needed));
    }
    Ok(StoredChunk {
        base: archive_base + entry.data_offset + t.storage_offset * isz,
        ..view
    })
}

/// Parses the zip in `file[base..base + len]` and its `data.pkl`. `what` names it in errors.
pub(crate) fn open_archive(
    file: &MappedFile,
    base: u64,
    len: u64,
    what: &str,
) -> Result<(TorchArchive, Value)> {
    open_archive_in(file, &file.item_view(base, len)?, what)
}

/// [`open_archive`] over the archive's bytes `bytes` (a view of `file` from
/// [`MappedFile::item_view`]).
pub(crate) fn open_archive_in(
    file: &MappedFile,
    bytes: &[u8],
    what: &str,
) -> Result<(TorchArchive, Value)> {
    let path = file.path();
    let zip_err = |source| Error::Zip {
        path: path.into(),
        what: what.into(),
        source,
    };
    let archive = TorchArchive::parse(bytes).map_err(zip_err)?;
    if let Ok(order) = archive.record("byteorder") {
        let r = order.range();
        let v = &bytes[r.start as usize..r.end as usize];
        if v != b"little" {
            return Err(Error::TorchSave {
                path: path.into(),
                key: what.into(),
                reason: format!(
                    "byte order {:?}: only little-endian archives are read",
                    String::from_utf8_lossy(v)
                ),
            });
        }
    }
    let pkl = archive.record("data.pkl").map_err(zip_err)?.range();
    let value = pickle::parse(&bytes[pkl.start as usize..pkl.end as usize]).map_err(|source| {
        Error::Pickle {
            path: path.into(),
            what: format!("{what} data.pkl"),
            source,
        }
    })?;
    Ok((archive, value))
}

/// One tensor of a torch.save file.
#[derive(Debug, Clone)]
pub struct TorchSaveTensor {
    /// The flattened name (`layers.0.attention.wq.weight`; nested dicts joined with `.`).
    pub name: String,
    /// The readable tensor.
    pub source: Arc<ChunkedTensor>,
}

/// A torch.save checkpoint file, opened lazily: only `data.pkl` is parsed; storages stay mapped.
#[derive(Debug)]
pub struct TorchSaveFile {
    path: PathBuf,
    tensors: Vec<TorchSaveTensor>,
    by_name: std::collections::HashMap<String, usize>,
    skipped: Vec<String>,
}

/// Wrapper keys whose value is the model's state dict (DeepSpeed, Megatron legacy, generic).
const WRAPPERS: [&str; 3] = ["module", "model", "state_dict"];

/// Legacy torch.save is a bare pickle stream (PROTO first; with the default protocol 2 it
/// starts `80 02 8a 0a`, the magic number 0x1950a86a20f9469cfc6c as a LONG1), never a zip.
const PICKLE_PROTO: u8 = 0x80;

impl TorchSaveFile {
    /// Opens a torch.save file, parses its `data.pkl` and locates every tensor's bytes.
    pub fn open(path: &Path) -> Result<TorchSaveFile> {
        let file = MappedFile::open(path)?;
        let first = file.read_at(0..file.len().min(1))?;
        if first.first() == Some(&PICKLE_PROTO) {
            return Err(Error::TorchLegacyFormat { path: path.into() });
        }
        let what = "torch.save archive";
        let (archive, root) = open_archive(&file, 0, file.len(), what)?;
        let mut out = TorchSaveFile {
            path: path.into(),
            tensors: Vec::new(),
            by_name: std::collections::HashMap::new(),
            skipped: Vec::new(),
        };
        let root = match &root {
            Value::Dict(items) => WRAPPERS
                .iter()
                .find_map(|w| {
                    items
                        .iter()
                        .find(|(k, v)| k.as_str() == Some(w) && matches!(v, Value::Dict(_)))
                        .map(|(_, v)| v)
                })
                .unwrap_or(&root),
            _ => &root,
        };
        out.walk(&file, &archive, root, String::new(), 0)?;
        Ok(out)
    }

    fn walk(
        &mut self,
        file: &Arc<MappedFile>,
        archive: &TorchArchive,
        v: &Value,
        name: String,
        depth: usize,
    ) -> Result<()> {
        match v {
            Value::Dict(items) if depth < pickle::MAX_DEPTH => {
                for (k, x) in items {
                    let part = match k {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        _ => {
                            self.skipped.push(format!("{name}[{}]", k.describe()));
                            continue;
                        }
                    };
                    let full = if name.is_empty() {
                        part
                    } else {
                        format!("{name}.{part}")
                    };
                    self.walk(file, archive, x, full, depth + 1)?;
                }
            }
            _ if is_tensor_rebuild(v) => {
                let t = rebuild_tensor(v).map_err(|reason| Error::TorchSave {
                    path: self.path.clone(),
                    key: name.clone(),
                    reason,
                })?;
                let chunk = locate_view(file, 0, archive, &t, &name)?;
                if self
                    .by_name
                    .insert(name.clone(), self.tensors.len())
                    .is_some()
                {
                    return Err(Error::DuplicateTensor {
                        path: self.path.clone(),
                        tensor: name,
                    });
                }
                let source = ChunkedTensor::new(name.clone(), t.dtype, t.shape, vec![chunk]);
                self.tensors.push(TorchSaveTensor {
                    name,
                    source: Arc::new(source),
                });
            }
            _ => self.skipped.push(name),
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors, in pickle order.
    pub fn tensors(&self) -> &[TorchSaveTensor] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TorchSaveTensor> {
        self.tensors.get(*self.by_name.get(name)?)
    }

    /// Names of the non-tensor leaves that were skipped (ints, strings, namespaces, unknown
    /// objects), for reporting.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }
}

/// The single-file torch.save checkpoint name HF used before safetensors.
pub const TORCH_BIN_FILE: &str = "pytorch_model.bin";
/// The index of a sharded `pytorch_model-0000i-of-0000N.bin` checkpoint.
pub const TORCH_BIN_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// A torch.save checkpoint: one file (`pytorch_model.bin`, DeepSpeed's
/// `mp_rank_00_model_states.pt`, Megatron's `model_optim_rng.pt`, any `.pt`/`.bin`), a
/// directory holding `pytorch_model.bin`, or a directory of shards with
/// `pytorch_model.bin.index.json`.
#[derive(Debug)]
pub struct TorchSaveCheckpoint {
    root: PathBuf,
    files: Vec<TorchSaveFile>,
}

impl TorchSaveCheckpoint {
    /// Opens a torch.save file or HF `pytorch_model.bin` directory (single or sharded),
    /// validating every tensor's view against its storage.
    pub fn open(path: &Path) -> Result<TorchSaveCheckpoint> {
        if path.is_file() {
            let f = TorchSaveFile::open(path)?;
            return Ok(TorchSaveCheckpoint {
                root: path.into(),
                files: vec![f],
            });
        }
        let index_path = path.join(TORCH_BIN_INDEX_FILE);
        if index_path.is_file() {
            return Self::open_sharded(path, &index_path);
        }
        let single = path.join(TORCH_BIN_FILE);
        if single.is_file() {
            let f = TorchSaveFile::open(&single)?;
            return Ok(TorchSaveCheckpoint {
                root: path.into(),
                files: vec![f],
            });
        }
        Err(Error::NotACheckpoint { path: path.into() })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<TorchSaveCheckpoint> {
        let index = crate::checkpoint::ShardIndex::read(index_path)?;
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut files = Vec::with_capacity(shards.len());
        for shard in shards {
            let plain = !shard.is_empty()
                && Path::new(shard.as_str())
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            let tensor = || {
                index
                    .weight_map
                    .iter()
                    .find(|(_, f)| *f == shard)
                    .map(|(t, _)| t.clone())
                    .unwrap_or_default()
            };
            if !plain {
                return Err(Error::IndexMismatch {
                    path: index_path.into(),
                    tensor: tensor(),
                    reason: format!("shard name '{shard}' is not a plain file name"),
                });
            }
            let p = dir.join(shard.as_str());
            if !p.is_file() {
                return Err(Error::MissingShard {
                    path: index_path.into(),
                    shard: shard.clone(),
                    tensor: tensor(),
                });
            }
            let f = TorchSaveFile::open(&p)?;
            for t in f.tensors() {
                if index.weight_map.get(&t.name) != Some(shard) {
                    return Err(Error::IndexMismatch {
                        path: p.clone(),
                        tensor: t.name.clone(),
                        reason: format!(
                            "found in this shard but the index maps it to {:?}",
                            index.weight_map.get(&t.name)
                        ),
                    });
                }
            }
            files.push(f);
        }
        let ckpt = TorchSaveCheckpoint {
            root: dir.into(),
            files,
        };
        for (name, shard) in &index.weight_map {
            if ckpt.tensor(name).is_none() {
                return Err(Error::IndexMismatch {
                    path: index_path.into(),
                    tensor: name.clone(),
                    reason: format!("the index maps it to '{shard}' but that shard lacks it"),
                });
            }
        }
        Ok(ckpt)
    }

    /// The path it was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files (one, or the shards in name order).
    pub fn files(&self) -> &[TorchSaveFile] {
        &self.files
    }

    /// Every tensor, file by file in pickle order.
    pub fn tensors(&self) -> impl Iterator<Item = &TorchSaveTensor> {
        self.files.iter().flat_map(|f| f.tensors())
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TorchSaveTensor> {
        self.files.iter().find_map(|f| f.tensor(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(m: &str, n: &str) -> Box<Value> {
        Box::new(Value::Global {
            module: m.into(),
            name: n.into(),
        })
    }

    fn ints(v: &[i64]) -> Value {
        Value::Tuple(v.iter().map(|&i| Value::Int(i)).collect())
    }

    fn v2(class: &str, offset: i64, size: &[i64], stride: &[i64]) -> Value {
        Value::Reduce {
            callable: g("torch._utils", "_rebuild_tensor_v2"),
            args: Box::new(Value::Tuple(vec![
                Value::PersistentId(Box::new(Value::Tuple(vec![
                    Value::Str("storage".into()),
                    *g("torch", class),
                    Value::Str("0".into()),
                    Value::Str("cpu".into()),
                    Value::Int(12),
                ]))),
                Value::Int(offset),
                ints(size),
                ints(stride),
                Value::Bool(false),
                Value::Dict(vec![]),
            ])),
        }
    }

    #[test]
    fn rebuild_reads_storage_view() {
        let t = rebuild_tensor(&v2("BFloat16Storage", 2, &[2, 5], &[1, 2])).unwrap();
        assert_eq!(
            t,
            PickledTensor {
                dtype: Dtype::BF16,
                storage_key: "0".into(),
                storage_numel: 12,
                storage_offset: 2,
                shape: vec![2, 5],
                strides: vec![1, 2],
            }
        );
    }

    #[test]
    fn rebuild_refuses_what_it_cannot_map() {
        assert!(rebuild_tensor(&v2("ComplexFloatStorage", 0, &[1], &[1])).is_err());
        assert!(rebuild_tensor(&v2("FloatStorage", -1, &[1], &[1])).is_err());
        assert!(rebuild_tensor(&v2("FloatStorage", 0, &[1, 2], &[1])).is_err());
        assert!(rebuild_tensor(&Value::Int(3)).is_err());
    }
}
