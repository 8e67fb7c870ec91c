//! Where a merge reads from and writes to, independent of the file format.
//!
//! Every format pma reads (safetensors, torch DCP, torch.save) ends up as *logical* tensors: a
//! name, a dtype and a global shape, with the element bytes somewhere on disk, possibly split
//! into chunks that each member of a run lays out differently (a run re-sharded from 2 to 4
//! ranks). The merge pipeline never sees those layouts. It asks a [`TensorSource`] for the
//! little-endian bytes of a row-major run of elements of a [`Region`] (a box of the global
//! tensor), and gets them either straight from a mapping (zero copy) or gathered into a
//! scratch buffer.
//!
//! Output jobs are cut along the same boxes: an HF output writes each tensor as one region that
//! covers it all; a DCP output writes one region per chunk of the newest member's layout. The
//! element order inside a region is always row-major over the region's own sizes, so a job's
//! bytes are exactly what the output format stores for that range.

use std::ops::Range;

use crate::error::Result;
use crate::Dtype;

/// A box of a tensor in global coordinates: `[offsets[d], offsets[d] + sizes[d])` in every
/// dimension `d`. A 0-dim tensor has one region with empty `offsets` and `sizes`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Region {
    /// First index in each dimension.
    pub offsets: Vec<u64>,
    /// Extent in each dimension.
    pub sizes: Vec<u64>,
}

impl Region {
    /// The region covering a whole tensor of `shape`.
    pub fn full(shape: &[u64]) -> Region {
        Region {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }

    /// Elements in the region (1 for a 0-dim region). The caller has validated the sizes, so
    /// the product does not overflow.
    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }

    /// Whether this region is the whole of a tensor of `shape`.
    pub fn is_full(&self, shape: &[u64]) -> bool {
        self.sizes == shape && self.offsets.iter().all(|&o| o == 0)
    }
}

/// One member's view of one logical tensor, whatever the format and chunk layout behind it.
///
/// Implementations must be cheap to call from many threads at once: the pipeline reads
/// different element ranges of the same source in parallel.
pub trait TensorSource: Send + Sync {
    /// The stored dtype.
    fn dtype(&self) -> Dtype;

    /// The global shape.
    fn shape(&self) -> &[u64];

    /// The little-endian bytes of elements `elems` (row-major indices inside `region`) of this
    /// tensor, in that order. Returns a borrow of the source itself when the bytes are stored
    /// contiguously, otherwise gathers them into `scratch` (resized as needed) and returns it.
    /// The returned slice may be unaligned.
    fn read<'a>(
        &'a self,
        region: &Region,
        elems: Range<u64>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]>;

    /// A hint that `elems` of `region` will be read soon (start the disk or the network now).
    fn prefetch(&self, _region: &Region, _elems: Range<u64>) {}

    /// A hint that `elems` of `region` will not be read again (drop them from our RSS).
    fn release(&self, _region: &Region, _elems: Range<u64>) {}

    /// Confirms that the bytes earlier [`read`](TensorSource::read)s returned were real: a
    /// source backed by a mapping reports a file truncated under it (whose pages then read as
    /// zeros instead of killing the process with SIGBUS). Call it after using the bytes and
    /// before they can reach an output.
    fn verify(&self) -> Result<()> {
        Ok(())
    }
}

/// A shared source reads as the source itself (DCP and torch.save tensors hand out
/// `Arc<ChunkedTensor>`s that outlive their checkpoint handle).
impl<T: TensorSource + ?Sized> TensorSource for std::sync::Arc<T> {
    fn dtype(&self) -> Dtype {
        (**self).dtype()
    }

    fn shape(&self) -> &[u64] {
        (**self).shape()
    }

    fn read<'a>(
        &'a self,
        region: &Region,
        elems: Range<u64>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        (**self).read(region, elems, scratch)
    }

    fn prefetch(&self, region: &Region, elems: Range<u64>) {
        (**self).prefetch(region, elems)
    }

    fn release(&self, region: &Region, elems: Range<u64>) {
        (**self).release(region, elems)
    }

    fn verify(&self) -> Result<()> {
        (**self).verify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_region_covers_the_tensor() {
        let r = Region::full(&[3, 4]);
        assert_eq!(r.numel(), 12);
        assert!(r.is_full(&[3, 4]));
        assert!(!r.is_full(&[3, 5]));
        let scalar = Region::full(&[]);
        assert_eq!(scalar.numel(), 1);
        assert!(scalar.is_full(&[]));
    }
}
