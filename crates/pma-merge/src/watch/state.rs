//! The watcher's durable state and the one file that commits it.
//!
//! Everything the watcher knows lives under `MERGED_DIR/.pma-watch/`:
//!
//! ```text
//! state.json                      the commit point (small, replaced atomically)
//! pins/step-0001000/              hard links to a checkpoint's files (see `pins`)
//! tensors/state-0000007.safetensors   running sum or EMA (F64/F32), one per generation
//! events.jsonl                    the event log (written by the caller)
//! lock                            flock'd while a watcher runs
//! ```
//!
//! An update never modifies a file that `state.json` refers to. It writes the new tensor state
//! under a new generation's name and fsyncs it, commits the merged output, and only then replaces
//! `state.json` (write to a temp name, fsync, rename, fsync the directory). Old tensor files, pins
//! that left the window and pruned outputs are deleted after that. A SIGKILL at any instant
//! therefore leaves either the old `state.json` with all its files intact, or the new one with all
//! of its files; the leftovers of a half-done update are garbage that [`collect_garbage`] removes
//! on the next start, and the update is simply redone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the `state.json` layout.
pub const STATE_SCHEMA_VERSION: u32 = 1;
/// Name of the commit-point file inside the state dir.
pub const STATE_FILE_NAME: &str = "state.json";
/// Subdirectory of pinned checkpoints.
pub const PINS_DIR: &str = "pins";
/// Subdirectory of tensor state files.
pub const TENSORS_DIR: &str = "tensors";

/// A checkpoint the watcher holds on to (pinned), oldest first in [`WatchState::members`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Training step.
    pub step: u64,
    /// Where the trainer wrote it.
    pub source: PathBuf,
}

/// The committed state of a watcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchState {
    /// [`STATE_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The settings that shape the results (method, window, state dtype); a restart with other
    /// settings is refused rather than mixing two averages.
    pub settings: String,
    /// Incremented by every committed update.
    pub generation: u64,
    /// Every step counted so far, in order. The kill test checks it has no duplicates or gaps.
    pub processed: Vec<u64>,
    /// Checkpoints kept pinned for future windows, oldest first.
    pub members: Vec<Member>,
    /// The tensor state file (in `tensors/`), for `--incremental` and `ema-stream`.
    pub tensor_file: Option<String>,
    /// Merged outputs kept in the output dir (names like `step-0001000`), oldest first.
    pub outputs: Vec<String>,
    /// Outputs this state's update pruned (`keep`): deleted right after the commit, and again
    /// by [`collect_garbage`] if a kill came first. The only outputs pma ever deletes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruning: Vec<String>,
}

impl WatchState {
    /// A state that has processed nothing.
    pub fn new(settings: String) -> WatchState {
        WatchState {
            schema_version: STATE_SCHEMA_VERSION,
            settings,
            generation: 0,
            processed: Vec::new(),
            members: Vec::new(),
            tensor_file: None,
            outputs: Vec::new(),
            pruning: Vec::new(),
        }
    }

    /// The newest processed step.
    pub fn last_step(&self) -> Option<u64> {
        self.processed.last().copied()
    }

    /// Loads `state.json` from `dir`, or `None` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<WatchState>> {
        let path = dir.join(STATE_FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, "reading", e)),
        };
        let state: WatchState =
            serde_json::from_slice(&bytes).map_err(|e| Error::WatchStateCorrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.schema_version != STATE_SCHEMA_VERSION {
            return Err(Error::WatchStateCorrupt {
                path,
                reason: format!(
                    "schema_version {} (this pma reads {STATE_SCHEMA_VERSION})",
                    state.schema_version
                ),
            });
        }
        // Names in the state become paths under the state and output dirs: a hand-edited or
        // corrupted `../../x` must never make a later cleanup delete outside them.
        let names = state.tensor_file.iter().chain(&state.outputs);
        if let Some(bad) = names.into_iter().find(|n| !is_plain_name(n)) {
            return Err(Error::WatchStateCorrupt {
                path,
                reason: format!("'{bad}' is not a plain file name"),
            });
        }
        if state.processed.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::WatchStateCorrupt {
                path,
                reason: "processed steps are not strictly increasing".into(),
            });
        }
        Ok(Some(state))
    }

    /// Replaces `state.json` in `dir` atomically and durably: the commit point of an update.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE_NAME);
        let bytes = serde_json::to_vec_pretty(self).expect("the state always serializes");
        Ok(pma_format::write_file_atomic(
            &path,
            &bytes,
            pma_format::Publish::Replace,
        )?)
    }
}

