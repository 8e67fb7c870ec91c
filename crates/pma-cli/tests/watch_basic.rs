//! `pma watch` end to end: windowed outputs against `pma merge`, completeness rules, --once,
//! --keep, --exec, --ready-file, rotation, signals, incremental SMA and ema-stream accuracy.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{bytes_f32, events_of, merge, output_steps, pma, read_tensors, wait_for, write_ckpt};
use pma_format::Dtype;

/// Deterministic pseudo-random f32s (xorshift), spread over several binades like real weights.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            ((u - 0.5) * 0.2) as f32
        })
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| {
            let b = x.to_bits();
            let r = ((b >> 16) & 1) + 0x7FFF;
            (((b + r) >> 16) as u16).to_le_bytes()
        })
        .collect()
}

/// Checkpoint `i` of a synthetic run: f32 `w`, bf16 `e`, and an integer tensor that never changes.
fn write_step(run: &Path, i: usize, elems: usize) -> PathBuf {
    let dir = run.join(format!("step-{:07}", 100 * (i + 1)));
    let w: Vec<f32> = values(i as u64 + 1, elems)
        .iter()
        .map(|x| x + i as f32 * 0.01)
        .collect();
    let e = values(1000 + i as u64, 64);
    write_ckpt(
        &dir,
        &[
            ("w", Dtype::F32, vec![elems as u64], common::f32_bytes(&w)),
            ("e", Dtype::BF16, vec![8, 8], bf16_bytes(&e)),
            (
                "pos",
                Dtype::I64,
                vec![2],
                [7i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ],
    );
    dir
}

fn make_run(run: &Path, n: usize, elems: usize) -> Vec<PathBuf> {
    (0..n).map(|i| write_step(run, i, elems)).collect()
}

fn watch(run: &Path, out: &Path) -> assert_cmd::Command {
    let mut c = pma();
    c.arg("watch").arg(run).arg("--out").arg(out);
    c.args(["--settle", "0", "--quiet"]);
    c
}

fn state(out: &Path) -> serde_json::Value {
    try_state(out).expect("state.json exists and parses")
}

fn try_state(out: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(out.join(".pma-watch/state.json")).ok()?).ok()
}

fn processed(out: &Path) -> serde_json::Value {
    try_state(out).map_or(serde_json::Value::Null, |s| s["processed"].clone())
}

#[test]
fn windowed_outputs_are_bit_identical_to_pma_merge() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 6, 3000);
    for method in [
        &["--method", "sma"][..],
        &["--method", "wma"],
        &["--method", "ema", "--alpha", "0.3"],
        &["--method", "decay-cosine"],
    ] {
        let out = d.path().join(format!("out-{}", method[1]));
        watch(&run, &out)
            .args(method)
            .args(["--last", "4", "--once"])
            .assert()
            .success();
        // A full window first exists at the 4th checkpoint.
        assert_eq!(
            output_steps(&out),
            ["step-0000400", "step-0000500", "step-0000600"]
        );
        for end in 3..6 {
            let reference = d.path().join(format!("ref-{}-{end}", method[1]));
            merge(&ckpts[end - 3..=end], method, &reference);
            let got = out.join(format!("step-{:07}", 100 * (end + 1)));
            assert_eq!(
                read_tensors(&got),
                read_tensors(&reference),
                "{method:?} window ending at {end}"
            );
            assert!(got.join("config.json").is_file(), "sidecars copied");
        }
        let merged = events_of(&out, "merged");
        assert_eq!(merged.len(), 3);
        assert_eq!(
            merged[0]["members"],
            serde_json::json!([100, 200, 300, 400])
        );
    }
}

#[test]
fn include_and_exclude_select_keys_as_pma_merge_does() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 3, 500);
    // A windowed merge: the same tensors and bytes as `pma merge --exclude`.
    let out = d.path().join("out-window");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2", "--once", "--exclude", "e"])
        .assert()
        .success();
    let reference = d.path().join("ref");
    merge(
        &ckpts[1..=2],
        &["--method", "sma", "--exclude", "e"],
        &reference,
    );
    let got = read_tensors(&out.join("step-0000300"));
    assert!(!got.contains_key("e") && got.contains_key("w") && got.contains_key("pos"));
    assert_eq!(got, read_tensors(&reference));
    // The streamed state and output leave it out too.
    let out = d.path().join("out-stream");
    watch(&run, &out)
        .args(["--method", "ema-stream", "--alpha", "0.5", "--once"])
        .args(["--exclude", "e", "--exclude", "pos"])
        .assert()
        .success();
    let got = read_tensors(&out.join("step-0000300"));
    assert_eq!(got.keys().collect::<Vec<_>>(), ["w"]);
    // The selection is part of the watch's settings: a later run with another one is refused
    // rather than mixing two selections in one state.
    watch(&run, &out)
        .args(["--method", "ema-stream", "--alpha", "0.5", "--once"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("keys="));
}

