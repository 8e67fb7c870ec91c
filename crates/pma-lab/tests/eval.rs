//! Eval reads whatever the merge engine writes: other float dtypes and sharded checkpoints.

use std::collections::BTreeMap;
use std::path::Path;

use pma_format::dtype::{encode_f64, for_each_f64, FloatDtype};
use pma_format::{write_index, write_safetensors, Checkpoint, DtypeClass, TensorSpec};
use pma_lab::config::ModelConfig;
use pma_lab::eval::{evaluate, EvalConfig};
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::{train, NoProgress, TrainConfig};
use pma_lab::Error;

/// Re-encodes `src` into `dst` as `dtype`, in `n_shards` shards (1: a single model.safetensors).
fn convert(src: &Path, dst: &Path, dtype: FloatDtype, n_shards: usize) {
    let ckpt = Checkpoint::open(src).unwrap();
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let tensors: Vec<(TensorSpec, Vec<u8>)> = ckpt
        .tensors()
        .iter()
        .map(|t| {
            let DtypeClass::Float(fd) = pma_format::dtype::classify(t.info.dtype) else {
                panic!("lab writes floats")
            };
            let mut values = Vec::new();
            for_each_f64(fd, ckpt.bytes(t), |_, v| values.push(v));
            let mut bytes = vec![
                0u8;
                values.len()
                    * (pma_format::dtype::dtype_bits(dtype.dtype()) as usize / 8)
            ];
            encode_f64(dtype, &values, &mut bytes);
            let spec = TensorSpec {
                name: t.info.name.clone(),
                dtype: dtype.dtype(),
                shape: t.info.shape.clone(),
            };
            (spec, bytes)
        })
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if n_shards == 1 {
        let refs: Vec<(TensorSpec, &[u8])> = tensors
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        write_safetensors(&dst.join("model.safetensors"), &refs, &meta).unwrap();
        return;
    }
    let per = tensors.len().div_ceil(n_shards);
    let mut shards = Vec::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = pma_format::shard_file_name(i, n_shards);
        let refs: Vec<(TensorSpec, &[u8])> = chunk
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        write_safetensors(&dst.join(&name), &refs, &meta).unwrap();
        shards.push((name, chunk.iter().map(|(s, _)| s).collect::<Vec<_>>()));
    }
    write_index(dst, &shards).unwrap();
}

#[test]
fn eval_reads_other_dtypes_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        model: ModelConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 2,
            ..ModelConfig::default()
        },
        steps: 3,
        batch_size: 2,
        seq_len: 32,
        schedule: ScheduleKind::Constant,
        save_every: 0,
        out_dir: dir.path().join("run"),
        ..TrainConfig::default()
    };
    let report = train(&config, &NoProgress).unwrap();
    let src = &report.checkpoints[0];
    let eval = EvalConfig::default();
    let base = evaluate(src, &eval).unwrap();

    let f64_sharded = dir.path().join("f64-sharded");
    convert(src, &f64_sharded, FloatDtype::F64, 3);
    assert!(f64_sharded.join("model.safetensors.index.json").is_file());
    let r = evaluate(&f64_sharded, &eval).unwrap();
    assert_eq!(
        (r.val_loss, r.tokens),
        (base.val_loss, base.tokens),
        "f32 -> f64 is exact"
    );

    for dtype in [FloatDtype::BF16, FloatDtype::F16] {
        let out = dir.path().join(dtype.name());
        convert(src, &out, dtype, 1);
        let r = evaluate(&out, &eval).unwrap();
        assert_eq!(r.tokens, base.tokens);
        assert!(
            (r.val_loss - base.val_loss).abs() < 0.02,
            "{dtype:?}: {} vs {}",
            r.val_loss,
            base.val_loss
        );
    }

    std::fs::remove_file(f64_sharded.join("config.json")).unwrap();
    assert!(matches!(
        evaluate(&f64_sharded, &eval),
        Err(Error::MissingConfig { .. })
    ));
}
