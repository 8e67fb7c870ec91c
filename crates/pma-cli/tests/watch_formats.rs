//! `pma watch` on the checkpoints training frameworks write: torch DCP runs written by torch
//! (the committed fixtures of `pma-format`) and torch.save runs written by torch in the test.
//! Windowed outputs must equal `pma merge` of the same window bit for bit, pins must outlive
//! the trainer's rotation, an incomplete checkpoint must never be taken, and the streaming
//! modes must read any format.
//!
//! The torch.save tests need python with torch (`PMA_PYTHON`, default `python3`). Without it
//! they print SKIPPED and pass, unless `PMA_REQUIRE_TORCH=1` (as CI sets), where they fail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    copy_tree, events_of, listing, merge, output_steps, pma, python, read_tensors, torch_available,
    Tensors,
};

/// A committed DCP fixture run of pma-format.
fn dcp_fixture(run: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pma-format/tests/fixtures/dcp")
        .join(run)
}

/// A copy of fixture run `name` as a trainer's run dir, without its `expected/` merges.
fn dcp_run(root: &Path, name: &str) -> PathBuf {
    let run = root.join(name);
    copy_tree(&dcp_fixture(name), &run);
    std::fs::remove_dir_all(run.join("expected")).unwrap();
    run
}

fn watch(run: &Path, out: &Path) -> assert_cmd::Command {
    let mut c = pma();
    c.arg("watch").arg(run).arg("--out").arg(out);
    c.args(["--settle", "0", "--quiet", "--once"]);
    c
}

fn processed(out: &Path) -> serde_json::Value {
    let bytes = std::fs::read(out.join(".pma-watch/state.json")).unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["processed"].clone()
}

/// Distance in units in the last place between two floats of one dtype, element by element;
/// returns the largest. Other dtypes must be equal.
fn max_ulps(dtype: pma_format::Dtype, a: &[u8], b: &[u8]) -> u64 {
    assert_eq!(a.len(), b.len());
    let width = match dtype {
        pma_format::Dtype::F32 => 4,
        pma_format::Dtype::BF16 => 2,
        d => {
            assert_eq!(a, b, "{d:?} tensors are copied exactly");
            return 0;
        }
    };
    // Sign-magnitude bits to a line where neighbouring floats are neighbouring integers.
    let sign = 1i64 << (8 * width - 1);
    let ordered = |c: &[u8]| {
        let mut le = [0u8; 8];
        le[..width].copy_from_slice(c);
        let bits = i64::from_le_bytes(le);
        if bits & sign != 0 {
            sign - bits
        } else {
            bits
        }
    };
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| ordered(x).abs_diff(ordered(y)))
        .max()
        .unwrap_or(0)
}

/// Every tensor of `got` within `ulps` of `want`, with the same names, dtypes and shapes.
fn assert_close(got: &Tensors, want: &Tensors, ulps: u64, what: &str) {
    let names = |t: &Tensors| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: tensor names");
    for (name, (dtype, shape, bytes)) in want {
        let (gd, gs, gb) = &got[name];
        assert_eq!((gd, gs), (dtype, shape), "{what}: {name}");
        let u = max_ulps(*dtype, gb, bytes);
        assert!(u <= ulps, "{what}: {name} is {u} ulp off");
    }
}

#[test]
fn dcp_windowed_sma_is_bit_identical_to_pma_merge_and_the_torch_reference() {
    let d = tempfile::tempdir().unwrap();
    // Megatron torch_dist: `iter_N/`, the run's `latest_checkpointed_iteration.txt`, stacked
    // layers as ShardedTensor chunks, bytes items beside the model tensors.
    let run = dcp_run(d.path(), "run-megatron");
    let iters: Vec<PathBuf> = (1..=4)
        .map(|i| run.join(format!("iter_{:07}", 100 * i)))
        .collect();
    let out = d.path().join("out2");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2"])
        .assert()
        .success();
    assert_eq!(
        output_steps(&out),
        ["step-0000200", "step-0000300", "step-0000400"]
    );
    for end in 1..4 {
        let reference = d.path().join(format!("ref-{end}"));
        merge(&iters[end - 1..=end], &["--method", "sma"], &reference);
        let got = out.join(format!("step-{:07}", 100 * (end + 1)));
        assert_eq!(
            read_tensors(&got),
            read_tensors(&reference),
            "window ending at iter {}",
            100 * (end + 1)
        );
    }
    // The whole run, against the merge torch computed (model tensors of every member).
    let out4 = d.path().join("out4");
    watch(&run, &out4)
        .args(["--method", "sma", "--last", "4"])
        .assert()
        .success();
    assert_eq!(output_steps(&out4), ["step-0000400"]);
    assert_eq!(
        read_tensors(&out4.join("step-0000400")),
        read_tensors(&dcp_fixture("run-megatron/expected/sma-n4.safetensors")),
    );
    let merged = events_of(&out4, "merged");
    assert_eq!(
        merged[0]["members"],
        serde_json::json!([100, 200, 300, 400])
    );
}

