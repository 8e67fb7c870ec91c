//! Partitioned merges: `pma merge --part I --parts K` in separate processes, then `--finalize`,
//! must equal the single-process merge byte for byte; bad parts are refused with one error and
//! no output. The Slurm test runs a real array job (tools/slurm_local.sh) when Slurm is there,
//! and must run when PMA_REQUIRE_SLURM=1 (CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use common::{f32_bytes, fixtures, pma, write_ckpt};
use pma_format::Dtype;
use predicates::prelude::*;

/// Variables `--part auto` reads: removed from every command so a test run inside a Slurm job
/// or under torchrun sees only what the test sets.
const ENGINE_VARS: &[&str] = &[
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "RANK",
    "WORLD_SIZE",
];

/// The committed bf16 run; with 20 kB shards its EMA merge has 4 output shards.
fn run_dir() -> PathBuf {
    fixtures().join("run-bf16")
}

const FLAGS: &[&str] = &["--method", "ema", "--max-shard-size", "20kB"];

fn merge_args(run: &Path, out: &Path, flags: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["merge".into()];
    v.extend(flags.iter().map(|s| s.to_string()));
    v.extend(["--run".into(), run.display().to_string()]);
    v.extend(["--out".into(), out.display().to_string()]);
    v
}

fn pma_clean() -> assert_cmd::Command {
    let mut c = pma();
    for v in ENGINE_VARS {
        c.env_remove(v);
    }
    c
}

fn std_pma() -> StdCommand {
    let mut c = StdCommand::new(assert_cmd::cargo::cargo_bin("pma"));
    for v in ENGINE_VARS {
        c.env_remove(v);
    }
    c
}

/// Every file under `dir` by relative path, with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert!(p.is_file(), "unexpected non-file {}", p.display());
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, std::fs::read(&p).unwrap()));
    }
    out.sort();
    out
}

fn single(run: &Path, out: &Path, flags: &[&str]) {
    pma_clean()
        .args(merge_args(run, out, flags))
        .arg("--quiet")
        .assert()
        .success();
}

