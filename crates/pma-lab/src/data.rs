//! Corpora, the byte-level tokenizer, the train/validation split and window sampling.
//!
//! The default corpus is *Moby-Dick*, embedded in the binary (see `data/README.md` at the repo
//! root), so training needs no download. Tokens are bytes: token id = byte value (0–255), with no
//! BOS or other specials, so any script can reproduce an eval number from the raw file.
//!
//! The split is deterministic: the last [`VALIDATION_FRACTION`] of the token stream is the
//! validation set, the rest is for training. Training windows of `seq_len + 1` tokens start at
//! positions drawn from a seeded [`Rng`]; the generator's state and the number of windows drawn
//! are the data cursor saved in each checkpoint.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Herman Melville, *Moby-Dick* (1851), public domain; PDDL-1.0 / CC0-1.0 packaging.
pub static MOBY_DICK: &[u8] = include_bytes!("../../../data/moby-dick.txt");

/// The fraction of the stream, at its end, held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.05;

/// Vocabulary size of the byte tokenizer.
pub const BYTE_VOCAB_SIZE: usize = 256;

/// Where text comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// The embedded *Moby-Dick*.
    #[default]
    Embedded,
    /// The concatenation of these files, in order.
    Files(Vec<PathBuf>),
}

/// The most text a [`DataSource`] loads, over all its files: 256 MiB.
///
/// Training holds the text as u32 tokens plus its split, about 9 bytes of memory per byte of
/// text (2.3 GiB at the cap), which is already more than this lab's small models need. A larger
/// or endless file (a device, a FIFO) is refused rather than read until memory runs out.
pub const MAX_DATA_BYTES: u64 = 256 << 20;

impl DataSource {
    /// The raw bytes, at most [`MAX_DATA_BYTES`] of them.
    pub fn load(&self) -> Result<Vec<u8>> {
        self.load_capped(MAX_DATA_BYTES)
    }

