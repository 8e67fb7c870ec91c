//! Finding a run's checkpoints and choosing the window to merge.
//!
//! A run directory holds one subdirectory per checkpoint. Trainers name them differently, so the
//! step is parsed from every convention in use: `step-1000` / `step1000` / `step_1000`,
//! `checkpoint-1000` (HF Trainer), `iter_0001000` (Megatron), `global_step1000` (DeepSpeed).
//! A checkpoint is only *selected* once it opens and validates; an incomplete one (missing shard,
//! truncated file, unreadable header) is skipped with a warning and the window reaches further
//! back, so a checkpoint that is still being written is never merged.

use std::path::{Path, PathBuf};

use pma_format::AnyCheckpoint;

use crate::error::{Error, Result};
use crate::plan::MergeInput;

/// A checkpoint found in a run directory, not yet opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// Its training step, if the name carries one.
    pub step: Option<u64>,
    /// Its path.
    pub path: PathBuf,
}

/// A checkpoint passed over during selection, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The checkpoint.
    pub path: PathBuf,
    /// The validation error, as text.
    pub reason: String,
}

/// Parses the training step from a checkpoint directory or file name.
pub fn parse_step(name: &str) -> Option<u64> {
    let name = name.strip_suffix(".safetensors").unwrap_or(name);
    const PREFIXES: &[&str] = &["global_step", "checkpoint", "step", "iter", "ckpt"];
    for prefix in PREFIXES {
        if let Some(rest) = name.strip_prefix(prefix) {
            let digits = rest.strip_prefix(['-', '_']).unwrap_or(rest);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return digits.parse().ok();
            }
        }
    }
    None
}

/// The checkpoints of one run, ordered by step (oldest first).
#[derive(Debug, Clone)]
pub struct CheckpointSeries {
    /// Entries ordered oldest to newest.
    pub entries: Vec<CheckpointEntry>,
}

impl CheckpointSeries {
    /// Lists the step-named subdirectories (and step-named `.safetensors` files) of `run_dir`, a
    /// local directory or an object-store prefix.
    pub fn discover(run_dir: &Path) -> Result<CheckpointSeries> {
        // One listing for local directories and object-store prefixes (`s3://b/run`) alike.
        let mut entries = Vec::new();
        for entry in pma_format::remote::list_dir(run_dir)? {
            let name = entry.name;
            if name.starts_with('.') {
                continue; // staging dirs (ours and others') are never checkpoints
            }
            let is_ckpt_file =
                entry.kind == pma_format::EntryKind::File && name.ends_with(".safetensors");
            if !(entry.kind == pma_format::EntryKind::Dir || is_ckpt_file) {
                continue;
            }
            if let Some(step) = parse_step(&name) {
                entries.push(CheckpointEntry {
                    step: Some(step),
                    path: entry.path,
                });
            }
        }
        if entries.is_empty() {
            return Err(Error::EmptyRun {
                path: run_dir.into(),
            });
        }
        entries.sort_by_key(|e| e.step);
        Ok(CheckpointSeries { entries })
    }

    /// Explicit checkpoints, in the order given (oldest first). Steps are parsed from names.
    pub fn from_paths(paths: &[PathBuf]) -> CheckpointSeries {
        let entries = paths
            .iter()
            .map(|p| CheckpointEntry {
                step: p.file_name().and_then(|n| parse_step(&n.to_string_lossy())),
                path: p.clone(),
            })
            .collect();
        CheckpointSeries { entries }
    }
}

/// Which checkpoints of a series to merge. All counts are in checkpoints, all spans in steps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Keep the newest N.
    pub last: Option<usize>,
    /// Keep only checkpoints whose step is a multiple of V back from the newest selected.
    pub every: Option<u64>,
    /// The window ends at the newest checkpoint with step ≤ this.
    pub at: Option<u64>,
    /// Accept as few as this many when fewer than `last` qualify.
    pub min: Option<usize>,
}

/// The outcome of selection: the chosen checkpoints, opened, oldest first.
#[derive(Debug)]
pub struct Selected {
    /// (step, checkpoint), oldest first.
    pub checkpoints: Vec<(Option<u64>, AnyCheckpoint)>,
    /// Incomplete or invalid checkpoints passed over.
    pub skipped: Vec<Skipped>,
}

impl Selected {
    /// The chosen checkpoints as merge inputs, oldest first: what [`MergePlan::build`] takes.
    ///
    /// [`MergePlan::build`]: crate::MergePlan::build
    pub fn into_inputs(self) -> (Vec<MergeInput>, Vec<Skipped>) {
        let inputs = self
            .checkpoints
            .into_iter()
            .map(|(step, checkpoint)| MergeInput { step, checkpoint })
            .collect();
        (inputs, self.skipped)
    }
}

