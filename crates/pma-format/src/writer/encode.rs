//! The safetensors header a writer puts first: tensor specs and their JSON encoding.

use safetensors::Dtype;

use crate::dtype::{dtype_bits, dtype_name};

/// One tensor to be written: name, dtype, shape. Its byte size follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Bytes of data.
    pub fn n_bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * dtype_bits(self.dtype) / 8
    }
}

/// The serialized header (with its 8-byte length prefix) for tensors written in the given order.
pub fn encode_header(
    tensors: &[TensorSpec],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    // Written by hand rather than through serde_json::Map so the key order is the data order.
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("a string map always serializes"));
    }
    let mut offset = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        let end = offset + t.n_bytes();
        json.push_str(&serde_json::to_string(&t.name).expect("a string always serializes"));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
            dtype_name(t.dtype),
            t.shape,
            offset,
            end
        ));
        offset = end;
    }
    json.push('}');
    // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::SafetensorsFile;
    use crate::writer::write_safetensors;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        #[test]
        fn header_roundtrip(
            shapes in proptest::collection::vec(proptest::collection::vec(0u64..5, 0..3), 0..6),
            meta in proptest::collection::btree_map("[a-z\"\\\\]{1,5}", "[ -~]{0,8}", 0..3),
        ) {
            let specs: Vec<TensorSpec> = shapes.iter().enumerate().map(|(i, s)| TensorSpec {
                name: format!("t.{i}\"x"), dtype: if i % 2 == 0 { Dtype::BF16 } else { Dtype::F32 },
                shape: s.clone(),
            }).collect();
            let datas: Vec<Vec<u8>> = specs.iter().map(|s| (0..s.n_bytes()).map(|b| b as u8).collect()).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.safetensors");
            let pairs: Vec<(TensorSpec, &[u8])> = specs.iter().cloned().zip(datas.iter().map(|d| d.as_slice())).collect();
            write_safetensors(&path, &pairs, &meta).unwrap();
            let f = SafetensorsFile::open(&path).unwrap();
            prop_assert_eq!(&f.header().metadata, &meta);
            prop_assert_eq!(f.header().data_start() % 8, 0);
            let by_name: BTreeMap<_, _> = f.tensors().iter().map(|t| (t.name.clone(), t.clone())).collect();
            for (s, d) in specs.iter().zip(&datas) {
                let t = &by_name[&s.name];
                prop_assert_eq!(&t.shape, &s.shape);
                prop_assert_eq!(f.tensor_bytes(t), d.as_slice());
            }
        }
    }
}