    /// The raw bytes, failing with [`Error::DataTooLarge`] past `max_bytes`.
    fn load_capped(&self, max_bytes: u64) -> Result<Vec<u8>> {
        match self {
            DataSource::Embedded => Ok(MOBY_DICK.to_vec()),
            DataSource::Files(paths) => {
                let too_large = |path: &std::path::Path| Error::DataTooLarge {
                    path: path.into(),
                    max_bytes,
                };
                // Sizes first, so an oversized set of files is refused before any is read.
                let mut total = 0u64;
                for p in paths {
                    let meta = std::fs::metadata(p).map_err(|e| Error::io(p, "reading", e))?;
                    total = total
                        .checked_add(meta.len())
                        .filter(|&t| t <= max_bytes)
                        .ok_or_else(|| too_large(p))?;
                }
                // Then reads bounded by what is left, since a file can grow, and a device or
                // FIFO reports no size at all.
                let mut out = Vec::with_capacity(total as usize);
                for p in paths {
                    let left = max_bytes - out.len() as u64;
                    let file = std::fs::File::open(p).map_err(|e| Error::io(p, "reading", e))?;
                    std::io::Read::read_to_end(&mut std::io::Read::take(file, left + 1), &mut out)
                        .map_err(|e| Error::io(p, "reading", e))?;
                    if out.len() as u64 > max_bytes {
                        return Err(too_large(p));
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Byte-level tokenization: token id = byte value.
pub fn encode_bytes(text: &[u8]) -> Vec<u32> {
    text.iter().map(|&b| u32::from(b)).collect()
}

/// A token stream cut into training and validation parts.
#[derive(Debug, Clone)]
pub struct Split {
    /// The first 95%.
    pub train: Vec<u32>,
    /// The last 5%.
    pub validation: Vec<u32>,
}

/// Splits `tokens` at `len - round(len * VALIDATION_FRACTION)`.
pub fn split_tokens(tokens: &[u32]) -> Split {
    let n_val = (tokens.len() as f64 * VALIDATION_FRACTION).round() as usize;
    let cut = tokens.len() - n_val.min(tokens.len());
    Split {
        train: tokens[..cut].to_vec(),
        validation: tokens[cut..].to_vec(),
    }
}

/// Draws training batches of random windows from a token stream.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    rng: Rng,
    windows_drawn: u64,
}

/// The saved position of a [`WindowSampler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// The RNG state, as 16 hex digits (JSON numbers lose bits past 2^53).
    #[serde(with = "hex_u64")]
    pub rng_state: u64,
    /// Windows drawn so far.
    pub windows_drawn: u64,
}

impl WindowSampler {
    /// A sampler seeded with `seed`.
    pub fn new(seed: u64) -> WindowSampler {
        WindowSampler {
            rng: Rng::new(seed),
            windows_drawn: 0,
        }
    }

    /// Restores a saved cursor.
    pub fn from_cursor(c: DataCursor) -> WindowSampler {
        WindowSampler {
            rng: Rng::from_state(c.rng_state),
            windows_drawn: c.windows_drawn,
        }
    }

    /// The current cursor.
    pub fn cursor(&self) -> DataCursor {
        DataCursor {
            rng_state: self.rng.state(),
            windows_drawn: self.windows_drawn,
        }
    }

    /// `batch_size` windows of `seq_len + 1` tokens: returns (inputs, targets), each
    /// `batch_size * seq_len` tokens row-major, targets shifted by one.
    pub fn next_batch(
        &mut self,
        tokens: &[u32],
        batch_size: usize,
        seq_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let window = seq_len + 1;
        if tokens.len() < window {
            return Err(Error::CorpusTooSmall {
                what: "train split",
                n_tokens: tokens.len(),
                window_tokens: window,
            });
        }
        let n_starts = (tokens.len() - window + 1) as u64;
        let mut inputs = Vec::with_capacity(batch_size * seq_len);
        let mut targets = Vec::with_capacity(batch_size * seq_len);
        for _ in 0..batch_size {
            let start = self.rng.below(n_starts) as usize;
            inputs.extend_from_slice(&tokens[start..start + seq_len]);
            targets.extend_from_slice(&tokens[start + 1..start + window]);
            self.windows_drawn += 1;
        }
        Ok((inputs, targets))
    }
}

/// Consecutive non-overlapping windows of `seq_len` tokens; the last partial window is dropped.
pub fn eval_windows(tokens: &[u32], seq_len: usize) -> impl Iterator<Item = &[u32]> {
    tokens.chunks_exact(seq_len.max(1))
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpus_is_moby_dick() {
        assert_eq!(MOBY_DICK.len(), 1_204_997);
        let text = std::str::from_utf8(MOBY_DICK).unwrap();
        assert!(text.contains("Call me Ishmael."));
    }

    #[test]
    fn split_holds_out_the_last_five_percent() {
        let tokens: Vec<u32> = (0..1000).collect();
        let s = split_tokens(&tokens);
        assert_eq!(s.train.len(), 950);
        assert_eq!(s.validation[0], 950);
        assert_eq!(*s.validation.last().unwrap(), 999);
    }

    #[test]
    fn sampler_is_seeded_and_resumable() {
        let tokens: Vec<u32> = (0..500).collect();
        let mut a = WindowSampler::new(3);
        let (x, y) = a.next_batch(&tokens, 4, 16).unwrap();
        assert_eq!(x.len(), 64);
        for (xi, yi) in x.iter().zip(&y) {
            assert_eq!(xi + 1, *yi);
        }
        let cursor = a.cursor();
        assert_eq!(cursor.windows_drawn, 4);
        let json = serde_json::to_string(&cursor).unwrap();
        let mut b = WindowSampler::from_cursor(serde_json::from_str(&json).unwrap());
        assert_eq!(
            a.next_batch(&tokens, 4, 16).unwrap(),
            b.next_batch(&tokens, 4, 16).unwrap()
        );
        let mut c = WindowSampler::new(3);
        assert_eq!(c.next_batch(&tokens, 4, 16).unwrap().0, x);
    }

    /// Regression (issue 11): `--data` was read whole, whatever its size.
    #[test]
    fn data_larger_than_the_cap_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.txt");
        std::fs::write(&small, b"0123456789").unwrap();
        // Sparse: no disk space used, and never read.
        let huge = dir.path().join("huge.txt");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_DATA_BYTES + 1).unwrap();
        let src = DataSource::Files(vec![small.clone(), huge.clone()]);
        match src.load() {
            Err(Error::DataTooLarge { path, max_bytes }) => {
                assert_eq!(path, huge);
                assert_eq!(max_bytes, MAX_DATA_BYTES);
            }
            other => panic!("expected DataTooLarge, got {other:?}"),
        }
        let two = DataSource::Files(vec![small.clone(), small.clone()]);
        assert_eq!(two.load_capped(20).unwrap().len(), 20);
        assert!(matches!(
            two.load_capped(19),
            Err(Error::DataTooLarge { max_bytes: 19, .. })
        ));
    }

    /// A file that reports no size (a device) is still bounded by the cap.
    #[cfg(unix)]
    #[test]
    fn endless_data_is_refused_at_the_cap() {
        let src = DataSource::Files(vec!["/dev/zero".into()]);
        assert!(matches!(
            src.load_capped(4096),
            Err(Error::DataTooLarge {
                max_bytes: 4096,
                ..
            })
        ));
    }

    #[test]
    fn eval_windows_drop_the_partial_tail() {
        let tokens: Vec<u32> = (0..10).collect();
        let w: Vec<&[u32]> = eval_windows(&tokens, 4).collect();
        assert_eq!(w.len(), 2);
        assert_eq!(w[1], &[4, 5, 6, 7]);
    }
}
