//! Lab checkpoints against `transformers`.
//!
//! - `golden_logits_match_transformers` (pure Rust, always runs): the committed fixtures in
//!   `tests/golden/{dense,moe}/` are lab-written checkpoints; `golden.json` holds the logits and
//!   loss that transformers' `LlamaForCausalLM` / `MixtralForCausalLM` computed for them.
//! - `transformers_loads_lab_checkpoints` (runs where `python3 -c 'import torch, transformers'`
//!   works, and says it was skipped elsewhere): writes fresh checkpoints, loads them in
//!   transformers through `tests/golden/hf_logits.py`, and compares loss (1e-4 relative) and
//!   logits. With `PMA_LAB_WRITE_GOLDEN=1` it also rewrites the fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use pma_lab::checkpoint::{load_model, write_model};
use pma_lab::config::{ModelConfig, ModelKind};
use pma_lab::model::{cross_entropy, Params};
use pma_lab::rng::Rng;

const TEXT: &[u8] = b"Call me Ishmael. Some years ago";

fn golden_dir(kind: ModelKind) -> PathBuf {
    let name = match kind {
        ModelKind::Dense => "dense",
        ModelKind::Moe => "moe",
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn fixture_config(kind: ModelKind) -> ModelConfig {
    ModelConfig {
        kind,
        vocab_size: 256,
        hidden_size: 16,
        intermediate_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 64,
        num_experts: 4,
        top_k: 2,
        // The MoE fixture also covers the tied head.
        tie_word_embeddings: kind == ModelKind::Moe,
        ..ModelConfig::default()
    }
}

/// Weights large enough (std 0.3, norm weights around 1) that logits differ visibly per position.
fn write_fixture(kind: ModelKind, dir: &Path) {
    let config = fixture_config(kind);
    let mut rng = Rng::new(42);
    let (params, _) = Params::from_values(&config, &mut |_, shape| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect()
        } else {
            (0..n).map(|_| (0.3 * rng.normal()) as f32).collect()
        };
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    })
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for f in ["model.safetensors", "config.json"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    write_model(dir, &config, &params).unwrap();
}

fn tokens() -> Vec<u32> {
    TEXT.iter().map(|&b| u32::from(b)).collect()
}

/// Lab logits `[T, V]` and mean next-token loss on `tokens`.
fn lab_logits(dir: &Path) -> (Vec<Vec<f32>>, f64) {
    let model = load_model(dir, DType::F32, &Device::Cpu).unwrap();
    let t = tokens();
    let input = Tensor::new(t.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input).unwrap().logits;
    let n = t.len();
    let pred = logits.narrow(0, 0, n - 1).unwrap();
    let targets = Tensor::new(&t[1..], &Device::Cpu).unwrap();
    let loss = cross_entropy(&pred, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (logits.to_vec2().unwrap(), f64::from(loss))
}

fn assert_close(kind: ModelKind, lab: &[Vec<f32>], reference: &[Vec<f64>], tol: f64) {
    assert_eq!(lab.len(), reference.len());
    for (t, (a, b)) in lab.iter().zip(reference).enumerate() {
        for (v, (x, y)) in a.iter().zip(b).enumerate() {
            let x = f64::from(*x);
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{kind:?}: logit [{t}, {v}]: lab {x} vs transformers {y}"
            );
        }
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Golden {
    architecture: String,
    versions: String,
    text: String,
    logits: Vec<Vec<f64>>,
    loss: f64,
}

#[test]
fn golden_logits_match_transformers() {
    for kind in [ModelKind::Dense, ModelKind::Moe] {
        let dir = golden_dir(kind);
        let golden: Golden =
            serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
        assert_eq!(golden.architecture, kind.architecture());
        assert_eq!(golden.text.as_bytes(), TEXT);
        let (logits, loss) = lab_logits(&dir);
        assert_close(kind, &logits, &golden.logits, 1e-4);
        assert!(
            (loss - golden.loss).abs() <= 1e-4 * golden.loss,
            "{kind:?}: loss {loss} vs {}",
            golden.loss
        );
    }
}

fn python_has_transformers() -> bool {
    Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn transformers_loads_lab_checkpoints() {
    if !python_has_transformers() {
        eprintln!("SKIPPED transformers_loads_lab_checkpoints: `python3 -c 'import torch, transformers'` failed here");
        return;
    }
    let write_golden = std::env::var_os("PMA_LAB_WRITE_GOLDEN").is_some();
    let tmp = tempfile::tempdir().unwrap();
    for kind in [ModelKind::Dense, ModelKind::Moe] {
        let dir = if write_golden {
            golden_dir(kind)
        } else {
            tmp.path().join(kind.architecture())
        };
        write_fixture(kind, &dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_logits.py");
        let ids = serde_json::to_string(&tokens()).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .arg(&ids)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let golden = Golden {
            architecture: reference["architecture"].as_str().unwrap().to_string(),
            versions: reference["versions"].as_str().unwrap().to_string(),
            text: String::from_utf8(TEXT.to_vec()).unwrap(),
            logits: serde_json::from_value(reference["logits"].clone()).unwrap(),
            loss: reference["loss"].as_f64().unwrap(),
        };
        assert_eq!(golden.architecture, kind.architecture());
        let (logits, loss) = lab_logits(&dir);
        assert!(
            (loss - golden.loss).abs() <= 1e-4 * golden.loss,
            "{kind:?}: lab loss {loss} vs transformers {}",
            golden.loss
        );
        assert_close(kind, &logits, &golden.logits, 1e-4);
        if write_golden {
            let mut text = serde_json::to_vec(&golden).unwrap();
            text.push(b'\n');
            std::fs::write(dir.join("golden.json"), text).unwrap();
        }
    }
}
