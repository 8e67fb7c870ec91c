//! One update: fold a newly pinned checkpoint into the averaging state and commit.
//!
//! [`Watcher::update`] prepares the next state, asks the mode's update function for an
//! [`Outcome`], then commits: the tensor state and output are already durable, so replacing
//! `state.json` is the commit point, and only after it are old tensor files, pins that left the
//! window and pruned outputs removed. Each mode has its own function:
//! - [`Watcher::update_window`]: a fresh `pma merge` of the window from the pins;
//! - [`Watcher::update_incremental_sma`]: a running f64 sum, plus the new, minus the leaving;
//! - [`Watcher::update_ema_stream`]: `E = (1−α)·E + α·x`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use pma_format::{AnyCheckpoint, FloatDtype, OutputKind, Publish, SafetensorsFile, StagedOutput};

use super::config::Averaging;
use super::event::WatchEvent;
use super::pins;
use super::poll::Watcher;
use super::provenance::{rewrite_provenance, stream_provenance};
use super::state::{
    remove_any, step_dir_name, sync_dir, tensor_file_name, Member, WatchState, TENSORS_DIR,
};
use super::stream::{self, StreamRule};
use crate::error::{Error, Result};
use crate::executor::{execute, ExecOptions};
use crate::plan::{MergeConfig, MergePlan};
use crate::progress::NoProgress;
use crate::series::{CheckpointEntry, CheckpointSeries, Selection};
use crate::weights::WeightSpec;

/// What a mode's update produced.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// The checkpoint was counted; the window is still too small for an output.
    Counted,
    /// An output was written (not yet committed to the state).
    Written(Written),
}

/// An output an update wrote.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Written {
    /// Steps of the members, oldest first (for ema-stream: just the new one).
    pub(super) members: Vec<u64>,
    /// Their weights (empty for ema-stream).
    pub(super) weights: Vec<f64>,
    /// Bytes read.
    pub(super) read_bytes: u64,
    /// Bytes written: output plus tensor state.
    pub(super) written_bytes: u64,
}

/// The parts of a stream update that differ between incremental SMA and ema-stream.
struct StreamStep<'a> {
    rule: StreamRule,
    state_dtype: FloatDtype,
    /// The checkpoint leaving the window, subtracted from the sum.
    leaving: Option<u64>,
    /// Whether the update writes an output (the window is full enough).
    emit: bool,
    /// The members the output averages, for its provenance.
    members: &'a [Member],
}

