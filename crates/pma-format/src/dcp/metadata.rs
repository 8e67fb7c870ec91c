//! Interpreting DCP's `.metadata` pickle: five dataclasses, recognised by name and state.
//!
//! torch pickles `Metadata{state_dict_metadata, storage_data, planner_data, storage_meta,
//! version}` whose entries are `TensorStorageMetadata{properties, size, chunks}` or
//! `BytesStorageMetadata{}`, and whose storage index maps `MetadataIndex{fqn, offset, index}` to
//! `_StorageInfo{relative_path, offset, length}` (FORMAT.md §2). Frameworks pickle the same
//! dataclasses from other modules (OLMo-core's own `_StorageInfo`) or under another top-level
//! name (Megatron's `MCoreMetadata`), so a class is accepted by its *name*, from any module,
//! and its fields are then read from its state: the BUILD dict (torch's NEWOBJ style), the
//! positional constructor arguments (the REDUCE style of minimal writers), or both.
//! `TensorProperties` pickles a tuple state `(dtype, layout, requires_grad, memory_format,
//! pin_memory[, strides])`; only the dtype is used (its `strides` describe one rank's local
//! shard and are not trusted). Unknown attributes (`planner_data`, `storage_meta` with its
//! `pathlib.PosixPath`, Megatron's `mcore_data`) are ignored without being interpreted.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pickle::Value;
use crate::region::Region;
use crate::torch_save::torch_dtype;
use crate::Dtype;

/// Where an item's bytes are: `[offset, offset + length)` of `relative_path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageLocation {
    /// The `.distcp` file, relative to the checkpoint directory.
    pub relative_path: String,
    /// First byte of the item.
    pub offset: u64,
    /// Item length in bytes.
    pub length: u64,
}

/// A `.metadata` entry before its items are opened.
#[derive(Debug, Clone)]
pub(crate) enum RawEntry {
    Tensor {
        fqn: String,
        dtype: Dtype,
        shape: Vec<u64>,
        chunks: Vec<Region>,
    },
    Bytes {
        fqn: String,
    },
}

/// The decoded `.metadata`: entries in plan order, and the storage index.
#[derive(Debug, Clone)]
pub(crate) struct RawMetadata {
    pub entries: Vec<RawEntry>,
    /// `(fqn, chunk offsets)` (None for bytes entries) → location.
    pub storage: HashMap<(String, Option<Vec<u64>>), StorageLocation>,
}

/// A dataclass role: accepted class names and field order (for positional arguments).
struct Role {
    what: &'static str,
    names: &'static [&'static str],
    fields: &'static [&'static str],
}

const METADATA: Role = Role {
    what: "Metadata",
    names: &["Metadata", "MCoreMetadata"],
    fields: &[
        "state_dict_metadata",
        "planner_data",
        "storage_data",
        "storage_meta",
        "version",
    ],
};
const TENSOR_META: Role = Role {
    what: "TensorStorageMetadata",
    names: &["TensorStorageMetadata"],
    fields: &["properties", "size", "chunks"],
};
const BYTES_META: Role = Role {
    what: "BytesStorageMetadata",
    names: &["BytesStorageMetadata"],
    fields: &[],
};
const CHUNK_META: Role = Role {
    what: "ChunkStorageMetadata",
    names: &["ChunkStorageMetadata"],
    fields: &["offsets", "sizes"],
};
const PROPERTIES: Role = Role {
    what: "TensorProperties",
    names: &["TensorProperties"],
    fields: &[
        "dtype",
        "layout",
        "requires_grad",
        "memory_format",
        "pin_memory",
        "strides",
    ],
};
const INDEX: Role = Role {
    what: "MetadataIndex",
    names: &["MetadataIndex"],
    fields: &["fqn", "offset", "index"],
};
const STORAGE_INFO: Role = Role {
    what: "_StorageInfo",
    names: &["_StorageInfo"],
    fields: &["relative_path", "offset", "length", "transform_descriptors"],
};

struct Reader<'p> {
    path: &'p Path,
}

type Fields<'v> = HashMap<&'static str, &'v Value>;

