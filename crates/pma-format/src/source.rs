//! Safetensors checkpoints as format-neutral merge inputs: [`TensorStore`] and [`TensorSource`].
//!
//! A merge plans with *logical* tensors (name, dtype, global shape, [`LogicalTensor`]) and reads
//! element bytes through a [`TensorSource`] per member tensor; it never looks at files. A
//! checkpoint format plugs in by implementing [`TensorStore`] (list the logical tensors, hand out
//! a source for each). [`Checkpoint`] implements it for safetensors: a tensor's bytes come
//! straight from the read-only mapping (zero copy) when the requested elements are contiguous in
//! the file, and are gathered row run by row run into the caller's scratch buffer otherwise (an
//! output region that cuts across rows). The mapping's `prefetch`/`release` hints pass through,
//! so the pipeline keeps a cold cache busy and RSS flat.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::dtype::dtype_bits;
use crate::error::{Error, Result};
use crate::file::SafetensorsFile;
use crate::header::TensorInfo;
use crate::region::{Region, TensorSource};
use crate::sidecar_policy::{Sidecar, SidecarKind, SidecarPlan};
use crate::Dtype;

/// A tensor as a merge plans with it: what it is, not where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalTensor {
    /// Name (the key a model loader uses).
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
}

impl LogicalTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of data.
    pub fn n_bytes(&self) -> u64 {
        self.numel() * dtype_bits(self.dtype) / 8
    }
}

/// A checkpoint as a merge member, whatever its format (safetensors today; torch DCP and
/// torch.save are further implementations).
pub trait TensorStore: Send + Sync + std::fmt::Debug {
    /// The path the checkpoint was opened from (named in errors and provenance).
    fn root(&self) -> &Path;

    /// Every logical tensor, in the order reading them is cheapest (physical order).
    fn logical_tensors(&self) -> Vec<LogicalTensor>;

    /// One logical tensor by name.
    fn logical_tensor(&self, name: &str) -> Option<LogicalTensor>;

    /// The file that holds `name` (for error messages; the root when there is no single file).
    fn file_of_tensor(&self, name: &str) -> PathBuf;

    /// The byte source of `name`.
    fn source(&self, name: &str) -> Option<Box<dyn TensorSource + '_>>;

    /// Non-weight files (config, tokenizer, ...) that travel with the model.
    fn sidecars(&self) -> Vec<PathBuf>;

    /// What [`TensorStore::sidecars`] copies, as a plan relative to [`TensorStore::root`] with
    /// what is left behind and why ([`crate::plan_sidecars`]). The default lists
    /// [`TensorStore::sidecars`] and skips nothing; a walk that fails is an error here, where
    /// `sidecars` can only come back empty.
    fn sidecar_plan(&self) -> Result<SidecarPlan> {
        let root = self.root();
        let copy = self
            .sidecars()
            .into_iter()
            .map(|p| Sidecar {
                kind: if p.is_dir() {
                    SidecarKind::Dir
                } else {
                    SidecarKind::File
                },
                path: p
                    .strip_prefix(root)
                    .map_or_else(|_| p.clone(), Path::to_path_buf),
            })
            .collect();
        Ok(SidecarPlan {
            copy,
            skipped: Vec::new(),
        })
    }
}

impl TensorStore for Checkpoint {
    fn root(&self) -> &Path {
        Checkpoint::root(self)
    }

    fn logical_tensors(&self) -> Vec<LogicalTensor> {
        self.tensors().iter().map(logical).collect()
    }

    fn logical_tensor(&self, name: &str) -> Option<LogicalTensor> {
        self.get(name).map(logical)
    }

    fn file_of_tensor(&self, name: &str) -> PathBuf {
        self.get(name)
            .map_or_else(|| self.root().into(), |t| self.file_of(t).path().into())
    }

    fn source(&self, name: &str) -> Option<Box<dyn TensorSource + '_>> {
        let t = self.get(name)?;
        Some(Box::new(SafetensorsTensor::new(self.file_of(t), &t.info)))
    }

    fn sidecars(&self) -> Vec<PathBuf> {
        Checkpoint::sidecars(self)
    }

    fn sidecar_plan(&self) -> Result<SidecarPlan> {
        Checkpoint::sidecar_plan(self)
    }
}

fn logical(t: &TensorRef) -> LogicalTensor {
    LogicalTensor {
        name: t.info.name.clone(),
        dtype: t.info.dtype,
        shape: t.info.shape.clone(),
    }
}

/// One tensor of a mapped safetensors file, as a [`TensorSource`].
#[derive(Debug, Clone, Copy)]
pub struct SafetensorsTensor<'a> {
    file: &'a SafetensorsFile,
    info: &'a TensorInfo,
}

