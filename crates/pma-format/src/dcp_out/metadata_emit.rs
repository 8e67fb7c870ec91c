//! The `.metadata` pickle: DCP's only index, emitted as the object graph torch itself writes.
//!
//! Every dataclass is built the way torch's own pickle builds it ("newobj" style, FORMAT.md §8):
//! `GLOBAL cls; EMPTY_TUPLE; NEWOBJ; {state}; BUILD`, i.e. `cls.__new__(cls)` followed by
//! `__dict__.update(state)`. That calls no constructor, so it does not depend on the dataclasses'
//! argument order, which has changed between torch versions. `TensorProperties` is the exception
//! torch makes too: its state is the tuple its `__setstate__` takes. We write the 5-tuple
//! `(dtype, layout, requires_grad, memory_format, pin_memory)`, which every torch ≥ 2.0 accepts
//! (2.15 writes a 6th element, the local strides, that loaders ignore and older torch rejects).
//!
//! `storage_data` is keyed by `MetadataIndex(fqn, offset)`, whose hash is computed when the key
//! is inserted, so each key is fully BUILT before `SETITEMS` runs: the stream emits key, value,
//! key, value, ... inside one MARK and lets `SETITEMS` insert them afterwards.

use crate::Dtype;

use super::pickle_emit::PickleEmitter;

const META_MODULE: &str = "torch.distributed.checkpoint.metadata";
const FS_MODULE: &str = "torch.distributed.checkpoint.filesystem";

/// Where one item lies in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageLoc {
    pub(crate) file: String,
    pub(crate) offset: u64,
    pub(crate) length: u64,
}

/// One chunk of a tensor entry: its box in the global tensor and where its item lies.
#[derive(Debug, Clone)]
pub(crate) struct ChunkMeta<'a> {
    pub(crate) offsets: &'a [u64],
    pub(crate) sizes: &'a [u64],
    pub(crate) loc: StorageLoc,
}

/// One `state_dict_metadata` entry.
#[derive(Debug, Clone)]
pub(crate) enum EntryMeta<'a> {
    /// A tensor with its chunks (in `storage_data` order).
    Tensor {
        fqn: &'a str,
        dtype: Dtype,
        shape: &'a [u64],
        chunks: Vec<ChunkMeta<'a>>,
    },
    /// A bytes item (torch.save payload of an arbitrary object).
    Bytes { fqn: &'a str, loc: StorageLoc },
}

impl EntryMeta<'_> {
    fn fqn(&self) -> &str {
        match self {
            EntryMeta::Tensor { fqn, .. } | EntryMeta::Bytes { fqn, .. } => fqn,
        }
    }
}

/// A component of a `planner_data` path: a dict key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannerKey {
    /// A dict key (`"optimizer"`, `"state"`, `"layers.0.w"`).
    Str(String),
    /// A list index (`param_groups` → `0`).
    Index(u64),
}

/// torch's dtype attribute name (`torch.bfloat16`) and legacy storage class (`BFloat16Storage`)
/// for a dtype, or `None` where torch.save has no typed storage for it.
pub(crate) fn torch_names(dtype: Dtype) -> Option<(&'static str, &'static str)> {
    Some(match dtype {
        Dtype::BF16 => ("bfloat16", "BFloat16Storage"),
        Dtype::F16 => ("float16", "HalfStorage"),
        Dtype::F32 => ("float32", "FloatStorage"),
        Dtype::F64 => ("float64", "DoubleStorage"),
        Dtype::I64 => ("int64", "LongStorage"),
        Dtype::I32 => ("int32", "IntStorage"),
        Dtype::I16 => ("int16", "ShortStorage"),
        Dtype::I8 => ("int8", "CharStorage"),
        Dtype::U8 => ("uint8", "ByteStorage"),
        Dtype::BOOL => ("bool", "BoolStorage"),
        _ => return None,
    })
}

/// `cls.__new__(cls)` for a DCP dataclass; the caller pushes the state dict and calls BUILD.
fn new_object(p: &mut PickleEmitter, module: &str, class: &str) {
    p.global(module, class).empty_tuple().newobj();
}

