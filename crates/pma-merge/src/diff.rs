//! `pma diff`: how far apart two checkpoints are, tensor by tensor and in total.
//!
//! Users plot these along a run to see how fast weights move, and to pick a merge interval V.
//! The relative L2 distance is ‖a − b‖₂ / ‖a‖₂ and the cosine similarity a·b / (‖a‖₂‖b‖₂),
//! both accumulated in f64 over float tensors matched by name.
//!
//! The two checkpoints may be in any formats, even different ones (a DCP step against its HF
//! export): both are read through [`pma_format::TensorSource`]s in global coordinates, A streamed in
//! bounded blocks and B read element range by element range alongside.

use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, for_each_f64};
use pma_format::{AnyCheckpoint, DtypeClass, LogicalTensor, Region, TensorStore};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::inspect::for_each_block;

/// Distance between one tensor in two checkpoints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorDiff {
    /// Tensor name.
    pub name: String,
    /// ‖a − b‖ / ‖a‖ (∞ when a is zero and b is not, 0 when both are zero).
    pub rel_l2: f64,
    /// a·b / (‖a‖‖b‖) (1 when both are zero).
    pub cosine: f64,
    /// ‖a‖.
    pub norm_a: f64,
    /// ‖b‖.
    pub norm_b: f64,
}

/// The report of `pma diff`.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    /// First checkpoint.
    pub a: PathBuf,
    /// Second checkpoint.
    pub b: PathBuf,
    /// Per float tensor, in A's order.
    pub tensors: Vec<TensorDiff>,
    /// Over all compared tensors as one vector.
    pub total: TensorDiff,
    /// Names only in A.
    pub only_in_a: Vec<String>,
    /// Names only in B.
    pub only_in_b: Vec<String>,
    /// Names whose shapes differ (not compared).
    pub shape_mismatch: Vec<String>,
    /// Non-float tensors and whether they are bit-identical.
    pub non_float: Vec<(String, bool)>,
}

#[derive(Default, Clone, Copy)]
struct Sums {
    aa: f64,
    bb: f64,
    ab: f64,
    dd: f64,
}

impl Sums {
    fn add(self, o: Sums) -> Sums {
        Sums {
            aa: self.aa + o.aa,
            bb: self.bb + o.bb,
            ab: self.ab + o.ab,
            dd: self.dd + o.dd,
        }
    }

    fn finish(self, name: String) -> TensorDiff {
        let (na, nb) = (self.aa.sqrt(), self.bb.sqrt());
        let rel_l2 = if na > 0.0 {
            self.dd.sqrt() / na
        } else if self.dd > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        let cosine = if na > 0.0 && nb > 0.0 {
            self.ab / (na * nb)
        } else if na == 0.0 && nb == 0.0 {
            1.0
        } else {
            0.0
        };
        TensorDiff {
            name,
            rel_l2,
            cosine,
            norm_a: na,
            norm_b: nb,
        }
    }
}

enum Outcome {
    Float(Sums),
    NonFloat(bool),
    ShapeMismatch,
}

