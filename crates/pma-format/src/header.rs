//! Parsing and validating a safetensors header, in stages, before any tensor byte is touched.
//!
//! A safetensors file is `u64 LE header length | JSON header | data`. The JSON maps tensor names
//! to `{dtype, shape, data_offsets}` (offsets relative to the start of data) plus an optional
//! `__metadata__` string map. Every size in it is untrusted: we bound the header length by both
//! [`MAX_HEADER_BYTES`] and the real file length before allocating, compute `numel × dtype size`
//! with checked arithmetic, and require the offsets to tile the data section exactly (no holes,
//! no overlaps, nothing past the end), as the spec demands. A [`Header`] value is therefore always
//! a valid description of a file of [`Header::file_len`] bytes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use safetensors::Dtype;

use crate::dtype::{dtype_bits, parse_dtype};
use crate::error::{Error, Result};

/// Largest header we accept. The safetensors crate uses the same 100 MB bound; real headers of
/// 100B-parameter shards are a few hundred KB.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor as described by a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (key in the header).
    pub name: String,
    /// Element dtype.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// Start of the tensor's bytes, relative to the data section.
    pub begin: u64,
    /// End (exclusive) of the tensor's bytes, relative to the data section.
    pub end: u64,
}

impl TensorInfo {
    /// Number of bytes.
    pub fn n_bytes(&self) -> u64 {
        self.end - self.begin
    }

    /// Number of elements (checked at construction not to overflow).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` string map (empty if absent).
    pub metadata: BTreeMap<String, String>,
    /// Length of the JSON header (excluding the 8-byte prefix).
    pub header_bytes: u64,
}

impl Header {
    /// Absolute file offset where the data section starts.
    pub fn data_start(&self) -> u64 {
        8 + self.header_bytes
    }