/// Runs parts `which` of `k` as concurrent processes; all must succeed.
fn run_parts(run: &Path, out: &Path, flags: &[&str], k: usize, which: &[usize]) {
    let children: Vec<_> = which
        .iter()
        .map(|i| {
            std_pma()
                .args(merge_args(run, out, flags))
                .args([
                    "--quiet",
                    "--part",
                    &i.to_string(),
                    "--parts",
                    &k.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in which.iter().zip(children) {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "part {i} of {k}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn finalize(run: &Path, out: &Path, flags: &[&str]) -> assert_cmd::assert::Assert {
    pma_clean()
        .args(merge_args(run, out, flags))
        .args(["--quiet", "--finalize"])
        .assert()
}

fn parts_dir(out: &Path) -> PathBuf {
    out.parent().unwrap().join(format!(
        ".{}.pma-parts",
        out.file_name().unwrap().to_string_lossy()
    ))
}

#[test]
fn parts_then_finalize_equal_the_single_process_merge() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let reference = d.path().join("single");
    single(&run, &reference, FLAGS);
    let want = tree(&reference);
    assert!(want
        .iter()
        .any(|(n, _)| n == "model.safetensors.index.json"));
    assert_eq!(
        want.iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .count(),
        4,
        "the fixture should give 4 shards"
    );
    for k in [1, 3, 4] {
        let out = d.path().join(format!("parts-{k}"));
        run_parts(&run, &out, FLAGS, k, &(0..k).collect::<Vec<_>>());
        assert!(!out.exists(), "parts never publish OUT");
        // K=3 also reads every file back (--verify-parts): good parts pass that check too.
        let mut flags = FLAGS.to_vec();
        if k == 3 {
            flags.push("--verify-parts");
        }
        finalize(&run, &out, &flags).success();
        assert_eq!(
            tree(&out),
            want,
            "K={k}: output differs from the single-process merge"
        );
        assert!(!parts_dir(&out).exists(), "K={k}: the parts dir is removed");
    }
}

#[test]
fn fewer_shards_than_parts_cut_smaller_shards_deterministically() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let flags = &["--method", "sma"]; // default 5GB shards: one shard
    let out = d.path().join("m");
    let o = pma_clean()
        .args(merge_args(&run, &out, flags))
        .args(["--json", "--part", "0", "--parts", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["part"]["resharded"], true);
    let max = report["part"]["max_shard_bytes"].as_u64().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-shard-size"));
    run_parts(&run, &out, flags, 3, &[1, 2]);
    finalize(&run, &out, flags).success();
    let reference = d.path().join("single");
    let max_flag = max.to_string();
    single(
        &run,
        &reference,
        &["--method", "sma", "--max-shard-size", &max_flag],
    );
    assert_eq!(tree(&out), tree(&reference));
    assert!(tree(&out).len() > 3, "cut into at least 3 shards + index");
}

#[test]
fn part_auto_reads_slurm_kubernetes_and_torchrun() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    let args = merge_args(&run, &out, FLAGS);
    pma_clean()
        .args(&args)
        .args(["--part", "auto"])
        .env("SLURM_ARRAY_TASK_ID", "10")
        .env("SLURM_ARRAY_TASK_MIN", "10")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .assert()
        .success()
        .stderr(predicate::str::contains("part 0 of 3 (from Slurm array"));
    pma_clean()
        .args(&args)
        .args(["--part", "auto", "--parts", "3"])
        .env("JOB_COMPLETION_INDEX", "1")
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "part 1 of 3 (from Kubernetes Indexed Job",
        ));
    pma_clean()
        .args(&args)
        .args(["--part", "auto"])
        .env("RANK", "2")
        .env("WORLD_SIZE", "3")
        .assert()
        .success()
        .stderr(predicate::str::contains("part 2 of 3 (from torchrun"));
    finalize(&run, &out, FLAGS).success();
    let reference = d.path().join("single");
    single(&run, &reference, FLAGS);
    assert_eq!(tree(&out), tree(&reference));
}

#[test]
fn engine_variables_are_ignored_without_part_auto() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    pma_clean()
        .args(merge_args(&run, &out, FLAGS))
        .arg("--quiet")
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "4")
        .env("RANK", "1")
        .env("WORLD_SIZE", "4")
        .assert()
        .success();
    let reference = d.path().join("single");
    single(&run, &reference, FLAGS);
    assert_eq!(tree(&out), tree(&reference));
    assert!(!parts_dir(&out).exists());
}

#[test]
fn bad_part_arguments_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    let args = merge_args(&run, &out, FLAGS);
    let usage = |extra: &[&str], env: &[(&str, &str)], msg: &str| {
        let mut c = pma_clean();
        c.args(&args).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        c.assert().code(2).stderr(predicate::str::contains(msg));
    };
    usage(
        &["--part", "4", "--parts", "4"],
        &[],
        "part 4 is out of range",
    );
    usage(&["--part", "1"], &[], "needs --parts");
    usage(&["--parts", "2"], &[], "--parts needs --part");
    usage(&["--part", "auto"], &[], "no job engine");
    usage(
        &["--part", "auto", "--parts", "4"],
        &[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
        "--parts 4 disagrees with the environment's 3 parts",
    );
    usage(
        &["--part", "auto"],
        &[("RANK", "5"), ("WORLD_SIZE", "4")],
        "part 5 is out of range",
    );
    usage(
        &["--part", "auto"],
        &[("JOB_COMPLETION_INDEX", "0")],
        "add --parts K",
    );
    usage(&["--part", "0", "--finalize"], &[], "cannot be used with");
    let mut file_out = merge_args(&run, &d.path().join("m.safetensors"), FLAGS);
    file_out.extend(["--part".into(), "0".into(), "--parts".into(), "2".into()]);
    pma_clean()
        .args(&file_out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("single-file output"));
    assert!(!out.exists() && !parts_dir(&out).exists());
}

#[test]
fn parts_with_different_flags_are_refused_at_finalize() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    run_parts(&run, &out, FLAGS, 3, &[0, 1]);
    run_parts(
        &run,
        &out,
        &["--method", "sma", "--max-shard-size", "20kB"],
        3,
        &[2],
    );
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains(
            "part 2 of 3 was made from a different plan",
        ))
        .stderr(predicate::str::contains("part-2-of-3/manifest.json"));
    assert!(!out.exists());
    // Rerunning the stale part with the right flags repairs it.
    run_parts(&run, &out, FLAGS, 3, &[2]);
    finalize(&run, &out, FLAGS).success();
}

