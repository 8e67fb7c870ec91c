//! `pma watch` beside a trainer that misbehaves: a checkpoint rewritten in place after it was
//! pinned, and `--once` started while the newest checkpoint is still settling.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{events, f32_bytes, pma, read_tensors, wait_for, write_ckpt};
use pma_format::Dtype;

const ELEMS: usize = 1 << 20;

fn write_step(run: &Path, step: u64, offset: f32) -> PathBuf {
    let dir = run.join(format!("checkpoint-{step}"));
    let w: Vec<f32> = (0..ELEMS)
        .map(|j| (j % 251) as f32 * 0.01 + offset)
        .collect();
    write_ckpt(
        &dir,
        &[("w", Dtype::F32, vec![ELEMS as u64], f32_bytes(&w))],
    );
    dir
}

fn merged_steps(out: &Path) -> Vec<u64> {
    events(out)
        .iter()
        .filter(|e| e["event"] == "merged")
        .map(|e| e["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn trainer_rewrite_in_place_changed_pinned_bytes() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let out = d.path().join("out");
    write_step(&run, 100, 0.0);
    let ck200 = write_step(&run, 200, 1.0);
    // Keep the original bytes of step 200 for the reference merge.
    let original = d.path().join("orig-200");
    write_step(&original, 200, 1.0);
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "sma",
            "--last",
            "2",
            "--settle",
            "0",
            "--interval",
            "0.1",
        ])
        .args(["--quiet", "--threads", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || merged_steps(&out)
            .contains(&200)),
        "first merge: {:?}",
        events(&out)
    );
    // A rollback rewrites step 200 in place (open with O_TRUNC, as save_pretrained does),
    // first truncating it to nothing, then writing other weights.
    let file = ck200.join("model.safetensors");
    let rewrite =
        std::fs::read(write_step(&d.path().join("rollback"), 200, 5.0).join("model.safetensors"))
            .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Same inode, other bytes.
    std::fs::write(&file, rewrite).unwrap();
    let ck300 = write_step(&run, 300, 2.0);
    let done = wait_for(Duration::from_secs(60), || {
        merged_steps(&out).contains(&300)
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "no signal death: {:?} {stderr}",
        o.status
    );
    assert!(done, "step 300 merged: {:?}", events(&out));
    // The window (200, 300) uses the bytes of 200 that were pinned, not the rewrite.
    let reference = d.path().join("reference");
    pma()
        .args(["merge", "--method", "sma", "--quiet", "--out"])
        .arg(&reference)
        .arg(original.join("checkpoint-200"))
        .arg(&ck300)
        .assert()
        .success();
    assert_eq!(
        read_tensors(&out.join("step-0000300")),
        read_tensors(&reference),
        "the pinned member kept its bytes"
    );
}

#[test]
fn once_exited_with_0_processed_while_settling() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let out = d.path().join("out");
    write_step(&run, 100, 0.0);
    write_step(&run, 200, 1.0);
    // Just written: both are still inside their settle interval.
    let started = Instant::now();
    let once = |settle: &str| {
        pma()
            .arg("watch")
            .arg(&run)
            .arg("--out")
            .arg(&out)
            .args(["--method", "sma", "--last", "2", "--once", "--quiet"])
            .args(["--settle", settle])
            .timeout(Duration::from_secs(60))
            .assert()
            .success();
    };
    once("1");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited out the settle time"
    );
    assert_eq!(merged_steps(&out), vec![200]);
    // An incomplete checkpoint is not waited for: --once returns at once.
    std::fs::create_dir_all(run.join("checkpoint-300")).unwrap();
    std::fs::write(run.join("checkpoint-300/config.json"), b"{}").unwrap();
    let started = Instant::now();
    once("30");
    assert!(started.elapsed() < Duration::from_secs(20));
}
