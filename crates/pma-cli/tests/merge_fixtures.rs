//! The shared fixtures, bit for bit, for every method and for 1 and 2 threads.

mod common;

use common::{fixtures, pma, read_tensors};

fn check(run: &str, args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let want = read_tensors(&fixtures().join(run).join("expected").join(expected));
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("out-{threads}"));
        let mut cmd = pma();
        cmd.args(["merge", "--run"])
            .arg(fixtures().join(run))
            .args(args);
        cmd.args(["--threads", threads, "--quiet", "--out"])
            .arg(&out);
        cmd.assert().success();
        let got = read_tensors(&out);
        assert_eq!(got.len(), want.len(), "{expected}: tensor count");
        for (name, w) in &want {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{expected}: missing {name}"));
            assert_eq!(g.0, w.0, "{expected}: {name} dtype");
            assert_eq!(g.1, w.1, "{expected}: {name} shape");
            assert!(
                g.2 == w.2,
                "{expected}: {name} bytes differ with --threads {threads}"
            );
        }
    }
}

#[test]
fn bf16_sma_n4() {
    check("run-bf16", &["--method", "sma"], "sma-n4.safetensors");
}

#[test]
fn bf16_ema_alpha_0_2() {
    check(
        "run-bf16",
        &["--method", "ema", "--alpha", "0.2"],
        "ema0.2-n4.safetensors",
    );
}

#[test]
fn bf16_ema_alpha_0_1() {
    check(
        "run-bf16",
        &["--method", "ema", "--alpha", "0.1"],
        "ema0.1-n4.safetensors",
    );
}

#[test]
fn bf16_wma() {
    check("run-bf16", &["--method", "wma"], "wma-n4.safetensors");
}

#[test]
fn bf16_last2() {
    check(
        "run-bf16",
        &["--method", "sma", "--last", "2"],
        "sma-last2.safetensors",
    );
}

#[test]
fn bf16_every200() {
    check(
        "run-bf16",
        &["--method", "sma", "--every", "200"],
        "sma-every200.safetensors",
    );
}

#[test]
fn bf16_every_in_tokens() {
    // 200 steps × 4096 tokens/step = 819200 tokens.
    check(
        "run-bf16",
        &[
            "--method",
            "sma",
            "--every",
            "819.2k",
            "--tokens-per-step",
            "4096",
        ],
        "sma-every200.safetensors",
    );
}

#[test]
fn bf16_f32_output() {
    check(
        "run-bf16",
        &["--method", "sma", "--dtype", "f32"],
        "sma-n4-f32out.safetensors",
    );
}

#[test]
fn f32_sma_n3() {
    check("run-f32", &["--method", "sma"], "sma-n3.safetensors");
}

#[test]
fn f32_bf16_output() {
    check(
        "run-f32",
        &["--method", "sma", "--dtype", "bf16"],
        "sma-n3-bf16out.safetensors",
    );
}

#[test]
fn f32_explicit_weights() {
    check(
        "run-f32",
        &["--weights", "0.5,0.3,0.2"],
        "w-0.5-0.3-0.2.safetensors",
    );
}

#[test]
fn explicit_paths_equal_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixtures().join("run-bf16");
    let out = dir.path().join("out");
    let mut cmd = pma();
    cmd.arg("merge");
    for s in [
        "step-0000100",
        "step-0000200",
        "step-0000300",
        "step-0000400",
    ] {
        cmd.arg(run.join(s));
    }
    cmd.args(["--method", "wma", "--quiet", "--out"])
        .arg(&out)
        .assert()
        .success();
    let want = read_tensors(&run.join("expected/wma-n4.safetensors"));
    let got = read_tensors(&out);
    assert!(want.iter().all(|(n, w)| got[n].2 == w.2));
}