#[test]
fn finalize_refuses_missing_parts_and_mixed_part_counts() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("no parts found"));
    run_parts(&run, &out, FLAGS, 3, &[0, 2]);
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("part 1 of 3 is missing"));
    assert!(!out.exists());
    run_parts(&run, &out, FLAGS, 4, &[1]);
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("different part counts [3, 4]"));
    assert!(!out.exists());
}

#[test]
fn corrupted_or_truncated_part_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    run_parts(&run, &out, FLAGS, 3, &[0, 1, 2]);
    let part1 = parts_dir(&out).join("part-1-of-3");
    let shard = std::fs::read_dir(&part1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let good = std::fs::read(&shard).unwrap();
    let written = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x40;
    // Filesystems with coarse timestamps stamp writes within one tick alike; real corruption
    // comes later than the part's own last write, and so does this one.
    std::thread::sleep(std::time::Duration::from_millis(30));
    std::fs::write(&shard, &bad).unwrap();
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    // The default check sees the write through the file's mtime, without reading it.
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains(&name))
        .stderr(predicate::str::contains(
            "was changed after its part wrote it",
        ));
    assert!(!out.exists());
    // A flip that keeps the stamp (silent corruption; here the mtime is set back) needs the
    // bytes read back: --verify-parts checks every file's CRC-32.
    std::fs::File::options()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_modified(written)
        .unwrap();
    let mut verify = FLAGS.to_vec();
    verify.push("--verify-parts");
    finalize(&run, &out, &verify)
        .code(1)
        .stderr(predicate::str::contains(&name))
        .stderr(predicate::str::contains("CRC-32"));
    assert!(!out.exists());
    std::fs::write(&shard, &good[..good.len() - 1]).unwrap();
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("bytes but its manifest says"));
    std::fs::write(part1.join("manifest.json"), b"{not json").unwrap();
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("is not a part manifest"));
    assert!(!out.exists());
}

#[test]
fn existing_output_needs_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("m");
    single(&run, &out, &["--method", "sma"]);
    // A part fails before computing anything: the finalize could not publish.
    pma_clean()
        .args(merge_args(&run, &out, FLAGS))
        .args(["--part", "0", "--parts", "2"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("exists"));
    let mut flags = FLAGS.to_vec();
    flags.push("--overwrite");
    run_parts(&run, &out, &flags, 2, &[0, 1]);
    finalize(&run, &out, FLAGS)
        .code(1)
        .stderr(predicate::str::contains("exists"));
    finalize(&run, &out, &flags).success();
    let reference = d.path().join("single");
    single(&run, &reference, FLAGS);
    assert_eq!(tree(&out), tree(&reference));
}

/// Three checkpoints of `elems` f32 each: large enough that a part is still writing a few
/// milliseconds after it starts.
fn big_run(run: &Path, elems: usize) {
    for i in 0..3 {
        let v: Vec<f32> = (0..elems)
            .map(|j| ((j * 7 + i) % 1009) as f32 * 1e-3)
            .collect();
        write_ckpt(
            &run.join(format!("step-{}", 100 * (i + 1))),
            &[
                ("w", Dtype::F32, vec![elems as u64 / 4, 4], f32_bytes(&v)),
                ("v", Dtype::F32, vec![elems as u64], f32_bytes(&v)),
                (
                    "b",
                    Dtype::F32,
                    vec![4],
                    f32_bytes(&[1.0, 2.0, 3.0, i as f32]),
                ),
            ],
        );
    }
}

#[test]
fn part_killed_mid_write_then_rerun_gives_identical_output() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    big_run(&run, 1 << 21);
    let flags: &[&str] = &[
        "--method",
        "ema",
        "--threads",
        "2",
        "--max-shard-size",
        "4MB",
    ];
    let reference = d.path().join("single");
    single(&run, &reference, flags);
    let out = d.path().join("m");
    kill_rerun_and_finalize(&run, &out, flags, 1, 3);
    assert_eq!(tree(&out), tree(&reference));
}

