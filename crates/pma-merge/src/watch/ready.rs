//! Deciding when a checkpoint the trainer is writing is complete.
//!
//! A checkpoint is taken only when all of these hold:
//! - it has *settled*: this watcher has seen the same file names, sizes, mtimes and ctimes on
//!   two looks at least the settle interval apart, measured on the local monotonic clock
//!   ([`Instant`]). The mtimes are compared with each other, never with the local time: on a
//!   network filesystem they come from the file server's clock, which may be minutes off, and
//!   a wall clock can jump. A checkpoint that already validates while it settles is reported
//!   as such ([`ReadinessTracker::settling_complete`]), so `--once` waits out its settle
//!   interval instead of returning with nothing processed;
//! - the `--ready-file` marker, if one is asked for, exists: inside the checkpoint
//!   (`trainer_state.json` for the HF Trainer), or in the run directory holding a step number at
//!   least the checkpoint's (Megatron's `latest_checkpointed_iteration.txt`);
//! - it opens and validates in its own format, detected as `pma merge` detects it
//!   ([`AnyCheckpoint::open`]):
//!   - safetensors: every file its index names exists, every header is valid and every file
//!     length matches its header;
//!   - torch DCP: `.metadata` exists (torch renames it into place last) and every byte range
//!     it names exists in its `.distcp` file;
//!   - torch.save: every zip (and the `.bin` index's shards) opens and every storage it names
//!     lies inside it.
//!
//! The settle snapshot covers the files of the checkpoint folder and of its subfolders
//! (OLMo-core's `model_and_optim/`, Megatron's `mp_rank_00/`), hidden files included: DCP's
//! `.metadata` is one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pma_format::AnyCheckpoint;

/// What a look at one checkpoint found.
#[derive(Debug)]
pub enum Readiness {
    /// Complete and validated.
    Ready(AnyCheckpoint),
    /// Still changing (or too recently changed): look again later.
    Settling,
    /// Settled but not usable (missing shard, truncated file, no ready marker).
    Incomplete(String),
}

/// (name, length, mtime, ctime) of every file that makes up a checkpoint.
type Snapshot = Vec<(String, u64, i128, i128)>;

/// Remembers what each pending checkpoint looked like, to tell when it stops changing.
#[derive(Debug)]
pub struct ReadinessTracker {
    settle: Duration,
    ready_file: Option<String>,
    seen: HashMap<PathBuf, (Snapshot, Instant)>,
    settling_complete: bool,
}

impl ReadinessTracker {
    /// A tracker with a settle interval and an optional ready marker.
    pub fn new(settle: Duration, ready_file: Option<String>) -> ReadinessTracker {
        ReadinessTracker {
            settle,
            ready_file,
            seen: HashMap::new(),
            settling_complete: false,
        }
    }

    /// Looks at the checkpoint at `path` (step `step`) in `run_dir`.
    pub fn check(&mut self, run_dir: &Path, path: &Path, step: u64) -> Readiness {
        self.settling_complete = false;
        if !self.settled(path) {
            // Worth waiting for (`--once`) only if it would be taken once settled.
            self.settling_complete = self
                .ready_file
                .as_ref()
                .is_none_or(|m| marker_present(run_dir, path, m, step))
                && AnyCheckpoint::open(path).is_ok();
            return Readiness::Settling;
        }
        if let Some(marker) = &self.ready_file {
            if !marker_present(run_dir, path, marker, step) {
                return Readiness::Incomplete(format!("ready file '{marker}' not present"));
            }
        }
        match AnyCheckpoint::open(path) {
            Ok(ckpt) => {
                self.seen.remove(path);
                Readiness::Ready(ckpt)
            }
            Err(e) => Readiness::Incomplete(e.to_string()),
        }
    }

    /// Whether the last [`Readiness::Settling`] answer was for a checkpoint that already
    /// validates and has its marker: it only needs its settle interval to pass.
    pub fn settling_complete(&self) -> bool {
        self.settling_complete
    }

    /// Forgets a checkpoint (taken or skipped).
    pub fn forget(&mut self, path: &Path) {
        self.seen.remove(path);
    }

    fn settled(&mut self, path: &Path) -> bool {
        if self.settle.is_zero() {
            return true;
        }
        let snap = snapshot(path);
        let now = Instant::now();
        match self.seen.get(path) {
            Some((prev, since)) if *prev == snap => now.duration_since(*since) >= self.settle,
            _ => {
                self.seen.insert(path.to_path_buf(), (snap, now));
                false
            }
        }
    }
}

/// How deep the settle snapshot looks into a checkpoint folder: deep enough for every
/// framework layout (`stepN/model_and_optim/`, `iter_N/mp_rank_00/`, `checkpoint-N/global_stepN/`).
const SNAPSHOT_DEPTH: usize = 3;
/// The most files a settle snapshot records; a folder holding more is not a checkpoint the
/// snapshot can tell apart anyway, and the validation still runs.
const SNAPSHOT_MAX_FILES: usize = 10_000;