impl Watcher<'_> {
    /// Processes one pinned checkpoint and commits. Returns the output written, if any.
    pub(super) fn update(
        &mut self,
        step: u64,
        pin: &Path,
        source: Option<&Path>,
        sink: &mut dyn FnMut(&WatchEvent),
    ) -> Result<Option<PathBuf>> {
        let started = Instant::now();
        let config = self.config;
        pins::recheck_members(&self.pins_dir(), &mut self.state.members, sink);
        let source = source.map_or_else(|| pin.to_path_buf(), Path::to_path_buf);
        let mut history = self.state.members.clone();
        history.push(Member {
            step,
            source: source.clone(),
        });
        let out_name = step_dir_name(step);
        let out_path = config.out_dir.join(&out_name);
        let mut next = self.state.clone();
        next.generation += 1;
        next.processed.push(step);
        next.pruning.clear();
        let outcome = match &config.averaging {
            Averaging::Window {
                method,
                last,
                every,
                min,
            } => self.update_window(&mut next, &history, &out_path, method, *last, *every, *min)?,
            Averaging::IncrementalSma { last, .. } => {
                self.update_incremental_sma(&mut next, &history, pin, &out_path, *last)?
            }
            Averaging::EmaStream { alpha, state_dtype } => {
                self.update_ema_stream(&mut next, &history, pin, &out_path, *alpha, *state_dtype)?
            }
        };
        if matches!(outcome, Outcome::Written(_)) {
            next.outputs.retain(|o| o != &out_name);
            next.outputs.push(out_name.clone());
            if let Some(k) = config.keep {
                while next.outputs.len() > k {
                    let pruned = next.outputs.remove(0);
                    next.pruning.push(pruned);
                }
            }
        }
        // The commit point. Everything before it is redone after a crash; everything after it
        // only removes what the new state no longer refers to (and records in `pruning`, so a
        // restart finishes the job without guessing what is ours).
        pins::check_unchanged(&self.pins_dir(), &history)?;
        next.save(&self.state_dir)?;
        let old = std::mem::replace(&mut self.state, next);
        if old.tensor_file != self.state.tensor_file {
            if let Some(f) = &old.tensor_file {
                remove_any(&self.state_dir.join(TENSORS_DIR).join(f));
            }
        }
        match &outcome {
            Outcome::Written(w) => sink(&WatchEvent::Merged {
                step,
                output: out_path.clone(),
                members: w.members.clone(),
                weights: w.weights.clone(),
                elapsed_secs: started.elapsed().as_secs_f64(),
                read_bytes: w.read_bytes,
                written_bytes: w.written_bytes,
            }),
            Outcome::Counted => sink(&WatchEvent::Counted {
                step,
                members: self.state.members.len(),
                needed: config.window_floor(),
            }),
        }
        let kept: HashSet<u64> = self.state.members.iter().map(|m| m.step).collect();
        for m in old
            .members
            .iter()
            .chain(std::iter::once(&Member { step, source }))
        {
            if !kept.contains(&m.step) {
                remove_any(&self.pins_dir().join(step_dir_name(m.step)));
                sink(&WatchEvent::Unpinned { step: m.step });
            }
        }
        for name in &self.state.pruning {
            let p = config.out_dir.join(name);
            remove_any(&p);
            sink(&WatchEvent::Pruned { output: p });
        }
        Ok(match outcome {
            Outcome::Written(_) => Some(out_path),
            Outcome::Counted => None,
        })
    }

    /// Windowed SMA/EMA/WMA/explicit: a fresh merge of the window's pins, bit-identical to
    /// `pma merge` of the same checkpoints. Sets the members future windows still need.
    #[allow(clippy::too_many_arguments)]
    fn update_window(
        &self,
        next: &mut WatchState,
        history: &[Member],
        out_path: &Path,
        method: &WeightSpec,
        last: Option<usize>,
        every: Option<u64>,
        min: Option<usize>,
    ) -> Result<Outcome> {
        let config = self.config;
        next.members = retain_window(history, last, every.unwrap_or(1), 0);
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
            last,
            every,
            at: None,
            min: Some(min.unwrap_or(last.unwrap_or(1))),
        };
        let selected = match selection.select(&series, false) {
            Ok(selected) => selected,
            Err(Error::NotEnoughCheckpoints { .. }) => return Ok(Outcome::Counted),
            Err(e) => return Err(e),
        };
        let (inputs, _) = selected.into_inputs();
        let steps: Vec<u64> = inputs
            .iter()
            .map(|i| i.step.expect("pins carry steps"))
            .collect();
        let weights = method.weights(inputs.len())?;
        let merge_config = MergeConfig {
            out_dtype: config.out_dtype,
            max_shard_bytes: config.max_shard_bytes,
            single_file: false,
            allow_nonfinite: config.allow_nonfinite,
            // watch writes safetensors whatever its members are.
            format: Some(crate::OutputFormat::Hf),
            keys: config.keys.clone(),
        };
        let mut plan = MergePlan::build(inputs, weights, merge_config)?;
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
            threads: crate::threads::resolve_threads(config.threads)?,
            overwrite: true,
            cancel: None,
            direct_io: config.direct_io,
        };
        let merged = execute(&plan, out_path, &opts, &NoProgress)?;
        Ok(Outcome::Written(Written {
            members: steps,
            weights: plan.weights.values.clone(),
            read_bytes: merged.plan.bytes_read,
            written_bytes: merged.plan.bytes_written,
        }))
    }

    /// Incremental SMA: `S += x_new − x_leaving`, output `S / count`. Without a window size
    /// the sum runs over every checkpoint and nothing ever leaves, so no pin is kept.
    fn update_incremental_sma(
        &self,
        next: &mut WatchState,
        history: &[Member],
        pin: &Path,
        out_path: &Path,
        last: Option<usize>,
    ) -> Result<Outcome> {
        let floor = self.config.window_floor();
        let (leaving, count, kept) = match last {
            Some(n) => (
                (history.len() > n).then(|| history[history.len() - 1 - n].step),
                history.len().min(n),
                retain_window(history, Some(n), 1, 1),
            ),
            None => (None, next.processed.len(), Vec::new()),
        };
        let window = &history[history.len() - count.min(history.len())..];
        let emit = count >= floor;
        let (read, written) = self.stream_update(
            next,
            pin,
            out_path,
            StreamStep {
                rule: StreamRule::Sum {
                    divisor: count as f64,
                },
                state_dtype: FloatDtype::F64,
                leaving,
                emit,
                members: window,
            },
        )?;
        next.members = kept;
        if !emit {
            return Ok(Outcome::Counted);
        }
        let members: Vec<u64> = match last {
            Some(_) => window.iter().map(|m| m.step).collect(),
            None => next.processed.clone(),
        };
        Ok(Outcome::Written(Written {
            members,
            weights: vec![1.0 / count as f64; count],
            read_bytes: read,
            written_bytes: written,
        }))
    }

    /// Streaming EMA over the whole history: `E = (1−α)·E + α·x`; keeps no pins.
    fn update_ema_stream(
        &self,
        next: &mut WatchState,
        history: &[Member],
        pin: &Path,
        out_path: &Path,
        alpha: f64,
        state_dtype: FloatDtype,
    ) -> Result<Outcome> {
        let newest = &history[history.len() - 1..];
        let (read, written) = self.stream_update(
            next,
            pin,
            out_path,
            StreamStep {
                rule: StreamRule::Ema { alpha },
                state_dtype,
                leaving: None,
                emit: true,
                members: newest,
            },
        )?;
        next.members = Vec::new();
        Ok(Outcome::Written(Written {
            members: vec![newest[0].step],
            weights: Vec::new(),
            read_bytes: read,
            written_bytes: written,
        }))
    }

    /// Runs a streaming update into a new tensor state file (recorded in `next`) and, when
    /// `emit`, commits the output. Returns (bytes read, bytes written: state plus output).
    fn stream_update(
        &self,
        next: &mut WatchState,
        pin: &Path,
        out_path: &Path,
        how: StreamStep<'_>,
    ) -> Result<(u64, u64)> {
        let config = self.config;
        // Pins hold any format; a stream reads them through `TensorStore`.
        let new = AnyCheckpoint::open(pin)?;
        let leaving = how
            .leaving
            .map(|s| AnyCheckpoint::open(&self.pins_dir().join(step_dir_name(s))))
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
                "step": how.members.last().map(|m| m.step),
                "settings": next.settings,
            })
            .to_string(),
        );
        let update = stream::StreamUpdate {
            rule: how.rule,
            new: &new,
            leaving: leaving.as_ref(),
            prev: prev.as_ref(),
            state_dtype: how.state_dtype,
            out_dtype: config.out_dtype,
            max_shard_bytes: config.max_shard_bytes,
            out_metadata: stream_provenance(&config.averaging, config.out_dtype, how.members, next),
            state_metadata: state_meta,
            allow_nonfinite: config.allow_nonfinite,
            threads: crate::threads::resolve_threads(config.threads)?,
            keys: &config.keys,
        };
        let stats = stream::run_update(&update, &state_path, staged.path())?;
        sync_dir(&tensors_dir)?;
        if how.emit {
            crate::executor::copy_sidecars(&new, config.out_dtype, staged.path())?;
            staged.commit()?;
        }
        next.tensor_file = Some(file_name);
        Ok((stats.read_bytes, stats.state_bytes + stats.output_bytes))
    }
}

/// The members future windows can still need, oldest first. `spare` extra members are kept
/// beyond what the next window needs (incremental SMA needs the one that will leave).
pub(super) fn retain_window(
    history: &[Member],
    last: Option<usize>,
    every: u64,
    spare: usize,
) -> Vec<Member> {
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
}