/// Kills part `part` of `k` at a few instants (from mid-pipeline to after the manifest), runs
/// every part, checks the rerun cleaned up after its killed predecessors, kills a rerun of the
/// complete part (its earlier attempt must stay intact), and finalizes.
fn kill_rerun_and_finalize(run: &Path, out: &Path, flags: &[&str], part: usize, k: usize) {
    let (part_arg, k_arg) = (part.to_string(), k.to_string());
    let spawn_part = || {
        std_pma()
            .args(merge_args(run, out, flags))
            .args(["--quiet", "--part", &part_arg, "--parts", &k_arg])
            .spawn()
            .unwrap()
    };
    for delay_ms in [3u64, 10, 20, 30, 45, 120] {
        let mut child = spawn_part();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    run_parts(run, out, flags, k, &(0..k).collect::<Vec<_>>());
    // The rerun removed the staging paths its killed predecessors (dead pids) left.
    let leftovers: Vec<String> = std::fs::read_dir(parts_dir(out))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let mut child = spawn_part();
    std::thread::sleep(Duration::from_millis(20));
    let _ = child.kill();
    let _ = child.wait();
    finalize(run, out, flags).success();
}

/// The torch-written DCP fixture runs (FORMAT.md).
fn dcp_run(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pma-format/tests/fixtures/dcp")
        .join(name)
}

/// The `.distcp` files of a DCP output.
fn distcp_count(files: &[(String, Vec<u8>)]) -> usize {
    files.iter().filter(|(n, _)| n.ends_with(".distcp")).count()
}

#[test]
fn dcp_parts_then_finalize_equal_the_single_process_merge() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str], &[usize])] = &[
        // FSDP2 on 2 ranks: 2 files.
        ("run-fsdp2", &["--method", "sma"], &[1, 2]),
        // Re-sharded 2 → 4 ranks mid-run: the output has the newest member's 4 files.
        (
            "run-resharded",
            &["--method", "ema", "--alpha", "0.2"],
            &[2, 3, 4],
        ),
        // Optimizer, scheduler and dataloader items copied verbatim, by the part whose file
        // holds them.
        (
            "run-fsdp2",
            &["--method", "sma", "--keep-state", "newest"],
            &[2],
        ),
        // Megatron: common.pt and metadata.json copied by the finalize.
        ("run-megatron", &["--method", "sma"], &[3]),
    ];
    for (i, (name, flags, ks)) in cases.iter().enumerate() {
        let run = dcp_run(name);
        let reference = d.path().join(format!("single-{i}"));
        single(&run, &reference, flags);
        let want = tree(&reference);
        assert!(want.iter().any(|(n, _)| n == ".metadata"), "{name}");
        assert!(distcp_count(&want) >= 2, "{name}: {want:?}");
        for &k in *ks {
            let out = d.path().join(format!("parts-{i}-{k}"));
            run_parts(&run, &out, flags, k, &(0..k).collect::<Vec<_>>());
            assert!(!out.exists(), "parts never publish OUT");
            let part0 = parts_dir(&out).join(format!("part-0-of-{k}"));
            assert!(
                !part0.join(".metadata").exists(),
                "a part is never a checkpoint"
            );
            let mut flags = flags.to_vec();
            if k == 2 {
                flags.push("--verify-parts"); // the manifests' CRC-32s are the files'
            }
            finalize(&run, &out, &flags).success();
            let got = tree(&out);
            let names = |t: &[(String, Vec<u8>)]| -> Vec<String> {
                t.iter().map(|(n, _)| n.clone()).collect()
            };
            assert_eq!(names(&got), names(&want), "{name} K={k}");
            for ((n, a), (_, b)) in got.iter().zip(&want) {
                assert!(
                    a == b,
                    "{name} K={k}: {n} differs from the single-process merge"
                );
            }
            assert!(!parts_dir(&out).exists(), "{name} K={k}: parts dir removed");
        }
    }
}

