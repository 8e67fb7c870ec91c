//! Which non-weight files and folders of a checkpoint a merge copies into its output.
//!
//! The old rule was an allowlist ([`crate::SIDECAR_FILES`]): config, generation config and
//! tokenizer files. Real models need more. A sentence-transformers model lost `vocab.txt`,
//! `modules.json` and `1_Pooling/`; a model with custom code loses its `*.py` and then fails to
//! load with `trust_remote_code`. The rule here is the reverse: **copy everything except what is
//! known not to belong in a merged model**, namely
//! - the weights and their indexes, which the merge writes itself (`*.safetensors`, their
//!   `.index.json`, `pytorch_model*.bin`, DCP `.distcp` / `.metadata`, DeepSpeed and Megatron
//!   `.pt` model files, and the framework folders that hold them: `model_and_optim/`,
//!   `pytorch_model_fsdp_0/`, `global_step*/`, `iter_*/`, `mp_rank_*/`); HF weight files
//!   count as the model's only in the checkpoint directory itself: inside a module folder
//!   (sentence-transformers' `2_Dense/model.safetensors`) they belong to a module the merge
//!   does not write, and are copied with it;
//! - the same model in another format (`*.onnx`, `*.gguf`, `tf_model.h5`,
//!   `flax_model.msgpack`, `openvino_model.*`), stale beside merged weights;
//! - training state (`optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state*.pth`,
//!   `trainer_state.json`, `training_args.bin`, DeepSpeed `*_optim_states.pt`, Megatron
//!   `common.pt`, optimizer shard folders `optimizer*/`, OLMo-core's `train/` beside
//!   `model_and_optim/`) and the run's pointers (`latest`, `latest_checkpointed_iteration.txt`);
//! - hidden folders (`.git`, `.cache`, staging folders of a writer still at work);
//! - symlinks that leave the checkpoint, resolved and checked for containment: a link to
//!   `~/.ssh` must not end up in a shared output. A link that resolves inside the checkpoint is
//!   to a file is kept as a file (the copier follows it) unless the target's own name is
//!   skipped; a link to a folder is skipped, since the folder is walked under its own name and
//!   following links could loop. A dangling link is skipped. One exception, so that models
//!   loaded from the Hugging Face cache keep their sidecars: in a cache snapshot
//!   (`models--org--name/snapshots/<rev>/`) every file is a link into the same repo's
//!   `blobs/`, and a link to a file there counts as inside.
//!
//! [`plan_sidecars`] walks the directory (sorted, so the plan is deterministic; at most
//! [`MAX_SIDECAR_ENTRIES`] entries) and returns what to copy, as relative paths with each
//! folder before its contents, plus every skip with its reason. It reads only names and
//! metadata and writes nothing.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The most files and folders [`plan_sidecars`] visits: far above any model's sidecars, far
/// below what a mistaken path (a home directory) would cost to copy.
pub const MAX_SIDECAR_ENTRIES: usize = 10_000;

/// A file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarKind {
    /// A regular file (or a link to one inside the checkpoint): copy its bytes.
    File,
    /// A folder (or a link to one inside the checkpoint): create it; its contents follow.
    Dir,
}

/// One entry to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// Path relative to the checkpoint directory (and to the output).
    pub path: PathBuf,
    /// File or folder.
    pub kind: SidecarKind,
}

