//! Online merging beside a running pre-training job: `pma watch`.
//!
//! [`run`] watches a run directory and keeps merged checkpoints of its newest checkpoints up to
//! date in an output directory, one `step-XXXXXXX/` per update, named after the newest member.
//! Checkpoints are processed one at a time, in step order, each exactly once:
//!
//! 1. discovery and completeness ([`ready`]): a checkpoint counts once it has settled, carries
//!    its ready marker and validates;
//! 2. pinning ([`pins`]): its files are hard-linked into the state dir at once, so the trainer's
//!    rotation cannot take a window member away;
//! 3. the update, by [`Averaging`]:
//!    - windowed SMA/EMA/WMA over the last N: the merge executor runs on the pinned members, so
//!      the output is bit-identical to `pma merge` of the same checkpoints;
//!    - incremental SMA: a running f64 sum updated with the new and the leaving checkpoint
//!      ([`stream`]);
//!    - streaming EMA over the whole history, DeepSeek-V3 style ([`stream`]);
//! 4. the commit ([`state`]): the new tensor state and the output are made durable first, then
//!    `state.json` is replaced atomically. A SIGKILL at any point leaves the old or the new state,
//!    and a restart redoes the interrupted update: nothing is counted twice or skipped.
//!
//! Progress goes out as [`WatchEvent`]s through a callback; the caller logs and renders them.
//!
//! ```no_run
//! use pma_merge::watch::{run, Averaging, WatchConfig, WindowMethod};
//! let config = WatchConfig {
//!     averaging: Averaging::Window { method: WindowMethod::Sma, last: Some(4), every: None, min: None },
//!     once: true,
//!     ..WatchConfig::new("run".into(), "merged".into())
//! };
//! let stop = std::sync::atomic::AtomicBool::new(false);
//! let report = run(&config, &stop, &mut |event| eprintln!("{event:?}"))?;
//! println!("{} checkpoints processed", report.processed.len());
//! # Ok::<(), pma_merge::Error>(())
//! ```

pub mod pins;
pub mod ready;
pub mod state;
mod stream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pma_format::{Checkpoint, FloatDtype, OutputKind, Publish, SafetensorsFile, StagedOutput};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::executor::{execute, ExecOptions};
use crate::plan::{MergeConfig, MergeInput, MergePlan, DEFAULT_MAX_SHARD_BYTES};
use crate::progress::NoProgress;
use crate::series::{CheckpointEntry, CheckpointSeries, Selection};
use crate::weights::Weights;
use pins::PinKind;
use ready::{Readiness, ReadinessTracker};
use state::{
    collect_garbage, create_dir_all, io_error, remove_any, step_dir_name, sync_dir,
    tensor_file_name, Member, WatchState, PINS_DIR, TENSORS_DIR,
};
pub use stream::StreamRule;

/// Name of the state dir inside the output dir.
pub const STATE_DIR_NAME: &str = ".pma-watch";
/// Name of the event log inside the state dir (written by the CLI).
pub const EVENT_LOG_NAME: &str = "events.jsonl";
/// Version of the event records.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// The weighting of a windowed merge (the methods of `pma merge`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum WindowMethod {
    /// Simple moving average.
    Sma,
    /// EMA over the window, with smoothing `alpha`.
    Ema {
        /// Weight of the newest checkpoint.
        alpha: f64,
    },
    /// Linearly weighted.
    Wma,
    /// Explicit weights, oldest first (the window must have exactly this many members).
    Explicit {
        /// The weights.
        values: Vec<f64>,
        /// Rescale to sum to 1.
        normalize: bool,
    },
}

impl WindowMethod {
    /// Weights for a window of `n` checkpoints.
    pub fn weights(&self, n: usize) -> Result<Weights> {
        match self {
            WindowMethod::Sma => Weights::sma(n),
            WindowMethod::Ema { alpha } => Weights::ema(n, *alpha),
            WindowMethod::Wma => Weights::wma(n),
            WindowMethod::Explicit { values, normalize } => {
                Weights::explicit(values.clone(), *normalize)
            }
        }
    }
}