/// `torch.Size(values)`.
fn torch_size(p: &mut PickleEmitter, values: &[u64]) {
    p.global("torch", "Size")
        .uint_tuple(values)
        .tuple1()
        .reduce();
}

fn tensor_properties(p: &mut PickleEmitter, dtype_name: &str) {
    new_object(p, META_MODULE, "TensorProperties");
    p.mark();
    p.global("torch", dtype_name);
    p.global("torch.serialization", "_get_layout")
        .str("torch.strided")
        .tuple1()
        .reduce();
    p.bool(false); // requires_grad
    p.global(META_MODULE, "_MEM_FORMAT_ENCODING")
        .int(0) // TORCH_CONTIGUOUS_FORMAT
        .tuple1()
        .reduce();
    p.bool(false); // pin_memory
    p.tuple().build();
}

fn storage_info(p: &mut PickleEmitter, loc: &StorageLoc) {
    new_object(p, FS_MODULE, "_StorageInfo");
    p.empty_dict().mark();
    p.str("relative_path").str(&loc.file);
    p.str("offset").uint(loc.offset);
    p.str("length").uint(loc.length);
    p.setitems().build();
}

/// The `.metadata` bytes for `entries` (in `state_dict_metadata` order). `planner_path(fqn)`
/// gives the entry's path in the nested state dict (`None`: the flat key itself, `(fqn,)`).
/// Every dtype must have [`torch_names`]; the layout checks that before anything is written.
pub(crate) fn emit_metadata<'a>(
    entries: &[EntryMeta<'_>],
    planner_path: impl Fn(&str) -> Option<&'a [PlannerKey]>,
) -> Vec<u8> {
    let mut p = PickleEmitter::new();
    new_object(&mut p, META_MODULE, "Metadata");
    p.empty_dict().mark();

    p.str("state_dict_metadata").empty_dict().mark();
    for e in entries {
        p.str(e.fqn());
        match e {
            EntryMeta::Tensor {
                dtype,
                shape,
                chunks,
                ..
            } => {
                let (dtype_name, _) = torch_names(*dtype).expect("layout validated the dtype");
                new_object(&mut p, META_MODULE, "TensorStorageMetadata");
                p.empty_dict().mark();
                p.str("properties");
                tensor_properties(&mut p, dtype_name);
                p.str("size");
                torch_size(&mut p, shape);
                p.str("chunks").empty_list().mark();
                for c in chunks {
                    new_object(&mut p, META_MODULE, "ChunkStorageMetadata");
                    p.empty_dict().mark();
                    p.str("offsets");
                    torch_size(&mut p, c.offsets);
                    p.str("sizes");
                    torch_size(&mut p, c.sizes);
                    p.setitems().build();
                }
                p.appends();
                p.setitems().build();
            }
            EntryMeta::Bytes { .. } => {
                new_object(&mut p, META_MODULE, "BytesStorageMetadata");
                p.empty_dict().build();
            }
        }
    }
    p.setitems();

    // planner_data: fqn -> its path in the nested state dict, for loaders that rebuild nesting
    // (dcp_to_torch_save, _EmptyStateDictLoadPlanner).
    p.str("planner_data").empty_dict().mark();
    for e in entries {
        p.str(e.fqn());
        match planner_path(e.fqn()) {
            Some(path) if !path.is_empty() => {
                p.mark();
                for k in path {
                    match k {
                        PlannerKey::Str(s) => p.str(s),
                        PlannerKey::Index(i) => p.uint(*i),
                    };
                }
                p.tuple();
            }
            _ => {
                p.str(e.fqn()).tuple1();
            }
        }
    }
    p.setitems();

    p.str("storage_data").empty_dict().mark();
    for e in entries {
        match e {
            EntryMeta::Tensor { fqn, chunks, .. } => {
                for (i, c) in chunks.iter().enumerate() {
                    new_object(&mut p, META_MODULE, "MetadataIndex");
                    p.empty_dict().mark();
                    p.str("fqn").str(fqn);
                    p.str("offset");
                    torch_size(&mut p, c.offsets);
                    p.str("index").uint(i as u64);
                    p.setitems().build();
                    storage_info(&mut p, &c.loc);
                }
            }
            EntryMeta::Bytes { fqn, loc } => {
                new_object(&mut p, META_MODULE, "MetadataIndex");
                p.empty_dict().mark();
                p.str("fqn").str(fqn);
                p.str("index").none();
                p.setitems().build();
                storage_info(&mut p, loc);
            }
        }
    }
    p.setitems();

    p.str("storage_meta").none();
    p.str("version").str("1.0.0");
    p.setitems().build();
    p.finish()
}

