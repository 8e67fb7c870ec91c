//! How many worker threads a merge or a watch update uses.
//!
//! Every entry point takes a requested thread count where 0 means "all cores". It is resolved
//! here, once, so `pma merge`, `pma watch` and library callers agree on what 0 means and on the
//! largest count accepted. An absurd count is refused rather than clamped: a typo such as
//! `--threads 80000000` should be an error, not a silent change, and it must never reach a
//! `chunks(threads * k)` whose length overflows to 0.

use crate::error::{Error, Result};

/// The most worker threads accepted. Far above any machine pma runs on, far below the point
/// where per-thread buffers (`threads × jobs × 8 MiB`) or batch arithmetic could overflow.
pub const MAX_THREADS: usize = 4096;

/// Resolves a requested thread count: 0 means all available cores (1 when the OS cannot say);
/// anything above [`MAX_THREADS`] is [`Error::TooManyThreads`].
pub fn resolve_threads(requested: usize) -> Result<usize> {
    match requested {
        0 => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        n if n > MAX_THREADS => Err(Error::TooManyThreads {
            requested: n,
            max: MAX_THREADS,
        }),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_all_cores_and_absurd_counts_are_refused() {
        assert!(resolve_threads(0).unwrap() >= 1);
        assert_eq!(resolve_threads(3).unwrap(), 3);
        assert_eq!(resolve_threads(MAX_THREADS).unwrap(), MAX_THREADS);
        let e = resolve_threads(usize::MAX).unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooManyThreads {
                    requested: usize::MAX,
                    max: MAX_THREADS
                }
            ),
            "{e}"
        );
    }
}