/// Why an entry is not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Weights or their index: the merge writes these.
    Weights,
    /// Optimizer, scheduler, RNG or trainer state.
    TrainingState,
    /// The model's weights in another format (ONNX, GGUF, TF, Flax, OpenVINO), which would
    /// not match the merged weights.
    StaleWeights,
    /// A run-level pointer to the latest checkpoint.
    RunPointer,
    /// A hidden folder (VCS, cache, a writer's staging folder).
    Hidden,
    /// A symlink that resolves outside the checkpoint.
    LeavesCheckpoint {
        /// Where it resolves to.
        target: PathBuf,
    },
    /// A symlink whose target does not exist.
    Dangling,
    /// A symlink to a folder inside the checkpoint: that folder is walked under its own name
    /// (or skipped on its own terms), and following links could loop.
    LinkedFolder,
    /// Neither a file, a folder nor a symlink (a socket, a FIFO, a device).
    NotAFile,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Weights => write!(f, "weights (the merge writes them)"),
            SkipReason::TrainingState => write!(f, "training state"),
            SkipReason::StaleWeights => {
                write!(f, "weights in another format (stale after the merge)")
            }
            SkipReason::RunPointer => write!(f, "run-level pointer to the latest checkpoint"),
            SkipReason::Hidden => write!(f, "hidden folder"),
            SkipReason::LeavesCheckpoint { target } => {
                write!(f, "symlink leaves the checkpoint (to {})", target.display())
            }
            SkipReason::Dangling => write!(f, "dangling symlink"),
            SkipReason::LinkedFolder => {
                write!(
                    f,
                    "symlink to a folder of the checkpoint, copied under its own name"
                )
            }
            SkipReason::NotAFile => write!(f, "not a regular file or folder"),
        }
    }
}

/// An entry not copied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSidecar {
    /// Path relative to the checkpoint directory.
    pub path: PathBuf,
    /// Why.
    pub reason: SkipReason,
}

/// The result of [`plan_sidecars`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarPlan {
    /// What to copy, each folder before its contents, siblings sorted by name.
    pub copy: Vec<Sidecar>,
    /// What was passed over (folders skipped are not entered).
    pub skipped: Vec<SkippedSidecar>,
}

/// Classifies a file name; `None` means "a sidecar". `top_level` is whether it lies in the
/// checkpoint directory itself: HF weight files in a module folder (sentence-transformers'
/// `2_Dense/model.safetensors`) belong to a module the merge does not write, so they are
/// copied like the rest of that folder.
fn skip_file(name: &str, top_level: bool) -> Option<SkipReason> {
    let hf_weights = name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || (name.starts_with("pytorch_model")
            && (name.ends_with(".bin") || name.ends_with(".bin.index.json")));
    let weights = (top_level && hf_weights)
        || name.ends_with(".distcp")
        || name == ".metadata"
        || name == "model_optim_rng.pt"
        || (name.starts_with("mp_rank_") && name.ends_with("_model_states.pt"));
    if weights {
        return Some(SkipReason::Weights);
    }
    // The same model in another format: written from the unmerged weights, so stale (and
    // silently wrong) beside a merged output.
    let stale = [".onnx", ".onnx_data", ".gguf", ".ot", ".mlmodel"]
        .iter()
        .any(|ext| name.ends_with(ext))
        || matches!(
            name,
            "tf_model.h5" | "flax_model.msgpack" | "openvino_model.bin" | "openvino_model.xml"
        );
    if stale {
        return Some(SkipReason::StaleWeights);
    }
    let state = matches!(
        name,
        "optimizer.pt"
            | "optimizer.bin"
            | "scheduler.pt"
            | "scaler.pt"
            | "trainer_state.json"
            | "training_args.bin"
            | "common.pt"
    ) || (name.starts_with("rng_state") && name.ends_with(".pth"))
        || name.ends_with("_optim_states.pt");
    if state {
        return Some(SkipReason::TrainingState);
    }
    if matches!(name, "latest" | "latest_checkpointed_iteration.txt") {
        return Some(SkipReason::RunPointer);
    }
    None
}

/// Classifies a folder name; `siblings_have_dcp` is whether `model_and_optim/` is beside it.
fn skip_dir(name: &str, beside_model_and_optim: bool) -> Option<SkipReason> {
    if name.starts_with('.') {
        return Some(SkipReason::Hidden);
    }
    let weights = matches!(name, "model_and_optim" | "pytorch_model_fsdp_0")
        || name.starts_with("global_step")
        || (name.starts_with("iter_") && name[5..].bytes().all(|b| b.is_ascii_digit()))
        || name.starts_with("mp_rank_");
    if weights {
        return Some(SkipReason::Weights);
    }
    if name.starts_with("optimizer") || (name == "train" && beside_model_and_optim) {
        return Some(SkipReason::TrainingState);
    }
    None
}

