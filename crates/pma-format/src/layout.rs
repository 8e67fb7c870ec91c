//! Which checkpoint format a path holds, and which framework's layout it follows.
//!
//! Pre-training frameworks put their weights in different places inside a checkpoint
//! directory. [`detect_checkpoint`] looks only at names (and, for an unnamed file, its first
//! four bytes), opens nothing, and says where the weights are and how to open them:
//!
//! | layout | weights | [`CheckpointFormat`] |
//! |---|---|---|
//! | HF | `model.safetensors` or `model.safetensors.index.json` (rules of [`crate::Checkpoint::open`]) | `Safetensors` |
//! | Megatron `torch_dist` | `iter_N/.metadata` beside `metadata.json` / `common.pt` | `Dcp` |
//! | torchtitan | `checkpoint/step-N/.metadata` | `Dcp` |
//! | OLMo-core | `stepN/model_and_optim/.metadata` | `Dcp` |
//! | accelerate FSDP | `checkpoint-N/pytorch_model_fsdp_0/.metadata` | `Dcp` |
//! | HF (older) | `pytorch_model.bin` or its `.index.json` | `TorchSave` (the directory) |
//! | DeepSpeed | `global_stepN/mp_rank_00_model_states.pt`, or a dir with `latest` naming it | `TorchSave` (the file) |
//! | Megatron legacy | `iter_N/mp_rank_00/model_optim_rng.pt` | `TorchSave` (the file) |
//!
//! The DCP directories are resolved by [`crate::find_dcp_dir`]. A torch.save checkpoint split
//! over model-parallel ranks (`mp_rank_01…`) is refused ([`Error::ModelParallelTorchSave`])
//! rather than silently read as one rank's slice of every tensor.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::checkpoint::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::dcp::find_dcp_dir;
use crate::error::{Error, Result};
use crate::torch_save::{TORCH_BIN_FILE, TORCH_BIN_INDEX_FILE};

/// How to open a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// HF safetensors: open the path with [`crate::Checkpoint::open`].
    Safetensors,
    /// torch.distributed.checkpoint: open `dir` with [`crate::DcpCheckpoint::open`].
    Dcp {
        /// The directory holding `.metadata`.
        dir: PathBuf,
    },
    /// torch.save: open `path` with [`crate::TorchSaveCheckpoint::open`].
    TorchSave {
        /// The `.bin` / `.pt` file, or the directory of `pytorch_model.bin` (and its index).
        path: PathBuf,
    },
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::Dcp { .. } => "DCP",
            CheckpointFormat::TorchSave { .. } => "torch.save",
        })
    }
}

/// The framework layout a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framework {
    /// HF `model.safetensors` (single file, sharded, or a bare `.safetensors` file).
    HfSafetensors,
    /// Megatron-LM `torch_dist` (DCP with `metadata.json` / `common.pt`).
    MegatronTorchDist,
    /// torchtitan DCP (`checkpoint/step-N/`).
    Torchtitan,
    /// OLMo-core DCP (`stepN/model_and_optim/`).
    OlmoCore,
    /// accelerate / FSDP DCP (`pytorch_model_fsdp_0/`).
    AccelerateFsdp,
    /// Any other DCP directory.
    Dcp,
    /// HF `pytorch_model.bin` (single or sharded).
    HfTorchBin,
    /// DeepSpeed `mp_rank_00_model_states.pt`.
    DeepSpeed,
    /// Megatron-LM legacy `model_optim_rng.pt`.
    MegatronLegacy,
    /// Any other torch.save file.
    TorchSave,
}

impl fmt::Display for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framework::HfSafetensors => "HF safetensors",
            Framework::MegatronTorchDist => "Megatron torch_dist",
            Framework::Torchtitan => "torchtitan DCP",
            Framework::OlmoCore => "OLMo-core DCP",
            Framework::AccelerateFsdp => "accelerate FSDP DCP",
            Framework::Dcp => "torch DCP",
            Framework::HfTorchBin => "HF pytorch_model.bin",
            Framework::DeepSpeed => "DeepSpeed torch.save",
            Framework::MegatronLegacy => "Megatron legacy torch.save",
            Framework::TorchSave => "torch.save",
        })
    }
}

/// What [`detect_checkpoint`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedCheckpoint {
    /// How to open it.
    pub format: CheckpointFormat,
    /// Whose layout it is.
    pub framework: Framework,
}