    /// Length of the data section.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.end).max().unwrap_or(0)
    }

    /// The exact length a file with this header must have.
    pub fn file_len(&self) -> u64 {
        self.data_start() + self.data_bytes()
    }

    /// Reads and validates the header of the file at `path`, including its length.
    pub fn read(path: &Path) -> Result<Header> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "reading metadata of", e))?
            .len();
        Header::read_from(path, &mut file, file_len)
    }

    /// Reads and validates a header from `reader`, positioned at the start of a file of
    /// `file_len` bytes. `path` is only used in errors.
    pub fn read_from(path: &Path, reader: &mut impl Read, file_len: u64) -> Result<Header> {
        if file_len < 8 {
            return Err(Error::TooShort {
                path: path.into(),
                n_bytes: file_len,
            });
        }
        let mut prefix = [0u8; 8];
        reader
            .read_exact(&mut prefix)
            .map_err(|e| Error::io(path, "reading header length of", e))?;
        let header_bytes = u64::from_le_bytes(prefix);
        if header_bytes > MAX_HEADER_BYTES {
            return Err(Error::HeaderTooLarge {
                path: path.into(),
                n_bytes: header_bytes,
                max_bytes: MAX_HEADER_BYTES,
            });
        }
        if header_bytes > file_len - 8 {
            return Err(Error::HeaderPastEnd {
                path: path.into(),
                header_bytes,
                file_bytes: file_len,
            });
        }
        // Bounded by both MAX_HEADER_BYTES and the real file length, so never a hostile size.
        let mut json = vec![0u8; header_bytes as usize];
        reader
            .read_exact(&mut json)
            .map_err(|e| Error::io(path, "reading header of", e))?;
        let header = Header::parse(path, &json, header_bytes)?;
        if header.file_len() != file_len {
            return Err(Error::FileLength {
                path: path.into(),
                expected: header.file_len(),
                found: file_len,
            });
        }
        Ok(header)
    }

    /// Parses and validates the JSON part. Checks everything except the file length.
    pub fn parse(path: &Path, json: &[u8], header_bytes: u64) -> Result<Header> {
        let malformed = |reason: String| Error::MalformedHeader {
            path: path.into(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| malformed(e.to_string()))?;
        let serde_json::Value::Object(map) = value else {
            return Err(malformed("top level is not a JSON object".into()));
        };
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(map.len());
        for (name, entry) in map {
            if name == "__metadata__" {
                let serde_json::Value::Object(m) = entry else {
                    return Err(malformed("__metadata__ is not an object".into()));
                };
                for (k, v) in m {
                    let serde_json::Value::String(s) = v else {
                        return Err(malformed(format!(
                            "__metadata__ value '{k}' is not a string"
                        )));
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            tensors.push(parse_tensor(path, name, entry)?);
        }
        check_tiling(path, &mut tensors)?;
        Ok(Header {
            tensors,
            metadata,
            header_bytes,
        })
    }
}

fn parse_tensor(path: &Path, name: String, entry: serde_json::Value) -> Result<TensorInfo> {
    let bad = |reason: &str| Error::MalformedHeader {
        path: path.into(),
        reason: format!("tensor '{name}': {reason}"),
    };
    let serde_json::Value::Object(obj) = &entry else {
        return Err(bad("entry is not an object"));
    };
    let dtype_str = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("missing or non-string 'dtype'"))?;
    let dtype = parse_dtype(dtype_str).ok_or_else(|| Error::UnknownDtype {
        path: path.into(),
        tensor: name.clone(),
        dtype: dtype_str.to_string(),
    })?;
    let shape = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("missing or non-array 'shape'"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| bad("shape has a non-integer or negative dimension"))
        })
        .collect::<Result<Vec<u64>>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("missing or non-array 'data_offsets'"))?;
    let [begin, end] = offsets.as_slice() else {
        return Err(bad("'data_offsets' must have exactly two entries"));
    };
    let (Some(begin), Some(end)) = (begin.as_u64(), end.as_u64()) else {
        return Err(bad("'data_offsets' entries must be non-negative integers"));
    };
    if end < begin {
        return Err(Error::BadOffsets {
            path: path.into(),
            tensor: name,
            begin,
            end,
            reason: "end is before begin",
        });
    }
    let expected_bits = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype_bits(dtype)));
    let expected = match expected_bits {
        Some(bits) if bits % 8 == 0 => Some(bits / 8),
        _ => None,
    };
    if expected != Some(end - begin) {
        return Err(Error::SizeMismatch {
            path: path.into(),
            tensor: name,
            shape,
            dtype,
            expected,
            found: end - begin,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// The spec requires the tensors to cover the data section exactly; sort by offset and check.
fn check_tiling(path: &Path, tensors: &mut [TensorInfo]) -> Result<()> {
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut cursor = 0u64;
    for t in tensors.iter() {
        let reason = if t.begin < cursor {
            "overlaps the previous tensor"
        } else if t.begin > cursor {
            "leaves a hole after the previous tensor"
        } else {
            cursor = t.end;
            continue;
        };
        return Err(Error::BadOffsets {
            path: path.into(),
            tensor: t.name.clone(),
            begin: t.begin,
            end: t.end,
            reason,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Header> {
        Header::parse(
            Path::new("x.safetensors"),
            json.as_bytes(),
            json.len() as u64,
        )
    }

    #[test]
    fn valid_header_is_sorted_by_offset() {
        let h = parse(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "a":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]},
                "__metadata__":{"format":"pt"}}"#,
        )
        .unwrap();
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.data_bytes(), 12);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn size_mismatch() {
        let e = parse(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#).unwrap_err();
        assert!(
            matches!(e, Error::SizeMismatch { ref tensor, found: 8, .. } if tensor == "a"),
            "{e}"
        );
    }

    #[test]
    fn overflowing_shape() {
        let e = parse(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");
    }

    #[test]
    fn overlap_and_hole() {
        let e = parse(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::BadOffsets {
                    reason: "overlaps the previous tensor",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BadOffsets {
                    reason: "leaves a hole after the previous tensor",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_dtype_and_bad_json() {
        let e = parse(r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#).unwrap_err();
        assert!(matches!(e, Error::UnknownDtype { .. }), "{e}");
        let e = parse(r#"{"a":"#).unwrap_err();
        assert!(matches!(e, Error::MalformedHeader { .. }), "{e}");
        let e = parse(r#"[1,2]"#).unwrap_err();
        assert!(matches!(e, Error::MalformedHeader { .. }), "{e}");
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = Header::read_from(Path::new("x"), &mut bytes.as_slice(), bytes.len() as u64)
            .unwrap_err();
        assert!(matches!(e, Error::HeaderTooLarge { .. }), "{e}");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = Header::read_from(Path::new("x"), &mut bytes.as_slice(), bytes.len() as u64)
            .unwrap_err();
        assert!(matches!(e, Error::HeaderPastEnd { .. }), "{e}");
    }
}