/// The `data.pkl` of a tensor item: `torch._utils._rebuild_tensor_v2(storage, 0, size, stride,
/// False, OrderedDict())` with the storage a persistent id `('storage', torch.<X>Storage, '0',
/// 'cpu', numel)`, strides row-major over `sizes` (the chunk is stored densely, in order).
pub(crate) fn emit_tensor_pickle(storage_class: &str, sizes: &[u64]) -> Vec<u8> {
    let numel: u64 = sizes.iter().product();
    let mut strides = vec![0u64; sizes.len()];
    let mut acc = 1u64;
    for (s, &n) in strides.iter_mut().zip(sizes).rev() {
        *s = acc;
        acc = acc.saturating_mul(n);
    }
    let mut p = PickleEmitter::new();
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    p.mark().str("storage").global("torch", storage_class);
    p.str("0").str("cpu").uint(numel).tuple().binpersid();
    p.int(0); // storage_offset
    p.uint_tuple(sizes);
    p.uint_tuple(&strides);
    p.bool(false); // requires_grad
    p.global("collections", "OrderedDict")
        .empty_tuple()
        .reduce();
    p.tuple().reduce();
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_pickle_matches_torch_structure() {
        let pkl = emit_tensor_pickle("BFloat16Storage", &[2, 3]);
        let mut want =
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
        want.extend_from_slice(b"ctorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
        want.extend_from_slice(b"K\x06tQK\x00(K\x02K\x03t(K\x03K\x01t\x89");
        want.extend_from_slice(b"ccollections\nOrderedDict\n)RtR.");
        assert_eq!(pkl, want);
        // A 0-dim tensor: size () and stride (), one element.
        let pkl = emit_tensor_pickle("LongStorage", &[]);
        assert!(pkl.windows(8).any(|w| w == b"K\x01tQK\x00))".as_slice()));
    }

    #[test]
    fn metadata_names_every_class_and_value() {
        let shape = [4u64, 2];
        let (o0, o1, s) = ([0u64, 0], [2u64, 0], [2u64, 2]);
        let loc = |off: u64| StorageLoc {
            file: "__0_0.distcp".into(),
            offset: off,
            length: 100,
        };
        let entries = [
            EntryMeta::Tensor {
                fqn: "w",
                dtype: Dtype::BF16,
                shape: &shape,
                chunks: vec![
                    ChunkMeta {
                        offsets: &o0,
                        sizes: &s,
                        loc: loc(0),
                    },
                    ChunkMeta {
                        offsets: &o1,
                        sizes: &s,
                        loc: loc(5 << 30),
                    },
                ],
            },
            EntryMeta::Bytes {
                fqn: "b",
                loc: loc(7),
            },
        ];
        let path = [PlannerKey::Str("x".into()), PlannerKey::Index(0)];
        let bytes = emit_metadata(&entries, |f| (f == "b").then_some(&path[..]));
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(
            bytes.starts_with(b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81")
        );
        assert!(bytes.ends_with(b"ub."));
        assert!(has(b"ctorch\nbfloat16\n"));
        assert!(has(
            b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n)\x81"
        ));
        // The second chunk's 5 GiB offset is a LONG1.
        assert!(has(b"X\x06\x00\x00\x00offset\x8a\x05\x00\x00\x00\x40\x01"));
        // The bytes entry's planner path ('x', 0); the tensor's default ('w',).
        assert!(has(b"X\x01\x00\x00\x00b(X\x01\x00\x00\x00xK\x00t"));
        assert!(has(b"X\x01\x00\x00\x00wX\x01\x00\x00\x00w\x85"));
        assert!(has(b"X\x05\x00\x00\x00indexN"));
    }
}