/// What the watcher computes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Averaging {
    /// A fresh merge of the window at every update, exactly as `pma merge` would.
    Window {
        /// Weighting.
        method: WindowMethod,
        /// Window size N (`None`: every checkpoint so far).
        last: Option<usize>,
        /// Members V steps apart, counting back from the newest.
        every: Option<u64>,
        /// Merge once this many members exist (default: N, a full window).
        min: Option<usize>,
    },
    /// SMA over the last N by a running f64 sum: each update reads the new checkpoint, the one
    /// leaving the window and the sum.
    IncrementalSma {
        /// Window size N (`None`: every checkpoint so far).
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
    /// Where merged checkpoints go; the state dir is inside it.
    pub out_dir: PathBuf,
    /// What to compute.
    pub averaging: Averaging,
    /// Output dtype of float tensors (`None`: the newest checkpoint's).
    pub out_dtype: Option<FloatDtype>,
    /// Largest output shard, in bytes.
    pub max_shard_bytes: u64,
    /// Merge through NaN/Inf inputs instead of failing.
    pub allow_nonfinite: bool,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Keep this many newest outputs (`None`: all).
    pub keep: Option<usize>,
    /// A shell command run on each new output; `{}` is replaced by its path.
    pub exec: Option<String>,
    /// Process what is ready, then return.
    pub once: bool,
    /// Time between polls.
    pub interval: Duration,
    /// How long a checkpoint's files must stay unchanged before it counts.
    pub settle: Duration,
    /// A marker that must exist before a checkpoint counts.
    pub ready_file: Option<String>,
}

impl WatchConfig {
    /// SMA over every checkpoint, polling every 30 s, 5 s settle, everything else default.
    pub fn new(run_dir: PathBuf, out_dir: PathBuf) -> WatchConfig {
        WatchConfig {
            run_dir,
            out_dir,
            averaging: Averaging::Window {
                method: WindowMethod::Sma,
                last: None,
                every: None,
                min: None,
            },
            out_dtype: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            allow_nonfinite: false,
            threads: 0,
            keep: None,
            exec: None,
            once: false,
            interval: Duration::from_secs(30),
            settle: Duration::from_secs(5),
            ready_file: None,
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
            return bad("--keep must be at least 1");
        }
        match &self.averaging {
            Averaging::Window {
                method,
                last,
                every,
                min,
            } => {
                if *last == Some(0) || *every == Some(0) || *min == Some(0) {
                    return bad("--last, --every and --min must be positive");
                }
                if let WindowMethod::Explicit { values, .. } = method {
                    if *last != Some(values.len()) || min.is_some_and(|m| m != values.len()) {
                        return bad("explicit --weights need --last equal to their count");
                    }
                }
                method.weights(last.unwrap_or(1).max(1)).map(|_| ())
            }
            Averaging::IncrementalSma { last, min } => {
                if *last == Some(0) || *min == Some(0) {
                    return bad("--last and --min must be positive");
                }
                Ok(())
            }
            Averaging::EmaStream { alpha, state_dtype } => {
                if !(*alpha > 0.0 && *alpha <= 1.0) {
                    return bad("--alpha must be in (0, 1]");
                }
                if !matches!(state_dtype, FloatDtype::F32 | FloatDtype::F64) {
                    return bad("--state-dtype must be f32 or f64");
                }
                Ok(())
            }
        }
    }

    /// The settings that shape results, as recorded in the state.
    fn fingerprint(&self) -> String {
        serde_json::to_string(&self.averaging).expect("settings serialize")
    }

    fn window_floor(&self) -> usize {
        match &self.averaging {
            Averaging::Window { last, min, .. } | Averaging::IncrementalSma { last, min } => {
                let wanted = last.unwrap_or(1);
                min.unwrap_or(wanted).min(wanted).max(1)
            }
            Averaging::EmaStream { .. } => 1,
        }
    }
}

