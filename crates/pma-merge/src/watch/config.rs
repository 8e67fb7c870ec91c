//! What a watcher computes and how it runs: [`WatchConfig`] and its [`Averaging`] mode.

use std::path::PathBuf;
use std::time::Duration;

use pma_format::FloatDtype;
use serde::Serialize;

use super::STATE_DIR_NAME;
use crate::error::{Error, Result};
use crate::plan::DEFAULT_MAX_SHARD_BYTES;
use crate::weights::WeightSpec;

/// The longest poll interval or settle time accepted: a day. Longer values are almost surely a
/// unit mistake, and far longer ones overflow `Instant + Duration`.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What the watcher computes. Only `Window` is a weighting of N checkpoints (a [`WeightSpec`]);
/// the other two are running states updated once per checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Averaging {
    /// A fresh merge of the window at every update, exactly as `pma merge` would.
    Window {
        /// Weighting (serialized as `method`, the name the state fingerprint has always used).
        method: WeightSpec,
        /// Window size N. Required: without it every checkpoint would stay pinned forever.
        last: Option<usize>,
        /// Members V steps apart, counting back from the newest.
        every: Option<u64>,
        /// Merge once this many members exist (default: N, a full window).
        min: Option<usize>,
    },
    /// SMA over the last N by a running f64 sum: each update reads the new checkpoint, the one
    /// leaving the window and the sum.
    IncrementalSma {
        /// Window size N (`None`: every checkpoint so far, keeping no pins).
        last: Option<usize>,
        /// Write outputs once this many members exist (default: N).
        min: Option<usize>,
    },
    /// EMA over the whole history: `E = (1−α)·E + α·x` once per checkpoint.
    EmaStream {
        /// Weight of each new checkpoint.
        alpha: f64,
        /// Dtype of the kept state, F32 or F64.
        #[serde(serialize_with = "ser_dtype")]
        state_dtype: FloatDtype,
    },
}

fn ser_dtype<S: serde::Serializer>(d: &FloatDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// Settings of a watcher.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The trainer's run directory.
    pub run_dir: PathBuf,
    /// Where merged checkpoints go; the state dir is inside it. It must lie outside the run
    /// directory (and not contain it).
    pub out_dir: PathBuf,
    /// What to compute.
    pub averaging: Averaging,
    /// Output dtype of float tensors (`None`: the newest checkpoint's).
    pub out_dtype: Option<FloatDtype>,
    /// Largest output shard, in bytes.
    pub max_shard_bytes: u64,
    /// Merge through NaN/Inf inputs instead of failing.
    pub allow_nonfinite: bool,
    /// Worker threads (0: all cores; see [`crate::resolve_threads`]).
    pub threads: usize,
    /// Keep this many newest outputs (`None`: all).
    pub keep: Option<usize>,
    /// Process what is ready, then return.
    pub once: bool,
    /// Time between polls, at most [`MAX_WAIT`].
    pub interval: Duration,
    /// How long a checkpoint's files must stay unchanged before it counts, at most [`MAX_WAIT`].
    pub settle: Duration,
    /// A marker that must exist before a checkpoint counts.
    pub ready_file: Option<String>,
    /// How windowed outputs are written (direct I/O for large outputs by default).
    pub direct_io: pma_format::DirectIo,
    /// Which entries every output carries, as for a merge (`--include`/`--exclude`; training
    /// state is never kept by a watch, so `keep_state_newest` must stay false).
    pub keys: crate::keys::KeySelectionConfig,
}

impl WatchConfig {
    /// SMA over the last 4 checkpoints, polling every 30 s, 5 s settle, everything else default.
    pub fn new(run_dir: PathBuf, out_dir: PathBuf) -> WatchConfig {
        WatchConfig {
            run_dir,
            out_dir,
            averaging: Averaging::Window {
                method: WeightSpec::Sma,
                last: Some(4),
                every: None,
                min: None,
            },
            out_dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            allow_nonfinite: false,
            threads: 0,
            keep: None,
            once: false,
            interval: Duration::from_secs(30),
            settle: Duration::from_secs(5),
            ready_file: None,
            direct_io: pma_format::DirectIo::default(),
            keys: crate::keys::KeySelectionConfig::default(),
        }
    }