/// Prints the framework layout, e.g. "OLMo-core DCP".
impl fmt::Display for DetectedCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.framework.fmt(f)
    }
}

const LOOKED_FOR: &str = "model.safetensors[.index.json], .metadata (also in model_and_optim/ or pytorch_model_fsdp_0/), pytorch_model.bin[.index.json], global_stepN/mp_rank_00_model_states.pt, mp_rank_00/model_optim_rng.pt, or a .safetensors/.bin/.pt file";

/// Says what kind of checkpoint `path` (a directory or a file) is and where its weights are.
/// Looks at names only; opening and validating is the caller's next step.
pub fn detect_checkpoint(path: &Path) -> Result<DetectedCheckpoint> {
    let found = |format, framework| Ok(DetectedCheckpoint { format, framework });
    if crate::remote::is_url(path) {
        return detect_remote(path);
    }
    if path.is_file() {
        return detect_file(path);
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            "opening",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    if path.join(INDEX_FILE_NAME).is_file() || path.join(SINGLE_FILE_NAME).is_file() {
        return found(CheckpointFormat::Safetensors, Framework::HfSafetensors);
    }
    if let Some(dir) = find_dcp_dir(path) {
        let framework = if dir.file_name().is_some_and(|n| n == "model_and_optim") {
            Framework::OlmoCore
        } else if dir.file_name().is_some_and(|n| n == "pytorch_model_fsdp_0") {
            Framework::AccelerateFsdp
        } else if dir.join("metadata.json").is_file() || dir.join("common.pt").is_file() {
            Framework::MegatronTorchDist
        } else if is_torchtitan_step(&dir) {
            Framework::Torchtitan
        } else {
            Framework::Dcp
        };
        return found(CheckpointFormat::Dcp { dir }, framework);
    }
    if path.join(TORCH_BIN_INDEX_FILE).is_file() || path.join(TORCH_BIN_FILE).is_file() {
        return found(
            CheckpointFormat::TorchSave { path: path.into() },
            Framework::HfTorchBin,
        );
    }
    if let Some(file) = deepspeed_model_file(path)? {
        return found(
            CheckpointFormat::TorchSave { path: file },
            Framework::DeepSpeed,
        );
    }
    if let Some(file) = megatron_legacy_file(path)? {
        return found(
            CheckpointFormat::TorchSave { path: file },
            Framework::MegatronLegacy,
        );
    }
    Err(Error::UnknownCheckpointFormat {
        path: path.into(),
        looked_for: LOOKED_FOR.into(),
    })
}

/// [`detect_checkpoint`] on an object store, by HEAD requests. Only HF safetensors is read
/// from object storage; the other formats are named in a clear refusal.
fn detect_remote(path: &Path) -> Result<DetectedCheckpoint> {
    use crate::remote::probe_file;
    let hf = || {
        Ok(DetectedCheckpoint {
            format: CheckpointFormat::Safetensors,
            framework: Framework::HfSafetensors,
        })
    };
    let refuse = |what: &str| {
        Error::RemoteUnsupported {
        url: path.to_string_lossy().into_owned(),
        reason: format!(
            "{what} on object storage is not supported (only HF safetensors is); copy it to a local or shared filesystem"
        ),
    }
    };
    if probe_file(path)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        return if name.ends_with(".safetensors") {
            hf()
        } else {
            Err(refuse("a torch.save file"))
        };
    }
    if probe_file(&path.join(INDEX_FILE_NAME))? || probe_file(&path.join(SINGLE_FILE_NAME))? {
        return hf();
    }
    if let Some(dir) = find_dcp_dir(path) {
        let framework = if dir.file_name().is_some_and(|n| n == "model_and_optim") {
            Framework::OlmoCore
        } else if dir.file_name().is_some_and(|n| n == "pytorch_model_fsdp_0") {
            Framework::AccelerateFsdp
        } else if probe_file(&dir.join("metadata.json"))? || probe_file(&dir.join("common.pt"))? {
            Framework::MegatronTorchDist
        } else {
            Framework::Dcp
        };
        return Ok(DetectedCheckpoint {
            format: CheckpointFormat::Dcp { dir },
            framework,
        });
    }
    if !crate::remote::is_dir(path)? {
        return Err(Error::Remote {
            url: path.to_string_lossy().into_owned(),
            action: "opening",
            status: Some(404),
            reason: "no such object or prefix".into(),
        });
    }
    Err(Error::UnknownCheckpointFormat {
        path: path.into(),
        looked_for: "model.safetensors[.index.json] or a .safetensors object".into(),
    })
}