impl<'a> SafetensorsTensor<'a> {
    /// `info` must come from `file`'s header.
    pub fn new(file: &'a SafetensorsFile, info: &'a TensorInfo) -> SafetensorsTensor<'a> {
        SafetensorsTensor { file, info }
    }

    fn elem_bytes(&self) -> u64 {
        dtype_bits(self.info.dtype) / 8
    }

    /// [`TensorSource::read`] of a remote file: one ranged GET (or prefetched download) of the
    /// span the elements cover, gathered row run by row run when they are not contiguous.
    fn read_remote<'s>(
        &'s self,
        region: &Region,
        elems: Range<u64>,
        scratch: &'s mut Vec<u8>,
    ) -> Result<&'s [u8]> {
        let span = self.span(region, &elems);
        let bytes = self.file.read_remote(self.info, span.clone())?;
        scratch.clear();
        if self.contiguous(region, &elems).is_some() {
            scratch.extend_from_slice(&bytes);
            return Ok(scratch.as_slice());
        }
        let sz = self.elem_bytes() as usize;
        let d = self.info.shape.len();
        let row = region.sizes[d - 1];
        scratch.reserve(((elems.end - elems.start) as usize) * sz);
        let mut e = elems.start;
        while e < elems.end {
            let run = (row - e % row).min(elems.end - e);
            let g = global_index(&self.info.shape, region, e) * sz as u64 - span.start;
            let g = g as usize;
            scratch.extend_from_slice(&bytes[g..g + run as usize * sz]);
            e += run;
        }
        Ok(scratch.as_slice())
    }

    /// Checks `elems` of `region` lie inside this tensor.
    fn check(&self, region: &Region, elems: &Range<u64>) -> Result<()> {
        let shape = &self.info.shape;
        let inside = region.offsets.len() == shape.len()
            && region.sizes.len() == shape.len()
            && region
                .offsets
                .iter()
                .zip(&region.sizes)
                .zip(shape)
                .all(|((&o, &s), &n)| o.checked_add(s).is_some_and(|end| end <= n))
            && elems.start <= elems.end
            && elems.end <= region.numel();
        if inside {
            Ok(())
        } else {
            Err(Error::RegionOutOfBounds {
                tensor: self.info.name.clone(),
                shape: shape.clone(),
                region: Box::new(region.clone()),
                elems: elems.clone(),
            })
        }
    }

    /// Byte range within the tensor of `elems` of `region` when they are contiguous there.
    fn contiguous(&self, region: &Region, elems: &Range<u64>) -> Option<Range<u64>> {
        let shape = &self.info.shape;
        // Contiguous when some dimension k has every earlier dimension of size 1 and every later
        // one full: the region is then one run of the row-major tensor.
        let d = shape.len();
        let k = region.sizes.iter().position(|&s| s != 1).unwrap_or(d);
        let tail_full = (k.min(d)..d)
            .skip(1)
            .all(|j| region.offsets[j] == 0 && region.sizes[j] == shape[j]);
        if !tail_full {
            return None;
        }
        let start = linear_index(shape, &region.offsets);
        let sz = self.elem_bytes();
        Some((start + elems.start) * sz..(start + elems.end) * sz)
    }

    /// The byte span (in the tensor) covering `elems` of `region`, for hints.
    fn span(&self, region: &Region, elems: &Range<u64>) -> Range<u64> {
        if elems.is_empty() || self.check(region, elems).is_err() {
            return 0..0;
        }
        if let Some(r) = self.contiguous(region, elems) {
            return r;
        }
        let sz = self.elem_bytes();
        let first = global_index(&self.info.shape, region, elems.start);
        let last = global_index(&self.info.shape, region, elems.end - 1);
        first * sz..(last + 1) * sz
    }
}

/// Row-major linear index of `coords` in `shape`.
fn linear_index(shape: &[u64], coords: &[u64]) -> u64 {
    shape
        .iter()
        .zip(coords)
        .fold(0u64, |acc, (&n, &c)| acc * n + c)
}

/// Global linear index of element `e` (row-major inside `region`).
fn global_index(shape: &[u64], region: &Region, mut e: u64) -> u64 {
    let mut coords = vec![0u64; shape.len()];
    for d in (0..shape.len()).rev() {
        let s = region.sizes[d].max(1);
        coords[d] = region.offsets[d] + e % s;
        e /= s;
    }
    linear_index(shape, &coords)
}