#[test]
fn every_window_matches_pma_merge_at_the_same_step() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 7, 500);
    let out = d.path().join("out");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "3", "--every", "200", "--once"])
        .assert()
        .success();
    // Windows {100,300,500}, {200,400,600}, {300,500,700}.
    assert_eq!(
        output_steps(&out),
        ["step-0000500", "step-0000600", "step-0000700"]
    );
    for at in ["500", "600", "700"] {
        let reference = d.path().join(format!("ref-{at}"));
        pma()
            .args(["merge", "--method", "sma", "--last", "3", "--every", "200"])
            .args(["--at", at, "--quiet", "--run"])
            .arg(&run)
            .arg("--out")
            .arg(&reference)
            .assert()
            .success();
        assert_eq!(
            read_tensors(&out.join(format!("step-{at:0>7}"))),
            read_tensors(&reference)
        );
    }
}

#[test]
fn once_processes_what_is_ready_and_a_second_once_is_a_no_op() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 3, 100);
    let out = d.path().join("out");
    let args = ["--method", "sma", "--last", "2", "--once"];
    watch(&run, &out).args(args).assert().success();
    let first = state(&out);
    assert_eq!(first["processed"], serde_json::json!([100, 200, 300]));
    watch(&run, &out).args(args).assert().success();
    assert_eq!(state(&out), first, "nothing new: state untouched");
    // A new checkpoint: exactly one more update.
    write_step(&run, 3, 100);
    watch(&run, &out).args(args).assert().success();
    let s = state(&out);
    assert_eq!(s["processed"], serde_json::json!([100, 200, 300, 400]));
    assert_eq!(s["generation"], first["generation"].as_u64().unwrap() + 1);
    // Only the members the next window needs stay pinned.
    let pins: Vec<String> = std::fs::read_dir(out.join(".pma-watch/pins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(pins, ["step-0000400"]);
}

#[test]
fn incomplete_checkpoints_are_skipped_or_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 5, 100);
    // step 200: truncated weights; step 300: sharded with a missing shard.
    let f = ckpts[1].join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    std::fs::rename(
        ckpts[2].join("model.safetensors"),
        ckpts[2].join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        ckpts[2].join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"w":"model-00001-of-00002.safetensors","x":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    // step 500 (newest) truncated too: nothing newer is complete, so it is waited for.
    let newest = ckpts[4].join("model.safetensors");
    let good = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &good[..good.len() / 2]).unwrap();
    let out = d.path().join("out");
    let args = ["--method", "sma", "--last", "2", "--once"];
    watch(&run, &out).args(args).assert().success();
    let skipped: Vec<u64> = events_of(&out, "skipped-incomplete")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [200, 300]);
    let skip_reasons = events_of(&out, "skipped-incomplete");
    assert!(skip_reasons[1]["reason"]
        .as_str()
        .unwrap()
        .contains("model-00002-of-00002"));
    let waiting = events_of(&out, "waiting");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0]["step"], 500);
    assert_eq!(state(&out)["processed"], serde_json::json!([100, 400]));
    assert_eq!(output_steps(&out), ["step-0000400"]);
    // The trainer finishes writing step 500: it is taken on the next run.
    std::fs::write(&newest, &good).unwrap();
    watch(&run, &out).args(args).assert().success();
    assert_eq!(state(&out)["processed"], serde_json::json!([100, 400, 500]));
    let merged = events_of(&out, "merged");
    assert_eq!(
        merged.last().unwrap()["members"],
        serde_json::json!([400, 500])
    );
}

fn set_mtime_back(dir: &Path, secs: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(secs);
    for e in std::fs::read_dir(dir).unwrap() {
        let f = std::fs::File::options()
            .write(true)
            .open(e.unwrap().path())
            .unwrap();
        f.set_modified(t).unwrap();
    }
}