    /// The state dir: `out_dir/.pma-watch`.
    pub fn state_dir(&self) -> PathBuf {
        self.out_dir.join(STATE_DIR_NAME)
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidWatchConfig(m.into()));
        if self.keep == Some(0) {
            return bad("the number of outputs to keep must be at least 1");
        }
        if self.keys.keep_state_newest {
            return bad("a watch never keeps training state (keep_state_newest)");
        }
        // A run on an object store is polled by listing and pinned by download; the outputs,
        // the state and the lock need a local filesystem.
        if pma_format::is_url(&self.out_dir) {
            return bad("the output of pma watch must be a local directory (the run may be on an object store)");
        }
        if pma_format::is_url(&self.run_dir) && self.ready_file.is_some() {
            return bad("--ready-file needs a local run directory; on an object store a checkpoint is complete once its index is there");
        }
        for (what, d) in [
            ("poll interval", self.interval),
            ("settle time", self.settle),
        ] {
            if d > MAX_WAIT {
                return Err(Error::InvalidWatchConfig(format!(
                    "the {what} of {:.0} s is longer than the {} s accepted",
                    d.as_secs_f64(),
                    MAX_WAIT.as_secs()
                )));
            }
        }
        crate::threads::resolve_threads(self.threads)?;
        match &self.averaging {
            Averaging::Window {
                method,
                last,
                every,
                min,
            } => {
                if *last == Some(0) || *every == Some(0) || *min == Some(0) {
                    return bad("the window size, step interval and minimum must be positive");
                }
                let Some(n) = *last else {
                    return bad(
                        "a windowed average needs a window size (last N): without one every \
                         checkpoint stays pinned forever, so the trainer's checkpoint rotation \
                         frees no disk and the disk fills under the run. Give a window size, or \
                         average the whole history with incremental SMA or ema-stream, which \
                         keep no pins",
                    );
                };
                if let Some(k) = method.fixed_len() {
                    if n != k || min.is_some_and(|m| m != k) {
                        return bad("explicit weights need a window size equal to their count");
                    }
                }
                method.validate()
            }
            Averaging::IncrementalSma { last, min } => {
                if *last == Some(0) || *min == Some(0) {
                    return bad("the window size and minimum must be positive");
                }
                Ok(())
            }
            Averaging::EmaStream { alpha, state_dtype } => {
                if !(*alpha > 0.0 && *alpha <= 1.0) {
                    return bad("EMA alpha must be in (0, 1]");
                }
                if !matches!(state_dtype, FloatDtype::F32 | FloatDtype::F64) {
                    return bad("the ema-stream state dtype must be f32 or f64");
                }
                Ok(())
            }
        }
    }

    /// The settings that shape results, as recorded in the state.
    pub(super) fn fingerprint(&self) -> String {
        let averaging = serde_json::to_string(&self.averaging).expect("settings serialize");
        // The default selection adds nothing, so states written before key selection existed
        // keep their fingerprint.
        if self.keys == crate::keys::KeySelectionConfig::default() {
            return averaging;
        }
        let keys =
            serde_json::json!({ "include": self.keys.include, "exclude": self.keys.exclude });
        format!("{averaging} keys={keys}")
    }

    /// Members needed before an update writes an output.
    pub(super) fn window_floor(&self) -> usize {
        match &self.averaging {
            Averaging::Window { last, min, .. } | Averaging::IncrementalSma { last, min } => {
                let wanted = last.unwrap_or(1);
                min.unwrap_or(wanted).min(wanted).max(1)
            }
            Averaging::EmaStream { .. } => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(last: Option<usize>) -> WatchConfig {
        WatchConfig {
            averaging: Averaging::Window {
                method: WeightSpec::Sma,
                last,
                every: None,
                min: None,
            },
            ..WatchConfig::new("run".into(), "out".into())
        }
    }

    #[test]
    fn windowed_watch_without_last_pins_forever_so_it_is_refused() {
        let e = window(None).validate().unwrap_err();
        assert!(
            matches!(&e, Error::InvalidWatchConfig(m) if m.contains("pinned forever")),
            "{e}"
        );
        window(Some(3)).validate().unwrap();
        // The whole-history modes keep no pins and need no window.
        let incremental = WatchConfig {
            averaging: Averaging::IncrementalSma {
                last: None,
                min: None,
            },
            ..window(None)
        };
        incremental.validate().unwrap();
    }

    #[test]
    fn interval_1e19_seconds_is_refused_not_a_panic() {
        let config = WatchConfig {
            interval: Duration::from_secs_f64(1e19),
            ..window(Some(2))
        };
        let e = config.validate().unwrap_err();
        assert!(
            matches!(&e, Error::InvalidWatchConfig(m) if m.contains("poll interval")),
            "{e}"
        );
        let config = WatchConfig {
            settle: Duration::MAX,
            ..window(Some(2))
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn absurd_thread_count_is_refused() {
        let config = WatchConfig {
            threads: usize::MAX,
            ..window(Some(2))
        };
        let e = config.validate().unwrap_err();
        assert!(matches!(e, Error::TooManyThreads { .. }), "{e}");
    }

    #[test]
    fn fingerprint_is_unchanged_by_the_weight_spec_refactor() {
        // A state written before WeightSpec replaced WindowMethod must still be resumed.
        let config = WatchConfig {
            averaging: Averaging::Window {
                method: WeightSpec::Ema { alpha: 0.3 },
                last: Some(4),
                every: None,
                min: None,
            },
            ..window(Some(4))
        };
        assert_eq!(
            config.fingerprint(),
            r#"{"mode":"window","method":{"name":"ema","alpha":0.3},"last":4,"every":null,"min":null}"#
        );
    }
}