/// One thing that happened, for the log (`events.jsonl`) and the terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum WatchEvent {
    /// Resumed from a committed state.
    Resumed {
        /// Generation of the state.
        generation: u64,
        /// Last processed step.
        last_step: Option<u64>,
    },
    /// A new checkpoint appeared in the run dir.
    Seen {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
    },
    /// A checkpoint is not complete yet; it is looked at again on the next poll.
    Waiting {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An incomplete checkpoint was passed over for good, because a newer one is complete.
    SkippedIncomplete {
        /// Its step.
        step: u64,
        /// Its path.
        path: PathBuf,
        /// Why it is incomplete.
        reason: String,
    },
    /// A checkpoint's files were pinned into the state dir.
    Pinned {
        /// Its step.
        step: u64,
        /// Hard-linked or copied.
        kind: PinKind,
    },
    /// A checkpoint was counted without an output (the window is still filling).
    Counted {
        /// Its step.
        step: u64,
        /// Members so far.
        members: usize,
        /// Members needed for an output.
        needed: usize,
    },
    /// A merged checkpoint was written.
    Merged {
        /// The newest member's step.
        step: u64,
        /// The output dir.
        output: PathBuf,
        /// Steps of the members, oldest first (for ema-stream: just the new one).
        members: Vec<u64>,
        /// Their weights (empty for ema-stream).
        weights: Vec<f64>,
        /// Wall time of the update, in seconds.
        elapsed_secs: f64,
        /// Bytes read.
        read_bytes: u64,
        /// Bytes written (output plus tensor state).
        written_bytes: u64,
    },
    /// A pin was released: the checkpoint left the window.
    Unpinned {
        /// Its step.
        step: u64,
    },
    /// An old output was deleted (`--keep`).
    Pruned {
        /// The deleted output.
        output: PathBuf,
    },
    /// The `--exec` command ran.
    Exec {
        /// The command as run.
        command: String,
        /// The output it ran on.
        output: PathBuf,
        /// Whether it exited 0.
        success: bool,
        /// Its exit code (`None` if killed by a signal or not started).
        code: Option<i32>,
        /// Why it could not start, if it did not.
        error: Option<String>,
        /// How long it ran, in seconds.
        elapsed_secs: f64,
    },
}

/// What a watcher did before it returned.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    /// Steps processed in this run, in order.
    pub processed: Vec<u64>,
    /// Outputs written in this run.
    pub outputs: Vec<PathBuf>,
    /// Steps skipped as incomplete.
    pub skipped: Vec<u64>,
    /// Whether it stopped because of a signal.
    pub interrupted: bool,
    /// The committed state after the run.
    pub last_step: Option<u64>,
}

/// Runs the watcher until `stop` is set (or, with `once`, until nothing more is ready).
/// The flag is checked between updates: an update in progress always completes.
pub fn run(
    config: &WatchConfig,
    stop: &AtomicBool,
    sink: &mut dyn FnMut(&WatchEvent),
) -> Result<WatchReport> {
    config.validate()?;
    let mut watcher = Watcher::open(config, sink)?;
    let mut report = WatchReport::default();
    let mut wakeup = wake::Wakeup::new(&config.run_dir);
    loop {
        let settling = watcher.poll(stop, &mut report, sink)?;
        if stop.load(Ordering::SeqCst) {
            report.interrupted = true;
            break;
        }
        if config.once {
            break;
        }
        // A settling checkpoint is looked at again once its settle interval can have passed,
        // not a whole polling interval later.
        let wait = if settling {
            config
                .interval
                .min(config.settle + Duration::from_millis(100))
        } else {
            config.interval
        };
        wakeup.wait(wait, stop);
        if stop.load(Ordering::SeqCst) {
            report.interrupted = true;
            break;
        }
    }
    report.last_step = watcher.state.last_step();
    Ok(report)
}

/// An open state dir with its lock held.
struct Watcher<'c> {
    config: &'c WatchConfig,
    state_dir: PathBuf,
    state: WatchState,
    tracker: ReadinessTracker,
    seen: HashSet<u64>,
    waiting: HashMap<u64, String>,
    _lock: std::fs::File,
}