#[test]
fn settle_waits_for_recently_changed_files() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 2, 100);
    // Old mtimes prove nothing (they come from the file server's clock): --once looks twice,
    // the settle interval apart on our own monotonic clock, and waits for that.
    set_mtime_back(&ckpts[0], 120);
    let first = d.path().join("first");
    let started = Instant::now();
    let mut cmd = pma();
    cmd.arg("watch").arg(&run).arg("--out").arg(&first);
    cmd.args([
        "--method", "sma", "--last", "2", "--once", "--quiet", "--settle", "1",
    ]);
    cmd.assert().success();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(state(&first)["processed"], serde_json::json!([100, 200]));
    let waiting = events_of(&first, "waiting");
    assert_eq!(waiting[0]["step"], 100);
    assert!(waiting[0]["reason"].as_str().unwrap().contains("settling"));
    let out = d.path().join("out");
    // A daemon watcher takes it only once its files have stopped changing for the interval:
    // a stand-in for a trainer still writing (optimizer state, say) appends for 1.5 s.
    let grower = {
        let f = ckpts[1].join("optimizer.pt");
        std::thread::spawn(move || {
            for _ in 0..15 {
                use std::io::Write;
                let mut h = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&f)
                    .unwrap();
                h.write_all(&[0u8; 1000]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            Instant::now()
        })
    };
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "sma",
            "--last",
            "2",
            "--quiet",
            "--settle",
            "1",
            "--interval",
            "0.05",
        ])
        .spawn()
        .unwrap();
    let taken = wait_for(Duration::from_secs(20), || {
        processed(&out) == serde_json::json!([100, 200])
    });
    let taken_at = Instant::now();
    let growth_ended = grower.join().unwrap();
    terminate(&mut child);
    assert!(taken, "step 200 taken once settled");
    assert!(
        taken_at >= growth_ended + Duration::from_millis(900),
        "taken {:?} after the last write, before the 1 s settle interval",
        taken_at.saturating_duration_since(growth_ended)
    );
}

#[test]
fn ready_file_gates_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 3, 100);
    std::fs::write(ckpts[0].join("trainer_state.json"), b"{}").unwrap();
    let out = d.path().join("out");
    let args = [
        "--method",
        "sma",
        "--last",
        "3",
        "--once",
        "--ready-file",
        "trainer_state.json",
    ];
    watch(&run, &out).args(args).assert().success();
    assert_eq!(state(&out)["processed"], serde_json::json!([100]));
    std::fs::write(ckpts[1].join("trainer_state.json"), b"{}").unwrap();
    std::fs::write(ckpts[2].join("trainer_state.json"), b"{}").unwrap();
    watch(&run, &out).args(args).assert().success();
    assert_eq!(state(&out)["processed"], serde_json::json!([100, 200, 300]));

    // Megatron: one marker in the run dir holding the latest finished iteration.
    let run2 = d.path().join("run2");
    for (i, step) in [1000u64, 2000, 3000].iter().enumerate() {
        let src = write_step(&d.path().join("tmp"), i, 50);
        std::fs::create_dir_all(&run2).unwrap();
        std::fs::rename(src, run2.join(format!("iter_{step:07}"))).unwrap();
    }
    std::fs::write(run2.join("latest_checkpointed_iteration.txt"), b"2000\n").unwrap();
    let out2 = d.path().join("out2");
    watch(&run2, &out2)
        .args([
            "--method",
            "sma",
            "--last",
            "3",
            "--once",
            "--ready-file",
            "latest_checkpointed_iteration.txt",
        ])
        .assert()
        .success();
    assert_eq!(state(&out2)["processed"], serde_json::json!([1000, 2000]));
}