/// Lists the sidecars of a checkpoint: every file and folder except weights, training state,
/// hidden folders and symlinks leaving the checkpoint (see the module docs). A checkpoint that
/// is a single file has none.
pub fn plan_sidecars(checkpoint: &Path) -> Result<SidecarPlan> {
    let mut plan = SidecarPlan::default();
    if crate::remote::is_url(checkpoint) {
        return plan_remote_sidecars(checkpoint);
    }
    if !checkpoint.is_dir() {
        return Ok(plan);
    }
    let root = checkpoint
        .canonicalize()
        .map_err(|e| Error::io(checkpoint, "resolving", e))?;
    // HF cache: `<repo>/snapshots/<rev>` links its files into `<repo>/blobs`.
    let blobs = root
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(|p| p.parent())
        .map(|repo| repo.join("blobs"))
        .and_then(|b| b.canonicalize().ok());
    let roots = Roots { root, blobs };
    let mut visited = 0usize;
    walk(checkpoint, &roots, Path::new(""), &mut visited, &mut plan)?;
    Ok(plan)
}

/// [`plan_sidecars`] of a checkpoint on an object store: the same name rules over the listing
/// of every object under the prefix (a store has no links and no empty folders; a folder is
/// the common prefix of its objects, listed before them).
fn plan_remote_sidecars(checkpoint: &Path) -> Result<SidecarPlan> {
    let mut plan = SidecarPlan::default();
    let Some(keys) = crate::remote::listing::list_recursive(checkpoint, MAX_SIDECAR_ENTRIES)?
    else {
        return Err(Error::TooManySidecars {
            path: checkpoint.to_path_buf(),
            limit: MAX_SIDECAR_ENTRIES,
        });
    };
    let beside_model_and_optim = keys.iter().any(|k| k.starts_with("model_and_optim/"));
    let mut folders: Vec<PathBuf> = Vec::new();
    let mut skipped_folders: Vec<PathBuf> = Vec::new();
    'keys: for key in &keys {
        let parts: Vec<&str> = key.split('/').collect();
        let (name, dirs) = parts.split_last().expect("split yields at least one part");
        let mut rel = PathBuf::new();
        for dir in dirs {
            rel.push(dir);
            if skipped_folders.contains(&rel) {
                continue 'keys;
            }
            if folders.contains(&rel) {
                continue;
            }
            if let Some(reason) = skip_dir(dir, beside_model_and_optim && rel.iter().count() == 1) {
                plan.skipped.push(SkippedSidecar {
                    path: rel.clone(),
                    reason,
                });
                skipped_folders.push(rel);
                continue 'keys;
            }
            folders.push(rel.clone());
            plan.copy.push(Sidecar {
                path: rel.clone(),
                kind: SidecarKind::Dir,
            });
        }
        let path = rel.join(name);
        match skip_file(name, dirs.is_empty()) {
            Some(reason) => plan.skipped.push(SkippedSidecar { path, reason }),
            None => plan.copy.push(Sidecar {
                path,
                kind: SidecarKind::File,
            }),
        }
    }
    Ok(plan)
}

/// Where a symlink may lead: the checkpoint, and for an HF cache snapshot its repo's blobs.
struct Roots {
    root: PathBuf,
    blobs: Option<PathBuf>,
}

impl Roots {
    fn contain(&self, target: &Path) -> bool {
        target.starts_with(&self.root)
            || self
                .blobs
                .as_ref()
                .is_some_and(|b| target.starts_with(b) && target.is_file())
    }
}

