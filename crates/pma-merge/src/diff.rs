//! `pma diff`: how far apart two checkpoints are, tensor by tensor and in total.
//!
//! Users plot these along a run to see how fast weights move, and to pick a merge interval V.
//! The relative L2 distance is ‖a − b‖₂ / ‖a‖₂ and the cosine similarity a·b / (‖a‖₂‖b‖₂),
//! both accumulated in f64 over float tensors matched by name.

use std::path::{Path, PathBuf};

use pma_format::dtype::{classify, for_each_f64};
use pma_format::{Checkpoint, DtypeClass};
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

/// Compares checkpoints `a` and `b`.
pub fn diff(a: &Path, b: &Path) -> Result<DiffReport> {
    let ca = Checkpoint::open(a)?;
    let cb = Checkpoint::open(b)?;
    let only_in_a = ca
        .tensors()
        .iter()
        .filter(|t| cb.get(&t.info.name).is_none())
        .map(|t| t.info.name.clone())
        .collect();
    let only_in_b = cb
        .tensors()
        .iter()
        .filter(|t| ca.get(&t.info.name).is_none())
        .map(|t| t.info.name.clone())
        .collect();
    let outcomes: Vec<(String, Outcome)> = ca
        .tensors()
        .par_iter()
        .filter_map(|ta| cb.get(&ta.info.name).map(|tb| (ta, tb)))
        .map(|(ta, tb)| {
            let name = ta.info.name.clone();
            if ta.info.shape != tb.info.shape {
                return (name, Outcome::ShapeMismatch);
            }
            match (classify(ta.info.dtype), classify(tb.info.dtype)) {
                (DtypeClass::Float(da), DtypeClass::Float(db)) => {
                    // Stream A in blocks and read the matching elements of B.
                    let bytes_b = cb.bytes(tb);
                    let mut sums = Sums::default();
                    let mut offset = 0usize;
                    for_each_block(&ca, ta, da.size_bytes() as u64, |block| {
                        let n = block.len() / da.size_bytes();
                        let mut xb = vec![0.0f64; n];
                        for_each_f64(
                            db,
                            &bytes_b[offset * db.size_bytes()..(offset + n) * db.size_bytes()],
                            |i, v| xb[i] = v,
                        );
                        for_each_f64(da, block, |i, x| {
                            let y = xb[i];
                            sums.aa += x * x;
                            sums.bb += y * y;
                            sums.ab += x * y;
                            sums.dd += (x - y) * (x - y);
                        });
                        cb.file_of(tb).release(
                            &tb.info,
                            (offset * db.size_bytes()) as u64
                                ..((offset + n) * db.size_bytes()) as u64,
                        );
                        offset += n;
                    });
                    (name, Outcome::Float(sums))
                }
                _ => (
                    name,
                    Outcome::NonFloat(
                        ta.info.dtype == tb.info.dtype && ca.bytes(ta) == cb.bytes(tb),
                    ),
                ),
            }
        })
        .collect();
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
    // A file truncated under us read as zeros (SIGBUS guard): report it, not the distances.
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