/// torchtitan-like FSDP2 checkpoints hold optimizer state and a per-step `train_state.step`:
/// a windowed watch merges the model weights only, as `pma merge` does by default.
#[test]
fn dcp_windowed_watch_merges_model_weights_only() {
    let d = tempfile::tempdir().unwrap();
    let run = dcp_run(d.path(), "run-fsdp2");
    let out = d.path().join("out");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "4"])
        .assert()
        .success();
    assert_eq!(
        read_tensors(&out.join("step-0000400")),
        read_tensors(&dcp_fixture("run-fsdp2/expected/sma-n4.safetensors")),
    );
}

#[test]
fn pinned_dcp_member_survives_the_trainer_deleting_it() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let fixture = dcp_fixture("run-megatron");
    let marker = run.join("latest_checkpointed_iteration.txt");
    copy_tree(&fixture.join("iter_0000100"), &run.join("iter_0000100"));
    // The trainer has started iter 200 but not declared it complete.
    copy_tree(&fixture.join("iter_0000200"), &run.join("iter_0000200"));
    std::fs::write(&marker, "100\n").unwrap();
    let out = d.path().join("out");
    let args = ["--method", "sma", "--last", "2"];
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100]));
    assert!(output_steps(&out).is_empty(), "a window of 2 needs 2");
    let waiting = events_of(&out, "waiting");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0]["step"], 200);
    assert!(
        waiting[0]["reason"]
            .as_str()
            .unwrap()
            .contains("latest_checkpointed_iteration.txt"),
        "{waiting:?}"
    );
    // Rotation: the trainer deletes iter 100, then declares iter 200 complete.
    std::fs::remove_dir_all(run.join("iter_0000100")).unwrap();
    std::fs::write(&marker, "200\n").unwrap();
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200]));
    let reference = d.path().join("ref");
    merge(
        &[fixture.join("iter_0000100"), fixture.join("iter_0000200")],
        &["--method", "sma"],
        &reference,
    );
    assert_eq!(
        read_tensors(&out.join("step-0000200")),
        read_tensors(&reference)
    );
    assert!(events_of(&out, "pin-damaged").is_empty());
}

#[test]
fn incomplete_dcp_checkpoints_are_never_taken() {
    let d = tempfile::tempdir().unwrap();
    let run = dcp_run(d.path(), "run-single");
    let distcp = |step: &str| {
        std::fs::read_dir(run.join(step))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "distcp"))
            .unwrap()
    };
    // Step 400 lost a data file; step 300 has its data but no `.metadata` yet.
    let lost = distcp("step-0000400");
    let lost_bytes = std::fs::read(&lost).unwrap();
    std::fs::remove_file(&lost).unwrap();
    let metadata = run.join("step-0000300/.metadata");
    let metadata_bytes = std::fs::read(&metadata).unwrap();
    std::fs::remove_file(&metadata).unwrap();
    let out = d.path().join("out");
    let args = ["--method", "sma", "--last", "1"];
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200]));
    assert_eq!(output_steps(&out), ["step-0000100", "step-0000200"]);
    let waiting = events_of(&out, "waiting");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0]["step"], 300);
    // `.metadata` lands (torch renames it in last): 300 is taken, 400 still lacks a file.
    std::fs::write(&metadata, &metadata_bytes).unwrap();
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200, 300]));
    let waiting = events_of(&out, "waiting");
    assert_eq!(waiting.last().unwrap()["step"], 400);
    let reason = waiting.last().unwrap()["reason"].as_str().unwrap();
    assert!(
        reason.contains(&*lost.file_name().unwrap().to_string_lossy()),
        "{reason}"
    );
    std::fs::write(&lost, &lost_bytes).unwrap();
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200, 300, 400]));
}

#[test]
fn torchtitan_checkpoint_folder_is_watched() {
    // torchtitan writes `checkpoint/step-N/` under its dump folder, which is what users pass.
    let d = tempfile::tempdir().unwrap();
    let dump = d.path().join("dump");
    for step in [100, 200] {
        copy_tree(
            &dcp_fixture(&format!("run-single/step-{step:07}")),
            &dump.join(format!("checkpoint/step-{step}")),
        );
    }
    let out = d.path().join("out");
    watch(&dump, &out)
        .args(["--method", "sma", "--last", "1"])
        .assert()
        .success();
    assert_eq!(output_steps(&out), ["step-0000100", "step-0000200"]);
    let reference = d.path().join("ref");
    merge(
        &[dump.join("checkpoint/step-200")],
        &["--method", "sma"],
        &reference,
    );
    assert_eq!(
        read_tensors(&out.join("step-0000200")),
        read_tensors(&reference)
    );
}

