//! Where an output may go: never over, inside, or around what it is made from.
//!
//! An output written into a run directory replaces the trainer's checkpoints (`pma watch RUN
//! --out RUN` writes `step-*` directories over the trainer's), and an output directory that
//! contains an input is pruned or replaced wholesale. So an output must not be equal to, inside,
//! or a directory containing the run directory or any input. Paths are compared after resolving
//! symlinks and `..`, so `run/../run` and a symlink to the run are caught too. Every entry
//! point that writes (the merge executor's callers and the watcher) runs this check first.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::plan::MergePlan;

/// Refuses an output `out` that is the same path as, inside, or a directory containing any of
/// `protected` (run directories and input checkpoints).
pub fn check_output_placement(out: &Path, protected: &[&Path]) -> Result<()> {
    let out_abs = resolve(out)?;
    for &input in protected {
        let input_abs = resolve(input)?;
        let relation = if out_abs == input_abs {
            "the same path as"
        } else if out_abs.starts_with(&input_abs) {
            "inside"
        } else if input_abs.starts_with(&out_abs) {
            "a directory containing"
        } else {
            continue;
        };
        return Err(Error::OutputOverlapsInput {
            out: out.into(),
            input: input.into(),
            relation,
        });
    }
    Ok(())
}

/// [`check_output_placement`] against every input of `plan`.
pub fn check_plan_output(plan: &MergePlan, out: &Path) -> Result<()> {
    let roots: Vec<&Path> = plan.inputs.iter().map(|i| i.store().root()).collect();
    check_output_placement(out, &roots)
}

/// An absolute path with symlinks and `..` resolved, for a path that may not exist yet: the
/// longest existing ancestor is canonicalised and the rest appended, `..` popping lexically
/// (nothing below the existing ancestor exists, so there is no link for `..` to cross).
fn resolve(path: &Path) -> Result<PathBuf> {
    if pma_format::is_url(path) {
        // An object-store URL has no links to resolve: compared by its components.
        return Ok(PathBuf::from(path.to_string_lossy().trim_end_matches('/')));
    }
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|e| pma_format::Error::Io {
            path: path.into(),
            action: "resolving (current directory)",
            source: e,
        })?;
        cwd.join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest: Vec<Component<'_>> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut resolved) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::CurDir => {}
                        other => resolved.push(other.as_os_str()),
                    }
                }
                return Ok(resolved);
            }
            Err(_) => {
                let (Some(parent), Some(last)) =
                    (existing.parent(), existing.components().next_back())
                else {
                    // Even the root does not resolve: compare the lexical path.
                    return Ok(absolute);
                };
                rest.push(last);
                existing = parent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(out: &Path, input: &Path) -> &'static str {
        match check_output_placement(out, &[input]) {
            Err(Error::OutputOverlapsInput { relation, .. }) => relation,
            other => panic!("{} vs {}: {other:?}", out.display(), input.display()),
        }
    }

    #[test]
    fn out_equal_inside_or_containing_an_input_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("step-100")).unwrap();
        assert_eq!(refused(&run, &run), "the same path as");
        assert_eq!(refused(&run.join("sub/../"), &run), "the same path as");
        assert_eq!(refused(&run.join("merged"), &run), "inside");
        assert_eq!(
            refused(&run.join("step-100/x"), &run.join("step-100")),
            "inside"
        );
        assert_eq!(
            refused(d.path(), &run.join("step-100")),
            "a directory containing"
        );
        std::os::unix::fs::symlink(&run, d.path().join("link")).unwrap();
        assert_eq!(refused(&d.path().join("link"), &run), "the same path as");
        assert_eq!(refused(&d.path().join("link/new/../x"), &run), "inside");
        check_output_placement(&d.path().join("merged"), &[run.as_path()]).unwrap();
        check_output_placement(&d.path().join("run-merged"), &[run.as_path()]).unwrap();
    }
}
