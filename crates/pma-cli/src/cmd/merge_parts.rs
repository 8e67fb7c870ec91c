//! `pma merge --part I --parts K` and `pma merge --finalize`: a merge split across processes or
//! nodes of a shared filesystem (see [`pma_merge::partition`]), or writing to an object store
//! (see [`pma_merge::partition_remote`]).
//!
//! `--part auto` takes the part from the job engine's environment, and only with that flag (a
//! Slurm array task may run a whole merge of its own): a Slurm array
//! (`SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN`, divided by `SLURM_ARRAY_TASK_STEP`, of
//! `SLURM_ARRAY_TASK_COUNT`), a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, K from
//! `--parts`), or torchrun (`RANK` of `WORLD_SIZE`), looked for in that order.

use std::process::ExitCode;

use anyhow::bail;
use pma_merge::{
    execute_part, execute_part_to_store, finalize, finalize_to_store, ExecOptions, FinalizeReport,
    PartCheck, PartReport,
};

use super::merge::{plan_from_args, warn_nonfinite, warn_skipped, Args, UploadStaging};
use super::render::{human, print_json, versioned};
use super::UsageError;
use crate::progress::{self, ByteBar};

/// A part and where its number came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartChoice {
    /// 0-based part.
    pub part: usize,
    /// Part count, K.
    pub parts: usize,
    /// Where they came from, for the user.
    pub source: String,
}

/// Resolves `--part` / `--parts` (with `env` looking variables up) into a part, or a usage
/// error: a part out of range, a `--parts` disagreeing with the environment, `auto` with no
/// engine variables.
pub fn resolve_part(
    part: &str,
    parts: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PartChoice, UsageError> {
    let number = |name: &str| -> Result<Option<usize>, UsageError> {
        match env(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                UsageError(format!(
                    "--part auto: {name}={v:?} is not a non-negative integer"
                ))
            }),
        }
    };
    let need = |name: &str, engine: &str| -> Result<usize, UsageError> {
        number(name)?.ok_or_else(|| {
            UsageError(format!(
                "--part auto: {engine} environment without {name}; give --part I --parts K"
            ))
        })
    };
    let choice = if part != "auto" {
        let Ok(p) = part.parse() else {
            return Err(UsageError(format!(
                "--part '{part}': expected a part number (0-based) or auto"
            )));
        };
        let Some(k) = parts else {
            return Err(UsageError(format!(
                "--part {p} needs --parts K, the number of parts"
            )));
        };
        PartChoice {
            part: p,
            parts: k,
            source: "--part".into(),
        }
    } else if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
        let min = need("SLURM_ARRAY_TASK_MIN", "Slurm array")?;
        let count = need("SLURM_ARRAY_TASK_COUNT", "Slurm array")?;
        let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        if id < min || (id - min) % step != 0 {
            return Err(UsageError(format!(
                "--part auto: Slurm array task {id} is not on the array's range (min {min}, step \
                 {step}); submit the array as --array=0-{}",
                count.saturating_sub(1)
            )));
        }
        PartChoice {
            part: (id - min) / step,
            parts: count,
            source: format!(
                "Slurm array: SLURM_ARRAY_TASK_ID={id}, SLURM_ARRAY_TASK_MIN={min}, \
                 SLURM_ARRAY_TASK_COUNT={count}"
            ),
        }
    } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let Some(k) = parts else {
            return Err(UsageError(
                "--part auto: a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) does not give the \
                 number of parts; add --parts K (the Job's spec.completions)"
                    .into(),
            ));
        };
        PartChoice {
            part: index,
            parts: k,
            source: format!("Kubernetes Indexed Job: JOB_COMPLETION_INDEX={index}, --parts {k}"),
        }
    } else if let Some(rank) = number("RANK")? {
        let world = need("WORLD_SIZE", "torchrun")?;
        PartChoice {
            part: rank,
            parts: world,
            source: format!("torchrun: RANK={rank}, WORLD_SIZE={world}"),
        }
    } else {
        return Err(UsageError(
            "--part auto: no job engine found in the environment (SLURM_ARRAY_TASK_ID, \
             JOB_COMPLETION_INDEX, or RANK and WORLD_SIZE); give --part I --parts K"
                .into(),
        ));
    };
    if let Some(k) = parts {
        if k != choice.parts {
            return Err(UsageError(format!(
                "--parts {k} disagrees with the environment's {} parts ({})",
                choice.parts, choice.source
            )));
        }
    }
    if choice.parts == 0 {
        return Err(UsageError("--parts must be at least 1".into()));
    }
    if choice.part >= choice.parts {
        return Err(UsageError(format!(
            "part {} is out of range: the parts of a {}-part merge are numbered 0 to {} ({})",
            choice.part,
            choice.parts,
            choice.parts - 1,
            choice.source
        )));
    }
    Ok(choice)
}