#[test]
fn dcp_parts_beyond_the_files_write_only_a_manifest() {
    let d = tempfile::tempdir().unwrap();
    // A single-process DCP checkpoint has one file; it is never re-sharded.
    let run = dcp_run("run-single");
    let flags: &[&str] = &["--method", "sma"];
    let out = d.path().join("m");
    let o = pma_clean()
        .args(merge_args(&run, &out, flags))
        .args(["--json", "--part", "2", "--parts", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["part"]["files"], serde_json::json!([]));
    assert_eq!(report["part"]["output_files"], 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("has none to write"));
    let part2: Vec<String> = std::fs::read_dir(parts_dir(&out).join("part-2-of-3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(part2, ["manifest.json"]);
    // The finalize still needs every part, the empty ones included.
    run_parts(&run, &out, flags, 3, &[0]);
    finalize(&run, &out, flags)
        .code(1)
        .stderr(predicate::str::contains("part 1 of 3 is missing"));
    run_parts(&run, &out, flags, 3, &[1]);
    finalize(&run, &out, flags).success();
    let reference = d.path().join("single");
    single(&run, &reference, flags);
    assert_eq!(tree(&out), tree(&reference));
}

#[test]
fn dcp_missing_and_stale_parts_are_refused_and_publish_nothing() {
    let d = tempfile::tempdir().unwrap();
    let run = dcp_run("run-resharded");
    let flags: &[&str] = &["--method", "sma"];
    let out = d.path().join("m");
    run_parts(&run, &out, flags, 3, &[0, 2]);
    finalize(&run, &out, flags)
        .code(1)
        .stderr(predicate::str::contains("part 1 of 3 is missing"));
    assert!(!out.exists());
    // Part 1 from other weights: the same files, other bytes.
    run_parts(&run, &out, &["--method", "ema", "--alpha", "0.2"], 3, &[1]);
    finalize(&run, &out, flags)
        .code(1)
        .stderr(predicate::str::contains(
            "part 1 of 3 was made from a different plan",
        ))
        .stderr(predicate::str::contains("part-1-of-3/manifest.json"));
    assert!(!out.exists());
    // Part 1 keeping state: same weights, another DCP layout (verbatim items added).
    let keep: &[&str] = &["--method", "sma", "--keep-state", "newest"];
    run_parts(&run, &out, keep, 3, &[1]);
    finalize(&run, &out, flags)
        .code(1)
        .stderr(predicate::str::contains(
            "part 1 of 3 was made from a different plan",
        ));
    assert!(!out.exists());
    // A changed .distcp file is refused like a changed shard.
    run_parts(&run, &out, flags, 3, &[1]);
    let part1 = parts_dir(&out).join("part-1-of-3");
    let file = std::fs::read_dir(&part1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "distcp"))
        .unwrap();
    let good = std::fs::read(&file).unwrap();
    std::fs::write(&file, &good[..good.len() - 1]).unwrap();
    finalize(&run, &out, flags)
        .code(1)
        .stderr(predicate::str::contains("bytes but its manifest says"));
    assert!(!out.exists());
    run_parts(&run, &out, flags, 3, &[1]);
    finalize(&run, &out, flags).success();
    let reference = d.path().join("single");
    single(&run, &reference, flags);
    assert_eq!(tree(&out), tree(&reference));
}

#[test]
fn dcp_part_killed_mid_write_then_rerun_gives_identical_output() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    big_run(&run, 1 << 21);
    // HF inputs into DCP: one chunk per tensor in one file, written by part 0.
    let flags: &[&str] = &["--method", "ema", "--threads", "2", "--format", "dcp"];
    let reference = d.path().join("single");
    single(&run, &reference, flags);
    let out = d.path().join("m");
    kill_rerun_and_finalize(&run, &out, flags, 0, 2);
    assert_eq!(tree(&out), tree(&reference));
}

/// The DCP directories of a run's checkpoints, oldest first.
fn dcp_members(run: &Path) -> Vec<PathBuf> {
    pma_merge::CheckpointSeries::discover(run)
        .unwrap()
        .entries
        .iter()
        .map(|e| pma_format::find_dcp_dir(&e.path).unwrap_or_else(|| e.path.clone()))
        .collect()
}

#[test]
fn dcp_finalized_output_loads_in_torch() {
    let Some(py) = common::torch_python("dcp_finalized_output_loads_in_torch") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/dcp_reference.py");
    for (name, ranks) in [("run-fsdp2", "2"), ("run-resharded", "4")] {
        let run = dcp_run(name);
        let flags: &[&str] = &["--method", "sma"];
        let out = d.path().join(name);
        run_parts(&run, &out, flags, 2, &[0, 1]);
        finalize(&run, &out, flags).success();
        // torch's stock dcp.load (and a DTensor load on the newest member's ranks) must give
        // the reference SMA of the members bit for bit.
        let o = StdCommand::new(&py)
            .arg(&tool)
            .args(["verify", "sma"])
            .arg(&out)
            .args(dcp_members(&run))
            .args(["--ranks", ranks])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && text.contains("OK:"),
            "{name}:\n{text}"
        );
    }
}