#[test]
fn keep_prunes_old_outputs() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 5, 100);
    let out = d.path().join("out");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2", "--keep", "2", "--once"])
        .assert()
        .success();
    assert_eq!(output_steps(&out), ["step-0000400", "step-0000500"]);
    let pruned: Vec<String> = events_of(&out, "pruned")
        .iter()
        .map(|e| {
            e["output"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(pruned, ["step-0000200", "step-0000300"]);
    assert_eq!(
        state(&out)["outputs"],
        serde_json::json!(["step-0000400", "step-0000500"])
    );
}

#[test]
fn exec_success_and_failure_are_logged_and_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 3, 100);
    let out = d.path().join("out");
    let seen = d.path().join("seen.txt");
    // Succeeds on step 200, fails on step 300.
    let cmd = format!(
        "echo {{}} >> '{}'; case {{}} in *0000300) exit 3;; esac",
        seen.display()
    );
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2", "--once", "--exec", &cmd])
        .assert()
        .success();
    let execs = events_of(&out, "exec");
    assert_eq!(execs.len(), 2);
    assert_eq!(execs[0]["success"], true);
    assert_eq!(execs[0]["code"], 0);
    assert_eq!(execs[1]["success"], false);
    assert_eq!(execs[1]["code"], 3);
    let lines = std::fs::read_to_string(&seen).unwrap();
    assert!(lines.lines().next().unwrap().ends_with("step-0000200"));
    assert_eq!(lines.lines().count(), 2);
    assert_eq!(state(&out)["processed"], serde_json::json!([100, 200, 300]));
}

#[test]
fn restart_with_other_settings_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 2, 10);
    let out = d.path().join("out");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2", "--once"])
        .assert()
        .success();
    watch(&run, &out)
        .args(["--method", "sma", "--last", "3", "--once"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("watch state was made with"));
}

fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait().unwrap()
}

#[test]
fn rotation_keeps_window_members_alive_through_pins() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let archive = d.path().join("archive");
    std::fs::create_dir_all(&run).unwrap();
    let out = d.path().join("out");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args(["--method", "sma", "--last", "4", "--settle", "0"])
        .args(["--interval", "0.05", "--quiet"])
        .spawn()
        .unwrap();
    // The trainer stand-in: write a checkpoint (atomically, by rename), keep only the last 2.
    let n = 8;
    for i in 0..n {
        let staged = write_step(&d.path().join("staging"), i, 2000);
        let name = staged.file_name().unwrap().to_owned();
        let copy = archive.join(&name);
        std::fs::create_dir_all(&copy).unwrap();
        for f in std::fs::read_dir(&staged).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
        std::fs::rename(&staged, run.join(&name)).unwrap();
        // Give the watcher time to see it (it only has to pin it, not merge).
        let pin = out.join(".pma-watch/pins").join(&name);
        let merged = out.join(&name);
        assert!(
            wait_for(Duration::from_secs(20), || pin.exists() || merged.exists()),
            "watcher saw {name:?}"
        );
        let mut present: Vec<PathBuf> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        present.sort();
        while present.len() > 2 {
            std::fs::remove_dir_all(present.remove(0)).unwrap();
        }
    }
    let last = format!("step-{:07}", 100 * n);
    assert!(wait_for(Duration::from_secs(30), || processed(&out)
        .as_array()
        .is_some_and(|a| a.len() == n)));
    let status = terminate(&mut child);
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    assert!(out.join(&last).is_dir());
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        2,
        "trainer rotated"
    );
    let mut all: Vec<PathBuf> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    for end in 3..n {
        let reference = d.path().join(format!("ref-{end}"));
        merge(&all[end - 3..=end], &["--method", "sma"], &reference);
        assert_eq!(
            read_tensors(&out.join(format!("step-{:07}", 100 * (end + 1)))),
            read_tensors(&reference),
            "N=4 SMA ending at checkpoint {end}"
        );
    }
    // Pins left: the 3 the next window needs.
    assert_eq!(
        std::fs::read_dir(out.join(".pma-watch/pins"))
            .unwrap()
            .count(),
        3
    );
}

