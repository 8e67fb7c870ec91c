//! Regression tests for issue 11: pma must never destroy or corrupt a training run, and must
//! refuse nonsensical settings with one clear error instead of a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{pma, read_tensors, small_run};
use predicates::prelude::*;

/// Every file under `dir` with its bytes, to show a run dir is untouched.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn watch_once(run: &Path, out: &Path) -> assert_cmd::Command {
    let mut c = pma();
    c.arg("watch").arg(run).arg("--out").arg(out);
    c.args([
        "--method", "sma", "--last", "2", "--once", "--settle", "0", "--quiet",
    ]);
    c
}

#[test]
fn watch_out_equal_to_the_run_dir_is_refused_and_destroys_nothing() {
    // The repro of issue 11.1: this replaced the trainer's step-* dirs with merged models.
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 3);
    let before = snapshot(&run);
    watch_once(&run, &run)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("the same path as").and(predicate::str::contains("run")));
    assert_eq!(snapshot(&run), before, "the run dir must be untouched");
    assert!(
        !run.join(".pma-watch").exists(),
        "no state or log inside the run dir"
    );
}

#[test]
fn watch_out_inside_or_containing_the_run_dir_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    let before = snapshot(&run);
    watch_once(&run, &run.join("merged"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("inside"));
    // Through `..` and a symlink, too.
    std::os::unix::fs::symlink(&run, d.path().join("link")).unwrap();
    watch_once(&run, &d.path().join("link/x/../merged"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("inside"));
    watch_once(&run, d.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("a directory containing"));
    assert_eq!(snapshot(&run), before);
}

#[test]
fn merge_out_inside_an_input_or_the_run_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = small_run(&run, 2);
    let before = snapshot(&run);
    // Explicit inputs: over one, inside one, around them.
    for out in [ckpts[1].clone(), ckpts[0].join("merged"), run.clone()] {
        pma()
            .arg("merge")
            .args(&ckpts)
            .args(["--method", "sma", "--overwrite", "--quiet", "--out"])
            .arg(&out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("pma never writes inside"));
    }
    // A run dir: the output may not go inside it even beside the checkpoints.
    pma()
        .args(["merge", "--method", "sma", "--quiet", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(run.join("merged"))
        .assert()
        .code(2)
        .stderr(predicate::str::contains("inside"));
    assert_eq!(snapshot(&run), before);
    // Beside the run is fine.
    pma()
        .args(["merge", "--method", "sma", "--quiet", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("merged"))
        .assert()
        .success();
}

#[test]
fn watch_gc_never_deletes_a_step_dir_it_did_not_write() {
    // Garbage collection used to delete every step-* at or below the last processed step that
    // was not one of its outputs: a user's own dir in MERGED_DIR went on the next start.
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 3);
    let out = d.path().join("out");
    let theirs = out.join("step-0000050");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), b"mine").unwrap();
    watch_once(&run, &out).assert().success();
    watch_once(&run, &out).assert().success();
    assert_eq!(std::fs::read(theirs.join("notes.txt")).unwrap(), b"mine");
    // --keep still prunes what pma wrote.
    let out2 = d.path().join("out2");
    watch_once(&run, &out2)
        .args(["--keep", "1"])
        .assert()
        .success();
    assert!(!out2.join("step-0000200").exists());
    assert!(read_tensors(&out2.join("step-0000300")).contains_key("a"));
}

#[test]
fn windowed_watch_without_last_is_refused_because_it_pins_forever() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    let out = d.path().join("out");
    for method in [
        &["--method", "sma"][..],
        &["--method", "wma"],
        &["--method", "ema"],
    ] {
        pma()
            .arg("watch")
            .arg(&run)
            .arg("--out")
            .arg(&out)
            .args(method)
            .args(["--once", "--settle", "0"])
            .assert()
            .code(2)
            .stderr(
                predicate::str::contains("--last")
                    .and(predicate::str::contains("pinned"))
                    .and(predicate::str::contains("disk")),
            );
    }
    assert!(!out.exists(), "nothing written for a refused watch");
    // The whole-history modes keep no pins and stay allowed.
    pma()
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "sma",
            "--incremental",
            "--once",
            "--settle",
            "0",
            "--quiet",
        ])
        .assert()
        .success();
}

#[test]
fn interval_of_1e19_seconds_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    for flag in ["--interval", "--settle"] {
        pma()
            .arg("watch")
            .arg(&run)
            .arg("--out")
            .arg(d.path().join("out"))
            .args(["--method", "sma", "--last", "2", flag, "1e19"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(flag).and(predicate::str::contains("panicked").not()));
    }
}

#[test]
fn absurd_thread_count_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    let huge = usize::MAX.to_string();
    pma()
        .args(["merge", "--method", "sma", "--threads", &huge, "--run"])
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("merged"))
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("worker threads")
                .and(predicate::str::contains("panicked").not()),
        );
    pma()
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("out"))
        .args([
            "--method",
            "sma",
            "--last",
            "2",
            "--once",
            "--settle",
            "0",
            "--threads",
            &huge,
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("worker threads"));
    assert!(!d.path().join("merged").exists());
}
