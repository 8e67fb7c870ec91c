//! The poll loop: open the state dir, look at the run dir, take what is ready in step order.
//!
//! Each poll lists the run dir and the pins left by an earlier run, pins every checkpoint that
//! has become ready, and hands the pinned ones to [`Watcher::update`] oldest first. A checkpoint
//! that is still settling or incomplete stops the poll there (steps are processed in order),
//! unless a newer one is complete, in which case the trainer abandoned it and it is skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::config::WatchConfig;
use super::event::{WatchEvent, WatchReport};
use super::lock::lock_state_dir;
use super::pins;
use super::ready::{Readiness, ReadinessTracker};
use super::state::{
    self, collect_garbage, create_dir_all, remove_any, WatchState, PINS_DIR, TENSORS_DIR,
};
use super::wake::Wakeup;
use crate::error::{Error, Result};
use crate::run_layout::discover_run;
use crate::series::CheckpointEntry;

/// Runs the watcher until `stop` is set (or, with `once`, until nothing more is ready).
/// The flag is checked between updates: an update in progress always completes.
///
/// The output dir must lie outside the run dir and must not contain it
/// ([`crate::check_output_placement`]): the watcher writes `step-*` directories and prunes them.
pub fn run(
    config: &WatchConfig,
    stop: &AtomicBool,
    sink: &mut dyn FnMut(&WatchEvent),
) -> Result<WatchReport> {
    config.validate()?;
    crate::placement::check_output_placement(&config.out_dir, &[config.run_dir.as_path()])?;
    let mut watcher = Watcher::open(config, sink)?;
    let mut report = WatchReport::default();
    let mut wakeup = Wakeup::new(&config.run_dir);
    let mut retries = 0;
    loop {
        // An input changed under an update (pins.rs): nothing was committed; try again, and the
        // damaged member is re-pinned or dropped.
        let settling = match watcher.poll(stop, &mut report, sink) {
            Err(e) if pins::is_damage(&e) && retries < 3 => {
                retries += 1;
                sink(&WatchEvent::UpdateRetried {
                    reason: e.to_string(),
                });
                continue;
            }
            r => r?,
        };
        if stop.load(Ordering::SeqCst) {
            report.interrupted = true;
            break;
        }
        // --once still waits out the settle interval of a checkpoint that is otherwise complete.
        if config.once && !(settling && watcher.tracker.settling_complete()) {
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
pub(super) struct Watcher<'c> {
    pub(super) config: &'c WatchConfig,
    pub(super) state_dir: PathBuf,
    pub(super) state: WatchState,
    tracker: ReadinessTracker,
    seen: HashSet<u64>,
    waiting: HashMap<u64, String>,
    _lock: std::fs::File,
}

/// What one poll found for a step.
enum Found {
    Pinned(PathBuf),
    Settling,
    Incomplete(String),
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

    pub(super) fn pins_dir(&self) -> PathBuf {
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
        let found = self.look(sink)?;
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
                    let out = self.update(step, &pin, source.as_deref(), sink)?;
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
                    self.report_waiting(step, source_path, reason, sink);
                    return Ok(false);
                }
                Found::Settling => {
                    let reason = "settling: files changed recently".to_string();
                    self.report_waiting(step, source_path, reason, sink);
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Sends `Waiting` once per step and reason, not on every poll.
    fn report_waiting(
        &mut self,
        step: u64,
        path: PathBuf,
        reason: String,
        sink: &mut dyn FnMut(&WatchEvent),
    ) {
        if self.waiting.get(&step) != Some(&reason) {
            self.waiting.insert(step, reason.clone());
            sink(&WatchEvent::Waiting { step, path, reason });
        }
    }

    /// The unprocessed steps, oldest first, with the trainer's path and what state each is in;
    /// pins whatever has become ready.
    fn look(
        &mut self,
        sink: &mut dyn FnMut(&WatchEvent),
    ) -> Result<Vec<(u64, Option<PathBuf>, Found)>> {
        let last = self.state.last_step();
        let newer = |s: u64| last.is_none_or(|l| s > l);
        // The run is read as `pma merge` reads it (torchtitan's `checkpoint/`, Megatron's and
        // DeepSpeed's latest markers).
        let run = match discover_run(&self.config.run_dir) {
            Ok(run) => run,
            Err(Error::EmptyRun { .. }) => return Ok(Vec::new()),
            // A marker being rewritten (Megatron writes it in place): look again next poll.
            Err(Error::BadLatestMarker { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // Checkpoints the framework has not declared complete (non-empty only with a marker).
        let beyond: HashSet<u64> = run
            .beyond_latest()
            .into_iter()
            .filter_map(|e| e.step)
            .collect();
        let marker = run
            .latest
            .as_ref()
            .map_or_else(String::new, |m| m.path.display().to_string());
        let entries = run.series.entries;
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
        let mut found = Vec::new();
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
                let valid = pins::verify(p).is_ok();
                if !valid {
                    remove_any(p);
                }
                valid
            });
            let status = match (pin, &source) {
                (Some(pin), _) => Found::Pinned(pin),
                // The framework has not declared it complete: still being written.
                (None, Some(_)) if beyond.contains(&step) => Found::Incomplete(format!(
                    "newer than the latest complete checkpoint named in {marker}"
                )),
                (None, Some(path)) => match self.tracker.check(&self.config.run_dir, path, step) {
                    Readiness::Ready(ckpt) => {
                        match pins::pin(&ckpt, path, step, &self.pins_dir()) {
                            Ok((pin, kind)) => {
                                sink(&WatchEvent::Pinned { step, kind });
                                Found::Pinned(pin)
                            }
                            // Rotated away between validation and pinning.
                            Err(e) => Found::Incomplete(format!("vanished while pinning: {e}")),
                        }
                    }
                    Readiness::Settling => Found::Settling,
                    Readiness::Incomplete(reason) => Found::Incomplete(reason),
                },
                (None, None) => {
                    Found::Incomplete("its pin was damaged and the trainer's copy is gone".into())
                }
            };
            found.push((step, source, status));
        }
        Ok(found)
    }
}
