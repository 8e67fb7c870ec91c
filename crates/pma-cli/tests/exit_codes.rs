//! Exit codes and closed pipes: usage errors exit 2, data errors 1, an interrupted merge 130,
//! and output into a closed pipe (`pma inspect CKPT | head`) ends quietly with 0.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use common::{f32_bytes, pma, small_run, write_ckpt};
use pma_format::Dtype;

/// A pipe whose read end is already closed: every write to the returned end fails with EPIPE.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: pipe() fills two fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is ours; closing it leaves the write end without a reader.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is an open fd we own and hand over.
    unsafe { OwnedFd::from_raw_fd(fds[1]) }
}

fn run_into_closed_stdout(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("pma");
    std::process::Command::new(bin)
        .args(args)
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn inspect_into_a_closed_pipe_panicked_with_a_backtrace() {
    let d = tempfile::tempdir().unwrap();
    let ckpt = small_run(d.path(), 1).remove(0);
    let a = d.path().join("a");
    let b = small_run(&a, 2).remove(1);
    let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec!["inspect".as_ref(), ckpt.as_os_str()],
        vec!["inspect".as_ref(), "--stats".as_ref(), ckpt.as_os_str()],
        vec!["inspect".as_ref(), "--json".as_ref(), ckpt.as_os_str()],
        vec!["diff".as_ref(), ckpt.as_os_str(), b.as_os_str()],
    ];
    for args in cases {
        let out = run_into_closed_stdout(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} must end quietly: {stderr}");
    }
}

#[test]
fn dry_run_plan_into_a_closed_pipe_exits_0() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    small_run(&run, 2);
    let out = d.path().join("out");
    let args: Vec<&std::ffi::OsStr> = vec![
        "merge".as_ref(),
        "--run".as_ref(),
        run.as_os_str(),
        "--method".as_ref(),
        "sma".as_ref(),
        "--dry-run".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    let o = run_into_closed_stdout(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn usage_errors_exit_2_and_data_errors_exit_1() {
    let d = tempfile::tempdir().unwrap();
    // clap's own usage error.
    pma().args(["merge", "--no-such-flag"]).assert().code(2);
    // A usage error clap cannot see.
    pma()
        .args(["merge", "--method", "sma", "--out"])
        .arg(d.path().join("o"))
        .assert()
        .code(2)
        .stderr(predicates::str::contains("nothing to merge"));
    // Bad settings.
    let run = d.path().join("run");
    small_run(&run, 2);
    pma()
        .args(["merge", "--method", "ema", "--alpha", "7", "--run"])
        .arg(&run)
        .arg("--out")
        .arg(d.path().join("o"))
        .assert()
        .code(2);
    // A data error: a checkpoint that is not one.
    let junk = d.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    pma()
        .args(["inspect"])
        .arg(&junk)
        .assert()
        .code(1)
        .stderr(predicates::str::starts_with("error: "));
}

#[test]
fn interrupted_merge_exits_130_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    // Large enough that a merge on one thread is still running when the signal comes.
    const ELEMS: usize = 24 << 20;
    for i in 0..2 {
        let v: Vec<f32> = (0..ELEMS).map(|j| (j % 97) as f32 + i as f32).collect();
        write_ckpt(
            &d.path().join(format!("run/step-{}", i + 1)),
            &[("w", Dtype::F32, vec![ELEMS as u64], f32_bytes(&v))],
        );
    }
    let out = d.path().join("out");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .args([
            "merge",
            "--method",
            "sma",
            "--threads",
            "1",
            "--quiet",
            "--run",
        ])
        .arg(d.path().join("run"))
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The staging directory appears once the handler is installed and the merge has started.
    let started = std::time::Instant::now();
    let staging_seen = loop {
        let staged = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("pma-tmp"));
        if staged || started.elapsed().as_secs() > 60 {
            break staged;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    if !staging_seen {
        let o = child.wait_with_output().unwrap();
        panic!("the merge finished before it could be interrupted: {o:?}; make the input larger");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!out.exists(), "an interrupted merge leaves no output");
}
