//! Chunk geometry: a tensor's chunks must tile its global shape exactly.
//!
//! DCP places every chunk by its global offsets (FORMAT.md §6). Before any byte is read we check
//! that each chunk lies inside the shape, that no two chunks overlap, and that their volumes sum
//! to the tensor's element count; together these mean every element is stored exactly once, so
//! a read of any region finds each element in exactly one chunk. The overlap test sweeps along
//! the dimension with the most distinct chunk starts, comparing a chunk only with the chunks
//! still open along that dimension, which keeps the usual layouts (row blocks, column blocks,
//! grids) close to linear in the number of chunks.

use std::path::Path;

use crate::error::{Error, Result};
use crate::region::Region;

/// Whether boxes `a` and `b` (same rank) share an element.
pub(crate) fn overlaps(a: &Region, b: &Region) -> bool {
    a.offsets
        .iter()
        .zip(&a.sizes)
        .zip(b.offsets.iter().zip(&b.sizes))
        .all(|((&ao, &asz), (&bo, &bsz))| ao < bo + bsz && bo < ao + asz)
}

/// The intersection of two boxes of the same rank, if not empty.
pub(crate) fn intersect(a: &Region, b: &Region) -> Option<Region> {
    let mut out = Region {
        offsets: Vec::with_capacity(a.offsets.len()),
        sizes: Vec::with_capacity(a.offsets.len()),
    };
    for d in 0..a.offsets.len() {
        let lo = a.offsets[d].max(b.offsets[d]);
        let hi = (a.offsets[d] + a.sizes[d]).min(b.offsets[d] + b.sizes[d]);
        if hi <= lo {
            return None;
        }
        out.offsets.push(lo);
        out.sizes.push(hi - lo);
    }
    Some(out)
}

/// Whether `outer` contains all of `inner`.
pub(crate) fn contains(outer: &Region, inner: &Region) -> bool {
    (0..outer.offsets.len()).all(|d| {
        inner.offsets[d] >= outer.offsets[d]
            && inner.offsets[d] + inner.sizes[d] <= outer.offsets[d] + outer.sizes[d]
    })
}

/// Checks that `chunks` tile a tensor of `shape` exactly: in bounds, no overlaps, no holes.
/// `path` and `tensor` only name the culprit in errors.
pub(crate) fn check_coverage(
    path: &Path,
    tensor: &str,
    shape: &[u64],
    chunks: &[Region],
) -> Result<()> {
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::DcpMetadata {
            path: path.into(),
            at: format!("tensor '{tensor}'"),
            reason: format!("shape {shape:?} overflows"),
        })?;
    let mut covered = 0u64;
    for c in chunks {
        let inside = c.offsets.len() == shape.len()
            && c.sizes.len() == shape.len()
            && (0..shape.len()).all(|d| {
                c.offsets[d]
                    .checked_add(c.sizes[d])
                    .is_some_and(|end| end <= shape[d])
            });
        if !inside {
            return Err(Error::ChunkOutOfBounds {
                path: path.into(),
                tensor: tensor.into(),
                offsets: c.offsets.clone(),
                sizes: c.sizes.clone(),
                shape: shape.to_vec(),
            });
        }
        // In bounds, so the volume is at most numel and cannot overflow.
        covered = covered.saturating_add(c.numel());
    }
    if let Some((a, b)) = find_overlap(chunks) {
        return Err(Error::ChunkOverlap {
            path: path.into(),
            tensor: tensor.into(),
            first: chunks[a].offsets.clone(),
            second: chunks[b].offsets.clone(),
        });
    }
    if covered != numel {
        return Err(Error::ChunkHole {
            path: path.into(),
            tensor: tensor.into(),
            covered,
            numel,
        });
    }
    Ok(())
}

/// Indices of two overlapping chunks, if any. All chunks have the same rank.
fn find_overlap(chunks: &[Region]) -> Option<(usize, usize)> {
    let first = chunks.first()?;
    let ndim = first.offsets.len();
    if ndim == 0 {
        // Two 0-dim chunks are the same element.
        return (chunks.len() > 1).then_some((0, 1));
    }
    let sweep = (0..ndim)
        .max_by_key(|&d| {
            let mut starts: Vec<u64> = chunks.iter().map(|c| c.offsets[d]).collect();
            starts.sort_unstable();
            starts.dedup();
            starts.len()
        })
        .unwrap_or(0);
    let mut order: Vec<usize> = (0..chunks.len())
        .filter(|&i| chunks[i].numel() > 0)
        .collect();
    order.sort_by_key(|&i| chunks[i].offsets[sweep]);
    let mut open: Vec<usize> = Vec::new();
    for &i in &order {
        let start = chunks[i].offsets[sweep];
        open.retain(|&j| chunks[j].offsets[sweep] + chunks[j].sizes[sweep] > start);
        if let Some(&j) = open.iter().find(|&&j| overlaps(&chunks[i], &chunks[j])) {
            return Some((j, i));
        }
        open.push(i);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offsets: &[u64], sizes: &[u64]) -> Region {
        Region {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        }
    }

    #[test]
    fn exact_tilings_pass() {
        let p = Path::new("x");
        let rows = [
            r(&[0, 0], &[13, 4]),
            r(&[13, 0], &[13, 4]),
            r(&[26, 0], &[24, 4]),
        ];
        check_coverage(p, "t", &[50, 4], &rows).unwrap();
        let grid = [
            r(&[0, 0], &[2, 3]),
            r(&[0, 3], &[2, 1]),
            r(&[2, 0], &[1, 3]),
            r(&[2, 3], &[1, 1]),
        ];
        check_coverage(p, "t", &[3, 4], &grid).unwrap();
        check_coverage(p, "t", &[], &[r(&[], &[])]).unwrap();
    }

    #[test]
    fn overlaps_holes_and_strays_are_named() {
        let p = Path::new("x");
        let e = check_coverage(p, "t", &[4, 4], &[r(&[0, 0], &[3, 4]), r(&[2, 0], &[2, 4])]);
        assert!(matches!(e, Err(Error::ChunkOverlap { .. })), "{e:?}");
        let e = check_coverage(p, "t", &[4, 4], &[r(&[0, 0], &[2, 4]), r(&[3, 0], &[1, 4])]);
        assert!(
            matches!(
                e,
                Err(Error::ChunkHole {
                    covered: 12,
                    numel: 16,
                    ..
                })
            ),
            "{e:?}"
        );
        let e = check_coverage(p, "t", &[4, 4], &[r(&[0, 0], &[5, 4])]);
        assert!(matches!(e, Err(Error::ChunkOutOfBounds { .. })), "{e:?}");
        let e = check_coverage(p, "t", &[4], &[r(&[u64::MAX], &[2])]);
        assert!(matches!(e, Err(Error::ChunkOutOfBounds { .. })), "{e:?}");
        let e = check_coverage(p, "t", &[], &[r(&[], &[]), r(&[], &[])]);
        assert!(matches!(e, Err(Error::ChunkOverlap { .. })), "{e:?}");
        // Same volume as the tensor, but one overlap hides a hole: the overlap is reported.
        let e = check_coverage(
            p,
            "t",
            &[2, 2],
            &[
                r(&[0, 0], &[1, 2]),
                r(&[0, 1], &[2, 1]),
                r(&[1, 1], &[1, 1]),
            ],
        );
        assert!(matches!(e, Err(Error::ChunkOverlap { .. })), "{e:?}");
    }
}