/// ulps between two f32 bit patterns (same sign assumed near equality).
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn incremental_sma_differs_from_exact_recompute_by_at_most_one_ulp() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let elems = 20_000;
    make_run(&run, 12, elems);
    let mut report = Vec::new();
    for n in ["3", "4"] {
        let exact = d.path().join(format!("exact-{n}"));
        let inc = d.path().join(format!("inc-{n}"));
        watch(&run, &exact)
            .args(["--method", "sma", "--last", n, "--once"])
            .assert()
            .success();
        watch(&run, &inc)
            .args(["--method", "sma", "--incremental", "--last", n, "--once"])
            .assert()
            .success();
        let steps = output_steps(&exact);
        assert_eq!(steps, output_steps(&inc));
        let (mut differ, mut total, mut worst) = (0usize, 0usize, 0u32);
        let (mut bf16_differ, mut bf16_total, mut bf16_worst) = (0usize, 0usize, 0u32);
        for s in &steps {
            let a = read_tensors(&exact.join(s));
            let b = read_tensors(&inc.join(s));
            assert_eq!(a["pos"], b["pos"], "integer tensors copied exactly");
            let (wa, wb) = (bytes_f32(&a["w"].2), bytes_f32(&b["w"].2));
            for (x, y) in wa.iter().zip(&wb) {
                let u = ulps(*x, *y);
                worst = worst.max(u);
                differ += (u > 0) as usize;
                total += 1;
            }
            for (x, y) in a["e"].2.chunks(2).zip(b["e"].2.chunks(2)) {
                let (x, y) = (
                    u16::from_le_bytes([x[0], x[1]]) as i32,
                    u16::from_le_bytes([y[0], y[1]]) as i32,
                );
                let u = x.abs_diff(y);
                bf16_worst = bf16_worst.max(u);
                bf16_differ += (u > 0) as usize;
                bf16_total += 1;
            }
        }
        report.push(format!(
            "N={n}: {differ} of {total} f32 elements differ (max {worst} ulp), \
             {bf16_differ} of {bf16_total} bf16 elements (max {bf16_worst} ulp)"
        ));
        assert!(
            worst <= 1 && bf16_worst <= 1,
            "N={n}: {}",
            report.last().unwrap()
        );
        if n == "4" {
            // 1/4 is exact and f32 sums are exact in f64: no rounding can differ.
            assert_eq!(differ + bf16_differ, 0, "N=4 is bit-identical");
        }
    }
    eprintln!("incremental SMA vs exact recompute: {}", report.join("; "));
}

#[test]
fn ema_stream_tracks_the_closed_form_ema_of_the_whole_history() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 6, 5000);
    // f64 state: within 1 ulp of the f32 output. f32 state: each update rounds the state to
    // f32, so the error is a few f32 roundings of the weights' magnitude (|x| < 0.2), which
    // near zero is many ulps of the result; bound it absolutely.
    for (state_dtype, max_abs) in [("f64", 0.0), ("f32", 6.0 * f32::EPSILON * 0.2)] {
        let out = d.path().join(format!("ema-{state_dtype}"));
        watch(&run, &out)
            .args(["--method", "ema-stream", "--alpha", "0.25", "--once"])
            .args(["--state-dtype", state_dtype])
            .assert()
            .success();
        assert_eq!(output_steps(&out).len(), 6, "one output per checkpoint");
        let reference = d.path().join(format!("ref-{state_dtype}"));
        merge(&ckpts, &["--method", "ema", "--alpha", "0.25"], &reference);
        let a = read_tensors(&out.join("step-0000600"));
        let b = read_tensors(&reference);
        for (x, y) in bytes_f32(&a["w"].2).iter().zip(bytes_f32(&b["w"].2)) {
            if state_dtype == "f64" {
                assert!(ulps(*x, y) <= 1, "f64 state: {x} vs {y}");
            } else {
                assert!((x - y).abs() <= max_abs, "f32 state: {x} vs {y}");
            }
        }
        let s = state(&out);
        assert_eq!(s["members"], serde_json::json!([]), "nothing stays pinned");
        let tensor_file = s["tensor_file"].as_str().unwrap();
        let st = read_tensors(&out.join(".pma-watch/tensors").join(tensor_file));
        let want = if state_dtype == "f64" {
            Dtype::F64
        } else {
            Dtype::F32
        };
        assert_eq!(st["w"].0, want);
        assert!(!st.contains_key("pos"), "integer tensors are not state");
    }
}

#[test]
fn sigterm_during_a_daemon_run_exits_zero_with_committed_state() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 3, 100);
    let out = d.path().join("out");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method",
            "sma",
            "--last",
            "3",
            "--settle",
            "0",
            "--interval",
            "60",
            "--quiet",
        ])
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || processed(&out)
        == serde_json::json!([100, 200, 300])));
    let started = Instant::now();
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 60 s sleep is interrupted"
    );
}