fn detect_file(path: &Path) -> Result<DetectedCheckpoint> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let torch = |framework| {
        Ok(DetectedCheckpoint {
            format: CheckpointFormat::TorchSave { path: path.into() },
            framework,
        })
    };
    if name.ends_with(".safetensors") {
        return Ok(DetectedCheckpoint {
            format: CheckpointFormat::Safetensors,
            framework: Framework::HfSafetensors,
        });
    }
    if name.starts_with("mp_rank_") && name.ends_with("_model_states.pt") {
        return torch(Framework::DeepSpeed);
    }
    if name == "model_optim_rng.pt" {
        return torch(Framework::MegatronLegacy);
    }
    if name.starts_with("pytorch_model") && name.ends_with(".bin") {
        return torch(Framework::HfTorchBin);
    }
    if [".pt", ".pth", ".bin"].iter().any(|e| name.ends_with(e)) || starts_with_zip_magic(path)? {
        return torch(Framework::TorchSave);
    }
    Err(Error::UnknownCheckpointFormat {
        path: path.into(),
        looked_for: LOOKED_FOR.into(),
    })
}

fn starts_with_zip_magic(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"PK\x03\x04"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, "reading", e)),
    }
}

/// `…/checkpoint/step-N`: torchtitan's naming.
fn is_torchtitan_step(dir: &Path) -> bool {
    let name_ok = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("step-"));
    let parent_ok = dir
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "checkpoint");
    name_ok && parent_ok
}