impl Selection {
    /// Chooses and opens checkpoints from `series`. With `skip_invalid`, checkpoints that fail
    /// to open are skipped (run discovery); otherwise the first failure is an error (explicit
    /// paths, where the user named exactly what to merge).
    pub fn select(&self, series: &CheckpointSeries, skip_invalid: bool) -> Result<Selected> {
        if self.every == Some(0) {
            return Err(Error::InvalidSelection(
                "the step interval (every) must be positive".into(),
            ));
        }
        if self.last == Some(0) {
            return Err(Error::InvalidSelection(
                "the window size (last) must be positive".into(),
            ));
        }
        let needs_steps = self.every.is_some() || self.at.is_some();
        if needs_steps {
            if let Some(e) = series.entries.iter().find(|e| e.step.is_none()) {
                return Err(Error::NoStep {
                    path: e.path.clone(),
                });
            }
        }
        let mut chosen: Vec<(Option<u64>, AnyCheckpoint)> = Vec::new();
        let mut skipped = Vec::new();
        let mut anchor: Option<u64> = None;
        for entry in series.entries.iter().rev() {
            if let (Some(at), Some(step)) = (self.at, entry.step) {
                if step > at {
                    continue;
                }
            }
            if let (Some(every), Some(newest), Some(step)) = (self.every, anchor, entry.step) {
                if (newest - step) % every != 0 {
                    continue;
                }
            }
            if self.last.is_some_and(|n| chosen.len() >= n) {
                break;
            }
            match AnyCheckpoint::open(&entry.path) {
                Ok(ckpt) => {
                    if anchor.is_none() {
                        anchor = entry.step;
                    }
                    chosen.push((entry.step, ckpt));
                }
                Err(e) if skip_invalid => skipped.push(Skipped {
                    path: entry.path.clone(),
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        chosen.reverse();
        let wanted = self.last.unwrap_or(chosen.len().max(1));
        let floor = self.min.unwrap_or(wanted).min(wanted).max(1);
        if chosen.len() < floor {
            let mut rules = Vec::new();
            if let Some(at) = self.at {
                rules.push(format!("step <= {at}"));
            }
            if let Some(v) = self.every {
                rules.push(format!("{v} steps apart"));
            }
            if !skipped.is_empty() {
                rules.push(format!("{} incomplete skipped", skipped.len()));
            }
            let detail = if rules.is_empty() {
                String::new()
            } else {
                format!(" ({})", rules.join(", "))
            };
            return Err(Error::NotEnoughCheckpoints {
                wanted,
                found: chosen.len(),
                detail,
            });
        }
        Ok(Selected {
            checkpoints: chosen,
            skipped,
        })
    }
}

/// Parses a token count such as `8B`, `500M`, `1.5k` or `12345`.
pub fn parse_token_count(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1e3),
        (i, 'm' | 'M') => (&s[..i], 1e6),
        (i, 'b' | 'B' | 'g' | 'G') => (&s[..i], 1e9),
        (i, 't' | 'T') => (&s[..i], 1e12),
        _ => (s, 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    let total = v * mult;
    (total.is_finite() && total >= 0.0 && total.fract() == 0.0 && total < 1.8e19)
        .then_some(total as u64)
}

/// Parses a byte size such as `5GB` (10^9, as `transformers` reads it), `500MB`, `2GiB` or `1024`.
pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1048576.0,
        "GIB" => 1073741824.0,
        "TIB" => 1099511627776.0,
        _ => return None,
    };
    let v: f64 = num.trim().parse().ok()?;
    let total = (v * mult).round();
    (1.0..1.8e19).contains(&total).then_some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_conventions() {
        assert_eq!(parse_step("step-1000"), Some(1000));
        assert_eq!(parse_step("step1000"), Some(1000));
        assert_eq!(parse_step("step_0001000"), Some(1000));
        assert_eq!(parse_step("checkpoint-1000"), Some(1000));
        assert_eq!(parse_step("iter_0001000"), Some(1000));
        assert_eq!(parse_step("global_step1000"), Some(1000));
        assert_eq!(parse_step("step-1000.safetensors"), Some(1000));
        assert_eq!(parse_step("stepper"), None);
        assert_eq!(parse_step("step-"), None);
        assert_eq!(parse_step("latest"), None);
        assert_eq!(parse_step("step-99999999999999999999999"), None);
    }

    #[test]
    fn sizes_and_tokens() {
        assert_eq!(parse_byte_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_byte_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_byte_size("100"), Some(100));
        assert_eq!(parse_byte_size("5XB"), None);
        assert_eq!(parse_token_count("8B"), Some(8_000_000_000));
        assert_eq!(parse_token_count("500M"), Some(500_000_000));
        assert_eq!(parse_token_count("1.5k"), Some(1500));
        assert_eq!(parse_token_count("abc"), None);
    }
}