#[test]
fn ema_stream_output_in_the_state_dtype_is_a_link_to_the_read_only_state() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    // Float tensors only: an integer tensor cannot live in the state, so it forces a copy.
    for i in 0..3 {
        let w = values(i as u64, 1000);
        write_ckpt(
            &run.join(format!("step-{:07}", 100 * (i + 1))),
            &[("w", Dtype::F32, vec![1000], common::f32_bytes(&w))],
        );
    }
    let out = d.path().join("out");
    watch(&run, &out)
        .args([
            "--method",
            "ema-stream",
            "--state-dtype",
            "f32",
            "--dtype",
            "f32",
        ])
        .args(["--once", "--keep", "2"])
        .assert()
        .success();
    let s = state(&out);
    let state_file = out
        .join(".pma-watch/tensors")
        .join(s["tensor_file"].as_str().unwrap());
    let output = out.join("step-0000300/model.safetensors");
    let (a, b) = (
        std::fs::metadata(&state_file).unwrap(),
        std::fs::metadata(&output).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "one inode, no second write");
    assert!(a.permissions().readonly());
    // It is a proper output: provenance and all, and pruning one name leaves the other.
    let ck = pma_format::Checkpoint::open(&out.join("step-0000300")).unwrap();
    assert!(ck.files()[0].header().metadata["pma"].contains("ema-stream"));
    assert_eq!(output_steps(&out), ["step-0000200", "step-0000300"]);
    assert_eq!(
        std::fs::read_dir(out.join(".pma-watch/tensors"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn json_events_on_stdout_and_log_at_a_chosen_path() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 2, 10);
    let out = d.path().join("out");
    let log = d.path().join("logs/watch.jsonl");
    let assert = pma()
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method", "sma", "--last", "2", "--once", "--settle", "0", "--json",
        ])
        .arg("--log")
        .arg(&log)
        .assert()
        .success();
    let stdout = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines[..lines.len() - 1]
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["seen", "pinned", "seen", "pinned", "counted", "merged", "unpinned"]
    );
    assert!(lines.iter().all(|e| e["schema_version"] == 1));
    assert_eq!(
        lines.last().unwrap()["report"]["processed"],
        serde_json::json!([100, 200])
    );
    // The log holds the same events, one per line.
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), kinds.len());
    assert!(!out.join(".pma-watch/events.jsonl").exists());
}

#[test]
fn sigint_mid_run_finishes_the_current_update_then_stops() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    make_run(&run, 6, 3_000_000);
    let out = d.path().join("out");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pma"))
        .arg("watch")
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args([
            "--method", "sma", "--last", "2", "--once", "--settle", "0", "--quiet",
        ])
        .args(["--threads", "1"])
        .spawn()
        .unwrap();
    // Interrupt as soon as the first merge is logged: the watcher is then inside the next update.
    assert!(wait_for(Duration::from_secs(60), || !events_of(
        &out, "merged"
    )
    .is_empty()));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let done: Vec<u64> = state(&out)["processed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(done.len() >= 2 && done.len() < 6, "stopped early: {done:?}");
    assert_eq!(done, [100, 200, 300, 400, 500, 600][..done.len()]);
    // Every committed update has its output; nothing half-made is left behind.
    let want: Vec<String> = done[1..].iter().map(|s| format!("step-{s:07}")).collect();
    assert_eq!(output_steps(&out), want);
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("pma-tmp")));
}

#[test]
fn a_damaged_pending_pin_is_rebuilt_from_the_trainers_copy() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let ckpts = make_run(&run, 2, 100);
    let out = d.path().join("out");
    let once = |out: &Path| {
        let mut c = pma();
        c.arg("watch").arg(&run).arg("--out").arg(out);
        c.args([
            "--method", "sma", "--last", "2", "--once", "--quiet", "--settle", "0",
        ]);
        c.assert().success();
    };
    // A pin of step 200 left by an earlier run (200 was pinned while 100 still settled), then
    // damaged: its weights are gone.
    let pin = out.join(".pma-watch/pins/step-0000200");
    std::fs::create_dir_all(&pin).unwrap();
    std::fs::copy(ckpts[1].join("config.json"), pin.join("config.json")).unwrap();
    assert!(try_state(&out).is_none(), "nothing processed yet");
    once(&out);
    assert_eq!(state(&out)["processed"], serde_json::json!([100, 200]));
    let reference = d.path().join("reference");
    merge(&ckpts, &["--method", "sma"], &reference);
    assert_eq!(
        read_tensors(&out.join("step-0000200")),
        read_tensors(&reference)
    );
}