/// Whether `name` is one normal path component: not empty, no `/`, not `.` or `..`, no NUL.
fn is_plain_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(n)), None) if n == name
    ) && !name.contains('\0')
}

/// Name of the tensor state file of `generation`.
pub fn tensor_file_name(generation: u64) -> String {
    format!("state-{generation:07}.safetensors")
}

/// Name of the output (and pin) directory of `step`: `step-` and at least seven digits.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:07}")
}

/// Removes what a killed update left behind: temp files, tensor files and pins the committed
/// state does not use (pins of steps not yet processed are kept: they are complete, renamed
/// into place, and may be the only copy left once the trainer rotates), and outputs that the
/// state records as pruned but that a kill left in place. In the output dir it deletes nothing
/// else: a `step-*` it does not find in `pruning` may be anyone's.
pub fn collect_garbage(state_dir: &Path, out_dir: &Path, state: &WatchState) -> Result<()> {
    let _ = std::fs::remove_file(state_dir.join(format!(".{STATE_FILE_NAME}.tmp")));
    let tensors = state_dir.join(TENSORS_DIR);
    for name in list_names(&tensors)? {
        if state.tensor_file.as_deref() != Some(name.as_str()) {
            remove_any(&tensors.join(&name));
        }
    }
    let pins = state_dir.join(PINS_DIR);
    let kept: BTreeSet<u64> = state.members.iter().map(|m| m.step).collect();
    let last = state.last_step();
    for name in list_names(&pins)? {
        let keep = match crate::series::parse_step(&name) {
            Some(step) if !name.starts_with('.') => {
                kept.contains(&step) || last.is_none_or(|l| step > l)
            }
            _ => false,
        };
        if !keep {
            remove_any(&pins.join(&name));
        }
    }
    let outputs: BTreeSet<&str> = state.outputs.iter().map(String::as_str).collect();
    let pruning: BTreeSet<&str> = state.pruning.iter().map(String::as_str).collect();
    for name in list_names(out_dir)? {
        if name.starts_with(".step-") && name.contains(".pma-tmp-") {
            remove_any(&out_dir.join(&name)); // a staged output of a killed update
            continue;
        }
        if pruning.contains(name.as_str()) && !outputs.contains(name.as_str()) {
            remove_any(&out_dir.join(&name));
        }
    }
    Ok(())
}

/// File names in `dir` (empty when it does not exist).
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, "listing", e)),
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| io_error(dir, "listing", e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Removes a file or a directory tree, ignoring what is already gone.
pub(crate) fn remove_any(path: &Path) {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// fsyncs a directory so renames and new entries in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(dir, "syncing directory", e))
}

/// Creates `dir` and its parents.
pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating", e))
}

