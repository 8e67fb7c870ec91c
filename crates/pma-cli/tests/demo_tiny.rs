//! `pma demo --profile tiny` end to end: real training, merging and evaluation on the embedded
//! corpus, then checks on `results.json` for structure and sanity: every figure finite, every
//! merge member an existing, evaluated checkpoint, every file the report names present.
#![cfg(feature = "lab")]

use std::path::Path;

use assert_cmd::Command;
use serde_json::Value;

fn finite(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite(), "{what} is not finite: {x}");
    x
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array"))
}

/// Checks the parts of `results.json` that every scope has.
fn check_common(out: &Path, r: &Value) {
    assert_eq!(r["schema_version"], 3);
    assert!(r["seed"].is_u64());
    assert!(r["config"]["trunk_steps"].is_u64());

    let checkpoints = arr(r, "checkpoints");
    assert!(!checkpoints.is_empty());
    for c in checkpoints {
        assert!(
            c["run"].is_string() && c["step"].is_u64() && c["tokens"].is_u64(),
            "{c}"
        );
        let v = finite(&c["val_loss"], "checkpoint val_loss");
        // Byte-level: anything above ln(256) is worse than uniform.
        assert!(v > 0.0 && v < 8.0, "{c}");
        for k in ["ppl", "bpb", "accuracy"] {
            finite(&c["metrics"][k], k);
        }
        assert!(out
            .join(c["path"].as_str().unwrap())
            .join("model.safetensors")
            .is_file());
    }

    let merges = arr(r, "merges");
    assert!(!merges.is_empty());
    for m in merges {
        let method = m["method"].as_str().unwrap();
        assert!(
            [
                "sma",
                "ema",
                "wma",
                "decay-linear",
                "decay-cosine",
                "decay-1-sqrt"
            ]
            .contains(&method),
            "{m}"
        );
        assert_eq!(m["alpha"].is_null(), method != "ema", "{m}");
        let n = m["n"].as_u64().unwrap() as usize;
        let members = arr(m, "members");
        let weights = arr(m, "weights");
        assert_eq!(members.len(), n);
        assert_eq!(weights.len(), n);
        let sum: f64 = weights.iter().map(|w| finite(w, "weight")).sum();
        assert!((sum - 1.0).abs() < 1e-9, "weights sum to {sum}: {m}");
        assert!(m["interval"].as_u64().unwrap() > 0);
        finite(&m["val_loss"], "merge val_loss");
        let run = m["run"].as_str().unwrap();
        let mut prev = 0;
        for s in members {
            let step = s.as_u64().unwrap();
            assert!(step > prev, "members are oldest first: {m}");
            prev = step;
            let dir = out.join("runs").join(run).join(format!("step-{step:07}"));
            assert!(
                dir.join("model.safetensors").is_file(),
                "missing member {}",
                dir.display()
            );
            assert!(
                checkpoints
                    .iter()
                    .any(|c| c["run"] == run && c["step"] == step),
                "member {run}/{step} was not evaluated"
            );
        }
        assert_eq!(
            m["step"].as_u64(),
            Some(prev),
            "the newest member is the merge's step"
        );
        assert!(out
            .join(m["path"].as_str().unwrap())
            .join("model.safetensors")
            .is_file());
    }

    for a in arr(r, "annealed") {
        finite(&a["val_loss"], "annealed val_loss");
        assert!(a["step"].as_u64().unwrap() > a["from_step"].as_u64().unwrap());
    }
    for p in arr(r, "predictions") {
        for k in ["annealed_loss", "raw_loss", "merge_loss", "gap"] {
            finite(&p[k], k);
        }
    }
    let findings = arr(r, "findings");
    assert!(!findings.is_empty());
    for f in findings {
        assert!(
            f["claim"].is_string() && f["held"].is_boolean() && f["evidence"].is_string(),
            "{f}"
        );
    }
    for run in arr(r, "runs") {
        finite(&run["tokens_per_sec"], "tokens_per_sec");
        assert!(!arr(run, "curve").is_empty());
    }

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for line in report.lines().filter(|l| l.starts_with("![")) {
        let target = line.split("](").nth(1).unwrap().trim_end_matches(')');
        let png = std::fs::read(out.join(target)).unwrap_or_else(|_| panic!("{target} missing"));
        assert_eq!(&png[1..4], b"PNG");
    }
}

#[test]
fn tiny_demo_writes_sane_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let assert = Command::cargo_bin("pma")
        .unwrap()
        .current_dir(dir.path())
        .args([
            "demo",
            "--profile",
            "tiny",
            "--seed",
            "7",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    let stdout = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    assert!(stdout.contains("report.md"), "{stdout}");
    assert!(stdout.contains("annealed"), "{stdout}");

    let r: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["scope"], "demo");
    assert_eq!(r["profile"], "tiny");
    assert_eq!(r["seed"], 7);
    check_common(&out, &r);
    assert!(!arr(&r, "annealed").is_empty());
    for m in arr(&r, "merges") {
        assert_eq!(m["run"], "trunk");
    }
    assert!(r["spike"].is_null() && r["continued"].is_null());
    for png in ["loss_vs_step.png", "heat_table.png"] {
        assert!(out.join("plots").join(png).is_file());
    }

    // A second run into the same directory needs --overwrite.
    Command::cargo_bin("pma")
        .unwrap()
        .current_dir(dir.path())
        .args(["demo", "--profile", "tiny", "--quiet", "--out"])
        .arg(&out)
        .assert()
        .failure()
        .stderr(predicates::str::contains("--overwrite"));
}