#[test]
fn streaming_modes_read_dcp_members_and_carry_model_tensors_only() {
    let d = tempfile::tempdir().unwrap();
    // Incremental SMA over FSDP2 checkpoints that hold optimizer state and step counters.
    let run = dcp_run(d.path(), "run-fsdp2");
    let out = d.path().join("inc");
    watch(&run, &out)
        .args(["--method", "sma", "--incremental", "--last", "4"])
        .assert()
        .success();
    assert_eq!(output_steps(&out), ["step-0000400"]);
    assert_close(
        &read_tensors(&out.join("step-0000400")),
        &read_tensors(&dcp_fixture("run-fsdp2/expected/sma-n4.safetensors")),
        1,
        "incremental SMA of run-fsdp2",
    );
    // ema-stream over a run re-sharded from 2 to 4 ranks: chunk layouts change mid-stream.
    let run = dcp_run(d.path(), "run-resharded");
    let out = d.path().join("ema");
    watch(&run, &out)
        .args([
            "--method",
            "ema-stream",
            "--alpha",
            "0.2",
            "--state-dtype",
            "f64",
        ])
        .assert()
        .success();
    assert_close(
        &read_tensors(&out.join("step-0000400")),
        &read_tensors(&dcp_fixture("run-resharded/expected/ema0.2-n4.safetensors")),
        1,
        "ema-stream of run-resharded",
    );
}

/// Writes a torch.save run with torch (`tests/scripts/make_torch_run.py`), or returns false
/// when torch is unavailable and not required.
fn make_torch_run(run: &Path, n: usize, layout: &str) -> bool {
    if !torch_available() {
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/make_torch_run.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(run)
        .arg(n.to_string())
        .arg(layout)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "make_torch_run.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn torch_save_hf_run_is_watched_like_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    if !make_torch_run(&run, 3, "hf") {
        return;
    }
    let ckpts: Vec<PathBuf> = (1..=3)
        .map(|i| run.join(format!("step-{:07}", 100 * i)))
        .collect();
    let out = d.path().join("out");
    watch(&run, &out)
        .args(["--method", "sma", "--last", "2"])
        .assert()
        .success();
    assert_eq!(output_steps(&out), ["step-0000200", "step-0000300"]);
    for end in 1..3 {
        let reference = d.path().join(format!("ref-{end}"));
        merge(&ckpts[end - 1..=end], &["--method", "sma"], &reference);
        let got = out.join(format!("step-{:07}", 100 * (end + 1)));
        assert_eq!(read_tensors(&got), read_tensors(&reference));
        // Everything a model needs travels; training state does not.
        assert_eq!(
            listing(&got),
            [
                "1_Pooling/",
                "1_Pooling/config.json",
                "config.json",
                "model.safetensors",
                "vocab.txt"
            ]
        );
        assert_eq!(listing(&got), listing(&reference));
    }
}

#[test]
fn deepspeed_run_waits_for_its_latest_tag() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    if !make_torch_run(&run, 3, "deepspeed") {
        return;
    }
    std::fs::write(run.join("latest"), "global_step200").unwrap();
    let out = d.path().join("out");
    let args = ["--method", "sma", "--last", "2"];
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200]));
    std::fs::remove_dir_all(run.join("global_step100")).unwrap();
    std::fs::write(run.join("latest"), "global_step300").unwrap();
    // Streaming and windowed modes both read the `{'module': ...}` files.
    watch(&run, &out).args(args).assert().success();
    assert_eq!(processed(&out), serde_json::json!([100, 200, 300]));
    let reference = d.path().join("ref");
    merge(
        &[run.join("global_step200"), run.join("global_step300")],
        &["--method", "sma"],
        &reference,
    );
    assert_eq!(
        read_tensors(&out.join("step-0000300")),
        read_tensors(&reference)
    );
    let inc = d.path().join("inc");
    watch(&run, &inc)
        .args(["--method", "sma", "--incremental", "--last", "2"])
        .assert()
        .success();
    assert_close(
        &read_tensors(&inc.join("step-0000300")),
        &read_tensors(&reference),
        1,
        "incremental SMA of DeepSpeed files",
    );
}
