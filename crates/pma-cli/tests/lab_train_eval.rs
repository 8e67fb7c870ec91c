//! `pma train` and `pma eval` end to end, on a tiny model, in a fresh temp dir.
#![cfg(feature = "lab")]

use assert_cmd::Command;
use predicates::str::contains;

fn pma() -> Command {
    Command::cargo_bin("pma").expect("the pma binary is built for integration tests")
}

const TINY: &[&str] = &[
    "--layers", "1", "--hidden", "32", "--heads", "2", "--batch", "2", "--seq", "16", "-q",
];

#[test]
fn train_writes_checkpoints_and_eval_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    pma()
        .arg("train")
        .args(TINY)
        .args([
            "--steps",
            "4",
            "--save-every",
            "2",
            "--schedule",
            "wsd",
            "--decay-shape",
            "cosine",
            "--out",
        ])
        .arg(&run)
        .assert()
        .success()
        .stderr(contains("tokens/s"));
    for step in ["step-0000002", "step-0000004"] {
        for f in [
            "model.safetensors",
            "config.json",
            "trainer_state.json",
            "optimizer.safetensors",
        ] {
            assert!(run.join(step).join(f).is_file(), "{step}/{f} missing");
        }
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "tokens",
        "lr",
        "loss",
        "grad_norm",
        "tokens_per_sec",
    ] {
        assert!(first.get(key).is_some(), "metrics line lacks {key}");
    }

    let out = pma()
        .arg("eval")
        .arg(run.join("step-0000002"))
        .arg(run.join("step-0000004"))
        .arg("--json")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for line in &lines {
        for key in ["checkpoint", "val_loss", "ppl", "bpb", "accuracy", "tokens"] {
            assert!(line.get(key).is_some(), "eval json lacks {key}");
        }
        // Validation split (60,250 bytes) in windows of the training length 16: 15 predictions each.
        assert_eq!(line["tokens"], (60_250 / 16) * 15);
    }
    assert!(lines[0]["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("step-0000002"));

    // --data and --seq: the whole file, consecutive windows, last partial one dropped.
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(10),
    )
    .unwrap();
    let out = pma()
        .arg("eval")
        .arg(run.join("step-0000004"))
        .args(["--seq", "32", "--json", "--data"])
        .arg(&text)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["tokens"], (450 / 32) * 31);
}

#[test]
fn config_file_stop_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        "layers = 1\nhidden = 32\nheads = 2\nbatch = 2\nseq = 16\nsteps = 4\nsave-every = 2\nschedule = \"constant\"\nlr-spike = \"1:5:1\"\n",
    )
    .unwrap();
    pma()
        .args(["train", "-q", "--stop-after", "2", "--config"])
        .arg(&toml)
        .arg("--out")
        .arg(&run)
        .assert()
        .success();
    assert!(run.join("step-0000002").is_dir());
    assert!(!run.join("step-0000004").exists());
    // Regression (issue 11): a setting that would change the weights is refused on resume,
    // naming it, instead of silently breaking the exact resume.
    pma()
        .args(["train", "-q", "--lr", "0.01", "--resume"])
        .arg(&run)
        .assert()
        .failure()
        .stderr(contains("lr (recorded 0.003, given 0.01)"));
    assert!(!run.join("step-0000004").exists());
    pma()
        .args(["train", "-q", "--resume"])
        .arg(&run)
        .assert()
        .success();
    assert!(run.join("step-0000004").is_dir());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lrs: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // Constant 3e-3 after a 0-step warmup (steps/10 = 0), times 5 at update 1.
    assert_eq!(lrs.len(), 4);
    assert!((lrs[1] / lrs[0] - 5.0).abs() < 1e-9, "{lrs:?}");

    // A fork from a checkpoint gets its shape from config.json.
    pma()
        .args([
            "train", "-q", "--steps", "2", "--batch", "2", "--seq", "16", "--init",
        ])
        .arg(run.join("step-0000004"))
        .arg("--out")
        .arg(dir.path().join("fork"))
        .assert()
        .success();
    assert!(dir
        .path()
        .join("fork/step-0000002/model.safetensors")
        .is_file());
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    pma()
        .arg("train")
        .args(TINY)
        .args(["--lr-spike", "10:2", "--out"])
        .arg(dir.path().join("run"))
        .assert()
        .failure()
        .stderr(contains("STEP:FACTOR:LEN"));
    pma()
        .args(["train", "--schedule", "linear", "--out"])
        .arg(dir.path().join("run"))
        .assert()
        .failure()
        .stderr(contains("constant, wsd or cosine"));
    pma()
        .arg("eval")
        .arg(dir.path().join("missing"))
        .assert()
        .failure()
        .stderr(contains("missing"));
}