/// The reproduction's code paths (sweeps, in-branch merges, MoE, continued training, spike
/// recovery) at tiny scale.
#[test]
fn tiny_reproduce_covers_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    Command::cargo_bin("pma")
        .unwrap()
        .current_dir(dir.path())
        .args(["reproduce", "--profile", "tiny", "--quiet", "--out"])
        .arg(&out)
        .assert()
        .success();
    let r: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["scope"], "reproduce");
    check_common(&out, &r);
    let tags: Vec<&str> = arr(&r, "merges")
        .iter()
        .flat_map(|m| arr(m, "tags").iter().map(|t| t.as_str().unwrap()))
        .collect();
    for tag in [
        "grid",
        "n_sweep",
        "v_sweep",
        "anneal_branch",
        "moe",
        "continued_init",
        "spike_init",
        "decay_emulation",
    ] {
        assert!(tags.contains(&tag), "no {tag} merge");
    }
    // One record per decay shape; the 1-sqrt fork is the annealing fork from the same step
    // (the trunk decays with 1-sqrt), the other two are trained for the study.
    let shapes: Vec<(&str, &str)> = arr(&r, "decay_emulation")
        .iter()
        .map(|d| {
            for k in ["annealed_loss", "raw_loss", "sma_loss", "decay_loss"] {
                finite(&d[k], k);
            }
            (
                d["shape"].as_str().unwrap(),
                d["fork_run"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            ("linear", "anneal-40-linear"),
            ("cosine", "anneal-40-cosine"),
            ("1-sqrt", "anneal-40")
        ]
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Decay-emulating merges"));
    // Continued training: raw and PMA-init per data order, held-out loss from the init (step 0)
    // to the end at four saved steps, with a warmup-then-cosine schedule.
    let c = &r["continued"];
    for v in arr(c, "initial_heldout_loss") {
        finite(v, "initial_heldout_loss");
    }
    assert!(c["schedule"].as_str().unwrap().starts_with("cosine"), "{c}");
    let orders = arr(c, "orders");
    assert_eq!(orders.len(), 2, "the tiny profile's 2 data orders");
    for (i, o) in orders.iter().enumerate() {
        assert_eq!(o["raw_run"], format!("ct-raw-{i}"));
        assert_eq!(o["merge_run"], format!("ct-pma-{i}"));
        let steps: Vec<u64> = arr(o, "heldout_curve")
            .iter()
            .map(|p| {
                finite(&p[1], "raw held-out loss");
                finite(&p[2], "PMA held-out loss");
                p[0].as_u64().unwrap()
            })
            .collect();
        assert_eq!(steps, [0, 3, 6, 9, 12]);
        for k in ["early_grad_norm_std", "max_grad_norm"] {
            for v in arr(o, k) {
                finite(v, k);
            }
        }
    }
    // Seeds: the tiny profile repeats the trunk-level study with a second seed in its own
    // directory, and judges those findings over both.
    let st = &r["seeds"];
    let seeds = arr(st, "seeds");
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[0]["dir"], ".");
    let second = seeds[1]["dir"].as_str().unwrap();
    assert!(second.starts_with("seeds/seed-"), "{second}");
    assert!(out.join(second).join("runs/trunk").is_dir());
    assert_ne!(seeds[0]["seed"], seeds[1]["seed"]);
    assert_ne!(
        seeds[0]["checkpoints"][0]["val_loss"], seeds[1]["checkpoints"][0]["val_loss"],
        "a second seed must train a different trunk"
    );
    let findings = arr(&r, "findings");
    for sf in arr(st, "findings") {
        let effects = arr(sf, "effects");
        assert_eq!(effects.len(), 2);
        let e: Vec<f64> = effects.iter().map(|v| finite(v, "effect")).collect();
        let mean = finite(&sf["mean"], "mean");
        let std = finite(&sf["std"], "std");
        assert!((mean - (e[0] + e[1]) / 2.0).abs() < 1e-12);
        assert!((std - (e[0] - e[1]).abs() / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(sf["held"].as_bool().unwrap(), mean > std, "{sf}");
        // The verdict in the findings list is the one over the seeds.
        let f = findings.iter().find(|f| f["id"] == sf["id"]).unwrap();
        assert_eq!(f["held"], sf["held"], "{f}");
        assert!(f["evidence"].as_str().unwrap().contains("Over 2 seeds"));
    }
    assert!(report.contains("## Seeds"));
    // The spike study: a sweep, lowest LR first, then the rescue from its spiking run.
    let s = &r["spike"];
    let sweep = arr(s, "sweep");
    assert!(!sweep.is_empty());
    let lrs: Vec<f64> = sweep.iter().map(|w| w["lr"].as_f64().unwrap()).collect();
    assert!(lrs.windows(2).all(|w| w[0] < w[1]), "{lrs:?}");
    let x = &s["rescue"];
    assert_eq!(
        x["run"],
        sweep.last().unwrap()["run"],
        "the rescue starts from the last sweep run"
    );
    finite(&x["pre_spike_val_loss"], "pre_spike_val_loss");
    finite(&x["merge_val_loss"], "merge_val_loss");
    let resumes = arr(x, "resumes");
    assert_eq!(
        resumes.len(),
        2 * 2,
        "raw and PMA for each of the tiny profile's 2 orders"
    );
    let ids: Vec<&str> = arr(&r, "findings")
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    for id in [
        "merge_beats_newest",
        "large_n_hurts_early_helps_late",
        "large_v_hurts_early",
        "moe_merge_beats_newest",
        "pma_init_continued_training",
        "pma_init_avoids_respike",
        "decay_merge_emulates_its_shape",
    ] {
        assert!(ids.contains(&id), "no finding {id}: {ids:?}");
    }
    for png in ["sweeps.png", "moe.png", "continued.png", "spike.png"] {
        assert!(out.join("plots").join(png).is_file(), "{png}");
    }
}