/// Whether a Slurm cluster can take jobs: `sbatch` on PATH and SLURM_CONF set.
fn slurm_available() -> bool {
    std::env::var_os("SLURM_CONF").is_some()
        && StdCommand::new("sinfo")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        && StdCommand::new("sbatch")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Runs a command under `timeout` (a broken cluster must not hang the test) and returns stdout.
fn checked(cmd: &mut StdCommand, what: &str) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn slurm_array_then_dependent_finalize_equals_single_process() {
    let required = std::env::var("PMA_REQUIRE_SLURM").is_ok_and(|v| v == "1");
    if !slurm_available() {
        assert!(
            !required,
            "PMA_REQUIRE_SLURM=1 but no Slurm cluster answers (start one with \
             tools/slurm_local.sh start and eval its output)"
        );
        eprintln!("SKIPPED: no Slurm cluster (sbatch + SLURM_CONF); set PMA_REQUIRE_SLURM=1 to fail instead");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = run_dir();
    let out = d.path().join("merged");
    let pma_bin = assert_cmd::cargo::cargo_bin("pma");
    let command = |extra: &str| {
        let args: Vec<String> = merge_args(&run, &out, FLAGS)
            .into_iter()
            .map(|a| format!("'{a}'"))
            .collect();
        format!(
            "#!/bin/bash\nset -euo pipefail\n'{}' {} {extra}\n",
            pma_bin.display(),
            args.join(" ")
        )
    };
    let part_sh = d.path().join("part.sh");
    let final_sh = d.path().join("finalize.sh");
    std::fs::write(&part_sh, command("--part auto")).unwrap();
    std::fs::write(&final_sh, command("--finalize")).unwrap();
    let logs = d.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let sbatch = || {
        let mut c = StdCommand::new("timeout");
        c.args(["300", "sbatch", "--parsable", "--time=5"]);
        for v in ENGINE_VARS {
            c.env_remove(v);
        }
        c
    };
    let array = checked(
        sbatch()
            .args(["--array=0-3", "-o"])
            .arg(logs.join("part-%a.log"))
            .arg(&part_sh),
        "sbatch --array=0-3",
    );
    let array_id = array.split(';').next().unwrap().to_string();
    // The finalize job waits for the array through Slurm, not through this test. `sbatch
    // --wait` returns 0 even when the job is cancelled because its dependency failed, so the
    // result itself is checked below.
    checked(
        sbatch()
            .arg("--wait")
            .arg(format!("--dependency=afterok:{array_id}"))
            .arg("-o")
            .arg(logs.join("finalize.log"))
            .arg(&final_sh),
        "sbatch --dependency finalize",
    );
    let log = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    let all_logs: String = (0..4)
        .map(|i| log(&format!("part-{i}.log")))
        .chain([log("finalize.log")])
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        out.is_dir(),
        "the finalize job published nothing:\n{all_logs}"
    );
    for i in 0..4 {
        assert!(
            log(&format!("part-{i}.log")).contains(&format!("part {i} of 4 (from Slurm array")),
            "task {i} did not take its part from the array:\n{all_logs}"
        );
    }
    let reference = d.path().join("single");
    single(&run, &reference, FLAGS);
    assert_eq!(tree(&out), tree(&reference), "{all_logs}");
}