/// Names in `dir` that start with `prefix`, sorted.
fn names_with_prefix(dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, "listing", e))? {
        let entry = entry.map_err(|e| Error::io(dir, "listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// DeepSpeed: `dir` is `global_stepN/` holding `mp_rank_00_model_states.pt`, or a directory
/// whose `latest` file names such a folder (DeepSpeed's own save dir, or an HF Trainer
/// checkpoint saved through DeepSpeed).
fn deepspeed_model_file(dir: &Path) -> Result<Option<PathBuf>> {
    let mut tag_dir = dir.to_path_buf();
    let latest = dir.join("latest");
    if latest.is_file() {
        let tag = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, "reading", e))?;
        let tag = tag.trim();
        // A tag is a folder name; anything else (a path, `..`) is not followed.
        if !tag.is_empty() && !tag.contains(['/', '\\']) && tag != ".." && tag != "." {
            tag_dir = dir.join(tag);
        }
    }
    let file = tag_dir.join("mp_rank_00_model_states.pt");
    if !file.is_file() {
        return Ok(None);
    }
    let ranks: Vec<String> = names_with_prefix(&tag_dir, "mp_rank_")?
        .into_iter()
        .filter(|n| n.ends_with("_model_states.pt"))
        .collect();
    refuse_model_parallel(&tag_dir, ranks)?;
    Ok(Some(file))
}

/// Megatron legacy: `dir` is `iter_N/` holding `mp_rank_00/model_optim_rng.pt`.
fn megatron_legacy_file(dir: &Path) -> Result<Option<PathBuf>> {
    let file = dir.join("mp_rank_00").join("model_optim_rng.pt");
    if !file.is_file() {
        return Ok(None);
    }
    let ranks: Vec<String> = names_with_prefix(dir, "mp_rank_")?
        .into_iter()
        .filter(|n| dir.join(n).is_dir())
        .collect();
    refuse_model_parallel(dir, ranks)?;
    Ok(Some(file))
}

fn refuse_model_parallel(dir: &Path, ranks: Vec<String>) -> Result<()> {
    if ranks.len() > 1 {
        return Err(Error::ModelParallelTorchSave {
            path: dir.into(),
            ranks: ranks.len(),
            example: ranks[1].clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn touch(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
    }

    fn detect(p: &Path) -> (CheckpointFormat, String) {
        let d = detect_checkpoint(p).unwrap();
        (d.format.clone(), d.to_string())
    }

    #[test]
    fn dcp_fixtures_name_their_framework() {
        let f = fixtures();
        let megatron = f.join("dcp/run-megatron/iter_0000100");
        assert_eq!(
            detect(&megatron),
            (
                CheckpointFormat::Dcp {
                    dir: megatron.clone()
                },
                "Megatron torch_dist".into()
            )
        );
        let olmo = f.join("dcp-extra/run-olmo/step100");
        assert_eq!(
            detect(&olmo),
            (
                CheckpointFormat::Dcp {
                    dir: olmo.join("model_and_optim")
                },
                "OLMo-core DCP".into()
            )
        );
        let acc = f.join("dcp-extra/run-accelerate/checkpoint-100");
        assert_eq!(
            detect(&acc),
            (
                CheckpointFormat::Dcp {
                    dir: acc.join("pytorch_model_fsdp_0")
                },
                "accelerate FSDP DCP".into()
            )
        );
        let single = f.join("dcp/run-single/step-0000100");
        assert_eq!(detect(&single).1, "torch DCP");
    }

    #[test]
    fn torchtitan_and_safetensors_trees() {
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("checkpoint/step-10");
        touch(&step, &[".metadata", "__0_0.distcp"]);
        assert_eq!(
            detect(&step),
            (
                CheckpointFormat::Dcp { dir: step.clone() },
                "torchtitan DCP".into()
            )
        );
        let hf = dir.path().join("hf");
        touch(&hf, &["model.safetensors", "optimizer.pt"]);
        assert_eq!(
            detect(&hf),
            (CheckpointFormat::Safetensors, "HF safetensors".into())
        );
        // An HF Trainer checkpoint that also holds DeepSpeed state: the HF weights win.
        touch(&hf, &["global_step5/mp_rank_00_model_states.pt", "latest"]);
        assert_eq!(detect(&hf).0, CheckpointFormat::Safetensors);
        let file = hf.join("model.safetensors");
        assert_eq!(detect(&file).0, CheckpointFormat::Safetensors);
    }

    #[test]
    fn torch_save_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        touch(&bin, &["pytorch_model.bin.index.json", "config.json"]);
        assert_eq!(
            detect(&bin),
            (
                CheckpointFormat::TorchSave { path: bin.clone() },
                "HF pytorch_model.bin".into()
            )
        );
        // DeepSpeed, pointed at the tag folder or at the save dir with its `latest`.
        let ds = dir.path().join("ds");
        touch(
            &ds,
            &[
                "global_step7/mp_rank_00_model_states.pt",
                "global_step7/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            ],
        );
        fs::write(ds.join("latest"), "global_step7\n").unwrap();
        let model = ds.join("global_step7/mp_rank_00_model_states.pt");
        for p in [ds.clone(), ds.join("global_step7")] {
            assert_eq!(
                detect(&p),
                (
                    CheckpointFormat::TorchSave {
                        path: model.clone()
                    },
                    "DeepSpeed torch.save".into()
                ),
                "{}",
                p.display()
            );
        }
        assert_eq!(detect(&model).1, "DeepSpeed torch.save");
        // A `latest` that is a path is not followed.
        fs::write(ds.join("latest"), "../elsewhere").unwrap();
        assert!(matches!(
            detect_checkpoint(&ds),
            Err(Error::UnknownCheckpointFormat { .. })
        ));
        // Megatron legacy.
        let iter = dir.path().join("iter_0000100");
        touch(&iter, &["mp_rank_00/model_optim_rng.pt"]);
        assert_eq!(
            detect(&iter),
            (
                CheckpointFormat::TorchSave {
                    path: iter.join("mp_rank_00/model_optim_rng.pt")
                },
                "Megatron legacy torch.save".into()
            )
        );
        touch(&iter, &["mp_rank_01/model_optim_rng.pt"]);
        let err = detect_checkpoint(&iter).unwrap_err();
        assert!(
            matches!(&err, Error::ModelParallelTorchSave { ranks: 2, example, .. } if example == "mp_rank_01"),
            "{err}"
        );
        // A zip without a known extension is a torch.save file; other bytes are refused.
        let zip = dir.path().join("weights");
        fs::write(&zip, b"PK\x03\x04rest").unwrap();
        assert_eq!(detect(&zip).1, "torch.save");
        let junk = dir.path().join("notes");
        fs::write(&junk, b"hello").unwrap();
        assert!(matches!(
            detect_checkpoint(&junk),
            Err(Error::UnknownCheckpointFormat { .. })
        ));
    }

    #[test]
    fn unknown_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), &["config.json"]);
        let err = detect_checkpoint(dir.path()).unwrap_err();
        assert!(
            matches!(&err, Error::UnknownCheckpointFormat { looked_for, .. } if looked_for.contains("model_and_optim")),
            "{err}"
        );
        assert!(matches!(
            detect_checkpoint(&dir.path().join("absent")),
            Err(Error::Io { .. })
        ));
    }
}