/// Compares checkpoints `a` and `b` (any formats).
pub fn diff(a: &Path, b: &Path) -> Result<DiffReport> {
    let ca = AnyCheckpoint::open(a)?;
    let cb = AnyCheckpoint::open(b)?;
    let (ta_all, tb_all) = (ca.logical_tensors(), cb.logical_tensors());
    let only_in_a = ta_all
        .iter()
        .filter(|t| cb.logical_tensor(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let only_in_b = tb_all
        .iter()
        .filter(|t| ca.logical_tensor(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    let outcomes: Vec<(String, Outcome)> = ta_all
        .par_iter()
        .filter_map(|ta| cb.logical_tensor(&ta.name).map(|tb| (ta, tb)))
        .map(|(ta, tb)| Ok((ta.name.clone(), compare(&ca, &cb, ta, &tb)?)))
        .collect::<Result<_>>()?;
    let mut total = Sums::default();
    let mut tensors = Vec::new();
    let mut shape_mismatch = Vec::new();
    let mut non_float = Vec::new();
    for (name, outcome) in outcomes {
        match outcome {
            Outcome::Float(s) => {
                total = total.add(s);
                tensors.push(s.finish(name));
            }
            Outcome::NonFloat(same) => non_float.push((name, same)),
            Outcome::ShapeMismatch => shape_mismatch.push(name),
        }
    }
    // A file truncated under us read as zeros (SIGBUS guard): report it, not the distances
    // (each source verified itself too; this covers every file).
    ca.check_faults()?;
    cb.check_faults()?;
    Ok(DiffReport {
        a: a.into(),
        b: b.into(),
        tensors,
        total: total.finish("total".into()),
        only_in_a,
        only_in_b,
        shape_mismatch,
        non_float,
    })
}

/// One tensor in both checkpoints: distances for floats, bit equality otherwise.
fn compare(
    ca: &AnyCheckpoint,
    cb: &AnyCheckpoint,
    ta: &LogicalTensor,
    tb: &LogicalTensor,
) -> Result<Outcome> {
    if ta.shape != tb.shape {
        return Ok(Outcome::ShapeMismatch);
    }
    let sa = ca.source(&ta.name).expect("a listed tensor has a source");
    let sb = cb.source(&tb.name).expect("a listed tensor has a source");
    let region = Region::full(&ta.shape);
    let mut scratch = Vec::new();
    let outcome = match (classify(ta.dtype), classify(tb.dtype)) {
        (DtypeClass::Float(da), DtypeClass::Float(db)) => {
            // Stream A in blocks and read the same elements of B.
            let mut sums = Sums::default();
            let mut xb = Vec::new();
            for_each_block(sa.as_ref(), |elems, block| {
                let bytes_b = sb.read(&region, elems.clone(), &mut scratch)?;
                xb.clear();
                for_each_f64(db, bytes_b, |_, v| xb.push(v));
                for_each_f64(da, block, |i, x| {
                    let y = xb[i];
                    sums.aa += x * x;
                    sums.bb += y * y;
                    sums.ab += x * y;
                    sums.dd += (x - y) * (x - y);
                });
                sb.release(&region, elems);
                Ok(())
            })?;
            Outcome::Float(sums)
        }
        _ if ta.dtype != tb.dtype => Outcome::NonFloat(false),
        _ => {
            let mut same = true;
            for_each_block(sa.as_ref(), |elems, block| {
                same &= sb.read(&region, elems.clone(), &mut scratch)? == block;
                sb.release(&region, elems);
                Ok(())
            })?;
            Outcome::NonFloat(same)
        }
    };
    sb.verify()?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pma_format::TensorSpec;

    use crate::keys::dcp_fixture as fixture;

    /// A DCP member (4 ranks, chunked) against a safetensors file of its own gathered tensors:
    /// every tensor is compared in global coordinates, so the distance is exactly zero.
    #[test]
    fn dcp_member_equals_its_safetensors_export() {
        let dcp_path = fixture("run-resharded/step-0000300");
        let ckpt = AnyCheckpoint::open(&dcp_path).unwrap();
        let mut data = Vec::new();
        for t in ckpt.logical_tensors() {
            let src = ckpt.source(&t.name).unwrap();
            let region = Region::full(&t.shape);
            let mut scratch = Vec::new();
            let bytes = src
                .read(&region, 0..t.numel(), &mut scratch)
                .unwrap()
                .to_vec();
            let spec = TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            };
            data.push((spec, bytes));
        }
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("export.safetensors");
        let specs: Vec<(TensorSpec, &[u8])> = data
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        pma_format::write_safetensors(&st, &specs, &Default::default()).unwrap();
        let r = diff(&dcp_path, &st).unwrap();
        assert!(!r.tensors.is_empty());
        for t in r.tensors.iter().chain([&r.total]) {
            // rel_l2 is exact (every difference is 0); the cosine's square roots round.
            assert_eq!(t.rel_l2, 0.0, "{}", t.name);
            assert!((t.cosine - 1.0).abs() < 1e-12, "{} {}", t.name, t.cosine);
        }
        assert!(r.non_float.iter().all(|(_, same)| *same));
        assert!(r.only_in_a.is_empty() && r.only_in_b.is_empty());
        // Against an earlier step laid out on 2 ranks, the weights differ.
        let r = diff(&fixture("run-resharded/step-0000100"), &dcp_path).unwrap();
        assert!(r.total.rel_l2 > 0.0 && r.total.cosine < 1.0);
        assert!(r.shape_mismatch.is_empty());
    }
}
