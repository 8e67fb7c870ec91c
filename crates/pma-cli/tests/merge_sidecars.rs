//! Sidecars through `pma merge`: every non-weight file and folder of the newest member travels
//! with the merged model (a sentence-transformers model needs `vocab.txt`, `modules.json` and
//! `1_Pooling/`; a custom-code model its `*.py`), training state does not, and neither does a
//! symlink that leaves the checkpoint. The report lists both.

mod common;

use std::path::Path;

use common::{copy_tree, f32_bytes, listing, pma, write_ckpt};
use pma_format::Dtype;

/// A sentence-transformers-like checkpoint of step `i`, with HF Trainer state beside it.
fn st_checkpoint(dir: &Path, i: usize, secret: &Path) {
    let w: Vec<f32> = (0..6).map(|j| (i * 10 + j) as f32).collect();
    write_ckpt(dir, &[("w", Dtype::F32, vec![2, 3], f32_bytes(&w))]);
    let files: &[(&str, &[u8])] = &[
        ("vocab.txt", b"[PAD]\n[UNK]\nhello\n"),
        (
            "modules.json",
            br#"[{"idx":0,"path":"","type":"Transformer"}]"#,
        ),
        (
            "1_Pooling/config.json",
            br#"{"pooling_mode_mean_tokens":true}"#,
        ),
        ("modeling_x.py", b"class X: pass\n"),
        ("optimizer.pt", b"adam moments"),
        ("trainer_state.json", br#"{"global_step":1}"#),
    ];
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
    }
    std::os::unix::fs::symlink(secret, dir.join("notes.txt")).unwrap();
}

/// The report's `sidecars_skipped` as (path, reason) pairs.
fn skipped_sidecars(report: &serde_json::Value) -> Vec<(String, String)> {
    report["sidecars_skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn sentence_transformers_merge_keeps_what_the_model_needs_and_nothing_else() {
    let d = tempfile::tempdir().unwrap();
    let secret = d.path().join("id_ed25519");
    std::fs::write(&secret, b"private key").unwrap();
    let (a, b) = (d.path().join("run/step-100"), d.path().join("run/step-200"));
    st_checkpoint(&a, 0, &secret);
    st_checkpoint(&b, 1, &secret);
    let out = d.path().join("merged");
    let assert = pma()
        .args(["merge", "--method", "sma", "--json", "--out"])
        .arg(&out)
        .arg(&a)
        .arg(&b)
        .assert()
        .success();
    assert_eq!(
        listing(&out),
        [
            "1_Pooling/",
            "1_Pooling/config.json",
            "config.json",
            "model.safetensors",
            "modeling_x.py",
            "modules.json",
            "vocab.txt",
        ]
    );
    for f in [
        "vocab.txt",
        "modules.json",
        "1_Pooling/config.json",
        "modeling_x.py",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let report = &json["report"];
    assert_eq!(
        report["sidecars"],
        serde_json::json!([
            "1_Pooling/",
            "1_Pooling/config.json",
            "config.json",
            "modeling_x.py",
            "modules.json",
            "vocab.txt"
        ])
    );
    let skipped = skipped_sidecars(report);
    let reason = |name: &str| {
        skipped
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{name} not reported: {skipped:?}"))
    };
    assert_eq!(reason("optimizer.pt"), "training state");
    assert_eq!(reason("trainer_state.json"), "training state");
    assert!(reason("model.safetensors").starts_with("weights"));
    assert!(
        reason("notes.txt").contains("leaves the checkpoint"),
        "{skipped:?}"
    );
    assert_eq!(skipped.len(), 4, "{skipped:?}");

    // The human report says the same.
    let out2 = d.path().join("merged2");
    let assert = pma()
        .args(["merge", "--method", "sma", "--out"])
        .arg(&out2)
        .arg(&a)
        .arg(&b)
        .assert()
        .success();
    let text = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(text.contains("copied beside it: 1_Pooling/, "), "{text}");
    assert!(
        text.contains("left out: optimizer.pt (training state)"),
        "{text}"
    );
}

#[test]
fn dcp_to_hf_export_keeps_the_newest_members_sidecars_by_the_same_rule() {
    // Issue 9.5: the sidecar rule holds for DCP input too. The members are a torch-written DCP
    // fixture (torch.distributed.checkpoint.save, single process); a trainer saved tokenizer,
    // custom code, a module folder and training state beside the newest one's `.distcp`.
    let d = tempfile::tempdir().unwrap();
    let secret = d.path().join("id_ed25519");
    std::fs::write(&secret, b"private key").unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pma-format/tests/fixtures/dcp/run-single");
    let (a, b) = (d.path().join("run/step-300"), d.path().join("run/step-400"));
    copy_tree(&fixture.join("step-0000300"), &a);
    copy_tree(&fixture.join("step-0000400"), &b);
    let files: &[(&str, &[u8])] = &[
        ("tokenizer.json", br#"{"version":"1.0"}"#),
        ("modeling_x.py", b"class X: pass\n"),
        (
            "1_Pooling/config.json",
            br#"{"pooling_mode_mean_tokens":true}"#,
        ),
        ("rng_state_0.pth", b"rng"),
        ("optimizer.pt", b"adam moments"),
        ("common.pt", b"megatron args"),
        ("metadata.json", br#"{"sharded_backend":"torch_dist"}"#),
    ];
    for (name, bytes) in files {
        let p = b.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
    }
    std::os::unix::fs::symlink(&secret, b.join("notes.txt")).unwrap();

    let out = d.path().join("merged");
    let assert = pma()
        .args([
            "merge", "--method", "sma", "--format", "hf", "--json", "--out",
        ])
        .arg(&out)
        .arg(&a)
        .arg(&b)
        .assert()
        .success();
    assert_eq!(
        listing(&out),
        [
            "1_Pooling/",
            "1_Pooling/config.json",
            "model.safetensors",
            "modeling_x.py",
            "tokenizer.json",
        ]
    );
    for f in ["tokenizer.json", "modeling_x.py", "1_Pooling/config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&assert.get_output().stdout).unwrap();
    let mut skipped = skipped_sidecars(&json["report"]);
    skipped.sort();
    let names: Vec<&str> = skipped.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            ".metadata",
            "__0_0.distcp",
            "common.pt",
            "metadata.json",
            "notes.txt",
            "optimizer.pt",
            "rng_state_0.pth",
        ]
    );
    let reason = |name: &str| &skipped.iter().find(|(p, _)| p == name).unwrap().1;
    assert_eq!(reason("optimizer.pt"), "training state");
    assert_eq!(reason("rng_state_0.pth"), "training state");
    assert!(reason("__0_0.distcp").starts_with("weights"));
    assert!(reason("notes.txt").contains("leaves the checkpoint"));
}