pub(crate) fn io_error(path: &Path, action: &'static str, source: std::io::Error) -> Error {
    pma_format::Error::Io {
        path: PathBuf::from(path),
        action,
        source,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        assert!(WatchState::load(dir.path()).unwrap().is_none());
        let mut s = WatchState::new("sma n=4".into());
        s.processed = vec![100, 200];
        s.members.push(Member {
            step: 200,
            source: "run/step-200".into(),
        });
        s.save(dir.path()).unwrap();
        assert_eq!(WatchState::load(dir.path()).unwrap(), Some(s));
        assert_eq!(list_names(dir.path()).unwrap(), vec![STATE_FILE_NAME]);
    }

    #[test]
    fn corrupt_state_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE_NAME), b"{\"schema_version\":").unwrap();
        let e = WatchState::load(dir.path()).unwrap_err();
        assert!(matches!(e, Error::WatchStateCorrupt { .. }), "{e}");
    }

    #[test]
    fn state_entries_were_used_as_paths_unchecked() {
        for bad in ["../../victim", "/etc", "a/b", "..", ".", ""] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = WatchState::new(String::new());
            s.outputs = vec![bad.into()];
            s.save(dir.path()).unwrap();
            let e = WatchState::load(dir.path()).unwrap_err();
            assert!(
                matches!(&e, Error::WatchStateCorrupt { reason, .. } if reason.contains("plain")),
                "{bad}: {e}"
            );
            let mut s = WatchState::new(String::new());
            s.tensor_file = Some(bad.into());
            s.save(dir.path()).unwrap();
            assert!(WatchState::load(dir.path()).is_err(), "{bad}");
        }
        assert!(is_plain_name("step-0000100"));
        assert!(is_plain_name("state-0000001.safetensors"));
    }

    #[test]
    fn garbage_collection_keeps_committed_and_pending() {
        let root = tempfile::tempdir().unwrap();
        let sd = root.path().join(".pma-watch");
        for p in [
            "pins/step-0000100",
            "pins/step-0000200",
            "pins/step-0000300",
            "pins/.step-0000400.pma-tmp",
            "tensors",
        ] {
            std::fs::create_dir_all(sd.join(p)).unwrap();
        }
        std::fs::write(sd.join("tensors/state-0000001.safetensors"), b"").unwrap();
        std::fs::write(sd.join("tensors/state-0000002.safetensors"), b"").unwrap();
        for o in ["step-0000100", "step-0000200", ".step-0000300.pma-tmp-1-2"] {
            std::fs::create_dir_all(root.path().join(o)).unwrap();
        }
        let mut s = WatchState::new(String::new());
        s.processed = vec![100, 200];
        s.members = vec![Member {
            step: 200,
            source: "x".into(),
        }];
        s.tensor_file = Some(tensor_file_name(1));
        s.outputs = vec!["step-0000200".into()];
        s.pruning = vec!["step-0000100".into()];
        collect_garbage(&sd, root.path(), &s).unwrap();
        assert_eq!(
            list_names(&sd.join(PINS_DIR)).unwrap(),
            vec!["step-0000200", "step-0000300"]
        );
        assert_eq!(
            list_names(&sd.join(TENSORS_DIR)).unwrap(),
            vec!["state-0000001.safetensors"]
        );
        assert_eq!(
            list_names(root.path()).unwrap(),
            vec![".pma-watch", "step-0000200"]
        );
    }

    #[test]
    fn garbage_collection_never_deletes_a_step_dir_the_state_does_not_record_as_pruned() {
        // Issue 11: a watcher pointed at a run dir (or any dir with others' step-* entries)
        // deleted every step-* at or below its last step that was not one of its outputs.
        let root = tempfile::tempdir().unwrap();
        let sd = root.path().join(".pma-watch");
        std::fs::create_dir_all(sd.join(PINS_DIR)).unwrap();
        std::fs::create_dir_all(sd.join(TENSORS_DIR)).unwrap();
        for o in ["step-0000050", "step-0000100", "checkpoint-100"] {
            std::fs::create_dir_all(root.path().join(o)).unwrap();
        }
        let mut s = WatchState::new(String::new());
        s.processed = vec![100, 200];
        collect_garbage(&sd, root.path(), &s).unwrap();
        assert_eq!(
            list_names(root.path()).unwrap(),
            vec![
                ".pma-watch",
                "checkpoint-100",
                "step-0000050",
                "step-0000100"
            ]
        );
    }
}