fn snapshot(path: &Path) -> Snapshot {
    let describe = |p: &Path, name: String| {
        p.metadata().ok().filter(|m| m.is_file()).map(|m| {
            let s = pma_format::FileStamp::of(&m);
            (name, s.n_bytes, s.mtime_ns, s.ctime_ns)
        })
    };
    if path.is_file() {
        return describe(path, String::new()).into_iter().collect();
    }
    let mut snap: Snapshot = Vec::new();
    let mut dirs = vec![(path.to_path_buf(), String::new(), 0)];
    while let Some((dir, prefix, depth)) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if snap.len() >= SNAPSHOT_MAX_FILES {
                break;
            }
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            // Folders are walked by their own entry type: a symlink to a folder is not
            // followed (it could loop), a symlinked file is described by what it points to.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                if depth + 1 < SNAPSHOT_DEPTH {
                    dirs.push((entry.path(), format!("{name}/"), depth + 1));
                }
            } else if let Some(d) = describe(&entry.path(), name) {
                snap.push(d);
            }
        }
    }
    snap.sort();
    snap
}

fn marker_present(run_dir: &Path, ckpt: &Path, marker: &str, step: u64) -> bool {
    if ckpt.is_dir() && ckpt.join(marker).exists() {
        return true;
    }
    std::fs::read_to_string(run_dir.join(marker))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|latest| latest >= step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_settle_after_the_interval_only() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step-1");
        std::fs::create_dir(&ck).unwrap();
        std::fs::write(ck.join("model.safetensors"), b"x").unwrap();
        let mut t = ReadinessTracker::new(Duration::from_millis(300), None);
        assert!(!t.settled(&ck), "fresh files are not settled");
        std::thread::sleep(Duration::from_millis(150));
        assert!(!t.settled(&ck));
        // Growth restarts the clock.
        std::fs::write(ck.join("model.safetensors"), b"xy").unwrap();
        assert!(!t.settled(&ck));
        std::thread::sleep(Duration::from_millis(350));
        assert!(t.settled(&ck));
    }

    #[test]
    fn settle_missed_writes_inside_framework_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step100");
        let inner = ck.join("model_and_optim");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("__0_0.distcp"), b"x").unwrap();
        let mut t = ReadinessTracker::new(Duration::from_millis(200), None);
        assert!(!t.settled(&ck));
        std::thread::sleep(Duration::from_millis(250));
        // OLMo-core writes `.metadata` into the subfolder last: the clock restarts.
        std::fs::write(inner.join(".metadata"), b"m").unwrap();
        assert!(
            !t.settled(&ck),
            "a new file in model_and_optim/ is a change"
        );
        let snap = snapshot(&ck);
        let names: Vec<&str> = snap.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            ["model_and_optim/.metadata", "model_and_optim/__0_0.distcp"]
        );
    }

    #[test]
    fn incomplete_dcp_checkpoints_are_not_taken() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../pma-format/tests/fixtures/dcp/run-single/step-0000100");
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step-0000100");
        std::fs::create_dir(&ck).unwrap();
        for e in std::fs::read_dir(&fixture).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
        }
        let mut t = ReadinessTracker::new(Duration::ZERO, None);
        assert!(matches!(
            t.check(dir.path(), &ck, 100),
            Readiness::Ready(AnyCheckpoint::Dcp(_))
        ));
        // A `.distcp` still missing (torch writes them before `.metadata`, but a copy or a
        // rank that died can leave the metadata without its data).
        let data = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "distcp"))
            .unwrap();
        let bytes = std::fs::read(&data).unwrap();
        std::fs::remove_file(&data).unwrap();
        assert!(matches!(
            t.check(dir.path(), &ck, 100),
            Readiness::Incomplete(_)
        ));
        // Truncated: a byte range past its end.
        std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            t.check(dir.path(), &ck, 100),
            Readiness::Incomplete(_)
        ));
        // Every `.distcp` there but no `.metadata` yet.
        std::fs::write(&data, &bytes).unwrap();
        std::fs::remove_file(ck.join(".metadata")).unwrap();
        assert!(matches!(
            t.check(dir.path(), &ck, 100),
            Readiness::Incomplete(_)
        ));
    }

    #[test]
    fn settle_trusted_the_file_servers_clock() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step-1");
        std::fs::create_dir(&ck).unwrap();
        let f = std::fs::File::create(ck.join("model.safetensors")).unwrap();
        // A file server whose clock runs an hour behind ours: the mtime looks old at once.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        f.set_modified(old).unwrap();
        let mut t = ReadinessTracker::new(Duration::from_millis(200), None);
        assert!(!t.settled(&ck), "one look is never enough");
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.settled(&ck));
    }

    #[test]
    fn megatron_marker_in_run_dir_counts_for_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("iter_0000200");
        std::fs::create_dir(&ck).unwrap();
        let m = "latest_checkpointed_iteration.txt";
        assert!(!marker_present(dir.path(), &ck, m, 200));
        std::fs::write(dir.path().join(m), b"100\n").unwrap();
        assert!(!marker_present(dir.path(), &ck, m, 200));
        std::fs::write(dir.path().join(m), b"200\n").unwrap();
        assert!(marker_present(dir.path(), &ck, m, 200));
    }
}