impl Reader<'_> {
    fn bad(&self, at: &str, reason: impl Into<String>) -> Error {
        Error::DcpMetadata {
            path: self.path.into(),
            at: at.into(),
            reason: reason.into(),
        }
    }

    /// The class name of an object-like value, if it is one.
    fn class_of(v: &Value) -> Option<(&Value, &Value, Option<&Value>)> {
        match v {
            Value::Object { class, args, state } => Some((class, args, state.as_deref())),
            Value::Reduce { callable, args } => Some((callable, args, None)),
            _ => None,
        }
    }

    /// Checks `v` is an instance of `role` and collects its fields from arguments and state.
    fn fields<'v>(&self, v: &'v Value, role: &Role, at: &str) -> Result<Fields<'v>> {
        let unexpected = |found: String| Error::DcpUnexpectedClass {
            path: self.path.into(),
            at: at.into(),
            expected: role.what,
            found,
        };
        let Some((class, args, state)) = Self::class_of(v) else {
            return Err(unexpected(v.describe()));
        };
        let Some((module, name)) = class.as_global() else {
            return Err(unexpected(v.describe()));
        };
        if !role.names.contains(&name) {
            return Err(unexpected(format!("{module}.{name}")));
        }
        let mut out = Fields::new();
        let Value::Tuple(args) = args else {
            return Err(self.bad(at, "constructor arguments are not a tuple"));
        };
        // NEWOBJ with no arguments is cls.__new__(cls); positional arguments come only from a
        // constructor call (REDUCE), where they fill the dataclass fields in order.
        if args.len() > role.fields.len() {
            return Err(self.bad(
                at,
                format!(
                    "{} takes {} fields, got {}",
                    role.what,
                    role.fields.len(),
                    args.len()
                ),
            ));
        }
        for (f, a) in role.fields.iter().zip(args) {
            out.insert(*f, a);
        }
        let mut dict_state = |d: &'v Value| -> Result<()> {
            match d {
                Value::Dict(items) => {
                    for (k, x) in items {
                        if let Some(f) = k
                            .as_str()
                            .and_then(|k| role.fields.iter().find(|f| **f == k))
                        {
                            out.insert(f, x);
                        }
                    }
                    Ok(())
                }
                Value::None => Ok(()),
                other => Err(self.bad(at, format!("state is {}", other.describe()))),
            }
        };
        match state {
            None => {}
            Some(Value::Tuple(t)) if role.what == "TensorProperties" => {
                // __setstate__ tuple: 5 fields in older torch, 6 (with strides) in 2.15.
                if !(5..=6).contains(&t.len()) {
                    return Err(
                        self.bad(at, format!("TensorProperties state of {} fields", t.len()))
                    );
                }
                for (f, x) in role.fields.iter().zip(t) {
                    out.insert(*f, x);
                }
            }
            // (instance dict, slots dict) form of classes with __slots__.
            Some(Value::Tuple(t)) if t.len() == 2 => {
                dict_state(&t[0])?;
                dict_state(&t[1])?;
            }
            Some(d) => dict_state(d)?,
        }
        Ok(out)
    }

    fn field<'v>(&self, f: &Fields<'v>, name: &str, at: &str) -> Result<&'v Value> {
        f.get(name)
            .copied()
            .ok_or_else(|| self.bad(at, format!("missing field '{name}'")))
    }

    fn uint(&self, v: &Value, at: &str, what: &str) -> Result<u64> {
        v.as_int()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| {
                self.bad(
                    at,
                    format!("{what} is {}, not a non-negative int", v.describe()),
                )
            })
    }

    fn string(&self, v: &Value, at: &str, what: &str) -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| self.bad(at, format!("{what} is {}, not a str", v.describe())))
    }

    /// A `torch.Size((..))`, or a plain tuple / list of ints.
    fn size(&self, v: &Value, at: &str) -> Result<Vec<u64>> {
        let items = match v {
            Value::Tuple(t) | Value::List(t) => t,
            Value::Reduce { callable, args }
                if callable.as_global().is_some_and(|(_, n)| n == "Size") =>
            {
                match args.as_ref() {
                    Value::Tuple(a) if a.len() == 1 => return self.size(&a[0], at),
                    Value::Tuple(a) if a.is_empty() => return Ok(Vec::new()),
                    _ => return Err(self.bad(at, "torch.Size with unexpected arguments")),
                }
            }
            other => {
                return Err(self.bad(
                    at,
                    format!("expected a torch.Size, found {}", other.describe()),
                ))
            }
        };
        items
            .iter()
            .map(|x| self.uint(x, at, "a dimension"))
            .collect()
    }

    fn metadata(&self, root: &Value) -> Result<RawMetadata> {
        let at = "Metadata";
        let md = self.fields(root, &METADATA, at)?;
        let Value::Dict(sdm) = self.field(&md, "state_dict_metadata", at)? else {
            return Err(self.bad(at, "state_dict_metadata is not a dict"));
        };
        let mut entries = Vec::with_capacity(sdm.len());
        for (k, v) in sdm {
            let fqn = self.string(k, "state_dict_metadata", "a key")?;
            let at = format!("state_dict_metadata['{fqn}']");
            let is_bytes = Self::class_of(v)
                .and_then(|(c, _, _)| c.as_global())
                .is_some_and(|(_, n)| BYTES_META.names.contains(&n));
            if is_bytes {
                self.fields(v, &BYTES_META, &at)?;
                entries.push(RawEntry::Bytes { fqn });
                continue;
            }
            let t = self.fields(v, &TENSOR_META, &at)?;
            let pat = format!("{at}.properties");
            let props = self.fields(self.field(&t, "properties", &at)?, &PROPERTIES, &pat)?;
            let dtype_v = self.field(&props, "dtype", &pat)?;
            let dtype = match dtype_v.as_global() {
                Some(("torch", n)) => torch_dtype(n),
                _ => None,
            }
            .ok_or_else(|| self.bad(&pat, format!("unsupported dtype {}", dtype_v.describe())))?;
            let shape = self.size(self.field(&t, "size", &at)?, &format!("{at}.size"))?;
            let Value::List(chunk_list) = self.field(&t, "chunks", &at)? else {
                return Err(self.bad(&at, "chunks is not a list"));
            };
            let mut chunks = Vec::with_capacity(chunk_list.len());
            for (i, c) in chunk_list.iter().enumerate() {
                let cat = format!("{at}.chunks[{i}]");
                let cf = self.fields(c, &CHUNK_META, &cat)?;
                let offsets = self.size(self.field(&cf, "offsets", &cat)?, &cat)?;
                let sizes = self.size(self.field(&cf, "sizes", &cat)?, &cat)?;
                chunks.push(Region { offsets, sizes });
            }
            entries.push(RawEntry::Tensor {
                fqn,
                dtype,
                shape,
                chunks,
            });
        }
        let Value::Dict(sd) = self.field(&md, "storage_data", at)? else {
            return Err(self.bad(at, "storage_data is not a dict"));
        };
        let mut storage = HashMap::with_capacity(sd.len());
        for (i, (k, v)) in sd.iter().enumerate() {
            let kat = format!("storage_data key {i}");
            let idx = self.fields(k, &INDEX, &kat)?;
            let fqn = self.string(self.field(&idx, "fqn", &kat)?, &kat, "fqn")?;
            let kat = format!("storage_data['{fqn}']");
            let offset = match idx.get("offset") {
                None | Some(Value::None) => None,
                Some(o) => Some(self.size(o, &kat)?),
            };
            let si = self.fields(v, &STORAGE_INFO, &kat)?;
            let loc = StorageLocation {
                relative_path: self.string(
                    self.field(&si, "relative_path", &kat)?,
                    &kat,
                    "relative_path",
                )?,
                offset: self.uint(self.field(&si, "offset", &kat)?, &kat, "offset")?,
                length: self.uint(self.field(&si, "length", &kat)?, &kat, "length")?,
            };
            if !is_relative_inside(&loc.relative_path) {
                return Err(self.bad(
                    &kat,
                    format!(
                        "relative_path {:?} leaves the checkpoint directory",
                        loc.relative_path
                    ),
                ));
            }
            if storage.insert((fqn.clone(), offset), loc).is_some() {
                return Err(self.bad(&kat, "stored twice"));
            }
        }
        Ok(RawMetadata { entries, storage })
    }
}

/// Whether `p` is a plain relative path that stays inside the directory (no `..`, not absolute).
fn is_relative_inside(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Interprets a decoded `.metadata` pickle. `path` names the file in errors.
pub(crate) fn read_metadata(path: &Path, root: &Value) -> Result<RawMetadata> {
    Reader { path }.metadata(root)
}