fn walk(
    checkpoint: &Path,
    roots: &Roots,
    rel_dir: &Path,
    visited: &mut usize,
    plan: &mut SidecarPlan,
) -> Result<()> {
    let dir = checkpoint.join(rel_dir);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, "listing", e))? {
        let entry = entry.map_err(|e| Error::io(&dir, "listing", e))?;
        *visited += 1;
        if *visited > MAX_SIDECAR_ENTRIES {
            return Err(Error::TooManySidecars {
                path: checkpoint.to_path_buf(),
                limit: MAX_SIDECAR_ENTRIES,
            });
        }
        names.push(entry.file_name());
    }
    names.sort();
    let beside_model_and_optim = names.iter().any(|n| n == "model_and_optim");
    for name in names {
        let rel = rel_dir.join(&name);
        let path = checkpoint.join(&rel);
        let name = name.to_string_lossy();
        let link = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(&path, "reading metadata of", e))?;
        let mut skip = |reason| {
            plan.skipped.push(SkippedSidecar {
                path: rel.clone(),
                reason,
            })
        };
        // Resolve links first: a link is judged by where it leads, then by its own name.
        let resolved = if link.file_type().is_symlink() {
            match path.canonicalize() {
                Ok(target) if roots.contain(&target) => Some(target),
                Ok(target) => {
                    skip(SkipReason::LeavesCheckpoint { target });
                    continue;
                }
                Err(_) => {
                    skip(SkipReason::Dangling);
                    continue;
                }
            }
        } else {
            None
        };
        let meta = match &resolved {
            Some(target) => std::fs::metadata(target)
                .map_err(|e| Error::io(target, "reading metadata of", e))?,
            None => link,
        };
        if meta.is_dir() {
            if resolved.is_some() {
                skip(SkipReason::LinkedFolder);
                continue;
            }
            if let Some(reason) = skip_dir(&name, beside_model_and_optim) {
                skip(reason);
                continue;
            }
            plan.copy.push(Sidecar {
                path: rel.clone(),
                kind: SidecarKind::Dir,
            });
            walk(checkpoint, roots, &rel, visited, plan)?;
        } else if meta.is_file() {
            let target_name = resolved
                .as_ref()
                .and_then(|t| t.file_name())
                .map(|n| n.to_string_lossy().into_owned());
            let top_level = rel_dir.as_os_str().is_empty();
            let by_name = skip_file(&name, top_level)
                .or_else(|| target_name.and_then(|t| skip_file(&t, top_level)));
            if let Some(reason) = by_name {
                skip(reason);
                continue;
            }
            plan.copy.push(Sidecar {
                path: rel,
                kind: SidecarKind::File,
            });
        } else {
            skip(SkipReason::NotAFile);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            if let Some(stripped) = f.strip_suffix('/') {
                fs::create_dir_all(root.join(stripped)).unwrap();
            } else {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, f.as_bytes()).unwrap();
            }
        }
    }

    fn copied(plan: &SidecarPlan) -> Vec<String> {
        plan.copy
            .iter()
            .map(|s| {
                let p = s.path.to_string_lossy().into_owned();
                match s.kind {
                    SidecarKind::Dir => p + "/",
                    SidecarKind::File => p,
                }
            })
            .collect()
    }

    fn skipped(plan: &SidecarPlan) -> Vec<(String, String)> {
        plan.skipped
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.reason.to_string()))
            .collect()
    }

    #[test]
    fn sentence_transformers_keeps_everything_but_weights() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &[
                "config.json",
                "config_sentence_transformers.json",
                "modules.json",
                "sentence_bert_config.json",
                "vocab.txt",
                "tokenizer.json",
                "README.md",
                "1_Pooling/config.json",
                "2_Normalize/",
                "model.safetensors",
            ],
        );
        let plan = plan_sidecars(dir.path()).unwrap();
        assert_eq!(
            copied(&plan),
            [
                "1_Pooling/",
                "1_Pooling/config.json",
                "2_Normalize/",
                "README.md",
                "config.json",
                "config_sentence_transformers.json",
                "modules.json",
                "sentence_bert_config.json",
                "tokenizer.json",
                "vocab.txt",
            ]
        );
        assert_eq!(
            skipped(&plan),
            [(
                "model.safetensors".to_string(),
                "weights (the merge writes them)".to_string()
            )]
        );
    }

    #[test]
    fn module_weights_are_copied_other_formats_are_not() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &[
                "model.safetensors",
                "modules.json",
                "2_Dense/config.json",
                "2_Dense/model.safetensors",
                "onnx/model.onnx",
                "onnx/model.onnx_data",
                "openvino/openvino_model.bin",
                "openvino/openvino_model.xml",
                "tf_model.h5",
                "model.gguf",
            ],
        );
        let plan = plan_sidecars(dir.path()).unwrap();
        assert_eq!(
            copied(&plan),
            [
                "2_Dense/",
                "2_Dense/config.json",
                "2_Dense/model.safetensors",
                "modules.json",
                "onnx/",
                "openvino/",
            ]
        );
        let stale: Vec<String> = plan
            .skipped
            .iter()
            .filter(|s| s.reason == SkipReason::StaleWeights)
            .map(|s| s.path.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            stale,
            [
                "model.gguf",
                "onnx/model.onnx",
                "onnx/model.onnx_data",
                "openvino/openvino_model.bin",
                "openvino/openvino_model.xml",
                "tf_model.h5",
            ]
        );
    }

    #[test]
    fn custom_code_keeps_its_python() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &[
                "config.json",
                "configuration_mymodel.py",
                "modeling_mymodel.py",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                ".git/HEAD",
                ".gitattributes",
            ],
        );
        let plan = plan_sidecars(dir.path()).unwrap();
        assert_eq!(
            copied(&plan),
            [
                ".gitattributes",
                "config.json",
                "configuration_mymodel.py",
                "modeling_mymodel.py"
            ]
        );
        assert_eq!(plan.skipped.len(), 4);
        assert_eq!(plan.skipped[0].reason, SkipReason::Hidden);
    }

    #[test]
    fn hf_trainer_checkpoint_drops_training_state() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &[
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "optimizer.pt",
                "scheduler.pt",
                "scaler.pt",
                "rng_state.pth",
                "rng_state_3.pth",
                "trainer_state.json",
                "training_args.bin",
                "optimizer_0/__0_0.distcp",
                "pytorch_model_fsdp_0/.metadata",
                "global_step100/mp_rank_00_model_states.pt",
                "latest",
                "zero_to_fp32.py",
            ],
        );
        let plan = plan_sidecars(dir.path()).unwrap();
        assert_eq!(
            copied(&plan),
            ["config.json", "generation_config.json", "zero_to_fp32.py"]
        );
        let reasons: Vec<(String, SkipReason)> = plan
            .skipped
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.reason.clone()))
            .collect();
        for (name, reason) in [
            ("optimizer.pt", SkipReason::TrainingState),
            ("scheduler.pt", SkipReason::TrainingState),
            ("rng_state_3.pth", SkipReason::TrainingState),
            ("trainer_state.json", SkipReason::TrainingState),
            ("training_args.bin", SkipReason::TrainingState),
            ("optimizer_0", SkipReason::TrainingState),
            ("pytorch_model_fsdp_0", SkipReason::Weights),
            ("global_step100", SkipReason::Weights),
            ("latest", SkipReason::RunPointer),
        ] {
            assert!(
                reasons.contains(&(name.to_string(), reason.clone())),
                "{name}: {reasons:?}"
            );
        }
        // Skipped folders are not entered.
        assert!(!reasons.iter().any(|(n, _)| n.contains('/')), "{reasons:?}");
    }

    #[cfg(unix)]
    #[test]
    fn escaping_symlinks_are_skipped_inside_ones_kept() {
        use std::os::unix::fs::symlink;
        let outside = tempfile::tempdir().unwrap();
        tree(outside.path(), &["secret.txt", "keys/id_rsa"]);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ckpt");
        tree(&ck, &["config.json", "sub/vocab.txt", "model.safetensors"]);
        symlink(outside.path().join("secret.txt"), ck.join("notes.txt")).unwrap();
        symlink(outside.path().join("keys"), ck.join("keys")).unwrap();
        symlink("../../", ck.join("sub/up")).unwrap(); // leaves via `..`
        symlink("config.json", ck.join("config_link.json")).unwrap();
        symlink("sub", ck.join("alias")).unwrap(); // inside: sub/ is walked as itself
        symlink("..", ck.join("sub/loop")).unwrap(); // inside, back to the root
        symlink("missing.txt", ck.join("dangling.txt")).unwrap();
        tree(&ck, &["optimizer.pt"]);
        symlink("optimizer.pt", ck.join("notes2.txt")).unwrap(); // judged by its target too
        let plan = plan_sidecars(&ck).unwrap();
        assert_eq!(
            copied(&plan),
            ["config.json", "config_link.json", "sub/", "sub/vocab.txt"]
        );
        let reasons: Vec<(String, SkipReason)> = plan
            .skipped
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.reason.clone()))
            .collect();
        for name in ["notes.txt", "keys", "sub/up"] {
            assert!(
                reasons
                    .iter()
                    .any(|(n, r)| n == name && matches!(r, SkipReason::LeavesCheckpoint { .. })),
                "{name}: {reasons:?}"
            );
        }
        for (name, reason) in [
            ("dangling.txt", SkipReason::Dangling),
            ("sub/loop", SkipReason::LinkedFolder),
            ("alias", SkipReason::LinkedFolder),
            ("notes2.txt", SkipReason::TrainingState),
        ] {
            assert!(
                reasons.contains(&(name.to_string(), reason.clone())),
                "{name}: {reasons:?}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn hf_cache_snapshot_links_into_blobs_are_kept() {
        use std::os::unix::fs::symlink;
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--mini");
        tree(
            &repo,
            &["blobs/aaa", "blobs/bbb", "blobs/ccc", "other/secret"],
        );
        let snap = repo.join("snapshots/0123abc");
        fs::create_dir_all(snap.join("1_Pooling")).unwrap();
        symlink("../../blobs/aaa", snap.join("vocab.txt")).unwrap();
        symlink("../../blobs/bbb", snap.join("model.safetensors")).unwrap();
        symlink("../../../blobs/ccc", snap.join("1_Pooling/config.json")).unwrap();
        symlink("../../other/secret", snap.join("notes.txt")).unwrap();
        symlink("../../blobs", snap.join("all_blobs")).unwrap();
        let plan = plan_sidecars(&snap).unwrap();
        assert_eq!(
            copied(&plan),
            ["1_Pooling/", "1_Pooling/config.json", "vocab.txt"]
        );
        let reasons: Vec<(String, SkipReason)> = plan
            .skipped
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.reason.clone()))
            .collect();
        assert!(reasons.contains(&("model.safetensors".into(), SkipReason::Weights)));
        for name in ["notes.txt", "all_blobs"] {
            assert!(
                reasons
                    .iter()
                    .any(|(n, r)| n == name && matches!(r, SkipReason::LeavesCheckpoint { .. })),
                "{name}: {reasons:?}"
            );
        }
    }

    #[test]
    fn fixture_checkpoints() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // OLMo-core: config.json is a sidecar; model_and_optim/ and train/ are not.
        let plan = plan_sidecars(&fixtures.join("dcp-extra/run-olmo/step100")).unwrap();
        assert_eq!(copied(&plan), ["config.json"]);
        assert_eq!(plan.skipped.len(), 2);
        // accelerate: only trainer state beside the DCP folder.
        let plan =
            plan_sidecars(&fixtures.join("dcp-extra/run-accelerate/checkpoint-100")).unwrap();
        assert!(plan.copy.is_empty(), "{:?}", plan.copy);
        // Megatron torch_dist: metadata.json is format metadata, kept; common.pt is state.
        let plan = plan_sidecars(&fixtures.join("dcp/run-megatron/iter_0000100")).unwrap();
        assert_eq!(copied(&plan), ["metadata.json"]);
        // A single-file checkpoint has no sidecars.
        let file = fixtures.join("dcp/run-megatron/latest_checkpointed_iteration.txt");
        assert_eq!(plan_sidecars(&file).unwrap(), SidecarPlan::default());
    }

    #[test]
    fn entry_bound_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=MAX_SIDECAR_ENTRIES {
            fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let err = plan_sidecars(dir.path()).unwrap_err();
        assert!(
            matches!(err, Error::TooManySidecars { limit, .. } if limit == MAX_SIDECAR_ENTRIES),
            "{err}"
        );
    }
}
