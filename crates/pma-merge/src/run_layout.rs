//! Run-level discovery for framework layouts: where a run's checkpoints live, which framework
//! wrote them, and which of them the framework itself calls complete.
//!
//! The step-named folders are found by [`CheckpointSeries::discover`] (the step conventions of
//! [`parse_step`]: `iter_0001000`, `step-1000`, `step1000`, `global_step1000`, ...). On top of
//! that this module knows:
//! - **torchtitan** writes `checkpoint/step-N/` under its dump folder, so a run directory with
//!   no step-named folders of its own but a `checkpoint/` folder is read through it;
//! - **Megatron-LM** writes `latest_checkpointed_iteration.txt` (`1000`, or `release`) into the
//!   run directory only after a checkpoint is complete, and **DeepSpeed** writes `latest`
//!   (`global_step1000`) the same way. A checkpoint newer than the marker is therefore still
//!   being written, or was abandoned: [`RunDiscovery::beyond_latest`] lists them so selection
//!   can skip them before opening anything;
//! - which framework layout the newest checkpoint follows ([`detect_checkpoint`]), for the
//!   `--dry-run` report.

use std::path::{Path, PathBuf};

use pma_format::{detect_checkpoint, DetectedCheckpoint};

use crate::error::{Error, Result};
use crate::series::{parse_step, CheckpointEntry, CheckpointSeries};

/// Megatron's marker of the latest complete checkpoint, in the run directory.
pub const MEGATRON_TRACKER_FILE: &str = "latest_checkpointed_iteration.txt";
/// DeepSpeed's marker of the latest complete checkpoint tag, in its save directory.
pub const DEEPSPEED_LATEST_FILE: &str = "latest";
/// The most bytes of a marker file read: it holds one short line.
const MAX_MARKER_BYTES: u64 = 4096;

/// What a latest-checkpoint marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatestHint {
    /// The latest complete checkpoint is at this step.
    Step(u64),
    /// Megatron's `release`: a converted or released checkpoint in `release/`, no step.
    Release,
}

/// A marker file and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestMarker {
    /// The marker file.
    pub path: PathBuf,
    /// Its content.
    pub hint: LatestHint,
}

/// A run directory, resolved.
#[derive(Debug, Clone)]
pub struct RunDiscovery {
    /// The folder whose children are the checkpoints (the run dir, or its `checkpoint/`).
    pub checkpoints_dir: PathBuf,
    /// The step-named checkpoints, oldest first.
    pub series: CheckpointSeries,
    /// The framework's latest-complete marker, if the run has one.
    pub latest: Option<LatestMarker>,
    /// The layout of the newest checkpoint whose layout is recognised, if any.
    pub layout: Option<DetectedCheckpoint>,
}

impl RunDiscovery {
    /// Checkpoints newer than the marker's step: the framework has not declared them complete.
    /// Empty without a marker, or with `release`.
    pub fn beyond_latest(&self) -> Vec<&CheckpointEntry> {
        let Some(LatestMarker {
            hint: LatestHint::Step(latest),
            ..
        }) = self.latest
        else {
            return Vec::new();
        };
        self.series
            .entries
            .iter()
            .filter(|e| e.step.is_some_and(|s| s > latest))
            .collect()
    }
}

/// Reads a latest-checkpoint marker: `1000`, `release`, or a step-named tag
/// (`global_step1000`, `iter_0001000`). `Ok(None)` if the file does not exist.
pub fn read_latest_marker(path: &Path) -> Result<Option<LatestMarker>> {
    if !pma_format::remote::probe_file(path)? {
        return Ok(None);
    }
    // Larger than a marker can be: read as empty, which the parse below refuses.
    let text = pma_format::remote::read_bounded(path, MAX_MARKER_BYTES)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let line = text.trim();
    let hint = if line == "release" {
        Some(LatestHint::Release)
    } else if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) {
        line.parse().ok().map(LatestHint::Step)
    } else {
        parse_step(line).map(LatestHint::Step)
    };
    match hint {
        Some(hint) => Ok(Some(LatestMarker {
            path: path.into(),
            hint,
        })),
        None => Err(Error::BadLatestMarker {
            path: path.into(),
            content: line.chars().take(64).collect(),
        }),
    }
}