/// Runs one part (`--part`) or the finalize (`--finalize`) of a partitioned merge.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        bail!(UsageError(
            "--dry-run shows the whole merge; leave out --part, --parts and --finalize".into()
        ));
    }
    // An object-store OUT: parts upload beside it and the finalize copies them into place
    // (pma_merge::partition_remote).
    let remote_out = pma_format::is_url(&args.out);
    let single_file = args.out.extension().is_some_and(|e| e == "safetensors");
    let choice = match (&args.part, args.finalize) {
        (Some(_), true) => bail!(UsageError(
            "--finalize publishes the parts' output; it takes no --part".into()
        )),
        (None, false) => bail!(UsageError(
            "--parts needs --part I (or --part auto), or --finalize".into()
        )),
        (Some(part), false) => {
            let choice = resolve_part(part, args.parts, &|name| std::env::var(name).ok())?;
            if single_file && choice.parts > 1 {
                bail!(UsageError(
                    "a single-file output (OUT ending in .safetensors) cannot be split into \
                     parts; give a directory as --out"
                        .into()
                ));
            }
            Some(choice)
        }
        (None, true) => None,
    };
    let (mut plan, skipped) = plan_from_args(&args)?;
    if !args.quiet {
        warn_skipped(&skipped);
    }
    let interrupted = crate::cmd::interrupt_flag();
    let opts = ExecOptions {
        threads: args.output.threads()?,
        overwrite: args.overwrite,
        cancel: Some(interrupted),
        direct_io: pma_format::DirectIo::from_env(),
    };
    match choice {
        Some(choice) => {
            if !args.quiet {
                eprintln!(
                    "part {} of {} (from {})",
                    choice.part, choice.parts, choice.source
                );
            }
            let bar = ByteBar::new("merging part", progress::shown(args.quiet, args.json));
            let report = if remote_out {
                execute_part_to_store(&mut plan, choice.part, choice.parts, &args.out, &opts, &bar)?
            } else {
                execute_part(&mut plan, choice.part, choice.parts, &args.out, &opts, &bar)?
            };
            if !args.quiet {
                warn_nonfinite(&report.warnings);
                if report.files.is_empty() && report.output_files < report.parts {
                    eprintln!(
                        "note: the output has {} files for {} parts, so part {} has none to \
                         write (a DCP output keeps the newest checkpoint's files); it still \
                         leaves a manifest for --finalize",
                        report.output_files, report.parts, report.part
                    );
                }
                if report.resharded {
                    eprintln!(
                        "note: the plan has fewer shards than parts, so shards are cut at {} \
                         bytes (a single-process merge with --max-shard-size {} is identical)",
                        report.max_shard_bytes, report.max_shard_bytes
                    );
                }
            }
            if args.json {
                print_json(&versioned(serde_json::json!({ "part": report })))?;
            } else if !args.quiet {
                print_part(&report)?;
            }
        }
        None => {
            let check = if args.verify_parts {
                PartCheck::Contents
            } else {
                PartCheck::Stamp
            };
            let report = if remote_out {
                let staging = UploadStaging::create()?;
                finalize_to_store(&mut plan, &args.out, &staging.0, &opts, check)?
            } else {
                finalize(&mut plan, &args.out, &opts, check)?
            };
            if args.json {
                print_json(&versioned(serde_json::json!({ "finalize": report })))?;
            } else if !args.quiet {
                print_finalize(&report)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_part(r: &PartReport) -> std::io::Result<()> {
    let n_bytes: u64 = r.files.iter().map(|f| f.n_bytes).sum();
    outln!(
        "part {} of {}: {} files, {} written to {} in {:.2}s",
        r.part,
        r.parts,
        r.files.len(),
        human(n_bytes),
        r.dir.display(),
        r.elapsed_secs
    )
}

fn print_finalize(r: &FinalizeReport) -> std::io::Result<()> {
    outln!(
        "finalized {} parts ({} files, {}) -> {} in {:.2}s",
        r.parts,
        r.plan.files.len(),
        human(r.plan.bytes_written),
        r.output.display(),
        r.elapsed_secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        part: &str,
        parts: Option<usize>,
        vars: &[(&str, &str)],
    ) -> Result<PartChoice, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve_part(part, parts, &|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map_err(|e| e.0)
    }

    #[test]
    fn explicit_part_ignores_the_environment() {
        let c = resolve("2", Some(4), &[("SLURM_ARRAY_TASK_ID", "9"), ("RANK", "1")]).unwrap();
        assert_eq!((c.part, c.parts), (2, 4));
        assert!(resolve("4", Some(4), &[])
            .unwrap_err()
            .contains("out of range"));
        assert!(resolve("1", None, &[])
            .unwrap_err()
            .contains("needs --parts"));
        assert!(resolve("x", Some(2), &[])
            .unwrap_err()
            .contains("part number"));
    }

    #[test]
    fn slurm_array_offsets_by_min_and_step() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("RANK", "0"),
            ("WORLD_SIZE", "8"),
        ];
        let c = resolve("auto", None, &slurm).unwrap();
        assert_eq!((c.part, c.parts), (2, 3));
        assert!(c.source.starts_with("Slurm array"));
        assert!(resolve("auto", Some(4), &slurm)
            .unwrap_err()
            .contains("disagrees"));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert_eq!(resolve("auto", None, &stepped).unwrap().part, 3);
        let beyond = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert!(resolve("auto", None, &beyond)
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn kubernetes_needs_parts_and_torchrun_reads_world_size() {
        let k8s = [("JOB_COMPLETION_INDEX", "1")];
        assert!(resolve("auto", None, &k8s)
            .unwrap_err()
            .contains("--parts K"));
        let c = resolve("auto", Some(3), &k8s).unwrap();
        assert_eq!((c.part, c.parts), (1, 3));
        assert!(c.source.starts_with("Kubernetes"));
        let c = resolve("auto", None, &[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap();
        assert_eq!((c.part, c.parts), (0, 2));
        assert!(c.source.starts_with("torchrun"));
        assert!(resolve("auto", None, &[("RANK", "0")])
            .unwrap_err()
            .contains("WORLD_SIZE"));
        assert!(resolve("auto", None, &[])
            .unwrap_err()
            .contains("no job engine"));
        assert!(
            resolve("auto", None, &[("RANK", "-1"), ("WORLD_SIZE", "2")])
                .unwrap_err()
                .contains("not a non-negative")
        );
    }
}