impl TensorSource for SafetensorsTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.info.dtype
    }

    fn shape(&self) -> &[u64] {
        &self.info.shape
    }

    fn read<'s>(
        &'s self,
        region: &Region,
        elems: Range<u64>,
        scratch: &'s mut Vec<u8>,
    ) -> Result<&'s [u8]> {
        self.check(region, &elems)?;
        if elems.is_empty() {
            return Ok(&[]);
        }
        let Some(all) = self.file.mapped_tensor_bytes(self.info) else {
            return self.read_remote(region, elems, scratch);
        };
        if let Some(r) = self.contiguous(region, &elems) {
            return Ok(&all[r.start as usize..r.end as usize]);
        }
        // Gather: one copy per run along the last dimension.
        let sz = self.elem_bytes() as usize;
        let d = self.info.shape.len();
        let row = region.sizes[d - 1];
        scratch.clear();
        scratch.reserve(((elems.end - elems.start) as usize) * sz);
        let mut e = elems.start;
        while e < elems.end {
            let run = (row - e % row).min(elems.end - e);
            let g = global_index(&self.info.shape, region, e) as usize;
            scratch.extend_from_slice(&all[g * sz..(g + run as usize) * sz]);
            e += run;
        }
        Ok(scratch.as_slice())
    }

    fn prefetch(&self, region: &Region, elems: Range<u64>) {
        let span = self.span(region, &elems);
        self.file.prefetch(self.info, span);
    }

    fn release(&self, region: &Region, elems: Range<u64>) {
        let span = self.span(region, &elems);
        self.file.release(self.info, span);
    }

    fn verify(&self) -> Result<()> {
        self.file.check_faults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{write_safetensors, TensorSpec};
    use std::collections::BTreeMap;

    fn one_tensor_file(dir: &Path, shape: &[u64]) -> (SafetensorsFile, Vec<u8>) {
        let n: u64 = shape.iter().product();
        let data: Vec<u8> = (0..n * 2).map(|i| (i % 251) as u8).collect();
        let spec = TensorSpec {
            name: "t".into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
        };
        let path = dir.join("f.safetensors");
        write_safetensors(&path, &[(spec, data.as_slice())], &BTreeMap::new()).unwrap();
        (SafetensorsFile::open(&path).unwrap(), data)
    }

    #[test]
    fn full_region_reads_borrow_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let (f, data) = one_tensor_file(dir.path(), &[3, 5]);
        let src = SafetensorsTensor::new(&f, &f.tensors()[0]);
        let mut scratch = Vec::new();
        let got = src
            .read(&Region::full(&[3, 5]), 4..11, &mut scratch)
            .unwrap();
        assert_eq!(got, &data[8..22]);
        assert!(scratch.is_empty(), "contiguous reads copy nothing");
    }

    #[test]
    fn partial_regions_gather_row_runs() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [4u64, 6];
        let (f, data) = one_tensor_file(dir.path(), &shape);
        let src = SafetensorsTensor::new(&f, &f.tensors()[0]);
        // Rows 1..3, columns 2..5: a box that cuts every row.
        let region = Region {
            offsets: vec![1, 2],
            sizes: vec![2, 3],
        };
        let mut expected = Vec::new();
        for r in 1..3u64 {
            for c in 2..5u64 {
                let g = (r * 6 + c) as usize;
                expected.extend_from_slice(&data[g * 2..g * 2 + 2]);
            }
        }
        let mut scratch = Vec::new();
        for elems in [0..6u64, 1..5, 2..3, 3..6] {
            let got = src.read(&region, elems.clone(), &mut scratch).unwrap();
            let (a, b) = (elems.start as usize * 2, elems.end as usize * 2);
            assert_eq!(got, &expected[a..b], "{elems:?}");
        }
        // A band of whole rows is contiguous again.
        let rows = Region {
            offsets: vec![2, 0],
            sizes: vec![2, 6],
        };
        scratch.clear();
        let got = src.read(&rows, 0..12, &mut scratch).unwrap();
        assert_eq!(got, &data[24..48]);
        assert!(scratch.is_empty());
    }

    #[test]
    fn out_of_bounds_region_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = one_tensor_file(dir.path(), &[2, 2]);
        let src = SafetensorsTensor::new(&f, &f.tensors()[0]);
        let mut scratch = Vec::new();
        let bad = Region {
            offsets: vec![1, 0],
            sizes: vec![2, 2],
        };
        let e = src.read(&bad, 0..1, &mut scratch).unwrap_err();
        assert!(matches!(e, Error::RegionOutOfBounds { .. }), "{e}");
        let e = src
            .read(&Region::full(&[2, 2]), 0..5, &mut scratch)
            .unwrap_err();
        assert!(matches!(e, Error::RegionOutOfBounds { .. }), "{e}");
    }

    #[test]
    fn checkpoint_is_a_tensor_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_, data) = one_tensor_file(dir.path(), &[2, 3]);
        let ckpt = Checkpoint::open(&dir.path().join("f.safetensors")).unwrap();
        let store: &dyn TensorStore = &ckpt;
        let t = store.logical_tensor("t").unwrap();
        assert_eq!(
            (t.dtype, t.shape.clone(), t.n_bytes()),
            (Dtype::BF16, vec![2, 3], 12)
        );
        assert_eq!(store.logical_tensors(), vec![t]);
        let src = store.source("t").unwrap();
        let mut scratch = Vec::new();
        let got = src
            .read(&Region::full(&[2, 3]), 0..6, &mut scratch)
            .unwrap();
        assert_eq!(got, data.as_slice());
        assert!(store.source("missing").is_none());
    }
}