/// Resolves a run directory (local, or an object-store prefix listed instead): finds its checkpoints (through `checkpoint/` for torchtitan),
/// reads Megatron's or DeepSpeed's latest marker, and detects the newest checkpoint's layout.
pub fn discover_run(run_dir: &Path) -> Result<RunDiscovery> {
    let (checkpoints_dir, series) = match CheckpointSeries::discover(run_dir) {
        Ok(series) => (run_dir.to_path_buf(), series),
        Err(Error::EmptyRun { .. })
            if pma_format::remote::is_dir(&run_dir.join("checkpoint")).unwrap_or(false) =>
        {
            let dir = run_dir.join("checkpoint");
            let series = CheckpointSeries::discover(&dir)?;
            (dir, series)
        }
        Err(e) => return Err(e),
    };
    let mut latest = read_latest_marker(&checkpoints_dir.join(MEGATRON_TRACKER_FILE))?;
    if latest.is_none() {
        latest = read_latest_marker(&checkpoints_dir.join(DEEPSPEED_LATEST_FILE))?;
    }
    let layout = series
        .entries
        .iter()
        .rev()
        .find_map(|e| detect_checkpoint(&e.path).ok());
    Ok(RunDiscovery {
        checkpoints_dir,
        series,
        latest,
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures")
            .join(name)
    }

    fn steps(run: &RunDiscovery) -> Vec<Option<u64>> {
        run.series.entries.iter().map(|e| e.step).collect()
    }

    fn touch(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
    }

    #[test]
    fn megatron_fixture_run() {
        let dir = fixture("dcp/run-megatron");
        let run = discover_run(&dir).unwrap();
        assert_eq!(steps(&run), [Some(100), Some(200), Some(300), Some(400)]);
        assert_eq!(
            run.latest,
            Some(LatestMarker {
                path: dir.join(MEGATRON_TRACKER_FILE),
                hint: LatestHint::Step(400)
            })
        );
        assert!(run.beyond_latest().is_empty());
        assert_eq!(run.layout.unwrap().to_string(), "Megatron torch_dist");
    }

    #[test]
    fn megatron_step_beyond_tracker_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        touch(
            dir.path(),
            &[
                "iter_0000100/.metadata",
                "iter_0000200/.metadata",
                "iter_0000300/__0_0.distcp",
            ],
        );
        fs::write(dir.path().join(MEGATRON_TRACKER_FILE), "200\n").unwrap();
        let run = discover_run(dir.path()).unwrap();
        let beyond: Vec<_> = run.beyond_latest().iter().map(|e| e.step).collect();
        assert_eq!(beyond, [Some(300)]);
        fs::write(dir.path().join(MEGATRON_TRACKER_FILE), "release").unwrap();
        let run = discover_run(dir.path()).unwrap();
        assert_eq!(run.latest.unwrap().hint, LatestHint::Release);
        fs::write(dir.path().join(MEGATRON_TRACKER_FILE), "iter twelve").unwrap();
        let err = discover_run(dir.path()).unwrap_err();
        assert!(
            matches!(&err, Error::BadLatestMarker { content, .. } if content == "iter twelve"),
            "{err}"
        );
    }

    #[test]
    fn torchtitan_run_dir_is_parent_of_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        touch(
            dir.path(),
            &[
                "checkpoint/step-10/.metadata",
                "checkpoint/step-20/.metadata",
                "tb/events",
            ],
        );
        let run = discover_run(dir.path()).unwrap();
        assert_eq!(run.checkpoints_dir, dir.path().join("checkpoint"));
        assert_eq!(steps(&run), [Some(10), Some(20)]);
        assert_eq!(run.layout.unwrap().to_string(), "torchtitan DCP");
        assert!(run.latest.is_none());
        // Pointing at checkpoint/ directly works too.
        let run = discover_run(&dir.path().join("checkpoint")).unwrap();
        assert_eq!(steps(&run), [Some(10), Some(20)]);
        // Neither step folders nor checkpoint/: the usual empty-run error.
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            discover_run(empty.path()),
            Err(Error::EmptyRun { .. })
        ));
    }

    #[test]
    fn olmo_and_accelerate_fixture_runs() {
        let run = discover_run(&fixture("dcp-extra/run-olmo")).unwrap();
        assert_eq!(steps(&run), [Some(100), Some(200)]);
        assert_eq!(run.layout.unwrap().to_string(), "OLMo-core DCP");
        let run = discover_run(&fixture("dcp-extra/run-accelerate")).unwrap();
        assert_eq!(steps(&run), [Some(100), Some(200)]);
        assert_eq!(run.layout.unwrap().to_string(), "accelerate FSDP DCP");
    }

    #[test]
    fn deepspeed_run_with_latest() {
        let dir = tempfile::tempdir().unwrap();
        touch(
            dir.path(),
            &[
                "global_step5/mp_rank_00_model_states.pt",
                "global_step10/mp_rank_00_model_states.pt",
                "global_step15/mp_rank_00_model_states.pt",
            ],
        );
        fs::write(dir.path().join(DEEPSPEED_LATEST_FILE), "global_step10").unwrap();
        let run = discover_run(dir.path()).unwrap();
        assert_eq!(steps(&run), [Some(5), Some(10), Some(15)]);
        assert_eq!(run.latest.as_ref().unwrap().hint, LatestHint::Step(10));
        let beyond: Vec<_> = run.beyond_latest().iter().map(|e| e.step).collect();
        assert_eq!(beyond, [Some(15)]);
        assert_eq!(run.layout.unwrap().to_string(), "DeepSpeed torch.save");
    }
}