impl<'c> Watcher<'c> {
    fn open(config: &'c WatchConfig, sink: &mut dyn FnMut(&WatchEvent)) -> Result<Watcher<'c>> {
        let state_dir = config.state_dir();
        create_dir_all(&state_dir.join(PINS_DIR))?;
        create_dir_all(&state_dir.join(TENSORS_DIR))?;
        let lock = lock_state_dir(&state_dir)?;
        let fingerprint = config.fingerprint();
        let state = match WatchState::load(&state_dir)? {
            Some(s) if s.settings != fingerprint => {
                return Err(Error::WatchStateMismatch {
                    path: state_dir.join(state::STATE_FILE_NAME),
                    expected: fingerprint,
                    found: s.settings,
                })
            }
            Some(s) => {
                sink(&WatchEvent::Resumed {
                    generation: s.generation,
                    last_step: s.last_step(),
                });
                s
            }
            None => WatchState::new(fingerprint),
        };
        if let Some(file) = &state.tensor_file {
            let path = state_dir.join(TENSORS_DIR).join(file);
            if !path.is_file() {
                return Err(Error::WatchStateCorrupt {
                    path: state_dir.join(state::STATE_FILE_NAME),
                    reason: format!("tensor state {} is missing", path.display()),
                });
            }
        }
        collect_garbage(&state_dir, &config.out_dir, &state)?;
        Ok(Watcher {
            config,
            tracker: ReadinessTracker::new(config.settle, config.ready_file.clone()),
            state_dir,
            state,
            seen: HashSet::new(),
            waiting: HashMap::new(),
            _lock: lock,
        })
    }

    fn pins_dir(&self) -> PathBuf {
        self.state_dir.join(PINS_DIR)
    }

    /// One look at the run dir: pin what is ready, then process it in step order. Returns
    /// whether it stopped at a checkpoint that is still settling.
    fn poll(
        &mut self,
        stop: &AtomicBool,
        report: &mut WatchReport,
        sink: &mut dyn FnMut(&WatchEvent),
    ) -> Result<bool> {
        let last = self.state.last_step();
        let newer = |s: u64| last.is_none_or(|l| s > l);
        let entries = match CheckpointSeries::discover(&self.config.run_dir) {
            Ok(series) => series.entries,
            Err(Error::EmptyRun { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        // step → (trainer path, pin): pins left by an earlier run count even if the trainer
        // has deleted its copy since.
        let mut candidates: BTreeMap<u64, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
        for name in state::list_names(&self.pins_dir())? {
            if name.starts_with('.') {
                continue;
            }
            if let Some(step) = crate::series::parse_step(&name).filter(|&s| newer(s)) {
                candidates.entry(step).or_default().1 = Some(self.pins_dir().join(name));
            }
        }
        for CheckpointEntry { step, path } in entries {
            if let Some(step) = step.filter(|&s| newer(s)) {
                let slot = candidates.entry(step).or_default();
                // Two names for one step (step-100 and checkpoint-100): the first found wins.
                if slot.0.is_none() {
                    slot.0 = Some(path);
                }
            }
        }
        enum Found {
            Pinned(PathBuf),
            Settling,
            Incomplete(String),
        }
        let mut found: Vec<(u64, Option<PathBuf>, Found)> = Vec::new();
        for (step, (source, pin)) in candidates {
            if let Some(path) = &source {
                if self.seen.insert(step) {
                    sink(&WatchEvent::Seen {
                        step,
                        path: path.clone(),
                    });
                }
            }
            // A pin left by an earlier run was complete and durable when renamed into place,
            // but files can still go missing from it (a disk fault, a hand-run `rm`): it is
            // checked again, and rebuilt from the trainer's copy if it no longer validates.
            let pin = pin.filter(|p| {
                let valid = Checkpoint::open(p).is_ok();
                if !valid {
                    remove_any(p);
                }
                valid
            });
            let status = match (pin, &source) {
                (Some(pin), _) => Found::Pinned(pin),
                (None, Some(path)) => match self.tracker.check(&self.config.run_dir, path, step) {
                    Readiness::Ready(ckpt) => match pins::pin(&ckpt, step, &self.pins_dir()) {
                        Ok((pin, kind)) => {
                            sink(&WatchEvent::Pinned { step, kind });
                            Found::Pinned(pin)
                        }
                        // Rotated away between validation and pinning.
                        Err(e) => Found::Incomplete(format!("vanished while pinning: {e}")),
                    },
                    Readiness::Settling => Found::Settling,
                    Readiness::Incomplete(reason) => Found::Incomplete(reason),
                },
                (None, None) => {
                    Found::Incomplete("its pin was damaged and the trainer's copy is gone".into())
                }
            };
            found.push((step, source, status));
        }
        let last_pinned = found
            .iter()
            .rposition(|(_, _, f)| matches!(f, Found::Pinned(_)));
        for (i, (step, source, status)) in found.into_iter().enumerate() {
            if stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let source_path = source.clone().unwrap_or_default();
            match status {
                Found::Pinned(pin) => {
                    self.waiting.remove(&step);
                    let out = self.process(step, &pin, source.as_deref(), sink)?;
                    report.processed.push(step);
                    report.outputs.extend(out);
                    if let Some(src) = &source {
                        self.tracker.forget(src);
                    }
                }
                Found::Incomplete(reason) if last_pinned.is_some_and(|l| l > i) => {
                    // A newer checkpoint is complete: this one was abandoned by the trainer.
                    // Record it as processed-and-skipped by moving past it; it is never merged.
                    self.waiting.remove(&step);
                    self.tracker.forget(&source_path);
                    sink(&WatchEvent::SkippedIncomplete {
                        step,
                        path: source_path,
                        reason,
                    });
                    report.skipped.push(step);
                }
                Found::Incomplete(reason) => {
                    if self.waiting.get(&step) != Some(&reason) {
                        self.waiting.insert(step, reason.clone());
                        sink(&WatchEvent::Waiting {
                            step,
                            path: source_path,
                            reason,
                        });
                    }
                    return Ok(false);
                }
                Found::Settling => {
                    let reason = "settling: files changed recently".to_string();
                    if self.waiting.get(&step) != Some(&reason) {
                        self.waiting.insert(step, reason.clone());
                        sink(&WatchEvent::Waiting {
                            step,
                            path: source_path,
                            reason,
                        });
                    }
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Processes one pinned checkpoint and commits. Returns the output written, if any.
    fn process(
        &mut self,
        step: u64,
        pin: &Path,
        source: Option<&Path>,
        sink: &mut dyn FnMut(&WatchEvent),
    ) -> Result<Option<PathBuf>> {
        let started = Instant::now();
        let config = self.config;
        let source = source.map_or_else(|| pin.to_path_buf(), Path::to_path_buf);
        let mut history = self.state.members.clone();
        history.push(Member {
            step,
            source: source.clone(),
        });
        let floor = config.window_floor();
        let out_name = step_dir_name(step);
        let out_path = config.out_dir.join(&out_name);
        let mut next = self.state.clone();
        next.generation += 1;
        next.processed.push(step);
        let mut written: Option<(Vec<u64>, Vec<f64>, u64, u64)> = None;
        match &config.averaging {
            Averaging::Window {
                method,
                last,
                every,
                min,
            } => {
                let series = CheckpointSeries {
                    entries: history
                        .iter()
                        .map(|m| CheckpointEntry {
                            step: Some(m.step),
                            path: self.pins_dir().join(step_dir_name(m.step)),
                        })
                        .collect(),
                };
                let selection = Selection {
                    last: *last,
                    every: *every,
                    at: None,
                    min: Some(min.unwrap_or(last.unwrap_or(1))),
                };
                match selection.select(&series, false) {
                    Ok(selected) => {
                        let steps: Vec<u64> = selected
                            .checkpoints
                            .iter()
                            .map(|(s, _)| s.expect("pins carry steps"))
                            .collect();
                        let weights = method.weights(steps.len())?;
                        let inputs = selected
                            .checkpoints
                            .into_iter()
                            .map(|(step, checkpoint)| MergeInput { step, checkpoint })
                            .collect();
                        let mut plan = MergePlan::build(inputs, weights, self.merge_config())?;
                        let sources: Vec<&Member> = steps
                            .iter()
                            .map(|s| {
                                history
                                    .iter()
                                    .find(|m| m.step == *s)
                                    .expect("selected from history")
                            })
                            .collect();
                        rewrite_provenance(&mut plan.metadata, &sources, &config.averaging);
                        let opts = ExecOptions {
                            threads: config.threads,
                            overwrite: true,
                            cancel: None,
                            direct_io: pma_format::DirectIo::default(),
                        };
                        let merged = execute(&plan, &out_path, &opts, &NoProgress)?;
                        let weights = plan.weights.values.clone();
                        written = Some((
                            steps,
                            weights,
                            merged.plan.bytes_read,
                            merged.plan.bytes_written,
                        ));
                    }
                    Err(Error::NotEnoughCheckpoints { .. }) => {}
                    Err(e) => return Err(e),
                }
                next.members = retain_window(&history, *last, every.unwrap_or(1), 0);
            }
            Averaging::IncrementalSma { last, .. } => {
                // Without --last the sum runs over every checkpoint and nothing ever leaves,
                // so no pin is kept.
                let (leaving, count, kept) = match *last {
                    Some(n) => (
                        (history.len() > n).then(|| history[history.len() - 1 - n].step),
                        history.len().min(n),
                        retain_window(&history, Some(n), 1, 1),
                    ),
                    None => (None, next.processed.len(), Vec::new()),
                };
                let window = &history[history.len() - count.min(history.len())..];
                let (read, state_bytes, out_bytes) = self.stream_update(
                    &mut next,
                    StreamRule::Sum {
                        divisor: count as f64,
                    },
                    FloatDtype::F64,
                    pin,
                    leaving,
                    &out_path,
                    count >= floor,
                    window,
                )?;
                if count >= floor {
                    let members: Vec<u64> = match last {
                        Some(_) => window.iter().map(|m| m.step).collect(),
                        None => next.processed.clone(),
                    };
                    let w = vec![1.0 / count as f64; count];
                    written = Some((members, w, read, state_bytes + out_bytes));
                }
                next.members = kept;
            }
            Averaging::EmaStream { alpha, state_dtype } => {
                let (read, state_bytes, out_bytes) = self.stream_update(
                    &mut next,
                    StreamRule::Ema { alpha: *alpha },
                    *state_dtype,
                    pin,
                    None,
                    &out_path,
                    true,
                    &history[history.len() - 1..],
                )?;
                written = Some((vec![step], Vec::new(), read, state_bytes + out_bytes));
                next.members = Vec::new();
            }
        }
        let mut pruned = Vec::new();
        if written.is_some() {
            next.outputs.retain(|o| o != &out_name);
            next.outputs.push(out_name.clone());
            if let Some(k) = config.keep {
                while next.outputs.len() > k {
                    pruned.push(next.outputs.remove(0));
                }
            }
        }
        // The commit point. Everything before it is redone after a crash; everything after it
        // only removes what the new state no longer refers to.
        next.save(&self.state_dir)?;
        let old = std::mem::replace(&mut self.state, next);
        if old.tensor_file != self.state.tensor_file {
            if let Some(f) = &old.tensor_file {
                remove_any(&self.state_dir.join(TENSORS_DIR).join(f));
            }
        }
        match &written {
            Some((members, weights, read_bytes, written_bytes)) => sink(&WatchEvent::Merged {
                step,
                output: out_path.clone(),
                members: members.clone(),
                weights: weights.clone(),
                elapsed_secs: started.elapsed().as_secs_f64(),
                read_bytes: *read_bytes,
                written_bytes: *written_bytes,
            }),
            None => sink(&WatchEvent::Counted {
                step,
                members: self.state.members.len(),
                needed: floor,
            }),
        }
        let kept: HashSet<u64> = self.state.members.iter().map(|m| m.step).collect();
        for m in old.members.iter().chain(std::iter::once(&Member {
            step,
            source: source.clone(),
        })) {
            if !kept.contains(&m.step) {
                remove_any(&self.pins_dir().join(step_dir_name(m.step)));
                sink(&WatchEvent::Unpinned { step: m.step });
            }
        }
        for name in pruned {
            let p = config.out_dir.join(name);
            remove_any(&p);
            sink(&WatchEvent::Pruned { output: p });
        }
        if written.is_none() {
            return Ok(None);
        }
        if let Some(cmd) = &config.exec {
            sink(&run_exec(cmd, &out_path));
        }
        Ok(Some(out_path))
    }

    /// Runs a streaming update into a new tensor state file (recorded in `next`) and, when
    /// `emit`, commits the output. Returns (read, state, output) bytes.
    #[allow(clippy::too_many_arguments)]
    fn stream_update(
        &self,
        next: &mut WatchState,
        rule: StreamRule,
        state_dtype: FloatDtype,
        pin: &Path,
        leaving: Option<u64>,
        out_path: &Path,
        emit: bool,
        members: &[Member],
    ) -> Result<(u64, u64, u64)> {
        let config = self.config;
        let new = Checkpoint::open(pin)?;
        let leaving = leaving
            .map(|s| Checkpoint::open(&self.pins_dir().join(step_dir_name(s))))
            .transpose()?;
        let tensors_dir = self.state_dir.join(TENSORS_DIR);
        let prev = self
            .state
            .tensor_file
            .as_ref()
            .map(|f| SafetensorsFile::open(&tensors_dir.join(f)))
            .transpose()?;
        let file_name = tensor_file_name(next.generation);
        let state_path = tensors_dir.join(&file_name);
        remove_any(&state_path); // left by a killed attempt at this same generation
        let staged = StagedOutput::create(out_path, OutputKind::Dir, Publish::Replace)?;
        let mut state_meta = BTreeMap::new();
        state_meta.insert("format".to_string(), "pt".to_string());
        state_meta.insert(
            "pma_watch_state".to_string(),
            serde_json::json!({
                "generation": next.generation,
                "step": members.last().map(|m| m.step),
                "settings": next.settings,
            })
            .to_string(),
        );
        let update = stream::StreamUpdate {
            rule,
            new: &new,
            leaving: leaving.as_ref(),
            prev: prev.as_ref(),
            state_dtype,
            out_dtype: config.out_dtype,
            max_shard_bytes: config.max_shard_bytes,
            out_metadata: stream_provenance(&config.averaging, config.out_dtype, members, next),
            state_metadata: state_meta,
            allow_nonfinite: config.allow_nonfinite,
            threads: resolve_threads(config.threads),
        };
        let stats = stream::run_update(&update, &state_path, staged.path())?;
        sync_dir(&tensors_dir)?;
        if emit {
            crate::executor::copy_sidecars(&new, config.out_dtype, staged.path())?;
            staged.commit()?;
        }
        next.tensor_file = Some(file_name);
        Ok((stats.read_bytes, stats.state_bytes, stats.output_bytes))
    }

    fn merge_config(&self) -> MergeConfig {
        MergeConfig {
            out_dtype: self.config.out_dtype,
            max_shard_bytes: self.config.max_shard_bytes,
            single_file: false,
            allow_nonfinite: self.config.allow_nonfinite,
        }
    }
}

/// The members future windows can still need, oldest first. `spare` extra members are kept
/// beyond what the next window needs (incremental SMA needs the one that will leave).
fn retain_window(history: &[Member], last: Option<usize>, every: u64, spare: usize) -> Vec<Member> {
    let Some(n) = last else {
        return history.to_vec();
    };
    let newest = history.last().map_or(0, |m| m.step);
    if every <= 1 {
        // A future window takes at most n − 1 of today's checkpoints.
        let keep = (n - 1 + spare).min(n).min(history.len());
        return history[history.len() - keep..].to_vec();
    }
    // A future window anchored at a > newest reaches back to a − (n−1)·V > newest − (n−1)·V.
    let span = (n as u64 - 1).saturating_mul(every);
    history
        .iter()
        .filter(|m| newest - m.step < span)
        .cloned()
        .collect()
}

fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// Records the trainer's paths (not the pins) and the watch settings in a windowed output.
fn rewrite_provenance(meta: &mut BTreeMap<String, String>, members: &[&Member], how: &Averaging) {
    let Some(text) = meta.get("pma") else { return };
    let Ok(serde_json::Value::Object(mut record)) = serde_json::from_str(text) else {
        return;
    };
    record.insert(
        "inputs".into(),
        members
            .iter()
            .map(|m| serde_json::json!({"path": m.source.display().to_string(), "step": m.step}))
            .collect(),
    );
    record.insert(
        "watch".into(),
        serde_json::to_value(how).expect("settings serialize"),
    );
    meta.insert("pma".into(), serde_json::Value::Object(record).to_string());
}

fn stream_provenance(
    how: &Averaging,
    out_dtype: Option<FloatDtype>,
    members: &[Member],
    next: &WatchState,
) -> BTreeMap<String, String> {
    let method = match how {
        Averaging::IncrementalSma { .. } => serde_json::json!({"name": "sma"}),
        Averaging::EmaStream { alpha, .. } => {
            serde_json::json!({"name": "ema-stream", "alpha": alpha})
        }
        Averaging::Window { method, .. } => serde_json::to_value(method).expect("serializes"),
    };
    let record = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "method": method,
        "dtype": out_dtype.map(|d| d.name()),
        "inputs": members.iter().map(|m| serde_json::json!({
            "path": m.source.display().to_string(),
            "step": m.step,
        })).collect::<Vec<_>>(),
        "checkpoints_counted": next.processed.len(),
        "first_step": next.processed.first(),
        "watch": how,
    });
    let mut m = BTreeMap::new();
    m.insert("format".to_string(), "pt".to_string());
    m.insert("pma".to_string(), record.to_string());
    m
}

/// Runs `--exec` through `sh -c`, `{}` replaced by the quoted output path (appended when the
/// command has no `{}`). Its stdout goes to our stderr, keeping our stdout for data.
fn run_exec(cmd: &str, output: &Path) -> WatchEvent {
    let quoted = shell_quote(&output.display().to_string());
    let command = if cmd.contains("{}") {
        cmd.replace("{}", &quoted)
    } else {
        format!("{cmd} {quoted}")
    };
    let started = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .status();
    let elapsed_secs = started.elapsed().as_secs_f64();
    match status {
        Ok(s) => WatchEvent::Exec {
            command,
            output: output.into(),
            success: s.success(),
            code: s.code(),
            error: None,
            elapsed_secs,
        },
        Err(e) => WatchEvent::Exec {
            command,
            output: output.into(),
            success: false,
            code: None,
            error: Some(e.to_string()),
            elapsed_secs,
        },
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Takes an exclusive `flock` on `state_dir/lock`, so two watchers never share a state dir.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, "opening", e))?;
    // SAFETY: flock on an fd we own; the lock goes with the fd (and with the process).
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::WatchLocked { path });
    }
    Ok(file)
}

/// Sleeping between polls, woken early by inotify where the kernel offers it.
mod wake {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// Waits for the next poll. Polling is the contract: networked and parallel filesystems
    /// drop inotify events, so inotify only ever shortens a wait, never replaces the timer.
    pub(super) struct Wakeup {
        fd: Option<i32>,
    }

    impl Wakeup {
        pub(super) fn new(run_dir: &Path) -> Wakeup {
            Wakeup {
                fd: inotify_on(run_dir),
            }
        }

        /// Sleeps up to `interval`, returning early on `stop` or on a change in the run dir.
        pub(super) fn wait(&mut self, interval: Duration, stop: &AtomicBool) {
            let deadline = Instant::now() + interval;
            const SLICE: Duration = Duration::from_millis(100);
            while !stop.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= deadline {
                    return;
                }
                let slice = (deadline - now).min(SLICE);
                if self.changed_within(slice) {
                    // Let the writer get a little further before looking.
                    std::thread::sleep(
                        SLICE.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    return;
                }
            }
        }

        fn changed_within(&mut self, d: Duration) -> bool {
            let Some(fd) = self.fd else {
                std::thread::sleep(d);
                return false;
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; poll only writes `revents`.
            let rc = unsafe { libc::poll(&mut pfd, 1, d.as_millis() as libc::c_int) };
            if rc <= 0 {
                return false;
            }
            let mut buf = [0u8; 4096];
            // SAFETY: reading into a local buffer from our own non-blocking fd.
            while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            true
        }
    }

    impl Drop for Wakeup {
        fn drop(&mut self) {
            if let Some(fd) = self.fd {
                // SAFETY: closing the fd we opened.
                unsafe { libc::close(fd) };
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn inotify_on(dir: &Path) -> Option<i32> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: plain syscalls; the fd is closed on failure and in Drop.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            if fd < 0 {
                return None;
            }
            let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;
            if libc::inotify_add_watch(fd, c.as_ptr(), mask) < 0 {
                libc::close(fd);
                return None;
            }
            Some(fd)
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn inotify_on(_dir: &Path) -> Option<i32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(steps: &[u64]) -> Vec<Member> {
        steps
            .iter()
            .map(|&step| Member {
                step,
                source: PathBuf::new(),
            })
            .collect()
    }

    fn steps(m: &[Member]) -> Vec<u64> {
        m.iter().map(|m| m.step).collect()
    }

    #[test]
    fn retention_keeps_what_future_windows_need() {
        let h = members(&[100, 200, 300, 400, 500]);
        assert_eq!(steps(&retain_window(&h, Some(4), 1, 0)), [300, 400, 500]);
        assert_eq!(
            steps(&retain_window(&h, Some(4), 1, 1)),
            [200, 300, 400, 500]
        );
        assert_eq!(steps(&retain_window(&h, Some(1), 1, 0)), Vec::<u64>::new());
        assert_eq!(
            steps(&retain_window(&h, None, 1, 0)),
            [100, 200, 300, 400, 500]
        );
        // Every 200 steps, N = 2: a future anchor a > 500 needs a − 200 > 300.
        assert_eq!(steps(&retain_window(&h, Some(2), 200, 0)), [400, 500]);
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
